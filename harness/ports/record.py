"""Seeing inside a torch port: its forward recorded op by op, and a failure pinned to the
line of the port's source that made it.

The checks see a torch model only at the module boundaries the families name
(:mod:`.capture`), so a module whose output fails with no known cause leaves its user to
bisect the module's forward by hand. Here, only once a check has failed (a passing step
records nothing, so its cost does not change), the model's forward is run again, under
``torch.no_grad()``, with the failing module's call recorded at the level of torch's
dispatched operations (:class:`Recorder`, a ``TorchDispatchMode``): each op's aten
overload, its output's shape and dtype, the module it ran under and the innermost stack
frame in the user's own files (not torch, the harness, the references or
site-packages), as ``path:line`` and the line's text. The module thus runs on exactly the
inputs it had.

The op's reference (:func:`stages`) is the reference's float64 computation of the graph's
op on the port's own inputs for it, step by named step (:mod:`pyref.intermediates`:
attention's scores and softmax, a layer norm's mean, centred input, variance and rstd,
GELU's inner term and tanh, the loss's shift and log-sum-exp, a matmul's product before its
bias), ending in the op's outputs. Each recorded output
is matched to them up to a layout (:data:`LAYOUTS`: a view, a transpose, heads split or
merged) within a float32-sized bound. The op that produced the port's failing tensor is
found among the recorded ones; its ancestors back to the tensors that match (the last
intermediate reproduced) are the suspects, narrowed to those of the first intermediate the
port computes and does not reproduce; their lines are the :class:`Pin`.

``torch.utils._debug_mode.DebugMode`` records the same dispatched ops, but renders every
op's arguments to text and keeps stack traces as formatted strings; the pin needs the
output tensors, which op produced each input, and one frame: a small mode of its own.
"""
from __future__ import annotations

import functools
import linecache
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pyref.intermediates import INPUTS, STEPS, intermediates, step
from pyref.protocol import FORWARD_OUTPUTS

from ..graph import Node, Ref
from ..probe import span

# a recorded tensor reproduces an intermediate when its layout of the value is within this
# fraction of the intermediate's norm: float32 roundoff over a sum of C terms stays below
# it by orders of magnitude, a wrong op is off by far more
MATCH_BOUND = 2.0 ** -16
# the op that produced the port's own failing tensor reproduces it to the last bits
SAME_BOUND = 2.0 ** -20
# a wrong value of an intermediate is within its own size of it (a different quantity is not): the
# nearest suspect stands for the intermediate only within this
NEAR_BOUND = 1.0


# ----------------------------------------------------------------------------- where an op is

@dataclass(frozen=True)
class Site:
    """A line of the user's source: its file, its number and its text."""

    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{Path(self.file).name}:{self.line} ({self.text})"

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "text": self.text}


def _not_user_roots() -> tuple[str, ...]:
    """Folders whose files are not the user's: torch, the harness, the references, the
    standard library and installed packages."""
    import torch
    here = Path(__file__).resolve().parents[1]
    roots = {str(Path(torch.__file__).resolve().parent), str(here), str(here.parent / "pyref")}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(str(Path(p).resolve()))
    return tuple(r + os.sep for r in roots)


@functools.lru_cache(maxsize=None)
def is_user_file(filename: str) -> bool:
    """Whether ``filename`` is one of the user's own files."""
    if not filename or filename.startswith("<"):
        return False
    path = str(Path(filename).resolve())
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not path.startswith(_not_user_roots())


def user_site(frame=None) -> Site | None:
    """The innermost frame of the running stack that lies in the user's files."""
    f = frame if frame is not None else sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if is_user_file(name):
            return _site(f)
        f = f.f_back
    return None


def _site(f) -> Site:
    name = f.f_code.co_filename
    return Site(name, f.f_lineno, linecache.getline(name, f.f_lineno).strip())


@dataclass(frozen=True)
class Frame:
    """A user frame of an op's stack: its line and the object its code runs on (``owner``:
    ``id`` of its ``self``, 0 where it has none): which module's method the line is in."""

    site: Site
    owner: int
    code: int = 0           # id of the frame's code: which function the line is in


def user_stack(frame=None, stop=None) -> tuple[Frame, ...]:
    """Every frame of the running stack in the user's files, innermost first, up to (not
    through) the frame ``stop`` (the recording's own: whoever called the harness is not the
    port)."""
    f = frame if frame is not None else sys._getframe(1)
    out = []
    while f is not None and f is not stop:
        if is_user_file(f.f_code.co_filename):
            owner = f.f_locals.get("self") if "self" in f.f_code.co_varnames else None
            out.append(Frame(_site(f), 0 if owner is None else id(owner), id(f.f_code)))
        f = f.f_back
    return tuple(out)


