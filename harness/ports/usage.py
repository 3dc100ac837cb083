"""Where names do not place a parameter: its use in the forward.

A port's forward is run once, small (one sequence of a few tokens, ``torch.no_grad()``, the
random state kept), under a dispatch mode (:class:`Usage`, the recorder's kind:
:mod:`.record`) that follows each parameter through the views taken of it (``t``,
``transpose``, ``permute``, ``view``, an ``einsum``'s reshapes, a cast) to the first op
that consumes it, and notes how: the weight of a matrix product (which operand, so which
of its axes is the product's input and which its output: an ``nn.Linear``'s (out, in) or
a ``Conv1D``'s (in, out)), the bias added to such a product (in ``addmm`` or by an
``add``), a layer norm's weight or bias (``native_layer_norm``'s arguments 2 and 3, or a
hand-written norm's ``* gain`` and the ``+ shift`` after it), an embedding's table
(indexed by the tokens given, or by positions). It notes too which modules the forward
calls, so that a module whose parameters its parent's code reads (``nn.MultiheadAttention``
applies its ``out_proj``'s weight with ``F.linear``, never calling ``out_proj``) is known
as bypassed.

:meth:`Usage.proposals` turns the uses into C tensors, in the order the forward consumes
them (:func:`harness.ports.mapping.map_parameters` takes them where no name placed a
parameter; a name still wins):

* the table indexed by the tokens is ``wte``, by anything else ``wpe``; a (V, C) matrix
  applied to the stream (the head) is ``wte``;
* a product's weight by its (in, out) sizes: (C, 3C) the qkv, (C, 4C) the MLP's fc,
  (4C, C) its projection, the k-th of each in the forward's order is layer k's; a (C, C)
  is attention's projection where the layers have a (C, 3C) qkv, else of each layer's four
  (C, C) the three applied to the same input are q, k, v (in the order used: the rows of
  the C's qkv) and the other the projection;
* the layer norms' weights in the order used: layer l's ``ln1``, ``ln2`` are the 2l-th and
  (2l+1)-th, ``lnf`` the last (only where there are 2L + 1 of them);
* a bias is its product's or its norm's (``fcb[l]`` of ``fcw[l]``'s product).

What this cannot settle (a count that is not the model's, a forward that raises) is left to
the shapes and then refused, naming what to map.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pyref.config import GPT2Config

from .torchmodel import call_model

# ops that give a view (or a copy) of their first argument: a parameter seen through them is
# still that parameter; those that keep part of it only (a slice) are "partial"
_VIEWS = {"t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze",
          "alias", "detach", "clone", "_to_copy", "lift_fresh", "numpy_T", "mT", "contiguous"}
_PARTIAL = {"slice", "select", "narrow", "split", "chunk", "unbind", "split_with_sizes", "as_strided"}
# matrix products: (position of the left operand, of the right one)
_MATMULS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "matmul": (0, 1)}
_ADDS = {"add", "add_"}
_MULS = {"mul", "mul_"}
_DIVS = {"div", "div_"}
_DROPOUTS = {"native_dropout", "dropout", "feature_dropout", "alpha_dropout"}
# the tokens the small forward runs on
_T = 8


@dataclass(frozen=True)
class Use:
    """A parameter's first use (``at``: the dispatched op's index): ``kind`` ``matmul``
    (``size``: the product's (in, out); ``c_layout``: stored (out, in) as the C's;
    ``source``: which tensor it multiplies), ``bias`` (``of``: the weight or norm weight
    whose output it is added to), ``norm`` (a layer norm's weight), ``embedding``
    (``tokens``: indexed by the tokens), or ``other``."""

    at: int
    kind: str
    shape: tuple = ()       # the parameter's
    size: tuple = ()
    c_layout: bool = True
    source: int | None = None
    of: int | None = None
    tokens: bool = False


def _norm_axis(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _moved(name: str, args, src: tuple, out: tuple, dims: tuple) -> tuple | None:
    """Where a parameter's axes (``dims``: their positions in a tensor of shape ``src``) are
    in the output (shape ``out``) of the view ``name``; None where they cannot be told."""
    nd = len(src)
    if name in ("t", "numpy_T", "mT") or (name == "transpose" and len(args) >= 3):
        a, b = (nd - 2, nd - 1) if name != "transpose" else (_norm_axis(args[1], nd), _norm_axis(args[2], nd))
        if name == "t" and nd < 2:
            return dims
        return tuple(b if d == a else a if d == b else d for d in dims)
    if name == "permute":
        perm = [_norm_axis(p, nd) for p in args[1]]
        return tuple(perm.index(d) for d in dims)
    if name == "expand":
        return tuple(d + len(out) - nd for d in dims)
    if tuple(src) == tuple(out):
        return dims
    keep = [i for i, s in enumerate(src) if s != 1]
    put = [j for j, s in enumerate(out) if s != 1]
    if [src[i] for i in keep] != [out[j] for j in put] or any(d not in keep for d in dims):
        return None
    return tuple(put[keep.index(d)] for d in dims)


def _number(x) -> bool:
    """Whether ``x`` is a number (a Python one, or a tensor of one element): a scale."""
    return not hasattr(x, "numel") or x.numel() == 1


def _mode_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    class Watch(TorchDispatchMode):
        """Follows the parameters (``params``: id -> shape) and the tokens through the forward's
        ops: ``uses`` (index -> :class:`Use`), ``consumed`` (indices read by any op)."""

        def __init__(self, params: dict, tokens=None, wanted=None):
            super().__init__()
            self.wanted = wanted        # the site keys to keep (None: all)
            self.uses: dict[int, Use] = {}
            self.consumed: set[int] = set()
            self.count = 0
            self.serial = 0
            self.tags = WeakIdKeyDictionary()      # tensor -> tag
            self.roots = WeakIdKeyDictionary()     # tensor -> the tensor it views (an int)
            self.params = params
            if tokens is not None:
                self.tags[tokens] = ("tokens",)
            self.sites: dict[tuple, tuple] = {}   # (id of a parameter, role) -> (the tensor there, its value)

        def site(self, key, t, again=False):
            """The tensor at ``key`` (the first, or with ``again`` a later one: a bias added)."""
            if (isinstance(t, torch.Tensor) and (again or key not in self.sites)
                    and (self.wanted is None or key in self.wanted)):
                self.sites[key] = (t, t.detach().to(torch.float32, copy=True))

        def tag(self, t):
            if not isinstance(t, torch.Tensor):
                return None
            got = self.tags.get(t)
            if got is None and id(t) in self.params:
                got = ("param", id(t), tuple(range(t.dim())), False)
            return got

        def root(self, t) -> int:
            """The tensor ``t`` views (a serial number: ids of dead tensors are reused)."""
            r = self.roots.get(t)
            if r is None:
                self.serial += 1
                r = self.roots[t] = self.serial
            return r

        def use(self, p: int, u: Use):
            self.consumed.add(p)
            if p not in self.uses:
                self.uses[p] = replace(u, shape=self.params[p])

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            at, self.count = self.count, self.count + 1
            flat = list(args) + list((kwargs or {}).values())
            tags = [self.tag(a) for a in flat]
            given = self._classify(name, at, args, tags[:len(args)], out)
            for a, t in zip(flat, tags):
                if t is not None and t[0] == "param" and not given:
                    self.use(t[1], Use(at, "other"))
            return out

        def _classify(self, name, at, args, tags, out) -> bool:
            """Tags ``out`` and notes the uses of op ``name``; False where a parameter it
            reads is used in no way of its own (then an ``other`` use)."""
            first = tags[0] if tags else None
            if name in _VIEWS or name in _PARTIAL:
                if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                    self.roots[out] = self.root(args[0])
                if first is not None and isinstance(out, torch.Tensor):
                    if first[0] == "param":
                        dims = None if name in _PARTIAL or first[2] is None else \
                            _moved(name, args, tuple(args[0].shape), tuple(out.shape), first[2])
                        self.tags[out] = ("param", first[1], dims, first[3] or name in _PARTIAL)
                    else:
                        self.tags[out] = first
                elif isinstance(out, (tuple, list)) and first is not None and first[0] == "param":
                    for o in out:
                        if isinstance(o, torch.Tensor):
                            self.tags[o] = ("param", first[1], None, True)
                return True
            if name in _MATMULS:
                return self._matmul(name, at, args, tags, out)
            if name in _MULS or name in _ADDS:
                return self._elementwise(name, at, args, tags, out)
            if name == "native_layer_norm":
                return self._layer_norm(at, tags, out)
            if name in ("embedding", "index"):
                return self._embedding(name, at, args, tags, out)
            if name in _DIVS:
                self._carry(name, args, tags, out)
            if name in ("bernoulli", "bernoulli_") and isinstance(out, torch.Tensor):
                self.tags[out] = ("mask",)      # a dropout's mask (scaled in place after: still it)
            if name in _DROPOUTS and first is not None and first[0] != "param":
                kept = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(kept, torch.Tensor):     # a dropout left on: still the product's output
                    self.tags[kept] = first
            return False

        def _matmul(self, name, at, args, tags, out) -> bool:
            left, right = _MATMULS[name]
            weight = None
            for pos, other in ((right, left), (left, right)):
                t = tags[pos] if pos < len(tags) else None
                if t is None or t[0] != "param" or t[3] or t[2] is None or len(t[2]) != 2:
                    continue
                nd = args[pos].dim()
                shape = tuple(args[pos].shape)
                stored_in_out = t[2] == (nd - 2, nd - 1)      # axis 0 first: (in, out) if right
                rows_first = stored_in_out if pos == right else not stored_in_out
                size = (shape[-2], shape[-1]) if pos == right else (shape[-1], shape[-2])
                self.use(t[1], Use(at, "matmul", size=size, c_layout=not rows_first, source=self.root(args[other])))
                weight = t[1]
                break
            if weight is None:
                return False
            self.site((weight, "operand"), args[other])
            self.site((weight, "out"), out)
            biased = name in ("addmm", "baddbmm") and tags[0] is not None and tags[0][0] == "param"
            if biased:
                self.use(tags[0][1], Use(at, "bias", of=weight))
            if isinstance(out, torch.Tensor):
                self.tags[out] = ("biased" if biased else "product", weight)
            return True

        def _elementwise(self, name, at, args, tags, out) -> bool:
            if len(tags) < 2:
                return False
            self._carry(name, args, tags, out)
            for mine, other in ((1, 0), (0, 1)):
                t, o = tags[mine], tags[other]
                if t is None or t[0] != "param" or t[3] or args[mine].dim() != 1:
                    continue
                if name in _MULS and (o is None or o[0] != "param"):
                    self.use(t[1], Use(at, "norm"))
                    self.site((t[1], "out"), out)
                    if isinstance(out, torch.Tensor):
                        self.tags[out] = ("scaled", t[1])
                    return True
                if name in _ADDS and o is not None and o[0] in ("product", "scaled"):
                    self.use(t[1], Use(at, "bias", of=o[1]))
                    self.site((o[1], "out"), out, again=True)
                    if o[0] == "product" and isinstance(out, torch.Tensor):
                        self.tags[out] = ("biased", o[1])
                    return True
            if name in _ADDS:      # the residual stream: a product's output (and bias) added to it
                for t, o in ((tags[0], tags[1]), (tags[1], tags[0])):
                    if t is not None and t[0] in ("product", "biased") and (o is None or o[0] == "lookup"):
                        self.site((t[1], "residual"), out)
            return False

        def _carry(self, name, args, tags, out) -> None:
            """The encoder's output: a table's lookup (scaled by a number or not) added to
            another table's lookup or to a part of it (``wpe[:T]``, ``wpe[2:T + 2]``,
            ``wpe[T]``), whatever the parts: a site of both tables (``(table, "out")``);
            a lookup scaled by a number stays that table's lookup, and a product's output
            or a lookup times a dropout's mask stays what it was (the residual added after
            it is still the sum after that product)."""
            a, b = tags[0], tags[1]
            if name in _MULS and isinstance(out, torch.Tensor):     # a dropout: the tensor times its mask
                for t, o in ((a, b), (b, a)):
                    if t is not None and t[0] in ("product", "biased", "lookup") and o == ("mask",):
                        self.tags[out] = t
                        return
            if name in _MULS | _DIVS:
                for t, o, x in ((a, b, args[1]), (b, a, args[0])):
                    if t is not None and t[0] == "lookup" and o is None and _number(x):
                        self.tags[out] = t
                return
            if name not in _ADDS or not isinstance(out, torch.Tensor):
                return
            for t, o in ((a, b), (b, a)):
                if t is None or t[0] != "lookup" or o is None:
                    continue
                other = o[1] if o[0] == "lookup" else o[1] if o[0] == "param" and o[3] else None
                if other is not None and other != t[1] and len(self.params[other]) == 2:
                    self.site((t[1], "out"), out)
                    self.site((other, "out"), out)
                    return

        def _layer_norm(self, at, tags, out) -> bool:
            w = tags[2] if len(tags) > 2 else None
            b = tags[3] if len(tags) > 3 else None
            w = w[1] if w is not None and w[0] == "param" else None
            if w is not None:
                self.use(w, Use(at, "norm"))
                self.site((w, "out"), out[0] if isinstance(out, (tuple, list)) else out)
            if b is not None and b[0] == "param":
                self.use(b[1], Use(at, "bias", of=w))
            return True

        def _embedding(self, name, at, args, tags, out) -> bool:
            t = tags[0] if tags else None
            if t is None or t[0] != "param":
                return False
            if isinstance(out, torch.Tensor) and not t[3] and len(self.params[t[1]]) == 2:
                self.tags[out] = ("lookup", t[1])
            index = args[1] if name == "embedding" else next((i for i in args[1] if i is not None), None)
            tok = self.tag(index)
            self.use(t[1], Use(at, "embedding", tokens=tok is not None and tok[0] == "tokens"))
            return True

    return Watch


class Usage:
    """The uses of a model's parameters in one small forward (:func:`record_usage`):
    ``uses`` (id of a parameter -> its first :class:`Use`), ``called`` (the modules the
    forward called), ``error`` (why the forward could not be followed, or None)."""

    def __init__(self, model, uses: dict, consumed: set, called: set, error: str | None = None, layouts=None):
        self.model = model
        self.layouts = layouts or {}    # a site (id of a parameter, role) -> its rows' layout (:func:`_rows`)
        self.uses = uses
        self.consumed = consumed
        self.called = called
        self.error = error

    def bypassed(self) -> set[str]:
        """The modules the forward never calls whose own parameters it reads all the same
        (their parent applies them: ``nn.MultiheadAttention``'s ``out_proj``)."""
        out = set()
        for name, m in self.model.named_modules():
            own = [id(p) for p in m.parameters(recurse=False)]
            if name and name not in self.called and own and all(p in self.consumed for p in own):
                out.add(name)
        return out

    def sites(self, entries) -> dict:
        """The graph's activations the forward computes by the mapped parameters (:data:`SITES`):
        a site (id of a parameter, role) -> ((act, layer), its rows' layout)."""
        out = {}
        for e in entries:
            for role in ("out", "operand", "residual"):
                act = SITES.get((e.slot.name, role)) if e.slot.rows is None else None
                key = (id(e.param), role)
                if act is not None and key in self.layouts:
                    out[key] = ((act, e.slot.layer), self.layouts[key])
        return out

    def proposals(self, cfg: GPT2Config) -> tuple[dict, dict]:
        """(id of a parameter -> the C tensor its use says it is (a mapping ``Slot``), id of
        a bias -> id of the parameter whose output it is added to)."""
        from .mapping import Slot
        L, C, V, Vp = cfg.num_layers, cfg.channels, cfg.vocab_size, cfg.padded_vocab_size
        order = sorted(self.uses.items(), key=lambda kv: kv[1].at)
        slots: dict[int, Slot] = {}
        by_size: dict[tuple, list] = {}
        norms = []
        for pid, u in order:
            if u.kind == "matmul":
                by_size.setdefault(u.size, []).append((pid, u))
            elif u.kind == "norm":
                norms.append(pid)
            elif u.kind == "embedding":
                slots[pid] = Slot("wte" if u.tokens else "wpe")
            elif u.kind == "other" and len(u.shape) == 2 and u.shape[1] == C:
                # a table read otherwise (``wpe.weight[:T]`` added to the stream): by its rows
                tables = {cfg.max_seq_len: "wpe", cfg.vocab_size: "wte", cfg.padded_vocab_size: "wte"}
                if u.shape[0] in tables and (u.shape[0] == cfg.max_seq_len) != (u.shape[0] in (V, Vp)):
                    slots[pid] = Slot(tables[u.shape[0]])
        for (n_in, n_out), name in (((C, 3 * C), "qkvw"), ((C, 4 * C), "fcw"), ((4 * C, C), "fcprojw")):
            for layer, (pid, u) in enumerate(by_size.get((n_in, n_out), [])[:L]):
                slots[pid] = Slot(name, layer, not u.c_layout)
        for V in (cfg.vocab_size, cfg.padded_vocab_size):
            for pid, u in by_size.get((C, V), []):
                slots.setdefault(pid, Slot("wte"))
        slots.update(_square(by_size.get((C, C), []), L, C, bool(by_size.get((C, 3 * C)))))
        if len(norms) == 2 * L + 1:
            for k, pid in enumerate(norms[:-1]):
                slots[pid] = Slot("ln1w" if k % 2 == 0 else "ln2w", k // 2)
            slots[norms[-1]] = Slot("lnfw")
        biases = {pid: u.of for pid, u in order if u.kind == "bias" and u.of is not None}
        return slots, biases


def _square(square: list, L: int, C: int, fused: bool) -> dict:
    """The (C, C) products' C tensors: each layer's attention projection where the qkv is
    one (C, 3C) product; else, of each layer's four, q, k, v (the three applied to one
    input, in the order used) and the projection (the fourth)."""
    from .mapping import Slot
    out = {}
    if fused:
        for layer, (pid, u) in enumerate(square[:L]):
            out[pid] = Slot("attprojw", layer, not u.c_layout)
        return out
    if len(square) != 4 * L:
        return out
    for layer in range(L):
        group = square[4 * layer:4 * layer + 4]
        sources = [u.source for _, u in group]
        odd = [i for i, s in enumerate(sources) if sources.count(s) == 1]
        if len(odd) != 1 or len(set(sources)) != 2:
            continue
        pieces = [g for i, g in enumerate(group) if i != odd[0]]
        for k, (pid, u) in enumerate(pieces):
            out[pid] = Slot("qkvw", layer, not u.c_layout, rows=(k * C, (k + 1) * C))
        pid, u = group[odd[0]]
        out[pid] = Slot("attprojw", layer, not u.c_layout)
    return out


# a site (the C tensor a parameter holds, its role there) -> the graph's activation it is
SITES = {("qkvw", "out"): "qkv", ("attprojw", "operand"): "atty", ("attprojw", "out"): "attproj",
         ("attprojw", "residual"): "residual2", ("fcw", "out"): "fch", ("fcprojw", "operand"): "fch_gelu",
         ("fcprojw", "out"): "fcproj", ("fcprojw", "residual"): "residual3", ("ln1w", "out"): "ln1",
         ("ln2w", "out"): "ln2", ("lnfw", "out"): "lnf", ("wpe", "out"): "encoded"}
_B = 2


def _rows(a, b, B: int, T: int) -> str | None:
    """How a site's tensor lays out its (batch, position) rows, from its value on two
    batches that differ in batch element 1 only: ``"bt"`` (batch-major: (B, T, X), (B*T, X)),
    ``"tb"`` (position-major: ``nn.MultiheadAttention``'s (T, B, X)), None where neither (or
    both: the rows left once those not finite are set aside tell them apart no more)."""
    import numpy as np
    X = a.shape[-1] if a.ndim else 0
    if a.shape != b.shape or not X or a.size != B * T * X:
        return None
    a, b = a.reshape(B * T, X), b.reshape(B * T, X)
    changed = np.any(a != b, axis=1)
    # rows holding a NaN or an infinity (a wrong mask's) say nothing: judged on the others
    ok = np.all(np.isfinite(a), axis=1) & np.all(np.isfinite(b), axis=1)
    fits = [name for name, rows in (("bt", np.repeat(np.arange(B) == 1, T)), ("tb", np.tile(np.arange(B) == 1, T)))
            if np.array_equal(changed[ok], rows[ok]) and rows[ok].any() and not rows[ok].all()]
    return fits[0] if len(fits) == 1 else None


def relaid(t, layout: str, B: int, T: int):
    """A site's tensor (or its gradient) as the C's (B, T, X)."""
    import torch
    x = t.detach().to(torch.float32).reshape(-1, t.shape[-1])
    return (x.reshape(T, B, -1).transpose(0, 1) if layout == "tb" else x.reshape(B, T, -1)).contiguous()


def record_usage(model, cfg: GPT2Config) -> Usage:
    """The uses of ``model``'s parameters in a forward of one sequence of a few tokens
    (under ``torch.no_grad()``, the random state as it was after); a forward that raises
    gives a :class:`Usage` with no uses and its ``error``."""
    import torch
    B, T = _B, min(cfg.max_seq_len, _T)
    idx = (torch.arange(B * T, dtype=torch.long) % cfg.vocab_size).reshape(B, T)
    other = idx.clone()
    other[1] = (other[1] + 1) % cfg.vocab_size
    params = {id(p): tuple(p.shape) for p in model.parameters()}
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, a, n=name: called.add(n))
               for name, m in model.named_modules() if name]
    runs, error = [], None
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _noised(model):
            for tokens in (idx, other):
                torch.manual_seed(0)    # the same random draws (a dropout left on) in both forwards
                runs.append(_mode_class()(params, tokens))
                with runs[-1]:
                    call_model(model, tokens, torch.roll(tokens, -1, 1))
    except Exception as e:      # the port's own forward: any error is its own, reported in the refusal
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        for h in handles:
            h.remove()
    if error is not None:
        return Usage(model, {}, set(), called, error)
    first, second = runs
    layouts = {k: r for k, (_, v) in first.sites.items() if k in second.sites
               and (r := _rows(v.numpy(), second.sites[k][1].numpy(), B, T)) is not None}
    return Usage(model, first.uses, first.consumed, called, layouts=layouts)


class _noised:
    """The model's parameters, for the small forwards, filled with small seeded noise (a
    port may initialise a weight to zero, which would hide the rows a batch element
    changes); put back after."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        import torch
        self.saved = [p.detach().clone() for p in self.params]
        g = torch.Generator().manual_seed(0)
        for p in self.params:
            p.copy_((torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0)).to(p.dtype))

    def __exit__(self, *exc):
        for p, v in zip(self.params, self.saved):
            p.copy_(v)
