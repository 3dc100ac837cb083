"""Three PyTorch ports of train_gpt2.c, as people write them, for tests/ports/test_models.py.

* ``WalkGPT2``: the walkthrough's style: the C's parameter names and stacked shapes, the
  forward built from torch-op kernels (module-level functions below, with the shapes
  passed explicitly and only the outputs the port needs), autograd for the backward.
  The module is also a kernel port (BACKEND = "torch", forward kernels only).
* ``GPT``: llm.c's train_gpt2.py / nanoGPT: ``nn.Linear``, ``nn.LayerNorm``, a tied
  ``lm_head``; ``GPT.variant(...)`` plants the bugs the tests look for.
* ``hf_gpt2``: Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (no download).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKEND = "torch"


# ----------------------------------------------------------------------------
# the walkthrough's kernels: forward only, autograd does the rest

def encoder_forward(inp, wte, wpe):
    return wte[inp.long()] + wpe[:inp.shape[1]]


def layernorm_forward(inp, weight, bias, eps=1e-5):
    mean = inp.mean(-1, keepdim=True)
    xshift = inp - mean
    var = (xshift * xshift).mean(-1, keepdim=True)
    return xshift * (1.0 / torch.sqrt(var + eps)) * weight + bias


def matmul_forward(inp, weight, bias):
    out = inp @ weight.T
    return out if bias is None else out + bias


def attention_forward(inp, B, T, C, NH):
    hs = C // NH
    q, k, v = inp.split(C, dim=-1)
    q, k, v = (x.reshape(B, T, NH, hs).transpose(1, 2) for x in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C)


def gelu_forward(inp):
    return 0.5 * inp * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (inp + 0.044715 * inp ** 3)))


def residual_forward(inp1, inp2):
    return inp1 + inp2


def softmax_forward(logits):
    return logits.softmax(-1)


def crossentropy_forward(probs, targets):
    return -torch.log(probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1))


class WalkGPT2(nn.Module):
    """GPT-2 with the C's names and stacked shapes; ``vocab_bug`` takes the softmax over
    all Vp columns (the padded ones included)."""

    vocab_bug = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        Vp, C, L, maxT = config.padded_vocab_size, config.channels, config.num_layers, config.max_seq_len
        z = lambda *s: nn.Parameter(torch.zeros(*s))
        self.wte, self.wpe = z(Vp, C), z(maxT, C)
        self.ln1w, self.ln1b = z(L, C), z(L, C)
        self.qkvw, self.qkvb = z(L, 3 * C, C), z(L, 3 * C)
        self.attprojw, self.attprojb = z(L, C, C), z(L, C)
        self.ln2w, self.ln2b = z(L, C), z(L, C)
        self.fcw, self.fcb = z(L, 4 * C, C), z(L, 4 * C)
        self.fcprojw, self.fcprojb = z(L, C, 4 * C), z(L, C)
        self.lnfw, self.lnfb = z(C), z(C)

    def forward(self, inputs, targets):
        c = self.config
        B, T = inputs.shape
        C, NH, V = c.channels, c.num_heads, c.vocab_size
        x = encoder_forward(inputs, self.wte, self.wpe)
        for l in range(c.num_layers):
            h = layernorm_forward(x, self.ln1w[l], self.ln1b[l])
            h = matmul_forward(h, self.qkvw[l], self.qkvb[l])
            h = attention_forward(h, B, T, C, NH)
            x = residual_forward(x, matmul_forward(h, self.attprojw[l], self.attprojb[l]))
            h = layernorm_forward(x, self.ln2w[l], self.ln2b[l])
            h = gelu_forward(matmul_forward(h, self.fcw[l], self.fcb[l]))
            x = residual_forward(x, matmul_forward(h, self.fcprojw[l], self.fcprojb[l]))
        x = layernorm_forward(x, self.lnfw, self.lnfb)
        logits = matmul_forward(x, self.wte, None)
        probs = softmax_forward(logits if self.vocab_bug else logits[..., :V])
        loss = crossentropy_forward(probs, targets).mean()
        return logits, loss


class WalkGPT2VocabBug(WalkGPT2):
    vocab_bug = True


class WalkGPT2LossOverVp(WalkGPT2):
    """The walkthrough's model with torch's cross-entropy over all Vp logits (the padded
    columns included) instead of its own softmax and loss kernels."""

    def forward(self, inputs, targets):
        logits, _ = super().forward(inputs, targets)
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1).long())


# ----------------------------------------------------------------------------
# nanoGPT / llm.c train_gpt2.py

class CausalSelfAttention(nn.Module):
    """nanoGPT's attention; ``bugs`` (a dict, see :meth:`GPT.variant`) writes it out by hand
    with one of the mistakes ports make."""

    def __init__(self, n_embd, n_head, bugs=None):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.bugs = bugs or {}

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if not self.bugs:
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        bug = self.bugs
        hs = C // self.n_head
        if "qkv_order" in bug:             # e.g. "kqv": the chunks taken in another order
            parts = dict(zip(bug["qkv_order"], (q, k, v)))
            q, k, v = parts["q"], parts["k"], parts["v"]
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * bug.get("scale", 1.0 / math.sqrt(hs))
        mask = torch.ones(T, T, dtype=torch.bool).tril(bug.get("diagonal", 0))
        if not bug.get("no_mask"):
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=bug.get("softmax_dim", -1))
        y = att @ v                         # (B, NH, T, hs)
        if bug.get("merge_no_transpose"):   # heads merged without transposing back
            y = y.reshape(B, T, C)
        else:
            y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, gelu, gelu_first=False):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate=gelu)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.gelu_first = gelu_first         # the GELU module called before c_fc

    def forward(self, x):
        if self.gelu_first:
            return self.c_proj(self.c_fc(self.gelu(x)))
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, eps, gelu, dropout, bugs=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head, (bugs or {}).get("attn"))
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd, gelu, (bugs or {}).get("gelu_first", False))
        self.drop = nn.Dropout(dropout)
        self.bugs = bugs or {}

    def forward(self, x):
        bug = self.bugs
        x = x + bug.get("attn_branch", 1.0) * self.drop(self.attn(self.ln_1(x)))
        h = self.ln_1(x) if bug.get("ln1_for_mlp") else self.ln_2(x)
        return x + bug.get("mlp_branch", 1.0) * self.drop(self.mlp(h))


class GPT(nn.Module):
    """nanoGPT's GPT on its GPTConfig fields (block_size, vocab_size, n_layer, n_head, n_embd);
    ``GPT.variant(...)`` plants the bugs the tests look for (class attributes below; ``attn``
    and ``block`` are dicts read by CausalSelfAttention and Block)."""

    eps, gelu, dropout, tied, shift_labels = 1e-5, "tanh", 0.0, True, False
    attn: dict = {}          # CausalSelfAttention's bugs
    block: dict = {}         # Block's bugs
    pos_offset = 0           # positions start at pos_offset
    no_wpe = False           # the position table is never added
    skip_ln_f = False        # the final layer norm is left out
    label_smoothing = 0.0
    loss_reduction = "mean"  # "sum": summed over the positions
    ignore_index = None      # targets equal to it are ignored

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        bugs = dict(self.block, attn=self.attn) if (self.block or self.attn) else None
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C),
            wpe=nn.Embedding(config.block_size, C),
            drop=nn.Dropout(self.dropout),
            h=nn.ModuleList(Block(C, config.n_head, self.eps, self.gelu, self.dropout, bugs)
                            for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(C, eps=self.eps),
        ))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if self.tied:
            self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T) + self.pos_offset
        x = self.transformer.wte(idx)
        if not self.no_wpe:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(x if self.skip_ln_f else self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        how = dict(label_smoothing=self.label_smoothing, reduction=self.loss_reduction)
        if self.ignore_index is not None:
            how["ignore_index"] = self.ignore_index
        if self.shift_labels:   # as if the targets were not shifted already
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets[:, 1:].reshape(-1), **how)
        else:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), **how)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """nanoGPT's: decay the 2-D parameters only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @classmethod
    def variant(cls, **changes):
        return type(f"GPT_{'_'.join(changes)}", (cls,), changes)


