"""Failures that no forward op shows, pinned to the line of the port that makes them
(harness/ports/pins.py, and localise.py's residual, whole-forward, NaN, mask and attribute
pins): a port of its own (tests/ports/pin_ports.py, not BUGS7's model), one mistake per
variant, each pinned to the mistake's line (found by its text); a deliberately wrong
pinner pins each elsewhere (or nowhere); a passing port records nothing.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from harness import TorchModel, run_parity, to_json
from harness.checks.results import first_divergence_check, first_structure
from harness.ports import pins as P
from harness.ports import localise as L
from harness.ports import record as R
from harness.ports import sources as S
from harness.probe import listening
from pyref import synth
from pyref.config import PRESETS

import pin_ports as pp
from test_record import Recorded, line_of

TINY = PRESETS["tiny"]
PORTS = Path(pp.__file__)
V = pp.PinGPT.variant

# mistake -> (the port, the text of the mistake's line, the pin's first words (its kind))
MISTAKES = {
    "ln_2 never called": (V(block=pp.NoLn2), "x = x + self.mlp(x)", "layer 0 ln2 layernorm_forward"),
    "c_proj never called": (V(attn=pp.NoProj), "return (self.probs(q, k) @ v).transpose(1, 2).flatten(2)",
                            "layer 0 attproj matmul_forward"),
    "ln_f never called": (pp.LnFSkipped, "return self.lm_head(x)", "lnf layernorm_forward"),
    "post-norm": (V(block=pp.PostLN), "x = self.ln_1(x + self.attn(x))", "layer 0 ln1 layernorm_forward"),
    "ln_1 called twice": (V(block=pp.Ln1Twice), "x = x + self.attn(self.ln_1(self.ln_1(x)))",
                          "layer 0 ln1 layernorm_forward"),
    "mlp residual dropped": (V(block=pp.MlpResidualDropped), "x = self.mlp(self.ln_2(x))", "residual_forward"),
    "wte halved": (pp.WteHalved, "return self.transformer.wte(idx) * 0.5 + self.transformer.wpe(torch.arange("
                   "idx.size(1)))", "encoder_forward"),
    "softmax over heads (NaN)": (V(attn=pp.SoftmaxOverQueriesAndHeads), "return F.softmax(s, dim=1)",
                                 "attention_forward"),
    "head loop: softmax over the queries": (V(attn=pp.HeadLoopSoftmaxOverQueries), "return F.softmax(s.masked_fill("
                                            "self.causal(T), -math.inf), dim=1)", "attention_forward"),
    "head loop: keys read from the values": (V(attn=pp.HeadLoopKeysFromValues), "return [qkv[..., o + h * hs:o + "
                                             "(h + 1) * hs] for o in (0, 2 * C, 2 * C)]", "attention_forward"),
    "head loop: a head's q, k, v side by side": (V(attn=pp.HeadLoopQKVSideBySide), "return qkv[..., 3 * h * hs:"
                                                 "3 * (h + 1) * hs].split(hs, dim=-1)", "attention_forward"),
    "mask sees the next token": (V(attn=pp.MaskSeesNext), "return torch.ones(T, T, dtype=torch.bool).triu(2)",
                                 "attention_forward"),
    "eps in the constructor": (V(norm=pp.TinyEpsNorm), "def __init__(self, C, eps=1e-9):", "layernorm_forward"),
    "label smoothing": (pp.LossSmoothed, "return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), "
                        "label_smoothing=0.05)", "crossentropy_forward"),
    "token embeddings detached": (pp.TokensDetached, "return self.transformer.wte(idx).detach() + "
                                  "self.transformer.wpe(torch.arange(idx.size(1)))", "backward"),
    "norm gain detached": (V(norm=pp.GainDetached), "return xc * (xc.pow(2).mean(-1, keepdim=True) + "
                           "self.eps).rsqrt() * self.weight.detach() + self.bias", "layer 0 ln1 layernorm_forward"),
    "custom Function's gradient": (V(block=pp.FunctionBlock), "return 2.0 * d", "backward"),
    "optimizer eps": (TorchModel(pp.PinGPT, optimizer=pp.adam_wrong_eps), "eps=1e-6,", "adamw"),
    "optimizer given the blocks only": (TorchModel(pp.PinGPT, optimizer=pp.adam_blocks_only),
                                        "model.transformer.h.parameters(),", "adamw"),
    "weight decay left to torch": (TorchModel(pp.PinGPT, optimizer=pp.adam_no_decay),
                                   "betas=(hyper.beta1, hyper.beta2), eps=hyper.eps)", "adamw"),
    "scale from a method": (V(attn=pp.MethodScaleByHs), "return 1.0 / (self.c_attn.in_features // self.NH)",
                            "attention_forward"),
    "mask hides the past (NaN)": (V(attn=pp.MaskHidesThePast), "s = s.masked_fill(~self.causal(q.size(-2)), "
                                  "float('-inf'))", "attention_forward"),
    "mask filled with 0": (V(attn=pp.MaskFilledWithZero), "s = s.masked_fill(self.causal(q.size(-2)), 0.0)",
                           "attention_forward"),
    "eps from a config's field": (V(block=pp.config_block(pp.TinyEpsConfig)), "norm_eps: float = 1e-8",
                                  "layernorm_forward"),
    "GELU after the projection": (V(block=pp.mlp_block(pp.GeluAfterProj)), "return self.act(self.c_proj(self.c_fc(x)))",
                                  "gelu_forward"),
    "no decay in a parameter group": (TorchModel(pp.PinGPT, optimizer=pp.adam_groups_no_decay), "'weight_decay': 0.0}]",
                                      "adamw"),
    "norm's bias never read": (V(norm=pp.BiasLeftOutNorm), "return self.weight * xc * (xc.pow(2).mean(-1, "
                               "keepdim=True) + self.eps).rsqrt()", "layernorm_forward"),
    "a block's output dropped": (pp.BlocksSideBySide, "outs = [block(x) for block in self.transformer.h]",
                                 "layer 0 ln1 layernorm_forward"),
    "positions' gradient scaled by count": (pp.PositionsScaledByFreq, "scale_grad_by_freq=True)", "backward"),
    "keys chunked first": (V(attn=pp.KeysChunkedFirst), "k, q, v = map(self.heads, self.c_attn(x).chunk(3, dim=-1))",
                           "attention_forward"),
    "torch's GELU at its default": (V(block=pp.mlp_block(pp.TorchGeluMLP)), "self.gelu = nn.GELU()", "gelu_forward"),
    "torch's layer norm's eps": (V(norm=pp.LooseTorchNorm), "super().__init__(C, eps=1e-3)", "layernorm_forward"),
    "dropout left on": (pp.DropoutLeftOn, "return F.dropout(self.transformer.wte(idx) + self.transformer.wpe("
                        "torch.arange(idx.size(1))), p=0.1)", "encoder_forward"),
    "GELU's factor on x only": (V(block=pp.mlp_block(pp.GeluFactorMLP)), "return 0.5 * x * (1.0 + torch.tanh("
                                "math.sqrt(2.0 / math.pi) * x + inner))", "gelu_forward"),
    "heads interleaved": (V(attn=pp.HeadsInterleaved), "return self.c_proj((self.probs(q, k) @ v).permute(0, 2, 3, 1)"
                          ".flatten(2))", "attention_forward"),
    "eps a class attribute": (V(norm=pp.LooseClassEpsNorm), "eps = 1e-3", "layernorm_forward"),
    "loss over the padded vocabulary": (pp.LossOverPaddedVocab, "return F.cross_entropy(logits.flatten(0, 1), "
                                        "targets.reshape(-1))", "crossentropy_forward"),
    "parallel block": (V(block=pp.ParallelBlock), "return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))",
                       "residual_forward"),
    "halves swapped through helpers": (V(block=pp.HalvesSwapped), "return self.attend(self.feed(x))",
                                       "layer 0 ln1 layernorm_forward"),
    "last block skipped": (pp.LastBlockSkipped, "for i in range(len(self.transformer.h) - 1):",
                           "layer 1 ln1 layernorm_forward"),
    "positions looked up in the token table": (TorchModel(pp.PositionsFromTokens, mapping=pp.TABLES),
                                               "pos = F.embedding(torch.arange(idx.size(1)), self.tables['tokens'])",
                                               "encoder encoder_forward"),
    "scale from a method given the queries": (V(attn=pp.ArgScaleByWidth), "return (q.size(-1) * self.NH) ** -0.5",
                                              "attention_forward"),
    "eps a class attribute of a helper object": (V(norm=pp.LooseMathNorm), "eps = 2e-3", "layernorm_forward"),
    "decay mask passed by the caller": (TorchModel(pp.PinGPT, optimizer=pp.adam_matrices_decayed),
                                       "return adam_masked(model, hyper, decayed=lambda p: p.dim() >= 2)", "adamw"),
    "warmup scheduler at construction": (TorchModel(pp.PinGPT, optimizer=pp.adam_warmed_up),
                                         "opt.warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: "
                                         "min(1.0, step / 10))", "adamw"),
    "one-hot loss averaged over the vocabulary": (pp.OneHotLossMeanOverVocab, "return -(labels * F.log_softmax("
                                                  "logits, dim=-1)).mean()", "crossentropy_forward"),
    "stacked heads merged without moving them": (V(attn=pp.StackedMergedInPlace),
                                                 "return y.reshape(B, T, self.NH * hs)", "attention_forward"),
    "a softmax helper given the queries' axis": (V(attn=pp.HelperSoftmaxOverQueries), "return self.softmax(s, dim=-2)",
                                                 "attention_forward"),
}


def run(port):
    """One step from the C's state: (the report, the first divergence's pin, the modules
    recorded)."""
    port = port if isinstance(port, TorchModel) else TorchModel(port)
    with listening(Recorded()) as heard:
        report = run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 2, 8), steps=1,
                            models={"port": port})
    return report, pin_of(report), heard.modules


def pin_of(report):
    """The first divergence's pin: the structural finding's where it is one, else the
    first failing check's."""
    step = report.steps[0]
    c = first_divergence_check([c for c in step.checks if c.impl == "port"])
    f = first_structure(step.structure.get("port"), c)
    return f.pin if f is not None else None if c is None else c.pin


