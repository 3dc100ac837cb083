"""llmc-parity: proof that a Python port of llm.c's ``train_gpt2.c``, or a changed copy of
that C, computes the same numbers as the C reference (docs/architecture.md draws the
layers).

The public entry points are the names below, importable from ``harness`` itself, and two
modules whose every public name is API: :mod:`harness.arbiter.compare` (the comparison engine:
``compare``, ``Tolerance``, ``Comparison``) and :mod:`harness.probe` (listeners that time
or inspect a run). The subpackages' modules are how these are built; code outside the
package should not need them.

Importing ``harness`` imports nothing else: each name loads its module on first use (the
build runs before any virtual environment exists, with the standard library only).
"""
from __future__ import annotations

import importlib

# module -> the names of the public API it provides
_API = {
    "harness.errors": ("InputError", "ModelError"),
    "harness.clib.build": ("build_library", "ensure_library", "BuildError"),
    "harness.clib.library": ("load_library", "Library", "LibraryError", "LlmcInputError"),
    "harness.clib.cmodel": ("CModel",),
    "harness.clib.kernels": ("CKernels",),
    "harness.arbiter.compare": ("compare", "Tolerance", "Comparison", "ParityError"),
    "harness.arbiter.oracle": ("ORACLE", "Witness", "oracle_outputs", "witness_spread"),
    "harness.arbiter.tolerances": ("op_tolerance", "e2e_tolerance"),
    "harness.ports": ("load_kernels", "load_model", "load_object", "KernelLoadError", "TorchModel",
                      "ModelState", "Hyper", "map_parameters"),
    "harness.checks.perop": ("check_kernel", "check_outputs", "assert_kernel", "assert_case", "case_id",
                             "cases", "make_inputs", "sweep"),
    "harness.checks.verdict": ("judge",),
    "harness.checks.update": ("check_update",),
    "harness.checks.run": ("run_parity",),
    "harness.checks.results": ("Check", "StepReport", "RunReport", "KINDS", "first_divergence",
                               "first_divergence_check"),
    "harness.checks.freerun": ("free_run", "FreeRunRow"),
    "harness.checks.debugstate": ("check_debug_state",),
    "harness.checks.modelstate": ("CheckedState", "Reference"),
    "harness.diagnosis": ("diagnose", "Diagnosis", "DiagnosedComparison", "Variant", "CATALOGUE",
                          "VARIANT_BY_ID"),
    "harness.report": ("step_table", "run_summary", "model_notes", "format_table", "worst_per_op_table",
                       "free_run_table", "debug_state_table", "text_table", "markdown_table", "to_json",
                       "write_json", "plot"),
    "harness.gate": ("run_suite", "evaluate", "load_baseline", "write_baseline", "default_baseline"),
    "pyref.config": ("AdamW", "GPT2Config"),
}
_HOME = {name: module for module, names in _API.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
