"""The catalogue of changes of semantics a diagnosis tries (:mod:`.engine` runs them).

Each :class:`~.engine.Variant` is one op under one change: a float64 function plus a
one-line description. A new diagnosis is a few lines at the end of this module, e.g.
``Variant("layernorm.eps=1e-3", "layernorm", ("layernorm_forward",),
"layernorm's eps is 1e-3 instead of 1e-5", _ln_eps(1e-3))``, and a port of the change in
tests/test_diagnose.py that shows the check names it.
"""
from __future__ import annotations

import importlib.util
import math
import threading

import numpy as np

from pyref import numpy_kernels
from pyref.config import LAYER_PARAMS, AdamW
from pyref.protocol import BACKWARD_KERNELS, FORWARD_OUTPUTS, SIGNATURES, run_kernel

from .engine import MODEL_QUANTITIES, Fit, Variant


# ----------------------------------------------------------------------------- helpers

def _oracle_copy():
    """A private instance of pyref.numpy_kernels whose constants (LN_EPS, GELU_COEF) the
    variants may set without touching the shared module."""
    module_spec = importlib.util.spec_from_file_location("_llmc_diagnose_kernels", numpy_kernels.__file__)
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    return mod


_PRIVATE = None
_PRIVATE_LOCK = threading.Lock()


def _with_constants(kernel: str, args: dict, **constants) -> dict:
    """The oracle's ``kernel`` on ``args`` with module constants changed (float64)."""
    global _PRIVATE
    with _PRIVATE_LOCK:
        if _PRIVATE is None:
            _PRIVATE = _oracle_copy()
        return _run_with(_PRIVATE, kernel, args, constants)


def _run_with(mod, kernel: str, args: dict, constants: dict) -> dict:
    saved = {k: getattr(mod, k) for k in constants}
    try:
        for k, x in constants.items():
            setattr(mod, k, x)
        return run_kernel(mod, kernel, args, np.float64)
    finally:
        for k, x in saved.items():
            setattr(mod, k, x)


def _oracle(kernel: str, args: dict, **changed) -> dict:
    """The oracle's ``kernel`` with some arguments replaced."""
    return run_kernel(numpy_kernels, kernel, dict(args, **changed), np.float64)


def _forward(kernel: str, outputs: tuple) -> dict:
    return dict(zip(FORWARD_OUTPUTS[kernel], outputs))


# --- gelu

def _phi(x):
    """Standard normal CDF, elementwise (math.erf: NumPy has no erf)."""
    erf = np.frompyfunc(math.erf, 1, 1)
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0)).astype(np.float64))


def _gelu_erf(kernel, args, ctx, value):
    x = args["inp"]
    if kernel == "gelu_forward":
        return {"out": x * _phi(x)}
    dinp = args["dinp"]
    dinp += (_phi(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)) * args["dout"]
    return {"dinp": dinp}


def _gelu_sigmoid(kernel, args, ctx, value):
    """x*sigmoid(1.702x), the sigmoid approximation (and its derivative)."""
    x = args["inp"]
    s = 1.0 / (1.0 + np.exp(-1.702 * x))
    if kernel == "gelu_forward":
        return {"out": x * s}
    return {"dinp": args["dinp"] + (s + 1.702 * x * s * (1 - s)) * args["dout"]}


def _gelu_tanh_scale(kernel, args, ctx, value):
    """GELU's tanh form with ``value`` in place of sqrt(2/pi)."""
    x = args["inp"]
    c = numpy_kernels.GELU_COEF
    a = value * (x + c * x ** 3)
    th = np.tanh(a)
    if kernel == "gelu_forward":
        return {"out": 0.5 * x * (1 + th)}
    g = 0.5 * (1 + th) + x * 0.5 * (1 - th * th) * value * (1 + 3 * c * x * x)
    return {"dinp": args["dinp"] + g * args["dout"]}


def _gelu_scale_name(kernel, args, value, ctx):
    if abs(value - math.sqrt(2 / math.pi)) < 1e-6:
        return None, value, ""
    known = [("sqrt(2)/pi", math.sqrt(2) / math.pi), ("2/pi", 2 / math.pi), ("sqrt(2*pi)", math.sqrt(2 * math.pi)),
             ("1/sqrt(pi)", 1 / math.sqrt(math.pi)), ("1", 1.0), ("sqrt(2)", math.sqrt(2))]
    match = next((label for label, x in known if abs(value / x - 1) < 1e-3), None)
    return "gelu.tanh-scale", value, f" = {match}" if match else ""


def _relu(kernel, args, ctx, value):
    x = args["inp"]
    if kernel == "gelu_forward":
        return {"out": np.maximum(x, 0.0)}
    return {"dinp": args["dinp"] + (x > 0) * args["dout"]}


def _gelu_coef(kernel, args, ctx, value):
    return _with_constants(kernel, args, GELU_COEF=value)


# --- layernorm

def _ln_eps(eps):
    def run(kernel, args, ctx, value):
        return _with_constants(kernel, args, LN_EPS=eps)
    return run


def _ln_eps_fitted(kernel, args, ctx, value):
    return _with_constants(kernel, args, LN_EPS=value)


def _ln_eps_name(kernel, args, value, ctx):
    """A fitted eps, snapped to a round value where one is as good; the catalogued values
    (1e-6, 1e-12, 1e-4) and the C's own are named by their own variants."""
    if value < 1e-9 or any(abs(value / e - 1) < 0.2 for e in (1e-6, 1e-4, 1e-5)):
        return None, value, ""
    exp = math.floor(math.log10(value))
    for x in (10.0 ** exp, 10.0 ** (exp + 1), 5 * 10.0 ** exp, 2 * 10.0 ** exp):
        if abs(value / x - 1) < 0.05:
            return "layernorm.eps", x, ""
    return "layernorm.eps", value, ""


