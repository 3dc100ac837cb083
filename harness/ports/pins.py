"""The line of a torch port behind a failure that no forward op shows: a structural finding
(a module skipped, called twice, out of order), the loss, the backward (a detached
weight, a custom autograd Function's gradient) and the optimizer's settings; and where a
module's float attribute was set.

:mod:`.localise` pins a failing forward op to its line by recording the module's ops. The
failures here are of other kinds, each pinned by what it is about, and each only once a
check has failed (nothing here runs on a passing step):

* a structural finding (:mod:`.census`) names a module; the forward recorded with the user
  lines calling each module (:class:`.record.ModuleCall`) gives the line: the call of a
  module called out of order, twice, or not in GPT-2's graph; for a module never called,
  the line that calls a sibling of the same graph op in its stead (``to_k`` for ``to_v``),
  else the line of its parent's forward that calls the next module of the graph (``x = x
  + self.attention(x)``, its norm left out), else the line of its parent's forward that
  makes the parent's output (``logits = self.head(x)``, ``out_norm`` skipped);
* the loss (:func:`loss_pin`): the forward recorded from the logits to the loss the
  model returns, matched to the reference's log-softmax and cross-entropy steps
  (:func:`.localise.locate`): the lines after the last step the port reproduces;
* a parameter's gradient (:func:`backward_pin`): the line that detaches a parameter in
  the forward (``weight.detach()``, ``.data``), else the constructor call of the torch
  module holding it where an option changes its gradient (``padding_idx=0``:
  :func:`option_site`), else the user lines autograd runs in the backward (a custom
  ``autograd.Function``'s ``backward``);
* a parameter that receives no gradient (:func:`no_gradient_pin`): a detach, else the line
  that uses the other parameters of its op without it (never read), else the line that
  calls its module and drops what it returns (read, but never reaching the loss);
* the update (:func:`optimizer_pin`): the port's optimizer factory run again, the frame
  that constructs the optimizer caught (``sys.setprofile``), and of its call the
  keyword whose setting differs from the run's (``betas=(0.9, 0.95)``), or the call's last
  line where the keyword is left to torch's default (``weight_decay``).
"""
from __future__ import annotations

import ast
import inspect
import linecache
import math
import re
import sys
import textwrap
from dataclasses import replace

import numpy as np

from .master import stepped
from .localise import Pin, locate
from .record import Site, Stage, forward_recording, is_user_file, owned_site, stages


def _pin(kernel: str, site: Site | tuple, says: str, unmatched: str = "") -> Pin:
    lines = site if isinstance(site, tuple) else (site,)
    return Pin(kernel, "", lines, None, unmatched, (says,))


# ----------------------------------------------------------------------------- structure

def structure_pin(state, finding) -> Pin | None:
    """The line of the port's source that makes a structural ``finding`` (see the module's
    docstring), from the forward recorded with its modules' calls; None where none is."""
    model = getattr(state, "model", None)
    census = getattr(state, "census", None)
    if model is None or census is None or not finding.module:
        return None
    if finding.id == "structure.no-gradient":
        pin = no_gradient_pin(state, finding)
        return None if pin is None else replace(pin, kernel=finding.where or finding.module)
    rec = forward_recording(state, None, keep=lambda t: False)
    if rec is None:
        return None
    calls = [c for c in rec.calls if c.module == finding.module]
    if finding.id == "structure.never-called":
        site = _skipped(rec, census.graph, dict(model.named_modules()), finding.module)
    elif finding.id == "structure.called-more":
        site = calls[1].stack[0].site if len(calls) > 1 and calls[1].stack else None
    elif finding.id == "structure.out-of-order":
        other = finding.values.get("after") or finding.values.get("before")
        site = _order_site(calls, [c for c in rec.calls if c.module == other])
    elif finding.id == "structure.unknown-module":
        site = calls[0].stack[0].site if calls and calls[0].stack else None
    else:
        return None
    return None if site is None else _pin(finding.where or finding.module, site, finding.description)


