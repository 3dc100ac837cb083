"""The graph's activations a torch port computes but shows at no module boundary, found by
value.

Where a model's names are its own (:mod:`.capture`'s anchors, or names only in part),
some of the graph's activations are no module's input or output: a layer norm's mean and
rstd (``aten.native_layer_norm``'s second and third outputs), attention's softmax, a
residual stream summed inside a functional block. On the first forward every op's output
of a wanted size is kept, at torch's dispatch level (a ``TorchDispatchMode``, the
recorder's kind: :mod:`.record`); after it, each activation not yet observed is looked
for among them, in the graph's order, as the float64 oracle of its op on the port's own
inputs (those observed, or found before it), up to a layout (:func:`.record.layouts`:
views, heads split or merged) within :data:`.record.MATCH_BOUND`. A found one is then
taken at the same op's position (its index in the forward's dispatched ops) on every step,
its gradient by a tensor hook, both in the C's layout.

Found only where the port's op is right: a wrong one is not found and stays not observed
(the module boundaries, :mod:`.capture`, show the tensors a wrong op is then judged on).
``preatt`` is not looked for: the C leaves its upper triangle unwritten, a port's holds
-inf there; nor is the gradient of attention's softmax (the C's is zero above the
diagonal, a port's is not).
"""
from __future__ import annotations

import numpy as np

from pyref.config import GPT2Config, act_shapes
from pyref.protocol import FORWARD_OUTPUTS, run_kernel

from ..arbiter.oracle import ORACLE
from ..graph import Ref, forward_nodes
from .record import MATCH_BOUND, Stage, distance, layouts

# the graph's activations never looked for by value (see the module's docstring)
_NOT_SOUGHT = {"preatt"}
# found, but their gradient is not the C's: the C's datt is zero above the diagonal, a
# port's softmax output, multiplied by v, gets a gradient there too
_NO_GRAD = {"att"}


# dispatched ops that give a view of their one tensor input: a weight read through them
# (``F.linear``'s ``aten.t``) is still the weight
_VIEWS = {"aten.t.default", "aten.view.default", "aten._unsafe_view.default", "aten.transpose.int",
          "aten.permute.default", "aten.expand.default", "aten.unsqueeze.default", "aten.alias.default",
          "aten.detach.default", "aten.reshape.default", "aten.squeeze.dim", "aten.slice.Tensor"}


def _mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class Watch(TorchDispatchMode):
        """Counts the dispatched ops' outputs; keeps those ``want(index, tensor)`` says.
        With ``graph``, also each op's reads (:attr:`reads`: output index -> (the indices of
        the outputs it read, the ids of the tensors made before it that it read, through
        views: the parameters), for :meth:`Finder.find`'s rule by use."""

        def __init__(self, want, graph: bool = False):
            super().__init__()
            self.want = want
            self.count = 0
            self.kept: dict[int, object] = {}
            self.reads: dict[int, tuple[tuple[int, ...], frozenset]] = {}
            self.graph = graph
            self._made = WeakIdKeyDictionary()     # tensor -> its output index
            self._leaves: dict[int, frozenset] = {}  # output index -> the leaves it is a view of

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            reads = self._reads(func, args, kwargs) if self.graph else None
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    if t.dtype.is_floating_point and self.want(self.count, t):
                        self.kept[self.count] = t
                    if reads is not None:
                        self.reads[self.count] = reads[:2]
                        if reads[2]:
                            self._leaves[self.count] = reads[1]
                        self._made[t] = self.count
                    self.count += 1
            return out

        @property
        def views(self):
            """The output indices that are views of tensors made before the forward."""
            return self._leaves.keys()

        def _reads(self, func, args, kwargs):
            made, leaves = [], set()
            tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            for t in tensors:
                i = self._made.get(t)
                if i is None:
                    leaves.add(id(t))
                elif i in self._leaves:
                    leaves |= self._leaves[i]
                else:
                    made.append(i)
            view = str(func) in _VIEWS and len(tensors) == 1 and not made
            return tuple(made), frozenset(leaves), view

    return Watch


