"""Hygiene: what silently makes a torch port differ from the C, said before the numbers
(dropout in training mode, non-float32 parameters, TF32, layer-norm eps, attention scale
flags, the GELU form, the optimizer's betas, eps and weight decay)."""
from __future__ import annotations

from math import sqrt

import numpy as np

from pyref.config import GPT2Config
from pyref.constants import LN_EPS

from .mapping import Entry


def hygiene(model, optimizer, hyper, cfg: GPT2Config, entries: list[Entry]) -> list[tuple[str, str]]:
    """(kind, line) each: what differs (its finding's id is ``hygiene.<kind>``) and the
    line that says it, with the reason it matters."""
    import torch
    out = []
    if model.training:
        drops = [f"{n or type(model).__name__} (p={m.p:g})" for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Dropout) and m.p > 0]
        conf = getattr(model, "config", None)
        drops += [f"config.{k}={getattr(conf, k):g}" for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout")
                  if isinstance(getattr(conf, k, None), float) and getattr(conf, k) > 0]
        drops += [f"{n}.dropout={m.dropout:g}" for n, m in model.named_modules()
                  if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0]
        if drops:
            listed = f"{', '.join(drops[:4])}{' ...' if len(drops) > 4 else ''}"
            out.append(("dropout", f"dropout in training mode: {listed} (the C has no dropout: set p=0 or call "
                                   "model.eval())"))
    frozen = [e.names[0] for e in entries if not e.param.requires_grad]
    if frozen:
        out.append(("frozen", f"{', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''} requires_grad=False: "
                              "no gradient, no update (the C trains every parameter)"))
    odd = sorted({str(e.param.dtype) for e in entries if e.param.dtype != torch.float32})
    if odd and set(odd) <= {"torch.bfloat16", "torch.float16"}:
        # a mixed-precision port: a fact of the run, not an error (harness.ports.precision)
        out.append(("dtype", f"parameters in {', '.join(odd)} (the C's are float32): each op is judged at the "
                             "precision it ran in, and what that precision cannot reveal is said "
                             "(precision.* findings; docs/precision.md)"))
    elif odd:
        out.append(("dtype", f"parameters in {', '.join(odd)}, not float32 (the C computes in float32)"))
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        out.append(("tf32", "TF32 / reduced-precision float32 matmul enabled (torch.backends.*.allow_tf32 or "
                            f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}): the C's matmuls are "
                            "full float32"))
    eps = sorted({(n, m.eps) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) and m.eps != LN_EPS}, key=lambda x: x[0])
    conf = getattr(model, "config", None)
    if isinstance(getattr(conf, "layer_norm_epsilon", None), float) and conf.layer_norm_epsilon != LN_EPS:
        eps.append(("config.layer_norm_epsilon", conf.layer_norm_epsilon))
    if eps:
        where = f"{eps[0][0]}{' and others' if len(eps) > 1 else ''}"
        out.append(("layernorm-eps", f"layer norm eps {eps[0][1]:g} ({where}), the C uses 1e-5"))
    if conf is not None:
        if getattr(conf, "scale_attn_weights", True) is False:
            out.append(("attention-scale", "attention scores not scaled (config.scale_attn_weights=False); the C "
                                           "scales by 1/sqrt(hs)"))
        if getattr(conf, "scale_attn_by_inverse_layer_idx", False):
            out.append(("attention-scale", "attention scaled by 1/(layer+1) too "
                                           "(config.scale_attn_by_inverse_layer_idx); the C does not"))
        act = getattr(conf, "activation_function", None)
        if isinstance(act, str) and act not in ("gelu_new", "gelu_pytorch_tanh"):
            out.append(("gelu", f"activation {act!r}: the C's GELU is the tanh approximation (gelu_new)"))
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.GELU) and m.approximate != "tanh":
            out.append(("gelu", f"{n}: nn.GELU(approximate={m.approximate!r}); the C uses the tanh approximation"))
            break
    hs = cfg.channels // cfg.num_heads
    for n, m in model.named_modules():
        scale = getattr(m, "scale", None)
        if isinstance(scale, float) and abs(scale - 1 / sqrt(hs)) > 1e-7 * (1 / sqrt(hs)) and "attn" in n:
            out.append(("attention-scale", f"{n}.scale={scale:g}: the C scales attention scores by "
                                           f"1/sqrt(hs)={1 / sqrt(hs):g}"))
            break
    out += _optimizer_hygiene(optimizer, hyper, entries)
    return out


def _optimizer_hygiene(opt, hyper, entries: list[Entry]) -> list[tuple[str, str]]:
    import torch
    out = []
    if not isinstance(opt, torch.optim.AdamW):
        out.append(("optimizer", f"optimizer {type(opt).__name__}, not torch.optim.AdamW"
                    + (" (Adam's weight_decay is an L2 term in the gradient, not AdamW's decoupled decay)"
                       if isinstance(opt, torch.optim.Adam) else "")))
    slot_of = {id(e.param): e.slot for e in entries}
    want = dict(lr=hyper.learning_rate, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                weight_decay=hyper.weight_decay)
    decays: dict[float, list[str]] = {}
    for g in opt.param_groups:
        betas = g.get("betas", (None, None))
        got = dict(lr=g.get("lr"), beta1=betas[0], beta2=betas[1], eps=g.get("eps"),
                   weight_decay=g.get("weight_decay"))
        for k, v in want.items():
            x = got[k]
            if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if float(x) == float(np.float32(v)):
                continue
            if np.float32(x) == np.float32(v) and not k.startswith("beta"):
                continue   # lr, eps, decay in double: a relative change of ~1e-8, below rounding
            if np.float32(x) == np.float32(v):
                line = (f"optimizer {k}={float(x)!r} in double; the C's is the float {float(np.float32(v))!r}"
                        + (f" (so 1 - {k} differs by {abs((1 - float(x)) / (1 - float(np.float32(v))) - 1):.2g} relative)"
                           if k.startswith("beta") else ""))
            else:
                line = f"optimizer {k}={float(x):g} where the run uses {v:g}"
            if ("optimizer", line) not in out:
                out.append(("optimizer", line))
        for flag in ("amsgrad", "maximize"):
            if g.get(flag):
                out.append(("optimizer", f"optimizer {flag}=True; the C's AdamW has no such option"))
        decays.setdefault(float(g.get("weight_decay", 0.0)), []).extend(
            str(slot_of.get(id(p), "?")) for p in g["params"])
    if len(decays) > 1:
        parts = [f"{wd:g} on {', '.join(sorted(set(names))[:6])}{' ...' if len(set(names)) > 6 else ''}"
                 for wd, names in sorted(decays.items())]
        out.append(("decay-some", "weight decay on only some parameters: " + "; ".join(parts)
                    + " (the C decays every parameter alike)"))
    return out
