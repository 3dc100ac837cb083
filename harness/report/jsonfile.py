"""The machine-readable report of a run: :func:`to_json` (plain JSON-safe data) and
:func:`write_json` (written atomically, never over an existing file unless asked to). The
schema, ``"llmc-parity/run/1"``, is described field by field in ``docs/report-schema.md``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pyref.formats import refuse_existing, write_atomic

from ..checks.results import KINDS
from ..arbiter.compare import json_float
from .text import check_counts, impl_order

SCHEMA = "llmc-parity/run/1"


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


def _finding_json(f) -> dict:
    """A finding (:class:`harness.ports.census.Finding`) as data; a plain line as its text."""
    if hasattr(f, "to_json"):
        return f.to_json()
    return {"id": None, "family": None, "description": str(f), "module": None, "where": None, "values": {},
            "text": str(f)}


def _check_json(c) -> dict[str, Any]:
    row = c.comparison.summary_row()
    # the precision it was judged at, where not float32 (a mixed-precision port's op): last,
    # and absent at float32 (a float32 run's document is as it was)
    judged = {} if c.precision is None else {"precision": c.precision.label, "precision_detail": c.precision.detail}
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
        "used": json_float(c.comparison.used),
        "bias": row["bias"],
        "bias_z": row["bias_z"],
        "bias_form": row["bias_form"],
        "bias_stats": None if row["bias_groups"] is None else {
            "scale": row["bias_scale"], "scale_se": row["bias_scale_se"],
            "shift": row["bias_shift"], "shift_se": row["bias_shift_se"],
            "groups": row["bias_groups"], "t": json_float(c.comparison.bias_stats.t),
        },
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
        "tol": {"rel": row["tol_rel"], "norm": row["tol_norm"], "ulp": row["tol_ulp"], "bias": row["tol_bias"],
                "why": row["tol_why"]},
        "diagnosis": None if getattr(c, "diagnosis", None) is None else c.diagnosis.to_json(),
        "pin": None if getattr(c, "pin", None) is None else c.pin.to_json(),
        **judged,
    }


def to_json(report, *, versions: bool = True) -> dict[str, Any]:
    """The report as plain JSON-safe data (``json.dumps(..., allow_nan=False)`` works):
    schema ``"llmc-parity/run/1"``, described in ``docs/report-schema.md``.

    Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"``. ``versions=False``
    leaves ``versions`` null (for output that does not depend on the machine)."""
    build = report.build
    raw = check_counts(report)
    counts = {impl: {kind: {"checks": raw[impl][kind]["checks"], "failed": raw[impl][kind]["failed"]}
                     for kind in impl_order(raw[impl], KINDS) if kind in raw[impl]}
              for impl in impl_order(raw, report.impls) if impl in raw}
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
            "structure": {str(k): [_finding_json(f) for f in v] for k, v in getattr(s, "structure", {}).items()},
            "checks": [_check_json(c) for c in s.checks],
        } for s in report.steps],
        "not_checked": {str(k): [str(x) for x in v] for k, v in report.not_checked.items()},
        # torch models (--model): hygiene findings, and C tensors the model does not show
        "findings": {str(k): [str(x) for x in v] for k, v in getattr(report, "findings", {}).items()},
        # the same as data: id, family, description, module, where (the graph's op), values
        "finding_details": {str(k): [_finding_json(x) for x in v] for k, v in getattr(report, "findings", {}).items()},
        "not_observed": {str(k): [str(x) for x in v] for k, v in getattr(report, "not_observed", {}).items()},
        "derived": {str(k): [str(x) for x in v] for k, v in getattr(report, "derived", {}).items()},
        "free_run": [{"step": int(r.step), "impl": str(r.impl), "passed": bool(r.passed), "error": r.error,
                      **{k: json_float(getattr(r, k)) for k in ("loss", "oracle_loss", "loss_rel", "loss_bound",
                                                                 "param_norm_rel", "param_bound")}}
                     for r in getattr(report, "free_run", [])],
        "debug_state": _debug_state_json(getattr(report, "debug_state", None)),
    }
    return _plain(out)


def _debug_state_json(ds) -> dict[str, Any] | None:
    """llm.c's debug-state check (harness.checks.debugstate.DebugStateReport) as data;
    None where the run had none."""
    if ds is None:
        return None
    return {"path": str(ds.path), "B": int(ds.B), "T": int(ds.T), "passed": bool(ds.passed),
            "losses": {"C": json_float(ds.c_loss), "debug_state": json_float(ds.expected_loss),
                       "oracle": json_float(ds.oracle_loss)},
            "tensors": [{"tensor": r.tensor, "passed": bool(r.passed), "max_rel": json_float(r.vs_expected.max_rel),
                         "tol_rel": json_float(r.vs_expected.tol.rel), "norm_rel": json_float(r.vs_expected.norm_rel),
                         "tol_norm": json_float(r.vs_expected.tol.norm),
                         "c_vs_oracle": json_float(r.c_vs_oracle.norm_rel),
                         "debug_state_vs_oracle": json_float(r.expected_vs_oracle.norm_rel), "closer": r.closer}
                        for r in ds.rows]}


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


def write_json(report, path, *, overwrite: bool = False, versions: bool = True,
               indent: int | None = None) -> Path:
    """Write :func:`to_json` to ``path`` (strict JSON, UTF-8), atomically. Refuses to
    replace an existing file (FileExistsError) unless ``overwrite=True``. Returns the path."""
    refuse_existing(path, overwrite)
    text = json.dumps(to_json(report, versions=versions), allow_nan=False, indent=indent, ensure_ascii=False)
    write_atomic(path, [(text + "\n").encode("utf-8")], overwrite)
    return Path(path)
