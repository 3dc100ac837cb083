"""AdamW: bias correction, the step count, eps inside the square root, L2 instead of decoupled
decay, decay not scaled by the learning rate, torch's defaults, no decay on 1-D parameters."""
from __future__ import annotations

import math

import numpy as np

from pyref.constants import Held
from pyref.config import LAYER_PARAMS, AdamW

from ..engine import Variant


def _adamw(args, *, bias_correction=True, eps_in_sqrt=False, l2=False, decay=None, decay_lr=True, **changed):
    """AdamW in float64 with one of its conventions changed (``decay``: where weight decay
    applies; ``decay_lr``: False where the decay is not multiplied by the learning rate,
    param *= 1 - wd; ``changed``: hyperparameters replaced). Returns param, m, v."""
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
)
