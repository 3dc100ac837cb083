"""Per-step checks on whole models: the C and the references against the float64 model,
replay localisation, user ports, and llm.c debug states."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from harness import KernelLoadError, check_debug_state, load_kernels, run_parity
from pyref import formats, numpy_kernels, synth
from pyref.config import GPT2Config, PRESETS
from pyref.model import GPT2 as PyGPT2
from pyref.protocol import KernelSet

TINY = PRESETS["tiny"]


batches = synth.batches


def run(cfg=TINY, B=4, T=16, steps=2, impls=None, lib=None, **kw):
    params = synth.init_params(cfg, seed=0)
    if impls is None:
        impls = {"numpy": load_kernels("numpy"), "torch": load_kernels("torch")}
    return run_parity(cfg, params, batches(cfg, B, T), lib=lib, impls=impls, steps=steps, **kw)


def failures(report):
    return [f"{c.impl} {c.kind} {c.tensor} {c.where}: {c.comparison.message()}"
            for s in report.steps for c in s.checks if not c.passed]


# awkward model shapes: B*T not a multiple of 8 (naive matmul), T=1, NH=1, hs=1, V=Vp
MODEL_CASES = {
    "tiny": (TINY, 4, 16),
    "odd-BT": (TINY, 3, 5),
    "T1": (TINY, 2, 1),
    "nh1": (GPT2Config(max_seq_len=8, vocab_size=40, padded_vocab_size=40, num_layers=1, num_heads=1, channels=12), 2, 8),
    "hs1": (GPT2Config(max_seq_len=8, vocab_size=33, padded_vocab_size=64, num_layers=3, num_heads=6, channels=6), 2, 4),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_step_parity(case, parity_record):
    cfg, B, T = MODEL_CASES[case]
    report = run(cfg, B, T, steps=2)
    assert report.passed, "\n".join(failures(report)[:5])
    kinds = {(c.impl, c.kind) for s in report.steps for c in s.checks}
    for impl in ("C", "numpy", "torch"):
        for kind in ("replay", "e2e", "update", "loss"):
            assert (impl, kind) in kinds
    # all 23 activations, all 16 gradients and the updated parameters, m, v are checked
    tensors = {c.tensor.split("[")[0] for s in report.steps for c in s.checks if c.impl == "C"}
    from pyref.config import ACT_NAMES, PARAM_NAMES
    assert {f"acts.{n}" for n in ACT_NAMES} <= tensors
    assert {f"grads.{n}" for n in PARAM_NAMES} <= tensors
    assert {f"{g}.{n} (after update)" for g in ("params", "m", "v") for n in PARAM_NAMES} <= tensors


def test_ten_steps_loss_trajectory():
    report = run(steps=10, impls={"numpy": load_kernels("numpy")}, replay=False)
    assert report.passed, "\n".join(failures(report)[:5])
    losses = [s.losses["C"] for s in report.steps]
    assert len(losses) == 10 and losses[-1] < losses[0]  # it trains
    for s in report.steps:
        assert abs(s.losses["C"] - s.losses["oracle"]) < 1e-5 * s.losses["oracle"]


def _mutant(kernel, fn):
    funcs = {name: getattr(numpy_kernels, name) for name in KernelSet.from_module(numpy_kernels).provided}
    funcs[kernel] = fn
    return KernelSet(funcs, backend="numpy", name="mutant")


def test_mutated_port_is_localised_to_its_op():
    """A port whose ln2 layernorm (every layernorm) is off 1e-5 relative fails, and the first
    divergence names layer 0's ln1 layernorm_forward with exact inputs."""
    def bad_ln(inp, weight, bias):
        out, mean, rstd = numpy_kernels.layernorm_forward(inp, weight, bias)
        return out * out.dtype.type(1 + 1e-5), mean, rstd
    report = run(impls={"port": _mutant("layernorm_forward", bad_ln)}, steps=1)
    assert not report.passed
    step = report.steps[0]
    assert "C" not in step.first_divergence          # the C is fine
    text = step.first_divergence["port"]
    assert "layer 0 ln1 layernorm_forward" in text and "inputs exact" in text, text


def test_mutated_backward_localised():
    def bad_gelu_back(dinp, inp, dout):
        numpy_kernels.gelu_backward(dinp, inp, dout * dout.dtype.type(1.001))
    report = run(impls={"port": _mutant("gelu_backward", bad_gelu_back)}, steps=1)
    text = report.steps[0].first_divergence["port"]
    assert "gelu_backward" in text and f"layer {TINY.num_layers - 1}" in text, text


def test_mutated_adamw_fails_update_check():
    def bad_adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
        numpy_kernels.adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t + 1)
    report = run(impls={"port": _mutant("adamw", bad_adamw)}, steps=2, replay=False)
    bad = [c for s in report.steps for c in s.checks if not c.passed]
    assert bad and all(c.impl == "port" and c.kind == "update" for c in bad)
    assert any(c.tensor.startswith("params.") for c in bad)


