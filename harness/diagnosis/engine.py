"""The diagnosis engine: re-run a failing op under changes of semantics, and say which
change explains its output.

Most real divergences between ``train_gpt2.c`` and a port (or an edited copy of the C)
are one of a handful of mistakes, and each leaves a signature a float64 re-run confirms:
if the failing output matches, within the op's own tolerance, what the op computes under
a specific change (GELU's exact erf form, layernorm's eps 1e-6, the attention scale
1/hs, ...), that change is the cause.

* :class:`Variant` -- one op under one change: a float64 function plus a one-line
  description (the changes themselves are :mod:`.catalogue`'s). Besides the kernels of
  the protocol, the pseudo-kernel ``loss_mean`` (:data:`MODEL_QUANTITIES`) stands for the
  mean over B*T positions that the model takes of the losses (and spreads over their
  gradients).
* :func:`diagnose` -- given the failing op's call(s), the implementation's output, the
  comparison settings of the failing check (tolerance, mask, element scale) and the
  variants to try, re-judge the output against every applicable variant through the same
  :func:`harness.arbiter.compare.compare` and return a :class:`Diagnosis`: every variant that
  explains the output, best first, or none ("no known cause").
* :func:`attach` -- a failing :class:`~harness.arbiter.compare.Comparison` carrying its diagnosis
  (:class:`DiagnosedComparison`: still failed; its message says the cause).

Diagnosis runs only for failed checks and never changes a verdict. A variant counts only
when it explains the output everywhere it is defined *and* the C's own semantics do not
explain it there (so a variant that leaves the failing elements out cannot claim them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import as64, run_kernel

from ..arbiter.compare import Comparison, Tolerance, compare, json_float


@dataclass(frozen=True)
class Fit:
    """A variant with one free constant (a wrong coefficient, an epsilon): it is fitted to
    the implementation's output over [lo, hi] (log-spaced when ``log``) before judging;
    ``linear``: the output is affine in the constant, so two evaluations and a closed-form
    least-squares solve fit it (a factor, an offset, a smoothing weight); ``estimate``: the
    constant read from the output in closed form (a softmax temperature from the slope of
    log-probabilities), where a search would cost too much at GPT-2 124M's vocabulary."""

    lo: float
    hi: float
    log: bool = False
    linear: bool = False   # the output is affine in the constant: fitted in closed form
    # a closed-form estimate of the constant from the output itself,
    # ``estimate(kernel, args, actual, ctx) -> value or None`` (then judged once; ``ctx``
    # carries the choice being tried)
    estimate: Callable | None = None