def first_line(pin):
    return None if pin is None else (pin.file, pin.line, pin.text)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_mistake_is_pinned_to_its_line(mistake):
    port, text, kind = MISTAKES[mistake]
    report, pin, _ = run(port)
    assert not report.passed and not report.steps[0].errors
    assert first_line(pin) == (str(PORTS), line_of(text, PORTS), text), report.first_divergence()
    assert pin.kernel == kind
    # in the first divergence's text, and in the JSON as data
    assert report.first_divergence().endswith(pin.describe())
    data = to_json(report, versions=False)
    json.dumps(data, allow_nan=False)
    assert f"{PORTS.name}:{line_of(text, PORTS)} ({text})" in json.dumps(data)


def test_the_right_port_passes_and_records_nothing():
    report, pin, recorded = run(pp.PinGPT)
    assert report.passed and pin is None and recorded == []
    assert not report.steps[0].structure.get("port")


@pytest.mark.parametrize("port", [V(attn=pp.MethodScaleAttn), V(block=pp.mlp_block(pp.FnMLP)),
                                  TorchModel(pp.PinGPT, optimizer=pp.adam_groups),
                                  V(block=pp.config_block(pp.NormConfig)), pp.DefaultsSpelledOut,
                                  V(block=pp.mlp_block(pp.TanhGeluMLP)), V(norm=pp.TorchNorm),
                                  pp.DropoutOff, V(block=pp.mlp_block(pp.GeluByHandMLP)), V(norm=pp.ClassEpsNorm),
                                  pp.PaddedVocabGPT, V(block=pp.HelperBlock), pp.IndexedLoopGPT,
                                  TorchModel(pp.TablesGPT, mapping=pp.TABLES), V(attn=pp.ArgScaleAttn),
                                  V(norm=pp.MathNorm), TorchModel(pp.PinGPT, optimizer=pp.adam_masked),
                                  TorchModel(pp.PinGPT, optimizer=pp.adam_scheduled), pp.OneHotLossGPT,
                                  V(attn=pp.StackedHeadsAttn), V(attn=pp.HelperSoftmaxAttn)],
                         ids=["method scale", "gelu method", "groups", "config eps", "torch defaults spelled out",
                              "torch's tanh GELU", "torch's layer norm", "dropout of 0", "GELU by hand",
                              "class eps", "padded logits", "helper halves", "indexed loop", "raw tables",
                              "scale from the queries", "helper object's eps", "default decay mask",
                              "constant schedule", "one-hot loss", "stacked heads",
                              "softmax helper"])
