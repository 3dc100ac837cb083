"""The per-op cases: the dimensions of each case (:class:`Shape`, :data:`SHAPES`) and, for
every kernel, how to make its inputs for one (a function per kernel, named as the kernel,
that :mod:`pyref.spec`'s rows name).

Inputs are float32 / int32 and the same for every implementation. Gradient buffers that a
backward kernel accumulates into start non-zero, so a kernel that overwrites (``=``)
instead of accumulating (``+=``) is caught.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import LN_EPS


@dataclass(frozen=True)
class Shape:
    """Dimensions of one per-op case. OC is matmul's output width; V <= Vp."""

    name: str
    B: int
    T: int
    C: int
    NH: int
    V: int
    Vp: int
    OC: int

    @property
    def hs(self) -> int:
        return self.C // self.NH

    def __str__(self) -> str:
        return self.name


# The awkward shapes on purpose: B*T not a multiple of 8 (the naive matmul path), T=1,
# NH=1, hs=1, V < Vp and V == Vp, C not a power of two.
SHAPES = (
    Shape("base", B=2, T=8, C=32, NH=4, V=50, Vp=64, OC=96),
    Shape("odd", B=3, T=5, C=20, NH=5, V=37, Vp=40, OC=12),
    Shape("T1", B=4, T=1, C=16, NH=2, V=16, Vp=16, OC=48),
    Shape("hs1", B=2, T=6, C=6, NH=6, V=9, Vp=12, OC=24),
    Shape("nh1", B=1, T=7, C=24, NH=1, V=30, Vp=32, OC=24),
    Shape("wide", B=2, T=16, C=96, NH=3, V=300, Vp=320, OC=384),
)
SHAPE_BY_NAME = {s.name: s for s in SHAPES}


def _normal(rng, *shape, scale=1.0, loc=0.0):
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _tokens(rng, n_rows, *shape):
    ids = rng.integers(0, n_rows, size=shape).astype(np.int32)
    flat = ids.reshape(-1)
    flat[0] = 0                 # the first and last ids of the table always occur
    flat[-1] = n_rows - 1
    return ids


def _probs(rng, s: Shape):
    logits = _normal(rng, s.B, s.T, s.Vp, scale=2.0)
    p = np.exp(logits[..., :s.V] - logits[..., :s.V].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros((s.B, s.T, s.Vp), np.float32)
    out[..., :s.V] = p
    return out


def _att(rng, s: Shape):
    pre = _normal(rng, s.B, s.NH, s.T, s.T, scale=2.0)
    pre = np.where(np.tril(np.ones((s.T, s.T), bool)), pre, -np.inf)
    a = np.exp(pre - pre.max(-1, keepdims=True))
    return (a / a.sum(-1, keepdims=True)).astype(np.float32)


# Input makers: named arguments of the kernel (protocol names). Gradient buffers that the
# kernel accumulates into start non-zero.
def encoder_forward(s, rng):
    return dict(inp=_tokens(rng, s.Vp, s.B, s.T), wte=_normal(rng, s.Vp, s.C),
                wpe=_normal(rng, s.T + 3, s.C))


def encoder_backward(s, rng):
    return dict(dwte=_normal(rng, s.Vp, s.C), dwpe=_normal(rng, s.T + 3, s.C),
                dout=_normal(rng, s.B, s.T, s.C), inp=_tokens(rng, s.Vp, s.B, s.T))


def layernorm_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, s.C, scale=0.3, loc=0.5),
                weight=_normal(rng, s.C, scale=0.3, loc=1.0), bias=_normal(rng, s.C, scale=0.3))


