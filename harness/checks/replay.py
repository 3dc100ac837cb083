"""The replay: every op of a step's graph re-run in float64 on an implementation's own
inputs for it, its outputs judged as the per-op check judges one call
(:func:`.verdict.judge`). The inputs are exact by construction, so a failure is the op's
own error, at any depth; the first one is the step's *first divergence*."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from pyref.config import GPT2Config
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS, run_kernel
from pyref.spec import SPEC

from ..diagnosis import Call
from ..graph import Node, Ref, backward_nodes, forward_nodes, writers
from ..arbiter.oracle import ORACLE
from ..probe import marked, span
from ..arbiter.tolerances import term_magnitude
from ..ports.census import first_structure, named_there
from ..ports.pins import backward_pin, loss_pin, optimizer_pin, structure_pin
from ..ports.localise import pin_failure
from .modelstate import CheckedState, args64, replayable
from .results import Check, first_divergence_check
from .precision import precision_of
from .verdict import call_scale, judge


@marked("replay checks")
def replay_graph(cfg: GPT2Config, state: CheckedState, *, step: int, impl: str) -> list[Check]:
    """Every op of the graph re-run in float64 on ``state``'s own inputs for it, its
    outputs judged as the per-op check judges one call (:func:`.verdict.judge`).
    Backward buffers that several ops accumulate into are replayed as a chain from zero
    and judged once their last contributor ran, against the sum of the contributors' terms."""
    observes, has = state.observes, state.has
    checks = []
    nodes = forward_nodes(cfg)
    for i, node in enumerate(nodes):
        if not replayable(node, has):
            continue
        args = _inputs64(node, state)
        out = _oracle_run(node.kernel, args)
        for o in FORWARD_OUTPUTS[node.kernel]:
            ref = node.arg_dict[o]
            if observes(ref):
                p = precision_of(state, (node,), ref)
                c = judge(node.kernel, o, ref.get(state), out[o], args, name=str(ref),
                          elem_scale=call_scale(node.kernel, o, args, out),
                          calls=_with_streams(node, nodes, i, args, state, has) if node.kernel == "residual_forward"
                          else None, precision=p)
                checks.append(Check(step, impl, "replay", ref, c, (node,), state.module_of(ref), p))
    return checks + _replay_backward(cfg, state, observes, has, step=step, impl=impl)


def _with_streams(node: Node, nodes: list[Node], i: int, args: dict, state, has):
    """A residual's call for its diagnosis, with the other tensors of the stream's shape it
    could have been added to (``streams``: the block's input and what the graph computed
    before it in the block, as the implementation holds them), the names of its own
    inputs (``stream_names``) and, for the block's first residual, the second's output and
    branch (``next_residual``: a block whose MLP reads the block's input, in parallel)."""
    before = nodes[:i]

    def calls() -> Call:
        inp1, inp2 = node.arg_dict["inp1"], node.arg_dict["inp2"]
        shape = np.shape(args["inp1"])
        refs = [r for nd in before if nd.layer == node.layer for o in FORWARD_OUTPUTS[nd.kernel]
                if isinstance(r := nd.arg_dict.get(o), Ref)]
        block_input = next((nd.arg_dict["inp"] for nd in before if nd.layer == node.layer), None)
        streams = {}
        for r in ([block_input] if block_input is not None else []) + refs:
            if r in (inp1, inp2) or not has(r):
                continue
            value = r.get(state)
            if np.shape(value) == shape:
                with np.errstate(all="ignore"):
                    streams[_named(r, state)] = np.asarray(value, np.float64)
        extra = dict(streams=streams, stream_names=(_named(inp1, state), _named(inp2, state)))
        nxt = next((nd for nd in nodes[i + 1:] if nd.kernel == "residual_forward" and nd.layer == node.layer), None)
        if nxt is not None and nxt.arg_dict["inp1"] == node.arg_dict["out"]:
            out3, branch3 = nxt.arg_dict["out"], nxt.arg_dict["inp2"]
            if has(out3) and has(branch3):
                extra["next_residual"] = (np.asarray(out3.get(state), np.float64),
                                          np.asarray(branch3.get(state), np.float64))
        return Call(node.kernel, "out", dict(args, **extra))
    return calls


def _named(ref: Ref, state) -> str:
    """A tensor as a diagnosis names it: ``acts.ln1[layer 0]`` (and the module showing it)."""
    module = state.module_of(ref)
    return f"{ref}" + (f" ({module})" if module else "")


