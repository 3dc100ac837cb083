"""Speed and memory of a full parity check and of its parts alone (``make bench``).

    .venv/bin/python benchmarks/bench.py --json build/bench.json   # d12 (124M), B=4, T=64, and d24: ~13 min
    .venv/bin/python benchmarks/bench.py --quick                   # small config, ~15 s
    .venv/bin/python benchmarks/bench.py --parts full_check_replay --reuse build/bench.json
                                                                   # one part again, the rest reused
    .venv/bin/python benchmarks/bench.py --parts --reuse build/bench.json --no-views --markdown
                                                                   # print a saved result again

The targets (issue 13): *a one-step full check of GPT-2 124M's shape (replay on failure)
takes at most 1.5x the sum of its necessary parts (the C's step, the float64 oracle, each
implementation's own step); its peak memory is at most 3x the C model's own footprint; a
one-step full check of GPT-2 medium's shape (d24, B=4, T=64) completes on a 24 GB machine.*
Also kept: no C buffer is copied to be compared (views only); per-op checks >= 300/s.

Parts, each alone in its own child process (so that each one's time and peak RSS is its
own); each runs a first step (it pays the lazy allocations, and torch its start-up) and
then ``--steps`` warm ones (1 at d12), timed per phase:

  c_step        the C library's step on a CModel: forward, zero_grad, backward, update
  numpy_step    pyref.model.GPT2, float32, NumPy kernels: the same four phases
  torch_step    pyref.model.GPT2, float32, pyref.torch_kernels: the same four phases
  oracle_step   pyref.model.GPT2, float64, NumPy kernels: forward, zero_grad, backward
                (run_parity's oracle never updates)
  witness_step  the same with harness.checks.run.Witness kernels (float32-sized noise on
                every result); its construction is timed apart (run_parity builds one
                per step)
  op_checks     per-op check throughput: harness.checks.perop.check_kernel calls per second
                (the C against the float64 oracle, oracle included) for the cheap ops at
                the op table's "base" shape; target >= 300 calls/s

Full checks, in child processes: harness.checks.run.run_parity with references numpy and torch
(the C, numpy, torch, the oracle and the witness; every comparison; the AdamW checks):

  full_check         replay="on-failure", 1 step at d12 (2 otherwise): what checking costs
                     when nothing fails
  full_check_replay  replay=True, 1 step at d12 (2 otherwise): every op also replayed in
                     float64 for each implementation (more checking, not more parts)
  full_check_d24     full_check at GPT-2 medium's shape (d24, 24 layers, C=1024, B=4, T=64),
                     one step, its peak RSS; run at d12 unless --no-d24, and skipped (with
                     the reason) when the machine lacks the memory it would take

Time ratios = full-check step / the sum of the parts' steps, first with first (a one-step
check is judged there) and warm with warm: against the necessary parts (C, numpy, torch,
oracle) and against all five (with the witness). Each full
check also reports where its steps go (``Breakdown``: the five models' own phases, and the
harness's comparisons, term magnitudes, AdamW checks, load_state, witness noise, ...), and
in which of those its memory peak was reached.

Memory: the full check's peak RSS above its baseline against the C model's own footprint
(params, grads, m, v, acts, grads_acts by config; c_step's measured held alongside); and
each part's peak RSS above its own baseline (the interpreter, imports, the
generated parameters and batch; the high-water mark is reset there through
/proc/self/clear_refs) against the full check's, and both against what the models hold by
construction (from the config: params, grads, m, v, acts, grads_acts). An in-process
check on the tiny preset asserts that CModel's arrays are views of the C's memory and that
every comparison run_parity makes of a C tensor reads the C's memory itself.

The machine (CPU, cores, load average before and after, NumPy / torch versions, the
library's build) is recorded with the numbers; on a shared 2-core machine the load of
other processes changes the timings by up to 2x, so compare runs at a similar load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_RESULT "
CHEAP_KERNELS = ("residual_forward", "residual_backward", "gelu_forward", "gelu_backward",
                 "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
                 "softmax_forward", "crossentropy_forward", "crossentropy_softmax_backward")
CHECKS_PER_SEC_TARGET = 300.0
OVERHEAD_TARGET = 1.5          # one-step full check / sum of its necessary parts
MEMORY_TARGET = 3.0            # full check's peak (above its baseline) / the C model's own footprint
# the parts a full check runs (run_parity with impls numpy and torch); the necessary ones are
# what no check can avoid: the C's step, the float64 oracle, each implementation's own step
MODEL_PARTS = ("c_step", "numpy_step", "torch_step", "oracle_step", "witness_step")
NECESSARY_PARTS = ("c_step", "numpy_step", "torch_step", "oracle_step")
FULL_PARTS = {"full_check": "on-failure", "full_check_replay": True, "full_check_d24": "on-failure"}
D24 = dict(config="d24", B=4, T=64)     # GPT-2 medium's shape (350M parameters)
ALL_PARTS = (*MODEL_PARTS, "c_step_1t", "op_checks", *FULL_PARTS)
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)   # run_parity's AdamW()


# ----------------------------------------------------------------------------- helpers

def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM of its own address space. (Not
    getrusage's ru_maxrss: Linux carries the pre-exec high-water mark over execve, so a
    child would report at least its parent's RSS.)"""
    kib = _status_kib("VmHWM")
    return kib / 1024.0 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``),
    so that the peak read later is the model's, not the parameter generation's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Baseline:
    """RSS once the part's inputs exist (interpreter, imports, params, batch), with the
    high-water mark reset there; ``.done(out)`` adds the part's own peak above it."""

    def __init__(self):
        self.reset = reset_peak_rss()
        self.rss = rss_mib()

    def done(self, out: dict) -> dict:
        out["baseline_rss_mib"] = self.rss
        out["peak_rss_mib"] = peak_rss_mib()
        out["model_peak_mib"] = out["peak_rss_mib"] - self.rss
        out["peak_was_reset"] = self.reset
        return out


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    import numpy
    info["numpy"] = numpy.__version__
    try:
        from importlib.metadata import version
        info["torch"] = version("torch")        # without importing it into the parent
    except Exception:                           # noqa: BLE001
        info["torch"] = None
    try:
        from harness.clib.library import load_library
        lib = load_library()
        info["library"] = lib.path
        info["library_build"] = None if lib.build_info is None else vars(lib.build_info)
        info["c_openmp_threads"] = lib.get_num_threads()
    except Exception as e:          # noqa: BLE001  (the bench still reports the rest)
        info["library"] = f"unavailable: {e}"
    return info


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def timed_steps(phases, steps: int) -> dict:
    """Run ``1 + steps`` steps of ``phases`` (name -> f(t)); the first step is reported
    alone (it allocates), the others as a median, per phase and in total."""
    out = {}
    warm = {name: [] for name in phases}
    totals = []
    for t in range(1, steps + 2):
        per = {}
        for name, f in phases.items():
            t0 = time.perf_counter()
            f(t)
            per[name] = time.perf_counter() - t0
        if t == 1:
            out["first_step_s"] = sum(per.values())
            out["first_phases_s"] = per
            continue
        totals.append(sum(per.values()))
        for name, dt in per.items():
            warm[name].append(dt)
    if totals:
        out["step"] = {"median_s": _median(totals), "min_s": min(totals), "max_s": max(totals),
                       "n": len(totals), "all_s": [round(x, 4) for x in totals]}
        out["phases_median_s"] = {k: _median(v) for k, v in warm.items()}
    return out


