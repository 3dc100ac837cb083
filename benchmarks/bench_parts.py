"""The parts of ``make bench`` (benchmarks/bench.py runs each in a child process of its
own, so that its time and peak RSS are its own): each model's step alone, per-op check
throughput, and full checks (``run_parity``) with where their steps go (:class:`Breakdown`,
a listener of the probes the run marks, :mod:`harness.probe`).
"""
from __future__ import annotations

import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

from harness import AdamW

ROOT = Path(__file__).resolve().parents[1]
CHEAP_KERNELS = ("residual_forward", "residual_backward", "gelu_forward", "gelu_backward",
                 "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
                 "softmax_forward", "crossentropy_forward", "crossentropy_softmax_backward")
CHECKS_PER_SEC_TARGET = 300.0
OVERHEAD_TARGET = 1.3          # one-step full check / sum of its necessary parts (issue 24)
LLMC_TARGET = 1.5              # the README's llm.c command / the sum of its necessary parts
LLMC_SECONDS = 300.0           # ... and its wall time on this project's 2-core machine
LLMC_STEPS = 10                # what the command runs by default
MEMORY_TARGET = 3.5            # full check's peak (above its baseline) / the C model's own footprint (issue 32:
                               # the witness's buffers kept through the run)
ESTIMATE_TARGET = 0.2          # the llm.c command's header estimate of its time: within 20% of it
# the parts a full check runs (run_parity with impls numpy and torch); the necessary ones are
# what no check can avoid: the C's step, the float64 oracle, each implementation's own step
MODEL_PARTS = ("c_step", "numpy_step", "torch_step", "oracle_step", "witness_step")
NECESSARY_PARTS = ("c_step", "numpy_step", "torch_step", "oracle_step")
FULL_PARTS = {"full_check": "on-failure", "full_check_replay": True, "full_check_d24": "on-failure"}
D24 = dict(config="d24", B=4, T=64)     # GPT-2 medium's shape (350M parameters)
LLMC_PARTS = {"llmc_command": True, "llmc_command_unheld": False}   # -> hold_freed_memory
ALL_PARTS = (*MODEL_PARTS, "c_step_1t", "op_checks", *FULL_PARTS, *LLMC_PARTS)
# the categories of a full check's breakdown that are a model's own work, and its part
MODEL_CATEGORIES = {"C": "c_step", "numpy": "numpy_step", "torch": "torch_step",
                    "oracle": "oracle_step", "witness": "witness_step"}
HYPER = AdamW()   # run_parity's


# ----------------------------------------------------------------------------- measuring

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
        from harness.arbiter.oracle import trim_heap
        trim_heap()        # what was freed before is given back: a held heap would serve it unseen
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
        from harness import load_library
        lib = load_library()
        info["library"] = lib.path
        info["library_build"] = None if lib.build_info is None else vars(lib.build_info)
        info["c_openmp_threads"] = lib.get_num_threads()
    except Exception as e:          # noqa: BLE001  (the bench still reports the rest)
        info["library"] = f"unavailable: {e}"
    return info