def test_the_right_forms_of_the_new_pins_pass(port):
    """A scale from a method, a GELU by a method, parameter groups that keep the run's
    decay, torch's modules built with their defaults written out: right, so nothing fails
    and nothing is pinned."""
    report, pin, recorded = run(port)
    assert report.passed and pin is None and recorded == []


def test_the_right_head_loop_passes_and_records_nothing():
    report, pin, recorded = run(V(attn=pp.HeadLoopAttn))
    assert report.passed and pin is None and recorded == []


def test_a_head_loop_mistake_says_which_value_stands_where():
    _, pin, _ = run(MISTAKES["head loop: keys read from the values"][0])
    assert pin.says == ("the values stand where the keys belong", "the scores do not")


def test_an_optimizer_given_some_parameters_fails_the_update_and_names_them():
    report, pin, _ = run(MISTAKES["optimizer given the blocks only"][0])
    assert not report.passed and "transformer.wte.weight" in pin.describe()
    assert pin.describe().endswith("not among the parameters it updates")


def test_a_structural_pin_is_the_findings_in_json():
    report, pin, _ = run(V(block=pp.NoLn2))
    f = first_structure(report.steps[0].structure["port"])
    assert f.pin is pin and f.to_json()["pin"]["line"] == line_of("x = x + self.mlp(x)", PORTS)
    assert f.id == "structure.never-called" and f.module == "transformer.h.0.ln_2"


