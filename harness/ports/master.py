"""Master weights: the float32 tensors an optimizer steps in place of a model's
low-precision parameters.

The common mixed-precision recipe holds the model's parameters in bf16 (or fp16), what its
forward computes with, and keeps a float32 copy of each, the *master weight*, that the
optimizer steps (with float32 moments); after each step the masters are cast back into the
model's parameters. A port says which tensor it steps for which parameter with an attribute
of its optimizer, ``master_weights``: a dict ``{model parameter: master tensor}`` (its step
copying each parameter's gradient to its master, stepping, and writing the masters back).

The harness then loads the C's float32 parameters into the masters bit for bit (and, rounded,
into the model's parameters), its m and v into the masters' optimizer state, and checks the
update on the masters -- a float32 AdamW, judged at float32 -- and that each model parameter
is its master cast to the parameter's dtype afterwards, bit for bit (:func:`not_written_back`):
a cast is one exact rounding, so any difference is a missing or wrong write-back, which no
tolerance at bf16 could see (an update moves most bf16 parameters by less than an ulp).
"""
from __future__ import annotations

from ..errors import ModelError
from .mapping import Entry


def stepped(optimizer) -> dict:
    """``id(tensor) -> tensor`` of every tensor ``optimizer``'s groups hold: what its step updates."""
    return {id(p): p for g in optimizer.param_groups for p in g["params"]}


def master_weights(optimizer, entries: list[Entry]) -> dict:
    """``id(parameter) -> master`` for a port whose optimizer steps masters (empty where it
    steps the model's parameters themselves); a clear error where it steps other tensors
    and does not say which is whose, or says so wrongly."""
    held = stepped(optimizer)
    params = {id(e.param) for e in entries}
    declared = getattr(optimizer, "master_weights", None)
    if declared is None:
        foreign = [p for k, p in held.items() if k not in params]
        if foreign:
            raise ModelError(f"{type(optimizer).__name__} steps {len(foreign)} tensors that are not the model's "
                             "parameters (master weights?): give it a master_weights dict {model parameter: the "
                             "tensor it steps for it}")
        return {}
    if not isinstance(declared, dict):
        raise ModelError(f"{type(optimizer).__name__}.master_weights is a {type(declared).__name__}: expected a dict "
                         "{model parameter: master tensor}")
    masters = {id(p): m for p, m in declared.items()}
    for e in entries:
        m = masters.get(id(e.param))
        if m is None:
            raise ModelError(f"{type(optimizer).__name__}.master_weights has no master for {e.names[0]}")
        if tuple(m.shape) != tuple(e.param.shape) or not m.dtype.is_floating_point:
            raise ModelError(f"the master of {e.names[0]} is {m.dtype} {tuple(m.shape)}; the parameter is "
                             f"{tuple(e.param.shape)}: a master holds the parameter's values at a finer precision")
        if id(m) not in held:
            raise ModelError(f"the master of {e.names[0]} is not among the tensors "
                             f"{type(optimizer).__name__} steps")
    return masters


def not_written_back(entries: list[Entry], masters: dict) -> str | None:
    """The first model parameter that is not its master cast to its dtype, bit for bit,
    with how many of its elements differ; None where every one is."""
    import torch
    for e in entries:
        m = masters.get(id(e.param))
        if m is None:
            continue
        want = m.detach().to(e.param.dtype)
        same = (want == e.param.detach()) | (torch.isnan(want) & torch.isnan(e.param.detach()))
        if not bool(same.all()):
            return (f"{e.names[0]} is not its master weight cast to {str(e.param.dtype).removeprefix('torch.')} "
                    f"after the step ({int((~same).sum())} of {same.numel()} elements differ): the optimizer's "
                    "master weights are not written back to the model")
    return None
