"""Compare an array from the C library with a reference array, in the style of
``torch.testing.assert_close`` but with the metrics a C-parity harness needs.

``actual`` is usually a float32, zero-copy NumPy view of the C library's memory (possibly
non-contiguous, e.g. ``logits[..., :V]``); ``expected`` is usually a float64 "oracle"
computed from the same inputs. :func:`compare` never writes to either array and never makes
a full-size copy of them: large arrays are processed in blocks along the leading axes, with
scratch buffers allocated once per call and reused, so the extra memory stays bounded
(at most ``CHUNK_ELEMS * 75`` bytes, ~5 MB) even for the 124M-element tensors of GPT-2 124M.

Metrics, over the *compared* elements (all of them, or those where ``mask`` is True):

``max_abs``
    ``max |a - e|``. Easy to read, but meaningless without knowing the magnitudes.
``max_rel``
    ``max |a - e| / (|e| + scale)``. Element-wise error relative to the expected value,
    with ``scale`` (default: the RMS of the expected values) added to the denominator so
    that elements whose expected value is near zero do not blow up (a plain ``|a-e|/|e|``
    is infinite at a zero), while elements of typical size are still judged relatively.
``max_ulp``
    Largest distance in float32 units-in-the-last-place between ``a`` and ``e`` rounded to
    float32, counted on the monotone integer mapping of float32 bit patterns (``+0`` and
    ``-0`` are 0 apart; adjacent floats are 1 apart, across zero too). This is the natural
    unit for bit-level parity of two float32 computations: 0 means bit-identical.
``norm_rel``
    ``||a - e||_2 / ||e||_2``: the norm-wise relative error, i.e. how large the error is
    as a whole compared with the tensor. It catches a small *systematic* error (every
    element off by 1e-5) that an element-wise bound loose enough for rounding noise misses.
``n_nonfinite_mismatch``
    Elements where exactly one side is NaN, or one is infinite and the other is not, or
    the infinities have different signs (and NaN vs NaN when ``nan_equal`` is False).
    Pairs with a NaN or an inf are left out of ``max_abs``/``max_rel``/``max_ulp``/
    ``norm_rel`` (so those stay finite, bar ``norm_rel = inf`` for an all-zero reference)
    and are reported through this count instead.
``n_bad``
    Elements that fail: ``rel > tol.rel``, or ``ulp > tol.ulp`` when ``tol.ulp`` is set,
    or a non-finite mismatch.
``bias``, ``bias_z``
    The mean of the signed errors (:mod:`harness.arbiter.stats`): the constant factor ``1 + bias``
    (``bias_form`` "scale") or the constant offset, in units of the elements' size
    ("shift"), that explains their mean, whichever is the more significant, and its
    z-score against a standard error estimated from contiguous groups of whole rows (runs
    of ``unit`` elements). Rounding to nearest, FMA contraction and reordered sums average
    to zero; a changed constant or a scale slipped into an expression does not: a shift of
    a few ulps in every element is far below ``tol.rel`` and ``tol.norm`` and still many
    standard errors from zero. ``bias_stats`` holds both forms.

A comparison *passes* when ``n_bad == 0``, ``norm_rel <= tol.norm`` (a NaN norm fails) and
neither form of the bias lies beyond ``tol.bias`` by more than Student's t quantile at
``tol.bias_p`` standard errors.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import metrics
from .fused import expected_scale as fused_scale
from .fused import tally as fused_tally
from .metrics import CHUNK_ELEMS, ulp_key
from .stats import Bias, bias_of, group_bounds

__all__ = [
    "Tolerance", "Comparison", "Bias", "ParityError",
    "compare", "assert_parity", "ulp_distance", "json_float", "CHUNK_ELEMS",
]

# --------------------------------------------------------------------------- tolerance
@dataclass(frozen=True)
class Tolerance:
    """What "close enough" means for one comparison.

    rel:  largest allowed element-wise error ``|a-e| / (|e| + scale)``.
    norm: largest allowed norm-wise error ``||a-e||_2 / ||e||_2``.
    ulp:  largest allowed float32 ulp distance per element; ``None`` = not checked.
    why:  the reason for these numbers (shown in failure messages), e.g.
          "float32 accumulation over C=768 terms vs float64 oracle".
    floor: the smallest size an element is judged against, added to every element's
          size in both metrics (``|a-e| / (|e| + scale + floor)``, ``||a-e|| / |||e| +
          floor||``): an absolute error of ``rel * floor`` is always allowed. The policy
          sets it to the smallest normal float32 (the underflow floor); 0 by default.
    bias: the minimum effect of the bias test: the largest mean signed error (either form
          of ``Comparison.bias``, relative) a correct implementation may show (its own
          constants' roundings, its libm's). A comparison fails on bias when the bias lies
          beyond it by more than ``t`` standard errors, t Student's quantile at ``bias_p``.
          ``inf`` (the default): the bias is measured and reported, not judged.
    bias_size: a minimum effect relative to the elements' sizes instead of their values
          (the mean of ``(a-e)/(|e| + scale + elem_scale)``), for an output whose
          legitimate lean scales a term of it rather than its value (AdamW's float32 bias
          corrections scale the update, not the parameter): the test's minimum effect is
          the larger of ``bias`` and ``bias_size / share`` (:class:`harness.arbiter.stats.Bias`); 0
          by default.
    bias_p: the probability that the bias test fails an implementation whose bias is
          within ``bias`` (the two forms together).

    ``float('inf')`` disables a bound; ``Tolerance.exact()`` demands bit-identical floats.
    """

    rel: float
    norm: float
    ulp: int | None = None
    why: str = ""
    floor: float = 0.0
    bias: float = math.inf
    bias_p: float = 1e-9
    bias_size: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.bias_p, bool) or not isinstance(self.bias_p, (int, float, np.number)) \
                or not 0.0 < float(self.bias_p) < 1.0:
            raise ValueError(f"Tolerance.bias_p must be a probability in (0, 1), got {self.bias_p!r}")
        object.__setattr__(self, "bias_p", float(self.bias_p))
        for fname in ("rel", "norm", "floor", "bias", "bias_size"):
            value = getattr(self, fname)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"Tolerance.{fname} must be a number, got {value!r}")
            value = float(value)
            if not value >= 0.0:    # also rejects NaN
                raise ValueError(f"Tolerance.{fname} must be >= 0, got {value!r}")
            object.__setattr__(self, fname, value)
        if self.ulp is not None:
            if isinstance(self.ulp, (bool, np.bool_)) or not isinstance(self.ulp, (int, np.integer)):
                raise TypeError(f"Tolerance.ulp must be an int or None, got {self.ulp!r}")
            if self.ulp < 0:
                raise ValueError(f"Tolerance.ulp must be >= 0, got {self.ulp!r}")
            object.__setattr__(self, "ulp", int(self.ulp))
        if not isinstance(self.why, str):
            raise TypeError(f"Tolerance.why must be a str, got {self.why!r}")

    @classmethod
    def exact(cls, why: str = "bit-identical: same arithmetic in the same order") -> "Tolerance":
        """Zero tolerance everywhere: every element must be equal (ulp distance 0)."""
        return cls(rel=0.0, norm=0.0, ulp=0, why=why, bias=0.0)

    def bounds(self) -> str:
        """The numbers alone, e.g. ``rel <= 1e-06, norm <= 1e-07, ulp <= 4, bias <= 1.2e-07``."""
        text = f"rel <= {_num(self.rel)}, norm <= {_num(self.norm)}"
        text += f", ulp <= {self.ulp}" if self.ulp is not None else ""
        text += f", bias <= {_num(self.bias)} + t SE" if math.isfinite(self.bias) else ""
        return text + (f", sizes floored at {_num(self.floor)}" if self.floor else "")

    def __str__(self) -> str:
        return self.bounds() + (f" ({self.why})" if self.why else "")


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: metrics over the compared elements and the worst one.

    Fields (see the module docstring for what each metric means and why):

    name, shape, tol            what was compared and against which tolerance
    actual_dtype, expected_dtype
    passed                      ``n_bad == 0 and norm_rel <= tol.norm``
    n_total                     elements in the tensor
    n_compared                  elements compared (True in the mask; all without one)
    n_bad                       elements failing rel / ulp, plus non-finite mismatches
    n_nonfinite_mismatch        NaN vs number, inf vs finite, +inf vs -inf
    max_abs, max_rel, max_ulp, norm_rel
                                over the compared pairs where both values are finite;
                                ``norm_rel`` is 0 when both norms are 0 and ``inf`` when
                                only ``||e||`` is (an all-zero reference, nonzero actual)
    scale                       the ``scale`` used in the denominator of ``rel``
    worst_index                 multi-index (in the full tensor) of the worst element: the
                                first non-finite mismatch if any, else the largest rel;
                                ``None`` when nothing was compared
    worst_label                 that index with axis names, e.g. ``layer=3 b=1 t=17 c=402``
    worst_actual, worst_expected, worst_abs, worst_rel, worst_ulp
                                the two values there and their differences (``worst_ulp`` is
                                ``None`` where a value is NaN)
    bias_stats                  the mean signed error in both forms, with standard errors
                                (:class:`harness.arbiter.stats.Bias`; None when nothing was compared
                                or every expected value is 0): what the diagnosis reads as a
                                fitted constant factor (``1 + bias_stats.scale``)
    bias, bias_z, bias_form     the more significant form of it (properties)
    diagnosis                   why it failed: None here (not a field); a diagnosed failure
                                (:class:`harness.diagnosis.DiagnosedComparison`) carries one
    """

    diagnosis = None

    name: str
    shape: tuple[int, ...]
    tol: Tolerance
    actual_dtype: str
    expected_dtype: str
    passed: bool
    n_total: int
    n_compared: int
    n_bad: int
    n_nonfinite_mismatch: int
    max_abs: float
    max_rel: float
    max_ulp: int
    norm_rel: float
    scale: float
    worst_index: tuple[int, ...] | None
    worst_label: str
    worst_actual: float | None
    worst_expected: float | None
    worst_abs: float | None
    worst_rel: float | None
    worst_ulp: int | None
    bias_stats: Bias | None = None

    @property
    def bias(self) -> float | None:
        """The mean signed error, relative (the more significant form: ``bias_form``)."""
        return None if self.bias_stats is None else self.bias_stats.value

    @property
    def bias_form(self) -> str | None:
        """``scale`` (a constant factor ``1 + bias``) or ``shift`` (an offset)."""
        return None if self.bias_stats is None else self.bias_stats.form

    @property
    def bias_z(self) -> float | None:
        """``bias`` over its standard error; None without one (fewer than two groups)."""
        b = self.bias_stats
        return None if b is None else b.z(b.form)

    @property
    def bias_used(self) -> float:
        """The fraction of the bias bound used, > 1 exactly when the bias test fails: the
        largest over the two forms of |bias| / (tol.bias + t SE); 0 where the bias is not
        judged (``tol.bias`` inf, fewer than two groups)."""
        return bias_used(self.bias_stats, self.tol)

    @property
    def used(self) -> float:
        """The fraction of its tolerance used, > 1 exactly when a bound is exceeded: the largest
        of max_rel/tol.rel, norm_rel/tol.norm, (where checked) max_ulp/tol.ulp and the bias's
        (:attr:`bias_used`); inf for a non-finite mismatch, a NaN norm or an error against a
        zero bound."""
        if self.n_nonfinite_mismatch or math.isnan(self.norm_rel):
            return math.inf
        bounds = [(self.max_rel, self.tol.rel), (self.norm_rel, self.tol.norm)]
        bounds += [] if self.tol.ulp is None else [(float(self.max_ulp), float(self.tol.ulp))]
        return max(self.bias_used,
                   *(err / tol if tol > 0 else (math.inf if err > 0 else 0.0) for err, tol in bounds))

    def failed_checks(self) -> list[str]:
        """Which criteria failed: any of ``rel``, ``ulp``, ``norm``, ``nonfinite``."""
        out = []
        if self.max_rel > self.tol.rel:
            out.append("rel")
        if self.tol.ulp is not None and self.max_ulp > self.tol.ulp:
            out.append("ulp")
        if not self.norm_rel <= self.tol.norm:
            out.append("norm")
        if self.n_nonfinite_mismatch:
            out.append("nonfinite")
        if self.bias_used > 1.0:
            out.append("bias")
        return out

    def bias_text(self) -> str:
        """The bias in a few words: ``scale +4.8e-07 (z 35, 64 groups; allowed 1.2e-07 + 7.3 SE)``."""
        b = self.bias_stats
        if b is None:
            return "n/a"
        z = self.bias_z
        ztext = f"no SE: {b.groups} group{'s' * (b.groups != 1)} alike" if z is None else \
            f"z {_num(z)}, {b.groups} groups"
        text = f"{b.form} {b.value:+.2g} ({ztext}"
        if math.isfinite(self.tol.bias) and z is not None:
            text += f"; allowed {_num(bias_minimum(b, self.tol))} + {b.t:.2g} SE"
        return text + ")"

    def message(self) -> str:
        """A multi-line, human-readable report (the text of :class:`ParityError`)."""
        failed = set(self.failed_checks())
        flag = lambda key: "   <-- exceeded" if key in failed else ""   # noqa: E731
        head = (f"Tensor {self.name!r} is close to the reference." if self.passed
                else f"Tensor {self.name!r} is not close to the reference!")
        masked = self.n_total - self.n_compared
        lines = [
            head,
            f"  shape {self.shape}, {self.actual_dtype} (actual) vs {self.expected_dtype} "
            f"(expected); {self.n_compared} of {self.n_total} elements compared"
            + (f" ({masked} masked out)" if masked else ""),
            f"Mismatched elements: {self.n_bad} / {self.n_compared} ({_pct(self.n_bad, self.n_compared)})",
        ]
        if self.worst_index is not None:
            lines += [
                f"Worst element at {self.worst_label} (index {self.worst_index}):",
                f"  actual   = {_value(self.worst_actual, self.actual_dtype)}",
                f"  expected = {_value(self.worst_expected, self.expected_dtype)}",
                f"  abs diff = {_num(self.worst_abs)}, rel diff = {_num(self.worst_rel)}"
                f" (scale {_num(self.scale)}), ulp diff = "
                + ("n/a" if self.worst_ulp is None else str(self.worst_ulp)),
            ]
        ulp_allowed = "not checked" if self.tol.ulp is None else f"allowed {self.tol.ulp}"
        lines += [
            f"Greatest relative difference: {_num(self.max_rel)} (allowed {_num(self.tol.rel)})"
            + flag("rel"),
            f"Greatest absolute difference: {_num(self.max_abs)}",
            f"Greatest ulp difference: {self.max_ulp} ({ulp_allowed})" + flag("ulp"),
            f"Norm-wise relative difference: {_num(self.norm_rel)} (allowed {_num(self.tol.norm)})"
            + flag("norm"),
            f"Non-finite mismatches: {self.n_nonfinite_mismatch}" + flag("nonfinite"),
            f"Mean signed error (bias): {self.bias_text()}" + flag("bias"),
            f"Tolerance: {self.tol.bounds()}" + (f" -- {self.tol.why}" if self.tol.why else ""),
        ]
        return "\n".join(lines)

    def summary_row(self) -> dict[str, Any]:
        """The result as a flat dict of plain, JSON-safe Python values.

        Non-finite floats (possible only in the ``worst_*`` values) become the strings
        ``"nan"``, ``"inf"``, ``"-inf"``; missing values are ``None``.
        """
        return {
            "name": self.name,
            "shape": list(self.shape),
            "actual_dtype": self.actual_dtype,
            "expected_dtype": self.expected_dtype,
            "passed": bool(self.passed),
            "n_total": int(self.n_total),
            "n_compared": int(self.n_compared),
            "n_bad": int(self.n_bad),
            "n_nonfinite_mismatch": int(self.n_nonfinite_mismatch),
            "max_abs": json_float(self.max_abs),
            "max_rel": json_float(self.max_rel),
            "max_ulp": int(self.max_ulp),
            "norm_rel": json_float(self.norm_rel),
            "scale": json_float(self.scale),
            "tol_rel": json_float(self.tol.rel),
            "tol_norm": json_float(self.tol.norm),
            "tol_ulp": self.tol.ulp,
            "tol_why": self.tol.why,
            "worst_index": None if self.worst_index is None else [int(i) for i in self.worst_index],
            "worst_label": self.worst_label,
            "worst_actual": json_float(self.worst_actual),
            "worst_expected": json_float(self.worst_expected),
            "worst_abs": json_float(self.worst_abs),
            "worst_rel": json_float(self.worst_rel),
            "worst_ulp": self.worst_ulp,
            "bias": json_float(self.bias),
            "bias_z": json_float(self.bias_z),
            "bias_form": self.bias_form,
            "bias_scale": None if self.bias_stats is None else json_float(self.bias_stats.scale),
            "bias_scale_se": None if self.bias_stats is None else json_float(self.bias_stats.scale_se),
            "bias_shift": None if self.bias_stats is None else json_float(self.bias_stats.shift),
            "bias_shift_se": None if self.bias_stats is None else json_float(self.bias_stats.shift_se),
            "bias_groups": None if self.bias_stats is None else int(self.bias_stats.groups),
            "tol_bias": json_float(self.tol.bias),
        }

    def to_json(self, **kwargs: Any) -> str:
        """``summary_row()`` as strict JSON (``allow_nan=False``); kwargs go to json.dumps."""
        return json.dumps(self.summary_row(), allow_nan=False, **kwargs)


