"""The tolerance policy: how the numbers of each kernel's row become a tolerance.

The per-output constants (``sigma``, ``k_norm`` and why), reduction lengths and term sizes
are in the kernel's row of :mod:`pyref.spec`; this module holds the formulas that turn
them into bounds, and the constants that are not a kernel's (the false-alarm probability,
the underflow floor, the end-to-end factors).

Unit. All tolerances are multiples of the float32 unit roundoff ``u = 2**-24`` (half an
ulp at 1.0), scaled by ``sqrt(n)`` where ``n`` is the length of the longest chain of
float32 roundings behind an output (a reduction's length, ``1`` for an element-wise op):
rounding errors of a chain of ``n`` operations add up like a random walk, and a sequential
sum, a reordered one (``-Ofast``), SIMD partial sums and FMA contraction all stay within
that rate. The reference point is always the float64 oracle (``pyref.numpy_kernels`` in
float64) run on the same float32 inputs. Each element is judged against its *size*: its
own value, the tensor's RMS, and the size of the terms it is summed from
(:mod:`pyref.terms`: where they cancel, the rounding error is relative to them).

Two bounds per tensor (see :mod:`harness.arbiter.compare` for the metrics):

* element-wise ``|a - e| / size <= sigma * u * sqrt(n) * extreme(N)``: no single element may
  be off by more than rounding allows. ``sigma`` is the scale of one element's error;
  ``extreme(N)`` is how far the largest of the tensor's N errors may go with probability
  at most ``P_FALSE_ALARM`` (below): the bound grows with N as the largest of N rounding
  errors does;
* norm-wise ``||a - e|| / ||size|| <= k_norm * u * sqrt(n) * norm_excess(N)``: the error as a
  whole must look like rounding noise. This is the bound that catches a *systematic*
  change, e.g. every element off by 1e-5 relative (a changed constant), which an
  element-wise bound loose enough for the noise's tail would let through. It fails such a
  change whenever ``1e-5 > k_norm * u * sqrt(n)``, i.e. for every reduction length up to
  ~12000 with ``k_norm = 1.5`` (GPT-2 124M's longest, 4C = 3072, included).

And a third criterion, the bias test (:mod:`harness.arbiter.stats`, docs/statistics.md): the mean of
the signed errors, as a constant factor or offset, must not lie beyond the output's minimum
effect (``Rule.bias``, in units of u, not u·sqrt(n): rounding averages to zero over any
reduction, and what a legitimate build leans by is a constant's rounding or a libm's, the
same at any n) by more than Student's t at ``P_FALSE_ALARM`` standard errors, estimated
from groups of whole rows. It catches what the norm-wise bound cannot: every element off
by a few ulps the same way.

How the constants were chosen: ``make calibrate`` (:mod:`harness.calibrate`) measures the
worst ``sigma`` and ``k_norm`` every legitimate build shows per op (the C built with
``-O2``, ``-O3``, ``-O3 -march=native`` (FMA), ``-Ofast -march=native`` (reordered sums,
vector libm); the NumPy and torch float32 references) and, at GPT-2 124M's shape over ten
training steps from GPT-2's initialisation, the fraction of every bound that every check
of a run uses. The constants sit at least 1.5x above the worst observation at scale, and
several times above it per op; and they are tight enough that every mutant of
tests/ops/test_ops.py and tests/binding/test_variants.py fails. README's tolerance section has the
figures, the machine and the date.

Model level. A whole step compares two ways:

* replay (local): every op of the graph is re-run in float64 on the C's *own* inputs for
  that op (its activations), so its output is judged by the per-op tolerance above, no
  matter how deep in the network it sits. This is what localises a bug.
* end to end: the C's activations and gradients against a float64 model run from the
  same parameters. Errors carried in from upstream grow with depth by a factor that
  depends on the model and the batch, so it is measured rather than guessed: a float64
  *witness* model with float32-sized noise injected at every op (:class:`harness.arbiter.oracle.Witness`)
  shows how far rounding noise carries to each tensor, and the bound is a multiple of
  that (:func:`e2e_tolerance`). Each step starts from the C's own state (parameters, m,
  v), so nothing compounds across steps and the bound does not have to widen with them.
"""
from __future__ import annotations

from math import log, sqrt
from statistics import NormalDist

