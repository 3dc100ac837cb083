"""Calibrate the tolerance policy: ``make calibrate`` (``python -m harness.calibrate``).

Two measurements, each build of the C in its own process (a library built with -Ofast sets
flush-to-zero for the process that loads it):

**Per op** (the default): every kernel of the op table over every shape and several seeds,
in the C built with ``-O2``, ``-O3``, ``-O3 -march=native`` (FMA contraction) and ``-Ofast
-march=native`` (reordered sums, vector libm), and in the NumPy and torch float32
references, against the float64 oracle. For each (kernel, output) it prints the worst
observed constants

    sigma  = max_rel  / (u sqrt(n) extreme(size))
    k_norm = norm_rel / (u sqrt(n) norm_excess(size))

next to the row's constants in :mod:`pyref.spec` (:mod:`harness.arbiter.tolerances` says what
they mean); the ratio of the two is the margin. For the bias test (:mod:`harness.arbiter.stats`) it
prints, in units of u, the largest legitimate bias (either form, over the cases where it is
significant: |z| >= 3), the minimum effect each case needs to pass (``|bias| - t SE``, the
part of it that is significant at the test's probability), the largest |z| seen, and the
row's ``bias`` (the minimum effect). Each C build runs with 1, 2 and 4 OpenMP threads.

**At scale** (``--scale``): training steps of GPT-2 124M's shape (``--config d12``) from
GPT-2's initialisation (weights N(0, 0.02), the residual projections N(0, 0.02/sqrt(2L)),
biases 0, gains 1), B=4, T=64, every op replayed every step, for the C (``-O3`` with the
NumPy and torch references and a ``--model``; ``-O3 -march=native`` and ``-Ofast
-march=native`` alone). Every check of every step (replay, end to end, update, loss) is
folded into its (kind, kernel.output): the worst fraction of its bound used, element-wise
and norm-wise, and where. The margin is one over that; the policy wants 1.5 or more
everywhere. The bias test's fraction of its bound used is folded the same way, with the
largest bias (in u) and its z-score. It also counts how many checks would have failed a bound built for a larger
false-alarm probability (1e-3, 1e-2), against how many the model allows: the bounds'
tail model, shown on the run itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from math import sqrt
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {"O2": "-O2", "O3": "-O3", "O3-native": "-O3 -march=native", "Ofast-native": "-Ofast -march=native"}
THREADS = (1, 2, 4)
SIGNIFICANT = 3.0     # |z| from which a calibration counts a bias as the build's own
SCALE_BUILDS = ("O3", "O3-native", "Ofast-native")   # -O2 gives -O3's bits
MARGIN = 1.5
LENIENT = (1e-3, 1e-2)


# ----------------------------------------------------------------------------
# per op

def measure(impl: str, lib: str | None, seeds: int) -> dict:
    """Worst observed constants of one implementation: kernel -> output -> [sigma, k_norm,
    bias (u, significant ones), the minimum effect needed (u), max |z|, where the bias was]."""
    import numpy as np

    from pyref import numpy_kernels, torch_kernels
    from pyref.protocol import KernelSet

    from .checks.perop import sweep
    from .clib.kernels import CKernels
    from .clib.library import load_library
    from .arbiter.tolerances import U, extreme, norm_excess
    from .arbiter.stats import FORMS

    kernels = {"numpy": lambda: KernelSet.from_module(numpy_kernels),
               "torch": lambda: KernelSet.from_module(torch_kernels)}.get(impl)
    ks = kernels() if kernels else CKernels(load_library(lib))
    worst: dict[str, dict[str, list[float]]] = {}
    for case in sweep({impl: ks}, seeds=range(seeds)):
        res = case.results[impl]
        if isinstance(res, Exception):
            raise res
        for out, c in (res or {}).items():
            n = case.spec.n(out, case.args)
            size = int(np.prod(c.shape))
            sigma = c.max_rel / (U * sqrt(n) * extreme(size))
            k_norm = c.norm_rel / (U * sqrt(n) * norm_excess(size))
            w = worst.setdefault(case.spec.name, {}).setdefault(out, [0.0, 0.0, 0.0, 0.0, 0.0, ""])
            w[0], w[1] = max(w[0], sigma), max(w[1], k_norm)
            b = c.bias_stats
            if b is None:
                continue
            for form in FORMS:
                z, x = b.z(form), getattr(b, form) / U
                if z is None:
                    continue
                w[4] = max(w[4], abs(z))
                if abs(z) >= SIGNIFICANT and abs(x) > w[2]:
                    w[2], w[5] = abs(x), f"{form} {x:+.2f}u z {z:+.1f} {case.shape.name} seed {case.seed}"
                w[3] = max(w[3], b.excess(form) / U)
    return worst


def _variant(name: str) -> Path:
    """Our train_gpt2.c built with BUILDS[name]'s flags (build/variants/lib_NAME.so)."""
    from .clib.build import build_library
    out = ROOT / "build" / "variants" / f"lib_{name}.so"
    build_library(ROOT / "llmc" / "train_gpt2.c", out, cflags=BUILDS[name], quiet=True)
    return out


