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

FORWARD_KERNELS = (
    "encoder_forward", "layernorm_forward", "matmul_forward", "attention_forward",
    "gelu_forward", "residual_forward", "softmax_forward", "crossentropy_forward",
)
BACKWARD_KERNELS = (
    "encoder_backward", "layernorm_backward", "matmul_backward", "attention_backward",
    "gelu_backward", "residual_backward", "crossentropy_softmax_backward",
)
KERNEL_NAMES = FORWARD_KERNELS + BACKWARD_KERNELS + ("adamw",)

# alternative name -> protocol name
ALIASES = {"gpt2_update": "adamw"}

# The op (as used in test ids and reports: `pytest -k layernorm`) each kernel belongs to.
KERNEL_OP = {
    "encoder_forward": "encoder", "encoder_backward": "encoder",
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "matmul_forward": "matmul", "matmul_backward": "matmul",
    "attention_forward": "attention", "attention_backward": "attention",
    "gelu_forward": "gelu", "gelu_backward": "gelu",
    "residual_forward": "residual", "residual_backward": "residual",
    "softmax_forward": "softmax",
    "crossentropy_forward": "crossentropy", "crossentropy_softmax_backward": "crossentropy",
    "adamw": "adamw",
}

# Argument names, in order (the signature a port must have).
SIGNATURES = {
    "encoder_forward": ("inp", "wte", "wpe"),
    "encoder_backward": ("dwte", "dwpe", "dout", "inp"),
    "layernorm_forward": ("inp", "weight", "bias"),
    "layernorm_backward": ("dinp", "dweight", "dbias", "dout", "inp", "weight", "mean", "rstd"),
    "matmul_forward": ("inp", "weight", "bias"),
    "matmul_backward": ("dinp", "dweight", "dbias", "dout", "inp", "weight"),
    "attention_forward": ("inp", "NH"),
    "attention_backward": ("dinp", "dpreatt", "datt", "dout", "inp", "att", "NH"),
    "gelu_forward": ("inp",),
    "gelu_backward": ("dinp", "inp", "dout"),
    "residual_forward": ("inp1", "inp2"),
    "residual_backward": ("dinp1", "dinp2", "dout"),
    "softmax_forward": ("logits", "V"),
    "crossentropy_forward": ("probs", "targets"),
    "crossentropy_softmax_backward": ("dlogits", "dlosses", "probs", "targets", "V"),
    "adamw": ("param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "t"),
}

# Arguments a kernel writes in place (they must reach the implementation zero-copy).
INPLACE_ARGS = {
    "encoder_backward": ("dwte", "dwpe"),
    "layernorm_backward": ("dinp", "dweight", "dbias"),
    "matmul_backward": ("dinp", "dweight", "dbias"),
    "attention_backward": ("dinp", "dpreatt", "datt"),
    "gelu_backward": ("dinp",),
    "residual_backward": ("dinp1", "dinp2"),
    "crossentropy_softmax_backward": ("dlogits",),
    "adamw": ("param", "m", "v"),
}


def _expected_shapes(name, a):
    """Shapes a forward kernel must return, from its (NumPy) arguments ``a``."""
    if name == "encoder_forward":
        return [a["inp"].shape + (a["wte"].shape[-1],)]
    if name == "layernorm_forward":
        s = a["inp"].shape
        return [s, s[:-1], s[:-1]]
    if name == "matmul_forward":
        return [a["inp"].shape[:-1] + (a["weight"].shape[0],)]
    if name == "attention_forward":
        B, T, C3 = a["inp"].shape
        NH = int(a["NH"])
        return [(B, T, C3 // 3), (B, NH, T, T), (B, NH, T, T)]
    if name == "gelu_forward":
        return [a["inp"].shape]
    if name == "residual_forward":
        return [np.broadcast_shapes(a["inp1"].shape, a["inp2"].shape)]
    if name == "softmax_forward":
        return [a["logits"].shape]
    if name == "crossentropy_forward":
        return [a["probs"].shape[:-1]]
    raise KeyError(name)


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
        self.provided = [n for n in KERNEL_NAMES if n in funcs]
        self.missing = [n for n in KERNEL_NAMES if n not in funcs]
        if backend == "torch":
            import torch   # noqa: F401  (fail early and clearly if torch is absent)
        for n in self.provided:
            setattr(self, n, self._wrap(n, funcs[n]))
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

    def _wrap(self, kernel, f):
        params = SIGNATURES[kernel]
        forward = kernel in FORWARD_KERNELS
        n_out = {"layernorm_forward": 3, "attention_forward": 3}.get(kernel, 1)
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
            if len(outs) != n_out:
                raise TypeError(f"{label} returned {len(outs)} output(s), expected {n_out}")
            outs = [self._from_backend(kernel, y) for y in outs]
            for i, (y, shape) in enumerate(zip(outs, _expected_shapes(kernel, named))):
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


def kernel_set(obj=None, fallback=None) -> KernelSet:
    """``kernel_set()`` -> the NumPy reference kernels; otherwise ``KernelSet.from_module``."""
    if obj is None:
        from . import numpy_kernels
        obj = numpy_kernels
    return KernelSet.from_module(obj, fallback=fallback)


def as_namespace(funcs: Mapping, backend: str = "numpy") -> SimpleNamespace:
    """A module-like object from a dict of functions (handy for building test mutants)."""
    return SimpleNamespace(BACKEND=backend, **funcs)
