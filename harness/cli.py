"""``llmc-parity``: the command line.

  llmc-parity run      N training steps of the C and the references, checked per step
  llmc-parity ops      every kernel of the op table, per shape, against the oracle
  llmc-parity gate     the drift gate against baselines/gate.json (--update to accept)
  llmc-parity info     build/load the library and report its symbols and layout

Exit status: 0 pass, 1 parity failure, 2 bad usage or input (with a one-line reason),
3 an internal error of the harness itself.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError
from .report.progress import Progress, duration as _duration

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
RESERVED = ("C", "oracle", "witness")


class UsageError(InputError):
    """Bad usage or input: reported in one line, exit status 2."""


# ----------------------------------------------------------------------------

def _library(args):
    """Build (--src) or load (--lib, $LLMC_LIB, our own) the library."""
    from .clib.library import load_library
    from .clib.build import build_library, ensure_library

    if getattr(args, "build_dir", None):
        os.environ["LLMC_BUILD_DIR"] = str(Path(args.build_dir).resolve())
    if getattr(args, "src", None):
        # built into the cache, keyed by source contents, compiler and flags (rebuilt only
        # when one of them changes), or where --lib says
        info = (build_library(args.src, args.lib, cflags=args.cflags, quiet=True) if args.lib
                else ensure_library(args.src, cflags=args.cflags))
        lib = load_library(info.library)
    else:
        lib = load_library(args.lib)   # None: $LLMC_LIB, or our own, built on first use
    if args.threads:
        lib.set_num_threads(args.threads)
    return lib


def _config(args):
    from pyref.config import preset
    from pyref.formats import read_checkpoint, read_checkpoint_header
    if args.checkpoint:
        if args.debug_state:   # the C reads the checkpoint itself for it: float32 (version 3) only
            read_checkpoint_header(args.checkpoint)
        cfg, params = read_checkpoint(args.checkpoint)   # bf16 (version 5) widened exactly
        _refuse_nonfinite(args.checkpoint, cfg, params)
        return cfg, params
    from pyref import synth
    cfg = preset(args.config)
    return cfg, synth.init_params(cfg, seed=args.seed)


def _refuse_nonfinite(path, cfg, params) -> None:
    """A checkpoint with NaN or Inf parameters: every implementation, the oracle too,
    computes NaN from it, so no parity can be judged. Say where, before any C runs."""
    from math import prod

    import numpy as np

    from pyref.config import layout, param_shapes
    bad = ~np.isfinite(params)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    name, (off, shape) = next((n, t) for n, t in layout(param_shapes(cfg)).items() if i < t[0] + prod(t[1]))
    where = f"{name}{[int(k) for k in np.unravel_index(i - off, shape)]}"
    raise UsageError(f"{path}: {int(bad.sum())} non-finite parameter value(s), the first "
                     f"{where} = {params[i]}; parity cannot be judged on NaN/Inf "
                     "(every implementation and the oracle compute NaN from it)")


def _impls(names: list[str]):
    from .ports.loader import load_kernels
    impls = {}
    for target in names:
        if target == "oracle":
            continue  # always there: it is the arbiter
        ks = load_kernels(target, fallback=True)
        name = target if target in ("numpy", "torch") else ks.name
        if name in RESERVED:   # "C" and "oracle" name the library and the arbiter in reports
            name = f"{name} (port)"
        impls[name] = ks
    return impls


def _models(args) -> dict:
    """``--model TARGET`` (and its ``--optimizer``, ``--model-map``) as a TorchModel."""
    if not args.model:
        if args.optimizer or args.model_map or getattr(args, "autocast", None) or getattr(args, "param_dtype", None):
            raise UsageError("--optimizer, --model-map, --autocast and --param-dtype go with --model")
        return {}
    from .ports.loader import load_model
    model = load_model(args.model, optimizer=args.optimizer, mapping=args.model_map)
    model.autocast, model.param_dtype = getattr(args, "autocast", None), getattr(args, "param_dtype", None)
    model.grad_scaler = bool(getattr(args, "grad_scaler", False))
    if model.name in RESERVED:   # "C" and "oracle" name the library and the arbiter in reports
        model.name = f"{model.name} (model)"
    return {model.name: model}


def _batches(args, cfg, B, T):
    from pyref import synth
    from pyref.config import check_tokens
    from pyref.formats import read_tokens
    if args.tokens:
        tokens = read_tokens(args.tokens)
        if tokens.size < B * T + 1:
            raise UsageError(f"{args.tokens}: {tokens.size} tokens, a batch needs {B * T + 1}")
        check_tokens(args.tokens, tokens.reshape(1, -1), cfg.vocab_size, UsageError)
        return synth.batches_from_tokens(tokens, B, T)

    return synth.batches(cfg, B, T, seed=args.seed + 1000)


def cmd_run(args) -> int:
    """One run (:func:`harness.checks.run.run_parity`): its steps, free run and debug state
    in one report, whose verdict the text's last line, the JSON and the exit status read."""
    from pyref.config import AdamW
    from pyref.formats import checkpoint_note

    from .arbiter.oracle import one_arena, plan_witness
    from .checks.policy import plan
    from .checks.run import run_parity

    # freed memory held from step 2 on (harness.arbiter.oracle.hold_freed_memory), every thread
    # in one arena from the start: only in a process of its own (the command line's, main()
    # without argv), never in a caller's (a test's), and where the memory keeps the witness
    own = getattr(args, "own_process", False) and one_arena()
    if args.json == "-":
        args.json_only = True   # stdout is the JSON: text beside it would break the reader's parse
    cfg, params, B, T = _run_inputs(args)
    lib = _library(args)
    what = plan(cfg, refs=args.ref, replay=args.replay, debug_state=bool(args.debug_state))
    impls = _impls(what.refs)
    if args.impl:
        impls.update(_impls([args.impl]))
    models = _models(args)
    witness = plan_witness(cfg, B, T)   # decided here, so that the header says what the run does
    hold = own and witness.keep
    if not args.json_only:
        print(f"llmc-parity run: {args.checkpoint or args.config} {cfg}, B={B} T={T}, {args.steps} steps; "
              f"C={lib.path}; references: {', '.join(['oracle (float64)', *impls])}"
              + "".join(f"; model: {n} ({args.model})" for n in models) + f"; replay: {what.replay}")
        if what.why:
            print(what.why)
        print(witness.line() + (f"; measured every {args.witness_every} steps" if args.witness_every > 1 else "")
              + ("; freed memory kept for reuse from step 2 on" if hold else ""))
        if args.checkpoint and (note := checkpoint_note(args.checkpoint)):
            print(note)
    progress = Progress(enabled=not args.quiet)
    hyper = AdamW(learning_rate=args.lr, weight_decay=args.weight_decay)
    free = _batches(args, cfg, B, T)
    report = run_parity(cfg, params, _batches(args, cfg, B, T), lib=lib, impls=impls, models=models,
                        steps=args.steps, hyper=hyper, threads=args.threads, replay=what.replay_arg,
                        progress=progress, on_step=_first_step_said(args, progress, large=what.large, hold=hold),
                        free_run_batches=[next(free) for _ in range(args.free_run)],
                        checkpoint=args.checkpoint, debug_state=args.debug_state, keep_witness=witness.keep,
                        witness_every=args.witness_every)
    progress.done()
    if not args.json_only:
        _print_run(report, verbose=args.verbose)
    _write_run(args, report)
    return EXIT_PASS if report.passed else EXIT_FAIL


