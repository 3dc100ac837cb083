"""Diagnosis: a failing check names the catalogued change of semantics that explains it.

Every kernel variant of harness.diagnosis.CATALOGUE has a port here that carries the change,
written independently of the variant's own float64 code (float32 NumPy, the way a port
would be written): its per-op check fails and is diagnosed with exactly that cause. Every
family also has edits of llmc/train_gpt2.c (built into a temporary folder, several edits
of different functions per build so that three builds suffice), checked per op and, for
one build, through whole training steps (replay and update); the loss mean over B*T±1,
which is the model's and no kernel's, is an edit of gpt2_forward and gpt2_backward checked
through a step. Failures that no catalogued change explains say "no known cause", and
passing checks do no diagnosis work.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import edit_function, pristine_source
from test_intermediate_causes import _port_without

from harness import (CATALOGUE, VARIANT_BY_ID, CKernels, DiagnosedComparison, assert_kernel, build_library,
                     check_kernel, first_divergence_check, load_library, make_inputs, run_parity)
from harness import report as R
from harness.arbiter.compare import ParityError
from pyref.cases import SHAPE_BY_NAME
from pyref.spec import SPEC
from pyref import numpy_kernels as nk
from pyref import synth
from pyref.config import PRESETS, param_shapes
from pyref.protocol import KernelSet

ROOT = Path(__file__).resolve().parents[2]
F = np.float32
BASE = SHAPE_BY_NAME["base"]


def _port(kernel, fn) -> KernelSet:
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs[kernel] = fn
    return KernelSet(funcs, backend="numpy", name=f"port ({kernel} changed)")


def _failures(impl, kernel, shape=BASE, seed=0):
    results = check_kernel(impl, kernel, make_inputs(SPEC[kernel], shape, seed=seed))
    return [c for c in results if not c.passed]


def _assert_diagnosed(failed, variant_id, also=()):
    """Each failing output is diagnosed with ``variant_id`` (and at most ``also``)."""
    assert failed, f"the port carrying {variant_id} passed its check"
    for c in failed:
        assert isinstance(c, DiagnosedComparison) and not c.passed
        ids = set(c.diagnosis.ids)
        assert variant_id in ids, f"{c.name}: {c.diagnosis.text()}"
        assert ids <= {variant_id, *also}, f"{c.name}: unrelated causes in {c.diagnosis.text()}"


# ----------------------------------------------------------------------------- ports
# float32 ports, each with one change, written the way a port would carry it

def _erf32(x):
    return np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(F)


def gelu_erf_fwd(inp):
    return F(0.5) * inp * (F(1) + _erf32(inp / F(math.sqrt(2))))


def gelu_erf_bwd(dinp, inp, dout):
    cdf = F(0.5) * (F(1) + _erf32(inp / F(math.sqrt(2))))
    pdf = np.exp(F(-0.5) * inp * inp) / F(math.sqrt(2 * math.pi))
    dinp += (cdf + inp * pdf) * dout


def _gelu_tanh_arg(x, coef):
    return F(math.sqrt(2 / math.pi)) * (x + F(coef) * x * x * x)


def gelu_coef_fwd(inp):
    return F(0.5) * inp * (F(1) + np.tanh(_gelu_tanh_arg(inp, 0.0447)))


def gelu_coef_bwd(dinp, inp, dout):
    coef = F(0.04472)
    a = _gelu_tanh_arg(inp, coef)
    sech2 = F(1) / np.cosh(a) ** 2
    g = F(0.5) * (F(1) + np.tanh(a)) + inp * F(0.5) * sech2 * F(math.sqrt(2 / math.pi)) * \
        (F(1) + F(3) * coef * inp * inp)
    dinp += g * dout


def layernorm_port(eps=1e-5, ddof=0):
    def layernorm_forward(inp, weight, bias):
        C = inp.shape[-1]
        m = inp.sum(-1, keepdims=True) / F(C)
        v = ((inp - m) ** 2).sum(-1, keepdims=True) / F(C - ddof)
        s = F(1) / np.sqrt(v + F(eps))
        return (s * (inp - m)) * weight + bias, m[..., 0], s[..., 0]
    return layernorm_forward


def attention_port(scale=None, diagonal=True, causal=True):
    def attention_forward(inp, NH):
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        sc = F(1 / math.sqrt(hs)) if scale is None else F(scale(hs))
        q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
        visit = np.tril(np.ones((T, T), bool), 0 if diagonal else -1) if causal else np.ones((T, T), bool)
        pre = np.where(visit, (q @ k.transpose(0, 1, 3, 2)) * sc, F(0))
        mx = np.maximum(np.where(visit, pre, -np.inf).max(-1, keepdims=True), F(-10000))
        e = np.exp(np.where(visit, pre - mx, -np.inf)).astype(F)
        s = e.sum(-1, keepdims=True)
        att = np.where(s > 0, e / np.where(s > 0, s, F(1)), F(0)).astype(F)
        return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C), pre.astype(F), att
    return attention_forward


def attention_any_port(order="qkv", split="heads-major", merge="transpose", axis=-1, diagonal=0, scale=None,
                       masking="-inf", per_head=False, upper=False, k_is_q=False, nh_major=False, tril_bias=False):
    """attention_forward in float32 with one of the mistakes of a hand-written port: q, k, v
    in another order, the heads split or merged in another layout, the softmax over the
    queries, the mask off by a diagonal, a scale by another dimension; k = q; the heads
    batched (NH*B) and read back as (B*NH); the 0/1 tril added to the scores as the mask."""
    def attention_forward(inp, NH):
        B, T, C3 = inp.shape
        C = C3 // 3
        hs = C // NH
        parts = dict(zip(order, np.split(inp, 3, axis=-1)))
        if k_is_q:
            parts["k"] = parts["q"]
        if per_head:        # (B, T, NH, 3, hs): q, k, v interleaved per head
            parts = dict(zip("qkv", (x.reshape(B, T, C) for x in
                                     np.moveaxis(inp.reshape(B, T, NH, 3, hs), 3, 0))))
        if split == "no-transpose":
            q, k, v = (parts[x].reshape(B, NH, T, hs) for x in "qkv")
        elif split == "interleaved":
            q, k, v = (parts[x].reshape(B, T, hs, NH).transpose(0, 3, 1, 2) for x in "qkv")
        else:
            q, k, v = (parts[x].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for x in "qkv")
        sc = F(1 / math.sqrt(hs)) if scale is None else F(scale(hs, C))
        visit = np.tril(np.ones((T, T), bool), diagonal)
        if upper:
            visit = visit.T
        scores = (q @ k.transpose(0, 1, 3, 2)) * sc
        if masking == "after" or tril_bias:
            pre = (scores + visit.astype(F) if tril_bias else scores).astype(F)
        else:
            pre = np.where(visit, scores, F(-np.inf) if masking == "-inf" else F(masking)).astype(F)
        e = np.exp(pre - pre.max(axis, keepdims=True)).astype(F)
        att = (e / e.sum(axis, keepdims=True)).astype(F)
        if masking == "after":
            att = np.where(visit, att, F(0))
        if tril_bias:
            pre = scores.astype(F)
        y = att @ v
        if nh_major:        # batched (NH*B, T, hs), viewed back as (B, NH, T, hs)
            y = y.transpose(1, 0, 2, 3).reshape(B, NH, T, hs)
        if merge == "interleaved":
            out = y.transpose(0, 2, 3, 1).reshape(B, T, C)
        elif merge == "transpose-2-3":       # (B,NH,hs,T) viewed as (B,T,C)
            out = y.transpose(0, 1, 3, 2).reshape(B, T, C)
        else:
            out = y.reshape(B, T, C) if merge == "no-transpose" else y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return out, np.where(visit, pre, F(0)), att
    return attention_forward


def attention_scaled_after(inp, NH):
    """The scores unscaled, the output scaled by 1/sqrt(hs) after the softmax (the port
    returns the C's preatt and att: only its output is off)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    scores = np.where(np.tril(np.ones((T, T), bool)), q @ k.transpose(0, 1, 3, 2), F(-np.inf))
    e = np.exp(scores - scores.max(-1, keepdims=True))
    y = (e / e.sum(-1, keepdims=True)) @ v * F(1 / math.sqrt(hs))
    _, preatt, att = nk.attention_forward(inp, NH)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C).astype(F), preatt, att


