"""Which activations a torch model shows, and their gradients: forward hooks at the module
boundaries of the recognised families (:data:`.families.HOOKS`), tensor hooks for the
gradients, and, for a model built from protocol-named forward kernels of its own module
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

    def __init__(self, model, cfg: GPT2Config):
        self.points: dict[tuple[str, int | None], str] = {}   # (act, layer) -> module name
        self.values: dict = {}
        self.grads: dict = {}
        self.handles = []
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

    def _hook(self, module, side, key):
        def grab(t):
            if t is None or key in self.values:
                return     # a module called again: the graph means its first call (the census says so)
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

    def clear(self):
        self.values.clear()
        self.grads.clear()

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