def _first_step_said(args, progress: Progress, large: bool, hold: bool = False):
    """run_parity's on_step: after the first step of a large run, a line with its time and
    the run's (:func:`run_estimate`); after the second, where more is left, the run's again
    from the second's measured time (a held step, as every later one); and, with ``hold``,
    the freed memory held from step 2 on (:func:`harness.arbiter.oracle.hold_freed_memory`)."""
    def said(t: int, _cmodel) -> None:
        if t == 1 and hold:
            from .arbiter.oracle import hold_freed_memory
            hold_freed_memory()
        if t > 2 or not large or args.json_only:
            return
        now = time.perf_counter()
        took = now - progress.step_began.get(t, progress.start)
        elapsed = now - getattr(args, "started", progress.start)
        if t == 1:
            later = later_step(took, os.times().system - progress.system_began.get(1, os.times().system), hold)
            total = run_estimate(later, elapsed, args.steps, args.free_run, bool(args.debug_state))
            print(f"step 1 took {_duration(took)}; the {args.steps} steps take about "
                  f"{_duration(took + later * (args.steps - 1))}, the run about {_duration(total)} in all",
                  flush=True)
        elif args.steps > 2 or args.free_run or args.debug_state:
            total = run_estimate(took, elapsed, args.steps, args.free_run, bool(args.debug_state), done=2)
            print(f"step 2 took {_duration(took)}; the run about {_duration(total)} in all", flush=True)
    return said


