"""The one verdict on a kernel call's output: :func:`judge`.

It judges under the tolerance of the kernel's row in :mod:`pyref.spec` (rule, reduction
length), with the row's mask and axes, relative to the size of the terms the output is
summed from (:func:`call_scale`), and when it fails says why (:mod:`harness.diagnosis`).
The per-op checks (:mod:`.perop`) and the replay of a model step (:mod:`.replay`) both
judge through it.
"""
from __future__ import annotations

import numpy as np

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
    c = compared(actual, expected, unit=spec.unit(output, actual.shape), **how)
    if not c.passed:
        c = attach(c, diagnose(calls() if calls else Call(kernel, output, args), actual, expected, **how))
    return c


def call_scale(kernel: str, output: str, args: dict, expected: dict):
    """Sum |term| of each element of one call: the kernel's own terms, plus the value a
    backward kernel's gradient buffer held before it accumulated into it."""
    args = _as64(args)
    with span("term magnitudes"):
        mag = term_magnitude(kernel, output, args, expected)
    if SPEC[kernel].backward and output in SPEC[kernel].inplace:
        start = np.abs(args[output])
        mag = start if mag is None else mag + start
    return mag


def _as64(args: dict) -> dict:
    return {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in args.items()}
