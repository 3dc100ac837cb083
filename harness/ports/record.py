"""Seeing inside a torch port: its forward recorded op by op, and each recorded value
matched to the reference's intermediates (:mod:`.localise` reads the two to pin a failure
to the line of the port's source that made it).

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
is matched to them up to a layout (:func:`layouts`: a view, a transpose, heads split or
merged) within a float32-sized bound. The op that produced the port's failing tensor is
found among the recorded ones; its ancestors back to the tensors that match (the last
intermediate reproduced) are the suspects, narrowed to those of the first intermediate the
port computes and does not reproduce; their lines are the pin (:mod:`.localise`).

``torch.utils._debug_mode.DebugMode`` records the same dispatched ops, but renders every
op's arguments to text and keeps stack traces as formatted strings; the pin needs the
output tensors, which op produced each input, and one frame: a small mode of its own.
"""
from __future__ import annotations

import functools
import linecache
import os
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from pyref.intermediates import INPUTS, STEPS, intermediates, step

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


@dataclass(frozen=True)
class Returned:
    """A float a user function returned while the forward was recorded: the caller's line
    (``caller``), the line of the ``return`` that gave it (``site``), the value, and ``id``
    of the object the function ran on (its ``self``; 0 where none)."""

    caller: Site
    site: Site
    value: float
    owner: int = 0


def _returns_profile(rec, old):
    """A profile function noting in ``rec.returns`` each float (not an int, not a tensor) a
    function of the user's files returns to a line of the user's files while ``rec`` is
    active (a scale a method computes from its arguments); ``old`` (the profile function
    already set) still called."""
    def profile(frame, event, arg):
        if old is not None:
            old(frame, event, arg)
        if event != "return" or type(arg) is not float or not rec.active:
            return
        back = frame.f_back
        if back is None or not is_user_file(frame.f_code.co_filename) or not is_user_file(back.f_code.co_filename):
            return
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        rec.returns.append(Returned(_site(back), _site(frame), arg, 0 if owner is None else id(owner)))
    return profile


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
    the parameter), so that what reads a parameter is known; ``returns``: the floats the
    user's functions returned (:class:`Returned`)."""
    import torch
    rec = _recorder_class()(keep)
    rec.stop = sys._getframe()
    rec.param_ids = {}
    if params:
        for p in model.parameters():
            rec.param_ids[rec._op("param", p)] = id(p)
    rec.active = module is None
    rec.returns = []
    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(_enter(rec, name, name == module)))
        handles.append(m.register_forward_hook(_leave(rec, name, name == module), always_call=True))
    old = sys.getprofile()
    try:
        sys.setprofile(_returns_profile(rec, old))
        with torch.no_grad(), rec:
            call()
    except _Done:
        pass
    finally:
        sys.setprofile(old)
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
    given: bool = False              # one of the op's inputs (not computed by it)

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
    inputs = [replace(_stage(kernel, k, v), given=True) for k, v in args.items()
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
    to size-1 axes) is taken as it is: a softmax transposed is not the softmax; so are the
    axes that a tensor of leading axes merged or split shares with the shape (the last two
    at least: scores of (B*NH, T, T) for (B, NH, T, T)), only its leading axes moved: the
    scores of k and q, transposed, are not the scores."""
    if a.size != int(np.prod(shape)):
        return []
    out = [a.reshape(shape)]
    if _squeezed(a.shape) == _squeezed(shape):
        return out
    tail = _common_tail(a.shape, shape)
    lead_a, lead = (a.ndim - tail, len(shape) - tail) if tail >= 2 else (a.ndim, len(shape))
    for i in range(lead_a):
        for j in range(i + 1, lead_a):
            out.append(np.swapaxes(a, i, j).reshape(shape))
    for i in range(lead):
        for j in range(i + 1, lead):
            swapped = list(shape)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            out.append(np.swapaxes(a.reshape(swapped), i, j))
    return out


def _common_tail(a: tuple, b: tuple) -> int:
    """How many trailing axes the shapes ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


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

