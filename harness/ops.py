"""The op table: for every kernel of the protocol, how to make its inputs, which arrays it
produces, how to label and mask them, and the reduction length its rounding error grows with.

One generic routine (:func:`run_kernel`) calls any implementation of the protocol (the C
through :class:`harness.ckernels.CKernels`, NumPy, torch, a user's port, the float64
oracle) on the same inputs, so a per-op check is a table row, not a function per op.
Backward kernels start from non-zero gradient buffers, so a kernel that overwrites
(``=``) instead of accumulating (``+=``) is caught.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import sqrt
from typing import Callable

import numpy as np

from pyref.protocol import INPLACE_ARGS, KERNEL_OP, SIGNATURES

# names of what each forward kernel returns, in order
FORWARD_OUTPUTS = {
    "encoder_forward": ("out",), "layernorm_forward": ("out", "mean", "rstd"),
    "matmul_forward": ("out",), "attention_forward": ("out", "preatt", "att"),
    "gelu_forward": ("out",), "residual_forward": ("out",), "softmax_forward": ("probs",),
    "crossentropy_forward": ("losses",),
}


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
def _make_encoder_forward(s, rng):
    return dict(inp=_tokens(rng, s.Vp, s.B, s.T), wte=_normal(rng, s.Vp, s.C),
                wpe=_normal(rng, s.T + 3, s.C))


def _make_encoder_backward(s, rng):
    return dict(dwte=_normal(rng, s.Vp, s.C), dwpe=_normal(rng, s.T + 3, s.C),
                dout=_normal(rng, s.B, s.T, s.C), inp=_tokens(rng, s.Vp, s.B, s.T))


def _make_layernorm_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, s.C, scale=0.3, loc=0.5),
                weight=_normal(rng, s.C, scale=0.3, loc=1.0), bias=_normal(rng, s.C, scale=0.3))


def _make_layernorm_backward(s, rng):
    inp = _normal(rng, s.B, s.T, s.C, scale=0.3, loc=0.5)
    mean = inp.astype(np.float64).mean(-1)
    rstd = 1.0 / np.sqrt(inp.astype(np.float64).var(-1) + 1e-5)
    return dict(dinp=_normal(rng, s.B, s.T, s.C), dweight=_normal(rng, s.C), dbias=_normal(rng, s.C),
                dout=_normal(rng, s.B, s.T, s.C), inp=inp,
                weight=_normal(rng, s.C, scale=0.3, loc=1.0),
                mean=mean.astype(np.float32), rstd=rstd.astype(np.float32))


def _make_matmul_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, s.C), weight=_normal(rng, s.OC, s.C, scale=0.2),
                bias=_normal(rng, s.OC, scale=0.2))


def _make_matmul_backward(s, rng):
    return dict(dinp=_normal(rng, s.B, s.T, s.C), dweight=_normal(rng, s.OC, s.C),
                dbias=_normal(rng, s.OC), dout=_normal(rng, s.B, s.T, s.OC),
                inp=_normal(rng, s.B, s.T, s.C), weight=_normal(rng, s.OC, s.C, scale=0.2))


def _make_attention_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, 3 * s.C), NH=s.NH)


def _make_attention_backward(s, rng):
    # datt and dpreatt are scratch buffers: the C accumulates into them and then READS the
    # accumulated values back (datt feeds dpreatt, dpreatt feeds dq and dk), so non-zero
    # starting values would change dinp. In gpt2_backward they always start at zero; a
    # port that keeps them local is right, so they start at zero here too (dinp, which
    # nothing reads back, starts non-zero to check the accumulation).
    zeros = np.zeros((s.B, s.NH, s.T, s.T), np.float32)
    return dict(dinp=_normal(rng, s.B, s.T, 3 * s.C), dpreatt=zeros.copy(),
                datt=zeros.copy(), dout=_normal(rng, s.B, s.T, s.C),
                inp=_normal(rng, s.B, s.T, 3 * s.C), att=_att(rng, s), NH=s.NH)


def _make_gelu_forward(s, rng):
    return dict(inp=_normal(rng, s.B, s.T, 4 * s.C, scale=2.0))


def _make_gelu_backward(s, rng):
    return dict(dinp=_normal(rng, s.B, s.T, 4 * s.C), inp=_normal(rng, s.B, s.T, 4 * s.C, scale=2.0),
                dout=_normal(rng, s.B, s.T, 4 * s.C))


def _make_residual_forward(s, rng):
    return dict(inp1=_normal(rng, s.B, s.T, s.C), inp2=_normal(rng, s.B, s.T, s.C))


def _make_residual_backward(s, rng):
    return dict(dinp1=_normal(rng, s.B, s.T, s.C), dinp2=_normal(rng, s.B, s.T, s.C),
                dout=_normal(rng, s.B, s.T, s.C))


def _make_softmax_forward(s, rng):
    return dict(logits=_normal(rng, s.B, s.T, s.Vp, scale=3.0), V=s.V)


def _make_crossentropy_forward(s, rng):
    return dict(probs=_probs(rng, s), targets=_tokens(rng, s.V, s.B, s.T))


def _make_crossentropy_softmax_backward(s, rng):
    return dict(dlogits=_normal(rng, s.B, s.T, s.Vp), dlosses=_normal(rng, s.B, s.T, scale=0.1),
                probs=_probs(rng, s), targets=_tokens(rng, s.V, s.B, s.T), V=s.V)


def _make_adamw(s, rng):
    # gpt2_update runs over a whole model, so the C side needs a built-in config's
    # parameter count: the tiny preset's
    from pyref.config import PRESETS
    n = PRESETS["tiny"].num_parameters()
    return dict(param=_normal(rng, n, scale=0.05), grad=_normal(rng, n, scale=0.01),
                m=_normal(rng, n, scale=0.005), v=np.abs(_normal(rng, n, scale=1e-4)),
                # the C takes float hyperparameters: every side gets the float32 values
                lr=_f32(1e-3), beta1=_f32(0.9), beta2=_f32(0.999), eps=_f32(1e-8),
                weight_decay=_f32(0.1), t=3 + s.B)


def _f32(x: float) -> float:
    """``x`` as the C's float sees it (exactly representable in float64 too)."""
    return float(np.float32(x))


