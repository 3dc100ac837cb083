"""Speed and memory of the harness's parts at GPT-2 124M scale (``make bench``).

    .venv/bin/python benchmarks/bench.py --json build/bench.json      # d12, B=4, T=64
    .venv/bin/python benchmarks/bench.py --quick                      # small config, seconds

Parts, each in its own child process (so that each one's peak RSS is its own):

  c_step       the C library's training step (forward, zero_grad, backward, update) on a
               CModel with generated weights (pyref.synth.init_params)
  numpy_step   the same step of the NumPy float32 reference model (pyref.model.GPT2)
  torch_step   the same step of pyref.model.GPT2 with kernels=pyref.torch_kernels
  op_checks    per-op check throughput: harness.opcheck.check_kernel calls per second
               (the C against the float64 oracle, oracle included) for the cheap ops at
               the op table's "base" shape; target >= 300 calls/s
  full_check   HOOK: one full one-step parity check (harness.runner.run_parity, the C and
               both references against the float64 oracle); "pending" when
               harness.runner is not there yet

and, from those, the HOOK ``harness overhead ratio`` = full check wall time / sum of the
three model steps (what the check costs beyond running the three implementations).

Every step is timed after a first, separately reported step that includes the lazy
allocations (activations, grads, m, v). The machine (CPU model, cores, load average,
NumPy / torch versions, the library's build) is recorded with the numbers.
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
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_RESULT "
CHEAP_KERNELS = ("residual_forward", "residual_backward", "gelu_forward", "gelu_backward",
                 "encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
                 "softmax_forward", "crossentropy_forward", "crossentropy_softmax_backward")
CHECKS_PER_SEC_TARGET = 300.0
MODEL_PARTS = ("c_step", "numpy_step", "torch_step")


# ----------------------------------------------------------------------------- helpers

def peak_rss_mib() -> float:
    """This process's peak resident set size: VmHWM of its own address space. (Not
    getrusage's ru_maxrss: Linux carries the pre-exec high-water mark over execve, so a
    child would report at least its parent's RSS.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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
        from harness.binding import load_library
        lib = load_library()
        info["library"] = lib.path
        info["library_build"] = None if lib.build_info is None else vars(lib.build_info)
        info["c_openmp_threads"] = lib.get_num_threads()
    except Exception as e:          # noqa: BLE001  (the bench still reports the rest)
        info["library"] = f"unavailable: {e}"
    return info


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"median_s": s[len(s) // 2], "min_s": s[0], "max_s": s[-1], "n": len(s),
            "all_s": [round(t, 4) for t in times]}


# ----------------------------------------------------------------------------- the parts

