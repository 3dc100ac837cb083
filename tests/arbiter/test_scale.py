"""What makes a full check fit its floor (issue 13) changes no result: the witness's
blockwise noise is the same draws and arithmetic as one whole-array draw, a float64 model
reading the C's float32 parameters computes what it computes on float64 copies, and a
reference released between steps computes what a fresh one does."""
from __future__ import annotations

import numpy as np
import pytest

from harness import ORACLE, Witness
from pyref import numpy_kernels
from pyref.config import GPT2Config, preset
from pyref.model import GPT2
from pyref.protocol import KernelSet
from pyref.synth import init_params, make_batch


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint64)


def _numpy_only(monkeypatch):
    """The NumPy path alone: the compiled helper taken away."""
    from harness.arbiter import fused
    monkeypatch.setitem(fused._STATE, "lib", None)


@pytest.mark.parametrize("size", [0, 1, 7, Witness.BLOCK - 1, Witness.BLOCK, 3 * Witness.BLOCK + 5, 300_001])
def test_witness_noise_is_the_same_draws_compiled_or_not(monkeypatch, size):
    """The compiled noise and the NumPy reference draw the same numbers at the same stream
    positions, with the same arithmetic (bit for bit), whatever the thread count; a view
    the caller does not own is never written."""
    from harness.arbiter import fused
    x = np.random.default_rng(1).standard_normal(size) * 3.0
    compiled = Witness(seed=4)
    got = [compiled._noise(x.copy(), 768), compiled._noise(np.ones((3, 4)), 1)]
    monkeypatch.setattr(fused, "NOISE_THREADS", 3)   # the noise passes run on NOISE_THREADS
    threaded = Witness(seed=4)._noise(x.copy(), 768)
    _numpy_only(monkeypatch)
    reference = Witness(seed=4)
    want = [reference._noise(x.copy(), 768), reference._noise(np.ones((3, 4)), 1)]
    for g, w in zip(got + [threaded], want + want[:1]):
        assert np.array_equal(_bits(g), _bits(w))
    big = np.concatenate([x, x])
    view, before = big[::2], big.copy()
    Witness(seed=0)._noise(view, 5)
    assert np.array_equal(_bits(big), _bits(before)), "an array the caller does not own was written"


def test_witness_draws_are_uniform_with_unit_variance():
    from harness.arbiter.oracle import draws
    d = draws(12345, 0, 2_000_000)
    assert abs(d.mean()) < 5 * np.sqrt(1 / 2_000_000) and d.var() == pytest.approx(1.0, abs=5e-3)
    assert d.min() >= -np.sqrt(3) and d.max() < np.sqrt(3)
    assert not np.array_equal(draws(1, 0, 10), draws(2, 0, 10))


@pytest.mark.parametrize("compiled", [True, False])
def test_witness_backward_adds_its_noised_contribution_without_copying_the_buffer(monkeypatch, compiled):
    """A backward kernel's contribution (the kernel run into zeroed buffers) is noised and
    added into the model's buffer, which keeps what it held before."""
    from harness.arbiter.oracle import draws
    from pyref.constants import U
    if not compiled:
        _numpy_only(monkeypatch)
    rng = np.random.default_rng(0)
    B, T, C, OC = 2, 3, 4, 5
    inp, dout, w = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, OC)), rng.standard_normal((OC, C))
    bufs = [rng.standard_normal(s) for s in ((B, T, C), (OC, C), (OC,))]
    held = [b.copy() for b in bufs]
    wit = Witness(seed=7)
    wit.matmul_backward(*bufs, dout, inp, w)
    contrib = [np.zeros(s) for s in ((B, T, C), (OC, C), (OC,))]
    ORACLE.matmul_backward(*contrib, dout, inp, w)
    at, n = 0, {0: OC, 1: B * T, 2: B * T}
    for k, (b, h, c) in enumerate(zip(bufs, held, contrib)):
        s = U * np.sqrt(n[k])
        want = h.reshape(-1) + (c.reshape(-1) + c.reshape(-1) * (s * draws(wit.key, at, c.size)))
        assert np.array_equal(_bits(b.reshape(-1)), _bits(want))
        at += c.size