# ----------------------------------------------------------------------------
# Hugging Face

def hf_gpt2(cfg, **overrides):
    """GPT2LMHeadModel set up as the C computes (no dropout, gelu_new, eps 1e-5)."""
    import transformers
    settings = dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.channels,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    bos_token_id=None, eos_token_id=None)
    settings.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))


def hf_gpt2_defaults(cfg):
    """Hugging Face's defaults: dropout 0.1 everywhere."""
    return hf_gpt2(cfg, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


# two of tests/ports/test_model_bugs.py's bugs under names the command line can load (README)
GPTqkvOrder = GPT.variant(attn=dict(qkv_order="kqv"))          # q, k, v split in the order k, q, v
GPTln1ForMLP = GPT.variant(block=dict(ln1_for_mlp=True))       # ln_1 feeds the MLP too; ln_2 unused


# ----------------------------------------------------------------------------
# bad input: models the harness cannot run as given (one line, exit 2)

class RaisesInForward(GPT):
    """Its second block's MLP raises."""

    def __init__(self, config):
        super().__init__(config)

        def broken(x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        self.transformer.h[1].mlp.forward = broken


class ReturnsNothing(GPT):
    def forward(self, idx, targets=None):
        super().forward(idx, targets)


class WrongLogits(GPT):
    def forward(self, idx, targets=None):
        logits, _ = super().forward(idx, targets)
        return logits[..., :50], None


def half_gain(config):
    """One layer-norm gain in float16."""
    model = GPT(config)
    model.transformer.h[0].ln_1.weight.data = model.transformer.h[0].ln_1.weight.data.half()
    return model
