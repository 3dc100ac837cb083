"""The drift gate: a fixed suite, compared with a baseline committed in the repository.

``llmc-parity gate`` runs every per-op check of the op table on the C, and 3 training
steps of the tiny model (C, with the NumPy reference alongside), then fails on

1. any tolerance violation;
2. any error metric (max rel, norm rel) that grew beyond ``GROWTH_FACTOR`` x its baseline
   (a floor of ``GROWTH_FLOOR`` x the tolerance keeps noise near zero from counting as growth),
   and any mean signed error (the bias, :mod:`harness.arbiter.stats`) that grew beyond
   ``GROWTH_FACTOR`` x its baseline and uses more than ``GROWTH_FACTOR x BIAS_GROWTH_FLOOR``
   of its bound (``tol.bias + t SE``): a bias within a few standard errors is noise, which
   another build draws anew, so only one near its bound counts;
3. any change in the bits of the C's outputs, when the baseline holds a fingerprint for
   the same key: what decides the bits of a given source (compiler, flags, OpenMP, the
   instruction sets the flags target, libm and the CPU features it dispatches on, the
   digest of the suite's inputs; see ``build_key``). Our default build is deterministic,
   so any change of arithmetic shows here, including one too small for any tolerance.
   Without a matching fingerprint the verdict's first line says the bits were NOT
   checked and which component of the nearest key differs; 1 and 2 still run, and with
   ``--require-bits`` (or ``LLMC_GATE_REQUIRE_BITS=1``) the gate fails instead.

``llmc-parity gate --update`` rewrites the baseline (``baselines/gate.json``: sorted keys,
one check per line, so ``git diff`` shows what moved) and prints what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyref.formats import write_atomic

from .arbiter.compare import Comparison, bias_minimum
from .errors import InputError

BASELINE_NAME = "llmc-parity-gate.json"
_PROJECT_MARKERS = ("pyproject.toml", "setup.cfg", "setup.py", ".git")


class BaselineError(InputError, ValueError):
    """A baseline file that is not one: invalid JSON or another schema."""


def default_baseline(start: Path | None = None) -> Path:
    """The baseline belongs to the project being checked: ``$LLMC_GATE_BASELINE``, else
    ``llmc-parity-gate.json`` at the root of the project the current directory is in (the
    nearest folder upwards with a pyproject.toml, setup.cfg, setup.py or .git), else in the
    current directory. ``gate --update`` creates it there. (This repository's own
    baseline, baselines/gate.json, is named by its Makefile.)"""
    if os.environ.get("LLMC_GATE_BASELINE"):
        return Path(os.environ["LLMC_GATE_BASELINE"])
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if any((d / m).exists() for m in _PROJECT_MARKERS):
            return d / BASELINE_NAME
    return here / BASELINE_NAME
SCHEMA = "llmc-parity/gate/2"
GROWTH_FACTOR = 4.0
GROWTH_FLOOR = 0.05
BIAS_GROWTH_FLOOR = 0.2
SUITE = {"config": "tiny", "B": 4, "T": 16, "steps": 3, "seed": 0, "impls": ["numpy"]}


@dataclass
class GateRun:
    """What one run of the suite measured."""

    metrics: dict[str, dict]              # key -> {max_rel, norm_rel, tol_rel, tol_norm, bias, bias_bound}
    failures: list[str]                   # tolerance violations (messages)
    fingerprints: dict[str, str]          # key -> sha256 of the C's output bits
    build_key: dict | None                # see build_key; None: unknown build, no bit check
    notes: list[str] = field(default_factory=list)
    # fingerprint key -> the metric keys of the C's checks of that output (a moved
    # fingerprint is reported with how its error against the oracle moved)
    checked_by: dict[str, list[str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------
# the fingerprint key: what decides the C's bits for a given source

KEY_FIELDS = ("compiler", "cflags", "openmp", "isa", "libm", "libm_dispatch", "inputs")

# CPU features glibc's libm selects code paths by (ifunc) in the functions the C calls:
# expf, logf and powf have FMA and FMA+AVX2 variants on x86-64. By experiment (glibc 2.36,
# masking them with GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-FMA): all 294 fingerprinted
# outputs of the suite, and expf/logf/tanhf/coshf/powf over 4M arguments, kept their bits,
# so today they decide nothing; they stay in the key because they select other code, at
# the cost of a separate fingerprint for the rare x86-64 machine without them. Every other
# CPU flag (AVX-512, BMI, ...) changes no code path of a library built without -march, and
# a -march build's code is named by its isa instead.
LIBM_DISPATCH = ("fma", "avx2")


def _libm_dispatch() -> str:
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        return "unknown"
    have = [f for f in LIBM_DISPATCH if f in flags]
    masked = os.environ.get("GLIBC_TUNABLES", "")
    return " ".join(have) + (f" (GLIBC_TUNABLES={masked})" if "hwcaps" in masked else "")


def build_key(lib, inputs: str) -> dict | None:
    """What decides the bits of the library's source: compiler and version, flags, OpenMP,
    the instruction sets those flags target, the C library (libm) and the CPU features it
    dispatches on, and the digest of the suite's inputs (the same bytes, not the same
    NumPy). None for a library without a build record."""
    from .clib.build import target_isa
    info = lib.build_info
    if info is None:
        return None
    return {"compiler": info.cc_version, "cflags": info.cflags, "openmp": bool(info.openmp),
            "isa": info.isa or target_isa(info.cc, info.cflags),
            "libm": " ".join(platform.libc_ver()), "libm_dispatch": _libm_dispatch(),
            "inputs": inputs}


def key_text(key: dict) -> str:
    return " | ".join(f"{f}={key.get(f)}" for f in KEY_FIELDS)


def _nearest(key: dict, entries: list[dict]) -> tuple[dict | None, list[str]]:
    """The baseline entry whose key shares most components with ``key``, and the
    components in which it differs."""
    best, diff = None, list(KEY_FIELDS)
    for e in entries:
        d = [f for f in KEY_FIELDS if e["key"].get(f) != key.get(f)]
        if len(d) < len(diff):
            best, diff = e, d
    return best, diff


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _entry(c: Comparison) -> dict:
    out = {"max_rel": float(f"{c.max_rel:.3g}"), "norm_rel": float(f"{c.norm_rel:.3g}"),
           "tol_rel": float(f"{c.tol.rel:.3g}"), "tol_norm": float(f"{c.tol.norm:.3g}")}
    bound = _bias_bound(c)
    if bound is not None:    # the mean signed error and what bounds it here: tol.bias + t SE
        out["bias"], out["bias_bound"] = float(f"{c.bias:.3g}"), float(f"{bound:.3g}")
    return out


def _bias_bound(c: Comparison) -> float | None:
    """The bound |bias| is judged against (``tol.bias + t SE``, the form shown), or None
    where the bias is not judged."""
    b = c.bias_stats
    if b is None or c.bias_z is None or not np.isfinite(c.tol.bias) or not np.isfinite(b.t):
        return None
    _, se, t = b.forms()[0 if b.form == "scale" else 1]
    return bias_minimum(b, c.tol) + t * se


def run_suite(lib=None, progress=None) -> GateRun:
    """Run the fixed suite against ``lib`` (default: the bound library): the per-op sweep,
    then a few model steps, their metrics, failures and the C's output bits."""
    from .clib.library import as_library

    lib = as_library(lib)
    run = GateRun({}, [], {}, None)
    inputs = hashlib.sha256()   # every input the C gets, as bytes

    def took(*arrays):
        for a in arrays:
            inputs.update(np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray) else repr(a).encode())

    _run_ops(run, lib, took)
    _run_model(run, lib, took, progress)
    run.build_key = build_key(lib, inputs.hexdigest()[:16])
    return run


