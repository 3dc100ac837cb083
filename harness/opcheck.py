"""Per-op checks: one kernel of one implementation against the float64 oracle.

``check_kernel(impl, "layernorm_forward", args, shape)`` runs the implementation (the C
through :class:`~harness.ckernels.CKernels`, NumPy, torch or a user's port) and the oracle
on the same float32 inputs and compares every output under the per-op tolerance of
:mod:`harness.tolerances`. The result is a list of :class:`~harness.compare.Comparison`,
named ``<kernel>.<output>``. A failing one is a
:class:`~harness.diagnose.DiagnosedComparison`: it also says which catalogued change of
semantics (if any) explains the implementation's output (:mod:`harness.diagnose`);
passing ones cost no diagnosis.
"""
from __future__ import annotations

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import KernelSet

from .compare import Comparison, ParityError, compare
from .diagnose import Call, attach, diagnose
from .ops import CHECK_BY_KERNEL, Shape, reduction_length, run_kernel
from pyref.protocol import INPLACE_ARGS

from .tolerances import op_tolerance, term_magnitude

ORACLE = KernelSet.from_module(numpy_kernels)


def oracle_outputs(kernel: str, args: dict) -> dict[str, np.ndarray]:
    return run_kernel(ORACLE, kernel, args, np.float64)


def check_kernel(impl, kernel: str, args: dict, shape: Shape, expected=None,
                 label: str = "") -> list[Comparison]:
    """Compare ``impl.<kernel>`` on ``args`` with the oracle; ``expected`` may pass
    precomputed oracle outputs (to share them between implementations)."""
    check = CHECK_BY_KERNEL[kernel]
    if kernel == "attention_backward" and kernel in getattr(impl, "derived", ()):
        # derived by autograd, it recomputes att from inp: check it where att is inp's own
        args = dict(args, att=oracle_outputs("attention_forward", {"inp": args["inp"], "NH": args["NH"]})
                    ["att"].astype(args["att"].dtype))
        expected = None
    expected = oracle_outputs(kernel, args) if expected is None else expected
    try:
        actual = run_kernel(impl, kernel, args, np.float32)
    except Exception as e:
        e.add_note(f"raised by {kernel} of {label or getattr(impl, 'name', impl)}")
        raise
    out = []
    for name in check.outputs:
        if name not in expected or (kernel, name) in getattr(impl, "not_returned", ()):
            continue   # not computed by the implementation (e.g. attention without att)
        if name not in actual:
            raise ValueError(f"{kernel} of {label or impl} produced no {name!r}")
        a = actual[name]
        if a.shape != expected[name].shape:
            raise ValueError(f"{kernel}.{name}: {label or impl} gave shape {a.shape}, "
                             f"expected {expected[name].shape}")
        n = reduction_length(check, name, shape)
        how = dict(name=f"{kernel}.{name}" + (f" [{label}]" if label else ""),
                   tol=op_tolerance(kernel, name, n, a.size), axes=check.axes.get(name),
                   mask=check.mask(name, shape), elem_scale=_elem_scale(kernel, name, args, expected))
        c = compare(a, expected[name], **how)
        if not c.passed:
            c = attach(c, diagnose(Call(kernel, name, args), a, expected[name], **how))
        out.append(c)
    return out


def _elem_scale(kernel: str, output: str, args: dict, expected: dict):
    """Sum |term| of each element: the kernel's own terms, plus the value a backward
    kernel's gradient buffer held before it accumulated into it."""
    mag = term_magnitude(kernel, output, _as64(args), expected)
    if output in INPLACE_ARGS.get(kernel, ()) and kernel != "adamw":
        start = np.abs(np.asarray(args[output], np.float64))
        mag = start if mag is None else mag + start
    return mag


def _as64(args: dict) -> dict:
    return {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in args.items()}


def assert_kernel(impl, kernel: str, args: dict, shape: Shape, **kw) -> list[Comparison]:
    """:func:`check_kernel`, raising :class:`ParityError` on the first failing output."""
    results = check_kernel(impl, kernel, args, shape, **kw)
    for c in results:
        if not c.passed:
            raise ParityError(c)
    return results