# ----------------------------------------------------------------------------- memory, analytically

def held_bytes(cfg, B: int, T: int) -> dict:
    """What each model holds by construction: P parameters, A activations (for B, T)."""
    from pyref.config import act_shapes
    P = cfg.num_parameters()
    A = sum(prod(s) for s in act_shapes(cfg, B, T).values())
    f32_train = 4 * (4 * P + 2 * A)     # params, grads, m, v, acts, grads_acts
    f64_fwd_bwd = 8 * (2 * P + 2 * A)   # params, grads, acts, grads_acts (no update: no m, v)
    per = {"c_step": f32_train, "numpy_step": f32_train, "torch_step": f32_train,
           "oracle_step": f64_fwd_bwd, "witness_step": f64_fwd_bwd}
    return {"num_parameters": P, "num_activations": A, "per_part_bytes": per,
            "sum_bytes": sum(per.values()),
            "layout": "C, numpy, torch: float32 params+grads+m+v+acts+grads_acts; "
                      "oracle, witness: float64 params+grads+acts+grads_acts",
            # run_parity keeps, beyond the models: the pre-step m, v (the C updates its own
            # in place), and at step 1 the zero m0, v0 it loads into the references
            "harness_known_extra_bytes": {"pre_step_m_v_copies": 2 * 4 * P}}


# ----------------------------------------------------------------------------- the parts

def part_c_step(cfg, params, batch, steps: int, threads: int | None = None) -> dict:
    from harness.clib.cmodel import CModel

    x, y = batch
    B, T = x.shape
    out = {"threads": threads or "default"}
    base = Baseline()
    t0 = time.perf_counter()
    with CModel.from_params(cfg, params) as m:
        out["construct_s"] = time.perf_counter() - t0
        out.update(timed_steps({
            "forward": lambda t: m.forward(x, y, threads=threads),
            "zero_grad": lambda t: m.zero_grad(),
            "backward": lambda t: m.backward(threads=threads),
            "update": lambda t: m.update(HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"],
                                         HYPER["weight_decay"], t=t, threads=threads),
        }, steps))
        out["loss"] = m.mean_loss
        base.done(out)
    out["tokens_per_s"] = B * T / out["step"]["median_s"] if "step" in out else None
    return out


def part_py_step(cfg, params, batch, steps: int, which: str) -> dict:
    """numpy / torch (float32, with the update) or oracle / witness (float64, no update),
    exactly as run_parity builds them."""
    import numpy as np
    from pyref.model import GPT2

    out = {}
    x, y = batch
    B, T = x.shape
    if which == "torch":
        import torch
        from pyref import torch_kernels
        from pyref.protocol import KernelSet
        out["torch_threads"] = torch.get_num_threads()
        make = lambda: GPT2(cfg, params, kernels=KernelSet.from_module(torch_kernels), dtype=np.float32)  # noqa: E731
    elif which == "numpy":
        from pyref import numpy_kernels
        from pyref.protocol import KernelSet
        make = lambda: GPT2(cfg, params, kernels=KernelSet.from_module(numpy_kernels), dtype=np.float32)  # noqa: E731
    elif which == "oracle":
        from harness.oracle import ORACLE            # pyref.numpy_kernels, as run_parity's oracle
        make = lambda: GPT2(cfg, params, kernels=ORACLE, dtype=np.float64)  # noqa: E731
    elif which == "witness":
        from harness.oracle import Witness
        from pyref.protocol import KernelSet
        make = lambda: GPT2(cfg, params, dtype=np.float64,  # noqa: E731
                            kernels=KernelSet.from_module(Witness(seed=1), name="witness"))
    else:
        raise ValueError(which)
    base = Baseline()
    t0 = time.perf_counter()
    model = make()
    out["construct_s"] = time.perf_counter() - t0
    phases = {"forward": lambda t: model.forward(x, y), "zero_grad": lambda t: model.zero_grad(),
              "backward": lambda t: model.backward()}
    if which in ("numpy", "torch"):
        phases["update"] = lambda t: model.update(HYPER["lr"], HYPER["beta1"], HYPER["beta2"],
                                                  HYPER["eps"], HYPER["weight_decay"], t)
    out.update(timed_steps(phases, steps))
    out["loss"] = float(model.mean_loss)
    base.done(out)
    out["tokens_per_s"] = B * T / out["step"]["median_s"] if "step" in out else None
    return out


def part_op_checks(seconds_per_kernel: float) -> dict:
    from harness.clib.library import load_library
    from harness.clib.kernels import CKernels
    from harness.checks.optable import SPEC, SHAPE_BY_NAME, make_inputs
    from harness.checks.perop import check_kernel

    lib = load_library()
    impl = CKernels(lib)
    s = SHAPE_BY_NAME["base"]
    per_kernel = {}
    base = Baseline()

    def rate(kernel, args):
        for _ in range(5):                                   # warm-up (first OpenMP team)
            check_kernel(impl, kernel, args)
        n, t0 = 0, time.perf_counter()
        while True:
            results = check_kernel(impl, kernel, args)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds_per_kernel and n >= 20:
                return n / dt, all(c.passed for c in results)

    for kernel in CHEAP_KERNELS:
        args = make_inputs(SPEC[kernel], s)
        r_default, ok = rate(kernel, args)
        with lib.num_threads(1):     # no OpenMP team: what a busy machine's barriers cost
            r_one, _ = rate(kernel, args)
        per_kernel[kernel] = {"calls_per_s": r_default, "calls_per_s_1thread": r_one, "passed": ok}
    rates = [v["calls_per_s"] for v in per_kernel.values()]
    rates1 = [v["calls_per_s_1thread"] for v in per_kernel.values()]
    return base.done({"shape": str(s), "c_threads_default": lib.get_num_threads(),
                      "per_kernel": per_kernel,
                      "min_calls_per_s": min(rates), "min_calls_per_s_1thread": min(rates1),
                      "target_calls_per_s": CHECKS_PER_SEC_TARGET,
                      "meets_target": min(rates) >= CHECKS_PER_SEC_TARGET,
                      "meets_target_1thread": min(rates1) >= CHECKS_PER_SEC_TARGET})


