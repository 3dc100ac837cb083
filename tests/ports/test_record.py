"""A torch port's failure pinned to the line of its source (harness/ports/record.py,
harness/ports/localise.py).

A module's forward recorded at the level of torch's dispatched ops gives each op its user
line; a planted bug on one line of a hand-written attention, GELU or layer norm
(tests/ports/line_ports.py) is pinned to that line, found by its text; the right port
records nothing; a matcher that ignores layouts does not pin the attention bug.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from harness import TorchModel, run_parity, to_json
from harness.checks.results import first_divergence_check
from harness.ports import localise as L
from harness.ports import record as R
from harness.probe import listening
from pyref import synth
from pyref.config import PRESETS

import line_ports as lp

TINY = PRESETS["tiny"]
PORTS = Path(lp.__file__)


def line_of(text: str, path: Path = PORTS) -> int:
    """The number of the one line of ``path`` whose text is ``text``."""
    found = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text]
    assert len(found) == 1, (text, found)
    return found[0]


class Recorded:
    """A probe listener: the spans "record" it hears."""

    def __init__(self):
        self.modules = []

    def enter(self, category, detail):
        if category == "record":
            self.modules.append(detail.get("module"))

    def exit(self, token):
        pass


def run(factory):
    """One step from the C's state; (the report, the port's first divergence check, the
    modules recorded)."""
    with listening(Recorded()) as heard:
        report = run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 2, 8), steps=1,
                            models={"port": TorchModel(factory)})
    c = first_divergence_check([c for c in report.steps[0].checks if c.impl == "port"])
    return report, c, heard.modules


# ----------------------------------------------------------------------------- recording

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        y = h.transpose(-2, -1) @ h
        return y.softmax(-1)


def test_recording_gives_each_op_its_user_line_and_module():
    model = Small()
    ops = R.record(model, lambda: model(torch.randn(2, 3, 4)))
    here = Path(__file__)
    made = [op for op in ops if op.name != "input"]
    assert {op.site.file for op in made} == {str(here)}
    lines = {op.name: (op.site.line, op.site.text, op.module) for op in made}
    assert lines["aten.addmm.default"] == (line_of("h = self.lin(x)", here), "h = self.lin(x)", "lin")
    assert lines["aten.bmm.default"][:2] == (line_of("y = h.transpose(-2, -1) @ h", here),
                                             "y = h.transpose(-2, -1) @ h")
    assert lines["aten.bmm.default"][2] == ""          # the model's own forward
    assert lines["aten._softmax.default"][0] == line_of("return y.softmax(-1)", here)
    soft = next(op for op in made if op.name == "aten._softmax.default")
    assert soft.shape == (2, 4, 4) and soft.dtype == "float32"
    # which op produced each input: the softmax reads the matmul's output
    assert ops[soft.inputs[0]].name == "aten._unsafe_view.default"
    np.testing.assert_allclose(soft.value.sum(-1), 1.0, rtol=1e-6)


def test_recording_a_module_keeps_its_first_call_only():
    model = Small()
    ops = R.record(model, lambda: model(torch.randn(2, 3, 4)), module="lin")
    assert [op.name for op in ops if op.name != "input"] == ["aten.view.default", "aten.t.default",
                                                            "aten.addmm.default", "aten.view.default"]
    assert all(op.module == "lin" for op in ops)


def test_user_files_are_not_torch_nor_the_harness():
    assert R.is_user_file(__file__)
    assert not R.is_user_file(torch.__file__)
    assert not R.is_user_file(R.__file__)
    assert not R.is_user_file(json.__file__)
    assert not R.is_user_file("<frozen importlib._bootstrap>")


# ----------------------------------------------------------------------------- pinning

PLANTED = {
    # port, the buggy line's text, the op, what matches, what does not
    "attention": (lp.TransposedGPT, "y = att.transpose(-2, -1) @ v", "attention_forward", "att", "out"),
    "gelu": (lp.SquareGeluGPT, "return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * "
             "(input + 0.044715 * torch.pow(input, 2.0))))", "gelu_forward", "inp", "inner"),
    "layernorm": (lp.UnbiasedGPT, "var = (xshift * xshift).sum(-1, keepdim=True) / (x.size(-1) - 1)",
                  "layernorm_forward", "xshift", "var"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_is_pinned_to_its_line(bug):
    factory, text, kernel, matched, unmatched = PLANTED[bug]
    report, c, recorded = run(factory)
    assert not report.passed and c is not None and c.kind == "replay"
    assert c.kernels == (kernel,)
    pin = c.pin
    assert pin is not None, report.steps[0].first_divergence
    assert [(s.file, s.line, s.text) for s in pin.lines] == [(str(PORTS), line_of(text), text)]
    assert (pin.file, pin.line, pin.text) == (str(PORTS), line_of(text), text)
    assert (pin.matched, pin.unmatched) == (matched, unmatched)
    assert len(recorded) == 1        # only the failing module, once
    # in the first divergence's text and in the JSON, as data
    first = report.steps[0].first_divergence["port"]
    assert f"{kernel} at line_ports.py:{line_of(text)} ({text})" in first
    assert report.first_divergence().endswith(pin.describe())
    data = to_json(report, versions=False)
    row = next(r for r in data["steps"][0]["checks"] if r["impl"] == "port" and r["kind"] == "replay"
               and r["tensor"] == c.tensor)
    assert row["pin"]["line"] == line_of(text) and row["pin"]["file"] == str(PORTS)
    assert (row["pin"]["matched"], row["pin"]["unmatched"]) == (matched, unmatched)
    json.dumps(data, allow_nan=False)


def test_attention_pin_says_what_matches():
    _, c, _ = run(lp.TransposedGPT)
    assert c.pin.describe().endswith("the softmax matches, the weighted values do not")
    assert c.diagnosis is not None and not c.diagnosis.known   # no known cause: the line is what there is


def test_a_named_cause_keeps_its_diagnosis_and_gains_the_line():
    _, c, _ = run(lp.UnbiasedGPT)
    assert c.diagnosis.known and c.diagnosis.causes[0].id.startswith("layernorm.")
    assert c.pin is not None


def test_the_right_port_passes_and_records_nothing():
    report, c, recorded = run(lp.LineGPT)
    assert report.passed and c is None
    assert recorded == []
    assert all(ch.pin is None for ch in report.steps[0].checks)


def test_a_matcher_without_layouts_does_not_pin_the_attention_bug(monkeypatch):
    """Heads merged and split are the same values in another layout: a matcher that
    only reshapes does not see that the weighted sum is the first wrong value, and
    blames the head merge too."""
    text = PLANTED["attention"][1]
    right = L.pin_failure
    monkeypatch.setattr("harness.checks.replay.pin_failure",
                        lambda state, node, ref: right(state, node, ref, layout=lambda a, shape: (
                            [a.reshape(shape)] if a.size == int(np.prod(shape)) else [])))
    _, c, _ = run(lp.TransposedGPT)
    assert c.pin is not None
    assert [s.line for s in c.pin.lines] != [line_of(text)]


def test_the_command_line_prints_the_line(capsys):
    from harness.cli import main
    text = PLANTED["attention"][1]
    code = main(["run", "--steps", "1", "-q", "--ref", "oracle", "--model", f"{PORTS}:TransposedGPT"])
    out = capsys.readouterr().out
    assert code == 1
    first = next(line for line in out.splitlines() if line.startswith("first divergence:"))
    assert first.endswith(f"attention_forward at line_ports.py:{line_of(text)} ({text}): "
                          "the softmax matches, the weighted values do not")


# ----------------------------------------------------------------------------- the ops the intermediates added

class DoubledBias(nn.Module):
    """A linear written out, its bias doubled."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))

    def forward(self, x):
        product = x @ self.weight.t()
        return product + 2 * self.bias


