"""What a torch model is made of, before any number: a structural census of its forward.

Hooks on every module count how often each one is called per forward and in which order;
after the backward, which parameters received no gradient. Against GPT-2's graph (the
module boundaries of the recognised families, :data:`.families.HOOKS`, and where a
model's names are its own, the modules found holding the mapped parameters,
:func:`.capture.anchors`: each called once per forward, in the graph's order) that gives
findings, each naming the module and the graph's op it stands for:

* ``structure.never-called``: a module of the graph the forward never calls (``ln_f``
  skipped, ``ln_2`` left out because ``ln_1`` feeds the MLP too);
* ``structure.called-more``: a module called more than once per forward (its first call
  is the one compared: the capture keeps it);
* ``structure.out-of-order``: a module called out of the graph's order (the fewest such:
  the longest run of modules in the graph's order is kept; an elementwise module such as
  an MLP's GELU module is the one named when it and a module swap places);
* ``structure.no-gradient``: a parameter the loss does not depend on (an unused ``wpe``);
* ``structure.unknown-module``: a module called in the forward that GPT-2's graph does
  not have (a rotary embedding, a parameterless rescale); a module holding parameters
  mapped to C tensors (a fused attention on raw ``nn.Parameter``s) computes their ops, and
  is part of the graph; so is a module its parent applies without calling it
  (``nn.MultiheadAttention``'s ``out_proj``: :meth:`.usage.Usage.bypassed`), never called
  by design, so never named as such.

The census also says which module was running when the forward raised
(:meth:`Census.running`), so that a model that fails inside its forward is told where.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pyref.config import GPT2Config

from .capture import anchors
from .families import BLOCK

# the recognised families' module boundaries, in the graph's order within a layer (or
# around the layers): (pattern, the graph's op it stands for)
_TOP_BEFORE = [(re.compile(r"(?:^|\.)wte$"), "encoder encoder_forward"),
               (re.compile(r"(?:^|\.)wpe$"), "encoder encoder_forward")]
_IN_LAYER = [(re.compile(BLOCK + r"ln_1$"), "ln1 layernorm_forward"),
             (re.compile(BLOCK + r"attn\.c_attn$"), "qkv matmul_forward"),
             (re.compile(BLOCK + r"attn\.c_proj$"), "attproj matmul_forward"),
             (re.compile(BLOCK + r"ln_2$"), "ln2 layernorm_forward"),
             (re.compile(BLOCK + r"mlp\.c_fc$"), "fc matmul_forward"),
             (re.compile(BLOCK + r"mlp\.(?:gelu|act|activation|act_fn)$"), "gelu gelu_forward"),
             (re.compile(BLOCK + r"mlp\.c_proj$"), "fcproj matmul_forward")]
# ops whose module a port may have or not (GELU as a module, or as a function): ordered
# and counted where the forward calls it, never missed where it does not
_OPTIONAL = {"gelu gelu_forward"}
_TOP_AFTER = [(re.compile(r"(?:^|\.)ln_f$"), "lnf layernorm_forward"),
              (re.compile(r"(?:^|\.)lm_head$"), "lm_head matmul_forward")]
# an activation that a module found by what it holds gives -> (before/in/after the layers,
# its rank within, the graph's op it stands for)
_ANCHOR_RANK = {"ln1": (1, 0, "ln1 layernorm_forward"), "qkv": (1, 1, "qkv matmul_forward"),
                "attproj": (1, 2, "attproj matmul_forward"), "ln2": (1, 3, "ln2 layernorm_forward"),
                "fch": (1, 4, "fc matmul_forward"), "fcproj": (1, 6, "fcproj matmul_forward"),
                "lnf": (2, 0, "lnf layernorm_forward"), "logits": (2, 1, "lm_head matmul_forward")}
# leaf modules GPT-2's graph is made of (or that compute nothing): anything else that a
# forward calls is not in the graph
_KNOWN_LEAVES = {"Embedding", "Linear", "LayerNorm", "Conv1D", "Dropout", "Identity", "GELU", "NewGELUActivation",
                 "GELUActivation", "FastGELUActivation", "GELUTanh", "PytorchGELUTanh", "Softmax", "Sequential",
                 "ModuleList", "ModuleDict"}


# an MLP's activation module by its attribute's name (:meth:`Census._known_gelus`)
_ACT_NAMES = {"gelu", "act", "activation", "act_fn"}


def _storage(t) -> int | None:
    """The address of a tensor's storage (a view shares it), or None for anything else."""
    import torch
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