def test_a_module_never_called_is_pinned_where_its_sibling_is_called_in_its_stead():
    """ln_2 never called because ln_1 is called again for the MLP: the pin is that second
    call's line (the mistake), not the MLP's (as for a norm simply left out, above)."""
    report, pin, _ = run(V(block=pp.Ln1ForMlp))
    f = first_structure(report.steps[0].structure["port"])
    assert f.id == "structure.never-called" and f.module == "transformer.h.0.ln_2"
    assert f.pin is pin and pin.lines[0].line == line_of("h = self.ln_1(x)", PORTS)


@pytest.mark.parametrize("named_there", [True, False])
def test_a_bias_left_out_is_named_by_its_op_with_the_finding_beside(named_there, monkeypatch):
    """A norm's bias never read: the layer norm's failing check names layernorm.no-bias and
    leads, the no-gradient finding shown beside; a census that let the finding lead
    (deliberately wrong) names no cause for the mistake."""
    from harness.ports import census
    if not named_there:
        monkeypatch.setattr(census, "named_there", lambda f, failing: False)
    report, pin, _ = run(V(norm=pp.BiasLeftOutNorm))
    step = report.steps[0]
    c = first_divergence_check(step.checks)
    assert any(f.id == "structure.no-gradient" for f in step.structure["port"])
    led = first_structure(step.structure["port"], c)
    assert (led is None and c.diagnosis.causes[0].id == "layernorm.no-bias") == named_there, (led, c.diagnosis)


def test_the_optimizer_pin_names_the_differing_setting():
    _, pin, _ = run(MISTAKES["optimizer eps"][0])
    assert pin.describe().endswith("its eps 1e-06 (the run: 9.99999993922529e-09)")


# ----------------------------------------------------------------------------- a wrong pinner fails them

_RIGHT = {"residual": L.residual_line, "distance": R.distance, "recording": R.forward_recording, "anchor": L._anchor}


def _innermost_block_line(ops, observed, block, kernel, layout=R.layouts):
    """The residual's line taken in the innermost user frame, not the block's."""
    return _RIGHT["residual"](ops, observed, None, kernel, layout)


def _headless(a, stage, layout=R.layouts):
    """A distance that matches no tensor to one head's slice of a stage."""
    return _RIGHT["distance"](a, replace(stage, heads=None), layout)


