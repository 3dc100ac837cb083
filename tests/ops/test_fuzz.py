"""Property-based fuzzing of every op of the op table: the C (through CKernels), the NumPy
float32 reference and the torch float32 reference, each against the float64 oracle with
``harness.checks.perop.check_kernel`` (the per-op tolerance of harness/arbiter/tolerances.py).

Hypothesis draws the shapes (B, T, C, NH with C % NH == 0, V <= Vp, OC; small) and the
values: magnitudes from tiny (1e-30) to huge (1e4) wherever float32 can represent the op's
intermediate results (products of two tiny values would underflow: never drawn), constant
layernorm rows (variance 0: rstd = 1/sqrt(eps)), logits around and beyond the C's -10000
softmax floor, token ids at 0 and V-1 (every batch has both), repeated ids, bias None.

Where the C has a genuine edge behaviour, a named test states it and why
(``test_known_*``). The ill-conditioned inputs this file found (on which the float32 C,
NumPy and torch all sat further from the float64 oracle than the per-op tolerance then
allowed) are pinned as ``test_ill_conditioned_*``: the policy now follows their
conditioning (term sizes in harness/arbiter/tolerances.py), and the fuzzed domain covers them.

Profiles (registered here, selected with ``HYPOTHESIS_PROFILE``; applied to this file's
tests only, so other files' hypothesis settings are untouched):
  fast (default): derandomized, few examples per kernel and implementation, < 30 s;
  long (``make fuzz``): many more examples, random.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("fast", derandomize=True, database=None, max_examples=12, **_COMMON)
settings.register_profile("long", max_examples=400, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fast")
FUZZ = settings(parent=settings.get_profile(PROFILE if PROFILE in ("fast", "long") else "fast"))

from harness import CKernels, check_kernel, format_table, load_library, make_inputs, oracle_outputs  # noqa: E402
from harness.arbiter.compare import compare  # noqa: E402
from pyref import numpy_kernels, torch_kernels  # noqa: E402
from pyref.cases import SHAPE_BY_NAME, Shape  # noqa: E402
from pyref.config import PRESETS  # noqa: E402
from pyref.protocol import SIGNATURES, KernelSet, run_kernel  # noqa: E402
from pyref.spec import SPEC, SPECS  # noqa: E402

KERNELS = [c.name for c in SPECS]
IMPLS = ("c", "numpy", "torch")


@pytest.fixture(scope="module")
def lib():
    return load_library()


@pytest.fixture(scope="module")
def impls(lib):
    return {"c": CKernels(lib), "c_naive": CKernels(lib, naive_matmul=True),
            "numpy": KernelSet.from_module(numpy_kernels),
            "torch": KernelSet.from_module(torch_kernels)}


# ----------------------------------------------------------------------------- strategies

# The smallest reduction length fuzzed. It was 8 while a sum of signed terms that
# happened to cancel in a tiny tensor was judged against its own size; the policy now
# judges it against the root-sum-square of its terms
# (test_ill_conditioned_tiny_tensor_cancellation_matmul), so every length is fuzzed.
MIN_REDUCED = 1


@st.composite
def shapes(draw, max_T=12):
    """B <= 8, T <= 12 with B*T <= 32, C = NH*hs (NH <= 8, hs <= 8), V <= Vp <= 80,
    OC <= 40; sizes from MIN_REDUCED up."""
    NH = draw(st.integers(1, 8))
    hs = draw(st.integers(-(-MIN_REDUCED // NH), 8))
    Vp = draw(st.integers(1, 80))
    B = draw(st.integers(1, 8))
    return Shape("fuzz", B=B, T=draw(st.integers(1, max(1, min(max_T, 32 // B)))), C=NH * hs,
                 NH=NH, V=draw(st.integers(1, Vp)), Vp=Vp,
                 OC=draw(st.integers(MIN_REDUCED, 40)))


TINY, HUGE = 1e-30, 1e4
MAGS = (TINY, 1e-3, 1.0, 1e3, HUGE)
# dyadic constants: a row of them sums exactly in float32, so its mean is exact and its
# variance exactly 0 (rstd = 1/sqrtf(1e-5f)) in the C as in the oracle
CONSTANTS = (0.0, 1.0, -2.0, 0.5, -3.25, 1024.0)


def _scale(a, s):
    return (a.astype(np.float64) * s).astype(np.float32)


def _mag_pair(draw, lo=1e-30, hi=1e8):
    """Two magnitudes whose product (an op's term) stays a normal float32 in [lo, hi]."""
    return draw(st.sampled_from([(a, b) for a in MAGS for b in MAGS if lo <= a * b <= hi]))


def _tokens(draw, rng, args, key, n_rows):
    """Random ids with 0 and n_rows-1 present (the op table's maker does that), or all one
    id (every row of encoder_backward's scatter hits one table row)."""
    kind = draw(st.sampled_from(["random", "all_first", "all_last"]))
    if kind != "random":
        args[key] = np.full_like(args[key], 0 if kind == "all_first" else n_rows - 1)
    note(f"tokens: {kind}")


def _constant_rows(draw, rng, x):
    """Set some (b, t) rows of x to one dyadic constant each."""
    rows = x.reshape(-1, x.shape[-1])
    k = draw(st.integers(0, rows.shape[0]))
    pick = rng.choice(rows.shape[0], size=k, replace=False)
    for r in pick:
        rows[r] = draw(st.sampled_from(CONSTANTS))
    note(f"{k} constant rows")
    return x


def _ln_stats(inp):
    x = inp.astype(np.float64)
    return (x.mean(-1).astype(np.float32),
            (1.0 / np.sqrt(x.var(-1) + 1e-5)).astype(np.float32))


def _vary(draw, rng, kernel, s: Shape, args: dict, gradual: bool = True) -> dict:
    """Kernel-specific value scenarios on top of the op table's input maker. ``gradual``:
    the implementation keeps IEEE gradual underflow; a flush-to-zero build (-Ofast) loses
    subnormal terms by its own choice, so it is not sent where they decide the result."""
    d = lambda strat, label: _noted(draw(strat), label)   # noqa: E731
    if kernel == "encoder_forward":
        args["wte"] = _scale(args["wte"], d(st.sampled_from(MAGS), "wte scale"))
        args["wpe"] = _scale(args["wpe"], d(st.sampled_from(MAGS), "wpe scale"))
        _tokens(draw, rng, args, "inp", s.Vp)
    elif kernel == "encoder_backward":
        m = d(st.sampled_from(MAGS), "scale")
        for k in ("dout", "dwte", "dwpe"):
            args[k] = _scale(args[k], m)
        _tokens(draw, rng, args, "inp", s.Vp)
    elif kernel == "layernorm_forward":
        m = d(st.sampled_from(MAGS), "inp scale")
        # |row mean| / row std up to 200: the mean's rounding, amplified by rstd, is what
        # the policy's term size for layernorm follows (formerly tolerance gap A)
        loc = d(st.sampled_from((0.0, 0.5, -1.0, 30.0, -200.0)), "inp mean / scale")
        x = rng.standard_normal(args["inp"].shape) * m + loc * m
        args["inp"] = _constant_rows(draw, rng, x.astype(np.float32))
        wm = d(st.sampled_from((1e-3, 1.0, 1e3)), "weight/bias scale")
        args["weight"], args["bias"] = _scale(args["weight"], wm), _scale(args["bias"], wm)
    elif kernel == "layernorm_backward":
        m = d(st.sampled_from(MAGS), "inp scale")
        x = (rng.standard_normal(args["inp"].shape) * m).astype(np.float32)
        args["inp"] = _constant_rows(draw, rng, x)
        args["mean"], args["rstd"] = _ln_stats(args["inp"])
        g = d(st.sampled_from(MAGS), "dout scale")
        for k in ("dout", "dinp", "dweight", "dbias"):
            args[k] = _scale(args[k], g)
    elif kernel == "matmul_forward":
        mi, mw = _mag_pair(draw)
        if gradual and d(st.booleans(), "subnormal terms"):
            # products ~1e-42: float32 subnormals with a few digits left, summed into a
            # result that may be subnormal too (the policy's underflow floor)
            mi, mw = 1e-30, 1e-12
        note(f"inp scale {mi}, weight scale {mw}")
        args["inp"], args["weight"] = _scale(args["inp"], mi), _scale(args["weight"], mw)
        args["bias"] = None if d(st.booleans(), "bias None") else _scale(args["bias"], mi * mw)
    elif kernel == "matmul_backward":
        mo, mx = _mag_pair(draw)
        if gradual and d(st.booleans(), "subnormal terms"):
            mo, mx = 1e-30, 1e-12
        note(f"dout scale {mo}, inp/weight scale {mx}")
        args["dout"] = _scale(args["dout"], mo)
        args["inp"], args["weight"] = _scale(args["inp"], mx), _scale(args["weight"], mx)
        for k in ("dinp", "dweight", "dbias"):
            args[k] = _scale(args[k], mo * mx)
        if d(st.booleans(), "dbias None"):
            args["dbias"] = None
    elif kernel == "attention_forward":
        C = s.C
        # q, k up to N(0, 10^2) (scores ~100): the scores' rounding, made relative by the
        # softmax, is what the policy's term size for att follows (formerly tolerance gap C)
        mqk = d(st.sampled_from((1e-15, 1e-3, 1.0, 2.0, 10.0)), "q,k scale")
        mv = d(st.sampled_from(MAGS), "v scale")
        args["inp"][..., :2 * C] = _scale(args["inp"][..., :2 * C], mqk)
        args["inp"][..., 2 * C:] = _scale(args["inp"][..., 2 * C:], mv)
    elif kernel == "attention_backward":
        C = s.C
        mqk = d(st.sampled_from((1e-3, 1.0, 2.0)), "q,k scale")
        g = d(st.sampled_from(MAGS), "dout scale")
        args["inp"][..., :2 * C] = _scale(args["inp"][..., :2 * C], mqk)
        for k in ("dout", "dinp", "dpreatt", "datt"):
            args[k] = _scale(args[k], g)
    elif kernel in ("gelu_forward", "gelu_backward"):
        m = d(st.sampled_from(MAGS), "inp scale")
        args["inp"] = _scale(args["inp"], m)
        if kernel == "gelu_backward":
            g = d(st.sampled_from(MAGS), "dout scale")
            args["dout"], args["dinp"] = _scale(args["dout"], g), _scale(args["dinp"], g)
    elif kernel == "residual_forward":
        args["inp1"] = _scale(args["inp1"], d(st.sampled_from(MAGS), "inp1 scale"))
        args["inp2"] = _scale(args["inp2"], d(st.sampled_from(MAGS), "inp2 scale"))
    elif kernel == "residual_backward":
        g = d(st.sampled_from(MAGS), "scale")
        for k in ("dout", "dinp1", "dinp2"):
            args[k] = _scale(args[k], g)
    elif kernel == "softmax_forward":
        kind = d(st.sampled_from(["scaled", "near_floor", "below_floor", "mixed_rows"]), "logits")
        x = rng.standard_normal(args["logits"].shape)
        if kind == "scaled":
            x = x * d(st.sampled_from((TINY, 1e-3, 1.0, 30.0, 1e3, HUGE)), "scale")
            # rows whose every logit is below the floor are the named known behaviour
            # (NaN), not this property: lift them so that their max is 0
            low = x[..., :s.V].max(-1, keepdims=True)
            x = np.where(low < -9000.0, x - low, x)
        elif kind == "near_floor":          # the max right around -10000: floor or not
            x = -10000.0 + 5.0 * x
        elif kind == "below_floor":         # every logit below the floor, none underflowing:
            x = -10040.0 + 10.0 * np.clip(x, -3, 3)   # maxval stays -10000, exp(-70..-10)
        else:                               # a row at the floor next to ordinary rows
            x = 3.0 * x
            x.reshape(-1, x.shape[-1])[0] -= 10020.0
        args["logits"] = x.astype(np.float32)
    elif kernel == "crossentropy_forward":
        p = args["probs"]
        kind = d(st.sampled_from(["plain", "tiny_target_prob", "certain"]), "probs")
        tgt = args["targets"]
        if kind == "tiny_target_prob":      # -log(1e-30) = 69
            np.put_along_axis(p, tgt[..., None].astype(np.intp), np.float32(TINY), axis=-1)
        elif kind == "certain":             # p = 1 exactly: loss 0
            p[...] = 0
            np.put_along_axis(p, tgt[..., None].astype(np.intp), np.float32(1), axis=-1)
        _tokens(draw, rng, args, "targets", s.V)
    elif kernel == "crossentropy_softmax_backward":
        g = d(st.sampled_from(MAGS), "dlosses scale")
        args["dlosses"] = _scale(args["dlosses"], g)
        args["dlogits"] = _scale(args["dlogits"], g)
        _tokens(draw, rng, args, "targets", s.V)
    elif kernel == "adamw":
        n = args["param"].size
        args["lr"] = d(st.sampled_from((1e-4, 6e-4, 1e-3)), "lr")
        args["beta1"] = d(st.sampled_from((0.9, 0.0, 0.95)), "beta1")
        args["beta2"] = d(st.sampled_from((0.999, 0.95)), "beta2")
        args["eps"] = d(st.sampled_from((1e-8, 1e-6)), "eps")
        args["weight_decay"] = d(st.sampled_from((0.0, 0.1)), "weight_decay")
        args["t"] = d(st.sampled_from((1, 2, 10, 1000, 100000)), "t")
        gm = d(st.sampled_from((1e-15, 1e-3, 1.0, 1e3)), "grad scale")
        g = rng.standard_normal(n) * gm
        # a realistic state: m ~ g, v ~ g^2 (the update m_hat/sqrt(v_hat) is O(1))
        args["grad"] = g.astype(np.float32)
        args["m"] = (g * rng.uniform(0.5, 1.5, n)).astype(np.float32)
        args["v"] = (g * g * rng.uniform(0.5, 2.0, n)).astype(np.float32)
    return args


def _noted(value, label):
    note(f"{label}: {value!r}")
    return value


def _check(impl, kernel, args, s, label):
    check = SPEC[kernel]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            expected = oracle_outputs(kernel, args)
            for name, e in expected.items():     # see MIN_REDUCED
                if name in check.output_names and check.n(name, args) > 1:
                    mask = check.mask(name, args)
                    assume((e.size if mask is None else e[..., mask].size) >= MIN_REDUCED)
            results = check_kernel(impl, kernel, args, expected=expected, label=label)
    note(f"{s!r}")
    bad = [c for c in results if not c.passed]
    assert not bad, "\n".join(c.message() for c in bad) + "\n" + format_table(results)
    return results


def _case(data, kernel, gradual: bool = True, **shape_kw):
    s = data.draw(shapes(**shape_kw), label="shape")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    args = SPEC[kernel].make(s, rng)
    return _vary(data.draw, rng, kernel, s, args, gradual), s


# ----------------------------------------------------------------------------- the fuzz

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", KERNELS)
@FUZZ
@given(data=st.data())
def test_fuzz(impls, lib, kernel, impl, data):
    args, s = _case(data, kernel, gradual=not (impl == "c" and lib.fp_mode.ftz))
    _check(impls[impl], kernel, args, s, impl)


@FUZZ
@given(data=st.data())
def test_fuzz_matmul_forward_naive_path(impls, lib, data):
    """The C's matmul_forward_naive called directly (matmul_forward takes it only when
    B*T % 8 != 0)."""
    args, s = _case(data, "matmul_forward", gradual=not lib.fp_mode.ftz)
    _check(impls["c_naive"], "matmul_forward", args, s, "c_naive")


# ----------------------------------------------------------------------------- known behaviours

def _quiet(fn, *a):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*a)


