"""Matmul's change (no bias) and the backward's accumulation (the catalogue's matmul
module): gradients overwritten instead of accumulated, or only the last term kept.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from diagnose_common import (assert_c_edit_diagnosed, assert_diagnosed, c_cases,  # noqa: F401 - c_mutants is a fixture
                             c_mutants, failures, overwrite, port_cases, port_with)

from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def matmul_fwd_no_bias(inp, weight, bias):
    return inp @ weight.T


def matmul_bwd_no_dbias(dinp, dweight, dbias, dout, inp, weight):
    nk.matmul_backward(dinp, dweight, None, dout, inp, weight)


def last_term(kernel, arg):
    """The C's loop for ``arg`` with ``+=`` turned into ``=``, written out in its order."""
    def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        keep = {"dweight": dweight.copy(), "dbias": dbias.copy()}
        nk.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
        B, T, _ = dout.shape
        for b in range(B):
            for t in range(T):
                norm = (inp[b, t] - mean[b, t]) * rstd[b, t]
                keep["dbias"][:] = dout[b, t]
                keep["dweight"][:] = norm * dout[b, t]
        (dweight if arg == "dweight" else dbias)[:] = keep[arg]

    def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
        keep = {"dinp": dinp.copy(), "dweight": dweight.copy(), "dbias": dbias.copy()}
        nk.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
        B, T, OC = dout.shape
        for b in range(B):
            for t in range(T):
                for o in range(OC):
                    keep["dinp"][b, t] = weight[o] * dout[b, t, o]
                keep["dbias"][:] = dout[b, t]
                keep["dweight"][:] = np.outer(dout[b, t], inp[b, t])
        {"dinp": dinp, "dweight": dweight, "dbias": dbias}[arg][...] = keep[arg]

    def encoder_backward(dwte, dwpe, dout, inp):
        keep = {"dwte": dwte.copy(), "dwpe": dwpe.copy()}
        nk.encoder_backward(dwte, dwpe, dout, inp)
        B, T, _ = dout.shape
        for b in range(B):
            for t in range(T):
                keep["dwte"][inp[b, t]] = dout[b, t]
                keep["dwpe"][t] = dout[b, t]
        (dwte if arg == "dwte" else dwpe)[...] = keep[arg]

    return {"layernorm_backward": layernorm_backward, "matmul_backward": matmul_backward,
            "encoder_backward": encoder_backward}[kernel]


def matmul_bwd_weight_detached(dinp, dweight, dbias, dout, inp, weight):
    """The weight detached: dinp and dbias as the C's, nothing added to dweight."""
    nk.matmul_backward(dinp, dweight.copy(), dbias, dout, inp, weight)


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "matmul.no-bias": [("matmul_forward", matmul_fwd_no_bias), ("matmul_backward", matmul_bwd_no_dbias)],
    "backward.overwrite": [(k, overwrite(k, a)) for k, a in (
        ("encoder_backward", "dwte"), ("encoder_backward", "dwpe"), ("layernorm_backward", "dinp"),
        ("layernorm_backward", "dweight"), ("layernorm_backward", "dbias"), ("matmul_backward", "dinp"),
        ("matmul_backward", "dweight"), ("matmul_backward", "dbias"), ("attention_backward", "dinp"),
        ("gelu_backward", "dinp"), ("residual_backward", "dinp1"), ("residual_backward", "dinp2"),
        ("crossentropy_softmax_backward", "dlogits"))],
    # BUGS7's first run: a tied head's weight detached, named backward.overwrite
    "backward.weight-without-gradient": [("matmul_backward", matmul_bwd_weight_detached)],
    "backward.last-term-only": [(k, last_term(k, a)) for k, a in (
        ("layernorm_backward", "dbias"), ("layernorm_backward", "dweight"), ("matmul_backward", "dinp"),
        ("matmul_backward", "dweight"), ("matmul_backward", "dbias"), ("encoder_backward", "dwte"),
        ("encoder_backward", "dwpe"))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("matmul"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)