def _nan_blind(a, stage, layout=R.layouts):
    """A distance that never matches a value holding NaN."""
    return float("inf") if np.isnan(a).any() else _RIGHT["distance"](a, stage, layout)


WRONG = {
    # mistake -> (what is replaced, by what): each wrong pinner pins that mistake elsewhere or nowhere
    "ln_2 never called": ("harness.ports.pins.owned_site", lambda stack, owner, outermost=False: stack[-1].site),
    "ln_f never called": ("harness.ports.pins.owned_site",
                          lambda stack, owner, outermost=False: R.owned_site(stack, owner, True)),
    "c_proj never called": ("harness.ports.pins.owned_site", lambda stack, owner, outermost=False: stack[-1].site),
    "mlp residual dropped": ("harness.ports.localise.residual_line", _innermost_block_line),
    "wte halved": ("harness.ports.localise.forward_recording",      # the module showing it only, never the whole
                   lambda state, module=None, keep=None, params=False:
                   _RIGHT["recording"](state, module or "transformer.h.0", keep)),
    "softmax over heads (NaN)": ("harness.ports.localise.distance", _nan_blind),
    "head loop: softmax over the queries": ("harness.ports.localise.distance", _headless),
    "head loop: keys read from the values": ("harness.ports.localise._misplaced", lambda *a: None),
    "head loop: a head's q, k, v side by side": ("harness.ports.localise._operands_misplaced", lambda *a: None),
    "mask sees the next token": ("harness.ports.localise._unverified", lambda *a: set()),
    "eps in the constructor": ("harness.ports.localise.attribute_origin", lambda pin, *a: pin),
    "label smoothing": ("harness.ports.pins.forward_recording",  # the blocks only: the loss is not seen
                        lambda state, module=None, keep=None, params=False:
                        _RIGHT["recording"](state, "transformer.h.0", keep)),
    "token embeddings detached": ("harness.ports.pins.forward_recording",   # no detach seen
                                  lambda state, module=None, keep=None, params=False:
                                  _RIGHT["recording"](state, "transformer.h.0", keep, params)),
    "custom Function's gradient": ("harness.ports.pins.backward_lines", lambda state: ()),
    "optimizer eps": ("harness.ports.pins._differing", lambda optimizer, hyper: {}),
    "optimizer given the blocks only": ("harness.ports.pins.not_given", lambda *a: []),
    # the method's float is seen twice (called again, and noted as returned while recording): both blinded
    "scale from a method": ([("harness.ports.sources.float_methods", lambda owner, text: []),
                             ("harness.ports.record._returns_profile", lambda rec, old: old)], None),
    "mask hides the past (NaN)": ("harness.ports.localise._infinite_maker", lambda ops, suspects: set()),
    "mask filled with 0": ("harness.ports.localise._fills", lambda *a: False),
    "eps from a config's field": ("harness.ports.sources.config_site", lambda *a: None),
    "GELU after the projection": ("harness.ports.localise._passed_on", lambda *a: None),
    "no decay in a parameter group": ("harness.ports.sources._group_lines", lambda *a: {}),
    # the numeric pin of the norm's failing check and the finding's beside it: both blinded
    "norm's bias never read": ([("harness.ports.pins._unread_site", lambda *a: None),
                                ("harness.checks.replay.pin_failure", lambda *a: None)], None),
    "a block's output dropped": ("harness.ports.pins._dropped_site", lambda *a: None),
    "positions' gradient scaled by count": ("harness.ports.sources.changed_options", lambda module: (None, {})),
    # scores of (B*NH, T, T) matched in any layout again: k q^T taken for the scores
    "keys chunked first": ("harness.ports.record._common_tail", lambda a, b: 0),
    "torch's GELU at its default": ("harness.ports.localise.module_origin", lambda pin, *a: pin),
    "torch's layer norm's eps": ("harness.ports.sources._calls_in", lambda file, kinds: iter(())),
    "dropout left on": ("harness.ports.localise._random_draw", lambda *a: None),
    "GELU's factor on x only": ("harness.ports.localise._wrong_term", lambda *a: set()),
    # the first op holding the values in any layout, never the reshape after it
    "heads interleaved": ("harness.ports.localise._anchor",
                          lambda ops, observed, layout=R.layouts, good=None: _RIGHT["anchor"](ops, observed, layout)),
    "eps a class attribute": ("harness.ports.sources.class_site", lambda *a: None),
    "loss over the padded vocabulary": ("harness.ports.pins.as_returned", lambda logits, V: []),
    "parallel block": ("harness.ports.localise.residual_line", _innermost_block_line),
    "halves swapped through helpers": ("harness.ports.pins._order_site", lambda calls, others: calls[0].stack[0].site),
    "last block skipped": ("harness.ports.sources._loop_header", lambda site: None),
    "positions looked up in the token table": ("harness.ports.pins.read_again", lambda reads: None),
    "scale from a method given the queries": ("harness.ports.record._returns_profile", lambda rec, old: old),
    "eps a class attribute of a helper object": ("harness.ports.localise.owners_of",
                                                 lambda model: {id(m): m for m in model.modules()}),
    "decay mask passed by the caller": ("harness.ports.sources.given_for_groups", lambda *a: None),
    "warmup scheduler at construction": ("harness.ports.pins._changed_later", lambda *a: None),
    # the lines in the order their ops ran: the one-hot labels' line first
    "one-hot loss averaged over the vocabulary": ("harness.ports.localise._given_integers", lambda *a: set()),
    # the values taken in the layouts a view or one transpose makes only: the bmm pinned
    "stacked heads merged without moving them": ("harness.ports.localise._merged_stacked", lambda *a: None),
    # the helper's lines only, its caller never named
    "a softmax helper given the queries' axis": ("harness.ports.sources.passes_int_to", lambda *a: False),
}