def test_known_softmax_all_below_floor_gives_nan(impls):
    """softmax_forward's running max starts at -10000.0f (the original's floor). When every
    logit of a row is below -10000 - 103.9, maxval stays -10000, every expf(logit - maxval)
    underflows to 0 and the C divides 0 by 0: the row's probabilities are NaN (the padding
    stays 0). The float32 NumPy and torch references mirror the floor and do the same. The
    float64 oracle only underflows below -10000 - 745: between the two it has a proper
    softmax, so the check reports the row as non-finite mismatches (it does not raise)."""
    B, T, V, Vp = 2, 3, 6, 8
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((B, T, Vp))).astype(np.float32)
    logits[0, 1, :V] = np.linspace(-10200.0, -10110.0, V)   # float32 underflow only
    logits[1, 2, :V] = -20000.0                              # float64 underflows too
    ordinary = np.ones((B, T), bool)
    ordinary[0, 1] = ordinary[1, 2] = False
    for name in IMPLS:
        probs = _quiet(impls[name].softmax_forward, logits, V)
        assert np.isnan(probs[0, 1, :V]).all() and np.isnan(probs[1, 2, :V]).all(), name
        assert (probs[..., V:] == 0).all(), name
        assert np.isfinite(probs[ordinary]).all(), name
        np.testing.assert_allclose(probs[ordinary][:, :V].sum(-1), 1.0, rtol=1e-6)
    oracle = _quiet(oracle_outputs, "softmax_forward", {"logits": logits, "V": V})["probs"]
    assert np.isfinite(oracle[0, 1]).all() and abs(oracle[0, 1].sum() - 1) < 1e-12
    assert np.isnan(oracle[1, 2, :V]).all()
    (c,) = _quiet(check_kernel, impls["c"], "softmax_forward", {"logits": logits, "V": V})
    assert not c.passed and c.n_nonfinite_mismatch == V          # row (0, 1) only
    assert c.worst_index[:2] == (0, 1)