@dataclass(frozen=True)
class Variant:
    """One op under one change of semantics.

    id:          stable identifier, ``family.change`` (e.g. ``"layernorm.eps=1e-6"``)
    family:      the op family it belongs to (``gelu``, ``layernorm``, ``adamw``, ...)
    kernels:     the protocol kernels it changes
    description: one line; ``{value}`` is replaced by the fitted constant of a ``fit``
    run:         ``run(kernel, args, ctx, value) -> outputs`` in float64 (a forward's
                 outputs by name, a backward's buffers after accumulating), or None where
                 the change does not apply (it would change nothing); ``args`` are private
                 float64 copies; ``ctx`` has ``output`` (the judged output) and, for
                 AdamW, ``one_d`` (which parameters are 1-D)
    defined:     optional ``defined(kernel, output, args) -> bool mask``: where the variant
                 defines the output (e.g. not at the position a shifted label falls off)
    unwritten:   the positions outside ``defined`` are ones the change leaves unwritten
                 (the diagonal of preatt without it): every one of them must be off
    fit:         optional :class:`Fit` of one free constant (or ``fit(kernel) -> Fit``)
    terms:       optional ``terms(kernel, args, output) -> array``: sizes of the
                 terms the change adds where they can cancel (added to the check's element
                 scale: a float32 port of the change rounds relative to them)
    choices:     optional ``choices(kernel, args) -> [choice, ...]``: the discrete forms the
                 mistake can take (a layout, an order, an offset); each is tried (passed
                 as ``ctx["choice"]``, with the fit where there is one) and the best that
                 explains the output is named; ``{choice}`` in the description is its text
    name:        optional ``name(kernel, args, value, ctx) -> (id, value, note)``: the
                 cause's id and constant once fitted (a fitted scale that is 1/hs exactly
                 is ``attention.scale=1/hs``, snapped to it); ``{note}`` in the description
    fallback:    0 (or False): a specific change, always tried; a higher level is tried only
                 when no change of a lower level explains the output: 1 for a less usual form
                 of a mistake that a usual one can mimic (eps outside the square root), 2 for
                 a change of any op (a constant factor or offset on its output)
    at:          optional: the graph's op (its label, ``"gelu gelu_forward"``) the mistake
                 belongs to when it shows in another op's output (GELU applied before
                 ``c_fc``: ``c_fc``'s output is off, the GELU is misplaced); the first
                 divergence names that op of the same layer
    judged_at:   optional ``judged_at(kernel, output, args, actual, tol) -> Tolerance or
                 None``: the tolerance the changed op is judged at instead of the check's
                 ``tol`` (an op that ran in bfloat16 is judged at bfloat16's), None where the
                 change does not apply (the output shows no sign of it, or the check already
                 judged it so)
    """

    id: str
    family: str
    kernels: tuple[str, ...]
    description: str
    run: Callable
    defined: Callable | None = None
    unwritten: bool = False
    fit: Fit | Callable | None = None
    terms: Callable | None = None
    choices: Callable | None = None
    name: Callable | None = None
    fallback: int = 0
    at: str | None = None
    judged_at: Callable | None = None

    def describe(self, value: float | None = None, choice=None, note: str = "", output: str = "") -> str:
        if "{" not in self.description:
            return self.description
        value = const_text(value, short_extremes=True) if value is not None else ""
        return self.description.format(value=value, choice=choice, note=note, output=output)


@dataclass(frozen=True)
class Cause:
    """A variant that explains a failing output: ``used`` is the fraction of the check's
    tolerance the output uses against the variant (<= 1); ``value`` the fitted constant
    of a fitted variant; ``choice`` the form of a variant with choices (``"kqv"``);
    ``where`` the op call it applies to when a buffer is the sum of several calls (replay
    of the residual-stream gradients); ``at`` the graph's op the mistake belongs to when it
    is not the failing op (:attr:`Variant.at`)."""

    id: str
    family: str
    description: str
    used: float
    value: float | None = None
    where: str | None = None
    choice: str | None = None
    at: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "family": self.family, "description": self.description,
                "used": json_float(self.used), "value": json_float(self.value), "choice": self.choice,
                "where": self.where, "at": self.at}


@dataclass(frozen=True)
class Diagnosis:
    """Why one output failed: ``causes`` (best first; empty: no known cause) among the
    variants ``tried`` (their ids); ``skipped``: (id, error) of variants that raised on
    these inputs (a diagnosis never breaks the check it explains)."""

    kernel: str
    output: str
    causes: tuple[Cause, ...]
    tried: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def known(self) -> bool:
        return bool(self.causes)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.causes)

    def text(self) -> str:
        """One line for reports: the probable cause(s), or that none is known."""
        what = _LABELS.get(self.kernel, self.kernel)
        if not self.causes:
            if not self.tried:
                return f"no known cause: the catalogue has no change to {what}"
            return (f"no known cause: none of the {len(self.tried)} catalogued changes to "
                    f"{what} explains {self.output}")
        parts = [self._one(c) for c in self.causes]
        head = f"probable cause: {parts[0]}"
        return head if len(parts) == 1 else head + "; also consistent: " + "; ".join(parts[1:])

    @staticmethod
    def _one(c: Cause) -> str:
        return c.description + (f" (in {c.where})" if c.where else "") + \
            f" [{c.id}, explains it at {c.used:.2g}x tol]"

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "output": self.output, "known": self.known,
                "causes": [c.to_json() for c in self.causes], "tried": list(self.tried),
                "skipped": [{"id": i, "error": e} for i, e in self.skipped], "text": self.text()}


