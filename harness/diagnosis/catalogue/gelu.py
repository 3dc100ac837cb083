"""GELU: its exact erf form, a sigmoid, ReLU or another activation in its place (ReLU squared,
GELU squared, leaky ReLU, ELU, softplus, Mish, tanh), its constants (the tanh scale, the cubic
coefficient and power) fitted, left out, applied twice or before c_fc."""
from __future__ import annotations

import math

import numpy as np

from pyref import numpy_kernels

from ..engine import Fit, Variant
from ._common import _oracle, _with_constants


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


def _tanh_arg(x, y):
    """GELU's tanh form read back from an output: where y = 0.5*x*(1 + tanh(a)), a =
    atanh(2y/x - 1), at the elements whose a is well conditioned (|x| in [0.25, 3], the
    tanh not saturated); (x, a) there, or None where too few are."""
    x, y = np.ravel(x), np.ravel(y)
    ok = (np.abs(x) > 0.25) & (np.abs(x) < 3.0)
    t = np.full(x.shape, np.nan)
    t[ok] = 2.0 * y[ok] / x[ok] - 1.0
    ok &= np.abs(t) < 0.999
    if ok.sum() < 8:
        return None
    return x[ok], np.arctanh(t[ok])


def _gelu_power(kernel, args, ctx, value):
    """GELU's tanh form with ``value``*x**p (p: the choice) in place of 0.044715*x**3."""
    x, p = args["inp"], int(ctx["choice"])
    s = math.sqrt(2 / math.pi)
    a = s * (x + value * x ** p)
    th = np.tanh(a)
    if kernel == "gelu_forward":
        return {"out": 0.5 * x * (1 + th)}
    g = 0.5 * (1 + th) + x * 0.5 * (1 - th * th) * s * (1 + p * value * x ** (p - 1))
    return {"dinp": args["dinp"] + g * args["dout"]}


def _gelu_power_estimate(kernel, args, actual, ctx):
    """The coefficient c of c*x**p in the forward, in closed form: a/s - x = c*x**p over
    the well-conditioned elements (least squares); the backward: None (searched)."""
    if kernel != "gelu_forward":
        return None
    p = int(ctx["choice"])
    return _least_squares(args, actual, lambda x, a: (x ** p, a / math.sqrt(2 / math.pi) - x))


def _gelu_scale_estimate(kernel, args, actual, ctx):
    """s of tanh(s*(x + 0.044715x^3)) from the forward's output, in closed form: a = s*u
    over the well-conditioned elements (least squares); the backward: None (searched)."""
    if kernel != "gelu_forward":
        return None
    return _least_squares(args, actual, lambda x, a: (x + numpy_kernels.GELU_COEF * x ** 3, a))


def _least_squares(args, actual, design):
    """c minimising |c*u - r| where (u, r) = design(x, a): x the input and a the tanh
    argument read back from the output, over the well-conditioned elements."""
    got = _tanh_arg(args["inp"], actual)
    if got is None:
        return None
    u, r = design(*got)
    den = float(u @ u)
    return float(u @ r) / den if den > 0 else None


def _gelu_scale_fit(kernel):
    if kernel == "gelu_forward":
        return Fit(0.1, 3.0, estimate=_gelu_scale_estimate)
    return Fit(0.1, 3.0, log=True)


def _gelu_coef_estimate(kernel, args, actual, ctx):
    return _gelu_power_estimate(kernel, args, actual, dict(ctx, choice=3))


def _gelu_coef_fit(kernel):
    # the forward's estimate is read in closed form: any coefficient from a decimal point
    # slipped one place down (0.0044715) to one up (0.44715); the backward's is searched
    if kernel == "gelu_forward":
        return Fit(1e-3, 1.0, estimate=_gelu_coef_estimate)
    return Fit(0.02, 0.08)


def _gelu_power_fit(kernel):
    if kernel == "gelu_forward":
        return Fit(-1.0, 1.0, estimate=_gelu_power_estimate)
    return Fit(1e-3, 0.5, log=True)


def _gelu_powers(kernel, args, **kw):
    # (c*x**1 is x*sigmoid(a*x) exactly: gelu.sigmoid's, with its fitted a)
    return [_Power(2), _Power(4)]


class _Power(int):
    def __str__(self):
        return f"x**{int(self)}"


