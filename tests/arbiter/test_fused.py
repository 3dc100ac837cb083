"""The compiled helper (harness/arbiter/fused.py, llmc/fused_checks.c) against the NumPy
reference implementation of the metrics (harness/arbiter/metrics.py): the same verdicts, counts,
maxima and worst element exactly, the sums to the last digits a report shows, on every
layout the helper takes; the layouts it does not take go to NumPy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.arbiter import fused
from harness.arbiter.compare import Tolerance, compare
from pyref import numpy_kernels
from pyref.config import AdamW, preset

pytestmark = pytest.mark.skipif(not fused.available(), reason="the compiled helper could not be built here")

EXACT = ("passed", "n_total", "n_compared", "n_bad", "n_nonfinite_mismatch", "max_abs", "max_ulp",
         "worst_index", "worst_label", "worst_actual", "worst_expected", "worst_ulp")


def _same(a, b, rel=1e-13):
    """Two comparisons agree: the exact fields exactly, the rest (scaled by an RMS, or a
    sum) to ``rel``."""
    for key in EXACT:
        x, y = getattr(a, key), getattr(b, key)
        assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), key
    for key in ("max_rel", "norm_rel", "scale", "worst_rel", "worst_abs"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or x == pytest.approx(y, rel=rel, abs=1e-300, nan_ok=True), key
    # the bias test's group sums: the same terms, added in another order
    assert (a.bias_stats is None) == (b.bias_stats is None)
    if a.bias_stats is not None:
        x, y = a.bias_stats, b.bias_stats
        assert (x.groups, x.scale_t, x.shift_t) == (y.groups, y.scale_t, y.shift_t)
        for key in ("scale", "shift", "share"):
            assert getattr(x, key) == pytest.approx(getattr(y, key), rel=1e-9, abs=1e-25), key
        for key in ("scale_se", "shift_se"):
            assert getattr(x, key) == pytest.approx(getattr(y, key), rel=1e-6, abs=1e-25, nan_ok=True), key


def _case(shape, a_dtype, e_dtype, seed, nonfinite=False):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape)
    a = e * (1 + 3e-7 * rng.standard_normal(shape))
    if nonfinite and a.size > 8:
        a.flat[[1, 5]] = np.nan
        e.flat[[5, 7]] = [np.nan, np.inf]
        a.flat[7] = np.inf
        e.flat[3] = -np.inf
    return a.astype(a_dtype), e.astype(e_dtype)


LAYOUTS = [((1000,), None), ((3, 7, 5), None), ((4, 3, 16, 16), "causal"), ((2, 64, 64), "causal"),
           ((257, 300), None), ((1,), None), ((5, 5), "causal")]


@pytest.mark.parametrize("shape, mask", LAYOUTS)
@pytest.mark.parametrize("dtypes", [(np.float32, np.float64), (np.float64, np.float64), (np.float32, np.float32)])
@pytest.mark.parametrize("es_dtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_the_helper_gives_the_numpy_metrics(shape, mask, dtypes, es_dtype, nonfinite):
    a, e = _case(shape, *dtypes, seed=len(shape) + shape[0], nonfinite=nonfinite)
    es = None if es_dtype is None else (np.abs(e) * 0.3 + 1e-3).astype(es_dtype)
    if es is not None:
        es[~np.isfinite(es)] = 0
    m = np.tril(np.ones(shape[-2:], bool)) if mask else None
    for tol in (Tolerance(rel=2e-7, norm=1e-7, floor=2.0 ** -126), Tolerance(rel=1e-6, norm=1e-6, ulp=3)):
        assert fused.tally(a, e, None if m is None else np.broadcast_to(m, shape), es, None, tol, True) is not None
        for scale in (None, 0.5):
            how = dict(name="x", tol=tol, mask=m, elem_scale=es, scale=scale)
            c, r = compare(a, e, **how), compare(a, e, engine="numpy", **how)
            _same(c, r)
            if scale is not None:   # the same scale: every element's rel is the same number
                assert c.max_rel == r.max_rel


def test_layouts_the_helper_does_not_take_go_to_numpy():
    a, e = _case((6, 8, 8), np.float32, np.float64, seed=1)
    tol = Tolerance(rel=1e-6, norm=1e-6)
    view = a[:, ::2]
    assert fused.tally(view, e[:, ::2], None, None, None, tol, True) is None          # strided
    assert fused.tally(a, e, None, np.ones(8), None, tol, True) is None                  # broadcast sizes
    upper = np.broadcast_to(np.triu(np.ones((8, 8), bool)), a.shape)
    assert fused.tally(a, e, upper, None, None, tol, True) is None                      # another mask
    assert fused.tally(a.astype(np.float16), e, None, None, None, tol, True) is None    # another dtype
    _same(compare(view, e[:, ::2], name="x", tol=tol), compare(view, e[:, ::2], name="x", tol=tol, engine="numpy"))


def test_a_large_tensor_spread_over_threads_gives_the_same_numbers(monkeypatch):
    """The sums go in fixed blocks: one thread and four give the same bits."""
    a, e = _case((300_000,), np.float32, np.float64, seed=3)
    tol = Tolerance(rel=1e-6, norm=1e-6)
    monkeypatch.setattr(fused, "_threads", lambda n: 1)
    one = compare(a, e, name="x", tol=tol)
    monkeypatch.setattr(fused, "_threads", lambda n: 4)
    four = compare(a, e, name="x", tol=tol)
    assert one.summary_row() == four.summary_row()
    _same(one, compare(a, e, name="x", tol=tol, engine="numpy"))


@pytest.mark.parametrize("t", [1, 3])
def test_the_fused_update_check_is_the_numpy_one(monkeypatch, t):
    """The update check's fused AdamW (expected values never stored) gives the NumPy path's
    checks; a wrong parameter fails the same way (judged and diagnosed by NumPy)."""
    from harness import check_update
    cfg = preset("small")
    rng = np.random.default_rng(t)
    P = cfg.num_parameters()
    p = rng.standard_normal(P, dtype=np.float32) * np.float32(0.02)
    g = rng.standard_normal(P, dtype=np.float32) * np.float32(1e-3)
    m = None if t == 1 else rng.standard_normal(P, dtype=np.float32) * np.float32(1e-4)
    v = None if t == 1 else np.abs(m) * np.float32(1e-3)
    post = [p.copy(), np.zeros(P, np.float32) if m is None else m.copy(), np.zeros(P, np.float32) if v is None else v.copy()]
    hyper = AdamW()
    numpy_kernels.adamw(post[0], g, post[1], post[2], *hyper.kernel_args(t).values())
    post[0][77] += np.float32(1e-3)                     # one wrong parameter, in wte

    def rows():
        checks = check_update(cfg, (p, m, v), g, tuple(post), hyper, t, step=t, impl="x")
        return [(c.tensor, c.comparison) for c in checks]
    compiled = rows()
    monkeypatch.setitem(fused._STATE, "lib", None)
    reference = rows()
    assert [name for name, _ in compiled] == [name for name, _ in reference]
    for (name, c), (_, r) in zip(compiled, reference):
        _same(c, r)
    failed = [(name, c) for name, c in compiled if not c.passed]
    assert [name for name, _ in failed] == ["params.wte (after update)"]
    assert getattr(failed[0][1], "diagnosis", None) is not None


def test_worst_values_of_a_fused_update_are_the_elements_own():
    """A fused update check reads no expected array: its worst element's expected value is
    AdamW in float64 on that element alone, the value the NumPy path reads."""
    from harness import check_update
    cfg = preset("tiny")
    rng = np.random.default_rng(5)
    P = cfg.num_parameters()
    p = rng.standard_normal(P, dtype=np.float32)
    g = rng.standard_normal(P, dtype=np.float32)
    post = [p.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)]
    numpy_kernels.adamw(post[0], g, post[1], post[2], *AdamW().kernel_args(1).values())
    checks = check_update(cfg, (p, None, None), g, tuple(post), AdamW(), 1, step=1, impl="x")
    for c in checks:
        cmp = c.comparison
        if cmp.worst_index is not None:
            assert math.isfinite(cmp.worst_expected) and cmp.worst_rel <= cmp.max_rel * (1 + 1e-12)


def test_a_shared_scale_is_computed_once_per_expected_tensor(monkeypatch):
    """Comparisons of several implementations with one float64 tensor (``shared``) compute
    its RMS scale once and give what each computing its own gives; a scale is never carried
    to other expected values (another tensor, or the same one under another mask)."""
    rng = np.random.default_rng(4)
    e1, e2 = rng.standard_normal((3, 16, 16)), rng.standard_normal((3, 16, 16)) * 7.0
    mask = np.tril(np.ones((16, 16), bool))
    tol = Tolerance(rel=1e-5, norm=1e-6)
    calls = []
    own = fused._expected_scale
    monkeypatch.setattr(fused, "_expected_scale", lambda *a: calls.append(1) or own(*a))
    shared: dict = {}
    for e, m in ((e1, None), (e1, mask), (e2, None)):
        for k in range(3):     # three implementations, each off by its own rounding
            a = (e * (1 + rng.uniform(-1e-7, 1e-7, e.shape))).astype(np.float32)
            assert compare(a, e, name="x", tol=tol, mask=m, shared=shared) == \
                compare(a, e, name="x", tol=tol, mask=m)
    assert len(calls) == 3 * 3 + 3      # each unshared comparison its own, the shared ones once per tensor
