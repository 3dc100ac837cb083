"""Reading a model state as the graph's checks read it: a node's arguments, which tensors
the state produced itself, the module of a torch model that showed one, the labels of a
tensor's axes.

A model state is the C's (:class:`~harness.clib.cmodel.CModel`), a kernel port's
(:class:`pyref.model.GPT2`) or a torch model's (:class:`~harness.ports.torchstate.ModelState`):
anything with ``params``, ``grads``, ``acts`` and ``grads_acts`` in the C's names and shapes
(:mod:`harness.graph`). A state that does not say otherwise produced every tensor.
"""
from __future__ import annotations

import numpy as np

from pyref.config import GPT2Config
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS, SIGNATURES, KernelSet, as64

from ..graph import Node, Ref, backward_nodes, forward_nodes, writers

# the labels of a tensor's axes by its number of axes: activations (per layer) ...
LAYER_AXES = {
    3: ("b", "t", "c"), 2: ("b", "t"), 4: ("b", "h", "t", "t2"), 1: ("c",),
}
# ... and parameters and their gradients (a stacked one's layer first)
PARAM_AXES = {3: ("layer", "row", "c"), 2: ("row", "c"), 1: ("c",)}


def axes(ref: Ref, shape) -> tuple[str, ...] | None:
    """The labels of the axes of ``ref``'s tensor, of shape ``shape``."""
    if ref.group in ("params", "grads", "m", "v"):
        return PARAM_AXES.get(len(shape))
    return LAYER_AXES.get(len(shape))


def named_args(node: Node, state) -> dict:
    """The node's input arguments read from ``state`` (views, as they are)."""
    wanted = SIGNATURES[node.kernel]
    return {k: (v.get(state) if isinstance(v, Ref) else v) for k, v in node.args if k in wanted}


def args64(node: Node, state) -> dict:
    """The node's input arguments read from ``state``, float arrays as float64 copies."""
    return as64(named_args(node, state))


def observation(state):
    """``(observes, has)`` of a state: whether it produced a tensor itself (else it is not
    compared), and whether it holds a value usable as a replay's input. Everything, for
    the C and the kernel-protocol models; a torch model (:mod:`harness.ports`) says."""
    everything = lambda ref: True   # noqa: E731
    return getattr(state, "observes", everything), getattr(state, "has", everything)


def replayable(node: Node, has) -> bool:
    """Whether every input of ``node`` is one the state holds (``has``)."""
    wanted = SIGNATURES[node.kernel]
    return all(has(v) for k, v in node.args if isinstance(v, Ref) and k in wanted
               and k not in INPLACE_ARGS.get(node.kernel, ()) and k not in FORWARD_OUTPUTS.get(node.kernel, ()))


def module_of(state, ref: Ref) -> str | None:
    """The module of a torch model that showed ``ref`` (``mlp.c_fc``), else None."""
    return getattr(state, "module_of", lambda r: None)(ref)


def graph_outputs(cfg: GPT2Config) -> dict[Ref, set[tuple[str, str]]]:
    """Every tensor the graph writes -> the (kernel, output argument) pairs that write it."""
    return {ref: {(n.kernel, a) for n, a in ws}
            for ref, ws in writers(forward_nodes(cfg) + backward_nodes(cfg)).items()}


def returned_by(ks: KernelSet, cfg: GPT2Config):
    """``observes`` of a kernel port's model: false for what its kernels did not return
    (``ks.not_returned``, known once they ran)."""
    outputs = graph_outputs(cfg)
    return lambda ref: not (outputs.get(ref, set()) & ks.not_returned)


def unobserved(state, cfg: GPT2Config) -> list[str]:
    """The tensors (group.name) of the graph ``state`` did not produce itself."""
    return list(dict.fromkeys(f"{r.group}.{r.name}" for r in graph_outputs(cfg) if not state.observes(r)))