def test_known_softmax_below_floor_subnormal_exp_loses_precision(impls, lib):
    """Between the two underflows: every logit of a row in (-10104, -10087) gives expf
    values that are float32 subnormals (exp(-87) is the smallest normal), with only a few
    significant bits. The C still normalises them (finite, summing to 1), but each
    probability is off by up to ~1/2**(bits left) relative: a genuine float32 limit of the
    C's floor, not a tolerance problem. The fuzz keeps every row's max above -10000.
    A library that runs flush-to-zero (-Ofast) flushes those values to 0 and the row
    becomes 0/0 = NaN: reported as well, never passed."""
    B, T, V, Vp = 1, 2, 5, 5
    logits = np.zeros((B, T, Vp), np.float32)
    logits[0, 0] = np.linspace(-10100.0, -10092.0, V)
    probs = _quiet(impls["c"].softmax_forward, logits, V)
    if lib.fp_mode.ftz:
        assert np.isnan(probs[0, 0, :V]).all() and np.isfinite(probs[0, 1]).all()
    else:
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    (c,) = _quiet(check_kernel, impls["c"], "softmax_forward", {"logits": logits, "V": V})
    assert not c.passed and c.worst_index[:2] == (0, 0)
    if lib.fp_mode.ftz:
        assert c.n_nonfinite_mismatch == V
    else:
        assert c.max_rel > 5 * c.tol.rel


