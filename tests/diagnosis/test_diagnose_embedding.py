"""The embedding's changes: positions shifted, reversed or counted over the batch, no wpe or
no wte, a product for a sum, the table scaled.

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
                             c_cases, c_mutants, failures, port_cases, port_with)

from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def encoder_product(inp, wte, wpe):
    return wte[inp] * wpe[:inp.shape[1]]


def encoder_flat_positions(inp, wte, wpe):
    """Positions counted over the flattened batch: wpe[(b*T + t) % maxT]."""
    B, T = inp.shape
    return wte[inp] + wpe[np.arange(B * T).reshape(B, T) % wpe.shape[0]]


def encoder_port(shift=0, wte=True, wpe=True, reverse=False, wte_scale=None):
    def encoder_forward(inp, wte_, wpe_):
        T = inp.shape[1]
        out = np.zeros(inp.shape + (wte_.shape[1],), F)
        if wte:
            out = out + (wte_[inp] * F(wte_scale) if wte_scale else wte_[inp])
        if wpe:
            out = out + wpe_[(np.arange(T) + shift)[::-1] if reverse else np.arange(T) + shift]
        return out
    return encoder_forward


def encoder_backward_padding(table, row):
    """The encoder's backward with ``row`` of ``table`` ("wte", "wpe") left without
    gradient, as torch's nn.Embedding(padding_idx=row) leaves it (None: the first token's row)."""
    def encoder_backward(dwte, dwpe, dout, inp):
        nonlocal row
        row = int(inp.flat[0]) if row is None else row
        before = (dwte if table == "wte" else dwpe)[row].copy()
        B, T, C = dout.shape
        np.add.at(dwte, inp.reshape(-1), dout.reshape(B * T, C))
        dwpe[:T] += dout.sum(0)
        (dwte if table == "wte" else dwpe)[row] = before
    return encoder_backward


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "embedding.product": [("encoder_forward", encoder_product)],
    "embedding.positions": [("encoder_forward", encoder_port(reverse=True)),
                            ("encoder_forward", encoder_flat_positions)],
    "embedding.table-scale": [("encoder_forward", encoder_port(wte_scale=math.sqrt(32)))],
    "embedding.position-shift": [("encoder_forward", encoder_port(shift=1)),
                                 ("encoder_forward", encoder_port(shift=2))],     # BUGS11: OPT's wpe[2:T+2]
    "embedding.no-wpe": [("encoder_forward", encoder_port(wpe=False))],
    "embedding.no-wte": [("encoder_forward", encoder_port(wte=False))],
    "embedding.padding-idx": [("encoder_backward", encoder_backward_padding("wpe", 0)),      # BUGS10
                              ("encoder_backward", encoder_backward_padding("wte", None))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("embedding"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)


@pytest.mark.parametrize("port, words", [
    (encoder_port(shift=2), "positions counted from 2: wpe[t+2]"),          # BUGS11: OPT's offset of 2
    (encoder_port(shift=3), "positions counted from 3: wpe[t+3]"),
    (encoder_port(wte_scale=math.sqrt(32)), "the token embedding (wte) scaled by 5.657 = sqrt(C)"),   # Gemma/T5's
    (encoder_port(wte_scale=2.0), "the token embedding (wte) scaled by 2 = 2")])
def test_an_encoder_mistake_is_named_with_its_constant(port, words):
    """The position offset and the table's scale read from the output say their constant
    (an offset k of the position rows, sqrt(C) of a normalised token table)."""
    failed = failures(port_with("encoder_forward", port), "encoder_forward", SHAPE_BY_NAME["base"])
    assert [c.name for c in failed] == ["encoder_forward.out"]
    assert words in failed[0].diagnosis.text(), failed[0].diagnosis.text()


def test_the_c_encoder_is_not_named():
    """The legitimate encoder (wte[token] + wpe[t], float32) passes: no cause to name."""
    assert not failures(port_with("encoder_forward", encoder_port()), "encoder_forward", SHAPE_BY_NAME["base"])