def first_touch_ns(mib: int = 256) -> dict:
    """Nanoseconds per 4 KiB page to write memory this process has just been given (its
    first touch: the kernel, and on a VM the hypervisor, back each page) and to write it
    again (touched), over ``mib`` MiB."""
    import numpy as np
    a = np.empty(mib * 2**20 // 8)
    t0 = time.perf_counter()
    a.fill(1.0)
    t1 = time.perf_counter()
    a.fill(2.0)
    t2 = time.perf_counter()
    pages = a.nbytes / 4096
    return {"first_touch_ns_per_page": (t1 - t0) / pages * 1e9, "touched_ns_per_page": (t2 - t1) / pages * 1e9}


def warm_memory(nbytes: int) -> dict:
    """Touch ``nbytes`` of fresh memory once, all held at once, then give it back: on a VM
    whose memory has not been used since it started, the hypervisor backs a page on its
    first touch (about 10 us a page on the project's machine, against under 1 us for a
    page it has backed before), which would otherwise be charged to whichever part first
    reaches that much memory. Returns what it did and the first-touch cost before and after."""
    import numpy as np
    cold = first_touch_ns()
    chunk = 2**29
    t0 = time.perf_counter()
    held = []
    for _ in range(max(0, nbytes) // chunk):
        c = np.empty(chunk // 8)
        c.fill(0.0)
        held.append(c)
    seconds = time.perf_counter() - t0
    del held
    return {"warmed_gib": (nbytes // chunk) * chunk / 2**30, "seconds": seconds, "cold": cold, "warm": first_touch_ns()}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def hold_after_first_step() -> bool:
    """What ``llmc-parity run`` does after its first step, where the memory keeps the
    witness: the freed memory held from there on (:func:`harness.arbiter.oracle.hold_freed_memory`;
    off with ``LLMC_HOLD_MEMORY=0``)."""
    from harness.arbiter.oracle import hold_freed_memory
    return hold_freed_memory()


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
            out["hold_freed_memory"] = hold_after_first_step()
            continue
        totals.append(sum(per.values()))
        for name, dt in per.items():
            warm[name].append(dt)
    if totals:
        out["step"] = {"median_s": _median(totals), "min_s": min(totals), "max_s": max(totals),
                       "n": len(totals), "all_s": [round(x, 4) for x in totals]}
        out["phases_median_s"] = {k: _median(v) for k, v in warm.items()}
    return out


def d24_config():
    """GPT-2 medium's shape: 24 layers, 16 heads, C=1024 (pyref.config has no preset)."""
    from pyref.config import GPT2Config
    return GPT2Config(max_seq_len=1024, vocab_size=50257, padded_vocab_size=50304,
                      num_layers=24, num_heads=16, channels=1024)


# ----------------------------------------------------------------------------- the parts

def part_c_step(cfg, params, batch, steps: int, threads: int | None = None) -> dict:
    from harness import CModel

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
            "update": lambda t: m.update(*HYPER.args(), t=t, threads=threads),
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
        from harness import ORACLE                   # pyref.numpy_kernels, as run_parity's oracle
        make = lambda: GPT2(cfg, params, kernels=ORACLE, dtype=np.float64)  # noqa: E731
    elif which == "witness":
        from harness import Witness
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
        phases["update"] = lambda t: model.update(*HYPER.args(), t)
    out.update(timed_steps(phases, steps))
    out["loss"] = float(model.mean_loss)
    base.done(out)
    out["tokens_per_s"] = B * T / out["step"]["median_s"] if "step" in out else None
    return out


def part_llmc_command(cfg, params, B: int, T: int, hold: bool = True) -> dict:
    """The README's llm.c command as a user runs it: ``llmc-parity run --checkpoint
    model.bin --debug-state debug.bin`` with every default (10 steps, B=4, T=64), on a
    checkpoint of GPT-2's initialisation and a debug state recorded by the torch reference
    (float32, as llm.c's train_gpt2.py records one), both written here first; timed from
    the process's start to its exit, with each step's seconds (from its JSON report) and
    its peak RSS. ``hold=False``: with ``LLMC_HOLD_MEMORY=0``, the process returning freed
    memory to the system as it did before :func:`harness.arbiter.oracle.hold_freed_memory`."""
    import json
    import subprocess
    import tempfile

    import numpy as np
    from pyref import formats, torch_kernels
    from pyref.model import GPT2
    from pyref.protocol import KernelSet
    from pyref.synth import make_batch

    with tempfile.TemporaryDirectory(prefix="llmc-bench-") as tmp:
        ck, ds, js = Path(tmp) / "model.bin", Path(tmp) / "debug.bin", Path(tmp) / "run.json"
        formats.write_checkpoint(ck, cfg, params)
        x, y = make_batch(cfg, B, T, seed=0)
        ref = GPT2(cfg, params, kernels=KernelSet.from_module(torch_kernels), dtype=np.float32)
        loss = ref.forward(x, y)
        ref.zero_grad()
        ref.backward()
        formats.write_debug_state(ds, cfg, x, y, ref.acts["logits"][..., :cfg.vocab_size], loss, ref.grads_memory)
        del ref
        env = dict(os.environ, LLMC_HOLD_MEMORY="1" if hold else "0")
        lines, at, err = [], [], tempfile.TemporaryFile("w+")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "--checkpoint", str(ck),
                                 "--debug-state", str(ds), "-q", "--json", str(js)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        for line in proc.stdout:       # each line with the second it came (the header's estimates)
            lines.append(line.rstrip("\n"))
            at.append(time.perf_counter() - t0)
        proc.wait()
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read()
        steps_s = [s["seconds"] for s in json.loads(js.read_text())["steps"]] if js.is_file() else []
    head = [(ln, s) for ln, s in zip(lines[:8], at) if ln.startswith(HEADER_LINES)]
    header = [ln for ln, _ in head]
    estimates = {ln.split(" took", 1)[0]: {"estimate_s": _estimate_s([ln]), "said_at_s": s}
                 for ln, s in head if ln.startswith(("step 1", "step 2"))}
    return {"status": "ran", "wall_s": wall, "returncode": proc.returncode, "steps": LLMC_STEPS,
            "hold_freed_memory": hold, "steps_s": steps_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
            "passed": proc.returncode == 0, "header": header, "estimate_s": _estimate_s(header),
            "estimates": estimates, "report_at_s": at[-1] if at else None,
            "verdict": next((ln for ln in lines if ln.startswith("llmc-parity:")), None),
            "stderr_tail": stderr[-1000:] if proc.returncode not in (0, 1) else ""}


# the llm.c command's header: its lines up to the estimates after steps 1 and 2
HEADER_LINES = ("llmc-parity run", "with --debug", "witness:", "at ", "step 1", "step 2")


def _estimate_s(header: list[str]) -> float | None:
    """The seconds the command's header says it takes, after step 1 (the first line that
    says it: ``... the run about 4.6 min in all``; before, ``the 10 steps take about 4.6 min``)."""
    import re
    for line in header:
        m = re.search(r"the run about ([0-9.]+) ?(s|min)\b", line) or re.search(r"take about ([0-9.]+) ?(s|min)\b", line)
        if m:
            return float(m.group(1)) * (60.0 if m.group(2) == "min" else 1.0)
    return None


def part_op_checks(seconds_per_kernel: float) -> dict:
    from harness import CKernels, check_kernel, load_library, make_inputs
    from pyref.cases import SHAPE_BY_NAME
    from pyref.spec import SPEC

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
    import torch                     # imported before the baseline, as in torch_step

    from harness import run_parity
    from harness.probe import listening
    from pyref import numpy_kernels, torch_kernels
    from pyref.protocol import KernelSet

    impls = {"numpy": KernelSet.from_module(numpy_kernels),
             "torch": KernelSet.from_module(torch_kernels)}
    bd = Breakdown()

    def batches():
        while True:
            if bd.step_starts:      # a step done: as the command does after its first
                out["hold_freed_memory"] = hold_after_first_step()
            bd.snapshot()
            yield batch

    out = {"status": "ran", "replay": replay, "steps_run": steps, "torch_threads": torch.get_num_threads()}
    base = Baseline()
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    with listening(bd):
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        report = run_parity(cfg, params, batches(), impls=impls, steps=steps, replay=replay)
        out["wall_s"] = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
            out["profile"] = profile
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
    """Where a run_parity call spends its time and reaches its memory peak: a listener of
    the probes the run marks (:mod:`harness.probe`), split into steps at each
    ``next(batches)``. Categories: the five models' own work (``C``, ``numpy``, ``torch``,
    ``oracle``, ``witness``) and the harness's work around them; ``compare`` and ``term
    magnitudes`` are named after the work they serve.

    Time is wall-clock, counted once: each moment goes to the innermost span of the
    thread doing the work -- the worker threads' where any is in a span (the main thread
    waits on them; two at once share the moment), else the main thread's -- so that a
    step's categories and ``other`` (the moment in no span) add up to the step."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.peak_growth_mib: dict[str, float] = {}
        self.peak_in: str | None = None
        self._local = threading.local()       # each thread's stack of [category, ...]
        self._main = self._local.stack = []
        self._main_id = threading.get_ident()
        self._lock = threading.Lock()
        self._hwm = _status_kib("VmHWM") or 0.0
        self.events: list[tuple[float, int, str | None]] = []   # (time, thread, innermost category after)
        self.step_starts: list[float] = []

    def enter(self, category: str, detail: dict):
        stack = getattr(self._local, "stack", None)
        if stack is None:           # a worker thread of run_parity: its own stack, whose
            stack = self._local.stack = []    # calls are named after the main thread's
        if category in ("compare", "term magnitudes"):      # by what they serve
            serves = stack or self._main
            category = f"{category} ({serves[-1] if serves else 'loss'})"
        stack.append(category)
        with self._lock:
            self.events.append((time.perf_counter(), threading.get_ident(), category))
        return stack

    def exit(self, stack) -> None:
        category = stack.pop()
        with self._lock:
            self.events.append((time.perf_counter(), threading.get_ident(), stack[-1] if stack else None))
            self.calls[category] = self.calls.get(category, 0) + 1
            hwm = _status_kib("VmHWM") or 0.0
            if hwm > self._hwm:
                self.peak_growth_mib[category] = self.peak_growth_mib.get(category, 0.0) + (hwm - self._hwm) / 1024
                self._hwm, self.peak_in = hwm, category

    def snapshot(self) -> None:
        self.step_starts.append(time.perf_counter())

    def _moments(self, end: float):
        """(t0, t1, {category: share}) for each stretch between events, up to ``end``."""
        inner: dict[int, str | None] = {}
        prev = None
        for t, thread, cat in sorted(self.events + [(end, -1, None)], key=lambda e: e[0]):
            if prev is not None and t > prev:
                workers = [c for th, c in inner.items() if th != self._main_id and c is not None]
                owners = workers or [c for th, c in inner.items() if th == self._main_id and c is not None]
                yield prev, t, {c: 1.0 / len(owners) for c in owners} if owners else {}
            prev = t
            if thread != -1:
                inner[thread] = cat

    def per_step(self, steps_s: list[float]) -> list[dict]:
        """Each step's categories in wall-clock seconds (from its start to the next's, the
        last to its start + its length), with ``other`` = the step's time in no span."""
        starts = self.step_starts[:len(steps_s)]
        bounds = [(a, a + secs) for a, secs in zip(starts, steps_s)]
        out = [dict() for _ in bounds]
        end = max((b for _, b in bounds), default=0.0)
        for t0, t1, shares in self._moments(end):
            for i, (a, b) in enumerate(bounds):
                dt = min(t1, b) - max(t0, a)
                if dt > 0:
                    for c, share in shares.items():
                        out[i][c] = out[i].get(c, 0.0) + dt * share
        for d, secs in zip(out, steps_s):
            d["other"] = secs - sum(d.values())
        return [dict(sorted(d.items(), key=lambda kv: -kv[1])) for d in out]
