"""Reports: the per-step text table, the end-of-session summary and the JSON report.

* :func:`step_table` -- one step, as a person reads it in the terminal: a row per checked
  tensor, implementation and kind (per-layer tensors folded to their worst layer unless
  ``verbose``), the losses, and on failure the first divergence and errors.
* :func:`run_summary` -- the verdict block of a whole run.
* :func:`to_json` / :func:`write_json` -- the machine-readable report; its schema
  (``"llmc-parity/run/1"``) is described field by field in ``docs/report-schema.md``.
* the PNG of a run is :func:`harness.plot.plot`.
* :func:`worst_per_op_table` -- the pytest plugin's end-of-session table.

Nothing here writes over an existing file unless asked to (``overwrite=True``), and files
are written atomically (a temporary file in the same folder, then renamed into place).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from pyref.formats import write_atomic

from .checks.results import KINDS, first_divergence, first_divergence_check
from .compare import Comparison, json_float

SCHEMA = "llmc-parity/run/1"


def _ratio(c: Comparison) -> float:
    """How much of its tolerance a comparison used (the larger of the two bounds)."""
    r = 0.0
    if c.tol.rel > 0:
        r = max(r, c.max_rel / c.tol.rel)
    if c.tol.norm > 0:
        r = max(r, c.norm_rel / c.tol.norm)
    return r


def worst_per_op_table(records: list[Comparison]) -> str:
    """One row per op: how many comparisons, how many failed, the worst one."""
    from pyref.protocol import KERNEL_OP

    groups: dict[str, list[Comparison]] = {}
    for c in records:
        kernel = c.name.split(".", 1)[0]
        groups.setdefault(KERNEL_OP.get(kernel, kernel), []).append(c)
    head = f"{'op':<14}{'checks':>8}{'failed':>8}  {'worst tensor':<40}{'max rel':>10}{'tol rel':>10}{'norm rel':>10}{'used':>7}"
    lines = [head, "-" * len(head)]
    for op in sorted(groups):
        cs = groups[op]
        w = max(cs, key=_ratio)
        lines.append(f"{op:<14}{len(cs):>8}{sum(not c.passed for c in cs):>8}  {w.name[:39]:<40}"
                     f"{w.max_rel:>10.2e}{w.tol.rel:>10.2e}{w.norm_rel:>10.2e}{_ratio(w):>6.0%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# helpers shared by the reports

def used(c: Comparison) -> float:
    """The fraction of its tolerance a comparison used: the largest of ``max_rel/tol.rel``,
    ``norm_rel/tol.norm`` and ``max_ulp/tol.ulp`` (when ulp is checked). ``inf`` for a
    non-finite mismatch, a NaN norm, or an error against a zero tolerance; > 1 exactly
    when a bound is exceeded."""
    if c.n_nonfinite_mismatch or math.isnan(c.norm_rel):
        return math.inf
    bounds = [(c.max_rel, c.tol.rel), (c.norm_rel, c.tol.norm)]
    if c.tol.ulp is not None:
        bounds.append((float(c.max_ulp), float(c.tol.ulp)))
    r = 0.0
    for err, tol in bounds:
        if tol > 0:
            r = max(r, err / tol)
        elif err > 0:
            return math.inf
    return r


def _severity(c) -> tuple[bool, float]:
    """Sort key of a Comparison or a Check: failing first, then by the fraction of
    tolerance used."""
    c = getattr(c, "comparison", c)
    return (not c.passed, used(c))


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def _times(x: float) -> str:
    """A fraction of tolerance, e.g. ``0.31x`` or ``2.4e+03x``."""
    if not math.isfinite(x):
        return "inf"
    if x == 0:
        return "0x"
    return f"{x:.2g}x" if 1e-2 <= x < 1e3 else f"{x:.1e}x"


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _impl_order(names: Iterable[str], preferred: Iterable[str] = ()) -> list[str]:
    out: list[str] = []
    for n in [*preferred, *names]:
        if n not in out:
            out.append(n)
    return out


def _wanted(impl_filter) -> Any:
    if impl_filter is None:
        return lambda impl: True
    if isinstance(impl_filter, str):
        return lambda impl: impl == impl_filter
    if callable(impl_filter):
        return impl_filter
    names = set(impl_filter)
    return lambda impl: impl in names


def _loss_text(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.7f}" if math.isfinite(x) else str(x)


def _rel_diff(a: float | None, e: float | None) -> float | None:
    if a is None or e is None:
        return None
    if e == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - e) / abs(e)


# ----------------------------------------------------------------------------
# the per-step table

def _impl_rows(step: int, mine: list, verbose: bool) -> list[tuple[str, ...]]:
    """One implementation's rows of the step table: grouped by (kind, tensor without its
    layer; the buffer for update checks) in graph order, each group folded to its worst
    check unless ``verbose``."""
    def row(c, tensor: str, status: str) -> tuple[str, ...]:
        cmp = c.comparison
        return (str(step), c.impl, c.kind, tensor, _num(cmp.max_rel), _num(cmp.tol.rel),
                _num(cmp.norm_rel), _num(cmp.tol.norm),
                cmp.worst_label if cmp.worst_index is not None else "-", status)

    groups: dict[tuple[str, str], list] = {}
    order: list[str] = []
    for c in mine:
        key = c.tensor if verbose else c.ref.group if c.kind == "update" else c.base
        if c.kind in ("e2e", "replay") and key not in order:
            order.append(key)
        groups.setdefault((c.kind, key), []).append(c)
    keys = [(k, t) for t in order for k in ("e2e", "replay") if (k, t) in groups]
    keys += sorted(((k, t) for (k, t) in groups if k not in ("e2e", "replay")), key=lambda kt: KINDS.index(kt[0]))
    rows = []
    for key in keys:
        group = groups[key]
        if len(group) == 1:
            rows.append(row(group[0], group[0].tensor, "OK" if group[0].passed else "FAIL"))
            continue
        w = max(group, key=_severity)
        failed = sum(not c.passed for c in group)
        label = (f"{w.base} [layer {w.layer} of {len(group)}]" if w.layer is not None and key[0] != "update"
                 else f"{w.tensor} [worst of {len(group)}]")
        rows.append(row(w, label, "OK" if not failed else f"FAIL {failed}/{len(group)}"))
    return rows


def step_table(step, impl_filter=None, verbose: bool = False) -> str:
    """The text table of one :class:`~harness.runner.StepReport`.

    One row per checked tensor, implementation and kind: for each tensor of the graph its
    ``e2e`` row then its ``replay`` row (graph order), then the ``update`` rows (AdamW)
    and the ``loss`` row. Columns: step, impl, kind, tensor, max rel, tol rel, norm rel,
    tol norm, worst at (the worst element's label), OK/FAIL.

    Unless ``verbose``, rows are folded so that the table does not grow with the depth:
    for each (impl, kind, tensor without its layer) only the worst layer's row is shown
    (worst: failing first, then the largest fraction of tolerance used), its tensor written
    ``acts.ln1 [layer k of L]`` and, when it fails, ``FAIL n/L`` saying in how many layers;
    likewise the AdamW checks fold to the worst tensor of each buffer (params, m, v),
    ``params.fcw (after update) [worst of 16]``. ``verbose`` shows every row.

    ``impl_filter``: None (all), an implementation's name, a collection of names, or a
    predicate on the name. After the table: the losses (the oracle's and each
    implementation's, with the relative difference), and, when the step failed, the first
    divergence of each implementation and the errors.
    """
    want = _wanted(impl_filter)
    checks = [c for c in step.checks if want(c.impl)]
    impls = _impl_order((c.impl for c in checks), ["C"] if any(c.impl == "C" for c in checks) else [])
    header = ("step", "impl", "kind", "tensor", "max rel", "tol rel", "norm rel", "tol norm",
              "worst at", "OK/FAIL")
    rows = [row for impl in impls for row in _impl_rows(step.step, [c for c in checks if c.impl == impl], verbose)]
    n_fail = sum(not c.passed for c in checks)
    lines = _text_table(header, rows, right={0, 4, 5, 6, 7}) if rows else ["(no checks)"]
    lines.append(f"{len(checks) - n_fail} OK, {n_fail} FAIL" + ("" if verbose else
                 "  (folded: the worst layer of each per-layer tensor, the worst tensor of each "
                 "AdamW buffer; verbose=True shows every row)"))
    oracle = step.losses.get("oracle")
    parts = [f"oracle {_loss_text(oracle)}"] if oracle is not None else []
    for impl in _impl_order(step.losses, ["C"]):
        if impl == "oracle" or impl not in step.losses or not want(impl):
            continue
        x = step.losses[impl]
        d = _rel_diff(x, oracle)
        parts.append(f"{impl} {_loss_text(x)}" + ("" if d is None else f" (rel diff {_num(d)})"))
    lines.append(f"step {step.step} losses: " + ", ".join(parts))

    for impl, text in step.first_divergence.items():
        if want(impl):
            lines.append(f"[{impl}] {text}")
            lines += _why(step, impl, f"[{impl}]   ")
    for impl, text in step.errors.items():
        if want(impl):
            lines.append(f"[{impl}] error: {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# the summary

def _config_text(cfg) -> str:
    return (f"L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={cfg.vocab_size} "
            f"Vp={cfg.padded_vocab_size} maxT={cfg.max_seq_len}")


def _build_text(build: dict | None) -> str:
    if not build:
        return "build: unknown (no build record next to the library)"
    omp = build.get("openmp")
    parts = [build.get("cc_version") or build.get("cc") or "unknown compiler",
             f"cflags {build.get('cflags') or '(none)'}",
             "OpenMP on" if omp else ("OpenMP off" if omp is not None else "OpenMP unknown")]
    text = "build: " + ", ".join(parts)
    if build.get("source"):
        text += f"\nsource: {build['source']}"
        if build.get("source_sha256"):
            text += f" (sha256 {build['source_sha256']})"
    return text


def _counts(report) -> dict[str, dict[str, dict[str, Any]]]:
    """impl -> kind -> {checks, failed, worst Check}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for s in report.steps:
        for c in s.checks:
            d = out.setdefault(c.impl, {}).setdefault(c.kind, {"checks": 0, "failed": 0, "worst": None})
            d["checks"] += 1
            d["failed"] += not c.passed
            if d["worst"] is None or _severity(c) > _severity(d["worst"]):
                d["worst"] = c
    return out


def _why(step, impl: str, indent: str) -> list[str]:
    """The diagnosis of ``impl``'s first divergence in ``step`` (:mod:`harness.diagnose`),
    as a line to print under it; none when that check was not diagnosed."""
    c = first_divergence_check([c for c in step.checks if c.impl == impl])
    d = None if c is None else getattr(c, "diagnosis", None)
    return [] if d is None else [f"{indent}why: {d.text()}"]


def model_notes(report) -> list[str]:
    """What a report says of torch models before the numbers: hygiene findings (one line
    and a reason each) and the C tensors a model does not show (not checked for it)."""
    lines = []
    for name, found in report.findings.items():
        lines += [f"finding [{name}]: {f}" for f in found]
    for name, kernels in report.derived.items():
        if kernels:
            lines.append(f"derived by autograd [{name}]: {', '.join(kernels)} (through its own forward kernels)")
    for name, unseen in report.not_observed.items():
        if unseen:
            lines.append(f"not observed [{name}]: {', '.join(unseen)}")
    return lines


def _checks_table(report) -> list[str]:
    """Checks and failures per implementation and kind, each with its worst check."""
    counts = _counts(report)
    rows = []
    for impl in _impl_order(counts, report.impls):
        for kind in _impl_order(counts.get(impl, {}), KINDS):
            d = counts.get(impl, {}).get(kind)
            if d is None:
                continue
            w = d["worst"]
            rows.append((impl, kind, str(d["checks"]), str(d["failed"]),
                         f"{_times(used(w.comparison))} tol", f"{w.tensor} (step {w.step})"))
    return (_text_table(("impl", "kind", "checks", "failed", "worst", "worst tensor"), rows, right={2, 3, 4})
            if rows else ["(no checks)"])


def run_summary(report) -> str:
    """The verdict block of a :class:`~harness.runner.RunReport`: PASS/FAIL, what ran, the
    loss trajectory, checks and failures per implementation and kind, the first
    divergence, the kernels not checked, the library and its build."""
    impls = list(report.impls)
    lines = [f"llmc-parity: {'PASS' if report.passed else 'FAIL'}" + ("" if report.steps else " (no steps were run)"),
             f"steps: {len(report.steps)}   impls: {', '.join(impls)}   config: {_config_text(report.config)}"
             f"   batch: B={report.B} T={report.T}",
             "AdamW: " + " ".join(f"{k}={v:g}" for k, v in asdict(report.hyper).items()),
             "", "loss trajectory"]
    header = ("step", "C loss", "oracle loss", *[f"{i} loss" for i in impls if i != "C"], "C vs oracle")
    rows = []
    for s in report.steps:
        get = s.losses.get
        rows.append((str(s.step), _loss_text(get("C")), _loss_text(get("oracle")),
                     *[_loss_text(get(i)) for i in impls if i != "C"],
                     _num(_rel_diff(get("C"), get("oracle")))))
    lines += _text_table(header, rows, right=set(range(len(header)))) if rows else ["(no steps)"]

    lines += ["", "checks"] + _checks_table(report) + [""]

    first = report.first_divergence(heading=False)
    lines.append(f"first divergence: {first or 'none'}")
    seen = set()
    for s in report.steps:
        for impl, text in s.first_divergence.items():
            if impl in seen:
                continue
            seen.add(impl)
            entry = f"step {s.step} [{impl}] " + (first_divergence([c for c in s.checks if c.impl == impl], False)
                                                 or text)
            if entry != first:
                lines.append(f"  also {entry}")
            lines += _why(s, impl, "    " if entry != first else "  ")
    errors = [(s.step, i, t) for s in report.steps for i, t in s.errors.items()]
    for step, impl, text in errors:
        lines.append(f"error: step {step} [{impl}] {text}")

    py_impls = [i for i in impls if i != "C"]
    if py_impls:
        parts = []
        for impl in py_impls:
            missing = report.not_checked.get(impl) or []
            parts.append(f"{impl}: " + (", ".join(missing) if missing else "none"))
        lines.append("kernels not checked: " + "; ".join(parts))
    lines.append(f"library: {report.library}")
    lines.append(_build_text(report.build))
    fp = getattr(report, "floating_point", None)
    if fp:
        lines.append(f"floating point: {fp['description']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# JSON

def _versions() -> dict[str, str | None]:
    import importlib.metadata as md
    import importlib.util
    import platform

    import numpy

    torch = None
    mod = sys.modules.get("torch")
    if mod is not None and getattr(mod, "__version__", None):
        torch = str(mod.__version__)
    elif importlib.util.find_spec("torch") is not None:   # without importing it (slow)
        try:
            torch = md.version("torch")
        except md.PackageNotFoundError:
            torch = None
    try:
        own = md.version("llmc-parity")
    except md.PackageNotFoundError:
        own = "dev"
    return {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch,
            "llmc-parity": own, "platform": platform.platform()}


def _check_json(c) -> dict[str, Any]:
    row = c.comparison.summary_row()
    return {
        "impl": c.impl,
        "kind": c.kind,
        "phase": c.phase,
        "tensor": c.tensor,
        "layer": c.layer,
        "kernels": list(c.kernels),
        "where": c.where,
        "passed": bool(c.passed),
        "max_abs": row["max_abs"],
        "max_rel": row["max_rel"],
        "max_ulp": row["max_ulp"],
        "norm_rel": row["norm_rel"],
        "used": json_float(used(c.comparison)),
        "n_bad": row["n_bad"],
        "n_compared": row["n_compared"],
        "n_total": row["n_total"],
        "n_nonfinite_mismatch": row["n_nonfinite_mismatch"],
        "shape": row["shape"],
        "scale": row["scale"],
        "worst": {
            "label": row["worst_label"] if row["worst_index"] is not None else None,
            "index": row["worst_index"],
            "actual": row["worst_actual"],
            "expected": row["worst_expected"],
            "abs": row["worst_abs"],
            "rel": row["worst_rel"],
            "ulp": row["worst_ulp"],
        },
        "tol": {"rel": row["tol_rel"], "norm": row["tol_norm"], "ulp": row["tol_ulp"], "why": row["tol_why"]},
        "diagnosis": None if getattr(c, "diagnosis", None) is None else c.diagnosis.to_json(),
    }


def to_json(report, *, versions: bool = True) -> dict[str, Any]:
    """The report as plain JSON-safe data (``json.dumps(..., allow_nan=False)`` works):
    schema ``"llmc-parity/run/1"``, described in ``docs/report-schema.md``.

    Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"``. ``versions=False``
    leaves ``versions`` null (for output that does not depend on the machine)."""
    build = report.build
    raw = _counts(report)
    counts = {impl: {kind: {"checks": raw[impl][kind]["checks"], "failed": raw[impl][kind]["failed"]}
                     for kind in _impl_order(raw[impl], KINDS) if kind in raw[impl]}
              for impl in _impl_order(raw, report.impls) if impl in raw}
    out = {
        "schema": SCHEMA,
        "config": {k: int(v) for k, v in asdict(report.config).items()},
        "B": int(report.B),
        "T": int(report.T),
        "hyperparameters": {k: json_float(v) for k, v in asdict(report.hyper).items()},
        "impls": [str(i) for i in report.impls],
        "library": {
            "path": str(report.library),
            "build": None if not build else {
                "compiler": build.get("cc"),
                "compiler_version": build.get("cc_version"),
                "cflags": build.get("cflags"),
                "openmp": build.get("openmp"),
                "source": build.get("source"),
                "source_sha256": build.get("source_sha256"),
                "command": build.get("command"),
            },
            "floating_point": getattr(report, "floating_point", None),
        },
        "versions": _versions() if versions else None,
        "verdict": "pass" if report.passed else "fail",
        "first_divergence": report.first_divergence(),
        "counts": counts,
        "steps": [{
            "step": int(s.step),
            "seconds": json_float(s.seconds),
            "losses": {str(k): json_float(v) for k, v in s.losses.items()},
            "passed": bool(s.passed),
            "errors": {str(k): str(v) for k, v in s.errors.items()},
            "first_divergence": {str(k): str(v) for k, v in s.first_divergence.items()},
            "checks": [_check_json(c) for c in s.checks],
        } for s in report.steps],
        "not_checked": {str(k): [str(x) for x in v] for k, v in report.not_checked.items()},
        # torch models (--model): hygiene findings, and C tensors the model does not show
        "findings": {str(k): [str(x) for x in v] for k, v in getattr(report, "findings", {}).items()},
        "not_observed": {str(k): [str(x) for x in v] for k, v in getattr(report, "not_observed", {}).items()},
        "derived": {str(k): [str(x) for x in v] for k, v in getattr(report, "derived", {}).items()},
        "free_run": [{"step": int(r.step), "impl": str(r.impl), "passed": bool(r.passed), "error": r.error,
                      **{k: json_float(getattr(r, k)) for k in ("loss", "oracle_loss", "loss_rel", "loss_bound",
                                                                 "param_norm_rel", "param_bound")}}
                     for r in getattr(report, "free_run", [])],
    }
    return _plain(out)


def _plain(x):
    """Recursively turn tuples, NumPy scalars and non-finite floats into JSON-safe values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return json_float(x)
    if hasattr(x, "item"):              # NumPy scalar
        return _plain(x.item())
    return str(x)


def _refuse_existing(path, overwrite: bool) -> None:
    if not overwrite and Path(path).exists():
        raise FileExistsError(f"{path} exists; not overwriting it (pass overwrite=True to replace it)")


def _write_atomic(path, data: bytes, overwrite: bool) -> Path:
    write_atomic(path, [data], overwrite)
    return Path(path)


def write_json(report, path, *, overwrite: bool = False, versions: bool = True,
               indent: int | None = None) -> Path:
    """Write :func:`to_json` to ``path`` (strict JSON, UTF-8), atomically. Refuses to
    replace an existing file (FileExistsError) unless ``overwrite=True``. Returns the path."""
    _refuse_existing(path, overwrite)
    text = json.dumps(to_json(report, versions=versions), allow_nan=False, indent=indent, ensure_ascii=False)
    return _write_atomic(path, (text + "\n").encode("utf-8"), overwrite)