def _replay_backward(cfg: GPT2Config, state, observes, has, *, step: int, impl: str) -> list[Check]:
    bwd = backward_nodes(cfg)
    buffers = writers(bwd)
    last = {ref: contrib[-1][0] for ref, contrib in buffers.items()}
    acc: dict[Ref, np.ndarray] = {}    # each buffer's running value, from zero
    mags: dict[Ref, np.ndarray] = {}   # the sum of its contributors' term sizes
    nmax: dict[Ref, int] = {}
    skipped: set[Ref] = set()          # buffers a contributor of which could not be replayed
    checks = []
    for node in bwd:
        refs = {a: r for a in INPLACE_ARGS[node.kernel] if isinstance(r := node.arg_dict.get(a), Ref)}
        if not replayable(node, has):
            skipped |= set(refs.values())
            continue
        args = _inputs64(node, state)
        for a, ref in refs.items():
            args[a] = acc.get(ref, np.zeros(ref.get(state).shape))
        out = _oracle_run(node.kernel, args)
        for a, ref in refs.items():
            # the terms of the final sum: each contributor's own terms (or, where no finer
            # measure is known, its contribution)
            with span("term magnitudes"):
                mag = term_magnitude(node.kernel, a, args, out)
            mag = np.abs(out[a] - args[a]) if mag is None else mag
            mags[ref] = mags[ref] + mag if ref in mags else mag
            nmax[ref] = max(nmax.get(ref, 1), SPEC[node.kernel].n(a, args))
            acc[ref] = out[a]
            if last[ref] is not node or not observes(ref) or ref in skipped:
                continue
            nodes = [nd for nd, _ in buffers[ref]]
            p = precision_of(state, nodes, ref)
            c = judge(node.kernel, a, ref.get(state), acc.pop(ref), args, name=str(ref),
                      elem_scale=mags.pop(ref), n=nmax[ref],
                      calls=lambda: _buffer_calls(ref, nodes, state), precision=p)
            checks.append(Check(step, impl, "replay", ref, c, tuple(nodes), state.module_of(ref), p))
    return checks


def _buffer_calls(ref: Ref, nodes: list[Node], state) -> list[Call]:
    """The calls that accumulate into gradient buffer ``ref``, in order, each on the
    implementation's own inputs, every buffer starting at zero as in the replay (the
    chain passes ``ref``'s running value from one call to the next)."""
    calls = []
    for node in nodes:
        args = _inputs64(node, state)
        for a in INPLACE_ARGS[node.kernel]:
            r = node.arg_dict.get(a)
            if isinstance(r, Ref):
                args[a] = np.zeros(r.get(state).shape)
        arg = next(a for a in INPLACE_ARGS[node.kernel] if node.arg_dict.get(a) == ref)
        if node.kernel == "crossentropy_softmax_backward":
            # the logits the probabilities came from: a diagnosis of the loss's gradient
            # over all Vp columns needs them (the kernel itself reads only the probabilities)
            logits = Ref("acts", "logits")
            if state.has(logits):
                args["logits"] = np.asarray(logits.get(state), np.float64)
        calls.append(Call(node.kernel, arg, args, f"{node.where()} {node.kernel}"))
    return calls


def _inputs64(node: Node, state) -> dict:
    """The node's inputs read from ``state`` as float64 (:func:`.modelstate.args64`)."""
    with span("replay: float64 inputs"):
        return args64(node, state)


def _oracle_run(kernel: str, args: dict) -> dict:
    """The oracle's outputs of ``kernel`` on ``args``, in float64."""
    with span("replay: float64 ops"):
        return run_kernel(ORACLE, kernel, args, np.float64)


def pin_divergence(checks: list[Check], state, structure: list | None = None) -> None:
    """A torch model's first divergence pinned to the line of the port's source where it
    goes wrong: a structural finding's (``structure``: the census's findings of the step,
    the first replaced by a copy with its pin, :func:`harness.ports.pins.structure_pin`),
    else a failing replay check's: a forward op's (:func:`harness.ports.record.pin_failure`:
    the module recorded op by op on its own inputs), the loss's gradient
    (:func:`harness.ports.pins.loss_pin`), a parameter's or activation's gradient
    (:func:`harness.ports.pins.backward_pin`). Only a failure is recorded: on a passing
    step this looks at the checks and returns. The update's is :func:`pin_update`'s."""
    c = first_divergence_check(checks)
    if c is None:
        return
    f = first_structure(structure, c)
    if f is not None:
        pin = structure_pin(state, f)
        if pin is not None:
            structure[structure.index(f)] = replace(f, pin=pin)
        return
    if c.kind != "replay" or c.pin is not None:
        return
    if c.ref.group == "acts" and c.nodes:
        c.pin = pin_failure(state, c.nodes[-1], c.ref)
    elif "crossentropy_softmax_backward" in c.kernels:
        c.pin = loss_pin(state)
    elif c.ref.group in ("grads", "grads_acts"):
        c.pin = backward_pin(state, c.ref.name)
    if c.pin is None:
        # a parameter without gradient at this op, shown beside the cause the check names (a
        # bias left out): the line that leaves it out
        beside = next((f for f in structure or () if named_there(f, c)), None)
        c.pin = None if beside is None else structure_pin(state, beside)


def pin_update(checks: list[Check], state) -> None:
    """A torch model's first divergence, where it is not a replay check (the forward's and
    backward's are pinned before the update: :func:`pin_divergence`), pinned once the
    update is checked: a failing update to the optimizer's construction
    (:func:`harness.ports.pins.optimizer_pin`), a failing loss check to the loss's lines."""
    c = first_divergence_check(checks)
    if c is None or c.pin is not None or c.kind == "replay":
        return
    if c.kind == "update":
        c.pin = optimizer_pin(state)
    elif c.kind == "loss":
        c.pin = loss_pin(state)