class HotLogSoftmax(nn.Module):
    """The probabilities from a log-softmax whose log-sum-exp is taken of scaled logits."""

    def forward(self, z):
        lse = (z * 1.1).logsumexp(-1, keepdim=True)
        logp = z - lse
        return logp.exp()


def _pin(model, kernel, x, **more):
    ops = R.record(model, lambda: model(x))
    args = {("logits" if kernel == "softmax_forward" else "inp"): x.double().numpy(), **more}
    observed = R.Stage("observed", "observed", model(x).detach().double().numpy())
    return L.locate(ops, R.stages(kernel, args), observed, kernel, "")


def test_a_matmul_is_pinned_past_its_product():
    torch.manual_seed(0)
    model = DoubledBias()
    pin = _pin(model, "matmul_forward", torch.randn(2, 3, 4), weight=model.weight.detach().double().numpy(),
               bias=model.bias.detach().double().numpy())
    here = Path(__file__)
    assert [s.line for s in pin.lines] == [line_of("return product + 2 * self.bias", here)]
    assert (pin.matched, pin.unmatched) == ("product", "out")


def test_the_loss_is_pinned_at_its_shift():
    torch.manual_seed(0)
    pin = _pin(HotLogSoftmax(), "softmax_forward", 2 * torch.randn(2, 3, 11), V=11)
    here = Path(__file__)
    assert [s.line for s in pin.lines] == [line_of("lse = (z * 1.1).logsumexp(-1, keepdim=True)", here)]
    # torch's logsumexp takes the row maximum first: the scaled logits' is the first value off
    assert (pin.matched, pin.unmatched) == ("vlogits", "shift")
    assert pin.describe().endswith("the logits of the V real tokens match, the shift (the row maximum) does not")


