"""Time training steps of the pyref GPT-2 (forward + zero_grad + backward + update).

    .venv/bin/python benchmarks/bench_pyref.py                  # d12 (124M), B=4, T=64
    .venv/bin/python benchmarks/bench_pyref.py --json out.json --steps 2 --impl numpy torch

On a shared machine, torch's OpenMP thread pool degrades badly when other processes hold
the cores (its parallel regions wait for descheduled threads); ``--torch-threads 1`` is
then the fairer measurement. The JSON records the load average.

Implementations: ``numpy`` (NumPy float32), ``torch`` (pyref.torch_kernels through the
adapter, float32), ``oracle`` (NumPy float64). Step 1 includes the lazy allocations the C
also makes on first use (activations, grads, m, v); later steps are warm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyref.config import preset                      # noqa: E402
from pyref.model import GPT2                         # noqa: E402
from pyref.synth import init_params, make_batch      # noqa: E402

IMPLS = {"numpy": (None, np.float32), "oracle": (None, np.float64), "torch": ("torch", np.float32)}


def bench(impl, config, params, x, y, steps):
    kernels, dtype = IMPLS[impl]
    if kernels == "torch":
        from pyref import torch_kernels as kernels
    model = GPT2(config, params, kernels=kernels, dtype=dtype)
    rows = []
    for t in range(1, steps + 1):
        t0 = time.perf_counter()
        loss = model.forward(x, y)
        t1 = time.perf_counter()
        model.zero_grad()
        model.backward()
        t2 = time.perf_counter()
        model.update(1e-4, 0.9, 0.999, 1e-8, 0.0, t)
        t3 = time.perf_counter()
        rows.append(dict(impl=impl, dtype=np.dtype(dtype).name, step=t, loss=float(loss),
                         forward_s=t1 - t0, backward_s=t2 - t1, update_s=t3 - t2,
                         total_s=t3 - t0))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="d12")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="steps per implementation")
    ap.add_argument("--impl", nargs="+", default=["numpy", "torch"], choices=list(IMPLS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads(N) for the torch run (0: torch's default)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    args = ap.parse_args(argv)
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)

    config = preset(args.config)
    t0 = time.perf_counter()
    params = init_params(config, seed=args.seed)
    init_s = time.perf_counter() - t0
    x, y = make_batch(config, args.B, args.T, seed=args.seed)
    print(f"config {args.config}: {config.num_parameters():,} parameters, B={args.B}, "
          f"T={args.T}, {os.cpu_count()} cpus; init_params {init_s:.2f}s")
    rows = []
    for impl in args.impl:
        rows += bench(impl, config, params, x, y, args.steps)

    head = f"{'impl':8s} {'dtype':8s} {'step':>4s} {'forward':>8s} {'backward':>9s} " \
           f"{'update':>7s} {'total':>7s}  loss"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['impl']:8s} {r['dtype']:8s} {r['step']:4d} {r['forward_s']:7.2f}s "
              f"{r['backward_s']:8.2f}s {r['update_s']:6.2f}s {r['total_s']:6.2f}s  {r['loss']:.6f}")

    if args.json:
        import torch
        out = dict(config=args.config, config_fields=config.__dict__, B=args.B, T=args.T,
                   num_parameters=config.num_parameters(), init_params_s=init_s,
                   machine=dict(platform=platform.platform(), python=platform.python_version(),
                                cpus=os.cpu_count(), numpy=np.__version__,
                                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                                loadavg=os.getloadavg()),
                   results=rows)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