def later_step(step1: float, system: float, hold: bool) -> float:
    """The seconds of a step after the first, told from the first (``step1`` seconds, of
    which ``system`` the kernel's: giving the process fresh pages, each first touch of a
    page paid there): where the run holds the memory it frees, later steps touch no fresh
    page, so they take the first's time less the kernel's; else as long as the first."""
    return max(step1 - system, 0.0) if hold else step1


def run_estimate(later: float, elapsed: float, steps: int, free_run: int, debug_state: bool,
                 done: int = 1) -> float:
    """The seconds a run takes from its start, told after its step ``done`` (``elapsed``
    since the process started): each later step ``later`` seconds (after step 1:
    :func:`later_step`; after step 2: its measured time), a free-run step a third of one
    (no float64 model, no checks), the debug state's check one (the C, the oracle and the
    witness on one batch)."""
    return elapsed + later * (steps - done + free_run / 3 + (1 if debug_state else 0))


def _run_inputs(args):
    """(config, params, B, T) of a run, after every check that can refuse it: refused
    before the (maybe long) run, so a parity failure is never reported as a usage error."""
    if args.debug_state and not args.checkpoint:
        raise UsageError("--debug-state needs the --checkpoint it was made from")
    _require_files(args, ("--checkpoint", "--tokens", "--debug-state", "--impl", "--model", "--optimizer",
                          "--model-map", "--src"))
    for what, path in (("--json", args.json), ("--plot", args.plot)):
        if path and path != "-" and os.path.exists(path) and not args.overwrite:
            raise UsageError(f"{what} {path} exists; pass --overwrite to replace it")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install llmc-parity[plot]")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"-T must be positive, got {args.seq_len}")
    cfg, params = _config(args)
    B = args.batch
    T = args.seq_len or min(cfg.max_seq_len, 64 if cfg.channels >= 512 else 16)
    if T > cfg.max_seq_len:
        raise UsageError(f"-T {T} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if args.free_run < 0:
        raise UsageError(f"--free-run must be >= 0, got {args.free_run}")
    if args.witness_every < 1:
        raise UsageError(f"--witness-every must be >= 1, got {args.witness_every}")
    if B < 1 or T < 1 or args.steps < 1:
        raise UsageError("batch size, sequence length and steps must be positive")
    return cfg, params, B, T


def _require_files(args, flags: tuple[str, ...]) -> None:
    """Refuse, in one line naming the option and the file, an input file that is not there
    (``--checkpoint model.bin: no such file``), before anything is built or run. Options
    that name a module (``--impl numpy``, ``--model pkg.mod:GPT``) are left to the loader."""
    from .ports.loader import target_file

    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if not value:
            continue
        path = value if flag in ("--checkpoint", "--tokens", "--debug-state", "--src") else target_file(value)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file")


def _print_run(report, verbose: bool) -> None:
    """The run's text: notes on torch models, the tables of failed steps (every step's,
    every layer's row, when ``verbose``), the free run's and the debug state's, then the
    summary, whose last line is the verdict."""
    from .report import debug_state_table, free_run_table, model_notes, run_summary, step_table

    for line in model_notes(report):
        print(line)
    shown = [s for s in report.steps if verbose or not s.passed]
    for step in shown:
        print(step_table(step, verbose=verbose))
    hidden = len(report.steps) - len(shown)
    if hidden:
        print(f"step tables: the {hidden} passed step(s) not shown" + (f", the {len(shown)} failed shown" if shown
                                                                      else "") + " (-v: every step, every layer)")
    if report.free_run:
        print(free_run_table(report.free_run, verbose=verbose))
    if report.debug_state is not None:
        print(debug_state_table(report.debug_state, verbose=verbose))
    print(run_summary(report, verbose=verbose))


def _write_run(args, report) -> None:
    from .report import to_json, write_json

    if args.json == "-":
        json.dump(to_json(report), sys.stdout, indent=1, allow_nan=False)
        print()
    elif args.json:
        write_json(report, args.json, overwrite=args.overwrite)
    if args.plot:
        from .report import plot
        plot(report, args.plot, overwrite=args.overwrite)


def cmd_ops(args) -> int:
    from .clib.kernels import CKernels
    from .report import format_table
    from .checks.perop import sweep

    _require_files(args, ("--impl", "--src"))
    lib = _library(args)
    impls = {"C": CKernels(lib), **_impls(args.ref)}
    if args.impl:
        impls.update(_impls([args.impl]))
    rows, failed, not_checked = [], 0, {}
    for case in sweep(impls, seeds=range(args.seeds), kernels=args.kernel):
        for name, res in case.results.items():
            if res is None:
                not_checked.setdefault(name, set()).add(case.spec.name)
            elif isinstance(res, Exception):
                print(f"FAIL {name} {case.spec.name} {case.shape.name}: {type(res).__name__}: {res}")
                failed += 1
            else:
                rows += res.values()
                failed += sum(not c.passed for c in res.values())
    shown = rows if args.verbose else [c for c in rows if not c.passed]
    if shown:
        print(format_table(shown, title="per-op checks" + ("" if args.verbose else ": failures")))
        for c in shown:
            if not c.passed:
                print(c.message())
    for name, kernels in not_checked.items():
        print(f"not checked for {name}: {', '.join(sorted(kernels))}")
    print(f"{len(rows) - failed} passed, {failed} failed")
    if not rows and not failed:
        raise UsageError("no check ran: no kernel matched -k, or --seeds is 0")
    return EXIT_PASS if failed == 0 else EXIT_FAIL


def cmd_gate(args) -> int:
    from .gate import default_baseline, evaluate, key_text, load_baseline, run_suite, write_baseline

    lib = _library(args)
    path = Path(args.baseline) if args.baseline else default_baseline()
    t0 = time.perf_counter()
    progress = Progress(enabled=not args.quiet)
    run = run_suite(lib, progress=progress)
    progress.done()
    if args.update:
        old = load_baseline(path) if path.exists() else None
        diff = write_baseline(run, path, old)
        print(f"gate baseline written to {path} ({len(run.metrics)} checks, {len(run.fingerprints)} "
              f"fingerprints for {key_text(run.build_key) if run.build_key else 'no build record'})")
        print("\n".join(diff) if diff else "no change")
        if run.failures:
            print(f"warning: {len(run.failures)} tolerance violation(s) recorded; the gate will still fail on them")
        return EXIT_PASS
    require = args.require_bits or os.environ.get("LLMC_GATE_REQUIRE_BITS", "") not in ("", "0")
    result = evaluate(run, load_baseline(path), require_bits=require)
    print(result.text())
    print(f"({time.perf_counter() - t0:.1f}s, library {lib.path})")
    if args.json:
        from pyref.formats import write_atomic
        data = {"schema": "llmc-parity/gate-verdict/1", "passed": result.passed,
                "bits": {k: v for k, v in result.bits.items() if k != "lines"},
                "verdict": result.lines, "library": lib.path, "baseline": str(path)}
        write_atomic(args.json, [json.dumps(data, indent=1).encode()], overwrite=args.overwrite)
    return EXIT_PASS if result.passed else EXIT_FAIL


def cmd_info(args) -> int:
    from .clib.cdefs import REQUIRED_SYMBOLS
    lib = _library(args)
    print(f"library: {lib.path}")
    print(f"symbols: all {len(REQUIRED_SYMBOLS)} of the spec present")
    print(f"struct layout: {'checked against the compiler (llmc_abi_layout)' if lib.abi_checked else 'not checkable (no llmc_abi_layout); pointer order is checked per model'}")
    print(f"OpenMP: {'yes, ' + str(lib.get_num_threads()) + ' threads' if lib.has_openmp else 'no'}")
    print(f"floating point: {lib.fp_description}")
    if lib.build_info:
        b = lib.build_info
        print(f"built from {b.source} with {b.cc_version} [{b.cflags}{' -fopenmp' if b.openmp else ''}]")
    return EXIT_PASS


def _common(p):
    p.add_argument("--lib", help="a built train_gpt2 library (default: $LLMC_LIB, or our own "
                                 "train_gpt2.c built into the build cache on first use)")
    p.add_argument("--build-dir", help="where libraries are built (default: $LLMC_BUILD_DIR or "
                                       "~/.cache/llmc-parity)")
    p.add_argument("--src", help="a train_gpt2.c to build and check instead (e.g. from your llm.c checkout)")
    p.add_argument("--cflags", default="-O3", help="flags for --src (default -O3)")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads for the C")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmc-parity", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, help="what to do (each takes -h)")
    _run_parser(sub)
    _ops_parser(sub)
    _gate_parser(sub)
    info = sub.add_parser("info", help="build/load the library and report on it")
    _common(info)
    info.set_defaults(func=cmd_info)
    return ap