class ParityError(AssertionError):
    """A failed comparison; ``.comparison`` holds the :class:`Comparison`."""

    def __init__(self, comparison: Comparison):
        super().__init__(comparison.message())
        self.comparison = comparison


# --------------------------------------------------------------------------- API
def compare(actual: Any, expected: Any, *, name: str, tol: Tolerance,
            axes: Sequence[str] | None = None, mask: Any = None,
            scale: float | None = None, nan_equal: bool = True,
            elem_scale: Any = None, engine: str | None = None, unit: int | None = None,
            shared: dict | None = None) -> Comparison:
    """Compare ``actual`` with ``expected`` element by element; return a :class:`Comparison`.

    actual, expected: numeric arrays of the same shape (NumPy arrays, CPU torch tensors or
        array-likes; integer or floating dtypes). Neither is modified or copied in full.
    name: the tensor's name, used in messages.
    tol: the :class:`Tolerance` to judge against.
    axes: one name per axis for the worst element's label (default ``i0, i1, ...``).
    mask: optional boolean array broadcastable to the shape; only True elements are
        compared (e.g. a (T, T) causal ``np.tril`` mask for preatt of shape (L,B,NH,T,T)).
    scale: the additive term in the denominator of ``rel``. Default: the RMS of the finite
        expected values over the compared elements (the smallest normal float32 if that is
        0). Must be finite and > 0 when given.
    nan_equal: whether NaN in both arrays at the same place counts as equal.
    elem_scale: optional non-negative array broadcastable to the shape, added to the
        denominator of ``rel`` element by element (``|a-e| / (|e| + scale + elem_scale)``):
        the size of the terms an element was summed from, where they cancel. The norm-wise
        error is then relative to the same sizes: ``||a-e|| / || |e| + elem_scale ||``.
    engine: ``"numpy"`` for the reference implementation (:mod:`harness.arbiter.metrics`); by
        default the compiled helper (:mod:`harness.arbiter.fused`) where it takes the arrays
        as they lie, else NumPy. Both give the same verdicts and metrics.
    unit: the bias test's correlated run: how many contiguous elements (C order) may share
        a rounding (a row that shares a layernorm's rstd or a softmax's sum); the standard
        error of the bias is estimated from groups of whole runs (:mod:`harness.arbiter.stats`).
        Default: the last axis (whole rows); 1: every element on its own. Must divide the
        number of elements.
    shared: a dict the caller keeps for the comparisons of one expected tensor (each
        implementation's against one float64 tensor): the default ``scale`` computed once
        for them all by the compiled helper (:func:`harness.arbiter.fused.expected_scale`),
        the same value each would compute.
    """
    a, e, m, es, axes, scale, shape = _validated(actual, expected, name, tol, axes, mask, scale, elem_scale)
    if scale is None and shared is not None and engine != "numpy":
        scale = fused_scale(a, e, m, es, shared)
    size = math.prod(shape)
    if unit is None:
        unit = shape[-1] if shape else 1
    unit = max(1, int(unit))
    if size and size % unit:
        raise ValueError(f"{name}: unit {unit} does not divide the {size} elements of shape {shape}")
    bounds = group_bounds(size, unit)
    t = None if engine == "numpy" else fused_tally(a, e, m, es, scale, tol, nan_equal, bounds)
    if t is None:
        t = metrics.tally(a, e, m, es, scale, tol, nan_equal, bounds)
    return comparison_of(t, a, e, es, tol, name=name, shape=shape, axes=axes)


