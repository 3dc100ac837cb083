"""Two GPT-2 ports whose module names are not nanoGPT's, for tests/ports/test_structure.py.

* ``DecoderLM``: the layout of OPT / Llama-style code bases: separate ``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj``, an MLP of ``fc1``/``fc2``, ``norm1``/``norm2``,
  ``embed_tokens``/``embed_positions``, ``final_norm``, a tied ``lm_head``, the blocks in
  ``self.layers``. ``causal=False`` leaves the mask out; ``act="gelu"`` is the exact
  (erf) GELU, not the C's tanh one.
* ``Pondering``: names of its own (``self.mix``, ``self.think``, ``self.squash``,
  ``self.trunk``): nothing says which norm comes first, so it ships a small map for those
  (``NORMS``); a fused projection, ``F.scaled_dot_product_attention``, an MLP as an
  ``nn.Sequential``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _hp(cfg, *names):
    return [cfg[n] if isinstance(cfg, dict) else getattr(cfg, n) for n in names]


# ----------------------------------------------------------------------------- OPT / Llama-style names

class SelfAttention(nn.Module):
    def __init__(self, dim, n_heads, max_len, causal=True):
        super().__init__()
        self.n_heads, self.head_dim, self.causal = n_heads, dim // n_heads, causal
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.causal:
            scores = scores.masked_fill(self.mask[:T, :T] == 0, float("-inf"))
        weights = F.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.o_proj(out)


class LetteredAttention(SelfAttention):
    """The same attention with projections no convention names: they take a map."""

    def __init__(self, dim, n_heads, max_len, causal=True):
        super().__init__(dim, n_heads, max_len, causal)
        self.first, self.second, self.third = self.q_proj, self.k_proj, self.v_proj
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.first, self.second, self.third))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)).masked_fill(self.mask[:T, :T] == 0, -math.inf)
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.o_proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim, act="tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = F.gelu(h, approximate="tanh") if self.act == "tanh" else F.gelu(h)
        return self.fc2(h)


class DecoderLayer(nn.Module):
    def __init__(self, dim, n_heads, max_len, causal=True, act="tanh", attention=SelfAttention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = attention(dim, n_heads, max_len, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, act)

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class DecoderLM(nn.Module):
    def __init__(self, cfg, causal=True, act="tanh", attention=SelfAttention):
        super().__init__()
        V, T, L, H, C = _hp(cfg, "vocab_size", "max_seq_len", "num_layers", "num_heads", "channels")
        self.embed_tokens = nn.Embedding(V, C)
        self.embed_positions = nn.Embedding(T, C)
        self.layers = nn.ModuleList([DecoderLayer(C, H, T, causal, act, attention) for _ in range(L)])
        self.final_norm = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, labels=None):
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids) + self.embed_positions(torch.arange(T))
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.final_norm(x))
        if labels is None:
            return logits
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def no_mask(cfg):
    return DecoderLM(cfg, causal=False)


def erf_gelu(cfg):
    return DecoderLM(cfg, act="gelu")


def lettered(cfg):
    return DecoderLM(cfg, attention=LetteredAttention)


# ----------------------------------------------------------------------------- names of its own

class Mixer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.together = nn.Linear(dim, 3 * dim)
        self.back = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        a, b, c = self.together(x).chunk(3, dim=-1)
        a, b, c = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (a, b, c))
        y = F.scaled_dot_product_attention(a, b, c, is_causal=True)
        return self.back(y.transpose(1, 2).flatten(2))


class Step(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.before_mix = nn.LayerNorm(dim)
        self.mix = Mixer(dim, heads)
        self.before_think = nn.LayerNorm(dim)
        self.think = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.mix(self.before_mix(x))
        return x + self.think(self.before_think(x))


class Pondering(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        V, T, L, H, C = _hp(cfg, "padded_vocab_size", "max_seq_len", "num_layers", "num_heads", "channels")
        self.vocab = _hp(cfg, "vocab_size")[0]
        self.tok = nn.Embedding(V, C)
        self.where = nn.Embedding(T, C)
        self.trunk = nn.ModuleList(Step(C, H) for _ in range(L))
        self.squash = nn.LayerNorm(C)
        self.read_out = nn.Linear(C, V, bias=False)
        self.read_out.weight = self.tok.weight

    def forward(self, idx, targets):
        x = self.tok(idx) + self.where.weight[: idx.shape[1]]
        for step in self.trunk:
            x = step(x)
        logits = self.read_out(self.squash(x))
        loss = F.cross_entropy(logits[..., : self.vocab].flatten(0, 1), targets.flatten())
        return logits, loss


def NORMS(name, shape):
    """The parameters a name cannot tell: which of a step's two norms is the C's ln1."""
    parts = name.split(".")
    if parts[0] == "trunk" and parts[2] in ("before_mix", "before_think"):
        which = "ln1" if parts[2] == "before_mix" else "ln2"
        return f"{which}{parts[3][0]}[{parts[1]}]"
    return None
