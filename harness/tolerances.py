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
  *witness* model with float32-sized noise injected at every op (``runner.Witness``)
  shows how far rounding noise carries to each tensor, and the bound is a multiple of
  that (:func:`e2e_tolerance`). Each step starts from the C's own state (parameters, m,
  v), so nothing compounds across steps and the bound does not have to widen with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import log, sqrt

import numpy as np

from .compare import Tolerance

U = 2.0 ** -24  # float32 unit roundoff

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


@dataclass(frozen=True)
class Rule:
    k_rel: float
    k_norm: float
    why: str


DEFAULT = Rule(4.0, 1.5, "float32 rounding, random-walk growth over the reduction")

RULES: dict[tuple[str, str], Rule] = {
    ("gelu_forward", "out"): Rule(
        5.0, 2.0, "tanhf is a few ulp off in libm and in -Ofast's vector libm"),
    ("gelu_backward", "dinp"): Rule(
        6.0, 2.0, "tanhf and coshf are each a few ulp off; sech^2 = 1/cosh^2 doubles coshf's"),
    ("attention_forward", "att"): Rule(
        5.0, 1.5, "expf's ulp error on top of the softmax's row sum"),
    ("softmax_forward", "probs"): Rule(
        5.0, 1.5, "expf's ulp error on top of the row sum over V"),
    ("crossentropy_forward", "losses"): Rule(
        5.0, 2.0, "logf of a probability: an absolute error of u*|p| becomes ~u in the loss"),
}


def rule(kernel: str, output: str) -> Rule:
    return RULES.get((kernel, output), DEFAULT)


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
# model (runner.Witness), carried to each tensor on this model and batch.
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


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def term_magnitude(kernel: str, output: str, args: dict, outputs: dict) -> np.ndarray | None:
    """Element by element, the size of the terms a kernel's contribution to ``output`` is
    summed from: ``sum |term|``, the quantity in the classical bound
    ``|error| <= n u sum |term|``.

    Float32 rounding is relative to the terms, not to the result: where they cancel (the
    softmax Jacobian, layernorm's input gradient, AdamW's moments, the lm head's gradient
    for the batch's own tokens) an error of u * sum|term| is legitimate although it is
    large next to the result. The comparison adds this to the denominator of its
    element-wise metric (``elem_scale``). None: the result's own size is the right scale.
    ``args`` are the kernel's float64 inputs, ``outputs`` its float64 results.
    """
    with np.errstate(all="ignore"):
        mag = _term_magnitude(kernel, output, args, outputs)
    if mag is None:
        return None
    return np.where(np.isfinite(mag), mag, 0.0)


def adamw_magnitudes(p0, m0, g, v, hp) -> tuple[np.ndarray, np.ndarray]:
    """Term sizes of AdamW's m and param (float32), from the pre-step param ``p0`` and
    ``m0``, the gradient ``g`` and the post-step ``v`` (None: computed here).

    m = beta1 m0 + (1 - beta1) g: the two terms cancel when g opposes m0.
    param - lr (m_hat / (sqrt(v_hat) + eps) + wd param): in float32, 1 - beta^t cancels
    for small t, so the update term carries a relative error of about
    u / (1 - beta1^t) + u / (2 (1 - beta2^t)) (~500 u at t = 1 with beta2 = 0.999)."""
    b1, b2, t = hp["beta1"], hp["beta2"], hp["t"]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    g = np.asarray(g, np.float32)
    m_mag = np.abs(np.float32(b1) * np.asarray(m0, np.float32))
    m_mag += np.abs(np.float32(1 - b1) * g)
    if v is None:
        v = b2 * np.asarray(hp["v"], np.float32) + (1 - b2) * g * g
    upd = m_mag / np.float32(c1)
    upd /= np.sqrt(np.asarray(v, np.float32) / np.float32(c2)) + np.float32(hp["eps"])
    # at t = 1, powf(beta, 1) is beta itself and 1 - beta is exact: no amplification
    upd *= np.float32(1.0 if t == 1 else 1 + 1 / c1 + 0.5 / c2)
    absp = np.abs(np.asarray(p0, np.float32))
    upd += np.float32(hp["weight_decay"]) * absp
    upd *= np.float32(hp["lr"])
    upd += absp
    return m_mag, upd