@pytest.mark.parametrize("score,oracle_zero", [(-10296.125, False), (-20000.0, True)])
def test_known_attention_all_scores_below_floor_gives_zero_att(impls, score, oracle_zero):
    """attention_forward's max also starts at -10000.0f, but unlike softmax_forward it
    guards the sum: expsum == 0 ? 0 : 1/expsum. So when every causal score of a row is
    below -10000 - 103.9, the C gives att = 0 for the whole row (the diagonal included) and
    out = 0 -- no NaN. NumPy and torch (float32) do the same. The float64 oracle underflows
    only below -10745: above that it has the real (here uniform) attention and the check
    reports the difference; below, it agrees."""
    B, T, C, NH = 1, 4, 8, 2                          # hs = 4: score = -a*a*hs / sqrt(hs)
    a = np.float32(np.sqrt(-score / 2.0))
    inp = np.zeros((B, T, 3 * C), np.float32)
    inp[..., :C], inp[..., C:2 * C] = a, -a           # every q.k = -a^2 hs
    inp[..., 2 * C:] = np.arange(T * C, dtype=np.float32).reshape(B, T, C)
    tri = np.tril(np.ones((T, T), bool))
    for name in IMPLS:
        out, preatt, att = impls[name].attention_forward(inp, NH)
        assert (att == 0).all() and (out == 0).all(), name
        assert np.allclose(preatt[..., tri], score), name
    e = oracle_outputs("attention_forward", {"inp": inp, "NH": NH})
    assert (e["att"] == 0).all() == oracle_zero
    res = {c.name: c for c in check_kernel(impls["c"], "attention_forward",
                                           {"inp": inp, "NH": NH})}
    assert res["attention_forward.preatt"].passed
    assert res["attention_forward.att"].passed == oracle_zero
    assert res["attention_forward.out"].passed == oracle_zero
    if not oracle_zero:
        np.testing.assert_allclose(e["att"][0, 0, 3, :4], 0.25)   # uniform where the C has 0


