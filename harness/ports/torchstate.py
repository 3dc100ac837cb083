"""One training step of a torch model from the C's state, read back in the C's layout.

A port of ``train_gpt2.c`` is usually not written to the kernel protocol: it is an
``nn.Module`` whose ``forward`` builds the graph from torch ops, ``loss.backward()`` gives
the gradients and ``torch.optim.AdamW`` the update. :class:`ModelState` runs such a model
one step at a time from the C's state and presents what it computed with the interface the
per-step checks read from any model state (``params``, ``grads``, ``acts``, ``grads_acts``,
``m_memory``, ``v_memory``, ``mean_loss``; see :mod:`harness.graph`), so a model is one
more implementation column in :func:`harness.checks.run.run_parity`. Its parameters are
mapped by :mod:`.mapping`, its activations captured by :mod:`.capture`.

The values an op's replay needs but no module returns (a layernorm's mean and rstd,
attention's softmax, the probabilities; the ``derivable`` outputs of :mod:`pyref.spec`)
are *derived*: the float64 oracle of the op applied to the port's own observed inputs, so
a replay's inputs stay the port's own; each is computed when first read (:class:`Derived`).
The C's m and v are loaded into the buffers the update check reads, which the optimizer's
state tensors view where it holds them in float32 in the C's layout: stepped in place, they
are not copied back.
"""
from __future__ import annotations

from math import prod

import numpy as np

from pyref.config import LAYER_PARAMS, GPT2Config, act_shapes, param_shapes, point
from pyref.protocol import FORWARD_OUTPUTS, run_kernel
from pyref.spec import SPECS

from ..errors import ModelError
from ..graph import Ref, forward_nodes, unobserved
from ..arbiter.oracle import ORACLE
from .capture import Capture, anchors
from .census import Census, Finding
from .families import HOOKS
from .finder import Finder
from .hygiene import hygiene
from .mapping import Entry, map_parameters
from .master import master_weights, not_written_back, stepped
from .precision import Mixed
from .torchmodel import TorchModel, build_model, build_optimizer, call_model
from .usage import Usage, record_usage, relaid
from .usage import _mode_class as usage_mode


# outputs no module returns but a replay needs as input: derived from the port's own inputs
# (their rows' ``derivable`` in pyref.spec)
# every activation (a finder for none: a port whose names are all known)
_ALL_ACTS = type("_All", (), {"__contains__": lambda self, key: True})()
DERIVED = {k.name: d for k in SPECS if k.returns and (d := tuple(o.name for o in k.outputs if o.derivable))}


def _one_dtype(entries: list[Entry]) -> None:
    """A model's parameters in one floating dtype (a model wholly in another is a hygiene
    finding); one parameter in another is named."""
    from collections import Counter
    kinds = Counter(e.param.dtype for e in entries)
    odd = [e for e in entries if not e.param.dtype.is_floating_point]
    if not odd and len(kinds) > 1:
        common = kinds.most_common(1)[0][0]
        odd = [e for e in entries if e.param.dtype != common]
    if odd:
        e = odd[0]
        raise ModelError(f"parameter {e.names[0]} ({e.slot}) is {e.param.dtype}, the model's others "
                         f"{kinds.most_common(1)[0][0]}: the C holds every parameter in float32")


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (a copy would be a no-op)."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.dtype == b.dtype
            and a.shape == b.shape and a.strides == b.strides)


def _kind(x) -> str:
    if x is None:
        return "None"
    shape = getattr(x, "shape", None)
    return f"{type(x).__name__} of shape {tuple(shape)}" if shape is not None else type(x).__name__


