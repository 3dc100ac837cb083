"""A small GPT-2 written out by hand under nanoGPT's names (``transformer.h.N.attn.c_attn``
...), its parts as small methods, with one mistake per variant on one line, for
tests/ports/test_pins.py: each failure (a structural finding, a residual, the encoder, a NaN,
a mask, a constructor's constant, the loss, a detached weight, a custom autograd
Function's gradient, the optimizer's settings, a parameter left out or its module's output
dropped, torch's module built with a setting not GPT-2's, q and k chunked swapped, a dropout left on, a
GELU's sum with a wrong term, heads flattened interleaved, a class body's eps, the loss over padded logits, a
parallel block, halves swapped through helpers, a block skipped by a loop, a table read in another's place)
must be pinned to the mistake's line,
found by its text. ``PinGPT`` itself is right; it is not tests/ports/heldout_qkv.py's model
(the tests are not tuned to BUGS7)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class Norm(nn.Module):
    """A layer norm written out."""

    def __init__(self, C, eps=1e-5):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.eps = eps

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * (xc.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt() * self.weight + self.bias


class Attn(nn.Module):
    """Causal attention, fused q, k, v."""

    def __init__(self, C, NH):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.NH = NH

    def heads(self, t):
        B, T, C = t.shape
        return t.view(B, T, self.NH, C // self.NH).transpose(1, 2)

    def causal(self, T):
        return torch.ones(T, T, dtype=torch.bool).triu(1)

    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return F.softmax(s, dim=-1)

    def forward(self, x):
        q, k, v = (self.heads(t) for t in self.c_attn(x).chunk(3, dim=-1))
        y = (self.probs(q, k) @ v).transpose(1, 2).flatten(2)
        return self.c_proj(y)


class Gelu(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(C, 4 * C), Gelu(), nn.Linear(4 * C, C)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, C, NH, norm=Norm, attn=Attn):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(C), attn(C, NH), norm(C), MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class PinGPT(nn.Module):
    """GPT-2 on the harness's config; class attributes pick the parts (``norm``, ``attn``,
    ``block``)."""

    norm, attn, block = Norm, Attn, Block

    def __init__(self, config):
        super().__init__()
        C = config.channels
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C), wpe=nn.Embedding(config.max_seq_len, C),
            h=nn.ModuleList(self.block(C, config.num_heads, self.norm, self.attn) for _ in range(config.num_layers)),
            ln_f=self.norm(C)))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    @classmethod
    def variant(cls, **parts):
        return type(f"PinGPT_{'_'.join(parts)}", (cls,), parts)

    def embed(self, idx):
        return self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))

    def head(self, x):
        return self.lm_head(self.transformer.ln_f(x))

    def loss(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))


# ----------------------------------------------------------------------------- the mistakes, one line each

class NoLn2(Block):
    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(x)
        return x


class Ln1ForMlp(Block):
    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = self.ln_1(x)
        return x + self.mlp(h)


class NoProj(Attn):
    def forward(self, x):
        q, k, v = (self.heads(t) for t in self.c_attn(x).chunk(3, dim=-1))
        return (self.probs(q, k) @ v).transpose(1, 2).flatten(2)


class LnFSkipped(PinGPT):
    def head(self, x):
        return self.lm_head(x)


class PostLN(Block):
    def forward(self, x):
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class Ln1Twice(Block):
    def forward(self, x):
        x = x + self.attn(self.ln_1(self.ln_1(x)))
        x = x + self.mlp(self.ln_2(x))
        return x


class MlpResidualDropped(Block):
    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = self.mlp(self.ln_2(x))
        return x


class WteHalved(PinGPT):
    def embed(self, idx):
        return self.transformer.wte(idx) * 0.5 + self.transformer.wpe(torch.arange(idx.size(1)))


class SoftmaxOverQueriesAndHeads(Attn):
    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return F.softmax(s, dim=1)


class MaskSeesNext(Attn):
    def causal(self, T):
        return torch.ones(T, T, dtype=torch.bool).triu(2)


class TinyEpsNorm(Norm):
    def __init__(self, C, eps=1e-9):
        super().__init__(C, eps)


class LossSmoothed(PinGPT):
    def loss(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.05)


class TokensDetached(PinGPT):
    def embed(self, idx):
        return self.transformer.wte(idx).detach() + self.transformer.wpe(torch.arange(idx.size(1)))


class GainDetached(Norm):
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * (xc.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt() * self.weight.detach() + self.bias


class DoubledGeluGrad(torch.autograd.Function):
    """GELU's forward, its backward's gradient doubled."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = F.gelu(x, approximate="tanh")
            (d,) = torch.autograd.grad(y, x, g)
        return 2.0 * d


