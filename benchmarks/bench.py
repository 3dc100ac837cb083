"""Speed and memory of a full parity check and of its parts alone (``make bench``).

    .venv/bin/python benchmarks/bench.py --json build/bench.json   # d12 (124M), B=4, T=64, and d24: ~13 min
    .venv/bin/python benchmarks/bench.py --quick                   # small config, ~15 s
    .venv/bin/python benchmarks/bench.py --parts full_check_replay --reuse build/bench.json
                                                                   # one part again, the rest reused
    .venv/bin/python benchmarks/bench.py --parts --reuse build/bench.json --markdown
                                                                   # print a saved result again

The targets (issue 13): *a one-step full check of GPT-2 124M's shape (replay on failure)
takes at most 1.3x the sum of its necessary parts (the C's step, the float64 oracle, each
implementation's own step); its peak memory is at most 3.5x the C model's own footprint; a
one-step full check of GPT-2 medium's shape (d24, B=4, T=64) completes on a 24 GB machine.*
Also kept: per-op checks >= 300/s. (That no C buffer is copied to be compared, views
only, is asserted by tests/binding/test_views.py.)

Parts, each alone in its own child process (so that each one's time and peak RSS is its
own); each runs a first step (it pays the lazy allocations, and torch its start-up) and
then ``--steps`` warm ones (1 at d12), timed per phase:

  c_step        the C library's step on a CModel: forward, zero_grad, backward, update
  numpy_step    pyref.model.GPT2, float32, NumPy kernels: the same four phases
  torch_step    pyref.model.GPT2, float32, pyref.torch_kernels: the same four phases
  oracle_step   pyref.model.GPT2, float64, NumPy kernels: forward, zero_grad, backward
                (run_parity's oracle never updates)
  witness_step  the same with harness.arbiter.oracle.Witness kernels (float32-sized noise on
                every result); its construction is timed apart (run_parity builds one
                per step)
  op_checks     per-op check throughput: harness.check_kernel calls per second
                (the C against the float64 oracle, oracle included) for the cheap ops at
                the op table's "base" shape; target >= 300 calls/s

Full checks, in child processes: harness.run_parity with references numpy and torch
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
check also reports where its steps go (``Breakdown``, a listener of the probes run_parity
marks: the five models' own phases, and the harness's comparisons, term magnitudes, AdamW
checks, load_state, witness noise, ...), and in which of those its memory peak was
reached.

Memory: the full check's peak RSS above its baseline against the C model's own footprint
(params, grads, m, v, acts, grads_acts by config; c_step's measured held alongside); and
each part's peak RSS above its own baseline (the interpreter, imports, the
generated parameters and batch; the high-water mark is reset there through
/proc/self/clear_refs) against the full check's, and both against what the models hold by
construction (from the config: params, grads, m, v, acts, grads_acts).

The machine (CPU, cores, load average before and after, NumPy / torch versions, the
library's build) is recorded with the numbers; on a shared 2-core machine the load of
other processes changes the timings by up to 2x, so compare runs at a similar load.

The parts are benchmarks/bench_parts.py, what they add up to bench_results.py, the tables
(one set of rows, as text and as markdown) bench_tables.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_parts import (ALL_PARTS, D24, FULL_PARTS, LLMC_PARTS, MODEL_PARTS, d24_config, machine_info,  # noqa: E402
                         part_c_step, part_full_check, part_llmc_command, part_op_checks, part_py_step,
                         warm_memory)
from bench_results import d24_room, mem_available_bytes, memory, overhead  # noqa: E402
from bench_tables import markdown, text  # noqa: E402

RESULT_TAG = "BENCH_RESULT "


def run_part(name: str, args) -> dict:
    """Run one part in this process (the child)."""
    from pyref.config import preset
    from pyref.synth import init_params, make_batch

    from harness.arbiter.oracle import one_arena

    # as `llmc-parity run` does (the command: its own): one arena from the start, freed memory
    # held after the first step (bench_parts.timed_steps, part_full_check)
    held = name in LLMC_PARTS or one_arena()
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
        elif name in LLMC_PARTS:
            out = part_llmc_command(cfg, params, args.B, args.T, hold=LLMC_PARTS[name])
        elif name in FULL_PARTS:
            steps = {"full_check": args.full_steps, "full_check_d24": 1}.get(name, args.replay_steps)
            profile = None
            if args.profile:
                profile = str(Path(args.profile).with_suffix(f".{name}.prof"))
            out = part_full_check(cfg, params, batch, steps, FULL_PARTS[name], profile)
        else:
            raise SystemExit(f"unknown part {name!r}")
    out["part_wall_s"] = time.perf_counter() - t0
    out.setdefault("hold_freed_memory", held)
    return out


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


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--profile", default=None,
                    help="cProfile the full checks: writes PATH.<part>.prof (pstats)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads(N) in torch_step and the full checks (on a busy "
                         "machine torch's thread pool degrades; 1 is then the fairer measurement)")
    ap.add_argument("--no-warm", action="store_true",
                    help="do not warm the machine's memory before the parts run (by default as much fresh "
                         "memory as the largest part needs is touched once first: on a VM a page's first touch "
                         "costs ~10x a later one's, and would be charged to whichever part reaches it first)")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the results as markdown tables (for the README)")
    ap.add_argument("--timeout", type=float, default=None, help="per child process, seconds")
    ap.add_argument("--part", help=argparse.SUPPRESS)          # internal: run one part here
    return ap


def _defaults(args) -> argparse.Namespace:
    """The defaults that depend on the config: d12's one-step parts, or --quick's small ones."""
    args.config = args.config or ("small" if args.quick else "d12")
    big = args.config in ("d12", "124M")
    args.B = args.B or (2 if args.quick else 4)
    args.T = args.T or (16 if args.quick else 64)
    args.steps = args.steps or (1 if big else 3)
    args.full_steps = args.full_steps or (1 if big else 2)
    args.replay_steps = args.replay_steps or (1 if big else 2)
    args.op_seconds = args.op_seconds or (0.2 if args.quick else 0.3)
    return args


def _parts(args, ap) -> list[str]:
    parts = args.parts
    if parts is None:
        parts = [*MODEL_PARTS, "op_checks", "full_check", "llmc_command"]
        if not args.no_replay:
            parts.append("full_check_replay")
        if args.config in ("d12", "124M") and not args.no_d24:
            parts.append("full_check_d24")
    unknown = [p for p in parts if p not in ALL_PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {' '.join(ALL_PARTS)}")
    return parts


def _reused(args, ap, parts: list[str]) -> dict:
    """The parts not run now, from ``--reuse``'s earlier result (same config, B, T)."""
    if not args.reuse:
        return {}
    old = json.loads(Path(args.reuse).read_text())
    if (old.get("config"), old.get("B"), old.get("T")) != (args.config, args.B, args.T):
        ap.error(f"{args.reuse} is {old.get('config')} B={old.get('B')} T={old.get('T')}, "
                 f"not {args.config} B={args.B} T={args.T}")
    return {name: dict(r, reused_from=r.get("reused_from") or args.reuse)
            for name, r in old.get("parts", {}).items() if name not in parts}


