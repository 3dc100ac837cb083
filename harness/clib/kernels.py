"""The C library's kernels under the kernel protocol (docs/kernels.md).

Forward kernels allocate their outputs and return them; backward kernels accumulate into
the arrays they are given, exactly as the C does (they ARE the C). With this adapter the
per-op checks treat the C as one more implementation of the protocol, next to
``pyref.numpy_kernels``, ``pyref.torch_kernels`` and a user's port.

All arrays must be float32 (int32 for token ids) and C-contiguous: the binding refuses
anything else rather than copy.
"""
from __future__ import annotations

import numpy as np

from .library import Library, LlmcInputError


def _empty(*shape):
    """An output buffer filled with NaN: an element the kernel fails to write shows up as a
    non-finite mismatch instead of passing on whatever the memory held."""
    return np.full(shape, np.nan, np.float32)


class CKernels:
    """``CKernels(lib)``: the protocol functions, each calling the C kernel of ``lib``.

    ``naive_matmul=True`` routes matmul_forward to ``matmul_forward_naive`` (the C
    itself takes that path when B*T is not a multiple of 8)."""

    BACKEND = "numpy"

    def __init__(self, lib: Library, naive_matmul: bool = False):
        self.lib = lib
        self.naive_matmul = naive_matmul
        self.name = f"C ({lib.path})"

    @staticmethod
    def _btc(name, a, ndim=3):
        if not isinstance(a, np.ndarray) or a.ndim != ndim:
            raise LlmcInputError(f"{name}: expected a {ndim}-d array, got {getattr(a, 'shape', type(a))}")
        return a.shape

    def encoder_forward(self, inp, wte, wpe):
        B, T = self._btc("inp", inp, 2)
        C = wte.shape[-1]
        out = _empty(B, T, C)
        self.lib.encoder_forward(out, inp, wte, wpe, B, T, C)
        return out

    def encoder_backward(self, dwte, dwpe, dout, inp):
        B, T, C = self._btc("dout", dout)
        self.lib.encoder_backward(dwte, dwpe, dout, inp, B, T, C)

    def layernorm_forward(self, inp, weight, bias):
        B, T, C = self._btc("inp", inp)
        out, mean, rstd = _empty(B, T, C), _empty(B, T), _empty(B, T)
        self.lib.layernorm_forward(out, mean, rstd, inp, weight, bias, B, T, C)
        return out, mean, rstd

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd):
        B, T, C = self._btc("inp", inp)
        self.lib.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C)

    def matmul_forward(self, inp, weight, bias):
        B, T, C = self._btc("inp", inp)
        OC = weight.shape[0]
        out = _empty(B, T, OC)
        fn = self.lib.matmul_forward_naive if self.naive_matmul else self.lib.matmul_forward
        fn(out, inp, weight, bias, B, T, C, OC)
        return out

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight):
        B, T, C = self._btc("inp", inp)
        OC = weight.shape[0]
        self.lib.matmul_backward(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC)

    def attention_forward(self, inp, NH):
        B, T, C3 = self._btc("inp", inp)
        if C3 % 3:
            raise LlmcInputError(f"inp: last dimension {C3} is not 3*C")
        C = C3 // 3
        out, preatt, att = _empty(B, T, C), _empty(B, NH, T, T), _empty(B, NH, T, T)
        self.lib.attention_forward(out, preatt, att, inp, B, T, C, NH)
        return out, preatt, att

    def attention_backward(self, dinp, dpreatt, datt, dout, inp, att, NH):
        B, T, C = self._btc("dout", dout)
        self.lib.attention_backward(dinp, dpreatt, datt, dout, inp, att, B, T, C, NH)

    def gelu_forward(self, inp):
        out = _empty(*inp.shape)
        self.lib.gelu_forward(out, inp, inp.size)
        return out

    def gelu_backward(self, dinp, inp, dout):
        self.lib.gelu_backward(dinp, inp, dout, inp.size)

    def residual_forward(self, inp1, inp2):
        out = _empty(*inp1.shape)
        self.lib.residual_forward(out, inp1, inp2, inp1.size)
        return out

    def residual_backward(self, dinp1, dinp2, dout):
        self.lib.residual_backward(dinp1, dinp2, dout, dout.size)

    def softmax_forward(self, logits, V):
        B, T, Vp = self._btc("logits", logits)
        probs = _empty(B, T, Vp)
        self.lib.softmax_forward(probs, logits, B, T, V, Vp)
        return probs

    def crossentropy_forward(self, probs, targets):
        B, T, Vp = self._btc("probs", probs)
        losses = _empty(B, T)
        self.lib.crossentropy_forward(losses, probs, targets, B, T, Vp)
        return losses

    def crossentropy_softmax_backward(self, dlogits, dlosses, probs, targets, V):
        B, T, Vp = self._btc("probs", probs)
        self.lib.crossentropy_softmax_backward(dlogits, dlosses, probs, targets, B, T, V, Vp)

    def adamw(self, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
        """The C has no standalone AdamW kernel, only ``gpt2_update`` over a whole model.
        So: a model of a built-in config whose parameter count equals ``param.size`` is
        made once, its params, grads, m and v are set to the given arrays, and
        ``gpt2_update`` runs on them. Updates ``param``, ``m``, ``v`` in place."""
        from pyref.config import PRESETS
        from .cmodel import CModel

        n = param.size
        model = self._adamw_models.get(n) if hasattr(self, "_adamw_models") else None
        if model is None:
            cfg = next((c for c in PRESETS.values() if c.num_parameters() == n), None)
            if cfg is None:
                raise NotImplementedError(
                    f"gpt2_update works on whole models; no built-in config has {n} parameters")
            model = CModel.from_params(cfg, np.zeros(n, np.float32), lib=self.lib)
            tokens = np.zeros((1, 1), np.int32)
            model.forward(tokens, tokens)
            model.backward()
            model.update(learning_rate=0.0, t=1)  # allocates m and v
            self.__dict__.setdefault("_adamw_models", {})[n] = model
        for dst, src in ((model.params_memory, param), (model.grads_memory, grad),
                         (model.m_memory, m), (model.v_memory, v)):
            dst[:] = np.asarray(src, np.float32).ravel()
        model.update(learning_rate=lr, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, t=t)
        param.reshape(-1)[:] = model.params_memory
        m.reshape(-1)[:] = model.m_memory
        v.reshape(-1)[:] = model.v_memory
