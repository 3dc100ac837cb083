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
  float32-sized noise carries to each tensor (the :class:`~harness.arbiter.oracle.Witness`).
* ``update``: parameters, m and v after AdamW, against AdamW in float64 from the common
  pre-step state and the implementation's own gradients.
* the mean loss against the float64 model's.

A failed check is also diagnosed (:mod:`harness.diagnosis`): the failing op re-run under
catalogued changes of semantics on the same inputs, to name the change that explains it.

Each check kind is a module of this package (:mod:`.replay`, :mod:`.e2e`, :mod:`.update`,
:mod:`.loss`); this one runs the models and calls them in order. Each reference is
loaded from the C's state, run, checked, updated, update-checked and released in turn,
so that only one of them holds memory at a time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from pyref.config import AdamW, GPT2Config
from pyref.model import GPT2 as PyGPT2
from pyref.protocol import KernelSet

from ..clib.cmodel import CModel
from ..clib.library import as_library
from ..arbiter.compare import Tolerance
from ..cores import shared
from ..errors import InputError
from ..ports.torchstate import ModelState
from ..arbiter.oracle import ORACLE, WitnessRun, witness_spread
from ..probe import span
from ..arbiter.tolerances import e2e_tolerance
from .debugstate import check_debug_state
from .e2e import e2e_graph
from .freerun import free_run
from .loss import check_loss
from .precision import loss_tolerance, spread_at, update_precision
from .reach import note_reach
from .replay import pin_divergence, pin_update, replay_graph
from .results import Check, RunReport, StepReport, first_divergence
from .modelstate import KernelPort, Reference
from .update import check_update


def run_parity(config: GPT2Config, params: np.ndarray, batches: Iterator[tuple[np.ndarray, np.ndarray]], *,
               lib=None, impls: dict[str, KernelSet] | None = None, models: dict | None = None,
               steps: int = 10,
               hyper: AdamW = AdamW(), threads: int | None = None, replay: bool | str = True,
               progress: Callable[[int, int, str], None] | None = None,
               on_step: Callable[[int, object], None] | None = None,
               free_run_batches: Sequence[tuple[np.ndarray, np.ndarray]] = (),
               checkpoint: str | None = None, debug_state: str | None = None,
               keep_witness: bool | None = None, witness_every: int = 1) -> RunReport:
    """Run ``steps`` training steps of the C (the library ``lib``) and of each Python
    implementation in ``impls`` (name -> KernelSet; default: none, the C alone against the
    oracle), checking everything after every step. ``models`` (name ->
    :class:`harness.ports.TorchModel`): PyTorch models run as their ports run them
    (autograd, their optimizer), checked the same way; their parameters are mapped (or
    refused, with the reason) before anything runs. ``batches`` yields (inputs, targets).
    ``replay``: True (every step), ``"on-failure"`` (only for an implementation whose
    end-to-end checks failed, to localise; cheaper at 124M scale) or False.
    ``on_step(t, cmodel)`` is called after each step's update (the gate fingerprints the
    C's buffers there).

    The run is one verdict (:attr:`RunReport.passed`) over all it checks: the steps, then
    a free run on ``free_run_batches`` where there are any (every implementation on its
    own state from ``params``, :mod:`.freerun`), then llm.c's ``debug_state`` file
    against the C built from ``checkpoint`` (:mod:`.debugstate`), each kept in the report.
    ``keep_witness``: the witness's buffers kept from step to step (True), made each step
    (False), or as the memory available allows (None:
    :func:`harness.arbiter.oracle.plan_witness`); the results are the same.
    ``witness_every``: the witness's spread measured at steps 1, 1 + k, ... and the last
    one used between (1, the default: every step)."""
    if debug_state and not checkpoint:
        raise InputError("a debug state needs the checkpoint it was made from")
    if int(witness_every) != witness_every or witness_every < 1:
        raise InputError(f"the witness is measured every k >= 1 steps, got {witness_every!r}")
    lib = as_library(lib)
    impls = dict(impls or {})
    with span("models built"):
        cmodel = CModel.from_params(config, np.asarray(params, np.float32), lib=lib)
    reports: list[StepReport] = []
    shape = (0, 0)
    witness = WitnessRun(config, cmodel.params_memory, keep=keep_witness, every=witness_every)
    try:
        oracle, pymodels = _references(config, cmodel, impls, models, hyper)
        for t in range(1, steps + 1):
            t0 = time.perf_counter()
            inputs, targets = next(batches)
            shape = inputs.shape
            say = (lambda what: progress(t, steps, what)) if progress else (lambda what: None)
            step = _Step(config, t, inputs, targets, hyper, replay, say, witness_again=witness.measures_after(t, steps),
                         last=t == steps)
            losses, checks = _run_step(step, cmodel, (oracle, witness), pymodels, threads)
            reports.append(_step_report(step, ["C", *pymodels], losses, checks, t0))
            if on_step is not None:
                on_step(t, cmodel)
    finally:
        witness.release()   # a kept witness is not held through the free run and the debug state
        cmodel.close()
    report = _run_report(config, shape, hyper, lib, impls, pymodels, reports)
    say = progress or (lambda t, n, what: None)
    if free_run_batches:
        say(steps, steps, f"free run of {len(free_run_batches)} steps")
        report.free_run = free_run(config, params, list(free_run_batches), lib=lib, impls=impls, models=models,
                                   hyper=hyper, threads=threads)
    if debug_state:
        say(steps, steps, "debug state")
        report.debug_state = check_debug_state(checkpoint, debug_state, lib=lib, threads=threads)
    return report