def gelu_power_fwd(inp):
    return F(0.5) * inp * (F(1) + np.tanh(F(math.sqrt(2 / math.pi)) * (inp + F(0.044715) * inp * inp)))


def gelu_power_bwd(dinp, inp, dout):
    s, c = F(math.sqrt(2 / math.pi)), F(0.044715)
    th = np.tanh(s * (inp + c * inp * inp))
    dinp += (F(0.5) * (F(1) + th) + inp * F(0.5) * (F(1) - th * th) * s * (F(1) + F(2) * c * inp)) * dout


def gelu_before_matmul(inp, weight, bias):
    """c_fc applied to GELU(inp): GELU moved before the MLP's first matmul."""
    return nk.matmul_forward(nk.gelu_forward(inp), weight, bias)


def layernorm_plus_one(inp, weight, bias):
    return nk.layernorm_forward(inp, weight + F(1), bias)


def ce_backward_log_eps(dlogits, dlosses, probs, targets, V):
    """The gradient of -log(p + 1e-8) through the softmax: dloss * p/(p + eps) * (probs - onehot)."""
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), -1)[..., 0]
    nk.crossentropy_softmax_backward(dlogits, dlosses * (p / (p + F(1e-8))), probs, targets, V)


def layernorm_swapped(inp, weight, bias):
    out, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return ((out - bias) / np.where(weight == 0, F(1), weight) * bias + weight).astype(F), mean, rstd


def layernorm_form_port(form):
    """A layer norm with another normalisation (an RMS norm; no square root); the mean and
    rstd it returns are the C's (it has none of its own to compare)."""
    def layernorm_forward(inp, weight, bias):
        _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
        m = inp.mean(-1, keepdims=True)
        if form == "rms":
            n = inp / np.sqrt((inp * inp).mean(-1, keepdims=True) + F(1e-5))
        else:
            n = (inp - m) / (((inp - m) ** 2).mean(-1, keepdims=True) + F(1e-5))
        return (n * weight + bias).astype(F), mean, rstd
    return layernorm_forward


def layernorm_outside_port(eps):
    def layernorm_forward(inp, weight, bias):
        m = inp.mean(-1, keepdims=True)
        s = F(1) / (np.sqrt(((inp - m) ** 2).mean(-1, keepdims=True)) + F(eps))
        return (s * (inp - m)) * weight + bias, m[..., 0], s[..., 0]
    return layernorm_forward


def layernorm_over_positions(inp, weight, bias):
    """The statistics over the positions; the mean and rstd it returns are the C's (a port
    normalising over T has none per position: only its output is wrong)."""
    m = inp.mean(1, keepdims=True)
    v = ((inp - m) ** 2).mean(1, keepdims=True)
    out = (inp - m) / np.sqrt(v + F(1e-5)) * weight + bias
    _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return out.astype(F), mean, rstd


def layernorm_over_positions_and_channels(inp, weight, bias):
    """The statistics over (T, C) together (torch.var_mean over dims (-2, -1)); the mean and
    rstd returned are the C's, as in layernorm_over_positions."""
    var, m = inp.var(axis=(1, 2), keepdims=True), inp.mean(axis=(1, 2), keepdims=True)
    out = (inp - m) / np.sqrt(var + F(1e-5)) * weight + bias
    _, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    return out.astype(F), mean, rstd


def softmax_scaled(k):
    def softmax_forward(logits, V):
        z = logits[..., :V] * F(k)
        e = np.exp(z - z.max(-1, keepdims=True))
        out = np.zeros_like(logits)
        out[..., :V] = e / e.sum(-1, keepdims=True)
        return out
    return softmax_forward


def encoder_product(inp, wte, wpe):
    return wte[inp] * wpe[:inp.shape[1]]


def encoder_flat_positions(inp, wte, wpe):
    """Positions counted over the flattened batch: wpe[(b*T + t) % maxT]."""
    B, T = inp.shape
    return wte[inp] + wpe[np.arange(B * T).reshape(B, T) % wpe.shape[0]]


def encoder_port(shift=0, wte=True, wpe=True, reverse=False, wte_scale=None):
    def encoder_forward(inp, wte_, wpe_):
        T = inp.shape[1]
        out = np.zeros(inp.shape + (wte_.shape[1],), F)
        if wte:
            out = out + (wte_[inp] * F(wte_scale) if wte_scale else wte_[inp])
        if wpe:
            out = out + wpe_[(np.arange(T) + shift)[::-1] if reverse else np.arange(T) + shift]
        return out
    return encoder_forward


def residual_port(branch=1.0, stream=1.0):
    def residual_forward(inp1, inp2):
        return F(stream) * inp1 + F(branch) * inp2
    return residual_forward


