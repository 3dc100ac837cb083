"""precision: an op a float32 port computed in bfloat16 or float16 (a cast of its own: q, k, v
cast for the attention, a half-precision layer norm), or the attention's softmax alone in half
precision (its weights rounded; the output, a float32 sum, shows it at float32's tolerance). Its output carries the sign: every
element is exact in that dtype (the result was rounded to it, then cast back to float32). The
op is then re-run on its inputs rounded to that dtype, its output rounded too, and judged at
that dtype's tolerance (:func:`harness.arbiter.tolerances.op_tolerance` at a
:class:`~harness.arbiter.precision.Precision` of it): a cast explains the output where it
stays within what that precision allows of train_gpt2.c's semantics."""
from __future__ import annotations

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import FORWARD_KERNELS, run_kernel
from pyref.spec import SPEC

from ...arbiter.precision import Precision
from ...arbiter.tolerances import op_tolerance
from ..engine import Variant

# a dtype, and how to tell a float32 array holds only its values
_DTYPES = ("bfloat16", "float16")


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 ``x`` rounded to ``dtype`` (nearest, ties to even), as float64."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return b.view(np.float32).astype(np.float64)


def held_in(actual) -> str | None:
    """The half-precision dtype every finite element of ``actual`` is exact in (its output
    rounded to it), or None: bfloat16 (its low 16 bits zero) before float16 (a float16 value
    has at most 10 mantissa bits; a bfloat16 one, 7, is most often one too)."""
    a = np.asarray(actual, np.float32)
    a = a[np.isfinite(a)]
    if a.size < 16 or not np.any(a):
        return None
    if not np.any(a.view(np.uint32) & 0xFFFF):
        return "bfloat16"
    with np.errstate(over="ignore"):
        if np.array_equal(a.astype(np.float16).astype(np.float32), a):
            return "float16"
    return None


def _at(dtype: str) -> Precision:
    return Precision(compute=dtype, output=dtype, rounds_inputs=True, accumulate="float32")


def _judged_at(dtype: str):
    def judged_at(kernel, output, args, actual, tol):
        if held_in(actual) != dtype:
            return None
        at = op_tolerance(kernel, output, SPEC[kernel].n(output, args), np.size(actual), _at(dtype))
        # a check already judging at this precision (a declared mixed-precision run) failed
        # at it: the precision is not what is wrong
        return None if tol.norm >= 0.5 * at.norm else at
    return judged_at


def _in(dtype: str):
    def run(kernel, args, ctx, value):
        """The op on its inputs rounded to ``dtype``, its outputs rounded to it."""
        ins = {k: (_rounded(x, dtype) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x)
               for k, x in args.items()}
        out = run_kernel(numpy_kernels, kernel, ins, np.float64)
        return {k: _rounded(x, dtype) for k, x in out.items()}
    return run


def _softmax_in(dtype: str):
    def run(kernel, args, ctx, value):
        """The attention with its weights (the softmax's output) rounded to ``dtype``, the
        rest as the C: a softmax taken in half precision (F.softmax(..., dtype=torch.float16),
        or the scores cast before it) and cast back for the weighted sum."""
        if ctx["output"] != "out" or held_in(ctx["actual"]) is not None:
            return None       # (an output itself half: precision.<dtype>'s)
        inp, NH = args["inp"], int(args["NH"])
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
        mask = np.tril(np.ones((T, T), bool))
        s = np.where(mask, (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(hs), -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        att = _rounded(e / e.sum(-1, keepdims=True), dtype)
        return {"out": (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)}
    return run


VARIANTS: tuple[Variant, ...] = (
    *(Variant(f"precision.softmax-{dtype}", "precision", ("attention_forward",),
              f"the attention's softmax taken in {dtype} (its weights rounded to {dtype}, the rest in float32)",
              _softmax_in(dtype), fallback=1) for dtype in _DTYPES),
) + tuple(
    Variant(f"precision.{dtype}", "precision", FORWARD_KERNELS,
            f"the op computed in {dtype} in a float32 run (its {{output}} exact in {dtype}: a cast of the port's own, "
            f"no mixed precision declared); within {dtype}'s tolerance of train_gpt2.c's semantics",
            _in(dtype), judged_at=_judged_at(dtype), fallback=1)
    for dtype in _DTYPES)
