"""The one verdict on a kernel call's output (:func:`judge`), and the one way every check
compares and, where it fails, says why (:func:`checked`).

:func:`judge` judges under the tolerance of the kernel's row in :mod:`pyref.spec` (rule,
reduction length), with the row's mask and axes, relative to the size of the terms the
output is summed from (:func:`call_scale`). The per-op checks (:mod:`.perop`) and the
replay of a model step (:mod:`.replay`) both judge through it; the end-to-end, loss and
update checks compare through :func:`checked` under their own tolerances.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pyref.protocol import as64
from pyref.spec import SPEC

from ..arbiter.compare import Comparison, compare
from ..diagnosis import Call, attach, diagnose
from ..probe import span
from ..arbiter.tolerances import op_tolerance, term_magnitude


def compared(actual, expected, **how) -> Comparison:
    """:func:`harness.arbiter.compare.compare` as every check calls it: a probe span ``compare``
    whose detail is the array compared (:mod:`harness.probe`)."""
    with span("compare", actual=actual):
        return compare(actual, expected, **how)


def checked(actual, expected, calls: Callable[[], Call | list[Call]] | None = None, *, unit: int | None = None,
            engine: str | None = None, ctx: dict | None = None, shared: dict | None = None, **how) -> Comparison:
    """:func:`compared` (``unit``, ``engine``, ``shared`` and ``how``:
    :func:`harness.arbiter.compare.compare`'s settings) and, where it fails, :func:`explained`."""
    return explained(compared(actual, expected, unit=unit, engine=engine, shared=shared, **how), actual, expected,
                     calls, ctx=ctx, **how)


def explained(c: Comparison, actual, expected, calls: Callable[[], Call | list[Call]] | None = None, *,
              ctx: dict | None = None, **how) -> Comparison:
    """``c`` (the comparison of ``actual`` with ``expected`` under ``how``: name, tol, axes,
    mask, elem_scale), carrying its diagnosis where it failed: :mod:`harness.diagnosis`
    re-runs the calls that ``calls()`` gives (called only then; None: not diagnosed) under
    the catalogue's changes of semantics. The update check compares its three tensors at
    once and explains each failing one here."""
    if c.passed or calls is None:
        return c
    return attach(c, diagnose(calls(), actual, expected, ctx=ctx, **how))


def judge(kernel: str, output: str, actual: np.ndarray, expected: np.ndarray, args: dict, *,
          name: str, elem_scale=None, n: int | None = None, calls=None, precision=None) -> Comparison:
    """Judge ``actual`` (an implementation's ``output`` of a ``kernel`` call on ``args``)
    against the oracle's ``expected``, under the kernel's per-op tolerance, its bias test's
    groups spanning the row's correlated runs (``span``).

    ``elem_scale``: the size of the terms of each element (:func:`call_scale` for one
    call; a replay passes the sum over the calls that accumulated into a buffer). ``n``:
    the reduction length when several calls made the output (default: this call's).
    ``calls``: a function giving what :mod:`harness.diagnosis` re-runs on failure (default:
    this call), called only then. ``precision``: the precision the op ran at
    (:class:`harness.arbiter.precision.Precision`; None: float32)."""
    spec = SPEC[kernel]
    n = spec.n(output, args) if n is None else n
    how = dict(name=name, tol=op_tolerance(kernel, output, n, actual.size, precision), axes=spec.output(output).axes,
               mask=spec.mask(output, args), elem_scale=elem_scale)
    return checked(actual, expected, calls or (lambda: Call(kernel, output, args)),
                   unit=spec.unit(output, actual.shape), **how)


def call_scale(kernel: str, output: str, args: dict, expected: dict):
    """Sum |term| of each element of one call: the kernel's own terms, plus the value a
    backward kernel's gradient buffer held before it accumulated into it."""
    args = as64(args)
    with span("term magnitudes"):
        mag = term_magnitude(kernel, output, args, expected)
    if SPEC[kernel].backward and output in SPEC[kernel].inplace:
        start = np.abs(args[output])
        mag = start if mag is None else mag + start
    return mag