def test_witness_backward_scratch_is_zeroed_for_each_call_and_released(monkeypatch):
    """The backward's zeroed buffers are kept between calls of one shape (a fresh np.zeros
    per call cost the witness's backward as much again at 124M): two steps of a model whose
    layers reuse them give, bit for bit, what fresh zeros give; release() drops them."""
    cfg = preset("small")
    p = init_params(cfg, seed=0).astype(np.float32)
    x, y = make_batch(cfg, 2, 16, seed=0)

    def two_steps(noisy):
        model = GPT2(cfg, p, kernels=KernelSet.from_module(noisy, name="witness"), dtype=np.float64)
        for _ in range(2):
            _run(model, x, y)
        return model
    kept = Witness(seed=5)
    reused = two_steps(kept)
    assert kept._scratch                     # kept after the steps, until released
    kept.release()
    assert not kept._scratch
    monkeypatch.setattr(Witness, "_zeros", lambda self, shape, slot: np.zeros(shape))
    fresh = two_steps(Witness(seed=5))
    for buf in ("grads_memory", "grads_acts_memory"):
        assert np.array_equal(_bits(getattr(reused, buf)), _bits(getattr(fresh, buf))), buf


def _float64_buffers(model) -> dict:
    return {"mean_loss": np.array([model.mean_loss]), "acts": model.acts_memory,
            "grads": model.grads_memory, "grads_acts": model.grads_acts_memory}


def _kept_vs_fresh(cfg, steps: int = 3) -> list[tuple[int, str]]:
    """(step, buffer) where a kept witness (WitnessRun, keep=True) differs, bit for bit,
    from one made afresh for each step, over ``steps`` steps of new batches, seeds and
    parameters (the C's, changed in place between steps as its update changes them)."""
    from harness.arbiter.oracle import WitnessRun
    p = init_params(cfg, seed=0).astype(np.float32)
    kept, fresh = WitnessRun(cfg, p, keep=True), WitnessRun(cfg, p, keep=False)
    differ = []
    for t in range(1, steps + 1):
        x, y = make_batch(cfg, 2, 16, seed=t)
        kept.run(t, x, y)
        fresh.run(t, x, y)
        assert kept.model is not None and fresh.model is not None
        a, b = _float64_buffers(kept.model), _float64_buffers(fresh.model)
        differ += [(t, k) for k in a if not np.array_equal(_bits(a[k]), _bits(b[k]))]
        kept.done()
        fresh.done()
        assert fresh.model is None and kept.model is not None    # dropped / kept
        p *= np.float32(0.999)
    return differ


def test_kept_witness_gives_what_fresh_witnesses_give():
    """A witness kept through a run (its activations, gradients and scratch reused) gives
    at every step, bit for bit, what a witness made for that step gives."""
    assert _kept_vs_fresh(preset("small")) == []


@pytest.mark.parametrize("stale", ["grads not zeroed", "scratch not zeroed"])
def test_kept_witness_with_a_stale_buffer_is_caught(monkeypatch, stale):
    """The comparison above fails on a kept witness whose buffers are not zeroed between
    steps: its gradients (zero_grad skipped) or its backward's scratch (kept as it was)."""
    if stale == "grads not zeroed":
        monkeypatch.setattr(GPT2, "zero_grad", lambda self: None)
    else:
        def stale_zeros(self, shape, slot):
            return self._scratch.setdefault((shape, slot), np.zeros(shape))
        monkeypatch.setattr(Witness, "_zeros", stale_zeros)
    differ = _kept_vs_fresh(preset("small"))
    assert differ and all(t > 1 for t, _ in differ) and {k for _, k in differ} >= {"grads"}


def test_run_parity_results_are_the_same_with_the_witness_kept_or_not(monkeypatch):
    """run_parity's checks are the same, metric for metric, whether the witness is kept
    through the run or made each step; kept, it is made once."""
    from harness import run_parity
    from pyref import torch_kernels
    made = []
    init = GPT2.__init__

    def counted(self, *a, **k):
        init(self, *a, **k)
        made.append(getattr(self.kernels, "name", None))
    monkeypatch.setattr(GPT2, "__init__", counted)
    cfg = preset("tiny")
    impls = {"torch": KernelSet.from_module(torch_kernels)}
    rows = {}
    for keep in (True, False):
        made.clear()
        batches = (make_batch(cfg, 2, 8, seed=t) for t in range(10))
        report = run_parity(cfg, init_params(cfg, seed=0), batches, impls=impls, steps=3, replay=True,
                            keep_witness=keep)
        assert report.passed
        rows[keep] = [(c.impl, c.kind, str(c.tensor), c.passed, c.comparison.summary_row(), c.comparison.tol)
                      for s in report.steps for c in s.checks]
        assert made.count("witness") == (1 if keep else 3)
    assert rows[True] == rows[False] and len(rows[True]) > 100


