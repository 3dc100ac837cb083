"""The generic changes tried last (the catalogue's output module): a constant factor or offset
on any op's output.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import pytest

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, port_cases, port_with)

import numpy as np

from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def scaled_port(kernel, factor=1.0, offset=0.0):
    """Any forward kernel with a constant factor or offset on its (first) output."""
    f = getattr(nk, kernel)

    def port(*args):
        out = f(*args)
        first = out[0] if isinstance(out, tuple) else out
        first = (first * F(factor) + F(offset)).astype(F)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return port


def dropout_port(kernel, p):
    """Any forward kernel with dropout left on after it (a seeded mask, torch's scaling)."""
    f = getattr(nk, kernel)

    def port(*args):
        out = f(*args)
        first = out[0] if isinstance(out, tuple) else out
        keep = np.random.default_rng(0).random(first.shape) >= p
        first = np.where(keep, first / F(1 - p), F(0)).astype(F)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return port


def residual_branch_dropout(p):
    """x + dropout(f(x)): the residual sum with dropout left on its branch (inp2; BUGS11's
    F.dropout(a, p=0.1)): the dropped elements are the branch's, the sum keeps x there."""
    def residual_forward(inp1, inp2):
        keep = np.random.default_rng(0).random(inp2.shape) >= p
        return (inp1 + np.where(keep, inp2 / F(1 - p), F(0))).astype(F)
    return residual_forward


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "output.scale": [(k, scaled_port(k, factor=1.001)) for k in ("layernorm_forward", "matmul_forward",
                                                                "gelu_forward", "softmax_forward")],
    "output.offset": [(k, scaled_port(k, offset=0.01)) for k in ("matmul_forward", "gelu_forward")],
    # BUGS9's embedding dropout always on (p 0.1), and a dropout after the MLP's GELU
    "output.dropout": [("encoder_forward", dropout_port("encoder_forward", 0.1)),
                       ("gelu_forward", dropout_port("gelu_forward", 0.2)),
                       # BUGS11: in a residual branch (no zero appears in the sum)
                       ("residual_forward", residual_branch_dropout(0.1))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


def test_zeros_without_the_scale_are_no_dropout():
    """GELU zeroed at its negative inputs (zeros where the C's output is not, the rest not
    scaled) and a dropout mask without its 1/(1-p): neither is named a dropout."""
    def gelu_cut(x):
        return np.where(x > 0, nk.gelu_forward(x), F(0)).astype(F)

    def unscaled(x):
        return np.where(np.random.default_rng(0).random(x.shape) >= 0.1, nk.gelu_forward(x), F(0)).astype(F)
    for port in (gelu_cut, unscaled):
        failed = failures(port_with("gelu_forward", port), "gelu_forward")
        assert failed and all("output.dropout" not in c.diagnosis.ids for c in failed)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("output"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)


def test_a_residual_sum_with_its_branch_halved_or_dropped_unscaled_is_no_dropout():
    """x + 0.5 f(x) (a factor, no dropped element) and x + mask * f(x) without 1/(1-p): not
    named a dropout; the C's residual is named nothing."""
    def halved(inp1, inp2):
        return (inp1 + F(0.5) * inp2).astype(F)

    def unscaled(inp1, inp2):
        return (inp1 + np.where(np.random.default_rng(0).random(inp2.shape) >= 0.1, inp2, F(0))).astype(F)
    for port in (halved, unscaled):
        failed = failures(port_with("residual_forward", port), "residual_forward")
        assert failed and all("output.dropout" not in c.diagnosis.ids for c in failed)
    assert not failures(port_with("residual_forward", lambda a, b: (a + b).astype(F)), "residual_forward")