def ce_backward_port(smoothing=0.0, factor=1.0, ignore=False):
    """The loss's backward as torch computes cross_entropy(label_smoothing=, reduction=,
    ignore_index=): smoothed targets, another divisor, positions ignored (those whose
    target is the first position's) with the mean over the rest."""
    def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
        target = np.zeros(probs.shape[:-1] + (V,), F)
        np.put_along_axis(target, targets[..., None].astype(np.intp), F(1), -1)
        target = F(1 - smoothing) * target + F(smoothing / V)
        dl = dlosses * F(factor)
        if ignore:
            skip = targets == targets.flat[0]
            dl = np.where(skip, F(0), dl * F(skip.size / (skip.size - skip.sum())))
        dlogits[..., :V] += (probs[..., :V] - target) * dl[..., None]
    return crossentropy_softmax_backward


def scaled_port(kernel, factor=1.0, offset=0.0):
    """Any forward kernel with a constant factor or offset on its (first) output."""
    f = getattr(nk, kernel)

    def port(*args):
        out = f(*args)
        first = out[0] if isinstance(out, tuple) else out
        first = (first * F(factor) + F(offset)).astype(F)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return port


def attention_bwd_scale(factor):
    """The backward with dq, dk scaled by ``factor(hs)`` instead of 1/sqrt(hs)."""
    def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):
        C = inp.shape[-1] // 3
        hs = C // NH
        before = dinp.copy()
        nk.attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)
        delta = dinp[..., :2 * C] - before[..., :2 * C]
        dinp[..., :2 * C] = before[..., :2 * C] + delta * F(factor(hs) * math.sqrt(hs))
    return attention_backward


def softmax_padded(logits, V):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ce_log_eps(probs, targets):
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    return -np.log(p + F(1e-6))


def _shifted(targets, step):
    out = targets.copy()
    if step > 0:
        out[:, :-1] = targets[:, 1:]        # the last position keeps its own label
    else:
        out[:, 1:] = targets[:, :-1]
    return out


def ce_forward_shift(step):
    return lambda probs, targets: nk.crossentropy_forward(probs, _shifted(targets, step))


def ce_backward_shift(step):
    def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
        nk.crossentropy_softmax_backward(dlogits, dlosses, probs, _shifted(targets, step), V)
    return crossentropy_softmax_backward


def ce_backward_shift_dropped(dlogits, dlosses, probs, targets, V):
    """A model's loss over logits[:, :-1] and targets[:, 1:]: position t scored against the
    target of t+1, the last position dropped, the mean over the B*(T-1) left."""
    B, T = targets.shape
    d = np.zeros_like(dlogits)
    nk.crossentropy_softmax_backward(d, dlosses * F(T / (T - 1)), probs, _shifted(targets, +1), V)
    d[:, -1] = 0
    dlogits += d


def matmul_fwd_no_bias(inp, weight, bias):
    return inp @ weight.T


def matmul_bwd_no_dbias(dinp, dweight, dbias, dout, inp, weight):
    nk.matmul_backward(dinp, dweight, None, dout, inp, weight)


def overwrite(kernel, arg):
    from pyref.protocol import SIGNATURES
    pos = SIGNATURES[kernel].index(arg)

    def port(*args):
        args[pos][...] = 0
        getattr(nk, kernel)(*args)
    return port


def last_term(kernel, arg):
    """The C's loop for ``arg`` with ``+=`` turned into ``=``, written out in its order."""
    def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        keep = {"dweight": dweight.copy(), "dbias": dbias.copy()}
        nk.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
        B, T, _ = dout.shape
        for b in range(B):
            for t in range(T):
                norm = (inp[b, t] - mean[b, t]) * rstd[b, t]
                keep["dbias"][:] = dout[b, t]
                keep["dweight"][:] = norm * dout[b, t]
        (dweight if arg == "dweight" else dbias)[:] = keep[arg]

    def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
        keep = {"dinp": dinp.copy(), "dweight": dweight.copy(), "dbias": dbias.copy()}
        nk.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
        B, T, OC = dout.shape
        for b in range(B):
            for t in range(T):
                for o in range(OC):
                    keep["dinp"][b, t] = weight[o] * dout[b, t, o]
                keep["dbias"][:] = dout[b, t]
                keep["dweight"][:] = np.outer(dout[b, t], inp[b, t])
        {"dinp": dinp, "dweight": dweight, "dbias": dbias}[arg][...] = keep[arg]

    def encoder_backward(dwte, dwpe, dout, inp):
        keep = {"dwte": dwte.copy(), "dwpe": dwpe.copy()}
        nk.encoder_backward(dwte, dwpe, dout, inp)
        B, T, _ = dout.shape
        for b in range(B):
            for t in range(T):
                keep["dwte"][inp[b, t]] = dout[b, t]
                keep["dwpe"][t] = dout[b, t]
        (dwte if arg == "dwte" else dwpe)[...] = keep[arg]

    return {"layernorm_backward": layernorm_backward, "matmul_backward": matmul_backward,
            "encoder_backward": encoder_backward}[kernel]


def _one_d_of_tiny():
    """Which of the tiny preset's parameters are biases or layernorm gains (by name)."""
    parts = [np.full(int(np.prod(s)), name.endswith("b") or name.startswith("ln"))
             for name, s in param_shapes(PRESETS["tiny"]).items()]
    return np.concatenate(parts)


def adamw_port(bias_correction=True, dt=0, eps_in_sqrt=False, l2=False, wd=None, betas=None,
               skip_1d=False, decay_without_lr=False):
    def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
        b1, b2 = (F(x) for x in (betas or (beta1, beta2)))
        decay = np.full(param.shape, F(weight_decay if wd is None else wd))
        if skip_1d:
            decay[_one_d_of_tiny()] = 0
        g = grad + decay * param if l2 else grad
        m[...] = b1 * m + (F(1) - b1) * g
        v[...] = b2 * v + (F(1) - b2) * g * g
        step = t + dt
        m_hat = m / (F(1) - b1 ** step) if bias_correction else m
        v_hat = v / (F(1) - b2 ** step) if bias_correction else v
        den = np.sqrt(v_hat + F(eps)) if eps_in_sqrt else np.sqrt(v_hat) + F(eps)
        if decay_without_lr:       # param *= 1 - wd, then the step
            param *= F(1) - decay
            param -= F(lr) * (m_hat / den)
            return
        param -= F(lr) * (m_hat / den + (F(0) if l2 else decay * param))
    return adamw