def comparison_of(t, a: np.ndarray, e: np.ndarray, es, tol: Tolerance, *, name: str, shape: tuple[int, ...],
                axes: tuple[str, ...] | None) -> Comparison:
    """The Comparison of a tally (either engine's: :mod:`harness.arbiter.metrics`,
    :mod:`harness.arbiter.fused`): the norm-wise error, the verdict, and the worst element's
    values read from the arrays (anything that gives ``[index]`` and ``dtype``)."""
    if t.sumsq_size > 0.0:
        norm_rel = math.sqrt(t.sumsq_diff) / math.sqrt(t.sumsq_size)
    else:
        norm_rel = 0.0 if t.sumsq_diff == 0.0 else math.inf
    groups = getattr(t, "groups", None)
    bias = None if groups is None else bias_of(groups, tol.bias_p)
    worst_actual = worst_expected = worst_abs = worst_rel = None
    worst_ulp = None
    index = t.worst_index
    label = "-"
    if index is not None:
        wa, we = a[index], e[index]
        worst_actual, worst_expected = float(wa), float(we)
        with np.errstate(all="ignore"):
            worst_abs = abs(worst_actual - worst_expected)
            extra = 0.0 if es is None else float(es[index])
            worst_rel = worst_abs / (abs(worst_expected) + t.scale + extra)
            if not (math.isnan(worst_actual) or math.isnan(worst_expected)):
                worst_ulp = abs(ulp_key(wa) - ulp_key(we))
        if len(shape) == 0:
            index = ()
        label = _label(index, axes)
    passed = t.n_bad == 0 and norm_rel <= tol.norm and bias_used(bias, tol) <= 1.0     # NaN norm fails
    return Comparison(
        name=name, shape=shape, tol=tol,
        actual_dtype=_dtype_name(a.dtype), expected_dtype=_dtype_name(e.dtype),
        passed=bool(passed),
        n_total=math.prod(shape), n_compared=t.n_compared, n_bad=t.n_bad,
        n_nonfinite_mismatch=t.n_nonfinite, max_abs=t.max_abs, max_rel=t.max_rel,
        max_ulp=t.max_ulp, norm_rel=norm_rel, scale=t.scale,
        worst_index=index, worst_label=label, worst_actual=worst_actual,
        worst_expected=worst_expected, worst_abs=worst_abs, worst_rel=worst_rel,
        worst_ulp=worst_ulp, bias_stats=bias,
    )


