"""Reports: the per-step text table, the end-of-session summary, the JSON report and the plot.

* :func:`step_table` -- one step, as a person reads it in the terminal: a row per checked
  tensor, implementation and kind (per-layer tensors folded to their worst layer unless
  ``verbose``), the losses, and on failure the first divergence and errors.
* :func:`run_summary` -- the verdict block of a whole run.
* :func:`to_json` / :func:`write_json` -- the machine-readable report; its schema
  (``"llmc-parity/run/1"``) is described field by field in ``docs/report-schema.md``.
* :func:`plot` -- a PNG showing where drift starts and how it grows (needs matplotlib).
* :func:`worst_per_op_table` -- the pytest plugin's end-of-session table.

Nothing here writes over an existing file unless asked to (``overwrite=True``), and files
are written atomically (a temporary file in the same folder, then renamed into place).
"""
from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from pyref.formats import write_atomic

from .compare import Comparison, json_float

SCHEMA = "llmc-parity/run/1"

#: Order of the kinds of check in tables and counts.
KINDS = ("e2e", "replay", "update", "loss")

_LAYER_RE = re.compile(r"^(?P<base>.*?)\[layer (?P<layer>\d+)\](?P<rest>.*)$")
_WHERE_LAYER_RE = re.compile(r"^layer (\d+) ")


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