def _ln_eps_outside(kernel, args, ctx, value):
    """(x - mean) / (sqrt(var) + eps): eps added outside the square root."""
    x, w, b = args["inp"], args["weight"], args["bias"]
    mean = x.mean(-1)
    xs = x - mean[..., None]
    rstd = 1.0 / (np.sqrt((xs * xs).mean(-1)) + value)
    return _forward(kernel, ((rstd[..., None] * xs) * w + b, mean, rstd))


def _ln_outside_name(kernel, args, value, ctx):
    if value < 1e-9:
        return None, value, ""     # no eps at all: layernorm.eps's business
    exp = math.floor(math.log10(value))
    for x in (10.0 ** exp, 10.0 ** (exp + 1), 5 * 10.0 ** exp, 2 * 10.0 ** exp):
        if abs(value / x - 1) < 0.05:
            return "layernorm.eps-outside-sqrt", x, ""
    return "layernorm.eps-outside-sqrt", value, ""


def _ln_over_positions(kernel, args, ctx, value):
    """The statistics taken over the positions (axis T) instead of the channels."""
    x, w, b = args["inp"], args["weight"], args["bias"]
    if x.ndim != 3 or x.shape[1] < 2 or ctx["output"] != "out":
        return None     # (such a port has no per-position mean and rstd to compare)
    mean = x.mean(1, keepdims=True)
    xs = x - mean
    var = (xs * xs).mean(1, keepdims=True)
    return {"out": xs / np.sqrt(var + numpy_kernels.LN_EPS) * w + b}


def _ln_unbiased(kernel, args, ctx, value):
    x, w, b = args["inp"], args["weight"], args["bias"]
    C = x.shape[-1]
    mean = x.mean(-1)
    xs = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xs * xs).sum(-1) / (C - 1) + numpy_kernels.LN_EPS)
    return _forward(kernel, ((rstd[..., None] * xs) * w + b, mean, rstd))


# --- attention

def _causal(T, diagonal=True):
    return np.tril(np.ones((T, T), bool), 0 if diagonal else -1)