def _per_op(args) -> int:
    runs = {}
    for name in BUILDS:
        out = _variant(name)
        for n in args.threads:
            runs[f"C {name} x{n}"] = ("C", str(out), {"OMP_NUM_THREADS": str(n)})
    runs["numpy"], runs["torch"] = ("numpy", "-", {}), ("torch", "-", {})
    results = {}
    for label, (impl, lib, env) in runs.items():
        res = _worker(["--seeds", str(args.seeds), "--worker", impl, lib], label, env=env)
        if res is None:
            return 1
        results[label] = res
    print(per_op_table(results))
    return 0


def per_op_table(results: dict) -> str:
    """The worst constants per (kernel, output) over every run, beside the rows' own."""
    from .arbiter.tolerances import rule
    from .report.table import text_table

    keys = sorted({(k, o) for r in results.values() for k in r for o in r[k]})
    header = ["kernel.output", "worst sigma", "policy", "worst k_norm", "policy", "bias u", "needs u", "policy",
              "max|z|", "worst in (sigma / k_norm / bias)"]
    rows = []
    for kernel, out in keys:
        r = rule(kernel, out)
        seen = [(res[kernel][out], label) for label, res in results.items() if out in res.get(kernel, {})]
        wr = max((k[0], label) for k, label in seen)
        wn = max((k[1], label) for k, label in seen)
        wb = max(((k[2], f"{label}: {k[5]}") for k, label in seen), key=lambda x: x[0])
        need = max(k[3] for k, _ in seen)
        maxz = max(k[4] for k, _ in seen)
        rows.append([f"{kernel}.{out}", f"{wr[0]:.3f}", f"{r.sigma:g}", f"{wn[0]:.2f}", f"{r.k_norm:g}",
                     f"{wb[0]:.2f}", f"{max(need, 0.0):.2f}", f"{r.bias:g}", f"{maxz:.1f}",
                     f"{wr[1]} / {wn[1]}" + (f" / {wb[1]}" if wb[0] > 0 else "")])
    return "\n".join(text_table(header, rows, right=range(1, 9)))


# ----------------------------------------------------------------------------
# at scale

def check_output(check) -> tuple[str, str]:
    """The (kernel, output) whose rule judged a check of a run."""
    if check.kind == "update":
        return "adamw", "param" if check.ref.group == "params" else check.ref.group
    if check.kind == "loss":
        return "crossentropy_forward", "losses"
    node = check.nodes[-1]
    return node.kernel, next(a for a, v in node.args if v == check.ref)