# variant id -> [(kernel, port)]: every variant, and every kernel it applies to where the
# per-op inputs can show it
PORTS = {
    "gelu.erf": [("gelu_forward", gelu_erf_fwd), ("gelu_backward", gelu_erf_bwd)],
    "gelu.cubic-constant": [("gelu_forward", gelu_coef_fwd), ("gelu_backward", gelu_coef_bwd),
                            # the decimal point slipped a place (BUGS6's first run: no known cause)
                            ("gelu_forward", lambda x: F(0.5) * x * (F(1) + np.tanh(_gelu_tanh_arg(x, 0.0044715))))],
    "layernorm.eps=1e-06": [("layernorm_forward", layernorm_port(eps=1e-6))],
    "layernorm.eps=1e-12": [("layernorm_forward", layernorm_port(eps=1e-12))],
    "layernorm.eps=0.0001": [("layernorm_forward", layernorm_port(eps=1e-4))],
    "layernorm.unbiased-variance": [("layernorm_forward", layernorm_port(ddof=1))],
    "attention.scale=1/hs": [("attention_forward", attention_port(scale=lambda hs: 1 / hs)),
                             ("attention_backward", attention_bwd_scale(lambda hs: 1 / hs))],
    "attention.no-scale": [("attention_forward", attention_port(scale=lambda hs: 1.0)),
                           ("attention_backward", attention_bwd_scale(lambda hs: 1.0))],
    "attention.scale": [("attention_forward", attention_any_port(scale=lambda hs, C: 1 / math.sqrt(C))),
                        ("attention_backward", attention_bwd_scale(lambda hs: 0.3))],
    "attention.mask-diagonal": [("attention_forward", attention_any_port(diagonal=1))],
    "attention.layout": [("attention_forward", attention_any_port(merge="no-transpose")),
                         ("attention_forward", attention_any_port(split="no-transpose")),
                         ("attention_forward", attention_any_port(split="interleaved")),
                         ("attention_forward", attention_any_port(merge="interleaved")),
                         ("attention_forward", attention_any_port(per_head=True)),
                         ("attention_forward", attention_any_port(merge="transpose-2-3")),
                         # BUGS6's first run: no known cause
                         ("attention_forward", attention_any_port(nh_major=True))],
    "attention.qkv-order": [*(("attention_forward", attention_any_port(order=o)) for o in ("kqv", "vkq")),
                            ("attention_forward", attention_any_port(k_is_q=True))],   # BUGS6
    "attention.softmax-axis": [("attention_forward", attention_any_port(axis=-2))],
    "layernorm.eps": [("layernorm_forward", layernorm_port(eps=5e-5)), ("layernorm_forward", layernorm_port(eps=1e-3))],
    "gelu.sigmoid": [("gelu_forward", lambda x: x / (F(1) + np.exp(F(-1.702) * x)))],
    "gelu.silu": [("gelu_forward", lambda x: x / (F(1) + np.exp(-x)))],
    "gelu.square": [("gelu_forward", gelu_power_fwd), ("gelu_backward", gelu_power_bwd)],
    "gelu.missing": [("gelu_forward", lambda x: x.copy()),
                     ("gelu_backward", lambda dinp, inp, dout: dinp.__iadd__(dout))],
    "gelu.twice": [("gelu_forward", lambda x: nk.gelu_forward(nk.gelu_forward(x)))],
    "gelu.order": [("matmul_forward", gelu_before_matmul, "wide")],
    "layernorm.affine-swapped": [("layernorm_forward", layernorm_swapped)],
    "layernorm.weight-plus-one": [("layernorm_forward", layernorm_plus_one)],
    "embedding.product": [("encoder_forward", encoder_product)],
    "layernorm.rms": [("layernorm_forward", layernorm_form_port("rms"))],
    "layernorm.no-sqrt": [("layernorm_forward", layernorm_form_port("no-sqrt"))],
    "attention.scale-after-softmax": [("attention_forward", attention_scaled_after)],
    "embedding.positions": [("encoder_forward", encoder_port(reverse=True)),
                            ("encoder_forward", encoder_flat_positions)],
    "embedding.table-scale": [("encoder_forward", encoder_port(wte_scale=math.sqrt(32)))],
    "attention.masking": [("attention_forward", attention_any_port(masking="after")),
                          ("attention_forward", attention_any_port(upper=True)),
                          ("attention_forward", attention_any_port(tril_bias=True))],     # BUGS6
    "attention.mask-fill": [("attention_forward", attention_any_port(masking=0.0)),
                            ("attention_forward", attention_any_port(masking=-1.0))],
    "gelu.tanh-scale": [("gelu_forward", lambda x: F(0.5) * x * (F(1) + np.tanh(F(math.sqrt(2) / math.pi) *
                                                                                  (x + F(0.044715) * x ** 3))))],
    "layernorm.eps-outside-sqrt": [("layernorm_forward", layernorm_outside_port(1e-5))],
    "layernorm.axis": [("layernorm_forward", layernorm_over_positions),
                       ("layernorm_forward", layernorm_over_positions_and_channels)],
    "gelu.relu": [("gelu_forward", lambda x: np.maximum(x, F(0))),
                  ("gelu_backward", lambda dinp, inp, dout: dinp.__iadd__((inp > 0).astype(F) * dout))],
    "crossentropy.logit-scale": [("softmax_forward", softmax_scaled(0.5))],
    "embedding.position-shift": [("encoder_forward", encoder_port(shift=1))],
    "embedding.no-wpe": [("encoder_forward", encoder_port(wpe=False))],
    "embedding.no-wte": [("encoder_forward", encoder_port(wte=False))],
    "residual.branch-scale": [("residual_forward", residual_port(branch=0.5)),
                              ("residual_forward", residual_port(stream=2.0))],
    "crossentropy.label-smoothing": [("crossentropy_softmax_backward", ce_backward_port(smoothing=0.1))],
    "crossentropy.divisor": [("crossentropy_softmax_backward", ce_backward_port(factor=4.0))],
    "crossentropy.ignored-positions": [("crossentropy_softmax_backward", ce_backward_port(ignore=True))],
    "output.scale": [(k, scaled_port(k, factor=1.001)) for k in ("layernorm_forward", "matmul_forward",
                                                                "gelu_forward", "softmax_forward")],
    "output.offset": [(k, scaled_port(k, offset=0.01)) for k in ("matmul_forward", "gelu_forward")],
    "attention.no-diagonal": [("attention_forward", attention_port(diagonal=False))],
    "attention.no-causal-mask": [("attention_forward", attention_port(causal=False))],
    # the softmax Jacobian's terms, each left out (tests/diagnosis/test_intermediate_causes.py: the C edited)
    "attention.jacobian-no-diagonal": [("attention_backward", _port_without("diagonal"))],
    "attention.jacobian-no-sum": [("attention_backward", _port_without("sum"))],
    "softmax.padded-columns": [("softmax_forward", softmax_padded)],
    "crossentropy.log-eps": [("crossentropy_forward", ce_log_eps),
                             ("crossentropy_softmax_backward", ce_backward_log_eps)],
    "labels.next-position": [("crossentropy_forward", ce_forward_shift(+1)),
                             ("crossentropy_softmax_backward", ce_backward_shift(+1)),
                             ("crossentropy_softmax_backward", ce_backward_shift_dropped)],
    "labels.previous-position": [("crossentropy_forward", ce_forward_shift(-1)),
                                 ("crossentropy_softmax_backward", ce_backward_shift(-1))],
    "matmul.no-bias": [("matmul_forward", matmul_fwd_no_bias), ("matmul_backward", matmul_bwd_no_dbias)],
    "backward.overwrite": [(k, overwrite(k, a)) for k, a in (
        ("encoder_backward", "dwte"), ("encoder_backward", "dwpe"), ("layernorm_backward", "dinp"),
        ("layernorm_backward", "dweight"), ("layernorm_backward", "dbias"), ("matmul_backward", "dinp"),
        ("matmul_backward", "dweight"), ("matmul_backward", "dbias"), ("attention_backward", "dinp"),
        ("gelu_backward", "dinp"), ("residual_backward", "dinp1"), ("residual_backward", "dinp2"),
        ("crossentropy_softmax_backward", "dlogits"))],
    "backward.last-term-only": [(k, last_term(k, a)) for k, a in (
        ("layernorm_backward", "dbias"), ("layernorm_backward", "dweight"), ("matmul_backward", "dinp"),
        ("matmul_backward", "dweight"), ("matmul_backward", "dbias"), ("encoder_backward", "dwte"),
        ("encoder_backward", "dwpe"))],
    "adamw.no-bias-correction": [("adamw", adamw_port(bias_correction=False))],
    "adamw.step+1": [("adamw", adamw_port(dt=+1))],
    "adamw.step-1": [("adamw", adamw_port(dt=-1))],
    "adamw.eps-in-sqrt": [("adamw", adamw_port(eps_in_sqrt=True))],
    "adamw.l2": [("adamw", adamw_port(l2=True))],
    "adamw.weight-decay=0.01": [("adamw", adamw_port(wd=0.01))],
    "adamw.weight-decay-without-lr": [("adamw", adamw_port(decay_without_lr=True))],     # BUGS6
    "adamw.no-decay-1d": [("adamw", adamw_port(skip_1d=True))],
    "adamw.betas=(0.9,0.95)": [("adamw", adamw_port(betas=(0.9, 0.95)))],
}
PORT_CASES = [pytest.param(vid, row[0], row[1], row[2] if len(row) > 2 else "base", id=f"{vid}-{row[0]}-{i}")
              for vid, rows in PORTS.items() for i, row in enumerate(rows)]