def test_plan_witness_keeps_it_only_where_the_memory_is():
    """The witness is kept when the memory available holds it beside the run's other
    buffers; GPT-2 medium's (d24) is not kept on a 24 GiB machine; its estimate of the
    scratch is what the witness makes."""
    from harness.arbiter.oracle import WitnessRun, plan_witness, run_bytes, witness_bytes
    cfg = preset("small")
    need = plan_witness(cfg, 2, 16, available=0).need
    assert plan_witness(cfg, 2, 16, available=need).keep
    assert not plan_witness(cfg, 2, 16, available=need - 1).keep
    assert "kept" in plan_witness(cfg, 2, 16, available=need).line()
    assert "afresh" in plan_witness(cfg, 2, 16, available=need - 1).line()
    d24 = GPT2Config(max_seq_len=1024, vocab_size=50257, padded_vocab_size=50304,
                     num_layers=24, num_heads=16, channels=1024)
    assert not plan_witness(d24, 4, 64, available=22 * 2**30).keep
    assert plan_witness(preset("d12"), 4, 64, available=20 * 2**30).keep
    run = WitnessRun(cfg, init_params(cfg, seed=0).astype(np.float32), keep=True)
    run.run(1, *make_batch(cfg, 2, 16, seed=0))
    m = run.model
    held = m.grads_memory.nbytes + m.acts_memory.nbytes + m.grads_acts_memory.nbytes + run.noisy.scratch_bytes()
    assert witness_bytes(cfg, 2, 16) == held and run_bytes(cfg, 2, 16) > held


def _run(model, x, y):
    model.forward(x, y)
    model.zero_grad()
    model.backward()
    return model


@pytest.mark.parametrize("kernels", ["oracle", "witness"])
def test_float64_model_on_shared_float32_params_is_bit_identical(kernels):
    cfg = preset("small")
    p = init_params(cfg, seed=0).astype(np.float32)
    x, y = make_batch(cfg, 2, 16, seed=0)
    make = (lambda: ORACLE) if kernels == "oracle" else \
        (lambda: KernelSet.from_module(Witness(seed=3), name="witness"))
    copied = _run(GPT2(cfg, p, kernels=make(), dtype=np.float64), x, y)
    shared = _run(GPT2(cfg, p, kernels=make(), dtype=np.float64, share_params=True), x, y)
    assert np.shares_memory(shared.params_memory, p) and shared.params_memory.dtype == np.float32
    assert copied.mean_loss == shared.mean_loss
    for buf in ("acts_memory", "grads_memory", "grads_acts_memory"):
        assert np.array_equal(_bits(getattr(copied, buf)), _bits(getattr(shared, buf))), buf


def test_shared_params_model_refuses_m_v_and_reads_new_values():
    cfg = preset("tiny")
    p = init_params(cfg, seed=0).astype(np.float32)
    m = GPT2(cfg, p, kernels=ORACLE, dtype=np.float64, share_params=True)
    with pytest.raises(ValueError, match="no m, v"):
        m.load_state(p, np.zeros_like(p), np.zeros_like(p))
    with pytest.raises(ValueError, match="contiguous"):
        GPT2(cfg, np.stack([p, p], 1)[:, 0], kernels=ORACLE, dtype=np.float64, share_params=True)
    p[0] = 0.5                                         # the owner's values, not a copy
    assert m.params_memory[0] == 0.5


def test_released_model_computes_what_a_fresh_one_does():
    cfg = preset("tiny")
    p = init_params(cfg, seed=0).astype(np.float32)
    x, y = make_batch(cfg, 2, 8, seed=1)
    ks = KernelSet.from_module(numpy_kernels)
    fresh = GPT2(cfg, p, kernels=ks)
    reused = GPT2(cfg, init_params(cfg, seed=5).astype(np.float32), kernels=ks)
    _run(reused, *make_batch(cfg, 2, 8, seed=9))
    reused.update(1e-3, 0.9, 0.999, 1e-8, 0.1, 1)
    reused.release()
    assert reused.acts_memory is None and reused.params_memory is None and reused.m_memory is None
    m0 = np.full(p.size, 1e-3, np.float32)
    for model in (fresh, reused):
        model.load_state(p, m0, m0 * m0)
        _run(model, x, y)
        model.update(1e-3, 0.9, 0.999, 1e-8, 0.1, 2)
    for buf in ("params_memory", "grads_memory", "m_memory", "v_memory", "acts_memory", "grads_acts_memory"):
        assert np.array_equal(getattr(fresh, buf).view(np.uint32), getattr(reused, buf).view(np.uint32)), buf


