"""A ninth GPT-2, written unlike the other eight (tests/ports/model_ports.py,
heldout_einsum_sdpa.py, heldout_baddbmm.py, heldout_qkv.py, heldout_fused.py,
heldout_headloop.py, heldout_litgpt.py), and BUGS11: the fifth held-out batch of issue 30,
its mistakes written (with the line of this file each one is on) and committed on
2026-12-08 before any of them ran (only the unmodified model's forward and backward were
run, in plain torch, to see that it trains and agrees with F.layer_norm,
F.scaled_dot_product_attention and F.cross_entropy on the same tensors, and each mistake's
variant was built and run forward once in plain torch, to see that it runs; the harness
and the scorer were not run on any of it).

The model is train_gpt2.c's computation (learned positions, pre-LN blocks, the tanh GELU,
the head tied to the token table, causal attention, the mean cross-entropy over the V real
columns) as a user porting a JAX/Flax GPT-2 into torch would write it, keeping its
functional structure:

* the parameters are one flat dict of tensors keyed by Flax's flattened paths
  (``flax.traverse_util.flatten_dict(sep="/")``): ``transformer/wte/embedding`` (Vp rows,
  the padding kept), ``transformer/wpe/embedding``, ``transformer/h/<i>/ln_1/scale`` and
  ``/bias``, ``transformer/h/<i>/attn/c_attn/kernel`` (stored (in, out) as Flax's ``Dense``
  stores it: (C, 3C)), ``.../attn/c_proj/kernel``, ``ln_2``, ``mlp/c_fc``, ``mlp/c_proj``,
  ``transformer/ln_f``; :func:`init_params` builds the dict, and ``FlatGPT`` holds it in one
  ``nn.ParameterDict`` (``params``), with no submodule at all;
* the computation is a namespace of pure functions, :class:`Ops`, taking that dict (the
  ``apply`` of a Flax model): ``embed`` indexes the token table and adds the first T rows
  of the position table; ``layer_norm`` is written out (centred, the mean of squares,
  ``torch.rsqrt``, ``scale``/``bias``: Flax's names); ``dense`` is ``x @ kernel + bias``;
  attention splits the fused projection, moves the heads into the batch, (B*NH, T, hs),
  takes the scores with ``torch.bmm``, masks them with ``masked_fill`` of the dtype's
  minimum under a ``triu`` mask (JAX's ``jnp.where(mask, s, finfo.min)``), and has a softmax
  of its own (``exp`` of the max-subtracted scores over their sum); GELU is
  ``jax.nn.gelu(approximate=True)`` written out; the head is Flax's ``Embed.attend``,
  ``x @ wte.T``; the loss is optax's ``softmax_cross_entropy`` on one-hot labels,
  ``-(one_hot * log_softmax).sum(-1).mean()`` over the first V columns;
* the hyperparameters are a ``NamedTuple`` with Flax-port names (``width``, ``heads``,
  ``depth``, ``seq_len``, ``vocab``, ``vocab_padded``);
* the optimizer is optax's ``adamw`` with a weight-decay mask, written as
  ``torch.optim.AdamW`` over two param groups (decayed, not decayed) chosen by a mask
  function of the parameter's name and tensor (:func:`adamw`); the model's mask decays
  every parameter, as the C does, at llm.c's learning rate, betas and eps and the run's
  weight decay.

It is handed over with no map: a user would expect the parameters' use to place them.

Each mistake is a subclass of :class:`Ops` overriding one small method (or a class
attribute, or an optimizer factory) with the mistake on one line: BUGS11 maps its name to
(the model, where the first divergence must be, the cause's id expected (a prefix; None
where none is expected to exist), the text of the line holding the mistake).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel


class HParams(NamedTuple):
    vocab: int
    vocab_padded: int
    seq_len: int
    depth: int
    heads: int
    width: int

    @classmethod
    def from_gpt2(cls, c):
        """From the harness's GPT2Config (llm.c's names)."""
        return cls(vocab=c.vocab_size, vocab_padded=c.padded_vocab_size, seq_len=c.max_seq_len, depth=c.num_layers,
                   heads=c.num_heads, width=c.channels)


def init_params(hp: HParams, seed: int = 0) -> dict:
    """The flat parameter dict, Flax's flattened paths as keys (normal(0.02) kernels and
    tables, zero biases, unit scales)."""
    g = torch.Generator().manual_seed(seed)
    C = hp.width

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    flat = {"transformer/wte/embedding": normal(hp.vocab_padded, C),
            "transformer/wpe/embedding": normal(hp.seq_len, C)}
    dense = {"attn/c_attn": (C, 3 * C), "attn/c_proj": (C, C), "mlp/c_fc": (C, 4 * C), "mlp/c_proj": (4 * C, C)}
    for i in range(hp.depth):
        pre = f"transformer/h/{i}/"
        for norm in ("ln_1", "ln_2"):
            flat[pre + norm + "/scale"], flat[pre + norm + "/bias"] = torch.ones(C), torch.zeros(C)
        for name, shape in dense.items():
            flat[pre + name + "/kernel"], flat[pre + name + "/bias"] = normal(*shape), torch.zeros(shape[1])
    flat["transformer/ln_f/scale"], flat["transformer/ln_f/bias"] = torch.ones(C), torch.zeros(C)
    return flat


class Ops:
    """The model's pure functions over the flat parameter dict ``p`` (a Flax ``apply``)."""

    epsilon = 1e-5

    def __init__(self, hp: HParams):
        self.hp = hp

    # -- embeddings and head
    def embed(self, p, idx):
        T = idx.shape[1]
        return p["transformer/wte/embedding"][idx] + p["transformer/wpe/embedding"][:T]

    def logits(self, x, p):
        return x @ p["transformer/wte/embedding"].T     # Flax's Embed.attend: the tied head

    # -- layer norm, written out as Flax's LayerNorm computes it
    def layer_norm(self, x, p, name):
        x = x - x.mean(dim=-1, keepdim=True)
        var = x.pow(2).mean(dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.epsilon) * p[name + "/scale"] + p[name + "/bias"]

    def dense(self, x, p, name):
        return x @ p[name + "/kernel"] + p[name + "/bias"]

    # -- attention over (B*NH, T, hs)
    def split_qkv(self, qkv):
        return qkv.split(self.hp.width, dim=-1)

    def to_heads(self, t):
        B, T, C = t.shape
        nh = self.hp.heads
        return t.reshape(B, T, nh, C // nh).permute(0, 2, 1, 3).reshape(B * nh, T, C // nh)

    def from_heads(self, y, B):
        _, T, hs = y.shape
        return y.reshape(B, self.hp.heads, T, hs).permute(0, 2, 1, 3).reshape(B, T, self.hp.heads * hs)

    def scale(self, q):
        return q.shape[-1] ** -0.5

    def causal_mask(self, T, device):
        return torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)   # True: not seen

    def mask(self, s):
        return s.masked_fill(self.causal_mask(s.shape[-1], s.device), torch.finfo(s.dtype).min)

    def softmax(self, s, dim=-1):
        e = torch.exp(s - s.amax(dim=dim, keepdim=True))
        return e / e.sum(dim=dim, keepdim=True)

    def attend(self, s, v):
        return torch.bmm(self.softmax(s, dim=-1), v)

    def attention(self, x, p, pre):
        B = x.shape[0]
        q, k, v = (self.to_heads(t) for t in self.split_qkv(self.dense(x, p, pre + "/c_attn")))
        s = self.mask(torch.bmm(q, k.transpose(1, 2)) * self.scale(q))
        return self.dense(self.from_heads(self.attend(s, v), B), p, pre + "/c_proj")

    # -- MLP
    def gelu(self, h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))

    def mlp(self, x, p, pre):
        return self.dense(self.gelu(self.dense(x, p, pre + "/c_fc")), p, pre + "/c_proj")

    # -- the block, the model, the loss
    def block(self, x, p, pre):
        a = self.attention(self.layer_norm(x, p, pre + "ln_1"), p, pre + "attn")
        h = x + a
        m = self.mlp(self.layer_norm(h, p, pre + "ln_2"), p, pre + "mlp")
        return h + m

    def apply(self, p, idx):
        x = self.embed(p, idx)
        for i in range(self.hp.depth):
            x = self.block(x, p, f"transformer/h/{i}/")
        return self.logits(self.layer_norm(x, p, "transformer/ln_f"), p)

    def loss(self, logits, targets):
        V = self.hp.vocab
        labels = F.one_hot(targets, V).to(logits.dtype)
        return -(labels * F.log_softmax(logits[..., :V], dim=-1)).sum(dim=-1).mean()


