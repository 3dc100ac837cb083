"""AdamW: bias correction (left out, or (1 - beta)^t), the step count, eps inside the square root
or before the bias correction, L2 instead of decoupled
decay, decay not scaled by the learning rate, torch's defaults, no decay on 1-D parameters, a
tensor not stepped, two settings exchanged, and any one setting (lr, a beta, eps, the decay) fitted from the output and
named by where its value comes from (another setting typed in its place, torch's default, a
usual value)."""
from __future__ import annotations

import math

import numpy as np

from pyref.constants import Held
from pyref.config import LAYER_PARAMS, AdamW

from ..engine import Fit, Variant, const_text


def _adamw(args, *, bias_correction=True, eps_in_sqrt=False, l2=False, decay=None, decay_lr=True,
           correction_power=False, eps_before_correction=False, **changed):
    """AdamW in float64 with one of its conventions changed (``decay``: where weight decay
    applies; ``decay_lr``: False where the decay is not multiplied by the learning rate,
    param *= 1 - wd; ``correction_power``: the bias corrections (1 - beta)^t, not
    1 - beta^t; ``eps_before_correction``: eps added to sqrt(v) before v's correction,
    (sqrt(v) + eps)/sqrt(1 - beta2^t); ``changed``: hyperparameters replaced). Returns
    param, m, v."""
    a = dict(args, **changed)
    p, g, m, v = (np.array(a[k], np.float64) for k in ("param", "grad", "m", "v"))
    lr, b1, b2, eps, wd = AdamW.from_kernel_args(a).as_float32().args()   # float arguments of the C
    t = int(a["t"])
    wd = np.where(decay, wd, 0.0) if decay is not None else wd
    if l2:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    c1, c2 = ((1 - b1) ** t, (1 - b2) ** t) if correction_power else (1 - b1 ** t, 1 - b2 ** t)
    m_hat = m / c1 if bias_correction else m
    v_hat = v / c2 if bias_correction else v
    denom = np.sqrt(v_hat + eps) if eps_in_sqrt else np.sqrt(v_hat) + eps
    if eps_before_correction:
        denom = (np.sqrt(v) + eps) / math.sqrt(c2)
    if not decay_lr:
        return {"param": p - lr * (m_hat / denom) - wd * p, "m": m, "v": v}
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
        if any(isinstance(args.get(k), Held) for k in hyper):
            # an optimizer that holds its settings as doubles holds the changed ones so too
            return _adamw(args, **{k: Held(v) for k, v in hyper.items()})
        return _adamw(args, **hyper)
    return run


def _adamw_no_decay_1d(kernel, args, ctx, value):
    one_d = ctx.get("one_d")
    if one_d is None:
        one_d = one_d_mask(np.size(args["param"]))
    if one_d is None or not np.any(one_d) or float(args["weight_decay"]) == 0.0:
        return None
    return _adamw(args, decay=~np.broadcast_to(one_d, np.shape(args["param"])))


def _moments_stepped(args, ctx) -> bool:
    """Whether the implementation's m and v after the update (``ctx["moments"]``: {"m": ...,
    "v": ...}, where the check gives them) moved from the pre-step ones: the optimizer
    stepped the tensor, if with a zero learning rate. False where they are not given."""
    moments = ctx.get("moments")
    if not moments:
        return False
    return any(k in moments and not np.array_equal(np.asarray(moments[k], np.float64), np.asarray(args[k], np.float64))
               for k in ("m", "v"))


def _adamw_not_stepped(kernel, args, ctx, value):
    """The tensor left as it was: not among the optimizer's parameters (or its gradient
    None), so neither it nor its moments step. Not where its moments are known to have
    stepped (a zero learning rate: adamw.lr's)."""
    if _moments_stepped(args, ctx):
        return None
    return {"param": args["param"].copy(), "m": args["m"].copy(), "v": args["v"].copy()}


# ----------------------------------------------------------------------------- two settings exchanged

class _Pair(str):
    """A choice of adamw.swapped: the two settings (kernel argument names) exchanged."""

    def __new__(cls, a: str, b: str):
        obj = super().__new__(cls, f"{SETTINGS[a]} and {SETTINGS[b]}")
        obj.names = (a, b)
        return obj


def _swap_pairs(kernel, args):
    """Every pair of the settings whose values differ (exchanging equal ones changes nothing)."""
    import itertools
    hp = dict(zip(SETTINGS, AdamW.from_kernel_args(args).as_float32().args()))
    return [_Pair(a, b) for a, b in itertools.combinations(SETTINGS, 2) if hp[a] != hp[b]]


def _adamw_swapped(kernel, args, ctx, value):
    """The two settings of ``ctx["choice"]`` exchanged, each as the port holds it (a setting
    given positionally in another order: torch's AdamW takes lr, betas, eps, weight_decay)."""
    if ctx["output"] != "param":
        return None     # m depends on beta1 alone, v on beta2 alone: one setting's cause, not two
    a, b = ctx["choice"].names
    return _adamw(args, **{a: args[b], b: args[a]})


# ----------------------------------------------------------------------------- one setting, fitted

