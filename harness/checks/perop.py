"""The op table and the per-op checks: one kernel call of one implementation against the
float64 oracle, on every case shape of :mod:`pyref.cases`, for every row of
:mod:`pyref.spec`.

``check_kernel(impl, "layernorm_forward", args)`` runs the implementation (the C through
:class:`~harness.clib.kernels.CKernels`, NumPy, torch or a user's port) and the oracle on
the same float32 inputs and judges every output (:func:`.verdict.judge`). The result is a
list of :class:`~harness.arbiter.compare.Comparison`, named ``<kernel>.<output>``; a failing one
is a :class:`~harness.diagnosis.DiagnosedComparison`. :func:`sweep` runs the whole table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyref.cases import SHAPE_BY_NAME, SHAPES, Shape
from pyref.protocol import run_kernel
from pyref.spec import SPEC, SPECS, KernelSpec

from ..arbiter.compare import Comparison, ParityError
from ..arbiter.oracle import oracle_outputs
from .verdict import call_scale, judge


def cases():
    """Every (KernelSpec, Shape) pair of the table."""
    for spec in SPECS:
        for s in SHAPES:
            if spec.shapes is None or s.name in spec.shapes:
                yield spec, s


def make_inputs(spec: KernelSpec, s: Shape, seed: int = 0) -> dict:
    """The case's float32 / int32 inputs, the same for every implementation."""
    rng = np.random.default_rng([seed, SHAPES.index(s), SPECS.index(spec)])
    return spec.make(s, rng)


def check_outputs(impl, kernel: str, args: dict, expected=None, label: str = "") -> dict[str, Comparison]:
    """Each output of ``impl.<kernel>`` on ``args`` judged against the oracle, by output
    name; ``expected`` may pass precomputed oracle outputs (to share them between
    implementations). Outputs the implementation does not compute are left out."""
    spec = SPEC[kernel]
    if kernel == "attention_backward" and kernel in getattr(impl, "derived", ()):
        # derived by autograd, it recomputes att from inp: check it where att is inp's own
        args = dict(args, att=oracle_outputs("attention_forward", {"inp": args["inp"], "NH": args["NH"]})
                    ["att"].astype(args["att"].dtype))
        expected = None
    expected = oracle_outputs(kernel, args) if expected is None else expected
    who = label or getattr(impl, "name", impl)
    try:
        actual = run_kernel(impl, kernel, args, np.float32)
    except Exception as e:
        e.add_note(f"raised by {kernel} of {who}")
        raise
    out = {}
    for name in spec.output_names:
        if name not in expected or (kernel, name) in getattr(impl, "not_returned", ()):
            continue   # not computed by the implementation (e.g. attention without att)
        if name not in actual:
            raise ValueError(f"{kernel} of {who} produced no {name!r}")
        a = actual[name]
        if a.shape != expected[name].shape:
            raise ValueError(f"{kernel}.{name}: {who} gave shape {a.shape}, expected {expected[name].shape}")
        out[name] = judge(kernel, name, a, expected[name], args,
                          name=f"{kernel}.{name}" + (f" [{label}]" if label else ""),
                          elem_scale=call_scale(kernel, name, args, expected))
    return out


def check_kernel(impl, kernel: str, args: dict, expected=None, label: str = "") -> list[Comparison]:
    """:func:`check_outputs` as a list, in the kernel's output order."""
    return list(check_outputs(impl, kernel, args, expected, label).values())


def assert_kernel(impl, kernel: str, args: dict, **kw) -> list[Comparison]:
    """:func:`check_kernel`, raising :class:`ParityError` on the first failing output."""
    results = check_kernel(impl, kernel, args, **kw)
    for c in results:
        if not c.passed:
            raise ParityError(c)
    return results


@dataclass
class Case:
    """One case of the per-op sweep: a kernel on a shape and seed, and what each
    implementation gave: its outputs judged by name, None where it does not define the
    kernel (not checked), or the exception it raised."""

    spec: KernelSpec
    shape: Shape
    seed: int
    args: dict
    results: dict[str, dict[str, Comparison] | Exception | None]

    def key(self, output: str) -> str:
        """``layernorm_forward.out@base``: the case's output as the gate names it."""
        return f"{self.spec.name}.{output}@{self.shape.name}"


def sweep(impls: dict, *, seeds=(0,), kernels=None):
    """The per-op sweep: every case of the op table (kernels whose name contains one of
    ``kernels``, default all) for every seed, each implementation of ``impls`` (name ->
    kernel set) judged on the same inputs against one oracle run. Yields :class:`Case`."""
    for spec, s in cases():
        if kernels and not any(k in spec.name for k in kernels):
            continue
        for seed in seeds:
            args = make_inputs(spec, s, seed)
            expected = oracle_outputs(spec.name, args)
            results = {}
            for name, ks in impls.items():
                try:
                    results[name] = None if spec.name in getattr(ks, "missing", ()) else \
                        check_outputs(ks, spec.name, args, expected, label=f"{name} {s.name}")
                except NotImplementedError:
                    results[name] = None
                except Exception as e:  # a user's kernel may raise or return garbage
                    results[name] = e
            yield Case(spec, s, seed, args, results)


def case_id(spec: KernelSpec, shape: Shape) -> str:
    """``layernorm-layernorm_forward-base``: a case's test id (``pytest -k <op>`` selects it)."""
    return f"{spec.op}-{spec.name}-{shape.name}"


def assert_case(impl, kernel: str, shape: str, seed: int = 0, label: str = "") -> list[Comparison]:
    """One case of the op table (``kernel`` on the named shape) judged by
    :func:`assert_kernel`: what a parametrized per-op test runs."""
    s = SHAPE_BY_NAME[shape]
    return assert_kernel(impl, kernel, make_inputs(SPEC[kernel], s, seed), label=label)