def test_user_port_from_file(tmp_path):
    """A single-file port with a subset of kernels: those are checked, the rest reported
    as not checked (and run from the NumPy reference)."""
    port = tmp_path / "my_port.py"
    port.write_text(textwrap.dedent("""
        import numpy as np

        def gelu_forward(inp):
            return 0.5 * inp * (1 + np.tanh(np.sqrt(2 / np.pi).astype(inp.dtype) * (inp + 0.044715 * inp ** 3)))

        def residual_forward(inp1, inp2):
            return inp1 + inp2
    """))
    ks = load_kernels(str(port), fallback=True)
    assert set(ks.provided) == {"gelu_forward", "residual_forward"}
    report = run(impls={"my_port": ks}, steps=1)
    assert report.passed, "\n".join(failures(report)[:3])
    assert "layernorm_forward" in report.not_checked["my_port"]
    assert "gelu_forward" not in report.not_checked["my_port"]


def test_user_port_errors_are_clear(tmp_path):
    with pytest.raises(KernelLoadError, match="no such file"):
        load_kernels(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(KernelLoadError, match="boom"):
        load_kernels(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(KernelLoadError, match="none of the protocol kernels"):
        load_kernels(str(empty))


def test_raising_user_kernel_is_reported_not_fatal():
    def boom(inp):
        raise ValueError("my kernel is broken")
    report = run(impls={"port": _mutant("gelu_forward", boom)}, steps=1)
    assert not report.passed
    assert "my kernel is broken" in report.steps[0].errors["port"]
    assert all(c.passed for c in report.steps[0].checks if c.impl == "C")


def _debug_state_files(tmp_path, corrupt=None):
    """A checkpoint and a debug state whose expected values come from the torch reference
    in float32 (as llm.c's PyTorch script would write them)."""
    cfg, B, T = TINY, 2, 8
    params = synth.init_params(cfg, seed=4)
    x, y = synth.make_batch(cfg, B, T, seed=9)
    m = PyGPT2(cfg, params, kernels=load_kernels("torch"), dtype=np.float32)
    loss = m.forward(x, y)
    m.zero_grad()
    m.backward()
    logits = m.acts["logits"][..., :cfg.vocab_size].copy()
    grads = m.grads_memory.copy()
    if corrupt == "logits":
        logits *= np.float32(1 + 1e-4)
    if corrupt == "grad":
        grads[5] += 1e-3
    formats.write_checkpoint(tmp_path / "model.bin", cfg, params)
    formats.write_debug_state(tmp_path / "debug.bin", cfg, x, y, logits, loss, grads)
    return tmp_path / "model.bin", tmp_path / "debug.bin"


def test_debug_state_check_passes(tmp_path):
    rep = check_debug_state(*_debug_state_files(tmp_path))
    assert rep.passed, [r.vs_expected.message() for r in rep.rows if not r.passed]
    assert {r.tensor for r in rep.rows} >= {"logits", "loss", "grads.wte", "grads.lnfb"}


@pytest.mark.parametrize("corrupt, tensor", [("logits", "logits"), ("grad", "grads.wte")])
def test_debug_state_check_catches_a_wrong_expectation(tmp_path, corrupt, tensor):
    rep = check_debug_state(*_debug_state_files(tmp_path, corrupt))
    bad = [r for r in rep.rows if not r.passed]
    assert [r.tensor for r in bad] == [tensor]
    assert bad[0].closer == "C"  # the oracle says the file, not the C, is off


def test_configured_model(llmc_config, llmc_steps, llmc_lib):
    """`pytest --llmc-config small --llmc-steps 5 --llmc-lib lib.so` (a port given with
    --llmc-impl is checked by the plugin's shipped suite, harness/suite)"""
    impls = {"numpy": load_kernels("numpy")}
    T = min(llmc_config.max_seq_len, 16)
    report = run(llmc_config, 2, T, steps=llmc_steps, impls=impls, lib=llmc_lib)
    assert report.passed, report.first_divergence() or "\n".join(failures(report)[:3])


@pytest.mark.parametrize("factor", [1 + 1e-5, 1 - 1e-5])
def test_end_to_end_alone_catches_a_systematic_change(factor):
    """Without the replay, the end-to-end bound (a multiple of the float32-noise witness)
    is still tight enough for a 1e-5 relative change of every layernorm output."""
    def bad_ln(inp, weight, bias):
        out, mean, rstd = numpy_kernels.layernorm_forward(inp, weight, bias)
        return out * out.dtype.type(factor), mean, rstd
    report = run(impls={"port": _mutant("layernorm_forward", bad_ln)}, steps=1, replay=False)
    bad = [c for s in report.steps for c in s.checks if not c.passed]
    assert bad and all(c.impl == "port" and c.kind in ("e2e", "loss") for c in bad)
    assert any(c.tensor.startswith("acts.ln1[layer 0]") for c in bad)