def _attention(inp, NH, scale=None, mask=None):
    """attention_forward in float64 with a given scale and set of visited (t, t2)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    mask = _causal(T) if mask is None else mask
    q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    pre = np.where(mask, (q @ k.transpose(0, 1, 3, 2)) * scale, 0.0)
    maxval = np.maximum(np.where(mask, pre, -np.inf).max(-1, keepdims=True), numpy_kernels.ATT_MAXVAL_INIT)
    att = np.exp(np.where(mask, pre - maxval, -np.inf))
    s = att.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        att = np.where(s == 0, 0.0, att / s)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return _forward("attention_forward", (out, pre, att))


def _att_scale(kernel, args, ctx, value):
    """The scores scaled by ``value`` instead of 1/sqrt(hs) (forward; in the backward, dq
    and dk, which are linear in the scale)."""
    C = args["inp"].shape[-1] // 3
    hs = C // int(args["NH"])
    if kernel == "attention_forward":
        return _attention(args["inp"], int(args["NH"]), scale=value)
    start = args["dinp"].copy()
    out = _oracle(kernel, args)
    delta = out["dinp"] - start
    delta[..., :2 * C] *= value * math.sqrt(hs)
    out["dinp"] = start + delta
    return out


def _att_scale_fit(kernel):
    # the forward is not linear in the scale (the softmax): a search over [1e-3, 10];
    # the backward's dq, dk are: a closed form
    return Fit(1e-3, 10.0, log=True) if kernel == "attention_forward" else Fit(-10.0, 10.0, linear=True)


def _att_scale_name(kernel, args, value, ctx):
    """Which dimension a fitted attention scale matches: 1/sqrt(hs) is the C's (no cause);
    1/hs and 1 keep their ids; the others are named in the description."""
    B, T, C3 = args["inp"].shape
    C, NH = C3 // 3, int(args["NH"])
    hs = C // NH
    known = [("1/sqrt(hs)", 1 / math.sqrt(hs)), ("1/hs", 1 / hs), ("1", 1.0), ("1/sqrt(C)", 1 / math.sqrt(C)),
             ("1/C", 1 / C), ("1/sqrt(NH)", 1 / math.sqrt(NH)), ("1/sqrt(3C)", 1 / math.sqrt(3 * C)),
             ("1/sqrt(T)", 1 / math.sqrt(T)), ("sqrt(hs)", math.sqrt(hs))]
    for label, x in known:
        if abs(value - x) <= 2e-3 * x:
            if label == "1/sqrt(hs)":
                return None, value, ""
            vid = {"1/hs": "attention.scale=1/hs", "1": "attention.no-scale"}.get(label, "attention.scale")
            return vid, x, f" = {label}" + (f" = 1/sqrt({round(1 / x ** 2)})" if label.startswith("1/sqrt(") else "")
    if abs(value * math.sqrt(hs) - 1) < 1e-6:
        return None, value, ""
    return "attention.scale", value, " (matches no dimension of the model)"


def _attention_any(inp, NH, *, order="qkv", split="heads-major", merge="transpose", axis=-1, diagonal=0,
                   causal=True, scale=None, masking="-inf"):
    """attention_forward in float64 with the mistakes a port makes: q, k, v taken in another
    ``order``; the heads split from the channels in another layout (``split``:
    ``"heads-major"`` as the C, ``"no-transpose"`` viewing (B,T,C) as (B,NH,T,hs),
    ``"interleaved"`` channel c = d*NH + h) or merged back without transposing
    (``merge="no-transpose"``); the softmax over another ``axis`` (-2: over the queries);
    the mask's ``diagonal`` (tril(k)); no mask (``causal=False``); another ``scale``; the
    mask applied after the softmax without renormalising (``masking="after"``) or as a
    finite score (``masking=0.0``) instead of -inf.
    Returns (out, preatt, att), preatt 0 where the mask leaves it out (as the C's)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    chunks = dict(zip(order, (inp[..., i * C:(i + 1) * C] for i in range(3))))

    def heads(a):
        if split == "no-transpose":
            return a.reshape(B, NH, T, hs)
        if split == "interleaved":
            return a.reshape(B, T, hs, NH).transpose(0, 3, 1, 2)
        return a.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    q, k, v = (heads(chunks[x]) for x in "qkv")
    mask = np.tril(np.ones((T, T), bool), diagonal) if causal else np.ones((T, T), bool)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    if masking != "-inf":
        # the mask applied after the softmax (no renormalisation), or as a finite score
        e = np.exp(np.where(mask, scores, masking) - np.max(np.where(mask, scores, masking), -1, keepdims=True)) \
            if masking != "after" else np.exp(scores - scores.max(-1, keepdims=True))
        att = e / e.sum(-1, keepdims=True)
        if masking == "after":
            att = np.where(mask, att, 0.0)
        return _merged(att @ v, merge), np.where(mask, scores, 0.0), att
    pre = np.where(mask, scores, -np.inf)
    mx = np.max(pre, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(pre - mx)
    s = e.sum(axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        att = np.where(s == 0, 0.0, e / s)
    return _merged(att @ v, merge), np.where(mask, pre, 0.0), att


def _merged(y, merge: str):
    """(B,NH,T,hs) -> (B,T,C): as the C (head-major channels), without transposing, or
    interleaved (channel d*NH + h)."""
    B, NH, T, hs = y.shape
    if merge == "no-transpose":
        return y.reshape(B, T, NH * hs)
    if merge == "interleaved":
        return y.transpose(0, 2, 3, 1).reshape(B, T, NH * hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)


_PERMUTATIONS = ("qvk", "kqv", "kvq", "vqk", "vkq")


def _att_maskings(kernel, args):
    return [_Form("the causal mask applied after the softmax (the kept weights not renormalised)", "masking",
                  "after"),
]


def _att_mask_fill(kernel, args, ctx, value):
    return _forward(kernel, _attention_any(args["inp"], int(args["NH"]), masking=value))


def _mask_fill_name(kernel, args, value, ctx):
    if value < -60:
        return None, value, ""     # as good as -inf: the C's
    near = round(value)
    return "attention.mask-fill", float(near) if abs(value - near) < 1e-3 else value, ""


def _att_axes(kernel, args):
    # (over the heads, a causal mask's -inf leaves 0/0: a port sees NaN, not a divergence)
    return [_Form("the queries (dim=-2)", "axis", -2)]


def _att_changed(**fixed):
    """One family of attention mistakes: ``ctx["choice"]`` is the form tried (or ``fixed``)."""
    def run(kernel, args, ctx, value):
        change = dict(fixed)
        choice = ctx.get("choice")
        if choice is not None:
            key, x = choice.change
            change[key] = x
        return _forward(kernel, _attention_any(args["inp"], int(args["NH"]), **change))
    return run


class _Form(str):
    """A choice of a variant: its text, and the keyword of :func:`_attention_any` it sets."""

    def __new__(cls, text, key, value):
        obj = super().__new__(cls, text)
        obj.change = (key, value)
        return obj


def _att_layouts(kernel, args):
    return [_Form("the heads split without transposing ((B,T,C) viewed as (B,NH,T,hs))", "split", "no-transpose"),
            _Form("the heads split interleaved (channel c = d*NH + h)", "split", "interleaved"),
            _Form("the heads merged back without transposing ((B,NH,T,hs) viewed as (B,T,C))", "merge",
                  "no-transpose"),
            _Form("the heads merged back interleaved (channel c = d*NH + h)", "merge", "interleaved")]


def _att_orders(kernel, args):
    return [_Form(o, "order", o) for o in _PERMUTATIONS]


def _att_diagonals(kernel, args):
    T = args["inp"].shape[1]
    return [_Form(f"tril({k})" + (" (position t sees t+%d)" % k if k > 0 else ""), "diagonal", k)
            for k in (1, 2, -2) if abs(k) < T]


def _att_mask(diagonal: bool):
    def run(kernel, args, ctx, value):
        T = args["inp"].shape[1]
        mask = np.ones((T, T), bool) if diagonal else _causal(T, diagonal=False)
        return _attention(args["inp"], int(args["NH"]), mask=mask)
    return run


def _att_no_diagonal_defined(kernel, output, args):
    T = args["inp"].shape[1]
    return _causal(T, diagonal=False) if output == "preatt" else np.ones((), bool)


# --- softmax and cross-entropy

def _softmax_padded(kernel, args, ctx, value):
    """The softmax over all Vp columns; in the loss's backward (where the replay passes the
    logits too), dlogits over all Vp columns from those probabilities."""
    x = args.get("logits")
    if x is None or x.shape[-1] == int(args["V"]):
        return None
    e = np.exp(x - np.maximum(x.max(-1, keepdims=True), numpy_kernels.ATT_MAXVAL_INIT))
    probs = e / e.sum(-1, keepdims=True)
    if kernel == "softmax_forward":
        return {"probs": probs}
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    return {"dlogits": args["dlogits"] + args["dlosses"][..., None] * (probs - onehot)}


def _logit_scale(kernel, args, ctx, value):
    """The logits scaled by ``value`` (a temperature 1/value) before the softmax: the
    probabilities of value*logits over the V columns; in the loss's backward (given the
    logits) dlogits = dloss * value * (p - onehot)."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    z = value * x[..., :V]
    e = np.exp(z - z.max(-1, keepdims=True))
    probs = np.zeros_like(x)
    probs[..., :V] = e / e.sum(-1, keepdims=True)
    if kernel == "softmax_forward":
        return {"probs": probs}
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    d = args["dlosses"][..., None] * value * (probs - onehot)
    return {"dlogits": args["dlogits"] + np.where(np.arange(x.shape[-1]) < V, d, 0.0)}


def _logit_scale_estimate(kernel, args, actual):
    """The scale s of softmax(s*logits) from the output, in closed form: log p_i - log p_j
    = s*(l_i - l_j), so s is the slope of the log-probabilities (from dlogits: of log of
    the non-target columns' gradient) against the logits, over a few positions."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    rows = x.reshape(-1, x.shape[-1])[:, :V]
    act = actual.reshape(-1, actual.shape[-1])[:, :V]
    if kernel == "crossentropy_softmax_backward":
        act = act - args["dlogits"].reshape(-1, actual.shape[-1])[:, :V]
        tgt = args["targets"].reshape(-1)
        act = act.copy()
        act[np.arange(act.shape[0]), tgt] = np.nan     # the target column holds p - 1
    take = np.linspace(0, rows.shape[0] - 1, min(8, rows.shape[0])).astype(int)
    slopes = []
    for i in take:
        y, l = act[i], rows[i]
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() < 3:
            continue
        ly, ll = np.log(y[ok]), l[ok]
        ll = ll - ll.mean()
        den = float(ll @ ll)
        if den > 0:
            slopes.append(float(ll @ (ly - ly.mean())) / den)
    return float(np.median(slopes)) if slopes else None


def _logit_scale_name(kernel, args, value, ctx):
    if abs(value - 1) < 1e-6:
        return None, value, ""
    return "crossentropy.logit-scale", value, f" (a temperature of {_const(1 / value)})"


def _ce_log_eps(kernel, args, ctx, value):
    p = np.take_along_axis(args["probs"], args["targets"][..., None].astype(np.intp), -1)[..., 0]
    return {"losses": -np.log(p + value)}


def _shift(step: int):
    """Labels of the neighbouring position: target t+step, within each sequence."""
    def run(kernel, args, ctx, value):
        if args["targets"].shape[1] < 2:
            return None
        return _oracle(kernel, args, targets=np.roll(args["targets"], -step, axis=1))
    return run


def _shift_defined(step: int):
    def defined(kernel, output, args):
        B, T = args["targets"].shape
        d = np.ones((B, T), bool)
        d[:, T - 1 if step > 0 else 0] = False   # the label that falls off the end
        return d if kernel == "crossentropy_forward" else d[..., None]
    return defined


# --- embeddings

def _position_map(args, actual) -> np.ndarray | None:
    """Which row of wpe each position t took: the row nearest to what the output holds
    beyond the token embedding, read at the first sequence (None: no row fits)."""
    inp, wte, wpe = args["inp"], args["wte"], args["wpe"]
    rest = np.asarray(actual, np.float64)[0] - wte[inp[0]]               # (T, C)
    d = ((rest[:, None, :] - wpe[None, :, :]) ** 2).sum(-1)             # (T, maxT)
    return np.argmin(d, axis=1)


def _encoder_positions(kernel, args, ctx, value):
    """wte[token] + wpe[r(t)]: the position rows found by :func:`_position_map`."""
    rows = _position_map(args, ctx["actual"])
    T = args["inp"].shape[1]
    if np.array_equal(rows, np.arange(T)):
        return None
    return {"out": args["wte"][args["inp"]] + args["wpe"][rows]}


def _positions_name(kernel, args, value, ctx):
    rows = _position_map(args, ctx["actual"])
    T = rows.size
    t = np.arange(T)
    k = int(rows[0])
    if np.array_equal(rows, t + k):
        return "embedding.position-shift", value, f"positions counted from {k}: wpe[t+{k}] instead of wpe[t]"
    if np.array_equal(rows, t[::-1]):
        return "embedding.positions", value, "positions reversed: wpe[T-1-t] instead of wpe[t]"
    shown = ", ".join(f"{a}->{b}" for a, b in zip(t[:6], rows[:6])) + (" ..." if T > 6 else "")
    return "embedding.positions", value, f"positions mapped to other rows of wpe ({shown}) instead of wpe[t]"


def _encoder_without(table):
    def run(kernel, args, ctx, value):
        T = args["inp"].shape[1]
        return {"out": args["wpe"][:T] + 0 * args["wte"][args["inp"]] if table == "wte"
                else args["wte"][args["inp"]]}
    return run


def _table_scale(kernel, args, ctx, value):
    """value*wte[token] + wpe[t] (the token table scaled), or wte[token] + value*wpe[t]."""
    T = args["inp"].shape[1]
    tok, pos = args["wte"][args["inp"]], args["wpe"][:T]
    return {"out": value * tok + pos if ctx["choice"] == "wte" else tok + value * pos}


def _tables():
    return lambda kernel, args: ["wte", "wpe"]


def _table_scale_name(kernel, args, value, ctx):
    if abs(value - 1.0) < 1e-9 or abs(value) < 1e-9:
        return None, value, ""      # the C's, or a missing table (embedding.no-*)
    C = args["wte"].shape[1]
    known = [("sqrt(C)", math.sqrt(C)), ("1/sqrt(C)", 1 / math.sqrt(C)), ("C", float(C)), ("2", 2.0), ("0.5", 0.5)]
    match = next((label for label, x in known if abs(value / x - 1) < 1e-4), None)
    table = "token" if ctx["choice"] == "wte" else "position"
    return "embedding.table-scale", value, f"the {table} embedding ({ctx['choice']}) scaled by {_short(value)}" + \
        (f" = {match}" if match else "")


# --- the residual stream

def _branch_scale(kernel, args, ctx, value):
    """out = inp1 + value*inp2 (the branch scaled), or value*inp1 + inp2 (the stream)."""
    if ctx["choice"] == "branch":
        return {"out": args["inp1"] + value * args["inp2"]}
    return {"out": value * args["inp1"] + args["inp2"]}


def _branch_choices(kernel, args):
    return ["branch", "stream"]


def _not_one(kernel, args, value, ctx):
    if abs(value - 1.0) < 1e-9:
        return None, value, ""
    what = "the branch added as x + {v}*f(x)" if ctx["choice"] == "branch" else "the stream scaled: {v}*x + f(x)"
    return "residual.branch-scale", value, what.format(v=_short(value))


def _const(x: float) -> str:
    return f"{x:.4g}"


def _short(x: float) -> str:
    return f"{x:.4g}"


# --- the loss and its gradient

def _ce_delta(kernel, args):
    """The C's crossentropy_softmax_backward: (the buffer before, its contribution)."""
    start = args["dlogits"].copy()
    out = _oracle(kernel, args)
    return start, out["dlogits"] - start


def _label_smoothing(kernel, args, ctx, value):
    """Targets smoothed (torch's label_smoothing=eps): (1-eps)*onehot + eps/V over the V
    real columns; dlogits gains dloss*eps*(onehot - 1/V)."""
    V = int(args["V"])
    start, delta = _ce_delta(kernel, args)
    dl = args["dlosses"][..., None]
    onehot = np.zeros(delta.shape[:-1] + (V,))
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    delta[..., :V] += dl * value * (onehot - 1.0 / V)
    return {"dlogits": start + delta}


def _divisor(kernel, args, ctx, value):
    """The loss (and so dlosses) scaled by ``value``: averaged over another count."""
    if kernel == "loss_mean":
        return {ctx["output"]: args["value"] * value}
    start, delta = _ce_delta(kernel, args)
    return {"dlogits": start + value * delta}


def _divisor_name(kernel, args, value, ctx):
    n_c = int(args["n"]) if kernel == "loss_mean" else int(np.prod(args["targets"].shape))
    if value <= 0:
        return None, value, ""
    n = n_c / value
    B, T = (None, None) if kernel == "loss_mean" else args["targets"].shape
    near = round(n)
    if near < 1 or abs(n - near) > 1e-3 * max(n, 1) or near in (n_c, n_c - 1, n_c + 1):
        return None, value, ""
    named = {1: "summed, not averaged", B: f"B={B}", T: f"T={T}"}
    return "crossentropy.divisor", n_c / near, f"{near}" + (f" ({named[near]})" if near in named else "") + \
        f" instead of B*T={n_c}"


def _ignored(kernel, args, ctx, value):
    """Some positions ignored (ignore_index, a padding mask): their gradient is zero, the
    others' scaled by ``value`` (averaged over the rest). Which positions: those whose
    gradient is zero in the judged output where the C's is not."""
    start, delta = _ce_delta(kernel, args)
    actual = np.asarray(ctx["actual"], np.float64) - start
    zero = np.all(actual == 0, axis=-1) & np.any(delta != 0, axis=-1)
    if not zero.any() or zero.all():
        return None
    return {"dlogits": start + np.where(zero[..., None], 0.0, value * delta)}


def _ignored_name(kernel, args, value, ctx):
    start, delta = _ce_delta(kernel, args)
    a = np.asarray(ctx["actual"], np.float64) - start
    zero = np.all(a == 0, axis=-1) & np.any(delta != 0, axis=-1)
    targets = np.unique(args["targets"][zero])
    n = int(zero.sum())
    text = f"{n} of the {zero.size} positions ignored"
    if targets.size == 1:
        text += f" (those whose target is {int(targets[0])}: ignore_index={int(targets[0])})"
    return "crossentropy.ignored-positions", value, text


# --- any op: a constant factor or offset on one output

def _scaled_output(kernel, args, ctx, value):
    name = ctx["output"]
    start = args.get(name) if kernel in BACKWARD_KERNELS else None
    out = run_kernel(numpy_kernels, kernel, args, np.float64)
    if name not in out:
        return None
    if start is not None:
        out[name] = start + value * (out[name] - start)
    else:
        out[name] = value * out[name]
    return out


def _offset_output(kernel, args, ctx, value):
    name = ctx["output"]
    out = run_kernel(numpy_kernels, kernel, args, np.float64)
    if name not in out:
        return None
    out[name] = out[name] + value
    return out


def _factor_name(kernel, args, value, ctx):
    return (None, value, "") if abs(value - 1.0) < 1e-12 else ("output.scale", value, "")


def _offset_name(kernel, args, value, ctx):
    return (None, value, "") if value == 0.0 else ("output.offset", value, "")


_ANY_OP = tuple(k for k in SIGNATURES if k != "adamw")

# --- matmul and the backward accumulation

def _matmul_no_bias(kernel, args, ctx, value):
    key = "bias" if kernel == "matmul_forward" else "dbias"
    if args.get(key) is None:
        return None
    if kernel == "matmul_forward":
        return _oracle(kernel, args, bias=None)
    out = _oracle(kernel, args, dbias=None)
    out["dbias"] = args["dbias"]       # left as it was
    return out


def _overwrite(kernel, args, ctx, value):
    """The judged gradient buffer assigned (=) instead of accumulated (+=)."""
    name = ctx["output"]
    if args.get(name) is None or not np.any(args[name]):
        return None      # a zero buffer: = and += agree
    return _oracle(kernel, args, **{name: np.zeros_like(args[name])})


def _rows(a):
    """(..., n) -> (rows, n): the (b,t) positions in the C's loop order."""
    return a.reshape(-1, a.shape[-1])


def _ln_norm_last(a):
    inp, mean, rstd = _rows(a["inp"])[-1], a["mean"].reshape(-1)[-1], a["rstd"].reshape(-1)[-1]
    return (inp - mean) * rstd


def _encoder_dwte_last(a):
    """dwte[ix] = d: each token row keeps the gradient of its last occurrence; rows of
    tokens not in the batch keep their value."""
    ids = a["inp"].reshape(-1)
    dout = _rows(a["dout"])
    out = a["dwte"].copy()
    uids, first_rev = np.unique(ids[::-1], return_index=True)
    out[uids] = dout[ids.size - 1 - first_rev]
    return out


def _encoder_dwpe_last(a):
    out = a["dwpe"].copy()
    T = a["dout"].shape[1]
    out[:T] = a["dout"][-1]          # the last b writes each position
    return out


# (kernel, gradient) -> its value when the += of the C's innermost reduction is an =
# (the last term of the loop the C runs in order is all that is left)
_LAST_TERM = {
    ("layernorm_backward", "dbias"): lambda a: _rows(a["dout"])[-1],
    ("layernorm_backward", "dweight"): lambda a: _ln_norm_last(a) * _rows(a["dout"])[-1],
    ("matmul_backward", "dbias"): lambda a: _rows(a["dout"])[-1],
    ("matmul_backward", "dweight"): lambda a: np.outer(_rows(a["dout"])[-1], _rows(a["inp"])[-1]),
    ("matmul_backward", "dinp"): lambda a: (a["dout"][..., -1:] * a["weight"][-1]),
    ("encoder_backward", "dwte"): _encoder_dwte_last,
    ("encoder_backward", "dwpe"): _encoder_dwpe_last,
}


def _last_term(kernel, args, ctx, value):
    """A sum's ``+=`` turned into ``=``: only the last term of the C's loop is kept."""
    f = _LAST_TERM.get((kernel, ctx["output"]))
    if f is None or args.get(ctx["output"]) is None:
        return None
    out = _oracle(kernel, args)
    out[ctx["output"]] = f(args)
    return out


# --- AdamW

def _adamw(args, *, bias_correction=True, eps_in_sqrt=False, l2=False, decay=None, **changed):
    """AdamW in float64 with one of its conventions changed (``decay``: where weight decay
    applies; ``changed``: hyperparameters replaced). Returns param, m, v."""
    a = dict(args, **changed)
    p, g, m, v = (np.array(a[k], np.float64) for k in ("param", "grad", "m", "v"))
    lr, b1, b2, eps, wd = AdamW.from_kernel_args(a).as_float32().args()   # float arguments of the C
    t = int(a["t"])
    wd = np.where(decay, wd, 0.0) if decay is not None else wd
    if l2:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t) if bias_correction else m
    v_hat = v / (1 - b2 ** t) if bias_correction else v
    denom = np.sqrt(v_hat + eps) if eps_in_sqrt else np.sqrt(v_hat) + eps
    p = p - lr * (m_hat / denom + (0.0 if l2 else wd * p))
    return {"param": p, "m": m, "v": v}


def _adamw_l2_terms(kernel, args, output):
    """g + wd*param cancels where the two oppose: the moments and the update round
    relative to |g| + wd|param|, not to the (small) sum."""
    from pyref.terms import adamw_magnitudes
    hp = AdamW.from_kernel_args(args).kernel_args(int(args["t"]))   # float arguments of the C
    g = np.abs(args["grad"]) + abs(hp["weight_decay"]) * np.abs(args["param"])
    if output == "v":
        return (1 - hp["beta2"]) * g * g
    v = _adamw(args, l2=True)["v"]
    m_mag, p_mag = adamw_magnitudes(args["param"], args["m"], g, v, hp)
    return np.asarray(m_mag if output == "m" else p_mag, np.float64)


def _adamw_variant(**kw):
    def run(kernel, args, ctx, value):
        return _adamw(args, **kw)
    return run


def _adamw_step(delta: int):
    def run(kernel, args, ctx, value):
        t = int(args["t"]) + delta
        return None if t < 1 else _adamw(args, t=t)
    return run


def _adamw_changed(**hyper):
    def run(kernel, args, ctx, value):
        if AdamW.from_kernel_args(args).as_float32() == AdamW.from_kernel_args(dict(args, **hyper)).as_float32():
            return None   # the change changes nothing
        return _adamw(args, **hyper)
    return run


def _adamw_no_decay_1d(kernel, args, ctx, value):
    one_d = ctx.get("one_d")
    if one_d is None:
        one_d = one_d_mask(np.size(args["param"]))
    if one_d is None or not np.any(one_d) or float(args["weight_decay"]) == 0.0:
        return None
    return _adamw(args, decay=~np.broadcast_to(one_d, np.shape(args["param"])))


def one_d_mask(n_params: int, config=None) -> np.ndarray | None:
    """For a flat parameter vector of a model (``config``, else the built-in preset with
    ``n_params`` parameters): True at the parameters of 1-D tensors per layer (biases,
    layernorm gains); None when no config fits."""
    from pyref.config import PRESETS, param_shapes
    if config is None:
        config = next((c for c in PRESETS.values() if c.num_parameters() == n_params), None)
        if config is None:
            return None
    parts = [np.full(math.prod(s), is_one_d(name, s)) for name, s in param_shapes(config).items()]
    mask = np.concatenate(parts)
    return mask if mask.size == n_params else None


def is_one_d(name: str, shape: tuple[int, ...]) -> bool:
    """Whether parameter tensor ``name`` (shape as ``param_shapes`` gives it: stacked over
    layers except wte, wpe, lnfw, lnfb) is 1-D per layer: a bias or a layernorm gain."""
    return len(shape) - (name in LAYER_PARAMS) == 1


# --- the loss mean (model level)

def _mean_over(delta: int):
    def run(kernel, args, ctx, value):
        n = int(args["n"])
        return None if n + delta < 1 else {ctx["output"]: args["value"] * (n / (n + delta))}
    return run


# ----------------------------------------------------------------------------- catalogue


CATALOGUE: tuple[Variant, ...] = (
    # GELU
    Variant("gelu.erf", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU in its exact form x*Phi(x) (erf); train_gpt2.c uses the tanh approximation", _gelu_erf),
    Variant("gelu.sigmoid", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU as x*sigmoid(1.702x) (the sigmoid approximation); train_gpt2.c uses the tanh approximation",
            _gelu_sigmoid),
    Variant("gelu.relu", "gelu", ("gelu_forward", "gelu_backward"),
            "ReLU where train_gpt2.c has GELU (tanh approximation)", _relu),
    Variant("gelu.tanh-scale", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's tanh argument scaled by {value}{note} instead of sqrt(2/pi)", _gelu_tanh_scale,
            fit=Fit(0.1, 3.0, log=True), name=_gelu_scale_name),
    Variant("gelu.cubic-constant", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's cubic coefficient is {value} instead of 0.044715", _gelu_coef, fit=Fit(0.02, 0.08)),
    # layernorm
    *(Variant(f"layernorm.eps={e:g}", "layernorm", ("layernorm_forward",),
              f"layernorm's eps is {e:g} instead of 1e-5", _ln_eps(e)) for e in (1e-6, 1e-12, 1e-4)),
    Variant("layernorm.eps", "layernorm", ("layernorm_forward",),
            "layernorm's eps is {value} instead of 1e-5", _ln_eps_fitted, fit=Fit(1e-10, 1.0, log=True),
            name=_ln_eps_name),
    Variant("layernorm.eps-outside-sqrt", "layernorm", ("layernorm_forward",),
            "layernorm's eps ({value}) added outside the square root: (x-mean)/(sqrt(var)+eps)", _ln_eps_outside,
            fit=Fit(1e-10, 1.0, log=True), name=_ln_outside_name, fallback=1),
    Variant("layernorm.axis", "layernorm", ("layernorm_forward",),
            "layernorm's mean and variance taken over the positions (T) instead of the channels (C)",
            _ln_over_positions),
    Variant("layernorm.unbiased-variance", "layernorm", ("layernorm_forward",),
            "layernorm divides the variance by C-1 (unbiased) instead of C", _ln_unbiased),
    # attention
    Variant("attention.scale", "attention", ("attention_forward", "attention_backward"),
            "attention scores scaled by {value}{note} instead of 1/sqrt(hs)", _att_scale,
            fit=_att_scale_fit, name=_att_scale_name),
    Variant("attention.no-diagonal", "attention", ("attention_forward",),
            "the causal mask leaves out the diagonal (t2 < t instead of t2 <= t)", _att_mask(False),
            defined=_att_no_diagonal_defined, unwritten=True),
    Variant("attention.no-causal-mask", "attention", ("attention_forward",),
            "no causal mask: every position attends to the future too", _att_mask(True)),
    Variant("attention.mask-diagonal", "attention", ("attention_forward",),
            "the causal mask off by a diagonal: {choice} instead of tril(0)", _att_changed(),
            choices=_att_diagonals),
    Variant("attention.masking", "attention", ("attention_forward",),
            "{choice}", _att_changed(), choices=_att_maskings),
    Variant("attention.mask-fill", "attention", ("attention_forward",),
            "the masked scores set to {value} before the softmax instead of -inf", _att_mask_fill,
            fit=Fit(-100.0, 100.0), name=_mask_fill_name),
    Variant("attention.layout", "attention", ("attention_forward",),
            "{choice}", _att_changed(), choices=_att_layouts),
    Variant("attention.qkv-order", "attention", ("attention_forward",),
            "q, k, v taken from c_attn's output in the order {choice} instead of q, k, v",
            _att_changed(), choices=_att_orders),
    Variant("attention.softmax-axis", "attention", ("attention_forward",),
            "the attention softmax taken over {choice} instead of the keys (dim=-1)",
            _att_changed(), choices=_att_axes),
    # softmax, cross-entropy, labels
    Variant("softmax.padded-columns", "softmax", ("softmax_forward", "crossentropy_softmax_backward"),
            "softmax normalises over all Vp columns, padding included, instead of the V real ones",
            _softmax_padded),
    Variant("crossentropy.log-eps", "crossentropy", ("crossentropy_forward",),
            "cross-entropy takes -log(p + {value}): an epsilon inside the log", _ce_log_eps,
            fit=Fit(1e-12, 1e-1, log=True)),
    Variant("crossentropy.mean-over-BT+1", "crossentropy", ("loss_mean",),
            "the loss (or its gradient, dlosses) averaged over B*T+1 positions instead of B*T",
            _mean_over(+1)),
    Variant("crossentropy.mean-over-BT-1", "crossentropy", ("loss_mean",),
            "the loss (or its gradient, dlosses) averaged over B*T-1 positions instead of B*T",
            _mean_over(-1)),
    Variant("labels.next-position", "labels", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "labels shifted one position: position t is scored against the target of t+1",
            _shift(+1), defined=_shift_defined(+1)),
    Variant("labels.previous-position", "labels", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "labels shifted one position: position t is scored against the target of t-1",
            _shift(-1), defined=_shift_defined(-1)),
    Variant("crossentropy.logit-scale", "crossentropy", ("softmax_forward", "crossentropy_softmax_backward"),
            "the logits scaled by {value}{note} before the softmax", _logit_scale,
            fit=Fit(0.01, 100.0, estimate=_logit_scale_estimate), name=_logit_scale_name),
    Variant("crossentropy.label-smoothing", "crossentropy", ("crossentropy_softmax_backward",),
            "the targets label-smoothed: (1-{value})*onehot + {value}/V (label_smoothing={value})",
            _label_smoothing, fit=Fit(1e-4, 1.0, linear=True)),
    Variant("crossentropy.divisor", "crossentropy", ("crossentropy_softmax_backward", "loss_mean"),
            "the loss divided by {note}", _divisor, fit=Fit(1e-9, 1e9, linear=True), name=_divisor_name),
    Variant("crossentropy.ignored-positions", "crossentropy", ("crossentropy_softmax_backward",),
            "{note}, the loss averaged over the others", _ignored, fit=Fit(1e-9, 1e9, linear=True),
            name=_ignored_name),
    # embeddings
    Variant("embedding.position-shift", "embedding", ("encoder_forward",),
            "{note}", _encoder_positions, name=_positions_name),
    Variant("embedding.no-wpe", "embedding", ("encoder_forward",),
            "the position embedding (wpe) not added", _encoder_without("wpe")),
    Variant("embedding.no-wte", "embedding", ("encoder_forward",),
            "the token embedding (wte) not added", _encoder_without("wte")),
    Variant("embedding.table-scale", "embedding", ("encoder_forward",),
            "{note}", _table_scale, fit=Fit(-1e4, 1e4, linear=True), choices=_tables(), name=_table_scale_name),
    # the residual stream
    Variant("residual.branch-scale", "residual", ("residual_forward",),
            "a constant factor on the residual: {note} instead of x + f(x)", _branch_scale,
            fit=Fit(-1e3, 1e3, linear=True), choices=_branch_choices, name=_not_one),
    # matmul, accumulation
    Variant("matmul.no-bias", "matmul", ("matmul_forward", "matmul_backward"),
            "matmul without its bias (forward: not added; backward: dbias not accumulated)", _matmul_no_bias),
    Variant("backward.overwrite", "backward", BACKWARD_KERNELS,
            "the gradient is assigned (=) instead of accumulated (+=)", _overwrite),
    Variant("backward.last-term-only", "backward", tuple(dict.fromkeys(k for k, _ in _LAST_TERM)),
            "a sum's += turned into = inside its loop: only the last term is kept", _last_term),
    # AdamW
    Variant("adamw.no-bias-correction", "adamw", ("adamw",),
            "AdamW without bias correction (m, v not divided by 1 - beta^t)",
            _adamw_variant(bias_correction=False)),
    Variant("adamw.step+1", "adamw", ("adamw",), "AdamW's step count off by one (t+1 in the bias correction)",
            _adamw_step(+1)),
    Variant("adamw.step-1", "adamw", ("adamw",), "AdamW's step count off by one (t-1 in the bias correction)",
            _adamw_step(-1)),
    Variant("adamw.eps-in-sqrt", "adamw", ("adamw",), "AdamW's eps inside the square root: sqrt(v_hat + eps)",
            _adamw_variant(eps_in_sqrt=True)),
    Variant("adamw.l2", "adamw", ("adamw",),
            "weight decay added to the gradient (L2, Adam) instead of decoupled (AdamW)",
            _adamw_variant(l2=True), terms=_adamw_l2_terms),
    Variant("adamw.weight-decay=0.01", "adamw", ("adamw",), "weight decay 0.01 (torch's default) instead of "
            "the one given", _adamw_changed(weight_decay=0.01)),
    Variant("adamw.no-decay-1d", "adamw", ("adamw",),
            "no weight decay on 1-D parameters (biases, layernorm gains); train_gpt2.c decays all",
            _adamw_no_decay_1d),
    Variant("adamw.betas=(0.9,0.95)", "adamw", ("adamw",), "AdamW betas (0.9, 0.95) instead of the ones given",
            _adamw_changed(beta1=0.9, beta2=0.95)),
    # any op, when no change above explains it
    Variant("output.scale", "output", _ANY_OP, "{output} off by a constant factor {value}", _scaled_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_factor_name, fallback=2),
    Variant("output.offset", "output", _ANY_OP, "{output} off by a constant offset {value}", _offset_output,
            fit=Fit(-1e6, 1e6, linear=True), name=_offset_name, fallback=2),
)
VARIANT_BY_ID = {v.id: v for v in CATALOGUE}
assert len(VARIANT_BY_ID) == len(CATALOGUE), "duplicate variant ids"
assert all(k in SIGNATURES or k in MODEL_QUANTITIES for v in CATALOGUE for k in v.kernels)