class FunctionGelu(Gelu):
    def forward(self, x):
        return DoubledGeluGrad.apply(x)


class FunctionMLP(MLP):
    def __init__(self, C):
        super().__init__(C)
        self.gelu = FunctionGelu()


class FunctionBlock(Block):
    def __init__(self, C, NH, norm=Norm, attn=Attn):
        super().__init__(C, NH, norm, attn)
        self.mlp = FunctionMLP(C)


def adam_blocks_only(model, hyper):
    """An optimizer factory given the blocks' parameters only: the rest is never updated."""
    return torch.optim.AdamW(
        model.transformer.h.parameters(),
        lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, weight_decay=hyper.weight_decay)


def adam_wrong_eps(model, hyper):
    """An optimizer factory whose eps is nanoGPT-style 1e-6."""
    return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate,
                             betas=(hyper.beta1, hyper.beta2),
                             eps=1e-6,
                             weight_decay=hyper.weight_decay)


def adam_no_decay(model, hyper):
    """An optimizer factory that leaves weight decay to torch's default."""
    return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate,
                             betas=(hyper.beta1, hyper.beta2), eps=hyper.eps)


class HeadLoopAttn(Attn):
    """The same attention, one head at a time: each head's (B, T, hs) slices of the fused
    q, k, v, its own scores, softmax and weighted values, the heads concatenated."""

    def slices(self, qkv, h):
        C = qkv.size(-1) // 3
        hs = C // self.NH
        return [qkv[..., o + h * hs:o + (h + 1) * hs] for o in (0, C, 2 * C)]

    def weights(self, s):
        T = s.size(-1)
        return F.softmax(s.masked_fill(self.causal(T), -math.inf), dim=-1)

    def one(self, qkv, h):
        q, k, v = self.slices(qkv, h)
        s = q @ k.transpose(1, 2) / math.sqrt(q.size(-1))
        return self.weights(s) @ v

    def forward(self, x):
        qkv = self.c_attn(x)
        return self.c_proj(torch.cat([self.one(qkv, h) for h in range(self.NH)], dim=-1))


class HeadLoopSoftmaxOverQueries(HeadLoopAttn):
    def weights(self, s):
        T = s.size(-1)
        return F.softmax(s.masked_fill(self.causal(T), -math.inf), dim=1)


class HeadLoopQKVSideBySide(HeadLoopAttn):    # Megatron's layout: a head's q, k, v side by side
    def slices(self, qkv, h):
        hs = qkv.size(-1) // 3 // self.NH
        return qkv[..., 3 * h * hs:3 * (h + 1) * hs].split(hs, dim=-1)


class HeadLoopKeysFromValues(HeadLoopAttn):
    def slices(self, qkv, h):
        C = qkv.size(-1) // 3
        hs = C // self.NH
        return [qkv[..., o + h * hs:o + (h + 1) * hs] for o in (0, 2 * C, 2 * C)]


# ----------------------------------------------------------------------------- more general pins

class MethodScaleAttn(Attn):
    """The scores' scale from a method of the module (right: 1/sqrt(hs))."""

    def scale(self):
        return 1.0 / math.sqrt(self.c_attn.in_features // self.NH)

    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) * self.scale()
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return F.softmax(s, dim=-1)