def part_full_check(cfg, params, batch, steps: int, replay, profile: str | None = None) -> dict:
    try:
        from harness.checks.run import run_parity
    except ImportError as e:
        return {"status": "pending", "why": f"harness.checks.run.run_parity not available ({e})"}
    import torch                     # imported before the baseline, as in torch_step
    from pyref import numpy_kernels, torch_kernels
    from pyref.protocol import KernelSet

    impls = {"numpy": KernelSet.from_module(numpy_kernels),
             "torch": KernelSet.from_module(torch_kernels)}
    bd = Breakdown()

    def batches():
        while True:
            bd.snapshot()
            yield batch

    out = {"status": "ran", "replay": replay, "steps_run": steps, "torch_threads": torch.get_num_threads()}
    base = Baseline()
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    bd.install()
    try:
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        report = run_parity(cfg, params, batches(), impls=impls, steps=steps, replay=replay)
        out["wall_s"] = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
            out["profile"] = profile
    finally:
        bd.uninstall()
    base.done(out)
    out["steps_s"] = [s.seconds for s in report.steps]
    out["first_step_s"] = out["steps_s"][0]
    out["warm_step_s"] = out["steps_s"][1] if len(out["steps_s"]) > 1 else None
    out["setup_s"] = out["wall_s"] - sum(out["steps_s"])    # CModel + reference models built
    out["breakdown_per_step_s"] = bd.per_step(out["steps_s"])
    out["calls"] = bd.calls
    out["peak_reached_in"] = bd.peak_in
    out["peak_growth_mib_by_category"] = dict(sorted(bd.peak_growth_mib.items(), key=lambda kv: -kv[1]))
    out["passed"] = bool(report.passed)
    kinds: dict[str, int] = {}
    for s in report.steps:
        for c in s.checks:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
    out["checks_by_kind"] = kinds
    out["first_divergence"] = report.first_divergence()
    return out