def fold(checks, worst: dict, tally: dict) -> None:
    """Fold a step's checks into ``worst`` ((kind, kernel.output) -> the worst fractions of
    the element-wise and norm-wise bounds used, and where) and ``tally`` (checks counted,
    and how many exceed the bound built for each LENIENT probability)."""
    from .arbiter.tolerances import U, extreme
    for c in checks:
        cmp = c.comparison
        kernel, output = check_output(c)
        key = f"{c.kind} {kernel}.{output}"
        rel, norm = cmp.max_rel / cmp.tol.rel, cmp.norm_rel / cmp.tol.norm
        w = worst.setdefault(key, {"rel": 0.0, "norm": 0.0, "rel_at": "", "norm_at": "",
                                   "bias": 0.0, "bias_u": 0.0, "bias_z": 0.0, "bias_at": ""})
        where = f"{c.impl} step {c.step} {c.tensor} at {cmp.worst_label}"
        if rel > w["rel"]:
            w["rel"], w["rel_at"] = rel, where
        if norm > w["norm"]:
            w["norm"], w["norm_at"] = norm, where
        if cmp.bias_stats is not None and cmp.bias_used >= w["bias"]:
            z = cmp.bias_z
            w["bias"], w["bias_u"] = cmp.bias_used, abs(cmp.bias) / U
            w["bias_z"], w["bias_at"] = 0.0 if z is None else abs(z), f"{c.impl} step {c.step} {c.tensor}"
        tally["checks"] = tally.get("checks", 0) + 1
        if c.kind in ("replay", "update"):   # the bound is the per-op one: sigma * extreme(N)
            tally["per_op"] = tally.get("per_op", 0) + 1
            for p in LENIENT:
                if rel > extreme(cmp.n_total, p) / extreme(cmp.n_total):
                    tally[str(p)] = tally.get(str(p), 0) + 1


def measure_scale(config: str, steps: int, refs: list[str], model: str | None, seed: int,
                  precision: str = "") -> dict:
    """One build's run at scale (the library in $LLMC_LIB): the worst fractions of the bounds
    used per (kind, kernel.output), and the tally."""
    from pyref import numpy_kernels, synth, torch_kernels
    from pyref.config import preset
    from pyref.protocol import KernelSet

    from .checks.run import run_parity
    from .clib.library import load_library

    cfg = preset(config)
    impls = {name: KernelSet.from_module({"numpy": numpy_kernels, "torch": torch_kernels}[name], name=name)
             for name in refs}
    models = {}
    if model:
        from .ports.loader import load_model
        models["model"] = load_model(model, name="model")
        for part in filter(None, precision.split(",")):   # "autocast=bf16,params=bf16,scaler"
            key, _, value = part.partition("=")
            if key == "autocast":
                models["model"].autocast = value
            elif key == "params":
                models["model"].param_dtype = value
            elif key == "scaler":
                models["model"].grad_scaler = True
            else:
                raise SystemExit(f"--precision: unknown part {part!r} (autocast=bf16|fp16, params=bf16|fp16, scaler)")
    worst: dict = {}
    tally: dict = {}
    T = min(64, cfg.max_seq_len)

    def on_step(t, _cmodel):
        print(f"step {t} done", file=sys.stderr, flush=True)
    report = run_parity(cfg, synth.init_params(cfg, seed=seed, style="gpt2"),
                        synth.batches(cfg, 4, T, seed=seed + 1000), lib=load_library(None), impls=impls,
                        models=models, steps=steps, replay=True, on_step=on_step)
    for s in report.steps:
        fold(s.checks, worst, tally)
        for impl, text in s.errors.items():
            raise RuntimeError(f"step {s.step} [{impl}]: {text}")
    return {"worst": worst, "tally": tally, "passed": report.passed}


def _scale(args) -> int:
    from .arbiter.tolerances import P_FALSE_ALARM

    results = {}
    for i, name in enumerate(args.builds):
        out = _variant(name)
        refs = args.refs if i == 0 else []
        model = args.model if i == 0 else None
        label = f"C {name}" + "".join(f" + {r}" for r in refs) + (" + model" if model else "")
        print(f"{label}: {args.steps} steps of {args.config}, every op replayed ...", file=sys.stderr, flush=True)
        res = _worker(["--scale-worker", "--config", args.config, "--steps", str(args.steps),
                       "--seed", str(args.seed), "--refs", ",".join(refs), "--model", model or "",
                       "--precision", args.precision if model else ""],
                      label, env={"LLMC_LIB": str(out)})
        if res is None:
            return 1
        results[label] = res
    print(scale_table(results, P_FALSE_ALARM))
    worst = max(w[k] for r in results.values() for w in r["worst"].values() for k in ("rel", "norm"))
    ok = worst <= 1 / MARGIN and all(r["passed"] for r in results.values())
    print(f"\nsmallest margin {1 / worst:.2f}x (policy: {MARGIN}x): {'met' if ok else 'NOT MET'}")
    return 0 if ok else 1


