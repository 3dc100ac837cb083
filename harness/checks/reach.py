"""What a mixed-precision run can still reveal, said where it matters: a change of
semantics the hygiene found (a layer-norm eps, the GELU's form) whose effect on the
port's own op lies below what the op's precision can reveal is reported as such, with the
figures, never left as a silent pass.

The effect is measured as the checks measure an error: the op re-run in float64 on the
port's own inputs under the change (the diagnosis catalogue's variant,
:mod:`harness.diagnosis.catalogue`), its norm-wise distance from the op's own float64
output relative to the scale the check judges at (its terms' size). The reach is that
check's norm-wise bound at the op's precision (:func:`harness.arbiter.tolerances.reach`):
a change of every element by less can pass."""
from __future__ import annotations

import numpy as np

from pyref.constants import LN_EPS

from ..arbiter.compare import compare
from ..arbiter.oracle import oracle_outputs
from ..arbiter.tolerances import op_tolerance, reach
from ..diagnosis.catalogue import VARIANT_BY_ID
from ..graph import forward_nodes
from .precision import precision_of
from .modelstate import args64, replayable
from .verdict import call_scale

# the hygiene finding -> (the catalogue's variant, the kernel and output it changes)
CHANGES = {"hygiene.layernorm-eps": ("layernorm.eps", "layernorm_forward", "out"),
           "hygiene.gelu": ("gelu.erf", "gelu_forward", "out")}


def _value(finding_id: str, model):
    """The port's own constant of the change (its layer norm's eps), None where fixed."""
    if finding_id != "hygiene.layernorm-eps":
        return None
    import torch
    eps = [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and m.eps != LN_EPS]
    conf = getattr(getattr(model, "config", None), "layer_norm_epsilon", None)
    return eps[0] if eps else conf


def effect(state, cfg, variant_id: str, kernel: str, output: str, value=None):
    """``(node, effect, reach, precision)`` of a change on the first call of ``kernel``
    the port's own inputs allow, or None where none does."""
    node = next((nd for nd in forward_nodes(cfg) if nd.kernel == kernel and replayable(nd, state.has)), None)
    if node is None:
        return None
    args = args64(node, state)
    expected = oracle_outputs(kernel, args)
    changed = VARIANT_BY_ID[variant_id].run(kernel, {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                                     for k, v in args.items()}, {"output": output}, value)
    p = precision_of(state, (node,), node.arg_dict.get(output))
    out = expected[output]
    tol = op_tolerance(kernel, output, 1, out.size, p)
    c = compare(np.asarray(changed[output]), out, name=output, tol=tol,
                elem_scale=call_scale(kernel, output, args, expected))
    return node, c.norm_rel, reach(tol), p


def below_reach(state, cfg) -> list[tuple[str, str]]:
    """(id, line) for each hygiene finding of a port computing below float32 whose
    change the run's precision can or cannot reveal, with the figures."""
    if not state.witness_precisions():
        return []
    out = []
    for f in list(state.findings):
        if f.id not in CHANGES:
            continue
        variant_id, kernel, output = CHANGES[f.id]
        found = effect(state, cfg, variant_id, kernel, output, _value(f.id, state.model))
        if found is None:
            continue
        node, size, bound, p = found
        label = "float32" if p is None else p.label
        verdict = (f"below what {label} can reveal here: this run cannot see it" if size < bound
                   else f"within {label}'s reach: the checks judge it")
        out.append((f"precision.{'below-reach' if size < bound else 'within-reach'}",
                    f"{f.description}: it changes {node.where()} by {size:.2g} of its scale; the smallest "
                    f"change {label} reveals there is {bound:.2g} -- {verdict}"))
    return out


def reach_key(check) -> str:
    """The op a check's reach is stated for: the graph's last call writing its tensor
    (``layer 0 ln1`` is ``ln1``), or the tensor itself (``mean_loss``)."""
    return check.nodes[-1].label if check.nodes else check.base