@pytest.mark.parametrize("mistake", list(WRONG))
def test_a_wrong_pinner_misses_the_line(mistake, monkeypatch):
    port, text, _ = MISTAKES[mistake]
    target, wrong = WRONG[mistake]
    for t, w in (target if isinstance(target, list) else [(target, wrong)]):
        monkeypatch.setattr(t, w)
    _, pin, _ = run(port)
    assert first_line(pin) != (str(PORTS), line_of(text, PORTS), text)


# ----------------------------------------------------------------------------- the pieces

def test_an_attribute_is_traced_to_the_default_that_set_it():
    site = S.attribute_site(pp.TinyEpsNorm, "eps", 1e-9)
    assert (site.file, site.line) == (str(PORTS), line_of("def __init__(self, C, eps=1e-9):", PORTS))
    # a value no default gives: the constructor's assignment
    site = S.attribute_site(pp.Norm, "eps", 3e-4)
    assert site.line == line_of("self.eps = eps", PORTS)
    assert S.float_attributes(pp.Norm(4), "x + self.eps * self.weight") == [("eps", 1e-5)]


def test_a_passing_step_runs_no_pinner(monkeypatch):
    """The pinners are only reached through a failure: a right port with its own optimizer
    factory reaches none of them."""
    called = []
    for name in ("structure_pin", "loss_pin", "backward_pin", "optimizer_pin", "pin_failure"):
        monkeypatch.setattr(f"harness.checks.replay.{name}", lambda *a, _n=name: called.append(_n))
    report, _, recorded = run(TorchModel(pp.PinGPT, optimizer=lambda m, h: __import__("torch").optim.AdamW(
        m.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)))
    assert report.passed and called == [] and recorded == []


def test_a_dropped_blocks_pin_names_the_op_not_given_its_output():
    _, pin, _ = run(MISTAKES["a block's output dropped"][0])
    assert pin.says == ("transformer.h.0's output never reaches the loss: this line drops it (the graph's next op, "
                        "layer 1 ln1 layernorm_forward, is not given it)",)


