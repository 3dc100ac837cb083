"""A seventh GPT-2, written unlike the other six (tests/ports/model_ports.py, heldout_einsum_sdpa.py,
heldout_baddbmm.py, heldout_qkv.py, heldout_fused.py), and BUGS9: the third held-out batch
of issue 30, its mistakes written (with the line of this file each one is on) and committed
on 2026-12-07 before any of them ran (only the unmodified model's forward and backward were
run, in plain torch, to see that it trains at all).

The model is train_gpt2.c's computation (learned positions, pre-LN blocks, the tanh GELU,
the head tied to the token table, causal attention, the mean cross-entropy) as a user
translating the C line by line might write it, under names of its own:

* the weights are Flax/Conv1D-style ``Dense`` modules holding a ``kernel`` of shape
  (in, out) (the C's weights transposed) and a ``bias``, applied by ``torch.addmm``;
* the token and position tables are raw parameters in an ``nn.ParameterDict`` ``embed``
  (``tokens`` with the C's Vp rows, the padding kept; ``positions``), looked up with
  ``F.embedding``; the head is ``torch.matmul`` on ``embed["tokens"]``, its logits over Vp;
* attention loops over the heads as the C's ``attention_forward`` does: each head's q, k,
  v sliced out of the fused (B, T, 3C) at the offsets 0, C, 2C plus h*hs, scores by
  ``torch.bmm`` on (B, T, hs), a boolean ``future`` buffer for the mask, the heads'
  outputs concatenated;
* the layer norm is ``F.layer_norm`` without its affine, then ``gain``/``offset`` applied
  by hand; the GELU a module with the C's ``GELU_SCALING_FACTOR`` and its ``cube``;
* the blocks are ``layers.{i}`` (``pre_attn``, ``attn`` (``qkv``, ``out``), ``pre_mlp``,
  ``mlp`` (``up``, ``act``, ``down``)), walked by index in a ``for i in range(depth)``
  loop, then ``final_norm``;
* the loss is the C's: the softmax over the first V logits, then ``F.nll_loss`` of its log.

It trains with the harness's torch.optim.AdamW (llm.c's settings). None of its names is
one the harness knows, so it runs with a map (:func:`c_slot`, what ``--model-map`` would
give): each kernel is the C's weight transposed (``qkvw[0].T``).

Each mistake is a subclass overriding one small method (or an optimizer factory) with the
mistake on one line: BUGS9 maps its name to (the model, where the first divergence must
be, the cause's id expected (a prefix; None where none is expected to exist), the text of
the line holding the mistake).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel

GELU_SCALING_FACTOR = math.sqrt(2.0 / math.pi)


class Dense(nn.Module):
    """y = x @ kernel + bias, the kernel stored (in, out) as Flax and Hugging Face's Conv1D do."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        flat = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.kernel)
        return flat.view(*x.shape[:-1], self.kernel.size(1))


