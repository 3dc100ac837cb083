"""GELU's changes: the erf form, another cubic constant, a sigmoid or SiLU, a power, the
scaling inside tanh, GELU missing, applied twice or before the matmul, a ReLU.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, gelu_coef_bwd, gelu_coef_fwd, gelu_erf_bwd, gelu_erf_fwd,
                             gelu_tanh_arg, port_cases, port_with)

from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def gelu_power_fwd(inp):
    return F(0.5) * inp * (F(1) + np.tanh(F(math.sqrt(2 / math.pi)) * (inp + F(0.044715) * inp * inp)))


def gelu_power_bwd(dinp, inp, dout):
    s, c = F(math.sqrt(2 / math.pi)), F(0.044715)
    th = np.tanh(s * (inp + c * inp * inp))
    dinp += (F(0.5) * (F(1) + th) + inp * F(0.5) * (F(1) - th * th) * s * (F(1) + F(2) * c * inp)) * dout


def gelu_before_matmul(inp, weight, bias):
    """c_fc applied to GELU(inp): GELU moved before the MLP's first matmul."""
    return nk.matmul_forward(nk.gelu_forward(inp), weight, bias)


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "gelu.erf": [("gelu_forward", gelu_erf_fwd), ("gelu_backward", gelu_erf_bwd)],
    "gelu.cubic-constant": [("gelu_forward", gelu_coef_fwd), ("gelu_backward", gelu_coef_bwd),
                            # the decimal point slipped a place (BUGS6's first run: no known cause)
                            ("gelu_forward", lambda x: F(0.5) * x * (F(1) + np.tanh(gelu_tanh_arg(x, 0.0044715))))],
    "gelu.sigmoid": [("gelu_forward", lambda x: x / (F(1) + np.exp(F(-1.702) * x)))],
    "gelu.silu": [("gelu_forward", lambda x: x / (F(1) + np.exp(-x)))],
    "gelu.square": [("gelu_forward", gelu_power_fwd), ("gelu_backward", gelu_power_bwd)],
    "gelu.missing": [("gelu_forward", lambda x: x.copy()),
                     ("gelu_backward", lambda dinp, inp, dout: dinp.__iadd__(dout))],
    "gelu.twice": [("gelu_forward", lambda x: nk.gelu_forward(nk.gelu_forward(x)))],
    "gelu.order": [("matmul_forward", gelu_before_matmul, "wide")],
    "gelu.tanh-scale": [("gelu_forward", lambda x: F(0.5) * x * (F(1) + np.tanh(F(math.sqrt(2) / math.pi) *
                                                                                  (x + F(0.044715) * x ** 3))))],
    # the 0.5 left out (BUGS8's first run: named output.scale, a factor 2 on the output)
    "gelu.half-factor": [("gelu_forward", lambda x: x * (F(1) + np.tanh(gelu_tanh_arg(x, 0.044715))))],
    "gelu.relu": [("gelu_forward", lambda x: np.maximum(x, F(0))),
                  ("gelu_backward", lambda dinp, inp, dout: dinp.__iadd__((inp > 0).astype(F) * dout))],
    # another activation in GELU's place (gelu.activation's forms; BUGS10's relu-squared)
    "gelu.relu-squared": [("gelu_forward", lambda x: np.square(np.maximum(x, F(0)))),
                          ("gelu_backward", lambda dinp, inp, dout: dinp.__iadd__(F(2) * np.maximum(inp, F(0)) * dout))],
    "gelu.squared": [("gelu_forward", lambda x: np.square(nk.gelu_forward(x)))],
    "gelu.leaky-relu": [("gelu_forward", lambda x: np.where(x > 0, x, F(0.01) * x))],
    "gelu.mish": [("gelu_forward", lambda x: x * np.tanh(np.log1p(np.exp(x))))],
    "gelu.softplus": [("gelu_forward", lambda x: np.log1p(np.exp(x)))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("gelu"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)