import numpy as np

from pyref.constants import U
from pyref.spec import SPEC, Rule

from .compare import Tolerance
from .precision import Precision


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


# False alarms. Each bound is a statistical claim about rounding errors, and it is built
# for a stated probability of failing a correct implementation. One element's error,
# relative to its size, is modelled as sub-Gaussian with scale ``sigma * u * sqrt(n)``
# (sigma from its row: the sums of rounding errors behind it are bounded, independent
# terms, so Hoeffding's inequality makes them sub-Gaussian; libm's few-ulp errors are in
# sigma). The largest of ``size`` such errors then exceeds ``sigma * u * sqrt(n) * z`` with
# probability at most ``2 size exp(-z^2 / 2)`` (a union bound over the elements, whatever
# their correlation), which is P_FALSE_ALARM for z = extreme(size): the bound grows with
# the number of elements it is applied to, as the largest of N rounding errors does, by
# construction rather than by a constant calibrated on one size. The norm-wise error is a
# root-mean-square: over ``size`` elements it exceeds its expectation by a chi-square
# quantile of the same probability (norm_excess). The bias test (harness.arbiter.stats) is built for
# the same probability: its two forms (a constant factor, a constant offset) are each
# two-sided at P_FALSE_ALARM / 2, so it fails an implementation whose mean errors are within
# their minimum effect with probability at most P_FALSE_ALARM. A run of K checks is then a
# false alarm with probability at most 3 K P_FALSE_ALARM (each check has three criteria):
# 4.8e-5 for the ~16,000 checks of ten steps of GPT-2 124M with two references.
P_FALSE_ALARM = 1e-9
CRITERIA = 3    # element-wise, norm-wise, bias: each built for P_FALSE_ALARM


def false_alarm_bound(checks: int, p: float = P_FALSE_ALARM) -> float:
    """The probability that a run of ``checks`` checks, each criterion built for ``p``, has
    a false alarm at all: at most CRITERIA * checks * p (a union bound)."""
    return CRITERIA * checks * p
# the one-sided Gaussian quantile of P_FALSE_ALARM / 2: 6.1
_Z1 = NormalDist().inv_cdf(1.0 - P_FALSE_ALARM / 2)


def extreme(size: int | None, p: float = P_FALSE_ALARM) -> float:
    """The factor z on sigma·u·sqrt(n) that the largest of ``size`` sub-Gaussian errors
    exceeds with probability ``p``: sqrt(2 ln(2 size / p)); for P_FALSE_ALARM 6.5 for one
    element, 7.8 for 1e4, 8.8 for GPT-2 124M's wte (38.6M)."""
    return sqrt(2.0 * log(2.0 * max(1, size or 1) / p))


def norm_excess(size: int | None) -> float:
    """The norm-wise error is a root-mean-square over the tensor's elements, so its bound
    holds in the large-tensor limit; over ``size`` elements the mean of the squares is a
    chi-square of ``size`` degrees of freedom over ``size``, whose quantile of
    P_FALSE_ALARM (Wilson-Hilferty) bounds it: factor 1 + 6.1/sqrt(2 size) for many
    elements, 3.1 for the 6 layernorm gains of a C=6 model."""
    N = max(1, size or 1)
    q = (1.0 - 2.0 / (9.0 * N) + _Z1 * sqrt(2.0 / (9.0 * N))) ** 3
    return sqrt(max(1.0, q))


def op_tolerance(kernel: str, output: str, n: int, size: int | None = None,
                 precision: Precision | None = None) -> Tolerance:
    """The per-op tolerance of ``kernel``'s ``output`` for a rounding chain of length ``n``,
    over a tensor of ``size`` elements (at most that many compared), for an op that ran at
    ``precision`` (:class:`.precision.Precision`; None or float32: the C's, these formulas
    as they always were)."""
    if precision is not None and not precision.is_float32:
        return _at_precision(kernel, output, n, size, precision)
    r = rule(kernel, output)
    g = sqrt(max(1, n))
    z, f = extreme(size), norm_excess(size)
    return Tolerance(rel=r.sigma * z * U * g, norm=r.k_norm * U * g * f, floor=UNDERFLOW_FLOOR,
                     bias=r.bias * U, bias_size=r.bias_size * U, bias_p=P_FALSE_ALARM,
                     why=f"{kernel}.{output}: {r.why}; n={n}: "
                         f"{r.sigma:g}·u·√n per element x{z:.2f} (the largest of {size or 1} at p={P_FALSE_ALARM:g}), "
                         f"{r.k_norm:g}·u·√n norm-wise" + (f" x{f:.2f} for {size} elements" if f > 1.05 else "")
                         + f"; mean {r.bias:g}·u" + (f" (or {r.bias_size:g}·u of the sizes)" if r.bias_size else "")
                         + f" + t·SE ({r.bias_why})")


