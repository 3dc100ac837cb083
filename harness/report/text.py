"""Text reports: what a person reads in the terminal.

* :func:`step_table` -- one step: a row per checked tensor, implementation and kind
  (per-layer tensors folded to their worst layer unless ``verbose``), the losses, and on
  failure the first divergence and errors.
* :func:`run_summary` -- the summary of a whole run, ending in its verdict
  (:func:`verdict_line`); :func:`model_notes`, what it says of torch models before the numbers.
* :func:`format_table` -- comparisons, one line each (the per-op checks);
  :func:`worst_per_op_table` -- the pytest plugin's end-of-session table;
  :func:`free_run_table`, :func:`debug_state_table` -- a free run's and a debug state's.

Every table is drawn by :mod:`.table`.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Iterable, Sequence

from pyref.protocol import KERNEL_OP

from ..checks.results import KINDS, first_divergence, first_divergence_check, first_structure
from ..arbiter.compare import Comparison
from ..arbiter.tolerances import P_FALSE_ALARM, false_alarm_bound
from .table import text_table




# ----------------------------------------------------------------------------
# helpers shared by the reports

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


def _bias(cmp) -> str:
    """The bias cell of a table: the mean signed error, relative, and its z-score, with a
    ``!`` where the check fails on it (``+4.8e-07 z=35!``); ``-`` where there is none."""
    b = cmp.bias
    if b is None:
        return "-"
    z = cmp.bias_z
    text = _num(b) if b == 0 else f"{b:+.1e}"
    text += "" if z is None else f" z={z:.2g}" if abs(z) < 100 else f" z={z:.0e}" if math.isfinite(z) else " z=inf"
    return text + ("!" if "bias" in cmp.failed_checks() else "")


def _severity(c) -> tuple[bool, float]:
    """Sort key of a Comparison or a Check: failing first, then by the fraction of
    tolerance used."""
    c = getattr(c, "comparison", c)
    return (not c.passed, c.used)



def impl_order(names: Iterable[str], preferred: Iterable[str] = ()) -> list[str]:
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


def rel_diff(a: float | None, e: float | None) -> float | None:
    if a is None or e is None:
        return None
    if e == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - e) / abs(e)


# ----------------------------------------------------------------------------
# the per-step table and the summary

def _impl_rows(step: int, mine: list, verbose: bool) -> list[tuple[str, ...]]:
    """One implementation's rows of the step table: grouped by (kind, tensor without its
    layer; the buffer for update checks) in graph order, each group folded to its worst
    check unless ``verbose``."""
    def row(c, tensor: str, status: str) -> tuple[str, ...]:
        cmp = c.comparison
        return (str(step), c.impl, c.kind, tensor, _num(cmp.max_rel), _num(cmp.tol.rel),
                _num(cmp.norm_rel), _num(cmp.tol.norm), _bias(cmp),
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
    """The text table of one :class:`~harness.checks.results.StepReport`.

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

    The ``bias`` column is the mean signed error, relative (a constant factor ``1 + bias``
    or an offset that explains it, :attr:`harness.arbiter.compare.Comparison.bias`), with its
    z-score; a ``!`` marks a check that fails on it.

    ``impl_filter``: None (all), an implementation's name, a collection of names, or a
    predicate on the name. After the table: the losses (the oracle's and each
    implementation's, with the relative difference), and, when the step failed, the first
    divergence of each implementation and the errors.
    """
    want = _wanted(impl_filter)
    checks = [c for c in step.checks if want(c.impl)]
    impls = impl_order((c.impl for c in checks), ["C"] if any(c.impl == "C" for c in checks) else [])
    header = ("step", "impl", "kind", "tensor", "max rel", "tol rel", "norm rel", "tol norm", "bias",
              "worst at", "OK/FAIL")
    rows = [row for impl in impls for row in _impl_rows(step.step, [c for c in checks if c.impl == impl], verbose)]
    n_fail = sum(not c.passed for c in checks)
    lines = text_table(header, rows, right={0, 4, 5, 6, 7, 8}) if rows else ["(no checks)"]
    lines.append(f"{len(checks) - n_fail} OK, {n_fail} FAIL" + ("" if verbose else
                 "  (folded: the worst layer of each per-layer tensor, the worst tensor of each "
                 "AdamW buffer; verbose=True shows every row)"))
    oracle = step.losses.get("oracle")
    parts = [f"oracle {_loss_text(oracle)}"] if oracle is not None else []
    for impl in impl_order(step.losses, ["C"]):
        if impl == "oracle" or impl not in step.losses or not want(impl):
            continue
        x = step.losses[impl]
        d = rel_diff(x, oracle)
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


def config_text(cfg) -> str:
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


def check_counts(report) -> dict[str, dict[str, dict[str, Any]]]:
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
    """The diagnosis of ``impl``'s first divergence in ``step`` (:mod:`harness.diagnosis`),
    as a line to print under it; none when that check was not diagnosed. A model that
    departs from the graph: the census's other findings of the step (what else departs)."""
    structure = getattr(step, "structure", {}).get(impl)
    check = first_divergence_check([c for c in step.checks if c.impl == impl])
    first = first_structure(structure, check)
    if first is not None:
        # what else departs around the same module (its block), the rest counted
        parent = (first.module or "").rpartition(".")[0]
        others = [f for f in structure if f is not first]
        near = [f for f in others if parent and (f.module or "").startswith(parent + ".")][:3]
        rest = len(others) - len(near)
        if not others:
            return []
        return [f"{indent}why: the forward departs from GPT-2's graph"
                + (": " + "; ".join(f.text() for f in near) if near else "")
                + (f" (and {rest} more finding{'s' if rest > 1 else ''} above)" if rest else "")]
    return cause_lines(check, indent)


def cause_lines(check, indent: str = "") -> list[str]:
    """The diagnosis of a failed check (:mod:`harness.diagnosis`) as the reports print it
    under its first divergence, ``why: ...``; none when the check (or None) was not
    diagnosed. The pytest plugin's message of a failed op says it too."""
    d = None if check is None else getattr(check, "diagnosis", None)
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
    counts = check_counts(report)
    rows = []
    for impl in impl_order(counts, report.impls):
        for kind in impl_order(counts.get(impl, {}), KINDS):
            d = counts.get(impl, {}).get(kind)
            if d is None:
                continue
            w = d["worst"]
            rows.append((impl, kind, str(d["checks"]), str(d["failed"]),
                         f"{_times(w.comparison.used)} tol", f"{w.tensor} (step {w.step})"))
    return (text_table(("impl", "kind", "checks", "failed", "worst", "worst tensor"), rows, right={2, 3, 4})
            if rows else ["(no checks)"])


def verdict_line(report) -> str:
    """The run's verdict in one line, read from :attr:`RunReport.passed` and what failed
    (:meth:`RunReport.failed_parts`): ``llmc-parity: PASS``, or ``llmc-parity: FAIL (...)``
    naming the failed steps, the free run, the debug state. The text report ends with it."""
    parts = report.failed_parts()
    if not parts:
        return "llmc-parity: PASS"
    if not report.steps:
        return "llmc-parity: FAIL (no steps were run)"
    said = []
    for part in parts:
        if part == "steps":
            failed = [s.step for s in report.steps if not s.passed]
            said.append(f"{len(failed)} of {len(report.steps)} steps failed")
        else:
            said.append(f"the {part} failed")
    return f"llmc-parity: FAIL ({'; '.join(said)})"


def _loss_rows(report, verbose: bool) -> list[tuple[str, ...]]:
    """The loss trajectory's rows: every step (``verbose``), else the first, the last and
    every failed step, a ``...`` row where steps are left out."""
    impls = [i for i in report.impls if i != "C"]
    keep = {s.step for s in report.steps if verbose or not s.passed}
    keep |= {report.steps[0].step, report.steps[-1].step} if report.steps else set()
    rows, last = [], None
    for s in report.steps:
        if s.step not in keep:
            continue
        if last is not None and s.step > last + 1:
            rows.append(("...",) + ("",) * (len(impls) + 3))
        get = s.losses.get
        rows.append((str(s.step), _loss_text(get("C")), _loss_text(get("oracle")),
                     *[_loss_text(get(i)) for i in impls], _num(rel_diff(get("C"), get("oracle")))))
        last = s.step
    return rows


def run_summary(report, verbose: bool = False) -> str:
    """The summary of a :class:`~harness.checks.results.RunReport`: what ran, the loss
    trajectory (its first, last and failed steps; every step when ``verbose``), checks and
    failures per implementation and kind, the first divergence, the kernels not checked,
    the library and its build; its last line is the verdict (:func:`verdict_line`)."""
    impls = list(report.impls)
    lines = [f"steps: {len(report.steps)}   impls: {', '.join(impls)}   config: {config_text(report.config)}"
             f"   batch: B={report.B} T={report.T}",
             "AdamW: " + " ".join(f"{k}={v:g}" for k, v in asdict(report.hyper).items()),
             "", "loss trajectory"]
    header = ("step", "C loss", "oracle loss", *[f"{i} loss" for i in impls if i != "C"], "C vs oracle")
    rows = _loss_rows(report, verbose)
    lines += text_table(header, rows, right=set(range(len(header)))) if rows else ["(no steps)"]

    lines += ["", "checks"] + _checks_table(report)
    lines += [false_alarm_text(sum(len(s.checks) for s in report.steps)), ""]

    lines += divergence_lines(report)

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
    lines += _precision_lines(report)
    lines.append(verdict_line(report))
    return "\n".join(lines)


def divergence_lines(report) -> list[str]:
    """What the summary says of where a run went wrong: ``first divergence: step N [impl]
    ...`` (or ``none``) with its cause (``why: ...``), each other implementation's first
    divergence (``also ...``) with its cause, and every error. The pytest plugin's message
    of a failed end-to-end test is these lines."""
    first = report.first_divergence(heading=False)
    lines = [f"first divergence: {first or 'none'}"]
    seen = set()
    for s in report.steps:
        for impl, text in s.first_divergence.items():
            if impl in seen:
                continue
            seen.add(impl)
            entry = f"step {s.step} [{impl}] " + (first_divergence([c for c in s.checks if c.impl == impl], False,
                                                                    s.structure.get(impl)) or text)
            if entry != first:
                lines.append(f"  also {entry}")
            lines += _why(s, impl, "    " if entry != first else "  ")
    for s in report.steps:
        lines += [f"error: step {s.step} [{impl}] {text}" for impl, text in s.errors.items()]
    return lines


def _precision_lines(report) -> list[str]:
    """At the end: the precision each implementation's checks were judged at, where any
    was judged below float32 (a mixed-precision port: Check.precision)."""
    counts: dict[str, dict[str, int]] = {}
    for s in report.steps:
        for c in s.checks:
            if getattr(c, "precision", None) is not None:
                counts.setdefault(c.impl, {})
                counts[c.impl][c.precision.label] = counts[c.impl].get(c.precision.label, 0) + 1
    out = []
    for impl, by in counts.items():
        total = sum(1 for s in report.steps for c in s.checks if c.impl == impl)
        rest = total - sum(by.values())
        out.append(f"judged at: {impl}: " + ", ".join(f"{n} checks at {label}" for label, n in by.items())
                   + f", {rest} at float32 (each op at the precision it ran in)")
    return out


def false_alarm_text(checks: int) -> str:
    """What the bounds promise a run of ``checks`` checks (harness.arbiter.tolerances: each of a
    check's criteria is built for P_FALSE_ALARM)."""
    return (f"bounds built for a false-alarm probability of {P_FALSE_ALARM:g} each: at most "
            f"{false_alarm_bound(checks):.1g} for this run's {checks} checks")


# ----------------------------------------------------------------------------
# other tables

def format_table(rows: Sequence[Comparison], title: str | None = None) -> str:
    """A fixed-width text table of comparisons, one line per tensor, with a verdict."""
    header = ("tensor", "max rel", "tol rel", "norm rel", "tol norm", "bias", "max ulp", "tol ulp",
              "bad/total", "worst at", "verdict")
    right = {1, 2, 3, 4, 5, 6, 7, 8}
    body = []
    for c in rows:
        bad = f"{c.n_bad}/{c.n_compared}"
        if c.n_nonfinite_mismatch:
            bad += f" ({c.n_nonfinite_mismatch} non-finite)"
        body.append((
            c.name, _num(c.max_rel), _num(c.tol.rel), _num(c.norm_rel),
            _num(c.tol.norm), _bias(c), str(c.max_ulp), "-" if c.tol.ulp is None else str(c.tol.ulp),
            bad, c.worst_label if c.worst_index is not None else "-",
            "OK" if c.passed else "FAIL",
        ))
    out = ([] if title is None else [title]) + text_table(header, body, right)
    n_fail = sum(not c.passed for c in rows)
    out.append(f"{len(rows) - n_fail} OK, {n_fail} FAIL")
    return "\n".join(out)


def worst_per_op_table(records: list[Comparison]) -> str:
    """One row per op: how many comparisons, how many failed, the worst one."""
    groups: dict[str, list[Comparison]] = {}
    for c in records:
        kernel = c.name.split(".", 1)[0]
        groups.setdefault(KERNEL_OP.get(kernel, kernel), []).append(c)
    rows = []
    for op in sorted(groups):
        cs = groups[op]
        w = max(cs, key=lambda c: c.used)
        rows.append((op, str(len(cs)), str(sum(not c.passed for c in cs)), w.name[:39], f"{w.max_rel:.2e}",
                     f"{w.tol.rel:.2e}", f"{w.norm_rel:.2e}", f"{w.used:.0%}"))
    return "\n".join(text_table(("op", "checks", "failed", "worst tensor", "max rel", "tol rel", "norm rel", "used"),
                                rows, right={1, 2, 4, 5, 6, 7}))


def free_run_table(rows, verbose: bool = True) -> str:
    """A free run (:func:`harness.checks.freerun.free_run`), per step and implementation:
    loss and parameter divergence from the oracle's own run, against the witness bound.
    Not ``verbose``: each implementation's last step and every failed row."""
    last = {r.impl: r.step for r in rows}
    shown = [r for r in rows if verbose or not r.passed or r.step == last[r.impl]]
    body = [(str(r.step), r.impl, f"{r.loss:.7f}", f"{r.loss_rel:.2g}", f"{r.loss_bound:.2g}",
             f"{r.param_norm_rel:.2g}", f"{r.param_bound:.2g}",
             "ok" if r.passed else ("ERROR " + r.error if r.error else "FAIL")) for r in shown]
    failed = sum(not r.passed for r in rows)
    return "\n".join(["free run: each implementation on its own state, against the float64 oracle's own run",
                      *text_table(("step", "impl", "loss", "loss rel", "bound", "params rel", "bound", "verdict"),
                                  body, right={0, 2, 3, 4, 5, 6}),
                      f"free run: {'PASS' if not failed else 'FAIL'} ({len(rows) - failed} of {len(rows)} rows ok"
                      + ("" if len(shown) == len(rows) else "; the last step of each and failed rows shown, "
                         "-v every step") + ")"])


def debug_state_table(report, verbose: bool = True) -> str:
    """llm.c's debug-state check (:func:`harness.checks.debugstate.check_debug_state`): the
    C against the debug state, tensor by tensor, and which of the two is closer to exact.
    Not ``verbose``: the failed tensors, or where none failed, the one that came closest
    to its tolerance."""
    worst = max(report.rows, key=lambda r: (not r.passed, r.vs_expected.used), default=None)
    shown = [r for r in report.rows if verbose or not r.passed or (report.passed and r is worst)]
    rows, notes = [], []
    for r in shown:
        c = r.vs_expected
        rows.append((r.tensor, f"{c.max_rel:.2e}", f"{c.tol.rel:.2e}", f"{c.norm_rel:.2e}", f"{c.tol.norm:.2e}",
                     r.closer, "OK" if c.passed else "FAIL"))
        if not c.passed:
            notes.append("    " + c.message().replace("\n", "\n    "))
    failed = sum(not r.passed for r in report.rows)
    lines = [f"debug state {report.path}: B={report.B} T={report.T}",
             f"loss: C {report.c_loss:.6f}, debug state {report.expected_loss:.6f}, oracle {report.oracle_loss:.6f}",
             *text_table(("tensor", "max rel", "tol rel", "norm rel", "tol norm", "closer to oracle", "verdict"),
                         rows, right={1, 2, 3, 4}), *notes,
             f"debug state: {'PASS' if report.passed else 'FAIL'} ({len(report.rows) - failed} of {len(report.rows)} "
             "tensors OK" + ("" if len(shown) == len(report.rows) else
                             f"; {'the closest to its tolerance' if report.passed else 'the failed'} shown, "
                             "-v every tensor") + ")"]
    return "\n".join(lines)