@dataclass(frozen=True)
class KernelCheck:
    """One row of the op table."""

    kernel: str
    make: Callable                              # (Shape, rng) -> named arguments
    reduction: dict[str, Callable]              # output -> (Shape -> reduction length n)
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shapes: tuple[str, ...] | None = None      # restrict to these shapes (None: all)

    @property
    def op(self) -> str:
        return KERNEL_OP[self.kernel]

    @property
    def outputs(self) -> tuple[str, ...]:
        return FORWARD_OUTPUTS.get(self.kernel) or INPLACE_ARGS[self.kernel]

    def mask(self, output: str, s: Shape):
        """Elements to compare: preatt's upper triangle is never written by the C."""
        if self.kernel == "attention_forward" and output == "preatt":
            return np.tril(np.ones((s.T, s.T), bool))
        return None


BTC = ("b", "t", "c")
BT = ("b", "t")
BHTT = ("b", "h", "t", "t2")
ROWC = ("row", "c")

KERNEL_CHECKS = (
    KernelCheck("encoder_forward", _make_encoder_forward, {"out": lambda s: 1}, {"out": BTC}),
    KernelCheck("encoder_backward", _make_encoder_backward,
                {"dwte": lambda s: s.B * s.T, "dwpe": lambda s: s.B},
                {"dwte": ("token", "c"), "dwpe": ("t", "c")}),
    KernelCheck("layernorm_forward", _make_layernorm_forward,
                {"out": lambda s: s.C, "mean": lambda s: s.C, "rstd": lambda s: s.C},
                {"out": BTC, "mean": BT, "rstd": BT}),
    KernelCheck("layernorm_backward", _make_layernorm_backward,
                {"dinp": lambda s: s.C, "dweight": lambda s: s.B * s.T, "dbias": lambda s: s.B * s.T},
                {"dinp": BTC, "dweight": ("c",), "dbias": ("c",)}),
    KernelCheck("matmul_forward", _make_matmul_forward, {"out": lambda s: s.C},
                {"out": ("b", "t", "oc")}),
    KernelCheck("matmul_backward", _make_matmul_backward,
                {"dinp": lambda s: s.OC, "dweight": lambda s: s.B * s.T, "dbias": lambda s: s.B * s.T},
                {"dinp": BTC, "dweight": ("oc", "c"), "dbias": ("oc",)}),
    KernelCheck("attention_forward", _make_attention_forward,
                {"out": lambda s: s.T + s.hs, "preatt": lambda s: s.hs, "att": lambda s: s.T + s.hs},
                {"out": BTC, "preatt": BHTT, "att": BHTT}),
    KernelCheck("attention_backward", _make_attention_backward,
                {"dinp": lambda s: s.B * s.T + s.hs, "dpreatt": lambda s: s.T + s.hs,
                 "datt": lambda s: s.hs},
                {"dinp": ("b", "t", "c3"), "dpreatt": BHTT, "datt": BHTT}),
    KernelCheck("gelu_forward", _make_gelu_forward, {"out": lambda s: 1}, {"out": BTC}),
    KernelCheck("gelu_backward", _make_gelu_backward, {"dinp": lambda s: 1}, {"dinp": BTC}),
    KernelCheck("residual_forward", _make_residual_forward, {"out": lambda s: 1}, {"out": BTC}),
    KernelCheck("residual_backward", _make_residual_backward,
                {"dinp1": lambda s: 1, "dinp2": lambda s: 1}, {"dinp1": BTC, "dinp2": BTC}),
    KernelCheck("softmax_forward", _make_softmax_forward, {"probs": lambda s: s.V},
                {"probs": ("b", "t", "v")}),
    KernelCheck("crossentropy_forward", _make_crossentropy_forward, {"losses": lambda s: 1},
                {"losses": BT}),
    KernelCheck("crossentropy_softmax_backward", _make_crossentropy_softmax_backward,
                {"dlogits": lambda s: 1}, {"dlogits": ("b", "t", "v")}),
    KernelCheck("adamw", _make_adamw, {"param": lambda s: 1, "m": lambda s: 1, "v": lambda s: 1},
                {"param": ("i",), "m": ("i",), "v": ("i",)}, shapes=("base", "odd")),
)
CHECK_BY_KERNEL = {k.kernel: k for k in KERNEL_CHECKS}