# a fitted variant names its cause by the constant found (attention.scale: 1/hs, 1), a
# variant with forms by the form found
CAUSE_OF = {"attention.scale=1/hs": "attention.scale", "attention.no-scale": "attention.scale",
            "embedding.positions": "embedding.position-shift", "gelu.silu": "gelu.sigmoid",
            "gelu.square": "gelu.power", "layernorm.rms": "layernorm.form", "layernorm.no-sqrt": "layernorm.form",
            "crossentropy.softmax-twice": "crossentropy.loss-of-probabilities",
            "crossentropy.no-log": "crossentropy.loss-of-probabilities"}


def test_every_variant_has_a_port_and_a_c_edit_per_family():
    assert {CAUSE_OF.get(v, v) for v in [*PORTS, *MODEL_LEVEL]} | {v for v, *_ in MEAN_EDITS} == set(VARIANT_BY_ID)
    assert {VARIANT_BY_ID[CAUSE_OF.get(v, v)].family for v, *_ in C_EDITS + MEAN_EDITS} == \
        {v.family for v in CATALOGUE}
    for v in CATALOGUE:        # each variant's kernels are covered by its ports (some are
        covered = {row[0] for c, rows in PORTS.items() if CAUSE_OF.get(c, c) == v.id for row in rows}
        assert covered <= set(v.kernels)   # (some are invisible per op: zero scratch buffers)


@pytest.mark.parametrize("variant_id, kernel, port, shape", PORT_CASES)
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    _assert_diagnosed(_failures(_port(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# variants that need what only a model's replay passes (the logits beside the loss's
# backward, the block's other tensors beside a residual): each with a float32 port, judged
# as the replay judges it, with the call the replay hands the diagnosis
def _ce_probs_port(form):
    def port(logits, dlosses, targets, V):
        z = logits[..., :V].astype(F)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, targets[..., None].astype(np.intp), F(1), -1)
        if form == "softmax-twice":
            q = np.exp(p - p.max(-1, keepdims=True))
            g = q / q.sum(-1, keepdims=True) - onehot
        else:
            g = -onehot
        out = np.zeros(logits.shape, F)
        out[..., :V] = dlosses[..., None] * p * (g - (p * g).sum(-1, keepdims=True))
        return out
    return port


def _model_level_case(vid):
    from harness.checks.verdict import call_scale, judge
    from harness.diagnosis import Call
    rng = np.random.default_rng(0)
    B, T, C, V, Vp = 2, 8, 32, 50, 64
    if vid == "residual.parallel":
        x, a, m = (rng.standard_normal((B, T, C)).astype(F) for _ in range(3))
        args = {"inp1": x, "inp2": a}
        actual = x.copy()                          # the stream the MLP reads: the block's input
        expected = nk.residual_forward(x.astype(np.float64), a.astype(np.float64))
        call = Call("residual_forward", "out", dict(args, next_residual=((x + a + m).astype(np.float64),
                                                                         m.astype(np.float64))))
        kernel, output = "residual_forward", "out"
    elif vid == "residual.wrong-input":
        x, ln, branch = (rng.standard_normal((B, T, C)).astype(F) for _ in range(3))
        args = {"inp1": x, "inp2": branch}
        actual = ln + branch                         # the branch added to the normalised stream
        expected = nk.residual_forward(x.astype(np.float64), branch.astype(np.float64))
        call = Call("residual_forward", "out", dict(args, streams={"acts.ln1[layer 0]": ln.astype(np.float64)},
                                                    stream_names=("acts.encoded", "acts.attproj[layer 0]")))
        kernel, output = "residual_forward", "out"
    else:
        logits = np.zeros((B, T, Vp), F)
        logits[..., :V] = 2 * rng.standard_normal((B, T, V))
        targets = rng.integers(0, V, (B, T)).astype(np.int32)
        probs = nk.softmax_forward(logits, V)
        dlosses = np.full((B, T), F(1 / (B * T)))
        args = {"dlogits": np.zeros((B, T, Vp), F), "dlosses": dlosses, "probs": probs, "targets": targets, "V": V}
        actual = _ce_probs_port(vid.split(".")[1])(logits, dlosses, targets, V)
        a64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
               for k, v in args.items()}
        expected = {"dlogits": a64["dlogits"].copy()}
        nk.crossentropy_softmax_backward(expected["dlogits"], a64["dlosses"], a64["probs"], targets, V)
        expected = expected["dlogits"]
        call = Call("crossentropy_softmax_backward", "dlogits", dict(a64, logits=logits.astype(np.float64)))
        kernel, output = "crossentropy_softmax_backward", "dlogits"
    a64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
           for k, v in args.items()}
    scale = call_scale(kernel, output, a64, {output: expected})
    return judge(kernel, output, actual, expected, a64, name=vid, elem_scale=scale, calls=lambda: call)


