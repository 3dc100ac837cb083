"""The kernels of llm.c's ``train_gpt2.c`` in functional PyTorch, backward by hand.

The same protocol as ``pyref.numpy_kernels`` (docs/kernels.md), written as someone porting
the C to torch would: forward kernels return new tensors; backward kernels accumulate into
the gradient tensors they are given with in-place ``add_`` (which lands in the caller's
NumPy buffers when the tensors were made with ``torch.from_numpy``). No autograd.
Dtype-generic (float32 or float64), CPU.
"""
from __future__ import annotations

import math

import torch

BACKEND = "torch"

from .constants import ATT_MAXVAL_INIT, GELU_COEF, GELU_SCALING, LN_EPS  # noqa: E402 -- patched by tests


def _heads(a, NH):
    """(B,T,C) -> (B,NH,T,hs)."""
    B, T, C = a.shape
    return a.reshape(B, T, NH, C // NH).transpose(1, 2)


def _unheads(a):
    """(B,NH,T,hs) -> (B,T,C)."""
    B, NH, T, hs = a.shape
    return a.transpose(1, 2).reshape(B, T, NH * hs)


def _causal(T, device=None):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------- encoder

def encoder_forward(inp, wte, wpe):
    """C ``encoder_forward``: out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]."""
    T = inp.shape[1]
    return wte[inp.long()] + wpe[:T]


def encoder_backward(dwte, dwpe, dout, inp):
    """C ``encoder_backward``: dwte[inp[b,t]] += dout[b,t]; dwpe[t] += dout[b,t]."""
    B, T, C = dout.shape
    dwte.index_add_(0, inp.reshape(-1).long(), dout.reshape(B * T, C))  # repeats accumulate
    dwpe[:T].add_(dout.sum(0))


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(inp, weight, bias):
    """C ``layernorm_forward``: biased variance, rstd = 1/sqrt(var + 1e-5)."""
    mean = inp.mean(-1)
    xshift = inp - mean[..., None]
    var = (xshift * xshift).mean(-1)
    rstd = 1.0 / torch.sqrt(var + LN_EPS)
    out = (rstd[..., None] * xshift) * weight + bias
    return out, mean, rstd


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """C ``layernorm_backward``."""
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = weight * dout
    dnorm_mean = dnorm.mean(-1, keepdim=True)
    dnorm_norm_mean = (dnorm * norm).mean(-1, keepdim=True)
    lead = tuple(range(dout.dim() - 1))
    dbias.add_(dout.sum(lead))
    dweight.add_((norm * dout).sum(lead))
    dinp.add_(((dnorm - dnorm_mean) - norm * dnorm_norm_mean) * rstd[..., None])


# ----------------------------------------------------------------------------- matmul

def matmul_forward(inp, weight, bias):
    """C ``matmul_forward``: out = inp @ weight.T + bias (bias may be None)."""
    out = inp @ weight.T
    return out + bias if bias is not None else out


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    """C ``matmul_backward``: dinp += dout @ weight; dweight += dout^T @ inp; dbias += sum dout."""
    C, OC = inp.shape[-1], weight.shape[0]
    dout2, inp2 = dout.reshape(-1, OC), inp.reshape(-1, C)
    dinp.add_((dout2 @ weight).reshape(dinp.shape))
    dweight.add_(dout2.T @ inp2)
    if dbias is not None:
        dbias.add_(dout2.sum(0))


# ----------------------------------------------------------------------------- attention

def attention_forward(inp, NH):
    """C ``attention_forward``: causal softmax(q k^T / sqrt(hs)) v, per head, with the
    softmax's max starting at -10000; att is 0 above the diagonal (preatt: 0 there too)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (_heads(x, NH) for x in inp.split(C, dim=-1))
    mask = _causal(T, inp.device)
    preatt = ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))).masked_fill(~mask, 0.0)
    maxval = preatt.masked_fill(~mask, -math.inf).amax(-1, keepdim=True).clamp(min=ATT_MAXVAL_INIT)
    att = torch.exp((preatt - maxval).masked_fill(~mask, -math.inf))
    expsum = att.sum(-1, keepdim=True)
    att = att * torch.where(expsum == 0, torch.zeros_like(expsum), 1.0 / expsum)
    return _unheads(att @ v), preatt, att


def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):
    """C ``attention_backward``; like the C, the softmax and q/k steps read the accumulated
    ``datt`` / ``dpreatt`` buffers, and their upper triangles are left untouched."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs)
    q, k, v = (_heads(x, NH) for x in inp.split(C, dim=-1))
    dout_h = _heads(dout, NH)
    mask = _causal(T, inp.device)
    datt.add_((dout_h @ v.transpose(-2, -1)).masked_fill(~mask, 0.0))
    dv = att.transpose(-2, -1) @ dout_h
    datt_c = datt.masked_fill(~mask, 0.0)
    dpreatt.add_((att * (datt_c - (att * datt_c).sum(-1, keepdim=True))).masked_fill(~mask, 0.0))
    dpreatt_c = dpreatt.masked_fill(~mask, 0.0)
    dq = (dpreatt_c @ k) * scale
    dk = (dpreatt_c.transpose(-2, -1) @ q) * scale
    dinp.add_(torch.cat([_unheads(dq), _unheads(dk), _unheads(dv)], dim=-1))


# ----------------------------------------------------------------------------- gelu

GELU_S = GELU_SCALING


def gelu_forward(inp):
    """C ``gelu_forward``: 0.5*x*(1 + tanh(s*(x + 0.044715*x^3))), s = sqrt(2/pi)."""
    x = inp
    return 0.5 * x * (1.0 + torch.tanh(GELU_S * (x + GELU_COEF * x * x * x)))


def gelu_backward(dinp, inp, dout):
    """C ``gelu_backward``: sech^2 as 1/cosh^2 (0 where cosh^2 overflows, as in the C)."""
    x = inp
    a = GELU_S * (x + GELU_COEF * x * x * x)
    ch = torch.cosh(a)
    sech2 = 1.0 / (ch * ch)
    g = 0.5 * (1.0 + torch.tanh(a)) + x * 0.5 * sech2 * GELU_S * (1.0 + 3.0 * GELU_COEF * x * x)
    dinp.add_(g * dout)


# ----------------------------------------------------------------------------- residual

def residual_forward(inp1, inp2):
    """C ``residual_forward``."""
    return inp1 + inp2


def residual_backward(dinp1, dinp2, dout):
    """C ``residual_backward``."""
    dinp1.add_(dout)
    dinp2.add_(dout)


# ----------------------------------------------------------------------------- softmax / loss

def softmax_forward(logits, V):
    """C ``softmax_forward``: softmax over the first V columns (max from -10000), 0 after."""
    lv = logits[..., :V]
    maxval = lv.amax(-1, keepdim=True).clamp(min=ATT_MAXVAL_INIT)
    e = torch.exp(lv - maxval)
    probs = torch.zeros_like(logits)
    probs[..., :V] = e / e.sum(-1, keepdim=True)
    return probs


def crossentropy_forward(probs, targets):
    """C ``crossentropy_forward``: -log(probs[target])."""
    return -torch.log(probs.gather(-1, targets.long()[..., None])[..., 0])


def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
    """C ``crossentropy_softmax_backward``: dlogits[:V] += (probs - onehot) * dloss."""
    ind = torch.nn.functional.one_hot(targets.long(), V).to(probs.dtype)
    dlogits[..., :V].add_((probs[..., :V] - ind) * dlosses[..., None])


# ----------------------------------------------------------------------------- AdamW

@torch.no_grad()
def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    """C ``gpt2_update``: AdamW with bias correction and decoupled weight decay, in place.
    The hyperparameters are the C's ``float`` arguments: rounded to float32 first.
    Contiguous buffers are processed in blocks so the temporaries stay small."""
    lr, beta1, beta2, eps, wd = (torch.tensor(x, dtype=torch.float32).to(param.dtype)
                                 for x in (lr, beta1, beta2, eps, weight_decay))
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    bufs = (param, grad, m, v)
    if all(b.is_contiguous() for b in bufs):
        flat = [b.view(-1) for b in bufs]
        blocks = [slice(i, i + (1 << 22)) for i in range(0, param.numel(), 1 << 22)]
    else:
        flat, blocks = bufs, [slice(None)]
    P, G, M, Vv = flat
    for s in blocks:
        p, g, mm, vv = P[s], G[s], M[s], Vv[s]
        mm.mul_(beta1).add_((1 - beta1) * g)
        vv.mul_(beta2).add_((1 - beta2) * g * g)
        m_hat = mm / bc1
        v_hat = vv / bc2
        p.sub_(lr * (m_hat / (torch.sqrt(v_hat) + eps) + wd * p))


gpt2_update = adamw