def test_run_parity_holds_one_reference_at_a_time(monkeypatch):
    """Each reference is loaded, run, checked, updated and released in turn: when one
    runs its forward, no other float32 reference holds buffers (and the float64 models
    read the C's parameters: no copies)."""
    import weakref

    from harness import run_parity
    from pyref import torch_kernels

    made = weakref.WeakSet()
    seen = []
    init, forward = GPT2.__init__, GPT2.forward

    def tracked_init(self, *a, **k):
        init(self, *a, **k)
        made.add(self)

    def tracked_forward(self, *a, **k):
        if self.dtype == np.float32:
            seen.append(sum(m.params_memory is not None for m in made if m.dtype == np.float32))
        else:
            seen.append(("float64 copies", sum(m.shared_params is None for m in made if m.dtype == np.float64)))
        return forward(self, *a, **k)

    monkeypatch.setattr(GPT2, "__init__", tracked_init)
    monkeypatch.setattr(GPT2, "forward", tracked_forward)
    cfg = preset("tiny")
    impls = {"numpy": KernelSet.from_module(numpy_kernels), "torch": KernelSet.from_module(torch_kernels)}
    report = run_parity(cfg, init_params(cfg, seed=0), iter(lambda: make_batch(cfg, 2, 8, seed=0), None),
                        impls=impls, steps=2, replay=False)
    assert report.passed
    assert [s for s in seen if not isinstance(s, tuple)] == [1, 1, 1, 1]
    assert all(s == ("float64 copies", 0) for s in seen if isinstance(s, tuple))


def test_update_checks_shared_among_threads_are_the_serial_ones(monkeypatch):
    """check_update's AdamW runs and comparisons shared among threads give what one thread
    gives, bit for bit, and a wrong update still fails there."""
    from harness import cores
    from harness.checks import update
    from harness import check_update
    from pyref.config import AdamW

    cfg = preset("small")
    rng = np.random.default_rng(0)
    P = cfg.num_parameters()
    p = rng.standard_normal(P, dtype=np.float32) * np.float32(0.02)
    g = rng.standard_normal(P, dtype=np.float32) * np.float32(1e-3)
    m = rng.standard_normal(P, dtype=np.float32) * np.float32(1e-4)
    v = np.abs(m) * np.float32(1e-3)
    post = [p.copy(), m.copy(), v.copy()]
    numpy_kernels.adamw(*post[:1], g, *post[1:], 1e-4, 0.9, 0.999, 1e-8, 0.1, 2)
    post[0][123] += np.float32(1e-3)                  # one wrong parameter
    monkeypatch.setattr(update, "UPDATE_BLOCK", 1 << 10)   # several blocks, several runs

    def rows(workers):
        monkeypatch.setattr(update, "workers", lambda: workers)   # the update's runs
        monkeypatch.setattr(cores, "workers", lambda: workers)    # and the threads they go to
        checks = check_update(cfg, (p, m, v), g, tuple(post), AdamW(), 2, step=2, impl="x")
        return [(c.tensor, c.passed, c.comparison.summary_row()) for c in checks]

    serial, shared = rows(1), rows(3)
    assert serial == shared
    assert [t for t, ok, _ in serial if not ok] == ["params.wte (after update)"]


