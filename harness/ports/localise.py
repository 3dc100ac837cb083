"""A failure of a torch port pinned to the line of its source that made it: the rules
that read a recording (:mod:`.record`) against the reference's intermediates.

:func:`pin_failure` records the module that showed a failing forward replay check again on
its own inputs (the whole forward where a module's input shows it), matches each recorded
op to the op's float64 intermediates (:func:`.record.stages`, :func:`.record.distance`)
and finds the line (:func:`locate`): the op that made the port's failing tensor
(:func:`_anchor`), its ancestors back to the ops that reproduce an intermediate (the
suspects, :func:`_ancestors`), narrowed to those of the first intermediate the suspects
compute and do not reproduce (:func:`_first_unmatched`). Around that rule: an operand that
holds another intermediate's value in its place (:func:`_misplaced`,
:func:`_operands_misplaced`: the line that made it), a mask decided outside the checked
causal triangle (:func:`_unverified`), the first NaN (:func:`_first_nan`), a residual at
its block's line (:func:`residual_line`), a wrong constant where the attribute read on
the pinned line was set (:func:`attribute_origin`) and an op computed by torch's own module
at the call that built it with a setting not GPT-2's (:func:`module_origin`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace

import numpy as np

from pyref.protocol import FORWARD_OUTPUTS

from ..graph import Node, Ref
from .record import (MATCH_BOUND, NEAR_BOUND, SAME_BOUND, Op, Site, Stage, _squeezed, _stage, distance,
                     forward_recording, is_user_file, layouts, owned_site, stages)


# ----------------------------------------------------------------------------- pinning a failure to a line

@dataclass
class Pin:
    """Where in the port's source a failing op goes wrong: the first of the suspect
    ``lines`` (``file``, ``line``, ``text``), the module recorded, the last intermediate
    the port reproduces (``matched``, None where none is) and the first it computes and
    does not (``unmatched``), by name (:func:`stages`), with their words for the text."""

    kernel: str
    module: str
    lines: tuple[Site, ...]
    matched: str | None
    unmatched: str
    says: tuple[str, ...] = field(default=(), repr=False)   # the words: matched's, unmatched's

    @property
    def file(self) -> str:
        return self.lines[0].file

    @property
    def line(self) -> int:
        return self.lines[0].line

    @property
    def text(self) -> str:
        return self.lines[0].text

    def describe(self) -> str:
        """``attention_forward at gpt.py:87 (y = att.transpose(-2, -1) @ v): the softmax
        matches, the weighted values do not``."""
        says = f": {', '.join(self.says)}" if self.says else ""
        return f"{self.kernel} at {', '.join(map(str, self.lines))}{says}"

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "text": self.text, "module": self.module,
                "matched": self.matched, "unmatched": self.unmatched, "lines": [s.to_json() for s in self.lines],
                "text_line": self.describe()}


def pin_failure(state, node: Node, ref: Ref, layout=layouts) -> Pin | None:
    """The line(s) of a torch model's source where ``node``'s output ``ref`` (a failing
    forward replay check) goes wrong: the module that showed ``ref`` recorded again on its
    own inputs (:func:`record`), its ops matched to the op's intermediates
    (:func:`locate`); where the failing tensor is not among that module's ops (a module's
    input shows it, made before the module), the whole forward. A residual is pinned to
    its block's line (:func:`residual_line`); a pin whose line reads a module's float
    attribute that is not one of the op's constants names where the attribute was set first
    (:func:`attribute_origin`). None where ``state`` is not a torch model's, or nothing is
    found."""
    model = getattr(state, "model", None)
    if model is None or "torch" not in sys.modules or ref.group != "acts" or getattr(state, "inputs", None) is None:
        return None     # not a torch model's state (and torch is not even loaded)
    import torch
    if not isinstance(model, torch.nn.Module):
        return None
    args = {k: (np.asarray(v.get(state), np.float64) if isinstance(v, Ref) and v.group != "batch"
                else (v.get(state) if isinstance(v, Ref) else v))
            for k, v in node.args if k not in FORWARD_OUTPUTS[node.kernel]}
    value = np.asarray(ref.get(state), np.float64)
    V = getattr(getattr(state, "config", None), "vocab_size", None)
    held = getattr(getattr(state, "capture", None), "values", {}).get(("logits", None))
    if ref.name == "logits" and held is not None and held.shape[-1] == V < value.shape[-1]:
        # a port's logits over the V real tokens: the C's padded columns (zero rows of its
        # wte) are the harness's
        value, args = value[..., :V], dict(args, weight=args["weight"][:V])
    found = stages(node.kernel, args)
    observed = _stage(node.kernel, "observed", value)
    sizes = {s.value.size for s in found} | {s.heads[0].size for s in found if s.heads is not None}
    module = None if node.kernel == "residual_forward" else recorded_module(model, state.module_of(ref))
    for name in dict.fromkeys((module, None)):
        rec = forward_recording(state, name, keep=lambda t: t.numel() in sizes)
        if rec is None:
            return None     # the port's forward raised run again, recorded: no line, the check stands
        if node.kernel == "residual_forward":
            return residual_line(rec.ops, observed, _block(state, node.layer), node.kernel, layout)
        pin = locate(rec.ops, found, observed, node.kernel, name or "", layout)
        if pin is not None:
            pin = attribute_origin(pin, rec.ops, model, node.kernel, args, getattr(rec, "returns", ()))
            return module_origin(pin, rec.ops, model, node.kernel)
    return None



def _block(state, layer: int | None):
    """The module of the graph's block ``layer`` (the parent of its ln1's or ln2's module,
    as the census knows them), or None."""
    census = getattr(state, "census", None)
    if census is None or layer is None:
        return None
    names = [n for n, (_, op) in census.graph.items()
             if op in (f"layer {layer} ln1 layernorm_forward", f"layer {layer} ln2 layernorm_forward")]
    modules = dict(state.model.named_modules())
    parent = names[0].rpartition(".")[0] if names else ""
    return modules.get(parent) if parent else None


def residual_line(ops: list[Op], observed: Stage, block, kernel: str, layout=layouts) -> Pin | None:
    """A residual's pin: the op that made the port's failing stream (the add, or whatever
    stands where the add is not made: the branch's output), at its line in the block's own
    method (the block that should add: a residual added wrong, or not added, is a line of
    the block's forward, not of the branch it calls)."""
    anchor = _anchor(ops, observed, layout)
    if anchor is None:
        return None
    site = (owned_site(anchor.stack, block) if block is not None else None) or anchor.site
    if block is not None and owned_site(anchor.stack, block) is None:
        # made before the block (its input, given where its sum belongs: the MLP's branch
        # reading the block's input, GPT-J's parallel block): the block's line passing it on
        taker = next((o for o in ops[anchor.index + 1:] if anchor.index in o.inputs
                      and owned_site(o.stack, block) is not None), None)
        if taker is not None:
            return Pin(kernel, "", (owned_site(taker.stack, block),), None, "out",
                       ("the block's input stands where the sum belongs",))
    if site is None:
        return None
    return Pin(kernel, "", (site,), None, "out", ("the sum does not",))


# the C's float constants of an op: a module attribute read on a pinned line that is none of
# them is the op's wrong constant (layer norm's eps of 1e-12); pyref.numpy_kernels' values
def _constants(kernel: str, args: dict) -> tuple[float, ...]:
    from pyref import numpy_kernels as nk
    if kernel == "layernorm_forward":
        return (nk.LN_EPS,)
    if kernel == "gelu_forward":
        return (nk.GELU_COEF, math.sqrt(2.0 / math.pi), 0.5)
    if kernel == "attention_forward":
        hs = np.shape(args["inp"])[-1] // 3 // int(args["NH"])
        return (1.0 / math.sqrt(hs),)
    return ()


def owners_of(model) -> dict[int, object]:
    """{``id``: object} of ``model``'s modules and of the objects of the user's classes
    they hold (a functional port's ``self.ops``): whose ``self`` a recorded frame runs on."""
    out = {}
    for m in model.modules():
        out[id(m)] = m
        for v in vars(m).values():
            cls = type(v)
            if id(v) not in out and hasattr(v, "__dict__") and is_user_file(
                    getattr(sys.modules.get(cls.__module__), "__file__", None) or ""):
                out[id(v)] = v
    return out


def attribute_origin(pin: Pin, ops: list[Op], model, kernel: str, args: dict, returns=()) -> Pin:
    """``pin`` with, before its lines, the line that set a module's float attribute read on
    its first line (``self.eps``) where the value is none of the op's constants
    (:func:`_constants`): a wrong constant lives where it is set (a constructor's default,
    ``eps=1e-12``, or a config's field the constructor was given: :func:`.sources.config_site`),
    not where the forward reads it; likewise a method of the module called
    on the line with no argument (``self.softmax_scale()``) whose float result is none of
    them: the line of the method that returns it; first, any user function called on the
    line that returned such a float while the forward was recorded (``returns``:
    :class:`.record.Returned`: ``self.scale(q)``): the line of its ``return``. The owner
    of the line (its ``self``) is any object of the model's (:func:`owners_of`). A documented heuristic: the attribute
    is found by the line's source (``ast``), its origin by :func:`.sources.attribute_site`,
    the method's line by :func:`.sources.method_site`."""
    from .sources import attribute_site, float_attributes, float_methods, method_site
    constants = _constants(kernel, args)
    if not constants:
        return pin
    owners = owners_of(model)
    first = pin.lines[0]
    for r in returns:
        if r.caller == first and not any(math.isclose(r.value, c, rel_tol=1e-6) for c in constants) \
                and r.site not in pin.lines:
            return replace(pin, lines=(r.site, *pin.lines))
    op = next((o for o in ops if o.site == first and o.stack), None)
    owner = owners.get(op.stack[0].owner) if op is not None else None
    if owner is None:
        return pin
    for name, value in float_attributes(owner, first.text):
        if not any(math.isclose(value, c, rel_tol=1e-6) for c in constants):
            site = attribute_site(type(owner), name, value, model)
            if site is not None and site not in pin.lines:
                return replace(pin, lines=(site, *pin.lines))
    for name, value in float_methods(owner, first.text):
        if not any(math.isclose(value, c, rel_tol=1e-6) for c in constants):
            site = method_site(owner, name)
            if site is not None and site not in pin.lines:
                return replace(pin, lines=(site, *pin.lines))
    return pin


# the torch module that computes a graph op itself (its forward torch's, its settings the
# constructor's)
_OWN_MODULE = {"gelu_forward": "GELU", "layernorm_forward": "LayerNorm", "encoder_forward": "Embedding"}


def module_origin(pin: Pin, ops: list[Op], model, kernel: str) -> Pin:
    """``pin`` with, before its lines, the line constructing the torch module that computed
    the op on its first line (an ``nn.GELU``, an ``nn.LayerNorm``: the line calls it, its
    forward is torch's) where that module is the graph op's own kind and is built with a
    setting that is not GPT-2's (:func:`.sources.changed_options`: ``nn.GELU()``'s erf,
    ``eps=1e-3``): its inputs matched and it computed them wrong, so what it was built with
    is the mistake (:func:`.sources.constructor_site`)."""
    from .sources import changed_options, constructor_site
    if _OWN_MODULE.get(kernel) is None:
        return pin
    modules = dict(model.named_modules())
    for name in dict.fromkeys(o.module for o in ops if o.site == pin.lines[0] and o.module in modules):
        module = modules[name]
        base, options = changed_options(module)
        forward = getattr(type(module).forward, "__code__", None)
        if base is None or base.__name__ != _OWN_MODULE[kernel] or not options or (
                forward is not None and is_user_file(forward.co_filename)):
            continue
        site = constructor_site(model, name, base, options)
        if site is not None and site not in pin.lines:
            return replace(pin, lines=(site, *pin.lines))
    return pin


def recorded_module(model, shown: str | None) -> str | None:
    """The module whose call computes a tensor shown at ``shown`` (:meth:`Capture.points`):
    the module itself for its output, its parent for its input (attention's output is
    ``attn.c_proj``'s input: ``attn`` computes it), the whole model (None) otherwise."""
    if not shown or " " in shown.replace(" input", ""):
        return None
    import torch
    name = shown.removesuffix(" input")
    if shown.endswith(" input"):
        name = name.rpartition(".")[0]
    names = dict(model.named_modules())
    # a container that is never called itself (transformer.h, a ModuleList): its caller
    while name and (name not in names or type(names[name]).forward is torch.nn.Module.forward):
        name = name.rpartition(".")[0]
    return name or None


def locate(ops: list[Op], found: list[Stage], observed: Stage, kernel: str, module: str,
           layout=layouts) -> Pin | None:
    """The pin from a recording: the op that produced the port's failing tensor
    (``observed``), its ancestors back to the ops that reproduce an intermediate (the
    suspects), narrowed to those of the first intermediate the suspects compute and do not
    reproduce."""
    good = {op.index: {s.name for s in found if distance(op.value, s, layout) <= MATCH_BOUND}
            for op in ops if op.value is not None}
    good = {i: names for i, names in good.items() if names}
    anchor = _anchor(ops, observed, layout, good)
    if anchor is not None and anchor.index in good:
        # the failing tensor is one of the reference's values: an input of the op passed on
        # where its output belongs (the op not applied there), else nothing to pin
        return _passed_on(ops, found, good, anchor, kernel, module)
    if anchor is None:
        # the failing tensor is not among the ops: a random draw (a dropout left on) is
        # not repeated by the recording, and the C's forward has none: its line
        return _random_draw(ops, kernel, module)
    suspects, frontier = _ancestors(ops, anchor.index, good)
    every = suspects
    unmatched = _first_unmatched(ops, found, good, suspects, frontier, layout)
    if unmatched is not None:
        stage, op = unmatched
        misplaced = _misplaced(ops, found, good, op, stage) or _operands_misplaced(ops, found, good, suspects, stage)
        if misplaced is not None:
            return Pin(kernel, module, *misplaced)
        narrowed, frontier = _ancestors(ops, op, good)
        suspects = (suspects & narrowed) | _unverified(ops, found, good, frontier, op, stage)
        suspects = _wrong_term(ops, good, op, stage, suspects) or suspects
    else:
        stage = next((s for s in found if s.name == "out"), found[-1])
        merged = _merged_stacked(ops, stage, anchor.index, layout)
        if merged is not None:
            return Pin(kernel, module, *merged)
        suspects = _first_nan(ops, suspects) or suspects
    suspects = _infinite_maker(ops, every) or suspects
    sites = _float_lines_first(ops, suspects)
    if not sites:
        return None
    sites = _caller_first(ops, suspects, sites)
    before = _last_reproduced(found, good, frontier, stage)
    says = ((before.says(True),) if before is not None else ()) + (stage.says(False),)
    return Pin(kernel, module, sites, before.name if before is not None else None, stage.name, says)


_INTEGER = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _given_integers(ops: list[Op], order: list[int]) -> set[int]:
    """The ops of ``order`` computed from the given integer tensors only (the targets'
    one-hot): every input integer, one at least made before the recording or so computed.
    Indices built in the forward (an ``arange``) are not given: their lines keep their place."""
    given = set()
    for i in sorted({p for i in order for p in ops[i].inputs} | set(order)):
        op = ops[i]
        if op.inputs and all(ops[p].dtype in _INTEGER for p in op.inputs) and any(
                ops[p].name == "input" or p in given for p in op.inputs):
            given.add(i)
    return given


def _float_lines_first(ops: list[Op], suspects: set[int]) -> tuple:
    """The suspects' lines in the order their ops ran, but a line whose ops are all
    computed from the given integer tensors (labels one-hot encoded; an op of no inputs
    aside) after the lines of float ops: the targets are given, the float op that uses
    them is where a mistake shows."""
    order = [i for i in sorted(suspects) if ops[i].site is not None]
    given = _given_integers(ops, order)
    other = {ops[i].site for i in order if i not in given and ops[i].inputs}
    integer = {ops[i].site for i in order if i in given} - other
    floats = [ops[i].site for i in order if ops[i].site not in integer]
    return tuple(dict.fromkeys(floats + [ops[i].site for i in order if ops[i].site in integer]))


def _caller_first(ops: list[Op], suspects: set[int], sites: tuple) -> tuple:
    """``sites`` with the line that called them first, where every suspect ran in one user
    function called from one line and that call gives the helper an int it reads (its
    ``dim``, :func:`.sources.passes_int_to`): the helper is right, the axis it was given is
    the caller's."""
    from .sources import passes_int_to
    stacks = [ops[i].stack for i in suspects if ops[i].site is not None]
    if not stacks or any(len(st) < 2 for st in stacks):
        return sites
    codes, callers = {st[0].code for st in stacks}, {st[1].site for st in stacks}
    if len(codes) != 1 or len(callers) != 1:
        return sites
    caller = callers.pop()
    return (caller,) + sites if caller not in sites and passes_int_to(caller, sites) else sites


def _anchor(ops: list[Op], observed: Stage, layout=layouts, good: dict | None = None) -> Op | None:
    """The op that made the port's failing tensor: the first that holds its values in any
    layout; but where an op after it that the failing tensor is made from reproduces an
    intermediate (the weighted values, right in the heads' layout), the op that holds them
    in the tensor's own shape: the values were right, their reshape (heads merged without
    moving them back) is what made the tensor."""
    made = [op for op in ops if op.value is not None and op.name != "input"]
    first = next((op for op in made if distance(op.value, observed, layout) <= SAME_BOUND), None)
    if first is None or not good:
        return first
    as_is = lambda a, shape: [a.reshape(shape)] if _squeezed(a.shape) == _squeezed(shape) else []  # noqa: E731
    own = next((op for op in made if op.index > first.index and distance(op.value, observed, as_is) <= SAME_BOUND),
               None)
    if own is None:
        return first
    between, _ = _ancestors(ops, own.index, {})
    if first.index in good and own.index not in good and first.index in between:
        return own      # the values right in a layout of their own (heads stacked last), flattened as they are
    return own if any(first.index < i < own.index and i in good for i in between) else first


# aten's ops that draw random numbers: the C's GPT-2 forward draws none
_RANDOM = ("aten.bernoulli", "aten.native_dropout", "aten.rand", "aten.randn", "aten.randint", "aten.normal",
           "aten.uniform", "aten.multinomial", "aten.randperm", "aten.exponential", "aten.geometric")


def _random_draw(ops: list[Op], kernel: str, module: str) -> Pin | None:
    """The pin at the first op that draws random numbers and whose draw is used (a
    dropout left on: ``F.dropout``'s ``training=True``): a recording draws again, so no op
    holds the failing tensor, and GPT-2's forward draws nothing. None where no op draws."""
    used = {i for op in ops for i in op.inputs}

    def draws(op):
        parts = op.name.split(".")
        return len(parts) > 1 and f"{parts[0]}.{parts[1].rstrip('_')}" in _RANDOM
    draw = next((op for op in ops if draws(op) and op.site is not None and op.index in used), None)
    if draw is None:
        return None
    return Pin(kernel, module, (draw.site,), None, "out", ("a random draw: GPT-2's forward makes none",))


def _wrong_term(ops: list[Op], good: dict, op: int, stage: Stage, suspects: set[int]) -> set[int]:
    """Where the first unmatched op (``op``) is a sum of two terms and the stage less one
    term is a value the port reproduces (x + c x^3 less the port's c x^3 is x): that term
    is right, so the other one (``s * x`` where ``x`` belongs) is the mistake: the suspects
    that make it, and the sum, as a set (empty where no term is shown right)."""
    terms = ops[op].inputs
    if ops[op].name != "aten.add.Tensor" or len(terms) != 2:
        return set()
    if any(ops[t].value is None or ops[t].value.shape != stage.value.shape for t in terms):
        return set()
    known = [ops[g].value for g in good if ops[g].value is not None and ops[g].value.shape == stage.value.shape]
    for right, other in (terms, terms[::-1]):
        rest = Stage("rest", "the rest", stage.value - ops[right].value)
        if other not in good and any(distance(k, rest) <= MATCH_BOUND for k in known):
            return (_ancestors(ops, other, good)[0] & suspects) | {op}
    return set()


def _first_unmatched(ops: list[Op], found: list[Stage], good: dict, suspects: set, frontier: set, layout):
    """(the first intermediate after the suspects' inputs that no op reproduces and a
    suspect could stand for, the suspect nearest to it), or None."""
    reproduced = {n for names in good.values() for n in names}
    names = [s.name for s in found]
    start = max((names.index(n) + 1 for i in frontier for n in good[i]), default=0)
    for s in found[start:]:
        if s.name in reproduced:
            continue
        near = [(d, i) for i in sorted(suspects) if ops[i].value is not None
                and (d := distance(ops[i].value, s, layout)) <= NEAR_BOUND]
        if near:
            # the first of the nearest (a reshape after it holds the same values: it only
            # lays them out, a roundoff nearer or further)
            best = min(near)[0]
            return s, min(i for d, i in near if d <= best * (1 + 1e-9) + 1e-300)
    return None


def _merged_stacked(ops: list[Op], stage: Stage, op: int, layout):
    """(lines, matched, unmatched, says) of a :class:`Pin` where the op that made the
    failing tensor (``op``) holds the stage's (B, T, C) values right with the heads stacked on the batch
    axis, (B*NH, T, hs), and an op of its own alone (a reshape, a view) makes the stage's
    shape of it: the heads merged without moving them back after the batch; that op's
    line. None otherwise."""
    v, want = ops[op].value, stage.value
    if v is None or v.ndim != 3 or want.ndim != 3 or v.shape[1] != want.shape[1]:
        return None
    B, T, C = want.shape
    NH, hs = v.shape[0] // B, v.shape[2]
    if NH < 2 or NH * B != v.shape[0] or NH * hs != C:
        return None
    stacked = v.reshape(B, NH, T, hs).transpose(0, 2, 1, 3).reshape(B, T, C)
    if distance(stacked, stage, layout) > MATCH_BOUND:
        return None
    merge = next((m for m in ops if m.inputs == (op,) and _squeezed(m.shape) == _squeezed(want.shape)
                  and m.site is not None), None)
    if merge is None:
        return None
    says = (f"{stage.says(True)} with the heads stacked on the batch", f"merged, {stage.says(False)}")
    return (merge.site,), stage.name, stage.name, says


def _misplaced(ops: list[Op], found: list[Stage], good: dict, op: int, stage: Stage):
    """(lines, matched, unmatched, says) of a :class:`Pin` where the first unmatched op
    (``op``) takes, in place of one of the stages it is computed from (:attr:`Stage.of`:
    scores of q and k), another stage's value (the values where the keys go, the keys
    where the queries go): the line that made that tensor, where it was first made (not
    a view of it taken later); None where its operands are the ones it should have."""
    if not stage.of:
        return None
    for o in sorted(_ancestors(ops, op, good)[0], reverse=True):
        found_ = _misplaced_at(ops, found, good, o, stage)
        if found_ is not None:
            return found_
    return None


def _operands_misplaced(ops: list[Op], found: list[Stage], good: dict, suspects: set, stage: Stage):
    """:func:`_misplaced`'s (lines, matched, unmatched, says) for an intermediate before
    ``stage`` (the first unmatched one a suspect is near) that no op reproduces and no
    suspect is near: one computed from other stages (:attr:`Stage.of`: the scores of q and
    k) by a suspect that takes another stage's value in an operand's place (a port looping
    over heads whose keys are its queries' next head: each operand matches some head, their
    product none, so the first stage near a suspect is a later one)."""
    reproduced = {n for names in good.values() for n in names}
    for s in found[:[f.name for f in found].index(stage.name)]:
        if not s.of or s.name in reproduced:
            continue
        for o in sorted(suspects):
            # an op of the stage's own kind: each operand itself holds a stage (not an op
            # further on, the weighted values' att @ v, whose operands only descend from some)
            if o not in good and ops[o].value is not None and all(i in good for i in ops[o].inputs):
                made = _misplaced_at(ops, found, good, o, s)
                if made is not None:
                    return made
    return None


def _misplaced_at(ops: list[Op], found: list[Stage], good: dict, op: int, stage: Stage):
    """:func:`_misplaced` at one op of those the unmatched one is made from."""
    roles = []
    for i in ops[op].inputs:
        frontier = {i} if i in good else _ancestors(ops, i, good)[1]
        names = {n for f in frontier for n in good[f]}
        if names:
            roles.append((i if i in good else min(frontier), names))
    if len(roles) != len(stage.of):
        return None
    for (i, names), want in zip(roles, stage.of):
        if want in names:
            continue
        held = next(n for n in (s.name for s in found) if n in names)
        while True:     # back through re-layouts of the same value to the op that made it
            back = [j for j in ops[i].inputs if j in good and held in good[j]]
            if not back:
                break
            i = back[0]
        if ops[i].site is None:
            return None
        words = {s.name: s for s in found}
        says = (f"{words[held].phrase} stand where {words[want].phrase} belong", stage.says(False))
        return (ops[i].site,), held, stage.name, says
    return None


def _unverified(ops: list[Op], found: list[Stage], good: dict, frontier: set, op: int, stage: Stage) -> set[int]:
    """The ops that made the part of a frontier op's value its match did not check (an
    intermediate defined on part only, the causal triangle: the mask that decides the
    rest), where the first unmatched op (``op``, or the op it lays out again) has mass in
    that part and the reference's ``stage`` has none there (the future seen): the mask's
    makers where it marks another part (a mask built wrong on its own line), the frontier
    op itself where it fills that very part with a value that leaves mass there (0 for
    -inf: the fill is the mistake)."""
    while ops[op].value is not None and ops[op].value.shape != stage.value.shape and len(ops[op].inputs) == 1:
        op = ops[op].inputs[0]      # back through re-layouts (a view, a permute) to the value itself
    x = ops[op].value
    if x is None or x.shape != stage.value.shape:
        return set()
    partial = {s.name: s for s in found if s.where is not None}
    out: set[int] = set()
    for f in frontier:
        for name in good[f] & set(partial):
            outside = ~np.broadcast_to(partial[name].where, x.shape)
            with np.errstate(all="ignore"):
                seen = np.isfinite(x[outside]) & (x[outside] != 0)
            if not seen.any() or np.any(stage.value[outside]):
                continue
            if _fills(ops, f, outside):
                out.add(f)
                continue
            for i in ops[f].inputs:
                if i not in good and ops[i].value is None:
                    out |= _ancestors(ops, i, good)[0]
    return out


def _fills(ops: list[Op], f: int, part: np.ndarray) -> bool:
    """Whether op ``f`` changed exactly ``part`` of its float input (a masked fill whose
    mask is the right one), as far as the values kept show."""
    value = ops[f].value
    given = [ops[i].value for i in ops[f].inputs if ops[i].value is not None]
    if value is None or len(given) != 1 or given[0].shape != value.shape or value.shape != part.shape:
        return False
    with np.errstate(all="ignore"):
        changed = ~((value == given[0]) | (np.isnan(value) & np.isnan(given[0])))
    return bool(np.array_equal(changed, part))


def _first_nan(ops: list[Op], suspects: set[int]) -> set[int]:
    """The first suspect that makes a NaN of inputs without one (a softmax of a row all
    -inf), as a set (empty where none does): a NaN matches no intermediate, its maker is
    the line."""
    def clean(i):
        v = ops[i].value
        return v is None or not bool(np.isnan(v).any())
    for i in sorted(suspects):
        if not clean(i) and all(clean(j) for j in ops[i].inputs):
            return {i}
    return set()


def _passed_on(ops: list[Op], found: list[Stage], good: dict, anchor: Op, kernel: str, module: str) -> Pin | None:
    """The pin where the port's failing tensor is one of the op's inputs as it was given
    (the GELU's input where its output belongs: the op applied elsewhere, or not at all):
    the line that passes it on (the first op taking it that has a line, else the line that
    made it); None where it reproduces a computed intermediate, not an input."""
    given = {s.name: s for s in found if s.given}
    held = [n for n in (s.name for s in found) if n in good[anchor.index]]
    if not held or any(n not in given for n in held):
        return None
    taker = next((o for o in ops[anchor.index + 1:] if anchor.index in o.inputs and o.site is not None), None)
    site = (taker or anchor).site
    if site is None:
        return None
    out = next((s for s in found if s.name == "out"), found[-1])
    words = given[held[0]]
    says = (f"{words.phrase} {'stand' if words.plural else 'stands'} where {out.phrase} belong"
            f"{'' if out.plural else 's'}", out.says(False))
    return Pin(kernel, module, (site,), held[0], out.name, says)


def _infinite_maker(ops: list[Op], suspects: set[int]) -> set[int]:
    """Where a suspect makes a NaN of inputs without one, and an input of it holds an
    infinity that a suspect made of inputs without one (a softmax of a row that a mask
    filled with -inf everywhere): that suspect, as a set (empty where there is none). The
    NaN is the softmax's; the line that put the infinities is the mistake."""
    def has(i, test):
        v = ops[i].value
        return v is not None and bool(test(v).any())
    nan = _first_nan(ops, suspects)
    if not nan:
        return set()
    back, todo = set(), [i for n in nan for i in ops[n].inputs]
    while todo:
        i = todo.pop()
        if i in back or i not in suspects:
            continue
        back.add(i)
        todo.extend(ops[i].inputs)
    for i in sorted(back):
        if has(i, np.isinf) and not any(has(j, np.isinf) or has(j, np.isnan) for j in ops[i].inputs):
            return {i}
    return set()


def _last_reproduced(found: list[Stage], good: dict, frontier: set, stage: Stage) -> Stage | None:
    """The latest intermediate before ``stage`` that the suspects' inputs reproduce."""
    names = [s.name for s in found]
    at = names.index(stage.name)
    best = max((names.index(n) for i in frontier for n in good[i] if names.index(n) < at), default=None)
    return None if best is None else found[best]


def _ancestors(ops: list[Op], start: int, good: dict) -> tuple[set[int], set[int]]:
    """The ops ``start`` was computed from, itself included, back to (not through) the
    ones that reproduce an intermediate (``good``), and those (the frontier)."""
    seen, frontier, todo = set(), set(), [start]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        for p in ops[i].inputs:
            if p in good:
                frontier.add(p)
            elif p not in seen:
                todo.append(p)
    return {i for i in seen if ops[i].name != "input"}, frontier