def _gelu_power_name(kernel, args, value, ctx):
    p = int(ctx["choice"])
    if abs(value) < 1e-6:
        return None, value, ""        # no cubic term at all: not this mistake
    near = numpy_kernels.GELU_COEF
    value = near if abs(value / near - 1) < 2e-3 else value
    same = " (the coefficient right, the power wrong)" if value == near else ""
    return ("gelu.square" if p == 2 else "gelu.power"), value, same


def _gelu_identity(kernel, args, ctx, value):
    """No activation: the output is the input (the backward passes dout through)."""
    if kernel == "gelu_forward":
        return {"out": args["inp"].copy()}
    return {"dinp": args["dinp"] + args["dout"]}


def _gelu_twice(kernel, args, ctx, value):
    """GELU applied twice: gelu(gelu(x))."""
    if kernel != "gelu_forward":
        return None
    once = _oracle(kernel, args)["out"]
    return {"out": _oracle(kernel, dict(args, inp=once))["out"]}


def _gelu_before_matmul(kernel, args, ctx, value):
    """The matmul applied to GELU(inp): GELU moved before the MLP's first matmul (the one
    whose output is 4C wide, as c_fc's) instead of after it."""
    w = args["weight"]
    if w.shape[0] != 4 * w.shape[1]:
        return None
    g = _oracle("gelu_forward", {"inp": args["inp"]})["out"]
    return _oracle(kernel, args, inp=g)


def _gelu_sigmoid_scaled(kernel, args, ctx, value):
    """x*sigmoid(value*x): 1.702 the sigmoid approximation of GELU, 1 SiLU (swish)."""
    x = args["inp"]
    s = 1.0 / (1.0 + np.exp(-value * x))
    if kernel == "gelu_forward":
        return {"out": x * s}
    return {"dinp": args["dinp"] + (s + value * x * s * (1 - s)) * args["dout"]}


def _gelu_sigmoid_estimate(kernel, args, actual, ctx):
    """a of x*sigmoid(a*x) from the forward's output, in closed form: logit(y/x)/x, the
    median over the well-conditioned elements; the backward: None (searched)."""
    if kernel != "gelu_forward":
        return None
    x, y = np.ravel(args["inp"]), np.ravel(actual)
    ok = (np.abs(x) > 0.25) & (np.abs(x) < 3.0)
    r = np.full(x.shape, np.nan)
    r[ok] = y[ok] / x[ok]
    ok &= (r > 1e-3) & (r < 1 - 1e-3)
    if ok.sum() < 8:
        return None
    return float(np.median(np.log(r[ok] / (1 - r[ok])) / x[ok]))


def _gelu_sigmoid_fit(kernel):
    if kernel == "gelu_forward":
        return Fit(0.2, 5.0, estimate=_gelu_sigmoid_estimate)
    return Fit(0.2, 5.0, log=True)


def _gelu_sigmoid_name(kernel, args, value, ctx):
    for x, vid in ((1.702, "gelu.sigmoid"), (1.0, "gelu.silu")):
        if abs(value / x - 1) < 2e-3:
            return vid, x, (" = the sigmoid approximation of GELU" if vid == "gelu.sigmoid" else
                            " = SiLU (swish)")
    return "gelu.sigmoid-scale", value, ""


def _tanh_gelu(x):
    """GELU's tanh form and its derivative."""
    c, a = numpy_kernels.GELU_COEF, math.sqrt(2 / math.pi)
    th = np.tanh(a * (x + c * x ** 3))
    return 0.5 * x * (1 + th), 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * a * (1 + 3 * c * x * x)


def _softplus(x):
    return np.logaddexp(0.0, x)


def _sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))


def _mish(x):
    t = np.tanh(_softplus(x))
    return x * t, t + x * (1 - t * t) * _sigmoid(x)


# another activation where GPT-2 has GELU: (the form's id, its words, f(x) -> (f, f'))
_ACTIVATIONS = (
    ("relu-squared", "ReLU squared, relu(x)^2 (modded-nanogpt's, Primer's)",
     lambda x: (np.maximum(x, 0.0) ** 2, 2 * np.maximum(x, 0.0))),
    ("squared", "GELU squared, gelu(x)^2", lambda x: (lambda f, d: (f * f, 2 * f * d))(*_tanh_gelu(x))),
    ("leaky-relu", "leaky ReLU (slope 0.01, torch's default)",
     lambda x: (np.where(x > 0, x, 0.01 * x), np.where(x > 0, 1.0, 0.01))),
    ("elu", "ELU (alpha 1)", lambda x: (np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
                                        np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))))),
    ("softplus", "softplus, log(1 + e^x)", lambda x: (_softplus(x), _sigmoid(x))),
    ("mish", "Mish, x*tanh(softplus(x))", _mish),
    ("tanh", "tanh", lambda x: (np.tanh(x), 1 - np.tanh(x) ** 2)),
)


