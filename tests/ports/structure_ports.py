"""Two GPT-2 ports of structures no name describes, for tests/ports/test_structure.py.

* ``FunctionalGPT``: no module per layer: every parameter held by the model itself, under
  keys of its own, in an ``nn.ParameterDict`` (``store="dict"``), an ``nn.ParameterList``
  (``"list"``) or as raw ``nn.Parameter`` attributes (``"attrs"``); the forward is written
  with ``F.embedding``, ``F.layer_norm``, ``@`` and ``F.linear`` on them. ``gelu="erf"``
  is the exact GELU (not the C's tanh one).
* ``SlashGPT``: a functional port whose parameters are keyed by flattened paths, parts
  separated by ``/`` (Flax's, JAX's), Flax's leaves (``kernel`` (in, out), ``scale``,
  ``embedding``); ``mistake`` plants one: ``"no-out-bias"`` (attention's output bias never
  added), ``"positions-offset"`` (``wpe[2:T + 2]``), ``"tokens-scaled"`` (the token lookup
  times sqrt(C)), ``"dropout-on"`` (a dropout left on before the attention's residual).
  ``FunctionalGPT(out_bias=False)`` never adds its attention's output bias either.
* ``MHAGPT``: attention by ``nn.MultiheadAttention`` (``batch_first``, a causal boolean
  mask; ``masked=False`` leaves the mask out), norms, an MLP as an ``nn.Sequential`` and
  tables under names of their own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _hp(cfg, *names):
    return [cfg[n] if isinstance(cfg, dict) else getattr(cfg, n) for n in names]


# ----------------------------------------------------------------------------- no module per layer

def _keys(L):
    """The functional port's parameter keys: its own words, one block after another."""
    top = ["vocab", "where"]
    per = ["pre_g", "pre_s", "mix_w", "mix_s", "back_w", "back_s", "mid_g", "mid_s", "up_w", "up_s",
           "down_w", "down_s"]
    return top + [f"{k}{l}" for l in range(L) for k in per] + ["end_g", "end_s"]


class FunctionalGPT(nn.Module):
    def __init__(self, cfg, store="dict", gelu="tanh", out_bias=True):
        super().__init__()
        V, T, L, H, C = _hp(cfg, "vocab_size", "max_seq_len", "num_layers", "num_heads", "channels")
        self.L, self.H, self.C, self.gelu, self.out_bias = L, H, C, gelu, out_bias
        shapes = {"vocab": (V, C), "where": (T, C), "end_g": (C,), "end_s": (C,)}
        for l in range(L):
            shapes.update({f"pre_g{l}": (C,), f"pre_s{l}": (C,), f"mix_w{l}": (3 * C, C), f"mix_s{l}": (3 * C,),
                           f"back_w{l}": (C, C), f"back_s{l}": (C,), f"mid_g{l}": (C,), f"mid_s{l}": (C,),
                           f"up_w{l}": (4 * C, C), f"up_s{l}": (4 * C,), f"down_w{l}": (C, 4 * C),
                           f"down_s{l}": (C,)})
        made = {k: nn.Parameter(torch.randn(*shapes[k]) * 0.02) for k in _keys(L)}
        self.store = store
        if store == "dict":
            self.p = nn.ParameterDict(made)
        elif store == "list":
            self.order = {k: i for i, k in enumerate(made)}
            self.p = nn.ParameterList(made.values())
        else:
            for k, v in made.items():
                setattr(self, k, v)

    def w(self, key):
        if self.store == "dict":
            return self.p[key]
        if self.store == "list":
            return self.p[self.order[key]]
        return getattr(self, key)

    def attention(self, x, l):
        B, T, C = x.shape
        q, k, v = F.linear(x, self.w(f"mix_w{l}"), self.w(f"mix_s{l}")).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.H)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        y = y @ self.w(f"back_w{l}").t()
        return y + self.w(f"back_s{l}") if self.out_bias else y

    def mlp(self, x, l):
        h = F.linear(x, self.w(f"up_w{l}"), self.w(f"up_s{l}"))
        h = F.gelu(h, approximate="tanh") if self.gelu == "tanh" else F.gelu(h)
        return F.linear(h, self.w(f"down_w{l}"), self.w(f"down_s{l}"))

    def forward(self, idx, targets):
        T, C = idx.shape[1], self.C
        x = F.embedding(idx, self.w("vocab")) + self.w("where")[:T]
        for l in range(self.L):
            x = x + self.attention(F.layer_norm(x, (C,), self.w(f"pre_g{l}"), self.w(f"pre_s{l}")), l)
            x = x + self.mlp(F.layer_norm(x, (C,), self.w(f"mid_g{l}"), self.w(f"mid_s{l}")), l)
        logits = F.layer_norm(x, (C,), self.w("end_g"), self.w("end_s")) @ self.w("vocab").t()
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def functional(store="dict", gelu="tanh"):
    def factory(cfg):
        return FunctionalGPT(cfg, store, gelu)
    factory.__name__ = f"FunctionalGPT[{store}, {gelu}]"
    return factory