def scale_table(results: dict, p: float) -> str:
    """The worst fraction of each bound used, per (kind, kernel.output), over every run."""
    from .arbiter.tolerances import false_alarm_bound
    from .report.table import text_table
    keys = sorted({k for r in results.values() for k in r["worst"]})
    header = ["check", "elem used", "norm used", "margin", "bias used", "bias u", "|z|",
              "worst element-wise in / worst bias in"]
    rows = []
    for key in keys:
        seen = [(r["worst"][key], label) for label, r in results.items() if key in r["worst"]]
        w_rel, at = max(((w["rel"], f"{label}: {w['rel_at']}") for w, label in seen), key=lambda x: x[0])
        w_norm = max(w["norm"] for w, _ in seen)
        margin = f"{1 / max(w_rel, w_norm):.1f}x" if max(w_rel, w_norm) > 0 else "exact"
        wb, bl = max(((w, label) for w, label in seen), key=lambda x: x[0].get("bias", 0.0))
        rows.append([key, f"{w_rel:.3f}", f"{w_norm:.3f}", margin, f"{wb.get('bias', 0.0):.3f}",
                     f"{wb.get('bias_u', 0.0):.2f}", f"{wb.get('bias_z', 0.0):.1f}",
                     at + (f" / {bl}: {wb['bias_at']}" if wb.get("bias_at") else "")])
    lines = [*text_table(header, rows, right=range(1, 7)), ""]
    for label, r in results.items():
        t = r["tally"]
        n = t.get("per_op", 0)
        tails = ", ".join(f"{t.get(str(q), 0)} over the bound for p={q:g} (the model allows {n * q:.0f})"
                          for q in LENIENT)
        lines.append(f"{label}: {t.get('checks', 0)} checks, {n} per-op bounds (replay, update): {tails}; "
                     f"built for p={p:g}: at most {false_alarm_bound(t.get('checks', 0), p):.1e} false alarms per run")
    return "\n".join(lines)


# ----------------------------------------------------------------------------

def _worker(argv: list[str], label: str, env: dict | None = None) -> dict | None:
    proc = subprocess.run([sys.executable, "-m", "harness.calibrate", *argv], stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), cwd=ROOT)
    if proc.returncode != 0:
        print(f"{label}: failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="per op: seeds per case")
    ap.add_argument("--threads", default=",".join(map(str, THREADS)), type=lambda s: [int(n) for n in s.split(",") if n],
                    help="per op: OpenMP thread counts each C build runs with (default 1,2,4)")
    ap.add_argument("--scale", action="store_true", help="training steps at GPT-2 124M's shape instead")
    ap.add_argument("--config", default="d12", help="--scale: the config (default d12)")
    ap.add_argument("--steps", type=int, default=10, help="--scale: training steps (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="--scale: the initialisation's and batches' seed")
    ap.add_argument("--builds", default=",".join(SCALE_BUILDS), type=lambda s: [b for b in s.split(",") if b],
                    help=f"--scale: C builds, the first with the references ({', '.join(BUILDS)})")
    ap.add_argument("--refs", default="numpy,torch", type=lambda s: [r for r in s.split(",") if r],
                    help="--scale: references beside the first build")
    ap.add_argument("--model", default=None, help="--scale: a PyTorch model (file.py:name) beside the first build")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "LIB"), help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="", help="--scale with --model: the model's mixed precision, "
                    "e.g. autocast=bf16 or params=bf16 or autocast=fp16,scaler (judged at the precision each op ran in)")
    ap.add_argument("--scale-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, lib = args.worker
        print(json.dumps(measure(impl, None if lib == "-" else lib, args.seeds)))
        return 0
    if args.scale_worker:
        print(json.dumps(measure_scale(args.config, args.steps, args.refs, args.model or None, args.seed,
                                       args.precision)))
        return 0
    unknown = [b for b in args.builds if b not in BUILDS]
    if unknown:
        ap.error(f"unknown build {unknown[0]!r}; known: {', '.join(BUILDS)}")
    return _scale(args) if args.scale else _per_op(args)


if __name__ == "__main__":
    sys.exit(main())
