"""Term sizes: for each output of a kernel, element by element, the size of the terms it is
summed from (``sum |term|``, the quantity in the classical bound ``|error| <= n u sum |term|``).

Float32 rounding is relative to the terms, not to the result: where they cancel (the
softmax Jacobian, layernorm's input gradient, AdamW's moments, the lm head's gradient for
the batch's own tokens) an error of u * sum|term| is legitimate although it is large next
to the result. The comparison adds this to the denominator of its element-wise metric
(``elem_scale``); each output names its function in its row of :mod:`pyref.spec`, and an
output without one is judged against its own size.

Two kinds of size. Where a sum's terms have independent signs, its rounding error scales
with the root-sum-square of the terms (the size such a sum typically has): for one element
that happens to cancel, that is larger than the element, while on average it is the
output's own size, so nothing loosens. Where terms cancel by construction (x - mean,
1 + tanh, the softmax Jacobian, AdamW's moments) the size is the terms' own: that
cancellation is the rule there, not the exception.

Every function takes the kernel's float64 arguments ``a`` (by protocol name) and its
float64 results ``out`` (by output name).
"""
from __future__ import annotations

import numpy as np

from .constants import GELU_COEF, GELU_SCALING, LN_EPS


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


def _heads(x: np.ndarray, NH: int) -> np.ndarray:
    """(B, T, C) -> (B, NH, T, hs)."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def _qkv(a: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    C = a["inp"].shape[-1] // 3
    NH = int(a["NH"])
    return tuple(_heads(a["inp"][..., i * C:(i + 1) * C], NH) for i in range(3))


# -- encoder

def encoder_backward_dwte(a, out):
    """dwte[token] sums dout over the positions holding that token: repeated tokens add up."""
    mag = np.zeros_like(a["dwte"])
    np.add.at(mag, a["inp"], np.square(a["dout"]))
    return _rss(mag)


def encoder_backward_dwpe(a, out):
    """dwpe[t] sums dout over the batch."""
    mag = np.zeros_like(a["dwpe"])
    T = a["dout"].shape[1]
    mag[:T] = np.square(a["dout"]).sum(0)
    return _rss(mag)


# -- layernorm

def _layernorm_stats(inp):
    mean = inp.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((inp - mean) ** 2).mean(-1, keepdims=True) + LN_EPS)
    return mean, rstd


def layernorm_forward_out(a, out):
    """x - mean is rounded relative to |x| and |mean|, then amplified by rstd: rows whose
    mean is large next to their spread lose digits there."""
    mean, rstd = _layernorm_stats(a["inp"])
    return rstd * (np.abs(a["inp"]) + np.abs(mean)) * np.abs(a["weight"]) + np.abs(a["bias"])


def layernorm_forward_mean(a, out):
    return np.abs(a["inp"]).mean(-1)


def layernorm_forward_rstd(a, out):
    """var from the shifted values: relative error ~ u |x| / std."""
    _, rstd = _layernorm_stats(a["inp"])
    return (rstd * rstd * np.abs(a["inp"]).mean(-1, keepdims=True))[..., 0]


def _layernorm_norm(a):
    return (a["inp"] - a["mean"][..., None]) * a["rstd"][..., None]


def layernorm_backward_dinp(a, out):
    """rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)): a projection that removes
    dnorm's mean and its component along norm."""
    norm, rstd = _layernorm_norm(a), a["rstd"][..., None]
    dnorm = a["weight"] * a["dout"]
    return rstd * (np.abs(dnorm) + np.abs(dnorm).mean(-1, keepdims=True)
                   + np.abs(norm) * np.abs(dnorm * norm).mean(-1, keepdims=True))


def layernorm_backward_dweight(a, out):
    return _rss(np.square(_layernorm_norm(a) * a["dout"]).sum((0, 1)))


def layernorm_backward_dbias(a, out):
    return _rss(np.square(a["dout"]).sum((0, 1)))


# -- matmul

def matmul_forward_out(a, out):
    """The sum over i of inp * weight, from the bias."""
    inp2, si = _sq(a["inp"])
    w2, sw = _sq(a["weight"])
    mag = _rss(inp2 @ w2.T) * (si * sw)
    return mag if a["bias"] is None else mag + np.abs(a["bias"])


def matmul_backward_dinp(a, out):
    """The sum over o of weight * dout."""
    dout2, sd = _sq(a["dout"])
    w2, sw = _sq(a["weight"])
    return _rss(dout2 @ w2) * (sd * sw)


def matmul_backward_dweight(a, out):
    """The sum over (b, t) of inp * dout."""
    dout2, sd = _sq(a["dout"])
    inp2, si = _sq(a["inp"])
    O, C = dout2.shape[-1], inp2.shape[-1]
    return _rss(dout2.reshape(-1, O).T @ inp2.reshape(-1, C)) * (sd * si)


def matmul_backward_dbias(a, out):
    dout2, sd = _sq(a["dout"])
    return _rss(dout2.sum((0, 1))) * sd


# -- attention

def attention_forward_preatt(a, out):
    """q . k / sqrt(hs): the root-sum-square of its products."""
    q, k, _ = _qkv(a)
    return _rss(np.square(q) @ np.square(k).transpose(0, 1, 3, 2)) / np.sqrt(q.shape[-1])


