"""nanoGPT-style ports written out by hand, as llm.c's train_gpt2.py writes them (its
attention with the softmax materialised, its NewGELU, a layer norm of its own), each with
one planted bug on one line, for tests/ports/test_record.py: a failure must be pinned to
that line. ``LineGPT`` is right; each variant swaps one module's forward for a copy with
the bug (the tests find the buggy line by its text)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import model_ports as mp


class Attention(nn.Module):
    """train_gpt2.py's CausalSelfAttention, the softmax materialised."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril() == 0, float("-inf"))
        att = att.softmax(dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class AttentionTransposed(Attention):
    """The softmax's rows and columns swapped before the weighted sum."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril() == 0, float("-inf"))
        att = att.softmax(dim=-1)
        y = att.transpose(-2, -1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NewGELU(nn.Module):
    """train_gpt2.py's GELU, tanh form."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class SquareGELU(NewGELU):
    """x**2 in place of x**3."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 2.0))))


class LayerNorm(nn.Module):
    """A layer norm written out, as the walkthrough writes it."""

    def __init__(self, n_embd, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        xshift = x - mean
        var = (xshift * xshift).mean(-1, keepdim=True)
        rstd = (var + self.eps).rsqrt()
        return xshift * rstd * self.weight + self.bias


class UnbiasedLayerNorm(LayerNorm):
    """The variance divided by C - 1."""

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        xshift = x - mean
        var = (xshift * xshift).sum(-1, keepdim=True) / (x.size(-1) - 1)
        rstd = (var + self.eps).rsqrt()
        return xshift * rstd * self.weight + self.bias


class LineGPT(mp.GPT):
    """nanoGPT's GPT with its blocks' attention, GELU and layer norms written out
    (``attention``, ``gelu``, ``layernorm``: the classes used)."""

    attention, gelu_module, layernorm = Attention, NewGELU, LayerNorm

    def __init__(self, config):
        super().__init__(config)
        C, NH = config.n_embd, config.n_head
        for block in self.transformer.h:
            block.attn = self.attention(C, NH)
            block.mlp.gelu = self.gelu_module()
            block.ln_1, block.ln_2 = self.layernorm(C, self.eps), self.layernorm(C, self.eps)

    @classmethod
    def variant(cls, **changes):
        return type(f"LineGPT_{'_'.join(changes)}", (cls,), changes)


TransposedGPT = LineGPT.variant(attention=AttentionTransposed)
SquareGeluGPT = LineGPT.variant(gelu_module=SquareGELU)
UnbiasedGPT = LineGPT.variant(layernorm=UnbiasedLayerNorm)
