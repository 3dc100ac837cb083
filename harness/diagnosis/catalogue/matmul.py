"""matmul and the backward's accumulation: the bias left out, a gradient assigned instead of
accumulated, a sum's += turned into =, a weight's gradient left out (the weight detached or
frozen where a matmul uses it: a tied head's, so that wte's gradient is the encoder's alone)."""
from __future__ import annotations

import numpy as np

from pyref.protocol import BACKWARD_KERNELS

from ..engine import Variant
from ._common import _oracle


def _matmul_no_bias(kernel, args, ctx, value):
    key = "bias" if kernel == "matmul_forward" else "dbias"
    if args.get(key) is None:
        return None
    if kernel == "matmul_forward":
        return _oracle(kernel, args, bias=None)
    out = _oracle(kernel, args, dbias=None)
    out["dbias"] = args["dbias"]       # left as it was
    return out


def _overwrite(kernel, args, ctx, value):
    """The judged gradient buffer assigned (=) instead of accumulated (+=)."""
    name = ctx["output"]
    if args.get(name) is None or not np.any(args[name]):
        return None      # a zero buffer: = and += agree
    return _oracle(kernel, args, **{name: np.zeros_like(args[name])})


def _no_weight_gradient(kernel, args, ctx, value):
    """matmul's dweight not accumulated: the weight detached (or frozen) where this matmul
    uses it. Of the tied wte's chain (the lm head's matmul_backward, then the encoder's), the
    encoder's part alone: numerically backward.overwrite of the encoder's dwte, tried first
    (the head is the chain's first call), since autograd accumulates and a port detaches."""
    if ctx["output"] != "dweight" or args.get("dweight") is None:
        return None
    out = _oracle(kernel, args)
    out["dweight"] = args["dweight"]       # left as it was
    return out


def _rows(a):
    """(..., n) -> (rows, n): the (b,t) positions in the C's loop order."""
    return a.reshape(-1, a.shape[-1])


def _ln_norm_last(a):
    inp, mean, rstd = _rows(a["inp"])[-1], a["mean"].reshape(-1)[-1], a["rstd"].reshape(-1)[-1]
    return (inp - mean) * rstd


def _encoder_dwte_last(a):
    """dwte[ix] = d: each token row keeps the gradient of its last occurrence; rows of
    tokens not in the batch keep their value."""
    ids = a["inp"].reshape(-1)
    dout = _rows(a["dout"])
    out = a["dwte"].copy()
    uids, first_rev = np.unique(ids[::-1], return_index=True)
    out[uids] = dout[ids.size - 1 - first_rev]
    return out


def _encoder_dwpe_last(a):
    out = a["dwpe"].copy()
    T = a["dout"].shape[1]
    out[:T] = a["dout"][-1]          # the last b writes each position
    return out


# (kernel, gradient) -> its value when the += of the C's innermost reduction is an =
# (the last term of the loop the C runs in order is all that is left)
_LAST_TERM = {
    ("layernorm_backward", "dbias"): lambda a: _rows(a["dout"])[-1],
    ("layernorm_backward", "dweight"): lambda a: _ln_norm_last(a) * _rows(a["dout"])[-1],
    ("matmul_backward", "dbias"): lambda a: _rows(a["dout"])[-1],
    ("matmul_backward", "dweight"): lambda a: np.outer(_rows(a["dout"])[-1], _rows(a["inp"])[-1]),
    ("matmul_backward", "dinp"): lambda a: (a["dout"][..., -1:] * a["weight"][-1]),
    ("encoder_backward", "dwte"): _encoder_dwte_last,
    ("encoder_backward", "dwpe"): _encoder_dwpe_last,
}


def _last_term(kernel, args, ctx, value):
    """A sum's ``+=`` turned into ``=``: only the last term of the C's loop is kept."""
    f = _LAST_TERM.get((kernel, ctx["output"]))
    if f is None or args.get(ctx["output"]) is None:
        return None
    out = _oracle(kernel, args)
    out[ctx["output"]] = f(args)
    return out


VARIANTS: tuple[Variant, ...] = (
    Variant("matmul.no-bias", "matmul", ("matmul_forward", "matmul_backward"),
            "matmul without its bias (forward: not added; backward: dbias not accumulated)", _matmul_no_bias),
    Variant("backward.weight-without-gradient", "backward", ("matmul_backward",),
            "the weight's gradient left out of dweight (the weight detached, or frozen, where this matmul uses "
            "it: a tied head's, so that wte's gradient is the encoder's alone)", _no_weight_gradient),
    Variant("backward.overwrite", "backward", BACKWARD_KERNELS,
            "the gradient is assigned (=) instead of accumulated (+=)", _overwrite),
    Variant("backward.last-term-only", "backward", tuple(dict.fromkeys(k for k, _ in _LAST_TERM)),
            "a sum's += turned into = inside its loop: only the last term is kept", _last_term),
)