MODEL_LEVEL = ["residual.wrong-input", "residual.parallel", "crossentropy.softmax-twice", "crossentropy.no-log"]


@pytest.mark.parametrize("variant_id", MODEL_LEVEL)
def test_a_model_level_change_is_diagnosed_with_it(variant_id):
    _assert_diagnosed([_model_level_case(variant_id)], variant_id)


def test_a_dropped_branch_is_not_a_parallel_block():
    """The attention's branch lost (the block's output without it) is a factor 0 on the
    branch, not attention and MLP in parallel (the output would hold both branches)."""
    from harness.checks.verdict import call_scale, judge
    from harness.diagnosis import Call
    rng = np.random.default_rng(1)
    x, a, m = (rng.standard_normal((2, 8, 32)).astype(F) for _ in range(3))
    a64 = {"inp1": x.astype(np.float64), "inp2": a.astype(np.float64)}
    expected = a64["inp1"] + a64["inp2"]
    call = Call("residual_forward", "out", dict(a64, next_residual=((x + m).astype(np.float64), m.astype(np.float64))))
    c = judge("residual_forward", "out", x.copy(), expected, a64, name="dropped",
              elem_scale=call_scale("residual_forward", "out", a64, {"out": expected}), calls=lambda: call)
    assert c.diagnosis.ids == ("residual.branch-scale",), c.diagnosis.text()


def test_fitted_constants_are_reported():
    (c,) = _failures(_port("gelu_forward", gelu_coef_fwd), "gelu_forward")
    (cause,) = c.diagnosis.causes
    assert cause.value == pytest.approx(0.0447, rel=1e-3) and "0.0447 instead of 0.044715" in cause.description
    (c,) = _failures(_port("crossentropy_forward", ce_log_eps), "crossentropy_forward")
    assert c.diagnosis.causes[0].value == pytest.approx(1e-6, rel=0.05)


# ----------------------------------------------------------------------------- no known cause

def _noisy(kernel, index=0):
    """The right kernel with 1e-4 relative noise added to one element of one output."""
    f = getattr(nk, kernel)

    def port(*args):
        out = f(*args)
        if out is None:                       # in place (backward, AdamW): the first buffer
            buf = args[0]
        else:
            buf = out[index] if isinstance(out, tuple) else out
        flat = buf.reshape(-1)
        j = flat.size // 3
        flat[j] += F(1e-4) * (abs(flat[j]) + F(np.sqrt(np.mean(flat.astype(np.float64) ** 2))))
        return out
    return port


@pytest.mark.parametrize("kernel", ["gelu_forward", "gelu_backward", "layernorm_forward", "matmul_forward",
                                    "matmul_backward", "attention_forward", "softmax_forward",
                                    "crossentropy_forward", "crossentropy_softmax_backward", "adamw"])
def test_noise_on_one_element_has_no_known_cause(kernel):
    failed = _failures(_port(kernel, _noisy(kernel)), kernel)
    assert failed
    for c in failed:
        assert not c.diagnosis.known, c.diagnosis.text()
        assert c.diagnosis.tried                        # it did look
        assert c.diagnosis.text().startswith("no known cause")


# test_ops' mutants: those whose change the catalogue has are named with it (the systematic
# 1e-5 factors by the constant fitted to the output); the others have no known cause
MUTANT_CAUSES = {"encoder_forward": "embedding.no-wpe", "attention_forward": "output.scale",
                 "residual_forward": "output.scale", "crossentropy_forward": "output.scale"}


def test_uncatalogued_bugs_have_no_known_cause():
    """test_ops' mutants whose change is not in the catalogue: never a wrong cause."""
    from tests.ops.test_ops import MUTANTS
    for kernel in ("layernorm_backward", "gelu_backward", "crossentropy_softmax_backward"):
        failed = _failures(_port(kernel, MUTANTS[kernel][1]), kernel)
        assert failed and all(not c.diagnosis.known for c in failed), (kernel, [c.diagnosis.text() for c in failed])


@pytest.mark.parametrize("kernel", list(MUTANT_CAUSES))
def test_mutants_of_a_catalogued_kind_are_named(kernel):
    from tests.ops.test_ops import MUTANTS
    failed = _failures(_port(kernel, MUTANTS[kernel][1]), kernel)
    _assert_diagnosed(failed, MUTANT_CAUSES[kernel])
    if MUTANT_CAUSES[kernel] == "output.scale":
        assert all(c.diagnosis.causes[0].value == pytest.approx(1 + 1e-5, abs=1e-7) for c in failed)


# ----------------------------------------------------------------------------- messages

def test_pytest_failure_message_says_the_cause():
    s = BASE
    with pytest.raises(ParityError) as info:
        assert_kernel(_port("layernorm_forward", layernorm_port(eps=1e-6)), "layernorm_forward",
                      make_inputs(SPEC["layernorm_forward"], s), label="port")
    msg = str(info.value)
    assert "Diagnosis: probable cause: layernorm's eps is 1e-06 instead of 1e-5" in msg
    assert info.value.comparison.diagnosis.ids == ("layernorm.eps=1e-06",)
    row = info.value.comparison.summary_row()
    assert row["diagnosis"]["causes"][0]["id"] == "layernorm.eps=1e-06" and row["passed"] is False


