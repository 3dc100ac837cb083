"""The precision an op ran in, as the tolerance formulas read it: :class:`Precision`.

The per-op bounds of :mod:`.tolerances` are multiples of float32's unit roundoff ``u``
scaled by ``sqrt(n)``, the random walk of a chain of ``n`` float32 roundings. An op of a
mixed-precision port rounds more coarsely in up to three places, each a relative error of
its own unit roundoff (half an ulp at 1.0):

* its **inputs**, rounded to the precision it computes in (autocast casts a matmul's
  float32 operands to bf16; a parameter held in bf16 is the C's float32 one rounded;
  TF32 rounds a float32 matmul's operands to 10 mantissa bits): each term ``a_k w_k`` of
  the op's sum is off by up to ``u_in`` per rounded factor, i.e. relative to the size of
  the terms (:mod:`pyref.terms`) -- the scale the bounds already use;
* its **accumulation** (float32 on the CPU for bf16 and fp16 matmuls, reductions and
  norms: ``u_acc = u``, over the chain of ``n``);
* its **output**, rounded to the dtype it is stored in (a bf16 matmul's result): a
  relative error of ``u_out`` of the value, at most its size.

Independent rounding errors add in quadrature, so one element's error has the scale
``sqrt(u_acc^2 n + 2 u_in^2 + u_out^2)`` (:meth:`Precision.unit`), which is ``u sqrt(n)``
exactly for a float32 op; the formulas are otherwise unchanged (the row's ``sigma`` and
``k_norm``, the extreme-value and norm factors), so the false-alarm probability of each
bound is the same statement at any precision. The bias test's minimum effect (a constant
rounded differently, a libm's lean) is in units of the op's coarsest unit.

Units: float32 2^-24; TF32 2^-11 (10 stored mantissa bits); fp16 2^-11; bf16 2^-8.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import sqrt

import numpy as np

from pyref.constants import U

UNITS = {"float32": U, "tf32": 2.0 ** -11, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SHORT = {"float32": "float32", "tf32": "tf32", "float16": "fp16", "bfloat16": "bf16"}
# the smallest normal number of each dtype: below it a rounding's error is absolute
# (tf32 and bf16 have float32's exponent)
SMALLEST_NORMAL = {"float32": 2.0 ** -126, "tf32": 2.0 ** -126, "bfloat16": 2.0 ** -126, "float16": 2.0 ** -14}
# rounded factors per term of an op's sum (a product of two rounded operands; an
# element-wise op's one input and one parameter): the most any op of the graph has
ROUNDED_FACTORS = 2


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` -> ``"bfloat16"`` (the key of UNITS)."""
    name = str(dtype).removeprefix("torch.")
    name = {v: k for k, v in SHORT.items()}.get(name, name)
    name = {"half": "float16", "float": "float32"}.get(name, name)
    if name not in UNITS:
        raise ValueError(f"no unit roundoff known for {dtype!r} (known: {', '.join(SHORT.values())})")
    return name


def coarser(a: str, b: str) -> str:
    """The dtype of the two with the larger unit roundoff (fp16 before tf32 at a tie)."""
    return max((a, b), key=lambda d: (UNITS[d], d == "float16"))


@dataclass(frozen=True)
class Precision:
    """How one op ran: the dtype it computed in (its operands after any cast), whether its
    inputs as the checks see them were rounded to that dtype inside it, the dtype it
    accumulated in and the dtype its result was stored in."""

    compute: str = "float32"
    output: str = "float32"
    rounds_inputs: bool = False
    accumulate: str = "float32"

    @property
    def u_in(self) -> float:
        return UNITS[self.compute] if self.rounds_inputs else 0.0

    @property
    def u_out(self) -> float:
        return UNITS[self.output] if self.output != "float32" else 0.0

    @property
    def u_acc(self) -> float:
        return UNITS[self.accumulate]

    @property
    def is_float32(self) -> bool:
        """The C's precision: the float32 bounds apply unchanged."""
        return self.u_in == 0.0 and self.u_out == 0.0 and self.accumulate == "float32"

    def unit(self, n: int, inputs: bool = True) -> float:
        """The scale of one element's error relative to its size, for a chain of ``n``:
        ``sqrt(u_acc^2 n + 2 u_in^2 + u_out^2)`` (``u sqrt(n)`` at float32); without the
        inputs' rounding (``inputs=False``: the witness rounds them exactly)."""
        u_in = self.u_in if inputs else 0.0
        return sqrt(self.u_acc ** 2 * max(1, n) + ROUNDED_FACTORS * u_in ** 2 + self.u_out ** 2)

    @property
    def lean(self) -> float:
        """The unit of the bias test's minimum effect: the coarsest rounding the op does."""
        return max(self.u_acc, self.u_in, self.u_out)

    @property
    def floor(self) -> float:
        """The underflow floor: the smallest normal of the coarsest dtype it rounds to."""
        used = [self.accumulate] + ([self.compute] if self.rounds_inputs else []) + [self.output]
        return max(SMALLEST_NORMAL[d] for d in used)

    @property
    def label(self) -> str:
        """The coarsest precision the op rounds at: ``bf16``, ``fp16``, ``tf32``, ``float32``."""
        if self.is_float32:
            return "float32"
        used = [self.output, self.accumulate] + ([self.compute] if self.rounds_inputs else [])
        d = used[0]
        for x in used[1:]:
            d = coarser(d, x)
        return SHORT[d]

    @property
    def detail(self) -> str:
        """``bf16 compute (inputs rounded to it), bf16 out, float32 accumulation``."""
        return (f"{SHORT[self.compute]} compute{' (inputs rounded to it)' if self.rounds_inputs else ''}, "
                f"{SHORT[self.output]} out, {SHORT[self.accumulate]} accumulation")

    def joined(self, other: "Precision") -> "Precision":
        """The coarser of two ops' precisions, field by field (what a witness noising a
        kernel called at both must assume)."""
        return Precision(coarser(self.compute, other.compute), coarser(self.output, other.output),
                         self.rounds_inputs or other.rounds_inputs, coarser(self.accumulate, other.accumulate))


FLOAT32 = Precision()


# low-order bits of a float32 a dtype with float32's exponent drops
_DROPPED = {"bfloat16": 16, "tf32": 13}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` (nearest, ties to even, as torch's casts and the
    hardware round), as float32: what a port computing at ``dtype`` reads for ``x``."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    k = _DROPPED[dtype]
    bits = x.view(np.uint32).astype(np.uint64)
    half = np.uint64(1 << (k - 1))
    odd = (bits >> np.uint64(k)) & np.uint64(1)
    rounded = ((bits + half - np.uint64(1) + odd) >> np.uint64(k)) << np.uint64(k)
    finite = np.isfinite(x)
    out = np.where(finite, rounded, bits).astype(np.uint32).view(np.float32)
    return out.reshape(x.shape)