def _order_site(calls: list, others: list) -> Site | None:
    """The line deciding a module's place against the one it runs out of order with: of
    its first call's frames, the innermost that both calls run through (the same method
    of the same module, from the outermost in), its line there (``return
    self.attend(self.feed(x))``); its innermost line where the other is not called."""
    if not calls or not calls[0].stack:
        return None
    mine = calls[0].stack
    if not others or not others[0].stack:
        return mine[0].site
    theirs = others[0].stack
    common = None
    for a, b in zip(reversed(mine), reversed(theirs)):
        if (a.owner, a.code) != (b.owner, b.code):
            break
        common = a
        if a.site != b.site:
            break       # the method calling both, on lines of its own: the order is its
    return (common or mine[0]).site


def _parent(name: str, modules: dict) -> str:
    """The module whose forward calls ``name``: its parent, past containers never called
    themselves (a ModuleList)."""
    import torch
    parent = name.rpartition(".")[0]
    while parent and type(modules[parent]).forward is torch.nn.Module.forward:
        parent = parent.rpartition(".")[0]
    return parent


def _skipped(rec, graph: dict, modules: dict, name: str) -> Site | None:
    """The line where a module never called should have been (:func:`structure_pin`)."""
    parent = _parent(name, modules)
    if parent and parent not in {c.module for c in rec.calls}:
        # its parent never called either (a whole block left out): where its siblings are
        return _left_out(rec, modules, parent)
    owner = modules[parent]
    rank, label = graph.get(name, ((), None))
    counts: dict[str, list] = {}
    for c in rec.calls:
        counts.setdefault(c.module, []).append(c)
    # a sibling of the same kind of graph op (a norm for a norm) called again in its stead
    kind = (label or "?").rsplit(" ", 1)[-1]
    for other, (_, op) in graph.items():
        if other != name and op.endswith(" " + kind) and _parent(other, modules) == parent \
                and len(counts.get(other, ())) > 1:
            stack = counts[other][1].stack
            return owned_site(stack, owner) or (stack[0].site if stack else None)
    # the next module of the graph, under the same parent: the parent's line calling it
    # (the innermost: of a helper method where the forward calls one)
    inside = [(r, other) for other, (r, _) in graph.items() if r > rank and other in counts
              and other.startswith(parent + "." if parent else "")]
    if inside:
        return owned_site(counts[min(inside)[1]][0].stack, owner)
    # else the parent's forward's line that makes its output (the outermost: its helpers
    # compute the output the forward returns without the module)
    call = next((c for c in rec.calls if c.module == parent), None)
    if call is None or call.output is None:
        return None
    return owned_site(rec.ops[call.output].stack, owner, outermost=True)


def _left_out(rec, modules: dict, name: str) -> Site | None:
    """The line behind a module never called whose whole parent ``name`` (a block of a
    ModuleList) was never called: climbed to the outermost such, the line calling its
    called siblings of the same container (``x = self.layers[i](x)``), and where that line
    is in a ``for`` loop of its function, the loop's header (``for i in range(depth -
    1):``: how many it calls is the mistake)."""
    called = {c.module for c in rec.calls}
    while True:
        up = _parent(name, modules)
        if not up or up in called:
            break
        name = up
    container = name.rpartition(".")[0]
    siblings = [c for c in rec.calls if c.module.rpartition(".")[0] == container and c.module != name and c.stack]
    if not siblings:
        return None
    owner = modules.get(_parent(name, modules))
    site = (owned_site(siblings[-1].stack, owner) if owner is not None else None) or siblings[-1].stack[0].site
    header = _loop_header(site)
    return header or site


def _loop_header(site: Site) -> Site | None:
    """The header line of the innermost ``for`` loop whose body holds ``site``'s line, in
    the function holding it; None where the line is in no loop."""
    try:
        tree = ast.parse("".join(linecache.getlines(site.file)))
    except SyntaxError:
        return None
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and n.body
             and n.body[0].lineno <= site.line <= n.body[-1].end_lineno]
    if not loops:
        return None
    return _line(site.file, max(loops, key=lambda n: n.lineno).lineno)


# ----------------------------------------------------------------------------- the loss

