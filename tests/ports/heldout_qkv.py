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


# ----------------------------------------------------------------------------- BUGS7's mistakes
# written before any of them ran; each class holds one mistake, on the line BUGS7 quotes

class VFromToK(SelfAttention):              # v projected by to_k (copy and paste)
    def project(self, x):
        return self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_k(x))


class ScaleByWidth(SelfAttention):          # 1/sqrt(C), not 1/sqrt(head size)
    def scores(self, q, k):
        return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.heads * self.head_dim)


class MaskPastNotFuture(SelfAttention):     # tril for triu: the past hidden, the future seen
    def mask(self, scores):
        n = scores.size(-1)
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril(diagonal=-1)
        return scores.masked_fill(future, float("-inf"))


class MaskOneAhead(SelfAttention):          # triu(2): one future token seen
    def mask(self, scores):
        n = scores.size(-1)
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(diagonal=2)
        return scores.masked_fill(future, float("-inf"))


class SplitHeadDimFirst(SelfAttention):     # channels split (head_dim, heads): heads interleaved
    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.head_dim, self.heads).permute(0, 3, 1, 2)


class SplitWithoutTranspose(SelfAttention):  # (B, T, C) viewed straight as (B, NH, T, hs)
    def split(self, t):
        b, n, _ = t.shape
        return t.view(b, self.heads, n, self.head_dim)


class SoftmaxOverHeads(SelfAttention):      # dim=1 of (B, NH, T, T): across the heads
    def weights(self, scores):
        return torch.softmax(scores, dim=1)


class NoOutputProjection(SelfAttention):    # to_out never applied
    def forward(self, x):
        q, k, v = self.project(x)
        att = self.weights(self.mask(self.scores(q, k)))
        return self.merge(att @ v)


class UnbiasedVariance(LayerNorm):          # torch's var: Bessel's correction
    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class EpsOnStd(LayerNorm):                  # eps added to the standard deviation
    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        return (x - mean) / (var.sqrt() + self.eps) * self.weight + self.bias


class BertEps(LayerNorm):                   # BERT's eps 1e-12
    def __init__(self, width, eps=1e-12):
        super().__init__(width, eps)


class GeluErf(FeedForward):                 # F.gelu's default: the exact erf form
    def activation(self, h):
        return F.gelu(h)


class GeluRootInverted(FeedForward):        # sqrt(pi/2) for sqrt(2/pi)
    def activation(self, h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(math.pi / 2.0) * (h + 0.044715 * h ** 3)))


class GeluSigmoid(FeedForward):             # the sigmoid approximation x * sigmoid(1.702 x)
    def activation(self, h):
        return h * torch.sigmoid(1.702 * h)


class AttentionOnRawResidual(DecoderLayer):  # attn_norm left out of the attention's input
    def forward(self, x):
        x = x + self.attention(x)
        x = x + self.feedforward(self.ff_norm(x))
        return x


class PostNorm(DecoderLayer):               # post-LN: the norms after the residual adds
    def forward(self, x):
        x = self.attn_norm(x + self.attention(x))
        return self.ff_norm(x + self.feedforward(x))


class AttentionResidualDropped(DecoderLayer):  # the attention's output replaces x
    def forward(self, x):
        x = self.attention(self.attn_norm(x))
        x = x + self.feedforward(self.ff_norm(x))
        return x


class FeedForwardResidualFromNorm(DecoderLayer):  # the MLP's residual taken from ff_norm's output
    def forward(self, x):
        x = x + self.attention(self.attn_norm(x))
        h = self.ff_norm(x)
        return h + self.feedforward(h)


class TokensScaled(Model):                  # token embeddings times sqrt(C), as in "Attention is all you need"
    def embed(self, idx):
        positions = torch.arange(idx.size(1), device=idx.device)
        return self.token_table(idx) * math.sqrt(self.width) + self.position_table(positions)


class HeadDetached(Model):                  # the tied head's weight detached: wte's gradient only from the encoder
    def head(self, x):
        return F.linear(x, self.token_table.weight.detach())


class OutNormSkipped(Model):                # out_norm never applied
    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for layer in self.decoder:
            x = layer(x)
        logits = self.head(x)
        return logits, (None if targets is None else self.loss(logits, targets))


class LossOverBatch(Model):                 # the summed loss divided by B, not B*T
    def loss(self, logits, targets):
        logprobs = logits - logits.logsumexp(dim=-1, keepdim=True)
        picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -picked.sum() / logits.size(0)


class LossShifted(Model):                   # Hugging Face's shift, on targets that are already the next tokens
    def loss(self, logits, targets):
        logprobs = logits - logits.logsumexp(dim=-1, keepdim=True)
        return -logprobs[:, :-1].gather(-1, targets[:, 1:].unsqueeze(-1)).mean()


def adamw_torch_decay(model, hyper):
    """weight_decay left to torch's default (0.01)."""
    return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2),
                             eps=hyper.eps)