class Finder:
    """Finds a port's unshown activations by value on its first forward, and takes them at
    the same ops on every forward after (:meth:`watch`, :meth:`find`)."""

    def __init__(self, cfg: GPT2Config, shown: set):
        self.cfg = cfg
        self.sought = [(n, r) for n in forward_nodes(cfg) for o in FORWARD_OUTPUTS[n.kernel]
                       if isinstance(r := n.arg_dict[o], Ref) and (r.name, r.layer) not in shown
                       and r.name not in _NOT_SOUGHT]
        self.positions: dict[tuple, tuple[int, int]] = {}   # (act, layer) -> (op index, layout index)
        self.first = True
        self._watch = None
        self._bt = (1, 1)
        self._where: dict = {}

    @property
    def active(self) -> bool:
        return bool(self.sought) and (self.first or bool(self.positions))

    def watch(self, B: int, T: int):
        """The mode to run a forward under: on the first, keeping every output of a sought
        size; after, the outputs at the found positions."""
        import contextlib
        self._bt = (B, T)
        if not self.active:
            self._watch = None
            return contextlib.nullcontext()
        if self.first:
            shapes = act_shapes(self.cfg, B, T)
            sizes = {int(np.prod(shapes[r.name][1:] if r.layer is not None else shapes[r.name]))
                     for _, r in self.sought}
            want = lambda i, t: t.numel() in sizes      # noqa: E731
        else:
            at = {i for i, _ in self.positions.values()}
            want = lambda i, t: i in at                 # noqa: E731
        self._watch = _mode_class()(want, graph=self.first)
        return self._watch

    def take(self, capture) -> None:
        """After a later forward: the found activations into ``capture`` (values, and a
        hook for each one's gradient), in the C's layout."""
        if self.first or self._watch is None:
            return
        for key, (i, k) in self.positions.items():
            t = self._watch.kept.get(i)
            if t is not None and key not in capture.values:
                self._into(capture, key, t, k)
        self._watch = None

    def _into(self, capture, key, t, k):
        import torch
        shape = tuple(act_shapes(self.cfg, *self._bt)[key[0]])
        shape = shape[1:] if key[1] is not None else shape
        relaid = lambda x: torch.from_numpy(np.ascontiguousarray(                       # noqa: E731
            layouts(x.detach().to(torch.float32).numpy(), shape)[k]))
        capture.values[key] = relaid(t)
        where = self._where.get(key, "the forward")
        capture.points[key] = where if where.endswith(")") else f"{where} (found by value)"
        if t.requires_grad and key[0] not in _NO_GRAD:
            t.register_hook(lambda g: capture.grads.__setitem__(key, relaid(g)))

    def find(self, state) -> list[tuple]:
        """After the first forward (its observed activations stored in ``state``): each
        sought activation among the kept outputs, in the graph's order; the found ones
        into ``state.capture`` and their positions kept. The keys found."""
        watch, self._watch, self.first = self._watch, None, False
        if watch is None:
            return []
        self._where = {}
        found = []
        nodes = forward_nodes(self.cfg)
        for node, ref in self.sought:
            inputs = [r for k, r in node.args if isinstance(r, Ref) and k not in FORWARD_OUTPUTS[node.kernel]]
            if state.observes(ref):
                continue
            # what the port multiplies by the C's weight is the activation, whatever its
            # values; by value only where no such op is
            hit, where = _by_use(node, ref, nodes, state, watch)
            if hit is None and all(state.has(r) for r in inputs):
                hit = self._match(node, ref, state, watch.kept)
            if hit is None:
                continue
            i, k = hit
            key = (ref.name, ref.layer)
            self.positions[key] = (i, k)
            self._where[key] = f"op {i} of the forward" if where is None else where
            self._into(state.capture, key, watch.kept[i], k)
            state._store({key: state.capture.values[key]}, state.acts, forward=True)
            found.append(key)
        return found

    def _match(self, node, ref, state, kept) -> tuple[int, int] | None:
        """(op index, layout index) of the first kept output that is the oracle's ``ref``
        on the port's own inputs, or None."""
        args = {k: (np.asarray(v.get(state), np.float64) if isinstance(v, Ref) and v.group != "batch"
                    else (v.get(state) if isinstance(v, Ref) else v))
                for k, v in node.args if k not in FORWARD_OUTPUTS[node.kernel]}
        out = run_kernel(ORACLE, node.kernel, args, np.float64)
        name = next(o for o in FORWARD_OUTPUTS[node.kernel] if node.arg_dict[o] == ref)
        stage = Stage(ref.name, ref.name, np.asarray(out[name], np.float64))
        for i, t in kept.items():
            a = t.detach().to(dtype=t.dtype).float().numpy().astype(np.float64)
            if distance(a, stage) > MATCH_BOUND:
                continue
            ds = [distance(x, stage, lambda x, s: [x]) for x in layouts(a, stage.value.shape)]
            return i, int(np.argmin(ds))
        return None


