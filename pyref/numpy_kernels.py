"""The kernels of llm.c's ``train_gpt2.c`` in NumPy: forward returns, backward accumulates.

A line-by-line counterpart of the C kernels, vectorised over the loops the C runs in
parallel (or whose order only changes rounding). Shapes and layouts are the C's (see
docs/kernels.md): ``inp`` (B,T,C), ``qkv`` (B,T,3C), logits/probs (B,T,Vp), weights (OC,C).

Dtype-generic: the same code runs in float32 (what the C computes, up to summation order)
and in float64 (the oracle). Outputs have the input dtype; nothing is silently up- or
down-cast. In float32 the constants are the C's float constants (``1e-5f``,
``sqrtf(2.0f/M_PI)``, ...), evaluated in float32 where the C does; in float64 they are the
exact (double) values of the same formulas, so the oracle is the C's formula in exact-ish
arithmetic and float32 results sit within float32 rounding of it.

Every ``*_backward`` accumulates (``+=``) into the gradient arrays it is given, in place,
and works when they are views into a bigger flat buffer (as in the model).
"""
from __future__ import annotations

import numpy as np

BACKEND = "numpy"

# The C's constants, module attributes read at call time: tests build mutants by patching them
from pyref.constants import ATT_MAXVAL_INIT, GELU_COEF, LN_EPS, Held  # noqa: E402 -- absolute: harness.diagnosis.catalogue._common loads a private copy of this file


def _c(x, dtype):
    """A C float constant in ``dtype`` (float32: the literal rounded as the C's ``...f``)."""
    return np.dtype(dtype).type(x)


def _heads(a, NH):
    """(B,T,C) -> (B,NH,T,hs): head h is channels h*hs..(h+1)*hs, as the C indexes it."""
    B, T, C = a.shape
    return a.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def _unheads(a):
    """(B,NH,T,hs) -> (B,T,C), the inverse of ``_heads`` (a new contiguous array)."""
    B, NH, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


def _causal(T):
    """mask[t, t2] = t2 <= t: the entries the C's loops visit."""
    return np.tril(np.ones((T, T), dtype=bool))


# ----------------------------------------------------------------------------- encoder

def encoder_forward(inp, wte, wpe):
    """C ``encoder_forward``: for b, t: out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]."""
    T = inp.shape[1]
    return wte[inp] + wpe[:T]


def encoder_backward(dwte, dwpe, dout, inp):
    """C ``encoder_backward``: for b, for t, for i: dwte[ix,i] += d; dwpe[t,i] += d.

    ``np.add.at`` is an unbuffered scatter that visits (b,t) in the C's order, so repeated
    token ids accumulate (a fancy-index ``+=`` would keep only the last one).
    """
    B, T, C = dout.shape
    np.add.at(dwte, inp.reshape(-1), dout.reshape(B * T, C))
    for b in range(B):  # the C adds into dwpe[t] once per b, in b order
        dwpe[:T] += dout[b]


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(inp, weight, bias):
    """C ``layernorm_forward``, per (b,t): m = sum(x)/C; v = sum((x-m)^2)/C;
    s = 1/sqrt(v + eps); out = (s*(x-m))*w + b. Returns (out, mean, rstd)."""
    dt = inp.dtype
    C = inp.shape[-1]
    eps = _c(LN_EPS, dt)
    mean = inp.sum(-1) / _c(C, dt)
    xshift = inp - mean[..., None]
    var = (xshift * xshift).sum(-1) / _c(C, dt)   # biased variance
    rstd = _c(1, dt) / np.sqrt(var + eps)
    out = (rstd[..., None] * xshift) * weight + bias
    return out, mean, rstd


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """C ``layernorm_backward``, per (b,t): norm = (x-mean)*rstd; dnorm = w*dout;
    dnorm_mean = sum(dnorm)/C; dnorm_norm_mean = sum(dnorm*norm)/C; then
    dbias += dout; dweight += norm*dout; dinp += ((dnorm - dnorm_mean) - norm*dnorm_norm_mean)*rstd."""
    dt = inp.dtype
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = weight * dout
    dnorm_mean = dnorm.sum(-1, keepdims=True) / _c(C, dt)
    dnorm_norm_mean = (dnorm * norm).sum(-1, keepdims=True) / _c(C, dt)
    lead = tuple(range(dout.ndim - 1))          # the (b,t) loops the C sums over
    dbias += dout.sum(lead)
    dweight += (norm * dout).sum(lead)
    dinp += ((dnorm - dnorm_mean) - norm * dnorm_norm_mean) * rstd[..., None]


# ----------------------------------------------------------------------------- matmul