# the settings by the names a port writes them with (the kernel's argument names)
SETTINGS = {"lr": "learning rate", "beta1": "beta1", "beta2": "beta2", "eps": "eps", "weight_decay": "weight decay"}
# the values a setting is often given instead of the run's: torch's defaults first
_USUAL = {"lr": (1e-3, 3e-4, 6e-4, 1e-4, 1e-2, 5e-4, 2e-4),
          "beta1": (0.9, 0.95, 0.8, 0.85, 0.99, 0.0),
          "beta2": (0.999, 0.95, 0.98, 0.99, 0.9, 0.9999),
          "eps": (1e-8, 1e-6, 1e-5, 1e-7, 1e-10, 1e-12, 1e-4, 1e-3),
          "weight_decay": (1e-2, 0.0, 0.1, 0.05, 1e-4, 1e-3)}
_TORCH_DEFAULT = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


def _adamw_setting(name: str):
    def run(kernel, args, ctx, value):
        return _adamw(args, **{name: Held(value)})      # the value as found, not rounded to the C's float
    return run


def _adamw_parts(args):
    """(p, g, m0, v0, the run's settings, m_hat, v_hat) of an adamw call, in float64."""
    p, g, m0, v0 = (np.asarray(args[k], np.float64) for k in ("param", "grad", "m", "v"))
    hp = AdamW.from_kernel_args(args).as_float32()
    t = int(args["t"])
    m = hp.beta1 * m0 + (1 - hp.beta1) * g
    v = hp.beta2 * v0 + (1 - hp.beta2) * g * g
    return p, g, m0, v0, hp, m / (1 - hp.beta1 ** t), v / (1 - hp.beta2 ** t)


def _ls(u, r):
    """c minimising |c*u - r| over the finite elements (None where u is zero there)."""
    u, r = np.ravel(u), np.ravel(r)
    ok = np.isfinite(u) & np.isfinite(r)
    den = float(u[ok] @ u[ok])
    return float(u[ok] @ r[ok]) / den if den > 0 else None


def _setting_estimate(name: str):
    """The setting ``name`` read from the output in closed form, where the output is affine
    in it (m in beta1, v in beta2, the parameter in lr and the decay), else searched (the
    parameter in eps and in the betas: :func:`_search`)."""
    def estimate(kernel, args, actual, ctx):
        out = ctx["output"]
        p, g, m0, v0, hp, m_hat, v_hat = _adamw_parts(args)
        a = np.asarray(actual, np.float64)
        if out == "m" and name == "beta1":
            return _ls(m0 - g, a - g)
        if out == "v" and name == "beta2":
            return _ls(v0 - g * g, a - g * g)
        if out == "param" and name.startswith("beta"):
            return _search(args, name, a, math.log(1e-5), math.log(0.9), lambda x: 1.0 - math.exp(x))
        if out != "param":
            return None
        r = m_hat / (np.sqrt(v_hat) + hp.eps)
        if name == "lr":
            lr = _ls(r + hp.weight_decay * p, p - a)
            # a zero learning rate (a schedule's warmup factor at step 0) found to its rounding
            return 0.0 if lr is not None and abs(lr) <= 1e-6 * hp.learning_rate else lr
        if name == "weight_decay":
            return _ls(hp.learning_rate * p, p - hp.learning_rate * r - a)
        # eps's effect on the step is small beside the parameter's rounding: searched (log scale)
        return _search(args, name, a, math.log(1e-12), math.log(1e-1), math.exp)
    return estimate


def _search(args, name: str, actual, lo: float, hi: float, value_of, n: int = 4096):
    """A setting read from the parameters where they are not affine in it (a beta, through
    the bias correction and the moment; eps): ``value_of(x)`` over x in [lo, hi] (a log
    scale of the setting), a grid then a golden-section search, on at most ``n`` elements
    (evenly strided; the whole tensor is judged after)."""
    idx = np.linspace(0, np.size(actual) - 1, min(n, np.size(actual))).astype(np.intp)
    sub = {k: (np.ravel(x)[idx] if isinstance(x, np.ndarray) else x) for k, x in args.items()}
    a = np.ravel(actual)[idx]

    def loss(x):
        d = _adamw(sub, **{name: Held(value_of(x))})["param"] - a
        d = d[np.isfinite(d)]
        return float(d @ d) if d.size else math.inf
    grid = np.linspace(lo, hi, 41)
    losses = [loss(x) for x in grid]
    k = int(np.argmin(losses))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    gr = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = hi - gr * (hi - lo), lo + gr * (hi - lo)
        if loss(c) <= loss(d):
            hi = d
        else:
            lo = c
    return value_of((lo + hi) / 2)