# ----------------------------------------------------------------------------- found by use

def _by_use(node, ref, nodes, state, watch) -> tuple[tuple[int, int] | None, str | None]:
    """((op index, layout index), where) of an activation that no value finds (the port's
    op is wrong, or not at float32), taken where the port's matmul with the C's weight
    reads or writes it: a matmul's output (or a layer norm's) is the last op reading the
    node's weight or bias, its input the tensor the first op reading the weight multiplies
    by it (the attention's output, at no module boundary, is what the port projects by
    ``attprojw``). A matmul holds both with its last axis the C's (the weight's), rows
    flattened: the C's layout up to a view. (None, None) where no such op is."""
    size = int(np.prod(np.shape(ref.get(state))))
    last = np.shape(ref.get(state))[-1]
    if _params(node):
        if any(e.slot.rows for e in state.entries if (e.slot.name, e.slot.layer) in _params(node)):
            return None, None       # separate q, k, v: no one op makes the whole
        ids = _param_ids(node, state)
        hits = [i for i, (_, leaves) in watch.reads.items() if leaves & ids and i in watch.kept and i not in watch.views
                and watch.kept[i].numel() == size and watch.kept[i].shape[-1] == last]
        if hits:
            return (max(hits), 0), f"op {max(hits)} of the forward (found by use of {_named_param(node)})"
        return None, None
    user = next((n for n in nodes if n.arg_dict.get("inp") == ref and _params(n) and n.kernel == "matmul_forward"), None)
    if user is None:
        return None, None
    weight = _param_ids(user, state, ("weight",))
    for i in sorted(watch.reads):
        made, leaves = watch.reads[i]
        if not leaves & weight or i in watch.views:
            continue
        for j in made:
            t = watch.kept.get(j)
            if t is not None and t.numel() == size and t.shape[-1] == last:
                return (j, 0), f"op {j} of the forward (found by use: the input of {_named_param(user, 'weight')})"
        return None, None       # the first op reading the weight does not multiply the activation
    return None, None


def _params(node, args=("weight", "bias")) -> set[tuple]:
    """The (name, layer) of the node's parameters (its ``args``)."""
    return {(r.name, r.layer) for k, r in node.args if k in args and isinstance(r, Ref) and r.group == "params"}


def _param_ids(node, state, args=("weight", "bias")) -> frozenset:
    """``id`` of the port's parameters holding the node's C tensors (its ``args``)."""
    want = _params(node, args)
    return frozenset(id(e.param) for e in state.entries if (e.slot.name, e.slot.layer) in want)


def _named_param(node, arg="weight") -> str:
    r = node.arg_dict[arg]
    return f"{r.name}[{r.layer}]" if r.layer is not None else r.name
