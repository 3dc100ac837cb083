"""Model-level parity: N training steps of the C and of Python implementations, side by side.

Each step starts every implementation from the C's own state (parameters, AdamW m and v),
so a step's check is never blurred by drift from earlier steps, and then checks, for the C
and for each Python implementation:

* ``replay``: every op of the graph (:mod:`harness.graph`) re-run in float64 on that
  implementation's own inputs for the op, under the per-op tolerance. The first op that
  fails is the *first divergence*: its inputs are exact by construction, so the error is
  the op's own, not carried in from upstream.
* ``e2e``: all 23 activations and the activation and parameter gradients (per layer)
  against a float64 model run from the same state, under a tolerance scaled by how far
  float32-sized noise carries to each tensor (the :class:`Witness`).
* ``update``: parameters, m and v after AdamW, against AdamW in float64 from the common
  pre-step state and the implementation's own gradients.
* the mean loss against the float64 model's.

A failed check is also diagnosed (:mod:`harness.diagnose`): the failing op re-run under
catalogued changes of semantics on the same inputs, to name the change that explains it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import prod
from typing import Callable, Iterator

import numpy as np

from pyref.config import AdamW, GPT2Config, param_shapes
from pyref.model import GPT2 as PyGPT2
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS, KERNEL_OP, SIGNATURES, KernelSet, run_kernel
from pyref.spec import SPEC
from pyref.terms import adamw_magnitudes

from ..compare import Comparison, Tolerance, compare
from ..diagnose import Call, Diagnosis, attach, diagnose, is_one_d
from ..cores import shared, workers
from ..graph import Node, Ref, backward_nodes, forward_nodes, writers
from ..oracle import ORACLE, Witness, witness_spread
from ..tolerances import e2e_tolerance, op_tolerance, term_magnitude
from .perop import call_scale, judge

LAYER_AXES = {
    3: ("b", "t", "c"), 2: ("b", "t"), 4: ("b", "h", "t", "t2"), 1: ("c",),
}
PARAM_AXES = {2: ("row", "c"), 1: ("c",)}


@dataclass
class Check:
    """One comparison inside a step, with its identity as data: who (``impl``), when
    (``step``), which kind of check, which tensor (``ref``: group, name, layer) and the
    calls of the graph that wrote it (``nodes``). Text (``tensor``, ``where``) is
    rendered from these fields, never parsed back."""

    step: int
    impl: str                 # "C", "numpy", "torch", a user's label
    kind: str                 # "replay", "e2e", "update", "loss"
    ref: Ref                  # acts/grads_acts/grads.<name>[layer]; params/m/v.<name>; loss.mean_loss
    comparison: Comparison
    nodes: tuple[Node, ...] = ()   # the graph's calls that write ``ref``, in order
    module: str | None = None      # the torch model's module that showed it

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    @property
    def layer(self) -> int | None:
        return self.ref.layer

    @property
    def phase(self) -> str:
        """``forward``, ``backward``, ``update`` or ``loss``."""
        if self.kind in ("update", "loss"):
            return self.kind
        return "forward" if self.ref.group == "acts" else "backward"

    @property
    def call_layer(self) -> int | None:
        """The layer of the call that completed the tensor (for a gradient buffer, its last
        contributor's: the lm head's ``lnf`` backward writes layer L-1's residual)."""
        return self.nodes[-1].layer if self.nodes else self.layer

    @property
    def kernels(self) -> tuple[str, ...]:
        """The protocol kernels behind the tensor, in graph order."""
        if self.kind == "update":
            return ("adamw",)
        if self.kind == "loss":
            return ("crossentropy_forward",)
        return tuple(dict.fromkeys(n.kernel for n in self.nodes))

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops (``pytest -k`` names) of those kernels."""
        return tuple(dict.fromkeys(KERNEL_OP[k] for k in self.kernels))

    @property
    def base(self) -> str:
        """The tensor without its layer: ``acts.ln1``."""
        return self.ref.name if self.kind == "loss" else f"{self.ref.group}.{self.ref.name}"

    @property
    def tensor(self) -> str:
        """``acts.ln1[layer 3]``, ``params.wte (after update)``, ``mean_loss``."""
        if self.kind == "loss":
            return self.ref.name
        return f"{self.ref} (after update)" if self.kind == "update" else str(self.ref)

    @property
    def where(self) -> str:
        """The call that wrote the tensor: ``layer 3 ln1 layernorm_forward``, or the sum
        of the calls that accumulate into a gradient buffer."""
        module = f" [{self.module}]" if self.module else ""
        if self.kind == "update":
            return f"gpt2_update {self.ref.name}"
        if self.kind == "loss":
            return "mean loss"
        last = self.nodes[-1]
        if len(self.nodes) == 1:
            return f"{last.where()} {last.kernel}{module}"
        by = ", ".join(f"{n.label} {n.kernel}" for n in self.nodes)
        layer = f"layer {last.layer} " if last.layer is not None else ""
        return f"{layer}{self.ref.name} gradient (sum of {by}){module}"

    @property
    def diagnosis(self) -> Diagnosis | None:
        """Why it failed (:mod:`harness.diagnose`): set on failed replay, update and
        loss checks and failed end-to-end checks of gradients; None otherwise."""
        return getattr(self.comparison, "diagnosis", None)


@dataclass
class StepReport:
    step: int
    losses: dict[str, float]
    checks: list[Check]
    first_divergence: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)   # impl -> exception text
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.errors and all(c.passed for c in self.checks)


@dataclass
class RunReport:
    config: GPT2Config
    B: int
    T: int
    hyper: AdamW
    impls: list[str]
    steps: list[StepReport]
    library: str
    build: dict | None
    not_checked: dict[str, list[str]] = field(default_factory=dict)
    floating_point: dict | None = None   # the C's mode (Library.floating_point)
    # torch models (harness.models): hygiene findings and the C tensors they do not show
    findings: dict[str, list[str]] = field(default_factory=dict)
    not_observed: dict[str, list[str]] = field(default_factory=dict)
    # kernel ports: backward kernels derived by autograd through their forward kernels
    derived: dict[str, list[str]] = field(default_factory=dict)
    # --free-run: each implementation on its own state (harness.freerun.FreeRunRow)
    free_run: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.passed for s in self.steps) and all(r.passed for r in self.free_run)

    def first_divergence(self, heading: bool = True) -> str | None:
        """``step N [impl] first divergence: ...`` of the first step that diverged (or
        raised); ``heading=False`` leaves out the words "first divergence"."""
        for s in self.steps:
            for impl, text in s.first_divergence.items():
                # rendered again from the check (a report put together by hand may lack it)
                return f"step {s.step} [{impl}] " + (first_divergence(
                    [c for c in s.checks if c.impl == impl], heading) or text)
            for impl, text in s.errors.items():
                return f"step {s.step} [{impl}] error: {text}"
        return None


def model_notes(report: RunReport) -> list[str]:
    """What a report says of torch models before the numbers: hygiene findings (one line
    and a reason each) and the C tensors a model does not show (not checked for it)."""
    lines = []
    for name, found in report.findings.items():
        lines += [f"finding [{name}]: {f}" for f in found]
    for name, kernels in report.derived.items():
        if kernels:
            lines.append(f"derived by autograd [{name}]: {', '.join(kernels)} (through its own forward kernels)")
    for name, unseen in report.not_observed.items():
        if unseen:
            lines.append(f"not observed [{name}]: {', '.join(unseen)}")
    return lines


# ----------------------------------------------------------------------------
# walking the graph

def _named(node: Node, state) -> dict:
    """The node's input arguments read from ``state`` (views, as they are)."""
    wanted = SIGNATURES[node.kernel]
    return {k: (v.get(state) if isinstance(v, Ref) else v) for k, v in node.args if k in wanted}


def _args64(node: Node, state) -> dict:
    """The node's input arguments read from ``state``, float arrays as float64 copies."""
    return {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in _named(node, state).items()}


def _axes(ref: Ref, shape) -> tuple[str, ...] | None:
    if ref.group in ("params", "grads"):
        return PARAM_AXES.get(len(shape))
    return LAYER_AXES.get(len(shape))


def e2e_graph(cfg: GPT2Config, positions: int, state, oracle_state, *, step: int, impl: str,
              spread: dict) -> list[Check]:
    """Every tensor the graph writes against the float64 model ``oracle_state``, under a
    tolerance widened by how far float32-sized noise carried to it (``spread``: witness
    vs oracle per tensor, :func:`harness.oracle.witness_spread`, the same for every
    implementation of a step). Gradient buffers are compared once complete; a
    failing one is diagnosed against a changed loss scale (all gradients scale with
    dlosses, averaged over ``positions``)."""
    observes, _ = _observation(state)
    checks = []

    def one(ref, kernel, output, n, nodes, diagnose_it):
        actual, expected = ref.get(state), ref.get(oracle_state)
        how = dict(name=str(ref), tol=e2e_tolerance(kernel, output, n, actual.size, spread[ref]),
                   axes=_axes(ref, actual.shape), mask=SPEC[kernel].mask(output, _named(nodes[-1], state)))
        c = compare(actual, expected, **how)
        if diagnose_it and not c.passed:
            c = attach(c, diagnose(Call("loss_mean", output, {"value": expected, "n": positions}),
                                   actual, expected, **how))
        checks.append(Check(step, impl, "e2e", ref, c, tuple(nodes), _module(state, ref)))

    for node in forward_nodes(cfg):
        for o in FORWARD_OUTPUTS[node.kernel]:
            ref = node.arg_dict[o]
            if observes(ref):
                one(ref, node.kernel, o, SPEC[node.kernel].n(o, _named(node, state)), [node], False)
    bwd = backward_nodes(cfg)
    buffers = writers(bwd)
    for node in bwd:   # each buffer once complete: where its last contributor ran
        for a in INPLACE_ARGS[node.kernel]:
            ref = node.arg_dict.get(a)
            if isinstance(ref, Ref) and buffers[ref][-1][0] is node and observes(ref):
                n = max(SPEC[nd.kernel].n(arg, _named(nd, state)) for nd, arg in buffers[ref])
                one(ref, node.kernel, a, n, [nd for nd, _ in buffers[ref]], True)
    return checks


def replay_graph(cfg: GPT2Config, state, *, step: int, impl: str) -> list[Check]:
    """Every op of the graph re-run in float64 on ``state``'s own inputs for it, its
    outputs judged as the per-op check judges one call (:func:`harness.opcheck.judge`).
    Backward buffers that several ops accumulate into are replayed as a chain from zero
    and judged once their last contributor ran, against the sum of the contributors' terms."""
    observes, has = _observation(state)
    checks = []
    for node in forward_nodes(cfg):
        if not _replayable(node, has):
            continue
        args = _args64(node, state)
        out = run_kernel(ORACLE, node.kernel, args, np.float64)
        for o in FORWARD_OUTPUTS[node.kernel]:
            ref = node.arg_dict[o]
            if observes(ref):
                c = judge(node.kernel, o, ref.get(state), out[o], args, name=str(ref),
                          elem_scale=call_scale(node.kernel, o, args, out))
                checks.append(Check(step, impl, "replay", ref, c, (node,), _module(state, ref)))
    return checks + _replay_backward(cfg, state, observes, has, step=step, impl=impl)


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
        if not _replayable(node, has):
            skipped |= set(refs.values())
            continue
        args = _args64(node, state)
        for a, ref in refs.items():
            args[a] = acc.get(ref, np.zeros(ref.get(state).shape))
        out = run_kernel(ORACLE, node.kernel, args, np.float64)
        for a, ref in refs.items():
            # the terms of the final sum: each contributor's own terms (or, where no finer
            # measure is known, its contribution)
            mag = term_magnitude(node.kernel, a, args, out)
            mag = np.abs(out[a] - args[a]) if mag is None else mag
            mags[ref] = mags[ref] + mag if ref in mags else mag
            nmax[ref] = max(nmax.get(ref, 1), SPEC[node.kernel].n(a, args))
            acc[ref] = out[a]
            if last[ref] is not node or not observes(ref) or ref in skipped:
                continue
            nodes = [nd for nd, _ in buffers[ref]]
            c = judge(node.kernel, a, ref.get(state), acc.pop(ref), args, name=str(ref),
                      elem_scale=mags.pop(ref), n=nmax[ref],
                      calls=lambda: _buffer_calls(ref, nodes, state))
            checks.append(Check(step, impl, "replay", ref, c, tuple(nodes), _module(state, ref)))
    return checks


def _observation(state):
    """``(observes, has)`` of a state: whether it produced a tensor itself (else it is not
    compared), and whether it holds a value usable as a replay's input. Everything, for
    the C and the kernel-protocol models; a torch model (:mod:`harness.models`) says."""
    everything = lambda ref: True
    return getattr(state, "observes", everything), getattr(state, "has", everything)


def _replayable(node: Node, has) -> bool:
    wanted = SIGNATURES[node.kernel]
    return all(has(v) for k, v in node.args if isinstance(v, Ref) and k in wanted
               and k not in INPLACE_ARGS.get(node.kernel, ()) and k not in FORWARD_OUTPUTS.get(node.kernel, ()))


def _module(state, ref: Ref) -> str | None:
    """The module of a torch model that showed ``ref`` (``mlp.c_fc``), else None."""
    return getattr(state, "module_of", lambda r: None)(ref)


def _buffer_calls(ref: Ref, nodes: list[Node], state) -> list[Call]:
    """The calls that accumulate into gradient buffer ``ref``, in order, each on the
    implementation's own inputs, every buffer starting at zero as in the replay (the
    chain passes ``ref``'s running value from one call to the next)."""
    calls = []
    for node in nodes:
        args = _args64(node, state)
        for a in INPLACE_ARGS[node.kernel]:
            r = node.arg_dict.get(a)
            if isinstance(r, Ref):
                args[a] = np.zeros(r.get(state).shape)
        arg = next(a for a in INPLACE_ARGS[node.kernel] if node.arg_dict.get(a) == ref)
        calls.append(Call(node.kernel, arg, args, f"{node.where()} {node.kernel}"))
    return calls


UPDATE_BLOCK = 1 << 16   # elements per block of the float64 AdamW: its temporaries stay in cache


def check_update(cfg: GPT2Config, pre: tuple, grads: np.ndarray,
                 post: tuple[np.ndarray, np.ndarray, np.ndarray], hyper: AdamW, t: int, *,
                 step: int, impl: str) -> list[Check]:
    """AdamW in float64 from the common pre-step state ``pre`` = (params, m, v; m and v
    None at the first step: zeros) with ``grads``, against ``post`` (params, m, v after the
    implementation's update), tensor by tensor. Worked in cache-sized blocks into buffers
    made once for the largest tensor: at 124M scale only the expected values of one tensor
    are held in float64, and no tensor-sized temporary is made and dropped."""
    hp = hyper.kernel_args(t)
    shapes = param_shapes(cfg)
    largest = max(prod(s) for s in shapes.values())
    buf = {k: np.empty(largest, np.float64) for k in ("params", "m", "v")}
    buf_scale = {k: np.empty(largest, np.float32) for k in ("params", "m")}
    checks = []
    offset = 0
    labels = ("params", "m", "v")
    for name, shape in shapes.items():
        n = prod(shape)
        expected = {k: b[:n] for k, b in buf.items()}
        scales = {"params": buf_scale["params"][:n], "m": buf_scale["m"][:n], "v": None}
        shared(lambda r: _expected_update(pre, grads, offset, expected, scales, hp, r), _runs(n))
        hows = {label: dict(name=f"{label}.{name} (after update)",
                            tol=op_tolerance("adamw", "param" if label == "params" else label, 1, n),
                            elem_scale=None if scales[label] is None else scales[label].reshape(shape),
                            axes=PARAM_AXES.get(len(shape)) if len(shape) < 3 else ("layer", "row", "c"))
                for label in labels}
        actuals = {label: np.asarray(post[i][offset:offset + n]).reshape(shape) for i, label in enumerate(labels)}
        compared = shared(lambda k: compare(actuals[k], expected[k].reshape(shape), **hows[k]), labels)
        for label, c in zip(labels, compared):
            output, actual, how = "param" if label == "params" else label, actuals[label], hows[label]
            if not c.passed:
                call = Call("adamw", output, _update_args(pre, grads, slice(offset, offset + n), shape, hp))
                c = attach(c, diagnose(call, actual, expected[label].reshape(shape),
                                       ctx={"one_d": is_one_d(name, shape)}, **how))
            checks.append(Check(step, impl, "update", Ref(label, name), c))
        offset += n
    return checks


def _runs(n: int) -> list[tuple[int, int]]:
    """``[0, n)`` in one run of whole blocks per worker."""
    blocks = -(-n // UPDATE_BLOCK)
    per = -(-blocks // workers())
    return [(lo * UPDATE_BLOCK, min(n, (lo + per) * UPDATE_BLOCK)) for lo in range(0, blocks, per)]


def _expected_update(pre: tuple, grads, offset: int, expected: dict, scales: dict, hp: dict,
                     run: tuple[int, int]) -> None:
    """One tensor's float64 AdamW (params, m, v into ``expected``) and its term sizes (into
    ``scales``), block by block over ``run`` from ``pre`` and ``grads`` at ``offset``.
    Element by element the same arithmetic as on whole tensors: the results do not depend
    on the blocks."""
    zeros = np.zeros(UPDATE_BLOCK, np.float32)
    for lo in range(run[0], run[1], UPDATE_BLOCK):
        hi = min(run[1], lo + UPDATE_BLOCK)
        sl = slice(offset + lo, offset + hi)
        p, m, v = (expected[k][lo:hi] for k in ("params", "m", "v"))
        p0 = pre[0][sl]                # float32 (every float32 is a float64: exact in p)
        m0 = zeros[:hi - lo] if pre[1] is None else pre[1][sl]
        np.copyto(p, p0)
        np.copyto(m, m0)
        np.copyto(v, zeros[:hi - lo] if pre[2] is None else pre[2][sl])
        ORACLE.adamw(p, grads[sl], m, v, *hp.values())
        scales["m"][lo:hi], scales["params"][lo:hi] = adamw_magnitudes(p0, m0, grads[sl], v, hp)


def check_loss(step: int, impl: str, loss: float, oracle_loss: float, tol: Tolerance, n: int) -> Check:
    """The mean loss against the float64 model's (``n`` = B*T positions averaged)."""
    actual, expected = np.array([loss]), np.array([oracle_loss])
    c = compare(actual, expected, name="mean_loss", tol=tol)
    if not c.passed:
        c = attach(c, diagnose(Call("loss_mean", "mean_loss", {"value": expected, "n": n}),
                               actual, expected, tol=tol, name="mean_loss"))
    return Check(step, impl, "loss", Ref("loss", "mean_loss"), c)


def _update_args(pre: tuple, grads, sl: slice, shape, hp: dict) -> dict:
    """AdamW's arguments for one parameter tensor (m, v zero at the first step)."""
    p0 = np.array(pre[0][sl], np.float64).reshape(shape)
    m0 = np.zeros(shape) if pre[1] is None else np.array(pre[1][sl], np.float64).reshape(shape)
    v0 = np.zeros(shape) if pre[2] is None else np.array(pre[2][sl], np.float64).reshape(shape)
    return dict(param=p0, grad=np.asarray(grads[sl]).reshape(shape), m=m0, v=v0, **hp)


def first_divergence_check(checks: list[Check]) -> Check | None:
    """The first failing replay check in graph order (else the first failing update, else
    e2e or loss check): the check the first divergence names."""
    for kinds in (("replay",), ("update",), ("e2e", "loss")):
        for c in checks:
            if c.kind in kinds and not c.passed:
                return c
    return None


def first_divergence(checks: list[Check], heading: bool = True) -> str | None:
    """The first failing replay check in graph order (else the first failing check), as
    text (``first divergence: <where>...``; without that word under a heading of its own)."""
    c = first_divergence_check(checks)
    if c is None:
        return None
    cmp = c.comparison
    head = ("first divergence: " if heading else "") + c.where
    if c.kind == "replay":
        # replay feeds each implementation's op its own inputs for that op
        whose = "the C's own" if c.impl == "C" else "its own"
        head += f", inputs exact ({whose}), output off"
    return (f"{head}: {c.tensor} max rel {cmp.max_rel:.3g} (tol {cmp.tol.rel:.3g}), "
            f"norm rel {cmp.norm_rel:.3g} (tol {cmp.tol.norm:.3g}), worst at {cmp.worst_label}: "
            f"{cmp.worst_actual!r} vs {cmp.worst_expected!r}")


# ----------------------------------------------------------------------------

def run_parity(config: GPT2Config, params: np.ndarray, batches: Iterator[tuple[np.ndarray, np.ndarray]], *,
               lib=None, impls: dict[str, KernelSet] | None = None, models: dict | None = None,
               steps: int = 10,
               hyper: AdamW = AdamW(), threads: int | None = None, replay: bool | str = True,
               progress: Callable[[int, int, str], None] | None = None,
               on_step: Callable[[int, object], None] | None = None) -> RunReport:
    """Run ``steps`` training steps of the C (the library ``lib``) and of each Python
    implementation in ``impls`` (name -> KernelSet; default: none, the C alone against the
    oracle), checking everything after every step. ``models`` (name ->
    :class:`harness.models.TorchModel`): PyTorch models run as their ports run them
    (autograd, their optimizer), checked the same way; their parameters are mapped (or
    refused, with the reason) before anything runs. ``batches`` yields (inputs, targets).
    ``replay``: True (every step), ``"on-failure"`` (only for an implementation whose
    end-to-end checks failed, to localise; cheaper at 124M scale) or False.
    ``on_step(t, cmodel)`` is called after each step's update (the gate fingerprints the
    C's buffers there)."""
    from ..clib.library import as_library
    from ..clib.cmodel import CModel

    lib = as_library(lib)
    impls = dict(impls or {})
    cmodel = CModel.from_params(config, np.asarray(params, np.float32), lib=lib)
    try:
        oracle, pymodels = _references(config, cmodel, impls, models, hyper)
    except Exception:
        cmodel.close()
        raise
    reports: list[StepReport] = []
    B = T = 0
    try:
        for t in range(1, steps + 1):
            t0 = time.perf_counter()
            inputs, targets = next(batches)
            B, T = inputs.shape
            say = (lambda what: progress(t, steps, what)) if progress else (lambda what: None)
            step = _Step(config, t, inputs, targets, hyper, replay, say)
            losses, checks = _run_step(step, cmodel, oracle, pymodels, threads)
            divergence = {}
            for name in ["C", *pymodels]:
                d = first_divergence([c for c in checks if c.impl == name])
                if d:
                    divergence[name] = d
            errors = {**step.errors, **step.update_errors}
            reports.append(StepReport(t, losses, checks, divergence, errors, time.perf_counter() - t0))
            if on_step is not None:
                on_step(t, cmodel)
    finally:
        cmodel.close()
    not_checked = {name: list(k.missing) for name, k in impls.items() if getattr(k, "missing", None)}
    torch_models = {n: pm for n, pm in pymodels.items() if n not in impls}
    not_observed = {n: pm.not_observed() for n, pm in torch_models.items()}
    not_observed.update({n: _unobserved(pymodels[n], config) for n, k in impls.items()
                         if getattr(k, "not_returned", None)})
    return RunReport(config, B, T, hyper, ["C", *pymodels], reports, lib.path,
                     None if lib.build_info is None else vars(lib.build_info), not_checked,
                     lib.floating_point(),
                     findings={n: list(pm.findings) for n, pm in torch_models.items()},
                     not_observed=not_observed,
                     derived={n: list(k.derived) for n, k in impls.items() if getattr(k, "derived", None)})



# ----------------------------------------------------------------------------
# run_parity's parts: each reference is loaded from the C's state, run, checked, updated,
# update-checked and released in turn, so that only one of them holds memory at a time

def _references(config: GPT2Config, cmodel, impls: dict, models: dict | None, hyper: AdamW):
    """The float64 oracle (reading the C's parameters where they are: no copy) and the
    references by name: kernel ports on pyref.model.GPT2, torch models (ModelState)."""
    oracle = PyGPT2(config, cmodel.params_memory, kernels=ORACLE, dtype=np.float64, share_params=True)
    pymodels = {name: PyGPT2(config, cmodel.params_memory, kernels=k, dtype=np.float32)
                for name, k in impls.items()}
    for name, k in impls.items():
        _release(pymodels[name])    # loaded again at its turn in each step
        if getattr(k, "not_returned", None) is not None:
            pymodels[name].observes = _returned_by(k, config)
    if models:
        from ..models import ModelState
        for name, spec in models.items():
            pymodels[name] = ModelState(config, cmodel.params_memory, spec, hyper)
            _release(pymodels[name])
    return oracle, pymodels


@dataclass
class _Step:
    """One step of run_parity: its inputs and what its parts found, by implementation."""

    config: GPT2Config
    t: int
    inputs: np.ndarray
    targets: np.ndarray
    hyper: AdamW
    replay: bool | str
    say: Callable[[str], None]
    loss_tol: Tolerance | None = None
    graph: dict = field(default_factory=dict)          # impl -> loss, e2e and replay checks
    update: dict = field(default_factory=dict)         # impl -> update checks
    errors: dict = field(default_factory=dict)         # impl -> forward/backward exception
    update_errors: dict = field(default_factory=dict)  # impl -> update exception


def _run_step(step: _Step, cmodel, oracle, pymodels: dict, threads) -> tuple[dict, list[Check]]:
    """One step: the C, the oracle and the witness; the C's checks; each reference in turn;
    the C's update last (so its params, m, v are every reference's pre-step state). Returns
    the losses and the checks: loss, e2e and replay checks by implementation, then the
    update checks."""
    B, T = step.inputs.shape
    losses, spread = _run_c_and_oracle(step, cmodel, oracle, threads)
    step.loss_tol = e2e_tolerance("crossentropy_forward", "losses", B * T, 1, spread["mean_loss"])
    step.graph["C"] = _check_state(step, "C", cmodel, losses, oracle, spread)
    t = step.t
    pre = (cmodel.params_memory, cmodel.m_memory if t > 1 else None,
           cmodel.v_memory if t > 1 else None)   # None: zeros, as the C starts them
    for name, pm in pymodels.items():
        _run_reference(step, name, pm, pre, losses, oracle, spread)
    step.update["C"] = _update_c(step, cmodel, threads)
    names = ["C", *pymodels]
    return losses, [c for n in names for c in step.graph.get(n, [])] + \
        [c for n in names for c in step.update.get(n, [])]


def _run_c_and_oracle(step: _Step, cmodel, oracle, threads) -> tuple[dict, dict]:
    """The C's and the oracle's forward and backward, and the witness's spread (made,
    measured and dropped here: at 124M scale its buffers are as large as the oracle's, and
    only its distances are kept). Returns the losses and the spread."""
    say, config = step.say, step.config
    oracle.load_state(cmodel.params_memory)  # it never updates: no m, v
    say("C forward/backward")
    cmodel.poison_activations()  # from step 2 on: unwritten slots show up as NaN
    losses = {"C": cmodel.forward(step.inputs, step.targets, threads=threads)}
    cmodel.zero_grad()
    cmodel.backward(threads=threads)
    say("oracle and witness forward/backward")
    witness = PyGPT2(config, cmodel.params_memory, dtype=np.float64, share_params=True,
                     kernels=KernelSet.from_module(Witness(seed=step.t), name="witness"))

    def run(model):
        loss = float(model.forward(step.inputs, step.targets))
        model.zero_grad()
        model.backward()
        return loss
    # independent float64 models on the same read-only parameters: one per core
    losses["oracle"], _ = shared(run, (oracle, witness))
    spread = witness_spread(config, witness, oracle)
    return losses, spread


def _check_state(step: _Step, name: str, state, losses: dict, oracle, spread: dict) -> list[Check]:
    """The loss and end-to-end checks of one implementation's forward/backward, and its
    replay (always, or on a failed end-to-end check)."""
    B, T = step.inputs.shape
    step.say(f"checking {name}")
    checks = [check_loss(step.t, name, losses[name], losses["oracle"], step.loss_tol, B * T)]
    e2e = e2e_graph(step.config, B * T, state, oracle, step=step.t, impl=name, spread=spread)
    checks += e2e
    if step.replay is True or (step.replay == "on-failure" and not all(c.passed for c in e2e)):
        step.say(f"replaying {name}'s ops")
        checks += replay_graph(step.config, state, step=step.t, impl=name)
    return checks


def _run_reference(step: _Step, name: str, pm, pre: tuple, losses: dict, oracle, spread: dict) -> None:
    """One reference's turn: loaded from the C's pre-step state, forward/backward,
    checked, updated, update-checked, released. A user's kernel may raise: reported in
    ``step.errors`` / ``step.update_errors``, and the run carries on."""
    h = step.hyper
    pm.load_state(pre[0], pre[1], pre[2])
    try:
        step.say(f"{name} forward/backward")
        try:
            losses[name] = float(pm.forward(step.inputs, step.targets))
            pm.zero_grad()
            pm.backward()
        except Exception as e:
            step.errors[name] = _error_text(e)
            return
        step.graph[name] = _check_state(step, name, pm, losses, oracle, spread)
        _release(pm, "drop_activations")   # checked: the update needs none of them
        step.say(f"{name}'s AdamW update")
        try:
            pm.update(*h.args(), step.t)
        except Exception as e:
            step.update_errors[name] = _error_text(e)
            return
        step.update[name] = check_update(step.config, pre, pm.grads_memory,
                                         (pm.params_memory, pm.m_memory, pm.v_memory), h, step.t,
                                         step=step.t, impl=name)
    finally:
        _release(pm)


def _update_c(step: _Step, cmodel, threads) -> list[Check]:
    """The C's AdamW update, checked against AdamW in float64 from its pre-step state (the
    C updates its params, m, v in place: copied first; m, v are zeros at the first step)."""
    h, t = step.hyper, step.t
    step.say("C's AdamW update")
    pre = (cmodel.params_memory.copy(), cmodel.m_memory.copy() if t > 1 else None,
           cmodel.v_memory.copy() if t > 1 else None)
    cmodel.update(*h.args(), t, threads=threads)
    return check_update(step.config, pre, cmodel.grads_memory,
                        (cmodel.params_memory, cmodel.m_memory, cmodel.v_memory), h, t, step=t, impl="C")


def _release(pm, how: str = "release") -> None:
    """Drop a reference's buffers until its next turn (``release``), or its activations
    once they are checked (``drop_activations``), where the reference has the method."""
    release = getattr(pm, how, None)
    if release is not None:
        release()


def _error_text(e: Exception) -> str:
    return " ".join([f"{type(e).__name__}: {e}", *getattr(e, "__notes__", [])])


def _graph_outputs(cfg: GPT2Config) -> dict[Ref, set[tuple[str, str]]]:
    """Every tensor the graph writes -> the (kernel, output argument) pairs that write it."""
    return {ref: {(n.kernel, a) for n, a in ws}
            for ref, ws in writers(forward_nodes(cfg) + backward_nodes(cfg)).items()}


def _returned_by(ks: KernelSet, cfg: GPT2Config):
    """``observes`` of a kernel port's model: false for what its kernels did not return
    (``ks.not_returned``, known once they ran)."""
    writers = _graph_outputs(cfg)
    return lambda ref: not (writers.get(ref, set()) & ks.not_returned)


def _unobserved(state, cfg: GPT2Config) -> list[str]:
    return list(dict.fromkeys(f"{r.group}.{r.name}" for r in _graph_outputs(cfg) if not state.observes(r)))