class Breakdown:
    """Where a run_parity call spends its time and reaches its memory peak, measured in
    the child by wrapping (not changing) the functions it calls: exclusive wall time per
    category (time in a nested wrapped call is charged to that call's category), split
    into steps at each ``next(batches)``. Categories: the five models' own phases (``C``,
    ``numpy``, ``torch``, ``oracle``, ``witness``) and the harness's work around them."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak_growth_mib: dict[str, float] = {}
        self.peak_in: str | None = None
        import threading
        self._local = threading.local()       # each thread's stack of [category, nested seconds]
        self._main = self._local.stack = []
        self._lock = threading.Lock()
        self._hwm = _status_kib("VmHWM") or 0.0
        self._undo: list = []
        self.snapshots: list[dict] = []

    @staticmethod
    def model_label(model) -> str:
        import numpy as np
        name = getattr(model.kernels, "name", "")
        if name == "witness":
            return "witness"
        if model.dtype == np.float64:
            return "oracle"
        return "torch" if "torch" in name else "numpy"

    def _wrap(self, owner, attr: str, category):
        orig = vars(owner)[attr]
        f = orig.__func__ if isinstance(orig, (staticmethod, classmethod)) else orig
        bd = self

        def wrapper(*a, **k):
            stack = getattr(bd._local, "stack", None)
            if stack is None:           # a worker thread of run_parity: its own stack, whose
                stack = bd._local.stack = []    # calls are named after the main thread's
            cat = category(a, k) if callable(category) else category
            if cat in ("compare", "term magnitudes"):      # by what they serve
                serves = stack or bd._main
                cat = f"{cat} ({serves[-1][0] if serves else 'loss'})"
            stack.append([cat, 0.0])
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                _, child = stack.pop()
                with bd._lock:
                    bd.totals[cat] = bd.totals.get(cat, 0.0) + dt - child
                    bd.calls[cat] = bd.calls.get(cat, 0) + 1
                    if stack:
                        stack[-1][1] += dt
                    hwm = _status_kib("VmHWM") or 0.0
                    if hwm > bd._hwm:
                        bd.peak_growth_mib[cat] = bd.peak_growth_mib.get(cat, 0.0) + (hwm - bd._hwm) / 1024
                        bd._hwm, bd.peak_in = hwm, cat

        new = classmethod(wrapper) if isinstance(orig, classmethod) else \
            staticmethod(wrapper) if isinstance(orig, staticmethod) else wrapper
        setattr(owner, attr, new)
        self._undo.append((owner, attr, orig))

    def install(self) -> "Breakdown":
        from harness.checks import run as runner
        from harness.clib import cmodel
        from pyref import model as pymodel

        label = lambda a, k: self.model_label(a[0])  # noqa: E731
        for name in ("forward", "zero_grad", "backward", "update"):
            self._wrap(cmodel.CModel, name, "C")
            self._wrap(pymodel.GPT2, name, label)
        self._wrap(cmodel.CModel, "poison_activations", "C acts poisoned (NaN fill)")
        self._wrap(cmodel.CModel, "from_params", "models built")
        self._wrap(pymodel.GPT2, "__init__", "models built")
        self._wrap(pymodel.GPT2, "load_state", "load_state (C state into references)")
        self._wrap(runner.Witness, "_noise", "witness noise")
        self._wrap(runner.Witness, "__init__", "models built")
        for attr, cat in (("e2e_graph", "e2e checks"), ("replay_graph", "replay checks"),
                          ("check_update", "update checks"),
                          ("witness_spread", "witness spread"), ("compare", "compare"),
                          ("term_magnitude", "term magnitudes"),
                          ("run_kernel", "replay: float64 ops"), ("_args64", "replay: float64 inputs"),
                          ("first_divergence", "first_divergence")):
            self._wrap(runner, attr, cat)
        return self

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def snapshot(self) -> None:
        self.snapshots.append(dict(self.totals))

    def per_step(self, steps_s: list[float]) -> list[dict]:
        """Each step's categories (snapshots are taken as each step starts, and the totals
        at the end close the last), with ``other`` = the step's time in no category. Work
        run_parity shares among threads (the oracle beside the witness, the spread, the
        update checks) is counted in each thread: categories can add up to more than the
        step, and ``other`` is then negative."""
        snaps = self.snapshots[:len(steps_s)] + [dict(self.totals)]
        out = []
        for i, secs in enumerate(steps_s):
            a, b = snaps[i], snaps[i + 1]
            d = {k: b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0) > 1e-6}
            d["other"] = secs - sum(d.values())
            out.append(dict(sorted(d.items(), key=lambda kv: -kv[1])))
        return out


MODEL_CATEGORIES = {"C": "c_step", "numpy": "numpy_step", "torch": "torch_step",
                    "oracle": "oracle_step", "witness": "witness_step"}


# ----------------------------------------------------------------------------- views, not copies

def check_views() -> dict:
    """In this process, on the tiny preset: (1) every CModel array (flat and named, params,
    grads, m, v, acts, grads_acts) is a view whose data pointer is the C's own pointer, and
    two views of one buffer share memory; (2) in a 2-step run_parity with replay, every
    comparison of a C tensor (e2e, replay, update) reads the C's memory, not a copy."""
    import numpy as np
    from harness.checks import perop as opcheck, run as runner
    from harness.clib import cmodel as cmodel_mod
    from harness.clib.library import ffi
    from pyref import numpy_kernels
    from pyref.config import ACT_NAMES, PARAM_NAMES, preset
    from pyref.protocol import KernelSet
    from pyref.synth import init_params, make_batch
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:                 # NumPy < 2
        byte_bounds = np.byte_bounds

    cfg = preset("tiny")
    params = init_params(cfg, seed=0)
    x, y = make_batch(cfg, 2, 8, seed=0)
    problems: list[str] = []
    n_views = 0

    def ptr(p) -> int:
        return int(ffi.cast("uintptr_t", p))

    with cmodel_mod.CModel.from_params(cfg, params) as m:
        m.forward(x, y)
        m.zero_grad()
        m.backward()
        m.update(t=1)
        s = m._struct
        for field in ("params_memory", "grads_memory", "m_memory", "v_memory", "acts_memory"):
            v = getattr(m, field)
            n_views += 1
            if v.ctypes.data != ptr(getattr(s, field)) or v.flags.owndata:
                problems.append(f"{field} is not the C's buffer")
            if not np.shares_memory(v, getattr(m, field)):
                problems.append(f"two views of {field} do not share memory")
        for group, names, flat in (("params", PARAM_NAMES, m.params_memory),
                                   ("grads", PARAM_NAMES, m.grads_memory),
                                   ("acts", ACT_NAMES, m.acts_memory),
                                   ("grads_acts", ACT_NAMES, None)):
            views = getattr(m, group)
            tensors = getattr(s, group)
            for name in names:
                v = views[name]
                if v.size == 0:
                    continue
                n_views += 1
                if v.ctypes.data != ptr(getattr(tensors, name)) or v.flags.owndata:
                    problems.append(f"{group}.{name} is not the C's tensor")
                if flat is not None and not np.shares_memory(v, flat):
                    problems.append(f"{group}.{name} does not share memory with {group}_memory")

    # (2) run_parity's comparisons: does each C tensor compared lie in the C's memory?
    made: list = []
    calls = {"in_c_memory": 0, "total": 0}
    orig_from_params = cmodel_mod.CModel.from_params.__func__
    orig_compare = runner.compare

    def from_params(cls, *a, **k):
        model = orig_from_params(cls, *a, **k)
        made.append(model)
        return model

    def c_ranges():
        s = made[-1]._struct
        P, A = s.num_parameters, s.num_activations
        out = []
        for field, n in (("params_memory", P), ("grads_memory", P), ("m_memory", P), ("v_memory", P),
                         ("acts_memory", A), ("grads_acts_memory", A)):
            p = getattr(s, field)
            if p != ffi.NULL:
                out.append((ptr(p), ptr(p) + 4 * n))
        return out

    def compare(actual, expected, **kw):
        calls["total"] += 1
        if made and not made[-1].closed and isinstance(actual, np.ndarray) and actual.size > 1:
            lo, hi = byte_bounds(actual)
            if any(a <= lo and hi <= b for a, b in c_ranges()):
                calls["in_c_memory"] += 1
        return orig_compare(actual, expected, **kw)

    cmodel_mod.CModel.from_params = classmethod(from_params)
    runner.compare = compare
    opcheck.compare = compare        # replay judges through harness.checks.perop.judge
    try:
        report = runner.run_parity(cfg, params, iter([(x, y)] * 2), steps=2, replay=True,
                                   impls={"numpy": KernelSet.from_module(numpy_kernels)})
    finally:
        cmodel_mod.CModel.from_params = classmethod(orig_from_params)
        runner.compare = orig_compare
        opcheck.compare = orig_compare
    c_tensor_checks = sum(1 for st in report.steps for c in st.checks
                          if c.impl == "C" and c.kind in ("e2e", "replay", "update")
                          and prod(c.comparison.shape) > 1)
    if calls["in_c_memory"] != c_tensor_checks:
        problems.append(f"run_parity compared {c_tensor_checks} C tensors but only "
                        f"{calls['in_c_memory']} comparisons read the C's memory")
    return {"ok": not problems, "problems": problems, "views_checked": n_views,
            "run_parity_c_tensor_checks": c_tensor_checks,
            "run_parity_compares_reading_c_memory": calls["in_c_memory"],
            "run_parity_compares_total": calls["total"], "run_parity_passed": report.passed,
            "note": "run_parity copies the C's pre-step params, m and v just before the C's "
                    "update (the expected update's start state): copies as inputs, not to be "
                    "compared; the float64 oracle and witness read the C's params in place"}


# ----------------------------------------------------------------------------- driver

def d24_config():
    """GPT-2 medium's shape: 24 layers, 16 heads, C=1024 (pyref.config has no preset)."""
    from pyref.config import GPT2Config
    return GPT2Config(max_seq_len=1024, vocab_size=50257, padded_vocab_size=50304,
                      num_layers=24, num_heads=16, channels=1024)


