"""Which slot of the C's ``ParameterTensors`` each parameter of a torch model holds.

:func:`map_parameters` matches every parameter of a model to one C tensor, or to a row
slice of one (separate q, k, v projections hold the rows 0:C, C:2C, 2C:3C of the C's
``qkvw``/``qkvb``): by name (the C's own names; the common conventions of
:mod:`.families`: ``c_attn``, ``q_proj``, ``query``, ``wq``, ``fc1``, ``w1``, ``norm1``,
``embed_tokens``, ``final_norm``, ``lm_head``, blocks under ``h.{i}``, ``layers.{i}``,
any ``name.{i}``, a key ending in a number: ``stage0``), then, for what no name says, by
its use in a small recorded forward (:mod:`.usage`: the op and operand that consume it, in
the forward's order), then by shape within its block (a (3C, C) weight is the qkv, a bias
follows its module's weight), and an explicit mapping
(``{model parameter name: "qkvw[3]"}``, ``"qkvw[0][C:2C]"`` for k's rows, a ``.T`` suffix
for a transposed layout, or a callable ``(name, shape) -> such a string``, None for "as
recognised"), which ADDS to the recognition: the names it maps override, the rest are
still recognised. A model whose parameters do not cover the C's exactly once, whose head
is not tied to ``wte``, or one of whose parameters stays ambiguous is refused with every
reason, each naming what to map.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pyref.config import LAYER_PARAMS, PARAM_NAMES, GPT2Config, param_shapes

from ..errors import ModelError
from .families import (C_NAMED, KINDS, PIECES, block_key, block_of, in_out_layout, leaf_and_stem, name_parts,
                       named_role, split_name, transposed_module)
from .usage import Usage, record_usage


@dataclass(frozen=True)
class Slot:
    """One C tensor (``layer`` for the stacked (L, ...) ones; ``rows``, a slice of its
    first axis: q's, k's or v's piece of the qkv), in the model's layout."""

    name: str
    layer: int | None = None
    transpose: bool = False
    rows: tuple[int, int] | None = None

    def __str__(self):
        return (self.name + ("" if self.layer is None else f"[{self.layer}]")
                + ("" if self.rows is None else f"[{self.rows[0]}:{self.rows[1]}]") + (".T" if self.transpose else ""))

    def view(self, views: dict) -> np.ndarray:
        a = views[self.name]
        a = a if self.layer is None else a[self.layer]
        return a if self.rows is None else a[self.rows[0]:self.rows[1]]

_SLOT_TEXT = re.compile(r"^(\w+)(?:\[(\d+)\])?(?:\[([^\]:]*):([^\]:]*)\])?(\.T)?$")
_BOUND = re.compile(r"^(\d*)\s*\*?\s*C$")


def _bound(text: str, default: int, cfg: GPT2Config | None, whole: str) -> int:
    """A slice bound: a number, ``C``, ``2C`` (or ``2*C``), empty for the axis's end."""
    text = text.strip()
    if not text:
        return default
    if text.isdigit():
        return int(text)
    m = _BOUND.match(text)
    if m and cfg is not None:
        return int(m.group(1) or 1) * cfg.channels
    raise ModelError(f"mapping target {whole!r}: the slice bound {text!r} is not a number, C or 2C")


def parse_slot(text: str, cfg: GPT2Config | None = None) -> Slot:
    """A mapping target: ``qkvw[3]``, ``wte``, ``fcw[0].T``, ``qkvw[0][C:2C]`` (rows of
    a layer's tensor; with ``cfg``, ``C`` is its channels)."""
    m = _SLOT_TEXT.match(text.strip()) if isinstance(text, str) else None
    if not m or m.group(1) not in PARAM_NAMES:
        raise ModelError(f"mapping target {text!r} is not a C parameter like 'qkvw[3]', 'wte', 'fcw[0].T' or "
                         f"'qkvw[0][0:C]' (names: {', '.join(PARAM_NAMES)})")
    name, layer = m.group(1), m.group(2)
    if (name in LAYER_PARAMS) != (layer is not None) and layer is not None:
        raise ModelError(f"mapping target {text!r}: {name} has no layer axis")
    rows = None
    if m.group(3) is not None:
        full = param_shapes(cfg)[name][1 if name in LAYER_PARAMS else 0] if cfg is not None else 0
        rows = (_bound(m.group(3), 0, cfg, text), _bound(m.group(4), full, cfg, text))
        if not 0 <= rows[0] < rows[1] or (cfg is not None and rows[1] > full):
            raise ModelError(f"mapping target {text!r}: rows {rows[0]}:{rows[1]} are not a slice of {name}'s "
                             f"{full if cfg is not None else ''} rows")
    return Slot(name, None if layer is None else int(layer), bool(m.group(5)), rows)


def _c_shape(cfg: GPT2Config, slot: Slot) -> tuple[int, ...]:
    shape = param_shapes(cfg)[slot.name]
    shape = shape[1:] if slot.layer is not None else shape
    return shape if slot.rows is None else (slot.rows[1] - slot.rows[0],) + shape[1:]


def _role_slot(cfg: GPT2Config, layer: int | None, role: str, kind: str) -> Slot | None:
    """The C tensor a role (:func:`.families.named_role`) holds: q, k, v a third of qkv's rows."""
    if role == "head":
        return Slot("wte") if kind == "w" else None
    if role in ("wte", "wpe"):
        return Slot(role) if kind == "w" else None
    if role in PIECES:
        C = cfg.channels
        i = PIECES.index(role)
        return Slot("qkv" + kind, layer, rows=(i * C, (i + 1) * C))
    if layer is not None and layer >= cfg.num_layers:
        return None
    return Slot(role + kind, layer)


def _oriented(model, name: str, shape: tuple, cfg: GPT2Config, slot: Slot) -> Slot:
    """``slot`` as the model holds it: transposed for Conv1D, a name saying (in, out) (Flax's
    ``kernel``), or a weight whose shape is the C's reversed."""
    if len(shape) != 2 or slot.name in ("wte", "wpe"):
        return slot
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    want = _c_shape(cfg, slot)
    if transposed_module(owner) or in_out_layout(name) or (shape != want and shape == want[::-1]):
        return Slot(slot.name, slot.layer, True, slot.rows)
    return slot


def _guess_slot(model, name: str, shape: tuple[int, ...], cfg: GPT2Config) -> Slot | None:
    """The C tensor a parameter holds, by its name (and, for the weights, its module type
    and shape: Conv1D and a transposed shape mean the (in, out) layout)."""
    m = C_NAMED.search(name)
    if m:   # the walkthrough: C names, stacked shapes
        return Slot(m.group(1))
    said = named_role(name)
    if said is None:
        return None
    slot = _role_slot(cfg, *said)
    return None if slot is None else _oriented(model, name, shape, cfg, slot)


@dataclass
class Entry:
    """One model parameter (all the names it goes by) and the C tensor it holds."""

    names: tuple[str, ...]
    param: object        # torch.nn.Parameter
    slot: Slot
    rows: int | None     # wte: the model's vocabulary rows (V or Vp)


def map_parameters(model, cfg: GPT2Config, mapping=None, uses=None) -> list[Entry]:
    """Every parameter of ``model`` matched to one C tensor (or rows of one), every C
    tensor covered once, the head tied to ``wte``: else a :class:`ModelError` that lists
    what is wrong, each ambiguous or unknown parameter with the map that would settle it.
    ``uses``: where names leave a parameter unplaced, how the forward uses it
    (:mod:`.usage`): None to record it then, a :class:`.usage.Usage` (or a callable giving
    one), or False for names and shapes alone."""
    groups = _parameter_groups(model)
    if not groups:
        raise ModelError(f"{type(model).__name__} has no parameters")
    problems: list[str] = []
    slots: dict[int, Slot] = {}
    bad: set[int] = set()
    for i, (names, p) in enumerate(groups):
        shape = tuple(p.shape)
        mapped = {s for n in names if (s := _mapped_slot(n, shape, cfg, mapping)) is not None}
        found = mapped or {s for n in names if (s := _guess_slot(model, n, shape, cfg)) is not None}
        if len(found) > 1:
            problems.append(f"{' = '.join(names)} is one tensor holding {', '.join(map(str, found))}")
            bad.add(i)
        elif found:
            slots[i] = found.pop()
    note = None
    if uses is not False and any(i not in slots and i not in bad for i in range(len(groups))):
        usage = uses if isinstance(uses, Usage) else (uses() if callable(uses) else record_usage(model, cfg))
        _by_use(cfg, groups, slots, usage)
        note = usage.error
    _by_shape(cfg, groups, slots, bad, problems)
    entries = _entries(cfg, groups, slots, problems)
    if problems:
        raise ModelError(f"cannot map {type(model).__name__}'s parameters onto the C's: " + "; ".join(problems)
                         + (f" (its forward, run to see how it uses them, raised {note})" if note else ""))
    return entries


def _fits(cfg: GPT2Config, slot: Slot, shape: tuple, taken: set) -> bool:
    """Whether a parameter of ``shape`` can hold ``slot`` (in its layout), none holding it yet."""
    if any(k[:2] == (slot.name, slot.layer) and _overlap(k[2], slot.rows) for k in taken):
        return False
    want = _c_shape(cfg, slot)
    want = want[::-1] if slot.transpose else want
    return shape == want or (slot.name == "wte" and shape[1:] == want[1:]
                             and shape[0] in (cfg.vocab_size, cfg.padded_vocab_size))


def _by_use(cfg: GPT2Config, groups, slots: dict, usage) -> None:
    """The parameters no name placed, by their use in the forward (:meth:`.usage.Usage.proposals`):
    a weight, a norm's weight, a table where its use says; then each bias as the one added to
    its weight's (or norm's) output. A C tensor a name placed is not taken again."""
    proposed, biases = usage.proposals(cfg)
    index = {id(p): i for i, (_, p) in enumerate(groups)}
    todo = [i for i in range(len(groups)) if i not in slots]
    taken = {_key(s) for s in slots.values()}
    for i in todo:
        s = proposed.get(id(groups[i][1]))
        if s is not None and _fits(cfg, s, tuple(groups[i][1].shape), taken):
            slots[i] = s
            taken.add(_key(s))
    for i in todo:
        w = index.get(biases.get(id(groups[i][1])))
        s = slots.get(w) if w is not None else None
        if i in slots or s is None or s.name in ("wte", "wpe"):
            continue
        b = Slot(s.name[:-1] + "b", s.layer, rows=s.rows)
        if _fits(cfg, b, tuple(groups[i][1].shape), taken):
            slots[i] = b
            taken.add(_key(b))


def _parameter_groups(model) -> list[tuple[tuple[str, ...], object]]:
    """(every name a parameter goes by, the parameter), in the model's order."""
    by_param: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p
    return [(tuple(names), params[pid]) for pid, names in by_param.items()]


def _mapped_slot(name, shape, cfg, mapping) -> Slot | None:
    """What an explicit mapping says of one name (None: not mapped, so recognised)."""
    if mapping is None:
        return None
    target = mapping(name, shape) if callable(mapping) else mapping.get(name)
    if target is None:
        return None
    return target if isinstance(target, Slot) else parse_slot(target, cfg)


def _key(slot: Slot) -> tuple:
    return slot.name, slot.layer, slot.rows


def _shape_candidates(cfg: GPT2Config, name: str, shape: tuple, taken: set) -> list[Slot]:
    """The C tensors not yet held that a parameter of this shape could hold, in its block
    (the first integer of its name) or outside the blocks; a weight only a weight, a bias
    only a bias; a raw parameter of a block (its own name no weight's or bias's: a fused
    attention's ``w_qkv``) either, so that a shape one C tensor of the block alone has
    (the (3C, C) qkv weight) places it."""
    parsed = split_name(name)
    if parsed is None:
        return _raw_candidates(cfg, name, shape, taken)
    layer, _, _, leaf = parsed
    kind = "b" if leaf.endswith(("bias", "beta", "shift")) else "w"
    if layer is not None:
        if layer >= cfg.num_layers:
            return []
        names = [c for c in PARAM_NAMES if c in LAYER_PARAMS and c.endswith(kind)]
        slots = [Slot(c, layer) for c in names]
    else:
        slots = [Slot(c) for c in PARAM_NAMES if c not in LAYER_PARAMS and (c.endswith(kind) or c in ("wte", "wpe"))]
    out = []
    for s in slots:
        want = _c_shape(cfg, s)
        fits = shape == want or (s.name == "wte" and shape == (cfg.vocab_size,) + want[1:])
        if fits and not any(k[:2] == (s.name, s.layer) for k in taken):
            out.append(s)
    return out


def _raw_candidates(cfg: GPT2Config, name: str, shape: tuple, taken: set) -> list[Slot]:
    """:func:`_shape_candidates` of a raw parameter inside a block (``layers.0.attn.w_qkv``,
    or a key whose own name ends in its block's number: ``p.back_s0``): the block's C
    tensors, weights and biases, of its shape; none outside the blocks."""
    path = name_parts(name)
    at = block_of(path)
    layer = None if at is None else block_key(path[at])
    if layer is None or layer >= cfg.num_layers:
        return []
    slots = [Slot(c, layer) for c in PARAM_NAMES if c in LAYER_PARAMS]
    return [s for s in slots if shape == _c_shape(cfg, s) and not any(k[:2] == (s.name, s.layer) for k in taken)]


def _sibling_slot(name: str, slots_by_name: dict) -> Slot | None:
    """A bias's slot from its module's weight's (or a weight's from its bias's)."""
    stem, leaf = leaf_and_stem(name)
    kind = KINDS.get(leaf)
    if kind is None or not stem:
        return None
    others = [k for k, v in KINDS.items() if v != kind and not k.startswith("in_proj")]
    s = next((got for k in others if (got := slots_by_name.get(stem + k)) is not None), None)
    if s is None or s.name in ("wte", "wpe"):
        return None
    return Slot(s.name[:-1] + kind, s.layer, kind == "w" and in_out_layout(name), rows=s.rows)


def _by_shape(cfg: GPT2Config, groups, slots: dict, bad: set, problems: list) -> None:
    """The parameters no name placed: each by its module's other parameter, or by the one
    C tensor of its block that its shape fits and no other parameter could hold; the rest
    are problems naming the map that would place them."""
    todo = [i for i in range(len(groups)) if i not in slots and i not in bad]
    cands: dict[int, list[Slot]] = {}
    while todo:
        taken = {_key(s) for s in slots.values()}
        by_name = {n: slots[i] for i in slots for n in groups[i][0]}
        for i in todo:
            names, p = groups[i]
            sib = next((s for n in names if (s := _sibling_slot(n, by_name)) is not None), None)
            if sib is not None and _key(sib) not in taken and tuple(p.shape) == _c_shape(cfg, sib):
                cands[i] = [sib]
            else:
                cands[i] = _shape_candidates(cfg, names[0], tuple(p.shape), taken)
        claims: dict[tuple, int] = {}
        for c in cands.values():
            for s in c:
                claims[_key(s)] = claims.get(_key(s), 0) + 1
        placed = [i for i in todo if len(cands[i]) == 1 and claims[_key(cands[i][0])] == 1]
        for i in placed:
            slots[i] = cands[i][0]
        todo = [i for i in todo if i not in placed]
        if not placed:
            break
    for i in todo:
        names, p = groups[i]
        shape = tuple(p.shape)
        if not cands[i]:
            problems.append(f"extra parameter {names[0]} {shape}: no C tensor matches it by name or shape"
                            f" (map it, e.g. {{{names[0]!r}: '{_example(cfg, shape, slots)}'}}, or remove it)")
        else:
            could = " or ".join(map(str, cands[i][:4])) + (" ..." if len(cands[i]) > 4 else "")
            problems.append(f"the model's parameter {names[0]!r} {shape} matches no C tensor by name and by shape "
                            f"could be {could}: map it, e.g. {{{names[0]!r}: '{cands[i][0]}'}}")


def _example(cfg: GPT2Config, shape: tuple, slots: dict) -> Slot:
    """A C tensor no parameter holds yet that a parameter of ``shape`` could (a map's example)."""
    taken = {_key(s) for s in slots.values()}
    for n in PARAM_NAMES:
        for layer in (range(cfg.num_layers) if n in LAYER_PARAMS else [None]):
            s = Slot(n, layer)
            if _fits(cfg, s, shape, taken):
                return s
    return Slot("qkvw", 0)


def _entries(cfg: GPT2Config, groups, slots: dict, problems: list) -> list[Entry]:
    """The entries of the placed parameters, checked: shapes, each C tensor's rows held
    once (an untied head named), every C tensor covered."""
    entries, holder = [], {}
    for i, slot in slots.items():
        names, p = groups[i]
        shape = tuple(p.shape)
        key = (slot.name, slot.layer)
        clash = [e for e in holder.get(key, []) if _overlap(e.slot.rows, slot.rows)]
        if clash:
            if slot.name == "wte":
                problems.append(f"untied head: {clash[0].names[0]} and {names[0]} are separate tensors; "
                                "the C's head is wte itself (tie them: lm_head.weight = wte.weight)")
            else:
                problems.append(f"{clash[0].names[0]} and {names[0]} both hold {slot if slot.rows else clash[0].slot}")
            continue
        want = _c_shape(cfg, slot)
        want = want[::-1] if slot.transpose else want
        rows = None
        if slot.name == "wte" and shape[1:] == want[1:] and shape[0] in (cfg.vocab_size, cfg.padded_vocab_size):
            rows = shape[0]
        elif shape != want:
            problems.append(f"{names[0]} has shape {shape}, {slot} needs {want}"
                            + (f" (or {cfg.vocab_size} rows)" if slot.name == "wte" else ""))
            continue
        entry = Entry(tuple(names), p, slot, rows)
        holder.setdefault(key, []).append(entry)
        entries.append(entry)
    missing = _missing(cfg, holder, entries)
    if missing:
        problems.append(f"missing: no parameter holds {', '.join(missing)}")
    return entries


def _overlap(a: tuple | None, b: tuple | None) -> bool:
    return a is None or b is None or (a[0] < b[1] and b[0] < a[1])


def _missing(cfg: GPT2Config, holder: dict, entries: list[Entry]) -> list[str]:
    """The C tensors (or rows of one) no parameter holds."""
    stacked = {e.slot.name for e in entries if e.slot.layer is None and e.slot.name in LAYER_PARAMS}
    shapes = param_shapes(cfg)
    out = []
    for n in PARAM_NAMES:
        for l in (range(cfg.num_layers) if n in LAYER_PARAMS else [None]):
            if n in stacked:
                continue
            held = sorted(e.slot.rows or (0, 1 << 62) for e in holder.get((n, l), []))
            if not held:
                out.append(f"{n}[{l}]" if l is not None else n)
                continue
            full, at = shapes[n][1 if l is not None else 0], 0
            for lo, hi in held + [(full, full)]:
                if lo > at:
                    out.append(f"{n}[{l}][{at}:{lo}]")
                at = max(at, hi)
    return out