def bias_minimum(b: Bias, tol: Tolerance) -> float:
    """The minimum effect ``b`` is judged against: ``tol.bias``, or ``tol.bias_size`` over
    the expected values' share of the sizes where that is larger."""
    if tol.bias_size > 0.0 and b.share > 0.0:
        return max(tol.bias, tol.bias_size / b.share)
    return tol.bias


def bias_used(b: Bias | None, tol: Tolerance) -> float:
    """The fraction of the bias bound ``b`` uses under ``tol`` (:attr:`Comparison.bias_used`)."""
    if b is None or not math.isfinite(tol.bias):
        return 0.0
    out, minimum = 0.0, bias_minimum(b, tol)
    for x, se, t in b.forms():
        if math.isinf(t):
            continue
        bound = minimum + t * se
        out = max(out, abs(x) / bound if bound > 0 else (math.inf if x != 0 else 0.0))
    return out


def _validated(actual, expected, name, tol, axes, mask, scale, elem_scale):
    """compare's arguments checked and put in the form its passes read: (a, e, mask,
    elem_scale, axes, scale, shape), a 0-d pair as 1-element views (shape stays ())."""
    a = _as_numeric_array(actual, "actual", name)
    e = _as_numeric_array(expected, "expected", name)
    if a.shape != e.shape:
        raise ValueError(f"{name}: shape mismatch: actual has shape {a.shape}, "
                         f"expected has shape {e.shape}")
    if not isinstance(tol, Tolerance):
        raise TypeError(f"{name}: tol must be a Tolerance, got {type(tol).__name__}")
    shape = tuple(int(n) for n in a.shape)
    if axes is not None:
        axes = tuple(str(x) for x in axes)
        if len(axes) != len(shape):
            raise ValueError(f"{name}: {len(axes)} axis names {axes} for a {len(shape)}-d "
                             f"tensor of shape {shape}")
    m = _broadcast_mask(mask, shape, name)
    if scale is not None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"{name}: scale must be finite and > 0, got {scale!r}")
    es = None
    if elem_scale is not None:
        try:
            es = np.asarray(elem_scale)
            if es.dtype.kind != "f":
                es = es.astype(np.float64)
            es = np.broadcast_to(es, shape)  # kept in its dtype: converted block by block
        except ValueError:
            raise ValueError(f"{name}: elem_scale of shape {np.shape(elem_scale)} does not "
                             f"broadcast to {shape}") from None
    if a.ndim == 0:             # work on 1-element views; report the index as ()
        a, e = a.reshape(1), e.reshape(1)
        m = None if m is None else m.reshape(1)
        es = None if es is None else es.reshape(1)
    return a, e, m, es, axes, scale, shape