def op_reach(checks) -> tuple[str, dict] | None:
    """One line, and the same as data (``{"kind": "replay"|"e2e", "reach": {op: bound}}``):
    for a port judged below float32, per op of the graph, the smallest change of its scale
    its checks reveal (the largest of their norm-wise bounds: the weakest check of the op),
    replay checks where there are, else end-to-end; and the mean loss's. Every op is
    stated, those computed in float32 too: their end-to-end bounds carry the noise of the
    coarser ops upstream, so a change of them (or of the loss) can pass as well."""
    kind = "replay" if any(c.kind == "replay" for c in checks) else "e2e"
    worst: dict[str, tuple[float, str]] = {}
    for c in checks:
        if c.kind not in (kind, "loss"):
            continue
        op, bound = reach_key(c), reach(c.comparison.tol)
        if op not in worst or bound > worst[op][0]:
            worst[op] = (bound, "float32" if c.precision is None else c.precision.label)
    if not worst:
        return None
    line = (f"what its {kind} checks can reveal below float32 (the smallest change of an op's scale that fails "
            "them; a smaller one can pass): " + ", ".join(f"{op} {b:.2g} ({lab})" for op, (b, lab) in worst.items()))
    return line, {"kind": kind, "reach": {op: b for op, (b, _) in worst.items()}}


JUDGED_AT = "precision.judged-at"
UNDECLARED = "precision.undeclared"


def undeclared(state) -> list:
    """A :class:`~harness.ports.census.Finding` (``precision.undeclared``) per kernel the
    port ran below float32 by a cast of its own in a run that declared no mixed precision
    (:meth:`harness.ports.precision.Profile.undeclared`): its checks judge it at float32,
    so it fails there, and this says why. Empty for the C, a kernel port, a float32 port
    and a declared mixed-precision run."""
    from ..ports.census import Finding
    prof = getattr(getattr(state, "mixed", None), "profile", None)
    if prof is None:
        return []
    by: dict[str, list] = {}
    for node, p in prof.undeclared_ops():
        by.setdefault(node.kernel, []).append((node, p))
    out = []
    for kernel, ran in by.items():
        node, p = ran[0]
        dtype = p.compute if p.compute in ("bfloat16", "float16") else p.output
        layers = [nd.layer for nd, _ in ran if nd.layer is not None]
        out.append(Finding(UNDECLARED, f"{kernel} ran in {dtype} in a float32 run (no --autocast/--param-dtype "
                                       f"declared){f' in layers {layers}' if layers else ''}: judged at the C's "
                                       "float32; declare the mixed precision to be judged at it",
                           module=_module_of(state, node), where=f"{node.where()} {kernel}",
                           values={"kernel": kernel, "dtype": dtype, "layers": layers}))
    return out


def _module_of(state, node) -> str | None:
    from pyref.protocol import FORWARD_OUTPUTS
    for o in FORWARD_OUTPUTS.get(node.kernel, ()):
        ref = node.arg_dict.get(o)
        if ref is not None and (m := state.module_of(ref)):
            return m
    return None


def note_reach(state, cfg, checks=()) -> None:
    """Once per port computing below float32, after its first checked step (its
    ``precision.judged-at`` finding says it was noted): what it was judged at and can
    reveal (:func:`op_reach`), and :func:`below_reach`'s lines, as findings of their own
    (the report lists them beside the hygiene's). Before that, once, the ops it ran below
    float32 undeclared (:func:`undeclared`)."""
    if not any(f.id == UNDECLARED for f in state.findings):
        state.findings.extend(undeclared(state))
    if any(f.id == JUDGED_AT for f in state.findings) or not state.witness_precisions():
        return
    from ..ports.census import Finding
    state.findings.append(Finding(JUDGED_AT, "judged at the precision each op ran in: "
                                  + "; ".join(state.precision_lines())))
    stated = op_reach(checks)
    if stated:
        state.findings.append(Finding("precision.reach", stated[0], values=stated[1]))
    state.findings.extend(Finding(kind, line) for kind, line in below_reach(state, cfg))
