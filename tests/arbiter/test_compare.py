"""Tests of harness/arbiter/compare.py: the metrics, the worst element, masks, views, memory."""
from __future__ import annotations

import json
import math
import sys
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.arbiter import compare as cmp_mod  # noqa: E402
from harness.arbiter import metrics as metrics_mod  # noqa: E402
from harness.arbiter import fused  # noqa: E402
from harness.arbiter.compare import (  # noqa: E402
    Comparison, ParityError, Tolerance, assert_parity, compare, ulp_distance,
)
from harness import format_table  # noqa: E402

TOL = Tolerance(rel=1e-6, norm=1e-6, why="test tolerance")


@pytest.fixture(autouse=True, params=["fused", "numpy"])
def engine(request, monkeypatch):
    """Every test of the metrics runs on both engines: the compiled helper (where it takes
    the arrays as they lie) and the NumPy reference implementation."""
    if request.param == "numpy":
        monkeypatch.setitem(fused._STATE, "lib", None)
    elif not fused.available():
        pytest.skip("the compiled helper could not be built here")
    return request.param
F32 = np.float32


def check(actual, expected, tol=TOL, name="t", **kw) -> Comparison:
    """compare() on read-only views, so any write into the inputs raises."""
    actual, expected = np.asarray(actual).view(), np.asarray(expected).view()
    actual.flags.writeable = False
    expected.flags.writeable = False
    return compare(actual, expected, name=name, tol=tol, **kw)