def _run_ops(run: GateRun, lib, took) -> None:
    from .clib.kernels import CKernels
    from .checks.perop import sweep
    from pyref.protocol import run_kernel

    ck = CKernels(lib)
    for case in sweep({"C": ck}, seeds=(SUITE["seed"],)):
        args = case.args
        took(*(args[k] for k in sorted(args)))
        res = case.results["C"]
        if isinstance(res, Exception):
            run.failures.append(f"op {case.spec.name}@{case.shape.name}: {type(res).__name__}: {res}")
            continue
        for output, c in res.items():
            key = f"op {case.key(output)}"
            run.metrics[key] = _entry(c)
            run.checked_by[key] = [key]
            if not c.passed:
                run.failures.append(f"{key}: {c.message()}")
        for name, a in run_kernel(ck, case.spec.name, args).items():  # deterministic: the same bits
            mask = case.spec.mask(name, args)   # preatt's upper triangle is never written
            run.fingerprints[f"op {case.key(name)}"] = _digest(a if mask is None else np.where(mask, a, 0))


def _run_model(run: GateRun, lib, took, progress) -> None:
    from pyref import synth
    from pyref.config import preset

    from .ports.loader import load_kernels
    from .checks.run import run_parity

    cfg = preset(SUITE["config"])
    params = synth.init_params(cfg, seed=SUITE["seed"])
    took(params)

    def batches():
        for batch in synth.batches(cfg, SUITE["B"], SUITE["T"], seed=SUITE["seed"]):
            took(*batch)
            yield batch

    def fingerprint(t, cmodel):
        for name, a in cmodel.acts.items():
            if name == "preatt":
                a = np.where(np.tril(np.ones(a.shape[-2:], bool)), a, 0)
            run.fingerprints[_step_key(t, "acts", name)] = _digest(a)
        for name, a in cmodel.grads.items():
            run.fingerprints[_step_key(t, "grads", name)] = _digest(a)
        for name in ("params_memory", "m_memory", "v_memory"):
            run.fingerprints[f"step {t} {name} (after update)"] = _digest(getattr(cmodel, name))

    impls = {name: load_kernels(name) for name in SUITE["impls"]}
    report = run_parity(cfg, params, batches(), lib=lib, impls=impls, steps=SUITE["steps"],
                        on_step=fingerprint, progress=progress)
    for step in report.steps:
        for chk in step.checks:
            key = f"step {chk.step} {chk.impl} {chk.kind} {chk.tensor}"
            run.metrics[key] = _entry(chk.comparison)
            if chk.impl == "C" and chk.kind == "e2e":
                run.checked_by.setdefault(_step_key(chk.step, chk.ref.group, chk.ref.name), []).append(key)
            if not chk.passed:
                run.failures.append(f"{key} ({chk.where}): {chk.comparison.message()}")
        run.failures += [f"step {step.step} {impl}: {err}" for impl, err in step.errors.items()]


