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
  :func:`.sources.option_site`), else the user lines autograd runs in the backward (a custom
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

import sys
from dataclasses import replace

import numpy as np

from .master import stepped
from .localise import Pin, locate
from . import sources
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
    header = sources._loop_header(site)
    return header or site


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
    gradient (``nn.Embedding(..., padding_idx=0)``: :func:`.sources.option_site`); else the user
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
    found = sources.option_site(model, wanted)
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


# ----------------------------------------------------------------------------- the optimizer

def optimizer_pin(state) -> Pin | None:
    """The line of the port's optimizer construction whose setting differs from the run's
    (see the module's docstring); None for the harness's own optimizer."""
    from .torchmodel import build_optimizer
    factory = getattr(state, "optimizer_factory", None)
    optimizer = getattr(state, "optimizer", None)
    if factory is None or optimizer is None:
        return None
    caught: dict = {}
    where = _constructed(lambda: build_optimizer(factory, state.model, state.hyper), caught)
    if where is None:
        return None
    file, (line, end, col, end_col) = where
    call = sources._call_at(file, line, col, end, end_col)
    differ = _differing(optimizer, state.hyper.as_float32())
    later = _changed_later(differ, caught)
    if later is not None:
        return later
    left = not_given(optimizer, state.model, getattr(state, "masters", {}))
    if left:
        lines = (call.args[0].lineno,) if call is not None and call.args else (line,)
        return _pin("adamw", tuple(sources._line(file, n) for n in lines),
                    f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''} not among the parameters it updates")
    if call is None:
        return _pin("adamw", sources._line(file, line), "the optimizer is constructed here")
    keywords = {k.arg: k for k in call.keywords if k.arg}
    groups = sources._group_lines(file, line, differ)
    given = sources.given_for_groups(file, line, caught.get("caller"))
    if given is not None and any(k in groups for k in differ):
        return _pin("adamw", given, f"its {', '.join(f'{k} {v[0]} (the run: {v[1]})' for k, v in differ.items())}"
                    ": its parameter groups are split by what this call passes")
    lines = sorted({groups[k] if k in groups else keywords[k].lineno if k in keywords else call.end_lineno
                    for k in differ}) or [call.lineno]
    says = (f"its {', '.join(f'{k} {v[0]} (the run: {v[1]})' for k, v in differ.items())}" if differ
            else "the optimizer is constructed here")
    return _pin("adamw", tuple(sources._line(file, n) for n in lines), says)


def not_given(optimizer, model, masters: dict) -> list[str]:
    """The names of ``model``'s trainable parameters that none of ``optimizer``'s groups
    holds (a master weight standing for one counts as it): the step leaves them as they are."""
    held = stepped(optimizer)
    return [n for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in held and id(masters.get(id(p), p)) not in held]


def _changed_later(differ: dict, caught: dict) -> Pin | None:
    """The line constructing a torch LR scheduler on the optimizer (``LambdaLR(opt, ...)``,
    which sets the lr at construction) where the optimizer's lr is what differs: the lr
    was changed after the optimizer was built, by it; None otherwise."""
    if "lr" not in differ or caught.get("scheduler") is None:
        return None
    file, (line, *_) = caught["scheduler"]
    return _pin("adamw", sources._line(file, line), f"its lr {differ['lr'][0]} (the run: {differ['lr'][1]}): "
                "set by the learning-rate scheduler built on it here")


def _user_positions(f):
    """(file, the positions of the call running) of the first user frame from ``f`` out,
    and that frame; (None, None) where none is."""
    while f is not None and not is_user_file(f.f_code.co_filename):
        f = f.f_back
    if f is None:
        return None, None
    return (f.f_code.co_filename, list(f.f_code.co_positions())[f.f_lasti // 2]), f


def _constructed(build, caught: dict | None = None):
    """(file, the call's positions) of the user's frame that constructs a torch optimizer
    in ``build()``, caught by a profile function; None where none does. ``caught`` (given)
    gets ``"caller"``: the same of the user frame calling that frame's function (where a
    factory's argument comes from), and ``"scheduler"``: the user's call constructing a
    torch LR scheduler on that optimizer, if any."""
    import torch
    found = []
    caught = {} if caught is None else caught

    building = {}       # a scheduler's outermost __init__ frame -> (the lrs before it, its user call)

    def lrs():
        return [g.get("lr") for opt in found[-1:] for g in opt[2].param_groups] if found else []

    def profile(frame, event, arg):
        if event == "return" and frame in building:
            before, where = building.pop(frame)
            if before != lrs() and "scheduler" not in caught:
                caught["scheduler"] = where     # the scheduler that changed the lr
        if event != "call" or frame.f_code.co_name != "__init__":
            return
        me = frame.f_locals.get("self")
        if found and isinstance(me, torch.optim.lr_scheduler.LRScheduler) and not any(
                f.f_locals.get("self") is me for f in building):
            building[frame] = (lrs(), _user_positions(frame.f_back)[0])
        if found or not isinstance(me, torch.optim.Optimizer):
            return
        where, f = _user_positions(frame.f_back)
        if where is not None:
            found.append((*where, me))
            caught["caller"] = _user_positions(f.f_back)[0]

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        build()
    except Exception:
        return None
    finally:
        sys.setprofile(old)
    return found[0][:2] if found else None


def _differing(optimizer, hyper) -> dict[str, tuple]:
    """The optimizer's settings (torch's keywords) that differ from the run's, in float32:
    {keyword: (the port's, the run's)}."""
    run = {"lr": hyper.learning_rate, "betas": (hyper.beta1, hyper.beta2), "eps": hyper.eps,
           "weight_decay": hyper.weight_decay}
    out = {}
    for group in optimizer.param_groups:
        if not group.get("params"):
            continue        # an empty group (nothing masked out) updates nothing
        for k, want in run.items():
            have = group.get(k)
            if have is None or k in out:
                continue
            if not np.array_equal(np.float32(np.asarray(have, np.float64)), np.float32(np.asarray(want, np.float64))):
                out[k] = (have, want)
    return out