# ----------------------------------------------------------------------------- inside a module of several ops

import fused_ports as fp     # noqa: E402


def _run(port):
    return run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 2, 8), steps=1,
                      models={"port": port})


def _first(report):
    return first_divergence_check([c for c in report.steps[0].checks if c.impl == "port"])


FUSED = {"MergedWithoutTranspose": ("return y.reshape(B, T, NH * hs)", "attention.layout"),
         "ScaledByWidth": ("s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1) * self.NH)", "attention.scale")}


@pytest.mark.parametrize("mistake", list(FUSED))
def test_a_mistake_inside_a_module_of_several_ops_is_the_attentions(mistake):
    """An attention on raw parameters (qkv, ops, projection in one module's forward): the
    tensor it multiplies by attprojw is its output (found by use, wrong values and all),
    so the attention's replay fails, pinned to the mistake's line and named."""
    text, cause = FUSED[mistake]
    c = _first(_run(fp.port(getattr(fp, mistake))))
    assert (c.kind, c.where.split(" [")[0]) == ("replay", "layer 0 attention attention_forward"), c.where
    assert "found by use" in c.module
    assert c.diagnosis is not None and c.diagnosis.causes[0].id.startswith(cause), c.diagnosis
    assert c.pin is not None and (Path(c.pin.file).name, c.pin.line) == ("fused_ports.py", fp.line_of(text))


def test_the_unmodified_fused_port_passes_with_the_attentions_output_observed():
    report = _run(fp.port())
    assert report.passed and not report.findings["port"]
    assert "acts.atty" not in report.not_observed["port"] and "acts.attproj" not in report.not_observed["port"]


def test_without_the_rule_by_use_the_mistake_is_not_the_attentions(monkeypatch):
    """Without the rule by use, a wrong attention's output is found by no value (or, its
    heads merged wrong, by the right values before the merge): the first divergence is not
    the attention's."""
    from harness.ports import usage
    monkeypatch.setattr(usage.Usage, "sites", lambda self, entries: {})
    for mistake in FUSED:
        c = _first(_run(fp.port(getattr(fp, mistake))))
        assert "attention_forward" not in c.where, c.where


def test_a_reshape_of_right_values_is_the_line_not_the_product(monkeypatch):
    """The heads merged without moving them back: the weighted values are right (in the
    heads' layout), their reshape made the wrong tensor. The anchor that took the first op
    holding the failing values in any layout (the product, before the reshape) pins the
    product's line instead."""
    text = FUSED["MergedWithoutTranspose"][0]
    monkeypatch.setattr(L, "_anchor", lambda ops, observed, layout=R.layouts, good=None: next(
        (op for op in ops if op.value is not None and op.name != "input"
         and R.distance(op.value, observed, layout) <= R.SAME_BOUND), None))
    c = _first(_run(fp.port(fp.MergedWithoutTranspose)))
    assert c.pin is None or c.pin.line != fp.line_of(text)


def test_an_end_to_end_activation_ranks_before_the_loss():
    """With no replay failing, the first divergence is the forward's first end-to-end
    failure, in the graph before the loss (the checks list the loss first), and the loss
    before a gradient's."""
    report = _run(fp.port(fp.ScaledByWidth))
    checks = [c for c in report.steps[0].checks if c.impl == "port" and not c.passed and c.kind != "replay"]
    loss = next(c for c in checks if c.kind == "loss")
    fwd = next(c for c in checks if c.kind == "e2e" and c.phase == "forward")
    bwd = next(c for c in checks if c.kind == "e2e" and c.phase == "backward")
    assert checks.index(loss) < checks.index(fwd)
    assert first_divergence_check(checks) is fwd
    assert first_divergence_check([bwd, loss]) is loss


def test_logits_over_the_real_tokens_are_pinned():
    """A port's logits have V columns, the C's Vp (padded): the failing logits are looked
    for over the V real tokens, so the head's mistake is pinned to its line (it was not
    found among the port's ops at all)."""
    assert TINY.padded_vocab_size > TINY.vocab_size
    c = _first(_run(fp.port(model=fp.HeadHalved)))
    assert c.where.startswith("lm_head matmul_forward") and c.diagnosis.causes[0].id == "output.scale"
    assert c.pin is not None and c.pin.line == fp.line_of("return x @ self.tok.weight.t() * 0.5")