# ----------------------------------------------------------------------------- passing: no work

class _Counter:
    """A probe listener (harness.probe) counting the diagnoses the checks run."""

    def __init__(self):
        self.calls = 0

    def enter(self, category, detail):
        self.calls += category == "diagnose"

    def exit(self, token):
        pass


@pytest.fixture
def counted():
    from harness.probe import listening
    with listening(_Counter()) as c:
        yield c


def _tiny_run(lib=None, impls=None, steps=1):
    cfg = PRESETS["tiny"]
    return run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 4, 16), lib=lib, impls=impls or {}, steps=steps)


def test_passing_checks_do_no_diagnosis_work(counted):
    impl = KernelSet.from_module(nk)
    for kernel, check in SPEC.items():
        assert all(c.passed for c in check_kernel(impl, kernel, make_inputs(check, BASE)))
    assert _tiny_run(impls={"numpy": impl}).passed
    assert counted.calls == 0
    # and the counter does see a failure (the test above could not pass vacuously)
    _failures(_port("gelu_forward", gelu_erf_fwd), "gelu_forward")
    assert counted.calls == 1


@pytest.mark.parametrize("adamw, cause", [(adamw_port(l2=True), "adamw.l2"),
                                          (adamw_port(skip_1d=True), "adamw.no-decay-1d")])
def test_a_python_port_is_diagnosed_in_a_training_step(adamw, cause):
    """Replay (forward and an accumulated gradient) and update of a Python model."""
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs.update(gelu_forward=gelu_erf_fwd, layernorm_backward=overwrite("layernorm_backward", "dinp"),
                 adamw=adamw)
    report = _tiny_run(impls={"port": KernelSet(funcs, name="port")})
    failed = [c for s in report.steps for c in s.checks if c.impl == "port" and not c.passed
              and c.kind in ("replay", "update")]
    assert {c.diagnosis.ids for c in failed} == {("gelu.erf",), ("backward.overwrite",), (cause,)}
    assert all(c.diagnosis is None for s in report.steps for c in s.checks if c.impl == "C")
    over = next(c for c in failed if c.diagnosis.ids == ("backward.overwrite",))
    assert "layernorm_backward" in over.diagnosis.causes[0].where
    if cause == "adamw.no-decay-1d":     # only the biases and gains are off
        shapes = param_shapes(PRESETS["tiny"])
        off = {c.tensor.split(".")[1].split(" ")[0] for c in failed if c.kind == "update"}
        assert off == {n for n in shapes if n.endswith("b") or n.startswith("ln")}


# ----------------------------------------------------------------------------- the C, edited

# (variant, C function, old text, new text): each edit replaces every occurrence of `old`
# within the function's body (at least one)
C_EDITS = [
    ("gelu.erf", "gelu_forward", "tanhf(GELU_SCALING_FACTOR * (x + cube))", "erff(x / sqrtf(2.0f))"),
    ("gelu.cubic-constant", "gelu_backward", "0.044715f", "0.04471f"),
    ("layernorm.eps=1e-06", "layernorm_forward", "1e-5f", "1e-6f"),
    ("layernorm.unbiased-variance", "layernorm_forward", "v = v / C;", "v = v / (C - 1);"),
    ("attention.scale=1/hs", "attention_forward", "1.0 / sqrtf(hs)", "1.0 / hs"),
    ("attention.no-diagonal", "attention_forward", "t2 <= t", "t2 < t"),
    ("attention.no-causal-mask", "attention_forward", "t2 <= t", "t2 < T"),
    ("attention.no-scale", "attention_backward", "1.f / sqrtf(hs)", "1.f"),
    ("embedding.no-wpe", "encoder_forward", "out_bt[i] = wte_ix[i] + wpe_t[i];", "out_bt[i] = wte_ix[i];"),
    ("residual.branch-scale", "residual_forward", "out[i] = inp1[i] + inp2[i];", "out[i] = inp1[i] + 0.5f * inp2[i];"),
    ("output.scale", "layernorm_forward", "float o = n * weight[i] + bias[i];",
     "float o = (n * weight[i] + bias[i]) * 1.001f;"),
    ("softmax.padded-columns", "softmax_forward", "i < V;", "i < Vp;"),
    ("crossentropy.log-eps", "crossentropy_forward", "-logf(probs_bt[ix])", "-logf(probs_bt[ix] + 1e-6f)"),
    ("labels.next-position", "crossentropy_forward", "targets[b * T + t]", "targets[b * T + (t + 1) % T]"),
    ("labels.previous-position", "crossentropy_softmax_backward", "targets[b * T + t]",
     "targets[b * T + (t + T - 1) % T]"),
    ("matmul.no-bias", "matmul_forward", "(bias != NULL) ? bias[o] : 0.0f", "0.0f"),
    ("matmul.no-bias", "matmul_backward", "if (dbias != NULL) { dbias[o] += d; }", ""),
    ("backward.overwrite", "layernorm_backward", "dinp_bt[i] += dval;", "dinp_bt[i] = dval;"),
    ("backward.overwrite", "residual_backward", "dinp2[i] += dout[i];", "dinp2[i] = dout[i];"),
    ("backward.last-term-only", "matmul_backward", "dwrow[i] += inp_bt[i] * d;", "dwrow[i] = inp_bt[i] * d;"),
    ("backward.last-term-only", "encoder_backward", "dwte_ix[i] += d;", "dwte_ix[i] = d;"),
    ("adamw.no-bias-correction", "gpt2_update", "(1.0f - powf(beta1, t))", "1.0f"),
    ("adamw.eps-in-sqrt", "gpt2_update", "(sqrtf(v_hat) + eps)", "sqrtf(v_hat + eps)"),
    ("adamw.weight-decay=0.01", "gpt2_update", "weight_decay * param", "0.01f * param"),
]
# the softmax over Vp must also keep its padded probabilities (the zeroing loop goes)
EXTRA = {("softmax.padded-columns", "softmax_forward"): ("probs_bt[i] = 0.0f;", "(void)0;"),
         ("adamw.no-bias-correction", "gpt2_update"): ("(1.0f - powf(beta2, t))", "1.0f")}
KERNEL_OF = {"gpt2_update": "adamw"}


def _builds() -> list[list[tuple]]:
    """The edits grouped into as few sources as possible, one edit per function each."""
    groups: list[list[tuple]] = []
    for edit in C_EDITS:
        group = next((g for g in groups if all(e[1] != edit[1] for e in g)), None)
        if group is None:
            groups.append(group := [])
        group.append(edit)
    return groups


