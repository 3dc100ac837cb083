"""A fifth GPT-2, written unlike the other four (tests/ports/model_ports.py, heldout_einsum_sdpa.py,
heldout_baddbmm.py), and BUGS7: the held-out batch of issue 30, its mistakes written (with the
line of this file each one is on) and committed before any of them ran.

The model is train_gpt2.c's computation (learned positions, pre-LN blocks, the tanh GELU,
the head tied to the token table, causal attention, the mean cross-entropy) under names of
its own: ``token_table``/``position_table``, the blocks in a ModuleList ``decoder`` of
``DecoderLayer``s with ``attn_norm``, ``attention`` (``to_q``, ``to_k``, ``to_v``,
``to_out``: separate projections), ``ff_norm``, ``feedforward`` (``expand``,
``contract``), and ``out_norm``; a layer norm written by hand, attention written by hand
(the causal mask built in the forward), a functional GELU, the head as ``F.linear`` on the
token table, and a cross-entropy written by hand. It trains with the harness's
torch.optim.AdamW (llm.c's settings).

Each mistake is a subclass overriding one small method (or an optimizer factory) with the
mistake on one line: BUGS7 maps its name to (the model, where the first divergence must
be, the cause's id expected (a prefix; None where none is expected to exist), the text of
the line holding the mistake).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel


def gelu_tanh(x):
    """GPT-2's GELU, the tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class LayerNorm(nn.Module):
    """A layer norm over the last axis, written out (biased variance, eps inside the root)."""

    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with separate q, k, v projections."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def merge(self, t):
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)

    def project(self, x):
        return self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_v(x))

    def scores(self, q, k):
        return torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5

    def mask(self, scores):
        n = scores.size(-1)
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(diagonal=1)
        return scores.masked_fill(future, float("-inf"))

    def weights(self, scores):
        return torch.softmax(scores, dim=-1)

    def forward(self, x):
        q, k, v = self.project(x)
        att = self.weights(self.mask(self.scores(q, k)))
        return self.to_out(self.merge(att @ v))


class FeedForward(nn.Module):
    """The MLP: expand to 4x, GELU, contract."""

    def __init__(self, width):
        super().__init__()
        self.expand = nn.Linear(width, 4 * width)
        self.contract = nn.Linear(4 * width, width)

    def activation(self, h):
        return gelu_tanh(h)

    def forward(self, x):
        return self.contract(self.activation(self.expand(x)))


class DecoderLayer(nn.Module):
    """A pre-LN block: x + attention(norm(x)), then x + feedforward(norm(x))."""

    def __init__(self, width, heads, norm=LayerNorm, attention=SelfAttention, feedforward=FeedForward):
        super().__init__()
        self.attn_norm = norm(width)
        self.attention = attention(width, heads)
        self.ff_norm = norm(width)
        self.feedforward = feedforward(width)

    def forward(self, x):
        x = x + self.attention(self.attn_norm(x))
        x = x + self.feedforward(self.ff_norm(x))
        return x


class Model(nn.Module):
    """GPT-2 from the harness's GPT2Config; ``parts`` replace the layer norm, attention,
    feed-forward or block classes (:meth:`variant`)."""

    def __init__(self, config, norm=LayerNorm, attention=SelfAttention, feedforward=FeedForward,
                 layer=DecoderLayer):
        super().__init__()
        width = config.channels
        self.width = width
        self.token_table = nn.Embedding(config.vocab_size, width)
        self.position_table = nn.Embedding(config.max_seq_len, width)
        self.decoder = nn.ModuleList(layer(width, config.num_heads, norm, attention, feedforward)
                                     for _ in range(config.num_layers))
        self.out_norm = norm(width)

    @classmethod
    def variant(cls, **parts):
        """A factory of this model with some of its parts replaced."""
        def factory(config):
            return cls(config, **parts)
        factory.__name__ = f"{cls.__name__}[{', '.join(p.__name__ for p in parts.values())}]"
        return factory

    def embed(self, idx):
        positions = torch.arange(idx.size(1), device=idx.device)
        return self.token_table(idx) + self.position_table(positions)

    def head(self, x):
        return F.linear(x, self.token_table.weight)

    def loss(self, logits, targets):
        logprobs = logits - logits.logsumexp(dim=-1, keepdim=True)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -picked.mean()

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for layer in self.decoder:
            x = layer(x)
        logits = self.head(self.out_norm(x))
        return logits, (None if targets is None else self.loss(logits, targets))
