"""Attention's changes: the scale, the causal mask (diagonal, none, filled or applied
after the softmax, the upper triangle), the heads' layout, q/k/v order, the softmax's axis,
the scale after the softmax.

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

from pyref import numpy_kernels as nk
from test_intermediate_causes import _port_without
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def attention_port(scale=None, diagonal=True, causal=True):
    def attention_forward(inp, NH):
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        sc = F(1 / math.sqrt(hs)) if scale is None else F(scale(hs))
        q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
        visit = np.tril(np.ones((T, T), bool), 0 if diagonal else -1) if causal else np.ones((T, T), bool)
        pre = np.where(visit, (q @ k.transpose(0, 1, 3, 2)) * sc, F(0))
        mx = np.maximum(np.where(visit, pre, -np.inf).max(-1, keepdims=True), F(-10000))
        e = np.exp(np.where(visit, pre - mx, -np.inf)).astype(F)
        s = e.sum(-1, keepdims=True)
        att = np.where(s > 0, e / np.where(s > 0, s, F(1)), F(0)).astype(F)
        return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C), pre.astype(F), att
    return attention_forward


def attention_any_port(order="qkv", split="heads-major", merge="transpose", axis=-1, diagonal=0, scale=None,
                       masking="-inf", per_head=False, upper=False, k_is_q=False, nh_major=False, tril_bias=False,
                       take=None, inverted=False):
    """attention_forward in float32 with one of the mistakes of a hand-written port: q, k, v
    in another order, the heads split or merged in another layout, the softmax over the
    queries, the mask off by a diagonal, a scale by another dimension; k = q; the heads
    batched (NH*B) and read back as (B*NH); the 0/1 tril added to the scores as the mask;
    ``take``: what q, k, v are given (sdpa(q, k, k): "qkk"); ``inverted``: the mask's sense
    inverted (the future attended, the past masked)."""
    def attention_forward(inp, NH):
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        parts = dict(zip(order, np.split(inp, 3, axis=-1)))
        if k_is_q:
            parts["k"] = parts["q"]
        if take:
            parts = dict(zip("qkv", (parts[x] for x in take)))
        if per_head:        # (B, T, NH, 3, hs): q, k, v interleaved per head
            parts = dict(zip("qkv", (x.reshape(B, T, C) for x in
                                     np.moveaxis(inp.reshape(B, T, NH, 3, hs), 3, 0))))
        if split == "no-stride":        # [..., h:h + hs] for head h: the stride hs left out
            q, k, v = (np.stack([parts[x][..., h:h + hs] for h in range(NH)], 1) for x in "qkv")
        elif split == "no-transpose":
            q, k, v = (parts[x].reshape(B, NH, T, hs) for x in "qkv")
        elif split == "interleaved":
            q, k, v = (parts[x].reshape(B, T, hs, NH).transpose(0, 3, 1, 2) for x in "qkv")
        else:
            q, k, v = (parts[x].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for x in "qkv")
        sc = F(1 / math.sqrt(hs)) if scale is None else F(scale(hs, C))
        visit = np.tril(np.ones((T, T), bool), diagonal)
        if upper:
            visit = visit.T
        if inverted:
            visit = ~visit
        scores = (q @ k.transpose(0, 1, 3, 2)) * sc
        if masking == "after" or tril_bias:
            pre = (scores + visit.astype(F) if tril_bias else scores).astype(F)
        else:
            pre = np.where(visit, scores, F(-np.inf) if masking == "-inf" else F(masking)).astype(F)
        with np.errstate(invalid="ignore"):     # over the heads, -inf - -inf: NaN, as torch's
            e = np.exp(pre - pre.max(axis, keepdims=True)).astype(F)
            att = (e / e.sum(axis, keepdims=True)).astype(F)
        if masking == "after":
            att = np.where(visit, att, F(0))
        if tril_bias:
            pre = scores.astype(F)
        y = att @ v
        if nh_major:        # batched (NH*B, T, hs), viewed back as (B, NH, T, hs)
            y = y.transpose(1, 0, 2, 3).reshape(B, NH, T, hs)
        if merge == "interleaved":
            out = y.transpose(0, 2, 3, 1).reshape(B, T, C)
        elif merge == "transpose-2-3":       # (B,NH,hs,T) viewed as (B,T,C)
            out = y.transpose(0, 1, 3, 2).reshape(B, T, C)
        else:
            out = y.reshape(B, T, C) if merge == "no-transpose" else y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return out, np.where(visit, pre, F(0)), att
    return attention_forward


def attention_scaled_after(inp, NH):
    """The scores unscaled, the output scaled by 1/sqrt(hs) after the softmax (the port
    returns the C's preatt and att: only its output is off)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    scores = np.where(np.tril(np.ones((T, T), bool)), q @ k.transpose(0, 1, 3, 2), F(-np.inf))
    e = np.exp(scores - scores.max(-1, keepdims=True))
    y = (e / e.sum(-1, keepdims=True)) @ v * F(1 / math.sqrt(hs))
    _, preatt, att = nk.attention_forward(inp, NH)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C).astype(F), preatt, att