def _step_report(step: "_Step", names: list[str], losses: dict, checks: list[Check], t0: float) -> StepReport:
    """A step's report: its losses, its checks, each implementation's first divergence."""
    divergence = {}
    with span("first divergence"):
        for name in dict.fromkeys([*names, *step.structure]):
            d = first_divergence([c for c in checks if c.impl == name], structure=step.structure.get(name))
            if d:
                divergence[name] = d
    errors = {**step.errors, **step.update_errors}
    return StepReport(step.t, losses, checks, divergence, errors, time.perf_counter() - t0,
                      structure=dict(step.structure))


def _run_report(config: GPT2Config, shape, hyper: AdamW, lib, impls: dict, pymodels: dict,
                reports: list[StepReport]) -> RunReport:
    """The run's report: its steps and what it knows of each implementation (kernels not
    checked, tensors not observed, hygiene findings, kernels derived by autograd)."""
    B, T = shape
    not_checked = {name: list(k.missing) for name, k in impls.items() if k.missing}
    torch_models = {n: pm for n, pm in pymodels.items() if n not in impls}
    not_observed = {n: pm.not_observed() for n, pm in torch_models.items()}
    not_observed.update({n: pymodels[n].not_observed() for n, k in impls.items() if k.not_returned})
    return RunReport(config, B, T, hyper, ["C", *pymodels], reports, lib.path,
                     None if lib.build_info is None else vars(lib.build_info), not_checked,
                     lib.floating_point(),
                     findings={n: list(pm.findings) for n, pm in torch_models.items()},
                     not_observed=not_observed,
                     derived={n: list(k.derived) for n, k in impls.items() if k.derived})


# ----------------------------------------------------------------------------
# run_parity's parts: each reference is loaded from the C's state, run, checked, updated,
# update-checked and released in turn, so that only one of them holds memory at a time

def _references(config: GPT2Config, cmodel, impls: dict, models: dict | None, hyper: AdamW):
    """The float64 oracle (reading the C's parameters where they are: no copy) and the
    references by name: kernel ports on pyref.model.GPT2, torch models (ModelState)."""
    with span("models built"):
        return _built(config, cmodel, impls, models, hyper)