class MethodScaleByHs(MethodScaleAttn):
    def scale(self):
        return 1.0 / (self.c_attn.in_features // self.NH)


class MaskHidesThePast(Attn):
    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(~self.causal(q.size(-2)), float('-inf'))
        return F.softmax(s, dim=-1)


class FnMLP(nn.Module):
    """The MLP with its GELU a method, no module (right)."""

    def __init__(self, C):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def act(self, h):
        return F.gelu(h, approximate="tanh")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GeluAfterProj(FnMLP):
    def forward(self, x):
        return self.act(self.c_proj(self.c_fc(x)))


def mlp_block(mlp):
    """A Block whose MLP is ``mlp``."""
    class MLPBlock(Block):
        def __init__(self, C, NH, norm=Norm, attn=Attn):
            super().__init__(C, NH, norm, attn)
            self.mlp = mlp(C)
    return MLPBlock


def adam_groups(model, hyper):
    """Parameter groups, decay on all (right)."""
    ps = list(model.parameters())
    groups = [{"params": [p for p in ps if p.dim() >= 2]},
              {"params": [p for p in ps if p.dim() < 2]}]
    return torch.optim.AdamW(groups, lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                             weight_decay=hyper.weight_decay)


def adam_groups_no_decay(model, hyper):
    """nanoGPT's groups: no decay on the vectors, set in their group's dict."""
    ps = list(model.parameters())
    groups = [{"params": [p for p in ps if p.dim() >= 2]},
              {"params": [p for p in ps if p.dim() < 2],
               'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                             weight_decay=hyper.weight_decay)


class MaskFilledWithZero(Attn):
    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(self.causal(q.size(-2)), 0.0)
        return F.softmax(s, dim=-1)


@dataclass
class NormConfig:
    """The norms' settings, a config object the blocks hold (right)."""

    norm_eps: float = 1e-5


@dataclass
class TinyEpsConfig(NormConfig):
    norm_eps: float = 1e-8


def config_block(config):
    """A Block whose norms take their eps from a ``config`` object it holds."""
    class ConfigBlock(Block):
        def __init__(self, C, NH, norm=Norm, attn=Attn):
            super().__init__(C, NH, norm, attn)
            self.settings = config()
            self.ln_1, self.ln_2 = norm(C, eps=self.settings.norm_eps), norm(C, eps=self.settings.norm_eps)
    return ConfigBlock


class BiasLeftOutNorm(Norm):
    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return self.weight * xc * (xc.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()


class BlocksSideBySide(PinGPT):             # every block run on the embeddings, the last one's result kept
    def forward(self, idx, targets=None):
        x = self.embed(idx)
        outs = [block(x) for block in self.transformer.h]
        logits = self.head(outs[-1])
        return logits, (None if targets is None else self.loss(logits, targets))


class PositionsScaledByFreq(PinGPT):        # the position table's gradient divided by each row's count
    def __init__(self, config):
        super().__init__(config)
        self.transformer.wpe = nn.Embedding(config.max_seq_len, config.channels,
                                            scale_grad_by_freq=True)

    def embed(self, idx):
        return self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)).expand_as(idx))


class DefaultsSpelledOut(PinGPT):           # torch's defaults written out (right)
    def __init__(self, config):
        super().__init__(config)
        self.transformer.wpe = nn.Embedding(config.max_seq_len, config.channels, None, None, 2.0, False)
        self.lm_head = nn.Linear(config.channels, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight


class KeysChunkedFirst(Attn):
    def forward(self, x):
        k, q, v = map(self.heads, self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj((self.probs(q, k) @ v).transpose(1, 2).flatten(2))


class TorchGeluMLP(MLP):
    def __init__(self, C):
        super().__init__(C)
        self.gelu = nn.GELU()


class TanhGeluMLP(MLP):                     # torch's GELU module, tanh (right)
    def __init__(self, C):
        super().__init__(C)
        self.gelu = nn.GELU(approximate="tanh")


class TorchNorm(nn.LayerNorm):              # torch's layer norm (right)
    def __init__(self, C):
        super().__init__(C)


class LooseTorchNorm(nn.LayerNorm):
    def __init__(self, C):
        super().__init__(C, eps=1e-3)


# ----------------------------------------------------------------------------- wiring, draws, terms and layouts

class DropoutLeftOn(PinGPT):                # F.dropout's training defaults to True
    def embed(self, idx):
        return F.dropout(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1))), p=0.1)