def attention_bwd_scale(factor):
    """The backward with dq, dk scaled by ``factor(hs)`` instead of 1/sqrt(hs)."""
    def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):
        C = inp.shape[-1] // 3
        hs = C // NH
        before = dinp.copy()
        nk.attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)
        delta = dinp[..., :2 * C] - before[..., :2 * C]
        dinp[..., :2 * C] = before[..., :2 * C] + delta * F(factor(hs) * math.sqrt(hs))
    return attention_backward


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "attention.scale=1/hs": [("attention_forward", attention_port(scale=lambda hs: 1 / hs)),
                             ("attention_backward", attention_bwd_scale(lambda hs: 1 / hs))],
    "attention.no-scale": [("attention_forward", attention_port(scale=lambda hs: 1.0)),
                           ("attention_backward", attention_bwd_scale(lambda hs: 1.0))],
    "attention.scale": [("attention_forward", attention_any_port(scale=lambda hs, C: 1 / math.sqrt(C))),
                        ("attention_backward", attention_bwd_scale(lambda hs: 0.3))],
    "attention.mask-diagonal": [("attention_forward", attention_any_port(diagonal=1)),
                                # tril(-2) filled with a finite minimum: the first two queries weigh every key
                                ("attention_forward", attention_any_port(diagonal=-2, masking=float(np.finfo(F).min))),
                                ("attention_forward", attention_any_port(diagonal=-2))],     # -inf: NaN there
    "attention.layout": [("attention_forward", attention_any_port(merge="no-transpose")),
                         ("attention_forward", attention_any_port(split="no-transpose")),
                         ("attention_forward", attention_any_port(split="interleaved")),
                         ("attention_forward", attention_any_port(merge="interleaved")),
                         ("attention_forward", attention_any_port(per_head=True)),
                         ("attention_forward", attention_any_port(merge="transpose-2-3")),
                         # BUGS6's first run: no known cause
                         ("attention_forward", attention_any_port(nh_major=True)),
                         # BUGS9's head offset without its stride: no known cause
                         ("attention_forward", attention_any_port(split="no-stride"))],
    "attention.qkv-order.q-k-swapped": [("attention_forward", attention_any_port(order="kqv")),
                                        ("attention_forward", attention_any_port(take="kqv"))],   # sdpa(k, q, v)
    "attention.qkv-order.q-v-swapped": [("attention_forward", attention_any_port(order="vkq"))],
    "attention.qkv-order.k-v-swapped": [("attention_forward", attention_any_port(take="qvk"))],
    "attention.qkv-order.rotated": [("attention_forward", attention_any_port(order="kvq"))],
    "attention.qkv-order.k-is-q": [("attention_forward", attention_any_port(k_is_q=True))],     # BUGS6
    "attention.qkv-order.v-is-k": [("attention_forward", attention_any_port(take="qkk"))],      # sdpa(q, k, k)
    "attention.softmax-axis": [("attention_forward", attention_any_port(axis=-2)),
                               # BUGS7's first run: NaN, no known cause (torch.softmax(scores, dim=1))
                               ("attention_forward", attention_any_port(axis=1)),
                               ("attention_forward", attention_any_port(axis=1, masking=-1e9))],
    "attention.scale-after-softmax": [("attention_forward", attention_scaled_after)],
    "attention.masking.after-softmax": [("attention_forward", attention_any_port(masking="after"))],
    "attention.masking.transposed": [("attention_forward", attention_any_port(upper=True))],
    "attention.masking.added": [("attention_forward", attention_any_port(tril_bias=True))],     # BUGS6
    "attention.masking.inverted": [("attention_forward", attention_any_port(inverted=True))],
    "attention.mask-fill": [("attention_forward", attention_any_port(masking=0.0)),
                            ("attention_forward", attention_any_port(masking=-1.0))],
    "attention.no-diagonal": [("attention_forward", attention_port(diagonal=False)),
                              # BUGS11: triu(ones) (diagonal=0) masked with torch.finfo(dtype).min: the
                              # first query sees no key, so every key weighs 1/T there (not NaN)
                              ("attention_forward", attention_any_port(diagonal=-1, masking=float(np.finfo(F).min))),
                              ("attention_forward", attention_any_port(diagonal=-1, masking=-1e9)),
                              ("attention_forward", attention_any_port(diagonal=-1))],     # -inf: NaN there
    "attention.no-causal-mask": [("attention_forward", attention_port(causal=False))],
    # the softmax Jacobian's terms, each left out (tests/diagnosis/test_intermediate_causes.py: the C edited)
    "attention.jacobian-no-diagonal": [("attention_backward", _port_without("diagonal"))],
    "attention.jacobian-no-sum": [("attention_backward", _port_without("sum"))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("attention"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)


@pytest.mark.parametrize("fill", [float(np.finfo(F).min), -1e9, -1e4])
def test_a_finite_minimum_fill_with_the_diagonal_kept_is_no_mistake(fill):
    """The masks' causes hold with a finite fill (torch.finfo(dtype).min, as JAX ports write
    jnp.where(mask, s, finfo.min)): the same fill with tril(0), the C's mask, passes."""
    assert not failures(port_with("attention_forward", attention_any_port(masking=fill)), "attention_forward",
                        SHAPE_BY_NAME["base"])