def matmul_forward(inp, weight, bias):
    """C ``matmul_forward`` (and ``matmul_forward_naive``): for bt, for o:
    out[bt,o] = bias[o] + sum_i inp[bt,i]*weight[o,i]; bias may be None (0)."""
    C = inp.shape[-1]
    OC = weight.shape[0]
    out = inp.reshape(-1, C) @ weight.T
    if bias is not None:
        out += bias
    return out.reshape(*inp.shape[:-1], OC)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    """C ``matmul_backward``: dinp[bt,i] += sum_o weight[o,i]*dout[bt,o]; then per o:
    dbias[o] += sum_bt dout[bt,o] (when dbias is not None);
    dweight[o,i] += sum_bt inp[bt,i]*dout[bt,o]."""
    C = inp.shape[-1]
    OC = weight.shape[0]
    dout2 = dout.reshape(-1, OC)
    dinp += (dout2 @ weight).reshape(dinp.shape)
    if dbias is not None:
        dbias += dout2.sum(0)
    dweight += dout2.T @ inp.reshape(-1, C)


# ----------------------------------------------------------------------------- attention

def attention_forward(inp, NH):
    """C ``attention_forward``, per (b,t,h): preatt[t2] = (q.k[t2])*scale for t2 <= t,
    scale = 1/sqrt(hs); maxval = max(-10000, max preatt); att[t2] = exp(preatt[t2]-maxval);
    expsum = sum att; att *= (expsum == 0 ? 0 : 1/expsum); att[t2] = 0 for t2 > t;
    out = sum_{t2<=t} att[t2]*v[t2]. Returns (out, preatt, att); preatt's upper triangle
    (never written by the C) is 0 here."""
    dt = inp.dtype
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    # 1.0 / sqrtf(hs): sqrtf in float, the division in double, stored as float
    scale = _c(1.0 / float(np.sqrt(_c(hs, dt))), dt)
    q, k, v = (_heads(inp[..., i * C:(i + 1) * C], NH) for i in range(3))
    mask = _causal(T)
    preatt = np.where(mask, (q @ k.transpose(0, 1, 3, 2)) * scale, _c(0, dt))
    maxval = np.maximum(np.where(mask, preatt, -np.inf).max(-1, keepdims=True),
                        _c(ATT_MAXVAL_INIT, dt))
    att = np.exp(np.where(mask, preatt - maxval, -np.inf))   # exp(-inf) = 0 above the diagonal
    expsum = att.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        expsum_inv = np.where(expsum == 0, _c(0, dt), _c(1, dt) / expsum)
    att *= expsum_inv
    out = _unheads(att @ v)
    return out, preatt, att


def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):
    """C ``attention_backward``, per (b,t,h), t2 <= t:
    datt[t2] += v[t2].dout; dv[t2] += att[t2]*dout; then
    dpreatt[t3] += sum_t2 att[t2]*((t2==t3) - att[t3])*datt[t2]; then
    dq += sum_t2 k[t2]*dpreatt[t2]*scale; dk[t2] += q*dpreatt[t2]*scale.

    As in the C, the softmax and q/k steps read the *accumulated* ``datt`` and ``dpreatt``
    buffers (whatever they held before the call plus this call's contribution). The upper
    triangles (t2 > t) of datt and dpreatt are left untouched.
    """
    dt = inp.dtype
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = _c(1, dt) / np.sqrt(_c(hs, dt))   # 1.f / sqrtf(hs)
    q, k, v = (_heads(inp[..., i * C:(i + 1) * C], NH) for i in range(3))
    dout_h = _heads(dout, NH)
    mask = _causal(T)
    # backward pass 4: through the value accumulation
    np.add(datt, dout_h @ v.transpose(0, 1, 3, 2), out=datt, where=mask)
    dv = att.transpose(0, 1, 3, 2) @ dout_h
    # backward pass 2 & 3: the softmax (reads the accumulated datt)
    datt_c = np.where(mask, datt, _c(0, dt))
    dsoft = att * (datt_c - (att * datt_c).sum(-1, keepdims=True))
    np.add(dpreatt, dsoft, out=dpreatt, where=mask)
    # backward pass 1: the query @ key matmul (reads the accumulated dpreatt)
    dpreatt_c = np.where(mask, dpreatt, _c(0, dt))
    dq = (dpreatt_c @ k) * scale
    dk = (dpreatt_c.transpose(0, 1, 3, 2) @ q) * scale
    dinp += np.concatenate([_unheads(dq), _unheads(dk), _unheads(dv)], axis=-1)


# ----------------------------------------------------------------------------- gelu

def _gelu_s(dt):
    """GELU_SCALING_FACTOR = sqrtf(2.0f / M_PI): 2/pi in double, sqrtf in float."""
    return np.sqrt(_c(2.0 / np.pi, dt))


def gelu_forward(inp):
    """C ``gelu_forward``: out = 0.5f*x*(1.0f + tanhf(s*(x + 0.044715f*x*x*x)))."""
    dt = inp.dtype
    x = inp
    cube = _c(GELU_COEF, dt) * x * x * x
    return _c(0.5, dt) * x * (_c(1, dt) + np.tanh(_gelu_s(dt) * (x + cube)))