def projected_peak_bytes(cfg, B: int, T: int) -> int:
    """What a one-step full check holds at its peak, by config: the C without m, v (they
    are made by its first update, which comes last), the float64 oracle and witness (no
    parameter copies: they read the C's), and the witness's transients on the largest
    gradient (a copy, a difference, a sum of wte's size in float64)."""
    from pyref.config import act_shapes
    P = cfg.num_parameters()
    A = sum(prod(s) for s in act_shapes(cfg, B, T).values())
    wte = cfg.padded_vocab_size * cfg.channels
    return 4 * (2 * P + 2 * A) + 2 * 8 * (P + 2 * A) + 3 * 8 * wte


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_part(name: str, args) -> dict:
    """Run one part in this process (the child)."""
    from pyref.config import preset
    from pyref.synth import init_params, make_batch

    cfg = preset(args.config)
    if name == "full_check_d24":
        cfg, args.B, args.T = d24_config(), D24["B"], D24["T"]
    if args.torch_threads and name in ("torch_step", *FULL_PARTS):
        import torch
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    if name == "op_checks":
        out = part_op_checks(args.op_seconds)
    else:
        params = init_params(cfg, seed=0, style="gpt2")
        batch = make_batch(cfg, args.B, args.T, seed=0)
        if name == "c_step":
            out = part_c_step(cfg, params, batch, args.steps)
        elif name == "c_step_1t":
            out = part_c_step(cfg, params, batch, args.steps, threads=1)
        elif name in ("numpy_step", "torch_step", "oracle_step", "witness_step"):
            out = part_py_step(cfg, params, batch, args.steps, name[:-5])
        elif name in FULL_PARTS:
            steps = {"full_check": args.full_steps, "full_check_d24": 1}.get(name, args.replay_steps)
            profile = None
            if args.profile:
                profile = str(Path(args.profile).with_suffix(f".{name}.prof"))
            out = part_full_check(cfg, params, batch, steps, FULL_PARTS[name], profile)
        else:
            raise SystemExit(f"unknown part {name!r}")
    out["part_wall_s"] = time.perf_counter() - t0
    return out


def d24_room() -> dict | None:
    """None when the machine has the memory for the d24 check now; else why it is skipped
    (it would push a shared machine into the OOM killer: better not run than kill)."""
    cfg = d24_config()
    need = projected_peak_bytes(cfg, D24["B"], D24["T"]) + 4 * cfg.num_parameters() + 2**30
    have = mem_available_bytes()
    if have is None or have >= need:
        return None
    return {"status": "skipped", "projected_peak_gib": need / 2**30, "available_gib": have / 2**30,
            "why": f"needs ~{need / 2**30:.1f} GiB (projected peak, generated parameters, interpreter), "
                   f"{have / 2**30:.1f} GiB available now"}


def spawn(name: str, args, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--config", args.config,
           "-B", str(args.B), "-T", str(args.T), "--steps", str(args.steps),
           "--op-seconds", str(args.op_seconds), "--full-steps", str(args.full_steps),
           "--replay-steps", str(args.replay_steps)]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    t0 = time.perf_counter()
    load = list(os.getloadavg())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"did not finish in {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            out["process_wall_s"] = time.perf_counter() - t0
            out["load_average_at_start"] = load
            return out
    return {"status": "failed", "returncode": proc.returncode,
            "why": (proc.stderr or proc.stdout)[-2000:], "wall_s": time.perf_counter() - t0}


def overhead(results: dict) -> dict:
    """Full check / the sum of the parts it runs (C, numpy, torch, oracle, witness), warm
    step with warm steps and first with first, for each full-check variant; and, from the
    full check's breakdown, how much of each step is the five models' own work (against
    the same work alone) and how much is the harness's."""
    parts = results["parts"]
    missing = [n for n in MODEL_PARTS if "step" not in parts.get(n, {})]
    if missing:
        return {"why": f"parts missing: {', '.join(missing)}"}
    warm = {n: parts[n]["step"]["median_s"] for n in MODEL_PARTS}
    first = {n: parts[n]["first_step_s"] for n in MODEL_PARTS}
    construct = {n: parts[n].get("construct_s", 0.0) for n in MODEL_PARTS}
    out = {"target": OVERHEAD_TARGET, "sum_warm_s": sum(warm.values()), "sum_first_s": sum(first.values()),
           "necessary_warm_s": sum(warm[n] for n in NECESSARY_PARTS),
           "necessary_first_s": sum(first[n] for n in NECESSARY_PARTS),
           "warm_steps_s": warm, "first_steps_s": first, "construct_s": construct}
    for name in FULL_PARTS:
        fc = parts.get(name, {})
        if fc.get("status") != "ran" or name == "full_check_d24":   # another config: no parts
            continue
        # against the necessary parts (the target) and against all five (the witness too)
        r = {"first_vs_necessary": fc["first_step_s"] / out["necessary_first_s"],
             "first_vs_first": fc["first_step_s"] / out["sum_first_s"]}
        if fc.get("warm_step_s") is not None:
            r["warm_vs_necessary"] = fc["warm_step_s"] / out["necessary_warm_s"]
            r["warm_vs_warm"] = fc["warm_step_s"] / out["sum_warm_s"]
        # the whole run_parity call against what running the parts for as many steps costs
        # (the witness is built every step, the others once)
        n = fc["steps_run"]
        alone = sum(construct.values()) + (n - 1) * construct["witness_step"] \
            + out["sum_first_s"] + (n - 1) * out["sum_warm_s"]
        r["whole_call"] = fc["wall_s"] / alone
        # a one-step check is judged on its step (the first) against the parts' first steps
        r["target_judged_on"] = "first_vs_necessary" if fc["steps_run"] == 1 else "warm_vs_necessary"
        r["meets_target"] = r[r["target_judged_on"]] <= OVERHEAD_TARGET
        split = {}
        for i, (label, ref) in enumerate((("first", first), ("warm", warm))):
            bds = fc.get("breakdown_per_step_s") or []
            if i >= len(bds):
                continue
            bd, step_s = bds[i], fc["steps_s"][i]
            in_check = {cat: bd.get(cat, 0.0) for cat in MODEL_CATEGORIES}
            in_check["witness"] += bd.get("witness noise", 0.0)    # the witness alone makes it too
            models = sum(in_check.values())
            split[label] = {
                "step_s": step_s,
                "models_in_check_s": models, "models_alone_s": sum(ref.values()),
                "harness_s": step_s - models,
                "models_in_check_vs_alone": {cat: [in_check[cat], ref[part]]
                                             for cat, part in MODEL_CATEGORIES.items()},
                "witness_noise_s": bd.get("witness noise", 0.0),
                "harness_categories_s": {k: v for k, v in bd.items()
                                         if k not in MODEL_CATEGORIES and k != "witness noise"},
            }
        r["split"] = split
        # the same ratio inside the check: its step against the necessary models' time in
        # that step (one process, one moment: what the machine's load does not move)
        if "first" in split:
            inside = sum(split["first"]["models_in_check_vs_alone"][c][0] for c in ("C", "numpy", "torch", "oracle"))
            r["first_vs_necessary_in_check"] = split["first"]["step_s"] / inside
        out[name] = r
    return out