@dataclass(frozen=True)
class DiagnosedComparison(Comparison):
    """A failed :class:`Comparison` with its :class:`Diagnosis`: the same metrics and
    verdict, and a message that ends with the cause."""

    diagnosis: Diagnosis | None = None

    def message(self) -> str:
        text = super().message()
        return text if self.diagnosis is None else text + "\nDiagnosis: " + self.diagnosis.text()

    def summary_row(self) -> dict:
        row = super().summary_row()
        row["diagnosis"] = None if self.diagnosis is None else self.diagnosis.to_json()
        return row


def attach(c: Comparison, diagnosis: Diagnosis) -> DiagnosedComparison:
    """``c`` carrying ``diagnosis`` (all metrics and the verdict unchanged)."""
    values = {f.name: getattr(c, f.name) for f in fields(Comparison)}
    return DiagnosedComparison(**values, diagnosis=diagnosis)


@dataclass(frozen=True)
class Call:
    """One kernel call whose output ``output`` is judged: ``args`` its named arguments
    (in-place buffers hold their values before the call). A buffer several calls
    accumulate into is a sequence of Calls: each after the first starts from the
    previous one's result."""

    kernel: str
    output: str
    args: dict
    where: str | None = None


# Quantities of a whole step that are not a kernel's: ``loss_mean`` stands for the mean
# over the B*T positions that gpt2_forward takes of the losses and gpt2_backward
# differentiates (dlosses = 1/(B*T)). Its Call has ``value`` (the float64 model's mean
# loss, or one of its gradients: the backward is linear in dlosses) and ``n`` (B*T).
MODEL_QUANTITIES = ("loss_mean",)
_LABELS = {"loss_mean": "the loss mean over B*T"}


# ----------------------------------------------------------------------------- diagnose

def variants_for(kernel: str, variants: Sequence[Variant]) -> list[Variant]:
    """The variants that change ``kernel``."""
    return [v for v in variants if kernel in v.kernels]


def diagnose(calls: Call | Sequence[Call], actual, expected, *, variants: Sequence[Variant], tol: Tolerance,
             mask=None, elem_scale=None, axes=None, ctx: dict | None = None, name: str = "") -> Diagnosis:
    """Which catalogued changes explain ``actual``, the implementation's result of
    ``calls`` (one call, or the calls that accumulate into one buffer)?

    ``expected`` is the C semantics' float64 result the failing check used; ``tol``,
    ``mask``, ``elem_scale``, ``axes`` are that check's. Each applicable variant (on each
    call it applies to) is run in float64 on the same inputs and ``actual`` is compared
    with its result through :func:`compare` under the same settings. ``variants``: the
    changes to try (:data:`harness.diagnosis.CATALOGUE`)."""
    calls = [calls] if isinstance(calls, Call) else list(calls)
    last = calls[-1]
    ctx = dict(ctx or {}, actual=actual)
    causes, tried, skipped = [], [], []
    # the specific changes first; a less usual form, then the changes of any op (a factor,
    # an offset) only when nothing of a lower level explains the output
    for level in sorted({int(v.fallback) for v in variants}):
        if causes:
            break
        for i, call in enumerate(calls):
            for v in variants_for(call.kernel, variants):
                if int(v.fallback) != level:
                    continue
                tried.append(v.id)
                try:
                    with np.errstate(all="ignore"):
                        cause = _try(v, calls, i, actual, expected, tol=tol, mask=mask, elem_scale=elem_scale,
                                     axes=axes, ctx=ctx, name=name)
                except Exception as e:  # a diagnosis must never break the check it explains
                    skipped.append((v.id, f"{type(e).__name__}: {e}"))
                    continue
                if cause is not None:
                    causes.append(cause)
    causes.sort(key=lambda c: c.used)
    return Diagnosis(last.kernel, last.output, tuple(causes), tuple(dict.fromkeys(tried)), tuple(skipped))


