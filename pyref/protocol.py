"""The kernel protocol (docs/kernels.md) as code: names, arities, and an adapter.

``KernelSet.from_module(obj)`` turns any object that carries protocol functions (a module,
a class or instance, a ``types.SimpleNamespace``, a dict) into callables that take and
return NumPy arrays, whatever the implementation's backend:

- ``BACKEND = "torch"``: NumPy inputs are handed over as ``torch.from_numpy`` tensors
  (zero-copy, so a backward's in-place ``add_`` lands in the caller's NumPy buffers) and
  returned tensors come back as NumPy arrays;
- anything else: NumPy arrays in, NumPy arrays out.

Forward kernels' results are checked: number of outputs and shapes, with a
``TypeError``/``ValueError`` naming the kernel, what was expected and what came back.
Backward kernels and ``adamw`` work in place; whatever they return is ignored.

Import-light on purpose: NumPy only; torch is imported when a torch module is wrapped.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np

from .spec import SPEC, SPECS, dims

# what the rows of pyref.spec say, as the tables the adapter reads
FORWARD_KERNELS = tuple(k.name for k in SPECS if k.returns)
BACKWARD_KERNELS = tuple(k.name for k in SPECS if k.backward)
KERNEL_NAMES = FORWARD_KERNELS + BACKWARD_KERNELS + tuple(k.name for k in SPECS if k.updates)
# The op (as used in test ids and reports: `pytest -k layernorm`) each kernel belongs to.
KERNEL_OP = {k.name: k.op for k in SPECS}
# The ops, in the order of the rows (the model's graph order).
OPS = tuple(dict.fromkeys(KERNEL_OP.values()))
# Argument names, in order (the signature a port must have).
SIGNATURES = {k.name: k.signature for k in SPECS}
# Arguments a kernel writes in place (they must reach the implementation zero-copy).
INPLACE_ARGS = {k.name: k.inplace for k in SPECS if k.inplace}
# Names of what each forward kernel returns, in order.
FORWARD_OUTPUTS = {k.name: k.output_names for k in SPECS if k.returns}

# alternative name -> protocol name
ALIASES = {"gpt2_update": "adamw"}


def _lookup(obj, name):
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def missing(obj) -> list[str]:
    """Protocol names that ``obj`` (module, namespace, class, dict) does not provide as
    callables; ``gpt2_update`` counts as ``adamw``."""
    found = resolve(obj)
    return [n for n in KERNEL_NAMES if n not in found]


def resolve(obj) -> dict:
    """{protocol name: callable} for the protocol functions ``obj`` provides."""
    funcs = {}
    for name in KERNEL_NAMES:
        f = _lookup(obj, name)
        if f is None:
            f = next((_lookup(obj, alias) for alias, target in ALIASES.items()
                      if target == name and callable(_lookup(obj, alias))), None)
        if callable(f):
            funcs[name] = f
    return funcs


def backend_of(obj) -> str:
    b = _lookup(obj, "BACKEND")
    return str(b).lower() if b is not None else "numpy"


# ----------------------------------------------------------------------------
# ports whose kernels differ from the protocol only where the meaning is unambiguous

DIM_NAMES = ("B", "T", "C", "NH", "V", "Vp", "OC")

# forward kernels that may return their main output alone; the other outputs are then
# "not returned": derived from the kernel's inputs by the float64 NumPy reference (so a
# backward or a replay can use them) and never compared (their rows' ``derivable``)
SHORT_OUTPUTS = {k.name: k.omissible for k in SPECS if k.omissible}


def _adapt(kernel: str, f):
    """``f`` called with the protocol's arguments: as is when its signature has the
    protocol's arity, else by name (the first parameter being the main input, the others
    protocol argument or dimension names, any case). A ``softmax_forward(logits)`` without V
    gets the first V columns and its probabilities are padded with zeros to Vp. None when
    the signature cannot be matched unambiguously (the call then fails as it would)."""
    import inspect
    params = SIGNATURES[kernel]
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return f
    ps = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ps):
        return f
    required = [p.name for p in ps if p.default is p.empty]
    if len(required) <= len(params) <= len(ps) and kernel != "softmax_forward":
        return f
    if kernel == "softmax_forward" and len(required) == 2:
        return f
    known = {n.lower(): n for n in params + DIM_NAMES}
    names = [known.get(n.lower()) if i else params[0] for i, n in enumerate(required)]
    if None in names:
        return f
    slice_v = kernel == "softmax_forward" and "V" not in names

    def call(*args):
        named = dict(zip(params, args))
        values = {**dims(named), **named}
        if slice_v:
            values["logits"] = named["logits"][..., :int(named["V"])]
        out = f(*(values[n] for n in names))
        if slice_v and out is not None and out.shape[-1] == int(named["V"]) < named["logits"].shape[-1]:
            out = _pad_last(out, named["logits"].shape[-1])
        return out

    call.__wrapped__ = f
    return call


def _pad_last(x, n):
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.zeros(x.shape[:-1] + (n - x.shape[-1],), x.dtype)], -1)
    import torch
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def _derived_backward(kernel: str, fwd: dict):
    """A backward kernel by autograd (torch.func.vjp) through the port's own forward
    kernel(s) ``fwd`` (protocol name -> callable on torch tensors), accumulating into the
    gradient buffers as the protocol's backward does; None when the forwards it needs are
    not there."""
    import torch
    from torch.func import vjp

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def accumulate(f, points, buffers, cotangent):
        """f's vector-Jacobian product at ``points``, each gradient added into its buffer."""
        _, back = vjp(lambda *xs: first(f(*xs)), *points)
        for buf, g in zip(buffers, back(cotangent)):
            buf.add_(g)

    zeros = torch.zeros_like
    F = fwd.get

    def encoder_backward(dwte, dwpe, dout, inp):   # linear in wte, wpe: any point will do
        accumulate(lambda wte, wpe: F("encoder_forward")(inp, wte, wpe), (zeros(dwte), zeros(dwpe)),
                   (dwte, dwpe), dout)

    def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        accumulate(F("layernorm_forward"), (inp, weight, zeros(weight)), (dinp, dweight, dbias), dout)

    def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
        if dbias is None:
            accumulate(lambda x, w: F("matmul_forward")(x, w, None), (inp, weight), (dinp, dweight), dout)
        else:
            accumulate(F("matmul_forward"), (inp, weight, zeros(dbias)), (dinp, dweight, dbias), dout)

    def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):   # dpreatt, datt: not written
        accumulate(lambda x: F("attention_forward")(x, NH), (inp,), (dinp,), dout)

    def gelu_backward(dinp, inp, dout):
        accumulate(F("gelu_forward"), (inp,), (dinp,), dout)

    def residual_backward(dinp1, dinp2, dout):
        accumulate(F("residual_forward"), (zeros(dout), zeros(dout)), (dinp1, dinp2), dout)

    def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
        # the logits are not an argument: log(probs) has the same softmax
        V = int(V)
        logits = zeros(probs)
        logits[..., :V] = torch.log(probs[..., :V])
        accumulate(lambda lg: F("crossentropy_forward")(first(F("softmax_forward")(lg, V)), targets),
                   (logits,), (dlogits,), dlosses)

    needs = {encoder_backward: ("encoder_forward",), layernorm_backward: ("layernorm_forward",),
             matmul_backward: ("matmul_forward",), attention_backward: ("attention_forward",),
             gelu_backward: ("gelu_forward",), residual_backward: ("residual_forward",),
             crossentropy_softmax_backward: ("softmax_forward", "crossentropy_forward")}
    for f, forwards in needs.items():
        if f.__name__ == kernel and all(n in fwd for n in forwards):
            return f
    return None