def gelu_backward(dinp, inp, dout):
    """C ``gelu_backward``: a = s*(x + 0.044715f*x^3); th = tanh(a);
    sech2 = 1/(cosh(a)*cosh(a)); g = 0.5*(1+th) + x*0.5*sech2*s*(1 + 3*0.044715*x*x);
    dinp += g*dout. For large |a| cosh(a)^2 overflows to inf and sech2 becomes exactly 0,
    as in the C (which keeps this function out of -ffast-math's finite-math assumptions)."""
    dt = inp.dtype
    x = inp
    s = _gelu_s(dt)
    coef = _c(GELU_COEF, dt)
    a = s * (x + coef * x * x * x)
    th = np.tanh(a)
    with np.errstate(over="ignore"):
        ch = np.cosh(a)
        sech2 = _c(1, dt) / (ch * ch)
    g = _c(0.5, dt) * (_c(1, dt) + th) + \
        x * _c(0.5, dt) * sech2 * s * (_c(1, dt) + _c(3, dt) * coef * x * x)
    dinp += g * dout


# ----------------------------------------------------------------------------- residual

def residual_forward(inp1, inp2):
    """C ``residual_forward``: out[i] = inp1[i] + inp2[i]."""
    return inp1 + inp2


def residual_backward(dinp1, dinp2, dout):
    """C ``residual_backward``: dinp1[i] += dout[i]; dinp2[i] += dout[i]."""
    dinp1 += dout
    dinp2 += dout


# ----------------------------------------------------------------------------- softmax / loss

def softmax_forward(logits, V):
    """C ``softmax_forward``, per (b,t): maxval = max(-10000, max_{i<V} logits[i]);
    probs[i] = exp(logits[i]-maxval) / sum for i < V; probs[i] = 0 for V <= i < Vp."""
    dt = logits.dtype
    lv = logits[..., :V]
    maxval = np.maximum(lv.max(-1, keepdims=True), _c(ATT_MAXVAL_INIT, dt))
    probs = np.zeros_like(logits)
    e = np.exp(lv - maxval)
    probs[..., :V] = e / e.sum(-1, keepdims=True)
    return probs


def crossentropy_forward(probs, targets):
    """C ``crossentropy_forward``: losses[b,t] = -log(probs[b,t,targets[b,t]])."""
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    return -np.log(p)


def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
    """C ``crossentropy_softmax_backward``, per (b,t), for i < V:
    dlogits[i] += (probs[i] - (i == target)) * dloss. Columns V..Vp are untouched."""
    dt = probs.dtype
    ind = np.zeros(probs.shape[:-1] + (V,), dtype=dt)
    np.put_along_axis(ind, targets[..., None].astype(np.intp), _c(1, dt), axis=-1)
    dlogits[..., :V] += (probs[..., :V] - ind) * dlosses[..., None]


# ----------------------------------------------------------------------------- AdamW

def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """C ``gpt2_update`` (AdamW), for each i:
    m = beta1*m + (1-beta1)*g; v = beta2*v + (1-beta2)*g*g;
    m_hat = m/(1-beta1^t); v_hat = v/(1-beta2^t);
    param -= lr*(m_hat/(sqrt(v_hat)+eps) + weight_decay*param).
    Updates param, m, v in place; t counts from 1. Processed in blocks so that the
    temporaries stay small for 124M-parameter buffers.

    The hyperparameters are ``float`` arguments of the C function, so they are rounded to
    float32 first, in both dtypes: ``1 - beta2`` would otherwise amplify the rounding of
    beta2 = 0.999 a thousandfold (float32(0.999) is 1 - 0.00099998713...). A setting
    given as :class:`pyref.constants.Held` (an optimizer's own double, the C's setting up to
    that rounding) is used as given."""
    dt = param.dtype
    lr, beta1, beta2, eps, wd = (_c(x if isinstance(x, Held) else np.float32(x), dt)
                                 for x in (lr, beta1, beta2, eps, weight_decay))
    one = _c(1, dt)
    bc1 = one - beta1 ** int(t)   # 1.0f - powf(beta1, t)
    bc2 = one - beta2 ** int(t)
    flat = [a.reshape(-1) if a.flags.c_contiguous else None for a in (param, grad, m, v)]
    if any(f is None for f in flat):   # non-contiguous: whole-array, still in place
        blocks, arrays = [slice(None)], (param, grad, m, v)
    else:
        n, step = flat[0].size, 1 << 20
        blocks, arrays = [slice(i, i + step) for i in range(0, n, step)], flat
    P, G, M, Vv = arrays
    for s in blocks:
        p, g, mm, vv = P[s], G[s], M[s], Vv[s]
        mm *= beta1
        mm += (one - beta1) * g
        vv *= beta2
        vv += (one - beta2) * g * g
        m_hat = mm / bc1
        v_hat = vv / bc2
        upd = m_hat / (np.sqrt(v_hat) + eps)
        upd += wd * p
        upd *= lr
        p -= upd


gpt2_update = adamw