# ----------------------------------------------------------------------------- ill-conditioned
# Each: an input on which the float32 C, NumPy and torch kernels all (or a legitimate
# reordering) once differed from the float64 oracle by more than the per-op tolerance,
# because the bound did not follow the input's conditioning. Now it does (term sizes in
# harness/arbiter/tolerances.py); these stay as regression tests.

def _all_pass(impls, kernel, args, s, which=IMPLS):
    expected = _quiet(oracle_outputs, kernel, args)
    failures = []
    for name in which:
        res = _quiet(check_kernel, impls[name], kernel, args, expected)
        failures += [f"{name}: {c.name} rel {c.max_rel:.3g} (tol {c.tol.rel:.3g}) norm "
                     f"{c.norm_rel:.3g} (tol {c.tol.norm:.3g})" for c in res if not c.passed]
    assert not failures, "\n".join(failures)




def test_ill_conditioned_layernorm_forward_row_mean_offset(impls):
    """Gap A: rows with |mean| / std ~ 200: the mean's rounding error (u |x|) is amplified
    by rstd (1/std); the bound is relative to the output (~1), not to |x| / std."""
    s = Shape("offset", B=2, T=8, C=8, NH=1, V=1, Vp=1, OC=8)
    rng = np.random.default_rng(0)
    args = dict(inp=(100.0 + 0.5 * rng.standard_normal((2, 8, 8))).astype(np.float32),
                weight=np.ones(8, np.float32), bias=np.zeros(8, np.float32))
    _all_pass(impls, "layernorm_forward", args, s)