def assert_parity(actual: Any, expected: Any, **kwargs: Any) -> Comparison:
    """:func:`compare` and raise :class:`ParityError` (with ``.message()``) if it fails."""
    comparison = compare(actual, expected, **kwargs)
    if not comparison.passed:
        raise ParityError(comparison)
    return comparison


def ulp_distance(a: Any, b: Any) -> np.ndarray:
    """Element-wise float32 ulp distance (int64) between ``a`` and ``b`` rounded to float32.

    Uses the monotone mapping of float32 bit patterns onto the integers, so +0 and -0 are
    0 apart, adjacent floats 1 apart and the two smallest denormals of opposite sign 2
    apart. Results for NaN inputs are meaningless.
    """
    with np.errstate(all="ignore"):
        a32 = np.asarray(a, dtype=np.float32)
        b32 = np.asarray(b, dtype=np.float32)
    out_shape = np.broadcast_shapes(a32.shape, b32.shape)
    return metrics.ulp_diff(np.atleast_1d(a32), np.atleast_1d(b32)).reshape(out_shape)


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, cached (it is surprisingly slow and called on every comparison)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def _as_numeric_array(x: Any, what: str, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        if hasattr(x, "detach") and hasattr(x, "numpy"):     # torch.Tensor, zero-copy on CPU
            x = x.detach().cpu().numpy()
        else:
            x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name}: {what} must have an integer or floating dtype, "
                        f"got {x.dtype}")
    return x


