"""The drift gate: a fixed suite, compared with a baseline committed in the repository.

``llmc-parity gate`` runs every per-op check of the op table on the C, and 3 training
steps of the tiny model (C, with the NumPy reference alongside), then fails on

1. any tolerance violation;
2. any error metric (max rel, norm rel) that grew beyond ``GROWTH_FACTOR`` x its baseline
   (a floor of ``FLOOR`` x the tolerance keeps noise near zero from counting as growth);
3. any change in the bits of the C's outputs, when the baseline holds a fingerprint for
   this same build: compiler, flags, CPU, C library and NumPy (which makes the inputs).
   Our default build is deterministic, so any change of arithmetic shows here, including
   one too small for any tolerance. For an unknown build the bit check is skipped with a
   note; 1 and 2 still run.

``llmc-parity gate --update`` rewrites the baseline (``baselines/gate.json``: sorted keys,
one check per line, so ``git diff`` shows what moved) and prints what changed.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyref.formats import write_atomic

from .compare import Comparison

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = ROOT / "baselines" / "gate.json"
SCHEMA = "llmc-parity/gate/1"
GROWTH_FACTOR = 4.0
FLOOR = 0.05
SUITE = {"config": "tiny", "B": 4, "T": 16, "steps": 3, "seed": 0, "impls": ["numpy"]}


@dataclass
class GateRun:
    """What one run of the suite measured."""

    metrics: dict[str, dict]              # key -> {max_rel, norm_rel, tol_rel, tol_norm}
    failures: list[str]                   # tolerance violations (messages)
    fingerprints: dict[str, str]          # key -> sha256 of the C's output bits
    build_key: str | None                 # None: unknown build, no bit check
    notes: list[str] = field(default_factory=list)


def build_key(lib) -> str | None:
    """What decides the C's bits besides its source: compiler, flags, CPU, libc, NumPy."""
    info = lib.build_info
    if info is None:
        return None
    cpu = platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        # the model name can be generic ("AMD EPYC"); libm and NumPy pick code paths by
        # the CPU's features, so those are part of the key too
        flags = next((line.split(":", 1)[1] for line in cpuinfo if line.startswith("flags")), "")
        cpu += " flags " + hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]
    except OSError:
        pass
    libc = " ".join(platform.libc_ver())
    return f"{info.cc_version} | {info.cflags} | openmp={info.openmp} | {cpu} | {libc} | numpy {np.__version__}"


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _entry(c: Comparison) -> dict:
    return {"max_rel": float(f"{c.max_rel:.3g}"), "norm_rel": float(f"{c.norm_rel:.3g}"),
            "tol_rel": float(f"{c.tol.rel:.3g}"), "tol_norm": float(f"{c.tol.norm:.3g}")}


def run_suite(lib=None, progress=None) -> GateRun:
    """Run the fixed suite against ``lib`` (default: the bound library)."""
    from pyref import synth
    from pyref.config import preset

    from .binding import as_library
    from .ckernels import CKernels
    from .kernels import load_kernels
    from .ops import cases, make_inputs, run_kernel
    from .opcheck import check_kernel, oracle_outputs
    from .runner import run_parity

    lib = as_library(lib)
    metrics: dict[str, dict] = {}
    failures: list[str] = []
    prints: dict[str, str] = {}
    ck = CKernels(lib)
    for check, s in cases():
        args = make_inputs(check, s, seed=SUITE["seed"])
        expected = oracle_outputs(check.kernel, args)
        for c in check_kernel(ck, check.kernel, args, s, expected=expected):
            key = f"op {c.name}@{s.name}"
            metrics[key] = _entry(c)
            if not c.passed:
                failures.append(f"{key}: {c.message()}")
        outs = run_kernel(ck, check.kernel, args)  # deterministic: same bits as above
        for name, a in outs.items():
            mask = check.mask(name, s)   # preatt's upper triangle is never written
            prints[f"op {check.kernel}.{name}@{s.name}"] = _digest(a if mask is None else np.where(mask, a, 0))

    cfg = preset(SUITE["config"])
    params = synth.init_params(cfg, seed=SUITE["seed"])

    def batches():
        i = 0
        while True:
            yield synth.make_batch(cfg, SUITE["B"], SUITE["T"], seed=SUITE["seed"] + i)
            i += 1

    def fingerprint(t, cmodel):
        for name, a in cmodel.acts.items():
            if name == "preatt":
                a = np.where(np.tril(np.ones(a.shape[-2:], bool)), a, 0)
            prints[f"step {t} acts.{name}"] = _digest(a)
        for name, a in cmodel.grads.items():
            prints[f"step {t} grads.{name}"] = _digest(a)
        for name in ("params_memory", "m_memory", "v_memory"):
            prints[f"step {t} {name} (after update)"] = _digest(getattr(cmodel, name))

    impls = {name: load_kernels(name) for name in SUITE["impls"]}
    report = run_parity(cfg, params, batches(), lib=lib, impls=impls, steps=SUITE["steps"],
                        on_step=fingerprint, progress=progress)
    for step in report.steps:
        for chk in step.checks:
            key = f"step {chk.step} {chk.impl} {chk.kind} {chk.tensor}"
            metrics[key] = _entry(chk.comparison)
            if not chk.passed:
                failures.append(f"{key} ({chk.where}): {chk.comparison.message()}")
        for impl, err in step.errors.items():
            failures.append(f"step {step.step} {impl}: {err}")
    return GateRun(metrics, failures, prints, build_key(lib))


# ----------------------------------------------------------------------------