class FlatGPT(nn.Module):
    """GPT-2 as a flat parameter dict and :class:`Ops` (or a subclass holding a mistake)."""

    def __init__(self, hp: HParams, ops=Ops):
        super().__init__()
        if hp.width % hp.heads:
            raise ValueError(f"width {hp.width} is not divisible by heads {hp.heads}")
        self.hp = hp
        self.ops = ops(hp)
        self.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in init_params(hp).items()})

    def forward(self, idx, targets=None):
        if idx.shape[1] > self.hp.seq_len:
            raise ValueError(f"sequence of length {idx.shape[1]}, seq_len is only {self.hp.seq_len}")
        logits = self.ops.apply(dict(self.params.items()), idx)
        return logits, (None if targets is None else self.ops.loss(logits, targets))


def decay_all(name, param) -> bool:
    """The weight-decay mask: every parameter, as train_gpt2.c decays them."""
    return True


def adamw(model, h, decay=decay_all):
    """optax.adamw(learning_rate, b1, b2, eps, weight_decay, mask=decay) as torch param groups."""
    named = list(model.named_parameters())
    groups = [{"params": [q for n, q in named if decay(n, q)], "weight_decay": h.weight_decay},
              {"params": [q for n, q in named if not decay(n, q)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps)


def build(ops=Ops, hparams=HParams):
    """A factory (taking the harness's GPT2Config) of ``FlatGPT`` with ``ops`` (an Ops class)."""
    def factory(gpt2_config):
        return FlatGPT(hparams.from_gpt2(gpt2_config), ops)
    factory.__name__ = f"FlatGPT[{ops.__name__}]"
    return factory


def port(factory=None, optimizer=adamw):
    """The model (or a mistake's variant) as the harness runs it: no map, its own AdamW."""
    return TorchModel(factory or build(), optimizer=optimizer)


# ----------------------------------------------------------------------------- BUGS11's mistakes
# written before any of them ran; each class or factory holds one mistake, on the line BUGS11 quotes

class HeadsWithoutPermute(Ops):         # (B, T, C) reshaped straight to (B*NH, T, hs)
    def to_heads(self, t):
        B, T, C = t.shape
        return t.reshape(B * self.hp.heads, T, C // self.hp.heads)


class MergeWithoutPermute(Ops):         # (B*NH, T, hs) reshaped straight back to (B, T, C)
    def from_heads(self, y, B):
        _, T, hs = y.shape
        return y.reshape(B, T, self.hp.heads * hs)


class SoftmaxOverQueries(Ops):          # dim=1 of (B*NH, T, T): the queries' axis
    def attend(self, s, v):
        return torch.bmm(self.softmax(s, dim=1), v)


class TriuWithoutOffset(Ops):           # triu's default diagonal=0: each position's own key masked too
    def causal_mask(self, T, device):
        return torch.triu(torch.ones(T, T, dtype=torch.bool, device=device))


class ScaleByModelWidth(Ops):           # 1/sqrt(d_model) where the head size belongs
    def scale(self, q):
        return self.hp.width ** -0.5


class QKVNeoXLayout(Ops):               # the fused output read per head as (NH, 3, hs), GPT-NeoX's layout
    def split_qkv(self, qkv):
        B, T, C3 = qkv.shape
        return [t.reshape(B, T, C3 // 3) for t in qkv.view(B, T, self.hp.heads, 3, -1).unbind(dim=3)]


class OutProjWithoutBias(Ops):          # the output projection's bias key forgotten
    def attention(self, x, p, pre):
        B = x.shape[0]
        q, k, v = (self.to_heads(t) for t in self.split_qkv(self.dense(x, p, pre + "/c_attn")))
        s = self.mask(torch.bmm(q, k.transpose(1, 2)) * self.scale(q))
        return self.from_heads(self.attend(s, v), B) @ p[pre + "/c_proj/kernel"]


class CentredInPlace(Ops):              # the centring written in place: the residual stream itself centred
    def layer_norm(self, x, p, name):
        x -= x.mean(dim=-1, keepdim=True)
        var = x.pow(2).mean(dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.epsilon) * p[name + "/scale"] + p[name + "/bias"]


class TorchVarForJnpVar(Ops):           # jnp.var ported as torch's var: unbiased by default
    def layer_norm(self, x, p, name):
        x = x - x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.epsilon) * p[name + "/scale"] + p[name + "/bias"]


class FlaxDefaultEpsilon(Ops):          # flax.linen.LayerNorm's default epsilon kept
    epsilon = 1e-6


class Ln2KeyTypo(Ops):                  # copy-paste: the MLP's norm reads ln_1's scale and bias
    def block(self, x, p, pre):
        a = self.attention(self.layer_norm(x, p, pre + "ln_1"), p, pre + "attn")
        h = x + a
        m = self.mlp(self.layer_norm(h, p, pre + "ln_1"), p, pre + "mlp")
        return h + m


class TorchDefaultGelu(Ops):            # jax.nn.gelu (approximate=True by default) ported as F.gelu (exact)
    def gelu(self, h):
        return F.gelu(h)


class QuickGelu(Ops):                   # Hugging Face's quick_gelu (CLIP's) taken for GPT-2's
    def gelu(self, h):
        return h * torch.sigmoid(1.702 * h)


class GeluRootForgotten(Ops):           # sqrt(2/pi) written 2/pi
    def gelu(self, h):
        return 0.5 * h * (1.0 + torch.tanh(2.0 / math.pi * (h + 0.044715 * h ** 3)))


class OPTPositionOffset(Ops):           # OPT's learned positions, offset by 2, carried over
    def embed(self, p, idx):
        T = idx.shape[1]
        return p["transformer/wte/embedding"][idx] + p["transformer/wpe/embedding"][2:T + 2]


class TokensScaledBySqrtWidth(Ops):     # Gemma/T5's embedding normaliser sqrt(d_model)
    def embed(self, p, idx):
        T = idx.shape[1]
        return p["transformer/wte/embedding"][idx] * math.sqrt(self.hp.width) + p["transformer/wpe/embedding"][:T]


class PositionRowNotSlice(Ops):         # [T] typed for [:T]: row T broadcast to every position
    def embed(self, p, idx):
        T = idx.shape[1]
        return p["transformer/wte/embedding"][idx] + p["transformer/wpe/embedding"][T]


class MLPResidualFromBlockInput(Ops):   # the stream's name mixed up: the MLP's branch added to the block's input
    def block(self, x, p, pre):
        a = self.attention(self.layer_norm(x, p, pre + "ln_1"), p, pre + "attn")
        h = x + a
        m = self.mlp(self.layer_norm(h, p, pre + "ln_2"), p, pre + "mlp")
        return x + m


class ResidualDropoutAlwaysOn(Ops):     # Flax's nn.Dropout(rate=resid_pdrop) ported as F.dropout (training=True)
    def block(self, x, p, pre):
        a = self.attention(self.layer_norm(x, p, pre + "ln_1"), p, pre + "attn")
        h = x + F.dropout(a, p=0.1)
        m = self.mlp(self.layer_norm(h, p, pre + "ln_2"), p, pre + "mlp")
        return h + m


class LossMeanOverVocab(Ops):           # jnp.mean over the whole (B, T, V) product: divided by V too
    def loss(self, logits, targets):
        V = self.hp.vocab
        labels = F.one_hot(targets, V).to(logits.dtype)
        return -(labels * F.log_softmax(logits[..., :V], dim=-1)).mean()


class VocabFromLogits(Ops):             # the vocabulary size read off the (padded) logits
    def loss(self, logits, targets):
        V = logits.shape[-1]
        labels = F.one_hot(targets, V).to(logits.dtype)
        return -(labels * F.log_softmax(logits[..., :V], dim=-1)).sum(dim=-1).mean()


class TargetsShiftedAgain(Ops):         # Hugging Face's shift applied to targets that are already the next tokens
    def loss(self, logits, targets):
        V = self.hp.vocab
        labels = F.one_hot(targets, V).to(logits.dtype)
        return -(labels[:, 1:] * F.log_softmax(logits[:, :-1, :V], dim=-1)).sum(dim=-1).mean()


def adamw_flax_mask(model, h):
    """The Flax examples' decay mask: only kernels and tables (ndim > 1) decayed."""
    return adamw(model, h, decay=lambda name, param: param.ndim > 1)


def adamw_with_warmup(model, h):
    """optax's warmup schedule ported as LambdaLR, which sets the first step's lr at construction."""
    opt = adamw(model, h)
    opt.schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 100))
    return opt


def adamw_positional(model, h):
    """Positional arguments in the order of the run's settings (lr, betas, weight decay, eps): torch's
    AdamW takes (lr, betas, eps, weight_decay), so eps is the weight decay and the decay is eps."""
    return torch.optim.AdamW(model.parameters(), h.learning_rate, (h.beta1, h.beta2), h.weight_decay, h.eps)


W = build
ATT, LN1, GELU0, ENC, LOSS, UPDATE = ("layer 0 attention attention_forward", "layer 0 ln1 layernorm_forward",
                                      "layer 0 gelu gelu_forward", "encoder encoder_forward", "crossentropy ",
                                      "gpt2_update")
# name -> (the port, where the first divergence must be, the cause's id (a prefix; None:
# none expected), the text of the line holding the mistake)
BUGS11 = {
    "heads-without-permute": (port(W(HeadsWithoutPermute)), ATT, "attention.layout",
                              "return t.reshape(B * self.hp.heads, T, C // self.hp.heads)"),
    "merge-without-permute": (port(W(MergeWithoutPermute)), ATT, "attention.layout",
                              "return y.reshape(B, T, self.hp.heads * hs)"),
    "softmax-over-queries": (port(W(SoftmaxOverQueries)), ATT, "attention.softmax-axis",
                             "return torch.bmm(self.softmax(s, dim=1), v)"),
    "triu-without-offset": (port(W(TriuWithoutOffset)), ATT, "attention.no-diagonal",
                            "return torch.triu(torch.ones(T, T, dtype=torch.bool, device=device))"),
    "scale-by-model-width": (port(W(ScaleByModelWidth)), ATT, "attention.scale", "return self.hp.width ** -0.5"),
    "qkv-neox-layout": (port(W(QKVNeoXLayout)), ATT, "attention.layout",
                        "return [t.reshape(B, T, C3 // 3) for t in qkv.view(B, T, self.hp.heads, 3, -1).unbind(dim=3)]"),
    "out-proj-without-bias": (port(W(OutProjWithoutBias)), "layer 0 attproj matmul_forward", "matmul.no-bias",
                              'return self.from_heads(self.attend(s, v), B) @ p[pre + "/c_proj/kernel"]'),
    "ln-centred-in-place": (port(W(CentredInPlace)), "layer 0 residual2", None,
                            "x -= x.mean(dim=-1, keepdim=True)"),
    "ln-torch-var": (port(W(TorchVarForJnpVar)), LN1, "layernorm.unbiased-variance",
                     "var = x.var(dim=-1, keepdim=True)"),
    "ln-flax-epsilon": (port(W(FlaxDefaultEpsilon)), LN1, "layernorm.eps", "epsilon = 1e-6"),
    "ln2-reads-ln1-params": (port(W(Ln2KeyTypo)), "layer 0 ln2 layernorm_forward", "structure.no-gradient",
                             'm = self.mlp(self.layer_norm(h, p, pre + "ln_1"), p, pre + "mlp")'),
    "gelu-torch-default": (port(W(TorchDefaultGelu)), GELU0, "gelu.erf", "return F.gelu(h)"),
    "quick-gelu": (port(W(QuickGelu)), GELU0, "gelu.sigmoid", "return h * torch.sigmoid(1.702 * h)"),
    "gelu-root-forgotten": (port(W(GeluRootForgotten)), GELU0, "gelu.tanh-scale",
                            "return 0.5 * h * (1.0 + torch.tanh(2.0 / math.pi * (h + 0.044715 * h ** 3)))"),
    "positions-opt-offset": (port(W(OPTPositionOffset)), ENC, "embedding.position-shift",
                             'return p["transformer/wte/embedding"][idx] + p["transformer/wpe/embedding"][2:T + 2]'),
    "tokens-scaled-sqrt-width": (port(W(TokensScaledBySqrtWidth)), ENC, "embedding.table-scale",
                                 'return p["transformer/wte/embedding"][idx] * math.sqrt(self.hp.width) + '
                                 'p["transformer/wpe/embedding"][:T]'),
    "position-row-not-slice": (port(W(PositionRowNotSlice)), ENC, None,
                               'return p["transformer/wte/embedding"][idx] + p["transformer/wpe/embedding"][T]'),
    "mlp-residual-from-block-input": (port(W(MLPResidualFromBlockInput)), "layer 0 residual3", "residual.wrong-input",
                                      "return x + m"),
    "residual-dropout-always-on": (port(W(ResidualDropoutAlwaysOn)), "layer 0 residual2", None,
                                   "h = x + F.dropout(a, p=0.1)"),
    "loss-mean-over-vocab": (port(W(LossMeanOverVocab)), LOSS, "crossentropy.divisor",
                             "return -(labels * F.log_softmax(logits[..., :V], dim=-1)).mean()"),
    "vocab-from-logits": (port(W(VocabFromLogits)), LOSS, "softmax.padded-columns", "V = logits.shape[-1]"),
    "targets-shifted-again": (port(W(TargetsShiftedAgain)), LOSS, "labels.next-position",
                              "return -(labels[:, 1:] * F.log_softmax(logits[:, :-1, :V], dim=-1)).sum(dim=-1).mean()"),
    "adamw-flax-decay-mask": (port(optimizer=adamw_flax_mask), UPDATE, "adamw.no-decay-1d",
                              "return adamw(model, h, decay=lambda name, param: param.ndim > 1)"),
    "adamw-warmup-at-construction": (port(optimizer=adamw_with_warmup), UPDATE, None,
                                     "opt.schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: "
                                     "min(1.0, step / 100))"),
    "adamw-positional-decay-eps": (port(optimizer=adamw_positional), UPDATE, None,
                                   "return torch.optim.AdamW(model.parameters(), h.learning_rate, (h.beta1, h.beta2), "
                                   "h.weight_decay, h.eps)"),
}


def line_of(text: str) -> int:
    """The line number of this file whose stripped text is ``text`` (it must be the only one)."""
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