class DropoutOff(PinGPT):                   # a dropout of p=0 (right)
    def embed(self, idx):
        return F.dropout(self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1))), p=0.0)


class GeluByHand(Gelu):                     # the tanh GELU written out (right)
    def forward(self, x):
        inner = 0.044715 * x ** 3
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + inner)))


class GeluFactorOnXOnly(Gelu):
    def forward(self, x):
        inner = 0.044715 * x ** 3
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x + inner))


class GeluByHandMLP(MLP):
    gelu_class = GeluByHand

    def __init__(self, C):
        super().__init__(C)
        self.gelu = self.gelu_class()


class GeluFactorMLP(GeluByHandMLP):
    gelu_class = GeluFactorOnXOnly


class HeadsInterleaved(Attn):
    def forward(self, x):
        q, k, v = (self.heads(t) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj((self.probs(q, k) @ v).permute(0, 2, 3, 1).flatten(2))


class ClassEpsNorm(nn.Module):              # its eps a class attribute (right)
    eps = 1e-5

    def __init__(self, C):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, eps=self.eps)


class LooseClassEpsNorm(ClassEpsNorm):
    eps = 1e-3


class PaddedVocabGPT(PinGPT):               # logits over the padded vocabulary, the loss over the first V (right)
    def __init__(self, config):
        super().__init__(config)
        self.V = config.vocab_size
        self.lm_head = nn.Linear(config.channels, config.padded_vocab_size, bias=False)
        self.transformer.wte = nn.Embedding(config.padded_vocab_size, config.channels)
        self.transformer.wte.weight = self.lm_head.weight

    def loss(self, logits, targets):
        return F.cross_entropy(logits[..., :self.V].flatten(0, 1), targets.flatten())


class LossOverPaddedVocab(PaddedVocabGPT):
    def loss(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))


class ParallelBlock(Block):                 # GPT-J's block: both branches read the block's input
    def forward(self, x):
        return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))


class HelperBlock(Block):                   # the halves as helpers (right)
    def attend(self, x):
        return x + self.attn(self.ln_1(x))

    def feed(self, x):
        return x + self.mlp(self.ln_2(x))

    def forward(self, x):
        return self.feed(self.attend(x))


class HalvesSwapped(HelperBlock):
    def forward(self, x):
        return self.attend(self.feed(x))


class IndexedLoopGPT(PinGPT):               # the blocks walked by index (right)
    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for i in range(len(self.transformer.h)):
            x = self.transformer.h[i](x)
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))


class LastBlockSkipped(PinGPT):
    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for i in range(len(self.transformer.h) - 1):
            x = self.transformer.h[i](x)
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))


class TablesGPT(PinGPT):                    # the tables raw parameters in a ParameterDict (right)
    def __init__(self, config):
        super().__init__(config)
        del self.transformer["wte"], self.transformer["wpe"]
        self.tables = nn.ParameterDict({"tokens": self.lm_head.weight,
                                        "positions": nn.Parameter(torch.zeros(config.max_seq_len, config.channels))})

    def embed(self, idx):
        tok = F.embedding(idx, self.tables["tokens"])
        pos = F.embedding(torch.arange(idx.size(1)), self.tables["positions"])
        return tok + pos


class PositionsFromTokens(TablesGPT):
    def embed(self, idx):
        tok = F.embedding(idx, self.tables["tokens"])
        pos = F.embedding(torch.arange(idx.size(1)), self.tables['tokens'])
        return tok + pos


TABLES = {"tables.tokens": "wte", "tables.positions": "wpe"}