def cases():
    """Every (KernelCheck, Shape) pair of the table."""
    for check in KERNEL_CHECKS:
        for s in SHAPES:
            if check.shapes is None or s.name in check.shapes:
                yield check, s


def make_inputs(check: KernelCheck, s: Shape, seed: int = 0) -> dict:
    """The case's float32 / int32 inputs, the same for every implementation."""
    rng = np.random.default_rng([seed, SHAPES.index(s), KERNEL_CHECKS.index(check)])
    return check.make(s, rng)


def run_kernel(kernels, kernel: str, args: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """Call ``kernels.<kernel>`` on private copies of ``args`` (float arrays cast to
    ``dtype``), and return its outputs by name: a forward's returned arrays, a backward's
    accumulated buffers."""
    local = {k: (v.astype(dtype, copy=True) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                 else v) for k, v in args.items()}
    fn = getattr(kernels, kernel)
    ret = fn(*[local[name] for name in SIGNATURES[kernel]])
    if kernel in FORWARD_OUTPUTS:
        names = FORWARD_OUTPUTS[kernel]
        ret = ret if isinstance(ret, (tuple, list)) else (ret,)
        if len(ret) != len(names):
            raise ValueError(f"{kernel} returned {len(ret)} outputs, the protocol says {len(names)}")
        return {n: np.asarray(r) for n, r in zip(names, ret)}
    return {n: local[n] for n in INPLACE_ARGS[kernel] if local.get(n) is not None}


def reduction_length(check: KernelCheck, output: str, s: Shape) -> int:
    return max(1, int(check.reduction[output](s)))


def growth(n: int) -> float:
    """How float32 rounding error of a length-n recurrence grows, in units of eps:
    sqrt(n) (a random walk of roundings), the statistical rate that sequential and
    reordered (-Ofast, SIMD) sums alike stay within."""
    return sqrt(n)
