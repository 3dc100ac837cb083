"""The tolerance policy: how the numbers of each kernel's row become a tolerance.

The per-output constants (``k_rel``, ``k_norm`` and why), reduction lengths and term sizes
are in the kernel's row of :mod:`pyref.spec`; this module holds the formulas that turn
them into bounds, and the constants that are not a kernel's (the underflow floor, the
end-to-end factors).

Unit. All tolerances are multiples of the float32 unit roundoff ``u = 2**-24`` (half an
ulp at 1.0), scaled by ``sqrt(n)`` where ``n`` is the length of the longest chain of
float32 roundings behind an output (a reduction's length, ``1`` for an element-wise op):
rounding errors of a chain of ``n`` operations add up like a random walk, and a sequential
sum, a reordered one (``-Ofast``), SIMD partial sums and FMA contraction all stay within
that rate. The reference point is always the float64 oracle (``pyref.numpy_kernels`` in
float64) run on the same float32 inputs.

Two bounds per tensor (see :mod:`harness.compare` for the metrics):

* element-wise ``|a - e| / (|e| + rms(e)) <= k_rel * u * sqrt(n)``: no single element may
  be off by more than rounding allows, judged relative to its own size or, near zero, to
  the tensor's typical size;
* norm-wise ``||a - e|| / ||e|| <= k_norm * u * sqrt(n)``: the error as a whole must look
  like rounding noise. This is the bound that catches a *systematic* change, e.g. every
  element off by 1e-5 relative (a changed constant), which an element-wise bound loose
  enough for the noise's tail would let through. It fails such a change whenever
  ``1e-5 > k_norm * u * sqrt(n)``, i.e. for every reduction length up to ~12000 with
  ``k_norm = 1.5`` (GPT-2 124M's longest, 4C = 3072, included).

How the constants were chosen: ``make calibrate`` (``harness/calibrate.py``) runs every
kernel of the op table over every shape and 3 seeds, in the C built with ``-O2``, ``-O3``,
``-O3 -march=native`` (FMA) and ``-Ofast -march=native`` (reordered sums, vector libm), and
in the NumPy and torch float32 references, and prints the worst observed ``k_rel`` and
``k_norm`` (the metrics divided by ``u sqrt(n)``). Observed worst (2026-11, gcc 12, AMD
EPYC, numpy 2.4, torch 2.13): k_rel 1.5 (attention_backward.datt), 1.1 for gelu's
backward (libm's tanhf and coshf are each a few ulp off); k_norm 0.6 (adamw.v), 0.45 for
single roundings (residual, encoder). The constants below sit 2.5-4x above those: no
false alarm under any legitimate build, or in the property-based fuzzing of
tests/test_fuzz.py (tiny and huge magnitudes, constant rows, large scores), and still
tight enough that every mutant of tests/test_ops.py and tests/test_variants.py fails.
With ``k_norm = 1.5`` a systematic relative change of 1e-5 fails every reduction up to
n ~ 12000 (GPT-2 124M's longest is 4C = 3072).

Model level. A whole step compares two ways:

* replay (local): every op of the graph is re-run in float64 on the C's *own* inputs for
  that op (its activations), so its output is judged by the per-op tolerance above, no
  matter how deep in the network it sits. This is what localises a bug.
* end to end: the C's activations and gradients against a float64 model run from the
  same parameters. Errors carried in from upstream grow with depth by a factor that
  depends on the model and the batch, so it is measured rather than guessed: a float64
  *witness* model with float32-sized noise injected at every op (``oracle.Witness``)
  shows how far rounding noise carries to each tensor, and the bound is a multiple of
  that (:func:`e2e_tolerance`). Each step starts from the C's own state (parameters, m,
  v), so nothing compounds across steps and the bound does not have to widen with them.
"""
from __future__ import annotations

from math import log, sqrt

import numpy as np

from pyref.constants import U
from pyref.spec import SPEC, Rule

from .compare import Tolerance