def loss_pin(state) -> Pin | None:
    """The line(s) of the port's loss that differ from the mean cross-entropy: the forward
    recorded whole, the loss the model returns (a scalar) traced back to the logits it
    returns, its ops matched to the reference's log-softmax and cross-entropy steps on those
    logits. None where the model returns no loss (the harness computes it: not the port's)."""
    model, targets = getattr(state, "model", None), getattr(state, "targets", None)
    if model is None or targets is None:
        return None
    B, T = np.shape(targets)
    V = state.config.vocab_size
    rec = forward_recording(state, None, keep=lambda t: t.dim() <= 3 and t.numel() % (B * T) in (0, 1)
                            and t.numel() <= B * T * state.config.padded_vocab_size)
    root = next((c for c in rec.calls if c.module == ""), None) if rec is not None else None
    if root is None:
        return None
    outs = [rec.ops[i] for i in root.outputs]
    loss = next((o for o in outs if o.shape == () and o.value is not None), None)
    logits = next((o for o in outs if len(o.shape) == 3 and o.value is not None), None)
    if loss is None or logits is None:
        return None
    found = as_returned(logits.value, V) + stages("softmax_forward", {"logits": logits.value[..., :V], "V": V})
    probs = next(s.value for s in found if s.name == "probs")
    ce = [s for s in stages("crossentropy_forward", {"probs": probs, "targets": np.asarray(targets, np.int64)})
          if s.name != "probs"]
    losses = next(s.value for s in ce if s.name == "losses")
    found += ce + [Stage("mean", "the mean loss", np.asarray(losses.mean()))]
    return locate(rec.ops, found, Stage("observed", "observed", loss.value), "crossentropy_forward", "")


def as_returned(logits: np.ndarray, V: int) -> list[Stage]:
    """The logits as the port returns them, where they hold more than V columns (the C's
    Vp): a given stage, so that what is made of them after is suspect, not the forward."""
    return [Stage("returned", "the logits it returns", logits, plural=True, given=True)] if logits.shape[-1] > V else []


# ----------------------------------------------------------------------------- the backward

def backward_pin(state, name: str) -> Pin | None:
    """The line where the port's forward breaks the graph (the C tensor ``name``'s
    parameter first): a detach (``.detach()``, ``.data``) whose result is used, of that
    parameter, of another, else of an activation (:func:`_detached`); else the constructor
    call of the torch module holding that parameter where an option of it changes its
    gradient (``nn.Embedding(..., padding_idx=0)``: :func:`option_site`); else the user
    lines that autograd runs in the backward (a custom Function's ``backward``, a hook):
    :func:`backward_lines`."""
    model = getattr(state, "model", None)
    entries = getattr(state, "entries", None)
    if model is None or entries is None:
        return None
    rec = forward_recording(state, None, keep=lambda t: False, params=True)
    if rec is None:
        return None
    wanted = {id(e.param) for e in entries if e.slot.name == name}
    site = _detached(rec, wanted)
    if site is not None:
        return _pin("backward", site, "the graph is broken here: no gradient flows back")
    found = option_site(model, wanted)
    if found is not None:
        site, says = found
        return _pin("backward", site, says)
    lines = backward_lines(state)
    return _pin("backward", lines, "the port's own backward returns the gradient here") if lines else None


def _detached(rec, wanted: set) -> Site | None:
    """The line of the recorded forward (``params``: its parameters known) that detaches
    a tensor whose result is used: of a ``wanted`` parameter first, of another, else of an
    activation; None where none does."""
    used = {i for op in rec.ops for i in op.inputs}
    detached = [op for op in rec.ops if op.name in ("aten.detach.default", "aten.alias.default") and op.site
                and op.index in used and all(rec.ops[i].name != "input" for i in op.inputs)]

    def rank(op):
        params = [rec.param_ids.get(i) for i in op.inputs if i in rec.param_ids]
        return (not any(p in wanted for p in params), not params, op.index)
    return min(detached, key=rank).site if detached else None


def no_gradient_pin(state, finding) -> Pin | None:
    """The line behind a parameter that receives no gradient (a ``structure.no-gradient``
    ``finding``), from the forward recorded with its parameters: a detach (:func:`_detached`);
    else, where no op reads the parameter, the line of its module's forward that reads the
    module's other parameters of the same graph op without it (``F.layer_norm(x, shape,
    self.weight, None, eps)``: :func:`_unread_site`); else, where it is read but its
    module's output never reaches the loss, the line that calls the outermost such module
    and drops what it returns (``h = block(x)``: :func:`_dropped_site`); else the port's
    own backward lines (:func:`backward_lines`)."""
    model, entries = getattr(state, "model", None), getattr(state, "entries", None)
    if model is None or entries is None:
        return None
    rec = forward_recording(state, None, keep=lambda t: False, params=True)
    if rec is None:
        return None
    name = finding.values.get("parameter", "")
    tensor = finding.values.get("tensor", "").split("[")[0]
    site = _detached(rec, {id(e.param) for e in entries if e.slot.name == tensor})
    if site is not None:
        return _pin("backward", site, "the graph is broken here: no gradient flows back")
    entry = next((e for e in entries if name in e.names), None)
    if entry is not None:
        found = (_unread_site(rec, model, entry, entries)
                 or _dropped_site(rec, model, name, getattr(getattr(state, "census", None), "graph", {})))
        if found is not None:
            return _pin("backward", found[0], found[1])
    lines = backward_lines(state)
    return _pin("backward", lines, "the port's own backward returns the gradient here") if lines else None


