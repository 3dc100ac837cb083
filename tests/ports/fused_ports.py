"""A small GPT-2 whose attention is one module on raw parameters (``Attend``: the qkv and
the output projection as ``nn.Parameter``s, every op between them inside its forward, at
no module boundary), under names of its own (``cells``, ``pre``/``post``, ``attend``,
``up``/``down``), for tests/ports/test_record.py: a mistake inside that module must be
localised to the attention, pinned to its line and named, and the unmodified model must
pass. Not tests/ports/heldout_fused.py's model (the tests are not tuned to BUGS8): its
attention is written with ``@`` over (B, NH, T, hs), its projections with ``@ w.t()``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attend(nn.Module):
    """Causal attention on raw parameters: ``qkv_w`` (3C, C) and ``out_w`` (C, C)."""

    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.qkv_w, self.qkv_b = nn.Parameter(torch.zeros(3 * C, C)), nn.Parameter(torch.zeros(3 * C))
        self.out_w, self.out_b = nn.Parameter(torch.zeros(C, C)), nn.Parameter(torch.zeros(C))

    def split(self, x):
        B, T, C = x.shape
        qkv = x @ self.qkv_w.t() + self.qkv_b
        return [t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in qkv.split(C, dim=-1)]

    def weigh(self, q, k):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        T = q.size(-2)
        return F.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)

    def merge(self, y):
        B, NH, T, hs = y.shape
        return y.transpose(1, 2).reshape(B, T, NH * hs)

    def forward(self, x):
        q, k, v = self.split(x)
        return self.merge(self.weigh(q, k) @ v) @ self.out_w.t() + self.out_b


class Cell(nn.Module):
    def __init__(self, C, NH, attend=Attend):
        super().__init__()
        self.pre, self.attend, self.post = nn.LayerNorm(C), attend(C, NH), nn.LayerNorm(C)
        self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        x = x + self.attend(self.pre(x))
        return x + self.down(F.gelu(self.up(self.post(x)), approximate="tanh"))


class FusedCells(nn.Module):
    def __init__(self, config, attend=Attend):
        super().__init__()
        C = config.channels
        self.tok, self.pos = nn.Embedding(config.vocab_size, C), nn.Embedding(config.max_seq_len, C)
        self.cells = nn.ModuleList([Cell(C, config.num_heads, attend) for _ in range(config.num_layers)])
        self.last = nn.LayerNorm(C)

    def forward(self, idx, targets=None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for cell in self.cells:
            x = cell(x)
        logits = self.head(self.last(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


    def head(self, x):
        return x @ self.tok.weight.t()


class HeadHalved(FusedCells):                # the logits halved (a temperature of 2)
    def head(self, x):
        return x @ self.tok.weight.t() * 0.5


class MergedWithoutTranspose(Attend):        # (B, NH, T, hs) viewed as (B, T, C): the heads not moved back
    def merge(self, y):
        B, NH, T, hs = y.shape
        return y.reshape(B, T, NH * hs)


class ScaledByWidth(Attend):                 # 1/sqrt(C), not 1/sqrt(hs)
    def weigh(self, q, k):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1) * self.NH)
        T = q.size(-2)
        return F.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), dim=-1)


NAMES = {"pre.weight": "ln1w", "pre.bias": "ln1b", "attend.qkv_w": "qkvw", "attend.qkv_b": "qkvb",
         "attend.out_w": "attprojw", "attend.out_b": "attprojb", "post.weight": "ln2w", "post.bias": "ln2b",
         "up.weight": "fcw", "up.bias": "fcb", "down.weight": "fcprojw", "down.bias": "fcprojb"}
TOP = {"tok.weight": "wte", "pos.weight": "wpe", "last.weight": "lnfw", "last.bias": "lnfb"}


def c_slot(name, shape):
    """The C tensor a parameter holds (its names are none the harness knows)."""
    if name in TOP:
        return TOP[name]
    _, layer, rest = name.split(".", 2)
    return f"{NAMES[rest]}[{int(layer)}]"


def port(attend=Attend, model=FusedCells):
    from harness import TorchModel

    def factory(config):
        return model(config, attend)
    factory.__name__ = f"{model.__name__}[{attend.__name__}]"
    return TorchModel(factory, mapping=c_slot)


def line_of(text: str) -> int:
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