# Underflow. Below the smallest normal float32 (2^-126) the spacing of float32 stops
# shrinking (gradual underflow: subnormals 2^-149 apart), so a rounding there has an
# absolute error of up to 2^-150 = u * 2^-126 however small its result, not u times the
# result. Every element is therefore judged against a size of at least 2^-126: both
# metrics add this floor to each element's size, so a chain of n roundings of subnormal
# terms may be off by k u sqrt(n) 2^-126 = k sqrt(n) 2^-150 absolute, the same random-walk
# rule as everywhere else. It changes nothing for a tensor of normal size: for one whose
# elements or RMS are 2^-126 x 10^6 (~1e-32) or more, the bound moves by under 1e-6 of
# itself. A library that flushes subnormals to zero (-Ofast's FTZ) loses up to 2^-126 per
# rounding instead: that is its build's choice, and the fuzzing does not send it there.
UNDERFLOW_FLOOR = 2.0 ** -126


def rule(kernel: str, output: str) -> Rule:
    """The constants of ``kernel``'s ``output``: its row of pyref.spec says them, and why."""
    return SPEC[kernel].output(output).rule


def tail(size: int | None) -> float:
    """The element-wise bound is on the largest of ``size`` errors, which grows like
    sqrt(2 ln size); the constants were calibrated on tensors of ~1e4 elements. Factor
    (never below 1) for larger tensors: x1.37 for GPT-2 124M's wte (38.6M elements)."""
    if not size or size <= 1e4:
        return 1.0
    return sqrt(log(size) / log(1e4))


def small_sample(size: int | None) -> float:
    """The norm-wise error is a root-mean-square over the tensor's elements, so its bound
    holds in the large-tensor limit; over few elements it fluctuates by ~1/sqrt(size)
    (6 layernorm gains of a C=6 model, say). Factor on the norm-wise bound."""
    return 1.0 if not size else 1.0 + 4.0 / sqrt(size)


def op_tolerance(kernel: str, output: str, n: int, size: int | None = None) -> Tolerance:
    """The per-op tolerance of ``kernel``'s ``output`` for a rounding chain of length ``n``,
    over a tensor of ``size`` elements."""
    r = rule(kernel, output)
    g = sqrt(max(1, n))
    f = small_sample(size)
    return Tolerance(rel=r.k_rel * U * g * tail(size), norm=r.k_norm * U * g * f, floor=UNDERFLOW_FLOOR,
                     why=f"{kernel}.{output}: {r.why}; n={n}: "
                         f"{r.k_rel:g}·u·√n element-wise, {r.k_norm:g}·u·√n norm-wise"
                         + (f" x{f:.2f} for {size} elements" if f > 1.05 else ""))


# End to end: multiples of how far float32-sized noise, injected at every op of a float64
# model (oracle.Witness), carried to each tensor on this model and batch.
E2E_K_REL = 4.0
E2E_K_NORM = 3.0


def e2e_tolerance(kernel: str, output: str, n: int, size: int | None, witness) -> Tolerance:
    """The end-to-end tolerance of a tensor produced by ``kernel``'s ``output``: the larger
    of its per-op tolerance and E2E_K x the witness's distance from the oracle
    (``witness`` is that Comparison). Error carried in from upstream grows with depth,
    through layernorm's rstd and the softmax Jacobians, by a factor that depends on the
    model and the batch; the witness measures it instead of guessing it, so the bound
    widens exactly where rounding noise really grows, and nowhere else."""
    base = op_tolerance(kernel, output, n, size)
    rel = max(base.rel, E2E_K_REL * witness.max_rel)
    norm = max(base.norm, E2E_K_NORM * witness.norm_rel)
    return Tolerance(rel=rel, norm=norm, floor=base.floor,
                     why=f"{base.why}; end to end: the larger of that and {E2E_K_REL:g}x/{E2E_K_NORM:g}x "
                         f"the float32-noise witness (max rel {witness.max_rel:.2g}, norm rel "
                         f"{witness.norm_rel:.2g})")


def term_magnitude(kernel: str, output: str, args: dict, outputs: dict) -> np.ndarray | None:
    """Element by element, the size of the terms ``kernel``'s contribution to ``output`` is
    summed from (:mod:`pyref.terms`, named by the output's row in pyref.spec); None: the
    result's own size is the right scale. ``args`` are the kernel's float64 inputs,
    ``outputs`` its float64 results. Non-finite sizes (from non-finite inputs) count as 0."""
    f = SPEC[kernel].output(output).terms
    if f is None:
        return None
    with np.errstate(all="ignore"):
        mag = f(args, outputs)
    return np.where(np.isfinite(mag), mag, 0.0)