# ----------------------------------------------------------------------------- flattened paths

class SlashGPT(nn.Module):
    def __init__(self, cfg, mistake=None):
        super().__init__()
        V, T, L, H, C = _hp(cfg, "vocab_size", "max_seq_len", "num_layers", "num_heads", "channels")
        self.L, self.H, self.C, self.mistake = L, H, C, mistake
        shapes = {"tok/embedding": (V, C), "pos/embedding": (T, C), "final_norm/scale": (C,), "final_norm/bias": (C,)}
        for l in range(L):
            for norm in ("norm1", "norm2"):
                shapes.update({f"layers/{l}/{norm}/scale": (C,), f"layers/{l}/{norm}/bias": (C,)})
            for dense, (i, o) in {"attn/qkv": (C, 3 * C), "attn/proj": (C, C), "mlp/fc1": (C, 4 * C),
                                  "mlp/fc2": (4 * C, C)}.items():
                shapes.update({f"layers/{l}/{dense}/kernel": (i, o), f"layers/{l}/{dense}/bias": (o,)})
        self.params = nn.ParameterDict({k: nn.Parameter(torch.randn(*s) * 0.02 + (1.0 if k.endswith("scale") else 0.0))
                                        for k, s in shapes.items()})

    def dense(self, x, pre, bias=True):
        y = x @ self.params[pre + "/kernel"]
        return y + self.params[pre + "/bias"] if bias else y

    def norm(self, x, pre):
        return F.layer_norm(x, (self.C,), self.params[pre + "/scale"], self.params[pre + "/bias"])

    def attention(self, x, pre):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.dense(x, pre + "qkv").split(C, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        return self.dense(y, pre + "proj", bias=self.mistake != "no-out-bias")

    def forward(self, idx, targets):
        T, p = idx.shape[1], self.params
        tok = p["tok/embedding"][idx] * (math.sqrt(self.C) if self.mistake == "tokens-scaled" else 1.0)
        x = tok + (p["pos/embedding"][2:T + 2] if self.mistake == "positions-offset" else p["pos/embedding"][:T])
        for l in range(self.L):
            a = self.attention(self.norm(x, f"layers/{l}/norm1"), f"layers/{l}/attn/")
            x = x + (F.dropout(a, p=0.1) if self.mistake == "dropout-on" else a)
            m = F.gelu(self.dense(self.norm(x, f"layers/{l}/norm2"), f"layers/{l}/mlp/fc1"), approximate="tanh")
            x = x + self.dense(m, f"layers/{l}/mlp/fc2")
        logits = self.norm(x, "final_norm") @ p["tok/embedding"].t()
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def slash(mistake=None):
    def factory(cfg):
        return SlashGPT(cfg, mistake)
    factory.__name__ = f"SlashGPT[{mistake}]"
    return factory


def functional_without_out_bias(cfg):
    return FunctionalGPT(cfg, "dict", out_bias=False)


# ----------------------------------------------------------------------------- nn.MultiheadAttention

class Block(nn.Module):
    def __init__(self, C, H, masked=True):
        super().__init__()
        self.masked = masked
        self.pre = nn.LayerNorm(C)
        self.attend = nn.MultiheadAttention(C, H, batch_first=True)
        self.post = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C))

    def forward(self, x):
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1) if self.masked else None
        h = self.pre(x)
        x = x + self.attend(h, h, h, attn_mask=mask)[0]
        return x + self.mlp(self.post(x))


class MHAGPT(nn.Module):
    def __init__(self, cfg, masked=True):
        super().__init__()
        V, T, L, H, C = _hp(cfg, "vocab_size", "max_seq_len", "num_layers", "num_heads", "channels")
        self.lexicon = nn.Embedding(V, C)
        self.spots = nn.Embedding(T, C)
        self.tower = nn.ModuleList(Block(C, H, masked) for _ in range(L))
        self.closing = nn.LayerNorm(C)

    def forward(self, idx, targets):
        x = self.lexicon(idx) + self.spots(torch.arange(idx.shape[1], device=idx.device))
        for block in self.tower:
            x = block(x)
        logits = F.linear(self.closing(x), self.lexicon.weight)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mha_unmasked(cfg):
    return MHAGPT(cfg, masked=False)