class LnFInLoop(PinGPT):                    # the final norm inside the blocks' loop (and again in the head)
    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.transformer.h:
            x = self.transformer.ln_f(block(x))
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))


# ----------------------------------------------------------------------------- values from helpers and callers

class ArgScaleAttn(Attn):                   # the scores' scale from a method given the queries (right)
    def scale(self, q):
        return q.size(-1) ** -0.5

    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) * self.scale(q)
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return F.softmax(s, dim=-1)


class ArgScaleByWidth(ArgScaleAttn):
    def scale(self, q):
        return (q.size(-1) * self.NH) ** -0.5


class NormMath:                             # a layer norm's arithmetic, not a module, its eps a class attribute
    eps = 1e-5

    def apply(self, x, weight, bias):
        xc = x - x.mean(-1, keepdim=True)
        return xc * (xc.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt() * weight + bias


class LooseNormMath(NormMath):
    eps = 2e-3


class MathNorm(nn.Module):                  # a norm whose arithmetic an object it holds does (right)
    math = NormMath

    def __init__(self, C):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))
        self.ops = self.math()

    def forward(self, x):
        return self.ops.apply(x, self.weight, self.bias)


class LooseMathNorm(MathNorm):
    math = LooseNormMath


def adam_masked(model, hyper, decayed=lambda p: True):
    """Groups split by a mask the caller may pass: every parameter decayed by default (right)."""
    ps = list(model.parameters())
    groups = [{"params": [p for p in ps if decayed(p)], "weight_decay": hyper.weight_decay},
              {"params": [p for p in ps if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps)


def adam_matrices_decayed(model, hyper):
    return adam_masked(model, hyper, decayed=lambda p: p.dim() >= 2)


def adam_scheduled(model, hyper, factor=lambda step: 1.0):
    """A scheduler built on the optimizer: a constant factor of 1 (right)."""
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2),
                            eps=hyper.eps, weight_decay=hyper.weight_decay)
    opt.schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt


def adam_warmed_up(model, hyper):
    opt = adam_scheduled(model, hyper)
    opt.warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 10))
    return opt


class OneHotLossGPT(PinGPT):                # the loss as one-hot labels times log-probabilities (right)
    def loss(self, logits, targets):
        labels = F.one_hot(targets, logits.size(-1)).to(logits.dtype)
        return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class OneHotLossMeanOverVocab(OneHotLossGPT):
    def loss(self, logits, targets):
        labels = F.one_hot(targets, logits.size(-1)).to(logits.dtype)
        return -(labels * F.log_softmax(logits, dim=-1)).mean()


class StackedHeadsAttn(Attn):               # the heads stacked on the batch axis, (B*NH, T, hs), bmm (right)
    def heads(self, t):
        B, T, C = t.shape
        return t.view(B, T, self.NH, C // self.NH).transpose(1, 2).reshape(B * self.NH, T, C // self.NH)

    def merge(self, y, B):
        _, T, hs = y.shape
        return y.view(B, self.NH, T, hs).transpose(1, 2).reshape(B, T, self.NH * hs)

    def forward(self, x):
        q, k, v = (self.heads(t) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(self.merge(torch.bmm(self.probs(q, k), v), x.size(0)))


class StackedMergedInPlace(StackedHeadsAttn):
    def merge(self, y, B):
        _, T, hs = y.shape
        return y.reshape(B, T, self.NH * hs)


class HelperSoftmaxAttn(Attn):              # the softmax a helper given its axis by the caller (right)
    def softmax(self, s, dim=-1):
        e = torch.exp(s - s.amax(dim=dim, keepdim=True))
        return e / e.sum(dim=dim, keepdim=True)

    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return self.softmax(s, dim=-1)


class HelperSoftmaxOverQueries(HelperSoftmaxAttn):
    def probs(self, q, k):
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        s = s.masked_fill(self.causal(q.size(-2)), float("-inf"))
        return self.softmax(s, dim=-2)