def owned_site(stack, owner, outermost: bool = False) -> Site | None:
    """The line of ``stack`` (:func:`user_stack`) in a method of ``owner`` (a module): the
    innermost such frame, or the outermost (its ``forward`` where it calls its helpers)."""
    found = [f.site for f in stack if f.owner == id(owner)]
    return (found[-1] if outermost else found[0]) if found else None


# ----------------------------------------------------------------------------- recording

@dataclass
class Op:
    """One dispatched operation's output (an op with several outputs is one per output):
    the aten overload, which op produced each tensor input (``inputs``: indices into the
    recording), the module it ran under, its user site, and the output (a copy, when the
    recording keeps it: float64, NumPy). ``name == "input"``: a tensor made before the recording (a
    module's input, a parameter)."""

    index: int
    name: str
    shape: tuple
    dtype: str
    inputs: tuple[int, ...] = ()
    module: str = ""
    site: Site | None = None
    value: object = None
    stack: tuple = ()       # every user frame (:class:`Frame`), innermost first


@dataclass
class ModuleCall:
    """A module's call during a recording: its name, how many ops were recorded before it,
    the user frames calling it (:class:`Frame`, innermost first) and the op that produced
    its first tensor output (None until it returns) and those of all its outputs."""

    module: str
    at: int
    stack: tuple
    output: int | None = None
    outputs: tuple[int, ...] = ()