def memory(results: dict, cfg, B: int, T: int) -> dict:
    held = held_bytes(cfg, B, T)
    parts = results["parts"]
    mib = 2**20
    out = {"target": MEMORY_TARGET, "analytic": held,
           "analytic_sum_mib": held["sum_bytes"] / mib,
           "analytic_per_part_mib": {k: v / mib for k, v in held["per_part_bytes"].items()},
           # the C model's own footprint: params, grads, m, v, acts, grads_acts (by config)
           "c_footprint_mib": held["per_part_bytes"]["c_step"] / mib}
    if "model_peak_mib" in parts.get("c_step", {}):
        out["c_measured_mib"] = parts["c_step"]["model_peak_mib"]
    if all("model_peak_mib" in parts.get(n, {}) for n in MODEL_PARTS):
        out["measured_per_part_mib"] = {n: parts[n]["model_peak_mib"] for n in MODEL_PARTS}
        out["measured_sum_mib"] = sum(out["measured_per_part_mib"].values())
    for name in FULL_PARTS:
        fc = parts.get(name, {})
        if "model_peak_mib" not in fc or name == "full_check_d24":
            continue
        r = {"peak_above_baseline_mib": fc["model_peak_mib"], "peak_rss_mib": fc["peak_rss_mib"],
             "vs_analytic": fc["model_peak_mib"] / out["analytic_sum_mib"],
             "vs_c_footprint": fc["model_peak_mib"] / out["c_footprint_mib"]}
        if "measured_sum_mib" in out:
            r["vs_measured_parts"] = fc["model_peak_mib"] / out["measured_sum_mib"]
        r["meets_target"] = r["vs_c_footprint"] <= MEMORY_TARGET
        r["peak_reached_in"] = fc.get("peak_reached_in")
        r["peak_growth_mib_by_category"] = fc.get("peak_growth_mib_by_category")
        out[name] = r
    return out