@pytest.fixture(scope="module")
def c_mutants(tmp_path_factory):
    """[(edits, Library)] for each group of edits, built in parallel."""
    src = pristine_source()
    jobs = []
    for i, group in enumerate(_builds()):
        text = src
        for vid, func, old, new in group:
            text = edit_function(text, func, old, new)
            if (vid, func) in EXTRA:
                text = edit_function(text, func, *EXTRA[vid, func])
        d = tmp_path_factory.mktemp(f"diag{i}")
        (d / "train_gpt2.c").write_text(text)
        jobs.append((group, d))
    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(lambda j: build_library(j[1] / "train_gpt2.c", j[1] / "lib.so", quiet=True), jobs))
    return [(group, load_library(info.library)) for (group, _), info in zip(jobs, infos)]


def test_c_edits_need_few_builds():
    assert len(_builds()) <= 3


C_CASES = [pytest.param(vid, func, id=f"{vid}-{func}") for vid, func, _, _ in C_EDITS]


@pytest.mark.parametrize("variant_id, func", C_CASES)
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    lib = next(lib for group, lib in c_mutants if any(e[:2] == (variant_id, func) for e in group))
    kernel = KERNEL_OF.get(func, func)
    failed = _failures(CKernels(lib), kernel)
    if kernel == "residual_backward":      # dinp1 is untouched: only dinp2 fails
        assert [c.name for c in failed] == ["residual_backward.dinp2"]
    _assert_diagnosed(failed, variant_id)


def test_edited_c_is_diagnosed_through_a_training_step(c_mutants):
    """One build carries an edit in each of several functions; the replay judges every op
    on the C's own inputs, so each failing op is diagnosed with its own edit."""
    group, lib = c_mutants[0]
    edited = {vid for vid, *_ in group}
    report = _tiny_run(lib=lib, steps=2)
    assert not report.passed
    failed = [c for s in report.steps for c in s.checks if not c.passed and c.kind in ("replay", "update")]
    found = set()
    for c in failed:
        assert c.diagnosis is not None and c.diagnosis.known, (c.where, c.diagnosis.text())
        assert set(c.diagnosis.ids) <= edited, (c.where, c.diagnosis.text())
        found |= set(c.diagnosis.ids)
    # visible in a step: all but the overwrite of residual_backward (its buffers start at
    # zero in gpt2_backward) and labels and mean (the losses are not replayed)
    assert {"gelu.erf", "layernorm.eps=1e-06", "attention.scale=1/hs", "adamw.no-bias-correction",
            "matmul.no-bias", "backward.overwrite", "softmax.padded-columns"} <= found

    first = first_divergence_check([c for c in report.steps[0].checks if c.impl == "C"])
    assert first.diagnosis.known
    summary = R.run_summary(report)
    assert f"  why: {first.diagnosis.text()}" in summary
    table = R.step_table(report.steps[0])
    assert f"[C]   why: {first.diagnosis.text()}" in table
    data = R.to_json(report, versions=False)
    diagnosed = [c for s in data["steps"] for c in s["checks"] if c["diagnosis"] is not None]
    assert diagnosed and all(not c["passed"] for c in diagnosed)
    assert {cause["id"] for c in diagnosed for cause in c["diagnosis"]["causes"]} == found
    # the end-to-end gradients fail from the edits upstream, which the loss mean does not explain
    e2e = [c for c in diagnosed if c["kind"] in ("e2e", "loss")]
    assert e2e and not any(c["diagnosis"]["known"] for c in e2e)


# The loss mean is gpt2_forward's and gpt2_backward's, not a kernel's: each is seen by one
# check of a step (the mean loss; the end-to-end gradients, which all scale with dlosses)
MEAN_EDITS = [("crossentropy.mean-over-BT+1", "gpt2_forward", "mean_loss /= B * T;", "mean_loss /= B * T + 1;"),
              ("crossentropy.mean-over-BT-1", "gpt2_backward", "1.0f / (B*T)", "1.0f / (B*T - 1)")]


@pytest.fixture(scope="module")
def mean_mutant(tmp_path_factory):
    text = pristine_source()
    for _, func, old, new in MEAN_EDITS:
        text = edit_function(text, func, old, new)
    d = tmp_path_factory.mktemp("diag_mean")
    (d / "train_gpt2.c").write_text(text)
    return load_library(build_library(d / "train_gpt2.c", d / "lib.so", quiet=True).library)


def test_edited_loss_mean_is_diagnosed(mean_mutant):
    report = _tiny_run(lib=mean_mutant)
    (step,) = report.steps
    failed = [c for c in step.checks if not c.passed]
    assert {c.kind for c in failed} == {"loss", "e2e"}          # replay and update pass
    loss = next(c for c in failed if c.kind == "loss")
    assert loss.diagnosis.ids == ("crossentropy.mean-over-BT+1",)
    grads = [c for c in failed if c.kind == "e2e"]
    assert all(c.tensor.startswith(("grads", "grads_acts")) for c in grads)
    assert all(c.diagnosis.ids == ("crossentropy.mean-over-BT-1",) for c in grads), \
        [c.diagnosis.text() for c in grads if c.diagnosis.ids != ("crossentropy.mean-over-BT-1",)]
    assert "why: probable cause: the loss (or its gradient, dlosses) averaged over B*T+1" in R.run_summary(report)


def test_a_variant_that_raises_is_skipped_not_fatal(monkeypatch):
    import harness.diagnosis as D

    def boom(kernel, args, ctx, value):
        raise RuntimeError("variant bug")
    broken = D.Variant("gelu.broken", "gelu", ("gelu_forward",), "a variant that raises", boom)
    monkeypatch.setattr(D.catalogue, "CATALOGUE", D.CATALOGUE + (broken,))
    (c,) = _failures(_port("gelu_forward", gelu_erf_fwd), "gelu_forward")
    assert not c.passed and c.diagnosis.ids == ("gelu.erf",)
    assert c.diagnosis.skipped == (("gelu.broken", "RuntimeError: variant bug"),)


def test_kernels_without_variants_say_so(monkeypatch):
    import harness.diagnosis as D
    from tests.ops.test_ops import MUTANTS
    monkeypatch.setattr(D.catalogue, "CATALOGUE", tuple(v for v in D.CATALOGUE if "encoder_forward" not in v.kernels))
    (c,) = _failures(_port("encoder_forward", MUTANTS["encoder_forward"][1]), "encoder_forward")
    assert c.diagnosis.text() == "no known cause: the catalogue has no change to encoder_forward"