def _built(config: GPT2Config, cmodel, impls: dict, models: dict | None, hyper: AdamW):
    oracle = PyGPT2(config, cmodel.params_memory, kernels=ORACLE, dtype=np.float64, share_params=True)
    pymodels: dict[str, Reference] = {}
    for name, k in impls.items():
        pymodels[name] = KernelPort(config, cmodel.params_memory, k)
        pymodels[name].release()    # loaded again at its turn in each step
    for name, model in (models or {}).items():
        pymodels[name] = ModelState(config, cmodel.params_memory, model, hyper)
        pymodels[name].release()
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
    structure: dict = field(default_factory=dict)      # impl -> the census's findings (a torch model)
    witnesses: dict = field(default_factory=dict)      # a mixed-precision port's witness spreads (.precision)
    witness_again: bool = True                         # a later step runs the witness (else dropped once measured)
    last: bool = False                                 # the run's last step (the oracle dropped once last read)
    shared: dict = field(default_factory=dict)         # what the implementations' e2e comparisons share (.e2e)


def _run_step(step: _Step, cmodel, float64: tuple, pymodels: dict, threads) -> tuple[dict, list[Check]]:
    """One step: the C, the oracle and the witness (``float64``: the oracle, the run's
    WitnessRun); the C's checks; each reference in turn; the C's update last (so its
    params, m, v are every reference's pre-step state). Returns the losses and the
    checks: loss, e2e and replay checks by implementation, then the update checks."""
    B, T = step.inputs.shape
    oracle = float64[0]
    losses, spread = _run_c_and_oracle(step, cmodel, *float64, threads)
    step.loss_tol = e2e_tolerance("crossentropy_forward", "losses", B * T, 1, spread["mean_loss"])
    # the oracle's float64 buffers (as large as the C's and more) are read last by the e2e
    # checks of the last step's last implementation: dropped there, before its replay, its
    # diagnosis and a torch port's recording, which read the implementation's own state
    final = [*pymodels][-1] if pymodels and step.last else "C" if step.last else None
    step.graph["C"] = _check_state(step, "C", cmodel, losses, oracle, spread, final == "C")
    t = step.t
    pre = (cmodel.params_memory, cmodel.m_memory if t > 1 else None,
           cmodel.v_memory if t > 1 else None)   # None: zeros, as the C starts them
    for name, pm in pymodels.items():
        _run_reference(step, name, pm, pre, losses, oracle, spread, final == name)
    step.update["C"] = _update_c(step, cmodel, threads)
    names = ["C", *pymodels]
    return losses, [c for n in names for c in step.graph.get(n, [])] + \
        [c for n in names for c in step.update.get(n, [])]


def _run_c_and_oracle(step: _Step, cmodel, oracle, witness: WitnessRun, threads) -> tuple[dict, dict]:
    """The C's and the oracle's forward and backward, and the witness's spread (the
    witness run with the step's seed, measured, and dropped here unless the run keeps it:
    at 124M scale its buffers are as large as the oracle's, and only its distances are
    needed). Returns the losses and the spread."""
    say, config = step.say, step.config
    with span("load_state"):
        oracle.load_state(cmodel.params_memory)  # it never updates: no m, v
    say("C forward/backward")
    with span("C acts poisoned"):
        cmodel.poison_activations()  # from step 2 on: unwritten slots show up as NaN
    with span("C"):
        losses = {"C": cmodel.forward(step.inputs, step.targets, threads=threads)}
        cmodel.zero_grad()
        cmodel.backward(threads=threads)
    say("oracle and witness forward/backward")

    def run(name):
        with span(name):
            if name == "witness":
                return witness.run(step.t, step.inputs, step.targets)
            loss = float(oracle.forward(step.inputs, step.targets))
            oracle.zero_grad()
            oracle.backward()
        return loss
    if not witness.due(step.t):      # the last spread measured serves (witness_every)
        losses["oracle"] = run("oracle")
        return losses, witness.spread
    # independent float64 models on the same read-only parameters: one per core
    losses["oracle"], _ = shared(run, ("oracle", "witness"))
    with span("witness spread"):
        witness.spread = witness_spread(config, witness.model, oracle)
    witness.done(again=step.witness_again)
    return losses, witness.spread