class Derived(dict):
    """A port's activations by the C's names, whose derived ones (``pending``: (node, its
    outputs), in the graph's order) are computed when first read, each with what it reads
    before it: the float64 oracle on the port's own inputs (attention's and the
    probabilities' softmax: 1.5 s of a 124M step) serves a replay, a pin or a diagnosis;
    a passing check compares only what the port showed. ``run(node, outputs)`` computes
    one into the arrays (read without computing: :meth:`raw`)."""

    def __init__(self, arrays: dict, run):
        super().__init__(arrays)
        self.pending: list = []
        self._run = run

    def complete(self, names=None) -> None:
        """Compute the pending outputs of ``names`` (None: all) and what they read."""
        todo, needed = [], None if names is None else set(names)
        for node, outs in reversed(self.pending):
            if needed is None or needed & {node.arg_dict[o].name for o in outs}:
                todo.append((node, outs))
                if needed is not None:
                    needed |= {r.name for _, r in node.args if isinstance(r, Ref) and r.group == "acts"}
        for item in reversed(todo):
            self.pending.remove(item)
            self._run(*item)

    def raw(self, name: str) -> np.ndarray:
        return dict.__getitem__(self, name)

    def raw_items(self):
        return dict.items(self)

    def __getitem__(self, name):
        if self.pending:
            self.complete((name,))
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        self.complete()
        return dict.values(self)

    def items(self):
        self.complete()
        return dict.items(self)

    def __iter__(self):     # (not dict's: dict(acts) and {**acts} then read through __getitem__)
        return iter(list(dict.keys(self)))

    def copy(self) -> dict:
        self.complete()
        return dict(dict.items(self))