def adamw_nanogpt_betas(model, hyper):
    """nanoGPT's betas (0.9, 0.95) for llm.c's (0.9, 0.999)."""
    return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(0.9, 0.95),
                             eps=hyper.eps, weight_decay=hyper.weight_decay)


W = Model.variant
ATT = "layer 0 attention attention_forward"
LN1 = "layer 0 ln1 layernorm_forward"
GELU = "layer 0 gelu gelu_forward"
LOSS = "crossentropy crossentropy_softmax_backward"
UPDATE = "gpt2_update"

# name -> (model, where the first divergence must be, the cause's id expected (a prefix:
# the family alone where the form's id is not known in advance; None: no cause expected to
# exist), the line of this file holding the mistake)
BUGS7 = {
    "v-projected-by-to_k": (W(attention=VFromToK), "layer 0 qkv matmul_forward", "structure.never-called",
                            "return self.split(self.to_q(x)), self.split(self.to_k(x)), self.split(self.to_k(x))"),
    "scale-by-sqrt-width": (W(attention=ScaleByWidth), ATT, "attention.scale",
                            "return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.heads * self.head_dim)"),
    "mask-past-not-future": (W(attention=MaskPastNotFuture), ATT, "attention.mask",
                             "future = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril(diagonal=-1)"),
    "mask-one-ahead": (W(attention=MaskOneAhead), ATT, "attention.mask",
                       "future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(diagonal=2)"),
    "split-head-dim-first": (W(attention=SplitHeadDimFirst), ATT, "attention.layout",
                             "return t.view(b, n, self.head_dim, self.heads).permute(0, 3, 1, 2)"),
    "split-without-transpose": (W(attention=SplitWithoutTranspose), ATT, "attention.layout",
                                "return t.view(b, self.heads, n, self.head_dim)"),
    "softmax-over-heads": (W(attention=SoftmaxOverHeads), ATT, "attention.softmax",
                           "return torch.softmax(scores, dim=1)"),
    "no-output-projection": (W(attention=NoOutputProjection), "layer 0 attproj matmul_forward",
                             "structure.never-called", "return self.merge(att @ v)"),
    "layernorm-unbiased-variance": (W(norm=UnbiasedVariance), LN1, "layernorm.",
                                    "var = x.var(dim=-1, keepdim=True)"),
    "layernorm-eps-on-std": (W(norm=EpsOnStd), LN1, "layernorm.",
                             "return (x - mean) / (var.sqrt() + self.eps) * self.weight + self.bias"),
    "layernorm-eps-1e-12": (W(norm=BertEps), LN1, "layernorm.eps", "def __init__(self, width, eps=1e-12):"),
    "gelu-erf": (W(feedforward=GeluErf), GELU, "gelu.erf", "return F.gelu(h)"),
    "gelu-root-inverted": (W(feedforward=GeluRootInverted), GELU, "gelu.",
                           "return 0.5 * h * (1.0 + torch.tanh(math.sqrt(math.pi / 2.0) * (h + 0.044715 * h ** 3)))"),
    "gelu-sigmoid": (W(feedforward=GeluSigmoid), GELU, "gelu.", "return h * torch.sigmoid(1.702 * h)"),
    "attention-on-raw-residual": (W(layer=AttentionOnRawResidual), LN1, "structure.never-called",
                                  "x = x + self.attention(x)"),
    "post-norm": (W(layer=PostNorm), LN1, "structure.out-of-order",
                  "x = self.attn_norm(x + self.attention(x))"),
    "attention-residual-dropped": (W(layer=AttentionResidualDropped), "layer 0 residual2 residual_forward",
                                   "residual.", "x = self.attention(self.attn_norm(x))"),
    "ff-residual-from-norm": (W(layer=FeedForwardResidualFromNorm), "layer 0 residual3 residual_forward",
                              "residual.", "return h + self.feedforward(h)"),
    "tokens-scaled-by-sqrt-C": (TokensScaled, "encoder encoder_forward", "embedding.",
                                "return self.token_table(idx) * math.sqrt(self.width) + self.position_table(positions)"),
    "head-weight-detached": (HeadDetached, "wte gradient", None,
                             "return F.linear(x, self.token_table.weight.detach())"),
    "out-norm-skipped": (OutNormSkipped, "lnf layernorm_forward", "structure.never-called",
                         "logits = self.head(x)"),
    "loss-divided-by-B": (LossOverBatch, LOSS, "crossentropy.divisor", "return -picked.sum() / logits.size(0)"),
    "loss-targets-shifted": (LossShifted, LOSS, "crossentropy.",
                             "return -logprobs[:, :-1].gather(-1, targets[:, 1:].unsqueeze(-1)).mean()"),
    "adamw-torch-default-decay": (TorchModel(Model, optimizer=adamw_torch_decay), UPDATE, "adamw.",
                                  "eps=hyper.eps)"),
    "adamw-nanogpt-betas": (TorchModel(Model, optimizer=adamw_nanogpt_betas), UPDATE, "adamw.",
                            "return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(0.9, 0.95),"),
}


def line_of(text: str) -> int:
    """The line number of this file whose stripped text is ``text`` (it must be the only one)."""
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