def test_witness_measured_every_k_steps_serves_the_steps_between(monkeypatch):
    """witness_every=2: the witness runs at steps 1 and 3, and step 2's end-to-end bounds
    are step 1's (every step, they are the step's own); k < 1 is refused."""
    from harness import run_parity
    from harness.arbiter.oracle import WitnessRun
    from harness.errors import InputError
    seeds = []
    run = WitnessRun.run
    monkeypatch.setattr(WitnessRun, "run", lambda self, seed, x, y: seeds.append(seed) or run(self, seed, x, y))
    cfg = preset("tiny")

    def tols(every):
        seeds.clear()
        batches = (make_batch(cfg, 2, 8, seed=t) for t in range(10))
        report = run_parity(cfg, init_params(cfg, seed=0), batches, steps=3, replay=False, witness_every=every)
        assert report.passed
        return [{str(c.tensor): c.comparison.tol for c in s.checks if c.kind == "e2e"} for s in report.steps]
    every2 = tols(2)
    assert seeds == [1, 3]
    assert every2[1] == every2[0] and every2[2] != every2[0]
    every1 = tols(1)
    assert seeds == [1, 2, 3] and every1[1] != every1[0] and every1[0] == every2[0]
    with pytest.raises(InputError, match="every k >= 1"):
        run_parity(cfg, init_params(cfg, seed=0), iter([]), steps=1, witness_every=0)


def test_a_kept_witness_is_dropped_once_no_later_step_runs_it(monkeypatch):
    """A kept witness's buffers (as large as the oracle's) are released as soon as no later
    step runs it (the last step, or the last due one with witness_every), so a failing
    check's diagnosis and recording run without them; the checks are the same."""
    from harness import run_parity
    from harness.arbiter.oracle import WitnessRun
    held = []
    done = WitnessRun.done

    def spy(self, again=True):
        done(self, again)
        held.append(self.model is not None)
    monkeypatch.setattr(WitnessRun, "done", spy)
    cfg = preset("tiny")

    def run(steps, every):
        held.clear()
        batches = (make_batch(cfg, 2, 8, seed=t) for t in range(10))
        report = run_parity(cfg, init_params(cfg, seed=0), batches, steps=steps, replay=False, keep_witness=True,
                            witness_every=every)
        assert report.passed
        return list(held), [[c.comparison.tol for c in s.checks if c.kind == "e2e"] for s in report.steps]
    kept, tols = run(3, 1)
    assert kept == [True, True, False]
    assert run(3, 2)[0] == [True, False]        # measured at steps 1 and 3
    assert run(2, 2)[0] == [False]              # step 2 does not run it
    made_each_step = WitnessRun.__init__

    def afresh(self, *a, **k):
        made_each_step(self, *a, **dict(k, keep=False))
    monkeypatch.setattr(WitnessRun, "__init__", afresh)
    assert run(3, 1) == ([False, False, False], tols)


def test_the_oracle_is_dropped_after_the_last_steps_last_end_to_end_checks(monkeypatch):
    """The oracle's float64 buffers are released once the last step's last implementation
    has had its end-to-end checks (before its replay, diagnosis, recording and update),
    never earlier: every check of the run is the same as with the oracle kept."""
    from harness import run_parity
    from harness.checks import e2e as e2e_mod, run as run_mod
    from pyref.model import GPT2
    from pyref import numpy_kernels
    from pyref.protocol import KernelSet
    cfg = preset("tiny")
    events = []
    release, graph = GPT2.release, e2e_mod.e2e_graph
    monkeypatch.setattr(GPT2, "release", lambda self: (events.append(("release", self.dtype == np.float64
                                                                      and self.acts is not None)), release(self)))
    monkeypatch.setattr(run_mod, "e2e_graph", lambda *a, **k: (events.append(("e2e", k["impl"])), graph(*a, **k))[1])

    def run():
        events.clear()
        batches = (make_batch(cfg, 2, 8, seed=t) for t in range(10))
        report = run_parity(cfg, init_params(cfg, seed=0), batches, steps=2, replay=True,
                            impls={"numpy": KernelSet.from_module(numpy_kernels)})
        assert report.passed
        return [(c.impl, c.kind, str(c.tensor), c.comparison.max_rel, c.comparison.tol)
                for s in report.steps for c in s.checks]
    dropped = run()
    # the oracle's (float64, holding activations) release: once, after step 2's last e2e checks
    oracle_releases = [i for i, e in enumerate(events) if e == ("release", True)]
    e2e_at = [i for i, e in enumerate(events) if e[0] == "e2e"]
    assert len(e2e_at) == 4 and len(oracle_releases) == 1 and oracle_releases[0] == e2e_at[-1] + 1
    check_state = run_mod._check_state
    monkeypatch.setattr(run_mod, "_check_state", lambda *a: check_state(*a[:6]))   # the oracle kept
    assert run() == dropped
    assert ("release", True) not in events
