"""Held-out sets of port bugs (tests/ports/test_model_bugs.py): a second nanoGPT-style model
written differently from tests/ports/model_ports.py (einsum attention, a hand-written layer norm,
functional GELU, a hand-written loss) and mistakes of the same kinds as the tuning set's,
not the same ones, in four batches (BUGS..BUGS4); then a third model written differently
again (scaled_dot_product_attention, GELU as a module, F.layer_norm, torch's loss) with a
fifth batch (BUGS5). Each batch was written after the previous one had run, and run once,
untuned; its misses were then added to the catalogue as families. tests/ports/test_model_bugs.py
records each batch's first run.

``BUGS*``: name -> (model factory, where the first divergence must be, the right cause's id
(a prefix: ``layernorm.eps`` takes any fitted eps)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HeldLayerNorm(nn.Module):
    def __init__(self, n, eps=1e-5, unbiased=False, eps_outside=False, no_bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps, self.unbiased, self.eps_outside, self.no_bias = eps, unbiased, eps_outside, no_bias

    def forward(self, x):
        axis = getattr(self, "axis", -1)
        mu = x.mean(dim=axis, keepdim=True)
        var = x.var(dim=axis, keepdim=True, unbiased=self.unbiased)
        den = torch.sqrt(var) + self.eps if self.eps_outside else torch.sqrt(var + self.eps)
        if getattr(self, "swapped", False):
            return (x - mu) / den * self.bias + self.weight
        y = (x - mu) / den * self.weight
        return y if self.no_bias else y + self.bias


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
        if bug.get("qkv_per_head"):          # (B, T, NH, 3, hs): q, k, v interleaved per head
            q, k, v = (t.reshape(B, T, C) for t in qkv.reshape(B, T, nh, 3, hs).unbind(3))
        if bug.get("split_no_transpose"):
            q, k, v = (t.reshape(B, nh, T, hs) for t in (q, k, v))
        else:
            q, k, v = (t.reshape(B, T, nh, hs).permute(0, 2, 1, 3) for t in (q, k, v))
        if bug.get("scale_twice"):        # q scaled, then the scores again
            q = q * hs ** -0.5
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) * bug.get("scale", hs ** -0.5)
        keep = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=bug.get("diagonal", 0))
        if bug.get("no_mask"):
            keep = torch.ones(T, T, dtype=torch.bool)
        if bug.get("mask_after_softmax"):
            w = torch.softmax(scores, dim=-1) * keep
        else:
            w = torch.softmax(scores.masked_fill(~keep, bug.get("mask_fill", float("-inf"))),
                              dim=bug.get("softmax_dim", -1))
        y = torch.einsum("bhts,bhsd->bhtd", w, v)
        if bug.get("merge_interleaved"):     # channel d*NH + h
            y = y.permute(0, 2, 3, 1).reshape(B, T, C)
        else:
            y = y.permute(0, 2, 1, 3).reshape(B, T, C)
        if bug.get("proj_no_bias"):
            return F.linear(y, self.c_proj.weight)
        if bug.get("proj_twice"):
            return self.c_proj(self.c_proj(y))
        return self.c_proj(y)


def _gelu(x, bug):
    if bug.get("gelu") == "sigmoid":
        return x * torch.sigmoid(1.702 * x)
    if bug.get("gelu") == "erf":
        return F.gelu(x)
    if bug.get("gelu") == "relu":
        return F.relu(x)
    c = bug.get("gelu_coef", 0.044715)
    k = math.sqrt(2) / math.pi if bug.get("gelu_sqrt_typo") else math.sqrt(2 / math.pi)
    return 0.5 * x * (1 + torch.tanh(k * (x + c * x ** (2 if bug.get("gelu_square") else 3))))


class HeldMLP(nn.Module):
    def __init__(self, cfg, bug):
        super().__init__()
        C = cfg["n_embd"]
        self.c_fc = nn.Linear(C, 4 * C)
        self.c_proj = nn.Linear(4 * C, C)
        self.bug = bug

    def forward(self, x):
        if self.bug.get("gelu_before_fc"):
            return self.c_proj(self.c_fc(_gelu(x, self.bug)))
        return self.c_proj(_gelu(self.c_fc(x), self.bug))


class HeldBlock(nn.Module):
    def __init__(self, cfg, bug):
        super().__init__()
        C = cfg["n_embd"]
        ln = dict(eps=bug.get("eps", 1e-5), unbiased=bug.get("unbiased", False),
                  eps_outside=bug.get("eps_outside", False), no_bias=bug.get("ln_no_bias", False))
        self.ln_1 = HeldLayerNorm(C, **ln)
        if bug.get("ln_over_time"):
            self.ln_1.axis = 1            # normalised over the positions, not the channels
        if bug.get("ln_swapped"):
            self.ln_1.swapped = True      # x*bias + weight
        self.attn = HeldAttention(cfg, bug)
        self.ln_2 = HeldLayerNorm(C, **ln)
        self.mlp = HeldMLP(cfg, bug)
        self.bug = bug

    def forward(self, x):
        if self.bug.get("mlp_first"):
            x = x + self.mlp(self.ln_2(x))
            return x + self.attn(self.ln_1(x))
        x0 = x
        a = self.attn(self.ln_1(x))
        x = a if self.bug.get("no_attn_residual") else x + a * self.bug.get("attn_branch", 1.0)
        if self.bug.get("attention_twice"):
            x = x + self.attn(self.ln_1(x))
        h = x if self.bug.get("skip_ln_2") else self.ln_2(x)
        if self.bug.get("mlp_residual_from_input"):
            return x0 + self.mlp(h)
        return x + self.mlp(h) * self.bug.get("mlp_branch", 1.0)


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
        pos = torch.arange(T) + bug.get("pos_from", 0)
        if bug.get("pos_period"):
            pos = pos % bug["pos_period"]
        if bug.get("reverse_positions"):
            pos = pos.flip(0)
        tok = self.transformer.wte(idx)
        if bug.get("wte_twice"):
            tok = tok + self.transformer.wte(idx)
        if bug.get("wte_scale"):
            tok = tok * math.sqrt(tok.shape[-1])
        x = tok + self.transformer.wpe(pos) * bug.get("wpe_scale", 1.0)
        if bug.get("wpe_twice"):
            x = x + self.transformer.wpe(pos)
        blocks = self.transformer.h[:-1] if bug.get("skip_last_block") else self.transformer.h
        if bug.get("blocks_reversed"):
            blocks = list(self.transformer.h)[::-1]
        for block in blocks:
            x = block(x)
        x = self.transformer.h[-1].ln_2(x) if bug.get("ln_f_is_ln_2") else self.transformer.ln_f(x)
        if bug.get("ln_f_twice"):
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        logp = torch.log_softmax(logits / bug.get("temperature", 1.0), dim=-1)
        if bug.get("drop_last"):
            logp, targets = logp[:, :-1], targets[:, :-1]
        if bug.get("drop_first"):
            logp, targets = logp[:, 1:], targets[:, 1:]
        if bug.get("shift_targets"):
            logp, targets = logp[:, :-1], targets[:, 1:]
        if bug.get("ignore_last_two"):
            return logits, F.nll_loss(logp.reshape(-1, logp.shape[-1]),
                                      targets.masked_fill(torch.arange(T) >= T - 2, -100).reshape(-1))
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if bug.get("smoothing"):
            eps = bug["smoothing"]
            nll = (1 - eps) * nll - eps * logp.mean(-1)
        if bug.get("sum_over_t"):
            return logits, nll.sum(-1).mean()
        if bug.get("mean_then_over_B"):
            return logits, nll.mean() / B
        return logits, nll.mean() * bug.get("loss_factor", 1.0)

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
    "mask-after-softmax": (H(mask_after_softmax=True), ATT, "attention.masking"),
    "gelu-constant-typo": (H(gelu_coef=0.04715), "layer 0 gelu gelu_forward", "gelu.cubic-constant"),
    "gelu-sigmoid": (H(gelu="sigmoid"), "layer 0 gelu gelu_forward", "gelu.sigmoid"),
    "layernorm-unbiased": (H(unbiased=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                           "layernorm.unbiased-variance"),
    "layernorm-eps-1e-8": (H(eps=1e-8), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]", "layernorm.eps"),
    "positions-reversed": (H(reverse_positions=True), "encoder encoder_forward", "embedding.positions"),
    "token-embedding-scaled": (H(wte_scale=True), "encoder encoder_forward", "embedding.table-scale"),
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


# A second held-out batch, written after the first was run and after the two families it
# missed (a mask after the softmax, a scaled table) were added to the catalogue: new
# mistakes of the same kinds, run once, untuned.
BUGS2 = {
    "qkv-order-kvq": (H(order="kvq"), ATT, "attention.qkv-order"),
    "heads-merged-interleaved": (H(merge_interleaved=True), ATT, "attention.layout"),
    "mask-filled-with-minus-1": (H(mask_fill=-1.0), ATT, "attention.mask-fill"),
    "scale-hard-coded-0.1": (H(scale=0.1), ATT, "attention.scale"),
    "gelu-sqrt2-over-pi": (H(gelu_sqrt_typo=True), "layer 0 gelu gelu_forward", "gelu.tanh-scale"),
    "gelu-erf-functional": (H(gelu="erf"), "layer 0 gelu gelu_forward", "gelu.erf"),
    "layernorm-eps-outside-sqrt": (H(eps_outside=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                                   "layernorm.eps-outside-sqrt"),
    "layernorm-without-bias": (H(ln_no_bias=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                               "structure.no-gradient"),
    "positions-from-2": (H(pos_from=2), "encoder encoder_forward", "embedding.position-shift"),
    "wpe-added-twice": (H(wpe_twice=True), "encoder encoder_forward", "structure.called-more"),
    "label-smoothing-0.2": (H(smoothing=0.2), "crossentropy crossentropy_softmax_backward",
                            "crossentropy.label-smoothing"),
    "first-position-dropped": (H(drop_first=True), "crossentropy crossentropy_softmax_backward",
                               "crossentropy.ignored-positions"),
    "last-block-skipped": (H(skip_last_block=True), "layer 1 ln1 layernorm_forward [transformer.h.1.ln_1]",
                           "structure.never-called"),
    "mlp-before-attention": (H(mlp_first=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                             "structure.out-of-order"),
    "no-attention-residual": (H(no_attn_residual=True), "layer 0 residual2 residual_forward",
                              "residual.branch-scale"),
    "logits-temperature": (H(temperature=2.0), "crossentropy crossentropy_softmax_backward",
                           "crossentropy.logit-scale"),
}


# A third held-out batch, written after the second was run and after the five families it
# missed (an interleaved merge, a finite mask fill, GELU's tanh scale, eps outside the
# square root, a logit temperature) were added: new mistakes of the same kinds, run once,
# untuned.
BUGS3 = {
    "qkv-order-vqk": (H(order="vqk"), ATT, "attention.qkv-order"),
    "scaled-twice": (H(scale_twice=True), ATT, "attention.scale=1/hs"),
    "no-causal-mask": (H(no_mask=True), ATT, "attention.no-causal-mask"),
    "relu-for-gelu": (H(gelu="relu"), "layer 0 gelu gelu_forward", "gelu.relu"),
    "gelu-coefficient-0.0447": (H(gelu_coef=0.0447), "layer 0 gelu gelu_forward", "gelu.cubic-constant"),
    "layernorm-eps-1e-3": (H(eps=1e-3), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]", "layernorm.eps"),
    "layernorm-over-positions": (H(ln_over_time=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                                 "layernorm.axis"),
    "wpe-scaled-sqrt-C": (H(wpe_scale=math.sqrt(48)), "encoder encoder_forward", "embedding.table-scale"),
    "last-two-positions-ignored": (H(ignore_last_two=True), "crossentropy crossentropy_softmax_backward",
                                   "crossentropy.ignored-positions"),
    "loss-halved": (H(loss_factor=0.5), "crossentropy crossentropy_softmax_backward", "crossentropy.divisor"),
    "logits-over-sqrt-C": (H(temperature=math.sqrt(48)), "crossentropy crossentropy_softmax_backward",
                           "crossentropy.logit-scale"),
    "blocks-reversed": (H(blocks_reversed=True), "layer 0", "structure.out-of-order"),
    "attention-twice": (H(attention_twice=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                        "structure.called-more"),
    "mlp-branch-doubled": (H(mlp_branch=2.0), "layer 0 residual3 residual_forward", "residual.branch-scale"),
}


# A fourth held-out batch, written after the third was run and after its three misses (ReLU
# for GELU, a layer norm over the positions, blocks in reverse order) were added: new
# mistakes of the same kinds, run once, untuned.
BUGS4 = {
    "qkv-interleaved-per-head": (H(qkv_per_head=True), ATT, "attention.layout"),
    "scale-multiplied": (H(scale=math.sqrt(12)), ATT, "attention.scale"),
    "softmax-dim-2": (H(softmax_dim=2), ATT, "attention.softmax-axis"),
    "gelu-before-c_fc": (H(gelu_before_fc=True), "layer 0 gelu gelu_forward", "gelu.order"),
    "gelu-x-squared": (H(gelu_square=True), "layer 0 gelu gelu_forward", "gelu.square"),
    "layernorm-affine-swapped": (H(ln_swapped=True), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                                 "layernorm.affine-swapped"),
    "layernorm-eps-1e-12": (H(eps=1e-12), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]", "layernorm.eps"),
    "positions-period-4": (H(pos_period=4), "encoder encoder_forward", "embedding.positions"),
    "wte-added-twice": (H(wte_twice=True), "encoder encoder_forward", "structure.called-more"),
    "label-smoothing-0.3": (H(smoothing=0.3), "crossentropy crossentropy_softmax_backward",
                            "crossentropy.label-smoothing"),
    "mean-then-over-B": (H(mean_then_over_B=True), "crossentropy crossentropy_softmax_backward",
                         "crossentropy.divisor"),
    "targets-shifted-in-loss": (H(shift_targets=True), "crossentropy crossentropy_softmax_backward",
                                "labels.next-position"),
    "ln_f-is-last-ln_2": (H(ln_f_is_ln_2=True), "lnf layernorm_forward [transformer.ln_f]", "structure.never-called"),
    "mlp-residual-from-block-input": (H(mlp_residual_from_input=True), "layer 0 residual3 residual_forward",
                                      "residual.wrong-input"),
    "c_proj-twice": (H(proj_twice=True), "layer 0 attproj matmul_forward [transformer.h.0.attn.c_proj]",
                     "structure.called-more"),
}


# ----------------------------------------------------------------------------- a third model
# Written differently again: a config dataclass, attention through
# F.scaled_dot_product_attention with c_attn's output viewed as (B, T, 3, NH, hs), the MLP's
# GELU a module (``act``), a layer norm of its own over F.layer_norm, the positions a
# buffer, the loss torch's F.cross_entropy. BUGS5: ordinary port bugs of the same kinds as
# the batches above and none of theirs, written before the catalogue met any of them, run
# once, untuned (tests/ports/test_model_bugs.py records that first run).

from dataclasses import dataclass


@dataclass
class ThirdConfig:
    n_embd: int
    n_head: int
    n_layer: int
    vocab_size: int
    block_size: int

    @classmethod
    def of(cls, cfg):
        get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
        try:
            return cls(get("n_embd"), get("n_head"), get("n_layer"), get("vocab_size"), get("block_size"))
        except (KeyError, AttributeError):
            return cls(cfg.channels, cfg.num_heads, cfg.num_layers, cfg.vocab_size, cfg.max_seq_len)


class ThirdNorm(nn.Module):
    """A layer norm over F.layer_norm with parameters of its own."""

    def __init__(self, n, bug):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.bug = bug

    def forward(self, x):
        bug = self.bug
        if bug.get("rms"):                 # an RMS norm (no mean subtracted), with the bias
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight + self.bias
        if bug.get("one_plus_weight"):     # the gain stored as an offset from 1
            return F.layer_norm(x, (x.shape[-1],), eps=1e-5) * (1 + self.weight) + self.bias
        if bug.get("no_affine"):           # the affine parameters left out
            return F.layer_norm(x, (x.shape[-1],), eps=1e-5)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class ThirdAttention(nn.Module):
    def __init__(self, cfg: ThirdConfig, bug):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head
        self.bug = bug

    def forward(self, x):
        B, T, C = x.shape
        nh, hs, bug = self.n_head, C // self.n_head, self.bug
        qkv = self.c_attn(x)
        if bug.get("split_hs_nh"):         # (B, T, 3, hs, NH): the head axes in the wrong order
            q, k, v = qkv.view(B, T, 3, hs, nh).permute(2, 0, 4, 1, 3)
        else:
            q, k, v = qkv.view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)
        if bug.get("swap_kv"):             # SDPA's arguments k and v swapped
            k, v = v, k
        how = dict(is_causal=not bug.get("not_causal"))
        if "scale" in bug:
            how["scale"] = bug["scale"](hs, nh, C)
        if bug.get("mask_triu"):
            how = dict(attn_mask=torch.ones(T, T, dtype=torch.bool).triu())
        y = F.scaled_dot_product_attention(q, k, v, **how)
        if bug.get("merge_transpose_2_3"):   # transpose(2, 3) typed for transpose(1, 2)
            y = y.transpose(2, 3).reshape(B, T, C)
        else:
            y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class ThirdMLP(nn.Module):
    def __init__(self, cfg: ThirdConfig, bug):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.bug = bug
        self.n_layer = cfg.n_layer

    def gelu(self, h):
        if self.bug.get("gelu_parenthesis"):   # the cubic term outside sqrt(2/pi)'s bracket
            return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * h + 0.044715 * h ** 3))
        if self.bug.get("silu"):
            return F.silu(h)
        return self.act(h)

    def forward(self, x):
        if self.bug.get("act_after_proj"):
            return self.act(self.c_proj(self.c_fc(x)))
        out = self.c_proj(self.gelu(self.c_fc(x)))
        if self.bug.get("init_scale_in_forward"):   # GPT-2's init scaling applied to the output
            out = out / math.sqrt(2 * self.n_layer)
        return out


class ThirdBlock(nn.Module):
    def __init__(self, cfg: ThirdConfig, bug):
        super().__init__()
        self.ln_1 = ThirdNorm(cfg.n_embd, bug)
        self.attn = ThirdAttention(cfg, bug)
        self.ln_2 = ThirdNorm(cfg.n_embd, bug)
        self.mlp = ThirdMLP(cfg, bug)
        self.bug = bug

    def forward(self, x):
        bug = self.bug
        if bug.get("post_norm"):           # the norms after the residual adds
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        if bug.get("parallel"):            # attention and MLP both on the block's input
            return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))
        if bug.get("residual_from_ln_1"):  # x rebound to its normalised value
            x = self.ln_1(x)
            x = x + self.attn(x)
        else:
            x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ThirdGPT(nn.Module):
    bug: dict = {}
    ln_bug: dict = {}       # the layer norms' bugs (ThirdNorm), for the blocks' norms and ln_f
    ln_f_bug: dict = {}     # ln_f's own

    def __init__(self, config):
        super().__init__()
        cfg = ThirdConfig.of(config)
        bug = dict(self.bug, **self.ln_bug)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([ThirdBlock(cfg, bug) for _ in range(cfg.n_layer)]),
            ln_f=ThirdNorm(cfg.n_embd, dict(self.ln_bug, **self.ln_f_bug)),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.register_buffer("pos", torch.arange(cfg.block_size), persistent=False)
        self.block_size = cfg.block_size

    def forward(self, idx, targets=None):
        bug = self.bug
        B, T = idx.shape
        pos = self.pos[:T]
        if bug.get("positions_across_batch"):   # positions counted over the flattened batch
            pos = torch.arange(B * T).view(B, T) % self.block_size
        tok = self.transformer.wte(idx)
        x = tok * self.transformer.wpe(pos) if bug.get("embeddings_multiplied") else tok + self.transformer.wpe(pos)
        if bug.get("ln_f_first"):
            x = self.transformer.ln_f(x)
        for block in self.transformer.h:
            x = block(x)
        if not bug.get("ln_f_first"):
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        flat, tgt = logits.view(-1, logits.size(-1)), targets.view(-1)
        if bug.get("softmax_then_ce"):
            loss = F.cross_entropy(F.softmax(flat, dim=-1), tgt)
        elif bug.get("log_softmax_eps"):
            loss = F.nll_loss(torch.log(F.softmax(flat, dim=-1) + 1e-8), tgt)
        elif bug.get("last_position_only"):
            loss = F.cross_entropy(logits[:, -1], targets[:, -1])
        else:
            loss = F.cross_entropy(flat, tgt)
        return logits, loss

    @classmethod
    def variant(cls, ln=None, ln_f=None, **bug):
        name = "_".join([*bug, *(ln or {}), *(ln_f or {})])
        return type(f"ThirdGPT_{name}", (cls,), {"bug": bug, "ln_bug": ln or {}, "ln_f_bug": ln_f or {}})


G = ThirdGPT.variant
GELU = "layer 0 gelu gelu_forward"
LN1 = "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]"
LOSS = "crossentropy crossentropy_softmax_backward"
BUGS5 = {
    "heads-split-hs-before-nh": (G(split_hs_nh=True), ATT, "attention.layout"),
    "merge-transpose-2-3": (G(merge_transpose_2_3=True), ATT, "attention.layout"),
    "sdpa-k-v-swapped": (G(swap_kv=True), ATT, "attention.qkv-order"),
    "scale-1/sqrt(n_head)": (G(scale=lambda hs, nh, C: 1 / math.sqrt(nh)), ATT, "attention.scale"),
    "mask-triu": (G(mask_triu=True), ATT, "attention.masking"),
    "sdpa-not-causal": (G(not_causal=True), ATT, "attention.no-causal-mask"),
    "gelu-parenthesis": (G(gelu_parenthesis=True), GELU, "gelu.cubic-constant"),
    "silu-for-gelu": (G(silu=True), GELU, "gelu.silu"),
    "gelu-after-c_proj": (G(act_after_proj=True), GELU, "structure.out-of-order"),
    "layernorm-one-plus-weight": (G(ln=dict(one_plus_weight=True)), LN1, "layernorm.weight-plus-one"),
    "rmsnorm-for-layernorm": (G(ln=dict(rms=True)), LN1, "layernorm.rms"),
    "positions-across-batch": (G(positions_across_batch=True), "encoder encoder_forward", "embedding.positions"),
    "embeddings-multiplied": (G(embeddings_multiplied=True), "encoder encoder_forward", "embedding.product"),
    "softmax-before-cross-entropy": (G(softmax_then_ce=True), LOSS, "crossentropy.softmax-twice"),
    "log-softmax-with-eps": (G(log_softmax_eps=True), LOSS, "crossentropy.log-eps"),
    "last-position-only": (G(last_position_only=True), LOSS, "crossentropy.ignored-positions"),
    "post-norm-block": (G(post_norm=True), LN1, "structure.out-of-order"),
    "ln_f-before-the-blocks": (G(ln_f_first=True), "lnf layernorm_forward [transformer.ln_f]",
                               "structure.out-of-order"),
    "attention-residual-from-ln_1": (G(residual_from_ln_1=True), "layer 0 residual2 residual_forward",
                                     "residual.wrong-input"),
    "parallel-attention-and-mlp": (G(parallel=True), "layer 0 residual2 residual_forward", "residual.parallel"),
    "ln_f-without-affine": (G(ln_f=dict(no_affine=True)), "lnf layernorm_forward [transformer.ln_f]",
                            "structure.no-gradient"),
    "mlp-scaled-by-init-factor": (G(init_scale_in_forward=True), "layer 0 residual3 residual_forward",
                                  "residual.branch-scale"),
}
