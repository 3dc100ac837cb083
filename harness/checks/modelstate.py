"""A model state as the checks read it: what every implementation's state offers
(:class:`CheckedState`, and :class:`Reference`: what :func:`~.run.run_parity` drives of a
reference), written down once; and how the graph's checks read it: a node's arguments,
the labels of a tensor's axes, whether a node can be replayed.

The implementations: the C's (:class:`~harness.clib.cmodel.CModel`, a CheckedState), a
reference on protocol kernels (:class:`pyref.model.GPT2`, the oracle's and a kernel port's:
:class:`KernelPort`) and a torch model's (:class:`~harness.ports.torchstate.ModelState`).
The protocols are structural: an implementation has the attributes (with the honest value
where it has nothing to say: a state that produced every tensor observes every one), it
does not import them (pyref imports nothing from harness).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from pyref.config import GPT2Config
from pyref.model import GPT2
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS, SIGNATURES, KernelSet, as64

from ..graph import Node, Ref, backward_nodes, forward_nodes, unobserved, writers


@runtime_checkable
class CheckedState(Protocol):
    """What the checks read of an implementation's state after its forward, backward and
    update: named views in the C's names and shapes (:mod:`harness.graph`'s ``Ref.get``),
    the flat buffers, and what the implementation says it produced itself."""

    config: GPT2Config
    params: dict            # name -> array: the C's parameter tensors
    grads: dict             # ... their gradients (after a backward)
    acts: dict              # name -> array: the C's activations (after a forward)
    grads_acts: dict        # ... their gradients (after a backward)
    params_memory: np.ndarray
    grads_memory: np.ndarray
    m_memory: np.ndarray | None   # AdamW's moments (after an update; None before)
    v_memory: np.ndarray | None
    inputs: np.ndarray      # the batch (B, T) of the last forward
    targets: np.ndarray

    def observes(self, ref: Ref) -> bool:
        """Whether the implementation produced ``ref`` itself (else it is not compared)."""

    def has(self, ref: Ref) -> bool:
        """Whether it holds a value of ``ref`` usable as a replay's input (observed, or
        derived from what was)."""

    def module_of(self, ref: Ref) -> str | None:
        """The module of a torch model that showed ``ref`` (``mlp.c_fc``), else None."""

    def not_observed(self) -> list[str]:
        """The graph's tensors it did not produce itself (:func:`harness.graph.unobserved`)."""

    def precision_of(self, nodes, ref=None) -> object | None:
        """The precision it ran ``nodes`` at (the calls that wrote one tensor, ``ref`` where
        given: a kernel may accumulate one output more coarsely than another), where below
        float32 (:class:`harness.arbiter.precision.Precision`; None: float32, whose bounds
        apply unchanged)."""

    def update_precision(self, label: str) -> object | None:
        """The precision its AdamW's ``params``, ``m`` or ``v`` is held at, where below
        float32 (None: float32)."""

    def held_settings(self) -> dict:
        """The AdamW settings its optimizer holds itself (``adamw`` argument name -> the
        value, a double where torch's AdamW keeps one), for the update check; empty: the
        C's floats."""

    def witness_precisions(self) -> dict:
        """Kernel -> the precision the witness must noise it at, where below float32 (empty:
        the float32 witness serves)."""

    def precision_lines(self) -> list[str]:
        """What its run was seen to compute below float32, one line each (empty: float32)."""


@runtime_checkable
class Reference(CheckedState, Protocol):
    """A reference as :func:`~.run.run_parity` drives it, one at a time: loaded from the C's
    state, run, checked, updated, update-checked and released."""

    structure: list   # the last step's structural findings (a torch model's census)
    findings: list    # what silently differs from the C (a torch model's hygiene)

    def load_state(self, params, m=None, v=None) -> None:
        """The C's parameters (and AdamW's m, v; None: zeros, as at step 1) into the model."""

    def forward(self, inputs, targets): ...

    def zero_grad(self) -> None: ...

    def backward(self) -> None: ...

    def update(self, lr, beta1, beta2, eps, weight_decay, t) -> None: ...

    def drop_activations(self) -> None:
        """Drop the activations and their gradients once checked (the update needs none)."""

    def release(self) -> None:
        """Drop what a step left until the next ``load_state``."""

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


def replayable(node: Node, has) -> bool:
    """Whether every input of ``node`` is one the state holds (``has``)."""
    wanted = SIGNATURES[node.kernel]
    return all(has(v) for k, v in node.args if isinstance(v, Ref) and k in wanted
               and k not in INPLACE_ARGS.get(node.kernel, ()) and k not in FORWARD_OUTPUTS.get(node.kernel, ()))


def graph_outputs(cfg: GPT2Config) -> dict[Ref, set[tuple[str, str]]]:
    """Every tensor the graph writes -> the (kernel, output argument) pairs that write it."""
    return {ref: {(n.kernel, a) for n, a in ws}
            for ref, ws in writers(forward_nodes(cfg) + backward_nodes(cfg)).items()}


class KernelPort(GPT2):
    """A kernel port's model: :class:`pyref.model.GPT2` on the port's kernels (``port``: a
    :class:`~pyref.protocol.KernelSet`), which observes every tensor but those its kernels
    did not return (``port.not_returned``, known once they ran: derived, never compared)."""

    def __init__(self, config: GPT2Config, params, port: KernelSet, dtype=np.float32):
        super().__init__(config, params, kernels=port, dtype=dtype)
        self.port = port
        self._writers = graph_outputs(config)

    def observes(self, ref: Ref) -> bool:
        return not (self._writers.get(ref, set()) & self.port.not_returned)

    def not_observed(self) -> list[str]:
        return unobserved(self.config, self.observes)