def test_ill_conditioned_gelu_forward_all_negative(impls):
    """Gap B: gelu(-4) = 0.5 x (1 + tanh(a)) with 1 + tanhf(a) ~ 7e-5: the cancellation
    turns tanhf's ulp into a ~1e-4 relative error of every output; with no larger element
    in the tensor the RMS scale cannot absorb it."""
    s = Shape("neg", B=1, T=1, C=8, NH=1, V=1, Vp=1, OC=8)
    _all_pass(impls, "gelu_forward", dict(inp=np.full((1, 1, 4), -4.0, np.float32)), s)


def test_ill_conditioned_attention_forward_large_scores(impls):
    """Gap C: q, k ~ N(0, 100) (scores ~ 100): the scores' absolute rounding error
    (u * |score| * sqrt(hs)) becomes a relative error of att (softmax is sensitive to
    absolute errors of its inputs): the op table's own inputs (seed 4) times 10."""
    s = SHAPE_BY_NAME["base"]
    args = make_inputs(SPEC["attention_forward"], s, seed=4)
    args["inp"] = args["inp"] * np.float32(10)
    _all_pass(impls, "attention_forward", args, s)


def test_adamw_op_table_seed_2_within_tolerance(impls):
    """Formerly a tolerance gap (found by this file, fixed in harness/arbiter/tolerances.py's
    term_scale): the op table's own AdamW inputs, seed 2 (t = 5). v ~ |N(0, 1e-4)| can be
    tiny, so m_hat / sqrt(v_hat) ~ 20 for a few elements, whose update carries the float32
    bias correction's error (u / (1 - beta2^t)) far above the tensor's RMS (element 17616
    was 1.5e-6 relative vs 9.5e-7 allowed, identically in C, NumPy and torch)."""
    s = SHAPE_BY_NAME["base"]
    for seed in (2, 3):
        _all_pass(impls, "adamw", make_inputs(SPEC["adamw"], s, seed=seed), s)


def test_ill_conditioned_tiny_tensor_cancellation_matmul(impls):
    """Gap E: a 1-element dweight (OC = C = 1) summed from 4 signed terms that cancel to
    1/30 of their size: NumPy's (legitimately) reordered float32 sum is 37 ulp off, judged
    against the result itself (no tensor RMS to absorb it). Found by the long profile."""
    s = Shape("tiny", B=2, T=2, C=1, NH=1, V=1, Vp=1, OC=1)
    args = SPEC["matmul_backward"].make(s, np.random.default_rng(135))
    args["dout"] = _scale(args["dout"], TINY)
    for k in ("dinp", "dweight", "dbias"):
        args[k] = _scale(args[k], TINY)
    _all_pass(impls, "matmul_backward", args, s)


def test_ill_conditioned_attention_backward_dpreatt_norm_cancellation(impls):
    """Gap E2: rows of T = 2 scores: dpreatt = att * (datt - sum att datt) is a difference
    of nearly equal terms; term_scale relaxes the element-wise bound for that, but the
    norm-wise bound ||a - e|| / ||e|| has no such allowance: NumPy's and torch's (legitimate)
    formula att * (datt - sum) gives norm 1.1e-5 against 9.1e-7 allowed (the C passes here,
    and fails the same way on other seeds). Found by the long profile."""
    s = Shape("T2", B=2, T=2, C=8, NH=1, V=1, Vp=1, OC=8)
    args = SPEC["attention_backward"].make(s, np.random.default_rng(3945))
    args["inp"][..., :2 * s.C] = _scale(args["inp"][..., :2 * s.C], 1e-3)
    _all_pass(impls, "attention_backward", args, s)


def _issue17_case():
    """The long profile's case of issue 17: one head, T = 1, hs = 7, dout ~ 1e-30: datt is a
    single element, a 7-term dot product that cancels to 1/20 of its terms."""
    s = Shape("T1hs7", B=1, T=1, C=7, NH=1, V=1, Vp=1, OC=7)
    args = SPEC["attention_backward"].make(s, np.random.default_rng(16))
    args["inp"][..., :2 * s.C] = _scale(args["inp"][..., :2 * s.C], 1e-3)
    for k in ("dout", "dinp", "dpreatt", "datt"):
        args[k] = _scale(args[k], TINY)
    return args, s


def test_ill_conditioned_attention_backward_single_element_datt(impls):
    """Gap F (issue 17, first read as float32 underflow): C and torch gave datt =
    -4.494451e-32 against the oracle's -4.4944415e-32, 1.05e-6 relative to the result
    against 6.3e-7 allowed. Nothing underflows (v dout ~ 1e-30 is normal, and the same
    failure shows with dout ~ 1): the element cancels, and datt had no term size. It now
    has the root-sum-square of its terms, as matmul's sums do."""
    args, s = _issue17_case()
    _all_pass(impls, "attention_backward", args, s)


