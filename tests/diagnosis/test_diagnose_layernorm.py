"""Layer norm's changes: another eps, eps outside the square root, the unbiased variance,
the statistics over another axis, the affine swapped or weight+1, an RMS norm or no
square root; and the pytest failure message that names the cause.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from diagnose_common import (BASE, F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, port_cases, port_with)

from harness import assert_kernel, make_inputs
from harness.arbiter.compare import ParityError
from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME
from pyref.spec import SPEC


# ----------------------------------------------------------------------------- ports

def layernorm_port(eps=1e-5, ddof=0):
    def layernorm_forward(inp, weight, bias):
        C = inp.shape[-1]
        m = inp.sum(-1, keepdims=True) / F(C)
        v = ((inp - m) ** 2).sum(-1, keepdims=True) / F(C - ddof)
        s = F(1) / np.sqrt(v + F(eps))
        return (s * (inp - m)) * weight + bias, m[..., 0], s[..., 0]
    return layernorm_forward


def layernorm_plus_one(inp, weight, bias):
    return nk.layernorm_forward(inp, weight + F(1), bias)


def layernorm_swapped(inp, weight, bias):
    out, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return ((out - bias) / np.where(weight == 0, F(1), weight) * bias + weight).astype(F), mean, rstd


def layernorm_form_port(form):
    """A layer norm with another normalisation (an RMS norm; no square root); the mean and
    rstd it returns are the C's (it has none of its own to compare)."""
    def layernorm_forward(inp, weight, bias):
        _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
        m = inp.mean(-1, keepdims=True)
        if form == "rms":
            n = inp / np.sqrt((inp * inp).mean(-1, keepdims=True) + F(1e-5))
        else:
            n = (inp - m) / (((inp - m) ** 2).mean(-1, keepdims=True) + F(1e-5))
        return (n * weight + bias).astype(F), mean, rstd
    return layernorm_forward


def layernorm_outside_port(eps):
    def layernorm_forward(inp, weight, bias):
        m = inp.mean(-1, keepdims=True)
        s = F(1) / (np.sqrt(((inp - m) ** 2).mean(-1, keepdims=True)) + F(eps))
        return (s * (inp - m)) * weight + bias, m[..., 0], s[..., 0]
    return layernorm_forward


def layernorm_over_positions(inp, weight, bias):
    """The statistics over the positions; the mean and rstd it returns are the C's (a port
    normalising over T has none per position: only its output is wrong)."""
    m = inp.mean(1, keepdims=True)
    v = ((inp - m) ** 2).mean(1, keepdims=True)
    out = (inp - m) / np.sqrt(v + F(1e-5)) * weight + bias
    _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return out.astype(F), mean, rstd


def layernorm_over_positions_and_channels(inp, weight, bias):
    """The statistics over (T, C) together (torch.var_mean over dims (-2, -1)); the mean and
    rstd returned are the C's, as in layernorm_over_positions."""
    var, m = inp.var(axis=(1, 2), keepdims=True), inp.mean(axis=(1, 2), keepdims=True)
    out = (inp - m) / np.sqrt(var + F(1e-5)) * weight + bias
    _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return out.astype(F), mean, rstd


def layernorm_without(param):
    """layernorm with its bias (F.layer_norm(x, shape, weight, None)) or its gain
    (elementwise_affine=False) left out, forward and backward (that parameter gets no gradient)."""
    def layernorm_forward(inp, weight, bias):
        m = inp.mean(-1, keepdims=True)
        s = F(1) / np.sqrt(((inp - m) ** 2).mean(-1, keepdims=True) + F(1e-5))
        n = s * (inp - m)
        return (n * weight if param == "bias" else n + bias), m[..., 0], s[..., 0]

    def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        kept = (dbias if param == "bias" else dweight).copy()
        nk.layernorm_backward(dinp, dweight, dbias, dout, inp, weight if param == "bias" else np.ones_like(weight),
                              mean, rstd)
        (dbias if param == "bias" else dweight)[...] = kept
    return layernorm_forward, layernorm_backward


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "layernorm.eps=1e-06": [("layernorm_forward", layernorm_port(eps=1e-6))],
    "layernorm.eps=1e-12": [("layernorm_forward", layernorm_port(eps=1e-12))],
    "layernorm.eps=0.0001": [("layernorm_forward", layernorm_port(eps=1e-4))],
    "layernorm.unbiased-variance": [("layernorm_forward", layernorm_port(ddof=1))],
    "layernorm.eps": [("layernorm_forward", layernorm_port(eps=5e-5)), ("layernorm_forward", layernorm_port(eps=1e-3))],
    "layernorm.affine-swapped": [("layernorm_forward", layernorm_swapped)],
    "layernorm.weight-plus-one": [("layernorm_forward", layernorm_plus_one)],
    "layernorm.rms": [("layernorm_forward", layernorm_form_port("rms"))],
    "layernorm.no-sqrt": [("layernorm_forward", layernorm_form_port("no-sqrt"))],
    "layernorm.eps-outside-sqrt": [("layernorm_forward", layernorm_outside_port(1e-5))],
    "layernorm.axis": [("layernorm_forward", layernorm_over_positions),
                       ("layernorm_forward", layernorm_over_positions_and_channels)],
    "layernorm.no-bias": [("layernorm_forward", layernorm_without("bias")[0]),         # BUGS10
                          ("layernorm_backward", layernorm_without("bias")[1])],
    "layernorm.no-weight": [("layernorm_forward", layernorm_without("weight")[0]),
                            ("layernorm_backward", layernorm_without("weight")[1])],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- messages

def test_pytest_failure_message_says_the_cause():
    s = BASE
    with pytest.raises(ParityError) as info:
        assert_kernel(port_with("layernorm_forward", layernorm_port(eps=1e-6)), "layernorm_forward",
                      make_inputs(SPEC["layernorm_forward"], s), label="port")
    msg = str(info.value)
    assert "Diagnosis: probable cause: layernorm's eps is 1e-06 instead of 1e-5" in msg
    assert info.value.comparison.diagnosis.ids == ("layernorm.eps=1e-06",)
    row = info.value.comparison.summary_row()
    assert row["diagnosis"]["causes"][0]["id"] == "layernorm.eps=1e-06" and row["passed"] is False


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("layernorm"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)