def _run_parser(sub) -> None:
    from pyref.config import AdamW
    run = sub.add_parser("run", help="train N steps in C and the references, check every step")
    _common(run)
    run.add_argument("--config", default="tiny", help="built-in config: tiny (default), small, d12 / 124M")
    run.add_argument("--checkpoint", help="an llm.c model checkpoint (version 3, or 5: bf16) instead of --config")
    run.add_argument("--tokens", help="an llm.c token shard to draw batches from (default: generated)")
    run.add_argument("--debug-state", help="an llm.c debug state (version 2) to check the C against")
    run.add_argument("--steps", type=int, default=10, help="training steps, each checked (default 10)")
    run.add_argument("-B", "--batch", type=int, default=4, help="batch size B (default 4)")
    run.add_argument("-T", "--seq-len", type=int, default=None,
                     help="sequence length T (default 16; 64 from C = 512 channels)")
    run.add_argument("--ref", default=None, type=lambda s: [x for x in s.split(",") if x],
                     help="references beside the oracle: numpy, torch, oracle (only), or a module "
                          "(default: numpy, and torch where it is installed; none from 50M parameters "
                          "and with --debug-state)")
    run.add_argument("--impl", help="your port: a .py file or module[:attr] implementing docs/kernels.md")
    run.add_argument("--model", help="your PyTorch model: file.py:name or module:name, an nn.Module class or "
                                     "a factory taking the config (checked with autograd and its optimizer)")
    run.add_argument("--optimizer", help="with --model: the port's optimizer, file.py:name of a factory "
                                         "(model, hyper) -> torch.optim.Optimizer, or 'configure_optimizers' "
                                         "(the model's own method); default torch.optim.AdamW with the run's settings")
    run.add_argument("--model-map", help="with --model: file.py:name of a dict or callable (param name, shape) -> "
                                         "C tensor like 'qkvw[3]', 'fcw[0].T' or rows of one, 'qkvw[0][C:2C]' "
                                         "(a separate k projection); it adds to the recognition by name and "
                                         "shape: the names it maps override, the rest are still recognised")
    run.add_argument("--autocast", choices=("bf16", "fp16"), help="with --model: its forward under "
                     "torch.autocast('cpu', dtype); each op is judged at the precision it is seen to run in")
    run.add_argument("--param-dtype", choices=("bf16", "fp16"), help="with --model: its parameters held in "
                     "this dtype (the C's rounded into it); judged at that precision")
    run.add_argument("--grad-scaler", action="store_true", help="with --model: its loss scaled by "
                     "torch.amp.GradScaler (fp16 training); gradients compared unscaled")
    run.add_argument("--free-run", type=int, default=0, metavar="N",
                     help="also train every implementation N steps on its own state from the common start, "
                          "checking its loss and parameters against the float64 oracle's own run per step")
    run.add_argument("--seed", type=int, default=0,
                     help="seed of the generated parameters (without --checkpoint) and batches (without "
                          "--tokens) (default 0)")
    run.add_argument("--lr", type=float, default=AdamW.learning_rate,
                     help=f"AdamW learning rate (default {AdamW.learning_rate:g}, llm.c's)")
    run.add_argument("--weight-decay", type=float, default=AdamW.weight_decay,
                     help=f"AdamW weight decay (default {AdamW.weight_decay:g}, llm.c's)")
    run.add_argument("--replay", choices=["always", "on-failure", "never"], default=None,
                     help="re-run every op in float64 on each implementation's own inputs: every step "
                          "(the default below 50M parameters), only where an end-to-end check failed (the "
                          "default from 50M parameters and with --debug-state), or never")
    run.add_argument("--witness-every", type=int, default=1, metavar="K",
                     help="measure the float32-noise witness's spread (what the end-to-end bounds are made "
                          "from) at steps 1, 1+K, 1+2K, ... and use the last one between (default 1: every "
                          "step; see docs/performance.md for what a larger K keeps of the bounds' margin)")
    run.add_argument("--json", help="write the JSON report here ('-' for stdout, which then holds "
                                    "the JSON alone, as with --json-only)")
    run.add_argument("--json-only", action="store_true", help="print nothing but the JSON")
    run.add_argument("--plot", help="write a PNG of error per tensor across steps and layers")
    run.add_argument("--overwrite", action="store_true", help="let --json/--plot replace existing files")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="every step's table with every layer's row, every free-run step and debug-state "
                          "tensor (default: only what failed, then the summary), and the trace of an input error")
    run.add_argument("-s", "--summary-only", action="store_true",
                     help="the per-step tables only of steps that failed, then the summary: the default "
                          "now, kept for the scripts that pass it")
    run.set_defaults(func=cmd_run)