def layernorm_backward(s, rng):
    inp = _normal(rng, s.B, s.T, s.C, scale=0.3, loc=0.5)
    mean = inp.astype(np.float64).mean(-1)
    rstd = 1.0 / np.sqrt(inp.astype(np.float64).var(-1) + LN_EPS)
    return dict(dinp=_normal(rng, s.B, s.T, s.C), dweight=_normal(rng, s.C), dbias=_normal(rng, s.C),
                dout=_normal(rng, s.B, s.T, s.C), inp=inp,
                weight=_normal(rng, s.C, scale=0.3, loc=1.0),
                mean=mean.astype(np.float32), rstd=rstd.astype(np.float32))


def matmul_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, s.C), weight=_normal(rng, s.OC, s.C, scale=0.2),
                bias=_normal(rng, s.OC, scale=0.2))


def matmul_backward(s, rng):
    return dict(dinp=_normal(rng, s.B, s.T, s.C), dweight=_normal(rng, s.OC, s.C),
                dbias=_normal(rng, s.OC), dout=_normal(rng, s.B, s.T, s.OC),
                inp=_normal(rng, s.B, s.T, s.C), weight=_normal(rng, s.OC, s.C, scale=0.2))


def attention_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, 3 * s.C), NH=s.NH)


def attention_backward(s, rng):
    # datt and dpreatt are scratch buffers: the C accumulates into them and then READS the
    # accumulated values back (datt feeds dpreatt, dpreatt feeds dq and dk), so non-zero
    # starting values would change dinp. In gpt2_backward they always start at zero; a
    # port that keeps them local is right, so they start at zero here too (dinp, which
    # nothing reads back, starts non-zero to check the accumulation).
    zeros = np.zeros((s.B, s.NH, s.T, s.T), np.float32)
    return dict(dinp=_normal(rng, s.B, s.T, 3 * s.C), dpreatt=zeros.copy(),
                datt=zeros.copy(), dout=_normal(rng, s.B, s.T, s.C),
                inp=_normal(rng, s.B, s.T, 3 * s.C), att=_att(rng, s), NH=s.NH)


def gelu_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, 4 * s.C, scale=2.0))


def gelu_backward(s, rng):
    return dict(dinp=_normal(rng, s.B, s.T, 4 * s.C), inp=_normal(rng, s.B, s.T, 4 * s.C, scale=2.0),
                dout=_normal(rng, s.B, s.T, 4 * s.C))


def residual_forward(s, rng):
    return dict(inp1=_normal(rng, s.B, s.T, s.C), inp2=_normal(rng, s.B, s.T, s.C))


def residual_backward(s, rng):
    return dict(dinp1=_normal(rng, s.B, s.T, s.C), dinp2=_normal(rng, s.B, s.T, s.C),
                dout=_normal(rng, s.B, s.T, s.C))


def softmax_forward(s, rng):
    return dict(logits=_normal(rng, s.B, s.T, s.Vp, scale=3.0), V=s.V)


def crossentropy_forward(s, rng):
    return dict(probs=_probs(rng, s), targets=_tokens(rng, s.V, s.B, s.T))


def crossentropy_softmax_backward(s, rng):
    return dict(dlogits=_normal(rng, s.B, s.T, s.Vp), dlosses=_normal(rng, s.B, s.T, scale=0.1),
                probs=_probs(rng, s), targets=_tokens(rng, s.V, s.B, s.T), V=s.V)


def adamw(s, rng):
    # gpt2_update runs over a whole model, so the C side needs a built-in config's
    # parameter count: the tiny preset's
    from pyref.config import PRESETS
    n = PRESETS["tiny"].num_parameters()
    return dict(param=_normal(rng, n, scale=0.05), grad=_normal(rng, n, scale=0.01),
                m=_normal(rng, n, scale=0.005), v=np.abs(_normal(rng, n, scale=1e-4)),
                # the C takes float hyperparameters: every side gets the float32 values
                lr=f32(1e-3), beta1=f32(0.9), beta2=f32(0.999), eps=f32(1e-8),
                weight_decay=f32(0.1), t=3 + s.B)


def f32(x: float) -> float:
    """``x`` as the C's float sees it (exactly representable in float64 too)."""
    return float(np.float32(x))