# a C tensor -> the graph's op it is a parameter of (a parameter the loss does not depend on
# departs there, whatever module holds it: a ParameterDict's table)
_SLOT_OPS = {"wte": "encoder encoder_forward", "wpe": "encoder encoder_forward", "ln1": "ln1 layernorm_forward",
             "qkv": "qkv matmul_forward", "attproj": "attproj matmul_forward", "ln2": "ln2 layernorm_forward",
             "fc": "fc matmul_forward", "fcproj": "fcproj matmul_forward", "lnf": "lnf layernorm_forward"}


def _slot_op(slot) -> str | None:
    """The graph's op a C tensor (a mapping ``Slot``) is a parameter of, in its layer."""
    op = _SLOT_OPS.get(slot.name if slot.name in ("wte", "wpe") else slot.name[:-1])
    if op is None or slot.layer is None:
        return op
    return f"layer {slot.layer} {op}"


@dataclass(frozen=True)
class Finding:
    """One thing about a model that makes it differ from the C, found before or beside the
    numbers: ``id`` (``family.kind``, as a diagnosis's cause), the ``module`` (or tensor)
    it is about, the graph's op it stands for (``where``: ``layer 0 ln2
    layernorm_forward``), a one-line ``description`` and any ``values`` as data. It reads
    like a diagnosis's cause, in text and JSON."""

    id: str
    description: str
    module: str | None = None
    where: str | None = None
    values: dict = field(default_factory=dict)
    # the line of a torch port that makes it, once a step failed (harness.ports.pins.structure_pin)
    pin: object = field(default=None, compare=False)

    @property
    def family(self) -> str:
        return self.id.split(".")[0]

    @property
    def structural(self) -> bool:
        return self.family == "structure"

    def text(self) -> str:
        return f"{self.description} [{self.id}]"

    __str__ = text

    def __contains__(self, item: str) -> bool:   # `"eps 1e-06" in finding`, as of the text it was
        return item in self.text()

    def to_json(self) -> dict:
        return {"id": self.id, "family": self.family, "description": self.description, "module": self.module,
                "where": self.where, "values": dict(self.values), "text": self.text(),
                "pin": None if self.pin is None else self.pin.to_json()}


# the kinds of structural finding in the order a first divergence names them: a module the
# forward departs at (never called, called again, out of order, not in the graph) before a
# parameter without gradient
DEPARTURES = ("structure.never-called", "structure.called-more", "structure.out-of-order",
              "structure.unknown-module", "structure.no-gradient")


# findings that outrank no failing numeric check: a module outside the graph may compute
# nothing wrong (a port's own harmless module), so where a check fails, the numbers say first
# where the run departs; the finding stays one, shown beside
BESIDE = ("structure.unknown-module",)


def backward_of(op: str | None) -> str | None:
    """The graph op whose backward gives a forward op's parameters their gradient
    (``encoder encoder_forward`` -> ``encoder encoder_backward``), or None."""
    return f"{op.removesuffix('_forward')}_backward" if op and op.endswith("_forward") else None


def named_there(finding: Finding, failing) -> bool:
    """Whether a parameter without gradient is at the op whose failing check names a cause
    (a bias left out of a layer norm or a product: ``layernorm.no-bias``,
    ``matmul.no-bias``); the finding stays, shown beside."""
    d = getattr(failing, "diagnosis", None)
    return (finding.id == "structure.no-gradient" and d is not None and d.known
            and finding.where is not None and finding.where == failing.position)