@dataclass
class GateResult:
    passed: bool
    lines: list[str]

    def text(self) -> str:
        return "\n".join(self.lines)


def load_baseline(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no gate baseline at {path}: create it with `llmc-parity gate --update`") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    return data


def evaluate(run: GateRun, baseline: dict) -> GateResult:
    """Judge a run against the baseline; every line of the verdict says what moved."""
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
            floor = FLOOR * new[tol_key]
            if new[metric] > GROWTH_FACTOR * max(old[metric], floor):
                grown.append(f"  {key}: {metric} {old[metric]:.3g} -> {new[metric]:.3g} "
                             f"(x{new[metric] / max(old[metric], 1e-300):.1f}; tolerance {new[tol_key]:.3g})")
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
    prints = baseline.get("fingerprints", {})
    if run.build_key is None:
        lines.append("note: bit check skipped: the library has no build record (not built by llmc-parity)")
    elif run.build_key not in prints:
        lines.append(f"note: bit check skipped: no fingerprint for this build ({run.build_key}); "
                     "`llmc-parity gate --update` adds one")
    else:
        old = prints[run.build_key]
        moved = sorted(k for k in run.fingerprints if old.get(k) not in (None, run.fingerprints[k]))
        if moved:
            ok = False
            lines.append(f"the C's output bits changed for this same build ({run.build_key}): "
                         f"{len(moved)} of {len(run.fingerprints)} fingerprinted tensors moved:")
            for k in moved[:30]:
                lines.append(f"  {k}{_movement(k, run.metrics, base)}")
            if len(moved) > 30:
                lines.append(f"  ... and {len(moved) - 30} more")
        else:
            lines.append(f"bits: all {len(run.fingerprints)} fingerprinted C outputs identical to the baseline")
    if ok:
        lines.insert(0, f"GATE PASS: {len(run.metrics)} checks within tolerance and within "
                        f"{GROWTH_FACTOR:g}x of the baseline")
    else:
        lines.insert(0, "GATE FAIL")
        lines.append("If this change is intended, accept it: `llmc-parity gate --update` (or `make gate-update`) "
                     "and commit baselines/gate.json (the diff shows what moved).")
    return GateResult(ok, lines)


def _movement(fp_key: str, metrics: dict, base: dict) -> str:
    """For a moved fingerprint, how its error against the oracle changed (C's checks)."""
    # fingerprint "op layernorm_forward.out@base" <-> metric "op layernorm_forward.out@base"
    # fingerprint "step 1 acts.ln1" <-> metrics "step 1 C e2e acts.ln1[layer k]"
    if fp_key.startswith("op "):
        keys = [fp_key]
    else:
        step, tensor = fp_key.split(" ")[1], fp_key.split(" ", 2)[2].split(" ")[0]
        keys = [k for k in metrics if k.startswith(f"step {step} C e2e {tensor}")]
    pairs = [(base[k], metrics[k]) for k in keys if k in base and k in metrics]
    if not pairs:
        return ""
    old, new = max(pairs, key=lambda p: p[1]["max_rel"])
    return f" (max rel vs oracle {old['max_rel']:.3g} -> {new['max_rel']:.3g})"


def _dumps(data: dict) -> str:
    """JSON with one check (or one fingerprint) per line, so a diff reads line by line."""
    def block(d: dict, indent: str) -> str:
        rows = [f"{indent}{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in d.items()]
        return "{\n" + ",\n".join(rows) + "\n" + indent[:-1] + "}"
    parts = [f' "schema": {json.dumps(data["schema"])}',
             f' "suite": {json.dumps(data["suite"], sort_keys=True)}',
             f' "growth_factor": {json.dumps(data["growth_factor"])}',
             f' "floor": {json.dumps(data["floor"])}',
             f' "metrics": {block(data["metrics"], "  ")}',
             ' "fingerprints": {\n' + ",\n".join(
                 f'  {json.dumps(k)}: {block(v, "   ")}' for k, v in data["fingerprints"].items()) + "\n }"]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_baseline(run: GateRun, path: Path, old: dict | None) -> list[str]:
    """Write the baseline for this run; return a diff. Other builds' fingerprints are kept
    while this build's bits are unchanged, and dropped when they moved (stale then)."""
    prints = dict((old or {}).get("fingerprints", {}))
    dropped = []
    if run.build_key is not None:
        before = prints.get(run.build_key)
        if before is not None and before != dict(sorted(run.fingerprints.items())):
            # the arithmetic changed: other builds' fingerprints describe the old bits
            dropped = [k for k in prints if k != run.build_key]
            prints = {}
        prints[run.build_key] = dict(sorted(run.fingerprints.items()))
    data = {"schema": SCHEMA, "suite": SUITE, "growth_factor": GROWTH_FACTOR, "floor": FLOOR,
            "metrics": dict(sorted(run.metrics.items())), "fingerprints": prints}
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
                            f"norm_rel {a['norm_rel']:.3g} -> {b['norm_rel']:.3g}")
    if old is not None and run.build_key is not None:
        before = old.get("fingerprints", {}).get(run.build_key, {})
        moved = [k for k in run.fingerprints if before.get(k) != run.fingerprints[k]]
        if moved:
            diff.append(f"~ fingerprints for this build: {len(moved)} tensor(s) changed bits")
    if dropped:
        diff.append(f"- fingerprints of {len(dropped)} other build(s), stale after this change: "
                    "run `llmc-parity gate --update` on those machines to add them back")
    write_atomic(path, [_dumps(data).encode()], overwrite=True)
    return diff