def _at_precision(kernel: str, output: str, n: int, size: int | None, p: Precision) -> Tolerance:
    """:func:`op_tolerance` of an op that rounded its inputs, accumulation or output more
    coarsely than float32: the same formulas with ``u sqrt(n)`` replaced by the op's own
    element error scale ``p.unit(n)`` (:mod:`.precision`), the bias test's minimum effect in
    units of its coarsest rounding, the underflow floor its dtype's smallest normal."""
    r = rule(kernel, output)
    g = p.unit(n)
    z, f = extreme(size), norm_excess(size)
    return Tolerance(rel=r.sigma * z * g, norm=r.k_norm * g * f, floor=p.floor,
                     bias=r.bias * p.lean, bias_size=r.bias_size * p.lean, bias_p=P_FALSE_ALARM,
                     why=f"{kernel}.{output} at {p.label} ({p.detail}): {r.why}; n={n}: "
                         f"{r.sigma:g}·g per element, g = sqrt(u_acc²n + 2u_in² + u_out²) = {g:.3g}, "
                         f"x{z:.2f} (the largest of {size or 1} at p={P_FALSE_ALARM:g}), {r.k_norm:g}·g norm-wise"
                         + (f" x{f:.2f} for {size} elements" if f > 1.05 else "")
                         + f"; mean {r.bias:g}·{p.lean:.3g}" + f" + t·SE ({r.bias_why})")


def reach(tol: Tolerance) -> float:
    """The smallest change that a check under ``tol`` reveals, relative to the scale of the
    value (its terms' size): a change of every element by that fraction moves the
    norm-wise error to its bound. A change below it can pass; at bf16 it is ~2^-8 x the
    row's k_norm, at float32 ~2^-24 sqrt(n) x k_norm."""
    return tol.norm


# End to end: multiples of how far float32-sized noise, injected at every op of a float64
# model (oracle.Witness), carried to each tensor on this model and batch.
E2E_K_REL = 4.0
E2E_K_NORM = 3.0


def e2e_tolerance(kernel: str, output: str, n: int, size: int | None, witness,
                  precision: Precision | None = None) -> Tolerance:
    """The end-to-end tolerance of a tensor produced by ``kernel``'s ``output``: the larger
    of its per-op tolerance and E2E_K x the witness's distance from the oracle
    (``witness`` is that Comparison). Error carried in from upstream grows with depth,
    through layernorm's rstd and the softmax Jacobians, by a factor that depends on the
    model and the batch; the witness measures it instead of guessing it, so the bound
    widens exactly where rounding noise really grows, and nowhere else. The bias test's
    minimum effect widens by the same factor as the norm-wise bound: the legitimate leans
    of the ops upstream (a constant rounded differently) reach the tensor through the same
    Jacobians as their rounding noise."""
    base = op_tolerance(kernel, output, n, size, precision)
    rel = max(base.rel, E2E_K_REL * witness.max_rel)
    norm = max(base.norm, E2E_K_NORM * witness.norm_rel)
    growth = norm / base.norm if base.norm > 0 else 1.0      # inf where the witness's norm is
    return Tolerance(rel=rel, norm=norm, floor=base.floor, bias=base.bias * growth, bias_p=base.bias_p,
                     bias_size=base.bias_size * growth if base.bias_size else 0.0,
                     why=f"{base.why}; end to end: the larger of that and {E2E_K_REL:g}x/{E2E_K_NORM:g}x "
                         f"the {'float32' if precision is None else precision.label}-noise witness (max rel {witness.max_rel:.2g}, norm rel "
                         f"{witness.norm_rel:.2g})" + (f", the mean's minimum effect x{growth:.2g}" if growth > 1 else ""))


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