def randn(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ equality and basics
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("edtype", [np.float32, np.float64])
def test_exact_equality_passes_with_zero_metrics(shape, edtype):
    a = randn(shape, dtype=F32)
    c = check(a, a.astype(edtype), tol=Tolerance.exact())
    assert c.passed and c.n_bad == 0 and c.n_nonfinite_mismatch == 0
    assert (c.max_abs, c.max_rel, c.max_ulp, c.norm_rel) == (0.0, 0.0, 0, 0.0)
    assert c.n_compared == c.n_total == math.prod(shape)
    assert "is close" in c.message()


@pytest.mark.parametrize("shape,mask", [((0,), None), ((3, 0, 2), None),
                                        ((4, 4), np.zeros((4, 4), bool))])
def test_empty_comparison_passes_with_zeros(shape, mask):
    c = check(np.ones(shape, F32), np.zeros(shape), tol=Tolerance.exact(), mask=mask)
    assert c.passed and c.n_compared == 0 and c.n_bad == 0
    assert (c.max_abs, c.max_rel, c.max_ulp, c.norm_rel) == (0.0, 0.0, 0, 0.0)
    assert c.worst_index is None
    json.dumps(c.summary_row(), allow_nan=False)


# ------------------------------------------------------------------ the worst element
@pytest.mark.parametrize("index", [(0, 0, 0, 0), (1, 2, 5, 17), (1, 2, 7, 47)])
@pytest.mark.parametrize("axes,label", [
    (("layer", "b", "t", "c"), "layer={} b={} t={} c={}"),
    (None, "i0={} i1={} i2={} i3={}"),
])
def test_single_perturbed_element_is_found_and_labelled(index, axes, label):
    e = randn((2, 3, 8, 48))
    a = e.astype(F32)
    a[index] = F32(a[index] + 0.25)
    c = check(a, e, axes=axes)
    assert not c.passed and c.n_bad == 1
    assert c.worst_index == index and c.worst_label == label.format(*index)
    assert c.worst_actual == float(a[index]) and c.worst_expected == float(e[index])
    assert c.worst_abs == pytest.approx(0.25, rel=1e-5)
    msg = c.message()
    assert label.format(*index) in msg
    assert str(a[index]) in msg and str(e[index]) in msg
    assert "1 / 2304" in msg and "test tolerance" in msg


def test_scalar_tensor_worst_index_is_empty_tuple():
    c = check(np.float32(2.0), np.float64(1.0))
    assert c.worst_index == () and c.worst_label == "(scalar)" and c.n_bad == 1


@pytest.mark.parametrize("k", [0, 1, 5, 100])
def test_mismatch_counts(k):
    e = randn((50, 40), seed=1)
    a = e.astype(F32)
    idx = np.random.default_rng(2).choice(a.size, size=k, replace=False)
    a.flat[idx] += 1.0
    c = check(a, e)
    assert c.n_bad == k and c.passed == (k == 0)
    assert f"{k} / 2000" in c.message()


@pytest.mark.parametrize("norm,passed", [(1e-6, False), (1e-4, True)])
def test_systematic_perturbation_is_caught_by_the_norm(norm, passed):
    e = randn((64, 64), seed=3)
    a = e * (1 + 1e-5)
    c = check(a, e, tol=Tolerance(rel=1e-3, norm=norm, why="systematic"))
    assert c.n_bad == 0
    assert c.norm_rel == pytest.approx(1e-5, rel=1e-6)
    assert c.passed is passed
    assert ("norm" in c.failed_checks()) is (not passed)


# ------------------------------------------------------------------ non-finite values
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("av,ev,nan_equal,mismatch", [
    (NAN, 1.0, True, True), (1.0, NAN, True, True),
    (NAN, NAN, True, False), (NAN, NAN, False, True),
    (INF, -INF, True, True), (-INF, INF, True, True), (INF, INF, True, False),
    (-INF, -INF, True, False), (INF, 3.0, True, True), (3.0, -INF, True, True),
    (NAN, INF, True, True),
])
def test_nonfinite_mismatches(av, ev, nan_equal, mismatch):
    e = randn((4, 6), seed=4)
    a = e.astype(F32)
    a[2, 3], e[2, 3] = av, ev
    c = check(a, e, nan_equal=nan_equal)
    assert c.n_nonfinite_mismatch == int(mismatch) and c.n_bad == int(mismatch)
    assert c.passed is (not mismatch)
    assert math.isfinite(c.max_rel) and math.isfinite(c.norm_rel)   # finite pairs only
    if mismatch:
        assert c.worst_index == (2, 3)
        assert "Non-finite mismatches: 1" in c.message()
    json.dumps(c.summary_row(), allow_nan=False)


def test_nonfinite_mismatch_is_worse_than_any_finite_error():
    e = randn((10, 10), seed=5)
    a = e.astype(F32)
    a[1, 1] += 1000.0
    a[7, 2] = NAN
    c = check(a, e)
    assert c.worst_index == (7, 2) and c.n_bad == 2 and c.n_nonfinite_mismatch == 1


# ------------------------------------------------------------------ masks
def test_masked_out_huge_error_passes():
    e = randn((6, 6), seed=6)
    a = e.astype(F32)
    a[0, 5] = 1e30
    a[1, 4] = NAN
    mask = np.tril(np.ones((6, 6), bool))
    assert not check(a, e).passed
    c = check(a, e, mask=mask)
    assert c.passed and c.n_compared == 21 and c.n_total == 36
    assert "15 masked out" in c.message()


def test_worst_index_through_broadcast_causal_mask():
    L, B, NH, T = 2, 2, 3, 8
    e = randn((L, B, NH, T, T), seed=7)
    a = e.astype(F32)
    a[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = 1e9   # garbage above
    a[1, 0, 2, 6, 3] += 0.5                                              # real error below
    c = check(a, e, mask=np.tril(np.ones((T, T), bool)),
              axes=("layer", "b", "h", "t", "t2"))
    assert c.worst_index == (1, 0, 2, 6, 3)
    assert c.worst_label == "layer=1 b=0 h=2 t=6 t2=3"
    assert c.n_bad == 1 and c.n_compared == L * B * NH * T * (T + 1) // 2


@pytest.mark.parametrize("mask,exc", [(np.ones((3,), bool), ValueError),
                                      (np.ones((4, 5), np.int8), TypeError)])
def test_bad_masks_are_rejected(mask, exc):
    with pytest.raises(exc):
        check(np.zeros((4, 5), F32), np.zeros((4, 5)), mask=mask)


# ------------------------------------------------------------------ ulps
TINY_DENORM = np.float32(1e-45)


@pytest.mark.parametrize("a,b,expected", [
    (1.0, np.nextafter(F32(1.0), F32(2.0)), 1),
    (1.0, np.nextafter(F32(1.0), F32(0.0)), 1),
    (-1.0, np.nextafter(F32(-1.0), F32(0.0)), 1),
    (0.0, -0.0, 0),
    (TINY_DENORM, -TINY_DENORM, 2),
    (0.0, TINY_DENORM, 1),
    (-0.0, TINY_DENORM, 1),
    (np.finfo(F32).max, INF, 1),
    (1.0, 2.0, 1 << 23),
])
def test_ulp_distance(a, b, expected):
    assert int(ulp_distance(F32(a), F32(b))) == expected
    c = check(np.array([a], F32), np.array([b], F32))
    assert c.worst_ulp == expected
    assert c.max_ulp == (expected if np.isfinite(b) else 0)   # max_ulp: finite pairs only


def test_ulp_tolerance_counts_elements_beyond_it():
    e = np.ones(10, F32)
    a = e.copy()
    a[3] = np.nextafter(np.nextafter(F32(1), F32(2)), F32(2))            # 2 ulp
    a[5] = np.nextafter(F32(1), F32(2))                                 # 1 ulp
    c = check(a, e, tol=Tolerance(rel=1.0, norm=1.0, ulp=1))
    assert c.max_ulp == 2 and c.n_bad == 1 and c.worst_index == (3,) and not c.passed
    assert check(a, e, tol=Tolerance(rel=1.0, norm=1.0, ulp=2)).passed


# ------------------------------------------------------------------ views and memory
@pytest.mark.parametrize("view", ["vocab_slice", "transpose", "step"])
@pytest.mark.parametrize("chunk", [None, 37])
def test_noncontiguous_views_are_compared_and_not_modified(view, chunk):
    base = randn((3, 5, 17), seed=8, dtype=F32)
    ref = base.astype(np.float64)
    take = {"vocab_slice": lambda x: x[..., :13], "transpose": lambda x: x.transpose(2, 0, 1),
            "step": lambda x: x[::2, 1::2, ::3]}[view]
    before = base.copy()
    a, e = take(base), take(ref)
    e = e.copy()
    e[(1,) * e.ndim] += 1.0
    with mock.patch.object(metrics_mod, "CHUNK_ELEMS", chunk or metrics_mod.CHUNK_ELEMS):
        c = check(a, e)
    assert not a.flags.c_contiguous
    assert np.array_equal(base, before)
    assert c.n_bad == 1 and c.worst_index == (1,) * e.ndim
    contiguous = check(np.ascontiguousarray(a), e)
    # the default scale (an RMS) may differ in its last bit with the chunking
    assert c.max_rel == pytest.approx(contiguous.max_rel, rel=1e-14)
    assert (c.max_ulp, c.n_bad, c.worst_index) == (contiguous.max_ulp, contiguous.n_bad,
                                                   contiguous.worst_index)


@pytest.mark.parametrize("layout", ["contiguous", "logits_view"])
def test_large_arrays_are_chunked_without_full_size_temporaries(layout):
    rng = np.random.default_rng(9)
    if layout == "contiguous":
        a = rng.standard_normal(20_000_000, dtype=F32)
        bad = (19_999_000,)
    else:                                   # (B, T, Vp)[..., :V], like logits
        a = rng.standard_normal((2, 1000, 10_007), dtype=F32)[..., :10_000]
        bad = (1, 999, 9_998)
    e = np.array(a, dtype=F32, order="C")
    e[bad] += 1.0
    a_sum = float(np.sum(a, dtype=np.float64))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        c = check(a, e, mask=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < a.nbytes / 8, f"peak {peak / 2**20:.1f} MiB for {a.nbytes / 2**20:.0f} MiB"
    assert c.n_bad == 1 and c.worst_index == bad and c.n_compared == a.size
    assert float(np.sum(a, dtype=np.float64)) == a_sum


# ------------------------------------------------------------------ scale
@pytest.mark.parametrize("case", ["all_zero", "zero_with_denormal", "tiny_values"])
def test_scale_near_zero_does_not_blow_up(case):
    if case == "all_zero":
        e, a = np.zeros(16), np.zeros(16, F32)
    elif case == "zero_with_denormal":
        e, a = np.zeros(16), np.zeros(16, F32)
        a[4] = TINY_DENORM
    else:                                   # tiny expected values, some exactly 0
        e = randn(16, seed=10) * 1e-30
        e[::3] = 0.0
        a = e.astype(F32)
    c = check(a, e, tol=Tolerance(rel=1e-3, norm=1.0))
    assert c.scale > 0 and math.isfinite(c.max_rel) and c.max_rel < 1e-3 and c.n_bad == 0
    if case == "zero_with_denormal":        # ||e|| = 0 < ||a - e||: norm-wise error is inf
        assert c.norm_rel == INF and not c.passed and c.failed_checks() == ["norm"]
        json.dumps(c.summary_row(), allow_nan=False)
    else:
        assert c.passed


def test_explicit_scale_is_used():
    c = check(np.array([1.5], F32), np.array([1.0]), scale=1.0)
    assert c.scale == 1.0 and c.max_rel == 0.25


# ------------------------------------------------------------------ errors and output
@pytest.mark.parametrize("sa,se", [((3, 4), (4, 3)), ((3, 4), (3, 4, 1)), ((5,), ())])
def test_shape_mismatch_raises_naming_both_shapes(sa, se):
    with pytest.raises(ValueError) as info:
        check(np.zeros(sa, F32), np.zeros(se))
    assert str(sa) in str(info.value) and str(se) in str(info.value)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([True, False]),
                                 np.array([1 + 2j, 3j]), np.array([None, 1], object)])
def test_non_numeric_dtypes_are_rejected(bad):
    with pytest.raises(TypeError):
        check(bad, np.zeros(2))
    with pytest.raises(TypeError):
        check(np.zeros(2, F32), bad)


@pytest.mark.parametrize("kw", [dict(rel=-1, norm=0), dict(rel=NAN, norm=0),
                                dict(rel=0, norm=0, ulp=-1), dict(rel=0, norm=0, ulp=1.5)])
def test_invalid_tolerances_are_rejected(kw):
    with pytest.raises((TypeError, ValueError)):
        Tolerance(**kw)


def test_axes_length_must_match():
    with pytest.raises(ValueError):
        check(np.zeros((2, 2), F32), np.zeros((2, 2)), axes=("b",))


@pytest.mark.parametrize("av,ev", [(1.0, 1.0), (2.0, 1.0), (NAN, 1.0), (INF, -INF)])
def test_summary_row_is_strict_json(av, ev):
    c = check(np.array([av, 0.5], F32), np.array([ev, 0.5]))
    row = json.loads(json.dumps(c.summary_row(), allow_nan=False))
    assert row["name"] == "t" and row["passed"] == c.passed and row["n_bad"] == c.n_bad
    assert json.loads(c.to_json()) == row


def test_assert_parity_raises_parity_error_with_message():
    e = randn((4, 4), seed=11)
    a = e.astype(F32)
    assert assert_parity(a, e, name="ok", tol=TOL).passed
    a[2, 1] += 1
    with pytest.raises(AssertionError) as info:
        assert_parity(a, e, name="fch", tol=TOL, axes=("t", "c"))
    assert isinstance(info.value, ParityError)
    assert info.value.comparison.worst_index == (2, 1)
    assert "'fch'" in str(info.value) and "t=2 c=1" in str(info.value)


def test_format_table():
    e = randn((4, 4), seed=12)
    good = check(e.astype(F32), e, name="ln1")
    a = e.astype(F32)
    a[3, 0] = NAN
    bad = check(a, e, name="preatt", axes=("t", "t2"))
    table = format_table([good, bad], title="forward")
    lines = table.splitlines()
    assert lines[0] == "forward" and "max rel" in lines[1] and "verdict" in lines[1]
    assert lines[3].startswith("ln1") and lines[3].endswith("OK")
    assert lines[4].startswith("preatt") and lines[4].endswith("FAIL") and "t=3 t2=0" in lines[4]
    assert lines[-1] == "1 OK, 1 FAIL"


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    e = randn((3, 4), seed=13)
    c = compare(torch.from_numpy(e.astype(F32)), torch.from_numpy(e), name="t", tol=TOL)
    assert c.passed and c.n_compared == 12


# ------------------------------------------------------------------ property test
def _naive(a, e, tol, mask, nan_equal, scale):
    """Full-array reference implementation of the metrics (no chunking, no tricks)."""
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    m = np.ones(a.shape, bool) if mask is None else np.broadcast_to(mask, a.shape)
    with np.errstate(all="ignore"):
        fe = np.isfinite(e64) & m
        rms = math.sqrt(np.mean(e64[fe] ** 2)) if fe.any() else 0.0
        rms = rms or float(np.finfo(F32).tiny)
        if scale is None:
            scale = rms
        both = np.isfinite(a64) & np.isfinite(e64) & m
        d = np.abs(a64 - e64)
        rel = d / (np.abs(e64) + scale)

        def key(x):
            b = x.astype(F32).view(np.int32).astype(np.int64)
            return np.where(b < 0, -(b & 0x7FFFFFFF), b)
        ulp = np.abs(key(a) - key(e))
        mism = m & ~(np.isfinite(a64) & np.isfinite(e64)) & ~(
            (a64 == e64) | (nan_equal & np.isnan(a64) & np.isnan(e64)))
    bad = both & ((rel > tol.rel) | ((ulp > tol.ulp) if tol.ulp is not None else False))
    if mism.any():
        worst = np.unravel_index(np.flatnonzero(mism)[0], a.shape)
    elif both.any():
        worst = np.unravel_index(np.argmax(np.where(both, rel, -1.0)), a.shape)
    else:
        worst = None
    return dict(
        max_abs=float(d[both].max(initial=0.0)), max_rel=float(rel[both].max(initial=0.0)),
        max_ulp=int(ulp[both].max(initial=0)), n_bad=int(bad.sum() + mism.sum()),
        n_nonfinite_mismatch=int(mism.sum()), n_compared=int(m.sum()),
        worst_index=None if worst is None else tuple(int(i) for i in worst),
        norm=(np.linalg.norm(d[both]), np.linalg.norm(e64[both])), rms=rms,
    )


SPECIALS = [NAN, INF, -INF, 0.0, -0.0, 1e-45, 3e38]
values = st.one_of(st.floats(-1e4, 1e4, width=64), st.sampled_from(SPECIALS))


@st.composite
def cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=7))
    e = draw(hnp.arrays(np.float64, shape, elements=values))
    noise = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e-3, 1e-3)))
    replace = draw(hnp.arrays(bool, shape, elements=st.booleans()))
    other = draw(hnp.arrays(np.float64, shape, elements=values))
    a = np.where(replace & draw(st.booleans()), other, e * (1 + noise)).astype(F32)
    layout = draw(st.sampled_from(["C", "transposed", "reversed"]))
    if layout == "transposed":                             # non-contiguous views
        a, e = a.T, e.T
    elif layout == "reversed":
        a, e = a[..., ::-1], e[..., ::-1]
    mask = None
    if draw(st.booleans()) and a.ndim >= 1:               # broadcast over leading axes
        mask = draw(hnp.arrays(bool, a.shape[-1:], elements=st.booleans()))
    tol = Tolerance(rel=draw(st.sampled_from([0.0, 1e-7, 1e-5, 1e-3])), norm=1e-4,
                    ulp=draw(st.sampled_from([None, 0, 3, 1000])))
    return a, e, mask, tol, draw(st.booleans())