def test_a_torch_modules_changed_options_and_its_constructor():
    """The options of torch's modules not at their defaults (a bias read as held or not),
    and the call setting one found by its arguments bound to torch's signature (by keyword,
    by position; a call setting it to another constant is not the one)."""
    import ast
    import torch
    assert S.changed_options(torch.nn.Embedding(5, 3)) == (torch.nn.Embedding, {})
    assert S.changed_options(torch.nn.Embedding(5, 3, padding_idx=2))[1] == {"padding_idx": 2}
    assert S.changed_options(torch.nn.Linear(3, 3, bias=False))[1] == {"bias": False}
    assert S.changed_options(torch.nn.LayerNorm(3, elementwise_affine=False))[1] == {"elementwise_affine": False,
                                                                                     "bias": False}
    assert S.changed_options(pp.Norm(3)) == (None, {})       # not torch's: its own code
    assert S.changed_options(torch.nn.GELU())[1] == {"approximate": "none"}     # GPT-2's is tanh
    assert S.changed_options(pp.LooseTorchNorm(3)) == (torch.nn.LayerNorm, {"eps": 1e-3})
    call = lambda text: ast.parse(text).body[0].value       # noqa: E731
    assert S._option_line(call("nn.Embedding(5, 3,\n 2)"), torch.nn.Embedding, {"padding_idx": 2}) == 2
    assert S._option_line(call("nn.Embedding(5, 3, padding_idx=0)"), torch.nn.Embedding, {"padding_idx": 2}) is None
    assert S._option_line(call("nn.Embedding(5, 3)"), torch.nn.Embedding, {"padding_idx": 2}) is None
    assert S._option_line(call("nn.GELU(\n)"), torch.nn.GELU, {"approximate": "none"}) == 2     # left to the default
    model = pp.PositionsScaledByFreq(TINY)
    site = S.constructor_site(model, "transformer.wpe", torch.nn.Embedding, {"scale_grad_by_freq": True})
    assert (site.file, site.line) == (str(PORTS), line_of("scale_grad_by_freq=True)", PORTS))
    assert S.constructor_site(pp.PinGPT(TINY), "transformer.wpe", torch.nn.Embedding, {"padding_idx": 0}) is None


def test_scores_of_merged_heads_keep_their_own_axes():
    """A tensor that shares its last two axes with an intermediate, its leading ones merged
    ((B*NH, T, T) for (B, NH, T, T)), is matched with those axes kept: its transpose is
    another value (the scores of k and q); heads split or merged still match."""
    a = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    scores = R.Stage("preatt", "the scores", a)
    assert R.distance(a.reshape(6, 4, 4), scores) == 0.0
    assert R.distance(a.swapaxes(2, 3).reshape(6, 4, 4), scores) > 0.1
    heads = R.Stage("q", "the queries", a)
    assert R.distance(a.transpose(0, 2, 1, 3).reshape(2, 4, 12), heads) == 0.0


def test_a_module_called_early_names_the_first_op_it_can_feed(monkeypatch):
    """ln_f called inside the blocks' loop: the called-more finding says its first call
    runs before layer 1's ln1 (the first graph op whose input is wrong); ln_1 called twice
    in place runs before no earlier op, so says nothing more; without the rule, nothing."""
    report, pin, _ = run(pp.LnFInLoop)
    assert "its first runs before layer 1 ln1 layernorm_forward" in report.first_divergence()
    assert first_line(pin) == (str(PORTS), line_of("x = self.transformer.ln_f(block(x))", PORTS),
                               "x = self.transformer.ln_f(block(x))")
    report, _, _ = run(MISTAKES["ln_1 called twice"][0])
    assert "called 2 times" in report.first_divergence() and "runs before" not in report.first_divergence()
    monkeypatch.setattr("harness.ports.census.Census._early", lambda self, name: "")
    report, _, _ = run(pp.LnFInLoop)
    assert "layer 1 ln1" not in report.first_divergence()


def test_a_parameter_without_gradient_names_the_backward_it_misses(monkeypatch):
    """A table never read: the no-gradient finding names the graph's backward op that gives
    the C's tensor its gradient (encoder_backward); a wrong census names none."""
    port = MISTAKES["positions looked up in the token table"][0]
    report, _, _ = run(port)
    assert "(the C's wpe has one, from encoder encoder_backward)" in report.first_divergence()
    monkeypatch.setattr("harness.ports.census.backward_of", lambda op: None)
    report, _, _ = run(port)
    assert "encoder_backward" not in report.first_divergence()