def _warm(cfg, args, parts: list[str]) -> dict:
    """Touch, once, as much fresh memory as a full check of ``cfg`` needs (by config: the
    run's buffers with the witness kept, :func:`harness.arbiter.oracle.plan_witness`),
    leaving 4 GiB of what is available to the machine's other users; said on stderr.
    (On the project's VM the host takes freed memory back within minutes -- virtio
    balloon's free page reporting -- so the warmth does not last the whole bench: the
    cold and warm figures say what a page costs either way.)"""
    from harness.arbiter.oracle import plan_witness
    need = plan_witness(cfg, args.B, args.T, available=0).need
    have = mem_available_bytes()
    nbytes = need if have is None else max(0, min(need, have - 4 * 2**30))
    print(f"[bench] warming {nbytes / 2**30:.1f} GiB of memory before timing (a fresh page's first touch is "
          "slow on a VM) ...", file=sys.stderr, flush=True)
    w = warm_memory(nbytes)
    print(f"[bench] warmed in {w['seconds']:.0f} s: first touch {w['cold']['first_touch_ns_per_page'] / 1e3:.2g} "
          f"us/page cold, {w['warm']['first_touch_ns_per_page'] / 1e3:.2g} warm", file=sys.stderr, flush=True)
    return w


def main(argv=None) -> int:
    ap = parser()
    args = _defaults(ap.parse_args(argv))
    if args.part:
        print(RESULT_TAG + json.dumps(run_part(args.part, args)), flush=True)
        return 0

    from pyref.config import preset
    cfg = preset(args.config)
    parts = _parts(args, ap)
    results = {"config": args.config, "config_fields": vars(cfg), "B": args.B, "T": args.T,
               "timed_steps": args.steps, "full_check_steps": args.full_steps,
               "full_check_replay_steps": args.replay_steps, "machine": machine_info(),
               "parts": _reused(args, ap, parts)}
    t0 = time.perf_counter()
    if not args.no_warm and parts:
        results["memory_warming"] = _warm(cfg, args, parts)
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
    print(text(results, f"{args.config} ({cfg.num_parameters() / 1e6:.1f}M parameters) B={args.B} T={args.T}"
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