def _unread_site(rec, model, entry, entries) -> tuple[Site, str] | None:
    """(the line, the words) where no recorded op reads ``entry``'s parameter: the first
    line that reads another parameter of the same graph op (``ln1w[0]`` beside
    ``ln1b[0]``), in a method of the module holding it where one does (a forward that
    left it out of the call); None where the parameter is read, or no sibling is."""
    from .census import _slot_op
    pid = id(entry.param)
    own = {i for i, p in rec.param_ids.items() if p == pid}
    if any(i in own for op in rec.ops for i in op.inputs):
        return None
    op_of = _slot_op(entry.slot)
    siblings = {id(e.param) for e in entries if e is not entry and op_of is not None and _slot_op(e.slot) == op_of}
    others = {i for i, p in rec.param_ids.items() if p in siblings}
    name = entry.names[0]
    owner = dict(model.named_modules()).get(name.rpartition(".")[0])
    reads: dict[tuple, list[Site]] = {}
    for op in rec.ops:
        if op.name != "param" and others.intersection(op.inputs):
            site = (owned_site(op.stack, owner) if owner is not None else None) or op.site
            if site is not None:
                for i in sorted(others.intersection(op.inputs)):
                    seen = reads.setdefault((rec.param_ids[i], op.name), [])
                    seen.extend([site] if site not in seen else [])
    again = read_again(reads)
    if again is not None:
        return again, f"{name} is never read: this line reads another parameter of its op in its place"
    first = next((sites[0] for sites in reads.values()), None)
    if first is not None:
        return first, f"{name} is never read: this line uses the other parameters of its op without it"
    return None


def read_again(reads: dict) -> Site | None:
    """Of the lines reading each (parameter, op kind), the second of the first read twice
    the same way (the token table looked up with the positions), or None."""
    return next((sites[1] for sites in reads.values() if len(sites) > 1), None)


def _dropped_site(rec, model, name: str, graph: dict) -> tuple[Site, str] | None:
    """(the line, the words) where the parameter ``name`` is read but what its module
    returns never reaches what the model returns (the loss, the logits): the line calling
    the outermost module whose every call's output is left unused, the graph's op after
    that module's named as the one not given it; None where the module's output is used."""
    root = next((c for c in rec.calls if c.module == ""), None)
    if root is None or not root.outputs:
        return None
    reach, todo = set(), list(root.outputs)
    while todo:
        i = todo.pop()
        if i not in reach:
            reach.add(i)
            todo.extend(rec.ops[i].inputs)
    dropped, module = None, name.rpartition(".")[0]
    while module:
        calls = [c for c in rec.calls if c.module == module]
        if calls:
            if not all(c.outputs for c in calls) or any(i in reach for c in calls for i in c.outputs):
                break
            dropped = calls[0]
        module = module.rpartition(".")[0]
    if dropped is None or not dropped.stack:
        return None
    inside = [r for n, (r, _) in graph.items() if n == dropped.module or n.startswith(dropped.module + ".")]
    after = sorted((r, op) for n, (r, op) in graph.items() if inside and r > max(inside)
                   and not (n == dropped.module or n.startswith(dropped.module + ".")))
    says = f"{dropped.module}'s output never reaches the loss: this line drops it"
    if after:
        says += f" (the graph's next op, {after[0][1]}, is not given it)"
    return dropped.stack[0].site, says