# ----------------------------------------------------------------------------

@dataclass
class GateResult:
    passed: bool
    lines: list[str]
    bits: dict = field(default_factory=dict)     # bit_check's result

    def text(self) -> str:
        return "\n".join(self.lines)


def load_baseline(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no gate baseline at {path}: create it with `llmc-parity gate --update`") from None
    except ValueError as e:
        raise BaselineError(f"{path}: not valid JSON ({e})") from None
    if data.get("schema") == "llmc-parity/gate/1":
        # fingerprints were keyed by a string that held the CPU's whole flag set and the
        # NumPy version: they cannot be matched to today's keys. Metrics still count.
        data = dict(data, schema=SCHEMA, fingerprints=[])
    if data.get("schema") != SCHEMA:
        raise BaselineError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


def evaluate(run: GateRun, baseline: dict, require_bits: bool = False) -> GateResult:
    """Judge a run against the baseline; every line of the verdict says what moved.
    ``require_bits``: a run whose bits cannot be checked (no fingerprint for its key, or
    no build record) fails instead of passing on tolerances alone."""
    lines: list[str] = []
    ok = True
    if run.failures:
        ok = False
        lines.append(f"{len(run.failures)} tolerance violation(s):")
        lines += ["  " + f.splitlines()[0] for f in run.failures[:20]]
        if len(run.failures) > 20:
            lines.append(f"  ... and {len(run.failures) - 20} more")
    base = baseline.get("metrics", {})
    grown = []
    for key, new in run.metrics.items():
        old = base.get(key)
        if old is None:
            continue
        for metric, tol_key in (("max_rel", "tol_rel"), ("norm_rel", "tol_norm")):
            floor = GROWTH_FLOOR * new[tol_key]
            if new[metric] > GROWTH_FACTOR * max(old[metric], floor):
                grown.append(f"  {key}: {metric} {old[metric]:.3g} -> {new[metric]:.3g} "
                             f"(x{new[metric] / max(old[metric], 1e-300):.1f}; tolerance {new[tol_key]:.3g})")
        if "bias" in new and "bias" in old:
            b_new, b_old = abs(new["bias"]), abs(old["bias"])
            if b_new > GROWTH_FACTOR * max(b_old, BIAS_GROWTH_FLOOR * new["bias_bound"]):
                grown.append(f"  {key}: bias {old['bias']:+.3g} -> {new['bias']:+.3g} "
                             f"(x{b_new / max(b_old, 1e-300):.1f}; bound {new['bias_bound']:.3g})")
    if grown:
        ok = False
        lines.append(f"{len(grown)} error metric(s) grew beyond {GROWTH_FACTOR:g}x the baseline:")
        lines += grown[:30] + ([f"  ... and {len(grown) - 30} more"] if len(grown) > 30 else [])
    added = sorted(set(run.metrics) - set(base))
    removed = sorted(set(base) - set(run.metrics))
    if added or removed:
        ok = False
        lines.append(f"the suite changed: {len(added)} check(s) not in the baseline, {len(removed)} gone "
                     f"(e.g. {(added or removed)[0]})")
    bits = bit_check(run, baseline)
    if bits["status"] == "changed":
        ok = False
    elif bits["status"] != "checked" and require_bits:
        ok = False
    lines += bits["lines"]
    if bits["status"] in ("no-fingerprint", "unknown-build"):
        # first, so that nobody takes a tolerance-only pass for a bit-level one
        lines.insert(0, f"NO BIT CHECK: {bits['headline']}" + (" (required: --require-bits)" if require_bits else ""))
    if ok:
        lines.insert(0, f"GATE PASS: {len(run.metrics)} checks within tolerance and within "
                        f"{GROWTH_FACTOR:g}x of the baseline" +
                     ("" if bits["status"] == "checked" else "; C output bits NOT checked"))
    else:
        lines.insert(0, "GATE FAIL")
        lines.append(_advice(run))
    return GateResult(ok, lines, bits)


def _advice(run: GateRun) -> str:
    """What to do about a failed gate, by what failed. A tolerance violation means the C's
    numbers are wrong against the float64 oracle: ``--update`` records it, and the gate
    still fails on it, so it is not the remedy. Anything else (moved bits, grown errors
    within tolerance, a changed suite, a build without a fingerprint) is a change the
    baseline can accept, if it is intended."""
    if run.failures:
        return ("The C's numbers are wrong: a tolerance violation is an error against the float64 oracle, not "
                "a drift; fix the C (the violations above say where). `llmc-parity gate --update` will not make "
                "it pass: it records the violations and the gate still fails on them.")
    return ("If this change is intended, accept it: `llmc-parity gate --update` (or `make gate-update`) "
            "and commit baselines/gate.json (the diff shows what moved).")


def bit_check(run: GateRun, baseline: dict) -> dict:
    """The bit check as data: ``status`` (checked, changed, no-fingerprint,
    unknown-build), the key, the nearest fingerprint's key and the components that
    differ, the moved tensors, and the verdict's lines."""
    entries = baseline.get("fingerprints", [])
    out: dict = {"status": "unknown-build", "key": run.build_key, "nearest": None,
                 "differs_in": [], "moved": [], "lines": []}
    if run.build_key is None:
        out["headline"] = "the library has no build record (not built by llmc-parity), so nothing says its bits"
        out["lines"].append(f"note: bit check skipped: {out['headline']}")
        return out
    match = next((e for e in entries if e["key"] == run.build_key), None)
    if match is None:
        near, diff = _nearest(run.build_key, entries)
        out.update(status="no-fingerprint", nearest=near and near["key"], differs_in=diff)
        if near is None:
            out["headline"] = "the baseline holds no fingerprint at all"
        else:
            out["headline"] = ("no fingerprint for this build; the nearest differs in " +
                               ", ".join(f"{f} ({near['key'].get(f)!r} there, {run.build_key.get(f)!r} here)"
                                         for f in diff))
        out["lines"] += [f"note: bit check skipped: {out['headline']}",
                         f"  this build: {key_text(run.build_key)}",
                         "  `llmc-parity gate --update` adds its fingerprint"]
        return out
    old = match["bits"]
    moved = sorted(k for k in run.fingerprints if old.get(k) not in (None, run.fingerprints[k]))
    out["moved"] = moved
    if moved:
        out["status"] = "changed"
        out["lines"].append(f"the C's output bits changed for this same build ({key_text(run.build_key)}): "
                            f"{len(moved)} of {len(run.fingerprints)} fingerprinted tensors moved:")
        base = baseline.get("metrics", {})
        out["lines"] += [f"  {k}{_movement(run.checked_by.get(k, []), run.metrics, base)}" for k in moved[:30]]
        if len(moved) > 30:
            out["lines"].append(f"  ... and {len(moved) - 30} more")
    else:
        out["status"] = "checked"
        out["lines"].append(f"bits: all {len(run.fingerprints)} fingerprinted C outputs identical to the baseline")
    return out


def _step_key(step: int, group: str, name: str) -> str:
    """The fingerprint key of one of the C's tensors after a step's forward/backward."""
    return f"step {step} {group}.{name}"


def _movement(keys: list[str], metrics: dict, base: dict) -> str:
    """For a moved fingerprint, how the error of the C's checks of it (``keys``) against
    the oracle changed: the worst of them, before and after."""
    pairs = [(base[k], metrics[k]) for k in keys if k in base and k in metrics]
    if not pairs:
        return ""
    old, new = max(pairs, key=lambda p: p[1]["max_rel"])
    return f" (max rel vs oracle {old['max_rel']:.3g} -> {new['max_rel']:.3g})"


def _dumps(data: dict) -> str:
    """JSON with one check (or one fingerprinted tensor) per line, so a diff reads line by line."""
    def block(d: dict, indent: str) -> str:
        rows = [f"{indent}{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in d.items()]
        return "{\n" + ",\n".join(rows) + "\n" + indent[:-1] + "}"
    entries = [f'  {{"key": {json.dumps(e["key"], sort_keys=True)},\n   "bits": {block(e["bits"], "    ")}}}'
               for e in data["fingerprints"]]
    parts = [f' "schema": {json.dumps(data["schema"])}',
             f' "suite": {json.dumps(data["suite"], sort_keys=True)}',
             f' "growth_factor": {json.dumps(data["growth_factor"])}',
             f' "floor": {json.dumps(data["floor"])}',
             f' "metrics": {block(data["metrics"], "  ")}',
             ' "fingerprints": [\n' + ",\n".join(entries) + "\n ]"]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_baseline(run: GateRun, path: Path, old: dict | None) -> list[str]:
    """Write the baseline for this run; return a diff. Other builds' fingerprints are kept
    while this build's bits are unchanged, and dropped when they moved (stale then)."""
    entries = list((old or {}).get("fingerprints", []))
    mine = next((e for e in entries if e["key"] == run.build_key), None)
    bits = dict(sorted(run.fingerprints.items()))
    dropped = []
    moved = []
    if run.build_key is not None:
        if mine is not None:
            moved = [k for k in bits if mine["bits"].get(k) != bits[k]]
        if moved:
            # the arithmetic changed: other builds' fingerprints describe the old bits
            dropped = [e for e in entries if e is not mine]
            entries = []
        entries = [e for e in entries if e is not mine] + [{"key": run.build_key, "bits": bits}]
    data = {"schema": SCHEMA, "suite": SUITE, "growth_factor": GROWTH_FACTOR, "floor": GROWTH_FLOOR,
            "metrics": dict(sorted(run.metrics.items())), "fingerprints": entries}
    diff = []
    base = (old or {}).get("metrics", {})
    for key in sorted(set(base) | set(run.metrics)):
        a, b = base.get(key), run.metrics.get(key)
        if a != b:
            if a is None:
                diff.append(f"+ {key}: max_rel {b['max_rel']:.3g} norm_rel {b['norm_rel']:.3g}")
            elif b is None:
                diff.append(f"- {key}")
            else:
                diff.append(f"~ {key}: max_rel {a['max_rel']:.3g} -> {b['max_rel']:.3g}, "
                            f"norm_rel {a['norm_rel']:.3g} -> {b['norm_rel']:.3g}"
                            + ("" if "bias" not in b else f", bias {a['bias']:+.3g} -> {b['bias']:+.3g}"
                               if "bias" in a else f", bias {b['bias']:+.3g} (new)"))
    if moved:
        diff.append(f"~ fingerprints for this build: {len(moved)} tensor(s) changed bits")
    if dropped:
        diff.append(f"- fingerprints of {len(dropped)} other build(s), stale after this change: "
                    "run `llmc-parity gate --update` on those machines to add them back")
    write_atomic(path, [_dumps(data).encode()], overwrite=True)
    return diff
