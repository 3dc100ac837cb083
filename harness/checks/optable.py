"""The op table: every kernel row of :mod:`pyref.spec` on every case shape of
:mod:`pyref.cases`, and one routine that calls any implementation of a kernel.

:func:`run_kernel` calls any implementation of the protocol (the C through
:class:`harness.clib.kernels.CKernels`, NumPy, torch, a user's port, the float64 oracle) on the
same inputs, so a per-op check is a table row, not a function per op.
"""
from __future__ import annotations

import numpy as np

from pyref.cases import SHAPE_BY_NAME, SHAPES, Shape  # noqa: F401 -- the table's shapes
from pyref.spec import SPEC, SPECS, KernelSpec  # noqa: F401 -- the table's rows


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