class ModelState:
    """One training step of a torch model from the C's state, read back in the C's layout."""

    def __init__(self, config: GPT2Config, params, model: TorchModel, hyper):
        import torch
        self.config = config
        self.hyper = hyper
        self.model = build_model(model.factory, config)
        self.mixed = Mixed(model.autocast, model.param_dtype, model.grad_scaler)
        self.mixed.prepare(self.model)
        mapping = model.mapping if model.mapping is not None else getattr(self.model, "llmc_param_map", None)
        self._usage = None
        self.entries = map_parameters(self.model, config, mapping, uses=self.usage)
        elsewhere = sorted({str(e.param.device) for e in self.entries if e.param.device.type != "cpu"})
        if elsewhere:
            raise ModelError(f"{type(self.model).__name__} has parameters on {', '.join(elsewhere)}; "
                             "the harness compares on the CPU: move the model there (model.cpu())")
        _one_dtype(self.entries)
        shapes = param_shapes(config)
        n = sum(prod(s) for s in shapes.values())
        self.num_parameters = n
        self.params_memory = np.zeros(n, np.float32)
        self.params = point(self.params_memory, shapes)
        self.grads_memory = np.zeros(n, np.float32)
        self.grads = point(self.grads_memory, shapes)
        self.m_memory = self.v_memory = None
        self.acts = self.grads_acts = None
        self.inputs = self.targets = None
        self.mean_loss = np.float32(-1)
        # a port whose names are its own: which of its modules its parents apply without a call
        own_names = not any(p.search(n) for n, _ in self.model.named_modules() for p, _, _ in HOOKS)
        stacked = any(e.slot.layer is None and e.slot.name in LAYER_PARAMS for e in self.entries)
        bypassed = self.usage().bypassed() if own_names and not stacked else set()
        self.capture = Capture(self.model, config, self.entries)
        for key, group in anchors(self.model, config, self.entries).items():
            if all(m in bypassed for m, _ in group):
                self.capture.points.pop(key, None)     # shown at no boundary: sought by value
        self.census = Census(self.model, config, self.entries, bypassed)
        # what no module boundary shows, found by value, where the names are not all known (a
        # functional port's, on raw parameters of the model itself, too)
        by_value = self.capture.anchored or bypassed or (own_names and not stacked and not self.capture.points)
        # what no boundary shows, taken where the forward computes it by the mapped parameters
        # (whatever its values: before any is sought by value)
        by_use = (own_names or by_value) and not stacked
        self.sites = {k: v for k, v in (self.usage().sites(self.entries) if by_use else {}).items()
                      if v[0] not in self.capture.points}
        self._site_watch = None
        self.finder = Finder(config, set(self.capture.points) | {a for a, _ in self.sites.values()}
                             if by_value else _ALL_ACTS)
        self.optimizer = build_optimizer(model.optimizer, self.model, hyper)
        self.optimizer_factory = model.optimizer   # where the port's optimizer comes from (harness.ports.pins)
        self.masters = master_weights(self.optimizer, self.entries)   # id(param) -> its float32 master
        self.findings: list[Finding] = [Finding(f"hygiene.{kind}", line) for kind, line in
                                        hygiene(self.model, self.optimizer, hyper, config, self.entries)]
        self.structure: list[Finding] = []    # the last step's structural findings (the census)
        self._loss = None
        self._observed: set = set()
        self._derived: set = set()
        self._own_loss = False
        self.torch = torch
        self.load_state(params)

    def usage(self) -> Usage:
        """How the port's forward uses its parameters (:mod:`.usage`), recorded once, when
        first asked (its names did not place every parameter, or are its own)."""
        if self._usage is None:
            self._usage = record_usage(self.model, self.config)
        return self._usage

    # ------------------------------------------------------------------ state
    def load_state(self, params, m=None, v=None):
        """The C's parameters into the model, bit for bit; m, v (None: a fresh optimizer
        state, as at step 1) into the optimizer's exp_avg, exp_avg_sq."""
        torch = self.torch
        self.params_memory[...] = np.asarray(params, np.float32).reshape(-1)
        wte = self.params["wte"]
        if any(e.rows == self.config.vocab_size for e in self.entries) and np.any(wte[self.config.vocab_size:]):
            raise ModelError("the C's padded wte rows (V..Vp) are not zero; a model with V rows cannot hold them")
        with torch.no_grad():
            for e in self.entries:
                e.param.copy_(torch.from_numpy(self._model_layout(e, self.params)))
                back = e.param.detach().to(torch.float32).numpy()
                if e.param.dtype == torch.float32 and not np.array_equal(
                        back.view(np.uint32), self._model_layout(e, self.params).view(np.uint32)):
                    raise ModelError(f"{e.names[0]} did not take the C's values bit for bit")
                if id(e.param) in self.masters:   # the float32 copy the optimizer steps: exactly the C's
                    self.masters[id(e.param)].copy_(torch.from_numpy(self._model_layout(e, self.params)))
        self.optimizer.state.clear()
        self._mv = None
        if m is not None:
            # the C's m and v copied once into the buffers update() reads back: the state
            # tensors view them where they are the optimizer's float32 in the C's layout
            # (stepped in place, nothing to copy back), else hold copies
            self._mv = {"m": np.array(m, np.float32).reshape(-1), "v": np.array(v, np.float32).reshape(-1)}
            mv = {k: point(buf, param_shapes(self.config)) for k, buf in self._mv.items()}
            for e in self.entries:
                self.optimizer.state[self._stepped(e)] = {
                    "step": torch.tensor(0.0),   # set to t - 1 by update()
                    "exp_avg": self._state_tensor(e, mv["m"], self._held(e, "m")),
                    "exp_avg_sq": self._state_tensor(e, mv["v"], self._held(e, "v"))}
            self._mv_loaded = True
        else:
            self._mv_loaded = False

    def _state_tensor(self, e: Entry, views: dict, dtype):
        """A moment of ``e``'s parameter from the C-layout ``views``: a view of them where
        the optimizer holds it in float32 as the C lays it out, else a tensor of its own."""
        a = e.slot.view(views)
        a = a[:e.rows] if e.rows is not None else a
        if dtype == self.torch.float32 and not e.slot.transpose and a.flags.c_contiguous \
                and tuple(a.shape) == tuple(self._stepped(e).shape):
            return self.torch.from_numpy(a)
        return self.torch.from_numpy(self._model_layout(e, views).copy()).to(dtype)

    def _held(self, e: Entry, label: str):
        """The dtype the optimizer holds ``label`` (m, v) in: as its last step left it
        (harness.ports.precision), else that of the tensor it steps."""
        prof = self.mixed.profile
        held = prof.state.get(label) if prof is not None else None
        return getattr(self.torch, held) if held else self._stepped(e).dtype

    def _stepped(self, e: Entry):
        """The tensor the optimizer steps for ``e``'s parameter: the parameter, or its
        master weight (harness.ports.master)."""
        return self.masters.get(id(e.param), e.param)

    def _model_layout(self, e: Entry, views: dict) -> np.ndarray:
        a = e.slot.view(views)
        if e.rows is not None:
            a = a[:e.rows]
        return np.ascontiguousarray(a.T if e.slot.transpose else a)

    def _read(self, get, out: dict, scale: float = 1.0):
        """A per-parameter tensor (grad, exp_avg, ...) back into C-layout views ``out``
        (divided by ``scale``: a GradScaler's factor); where there is none, zeros."""
        for e in self.entries:
            t = get(e)
            dst = e.slot.view(out)
            if t is None:
                # no gradient (torch's None is a zero gradient; the census says which) or
                # no optimizer state (a parameter without gradient is skipped by the step)
                dst[...] = 0.0
                continue
            a = t.detach().to(self.torch.float32).numpy()
            a = a / np.float32(scale) if scale != 1.0 else a
            a = a.T if e.slot.transpose else a
            into = dst[:e.rows] if e.rows is not None else dst
            if not _same_memory(a, into):    # (a moment the optimizer stepped in place: there)
                into[...] = a
            if e.rows is not None:
                dst[e.rows:] = 0   # the C's padded rows: zero gradient, zero moments

    # ------------------------------------------------------------------ forward
    def forward(self, inputs, targets):
        torch = self.torch
        cfg = self.config
        B, T = inputs.shape
        self.inputs, self.targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        shapes = act_shapes(cfg, B, T)
        if self.acts is None or self.acts.raw("encoded").shape[:2] != (B, T):
            self.acts = Derived({k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}, self._derive_one)
            self.grads_acts = {k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}
        else:
            self.acts.pending = []
            for d in (dict(self.acts.raw_items()), self.grads_acts):
                for a in d.values():
                    a.fill(np.nan)
        self.capture.clear()
        self.census.clear()
        idx = torch.from_numpy(self.inputs.astype(np.int64))
        tgt = torch.from_numpy(self.targets.astype(np.int64))
        try:
            with self.capture.kernel_calls(self.model, cfg), self.finder.watch(B, T), self._watch_sites():
                logits, loss = self.mixed.forward(self.model, lambda: self._call(idx, tgt))
            self.finder.take(self.capture)
            self._take_sites(B, T)
        except ModelError:
            raise
        except Exception as e:
            where = self.census.running()
            raise ModelError(f"{type(self.model).__name__}'s forward raised {type(e).__name__}"
                             + (f" in {where} ({type(self.model.get_submodule(where)).__name__})" if where else "")
                             + f": {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        self.structure = self.census.forward_findings()
        if logits is not None and tuple(logits.shape[:2]) != (B, T):
            raise ModelError(f"{type(self.model).__name__}'s forward returned logits of shape {tuple(logits.shape)}; "
                             f"the C's are (B, T, V) = ({B}, {T}, {cfg.vocab_size}) or Vp={cfg.padded_vocab_size}")
        if logits is not None and logits.shape[-1] not in (cfg.vocab_size, cfg.padded_vocab_size):
            raise ModelError(f"{type(self.model).__name__}'s forward returned logits of shape {tuple(logits.shape)}; "
                             f"their last axis must be V={cfg.vocab_size} or Vp={cfg.padded_vocab_size}")
        if logits is not None and ("logits", None) not in self.capture.values:
            self.capture.values[("logits", None)] = logits.detach().clone()
            if logits.requires_grad:
                logits.register_hook(lambda g: self.capture.grads.__setitem__(("logits", None), g.detach().clone()))
        if loss is None:
            if logits is None:
                raise ModelError(f"{type(self.model).__name__}'s forward returned neither logits (B, T, V) nor a "
                                 f"scalar loss (it returned {_kind(self._returned)})")
            V = cfg.vocab_size
            loss = torch.nn.functional.cross_entropy(logits[..., :V].reshape(B * T, V).float(), tgt.reshape(-1))
        if not loss.requires_grad:
            raise ModelError(f"{type(self.model).__name__}'s loss does not require grad: it is not computed from "
                             "the parameters (detached, or under torch.no_grad())")
        self._loss = loss
        self.mixed.observed(cfg, self.capture, self.model, loss)
        self.mixed.state_dtypes(self.optimizer, [self._stepped(e) for e in self.entries])
        self.mean_loss = np.float32(loss.detach().float().item())
        self._store(self.capture.values, self.acts, forward=True)
        self._derive()
        if self.finder.first and self.finder.find(self):
            self._derive()
        return self.mean_loss

    __call__ = forward

    def _watch_sites(self):
        """The mode under which a forward's sites (:meth:`.usage.Usage.sites`) are kept."""
        import contextlib
        if not self.sites:
            return contextlib.nullcontext()
        params = {id(e.param): tuple(e.param.shape) for e in self.entries}
        self._site_watch = usage_mode()(params, wanted=set(self.sites))
        return self._site_watch

    def _take_sites(self, B: int, T: int) -> None:
        """The sites' tensors as the C's activations (and a hook for each one's gradient)."""
        watch, self._site_watch = self._site_watch, None
        if watch is None:
            return
        names = {id(e.param): e.names[0] for e in self.entries}
        for (pid, role), (t, value) in watch.sites.items():
            key, layout = self.sites[(pid, role)]
            if key in self.capture.values or value.numel() != B * T * value.shape[-1]:
                continue
            self.capture.values[key] = relaid(value, layout, B, T)
            what = {"out": "the output of", "operand": "the input of", "residual": "the sum after"}[role]
            self.capture.points[key] = f"the forward ({what} {names[pid]}'s op, found by use)"
            if t.requires_grad:
                t.register_hook(lambda g, key=key, layout=layout: self.capture.grads.__setitem__(
                    key, relaid(g, layout, B, T)))

    def _call(self, idx, tgt):
        """The model's forward as the port calls it: with the targets where its forward
        takes them and its loss means the C's (not Hugging Face's shifted labels)."""
        out = call_model(self.model, idx, tgt)
        self._returned = out
        logits = loss = None
        items = out if isinstance(out, (tuple, list)) else [out]
        if hasattr(out, "logits"):
            items = [out.logits]
        for x in items:
            if isinstance(x, self.torch.Tensor):
                if x.dim() == 0:
                    loss = x
                elif x.dim() == 3 and logits is None:
                    logits = x
        self._own_loss = loss is not None
        return logits, loss

    def _store(self, captured: dict, out: dict, forward: bool, scale: float = 1.0):
        cfg = self.config
        for (act, layer), t in captured.items():
            a = t.to(self.torch.float32).numpy()
            a = a / np.float32(scale) if scale != 1.0 else a
            dst = out[act] if layer is None else out[act][layer]
            if act in ("logits", "probs") and a.shape[-1] == cfg.vocab_size < cfg.padded_vocab_size:
                dst[..., :cfg.vocab_size] = a
                dst[..., cfg.vocab_size:] = 0   # no padded columns: the C's are 0 (zero rows of wte)
            elif a.shape != dst.shape:
                raise ModelError(f"{self.capture.points.get((act, layer), 'the model output')} gave "
                                 f"{act} of shape {a.shape}, the C's is {dst.shape}")
            else:
                dst[...] = a
            if forward:
                self._observed.add(("acts", act, layer))
            else:
                self._observed.add(("grads_acts", act, layer))

    def _derive(self):
        """What the oracle's outputs for what no module returns (from the port's own inputs)
        will be computed of (:class:`Derived`: when first read)."""
        self._derived = set()
        self.acts.pending = []
        for node in forward_nodes(self.config):
            wanted = DERIVED.get(node.kernel)
            if not wanted:
                continue
            refs = {k: v for k, v in node.args if isinstance(v, Ref)}
            inputs = {k: r for k, r in refs.items() if k not in FORWARD_OUTPUTS[node.kernel]}
            if not all(self.has(r) for r in inputs.values()):
                continue
            outs = [o for o in wanted if not self.observes(refs[o])]
            if not outs:
                continue
            self.acts.pending.append((node, tuple(outs)))
            self._derived.update(("acts", refs[o].name, refs[o].layer) for o in outs)

    def _derive_one(self, node, outs: tuple) -> None:
        """The oracle's ``outs`` of ``node`` on the port's own inputs, into the activations
        (those the port has shown since they were planned stay its own)."""
        refs = node.arg_dict
        outs = [o for o in outs if not self.observes(refs[o])]
        if not outs:
            return
        args = {k: (np.asarray(v.get(self), np.float64) if isinstance(v, Ref) and v.group != "batch"
                    else (v.get(self) if isinstance(v, Ref) else v)) for k, v in node.args
                if k not in FORWARD_OUTPUTS[node.kernel]}
        res = run_kernel(ORACLE, node.kernel, args, np.float64)
        for o in outs:
            r = refs[o]
            dst = self.acts.raw(r.name)
            dst = dst if r.layer is None else dst[r.layer]
            dst[...] = res[o]

    # ------------------------------------------------------------------ backward
    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def backward(self):
        if self._loss is None:
            raise ModelError("backward() before forward()")
        B, T = self.inputs.shape
        self._observed = {o for o in self._observed if o[0] != "grads_acts"}
        try:
            self.mixed.backward(self._loss)
        except Exception as e:
            raise ModelError(f"{type(self.model).__name__}'s loss.backward() raised {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
        self._loss = None
        self.structure = self.structure + self.census.gradient_findings(self.entries)
        self._read(lambda e: e.param.grad, self.grads, self.mixed.scale)
        self._store(self.capture.grads, self.grads_acts, forward=False, scale=self.mixed.scale)
        # the C seeds dlosses with 1/(B*T): the mean over all positions
        self.grads_acts["losses"][...] = np.float32(1.0) / np.float32(B * T)
        self._derived.add(("grads_acts", "losses", None))

    # ------------------------------------------------------------------ update
    def update(self, lr, beta1, beta2, eps, weight_decay, t):
        """The port's optimizer step (its own hyperparameters: those are under test)."""
        torch = self.torch
        if self._mv_loaded:
            for e in self.entries:
                self.optimizer.state[self._stepped(e)]["step"] = torch.tensor(float(t - 1))
        # a parameter the loss does not depend on (the census's no-gradient finding): its
        # gradient is zero, as the C's would be, so that the update is the C's and is
        # checked as such (torch would skip it: no decay, no moment decay)
        for e in self.entries:
            if e.param.requires_grad and e.param.grad is None:
                e.param.grad = torch.zeros_like(e.param)
        self.mixed.step(self.optimizer)
        self.mixed.state_dtypes(self.optimizer, [self._stepped(e) for e in self.entries])
        stale = not_written_back(self.entries, self.masters)
        if stale:
            raise ModelError(stale)
        shapes = param_shapes(self.config)
        if self._mv is not None:     # the buffers the loaded moments were copied into
            self.m_memory, self.v_memory = self._mv["m"], self._mv["v"]
        elif self.m_memory is None:
            self.m_memory = np.zeros(self.num_parameters, np.float32)
            self.v_memory = np.zeros(self.num_parameters, np.float32)
        held = stepped(self.optimizer)
        for key, buf in (("exp_avg", self.m_memory), ("exp_avg_sq", self.v_memory)):
            # a parameter that got no gradient is skipped by the step: no state (zeros, as
            # the C's m and v start), or the state it was loaded with
            # one the optimizer was not given is not updated: read as no state (zeros), so
            # that the update's check fails where the C's updates it (pins.optimizer_pin
            # names it); one it holds without the state is not AdamW's
            missing = [e.names[0] for e in self.entries if key not in self.optimizer.state.get(self._stepped(e), {})
                       and e.param.grad is not None and id(self._stepped(e)) in held]
            if missing:
                raise ModelError(f"{type(self.optimizer).__name__} keeps no {key!r} for {missing[0]}: "
                                 "its moments cannot be read as AdamW's m and v")
            self._read(lambda e: self.optimizer.state.get(self._stepped(e), {}).get(key), point(buf, shapes))
        self._read(self._stepped, self.params)   # the masters where there are: what the next step starts from

    def drop_activations(self):
        """Drop the activations, their gradients and the captured tensors (the next
        forward makes them again); what an update needs stays."""
        self.acts = self.grads_acts = None
        self.capture.clear()

    def release(self):
        """Drop what a step left (activations and their gradients, captured tensors, the
        autograd graph, the gradients, m, v and the optimizer's state) until the next
        ``load_state``: run_parity checks one reference at a time. The parameters (the
        model's own and the C-layout copy) stay; what was observed is kept for the report."""
        self.drop_activations()
        self.m_memory = self.v_memory = self._mv = None
        self._loss = None
        self.model.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    # ------------------------------------------------------------------ what was seen
    def observes(self, ref: Ref) -> bool:
        """Whether the port itself produced ``ref`` (else the checks skip it)."""
        if ref.group in ("params", "grads", "batch"):
            return True
        return (ref.group, ref.name, ref.layer) in self._observed

    def has(self, ref: Ref) -> bool:
        """Observed, or derived from what was observed: usable as a replay's input."""
        return self.observes(ref) or (ref.group, ref.name, ref.layer) in self._derived

    def module_of(self, ref: Ref) -> str | None:
        if ref.group not in ("acts", "grads_acts"):
            return None
        return self.capture.points.get((ref.name, ref.layer))

    def precision_of(self, nodes, ref=None) -> "Precision | None":
        """The precision the port ran ``nodes`` at (one op, or the ops accumulating into a
        gradient buffer) writing ``ref``, observed on its first forward
        (harness.ports.precision); None where it ran all of them at float32 (the C's bounds
        apply unchanged)."""
        prof = self.mixed.profile
        if prof is None:
            return None
        p = prof.of_buffer(nodes, ref)
        return None if p.is_float32 else p

    def update_precision(self, label: str) -> "Precision | None":
        """The precision of its AdamW's ``params``/``m``/``v``; None at float32."""
        prof = self.mixed.profile
        p = None if prof is None else prof.update(label)
        return None if p is None or p.is_float32 else p

    def witness_precisions(self) -> dict:
        """Kernel -> the precision the witness must noise it at (empty: float32)."""
        return {} if self.mixed.profile is None else self.mixed.profile.witness()

    def held_settings(self) -> dict:
        """The AdamW settings its optimizer holds (``adamw`` argument name -> value), where
        every parameter group holds the same one: torch keeps them as Python floats
        (``betas=(0.9, 0.999)``), which the update check takes as given where they are the
        run's up to the C's float rounding (:meth:`pyref.config.AdamW.kernel_args`)."""
        groups = self.optimizer.param_groups
        found = {}
        for name, get in (("lr", lambda g: g.get("lr")), ("beta1", lambda g: (g.get("betas") or (None,))[0]),
                          ("beta2", lambda g: (g.get("betas") or (None, None))[1]),
                          ("eps", lambda g: g.get("eps")), ("weight_decay", lambda g: g.get("weight_decay"))):
            values = {float(v) for v in map(get, groups) if isinstance(v, (int, float)) or hasattr(v, "item")}
            if len(values) == 1 and len(groups) > 0:
                found[name] = values.pop()
        return found

    def precision_lines(self) -> list[str]:
        """What its first forward and its optimizer were seen to compute below float32."""
        return [] if self.mixed.profile is None else self.mixed.profile.lines()

    def not_observed(self) -> list[str]:
        """The C's activations (and gradients) this model does not show at a module boundary."""
        return unobserved(self.config, self.observes)