def _check_state(step: _Step, name: str, state, losses: dict, oracle, spread: dict,
                 oracle_done: bool = False) -> list[Check]:
    """The loss and end-to-end checks of one implementation's forward/backward, and its
    replay (always, or on a failed end-to-end check); ``oracle_done``: nothing reads the
    oracle after these end-to-end checks, so its buffers are dropped before the replay."""
    B, T = step.inputs.shape
    step.say(f"checking {name}")
    loss_tol, loss_precision = loss_tolerance(state, step, spread, oracle)
    checks = [check_loss(step.t, name, losses[name], losses["oracle"], loss_tol or step.loss_tol, B * T)]
    checks[0].precision = loss_precision
    e2e = e2e_graph(step.config, B * T, state, oracle, step=step.t, impl=name, spread=spread, shared=step.shared)
    checks += e2e
    if oracle_done:
        oracle.release()
    if step.replay is True or (step.replay == "on-failure" and not all(c.passed for c in e2e)):
        step.say(f"replaying {name}'s ops")
        checks += replay_graph(step.config, state, step=step.t, impl=name)
    return checks


def _run_reference(step: _Step, name: str, pm: Reference, pre: tuple, losses: dict, oracle, spread: dict,
                   oracle_done: bool = False) -> None:
    """One reference's turn: loaded from the C's pre-step state, forward/backward,
    checked, updated, update-checked, released. A user's kernel may raise: reported in
    ``step.errors`` / ``step.update_errors``, and the run carries on."""
    h = step.hyper
    with span("load_state"):
        pm.load_state(pre[0], pre[1], pre[2])
    try:
        step.say(f"{name} forward/backward")
        try:
            with span(name):
                losses[name] = float(pm.forward(step.inputs, step.targets))
                pm.zero_grad()
                pm.backward()
        except InputError:
            raise      # a model that cannot be run as given (it raised, returned no loss): the user's to fix
        except Exception as e:
            step.errors[name] = _error_text(e)
            return
        structure = list(pm.structure)
        if structure:
            step.structure[name] = structure
            known = {f.text() for f in pm.findings}
            pm.findings.extend(f for f in structure if f.text() not in known)
        step.graph[name] = _check_state(step, name, pm, losses, oracle,
                                        spread_at(pm, step, pre[0], oracle, spread, step.witnesses), oracle_done)
        note_reach(pm, step.config, step.graph[name])
        # a failure of a torch port: its line (nothing on a pass)
        pin_divergence(step.graph[name], pm, step.structure.get(name))
        pm.drop_activations()   # checked: the update needs none of them
        step.say(f"{name}'s AdamW update")
        try:
            with span(name):
                pm.update(*h.args(), step.t)
        except Exception as e:
            step.update_errors[name] = _error_text(e)
            return
        step.update[name] = check_update(step.config, pre, pm.grads_memory,
                                         (pm.params_memory, pm.m_memory, pm.v_memory), h, step.t,
                                         step=step.t, impl=name, precision=update_precision(pm),
                                         held=pm.held_settings())
        pin_update(step.graph[name] + step.update[name], pm)
    finally:
        pm.release()


def _update_c(step: _Step, cmodel, threads) -> list[Check]:
    """The C's AdamW update, checked against AdamW in float64 from its pre-step state (the
    C updates its params, m, v in place: copied first; m, v are zeros at the first step)."""
    h, t = step.hyper, step.t
    step.say("C's AdamW update")
    pre = (cmodel.params_memory.copy(), cmodel.m_memory.copy() if t > 1 else None,
           cmodel.v_memory.copy() if t > 1 else None)
    with span("C"):
        cmodel.update(*h.args(), t, threads=threads)
    return check_update(step.config, pre, cmodel.grads_memory,
                        (cmodel.params_memory, cmodel.m_memory, cmodel.v_memory), h, t, step=t, impl="C")


def _error_text(e: Exception) -> str:
    return " ".join([f"{type(e).__name__}: {e}", *getattr(e, "__notes__", [])])