def test_planted_bug_still_fails_in_the_issue17_case(impls):
    """The term size does not hide a real error there: datt computed from a value vector
    off by 1e-4 relative (a changed constant) still fails. (1e-5 cannot be told from
    rounding in this one element: its terms are 20x its size, so rounding alone may move
    it by 20 x 6.3e-7 ~ 1.3e-5 of itself.)"""
    args, s = _issue17_case()
    C = s.C

    def wrong(dinp, dpreatt, datt, dout, inp, att, NH):
        inp = inp.copy()
        inp[..., 2 * C:] *= np.float32(1 + 1e-4)
        impls["numpy"].attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)

    bad = KernelSet.from_module({"attention_backward": wrong}, name="wrong")
    res = {c.name: c for c in _quiet(check_kernel, bad, "attention_backward", args)}
    assert not res["attention_backward.datt"].passed


def _issue21_case(eps=1e-3, seed=0):
    """GPT-2's attention shape (T = 64, hs = 64) in the regime that training reaches (issue
    21): every head's value vectors share a common direction v0 (v = v0 + eps noise) and dout
    is orthogonal to v0, so datt = dout . v cancels to ~eps of its terms' size, as it does in
    GPT-2 124M after a few steps (~1/30 there). Early rows (few positions, large att) carry
    datt's rounding error into dpreatt at full weight; as at initialisation, the scores are
    small, so row t's weights are all near 1/(t+1)."""
    s = Shape("gpt2att", B=1, T=64, C=128, NH=2, V=1, Vp=1, OC=128)
    rng = np.random.default_rng(seed)
    args = SPEC["attention_backward"].make(s, rng)
    scores = np.where(np.tril(np.ones((s.T, s.T), bool)), 0.1 * rng.standard_normal((s.B, s.NH, s.T, s.T)), -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    args["att"] = (att / att.sum(-1, keepdims=True)).astype(np.float32)
    C, hs = s.C, s.hs
    v = args["inp"][..., 2 * C:].astype(np.float64).reshape(s.B, s.T, s.NH, hs)
    v0 = rng.standard_normal((1, 1, s.NH, hs))
    v0 /= np.linalg.norm(v0, axis=-1, keepdims=True)
    dout = args["dout"].astype(np.float64).reshape(s.B, s.T, s.NH, hs)
    dout -= (dout * v0).sum(-1, keepdims=True) * v0
    args["inp"][..., 2 * C:] = (v0 + eps * v).reshape(s.B, s.T, C).astype(np.float32)
    args["dout"] = dout.reshape(s.B, s.T, C).astype(np.float32)
    return args, s


def test_attention_backward_with_cancelling_datt_passes(impls):
    """Gap G (issue 21): the unmodified C, NumPy and torch failed grads_acts.preatt's replay
    at GPT-2 124M from the third training step on (up to 2x the bound, always at early
    positions). dpreatt's terms counted each datt with |datt|; its rounding error scales
    with the size of its hs products instead, and it is now counted with that."""
    args, s = _issue21_case()
    _all_pass(impls, "attention_backward", args, s)


def test_the_old_dpreatt_term_size_fails_the_cancelling_case(impls, monkeypatch):
    """The term size that counted datt by its value (the rule before issue 21) fails every
    correct implementation on that case: the case does reproduce the false alarm."""
    import pyref.terms as terms

    def old(a, out):
        att, datt = a["att"], np.abs(out["datt"])
        return att * datt + att * (att * datt).sum(-1, keepdims=True)
    monkeypatch.setattr(terms, "attention_backward_dpreatt", old)
    spec = SPEC["attention_backward"]
    row = spec.output("dpreatt")
    changed = dataclasses.replace(spec, outputs=tuple(dataclasses.replace(o, terms=old) if o is row else o
                                                      for o in spec.outputs))
    monkeypatch.setitem(SPEC, "attention_backward", changed)
    args, s = _issue21_case()
    expected = _quiet(oracle_outputs, "attention_backward", args)
    for name in IMPLS:
        res = {c.name: c for c in _quiet(check_kernel, impls[name], "attention_backward", args, expected)}
        assert not res["attention_backward.dpreatt"].passed, name


def _values_off(rel):
    """datt and dinp from value vectors off by ``rel`` (a changed constant)."""
    def wrong(dinp, dpreatt, datt, dout, inp, att, NH):
        inp = inp.copy()
        C = inp.shape[-1] // 3
        inp[..., 2 * C:] *= np.float32(1 + rel)
        numpy_kernels.attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)
    return wrong


