"""any op: dropout left on (training mode) after it (in a residual sum: on its branch); a constant factor or offset on one output,
when no change of the op's own families explains it."""
from __future__ import annotations

import math

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import BACKWARD_KERNELS, FORWARD_KERNELS, SIGNATURES, run_kernel

from ..engine import Fit, Variant, const_text


def _scaled_output(kernel, args, ctx, value):
    name = ctx["output"]
    start = args.get(name) if kernel in BACKWARD_KERNELS else None
    out = run_kernel(numpy_kernels, kernel, args, np.float64)
    if name not in out:
        return None
    if start is not None:
        out[name] = start + value * (out[name] - start)
    else:
        out[name] = value * out[name]
    return out


def _offset_output(kernel, args, ctx, value):
    name = ctx["output"]
    out = run_kernel(numpy_kernels, kernel, args, np.float64)
    if name not in out:
        return None
    out[name] = out[name] + value
    return out


def _factor_name(kernel, args, value, ctx):
    return (None, value, "") if abs(value - 1.0) < 1e-12 else ("output.scale", value, "")


def _offset_name(kernel, args, value, ctx):
    return (None, value, "") if value == 0.0 else ("output.offset", value, "")


_ANY_OP = tuple(k for k in SIGNATURES if k != "adamw")


def _dropped(kernel, args, ctx):
    """(the C's output, where the judged output is zero and the C's is not, where the C's
    is of the output's usual size) of a forward op: an element a float32 port underflows
    to zero is no evidence of a dropout, though it is zero."""
    out = run_kernel(numpy_kernels, kernel, args, np.float64)
    name = ctx["output"]
    if name not in out:
        return None, None, None
    if kernel == "residual_forward":
        return (out, *_branch_dropped(args, ctx["actual"]))
    c = np.abs(out[name])
    size = np.median(c[c > 0]) if np.any(c > 0) else 0.0
    return out, (np.asarray(ctx["actual"]) == 0) & (c != 0), c > 1e-3 * size


def _branch_dropped(args, actual):
    """(where a residual sum's branch inp2 was dropped, where the branch shows in the sum) of
    a dropout on the branch, x + dropout(f(x)): a dropped element leaves the stream inp1
    itself in the sum (no zero appears); the branch shows where it is of its usual size and
    changes inp1 in float32."""
    x, b = args["inp1"], args["inp2"]
    size = np.abs(b)
    typical = np.median(size[size > 0]) if np.any(size > 0) else 0.0
    shows = (size > 1e-3 * typical) & (size > 2.0 ** -20 * np.abs(x))
    return (np.asarray(actual, np.float64) == x) & shows, shows


def _dropout(kernel, args, ctx, value):
    """Dropout after the op, left on: the elements it dropped zero (those the judged output
    has zero where the C's is not), the rest scaled by ``value`` = 1/(1 - p); after a
    residual sum's branch (residual_forward's inp2): the sum inp1 there, inp1 + value * inp2
    elsewhere."""
    out, dropped, _ = _dropped(kernel, args, ctx)
    if out is None or not dropped.any():
        return None
    name = ctx["output"]
    if kernel == "residual_forward":
        out[name] = args["inp1"] + np.where(dropped, 0.0, value * args["inp2"])
        return out
    out[name] = np.where(dropped, 0.0, value * out[name])
    return out


def _dropout_name(kernel, args, value, ctx):
    """p = 1 - 1/value, named where it is a dropout's (at least 0.01) and the share of
    elements dropped agrees with it (within five standard deviations of a binomial count:
    dropout's own randomness)."""
    out, dropped, usual = _dropped(kernel, args, ctx)
    if out is None or value <= 1.0:
        return None, value, ""
    p = 1.0 - 1.0 / value
    n = int(usual.sum())
    if n == 0 or p < 0.01 or abs((dropped & usual).sum() - p * n) > 5 * math.sqrt(n * p * (1 - p)) + 1:
        return None, value, ""
    near = round(p, 2)
    return "output.dropout", value, f"p = {const_text(near if abs(near - p) < 0.02 else p)}"


VARIANTS: tuple[Variant, ...] = (
    Variant("output.dropout", "output", FORWARD_KERNELS,
            "dropout left on after the op ({note}: {output} zero at the elements dropped, the rest scaled by "
            "1/(1-p) = {value}; in a residual sum, of its branch): the model in training mode, or a dropout with "
            "no train/eval switch",
            _dropout, fit=Fit(1.0, 1e3, linear=True), name=_dropout_name, fallback=1),
    Variant("output.scale", "output", _ANY_OP, "{output} off by a constant factor {value}", _scaled_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_factor_name, fallback=2),
    Variant("output.offset", "output", _ANY_OP, "{output} off by a constant offset {value}", _offset_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_offset_name, fallback=2),
)
