"""The tolerance policy: every number, in one place, with its reason.

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
  ``1e-5 > k_norm * u * sqrt(n)``, i.e. for every reduction length up to ~7000 with
  ``k_norm = 2`` (GPT-2 124M's longest, 4C = 3072, included).

How the constants were chosen: ``make calibrate`` (``harness/calibrate.py``) runs every
kernel of the op table over every shape and several seeds, in the C built with ``-O2``,
``-O3``, ``-O3 -march=native`` (FMA) and ``-Ofast -march=native`` (reordered sums, vector
libm), and in the NumPy and torch float32 references, and reports the worst observed
``max_rel / (u sqrt n)`` and ``norm_rel / (u sqrt n)``. Observed worst (2026-11, gcc 12,
x86-64): about 1.5 / 0.8 for reductions, 3.5 / 0.9 for gelu's backward (libm's tanhf and
coshf are each a few ulp off, and 1/cosh^2 doubles that). The constants below sit 2-4x
above those: no false alarms under any legitimate build, and still tight enough that the
mutation tests (eps changed, a constant off, a term dropped, ``+=`` turned into ``=``)
fail.

Model level. A whole step compares two ways:

* replay (local): every op of the graph is re-run in float64 on the C's *own* inputs for
  that op (its activations), so its output is judged by the per-op tolerance above, no
  matter how deep in the network it sits. This is what localises a bug.
* end to end: the C's activations and gradients against a float64 model run from the
  same parameters. Errors carried in from upstream grow with depth, so the per-op
  tolerance of the tensor's producing op is multiplied by :func:`depth_growth`, calibrated
  the same way at the tiny and small configs (observed worst growth ~ sqrt(depth)); each
  step starts from the C's own state (parameters, m, v), so nothing compounds across
  steps and the bound does not have to widen with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import sqrt

import numpy as np

from .compare import Tolerance

U = 2.0 ** -24  # float32 unit roundoff


@dataclass(frozen=True)
class Rule:
    k_rel: float
    k_norm: float
    why: str


DEFAULT = Rule(8.0, 2.0, "float32 rounding, random-walk growth over the reduction")

RULES: dict[tuple[str, str], Rule] = {
    ("gelu_forward", "out"): Rule(
        12.0, 3.0, "tanhf is a few ulp off in libm and in -Ofast's vector libm"),
    ("gelu_backward", "dinp"): Rule(
        16.0, 3.0, "tanhf and coshf are each a few ulp off; sech^2 = 1/cosh^2 doubles coshf's"),
    ("attention_forward", "att"): Rule(
        10.0, 2.0, "expf's ulp error on top of the softmax's row sum"),
    ("softmax_forward", "probs"): Rule(
        10.0, 2.0, "expf's ulp error on top of the row sum over V"),
    ("adamw", "param"): Rule(
        16.0, 2.0, "in float32 1 - beta^t cancels for small t; the update term's error is "
                   "measured against the terms' size (term_scale), but that is an RMS"),
    ("crossentropy_forward", "losses"): Rule(
        10.0, 3.0, "logf of a probability: an absolute error of u*|p| becomes ~u in the loss"),
}


def rule(kernel: str, output: str) -> Rule:
    return RULES.get((kernel, output), DEFAULT)


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
    return Tolerance(rel=r.k_rel * U * g, norm=r.k_norm * U * g * f,
                     why=f"{kernel}.{output}: {r.why}; n={n}: "
                         f"{r.k_rel:g}·u·√n element-wise, {r.k_norm:g}·u·√n norm-wise"
                         + (f" x{f:.2f} for {size} elements" if f > 1.05 else ""))


# End-to-end growth with depth (the number of ops between the parameters and a tensor).
E2E_K = 2.0


def depth_growth(depth: int) -> float:
    """Multiplier on a tensor's per-op tolerance for error carried in from ``depth`` upstream
    ops: E2E_K * sqrt(1 + depth) (rounding noise of independent ops adds in quadrature;
    E2E_K covers the amplification by layernorm's rstd and the softmax Jacobians)."""
    return E2E_K * sqrt(1 + depth)


def e2e_tolerance(kernel: str, output: str, n: int, depth: int, size: int | None = None) -> Tolerance:
    base = op_tolerance(kernel, output, n, size)
    g = depth_growth(depth)
    return Tolerance(rel=base.rel * g, norm=base.norm * g,
                     why=f"{base.why}; end to end at depth {depth}: x{g:.1f}")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def term_scale(kernel: str, output: str, args: dict, expected: dict) -> float | None:
    """See :func:`_term_scale`; None where no positive finite scale comes out (all zero)."""
    with np.errstate(all="ignore"):
        s = _term_scale(kernel, output, args, expected)
    return s if s is not None and np.isfinite(s) and s > 0 else None


def _term_scale(kernel: str, output: str, args: dict, expected: dict) -> float | None:
    """The error scale for outputs that are a small difference of larger terms.

    Float32 rounding is relative to the size of the terms a result is summed from, not to
    the result: where the terms cancel, an error of u*|terms| is legitimate although it is
    large next to the result. For such outputs this returns the RMS of the terms'
    magnitudes (the quantity in the classical bound |error| <= n u sum|terms|), used as
    the ``scale`` of the element-wise metric instead of the output's own RMS. None: the
    output's RMS is the right scale.
    """
    if kernel == "attention_backward" and output == "dpreatt":
        # dpreatt[t3] = att[t3] * (datt[t3] - sum_t2 att[t2] datt[t2]): the softmax Jacobian
        att, datt = args["att"], np.abs(expected["datt"])
        mag = att * datt + att * (att * datt).sum(-1, keepdims=True)
        T = att.shape[-1]
        mag = mag[..., np.tril(np.ones((T, T), bool))]
        return max(_rms(mag), _rms(expected["dpreatt"]))
    if kernel == "layernorm_backward" and output == "dinp":
        # dinp = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
        inp, w, dout = args["inp"], args["weight"], args["dout"]
        mean, rstd = args["mean"][..., None], args["rstd"][..., None]
        norm = (inp - mean) * rstd
        dnorm = w * dout
        mag = rstd * (np.abs(dnorm) + np.abs(dnorm.mean(-1, keepdims=True))
                      + np.abs(norm * (dnorm * norm).mean(-1, keepdims=True)))
        return max(_rms(mag), _rms(expected["dinp"]))
    if kernel == "adamw" and output == "m":
        # m = beta1 * m + (1 - beta1) * g: the two terms cancel when g opposes m
        b1 = args["beta1"]
        mag = np.abs(b1 * args["m"]) + np.abs((1 - b1) * args["grad"])
        return max(_rms(mag), _rms(expected["m"]))
    if kernel == "adamw" and output == "param":
        # param - lr * (m_hat / (sqrt(v_hat) + eps) + wd * param): in float32, 1 - beta^t
        # cancels for small t, so the update term carries a relative error of about
        # u / (1 - beta1^t) + u / (2 (1 - beta2^t)) (~500 u at t = 1 with beta2 = 0.999)
        b1, b2, t = args["beta1"], args["beta2"], args["t"]
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        g, p = args["grad"], args["param"]
        m = b1 * args["m"] + (1 - b1) * g
        v = b2 * args["v"] + (1 - b2) * g * g
        upd = (m / c1) / (np.sqrt(v / c2) + args["eps"])
        mag = np.abs(p) + args["lr"] * (np.abs(upd) * (1 + 1 / c1 + 0.5 / c2) + args["weight_decay"] * np.abs(p))
        return max(_rms(mag), _rms(expected["param"]))
    return None