def _try(v: Variant, calls: list[Call], i: int, actual, expected, *, tol, mask, elem_scale, axes,
         ctx, name) -> Cause | None:
    """The Cause if variant ``v``, applied to call ``i``, explains ``actual`` (with choices:
    the best of its forms that does)."""
    call = calls[i]
    if v.choices is None:
        return _try_one(v, calls, i, actual, expected, tol=tol, mask=mask, elem_scale=elem_scale, axes=axes,
                        ctx=ctx, name=name)
    best = None
    for choice in v.choices(call.kernel, as64(call.args, copy=True)):
        cause = _try_one(v, calls, i, actual, expected, tol=tol, mask=mask, elem_scale=elem_scale, axes=axes,
                         ctx=dict(ctx, choice=choice), name=name)
        if cause is not None and (best is None or cause.used < best.used):
            best = cause
    return best


def _try_one(v: Variant, calls: list[Call], i: int, actual, expected, *, tol, mask, elem_scale, axes,
             ctx, name) -> Cause | None:
    call = calls[i]

    def result(value):
        return _chain(calls, i, v, ctx, value)

    if v.judged_at is not None:
        if len(calls) > 1:
            return None      # (an accumulated buffer: its calls' precisions are not one)
        tol = v.judged_at(call.kernel, call.output, as64(call.args, copy=True), np.asarray(actual), tol)
        if tol is None:
            return None

    # where the variant is judged (and fitted): the check's mask, and its own positions
    where = mask
    if v.defined is not None:
        where = _region(v, call, actual, expected, mask, dict(name=name, tol=tol, elem_scale=elem_scale))
        if where is None:
            return None
    value = None
    fit = v.fit(call.kernel) if callable(v.fit) else v.fit
    if fit is not None and fit.estimate is not None:
        value = fit.estimate(call.kernel, as64(call.args, copy=True), np.asarray(actual, np.float64),
                             dict(ctx, output=call.output))
        if value is None or not (fit.lo <= value <= fit.hi):
            return None
    elif fit is not None:
        value = _fit(result, actual, fit, where)
        if value is None:
            return None
    vid, note = v.id, ""
    if v.name is not None:
        vid, value, note = v.name(call.kernel, as64(call.args, copy=True), value, dict(ctx, output=call.output))
        if vid is None:
            return None
    out = result(value)
    if out is None:
        return None
    if v.terms is not None and len(calls) == 1:
        extra = v.terms(call.kernel, as64(call.args, copy=True), call.output)
        elem_scale = extra if elem_scale is None else elem_scale + extra
    same = dict(name=name, tol=tol, elem_scale=elem_scale)
    c = compare(actual, out, axes=axes, mask=where, **same)
    if not c.passed:
        return None
    choice = ctx.get("choice")
    return Cause(vid, v.family, v.describe(value, choice, note, call.output), c.used, value,
                 call.where if len(calls) > 1 else None, None if choice is None else str(choice), v.at)


def _region(v: Variant, call: Call, actual, expected, mask, same: dict):
    """Where a variant with ``defined`` positions is judged (the check's mask and its
    own), or None when the failure cannot be its doing: without ``unwritten``, the
    failure must lie where it is defined (not in positions it claims nothing about);
    with it, every position it leaves unwritten must be off."""
    shape = np.shape(actual)
    d = np.broadcast_to(np.asarray(v.defined(call.kernel, call.output, call.args), bool), shape)
    m = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
    where, rest = d & m, ~d & m
    if not where.any():
        return None
    if v.unwritten:
        if rest.any():
            off = compare(actual, expected, mask=rest, **same)
            if off.n_bad < off.n_compared:
                return None
    elif compare(actual, expected, mask=where, **same).passed:
        return None
    return where


def _chain(calls: list[Call], i: int, v: Variant, ctx: dict, value) -> np.ndarray | None:
    """The judged output with call ``i`` run under ``v`` and the others as the C does."""
    buf = None
    for j, call in enumerate(calls):
        args = as64(call.args, copy=True)
        if j > 0:
            args[call.output] = buf
        if j == i:
            out = v.run(call.kernel, args, dict(ctx, output=call.output), value)
            if out is None:
                return None
        elif call.kernel in MODEL_QUANTITIES:
            out = {call.output: args["value"]}
        else:
            out = run_kernel(numpy_kernels, call.kernel, args, np.float64)
        buf = out[call.output]
    return buf


