"""any op: a constant factor or offset on one output, when no change of the op's own families
explains it."""
from __future__ import annotations

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import BACKWARD_KERNELS, SIGNATURES, run_kernel

from ..engine import Fit, Variant


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


VARIANTS: tuple[Variant, ...] = (
    Variant("output.scale", "output", _ANY_OP, "{output} off by a constant factor {value}", _scaled_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_factor_name, fallback=2),
    Variant("output.offset", "output", _ANY_OP, "{output} off by a constant offset {value}", _offset_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_offset_name, fallback=2),
)