def _att_terms(a, out):
    """The softmax turns a score's absolute error into a relative error of att."""
    T = a["inp"].shape[1]
    score = np.where(np.tril(np.ones((T, T), bool)), attention_forward_preatt(a, out), 0.0)
    att = out["att"]
    return att * (score + (att * score).sum(-1, keepdims=True))


def attention_forward_att(a, out):
    return _att_terms(a, out)


def attention_forward_out(a, out):
    """att @ v: att's own error carried by |v|, plus the products' root-sum-square."""
    _, _, v = _qkv(a)
    att = out["att"]
    mag = _att_terms(a, out) @ np.abs(v) + _rss(np.square(att) @ np.square(v))
    B, NH, T, hs = mag.shape
    return mag.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def attention_backward_dpreatt(a, out):
    """dpreatt[t3] = att[t3] * (datt[t3] - sum_t2 att[t2] datt[t2]): the softmax Jacobian,
    whose terms cancel by construction, each datt counted with the size of its own terms.
    datt is a dot product over hs computed in the same call, so its rounding error scales
    with the root-sum-square of its products (:func:`attention_backward_datt`), not with
    its value; and in a trained model datt cancels far beyond what independent signs give
    (at GPT-2 124M after a few steps |datt| is ~1/30 of its terms' size), so that error,
    carried by att, is what dpreatt's own error is made of. Counted with |datt| alone, the
    early positions' large att made the unmodified C, NumPy and torch fail there alike."""
    att = a["att"]
    datt = np.abs(out["datt"]) + attention_backward_datt(a, out)   # att is 0 above the diagonal
    return att * datt + att * (att * datt).sum(-1, keepdims=True)


def attention_backward_datt(a, out):
    """datt[t, t2] = sum_i v[t2, i] dout[t, i] over hs: per head, the root-sum-square of
    the products. A dot product over a few terms that happens to cancel (T = 1, one head:
    a tensor of one element) is judged against the size of its terms, not against itself."""
    NH = int(a["NH"])
    C = a["inp"].shape[-1] // 3
    d2, sd = _sq(_heads(a["dout"], NH))
    v2, sv = _sq(_heads(a["inp"][..., 2 * C:], NH))
    return _rss(d2 @ v2.transpose(0, 1, 3, 2)) * (sd * sv)


def attention_backward_dinp(a, out):
    """dq = sum_t2 dpreatt[t, t2] k[t2] / sqrt(hs); dk = sum_t dpreatt[t, t2] q[t] / sqrt(hs);
    dv = sum_t att[t, t2] dout[t]: each the root-sum-square of its products, per head, with
    dpreatt counted with its own terms' size (:func:`attention_backward_dpreatt`): its
    rounding error, not its value, is what dq and dk carry where it cancels."""
    NH = int(a["NH"])
    B, T, C3 = a["inp"].shape
    C = C3 // 3
    q2, sq = _sq(_heads(a["inp"][..., :C], NH))
    k2, sk = _sq(_heads(a["inp"][..., C:2 * C], NH))
    d2, sd = _sq(_heads(a["dout"], NH))
    att2, sa = _sq(np.tril(a["att"]))
    dp2, sp = _sq(np.tril(np.abs(out["dpreatt"]) + attention_backward_dpreatt(a, out)))
    scale = 1.0 / np.sqrt(C // NH)
    dq = _rss(dp2 @ k2) * (sp * sk * scale)
    dk = _rss(dp2.transpose(0, 1, 3, 2) @ q2) * (sp * sq * scale)
    dv = _rss(att2.transpose(0, 1, 3, 2) @ d2) * (sa * sd)
    back = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, C)   # noqa: E731
    return np.concatenate([back(dq), back(dk), back(dv)], axis=-1)


# -- gelu

def gelu_forward_out(a, out):
    """0.5 x (1 + tanh(a)): the terms are 0.5|x| and 0.5|x tanh(a)|. For x >= 0 they add up
    to |out| itself (nothing cancels, nothing to add); for x < 0 they cancel, and their size
    exceeds |out| by |x tanh(a)| (~|x| for x << 0, where 1 + tanh(a) ~ 0)."""
    x = a["inp"]
    return np.where(x < 0, np.abs(x * np.tanh(GELU_SCALING * (x + GELU_COEF * x ** 3))), 0.0)


def gelu_backward_dinp(a, out):
    """dout (0.5 (1 + tanh) + 0.5 x sech^2 s (1 + 3 c x^2)), c = GELU_COEF, term by term."""
    x = a["inp"]
    arg = GELU_SCALING * (x + GELU_COEF * x ** 3)
    sech2 = 1.0 / np.cosh(np.clip(arg, -350, 350)) ** 2
    return np.abs(a["dout"]) * (0.5 * (1 + np.abs(np.tanh(arg)))
                                + np.abs(0.5 * x * sech2 * GELU_SCALING * (1 + 3 * GELU_COEF * x * x)))


# -- AdamW

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


def adamw_m(a, out):
    return adamw_magnitudes(a["param"], a["m"], a["grad"], out.get("v"), a)[0]


def adamw_param(a, out):
    return adamw_magnitudes(a["param"], a["m"], a["grad"], out.get("v"), a)[1]
