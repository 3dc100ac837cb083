"""Bit-for-bit determinism of the C: across OpenMP thread counts (1, 2, 4) and across
repeated runs.

The spec: OpenMP parallelises only across independent outputs, and every reduction is a
sequential float sum in index order, so no result may depend on the thread count. Here
that is checked with ``np.array_equal`` (not a tolerance) on every activation, activation
gradient, parameter gradient, AdamW m and v, and parameter, over two full training steps
(forward, zero_grad, backward, update) of the ``tiny`` and ``small`` presets; and per
kernel for the ones with a parallel loop structure worth suspecting (matmul's tiled and
naive paths, softmax, attention forward and backward, matmul backward).

The only memory excluded is what the C never writes: preatt's upper triangle (t2 > t),
which is whatever malloc returned.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import CModel, load_library  # noqa: E402
from pyref.config import ACT_NAMES, PARAM_NAMES, PRESETS  # noqa: E402
from pyref.synth import init_params, make_batch  # noqa: E402

THREADS = (1, 2, 4)
# preset -> (B, T): B*T a multiple of 8 for one (the tiled matmul), not for the other
RUNS = {"tiny": (3, 7), "small": (2, 16)}


@pytest.fixture(scope="module")
def lib():
    lib = load_library()
    if not lib.has_openmp:
        pytest.skip(f"{lib.path} was built without OpenMP: one thread only")
    return lib


def _lower(T: int) -> np.ndarray:
    return np.tril(np.ones((T, T), bool))


def _snapshot(m: CModel, T: int) -> dict[str, np.ndarray]:
    """Copies of everything the step wrote, by name."""
    out = {"loss": np.float32(m.mean_loss)}
    tri = _lower(T)
    for group, names in (("acts", ACT_NAMES), ("grads_acts", ACT_NAMES), ("grads", PARAM_NAMES),
                         ("params", PARAM_NAMES)):
        views = getattr(m, group)
        for n in names:
            a = views[n]
            if group == "acts" and n == "preatt":
                a = a[..., tri]                      # the C writes only t2 <= t
            out[f"{group}.{n}"] = np.array(a)
    out["m_memory"] = np.array(m.m_memory)
    out["v_memory"] = np.array(m.v_memory)
    return out


def _two_steps(lib, preset: str, threads: int) -> list[dict[str, np.ndarray]]:
    cfg = PRESETS[preset]
    B, T = RUNS[preset]
    params = init_params(cfg, seed=11)
    snaps = []
    with CModel.from_params(cfg, params, lib=lib) as m:
        for step in (1, 2):
            x, y = make_batch(cfg, B, T, seed=100 + step)
            m.forward(x, y, threads=threads)
            m.zero_grad()
            m.backward(threads=threads)
            m.update(learning_rate=1e-3, weight_decay=0.1, t=step, threads=threads)
            snaps.append(_snapshot(m, T))
    return snaps


def _assert_identical(a: list[dict], b: list[dict], what: str) -> None:
    for step, (sa, sb) in enumerate(zip(a, b), 1):
        assert sa.keys() == sb.keys()
        differ = [k for k in sa if not np.array_equal(sa[k], sb[k])]
        assert not differ, f"{what}: step {step}: not bit-identical: {differ}"
        nonfinite = [k for k in sa if not np.isfinite(sa[k]).all()]
        assert not nonfinite, f"{what}: step {step}: non-finite values in {nonfinite}"


class _Runs(dict):
    """(preset, threads) -> the two-step snapshots of a first run, made on demand."""

    def __init__(self, lib):
        super().__init__()
        self.lib = lib

    def __missing__(self, key):
        self[key] = _two_steps(self.lib, *key)
        return self[key]


@pytest.fixture(scope="module")
def runs(lib):
    return _Runs(lib)


@pytest.fixture(scope="module")
def one_thread(runs):
    """The reference run of each preset, with one thread."""
    return {p: runs[p, 1] for p in RUNS}


@pytest.mark.parametrize("preset", RUNS)
@pytest.mark.parametrize("threads", THREADS[1:])
def test_model_step_bit_identical_across_thread_counts(runs, preset, threads):
    _assert_identical(runs[preset, 1], runs[preset, threads], f"{preset}: 1 thread vs {threads}")


@pytest.mark.parametrize("preset", RUNS)
@pytest.mark.parametrize("threads", [1, 2])
def test_model_step_bit_identical_across_runs(lib, runs, preset, threads):
    _assert_identical(runs[preset, threads], _two_steps(lib, preset, threads),
                      f"{preset}: two runs, {threads} threads")


def test_snapshot_covers_every_buffer(lib, one_thread):
    """Guard the guard: the comparison above sees all 23 activations, their gradients, all
    16 parameters and gradients, m and v (and the step changed the parameters)."""
    snap = one_thread["tiny"][1]
    assert len(snap) == 1 + 2 * len(ACT_NAMES) + 2 * len(PARAM_NAMES) + 2
    assert not np.array_equal(snap["params.wte"], one_thread["tiny"][0]["params.wte"])
    assert snap["grads.qkvw"].any() and snap["m_memory"].any()


def test_thread_count_is_restored_and_applied(lib):
    before = lib.get_num_threads()
    for n in THREADS:
        with lib.num_threads(n):
            assert lib.get_num_threads() == n
    assert lib.get_num_threads() == before


# ----------------------------------------------------------------------------- per kernel

def _rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _run(lib, threads, fn, outputs, *rest):
    """Call the Library kernel ``fn`` with fresh copies of ``outputs`` (accumulating
    kernels start from their values) under ``threads`` threads; -> the outputs."""
    outs = [o.copy() for o in outputs]
    with lib.num_threads(threads):
        getattr(lib, fn)(*outs, *rest)
    return outs


KERNEL_SHAPES = {
    # B, T, C, NH, OC
    "tiled": (4, 16, 48, 4, 72),     # B*T % 8 == 0: matmul_forward's 8-row tiles
    "naive": (3, 7, 40, 5, 24),      # B*T % 8 != 0: matmul_forward falls back to naive
}


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("threads", THREADS[1:])
def test_matmul_forward_threads(lib, shape, threads):
    B, T, C, NH, OC = KERNEL_SHAPES[shape]
    rng = np.random.default_rng(1)
    inp, w, b = _rand(rng, B, T, C), _rand(rng, OC, C, scale=0.2), _rand(rng, OC)
    for fn in ("matmul_forward", "matmul_forward_naive"):
        for bias in (b, None):
            out0 = np.full((B, T, OC), np.nan, np.float32)
            one = _run(lib, 1, fn, [out0], inp, w, bias, B, T, C, OC)
            many = _run(lib, threads, fn, [out0], inp, w, bias, B, T, C, OC)
            assert np.isfinite(one[0]).all()
            assert np.array_equal(one[0], many[0]), f"{fn} bias={bias is not None}"


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_matmul_forward_tiled_equals_naive(lib, shape):
    """The tiling changes the loop order over rows and columns, not the order of any sum."""
    B, T, C, NH, OC = KERNEL_SHAPES[shape]
    rng = np.random.default_rng(2)
    inp, w, b = _rand(rng, B, T, C), _rand(rng, OC, C, scale=0.2), _rand(rng, OC)
    out0 = np.zeros((B, T, OC), np.float32)
    for bias in (b, None):
        tiled = _run(lib, 2, "matmul_forward", [out0], inp, w, bias, B, T, C, OC)[0]
        naive = _run(lib, 2, "matmul_forward_naive", [out0], inp, w, bias, B, T, C, OC)[0]
        assert np.array_equal(tiled, naive)


@pytest.mark.parametrize("threads", THREADS[1:])
def test_matmul_backward_threads(lib, threads):
    B, T, C, NH, OC = KERNEL_SHAPES["tiled"]
    rng = np.random.default_rng(3)
    grads = [_rand(rng, B, T, C), _rand(rng, OC, C), _rand(rng, OC)]   # accumulated into
    rest = (_rand(rng, B, T, OC), _rand(rng, B, T, C), _rand(rng, OC, C), B, T, C, OC)
    one = _run(lib, 1, "matmul_backward", grads, *rest)
    many = _run(lib, threads, "matmul_backward", grads, *rest)
    for name, a, b in zip(("dinp", "dweight", "dbias"), one, many):
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("threads", THREADS[1:])
def test_softmax_forward_threads(lib, threads):
    B, T, V, Vp = 3, 5, 250, 256
    rng = np.random.default_rng(4)
    logits = _rand(rng, B, T, Vp, scale=4.0)
    logits[0, 0, :V] -= 10050.0                      # a row below the -10000 floor
    probs0 = np.full((B, T, Vp), np.nan, np.float32)
    one = _run(lib, 1, "softmax_forward", [probs0], logits, B, T, V, Vp)[0]
    many = _run(lib, threads, "softmax_forward", [probs0], logits, B, T, V, Vp)[0]
    assert np.isfinite(one).all() and not one[..., V:].any()
    assert np.array_equal(one, many)


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("threads", THREADS[1:])
def test_attention_forward_threads(lib, shape, threads):
    B, T, C, NH, OC = KERNEL_SHAPES[shape]
    rng = np.random.default_rng(5)
    inp = _rand(rng, B, T, 3 * C)
    outs0 = [np.zeros((B, T, C), np.float32), np.zeros((B, NH, T, T), np.float32),
             np.full((B, NH, T, T), np.nan, np.float32)]
    one = _run(lib, 1, "attention_forward", outs0, inp, B, T, C, NH)
    many = _run(lib, threads, "attention_forward", outs0, inp, B, T, C, NH)
    tri = _lower(T)
    assert np.array_equal(one[0], many[0]), "out"
    assert np.array_equal(one[1][..., tri], many[1][..., tri]), "preatt (lower triangle)"
    assert np.array_equal(one[2], many[2]), "att"
    assert not one[2][..., ~tri].any()                # the causal mask is written, as 0


@pytest.mark.parametrize("threads", THREADS[1:])
def test_attention_backward_threads(lib, threads):
    B, T, C, NH, OC = KERNEL_SHAPES["naive"]
    rng = np.random.default_rng(6)
    inp = _rand(rng, B, T, 3 * C)
    fwd = _run(lib, 1, "attention_forward",
               [np.zeros((B, T, C), np.float32), np.zeros((B, NH, T, T), np.float32),
                np.zeros((B, NH, T, T), np.float32)], inp, B, T, C, NH)
    att = fwd[2]
    grads = [_rand(rng, B, T, 3 * C), _rand(rng, B, NH, T, T), _rand(rng, B, NH, T, T)]
    rest = (_rand(rng, B, T, C), inp, att, B, T, C, NH)
    one = _run(lib, 1, "attention_backward", grads, *rest)
    many = _run(lib, threads, "attention_backward", grads, *rest)
    for name, a, b in zip(("dinp", "dpreatt", "datt"), one, many):
        assert np.array_equal(a, b), name


@pytest.mark.parametrize("threads", THREADS[1:])
def test_layernorm_and_encoder_threads(lib, threads):
    B, T, C = 4, 16, 48
    rng = np.random.default_rng(7)
    inp, w, b = _rand(rng, B, T, C), _rand(rng, C), _rand(rng, C)
    fwd0 = [np.zeros((B, T, C), np.float32), np.zeros((B, T), np.float32), np.zeros((B, T), np.float32)]
    one = _run(lib, 1, "layernorm_forward", fwd0, inp, w, b, B, T, C)
    many = _run(lib, threads, "layernorm_forward", fwd0, inp, w, b, B, T, C)
    assert all(np.array_equal(x, y) for x, y in zip(one, many))
    grads = [_rand(rng, B, T, C), _rand(rng, C), _rand(rng, C)]
    rest = (_rand(rng, B, T, C), inp, w, one[1], one[2], B, T, C)
    bw1 = _run(lib, 1, "layernorm_backward", grads, *rest)
    bwn = _run(lib, threads, "layernorm_backward", grads, *rest)
    assert all(np.array_equal(x, y) for x, y in zip(bw1, bwn))
    ids = rng.integers(0, 5, size=(B, T)).astype(np.int32)       # many repeated ids
    enc, dout = [_rand(rng, 10, C), _rand(rng, T, C)], _rand(rng, B, T, C)
    e1 = _run(lib, 1, "encoder_backward", enc, dout, ids, B, T, C)
    en = _run(lib, threads, "encoder_backward", enc, dout, ids, B, T, C)
    assert all(np.array_equal(x, y) for x, y in zip(e1, en))