def _recorder_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary
    import torch

    class Recorder(TorchDispatchMode):
        """Records every op dispatched while ``active``: see :class:`Op`. ``keep(t)``
        says whether to keep a copy of an output."""

        def __init__(self, keep: Callable | None = None):
            super().__init__()
            self.ops: list[Op] = []
            self.calls: list[ModuleCall] = []
            self.modules: list[str] = []
            self.active = True
            self.stop = None        # the frame the user stacks stop at (user_stack)
            self.keep = keep or (lambda t: True)
            self._producer = WeakIdKeyDictionary()

        def _op(self, name, t, inputs=(), stack=()) -> int:
            value = (t.detach().to(torch.float64, copy=True).numpy()
                     if t.dtype.is_floating_point and self.keep(t) else None)
            op = Op(len(self.ops), name, tuple(t.shape), str(t.dtype).replace("torch.", ""), inputs,
                    self.modules[-1] if self.modules else "", stack[0].site if stack else None, value, stack)
            self.ops.append(op)
            self._producer[t] = op.index
            return op.index

        def _source(self, t) -> int:
            i = self._producer.get(t)
            return self._op("input", t) if i is None else i

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not self.active:
                return func(*args, **kwargs)
            inputs = tuple(self._source(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            out = func(*args, **kwargs)
            stack = user_stack(stop=self.stop)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._op(str(func), t, inputs, stack)
            return out

        def produced(self, t) -> int | None:
            """The index of the op that produced tensor ``t``, or None."""
            return self._producer.get(t)

    return Recorder


def _producer(rec, t) -> int | None:
    try:
        return rec.produced(t)
    except TypeError:       # not a tensor (a weak reference cannot be taken)
        return None


class _Done(Exception):
    """The recorded module's call has returned: the rest of the forward is not needed."""


def record(model, call: Callable, module: str | None = None, keep: Callable | None = None) -> list[Op]:
    """The ops of ``call()`` (a forward of ``model``), under ``torch.no_grad()``: all of
    them, or (``module``: a submodule's name) those of that module's first call only, the
    forward stopped once it returns. Each op is attributed to the innermost module running
    (forward hooks on ``model``'s modules, removed after)."""
    return recording(model, call, module, keep).ops


def recording(model, call: Callable, module: str | None = None, keep: Callable | None = None,
              params: bool = False):
    """:func:`record`'s recorder itself: its ``ops`` and the modules' ``calls``
    (:class:`ModuleCall`, each with the user lines calling it); ``params``: the model's
    parameters first, each an op named ``param`` (``param_ids``: its index -> ``id`` of
    the parameter), so that what reads a parameter is known."""
    import torch
    rec = _recorder_class()(keep)
    rec.stop = sys._getframe()
    rec.param_ids = {}
    if params:
        for p in model.parameters():
            rec.param_ids[rec._op("param", p)] = id(p)
    rec.active = module is None
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(_enter(rec, name, name == module)))
        handles.append(m.register_forward_hook(_leave(rec, name, name == module), always_call=True))
    try:
        with torch.no_grad(), rec:
            call()
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return rec


def _enter(rec, name: str, target: bool):
    def pre(mod, args):
        rec.modules.append(name)
        if target and not rec.ops:
            rec.active = True
        if rec.active:
            rec.calls.append(ModuleCall(name, len(rec.ops), user_stack(stop=rec.stop)))
    return pre


def _leave(rec, name: str, target: bool):
    def post(mod, args, out):
        from torch.utils._pytree import tree_leaves
        call = next((c for c in reversed(rec.calls) if c.module == name and c.output is None), None)
        if call is not None:
            call.outputs = tuple(i for t in tree_leaves(out) if (i := _producer(rec, t)) is not None)
            call.output = call.outputs[0] if call.outputs else None
        if rec.modules and rec.modules[-1] == name:
            rec.modules.pop()
        if target and rec.active:
            rec.active = False
            raise _Done
    return post


# ----------------------------------------------------------------------------- the reference's intermediates

@dataclass
class Stage:
    """A value the graph's op computes on the way to (or as) its output, in float64 on the
    port's own inputs: ``name``, the words for it (``phrase``, ``plural``), its value and,
    where only part of it is defined (the causal triangle), the mask of that part."""

    name: str
    phrase: str
    value: np.ndarray
    where: np.ndarray | None = None
    plural: bool = False
    # one value per head, heads first (a port looping over heads makes each head's slice
    # on its own: :attr:`pyref.intermediates.Step.heads_of`), with its mask; None: no heads
    heads: np.ndarray | None = None
    heads_where: np.ndarray | None = None
    of: tuple[str, ...] = ()        # the stages it is computed from, in order (Step.of)

    def head(self, h: int) -> "Stage":
        """Head ``h``'s slice of the stage, as a stage of its own."""
        where = None if self.heads_where is None else self.heads_where[h]
        return Stage(self.name, self.phrase, self.heads[h], where, self.plural, of=self.of)

    def says(self, matches: bool) -> str:
        if matches:
            return f"{self.phrase} {'match' if self.plural else 'matches'}"
        return f"{self.phrase} {'do' if self.plural else 'does'} not"


def _stage(kernel: str, name: str, value, where=None) -> Stage:
    """A value of the op as a stage, with its words (:data:`pyref.intermediates.INPUTS`,
    :data:`pyref.intermediates.STEPS`; the name itself where it has none)."""
    words = INPUTS.get((kernel, name))
    if words is None and kernel in STEPS:
        words = next(((s.what, s.plural) for s in STEPS[kernel] if s.name == name), None)
    phrase, plural = words or (name, False)
    return Stage(name, phrase, np.asarray(value, np.float64), where, plural)


def stages(kernel: str, args: dict) -> list[Stage]:
    """The op's values in the order it computes them: its tensor inputs, then the steps of
    the reference's computation on them (:func:`pyref.intermediates.intermediates`, ending in
    the op's outputs). A step that is a later one's values in another layout (attention's
    weighted values per head, merged into its output) is left to that one: the matcher
    matches up to layouts, so the two are one value to it. A step defined on the causal
    triangle only (preatt) is matched there."""
    inputs = [_stage(kernel, k, v) for k, v in args.items()
              if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim >= 2]
    found = []
    values = intermediates(kernel, args)
    for name, value in values.items():
        s = step(kernel, name)
        if s.layout_of is not None:
            continue
        where = None
        if s.causal:
            T = value.shape[-1]
            where = np.broadcast_to(np.tril(np.ones((T, T), bool)), value.shape)
        stage = replace(_stage(kernel, name, value, where), of=s.of)
        if s.heads_of is not None:
            per = values[s.heads_of]
            mask = where if s.heads_of == name else None
            stage = replace(stage, heads=np.moveaxis(np.asarray(per, np.float64), 1, 0),
                            heads_where=None if mask is None else np.moveaxis(mask, 1, 0))
        found.append(stage)
    return inputs + found


# ----------------------------------------------------------------------------- matching up to a layout

def layouts(a: np.ndarray, shape: tuple) -> list[np.ndarray]:
    """``a``'s values laid out in ``shape`` as a port may hold them: a view (reshape:
    flattened or unflattened axes, keepdim's size-1 axes), a transpose of two of its axes
    then a view (heads merged: (B, NH, T, hs) -> (B, T, C)), a view then a transpose of
    two axes (heads split: (B, T, C) -> (B, NH, T, hs)). A tensor of the shape itself (up
    to size-1 axes) is taken as it is: a softmax transposed is not the softmax."""
    if a.size != int(np.prod(shape)):
        return []
    out = [a.reshape(shape)]
    if _squeezed(a.shape) == _squeezed(shape):
        return out
    for i in range(a.ndim):
        for j in range(i + 1, a.ndim):
            out.append(np.swapaxes(a, i, j).reshape(shape))
    for i in range(len(shape)):
        for j in range(i + 1, len(shape)):
            swapped = list(shape)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            out.append(np.swapaxes(a.reshape(swapped), i, j))
    return out


def _squeezed(shape) -> tuple:
    return tuple(n for n in shape if n != 1)


def distance(a: np.ndarray, stage: Stage, layout=layouts) -> float:
    """The least norm-relative difference between ``a`` in any of its ``layout``s and the
    stage's value (on its mask); inf where no layout fits. A tensor of one head's size is
    matched to each head's slice (:attr:`Stage.heads`): the nearest."""
    if stage.heads is not None and a.size != stage.value.size and a.size == stage.heads[0].size:
        return min(distance(a, stage.head(h), layout) for h in range(len(stage.heads)))
    best = np.inf
    ref = stage.value if stage.where is None else stage.value[stage.where]
    norm = float(np.linalg.norm(ref[np.isfinite(ref)])) or 1.0
    for x in layout(a, stage.value.shape):
        x = x if stage.where is None else x[stage.where]
        with np.errstate(all="ignore"):
            same = (x == ref) | (np.isnan(x) & np.isnan(ref))      # -inf where -inf, NaN where NaN: equal
            d = float(np.linalg.norm(np.where(same, 0.0, x - ref))) / norm
        if d < best:        # NaN never is
            best = d
    return best


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
            return attribute_origin(pin, rec.ops, model, node.kernel, args)
    return None


def forward_recording(state, module: str | None = None, keep: Callable | None = None, params: bool = False):
    """The recorder (:func:`recording`) of the port's forward on its step's batch: of
    ``module``'s first call, or of the whole forward; None where the forward raised."""
    import torch
    idx = torch.from_numpy(np.asarray(state.inputs, np.int64))
    tgt = torch.from_numpy(np.asarray(state.targets, np.int64))
    with span("record", module=module):
        try:
            return recording(state.model, lambda: state._call(idx, tgt), module, keep=keep, params=params)
        except Exception:
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


def attribute_origin(pin: Pin, ops: list[Op], model, kernel: str, args: dict) -> Pin:
    """``pin`` with, before its lines, the line that set a module's float attribute read on
    its first line (``self.eps``) where the value is none of the op's constants
    (:func:`_constants`): a wrong constant lives where it is set (a constructor's default,
    ``eps=1e-12``), not where the forward reads it. A documented heuristic: the attribute
    is found by the line's source (``ast``), its origin by :func:`.pins.attribute_site`."""
    from .pins import attribute_site, float_attributes
    constants = _constants(kernel, args)
    if not constants:
        return pin
    owners = {id(m): m for m in model.modules()}
    first = pin.lines[0]
    op = next((o for o in ops if o.site == first and o.stack), None)
    owner = owners.get(op.stack[0].owner) if op is not None else None
    if owner is None:
        return pin
    for name, value in float_attributes(owner, first.text):
        if not any(math.isclose(value, c, rel_tol=1e-6) for c in constants):
            site = attribute_site(type(owner), name, value)
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
    if anchor is None or anchor.index in good:
        return None     # the failing tensor is not among the ops, or it is the reference's
    suspects, frontier = _ancestors(ops, anchor.index, good)
    unmatched = _first_unmatched(ops, found, good, suspects, frontier, layout)
    if unmatched is not None:
        stage, op = unmatched
        misplaced = _misplaced(ops, found, good, op, stage) or _operands_misplaced(ops, found, good, suspects, stage)
        if misplaced is not None:
            return Pin(kernel, module, *misplaced)
        narrowed, frontier = _ancestors(ops, op, good)
        suspects = (suspects & narrowed) | _unverified(ops, found, good, frontier, op, stage)
    else:
        stage = next((s for s in found if s.name == "out"), found[-1])
        suspects = _first_nan(ops, suspects) or suspects
    sites = tuple(dict.fromkeys(ops[i].site for i in sorted(suspects) if ops[i].site is not None))
    if not sites:
        return None
    before = _last_reproduced(found, good, frontier, stage)
    says = ((before.says(True),) if before is not None else ()) + (stage.says(False),)
    return Pin(kernel, module, sites, before.name if before is not None else None, stage.name, says)


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
    return own if any(first.index < i < own.index and i in good for i in between) else first


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
    rest), where the first unmatched op (``op``) has mass in that part and the reference's
    ``stage`` has none there (the future seen: a mask built wrong on its own line)."""
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
            if seen.any() and not np.any(stage.value[outside]):
                for i in ops[f].inputs:
                    if i not in good and ops[i].value is None:
                        out |= _ancestors(ops, i, good)[0]
    return out


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