def _jacobian_without_mean(dinp, dpreatt, datt, dout, inp, att, NH):
    """dpreatt = att * datt: the softmax Jacobian's mean term dropped."""
    scratch = np.zeros_like(dpreatt)
    numpy_kernels.attention_backward(dinp, scratch, datt, dout, inp, att, NH)
    dpreatt += att * datt


@pytest.mark.parametrize("wrong, output", [(_values_off(1e-3), "datt"), (_jacobian_without_mean, "dpreatt")],
                         ids=["values-off-1e-3", "jacobian-without-mean"])
def test_planted_bug_still_fails_in_the_cancelling_case(wrong, output):
    """The larger element sizes do not hide a real error there: value vectors off by 1e-3
    relative fail datt, a softmax Jacobian without its mean term fails dpreatt. (At 1e-4
    the value vectors move datt by less than its rounding error in this regime, where it
    cancels to 1/200 of its terms: no element-wise bound can tell that from rounding.)"""
    args, s = _issue21_case()
    bad = KernelSet.from_module({"attention_backward": wrong}, name="wrong")
    res = {c.name: c for c in _quiet(check_kernel, bad, "attention_backward", args)}
    assert not res[f"attention_backward.{output}"].passed


# ----------------------------------------------------------------------------- underflow

def _subnormal_matmul(seed=0):
    """matmul_forward with products inp * weight ~ 1e-30 x 1e-12 = 1e-42: float32
    subnormals (below 2^-126 ~ 1.2e-38), each rounded to a multiple of 2^-149, with no bias."""
    s = Shape("subnormal", B=2, T=4, C=16, NH=1, V=1, Vp=1, OC=6)
    args = SPEC["matmul_forward"].make(s, np.random.default_rng(seed))
    args["inp"], args["weight"] = _scale(args["inp"], 1e-30), _scale(args["weight"], 1e-12)
    args["bias"] = None
    return args, s


def test_underflow_floor_accepts_gradual_underflow(impls, lib):
    """Each product's rounding has an absolute error of up to 2^-150, not u times the
    product: relative to the result that is ~1e-3, a genuine float32 limit that the policy's
    underflow floor (every element judged against a size of at least 2^-126) allows."""
    args, s = _subnormal_matmul()
    e = _quiet(oracle_outputs, "matmul_forward", args)["out"]
    assert 0 < np.abs(e).max() < np.finfo(np.float32).tiny          # the whole result is subnormal
    which = IMPLS if not lib.fp_mode.ftz else ("numpy", "torch")     # FTZ flushes them to 0
    _all_pass(impls, "matmul_forward", args, s, which)
    # without the floor the same outputs would fail: the floor is what lets them pass
    c = _quiet(check_kernel, impls["numpy"], "matmul_forward", args)[0]
    no_floor = compare(_quiet(run_kernel, impls["numpy"], "matmul_forward", args)["out"], e,
                       name="out", tol=dataclasses.replace(c.tol, floor=0.0))
    assert not no_floor.passed and c.passed


@pytest.mark.parametrize("kernel,scales", [
    ("matmul_forward", {"inp": 1e-10, "weight": 1e-10, "bias": 1e-20}),
    ("layernorm_backward", {"dout": 1e-20, "dinp": 1e-20, "dweight": 1e-20, "dbias": 1e-20}),
    ("gelu_forward", {"inp": 1e-20}),
])
def test_underflow_floor_does_not_hide_a_wrong_constant_at_1e_20(impls, kernel, scales):
    """At magnitudes ~1e-20 (normal float32, far above the floor) an output off by 1e-5
    relative, a changed constant, still fails: the floor loosens nothing there."""
    s = SHAPE_BY_NAME["base"]
    args = make_inputs(SPEC[kernel], s, seed=1)
    for k, m in scales.items():
        args[k] = _scale(args[k], m)
    good = _quiet(check_kernel, impls["c"], kernel, args)
    assert all(c.passed for c in good), [c.message() for c in good if not c.passed]
    ref = impls["numpy"]

    def off(*a):
        out = getattr(ref, kernel)(*a)
        if isinstance(out, tuple):
            return (out[0] * np.float32(1 + 1e-5),) + tuple(out[1:])
        if out is not None:
            return out * np.float32(1 + 1e-5)
        named = dict(zip(SIGNATURES[kernel], a))
        named["dinp"] *= np.float32(1 + 1e-5)      # a backward: its input gradient

    bad = KernelSet.from_module({kernel: off}, name="off")
    res = _quiet(check_kernel, bad, kernel, args)
    assert not res[0].passed, res[0].message()