def _setting_name(name: str):
    """The setting's cause: where its value comes from (another of the run's settings typed
    in its place, torch's default, a usual value), or None where it is the run's own."""
    def named(kernel, args, value, ctx):
        hp = dict(zip(SETTINGS, AdamW.from_kernel_args(args).as_float32().args()))
        # how closely each is found: the betas from m and v to their rounding, the learning
        # rate and the decay through the parameter's rounding, eps (a small effect) to a few percent
        close = {"beta1": 1e-5, "beta2": 1e-5, "eps": 0.05}.get(name, 1e-3)

        def near(x):
            return abs(value - x) <= close * (abs(x) if x else abs(hp[name]))
        if near(hp[name]):
            return None, value, ""
        where = next((f" (the run's {SETTINGS[o]}, typed in {SETTINGS[name]}'s place)"
                      for o in SETTINGS if o != name and near(hp[o]) and hp[o]), None)
        if where is None and near(_TORCH_DEFAULT[name]):
            where = " (torch's default)"
        if where is None and name == "lr" and value == 0.0:
            where = (" (the parameters unchanged, their moments stepped: a schedule's factor 0, e.g. a linear "
                     "warmup step/N, which LambdaLR applies at its construction, before the first step)")
        if where is None and name == "lr" and hp["lr"]:
            where = "" if any(near(x) for x in _USUAL[name]) else \
                f" ({const_text(value / hp['lr'])} times the run's: a schedule's factor, warmup or decay, applied?)"
        if where is None:
            where = "" if any(near(x) for x in _USUAL[name]) else " (no usual value)"
        shown = next((x for x in (*hp.values(), *_USUAL[name]) if near(x)), value)
        if not name.startswith("beta"):
            value = shown        # judged at the round value it is near (a beta as found: its double)
        return f"adamw.{name.replace('_', '-')}", value, (
            f"AdamW's {SETTINGS[name]} is {const_text(shown)}{where} instead of {const_text(hp[name])}")
    return named


def _setting_fit(name: str):
    lo, hi = (-1.0, 1.0) if name.startswith("beta") else (0.0, 10.0) if name != "eps" else (0.0, 1.0)
    return Fit(lo, hi, estimate=_setting_estimate(name))


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


VARIANTS: tuple[Variant, ...] = (
    Variant("adamw.no-bias-correction", "adamw", ("adamw",),
            "AdamW without bias correction (m, v not divided by 1 - beta^t)",
            _adamw_variant(bias_correction=False)),
    Variant("adamw.step+1", "adamw", ("adamw",), "AdamW's step count off by one (t+1 in the bias correction)",
            _adamw_step(+1)),
    Variant("adamw.step-1", "adamw", ("adamw",), "AdamW's step count off by one (t-1 in the bias correction)",
            _adamw_step(-1)),
    Variant("adamw.eps-in-sqrt", "adamw", ("adamw",), "AdamW's eps inside the square root: sqrt(v_hat + eps)",
            _adamw_variant(eps_in_sqrt=True)),
    Variant("adamw.bias-correction-power", "adamw", ("adamw",),
            "AdamW's bias corrections written (1 - beta)**t instead of 1 - beta**t", _adamw_variant(correction_power=True)),
    Variant("adamw.eps-before-bias-correction", "adamw", ("adamw",),
            "AdamW's eps added to sqrt(v) before v's bias correction: (sqrt(v) + eps)/sqrt(1 - beta2**t) "
            "(Adam's paper's efficient form) instead of sqrt(v_hat) + eps", _adamw_variant(eps_before_correction=True)),
    Variant("adamw.l2", "adamw", ("adamw",),
            "weight decay added to the gradient (L2, Adam) instead of decoupled (AdamW)",
            _adamw_variant(l2=True), terms=_adamw_l2_terms),
    Variant("adamw.weight-decay-without-lr", "adamw", ("adamw",),
            "weight decay not scaled by the learning rate (param *= 1 - weight_decay, not 1 - lr*weight_decay)",
            _adamw_variant(decay_lr=False)),
    Variant("adamw.weight-decay=0.01", "adamw", ("adamw",), "weight decay 0.01 (torch's default) instead of "
            "the one given", _adamw_changed(weight_decay=0.01)),
    Variant("adamw.no-decay-1d", "adamw", ("adamw",),
            "no weight decay on 1-D parameters (biases, layernorm gains); train_gpt2.c decays all",
            _adamw_no_decay_1d),
    Variant("adamw.betas=(0.9,0.95)", "adamw", ("adamw",), "AdamW betas (0.9, 0.95) instead of the ones given",
            _adamw_changed(beta1=0.9, beta2=0.95)),
    Variant("adamw.not-stepped", "adamw", ("adamw",),
            "the tensor not stepped (left out of the optimizer's parameters, or its gradient None): it and its "
            "moments keep their values", _adamw_not_stepped),
    Variant("adamw.swapped", "adamw", ("adamw",),
            "AdamW's {choice} exchanged (each given the other's value: the settings passed positionally in "
            "another order than the optimizer's, torch's AdamW(params, lr, betas, eps, weight_decay))",
            _adamw_swapped, choices=_swap_pairs, fallback=1),
    # one setting other than the run's, fitted: tried where no specific change explains the output
    *(Variant(f"adamw.{name.replace('_', '-')}", "adamw", ("adamw",), "{note}", _adamw_setting(name),
              fit=_setting_fit(name), name=_setting_name(name), fallback=1) for name in SETTINGS),
)
