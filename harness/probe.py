"""Probes: named points of a run that a listener may time or inspect.

The harness marks where its work goes (``with span("e2e checks"):``) and what a comparison
reads (``span("compare", actual=array)``). Nothing is measured unless a listener is
installed with :func:`listening`: a benchmark times the spans (benchmarks/bench.py, thread
by thread), a test inspects them (tests/binding/test_views.py: the C's tensors are compared where
they lie, not copied). With nobody listening a span costs a check of an empty list.

A listener has ``enter(category, detail) -> token`` and ``exit(token)``, called in the
thread the span runs in (the work of a step is shared among threads: :mod:`harness.cores`).
The categories a run marks: the models' own work (``C``, ``oracle``, ``witness``, each
reference by its name), ``models built``, ``load_state``, ``C acts poisoned``, ``witness
noise``, ``witness spread``, the checks (``e2e checks``, ``replay checks``, ``update
checks``, ``first divergence``), inside them ``compare`` (detail ``actual``: the array
compared, or a tuple of the arrays one pass compares), ``term
magnitudes``, ``replay: float64 ops``, ``replay: float64 inputs``, ``diagnose`` and
``record`` (detail ``module``: a failing torch port's module recorded op by op).
"""
from __future__ import annotations

import contextlib
import functools

_LISTENERS: list = []


@contextlib.contextmanager
def span(category: str, **detail):
    """Mark the work done inside as ``category`` (``detail``: what a listener may inspect)."""
    if not _LISTENERS:
        yield
        return
    listener = _LISTENERS[-1]
    token = listener.enter(category, detail)
    try:
        yield
    finally:
        listener.exit(token)


def marked(category: str):
    """A decorator: every call of the function is a span of ``category``."""
    def wrap(f):
        @functools.wraps(f)
        def call(*args, **kwargs):
            if not _LISTENERS:
                return f(*args, **kwargs)
            with span(category):
                return f(*args, **kwargs)
        return call
    return wrap


@contextlib.contextmanager
def listening(listener):
    """Install ``listener`` for the spans run inside (in any thread), the innermost one
    hearing them."""
    _LISTENERS.append(listener)
    try:
        yield listener
    finally:
        _LISTENERS.remove(listener)