def _f(x, unit="", digits=3):
    if x is None:
        return "-"
    if unit == " MiB" and isinstance(x, (int, float)):
        return f"{x:,.0f} MiB"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(results: dict, cfg_label: str) -> str:
    parts, mem, ov = results["parts"], results.get("memory", {}), results.get("overhead", {})
    analytic = mem.get("analytic_per_part_mib", {})
    rows = [("part", "first step", "warm step", "phases (warm, s)", "peak RSS", "held", "by config")]
    for name in (*MODEL_PARTS, "c_step_1t"):
        if name not in parts:
            continue
        r = parts[name]
        if "step" not in r:
            rows.append((name, "-", "-", (r.get("status", "?") + ": " + str(r.get("why", "")))[:70],
                         "-", "-", "-"))
            continue
        ph = " ".join(f"{ {'forward': 'fwd', 'zero_grad': 'zero', 'backward': 'bwd'}.get(k, k)} {v:.3g}"
                      for k, v in r["phases_median_s"].items())
        if name == "witness_step":
            ph += f" (build {r['construct_s']:.2g})"
        rows.append((name + (" *" if r.get("reused_from") else ""), _f(r["first_step_s"], " s"),
                     _f(r["step"]["median_s"], " s"), ph, _f(r["peak_rss_mib"], " MiB", 4),
                     _f(r["model_peak_mib"], " MiB", 4), _f(analytic.get(name.replace("_1t", "")), " MiB", 4)))
    if "sum_warm_s" in ov:
        rows.append(("sum of the 5 parts", _f(ov["sum_first_s"], " s"), _f(ov["sum_warm_s"], " s"), "", "",
                     _f(mem.get("measured_sum_mib"), " MiB", 4), _f(mem.get("analytic_sum_mib"), " MiB", 4)))
    for name, mode in FULL_PARTS.items():
        fc = parts.get(name)
        if fc is None:
            continue
        if fc.get("status") != "ran":
            rows.append((name, "-", "-", f"{fc.get('status', '?')}: {fc.get('why', '')}"[:70], "-", "-", "-"))
            continue
        note = (f"replay={mode!r}, {'passed' if fc['passed'] else 'FAILED'}, "
                f"{sum(fc['checks_by_kind'].values())} checks, setup {fc['setup_s']:.2g} s")
        rows.append((name + (" *" if fc.get("reused_from") else ""), _f(fc["first_step_s"], " s"),
                     _f(fc.get("warm_step_s"), " s"), note, _f(fc["peak_rss_mib"], " MiB", 4),
                     _f(fc["model_peak_mib"], " MiB", 4), ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"llmc-parity bench: {cfg_label}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("held: peak RSS above the part's own baseline (interpreter, imports, params, batch); "
                 "by config: the buffers the models allocate")
    reused = sorted({p.get("reused_from") for p in parts.values() if p.get("reused_from")})
    if reused:
        lines.append(f"* reused from {', '.join(reused)} (same config, B, T)")
    lines.append("")
    lines.append(f"targets: full check / sum of its necessary parts (C, numpy, torch, oracle alone) <= "
                 f"{OVERHEAD_TARGET}; peak memory <= {MEMORY_TARGET:g} x the C model's own footprint; "
                 "C buffers compared as views")
    if "necessary_first_s" in ov:
        lines.append(f"  necessary parts: {ov['necessary_first_s']:.3g} s first step, "
                     f"{ov['necessary_warm_s']:.3g} s warm; all five (with the witness): "
                     f"{ov['sum_first_s']:.3g} s first, {ov['sum_warm_s']:.3g} s warm")
    for name in FULL_PARTS:
        if name in ov:
            r = ov[name]
            warm = (f"; warm step {r['warm_vs_necessary']:.3g} x necessary, {r['warm_vs_warm']:.3g} x all"
                    if "warm_vs_necessary" in r else "")
            lines.append(f"  {name:17s} time:   first step {r['first_vs_necessary']:.3g} x the necessary parts, "
                         f"{r['first_vs_first']:.3g} x all parts{warm} (whole call {r['whole_call']:.3g}) -> "
                         f"{_met(r['meets_target'])} (on {r['target_judged_on'].replace('_', ' ')}); "
                         f"{_f(r.get('first_vs_necessary_in_check'), '', 3)} x the necessary models' own "
                         "time inside the check")
        if name in mem:
            r = mem[name]
            lines.append(f"  {name:17s} memory: peak above baseline {r['peak_above_baseline_mib']:.0f} MiB = "
                         f"{r['vs_c_footprint']:.3g} x the C model's footprint ({mem['c_footprint_mib']:.0f} MiB "
                         f"by config" + (f", {mem['c_measured_mib']:.0f} measured" if "c_measured_mib" in mem else "")
                         + f"); {r['vs_analytic']:.3g} x all five models by config ({mem['analytic_sum_mib']:.0f} MiB)"
                         + f" -> {_met(r['meets_target'])}"
                         + (f"; peak reached in {r['peak_reached_in']}" if r.get("peak_reached_in") else ""))
    d24 = parts.get("full_check_d24")
    if d24 is not None:
        lines.append("  " + d24_line(d24))
    v = results.get("views")
    if v is not None:
        lines.append(f"  C buffers as views: {'met' if v.get('ok') else 'NOT met'} ("
                     + (f"{v['views_checked']} CModel arrays are the C's own pointers; "
                        f"{v['run_parity_compares_reading_c_memory']}/{v['run_parity_c_tensor_checks']} "
                        "C-tensor comparisons of a tiny run_parity read the C's memory"
                        if "views_checked" in v else str(v.get("why", "")))
                     + (f"; problems: {v['problems'][:3]}" if v.get("problems") else "") + ")")
    oc = parts.get("op_checks", {})
    if "per_kernel" in oc:
        worst = min(oc["per_kernel"], key=lambda k: oc["per_kernel"][k]["calls_per_s"])
        lines.append(f"  op checks: min {oc['min_calls_per_s']:.0f} check_kernel calls/s ({worst}), "
                     f"{oc['min_calls_per_s_1thread']:.0f} with 1 C thread; target "
                     f"{CHECKS_PER_SEC_TARGET:.0f}: {_met(oc['meets_target'])}"
                     f"{', met with 1 thread' if oc['meets_target_1thread'] else ''}")
    elif "op_checks" in parts:
        lines.append(f"  op checks: {oc.get('status')}: {str(oc.get('why'))[:200]}")
    for name in FULL_PARTS:
        split = ov.get(name, {}).get("split", {})
        label = "warm" if "warm" in split else "first"
        if label not in split:
            continue
        sp = split[label]
        lines.append("")
        lines.append(f"where {name}'s {label} step goes ({sp['step_s']:.3g} s): the models "
                     f"{sp['models_in_check_s']:.3g} s (alone {sp['models_alone_s']:.3g} s), the harness "
                     f"{sp['harness_s']:.3g} s")
        lines.append("  models, in the check / alone: " + ", ".join(
            f"{cat} {a:.3g}/{b:.3g}" for cat, (a, b) in sp["models_in_check_vs_alone"].items())
            + f" (the witness's noise {sp['witness_noise_s']:.3g})")
        top = [(k, v) for k, v in sp["harness_categories_s"].items() if v >= 0.01 * sp["step_s"]]
        lines.append("  harness: " + ", ".join(f"{k} {v:.3g}" for k, v in top))
    m = results["machine"]
    lines.append("")
    lines.append(f"machine: {m['cpu_model']}, {m['cores_usable']} cores, {m['memory_gib']} GiB, "
                 f"load {_load(m.get('load_average'))} -> {_load(m.get('load_average_end'))} "
                 f"({_load_range(parts)}), "
                 f"python {m['python']}, numpy {m['numpy']}, torch {m.get('torch')}, "
                 f"C OpenMP threads {m.get('c_openmp_threads')}")
    return "\n".join(lines)


def d24_line(r: dict) -> str:
    """The d24 (GPT-2 medium shape) one-step check in a line: time, peak RSS, verdict."""
    if r.get("status") != "ran":
        return f"full_check_d24 (d24, B=4, T=64): {r.get('status')}: {str(r.get('why', ''))[:300]}"
    kinds = ", ".join(f"{v} {k}" for k, v in r["checks_by_kind"].items())
    return (f"full_check_d24 (d24, {d24_config().num_parameters() / 1e6:.1f}M parameters, B=4, T=64, one step): "
            f"completed in {r['first_step_s']:.3g} s "
            f"(whole call {r['wall_s']:.3g} s), {'passed' if r['passed'] else 'FAILED'} ({kinds}); "
            f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB ({r['model_peak_mib'] / 1024:.2f} GiB above its "
            f"baseline of interpreter, imports, generated parameters); fits 24 GB: "
            f"{'yes' if r['peak_rss_mib'] * 2**20 < 24e9 else 'NO'}"
            + (f"; peak reached in {r['peak_reached_in']}" if r.get("peak_reached_in") else ""))


def markdown(results: dict) -> str:
    """The results as markdown tables: the parts and full checks, then the targets."""
    parts, mem, ov = results["parts"], results.get("memory", {}), results.get("overhead", {})
    analytic = mem.get("analytic_per_part_mib", {})
    cfg = f"{results['config']}, B={results['B']}, T={results['T']}"
    out = [f"| {cfg} | first step | warm step | peak RSS | held (above baseline) | held by config |",
           "|---|---:|---:|---:|---:|---:|"]

    def mib(x):
        return "-" if x is None else f"{x:,.0f} MiB"

    def sec(x):
        return "-" if x is None else f"{x:.3g} s"
    for name in MODEL_PARTS:
        r = parts.get(name, {})
        if "step" in r:
            out.append(f"| `{name}` alone | {sec(r['first_step_s'])} | {sec(r['step']['median_s'])} | "
                       f"{mib(r['peak_rss_mib'])} | {mib(r['model_peak_mib'])} | {mib(analytic.get(name))} |")
    if "sum_warm_s" in ov:
        out.append(f"| **sum of the five** | {sec(ov['sum_first_s'])} | {sec(ov['sum_warm_s'])} | | "
                   f"{mib(mem.get('measured_sum_mib'))} | {mib(mem.get('analytic_sum_mib'))} |")
    for name, mode in FULL_PARTS.items():
        fc = parts.get(name, {})
        if fc.get("status") == "ran":
            out.append(f"| `{name}` (replay={mode!r}{'' if fc['passed'] else ', failed'}) | "
                       f"{sec(fc['first_step_s'])} | {sec(fc.get('warm_step_s'))} | {mib(fc['peak_rss_mib'])} | "
                       f"{mib(fc['model_peak_mib'])} | |")
    d24 = parts.get("full_check_d24", {})
    out += ["", "| target | measured | |", "|---|---|---|"]
    for name in FULL_PARTS:
        r = ov.get(name)
        if r:
            meas = (f"first step {r['first_vs_necessary']:.2f} x the necessary parts "
                    f"({r['first_vs_first']:.2f} x all five); {r.get('first_vs_necessary_in_check', float('nan')):.2f} "
                    "x the necessary models' time inside the check")
            if "warm_vs_necessary" in r:
                meas += f"; warm {r['warm_vs_necessary']:.2f} ({r['warm_vs_warm']:.2f})"
            out.append(f"| `{name}` <= {OVERHEAD_TARGET} x C + numpy + torch + oracle | {meas} | "
                       f"{'met' if r['meets_target'] else '**not met**'} |")
    for name in FULL_PARTS:
        r = mem.get(name)
        if r:
            out.append(f"| peak <= {MEMORY_TARGET:g} x the C's footprint: `{name}` | "
                       f"{r['peak_above_baseline_mib']:,.0f} / {mem['c_footprint_mib']:,.0f} MiB = "
                       f"{r['vs_c_footprint']:.2f} | {'met' if r['meets_target'] else '**not met**'} |")
    if d24:
        out.append(f"| d24 one-step check on a 24 GB machine | {d24_line(d24)} | "
                   f"{'met' if d24.get('status') == 'ran' and d24['passed'] and d24['peak_rss_mib'] * 2**20 < 24e9 else '**not met**'} |")
    v = results.get("views")
    if v and "views_checked" in v:
        out.append(f"| C buffers compared as views | {v['views_checked']} CModel arrays at the C's pointers; "
                   f"{v['run_parity_compares_reading_c_memory']}/{v['run_parity_c_tensor_checks']} C-tensor "
                   f"comparisons read the C's memory | {'met' if v['ok'] else '**not met**'} |")
    oc = parts.get("op_checks", {})
    if "per_kernel" in oc:
        out.append(f"| op checks >= {CHECKS_PER_SEC_TARGET:.0f}/s | min {oc['min_calls_per_s']:.0f}/s | "
                   f"{'met' if oc['meets_target'] else '**not met**'} |")
    m = results["machine"]
    out += ["", f"Machine: {m['cpu_model']}, {m['cores_usable']} cores, {m['memory_gib']} GiB; "
                f"{_load_range(parts)}; Python {m['python']}, "
                f"NumPy {m['numpy']}, torch {m.get('torch')}; C built with "
                f"{(m.get('library_build') or {}).get('cflags', '?')}, {m.get('c_openmp_threads')} OpenMP threads."]
    return "\n".join(out)


def _load_range(parts: dict) -> str:
    loads = [p["load_average_at_start"][0] for p in parts.values() if p.get("load_average_at_start")]
    if not loads:
        return "load average -"
    return f"1-min load average {min(loads):.1f} to {max(loads):.1f} as the parts started"


def _load(la) -> str:
    return "-" if not la else "/".join(f"{x:.1f}" for x in la)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true",
                    help="the 'small' config at B=2, T=16, every part (tests the script in a minute)")
    ap.add_argument("--config", default=None, help="preset (default d12, or small with --quick)")
    ap.add_argument("-B", type=int, default=None)
    ap.add_argument("-T", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="warm steps timed after the first, per part (default 1 at d12, else 3)")
    ap.add_argument("--full-steps", type=int, default=None,
                    help="run_parity steps of full_check (default 1 at d12: the one-step check the "
                         "targets are judged on; 2 elsewhere: the first and a warm one)")
    ap.add_argument("--no-d24", action="store_true",
                    help="skip full_check_d24, the one-step check of GPT-2 medium's shape (d24, B=4, "
                         "T=64; ~17 GiB; run only when the machine has the memory available)")
    ap.add_argument("--no-replay", action="store_true",
                    help="skip full_check_replay (at d12 on 2 cores it takes ~2.5 min of the ~7)")
    ap.add_argument("--replay-steps", type=int, default=None,
                    help="run_parity steps of full_check_replay (default 1 at d12, else 2)")
    ap.add_argument("--parts", nargs="*", default=None, help="subset of " + " ".join(ALL_PARTS))
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="take the parts not run now from this earlier result (same config, B, T)")
    ap.add_argument("--op-seconds", type=float, default=None, help="timing per cheap kernel")
    ap.add_argument("--no-views", action="store_true", help="skip the in-process views check")
    ap.add_argument("--profile", default=None,
                    help="cProfile the full checks: writes PATH.<part>.prof (pstats)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads(N) in torch_step and the full checks (on a busy "
                         "machine torch's thread pool degrades; 1 is then the fairer measurement)")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the results as markdown tables (for the README)")
    ap.add_argument("--timeout", type=float, default=None, help="per child process, seconds")
    ap.add_argument("--part", help=argparse.SUPPRESS)          # internal: run one part here
    args = ap.parse_args(argv)
    args.config = args.config or ("small" if args.quick else "d12")
    big = args.config in ("d12", "124M")
    args.B = args.B or (2 if args.quick else 4)
    args.T = args.T or (16 if args.quick else 64)
    args.steps = args.steps or (1 if big else 3)
    args.full_steps = args.full_steps or (1 if big else 2)
    args.replay_steps = args.replay_steps or (1 if big else 2)
    args.op_seconds = args.op_seconds or (0.2 if args.quick else 0.3)

    if args.part:
        print(RESULT_TAG + json.dumps(run_part(args.part, args)), flush=True)
        return 0

    from pyref.config import preset
    cfg = preset(args.config)
    parts = args.parts
    if parts is None:
        parts = [*MODEL_PARTS, "op_checks", "full_check"]
        if not args.no_replay:
            parts.append("full_check_replay")
        if big and not args.no_d24:
            parts.append("full_check_d24")
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {' '.join(ALL_PARTS)}")
    results = {"config": args.config, "config_fields": vars(cfg), "B": args.B, "T": args.T,
               "timed_steps": args.steps, "full_check_steps": args.full_steps,
               "full_check_replay_steps": args.replay_steps, "machine": machine_info(), "parts": {}}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        if (old.get("config"), old.get("B"), old.get("T")) != (args.config, args.B, args.T):
            ap.error(f"{args.reuse} is {old.get('config')} B={old.get('B')} T={old.get('T')}, "
                     f"not {args.config} B={args.B} T={args.T}")
        for name, r in old.get("parts", {}).items():
            if name not in parts:
                results["parts"][name] = dict(r, reused_from=r.get("reused_from") or args.reuse)
        if args.no_views and "views" in old:
            results["views"] = old["views"]
    t0 = time.perf_counter()
    if not args.no_views:
        print("[bench] views check (tiny, in process) ...", file=sys.stderr, flush=True)
        try:
            results["views"] = check_views()
        except Exception as e:      # noqa: BLE001
            results["views"] = {"ok": False, "why": f"{type(e).__name__}: {e}"}
    for name in parts:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name == "full_check_d24" and (room := d24_room()) is not None:
            results["parts"][name] = room
            continue
        results["parts"][name] = spawn(name, args, args.timeout or (1200 if name == "full_check_d24" else 600))
    results["overhead"] = overhead(results)
    results["memory"] = memory(results, cfg, args.B, args.T)
    results["total_wall_s"] = time.perf_counter() - t0
    results["machine"]["load_average_end"] = list(os.getloadavg())
    print(table(results, f"{args.config} ({cfg.num_parameters() / 1e6:.1f}M parameters) B={args.B} T={args.T}"
                         + (f", {results['total_wall_s']:.0f} s" if parts else "")))
    if args.markdown:
        print()
        print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.json}")
    failed = [n for n, r in results["parts"].items() if r.get("status") in ("failed", "timeout")]
    if results.get("views", {}).get("ok") is False:
        failed.append("views")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