def _fit(result, actual, fit: Fit, mask) -> float | None:
    """The constant in [fit.lo, fit.hi] whose variant is closest (least squares) to
    ``actual``: a coarse grid, then golden-section search around the best point."""
    if fit.linear:      # before the float64 copy of ``actual`` below: it needs none
        return _fit_linear(result, actual, None if mask is None else np.broadcast_to(mask, np.shape(actual)), fit)
    a = np.asarray(actual, np.float64)
    m = None if mask is None else np.broadcast_to(mask, a.shape)

    def to_x(p):
        return math.log(p) if fit.log else p

    def from_x(x):
        return math.exp(x) if fit.log else x

    def loss(x):
        e = result(from_x(x))
        if e is None:
            return math.inf
        d = np.square(a - e)
        if m is not None:
            d = d[m]
        s = float(np.sum(d[np.isfinite(d)])) if d.size else math.inf
        return s if math.isfinite(s) else math.inf

    lo, hi = to_x(fit.lo), to_x(fit.hi)
    grid = np.linspace(lo, hi, 25)
    losses = [loss(x) for x in grid]
    k = int(np.argmin(losses))
    if not math.isfinite(losses[k]):
        return None
    a_, b_ = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    c_, d_ = b_ - g * (b_ - a_), a_ + g * (b_ - a_)
    fc, fd = loss(c_), loss(d_)
    for _ in range(40):
        if fc <= fd:
            b_, d_, fd = d_, c_, fc
            c_ = b_ - g * (b_ - a_)
            fc = loss(c_)
        else:
            a_, c_, fc = c_, d_, fd
            d_ = a_ + g * (b_ - a_)
            fd = loss(d_)
    return float(from_x((a_ + b_) / 2))


def _fit_linear(result, actual, m, fit: Fit) -> float | None:
    """The least-squares constant of an output affine in it: out(p) = out(0) + p*(out(1) - out(0)).
    Over a whole parameter gradient (wte's: 309 MB in float64) its arrays are the
    diagnosis's largest: the differences are taken in place of the two evaluations and
    the products in place of the differences, the same numbers summed in the same order."""
    e0 = result(0.0)
    if e0 is None:
        return None
    e1 = result(1.0)
    if e1 is None:
        return None
    d = _difference(np.asarray(e1, np.float64), e0, keep=(e0, actual))
    r = _difference(actual, e0, keep=(actual,), into=e0)
    del e0, e1
    if m is not None:
        d, r = d[m], r[m]
    d, r = d.reshape(-1), r.reshape(-1)
    ok = np.isfinite(d)
    ok &= np.isfinite(r)
    if not ok.all():
        d, r = d[ok], r[ok]
    num = float(np.sum(np.multiply(d, r, out=r)))
    den = float(np.sum(np.multiply(d, d, out=d)))
    if den == 0.0 or not math.isfinite(den):
        return None
    p = num / den
    return p if fit.lo <= p <= fit.hi else None


def _difference(x, y: np.ndarray, keep: tuple, into: np.ndarray | None = None) -> np.ndarray:
    """``x - y`` in float64, written over ``into`` (default ``x``) where that is a float64
    array of the diagnosis's own (writable, sharing no memory with the arrays in ``keep``,
    still needed): an evaluation no longer needed after it."""
    into = x if into is None else into
    own = isinstance(into, np.ndarray) and into.dtype == np.float64 and into.flags.writeable and \
        np.shape(into) == np.broadcast_shapes(np.shape(x), np.shape(y)) and \
        not any(np.may_share_memory(into, k) for k in keep)
    return np.subtract(x, y, out=into) if own else np.subtract(np.asarray(x, np.float64), y)


def const_text(x: float, *, short_extremes: bool = False) -> str:
    """A found constant as a cause says it: four significant digits (a variant's note), or
    with ``short_extremes`` two outside [1e-3, 1e4) (a description's ``{value}``)."""
    return f"{x:.4g}" if not short_extremes or 1e-3 <= abs(x) < 1e4 else f"{x:.2g}"
