"""A held-out set of port bugs (tests/test_model_bugs.py: test_heldout_hit_rate): a second
nanoGPT-style model written differently from tests/model_ports.py (einsum attention, a
hand-written layer norm, functional GELU, a hand-written loss) and mistakes of the same
kinds as the tuning set's but not the same ones. Written after the catalogue and not used
to tune it: its hit rate is reported as it came out.

``BUGS``: name -> (model factory, where the first divergence must be, the right cause's id
(a prefix: ``layernorm.eps`` takes any fitted eps)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HeldLayerNorm(nn.Module):
    def __init__(self, n, eps=1e-5, unbiased=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps, self.unbiased = eps, unbiased

    def forward(self, x):
        mu = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=self.unbiased)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class HeldAttention(nn.Module):
    def __init__(self, cfg, bug):
        super().__init__()
        C = cfg["n_embd"]
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.nh = cfg["n_head"]
        self.bug = bug

    def forward(self, x):
        B, T, C = x.shape
        nh, hs, bug = self.nh, C // self.nh, self.bug
        qkv = self.c_attn(x)
        names = bug.get("order", "qkv")
        parts = dict(zip(names, qkv.chunk(3, dim=-1)))
        q, k, v = parts["q"], parts["k"], parts["v"]
        if bug.get("split_no_transpose"):
            q, k, v = (t.reshape(B, nh, T, hs) for t in (q, k, v))
        else:
            q, k, v = (t.reshape(B, T, nh, hs).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * bug.get("scale", hs ** -0.5)
        keep = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=bug.get("diagonal", 0))
        if bug.get("mask_after_softmax"):
            w = torch.softmax(scores, dim=-1) * keep
        else:
            w = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        y = torch.einsum("bhts,bhsd->bhtd", w, v).permute(0, 2, 1, 3).reshape(B, T, C)
        if bug.get("proj_no_bias"):
            return F.linear(y, self.c_proj.weight)
        return self.c_proj(y)


def _gelu(x, bug):
    if bug.get("gelu") == "sigmoid":
        return x * torch.sigmoid(1.702 * x)
    c = bug.get("gelu_coef", 0.044715)
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + c * x ** 3)))


class HeldMLP(nn.Module):
    def __init__(self, cfg, bug):
        super().__init__()
        C = cfg["n_embd"]
        self.c_fc = nn.Linear(C, 4 * C)
        self.c_proj = nn.Linear(4 * C, C)
        self.bug = bug

    def forward(self, x):
        return self.c_proj(_gelu(self.c_fc(x), self.bug))


class HeldBlock(nn.Module):
    def __init__(self, cfg, bug):
        super().__init__()
        C = cfg["n_embd"]
        ln = dict(eps=bug.get("eps", 1e-5), unbiased=bug.get("unbiased", False))
        self.ln_1 = HeldLayerNorm(C, **ln)
        self.attn = HeldAttention(cfg, bug)
        self.ln_2 = HeldLayerNorm(C, **ln)
        self.mlp = HeldMLP(cfg, bug)
        self.bug = bug

    def forward(self, x):
        a = self.attn(self.ln_1(x))
        x = x + a * self.bug.get("attn_branch", 1.0)
        h = x if self.bug.get("skip_ln_2") else self.ln_2(x)
        return x + self.mlp(h)


class HeldGPT(nn.Module):
    """Built from a dict of hyperparameters (nanoGPT's names)."""

    bug: dict = {}

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        C = cfg["n_embd"]
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg["vocab_size"], C),
            "wpe": nn.Embedding(cfg["block_size"], C),
            "h": nn.ModuleList([HeldBlock(cfg, self.bug) for _ in range(cfg["n_layer"])]),
            "ln_f": HeldLayerNorm(C, eps=self.bug.get("eps", 1e-5), unbiased=self.bug.get("unbiased", False)),
        })
        self.lm_head = nn.Linear(C, cfg["vocab_size"], bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        bug = self.bug
        B, T = idx.shape
        pos = torch.arange(T)
        if bug.get("reverse_positions"):
            pos = pos.flip(0)
        tok = self.transformer.wte(idx)
        if bug.get("wte_scale"):
            tok = tok * math.sqrt(tok.shape[-1])
        x = tok + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if bug.get("ln_f_twice"):
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        logp = torch.log_softmax(logits, dim=-1)
        if bug.get("drop_last"):
            logp, targets = logp[:, :-1], targets[:, :-1]
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if bug.get("smoothing"):
            eps = bug["smoothing"]
            nll = (1 - eps) * nll - eps * logp.mean(-1)
        if bug.get("sum_over_t"):
            return logits, nll.sum(-1).mean()
        return logits, nll.mean()

    @classmethod
    def variant(cls, **bug):
        return type(f"HeldGPT_{'_'.join(bug)}", (cls,), {"bug": bug})


H = HeldGPT.variant
ATT = "layer 0 attention attention_forward"
BUGS = {
    "heads-split-without-transpose": (H(split_no_transpose=True), ATT, "attention.layout"),
    "qkv-order-qvk": (H(order="qvk"), ATT, "attention.qkv-order"),
    "no-scale": (H(scale=1.0), ATT, "attention.no-scale"),
    "mask-tril-2": (H(diagonal=2), ATT, "attention.mask-diagonal"),
    "mask-after-softmax": (H(mask_after_softmax=True), ATT, "attention.mask-after-softmax"),
    "gelu-constant-typo": (H(gelu_coef=0.04715), "layer 0 gelu gelu_forward", "gelu.cubic-constant"),
    "gelu-sigmoid": (H(gelu="sigmoid"), "layer 0 gelu gelu_forward", "gelu.sigmoid"),
    "layernorm-unbiased": (H(unbiased=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                           "layernorm.unbiased-variance"),
    "layernorm-eps-1e-8": (H(eps=1e-8), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]", "layernorm.eps"),
    "positions-reversed": (H(reverse_positions=True), "encoder encoder_forward", "embedding.positions"),
    "token-embedding-scaled": (H(wte_scale=True), "encoder encoder_forward", "embedding.token-scale"),
    "label-smoothing-0.05": (H(smoothing=0.05), "crossentropy crossentropy_softmax_backward",
                             "crossentropy.label-smoothing"),
    "loss-summed-over-T": (H(sum_over_t=True), "crossentropy crossentropy_softmax_backward", "crossentropy.divisor"),
    "last-position-dropped": (H(drop_last=True), "crossentropy crossentropy_softmax_backward",
                              "crossentropy.ignored-positions"),
    "ln_2-skipped": (H(skip_ln_2=True), "layer 0 ln2 layernorm_forward [transformer.h.0.ln_2]",
                     "structure.never-called"),
    "ln_f-twice": (H(ln_f_twice=True), "lnf layernorm_forward [transformer.ln_f]", "structure.called-more"),
    "attn-branch-scaled": (H(attn_branch=1 / math.sqrt(4)), "layer 0 residual2 residual_forward",
                           "residual.branch-scale"),
    "proj-without-bias": (H(proj_no_bias=True), "layer 0 attproj matmul_forward [transformer.h.0.attn.c_proj]",
                          "structure.never-called"),
}
