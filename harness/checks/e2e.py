"""The end-to-end check: every tensor a step's graph writes (the 23 activations, their
gradients and the parameter gradients, per layer) against a float64 model run from the
same state, under a tolerance scaled by how far float32-sized noise carries to each tensor
(the witness's spread, :func:`harness.arbiter.oracle.witness_spread`)."""
from __future__ import annotations

import numpy as np

from pyref.config import GPT2Config
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS
from pyref.spec import SPEC

from ..diagnosis import Call
from ..graph import Ref, backward_nodes, forward_nodes, writers
from ..probe import marked
from ..arbiter.tolerances import e2e_tolerance
from .results import Check
from .modelstate import CheckedState, axes, named_args
from .precision import precision_of
from .verdict import checked


def sequence_unit(ref: Ref, shape: tuple[int, ...]) -> int:
    """The bias test's correlated run of an end-to-end tensor: a whole sequence. Upstream
    errors reach every later position of a sequence (attention) and every row through a
    layernorm's statistics, so only the B sequences of a batch round independently (their
    forward and backward share nothing but the exact parameters): an activation or its
    gradient (first axis b) falls into at most B groups. A parameter's gradient sums over
    every sequence: one group, its bias reported and not judged."""
    if ref.group in ("acts", "grads_acts") and len(shape) >= 2:
        return int(np.prod(shape[1:], dtype=np.int64))
    return max(1, int(np.prod(shape, dtype=np.int64)))


@marked("e2e checks")
def e2e_graph(cfg: GPT2Config, positions: int, state: CheckedState, oracle_state: CheckedState, *, step: int, impl: str,
              spread: dict, shared: dict | None = None) -> list[Check]:
    """Every tensor the graph writes against the float64 model ``oracle_state``, under a
    tolerance widened by how far float32-sized noise carried to it (``spread``: witness
    vs oracle per tensor, :func:`harness.arbiter.oracle.witness_spread`, the same for every
    implementation of a step). Gradient buffers are compared once complete; a
    failing one is diagnosed against a changed loss scale (all gradients scale with
    dlosses, averaged over ``positions``). ``shared``: kept by the caller for the step's
    implementations, what their comparisons with one float64 tensor compute alike (its RMS
    scale: :func:`harness.arbiter.compare.compare`'s ``shared``), by tensor."""
    observes = state.observes
    checks = []
    # a call's reduction length and mask read its arguments' shapes alone, the same in
    # every state: read from the float64 model's (a port's derived activations, computed
    # when first read, stay uncomputed where nothing else needs them)
    shapes = oracle_state

    def one(ref, kernel, output, n, nodes, diagnose_it):
        actual, expected = ref.get(state), ref.get(oracle_state)
        p = precision_of(state, nodes, ref)
        how = dict(name=str(ref), tol=e2e_tolerance(kernel, output, n, actual.size, spread[ref], p),
                   axes=axes(ref, actual.shape), mask=SPEC[kernel].mask(output, named_args(nodes[-1], shapes)))
        calls = (lambda: Call("loss_mean", output, {"value": expected, "n": positions})) if diagnose_it else None
        c = checked(actual, expected, calls, unit=sequence_unit(ref, actual.shape),
                    shared=None if shared is None else shared.setdefault(ref, {}), **how)
        checks.append(Check(step, impl, "e2e", ref, c, tuple(nodes), state.module_of(ref), p))

    for node in forward_nodes(cfg):
        for o in FORWARD_OUTPUTS[node.kernel]:
            ref = node.arg_dict[o]
            if observes(ref):
                one(ref, node.kernel, o, SPEC[node.kernel].n(o, named_args(node, shapes)), [node], False)
    bwd = backward_nodes(cfg)
    buffers = writers(bwd)
    for node in bwd:   # each buffer once complete: where its last contributor ran
        for a in INPLACE_ARGS[node.kernel]:
            ref = node.arg_dict.get(a)
            if isinstance(ref, Ref) and buffers[ref][-1][0] is node and observes(ref):
                n = max(SPEC[nd.kernel].n(arg, named_args(nd, shapes)) for nd, arg in buffers[ref])
                one(ref, node.kernel, a, n, [nd for nd, _ in buffers[ref]], True)
    return checks