def part_c_step(cfg, params, batch, steps: int, threads: int | None = None) -> dict:
    from harness.cmodel import CModel

    x, y = batch
    B, T = x.shape
    out = {"rss_before_model_mib": rss_mib(), "threads": threads or "default"}
    with CModel.from_params(cfg, params) as m:
        phases = {"forward": [], "zero_grad": [], "backward": [], "update": []}
        steps_s = []
        for t in range(1, steps + 2):
            t0 = time.perf_counter()
            m.forward(x, y, threads=threads)
            t1 = time.perf_counter()
            m.zero_grad()
            t2 = time.perf_counter()
            m.backward(threads=threads)
            t3 = time.perf_counter()
            m.update(learning_rate=1e-4, t=t, threads=threads)
            t4 = time.perf_counter()
            if t == 1:
                out["first_step_s"] = t4 - t0
                continue
            steps_s.append(t4 - t0)
            for k, a, b in (("forward", t0, t1), ("zero_grad", t1, t2), ("backward", t2, t3),
                            ("update", t3, t4)):
                phases[k].append(b - a)
        out["step"] = _stats(steps_s)
        out["phases_median_s"] = {k: sorted(v)[len(v) // 2] for k, v in phases.items()}
        out["loss"] = m.mean_loss
    out["tokens_per_s"] = B * T / out["step"]["median_s"]
    return out


def part_py_step(cfg, params, batch, steps: int, backend: str) -> dict:
    import numpy as np
    from pyref.model import GPT2

    kernels = None
    out = {}
    if backend == "torch":
        import torch
        from pyref import torch_kernels as kernels
        out["torch_threads"] = torch.get_num_threads()
    x, y = batch
    B, T = x.shape
    out["rss_before_model_mib"] = rss_mib()
    model = GPT2(cfg, params, kernels=kernels, dtype=np.float32)
    steps_s = []
    for t in range(1, steps + 2):
        t0 = time.perf_counter()
        loss = model.step(x, y, lr=1e-4, t=t)
        dt = time.perf_counter() - t0
        if t == 1:
            out["first_step_s"] = dt
        else:
            steps_s.append(dt)
    out["step"] = _stats(steps_s)
    out["loss"] = float(loss)
    out["tokens_per_s"] = B * T / out["step"]["median_s"]
    return out


def part_op_checks(seconds_per_kernel: float) -> dict:
    from harness.binding import load_library
    from harness.ckernels import CKernels
    from harness.ops import CHECK_BY_KERNEL, SHAPE_BY_NAME, make_inputs
    from harness.opcheck import check_kernel

    lib = load_library()
    impl = CKernels(lib)
    s = SHAPE_BY_NAME["base"]
    per_kernel = {}

    def rate(kernel, args):
        for _ in range(5):                                   # warm-up (first OpenMP team)
            check_kernel(impl, kernel, args, s)
        n, t0 = 0, time.perf_counter()
        while True:
            results = check_kernel(impl, kernel, args, s)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= seconds_per_kernel and n >= 20:
                return n / dt, all(c.passed for c in results)

    for kernel in CHEAP_KERNELS:
        args = make_inputs(CHECK_BY_KERNEL[kernel], s)
        r_default, ok = rate(kernel, args)
        with lib.num_threads(1):     # no OpenMP team: what a busy machine's barriers cost
            r_one, _ = rate(kernel, args)
        per_kernel[kernel] = {"calls_per_s": r_default, "calls_per_s_1thread": r_one, "passed": ok}
    rates = [v["calls_per_s"] for v in per_kernel.values()]
    rates1 = [v["calls_per_s_1thread"] for v in per_kernel.values()]
    return {"shape": str(s), "c_threads_default": lib.get_num_threads(), "per_kernel": per_kernel,
            "min_calls_per_s": min(rates), "min_calls_per_s_1thread": min(rates1),
            "target_calls_per_s": CHECKS_PER_SEC_TARGET,
            "meets_target": min(rates) >= CHECKS_PER_SEC_TARGET,
            "meets_target_1thread": min(rates1) >= CHECKS_PER_SEC_TARGET}


# ----------------------------------------------------------------------------- hooks

def measure_full_check(run: Callable[[], object]) -> dict:
    """HOOK: time one full one-step parity check. ``run`` does the whole check (the C, the
    references, the oracle, every comparison) and returns something with ``.passed``."""
    t0 = time.perf_counter()
    report = run()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "passed": bool(getattr(report, "passed", False))}


def harness_overhead_ratio(full_check_wall_s: float, parts: dict) -> dict:
    """HOOK: full check wall time / the sum of the model steps it runs (C, NumPy, torch),
    each part's warm median step plus its first step's allocation cost (a one-step check
    builds fresh models, so it pays the first step)."""
    total = 0.0
    used = {}
    for name in MODEL_PARTS:
        p = parts.get(name) or {}
        if "first_step_s" not in p:
            return {"ratio": None, "why": f"part {name} missing"}
        used[name] = p["first_step_s"]
        total += p["first_step_s"]
    return {"ratio": full_check_wall_s / total, "sum_of_parts_s": total, "parts_s": used}


def part_full_check(cfg, params, batch) -> dict:
    try:
        from harness.runner import run_parity
    except ImportError as e:
        return {"status": "pending", "why": f"harness.runner.run_parity not available ({e})"}
    from pyref import numpy_kernels, torch_kernels
    from pyref.protocol import KernelSet

    impls = {"numpy": KernelSet.from_module(numpy_kernels),
             "torch": KernelSet.from_module(torch_kernels)}

    def batches():
        while True:
            yield batch

    out = measure_full_check(lambda: run_parity(cfg, params, batches(), impls=impls, steps=1))
    out["status"] = "ran"
    return out


# ----------------------------------------------------------------------------- driver

def run_part(name: str, args) -> dict:
    """Run one part in this process (the child)."""
    from pyref.config import preset
    from pyref.synth import init_params, make_batch

    cfg = preset(args.config)
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
        elif name == "numpy_step":
            out = part_py_step(cfg, params, batch, args.steps, "numpy")
        elif name == "torch_step":
            out = part_py_step(cfg, params, batch, args.steps, "torch")
        elif name == "full_check":
            out = part_full_check(cfg, params, batch)
        else:
            raise SystemExit(f"unknown part {name!r}")
    out["part_wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def spawn(name: str, args, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--config", args.config,
           "-B", str(args.B), "-T", str(args.T), "--steps", str(args.steps),
           "--op-seconds", str(args.op_seconds)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"did not finish in {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"status": "failed", "returncode": proc.returncode,
            "why": (proc.stderr or proc.stdout)[-2000:], "wall_s": time.perf_counter() - t0}


def _fmt(x, unit="", digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}{unit}"
    return f"{x}{unit}"


def table(results: dict, cfg_label: str) -> str:
    rows = [("part", "first step", "step (median)", "tokens/s", "peak RSS", "notes")]
    for name in (*MODEL_PARTS, "c_step_1t"):
        if name not in results["parts"]:
            continue
        r = results["parts"].get(name, {})
        if "step" in r:
            notes = ""
            if name.startswith("c_step"):
                ph = r["phases_median_s"]
                notes = "fwd {:.3g}s bwd {:.3g}s update {:.3g}s".format(
                    ph["forward"], ph["backward"], ph["update"])
            rows.append((name, _fmt(r["first_step_s"], " s"), _fmt(r["step"]["median_s"], " s"),
                         _fmt(r["tokens_per_s"], "", 4), _fmt(r["peak_rss_mib"], " MiB", 5), notes))
        else:
            rows.append((name, "-", "-", "-", "-", r.get("status", "?") + ": " + str(r.get("why", ""))[:60]))
    oc = results["parts"].get("op_checks", {})
    if "per_kernel" in oc:
        worst = min(oc["per_kernel"], key=lambda k: oc["per_kernel"][k]["calls_per_s"])
        rows.append(("op_checks", "-", "-", "-", _fmt(oc["peak_rss_mib"], " MiB", 5),
                     f"min {oc['min_calls_per_s']:.0f} checks/s ({worst}), "
                     f"{oc['min_calls_per_s_1thread']:.0f} with 1 C thread; target "
                     f"{CHECKS_PER_SEC_TARGET:.0f}: {'met' if oc['meets_target'] else 'NOT met'}"
                     f"{', met with 1 thread' if oc['meets_target_1thread'] else ''}"))
    fc = results["parts"].get("full_check", {})
    if fc.get("status") == "ran":
        rows.append(("full_check", "-", _fmt(fc["wall_s"], " s"), "-", _fmt(fc["peak_rss_mib"], " MiB", 5),
                     "passed" if fc["passed"] else "FAILED"))
    else:
        rows.append(("full_check", "-", "-", "-", "-", f"{fc.get('status', 'pending')}: {fc.get('why', '')}"[:100]))
    ratio = results.get("harness_overhead_ratio", {})
    rows.append(("overhead ratio", "-", "-", "-", "-",
                 "pending" if ratio.get("ratio") is None else
                 f"{ratio['ratio']:.2f} (full check / sum of first steps {ratio['sum_of_parts_s']:.3g} s)"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"llmc-parity bench: {cfg_label}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if "per_kernel" in oc:
        lines.append("check_kernel calls/s (C vs float64 oracle, shape 'base', default / 1 C thread): "
                     + ", ".join(f"{k} {v['calls_per_s']:.0f}/{v['calls_per_s_1thread']:.0f}"
                                 for k, v in oc["per_kernel"].items()))
    m = results["machine"]
    lines.append(f"machine: {m['cpu_model']}, {m['cores_usable']} cores, load {m.get('load_average')}, "
                 f"numpy {m['numpy']}, torch {m.get('torch')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true",
                    help="the 'small' config at B=2, T=16 (tests the script in seconds)")
    ap.add_argument("--config", default=None, help="preset (default d12, or small with --quick)")
    ap.add_argument("-B", type=int, default=None)
    ap.add_argument("-T", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the first")
    ap.add_argument("--parts", nargs="*", default=None,
                    help="subset of c_step c_step_1t numpy_step torch_step op_checks full_check")
    ap.add_argument("--op-seconds", type=float, default=None, help="timing per cheap kernel")
    ap.add_argument("--full-check-timeout", type=float, default=None)
    ap.add_argument("--part", help=argparse.SUPPRESS)          # internal: run one part here
    args = ap.parse_args(argv)
    args.config = args.config or ("small" if args.quick else "d12")
    args.B = args.B or (2 if args.quick else 4)
    args.T = args.T or (16 if args.quick else 64)
    args.steps = args.steps or (3 if args.quick else 2)
    args.op_seconds = args.op_seconds or (0.2 if args.quick else 1.0)

    if args.part:
        print(RESULT_TAG + json.dumps(run_part(args.part, args)), flush=True)
        return 0

    # c_step_1t (the C step on one OpenMP thread) on request: on a shared 2-core machine it
    # shows what the thread team's barriers cost
    parts = args.parts or ["c_step", "numpy_step", "torch_step", "op_checks", "full_check"]
    timeouts = {"full_check": args.full_check_timeout or (120 if args.quick else 170)}
    results = {"config": args.config, "B": args.B, "T": args.T, "timed_steps": args.steps,
               "machine": machine_info(), "parts": {}}
    t0 = time.perf_counter()
    for name in parts:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results["parts"][name] = spawn(name, args, timeouts.get(name, 600))
    fc = results["parts"].get("full_check", {})
    results["harness_overhead_ratio"] = (
        harness_overhead_ratio(fc["wall_s"], results["parts"]) if fc.get("status") == "ran"
        else {"ratio": None, "why": f"full check {fc.get('status', 'not run')}"})
    results["total_wall_s"] = time.perf_counter() - t0
    results["machine"]["load_average_end"] = list(os.getloadavg())
    print(table(results, f"{args.config} B={args.B} T={args.T}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    failed = [n for n, r in results["parts"].items()
              if r.get("status") in ("failed",) and n != "full_check"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