class Norm(nn.Module):
    """layernorm_forward: F.layer_norm's standardisation, then the gain and offset by hand."""

    eps = 1e-5

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.offset = nn.Parameter(torch.zeros(width))

    def standardise(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def affine(self, xhat):
        return xhat * self.gain + self.offset

    def forward(self, x):
        return self.affine(self.standardise(x))


class Gelu(nn.Module):
    """gelu_forward, as the C writes it."""

    def forward(self, x):
        cube = 0.044715 * x * x * x
        return 0.5 * x * (1.0 + torch.tanh(GELU_SCALING_FACTOR * (x + cube)))


class Attention(nn.Module):
    """attention_forward as the C loops it: per head, q, k, v read from the fused qkv at
    the offsets 0, C, 2C (plus h*hs), causal softmax over the keys, the heads concatenated."""

    def __init__(self, width, n_head, max_len):
        super().__init__()
        self.n_head, self.hs = n_head, width // n_head
        self.qkv = Dense(width, 3 * width)
        self.out = Dense(width, width)
        self.register_buffer("future", torch.ones(max_len, max_len, dtype=torch.bool).triu(1), persistent=False)

    def scale(self):
        return 1.0 / math.sqrt(self.hs)

    def head(self, qkv, h):
        C, hs = self.n_head * self.hs, self.hs
        return [qkv[..., o + h * hs:o + (h + 1) * hs] for o in (0, C, 2 * C)]

    def scores(self, q, k):
        return torch.bmm(q, k.transpose(1, 2)) * self.scale()

    def causal(self, s):
        T = s.size(-1)
        return s.masked_fill(self.future[:T, :T], float("-inf"))

    def weights(self, s):
        return torch.softmax(self.causal(s), dim=2)

    def one_head(self, qkv, h):
        q, k, v = self.head(qkv, h)
        return torch.bmm(self.weights(self.scores(q, k)), v)

    def merge(self, ys):
        return torch.cat(ys, dim=-1)

    def forward(self, x):
        qkv = self.qkv(x)
        return self.out(self.merge([self.one_head(qkv, h) for h in range(self.n_head)]))


class MLP(nn.Module):
    """fc, GELU, fcproj."""

    def __init__(self, width, act=Gelu):
        super().__init__()
        self.up = Dense(width, 4 * width)
        self.act = act()
        self.down = Dense(4 * width, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """A pre-LN block: residual2 = x + attn(pre_attn(x)); residual3 = residual2 + mlp(pre_mlp(residual2))."""

    def __init__(self, width, n_head, max_len, norm=Norm, attn=Attention, act=Gelu):
        super().__init__()
        self.pre_attn = norm(width)
        self.attn = attn(width, n_head, max_len)
        self.pre_mlp = norm(width)
        self.mlp = MLP(width, act)

    def attend(self, x):
        return x + self.attn(self.pre_attn(x))

    def feed(self, x):
        return x + self.mlp(self.pre_mlp(x))

    def forward(self, x):
        return self.feed(self.attend(x))


class HeadLoopGPT(nn.Module):
    """GPT-2 from the harness's GPT2Config; ``norm``, ``attn``, ``act`` and ``layer``
    replace those classes (:func:`with_parts`)."""

    def __init__(self, config, norm=Norm, attn=Attention, act=Gelu, layer=Layer):
        super().__init__()
        C = config.channels
        self.vocab, self.max_len, self.depth = config.vocab_size, config.max_seq_len, config.num_layers
        tokens = torch.randn(config.padded_vocab_size, C) * 0.02
        tokens[config.vocab_size:] = 0.0
        self.embed = nn.ParameterDict({"tokens": nn.Parameter(tokens),
                                       "positions": nn.Parameter(torch.randn(config.max_seq_len, C) * 0.01)})
        self.layers = nn.ModuleList(layer(C, config.num_heads, config.max_seq_len, norm, attn, act)
                                    for _ in range(config.num_layers))
        self.final_norm = norm(C)

    def positions(self, T, device):
        return torch.arange(T, device=device)

    def encode(self, idx):
        tok = F.embedding(idx, self.embed["tokens"])
        pos = F.embedding(self.positions(idx.size(1), idx.device), self.embed["positions"])
        return tok + pos

    def trunk(self, x):
        for i in range(self.depth):
            x = self.layers[i](x)
        return self.final_norm(x)

    def head(self, x):
        return torch.matmul(x, self.embed["tokens"].T)

    def probs(self, logits):
        return F.softmax(logits[..., :self.vocab], dim=-1)

    def loss(self, logits, targets):
        probs = self.probs(logits)
        return F.nll_loss(torch.log(probs).flatten(0, 1), targets.flatten())

    def forward(self, idx, targets=None):
        logits = self.head(self.trunk(self.encode(idx)))
        return logits, (None if targets is None else self.loss(logits, targets))


def with_parts(model=HeadLoopGPT, **parts):
    """A factory of ``model`` with some of its parts replaced."""
    def factory(config):
        return model(config, **parts)
    factory.__name__ = f"{model.__name__}[{', '.join(p.__name__ for p in parts.values())}]"
    return factory


# the C tensor of each parameter of a block (a kernel is the C's weight transposed)
C_NAMES = {"pre_attn.gain": "ln1w", "pre_attn.offset": "ln1b", "attn.qkv.kernel": "qkvw", "attn.qkv.bias": "qkvb",
           "attn.out.kernel": "attprojw", "attn.out.bias": "attprojb", "pre_mlp.gain": "ln2w",
           "pre_mlp.offset": "ln2b", "mlp.up.kernel": "fcw", "mlp.up.bias": "fcb", "mlp.down.kernel": "fcprojw",
           "mlp.down.bias": "fcprojb"}
TOP_NAMES = {"embed.tokens": "wte", "embed.positions": "wpe", "final_norm.gain": "lnfw",
             "final_norm.offset": "lnfb"}


def c_slot(name, shape):
    """The C tensor ``name`` holds (the mapping TorchModel takes, as a --model-map gives it)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"{C_NAMES[rest]}[{int(layer)}]" + (".T" if rest.endswith(".kernel") else "")


def port(factory=HeadLoopGPT, optimizer=None):
    """The model (or a mistake's variant) as the harness runs it: with its map."""
    return TorchModel(factory, mapping=c_slot, optimizer=optimizer)


# ----------------------------------------------------------------------------- BUGS9's mistakes
# written before any of them ran; each class or factory holds one mistake, on the line BUGS9 quotes

class ScalePrecedence(Attention):            # hs ** -1 / 2 read as hs ** (-1/2): it is 1/(2 hs)
    def scale(self):
        return self.hs ** -1 / 2


class KeyValueOffsetsSwapped(Attention):     # k read at 2C, v at C
    def head(self, qkv, h):
        C, hs = self.n_head * self.hs, self.hs
        return [qkv[..., o + h * hs:o + (h + 1) * hs] for o in (0, 2 * C, C)]


class QKVReadPerHead(Attention):             # Megatron's layout: each head's q, k, v side by side
    def head(self, qkv, h):
        hs = self.hs
        return qkv[..., 3 * h * hs:3 * (h + 1) * hs].split(hs, dim=-1)


class HeadOffsetWithoutStride(Attention):    # offset h, not h * hs: the heads overlap
    def head(self, qkv, h):
        C, hs = self.n_head * self.hs, self.hs
        return [qkv[..., o + h:o + h + hs] for o in (0, C, 2 * C)]


class MaskAfterSoftmax(Attention):           # the future zeroed after the softmax, not renormalised
    def weights(self, s):
        return torch.softmax(s, dim=2).masked_fill(self.future[:s.size(-1), :s.size(-1)], 0.0)


class SoftmaxOverQueryAxis(Attention):       # dim=1 of a head's (B, T, T): the queries
    def weights(self, s):
        return torch.softmax(self.causal(s), dim=1)


class HeadsStackedLast(Attention):           # stacked on a last axis and flattened: (hs, NH) interleaved
    def merge(self, ys):
        return torch.stack(ys, dim=-1).flatten(-2)


class StatsOverTimeAndChannels(Norm):        # shape[1:] for the last axis: the statistics over (T, C)
    def standardise(self, x):
        return F.layer_norm(x, x.shape[1:], eps=self.eps)


class GainOffsetSwapped(Norm):               # the offset as the gain and the gain as the offset
    def affine(self, xhat):
        return xhat * self.offset + self.gain


class KerasEps(Norm):                        # Keras's LayerNormalization epsilon
    eps = 1e-3


class RootMeanSquare(Norm):                  # an RMS norm (LLaMA's) for the layer norm: no mean taken out
    def standardise(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class CubeConstantTypo(Gelu):                # 0.04715 typed for 0.044715
    def forward(self, x):
        cube = 0.04715 * x * x * x
        return 0.5 * x * (1.0 + torch.tanh(GELU_SCALING_FACTOR * (x + cube)))


class ScalingWithoutRoot(Gelu):              # 2/pi, the square root forgotten
    def forward(self, x):
        cube = 0.044715 * x * x * x
        return 0.5 * x * (1.0 + torch.tanh(2.0 / math.pi * (x + cube)))


class ScalingOnXOnly(Gelu):                  # the bracket lost: the factor on x, not on x + cube
    def forward(self, x):
        cube = 0.044715 * x * x * x
        return 0.5 * x * (1.0 + torch.tanh(GELU_SCALING_FACTOR * x + cube))


class PositionsRightAligned(HeadLoopGPT):    # the last T rows of the table (generation code's left padding)
    def positions(self, T, device):
        return torch.arange(self.max_len - T, self.max_len, device=device)


class PositionsFromTokenTable(HeadLoopGPT):  # the position ids looked up in the token table
    def encode(self, idx):
        tok = F.embedding(idx, self.embed["tokens"])
        pos = F.embedding(self.positions(idx.size(1), idx.device), self.embed["tokens"])
        return tok + pos


class EmbeddingDropout(HeadLoopGPT):         # GPT-2's embd_pdrop as F.dropout, whose training defaults to True
    def encode(self, idx):
        tok = F.embedding(idx, self.embed["tokens"])
        pos = F.embedding(self.positions(idx.size(1), idx.device), self.embed["positions"])
        return F.dropout(tok + pos, p=0.1)


class ParallelBranches(Layer):               # GPT-J's parallel block: the MLP reads the block's input
    def forward(self, x):
        return x + self.attn(self.pre_attn(x)) + self.mlp(self.pre_mlp(x))


class MLPBeforeAttention(Layer):             # the two halves of the block in the other order
    def forward(self, x):
        return self.attend(self.feed(x))


class LastLayerSkipped(HeadLoopGPT):         # the loop one layer short
    def trunk(self, x):
        for i in range(self.depth - 1):
            x = self.layers[i](x)
        return self.final_norm(x)


class SoftmaxOverPaddedVocab(HeadLoopGPT):   # the softmax over all Vp logits, the [:V] forgotten
    def probs(self, logits):
        return F.softmax(logits, dim=-1)


class NLLOfProbabilities(HeadLoopGPT):       # nll_loss given the probabilities, not their log
    def loss(self, logits, targets):
        probs = self.probs(logits)
        return F.nll_loss(probs.flatten(0, 1), targets.flatten())


class CrossEntropyOfProbabilities(HeadLoopGPT):  # F.cross_entropy (a second softmax) on the probabilities
    def loss(self, logits, targets):
        probs = self.probs(logits)
        return F.cross_entropy(probs.flatten(0, 1), targets.flatten())


def adam_with_l2(model, h):
    """torch.optim.Adam, whose weight_decay is an L2 term in the gradient, for AdamW."""
    return torch.optim.Adam(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)


def adamw_lr_3e4(model, h):
    """The learning rate 3e-4 written in (the usual one elsewhere) for the run's."""
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)


W = with_parts
ATT, LN1, GELU0, ENC, LOSS, UPDATE = ("layer 0 attention attention_forward", "layer 0 ln1 layernorm_forward",
                                      "layer 0 gelu gelu_forward", "encoder encoder_forward", "crossentropy ",
                                      "gpt2_update")
# name -> (the port, where the first divergence must be, the cause's id (a prefix); None:
# none expected), the text of the line holding the mistake)
BUGS9 = {
    "scale-power-precedence": (port(W(attn=ScalePrecedence)), ATT, "attention.scale", "return self.hs ** -1 / 2"),
    "kv-offsets-swapped": (port(W(attn=KeyValueOffsetsSwapped)), ATT, "attention.qkv-order",
                           "return [qkv[..., o + h * hs:o + (h + 1) * hs] for o in (0, 2 * C, C)]"),
    "qkv-read-per-head": (port(W(attn=QKVReadPerHead)), ATT, "attention.layout",
                          "return qkv[..., 3 * h * hs:3 * (h + 1) * hs].split(hs, dim=-1)"),
    "head-offset-without-stride": (port(W(attn=HeadOffsetWithoutStride)), ATT, None,
                                   "return [qkv[..., o + h:o + h + hs] for o in (0, C, 2 * C)]"),
    "mask-after-softmax": (port(W(attn=MaskAfterSoftmax)), ATT, "attention.masking",
                           "return torch.softmax(s, dim=2).masked_fill(self.future[:s.size(-1), :s.size(-1)], 0.0)"),
    "softmax-over-query-axis": (port(W(attn=SoftmaxOverQueryAxis)), ATT, "attention.softmax-axis",
                                "return torch.softmax(self.causal(s), dim=1)"),
    "heads-stacked-last": (port(W(attn=HeadsStackedLast)), ATT, "attention.layout",
                           "return torch.stack(ys, dim=-1).flatten(-2)"),
    "ln-over-time-and-channels": (port(W(norm=StatsOverTimeAndChannels)), LN1, None,
                                  "return F.layer_norm(x, x.shape[1:], eps=self.eps)"),
    "ln-gain-offset-swapped": (port(W(norm=GainOffsetSwapped)), LN1, "layernorm.affine-swapped",
                               "return xhat * self.offset + self.gain"),
    "ln-keras-eps": (port(W(norm=KerasEps)), LN1, "layernorm.eps", "eps = 1e-3"),
    "ln-rms": (port(W(norm=RootMeanSquare)), LN1, "layernorm.form",
               "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"),
    "gelu-cube-typo": (port(W(act=CubeConstantTypo)), GELU0, "gelu.cubic-constant", "cube = 0.04715 * x * x * x"),
    "gelu-scaling-without-root": (port(W(act=ScalingWithoutRoot)), GELU0, "gelu.tanh-scale",
                                  "return 0.5 * x * (1.0 + torch.tanh(2.0 / math.pi * (x + cube)))"),
    "gelu-scaling-on-x-only": (port(W(act=ScalingOnXOnly)), GELU0, "gelu.",
                               "return 0.5 * x * (1.0 + torch.tanh(GELU_SCALING_FACTOR * x + cube))"),
    "positions-right-aligned": (port(PositionsRightAligned), ENC, "embedding.position-shift",
                                "return torch.arange(self.max_len - T, self.max_len, device=device)"),
    "positions-from-token-table": (port(PositionsFromTokenTable), ENC, "structure.",
                                   'pos = F.embedding(self.positions(idx.size(1), idx.device), self.embed["tokens"])'),
    "embedding-dropout-always-on": (port(EmbeddingDropout), ENC, None, "return F.dropout(tok + pos, p=0.1)"),
    "parallel-branches": (port(W(layer=ParallelBranches)), "layer 0 residual2", "residual.parallel",
                          "return x + self.attn(self.pre_attn(x)) + self.mlp(self.pre_mlp(x))"),
    "mlp-before-attention": (port(W(layer=MLPBeforeAttention)), "layer 0 ln", "structure.out-of-order",
                             "return self.attend(self.feed(x))"),
    "last-layer-skipped": (port(LastLayerSkipped), "layer 1 ln1 layernorm_forward", "structure.never-called",
                           "for i in range(self.depth - 1):"),
    "softmax-over-padded-vocab": (port(SoftmaxOverPaddedVocab), LOSS, "softmax.padded-columns",
                                  "return F.softmax(logits, dim=-1)"),
    "nll-of-probabilities": (port(NLLOfProbabilities), LOSS, "crossentropy.",
                             "return F.nll_loss(probs.flatten(0, 1), targets.flatten())"),
    "cross-entropy-of-probabilities": (port(CrossEntropyOfProbabilities), LOSS, "crossentropy.",
                                       "return F.cross_entropy(probs.flatten(0, 1), targets.flatten())"),
    "adam-l2-decay": (port(optimizer=adam_with_l2), UPDATE, "adamw.l2",
                      "return torch.optim.Adam(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), "
                      "eps=h.eps, weight_decay=h.weight_decay)"),
    "adamw-lr-3e-4": (port(optimizer=adamw_lr_3e4), UPDATE, None,
                      "return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(h.beta1, h.beta2), eps=h.eps, "
                      "weight_decay=h.weight_decay)"),
}


def line_of(text: str) -> int:
    """The line number of this file whose stripped text is ``text`` (it must be the only one)."""
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
