"""Calibrate the tolerance policy: ``make calibrate`` (``python -m harness.calibrate``).

Runs every kernel of the op table over every shape and several seeds in the C built with
``-O2``, ``-O3``, ``-O3 -march=native`` (FMA contraction) and ``-Ofast -march=native``
(reordered sums, vector libm), and in the NumPy and torch float32 references, against the
float64 oracle, and prints for each (kernel, output) the worst observed constants

    k_rel  = max_rel  / (u sqrt(n) tail(size))
    k_norm = norm_rel / (u sqrt(n) small_sample(size))

next to the constants of :mod:`harness.tolerances`. A policy constant should sit a few
times above the worst observation: closer and a legitimate build will one day raise a
false alarm, much further and real bugs slip through. Each build is checked in its own
process (a library built with -Ofast sets flush-to-zero for the process that loads it).
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


def measure(impl: str, lib: str | None, seeds: int) -> dict:
    """Worst observed constants of one implementation: kernel -> output -> [k_rel, k_norm]."""
    import numpy as np

    from pyref import numpy_kernels, torch_kernels
    from pyref.protocol import KernelSet

    from .clib.library import load_library
    from .clib.kernels import CKernels
    from .checks.perop import sweep
    from .tolerances import U, small_sample, tail

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
            k_rel = c.max_rel / (U * sqrt(n) * tail(size))
            k_norm = c.norm_rel / (U * sqrt(n) * small_sample(size))
            w = worst.setdefault(case.spec.name, {}).setdefault(out, [0.0, 0.0])
            w[0], w[1] = max(w[0], k_rel), max(w[1], k_norm)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "LIB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, lib = args.worker
        print(json.dumps(measure(impl, None if lib == "-" else lib, args.seeds)))
        return 0

    from .clib.build import build_library
    from .tolerances import rule

    runs = {}
    for name, flags in BUILDS.items():
        out = ROOT / "build" / "variants" / f"lib_{name}.so"
        build_library(ROOT / "llmc" / "train_gpt2.c", out, cflags=flags, quiet=True)
        runs[f"C {name}"] = ("C", str(out))
    runs["numpy"], runs["torch"] = ("numpy", "-"), ("torch", "-")
    results = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for label, (impl, lib) in runs.items():
        proc = subprocess.run([sys.executable, "-m", "harness.calibrate", "--seeds", str(args.seeds),
                               "--worker", impl, lib], capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{label}: failed\n{proc.stderr}", file=sys.stderr)
            return 1
        results[label] = json.loads(proc.stdout.splitlines()[-1])
    keys = sorted({(k, o) for r in results.values() for k in r for o in r[k]})
    print(f"{'kernel.output':<40}{'worst k_rel':>12}{'policy':>8}{'worst k_norm':>14}{'policy':>8}  worst in")
    for kernel, out in keys:
        r = rule(kernel, out)
        seen = [(res[kernel][out], label) for label, res in results.items() if out in res.get(kernel, {})]
        wr = max((k[0], label) for k, label in seen)
        wn = max((k[1], label) for k, label in seen)
        print(f"{kernel + '.' + out:<40}{wr[0]:>12.2f}{r.k_rel:>8g}{wn[0]:>14.2f}{r.k_norm:>8g}  {wr[1]} / {wn[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