# backward kernel -> the outputs (in-place buffers) a derived one leaves unwritten
DERIVED_UNWRITTEN = {"attention_backward": ("dpreatt", "datt")}


class KernelNotProvided(NotImplementedError):
    """Raised when a KernelSet is asked for a kernel its module does not define."""


class KernelSet:
    """Protocol kernels as NumPy-in / NumPy-out callables (attribute per kernel name).

    ``ks.layernorm_forward(inp, weight, bias) -> (out, mean, rstd)`` (NumPy arrays), etc.
    ``ks.missing`` lists the protocol names the wrapped object lacks; ``ks.provided`` the
    others. With ``fallback`` (another object or KernelSet), missing kernels come from it
    (``ks.source(name)`` tells which).
    """

    def __init__(self, funcs: dict, backend: str = "numpy", name: str = "kernels",
                 fallback: "KernelSet | None" = None):
        unknown = set(funcs) - set(KERNEL_NAMES)
        if unknown:
            raise ValueError(f"not protocol kernel names: {sorted(unknown)}")
        if backend not in ("numpy", "torch"):
            raise ValueError(f"{name}: unsupported BACKEND {backend!r} (expected 'numpy' or 'torch')")
        self.name, self.backend, self.fallback = name, backend, fallback
        self.raw = dict(funcs)
        adapted = {n: _adapt(n, f) for n, f in funcs.items()}
        # (kernel, output) pairs a port did not return or write: derived, never compared
        self.not_returned: set[tuple[str, str]] = set()
        self.derived: list[str] = []   # backward kernels derived by autograd
        if backend == "torch":
            import torch   # noqa: F401  (fail early and clearly if torch is absent)
            forwards = {n: adapted[n] for n in FORWARD_KERNELS if n in adapted}
            for n in BACKWARD_KERNELS:
                if n not in adapted and (d := _derived_backward(n, forwards)) is not None:
                    adapted[n] = d
                    self.derived.append(n)
                    self.not_returned |= {(n, o) for o in DERIVED_UNWRITTEN.get(n, ())}
        self.provided = [n for n in KERNEL_NAMES if n in adapted]
        self.missing = [n for n in KERNEL_NAMES if n not in adapted]
        for n in self.provided:
            setattr(self, n, self._wrap(n, adapted[n]))
        if fallback is not None:
            for n in self.missing:
                setattr(self, n, getattr(fallback, n))

    @classmethod
    def from_module(cls, obj, name: str | None = None, fallback=None) -> "KernelSet":
        """Wrap a module / namespace / class / dict holding protocol functions."""
        if isinstance(obj, KernelSet):
            return obj
        if name is None:
            name = getattr(obj, "__name__", None) or type(obj).__name__
        if fallback is not None and not isinstance(fallback, KernelSet):
            fallback = cls.from_module(fallback)
        return cls(resolve(obj), backend=backend_of(obj), name=name, fallback=fallback)

    def source(self, kernel: str) -> str:
        if kernel in self.raw:
            return self.name
        if self.fallback is not None:
            return self.fallback.source(kernel)
        return "missing"

    def __getattr__(self, item):   # only reached for names not set in __init__
        if item in KERNEL_NAMES:
            raise KernelNotProvided(f"{self.name} does not define kernel {item}()")
        if item in ALIASES:
            return getattr(self, ALIASES[item])
        raise AttributeError(item)

    def __repr__(self):
        return (f"KernelSet({self.name!r}, backend={self.backend!r}, "
                f"provided={len(self.provided)}/{len(KERNEL_NAMES)})")

    # -- conversion -------------------------------------------------------------------
    def _to_backend(self, kernel, argname, x):
        if self.backend != "torch" or not isinstance(x, np.ndarray):
            return x
        import torch
        if argname in INPLACE_ARGS.get(kernel, ()):
            if not x.flags.writeable or any(s < 0 for s in x.strides):
                raise ValueError(f"{kernel}: in-place argument {argname} must be a writeable "
                                 f"array with non-negative strides to be shared with torch")
            return torch.from_numpy(x)
        if not x.flags.writeable or any(s < 0 for s in x.strides):
            x = np.array(x)   # torch.from_numpy wants a writeable, positively strided array
        return torch.from_numpy(x)

    def _from_backend(self, kernel, y):
        if y is None:
            raise TypeError(f"{self.name}.{kernel} returned None; forward kernels return "
                            f"their outputs")
        if self.backend == "torch":
            import torch
            if isinstance(y, torch.Tensor):
                return y.detach().cpu().numpy()
        if isinstance(y, np.ndarray):
            return y
        try:
            return np.asarray(y)
        except Exception as e:   # noqa: BLE001
            raise TypeError(f"{self.name}.{kernel} returned {type(y).__name__}, "
                            f"not an array: {e}") from None

    @staticmethod
    def _reference_outputs(kernel, named, dtype):
        from . import numpy_kernels
        args = as64(named)
        out = getattr(numpy_kernels, kernel)(*(args[p] for p in SIGNATURES[kernel]))
        return [np.asarray(o, dtype) for o in out[1:]]

    def _wrap(self, kernel, f):
        params = SIGNATURES[kernel]
        forward = kernel in FORWARD_KERNELS
        n_out = len(SPEC[kernel].outputs)
        label = f"{self.name}.{kernel}"

        def call(*args, **kwargs):
            if len(args) > len(params):
                raise TypeError(f"{kernel}() takes {len(params)} arguments, got {len(args)}")
            named = dict(zip(params, args), **kwargs)
            conv = {k: self._to_backend(kernel, k, v) for k, v in named.items()}
            try:
                out = f(*(conv[p] for p in params[:len(args)]),
                        **{k: conv[k] for k in kwargs})
            except Exception as e:
                e.add_note(f"raised by {label}")
                raise
            if not forward:
                return None
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            short = len(outs) == 1 and kernel in SHORT_OUTPUTS
            if len(outs) != n_out and not short:
                raise TypeError(f"{label} returned {len(outs)} output(s), expected {n_out}")
            outs = [self._from_backend(kernel, y) for y in outs]
            if short:   # the main output alone: the others from the reference, marked
                outs += self._reference_outputs(kernel, named, outs[0].dtype)
                self.not_returned |= {(kernel, o) for o in SHORT_OUTPUTS[kernel]}
            for i, (y, shape) in enumerate(zip(outs, SPEC[kernel].expected_shapes(named))):
                if tuple(y.shape) != tuple(shape):
                    what = f"output {i}" if n_out > 1 else "output"
                    raise ValueError(f"{label} {what} has shape {tuple(y.shape)}, "
                                     f"expected {tuple(shape)}")
            return tuple(outs) if n_out > 1 else outs[0]

        call.__name__ = kernel
        call.__qualname__ = label
        call.__doc__ = getattr(f, "__doc__", None)
        call.__wrapped__ = f
        return call