class _Activation(str):
    def __new__(cls, fid, text, f):
        obj = super().__new__(cls, text)
        obj.id, obj.f = fid, f
        return obj


def _activations(kernel, args, **kw):
    return [_Activation(*a) for a in _ACTIVATIONS]


def _activation(kernel, args, ctx, value):
    """Another activation (the choice) in GELU's place, forward or backward."""
    f, d = ctx["choice"].f(args["inp"])
    if kernel == "gelu_forward":
        return {"out": f}
    return {"dinp": args["dinp"] + d * args["dout"]}


def _activation_name(kernel, args, value, ctx):
    return f"gelu.{ctx['choice'].id}", value, ""


def _gelu_half(kernel, args, ctx, value):
    """GELU's tanh form with ``value`` in place of its leading 0.5."""
    x = args["inp"]
    c = numpy_kernels.GELU_COEF
    s = math.sqrt(2 / math.pi)
    th = np.tanh(s * (x + c * x ** 3))
    if kernel == "gelu_forward":
        return {"out": value * x * (1 + th)}
    g = value * ((1 + th) + x * (1 - th * th) * s * (1 + 3 * c * x * x))
    return {"dinp": args["dinp"] + g * args["dout"]}


def _gelu_half_name(kernel, args, value, ctx):
    """Named only where the factor is 1 (the 0.5 left out): any other factor on GELU's
    output is output.scale's (a constant factor on an op's output)."""
    if abs(value - 1.0) >= 1e-3:
        return None, value, ""
    return "gelu.half-factor", value, " (the 0.5 left out)"


VARIANTS: tuple[Variant, ...] = (
    Variant("gelu.erf", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU in its exact form x*Phi(x) (erf); train_gpt2.c uses the tanh approximation", _gelu_erf),
    Variant("gelu.sigmoid", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU as x*sigmoid({value}x){note}; train_gpt2.c uses the tanh approximation",
            _gelu_sigmoid_scaled, fit=_gelu_sigmoid_fit, name=_gelu_sigmoid_name),
    Variant("gelu.relu", "gelu", ("gelu_forward", "gelu_backward"),
            "ReLU where train_gpt2.c has GELU (tanh approximation)", _relu),
    Variant("gelu.activation", "gelu", ("gelu_forward", "gelu_backward"),
            "{choice} where train_gpt2.c has GELU (tanh approximation)", _activation, choices=_activations,
            name=_activation_name),
    Variant("gelu.tanh-scale", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's tanh argument scaled by {value}{note} instead of sqrt(2/pi)", _gelu_tanh_scale,
            fit=_gelu_scale_fit, name=_gelu_scale_name),
    Variant("gelu.half-factor", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's leading factor is {value}{note} instead of 0.5",
            _gelu_half, fit=Fit(-1e6, 1e6, linear=True), name=_gelu_half_name),
    Variant("gelu.cubic-constant", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's cubic coefficient is {value} instead of 0.044715", _gelu_coef, fit=_gelu_coef_fit),
    Variant("gelu.power", "gelu", ("gelu_forward", "gelu_backward"),
            "GELU's cubic term written {value}*{choice} instead of 0.044715*x**3{note}", _gelu_power,
            fit=_gelu_power_fit, choices=_gelu_powers, name=_gelu_power_name),
    Variant("gelu.missing", "gelu", ("gelu_forward", "gelu_backward"),
            "no GELU: its output is its input (the activation left out here)", _gelu_identity),
    Variant("gelu.twice", "gelu", ("gelu_forward",), "GELU applied twice: gelu(gelu(x))", _gelu_twice),
    Variant("gelu.order", "gelu", ("matmul_forward",),
            "GELU applied to c_fc's input (before c_fc) instead of to its output", _gelu_before_matmul,
            at="gelu gelu_forward"),
)
