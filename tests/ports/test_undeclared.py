"""An op a torch port runs below float32 by a cast of its own, in a run that declared no
mixed precision (no --autocast, no --param-dtype), is judged at the C's float32 and fails
there, with a ``precision.undeclared`` finding naming it; declared, the same port is
judged at the precision it ran in, as any mixed-precision run."""
from __future__ import annotations

from harness import TorchModel, run_parity
from pyref import synth
from pyref.config import PRESETS

import model_ports as mp
from bf16_attention_port import CAST_LINE, GPTAttentionInBf16

TINY = PRESETS["tiny"]


def run(factory, **mixed):
    return run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 4, 16), steps=1,
                      models={"port": TorchModel(factory, **mixed)}, replay="on-failure")


def port_checks(report):
    return [c for s in report.steps for c in s.checks if c.impl == "port"]


def test_undeclared_bf16_attention_fails_at_the_op_and_is_named():
    report = run(GPTAttentionInBf16)
    assert not report.passed
    found = [f for f in report.findings["port"] if f.id == "precision.undeclared"]
    assert len(found) == 1, [f.text() for f in report.findings["port"]]
    f = found[0]
    assert f.description.startswith("attention_forward ran in bfloat16 in a float32 run "
                                     "(no --autocast/--param-dtype declared)")
    assert f.values["kernel"] == "attention_forward" and f.values["layers"] == [0, 1]
    failed = [c for c in port_checks(report) if c.kind == "replay" and not c.passed]
    # localised at the attention (its replay fails at float32 bounds), nothing upstream of it
    assert failed and failed[0].kernels == ("attention_forward",), [c.tensor for c in failed]
    assert all(c.precision is None for c in port_checks(report) if "attention_forward" in c.kernels)
    line = report.first_divergence()
    assert "attention_forward" in line or "att" in line, line
    pin = failed[0].pin
    assert pin is not None and CAST_LINE in pin.describe(), (pin and pin.describe())


def test_declared_autocast_judges_the_same_port_at_bf16():
    report = run(GPTAttentionInBf16, autocast="bf16")
    assert report.passed
    ids = {f.id for f in report.findings["port"]}
    assert "precision.undeclared" not in ids and "precision.judged-at" in ids
    assert any(c.precision is not None and c.precision.label == "bf16"
               for c in port_checks(report) if c.kernels == ("attention_forward",))


def test_declared_param_dtype_judges_the_same_port_at_its_precision():
    report = run(GPTAttentionInBf16, param_dtype="bf16")
    assert report.passed
    assert "precision.undeclared" not in {f.id for f in report.findings["port"]}


def test_float32_port_passes_with_no_precision_finding():
    report = run(mp.GPT)
    assert report.passed
    assert not [f for f in report.findings["port"] if f.family == "precision"]


def test_undeclared_attention_passes_its_replay_if_judged_at_what_it_ran(monkeypatch):
    """The same undeclared run, its cast taken as declared (the profile's judgement not
    made): its attention's replay checks pass at bf16 and no finding is made; the float32
    judgement is what fails them."""
    from harness.ports import precision as ports_precision
    monkeypatch.setattr(ports_precision.Profile, "undeclared", lambda self, node: False)
    report = run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 4, 16), steps=1,
                        models={"port": TorchModel(GPTAttentionInBf16)}, replay=True)
    att = [c for c in port_checks(report) if c.kind == "replay" and c.kernels == ("attention_forward",)]
    assert att and all(c.passed and c.precision.label == "bf16" for c in att)
    assert "precision.undeclared" not in {f.id for f in report.findings["port"]}