def first_structure(findings, failing=None) -> Finding | None:
    """The structural finding a first divergence names (of a step's ``findings``, or
    None): the first by :data:`DEPARTURES`, then in the order the census found them; with
    ``failing`` (the failing check a first divergence would name, or None), none of
    :data:`BESIDE`."""
    # parameters without gradient, one of them where the failing check names a cause: the
    # same mistake in each layer, the cause saying more
    named = any(named_there(f, failing) for f in findings or ())
    found = [f for f in findings or () if f.structural and (failing is None or f.id not in BESIDE)
             and not (named and f.id == "structure.no-gradient")]
    found.sort(key=lambda f: DEPARTURES.index(f.id) if f.id in DEPARTURES else len(DEPARTURES))
    return found[0] if found else None


class Census:
    """Counts, per forward, every module's calls (forward pre-hooks on all of them) and
    keeps the stack of modules running, for an error's whereabouts."""

    def __init__(self, model, cfg: GPT2Config, entries=(), bypassed=()):
        self.model = model
        self.bypassed = set(bypassed)     # modules whose parameters their parent applies (:mod:`.usage`)
        self.cfg = cfg
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self.stack: list[str] = []
        self.handles = []
        self.graph = self._graph_modules(model, cfg)     # name -> (rank, graph op)
        self.mapped = {id(e.param) for e in entries}     # the parameters holding C tensors
        self._anchored(model, cfg, entries)
        # the tensors the graph's fcproj modules multiply, and the outputs of the modules holding
        # no parameter (a GELU module of the port's own is the one whose output they multiply)
        self._projections = {n for n, (_, op) in self.graph.items() if op.endswith("fcproj matmul_forward")}
        self._bare = {n for n, m in model.named_modules() if m is not model and not any(True for _ in m.children())
                      and not any(True for _ in m.parameters(recurse=False))}
        self._fed: dict[str, set] = {}
        self._outs: dict[str, int] = {}
        for name, module in model.named_modules():
            if module is model:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._exit(name)))

    # ------------------------------------------------------------------ recording
    def _enter(self, name):
        def pre(mod, args):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.order.append(name)
            if name in self._projections and name not in self._fed:
                self._fed[name] = {p for p in map(_storage, args) if p is not None}
            self.stack.append(name)
        return pre

    def _exit(self, name):
        def post(mod, args, out):
            if name in self._bare and name not in self._outs:
                self._outs[name] = _storage(out)
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
        return post

    def clear(self):
        self.calls.clear()
        self.order.clear()
        self.stack.clear()
        self._fed.clear()
        self._outs.clear()

    def running(self) -> str | None:
        """The innermost module running (after an exception inside the forward: the module
        that raised, or the one whose code did)."""
        return self.stack[-1] if self.stack else None

    # ------------------------------------------------------------------ the graph
    @staticmethod
    def _graph_modules(model, cfg: GPT2Config) -> dict[str, tuple[tuple, str]]:
        """The model's modules that stand for an op of GPT-2's graph: name -> (rank in the
        graph's order, the op's label)."""
        out = {}
        for name, _ in model.named_modules():
            for k, (pattern, op) in enumerate(_TOP_BEFORE):
                if pattern.search(name) and not re.search(BLOCK, name + "."):
                    out[name] = ((0, 0, 0), op)
            for k, (pattern, op) in enumerate(_IN_LAYER):
                m = pattern.search(name)
                if m and int(m.group(1)) < cfg.num_layers:
                    layer = int(m.group(1))
                    out[name] = ((1, layer, k), f"layer {layer} {op}")
            for k, (pattern, op) in enumerate(_TOP_AFTER):
                if pattern.search(name) and not re.search(BLOCK, name + "."):
                    out[name] = ((2, 0, k), op)
        return out

    def _anchored(self, model, cfg: GPT2Config, entries) -> None:
        """The graph's modules found by what they hold (:func:`.capture.anchors`), for the
        ops no recognised name stands for: the module giving an op's output (each of
        separate q, k, v projections) stands for the op."""
        named = {op for _, op in self.graph.values()}
        for (act, layer), group in anchors(model, cfg, entries).items():
            rank = _ANCHOR_RANK.get(act)
            if rank is None or group[0][1] != "out":
                continue
            top, k, op = rank
            label = op if top != 1 else f"layer {layer} {op}"
            if label in named:
                continue
            if all(mname in self.bypassed for mname, _ in group):
                continue    # never called by design: nn.MultiheadAttention applies its out_proj's weight itself
            for mname, _ in group:
                self.graph.setdefault(mname, ((top, layer or 0, k), label))

    # ------------------------------------------------------------------ findings
    def forward_findings(self) -> list[Finding]:
        """What the last forward's calls say against GPT-2's graph."""
        self._known_gelus()
        found = []
        for name, (rank, op) in sorted(self.graph.items(), key=lambda x: x[1][0]):
            n = self.calls.get(name, 0)
            if n == 0 and op.split(" ", 2)[-1] in _OPTIONAL:
                continue
            if n == 0:
                found.append(Finding("structure.never-called", f"{name} is never called in the forward (the graph's "
                                     f"{op} is missing)", name, op, {"calls": 0}))
            elif n > 1:
                found.append(Finding("structure.called-more", f"{name} is called {n} times per forward, the graph's "
                                     f"{op} once (its first call is the one compared){self._early(name)}", name, op,
                                     {"calls": n}))
        found += self._order_findings()
        found += self._unknown_modules()
        return found

    def _early(self, name: str) -> str:
        """Where a module called more than once is first called before a module the graph
        runs before it (ln_f inside the blocks' loop): the words naming that module's op, the
        first whose input the early call can have made; else nothing."""
        rank = self.graph[name][0]
        at = self.order.index(name) if name in self.order else None
        later = [n for n in self.order[at + 1:] if n in self.graph and self.graph[n][0] < rank] if at is not None else []
        return f"; its first runs before {self.graph[later[0]][1]}, the first op it can feed" if later else ""

    def _known_gelus(self) -> None:
        """The modules holding no parameter that are the graph's GELU (as an optional op of
        their layer, :data:`_OPTIONAL`): by use, the one whose output a layer's fcproj module
        multiplies (``fch_gelu``, whatever it computes); else by name, a class named for a
        GELU or an ``act``/``activation`` inside the module holding the layer's fc and
        fcproj (its MLP)."""
        layers = {n: rank[1] for n, (rank, op) in self.graph.items() if rank[0] == 1
                  and op.endswith(("fc matmul_forward", "fcproj matmul_forward"))}
        modules = dict(self.model.named_modules())
        for name in self._bare:
            if name in self.graph or name not in self.calls:
                continue
            fed = [layers[p] for p, ptrs in self._fed.items() if self._outs.get(name) in ptrs and p in layers]
            parent, _, attr = name.rpartition(".")
            mlp = {layers[n] for n in layers if n.startswith(parent + ".")} if parent else set()
            named = "gelu" in type(modules[name]).__name__.lower() or attr.lower() in _ACT_NAMES
            layer = fed[0] if fed else (next(iter(mlp)) if named and len(mlp) == 1 else None)
            if layer is not None:
                self.graph[name] = ((1, layer, 5), f"layer {layer} gelu gelu_forward")

    def _order_findings(self) -> list[Finding]:
        """The modules called out of the graph's order: the fewest whose removal leaves the
        rest in order (the others, the longest run in the graph's order, are kept; among as
        long runs, one that keeps a module rather than an elementwise one (GELU), then the
        modules called first). Each is named with a kept module it ran after, or, called too
        early, before; they are listed in the graph's order (of two norms swapped, the one
        the graph runs first is the first departure)."""
        firsts: list[str] = []
        for name in self.order:
            if name in self.graph and name not in firsts:
                firsts.append(name)
        rank = [self.graph[n][0] for n in firsts]
        optional = [self.graph[n][1].split(" ", 2)[-1] in _OPTIONAL for n in firsts]
        # the longest non-decreasing run of ranks (scored: length, then fewer optional kept);
        # on ties the earliest predecessor (the modules called first are kept)
        score, prev = [], []
        for i in range(len(firsts)):
            best, arg = (1, -int(optional[i])), None
            for j in range(i):
                if rank[j] <= rank[i]:
                    cand = (score[j][0] + 1, score[j][1] - int(optional[i]))
                    if cand > best:
                        best, arg = cand, j
            score.append(best)
            prev.append(arg)
        kept: set[int] = set()
        i = max(range(len(firsts)), key=lambda k: (score[k], -k), default=None)
        while i is not None:
            kept.add(i)
            i = prev[i]
        out = []
        for i, name in enumerate(firsts):
            if i in kept:
                continue
            r, op = rank[i], self.graph[name][1]
            after = [(rank[j], firsts[j]) for j in kept if j < i and rank[j] > r]
            if after:
                other = min(after)[1]
                out.append(Finding("structure.out-of-order", f"{name} is called after {other}; the graph runs "
                                   f"{op} before {self.graph[other][1]}", name, op, {"after": other}))
                continue
            before = [firsts[j] for j in sorted(kept) if j > i and rank[j] < r]
            other = before[0] if before else None
            out.append(Finding("structure.out-of-order", f"{name} is called before {other}; the graph runs "
                               f"{op} after {self.graph[other][1] if other else 'it'}", name, op, {"before": other}))
        return sorted(out, key=lambda f: self.graph[f.module][0])

    def _computes_graph_ops(self, module) -> bool:
        """Whether ``module`` holds parameters that hold C tensors (a fused attention on raw
        ``nn.Parameter``s, ``F.linear`` on its qkv and projection weights): it computes
        those tensors' ops, so it is part of the graph even where no single op stands for
        it (its ops are compared by value, :mod:`.finder`)."""
        own = [id(p) for p in module.parameters(recurse=False)]
        return bool(own) and all(p in self.mapped for p in own)

    def _unknown_modules(self) -> list[Finding]:
        """The leaf modules the forward calls that GPT-2's graph does not have: not a
        module of the graph, not a kind it is made of, holding no C tensor."""
        out = []
        modules = dict(self.model.named_modules())
        for name in dict.fromkeys(self.order):
            module = modules.get(name)
            if (module is None or name in self.graph or any(True for _ in module.children())
                    or self._computes_graph_ops(module)):
                continue
            kind = type(module).__name__
            if kind in _KNOWN_LEAVES or kind.endswith(("Activation", "Dropout")):
                continue
            out.append(Finding("structure.unknown-module", f"{name} ({kind}) is called in the forward; GPT-2's graph "
                               "has no such op", name, None, {"type": kind}))
        return out

    def gradient_findings(self, entries) -> list[Finding]:
        """Parameters that received no gradient from the backward (the loss does not
        depend on them): each a finding naming the parameter and the C tensor it holds."""
        out = []
        for e in entries:
            if e.param.requires_grad and e.param.grad is None:
                module = e.names[0].rpartition(".")[0] or e.names[0]
                op = self.graph.get(module, (None, None))[1] or _slot_op(e.slot)
                back = f", from {backward_of(op)}" if backward_of(op) else ""
                out.append(Finding("structure.no-gradient", f"{e.names[0]} receives no gradient: the loss does not "
                                   f"depend on it (the C's {e.slot} has one{back})", module, op,
                                   {"parameter": e.names[0], "tensor": str(e.slot)}))
        return out
