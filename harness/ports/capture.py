"""Which activations a torch model shows, and their gradients: forward hooks at the module
boundaries of the recognised families (:data:`.families.HOOKS`); where a model's module
names are its own, at the boundaries of the modules that hold the mapped parameters (the
module holding ``attprojw[l]`` takes ``atty`` in and gives ``attproj``; separate q, k, v
projections give the qkv in three pieces, joined: :func:`anchors`); tensor hooks for the
gradients; and, for a model built from protocol-named forward kernels of its own module
(the walkthrough's ``layernorm_forward(x, w, b)`` ...), each kernel call that follows the
C's forward order. What a model does not show is listed as not observed, and the checks
skip it."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from pyref.config import GPT2Config
from pyref.protocol import FORWARD_KERNELS, FORWARD_OUTPUTS

from ..graph import forward_nodes
from .families import HOOKS
from .loader import USER_MODULE_PREFIX


def _first_tensor(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


class Capture:
    """Forward hooks on the model's modules; tensor hooks for the gradients."""

    def __init__(self, model, cfg: GPT2Config, entries=()):
        self.points: dict[tuple[str, int | None], str] = {}   # (act, layer) -> module name
        self.values: dict = {}
        self.grads: dict = {}
        self.handles = []
        self.pieces: dict = {}      # (act, layer) -> [the pieces' values], [their grads]
        for mname, module in model.named_modules():
            for pattern, side, act in HOOKS:
                m = pattern.search(mname)
                if not m:
                    continue
                layer = int(m.group(1)) if m.groups() else None
                if act == "encoded":
                    if layer != 0:
                        continue
                    layer = None
                if layer is not None and layer >= cfg.num_layers:
                    continue
                key = (act, layer)
                if key in self.points:
                    continue
                self.points[key] = mname + (" input" if side == "in" else "")
                self.handles.append(self._hook(module, side, key))
        modules = dict(model.named_modules())
        # whether a module found by what it holds shows any activation, or one holds the C
        # tensors of several ops (a fused attention on raw parameters): either way, names
        # do not show every activation, and what none shows is sought by value
        self.anchored = bool(fused_holders(model, entries))
        for key, group in anchors(model, cfg, entries).items():
            if key in self.points:
                continue
            self.anchored = True
            side = group[0][1]
            self.points[key] = _shown(group) + (" input" if side == "in" else "")
            for k, (mname, _) in enumerate(group):
                self.handles.append(self._hook(modules[mname], side, key, (k, len(group)) if len(group) > 1 else None))

    def _hook(self, module, side, key, piece=None):
        def grab(t):
            if t is None or key in self.values:
                return     # a module called again: the graph means its first call (the census says so)
            if piece is not None:
                return self._piece(key, piece, t)
            self.values[key] = t.detach().clone()
            if t.requires_grad:
                t.register_hook(lambda g: self.grads.__setitem__(key, g.detach().clone()))

        if side == "in":
            def pre(mod, args, kwargs):
                grab(_first_tensor(args) if args else _first_tensor(next(iter(kwargs.values()), None)))
            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(mod, args, out):
            grab(_first_tensor(out))
        return module.register_forward_hook(post)

    def _piece(self, key, piece, t):
        """One of q, k, v (``piece``: its index, how many): the C's qkv once all are in,
        its gradient once all theirs are."""
        import torch
        k, n = piece
        vals, grads = self.pieces.setdefault(key, ({}, {}))
        if k in vals:
            return
        vals[k] = t.detach().clone()
        if len(vals) == n:
            self.values[key] = torch.cat([vals[i] for i in range(n)], -1)

        def grad(g):
            grads[k] = g.detach().clone()
            if len(grads) == n:
                self.grads[key] = torch.cat([grads[i] for i in range(n)], -1)
        if t.requires_grad:
            t.register_hook(grad)

    def clear(self):
        self.values.clear()
        self.grads.clear()
        self.pieces.clear()

    # -- kernel calls: a model built from protocol-named functions (the walkthrough's style)
    def kernel_calls(self, model, cfg: GPT2Config):
        """A context in which the forward kernels the model's own module defines are
        recorded call by call; on exit, the calls that follow the C's forward order are
        taken as its activations (and their gradients hooked)."""
        module = sys.modules.get(type(model).__module__)
        names = [k for k in FORWARD_KERNELS if callable(getattr(module, k, None))] if module else []
        calls: list = []

        def recorder(kernel, f):
            def call(*args, **kwargs):
                out = f(*args, **kwargs)
                calls.append((kernel, out))
                return out
            return call

        @contextlib.contextmanager
        def ctx():
            saved = {k: getattr(module, k) for k in names}
            try:
                for k, f in saved.items():
                    setattr(module, k, recorder(k, f))
                yield
            finally:
                for k, f in saved.items():
                    setattr(module, k, f)
            # a file loaded by path has a generated module name: show the file's
            where = module.__name__ if module else ""
            if module is not None and where.startswith(USER_MODULE_PREFIX) and getattr(module, "__file__", None):
                where = Path(module.__file__).stem
            self._take_calls(calls, cfg, where)
        return ctx()

    def _take_calls(self, calls, cfg, where):
        for node, (kernel, out) in zip(forward_nodes(cfg), calls):
            if node.kernel != kernel:
                break   # the calls no longer follow the C's graph: the rest is not observed
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for oname, t in zip(FORWARD_OUTPUTS[kernel], outs):
                ref = node.arg_dict[oname]
                key = (ref.name, ref.layer)
                if key in self.values or _first_tensor(t) is None:
                    continue
                self.points[key] = f"{where}.{kernel} call"
                self.values[key] = t.detach().clone()
                if t.requires_grad:
                    t.register_hook(lambda g, key=key: self.grads.__setitem__(key, g.detach().clone()))