def _broadcast_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        if hasattr(mask, "detach") and hasattr(mask, "numpy"):
            mask = mask.detach().cpu().numpy()
        else:
            mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name}: mask must be a boolean array, got dtype {mask.dtype}")
    try:
        return np.broadcast_to(mask, shape)          # a read-only view, no copy
    except ValueError:
        raise ValueError(f"{name}: mask of shape {mask.shape} is not broadcastable to "
                         f"the tensor's shape {shape}") from None


def _label(index: tuple[int, ...], axes: tuple[str, ...] | None) -> str:
    if not index:
        return "(scalar)"
    names = axes if axes is not None else tuple(f"i{k}" for k in range(len(index)))
    return " ".join(f"{n}={i}" for n, i in zip(names, index))


def _num(x: float | None) -> str:
    """A metric for messages: 3 significant digits, plain 0."""
    if x is None:
        return "n/a"
    return "0" if x == 0 else f"{x:.3g}"


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.3g}%" if total else "0%"


def _value(x: float | None, dtype: str) -> str:
    """A value printed at its dtype's precision (float32 also with its bit pattern)."""
    if x is None:
        return "n/a"
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        return str(int(x)) if math.isfinite(x) else str(x)
    text = str(dt.type(x))
    if dt == np.float32:
        text += f" (0x{np.asarray(x, np.float32).view(np.uint32).item():08x})"
    return text


def json_float(x: float | None) -> float | str | None:
    """A float for strict JSON: non-finite values as the strings "nan", "inf", "-inf"."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
