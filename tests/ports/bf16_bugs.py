"""A held-out batch of one-line port mistakes for a bf16 autocast run (issue 31), written
before any of them was run: each is a one-line change of tests/ports/model_ports.py's
nanoGPT-style ``GPT`` (its model, or the optimizer its training loop builds), the kind
people make. tests/ports/test_bf16_batch.py runs each under ``torch.autocast('cpu', bf16)``
and asks that it be caught, or reported as below bf16's reach with the figure that says so.

``MISTAKES``: name -> (model factory, optimizer factory or None: the run's AdamW, what the
one line is). The C decays every parameter alike, so nanoGPT's "decay the 2-D parameters
only" is the weight-decay mistake here (decaying all is what the C does).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import model_ports as mp

V = mp.GPT.variant


class SigmoidGELU(nn.Module):
    """The "quick" GELU, x * sigmoid(1.702 x), where the C uses the tanh form."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _with_modules(base, edit):
    """``base`` whose instances are passed to ``edit(model)`` once built (the one line)."""
    class Port(base):
        def __init__(self, config):
            super().__init__(config)
            edit(self)
    Port.__name__ = f"{base.__name__}_{edit.__name__}"
    return Port


def sigmoid_gelu(model):
    for block in model.transformer.h:
        block.mlp.gelu = SigmoidGELU()


def fc_bias_dropped(model):
    for block in model.transformer.h:
        block.mlp.c_fc.bias = None            # nn.Linear(C, 4C, bias=False)


def untied_lm_head(model):
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())


class EmbeddingScaled(mp.GPT):
    """Token embeddings multiplied by sqrt(C), as in the original Transformer."""

    def __init__(self, config):
        super().__init__(config)
        wte = self.transformer.wte
        scale = math.sqrt(config.n_embd)
        wte.forward = lambda idx: nn.functional.embedding(idx, wte.weight) * scale


def _adamw(**over):
    """The run's AdamW with one setting changed."""
    def make(model, h):
        kw = dict(lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)
        kw.update(over)
        return torch.optim.AdamW(model.parameters(), **kw)
    return make


def beta2_095(model, h):
    return _adamw(betas=(h.beta1, 0.95))(model, h)


def adamw_eps_1e6(model, h):
    return _adamw(eps=1e-6)(model, h)


def decay_2d_only(model, h):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps)


def adam_l2(model, h):
    """torch.optim.Adam: the decay added to the gradient (L2), not decoupled."""
    return torch.optim.Adam(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps,
                            weight_decay=h.weight_decay)


class Clipped(torch.optim.AdamW):
    """The run's AdamW with the training loop's ``clip_grad_norm_(params, 1.0)`` before each step."""

    @torch.no_grad()
    def step(self, closure=None):
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 1.0)
        return super().step(closure)


def grad_clip_1(model, h):
    return Clipped(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps,
                   weight_decay=h.weight_decay)


MISTAKES = {
    "label-smoothing-0.01": (V(label_smoothing=0.01), None, "F.cross_entropy(..., label_smoothing=0.01)"),
    "layernorm-eps-1e-12": (V(eps=1e-12), None, "nn.LayerNorm(C, eps=1e-12)"),
    "attention-scale-1/sqrt(C)": (V(attn=dict(scale=1 / math.sqrt(48))), None, "att * (1 / sqrt(C))"),
    "gelu-sigmoid-form": (_with_modules(mp.GPT, sigmoid_gelu), None, "x * sigmoid(1.702 x) for the GELU"),
    "fc-bias-dropped": (_with_modules(mp.GPT, fc_bias_dropped), None, "nn.Linear(C, 4C, bias=False)"),
    "beta2-0.95": (mp.GPT, beta2_095, "AdamW(betas=(0.9, 0.95))"),
    "decay-2d-only": (mp.GPT, decay_2d_only, "weight decay on the 2-D parameters only"),
    "mask-off-by-one": (V(attn=dict(diagonal=1)), None, "torch.tril(ones(T, T), diagonal=1)"),
    "adam-l2-decay": (mp.GPT, adam_l2, "torch.optim.Adam(weight_decay=...) for AdamW"),
    "adamw-eps-1e-6": (mp.GPT, adamw_eps_1e6, "AdamW(eps=1e-6)"),
    "embedding-scaled-sqrt-C": (EmbeddingScaled, None, "wte(idx) * sqrt(C)"),
    "dropout-0.1": (V(dropout=0.1), None, "dropout=0.1 left on in training"),
    "grad-clip-1.0": (mp.GPT, grad_clip_1, "clip_grad_norm_(params, 1.0) before the step"),
    "untied-lm-head": (_with_modules(mp.GPT, untied_lm_head), None, "lm_head not tied to wte"),
}
