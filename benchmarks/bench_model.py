"""What checking a PyTorch model costs (``make bench`` runs it after bench.py).

    .venv/bin/python benchmarks/bench_model.py                 # d12 (GPT-2 124M), B=4, T=64
    .venv/bin/python benchmarks/bench_model.py --config tiny   # seconds

The target (issue 11): *a model check of GPT-2 124M's shape (B=4, T=64, one step) costs
at most 1.5x the C step + the model's own step + the float64 oracle.* Each part runs alone
in this process, first a step that pays the lazy allocations and torch's start-up, then a
timed (warm) one:

  c_step       the C library: forward, zero_grad, backward, update
  model_step   the model as its port trains it (tests/ports/model_ports.py:GPT, nanoGPT's layout):
               forward with the targets, backward, torch.optim.AdamW
  oracle_step  pyref.model.GPT2 in float64: forward, zero_grad, backward
  model_check  harness.run_parity with the model alone beside the C (the witness,
               the mapping both ways, hooks, every comparison, the AdamW check; the replay
               only where an end-to-end check failed): its second step

The ratio is model_check / (c_step + model_step + oracle_step). The float32-noise witness
is a second float64 model run inside every check, so it is part of the check's cost and
not of the denominator.

Where the check's steps go (issue 32.3): run_parity's probes, and spans this benchmark puts
around the port's own costs (:data:`PORT_SPANS`: the copy-in of the C's state, the
read-back of activations, gradients and the update, the derived activations, the census,
the mixed-precision observer and its profile on the first step), timed wall-clock
(benchmarks/bench_parts.py Breakdown: a step's categories add up to it); the port's
forward and backward with its hooks are ``GPT``, against ``model_step`` alone.

Recording (issue 30: a port's forward recorded op by op to pin a failure to its line,
:mod:`harness.ports.record`) runs only once a check has failed. Its cost on the passing
check above is the time the run spends in the pins (:data:`PINS`: they look at the checks
and return), given as ``recording_ratio`` = step / (step - that time), target <= 1.05.
A failing check (``--failing``, in a child process of its own so that its peak is its
own: tests/ports/line_ports.py's SquareGeluGPT, train_gpt2.py's GPT with ``x**2`` in its
GELU in place of ``x**3``, one step, the replay and the recording where the end-to-end
checks fail) gives the recording's seconds and the check's peak RSS above its baseline
against the C model's footprint, target <= 3.5 (:data:`bench_parts.MEMORY_TARGET`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 1.5
RECORDING_TARGET = 1.05     # a passing check with recording available / without it
# where a run records a torch port (only once a check has failed): "module:function" -> what
PINS = {"harness.checks.run:pin_divergence": "forward and backward", "harness.checks.run:pin_update": "update"}
FAILING_PORT = ("line_ports", "SquareGeluGPT")   # tests/ports/line_ports.py: x**2 in GELU's cube
RESULT_TAG = "BENCH_MODEL_RESULT "
# the port's own costs, timed by wrapping (only in this benchmark): "module:Class.method" -> span
PORT_SPANS = {
    "harness.ports.torchstate:ModelState.load_state": "port: copy-in",
    "harness.ports.torchstate:ModelState._store": "port: read-back (activations)",
    "harness.ports.torchstate:ModelState._read": "port: read-back (grads, m, v, params)",
    "harness.ports.torchstate:ModelState._derive": "port: derived activations",
    "harness.ports.torchstate:ModelState._derive_one": "port: derived activations",
    "harness.ports.census:Census.forward_findings": "port: census",
    "harness.ports.census:Census.gradient_findings": "port: census",
    "harness.ports.precision:observe": "port: observer (first step)",
    "harness.ports.precision:profile": "port: precision profile (first step)",
}


def instrumented():
    """The port's own costs marked as spans (:data:`PORT_SPANS`), for as long as the
    returned context lasts."""
    import contextlib
    import importlib
    from harness.probe import marked

    @contextlib.contextmanager
    def ctx():
        undo = []
        for where, category in PORT_SPANS.items():
            mod_name, attr = where.split(":")
            owner = importlib.import_module(mod_name)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = owner.__dict__[name]
            setattr(owner, name, marked(category)(original))
            undo.append((owner, name, original))
        try:
            yield
        finally:
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)
    return ctx()


class PinTimer:
    """The seconds a run spends in :data:`PINS` (the recording of a failing torch port),
    each step's, wrapped around the functions for as long as :meth:`installed` lasts."""

    def __init__(self, peaks: bool = False):
        self.seconds: list[float] = []      # per call
        self.calls = 0
        # with ``peaks``: the high-water mark reset at each call's start, so that the recording's
        # own peak RSS is read (:attr:`peak_mib`) and the run's is kept (:attr:`before_mib`)
        self.peaks, self.peak_mib, self.before_mib = peaks, 0.0, 0.0

    def installed(self):
        import contextlib
        import importlib

        @contextlib.contextmanager
        def ctx():
            undo = []
            for where in PINS:
                mod_name, name = where.split(":")
                owner = importlib.import_module(mod_name)
                original = owner.__dict__[name]
                setattr(owner, name, self._timing(original))
                undo.append((owner, name, original))
            try:
                yield self
            finally:
                for owner, name, original in reversed(undo):
                    setattr(owner, name, original)
        return ctx()

    def _timing(self, f):
        from bench_parts import peak_rss_mib, reset_peak_rss

        def timed(*args, **kwargs):
            if self.peaks:
                self.before_mib = max(self.before_mib, peak_rss_mib())
                reset_peak_rss()
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - t0)
                self.calls += 1
                if self.peaks:
                    self.peak_mib = max(self.peak_mib, peak_rss_mib())
        return timed

    def total(self) -> float:
        return sum(self.seconds)