def as64(args: dict, copy: bool = False) -> dict:
    """A kernel call's arguments with every float array as float64 (the oracle's inputs),
    the others as they are; ``copy``: float64 arrays copied too, for a caller whose kernels
    write into them (a backward accumulates into its buffers)."""
    cast = np.array if copy else np.asarray
    return {k: (cast(v, np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
            for k, v in args.items()}


def run_kernel(kernels, kernel: str, args: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """Call ``kernels.<kernel>`` on private copies of ``args`` (float arrays cast to
    ``dtype``), and return its outputs by name: a forward's returned arrays, a backward's
    accumulated buffers. Any implementation of the protocol (the C's kernels, NumPy,
    torch, a user's port, the float64 oracle) is called through here, so a check is a row
    of data, not a function per kernel."""
    local = {k: (v.astype(dtype, copy=True) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                 else v) for k, v in args.items()}
    fn = getattr(kernels, kernel)
    ret = fn(*[local[name] for name in SIGNATURES[kernel]])
    if kernel in FORWARD_OUTPUTS:
        names = FORWARD_OUTPUTS[kernel]
        ret = ret if isinstance(ret, (tuple, list)) else (ret,)
        if len(ret) != len(names):
            raise ValueError(f"{kernel} returned {len(ret)} outputs, the protocol says {len(names)}")
        return {n: np.asarray(r) for n, r in zip(names, ret)}
    return {n: local[n] for n in INPLACE_ARGS[kernel] if local.get(n) is not None}


def kernel_set(obj=None, fallback=None) -> KernelSet:
    """``kernel_set()`` -> the NumPy reference kernels; otherwise ``KernelSet.from_module``."""
    if obj is None:
        from . import numpy_kernels
        obj = numpy_kernels
    return KernelSet.from_module(obj, fallback=fallback)


def as_namespace(funcs: Mapping, backend: str = "numpy") -> SimpleNamespace:
    """A module-like object from a dict of functions (handy for building test mutants)."""
    return SimpleNamespace(BACKEND=backend, **funcs)