# ----------------------------------------------------------------------------- anchors: modules by what they hold

# a C weight -> the activations of its op at its module's boundary: (side, act, layer offset);
# a layernorm's input is the residual stream (block 0's: encoded; else the last block's output)
_ANCHORS = {
    "ln1w": (("out", "ln1", 0), ("in", "residual3", -1)),
    "qkvw": (("out", "qkv", 0),),
    "attprojw": (("in", "atty", 0), ("out", "attproj", 0)),
    "ln2w": (("in", "residual2", 0), ("out", "ln2", 0)),
    "fcw": (("out", "fch", 0),),
    "fcprojw": (("in", "fch_gelu", 0), ("out", "fcproj", 0)),
    "lnfw": (("in", "residual3", None), ("out", "lnf", 0)),
}


def fused_holders(model, entries) -> list[str]:
    """The modules holding C tensors whose boundary is no single op's (:func:`_own_op`): an
    attention's qkv and projection weights as raw ``nn.Parameter``s, the ops between them
    inside its forward, at no module's boundary."""
    by_id = {id(e.param): e for e in entries}
    out = []
    for e in entries:
        for name in e.names:
            owned = _owner(model, name)
            if owned is not None and owned[1] not in out and not _own_op(owned[0], e, by_id):
                out.append(owned[1])
    return out


def _owner(model, name: str):
    """(the module holding parameter ``name`` directly, its name), or None where that is
    the model itself (the walkthrough's stacked tensors: its kernel calls show them)."""
    mname = name.rpartition(".")[0]
    return (model.get_submodule(mname), mname) if mname else None


def _own_op(module, entry, by_id) -> bool:
    """Whether ``module``'s boundary is ``entry``'s op alone: its own parameters all hold
    that op's weight and bias (an nn.Linear, an nn.LayerNorm), and it has no submodules."""
    if any(True for _ in module.children()):
        return False
    stem = entry.slot.name[:-1]
    for p in module.parameters(recurse=False):
        other = by_id.get(id(p))
        if other is None or other.slot.name[:-1] != stem or other.slot.layer != entry.slot.layer:
            return False
    return True


def anchors(model, cfg: GPT2Config, entries) -> dict[tuple[str, int | None], list[tuple[str, str]]]:
    """(act, layer) -> [(module name, "in"/"out")]: where the graph's activations are at
    the boundaries of the modules holding the mapped parameters, whatever their names;
    several modules (separate q, k, v) for the pieces of one, in row order. The tied head
    (a module other than the embedding holding ``wte``) gives the logits."""
    L = cfg.num_layers
    by_id = {id(e.param): e for e in entries}
    out: dict = {}
    for e in entries:
        for name in e.names:
            owned = _owner(model, name)
            if owned is None or not _own_op(owned[0], e, by_id):
                continue
            module, mname = owned
            if e.slot.name == "wte":
                if not isinstance(module, _embedding_types()):
                    out.setdefault(("logits", None), {})[0] = (mname, "out")
                continue
            if e.slot.layer is None and e.slot.name in LAYER_PARAMS_W:
                break    # a stacked (L, ...) tensor: no module per layer
            for side, act, offset in _ANCHORS.get(e.slot.name, ()):
                layer = e.slot.layer
                if act == "residual3" and offset is None:
                    layer = L - 1
                elif offset == -1:
                    act, layer = ("encoded", None) if layer == 0 else (act, layer - 1)
                out.setdefault((act, layer), {})[e.slot.rows[0] if e.slot.rows else 0] = (mname, side)
            break
    return {k: [v[r] for r in sorted(v)] for k, v in out.items() if len({s for _, s in v.values()}) == 1}


LAYER_PARAMS_W = ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw")


def _embedding_types():
    import torch
    return (torch.nn.Embedding,)


def _shown(group: list[tuple[str, str]]) -> str:
    """A group's modules as one name: ``layers.0.attn.q_proj+k_proj+v_proj``."""
    names = [m for m, _ in group]
    if len(names) == 1:
        return names[0]
    stem = names[0].rpartition(".")[0]
    return stem + "." + "+".join(n.rpartition(".")[2] for n in names)