def _timed(step, warmups: int = 1) -> float:
    from bench_parts import hold_after_first_step
    for _ in range(warmups):
        step()
    hold_after_first_step()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def measure(cfg, B: int, T: int) -> dict:
    import torch
    from harness import ORACLE, AdamW, CModel, Hyper, TorchModel, load_library, load_object, run_parity
    from pyref import synth
    from pyref.model import GPT2 as PyGPT2

    hyper = AdamW()
    params = synth.init_params(cfg, seed=0)
    x, y = synth.make_batch(cfg, B, T, seed=1)
    lib = load_library()
    GPT = load_object(f"{ROOT / 'tests' / 'ports' / 'model_ports.py'}:GPT")
    out = {}

    c = CModel.from_params(cfg, params, lib=lib)
    t = iter(range(1, 100))

    def c_step():
        c.forward(x, y)
        c.zero_grad()
        c.backward()
        c.update(*hyper.args(), next(t))
    out["c_step"] = _timed(c_step)
    c.close()

    model = GPT(Hyper(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, weight_decay=hyper.weight_decay)
    xi, yi = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))

    def model_step():
        _, loss = model(xi, yi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["model_step"] = _timed(model_step)

    oracle = PyGPT2(cfg, params, kernels=ORACLE, dtype=np.float64)

    def oracle_step():
        oracle.forward(x, y)
        oracle.zero_grad()
        oracle.backward()
    out["oracle_step"] = _timed(oracle_step)

    from bench_parts import Breakdown, hold_after_first_step
    from harness.probe import listening
    bd = Breakdown()

    def batches():
        while True:
            if bd.step_starts:      # after the first step, as `llmc-parity run` does
                hold_after_first_step()
            bd.snapshot()
            yield x, y
    pins = PinTimer()
    with instrumented(), listening(bd), pins.installed():
        report = run_parity(cfg, params, batches(), lib=lib, impls={}, steps=2, hyper=hyper, replay="on-failure",
                            models={"GPT": TorchModel(GPT)})
    out["model_check"] = report.steps[1].seconds
    # the pins run once per step each (forward/backward, update): the second step's two calls
    out["recording_s"] = sum(pins.seconds[len(pins.seconds) // 2:])
    out["recording_ratio"] = out["model_check"] / (out["model_check"] - out["recording_s"])
    out["recording_target"] = RECORDING_TARGET
    out["model_check_first"] = report.steps[0].seconds
    out["breakdown_first_s"], out["breakdown_warm_s"] = bd.per_step([s.seconds for s in report.steps])
    out["passed"] = report.passed
    out["ratio"] = out["model_check"] / (out["c_step"] + out["model_step"] + out["oracle_step"])
    out["target"] = TARGET
    out["met"] = out["ratio"] <= TARGET
    return out


def failing(cfg, B: int, T: int) -> dict:
    """One step of a failing model check (:data:`FAILING_PORT`), in this process: the
    recording's seconds, where the step went and the peak RSS above the baseline (the
    interpreter, imports, parameters and batch; the heap trimmed and the high-water mark
    reset there) against the C model's footprint."""
    import importlib
    from bench_parts import MEMORY_TARGET, Baseline, Breakdown
    from bench_results import held_bytes
    from harness import AdamW, TorchModel, load_library, run_parity
    from harness.arbiter.oracle import one_arena
    from harness.probe import listening
    from pyref import synth

    held = one_arena()       # as `llmc-parity run` does (one step: the freed memory is held after it)
    sys.path.insert(0, str(ROOT / "tests" / "ports"))
    port = getattr(importlib.import_module(FAILING_PORT[0]), FAILING_PORT[1])
    params = synth.init_params(cfg, seed=0)
    x, y = synth.make_batch(cfg, B, T, seed=1)
    lib = load_library()
    import torch  # noqa: F401  (imported before the baseline, as the passing check's)
    bd, pins = Breakdown(), PinTimer(peaks=True)

    def batches():
        while True:
            bd.snapshot()
            yield x, y
    base = Baseline()
    with instrumented(), listening(bd), pins.installed():
        report = run_parity(cfg, params, batches(), lib=lib, impls={}, steps=1, hyper=AdamW(),
                            replay="on-failure", models={"GPT": TorchModel(port)})
    out = base.done({"port": ":".join(FAILING_PORT), "hold_freed_memory": held, "passed": report.passed,
                     "first_divergence": report.first_divergence(), "step_s": report.steps[0].seconds,
                     "recording_s": pins.total(), "pin_calls": pins.calls})
    # the run's peak: before the pins reset the high-water mark, or after
    out["peak_rss_mib"] = max(out["peak_rss_mib"], pins.before_mib, pins.peak_mib)
    out["model_peak_mib"] = out["peak_rss_mib"] - out["baseline_rss_mib"]
    out["recording_peak_mib"] = pins.peak_mib - out["baseline_rss_mib"]   # the recording's own, same baseline
    out["breakdown_s"] = bd.per_step([report.steps[0].seconds])[0]
    out["peak_reached_in"], out["peak_growth_mib_by_category"] = bd.peak_in, bd.peak_growth_mib
    out["c_footprint_mib"] = held_bytes(cfg, B, T)["per_part_bytes"]["c_step"] / 2**20
    out["vs_c_footprint"] = out["model_peak_mib"] / out["c_footprint_mib"]
    out["recording_vs_c_footprint"] = out["recording_peak_mib"] / out["c_footprint_mib"]
    out["recording_memory_met"] = out["recording_vs_c_footprint"] <= MEMORY_TARGET
    out["memory_target"] = MEMORY_TARGET
    out["memory_met"] = out["vs_c_footprint"] <= MEMORY_TARGET
    return out


def spawn_failing(args) -> dict:
    """:func:`failing` in a child process (its peak its own)."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "-B", str(args.B),
           "-T", str(args.T), "--failing-here"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"status": "failed", "returncode": proc.returncode, "why": (proc.stderr or proc.stdout)[-2000:]}


def _say_failing(f: dict) -> None:
    if "vs_c_footprint" not in f:
        print(f"failing check: did not run: {f.get('why')}")
        return
    print(f"failing check ({f['port']}): {'passed (!)' if f['passed'] else 'failed'} in {f['step_s']:.2f}s, "
          f"recording {f['recording_s']:.2f}s; peak {f['model_peak_mib']:.0f} MiB above its baseline = "
          f"{f['vs_c_footprint']:.2f} x the C's footprint ({f['c_footprint_mib']:.0f} MiB; target <= "
          f"{f['memory_target']}): {'met' if f['memory_met'] else 'NOT MET'}; peak reached in {f['peak_reached_in']}")
    print(f"  peak RSS while recording: {f['recording_peak_mib']:.0f} MiB above the same baseline = "
          f"{f['recording_vs_c_footprint']:.2f} x the C's footprint (target <= {f['memory_target']}): "
          f"{'met' if f['recording_memory_met'] else 'NOT MET'}")
    print(f"  {f['first_divergence']}")


def main(argv=None) -> int:
    from pyref.config import preset
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="d12")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=None, help="default 64, or the config's max_seq_len if smaller")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument("--no-failing", action="store_true", help="skip the failing check (recording's memory)")
    ap.add_argument("--failing-only", action="store_true", help="only the failing check")
    ap.add_argument("--failing-here", action="store_true", help=argparse.SUPPRESS)   # internal: the child
    args = ap.parse_args(argv)
    cfg = preset(args.config)
    args.T = args.T or min(64, cfg.max_seq_len)
    if args.failing_here:
        print(RESULT_TAG + json.dumps(failing(cfg, args.B, args.T), default=str), flush=True)
        return 0
    failed = None if args.no_failing else spawn_failing(args)
    if args.failing_only:
        _say_failing(failed)
        if args.json:
            Path(args.json).write_text(json.dumps({"failing": failed}, indent=1))
        return 0 if "vs_c_footprint" in failed else 1
    from harness.arbiter.oracle import one_arena
    held = one_arena()       # as `llmc-parity run` does: one arena, freed memory held after the first step
    r = measure(cfg, args.B, args.T)
    r["hold_freed_memory"] = held
    print(f"model check ({args.config}, B={args.B}, T={args.T}): C step {r['c_step']:.2f}s, model step "
          f"{r['model_step']:.2f}s, oracle step {r['oracle_step']:.2f}s; check step {r['model_check']:.2f}s "
          f"(first {r['model_check_first']:.2f}s), {'passed' if r['passed'] else 'FAILED'}")
    print(f"ratio {r['ratio']:.2f} (target <= {TARGET}): {'met' if r['met'] else 'NOT MET'}")
    print(f"recording on the passing check: {r['recording_s'] * 1e3:.2f} ms of the step, ratio "
          f"{r['recording_ratio']:.4f} (target <= {RECORDING_TARGET}): "
          f"{'met' if r['recording_ratio'] <= RECORDING_TARGET else 'NOT MET'}")
    if failed is not None:
        r["failing"] = failed
        _say_failing(failed)
    for label in ("first", "warm"):
        bd = r[f"breakdown_{label}_s"]
        print(f"  {label} step, wall-clock: " + ", ".join(f"{k} {v:.3g}" for k, v in bd.items() if v >= 0.005))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
