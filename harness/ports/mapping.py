"""Which slot of the C's ``ParameterTensors`` each parameter of a torch model holds.

:func:`map_parameters` matches every parameter of a model to one C tensor, by the names of
the recognised families (:mod:`.families`) or an explicit mapping (``{model parameter name:
"qkvw[3]"}``, a ``.T`` suffix for a transposed layout, or a callable ``(name, shape) -> such
a string``), and refuses, with every reason, a model whose parameters do not cover the C's
exactly once or whose head is not tied to ``wte``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pyref.config import LAYER_PARAMS, PARAM_NAMES, GPT2Config, param_shapes

from ..errors import ModelError
from .families import C_NAMED, NAMED, transposed_module


@dataclass(frozen=True)
class Slot:
    """One C tensor (``layer`` for the stacked (L, ...) ones), in the model's layout."""

    name: str
    layer: int | None = None
    transpose: bool = False

    def __str__(self):
        return self.name + ("" if self.layer is None else f"[{self.layer}]") + (".T" if self.transpose else "")

    def view(self, views: dict) -> np.ndarray:
        a = views[self.name]
        return a if self.layer is None else a[self.layer]

_SLOT_TEXT = re.compile(r"^(\w+)(?:\[(\d+)\])?(\.T)?$")


def parse_slot(text: str) -> Slot:
    m = _SLOT_TEXT.match(text.strip()) if isinstance(text, str) else None
    if not m or m.group(1) not in PARAM_NAMES:
        raise ModelError(f"mapping target {text!r} is not a C parameter like 'qkvw[3]', 'wte' or 'fcw[0].T' "
                         f"(names: {', '.join(PARAM_NAMES)})")
    name, layer = m.group(1), m.group(2)
    if (name in LAYER_PARAMS) != (layer is not None) and layer is not None:
        raise ModelError(f"mapping target {text!r}: {name} has no layer axis")
    return Slot(name, None if layer is None else int(layer), bool(m.group(3)))


def _c_shape(cfg: GPT2Config, slot: Slot) -> tuple[int, ...]:
    shape = param_shapes(cfg)[slot.name]
    return shape[1:] if slot.layer is not None else shape


def _guess_slot(model, name: str, shape: tuple[int, ...], cfg: GPT2Config) -> Slot | None:
    """The C tensor a parameter holds, by its name (and, for the weights, its module type
    and shape: Conv1D and a transposed shape mean the (in, out) layout)."""
    m = C_NAMED.search(name)
    if m:   # the walkthrough: C names, stacked shapes
        return Slot(m.group(1))
    for pattern, cname in NAMED:
        m = pattern.search(name)
        if not m:
            continue
        layer = int(m.group(1)) if m.groups() else None
        slot = Slot(cname, layer)
        if len(shape) == 2 and cname not in ("wte", "wpe"):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            want = _c_shape(cfg, slot)
            if transposed_module(owner) or (shape != want and shape == want[::-1]):
                slot = Slot(cname, layer, transpose=True)
        return slot
    return None


@dataclass
class Entry:
    """One model parameter (all the names it goes by) and the C tensor it holds."""

    names: tuple[str, ...]
    param: object        # torch.nn.Parameter
    slot: Slot
    rows: int | None     # wte: the model's vocabulary rows (V or Vp)


def map_parameters(model, cfg: GPT2Config, mapping=None) -> list[Entry]:
    """Every parameter of ``model`` matched to one C tensor, every C tensor covered once,
    the head tied to ``wte``: else a :class:`ModelError` that lists what is wrong."""
    by_param: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p
    if not params:
        raise ModelError(f"{type(model).__name__} has no parameters")
    problems, entries, holder = [], [], {}
    for pid, names in by_param.items():
        p = params[pid]
        shape = tuple(p.shape)
        slots = {_slot_of(model, n, shape, cfg, mapping) for n in names}
        slots.discard(None)
        if not slots:
            problems.append(f"extra parameter {names[0]} {shape}: no C tensor matches it")
            continue
        if len(slots) > 1:
            problems.append(f"{' = '.join(names)} is one tensor holding {', '.join(map(str, slots))}")
            continue
        slot = slots.pop()
        key = (slot.name, slot.layer)
        if key in holder:
            other = holder[key]
            if slot.name == "wte":
                problems.append(f"untied head: {other.names[0]} and {names[0]} are separate tensors; "
                                "the C's head is wte itself (tie them: lm_head.weight = wte.weight)")
            else:
                problems.append(f"{other.names[0]} and {names[0]} both hold {slot}")
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
        holder[key] = entry
        entries.append(entry)
    expected = [(n, l) for n in PARAM_NAMES for l in (range(cfg.num_layers) if n in LAYER_PARAMS else [None])]
    covered = set(holder)
    # a stacked (L, ...) parameter covers every layer of its C tensor
    covered |= {(e.slot.name, l) for e in entries if e.slot.layer is None and e.slot.name in LAYER_PARAMS
                for l in range(cfg.num_layers)}
    missing = [f"{n}[{l}]" if l is not None else n for n, l in expected if (n, l) not in covered]
    if missing:
        problems.append(f"missing: no parameter holds {', '.join(missing)}")
    if problems:
        raise ModelError(f"cannot map {type(model).__name__}'s parameters onto the C's: " + "; ".join(problems))
    return entries


def _slot_of(model, name, shape, cfg, mapping) -> Slot | None:
    if mapping is None:
        return _guess_slot(model, name, shape, cfg)
    target = mapping(name, shape) if callable(mapping) else mapping.get(name)
    if target is None:
        return None
    return target if isinstance(target, Slot) else parse_slot(target)