def _rss(x2: np.ndarray) -> np.ndarray:
    """Root of a sum of squares already summed."""
    return np.sqrt(x2)


def _sq(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(x / s)^2 in float32 and the scale s = max|x|: term sizes need two digits, not
    sixteen, and float32 halves the cost of the extra matmul (the lm head's is 10 GFLOP at
    124M scale); the scaling keeps tiny and huge inputs from under- or overflowing."""
    s = float(np.max(np.abs(x))) if x.size else 0.0
    if not np.isfinite(s) or s == 0.0:
        s = 1.0
    y = np.asarray(x, np.float32) / np.float32(s)
    return np.square(y, out=y), s


def _attention_backward_terms(output, a, out):
    """Root-sum-squares of the dot products attention's backward is made of, per head:
    datt[t, t2] = sum_i v[t2, i] dout[t, i] (over hs); dv = sum_t att[t, t2] dout[t];
    dq = sum_t2 dpreatt[t, t2] k[t2] / sqrt(hs); dk = sum_t dpreatt[t, t2] q[t] / sqrt(hs).
    A dot product over a few terms that happens to cancel (T = 1, one head: a tensor of
    one element) is judged against the size of its terms, not against itself."""
    B, T, C3 = a["inp"].shape
    NH = int(a["NH"])
    C = C3 // 3
    hs = C // NH

    def heads2(x):       # (B, T, C) -> squares as (B, NH, T, hs), and their scale
        return _sq(x.reshape(B, T, NH, hs).transpose(0, 2, 1, 3))
    d2, sd = heads2(a["dout"])
    v2, sv = heads2(a["inp"][..., 2 * C:])
    if output == "datt":
        return _rss(d2 @ v2.transpose(0, 1, 3, 2)) * (sd * sv)
    q2, sq = heads2(a["inp"][..., :C])
    k2, sk = heads2(a["inp"][..., C:2 * C])
    att2, sa = _sq(np.tril(a["att"]))
    dp2, sp = _sq(np.tril(out["dpreatt"]))
    scale = 1.0 / np.sqrt(hs)
    dq = _rss(dp2 @ k2) * (sp * sk * scale)
    dk = _rss(dp2.transpose(0, 1, 3, 2) @ q2) * (sp * sq * scale)
    dv = _rss(att2.transpose(0, 1, 3, 2) @ d2) * (sa * sd)
    back = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, C)   # noqa: E731
    return np.concatenate([back(dq), back(dk), back(dv)], axis=-1)


def _term_magnitude(kernel, output, a, out):
    # Two kinds of size. Where a sum's terms have independent signs, its rounding error
    # scales with the root-sum-square of the terms (the size such a sum typically has):
    # for one element that happens to cancel, that is larger than the element, while on
    # average it is the output's own size, so nothing loosens. Where terms cancel by
    # construction (x - mean, 1 + tanh, the softmax Jacobian, AdamW's moments) the size
    # is the terms' own: that cancellation is the rule there, not the exception.
    if kernel == "matmul_forward":  # sum over i of inp * weight, from the bias
        inp2, si = _sq(a["inp"])
        w2, sw = _sq(a["weight"])
        mag = _rss(inp2 @ w2.T) * (si * sw)
        return mag if a["bias"] is None else mag + np.abs(a["bias"])
    if kernel == "matmul_backward":
        dout2, sd = _sq(a["dout"])
        if output == "dweight":   # sum over (b,t) of inp * dout
            inp2, si = _sq(a["inp"])
            O, C = dout2.shape[-1], inp2.shape[-1]
            return _rss(dout2.reshape(-1, O).T @ inp2.reshape(-1, C)) * (sd * si)
        if output == "dinp":      # sum over o of weight * dout
            w2, sw = _sq(a["weight"])
            return _rss(dout2 @ w2) * (sd * sw)
        if output == "dbias":
            return _rss(dout2.sum((0, 1))) * sd
    if kernel == "encoder_backward" and output == "dwte":  # repeated tokens add up
        mag = np.zeros_like(a["dwte"])
        np.add.at(mag, a["inp"], np.square(a["dout"]))
        return _rss(mag)
    if kernel == "encoder_backward" and output == "dwpe":  # each position sums over b
        mag = np.zeros_like(a["dwpe"])
        T = a["dout"].shape[1]
        mag[:T] = np.square(a["dout"]).sum(0)
        return _rss(mag)
    if kernel == "layernorm_forward":
        # x - mean is rounded relative to |x| and |mean|, then amplified by rstd: rows whose
        # mean is large next to their spread lose digits there
        inp = a["inp"]
        mean = inp.mean(-1, keepdims=True)
        rstd = 1.0 / np.sqrt(((inp - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        if output == "out":
            return rstd * (np.abs(inp) + np.abs(mean)) * np.abs(a["weight"]) + np.abs(a["bias"])
        if output == "mean":
            return np.abs(inp).mean(-1)
        if output == "rstd":    # var from the shifted values: relative error ~ u |x| / std
            return (rstd * rstd * np.abs(inp).mean(-1, keepdims=True))[..., 0]
    if kernel == "layernorm_backward":
        inp, w, dout = a["inp"], a["weight"], a["dout"]
        mean, rstd = a["mean"][..., None], a["rstd"][..., None]
        norm = (inp - mean) * rstd
        if output == "dinp":
            # rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)): a projection that
            # removes dnorm's mean and its component along norm
            dnorm = w * dout
            return rstd * (np.abs(dnorm) + np.abs(dnorm).mean(-1, keepdims=True)
                           + np.abs(norm) * np.abs(dnorm * norm).mean(-1, keepdims=True))
        if output == "dweight":
            return _rss(np.square(norm * dout).sum((0, 1)))
        if output == "dbias":
            return _rss(np.square(dout).sum((0, 1)))
    if kernel == "gelu_forward":
        # 0.5 x (1 + tanh(a)): the terms are 0.5|x| and 0.5|x tanh(a)|. For x >= 0 they add
        # up to |out| itself (nothing cancels, nothing to add); for x < 0 they cancel, and
        # their size exceeds |out| by |x tanh(a)| (~|x| for x << 0, where 1 + tanh(a) ~ 0)
        x = a["inp"]
        s = np.sqrt(2.0 / np.pi)
        return np.where(x < 0, np.abs(x * np.tanh(s * (x + 0.044715 * x ** 3))), 0.0)
    if kernel == "gelu_backward":
        x = a["inp"]
        s = np.sqrt(2.0 / np.pi)
        arg = s * (x + 0.044715 * x ** 3)
        sech2 = 1.0 / np.cosh(np.clip(arg, -350, 350)) ** 2
        return np.abs(a["dout"]) * (0.5 * (1 + np.abs(np.tanh(arg)))
                                    + np.abs(0.5 * x * sech2 * s * (1 + 3 * 0.044715 * x * x)))
    if kernel == "attention_forward":
        B, T, C3 = a["inp"].shape
        NH = int(a["NH"])
        C = C3 // 3
        hs = C // NH

        def heads(x):
            return x.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
        q, k, v = heads(a["inp"][..., :C]), heads(a["inp"][..., C:2 * C]), heads(a["inp"][..., 2 * C:])
        score = _rss(np.square(q) @ np.square(k).transpose(0, 1, 3, 2)) / np.sqrt(hs)
        if output == "preatt":
            return score
        # the softmax turns a score's absolute error into a relative error of att
        score = np.where(np.tril(np.ones((T, T), bool)), score, 0.0)
        att = out["att"]
        att_mag = att * (score + (att * score).sum(-1, keepdims=True))
        if output == "att":
            return att_mag
        if output == "out":
            mag = att_mag @ np.abs(v) + _rss(np.square(att) @ np.square(v))
            return mag.transpose(0, 2, 1, 3).reshape(B, T, C)
    if kernel == "attention_backward" and output == "dpreatt":
        # dpreatt[t3] = att[t3] * (datt[t3] - sum_t2 att[t2] datt[t2]): the softmax Jacobian
        att, datt = a["att"], np.abs(out["datt"])
        return att * datt + att * (att * datt).sum(-1, keepdims=True)
    if kernel == "attention_backward" and output in ("datt", "dinp"):
        return _attention_backward_terms(output, a, out)
    if kernel == "adamw" and output in ("m", "param"):
        m_mag, p_mag = adamw_magnitudes(a["param"], a["m"], a["grad"], out.get("v"), a)
        return m_mag if output == "m" else p_mag
    return None