def split_layer(tensor: str) -> tuple[str, int | None]:
    """``"acts.ln1[layer 3]"`` -> ``("acts.ln1", 3)``; tensors without a layer -> (tensor, None)."""
    m = _LAYER_RE.match(tensor)
    if m is None:
        return tensor, None
    return m["base"] + m["rest"], int(m["layer"])


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
    rows: list[tuple[str, ...]] = []

    def row(c, tensor: str, status: str) -> tuple[str, ...]:
        cmp = c.comparison
        return (str(step.step), c.impl, c.kind, tensor, _num(cmp.max_rel), _num(cmp.tol.rel),
                _num(cmp.norm_rel), _num(cmp.tol.norm),
                cmp.worst_label if cmp.worst_index is not None else "-", status)

    n_ok = n_fail = 0
    for impl in impls:
        mine = [c for c in checks if c.impl == impl]
        n_fail += sum(not c.passed for c in mine)
        n_ok += sum(c.passed for c in mine)
        # groups keyed by (kind, tensor or tensor-without-layer), in first-seen order
        groups: dict[tuple[str, str], list] = {}
        order: list[str] = []
        for c in mine:
            if verbose:
                key = c.tensor
            elif c.kind == "update":      # "params.wte (after update)" -> "params"
                key = c.tensor.split(".", 1)[0]
            else:
                key = split_layer(c.tensor)[0]
            if c.kind in ("e2e", "replay") and key not in order:
                order.append(key)
            groups.setdefault((c.kind, key), []).append(c)
        keys = [(k, t) for t in order for k in ("e2e", "replay") if (k, t) in groups]
        keys += [(k, t) for (k, t) in groups if k not in ("e2e", "replay")]
        keys.sort(key=lambda kt: KINDS.index(kt[0]) if kt[0] in ("update", "loss") else -1)
        for key in keys:
            group = groups[key]
            if len(group) == 1:
                c = group[0]
                rows.append(row(c, c.tensor, "OK" if c.passed else "FAIL"))
                continue
            w = max(group, key=_severity)
            base, layer = split_layer(w.tensor)
            failed = sum(not c.passed for c in group)
            label = (f"{base} [layer {layer} of {len(group)}]" if layer is not None and key[0] != "update"
                     else f"{w.tensor} [worst of {len(group)}]")
            rows.append(row(w, label, "OK" if not failed else f"FAIL {failed}/{len(group)}"))

    lines = _text_table(header, rows, right={0, 4, 5, 6, 7}) if rows else ["(no checks)"]
    lines.append(f"{n_ok} OK, {n_fail} FAIL" + ("" if verbose else
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
    from .runner import first_divergence_check
    c = first_divergence_check([c for c in step.checks if c.impl == impl])
    d = None if c is None else getattr(c, "diagnosis", None)
    return [] if d is None else [f"{indent}why: {d.text()}"]


def _strip_fd(text: str) -> str:
    """``step 1 [x] first divergence: ...`` -> ``step 1 [x] ...`` (no stutter after a heading)."""
    return text.replace("] first divergence: ", "] ", 1)


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

    lines += ["", "checks"]
    counts = _counts(report)
    rows = []
    for impl in _impl_order(counts, impls):
        for kind in _impl_order(counts.get(impl, {}), KINDS):
            d = counts.get(impl, {}).get(kind)
            if d is None:
                continue
            w = d["worst"]
            rows.append((impl, kind, str(d["checks"]), str(d["failed"]),
                         f"{_times(used(w.comparison))} tol", f"{w.tensor} (step {w.step})"))
    lines += (_text_table(("impl", "kind", "checks", "failed", "worst", "worst tensor"), rows, right={2, 3, 4})
              if rows else ["(no checks)"])

    lines.append("")
    first = report.first_divergence()
    lines.append(f"first divergence: {_strip_fd(first) if first else 'none'}")
    seen = set()
    for s in report.steps:
        for impl, text in s.first_divergence.items():
            if impl in seen:
                continue
            seen.add(impl)
            entry = f"step {s.step} [{impl}] {text}"
            if entry != first:
                lines.append(f"  also {_strip_fd(entry)}")
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
    _, layer = split_layer(c.tensor)
    return {
        "impl": c.impl,
        "kind": c.kind,
        "tensor": c.tensor,
        "layer": layer,
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


# ----------------------------------------------------------------------------
# the plot

# per-layer tensors of the heat map: the forward activations, then the activation
# gradients in the order the backward pass computes them, then the big weight gradients
_HEAT_ROWS = (
    [f"acts.{n}" for n in ("ln1", "qkv", "att", "atty", "attproj", "residual2", "ln2", "fch",
                           "fch_gelu", "fcproj", "residual3")]
    + [f"grads_acts.{n}" for n in ("residual3", "fcproj", "fch_gelu", "fch", "ln2", "residual2",
                                   "attproj", "atty", "att", "qkv", "ln1")]
    + [f"grads.{n}" for n in ("fcprojw", "fcw", "attprojw", "qkvw")]
)
_FLOOR = 1e-4          # fraction of tolerance drawn for a bit-identical tensor (log axes)


def _row_label(name: str) -> str:
    group, n = name.split(".", 1)
    return {"acts": n, "grads_acts": f"d {n}", "grads": f"d {n}"}.get(group, name)


def _positions(report) -> tuple[list[str], list[tuple[str, int | None]]]:
    """The graph positions of the e2e checks (their ``where``), in graph order, with the
    (phase, layer) of each: phase "fwd" or "bwd"."""
    order: dict[str, None] = {}
    for s in report.steps:
        for c in s.checks:
            if c.kind == "e2e":
                order.setdefault(c.where, None)
    wheres = list(order)
    info = []
    for w in wheres:
        m = _WHERE_LAYER_RE.match(w)
        info.append(("fwd" if w.endswith("_forward") else "bwd", int(m.group(1)) if m else None))
    return wheres, info


def _bands(info) -> list[tuple[int, int, str, int | None]]:
    """Runs of consecutive positions with the same (phase, layer): (start, end, phase, layer)."""
    bands = []
    start = 0
    for i in range(1, len(info) + 1):
        if i == len(info) or info[i] != info[start]:
            bands.append((start, i - 1, *info[start]))
            start = i
    return bands


def plot(report, path, *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Write a PNG of the run to ``path`` (refusing to replace a file unless
    ``overwrite=True``); returns the path.

    Top, one panel per implementation: the end-to-end error at each position of the graph
    (forward ops, then backward ops, left to right, layers shaded and numbered), as the
    fraction of its tolerance used (max over the op's tensors, log scale), one line per
    step; the dashed line at 1 is the tolerance, a vertical line marks the first divergence
    (the first op whose replay fails). Middle: heat maps, one per implementation, of the
    norm-wise relative error of the main per-layer tensors (rows: activations, activation
    gradients, weight gradients) across layers (columns), as a fraction of its tolerance
    (max over steps; blue under, white at, red over the tolerance; cells over it boxed).
    Bottom: the loss per step (C, the float64 oracle, each implementation) and its
    relative difference to the oracle, with the loss check's tolerance.

    matplotlib is imported here, not at module import, and only its Agg canvas is used
    (no pyplot, no global backend switch); without it this raises RuntimeError.
    """
    _refuse_existing(path, overwrite)       # before the (slow) drawing
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.patches import Rectangle
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise RuntimeError("plot() needs matplotlib, which is not installed: "
                           "pip install llmc-parity[plot]") from e
    import numpy as np

    impls = [i for i in report.impls]
    steps = [s.step for s in report.steps]
    wheres, info = _positions(report)
    pos = {w: i for i, w in enumerate(wheres)}
    bands = _bands(info)
    L = report.config.num_layers
    cmap = matplotlib.colormaps["viridis"]
    step_colour = {t: cmap(0.85 * (k / max(1, len(steps) - 1))) for k, t in enumerate(steps)}

    n = len(impls)
    h1, h2, h3 = 2.2 * n, 0.22 * len(_HEAT_ROWS) + 1.0, 2.8
    fig = Figure(figsize=(16, h1 + h2 + h3 + 2.2), dpi=dpi)
    FigureCanvasAgg(fig)
    H = fig.get_figheight()
    outer = fig.add_gridspec(3, 1, height_ratios=[h1, h2, h3], hspace=0.9 / ((h1 + h2 + h3) / 3),
                             left=0.065, right=0.965, top=1 - 1.05 / H, bottom=0.5 / H)
    gs1 = outer[0].subgridspec(n, 1, hspace=0.42)

    verdict = "PASS" if report.passed else "FAIL"
    title = (f"llmc-parity: {verdict} | {len(steps)} step{'s' * (len(steps) != 1)} | {_config_text(report.config)}"
             f" | B={report.B} T={report.T} | {Path(str(report.library)).name}"
             + (f" ({report.build.get('cflags')})" if report.build else ""))
    fig.suptitle(title, y=1 - 0.2 / H, fontsize=12, fontweight="bold",
                 color="black" if report.passed else "firebrick")
    first = report.first_divergence()
    if first:
        import textwrap
        fig.text(0.5, 1 - 0.48 / H, "\n".join(textwrap.wrap(_clip(first, 400), 190)), ha="center", va="top",
                 fontsize=8, color="firebrick")

    # -- panel 1: e2e error along the graph, per impl
    axes1 = []
    for k, impl in enumerate(impls):
        ax = fig.add_subplot(gs1[k], sharex=axes1[0] if axes1 else None)
        axes1.append(ax)
        _draw_bands(ax, bands, L, label=(k == 0))
        any_line = False
        nonfinite: set[int] = set()
        for s in report.steps:
            y = np.full(len(wheres), np.nan)
            for c in s.checks:
                if c.impl == impl and c.kind == "e2e":
                    i = pos[c.where]
                    u = used(c.comparison)
                    y[i] = u if np.isnan(y[i]) else max(y[i], u)
            if np.all(np.isnan(y)):
                continue
            any_line = True
            inf = np.isinf(y)
            nonfinite.update(np.flatnonzero(inf).tolist())
            yy = np.clip(np.where(inf, np.nan, y), _FLOOR, None)
            x = np.arange(len(wheres))
            ax.plot(x, yy, "-", color=step_colour[s.step], lw=1.1, alpha=0.9, marker=".", ms=2.5)
            over = y > 1
            if over.any():
                ax.plot(x[over & ~inf], yy[over & ~inf], "o", ms=3.5, mfc="none", mec="red", mew=0.8)
        if nonfinite:      # NaN/inf mismatches: off the scale, marked at the top
            xs = sorted(nonfinite)
            ax.plot(xs, [0.96] * len(xs), "^", ms=6, color="red", transform=ax.get_xaxis_transform())
            ax.text(0.995, 0.85, "▲ non-finite mismatch", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7.5, color="red")
        ax.axhline(1.0, color="red", ls="--", lw=1.0)
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, _FLOOR / 2), max(hi, 3.0))
        failed = [c for s in report.steps for c in s.checks if c.impl == impl and not c.passed]
        errored = [s.step for s in report.steps if impl in s.errors]
        status = "FAIL" if failed or errored else "PASS"
        ax.set_title(f"{impl}: end-to-end error / tolerance (worst tensor of each op)  --  {status}"
                     + (f", errors at step {', '.join(map(str, errored))}" if errored else ""),
                     fontsize=9.5, loc="left", color="firebrick" if status == "FAIL" else "black")
        ax.set_ylabel("× tolerance", fontsize=8)
        ax.tick_params(labelsize=7.5)
        if not any_line:
            ax.text(0.5, 0.5, "no end-to-end checks" + (" (the implementation raised)" if errored else ""),
                    transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="firebrick")
        # the first divergence: first failing replay op of the first failing step
        fd = _first_divergence_where(report, impl)
        if fd is not None:
            where, step = fd
            if where in pos:
                ax.axvline(pos[where], color="magenta", lw=1.4, alpha=0.8)
                ax.annotate(f"first divergence (step {step}): {where}", (pos[where], 1.0),
                            xytext=(4, 6), textcoords="offset points", fontsize=8, color="darkmagenta",
                            ha="left" if pos[where] < 0.7 * len(wheres) else "right")
            else:
                ax.text(0.99, 0.92, f"first divergence (step {step}): {where}", transform=ax.transAxes,
                        ha="right", va="top", fontsize=8, color="darkmagenta")
    if axes1:
        _xticks(axes1[-1], bands)
        for ax in axes1[:-1]:
            ax.tick_params(labelbottom=False)
        axes1[-1].set_xlabel("position in the graph: forward ops (embedding, layers 0..L-1, head), "
                             "then backward ops (head, layers L-1..0, embedding)", fontsize=8)
        shown_steps = steps if len(steps) <= 6 else [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
        handles = [Line2D([], [], color=step_colour[t], lw=1.5, label=f"step {t}") for t in shown_steps]
        handles += [Line2D([], [], color="red", ls="--", label="tolerance"),
                    Line2D([], [], color="red", marker="o", mfc="none", ls="none", label="over tolerance")]
        axes1[0].legend(handles=handles, fontsize=7.5, loc="lower right", ncol=len(handles),
                        frameon=False, bbox_to_anchor=(1.0, 1.0), borderaxespad=0.1,
                        handlelength=1.6, columnspacing=1.0)

    # -- panel 2: heat maps of the norm-wise error across layers
    present = {split_layer(c.tensor)[0] for s in report.steps for c in s.checks
               if c.kind == "e2e" and split_layer(c.tensor)[1] is not None}
    rows = [r for r in _HEAT_ROWS if r in present]
    sub = outer[1].subgridspec(1, n + 1, width_ratios=[1.0] * n + [0.04], wspace=0.06)
    heat = {}
    ridx = {r: i for i, r in enumerate(rows)}
    for impl in impls:
        val = np.full((len(rows), L), np.nan)      # log10 of norm_rel / tol.norm
        for s in report.steps:
            for c in s.checks:
                if c.impl != impl or c.kind != "e2e":
                    continue
                base, layer = split_layer(c.tensor)
                if base not in ridx or layer is None:
                    continue
                cmp = c.comparison
                r = cmp.norm_rel / cmp.tol.norm if cmp.tol.norm > 0 else (0.0 if cmp.norm_rel == 0 else math.inf)
                v = math.log10(max(r, _FLOOR)) if math.isfinite(r) else math.inf
                i = ridx[base]
                val[i, layer] = v if np.isnan(val[i, layer]) else max(val[i, layer], v)
        heat[impl] = val
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in heat.values()] or [np.array([])])
    lo = math.floor(min(float(finite.min()) if finite.size else -2.0, -1.0))
    hi = math.ceil(max(float(finite.max()) if finite.size else 1.0, 1.0))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    im = None
    hax0 = None
    for k, impl in enumerate(impls if rows else []):
        ax = fig.add_subplot(sub[0, k], sharey=hax0)
        hax0 = hax0 or ax
        val = heat[impl]
        if np.all(np.isnan(val)):
            ax.text(0.5, 0.5, "not checked\n(the implementation raised)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="firebrick")
        shown = np.where(np.isinf(val), hi, val)
        im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="RdBu_r", norm=norm,
                       interpolation="nearest")
        ax.set_facecolor("0.85")                   # not checked
        ys, xs = np.nonzero(np.nan_to_num(val, nan=-np.inf) > 0)
        for y, x in zip(ys, xs):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="black", lw=0.6))
        n_over = len(ys)
        ax.set_title(f"{impl}: norm-wise error / tolerance by layer"
                     + (f" ({n_over} over)" if n_over else ""), fontsize=9, loc="left",
                     color="firebrick" if n_over else "black")
        ax.set_xticks(range(L))
        ax.set_xticklabels([str(l) for l in range(L)], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_yticks(range(len(rows)))
        if k == 0:
            ax.set_yticklabels([_row_label(r) for r in rows], fontsize=7.5)
        else:
            ax.tick_params(labelleft=False)
        # separators between the activations, activation gradients, weight gradients
        prev = None
        for i, r in enumerate(rows):
            g = r.split(".", 1)[0]
            if prev is not None and g != prev:
                ax.axhline(i - 0.5, color="black", lw=1.2)
            prev = g
    if not rows:
        ax = fig.add_subplot(outer[1])
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-layer end-to-end checks to show", transform=ax.transAxes,
                ha="center", va="center", fontsize=10)
    if im is not None:
        cax = fig.add_subplot(sub[0, n])
        cb = fig.colorbar(im, cax=cax)
        ticks = list(range(lo, hi + 1))
        cb.set_ticks(ticks)
        cb.set_ticklabels([f"{10.0 ** t:g}" for t in ticks])
        cb.set_label("||a-e|| / ||e||  as a fraction of its tolerance (max over steps; 1 = tolerance, "
                     "boxed: over)", fontsize=7.5)
        cb.ax.tick_params(labelsize=7)

    # -- panel 3: losses
    sub = outer[2].subgridspec(1, 2, wspace=0.15)
    ax_l = fig.add_subplot(sub[0, 0])
    ax_d = fig.add_subplot(sub[0, 1])
    series = ["C", "oracle", *[i for i in impls if i != "C"]]
    styles = {"C": dict(color="black", lw=2.2, marker="o", ms=5),
              "oracle": dict(color="tab:blue", lw=1.2, ls="--", marker="s", ms=4, mfc="none")}
    others = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    threshold = []
    for j, name in enumerate(series):
        st = styles.get(name) or dict(color=others[(j - 2) % len(others)], lw=1.0, marker="^x+dv*"[(j - 2) % 6], ms=5)
        xs, ls, ds = [], [], []
        for s in report.steps:
            x = s.losses.get(name)
            if x is None:
                continue
            xs.append(s.step)
            ls.append(x)
            d = _rel_diff(x, s.losses.get("oracle"))
            ds.append(np.nan if d is None else (d if math.isfinite(d) else np.nan))
        if not xs:
            continue
        ax_l.plot(xs, ls, label=name, **st)
        if name != "oracle":
            ax_d.plot(xs, np.clip(ds, 1e-10, None), label=name, **st)
    for s in report.steps:
        for c in s.checks:
            if c.kind == "loss" and c.impl == "C":
                threshold.append((s.step, _loss_threshold(c.comparison)))
    if threshold:
        tx, ty = zip(*threshold)
        ax_d.plot(tx, ty, color="red", ls="--", lw=1.0, label="tolerance")
    ax_l.set_title("loss per step (curves that agree overlap: see the differences on the right)",
                   fontsize=9, loc="left")
    ax_l.set_xlabel("step", fontsize=8)
    if ax_l.lines:
        ax_l.legend(fontsize=7, ncol=min(6, len(series)))
    ax_l.ticklabel_format(axis="y", useOffset=False)
    ax_d.set_title("loss: relative difference to the float64 oracle", fontsize=9, loc="left")
    ax_d.set_yscale("log")
    ax_d.set_xlabel("step", fontsize=8)
    if ax_d.lines:
        ax_d.legend(fontsize=7, ncol=min(6, len(series)), loc="best")
    for ax in (ax_l, ax_d):
        ax.tick_params(labelsize=7.5)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return _write_atomic(path, buf.getvalue(), overwrite)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _loss_threshold(c: Comparison) -> float:
    """The |a-e|/|e| at which the (scalar) loss comparison fails: the element-wise bound is
    on |a-e|/(|e|+scale), the norm-wise one on |a-e|/|e| itself."""
    e = abs(c.worst_expected) if c.worst_expected is not None else 0.0
    elem = c.tol.rel * (1.0 + c.scale / e) if e > 0 else math.inf
    return min(elem, c.tol.norm)


def _first_divergence_where(report, impl: str) -> tuple[str, int] | None:
    """(where, step) of an implementation's first divergence: the first failing replay op
    of its first failing step, else the first failing check there."""
    for s in report.steps:
        mine = [c for c in s.checks if c.impl == impl and not c.passed]
        if not mine:
            continue
        for kinds in (("replay",), ("update",), ("e2e", "loss")):
            for c in mine:
                if c.kind in kinds:
                    return c.where, s.step
    return None


def _draw_bands(ax, bands, L: int, label: bool) -> None:
    """Shade alternate layers, mark the forward/backward boundary."""
    for start, end, phase, layer in bands:
        if layer is not None and layer % 2 == 0:
            ax.axvspan(start - 0.5, end + 0.5, color="0.92", lw=0, zorder=0)
        elif layer is None:
            ax.axvspan(start - 0.5, end + 0.5, color="#e6eef8", lw=0, zorder=0)
    for (s0, e0, p0, _), (s1, _e1, p1, _l1) in zip(bands, bands[1:]):
        if p0 != p1:
            ax.axvline(s1 - 0.5, color="0.3", lw=1.6, zorder=1)
            if label:
                ax.text(s1 - 1, 1.02, "forward ←", transform=ax.get_xaxis_transform(), ha="right",
                        va="bottom", fontsize=7.5, color="0.3")
                ax.text(s1, 1.02, "→ backward", transform=ax.get_xaxis_transform(), ha="left",
                        va="bottom", fontsize=7.5, color="0.3")
    ax.grid(axis="y", alpha=0.3, which="major")


def _xticks(ax, bands) -> None:
    """A tick per layer band, numbered; "emb" and "head" for the bands outside the layers
    (the forward and the backward head bands, adjacent, share one "head" tick)."""
    ticks, labels = [], []
    last = len(bands) - 1
    for k, (start, end, phase, layer) in enumerate(bands):
        if layer is not None:
            ticks.append((start + end) / 2)
            labels.append(str(layer))
        elif k == 0 or k == last:
            ticks.append((start + end) / 2)
            labels.append("emb")
        elif phase == "fwd" and k + 1 <= last and bands[k + 1][3] is None and bands[k + 1][2] == "bwd":
            ticks.append(bands[k + 1][0] - 0.5)
            labels.append("head")
        elif phase == "bwd" and k > 0 and bands[k - 1][3] is None and bands[k - 1][2] == "fwd":
            continue
        else:
            ticks.append((start + end) / 2)
            labels.append("head")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    if bands:
        ax.set_xlim(-0.5, bands[-1][1] + 0.5)
