"""layernorm: its eps (fixed values and fitted, inside or outside the square root), the axis,
the variance's divisor, the affine parameters swapped or the gain as 1 + weight, other
normalisations, the bias or the gain left out.""" 
from __future__ import annotations

import math

import numpy as np

from pyref import numpy_kernels

from ..engine import Fit, Variant
from ._common import _forward, _oracle, _with_constants


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
    return "layernorm.eps", _snapped(value), ""


def _snapped(value: float) -> float:
    """A fitted eps as the round value (1, 2 or 5 times a power of ten) within 5% of it."""
    exp = math.floor(math.log10(value))
    for x in (10.0 ** exp, 10.0 ** (exp + 1), 5 * 10.0 ** exp, 2 * 10.0 ** exp):
        if abs(value / x - 1) < 0.05:
            return x
    return value


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
    return "layernorm.eps-outside-sqrt", _snapped(value), ""


def _ln_over_positions(kernel, args, ctx, value):
    """The statistics taken over the positions (axis T), or over the positions and the
    channels together (the choice's key), instead of the channels."""
    x, w, b = args["inp"], args["weight"], args["bias"]
    if x.ndim != 3 or x.shape[1] < 2 or ctx["output"] != "out":
        return None     # (such a port has no per-position mean and rstd to compare)
    axes = (1, 2) if ctx["choice"].key == "TC" else (1,)
    mean = x.mean(axes, keepdims=True)
    xs = x - mean
    var = (xs * xs).mean(axes, keepdims=True)
    return {"out": xs / np.sqrt(var + numpy_kernels.LN_EPS) * w + b}


def _ln_axes(kernel, args, **kw):
    return [_LnForm("T", "the positions (T)"), _LnForm("TC", "the positions and the channels together (T, C)")]


def _ln_affine_swapped(kernel, args, ctx, value):
    """The affine parameters swapped: norm*bias + weight."""
    out = _oracle(kernel, args, weight=args["bias"], bias=args["weight"])
    return out if ctx["output"] == "out" else None


def _ln_weight_plus_one(kernel, args, ctx, value):
    """The gain applied as 1 + weight (a port storing it as an offset from 1)."""
    out = _oracle(kernel, args, weight=1.0 + args["weight"])
    return out if ctx["output"] == "out" else None


def _ln_without(param: str):
    """layernorm without its bias (F.layer_norm(x, shape, weight, None), nn.LayerNorm(bias=False))
    or its gain (elementwise_affine=False; the bias alone): forward as with a zero bias or a
    unit gain; backward, that parameter's gradient untouched, the input's as with a unit gain."""
    def run(kernel, args, ctx, value):
        if kernel == "layernorm_forward":
            neutral = np.zeros_like(args["bias"]) if param == "bias" else np.ones_like(args["weight"])
            return _oracle(kernel, args, **{param: neutral})
        before = np.array(args[f"d{param}"], np.float64)
        changed = {"weight": np.ones_like(args["weight"])} if param == "weight" else {}
        out = _oracle(kernel, args, **changed)
        out[f"d{param}"] = before
        return out
    return run


def _ln_forms(kernel, args, **kw):
    return [_LnForm("rms", "no mean subtracted: x/sqrt(mean(x^2) + eps) (an RMS norm)"),
            _LnForm("uncentred-variance", "the variance taken about zero: (x-mean)/sqrt(mean(x^2) + eps)"),
            _LnForm("no-sqrt", "no square root: (x-mean)/(var + eps)"),
            _LnForm("multiplied", "multiplied by the standard deviation: (x-mean)*sqrt(var + eps)")]


class _LnForm(str):
    def __new__(cls, key, text):
        obj = super().__new__(cls, text)
        obj.key = key
        return obj


def _ln_form(kernel, args, ctx, value):
    """layernorm's statistics in another form (the choice); its output only (a port in
    another form has no C-like mean and rstd to compare)."""
    if ctx["output"] != "out":
        return None
    x, w, b = args["inp"], args["weight"], args["bias"]
    eps, key = numpy_kernels.LN_EPS, ctx["choice"].key
    mean = x.mean(-1, keepdims=True)
    xs = x if key == "rms" else x - mean
    var = (x * x).mean(-1, keepdims=True) if key in ("rms", "uncentred-variance") else (xs * xs).mean(-1, keepdims=True)
    if key == "no-sqrt":
        n = xs / (var + eps)
    elif key == "multiplied":
        n = xs * np.sqrt(var + eps)
    else:
        n = xs / np.sqrt(var + eps)
    return {"out": n * w + b}


def _ln_form_name(kernel, args, value, ctx):
    return f"layernorm.{ctx['choice'].key}", value, ""


def _ln_unbiased(kernel, args, ctx, value):
    x, w, b = args["inp"], args["weight"], args["bias"]
    C = x.shape[-1]
    mean = x.mean(-1)
    xs = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xs * xs).sum(-1) / (C - 1) + numpy_kernels.LN_EPS)
    return _forward(kernel, ((rstd[..., None] * xs) * w + b, mean, rstd))


VARIANTS: tuple[Variant, ...] = (
    *(Variant(f"layernorm.eps={e:g}", "layernorm", ("layernorm_forward",),
              f"layernorm's eps is {e:g} instead of 1e-5", _ln_eps(e)) for e in (1e-6, 1e-12, 1e-4)),
    Variant("layernorm.eps", "layernorm", ("layernorm_forward",),
            "layernorm's eps is {value} instead of 1e-5", _ln_eps_fitted, fit=Fit(1e-10, 1.0, log=True),
            name=_ln_eps_name),
    Variant("layernorm.eps-outside-sqrt", "layernorm", ("layernorm_forward",),
            "layernorm's eps ({value}) added outside the square root: (x-mean)/(sqrt(var)+eps)", _ln_eps_outside,
            fit=Fit(1e-10, 1.0, log=True), name=_ln_outside_name, fallback=1),
    Variant("layernorm.axis", "layernorm", ("layernorm_forward",),
            "layernorm's mean and variance taken over {choice} instead of the channels (C)",
            _ln_over_positions, choices=_ln_axes),
    Variant("layernorm.unbiased-variance", "layernorm", ("layernorm_forward",),
            "layernorm divides the variance by C-1 (unbiased) instead of C", _ln_unbiased),
    Variant("layernorm.affine-swapped", "layernorm", ("layernorm_forward",),
            "layernorm's weight and bias swapped: norm*bias + weight instead of norm*weight + bias",
            _ln_affine_swapped),
    Variant("layernorm.weight-plus-one", "layernorm", ("layernorm_forward",),
            "layernorm's gain applied as 1 + weight: norm*(1 + weight) + bias instead of norm*weight + bias",
            _ln_weight_plus_one),
    Variant("layernorm.no-bias", "layernorm", ("layernorm_forward", "layernorm_backward"),
            "layernorm without its bias (F.layer_norm(x, shape, weight, None), or bias=False): norm*weight",
            _ln_without("bias")),
    Variant("layernorm.no-weight", "layernorm", ("layernorm_forward", "layernorm_backward"),
            "layernorm without its gain (elementwise_affine=False, or weight None): norm + bias",
            _ln_without("weight")),
    Variant("layernorm.form", "layernorm", ("layernorm_forward",),
            "layernorm's normalisation in another form: {choice}", _ln_form, choices=_ln_forms,
            name=_ln_form_name),
)