@pytest.mark.parametrize("chunk", [5, 64, None])
@settings(max_examples=50, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_metrics_agree_with_naive_reference(chunk, case):
    a, e, mask, tol, nan_equal = case
    with mock.patch.object(metrics_mod, "CHUNK_ELEMS", chunk or metrics_mod.CHUNK_ELEMS):
        # explicit scale: bit-identical rel values, so every metric must agree exactly
        c = check(a, e, tol=tol, mask=mask, nan_equal=nan_equal, scale=0.75)
        default = check(a, e, tol=tol, mask=mask, nan_equal=nan_equal)
    ref = _naive(a, e, tol, mask, nan_equal, scale=0.75)
    for key in ("max_abs", "max_rel", "max_ulp", "n_bad", "n_nonfinite_mismatch",
                "n_compared", "worst_index"):
        assert getattr(c, key) == ref[key], key
    num, den = ref["norm"]
    assert c.norm_rel == pytest.approx(num / den if den else (0.0 if num == 0 else INF),
                                       rel=1e-9, abs=1e-300)
    assert c.passed == (c.n_bad == 0 and c.norm_rel <= tol.norm)
    assert default.scale == pytest.approx(ref["rms"], rel=1e-12)
    json.dumps(default.summary_row(), allow_nan=False)
    default.message()