def backward_lines(state) -> tuple[Site, ...]:
    """The user lines that make what the port's own backward code returns (a custom
    autograd Function's ``backward``, a tensor hook): of the ops that autograd runs with a
    user line, the last of each run in one function. The forward is run again with
    gradients and its backward recorded (``torch.autograd.grad``: no ``.grad`` is written)."""
    import torch
    from .record import _recorder_class
    idx = torch.from_numpy(np.asarray(state.inputs, np.int64))
    tgt = torch.from_numpy(np.asarray(state.targets, np.int64))
    try:
        _, loss = state._call(idx, tgt)
        params = [e.param for e in state.entries if e.param.requires_grad]
        if loss is None or not loss.requires_grad:
            return ()
        rec = _recorder_class()(lambda t: False)
        rec.stop = sys._getframe()
        with rec:
            torch.autograd.grad(loss, params, allow_unused=True)
    except Exception:
        return ()
    ops = [op for op in rec.ops if op.stack]
    last = [op.site for op, nxt in zip(ops, ops[1:] + [None]) if nxt is None or nxt.stack[0].code != op.stack[0].code]
    return tuple(dict.fromkeys(last))


# torch's modules -> the options of their constructor that change what they compute or
# their gradient (a padding row that gets none, a gain or bias left out, a GELU's form)
_OPTIONS = {"Embedding": ("padding_idx", "max_norm", "scale_grad_by_freq", "sparse"),
            "LayerNorm": ("eps", "elementwise_affine", "bias"), "Linear": ("bias",), "GELU": ("approximate",)}
# where GPT-2's setting is not torch's default: the tanh GELU
_GPT2 = {("GELU", "approximate"): "tanh"}


