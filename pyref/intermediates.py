"""The reference's intermediates: each kernel's float64 computation as named steps, beside
its row of :mod:`pyref.spec`.

A failure at an op's output says that the op is wrong, not where inside it. The C computes
each op through a few values with a meaning of their own (attention's scores, scaled and
masked, its softmax, the weighted values; a layer norm's mean, centred input, variance and
rstd; GELU's inner term and tanh; the loss's shift and log-sum-exp; the softmax Jacobian's
diagonal term and its off-diagonal sum in attention's backward). Here each kernel has one
function that computes them, and :func:`intermediates` returns them as ``{name: float64
array}`` in the order :data:`STEPS` documents, from the kernel's own arguments (a backward's
in-place buffers as they are before the call, which are not written); any step can be
replaced (``replace``) and the computation goes on from it:

* every output of the kernel (:attr:`pyref.spec.KernelSpec.outputs`) is a step of its own
  name, computed by the same float64 operations as :mod:`pyref.numpy_kernels`' (so it
  equals the oracle's output bit for bit); a backward's and an optimizer's outputs are its
  last steps, in the row's order; a forward's statistics (layernorm's mean and rstd,
  attention's preatt and att) stand where the C computes them, and its main output last;
* a step that is only a later step in another layout (attention's per-head weighted values,
  merged into ``out``) says so (:attr:`Step.layout_of`): a matcher up to layouts keeps one;
* a step that is not on the way to an output (attention backward's Jacobian terms, the
  loss's log-sum-exp) is tied to one by an identity (tests/references/test_intermediates.py).

Readers: :mod:`harness.ports.record` (which of a torch port's ops reproduce which step)
and :mod:`harness.diagnosis.catalogue.intermediates` (a failing output recomputed with one
step left out). NumPy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import numpy_kernels as nk
from .protocol import as64
from .spec import SPEC


@dataclass(frozen=True)
class Step:
    """One named value of a kernel's computation: ``what`` it is in words (``plural``: the
    words are a plural), where it is defined (``causal``: on the causal triangle only, 0
    above it as the oracle's preatt) and, for a step that is a later one's values in another
    layout, which (``layout_of``)."""

    name: str
    what: str
    plural: bool = False
    causal: bool = False
    layout_of: str | None = None
    # a step a port looping over heads makes one head at a time: the step whose values per
    # head (its axis 1: attention's (B, NH, T, x)) are this one's, one head's slice each
    heads_of: str | None = None
    # the steps it is computed from, in the order the op takes them (scores: q @ k^T): a
    # port's op given another step's value in one's place (k where q goes) is told by it
    of: tuple[str, ...] = ()


def _s(name, what, plural=False, **kw) -> Step:
    return Step(name, what, plural, **kw)


# words for a kernel's tensor arguments: (kernel, argument) -> (words, plural)
INPUTS = {
    ("attention_forward", "inp"): ("c_attn's q, k, v", True),
    ("layernorm_forward", "inp"): ("the input", False),
    ("gelu_forward", "inp"): ("the GELU's input", False),
    ("matmul_forward", "inp"): ("the matmul's input", False),
    ("residual_forward", "inp1"): ("the residual stream", False),
    ("residual_forward", "inp2"): ("the branch", False),
    ("softmax_forward", "logits"): ("the logits", True),
    ("crossentropy_forward", "probs"): ("the probabilities", True),
}

STEPS: dict[str, tuple[Step, ...]] = {
    "encoder_forward": (_s("tokens", "the token embeddings", True), _s("positions", "the position embeddings", True),
                        _s("out", "the embeddings", True)),
    "layernorm_forward": (_s("mean", "the mean"), _s("xshift", "the centred input"), _s("var", "the variance"),
                          _s("rstd", "the reciprocal standard deviation"), _s("norm", "the normalised input"),
                          _s("out", "the scaled and shifted output")),
    "matmul_forward": (_s("product", "the product"), _s("out", "the product plus bias")),
    "attention_forward": (
        _s("q", "the queries", True, heads_of="q"), _s("k", "the keys", True, heads_of="k"),
        _s("v", "the values", True, heads_of="v"), _s("scores", "the scores", True, heads_of="scores", of=("q", "k")),
        _s("preatt", "the scaled scores", True, causal=True, heads_of="preatt"),
        _s("masked", "the masked scores", True, heads_of="masked"), _s("att", "the softmax", heads_of="att"),
        _s("weighted", "the weighted values, per head", True, layout_of="out"),
        _s("out", "the weighted values", True, heads_of="weighted")),
    "gelu_forward": (_s("inner", "the GELU's inner term x + 0.044715 x^3"), _s("scaled", "the scaled inner term"),
                     _s("tanh", "the tanh"), _s("out", "the GELU")),
    "residual_forward": (_s("out", "the sum"),),
    "softmax_forward": (
        _s("vlogits", "the logits of the V real tokens", True), _s("shift", "the shift (the row maximum)"),
        _s("shifted", "the shifted logits", True), _s("exps", "the exponentials", True),
        _s("expsum", "the sum of the exponentials"), _s("lse", "the log-sum-exp"),
        _s("logprobs", "the log-probabilities", True), _s("probs", "the probabilities", True)),
    "crossentropy_forward": (_s("picked", "the target's probability"),
                             _s("logpicked", "the target's log-probability"), _s("losses", "the losses", True)),
    "encoder_backward": (_s("dwte", "the token embeddings' gradient"),
                         _s("dwpe", "the position embeddings' gradient")),
    "layernorm_backward": (
        _s("norm", "the normalised input"), _s("dnorm", "the normalised input's gradient"),
        _s("dnorm_mean", "the mean of dnorm"), _s("dnorm_norm_mean", "the mean of dnorm * norm"),
        _s("dinp_add", "this call's input gradient"),
        _s("dinp", "dinp"), _s("dweight", "dweight"), _s("dbias", "dbias")),
    "matmul_backward": (_s("dinp_add", "dout @ weight"), _s("dweight_add", "dout^T @ inp"),
                        _s("dbias_add", "dout summed over positions"),
                        _s("dinp", "dinp"), _s("dweight", "dweight"), _s("dbias", "dbias")),
    "attention_backward": (
        _s("datt_add", "this call's v . dout"), _s("dv", "the values' gradient"),
        _s("diag", "the softmax Jacobian's diagonal term att * datt"),
        _s("offdiag", "the softmax Jacobian's off-diagonal sum att * sum(att * datt)"),
        _s("dpreatt_add", "this call's softmax backward att * (datt - sum(att * datt))", causal=True),
        _s("dq", "the queries' gradient"), _s("dk", "the keys' gradient"),
        _s("dinp", "dinp"), _s("dpreatt", "dpreatt"), _s("datt", "datt")),
    "gelu_backward": (_s("inner", "the GELU's inner term"), _s("scaled", "the scaled inner term"),
                      _s("tanh", "the tanh"), _s("sech2", "sech^2 of the scaled inner term"),
                      _s("local", "the GELU's local derivative"), _s("dinp", "dinp")),
    "residual_backward": (_s("dinp1", "dinp1"), _s("dinp2", "dinp2")),
    "crossentropy_softmax_backward": (_s("onehot", "the target's one-hot row"),
                                      _s("diff", "the probabilities minus the one-hot row", True),
                                      _s("dlogits", "dlogits")),
    "adamw": (_s("m_hat", "the bias-corrected first moment"), _s("v_hat", "the bias-corrected second moment"),
              _s("step", "m_hat / (sqrt(v_hat) + eps)"), _s("update", "the update lr * (step + wd * param)"),
              _s("param", "the parameters", True), _s("m", "the first moment"), _s("v", "the second moment")),
}


def step(kernel: str, name: str) -> Step:
    """The documented step ``name`` of ``kernel``."""
    for s in steps(kernel):
        if s.name == name:
            return s
    raise KeyError(f"{kernel} has no step {name!r} (it has {', '.join(s.name for s in steps(kernel))})")


def steps(kernel: str) -> tuple[Step, ...]:
    """``kernel``'s steps, in the documented order."""
    if kernel not in STEPS:
        raise KeyError(f"no intermediates for {kernel!r} (kernels: {', '.join(STEPS)})")
    return STEPS[kernel]


def intermediates(kernel: str, args: dict, replace: dict[str, Callable] | None = None) -> dict[str, np.ndarray]:
    """``kernel``'s named float64 steps on ``args`` (its named arguments, any float dtype:
    cast to float64 copies; nothing of ``args`` is written), in :data:`STEPS`' order.

    ``replace``: {step: fn(steps so far, its own value included) -> its value instead}:
    the computation goes on from the replaced value, so every later step (the outputs
    among them) is what the op computes with that one intermediate changed: a variance
    divided by C - 1, the softmax Jacobian without its diagonal term."""
    if kernel not in _FUNCTIONS:
        raise KeyError(f"no intermediates for {kernel!r} (kernels: {', '.join(STEPS)})")
    missing = [a for a in SPEC[kernel].signature if a not in args]
    if missing:
        raise ValueError(f"{kernel}'s intermediates need {', '.join(missing)}")
    unknown = sorted(set(replace or ()) - {st.name for st in STEPS[kernel]})
    if unknown:
        raise KeyError(f"{kernel} has no step {', '.join(map(repr, unknown))} to replace")
    put = _Put(replace or {})
    _FUNCTIONS[kernel](as64(args, copy=True), put)
    return {st.name: put.steps[st.name] for st in STEPS[kernel] if st.name in put.steps}   # (no bias: no bias steps)


class _Put:
    """Records each step as a function computes it, or its replacement (``replace``)."""

    def __init__(self, replace: dict):
        self.replace, self.steps = replace, {}

    def __call__(self, name: str, value):
        if name in self.replace:
            value = np.broadcast_to(np.asarray(self.replace[name](dict(self.steps, **{name: value})), np.float64),
                                    np.shape(value)).copy()
        self.steps[name] = value
        return value


# ----------------------------------------------------------------------------- forwards

def _encoder_forward(a, put):
    T = a["inp"].shape[1]
    put("out", put("tokens", a["wte"][a["inp"]]) + put("positions", a["wpe"][:T]))


def _layernorm_forward(a, put):
    x, C = a["inp"], a["inp"].shape[-1]
    mean = put("mean", x.sum(-1) / np.float64(C))
    xshift = put("xshift", x - mean[..., None])
    var = put("var", (xshift * xshift).sum(-1) / np.float64(C))
    rstd = put("rstd", 1.0 / np.sqrt(var + np.float64(nk.LN_EPS)))
    norm = put("norm", rstd[..., None] * xshift)
    put("out", norm * a["weight"] + a["bias"])


def _matmul_forward(a, put):
    inp, w = a["inp"], a["weight"]
    product = put("product", (inp.reshape(-1, inp.shape[-1]) @ w.T).reshape(*inp.shape[:-1], w.shape[0]))
    put("out", product + a["bias"] if a["bias"] is not None else product.copy())


def _qkv(inp, NH, put=None):
    """q, k, v of (B,T,3C), each split into heads (B,NH,T,hs)."""
    C = inp.shape[-1] // 3
    heads = tuple(nk._heads(inp[..., i * C:(i + 1) * C], NH) for i in range(3))
    return heads if put is None else tuple(put(n, x) for n, x in zip("qkv", heads))


def _attention_forward(a, put):
    inp, NH = a["inp"], int(a["NH"])
    T, hs = inp.shape[1], inp.shape[-1] // 3 // NH
    q, k, v = _qkv(inp, NH, put)
    mask = nk._causal(T)
    scores = put("scores", q @ k.transpose(0, 1, 3, 2))
    preatt = put("preatt", np.where(mask, scores * (1.0 / float(np.sqrt(np.float64(hs)))), 0.0))
    masked = put("masked", np.where(mask, preatt, -np.inf))
    shift = np.maximum(masked.max(-1, keepdims=True), np.float64(nk.ATT_MAXVAL_INIT))
    exps = np.exp(np.where(mask, masked - shift, -np.inf))
    expsum = exps.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        att = put("att", exps * np.where(expsum == 0, 0.0, 1.0 / expsum))
    put("out", nk._unheads(put("weighted", att @ v)))


def _gelu_forward(a, put):
    x = a["inp"]
    inner = put("inner", x + np.float64(nk.GELU_COEF) * x * x * x)
    th = put("tanh", np.tanh(put("scaled", nk._gelu_s(np.float64) * inner)))
    put("out", 0.5 * x * (1.0 + th))


def _softmax_forward(a, put):
    logits, V = a["logits"], int(a["V"])
    vlogits = put("vlogits", logits[..., :V])
    shift = put("shift", np.maximum(vlogits.max(-1, keepdims=True), np.float64(nk.ATT_MAXVAL_INIT)))
    shifted = put("shifted", vlogits - shift)
    exps = put("exps", np.exp(shifted))
    expsum = put("expsum", exps.sum(-1, keepdims=True))
    put("lse", shift + np.log(expsum))
    put("logprobs", shifted - np.log(expsum))
    probs = np.zeros_like(logits)
    probs[..., :V] = exps / expsum
    put("probs", probs)


def _crossentropy_forward(a, put):
    targets = a["targets"][..., None].astype(np.intp)
    picked = put("picked", np.take_along_axis(a["probs"], targets, axis=-1)[..., 0])
    put("losses", -put("logpicked", np.log(picked)))


# ----------------------------------------------------------------------------- backwards and AdamW

def _encoder_backward(a, put):
    dwte, dwpe = a["dwte"].copy(), a["dwpe"].copy()
    nk.encoder_backward(dwte, dwpe, a["dout"], a["inp"])
    put("dwte", dwte)
    put("dwpe", dwpe)


def _layernorm_backward(a, put):
    inp, dout, C = a["inp"], a["dout"], a["inp"].shape[-1]
    rstd = a["rstd"][..., None]
    norm = put("norm", (inp - a["mean"][..., None]) * rstd)
    dnorm = put("dnorm", a["weight"] * dout)
    dnorm_mean = put("dnorm_mean", dnorm.sum(-1, keepdims=True) / np.float64(C))
    dnorm_norm_mean = put("dnorm_norm_mean", (dnorm * norm).sum(-1, keepdims=True) / np.float64(C))
    dinp_add = put("dinp_add", ((dnorm - dnorm_mean) - norm * dnorm_norm_mean) * rstd)
    lead = tuple(range(dout.ndim - 1))
    put("dinp", a["dinp"] + dinp_add)
    put("dweight", a["dweight"] + (norm * dout).sum(lead))
    put("dbias", a["dbias"] + dout.sum(lead))


def _matmul_backward(a, put):
    inp, w = a["inp"], a["weight"]
    dout2 = a["dout"].reshape(-1, w.shape[0])
    dinp_add = put("dinp_add", (dout2 @ w).reshape(a["dinp"].shape))
    dweight_add = put("dweight_add", dout2.T @ inp.reshape(-1, inp.shape[-1]))
    dbias_add = put("dbias_add", dout2.sum(0)) if a["dbias"] is not None else None
    put("dinp", a["dinp"] + dinp_add)
    put("dweight", a["dweight"] + dweight_add)
    if dbias_add is not None:
        put("dbias", a["dbias"] + dbias_add)


def _attention_backward(a, put):
    """The C's passes: datt += v . dout, dv += att * dout; the softmax Jacobian
    att[t2]*((t2 == t3) - att[t3]) applied to the accumulated datt, whose diagonal term
    (att * datt) and off-diagonal sum (att * sum(att * datt)) are steps of their own; dq,
    dk from the accumulated dpreatt."""
    inp, att, NH = a["inp"], a["att"], int(a["NH"])
    T, hs = inp.shape[1], inp.shape[-1] // 3 // NH
    q, k, v = _qkv(inp, NH)
    dout = nk._heads(a["dout"], NH)
    mask = nk._causal(T)
    datt_add = put("datt_add", np.where(mask, dout @ v.transpose(0, 1, 3, 2), 0.0))
    datt = put("datt", np.where(mask, a["datt"] + datt_add, a["datt"]))
    dv = put("dv", att.transpose(0, 1, 3, 2) @ dout)
    datt_c = np.where(mask, datt, 0.0)
    rowdot = (att * datt_c).sum(-1, keepdims=True)
    put("diag", att * datt_c)
    put("offdiag", att * rowdot)
    dpreatt_add = put("dpreatt_add", np.where(mask, att * (datt_c - rowdot), 0.0))
    dpreatt = put("dpreatt", np.where(mask, a["dpreatt"] + dpreatt_add, a["dpreatt"]))
    dpreatt_c = np.where(mask, dpreatt, 0.0)
    scale = 1.0 / np.sqrt(np.float64(hs))
    dq = put("dq", (dpreatt_c @ k) * scale)
    dk = put("dk", (dpreatt_c.transpose(0, 1, 3, 2) @ q) * scale)
    put("dinp", a["dinp"] + np.concatenate([nk._unheads(dq), nk._unheads(dk), nk._unheads(dv)], axis=-1))


def _gelu_backward(a, put):
    x, s, coef = a["inp"], nk._gelu_s(np.float64), np.float64(nk.GELU_COEF)
    inner = put("inner", x + coef * x * x * x)
    scaled = put("scaled", s * inner)
    th = put("tanh", np.tanh(scaled))
    with np.errstate(over="ignore"):
        ch = np.cosh(scaled)
        sech2 = put("sech2", 1.0 / (ch * ch))
    local = put("local", 0.5 * (1.0 + th) + x * 0.5 * sech2 * s * (1.0 + 3.0 * coef * x * x))
    put("dinp", a["dinp"] + local * a["dout"])


def _residual_forward(a, put):
    put("out", a["inp1"] + a["inp2"])


def _residual_backward(a, put):
    put("dinp1", a["dinp1"] + a["dout"])
    put("dinp2", a["dinp2"] + a["dout"])


def _crossentropy_softmax_backward(a, put):
    probs, V = a["probs"], int(a["V"])
    onehot = np.zeros(probs.shape[:-1] + (V,))
    np.put_along_axis(onehot, a["targets"][..., None].astype(np.intp), 1.0, axis=-1)
    diff = put("diff", probs[..., :V] - put("onehot", onehot))
    dlogits = a["dlogits"].copy()
    dlogits[..., :V] += diff * a["dlosses"][..., None]
    put("dlogits", dlogits)


def _adamw(a, put):
    """AdamW's steps, the hyperparameters rounded to float32 first as the C's float
    arguments (:func:`pyref.numpy_kernels.adamw`)."""
    lr, b1, b2, eps, wd = (np.float64(np.float32(a[k])) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    p, g = a["param"], a["grad"]
    m = put("m", a["m"] * b1 + (1.0 - b1) * g)
    v = put("v", a["v"] * b2 + (1.0 - b2) * g * g)
    m_hat = put("m_hat", m / (1.0 - b1 ** int(a["t"])))
    v_hat = put("v_hat", v / (1.0 - b2 ** int(a["t"])))
    update = put("update", (put("step", m_hat / (np.sqrt(v_hat) + eps)) + wd * p) * lr)
    put("param", p - update)


_FUNCTIONS: dict[str, Callable] = {
    "encoder_forward": _encoder_forward, "layernorm_forward": _layernorm_forward,
    "matmul_forward": _matmul_forward, "attention_forward": _attention_forward, "gelu_forward": _gelu_forward,
    "residual_forward": _residual_forward, "softmax_forward": _softmax_forward,
    "crossentropy_forward": _crossentropy_forward, "encoder_backward": _encoder_backward,
    "layernorm_backward": _layernorm_backward, "matmul_backward": _matmul_backward,
    "attention_backward": _attention_backward, "gelu_backward": _gelu_backward,
    "residual_backward": _residual_backward, "crossentropy_softmax_backward": _crossentropy_softmax_backward,
    "adamw": _adamw,
}
assert set(_FUNCTIONS) == set(STEPS) == set(SPEC), "one function and one list of steps per kernel of the spec"
