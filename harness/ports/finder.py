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
What the port computes by a mapped parameter (a product's output, the tensor it multiplies:
the attention's output at no boundary) is taken by use before any value is sought, and
whatever its values (:meth:`.usage.Usage.sites`, the one home of that rule).
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


def _mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Watch(TorchDispatchMode):
        """Counts the dispatched ops' outputs; keeps those ``want(index, tensor)`` says."""

        def __init__(self, want):
            super().__init__()
            self.want = want
            self.count = 0
            self.kept: dict[int, object] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    if t.dtype.is_floating_point and self.want(self.count, t):
                        self.kept[self.count] = t
                    self.count += 1
            return out

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
        self._watch = _mode_class()(want)
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
        capture.points[key] = f"{self._where.get(key, 'the forward')} (found by value)"
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
        for node, ref in self.sought:
            inputs = [r for k, r in node.args if isinstance(r, Ref) and k not in FORWARD_OUTPUTS[node.kernel]]
            if state.observes(ref) or not all(state.has(r) for r in inputs):
                continue
            hit = self._match(node, ref, state, watch.kept)
            if hit is None:
                continue
            i, k = hit
            key = (ref.name, ref.layer)
            self.positions[key] = (i, k)
            self._where[key] = f"op {i} of the forward"
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
