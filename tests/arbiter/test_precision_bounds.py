"""The tolerance maths at a port's precision (harness.arbiter.precision): float32 unchanged
bit for bit; a real bf16 / fp16 matmul passes its bound and fails float32's; a matmul off by
a few bf16 ulps everywhere fails the bf16 bound; rounding is torch's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.arbiter.compare import compare
from harness.arbiter.precision import FLOAT32, Precision, round_to
from harness.arbiter.tolerances import op_tolerance
from harness.arbiter.oracle import oracle_outputs
from harness.checks.verdict import call_scale


def test_float32_precision_is_the_old_bound_exactly():
    for n, size in ((1, None), (768, 10_000), (3072, 38_000_000)):
        assert op_tolerance("matmul_forward", "out", n, size) == op_tolerance("matmul_forward", "out", n, size, FLOAT32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_rounding(dtype):
    x = (np.random.default_rng(1).standard_normal(100_000) * 5).astype(np.float32)
    want = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
    assert np.array_equal(round_to(x, dtype), want)


def _matmul(dtype, wrong=1.0):
    rng = np.random.default_rng(0)
    inp = rng.standard_normal((4, 8, 64)).astype(np.float32)
    w = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(32) * 0.1).astype(np.float32)
    t = lambda a: torch.from_numpy(a).to(getattr(torch, dtype))   # noqa: E731
    out = (torch.nn.functional.linear(t(inp), t(w), t(b)).float().numpy() * np.float32(wrong))
    args = {"inp": inp, "weight": w, "bias": b}
    a64 = {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    expected = oracle_outputs("matmul_forward", a64)
    scale = call_scale("matmul_forward", "out", a64, expected)
    return out, expected["out"], scale


@pytest.mark.parametrize("dtype, wrong", [("bfloat16", 1 + 2.0 ** -5), ("float16", 1 + 2.0 ** -8)])
def test_bound_passes_real_low_precision_matmul_fails_wrong_one(dtype, wrong):
    p = Precision(dtype, dtype, rounds_inputs=True)
    tol = op_tolerance("matmul_forward", "out", 64, 1024, p)
    out, expected, scale = _matmul(dtype)
    assert compare(out, expected, name="out", tol=tol, elem_scale=scale).passed
    assert not compare(out, expected, name="out", tol=op_tolerance("matmul_forward", "out", 64, 1024),
                       elem_scale=scale).passed
    bad, _, _ = _matmul(dtype, wrong)
    assert not compare(bad, expected, name="out", tol=tol, elem_scale=scale).passed


def test_unit_adds_roundings_in_quadrature():
    p = Precision("bfloat16", "bfloat16", True)
    assert p.unit(1) == pytest.approx(np.sqrt(2.0 ** -48 + 3 * 2.0 ** -16))
    assert Precision("bfloat16", "float32", False).is_float32
    assert p.label == "bf16" and Precision("float32", "float16").label == "fp16"