def _ops_parser(sub) -> None:
    ops = sub.add_parser("ops", help="per-op checks of every kernel against the oracle")
    _common(ops)
    ops.add_argument("--ref", default="", type=lambda s: [x for x in s.split(",") if x],
                     help="Python references to check too: numpy, torch")
    ops.add_argument("--impl", help="your port (a .py file or module[:attr])")
    ops.add_argument("-k", "--kernel", action="append", help="only kernels whose name contains this")
    ops.add_argument("--seeds", type=int, default=1, help="random inputs per kernel and shape (default 1)")
    ops.add_argument("-v", "--verbose", action="store_true", help="every row, not just failures")
    ops.set_defaults(func=cmd_ops)


def _gate_parser(sub) -> None:
    gate = sub.add_parser("gate", help="the numerical drift gate")
    _common(gate)
    gate.add_argument("--baseline", help="baseline file (default: $LLMC_GATE_BASELINE, else "
                                         "llmc-parity-gate.json at the root of the current project)")
    gate.add_argument("--update", action="store_true", help="accept the current numbers as the baseline")
    gate.add_argument("--require-bits", action="store_true",
                      help="fail when no fingerprint of the baseline matches this build "
                           "(also LLMC_GATE_REQUIRE_BITS=1)")
    gate.add_argument("--json", help="write the verdict as JSON (the bit check's status, key, "
                                     "nearest fingerprint and differing components)")
    gate.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    gate.set_defaults(func=cmd_gate)


def main(argv: list[str] | None = None) -> int:
    from pyref.config import ConfigError
    from pyref.formats import FormatError

    args = parser().parse_args(argv)
    args.own_process = argv is None      # the process is this command's: it may set its malloc
    args.started = time.perf_counter()   # the run's estimate counts from here
    try:
        return args.func(args)
    # errors about the user's input, raised as such where it is validated (harness.errors);
    # a ValueError or RuntimeError from anywhere else is a bug of ours: exit 3 with the trace
    except (InputError, FormatError, ConfigError, FileNotFoundError, FileExistsError,
            IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if getattr(args, "verbose", False):   # -v: where it came from (a model's own trace)
            import traceback
            traceback.print_exc()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llmc-parity: error: {reason}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("llmc-parity: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmc-parity run | head`: the reader left, not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception:  # a bug of ours, not a verdict on the numbers: say so, with the trace
        import traceback
        traceback.print_exc()
        print("llmc-parity: internal error (exit 3): please report it with the trace above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