def changed_options(module) -> tuple[type | None, dict]:
    """(the torch class of ``module`` that has options of :data:`_OPTIONS`, {option: its
    setting} for those not at GPT-2's setting, the constructor's default but where
    :data:`_GPT2` says): ``padding_idx=0`` on an ``nn.Embedding``, ``bias=False`` on a
    ``Linear`` (read as whether it holds a bias), ``eps=1e-3``, an ``nn.GELU()`` (erf)."""
    import torch
    base = next((k for k in type(module).__mro__ if k.__name__ in _OPTIONS
                 and k.__module__.startswith("torch.") and issubclass(k, torch.nn.Module)), None)
    if base is None:
        return None, {}
    params = inspect.signature(base.__init__).parameters
    out = {}
    for name in _OPTIONS[base.__name__]:
        if name not in params or not hasattr(module, name):
            continue
        value = getattr(module, name)
        default = _GPT2.get((base.__name__, name), params[name].default)
        if isinstance(default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None       # bias: held or not
        if isinstance(default, float) and isinstance(value, float):
            if not math.isclose(value, default, rel_tol=1e-6):
                out[name] = value
        elif value != default:
            out[name] = value
    return base, out


def option_site(model, wanted: set) -> tuple[Site, str] | None:
    """(the line, the words) of the constructor call, in the user's source, of a torch
    module holding one of the ``wanted`` parameters (``id``s) built with an option that
    changes its gradient or output (:func:`changed_options`); None where none is."""
    for name, module in model.named_modules():
        if not any(id(p) in wanted for p in module.parameters(recurse=False)):
            continue
        base, options = changed_options(module)
        if options:
            site = constructor_site(model, name, base, options)
            if site is not None:
                said = ", ".join(f"{k}={v!r}" for k, v in options.items())
                return site, f"{name} is built with {said}: not GPT-2's {base.__name__}"
    return None


def constructor_site(model, name: str, base: type, options: dict) -> Site | None:
    """The line, in the user's files, of the call constructing ``model``'s module ``name``
    (a ``base`` torch module) with ``options`` set: the calls of its class's name (or a
    ``super().__init__`` in its class) whose arguments, bound to ``base``'s signature, set
    one of them (to that value where it is a constant), or leave to torch's default one
    whose GPT-2 setting is not it (:func:`_option_line`); of those, the call whose result
    is assigned under the module's own name first (``self.gelu = nn.GELU()``,
    ``wpe=nn.Embedding(...)``), then those in the classes of the module's owners (the most
    derived, the innermost owner first: the subclass whose method makes it). A heuristic
    on the source (``ast``), as the optimizer's call is found."""
    modules = dict(model.named_modules())
    mro = type(modules[name]).__mro__
    kinds = {k.__name__ for k in mro[:mro.index(base) + 1]}
    owners, at = [k for k in mro[:mro.index(base)]], name
    while at:
        at = at.rpartition(".")[0]
        owners.extend(k for k in type(modules[at]).__mro__ if k not in owners)
    # the owners' files, and those of the functions their classes hold (a factory given as a
    # class attribute: ``norm = make_norm``)
    held = [getattr(v, "__func__", v) for k in owners for v in vars(k).values()]
    files = {f for f in [getattr(sys.modules.get(k.__module__), "__file__", None) for k in owners]
             + [getattr(getattr(v, "__code__", None), "co_filename", None) for v in held] if f and is_user_file(f)}
    found = []
    for file in sorted(files):
        for klass, assigned, call in _calls_in(file, kinds):
            line = _option_line(call, base, options)
            if line is not None:
                rank = next((i for i, k in enumerate(owners) if k.__name__ == klass
                             and getattr(sys.modules.get(k.__module__), "__file__", None) == file), len(owners))
                found.append((assigned != name.rpartition(".")[2], rank, file, line))
    if not found:
        return None
    *_, file, line = min(found)
    return _line(file, line)


def _calls_in(file: str, kinds: set):
    """(the enclosing class's name or None, the name its result is given or None, the
    call) for each call in ``file`` of a name in ``kinds`` (``nn.Embedding(...)``,
    ``Embedding(...)``), or of ``super().__init__`` in a class of that name."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    names = _assigned_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        inner = [c for c in classes if c.lineno <= node.lineno <= c.end_lineno]
        klass = max(inner, key=lambda c: c.lineno).name if inner else None
        f = node.func
        called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        init = (called == "__init__" and isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Name)
                and f.value.func.id == "super" and klass in kinds)
        if called in kinds or init:
            yield klass, names.get(id(node)), node


def _assigned_names(tree) -> dict[int, str]:
    """{id of a call: the name it is assigned to}: ``self.x = call``, ``x = call``, element by
    element of a tuple assigned to a tuple, ``x=call`` as a keyword, ``"x": call`` in a dict."""
    out = {}

    def name_of(t):
        return t.attr if isinstance(t, ast.Attribute) else t.id if isinstance(t, ast.Name) else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple) and len(t.elts) == len(node.value.elts):
                    out.update({id(v): name_of(e) for e, v in zip(t.elts, node.value.elts)})
                else:
                    out[id(node.value)] = name_of(t)
        elif isinstance(node, ast.keyword) and node.arg:
            out[id(node.value)] = node.arg
        elif isinstance(node, ast.Dict):
            out.update({id(v): k.value for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)})
    return out


def _option_line(call: ast.Call, base: type, options: dict) -> int | None:
    """The line of ``call``'s argument setting one of ``options`` (bound to ``base``'s
    signature), where it is not a constant other than the option's setting; else the
    call's last line where it leaves one to torch's default and that default is the
    option's setting (not GPT-2's: ``nn.GELU()``); None."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    try:
        bound = inspect.signature(base).bind(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError:
        return None
    params = inspect.signature(base).parameters
    for option, value in options.items():
        node = bound.arguments.get(option)
        if node is None:
            if option in params and params[option].default == value:
                return call.end_lineno
            continue
        if isinstance(node, ast.Constant) and node.value != value and not (
                isinstance(value, bool) and node.value is None and value is False):
            continue
        return node.lineno
    return None


# ----------------------------------------------------------------------------- the optimizer

def optimizer_pin(state) -> Pin | None:
    """The line of the port's optimizer construction whose setting differs from the run's
    (see the module's docstring); None for the harness's own optimizer."""
    from .torchmodel import build_optimizer
    factory = getattr(state, "optimizer_factory", None)
    optimizer = getattr(state, "optimizer", None)
    if factory is None or optimizer is None:
        return None
    where = _constructed(lambda: build_optimizer(factory, state.model, state.hyper))
    if where is None:
        return None
    file, (line, end, col, end_col) = where
    call = _call_at(file, line, col, end, end_col)
    differ = _differing(optimizer, state.hyper.as_float32())
    left = not_given(optimizer, state.model, getattr(state, "masters", {}))
    if left:
        lines = (call.args[0].lineno,) if call is not None and call.args else (line,)
        return _pin("adamw", tuple(_line(file, n) for n in lines),
                    f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''} not among the parameters it updates")
    if call is None:
        return _pin("adamw", _line(file, line), "the optimizer is constructed here")
    keywords = {k.arg: k for k in call.keywords if k.arg}
    groups = _group_lines(file, line, differ)
    lines = sorted({groups[k] if k in groups else keywords[k].lineno if k in keywords else call.end_lineno
                    for k in differ}) or [call.lineno]
    says = (f"its {', '.join(f'{k} {v[0]} (the run: {v[1]})' for k, v in differ.items())}" if differ
            else "the optimizer is constructed here")
    return _pin("adamw", tuple(_line(file, n) for n in lines), says)


def not_given(optimizer, model, masters: dict) -> list[str]:
    """The names of ``model``'s trainable parameters that none of ``optimizer``'s groups
    holds (a master weight standing for one counts as it): the step leaves them as they are."""
    held = stepped(optimizer)
    return [n for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in held and id(masters.get(id(p), p)) not in held]


def _group_lines(file: str, line: int, settings) -> dict[str, int]:
    """{setting: the line of a parameter group's dict literal (``{"params": ...,
    "weight_decay": 0.0}``) that sets it}, in the function of ``file`` whose call at
    ``line`` constructs the optimizer: a group's own setting overrides the constructor's
    keyword, so a differing one lives there."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return {}
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
           and n.lineno <= line <= n.end_lineno]
    if not fns:
        return {}
    fn = max(fns, key=lambda n: n.lineno)      # the innermost
    out: dict[str, int] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "params" for k in node.keys):
            for k in node.keys:
                if isinstance(k, ast.Constant) and k.value in settings and k.value not in out:
                    out[k.value] = k.lineno
    return out


def _line(file: str, n: int) -> Site:
    return Site(file, n, linecache.getline(file, n).strip())


def _constructed(build):
    """(file, the call's positions) of the user's frame that constructs a torch optimizer
    in ``build()``, caught by a profile function; None where none does."""
    import torch
    found = []

    def profile(frame, event, arg):
        if event != "call" or found or frame.f_code.co_name != "__init__":
            return
        if not isinstance(frame.f_locals.get("self"), torch.optim.Optimizer):
            return
        f = frame.f_back
        while f is not None and not is_user_file(f.f_code.co_filename):
            f = f.f_back
        if f is not None:
            found.append((f.f_code.co_filename, list(f.f_code.co_positions())[f.f_lasti // 2]))

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        build()
    except Exception:
        return None
    finally:
        sys.setprofile(old)
    return found[0] if found else None


def _call_at(file: str, line: int, col, end: int, end_col) -> ast.Call | None:
    """The call expression of ``file`` at those positions (the innermost one spanning them)."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.lineno <= line and n.end_lineno >= end]
    exact = [n for n in calls if (n.lineno, n.col_offset, n.end_lineno, n.end_col_offset) == (line, col, end, end_col)]
    pool = exact or calls
    return min(pool, key=lambda n: (n.end_lineno - n.lineno, n.end_col_offset - n.col_offset)) if pool else None


def _differing(optimizer, hyper) -> dict[str, tuple]:
    """The optimizer's settings (torch's keywords) that differ from the run's, in float32:
    {keyword: (the port's, the run's)}."""
    run = {"lr": hyper.learning_rate, "betas": (hyper.beta1, hyper.beta2), "eps": hyper.eps,
           "weight_decay": hyper.weight_decay}
    out = {}
    for group in optimizer.param_groups:
        for k, want in run.items():
            have = group.get(k)
            if have is None or k in out:
                continue
            if not np.array_equal(np.float32(np.asarray(have, np.float64)), np.float32(np.asarray(want, np.float64))):
                out[k] = (have, want)
    return out


# ----------------------------------------------------------------------------- a module's attribute

def float_attributes(owner, text: str) -> list[tuple[str, float]]:
    """The float attributes of ``owner`` (a module) that a line of its source reads as
    ``self.<name>``: [(name, value)]."""
    out = []
    for name in dict.fromkeys(re.findall(r"\bself\.(\w+)\b(?!\s*\()", text)):
        value = getattr(owner, name, None)
        if isinstance(value, float):
            out.append((name, value))
    return out


def float_methods(owner, text: str) -> list[tuple[str, float]]:
    """The methods of ``owner`` (a module), defined in the user's files, that a line of its
    source calls with no argument (``self.<name>()``) and that return a float:
    [(name, value)]. Each is called once more to read its value (a method of no argument
    whose result the line uses: a scale, an eps)."""
    import torch
    out = []
    for name in dict.fromkeys(re.findall(r"\bself\.(\w+)\(\s*\)", text)):
        method = getattr(owner, name, None)
        fn = getattr(method, "__func__", None)
        if fn is None or not hasattr(fn, "__code__") or not is_user_file(fn.__code__.co_filename):
            continue
        try:
            with torch.no_grad():
                value = method()
        except Exception:
            continue
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out


def method_site(owner, name: str) -> Site | None:
    """The line of ``owner``'s method ``name`` that returns its value: its one ``return``
    (the def's line where it has several, or none)."""
    fn = getattr(getattr(owner, name, None), "__func__", None)
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    returns = [n for n in ast.walk(tree.body[0]) if isinstance(n, ast.Return)]
    at = returns[0].lineno if len(returns) == 1 else tree.body[0].lineno
    return _line(fn.__code__.co_filename, start + at - 1)


def config_site(model, name: str, value: float) -> Site | None:
    """Where a value a module was given by its caller comes from: a class-level field of
    a config object the model's modules hold (a dataclass's ``norm_eps: float = 1e-6``,
    the most derived class first) whose default is ``value``, a field whose name holds
    ``name`` first. A heuristic on the source, like :func:`attribute_site`."""
    import torch
    classes = []
    for module in model.modules():
        for obj in vars(module).values():
            if isinstance(obj, (torch.nn.Module, torch.Tensor, dict, list, tuple, str, int, float)) or obj is None:
                continue
            for klass in type(obj).__mro__:
                if klass not in classes and is_user_file(getattr(sys.modules.get(klass.__module__), "__file__", "")
                                                         or ""):
                    classes.append(klass)
    fields = [f for klass in classes for f in _class_constants(klass, value)]
    found = [(name not in field, i, site) for i, (field, site) in enumerate(fields)]
    if not found:
        return None
    return min(found)[2]


def _class_constants(klass, value: float):
    """(name, line) of each assignment in ``klass``'s body of a number equal to ``value``."""
    try:
        lines, start = inspect.getsourcelines(klass)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return
    for node in tree.body[0].body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        v = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, (int, float)) \
                and not isinstance(v.value, bool) and np.isclose(float(v.value), value, rtol=1e-9, atol=0):
            yield target.id, _line(inspect.getsourcefile(klass), start + node.lineno - 1)


def class_site(cls, name: str, value: float) -> Site | None:
    """The line of a class body in ``cls``'s MRO (the most derived first) that sets the
    class attribute ``name`` to ``value`` (``eps = 1e-3`` in a subclass); None where none
    does. A heuristic on the source, like :func:`attribute_site`."""
    klass = next((k for k in cls.__mro__ if name in vars(k)), None)
    # the most derived class setting it: where it sets another value, no line
    return next((site for field, site in _class_constants(klass, value) if field == name), None) if klass else None


def attribute_site(cls, name: str, value: float, model=None) -> Site | None:
    """Where the attribute ``name`` of ``cls``'s instances got ``value``: the parameter
    default equal to it in a constructor of ``cls``'s MRO (the most derived first: a
    subclass's ``eps=1e-12``), else a class body setting it (:func:`class_site`: ``eps =
    1e-3``), else (given the ``model``) a config's field holding it
    (:func:`config_site`: the value the caller passed), else the line of a constructor
    assigning ``self.<name>``. A heuristic on the source (``inspect`` and ``ast``)."""
    inits = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not hasattr(init, "__code__") or not is_user_file(init.__code__.co_filename):
            continue
        try:
            lines, start = inspect.getsourcelines(init)
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError):
            continue
        inits.append((init.__code__.co_filename, start, tree.body[0]))
    for file, start, fn in inits:
        for d in fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]:
            if isinstance(d, ast.Constant) and isinstance(d.value, (int, float)) and not isinstance(d.value, bool) \
                    and np.isclose(float(d.value), value, rtol=1e-9, atol=0):
                return _line(file, start + d.lineno - 1)
    site = class_site(cls, name, value) or (config_site(model, name, value) if model is not None else None)
    if site is not None:
        return site
    for file, start, fn in inits:
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                       and t.value.id == "self" for t in targets):
                    return _line(file, start + node.lineno - 1)
    return None
