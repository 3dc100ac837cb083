"""What the checks found: :class:`Check` (one comparison, with its identity as data), a
step's :class:`StepReport` and a run's :class:`RunReport`, and the one line a failing
check says of itself, the first divergence (:func:`first_divergence`). Each result renders
its own text from its fields (``Check.tensor``, ``Check.where``); the tables and the JSON
of a run are :mod:`harness.report`'s."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyref.config import AdamW, GPT2Config
from pyref.protocol import KERNEL_OP

from ..arbiter.compare import Comparison
from ..graph import Node, Ref
from ..ports.census import first_structure

if TYPE_CHECKING:
    from ..diagnosis import Diagnosis

#: The kinds of check, in the order of tables and counts.
KINDS = ("e2e", "replay", "update", "loss")


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
    # the precision it was judged at where not float32 (harness.arbiter.precision.Precision,
    # of a mixed-precision port's op: its label is what the reports show)
    precision: object = None
    pin: object = None             # where in a torch port's source it goes wrong (harness.ports.record.Pin)

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
        of the calls that accumulate into a gradient buffer (with the torch model's module
        that showed it, in brackets)."""
        return self._where(True)

    @property
    def position(self) -> str:
        """Its place in the graph: :attr:`where` without the module (the same for every
        implementation: the plot's x axis)."""
        return self._where(False)

    def _where(self, with_module: bool) -> str:
        module = f" [{self.module}]" if self.module and with_module else ""
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
        """Why it failed (:mod:`harness.diagnosis`): set on failed replay, update and
        loss checks and failed end-to-end checks of gradients; None otherwise."""
        return self.comparison.diagnosis


@dataclass
class StepReport:
    step: int
    losses: dict[str, float]
    checks: list[Check]
    first_divergence: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)   # impl -> exception text
    seconds: float = 0.0
    # a torch model's structural findings in this step (harness.ports.census): the model
    # does not follow GPT-2's graph, so its first divergence is where it departs from it
    structure: dict[str, list] = field(default_factory=dict)

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
    # torch models (harness.ports): hygiene findings and the C tensors they do not show
    findings: dict[str, list[str]] = field(default_factory=dict)
    not_observed: dict[str, list[str]] = field(default_factory=dict)
    # kernel ports: backward kernels derived by autograd through their forward kernels
    derived: dict[str, list[str]] = field(default_factory=dict)
    # --free-run: each implementation on its own state (harness.checks.freerun.FreeRunRow)
    free_run: list = field(default_factory=list)
    # --debug-state: the C against llm.c's debug state (harness.checks.debugstate.DebugStateReport)
    debug_state: object | None = None

    def failed_parts(self) -> list[str]:
        """The parts of the run that failed, in the order they ran: ``"steps"`` (a per-step
        check failed or an implementation raised; also when no step ran), ``"free run"``,
        ``"debug state"``. Empty: the run passed."""
        parts = []
        if not self.steps or not all(s.passed for s in self.steps):
            parts.append("steps")
        if not all(r.passed for r in self.free_run):
            parts.append("free run")
        if self.debug_state is not None and not self.debug_state.passed:
            parts.append("debug state")
        return parts

    @property
    def passed(self) -> bool:
        """The run's one verdict: every step, the free run and the debug state (where they
        ran) passed. The text report, the JSON's verdict and the exit status all read it."""
        return not self.failed_parts()

    def first_divergence(self, heading: bool = True) -> str | None:
        """``step N [impl] first divergence: ...`` of the first step that diverged (or
        raised); ``heading=False`` leaves out the words "first divergence"."""
        for s in self.steps:
            for impl, text in s.first_divergence.items():
                # rendered again from the check (a report put together by hand may lack it)
                return f"step {s.step} [{impl}] " + (first_divergence(
                    [c for c in s.checks if c.impl == impl], heading, s.structure.get(impl)) or text)
            for impl, text in s.errors.items():
                return f"step {s.step} [{impl}] error: {text}"
        return None


def first_divergence_check(checks: list[Check]) -> Check | None:
    """The first failing replay check in graph order (else the first failing update, else
    end-to-end or loss check, in the graph's order: a forward activation's end-to-end check
    before the loss, computed after it, and the loss before the gradients): the check the
    first divergence names."""
    for kinds in (("replay",), ("update",)):
        for c in checks:
            if c.kind in kinds and not c.passed:
                return c
    failed = [c for c in checks if c.kind in ("e2e", "loss") and not c.passed]
    return min(failed, key=lambda c: {"forward": 0, "loss": 1}.get(c.phase, 2), default=None)


def misplaced_op(c: Check) -> str | None:
    """The graph's op (``layer 0 gelu gelu_forward``) a failing check's first cause says
    is misplaced (:attr:`harness.diagnosis.Cause.at`), in the check's layer; else None."""
    d = c.diagnosis
    if d is None or not d.causes or not d.causes[0].at:
        return None
    layer = c.call_layer
    return (f"layer {layer} " if layer is not None else "") + d.causes[0].at


def first_divergence(checks: list[Check], heading: bool = True, structure=None) -> str | None:
    """The first failing replay check in graph order (else the first failing check), as
    text (``first divergence: <where>...``; without that word under a heading of its own).
    A torch model that departs from GPT-2's graph (``structure``: the census's findings)
    diverges where it departs: the module is named, not a check downstream of it."""
    f = first_structure(structure, first_divergence_check(checks))
    if f is not None:
        head = ("first divergence: " if heading else "") + (f.where or "structure")
        pin = f"; {f.pin.describe()}" if f.pin is not None else ""
        return f"{head} [{f.module}]: {f.description} [{f.id}]{pin}"
    c = first_divergence_check(checks)
    if c is None:
        return None
    cmp = c.comparison
    head = ("first divergence: " if heading else "") + c.where
    at = misplaced_op(c)
    if at is not None:
        # the mistake is another op's, moved where this one's output shows it (GELU applied
        # before c_fc): that op is named, and where it shows
        head = ("first divergence: " if heading else "") + f"{at}, misplaced: seen at {c.where}"
    if c.kind == "replay":
        # replay feeds each implementation's op its own inputs for that op
        whose = "the C's own" if c.impl == "C" else "its own"
        head += f", inputs exact ({whose}), output off"
    bias = f", mean error {cmp.bias_text()}" if "bias" in cmp.failed_checks() else ""
    pin = f"; {c.pin.describe()}" if c.pin is not None else ""
    return (f"{head}: {c.tensor} max rel {cmp.max_rel:.3g} (tol {cmp.tol.rel:.3g}), "
            f"norm rel {cmp.norm_rel:.3g} (tol {cmp.tol.norm:.3g}){bias}, worst at {cmp.worst_label}: "
            f"{cmp.worst_actual!r} vs {cmp.worst_expected!r}{pin}")
