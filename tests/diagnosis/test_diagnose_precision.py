"""The precision family: an op a float32 port computed in bfloat16 or float16 by a cast of its
own (its output exact in that dtype), judged at that dtype's tolerance; an op whose output is
not exact in it, or whose error is beyond that tolerance, is not named so.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, port_cases, port_with)

from harness.diagnosis.catalogue.precision import held_in
from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


def _bf16(x):
    """float32 ``x`` rounded to bfloat16 (nearest, ties to even), as float32: torch's cast."""
    b = np.asarray(x, F).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(F)


def in_half(kernel, dtype, round_inputs=True):
    """``kernel`` as a port casting its float inputs to ``dtype``, computing, and casting its
    outputs back to float32 (what q.bfloat16() ... .float() does around an op)."""
    cast = _bf16 if dtype == "bfloat16" else (lambda x: x.astype(np.float16).astype(F))

    def port(*args):
        ins = [cast(a) if round_inputs and isinstance(a, np.ndarray) and a.dtype == F else a for a in args]
        out = getattr(nk, kernel)(*ins)
        return tuple(cast(o) for o in out) if isinstance(out, tuple) else cast(out)
    return port


def attention_softmax_in(dtype):
    """The attention with its softmax in ``dtype``: the weights cast to it and back before
    the weighted sum (F.softmax(scores, -1, dtype=torch.float16).float() @ v)."""
    cast = _bf16 if dtype == "bfloat16" else (lambda x: x.astype(np.float16).astype(F))

    def attention_forward(inp, NH):
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        out, preatt, att = nk.attention_forward(inp, NH)
        v = inp[..., 2 * C:].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
        y = (cast(att) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        return y.astype(F), preatt, att
    return attention_forward


# variant id -> [(kernel, port[, shape])]
PORTS = {
    "precision.bfloat16": [("attention_forward", in_half("attention_forward", "bfloat16")),    # BUGS10
                           ("layernorm_forward", in_half("layernorm_forward", "bfloat16")),
                           ("gelu_forward", in_half("gelu_forward", "bfloat16", round_inputs=False))],
    "precision.float16": [("attention_forward", in_half("attention_forward", "float16")),
                          ("matmul_forward", in_half("matmul_forward", "float16"))],
    "precision.softmax-float16": [("attention_forward", attention_softmax_in("float16"))],
    "precision.softmax-bfloat16": [("attention_forward", attention_softmax_in("bfloat16"))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


def _gelu_bf16_erf(x):
    """A bfloat16 GELU in its exact (erf) form: the form's error is within bfloat16's own
    rounding, so the precision explains it (the gelu family's gelu.erf cannot at float32)."""
    from math import erf
    y = 0.5 * x.astype(np.float64) * (1 + np.vectorize(erf)(x.astype(np.float64) / np.sqrt(2)))
    return _bf16(y.astype(F))


@pytest.mark.parametrize("kernel, port, why", [
    # a mistake far beyond bfloat16's tolerance, its output bfloat16: not the precision's doing
    ("gelu_forward", lambda x: _bf16(np.maximum(x, F(0)) ** 2), "relu squared in bf16"),
    # a float32 mistake (no output exact in a half dtype): not the precision's doing
    ("layernorm_forward", lambda inp, w, b: (lambda o: (o[0] * F(1.001), o[1], o[2]))(nk.layernorm_forward(inp, w, b)),
     "a float32 output off by a factor"),
])
def test_the_precision_does_not_claim_other_mistakes(kernel, port, why):
    failed = failures(port_with(kernel, port), kernel)
    assert failed and not any(i.startswith("precision.") for c in failed for i in c.diagnosis.ids), why


def test_held_in_tells_the_dtype_from_the_bits():
    x = np.random.default_rng(0).standard_normal(256).astype(F)
    assert held_in(_bf16(x)) == "bfloat16"
    assert held_in(x.astype(np.float16).astype(F)) == "float16"
    assert held_in(x) is None and held_in(np.zeros(256, F)) is None


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("precision"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)


def test_a_check_already_at_the_precision_is_not_explained_by_it():
    """A check judged at bfloat16 (a declared mixed-precision run) that fails is not the
    precision's doing: the variant does not judge it again at the same tolerance."""
    from harness.arbiter.tolerances import op_tolerance
    from harness.diagnosis.catalogue.precision import VARIANTS, _at
    v = next(x for x in VARIANTS if x.id == "precision.bfloat16")
    out = _bf16(np.random.default_rng(0).standard_normal(64).astype(F))
    args = {"inp": out.astype(np.float64)}
    at_f32 = op_tolerance("gelu_forward", "out", 1, out.size)
    at_bf16 = op_tolerance("gelu_forward", "out", 1, out.size, _at("bfloat16"))
    assert v.judged_at("gelu_forward", "out", args, out, at_f32) is not None
    assert v.judged_at("gelu_forward", "out", args, out, at_bf16) is None
