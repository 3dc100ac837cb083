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


def _gelu_coef(kernel, args, ctx, value):
    return _with_constants(kernel, args, GELU_COEF=value)


# --- layernorm

def _ln_eps(eps):
    def run(kernel, args, ctx, value):
        return _with_constants(kernel, args, LN_EPS=eps)
    return run


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


def _att_scale(scale_of_hs):
    """The scores scaled by ``scale_of_hs(hs)`` instead of 1/sqrt(hs) (forward, and dq,
    dk in the backward, which are linear in the scale)."""
    def run(kernel, args, ctx, value):
        C = args["inp"].shape[-1] // 3
        hs = C // int(args["NH"])
        new = scale_of_hs(hs)
        if np.isclose(new, 1.0 / math.sqrt(hs), rtol=1e-12):
            return None
        if kernel == "attention_forward":
            return _attention(args["inp"], int(args["NH"]), scale=new)
        start = args["dinp"].copy()
        out = _oracle(kernel, args)
        delta = out["dinp"] - start
        delta[..., :2 * C] *= new * math.sqrt(hs)
        out["dinp"] = start + delta
        return out
    return run


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
    x = args["logits"]
    if x.shape[-1] == int(args["V"]):
        return None
    e = np.exp(x - np.maximum(x.max(-1, keepdims=True), numpy_kernels.ATT_MAXVAL_INIT))
    return {"probs": e / e.sum(-1, keepdims=True)}


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
    Variant("gelu.cubic-constant", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's cubic coefficient is {value} instead of 0.044715", _gelu_coef, fit=Fit(0.02, 0.08)),
    # layernorm
    *(Variant(f"layernorm.eps={e:g}", "layernorm", ("layernorm_forward",),
              f"layernorm's eps is {e:g} instead of 1e-5", _ln_eps(e)) for e in (1e-6, 1e-12, 1e-4)),
    Variant("layernorm.unbiased-variance", "layernorm", ("layernorm_forward",),
            "layernorm divides the variance by C-1 (unbiased) instead of C", _ln_unbiased),
    # attention
    Variant("attention.scale=1/hs", "attention", ("attention_forward", "attention_backward"),
            "attention scores scaled by 1/hs instead of 1/sqrt(hs)", _att_scale(lambda hs: 1.0 / hs)),
    Variant("attention.no-scale", "attention", ("attention_forward", "attention_backward"),
            "attention scores not scaled (1/sqrt(hs) missing)", _att_scale(lambda hs: 1.0)),
    Variant("attention.no-diagonal", "attention", ("attention_forward",),
            "the causal mask leaves out the diagonal (t2 < t instead of t2 <= t)", _att_mask(False),
            defined=_att_no_diagonal_defined, unwritten=True),
    Variant("attention.no-causal-mask", "attention", ("attention_forward",),
            "no causal mask: every position attends to the future too", _att_mask(True)),
    # softmax, cross-entropy, labels
    Variant("softmax.padded-columns", "softmax", ("softmax_forward",),
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
)
VARIANT_BY_ID = {v.id: v for v in CATALOGUE}
assert len(VARIANT_BY_ID) == len(CATALOGUE), "duplicate variant ids"
assert all(k in SIGNATURES or k in MODEL_QUANTITIES for v in CATALOGUE for k in v.kernels)
