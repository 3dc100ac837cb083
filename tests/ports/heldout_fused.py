"""A sixth GPT-2, written unlike the other five (tests/ports/model_ports.py, heldout_einsum_sdpa.py,
heldout_baddbmm.py, heldout_qkv.py), and BUGS8: the second held-out batch of issue 30, its
mistakes written (with the line of this file each one is on) and committed before any of
them ran.

The model is train_gpt2.c's computation (learned positions, pre-LN blocks, the tanh GELU,
the head tied to the token table, causal attention, the mean cross-entropy) under names of
its own: ``lexicon``/``placement`` (the token and position tables), the blocks in an
``nn.ModuleDict`` ``stack`` of ``Stage``s with ``norm_a``, ``mixer`` (one fused projection
``F.linear`` on a raw ``nn.Parameter`` ``w_in``/``b_in`` of shape (3C, C), then ``w_back``/
``b_back``), ``norm_b``, ``ffn`` (``widen``, ``narrow``), and ``norm_out``. Attention is
``torch.einsum`` over a (B, T, NH, hs) layout, the layer norm ``torch.var_mean``, the GELU
a helper function with ``torch.tanh``, the positions ``torch.arange`` in the forward, the
head ``x @ lexicon.weight.t()``, the loss ``F.log_softmax`` + ``gather``.

Each mistake is a subclass overriding one small method (or an optimizer factory) with the
mistake on one line: BUGS8 maps its name to (the model, where the first divergence must
be, the cause's id expected (a prefix; None where none is expected to exist), the text of
the line holding the mistake).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel


def tanh_gelu(u):
    """GPT-2's GELU, the tanh approximation, as a helper function (no module)."""
    inner = math.sqrt(2.0 / math.pi) * (u + 0.044715 * torch.pow(u, 3))
    return 0.5 * u * (1.0 + torch.tanh(inner))


class Norm(nn.Module):
    """A layer norm over the last axis by ``torch.var_mean`` (the biased variance)."""

    def __init__(self, width, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))

    def stats(self, x):
        return torch.var_mean(x, dim=-1, keepdim=True, correction=0)

    def standardise(self, x, var, mean):
        return (x - mean) / torch.sqrt(var + self.eps)

    def forward(self, x):
        var, mean = self.stats(x)
        return self.standardise(x, var, mean) * self.gain + self.shift


class Mixer(nn.Module):
    """Causal self-attention: one fused projection on a raw (3C, C) parameter, heads as
    (B, T, NH, hs), scores and values by einsum."""

    def __init__(self, width, heads):
        super().__init__()
        self.nh, self.hs = heads, width // heads
        self.w_in = nn.Parameter(torch.zeros(3 * width, width))
        self.b_in = nn.Parameter(torch.zeros(3 * width))
        self.w_back = nn.Parameter(torch.zeros(width, width))
        self.b_back = nn.Parameter(torch.zeros(width))

    def heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.nh, self.hs)

    def split_qkv(self, x):
        q, k, v = F.linear(x, self.w_in, self.b_in).chunk(3, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)

    def scores(self, q, k):
        return torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.hs)

    def causal(self, s):
        keep = torch.ones(s.size(-2), s.size(-1), dtype=torch.bool, device=s.device).tril()
        return s.masked_fill(~keep, float("-inf"))

    def normalise(self, s):
        return F.softmax(s, dim=-1)

    def mix_values(self, p, v):
        b, n = v.shape[:2]
        return torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, self.nh * self.hs)

    def forward(self, x):
        q, k, v = self.split_qkv(x)
        p = self.normalise(self.causal(self.scores(q, k)))
        return F.linear(self.mix_values(p, v), self.w_back, self.b_back)


class FFN(nn.Module):
    """The MLP: widen to 4C, the tanh GELU (a function), narrow back."""

    def __init__(self, width):
        super().__init__()
        self.widen = nn.Linear(width, 4 * width)
        self.narrow = nn.Linear(4 * width, width)

    def act(self, h):
        return tanh_gelu(h)

    def forward(self, x):
        return self.narrow(self.act(self.widen(x)))


class Stage(nn.Module):
    """A pre-LN block: h = h + mixer(norm_a(h)); h = h + ffn(norm_b(h))."""

    def __init__(self, width, heads, norm=Norm, mixer=Mixer, ffn=FFN):
        super().__init__()
        self.norm_a = norm(width)
        self.mixer = mixer(width, heads)
        self.norm_b = norm(width)
        self.ffn = ffn(width)

    def attend(self, h):
        return h + self.mixer(self.norm_a(h))

    def feed(self, h):
        return h + self.ffn(self.norm_b(h))

    def forward(self, h):
        return self.feed(self.attend(h))


class FusedGPT(nn.Module):
    """GPT-2 from the harness's GPT2Config; ``parts`` replace the norm, mixer, ffn or stage
    classes (:meth:`variant`)."""

    def __init__(self, config, norm=Norm, mixer=Mixer, ffn=FFN, stage=Stage):
        super().__init__()
        self.width = config.channels
        self.lexicon = nn.Embedding(config.vocab_size, self.width)
        self.placement = nn.Embedding(config.max_seq_len, self.width)
        self.stack = nn.ModuleDict({f"stage{i}": stage(self.width, config.num_heads, norm, mixer, ffn)
                                    for i in range(config.num_layers)})
        self.norm_out = norm(self.width)

    @classmethod
    def variant(cls, **parts):
        """A factory of this model with some of its parts replaced."""
        def factory(config):
            return cls(config, **parts)
        factory.__name__ = f"{cls.__name__}[{', '.join(p.__name__ for p in parts.values())}]"
        return factory

    def positions(self, idx):
        return torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)

    def embed(self, idx):
        return self.lexicon(idx) + self.placement(self.positions(idx))

    def logits(self, h):
        return h @ self.lexicon.weight.t()

    def nll(self, logits, targets):
        logp = F.log_softmax(logits, dim=-1)
        return -torch.gather(logp, -1, targets[..., None]).squeeze(-1).mean()

    def forward(self, idx, targets=None):
        h = self.embed(idx)
        for stage in self.stack.values():
            h = stage(h)
        logits = self.logits(self.norm_out(h))
        return logits, (None if targets is None else self.nll(logits, targets))


# the C's name of each of this model's parameters: its names are none the harness knows
# (the ModuleDict's keys "stage0", "stage1" are not "name.{i}"), so it needs a map, as a
# user's --model-map would give (found when it first ran: the finding recorded in BUGS8's
# test, tests/ports/test_model_bugs.py)
C_NAMES = {"norm_a.gain": "ln1w", "norm_a.shift": "ln1b", "mixer.w_in": "qkvw", "mixer.b_in": "qkvb",
           "mixer.w_back": "attprojw", "mixer.b_back": "attprojb", "norm_b.gain": "ln2w", "norm_b.shift": "ln2b",
           "ffn.widen.weight": "fcw", "ffn.widen.bias": "fcb", "ffn.narrow.weight": "fcprojw",
           "ffn.narrow.bias": "fcprojb"}
TOP_NAMES = {"lexicon.weight": "wte", "placement.weight": "wpe", "norm_out.gain": "lnfw", "norm_out.shift": "lnfb"}


def c_slot(name, shape):
    """The C tensor ``name`` holds (the mapping TorchModel takes)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, stage, rest = name.split(".", 2)
    return f"{C_NAMES[rest]}[{int(stage.removeprefix('stage'))}]"


def port(factory=FusedGPT, optimizer=None):
    """The model (or a mistake's variant) as the harness runs it: with its map."""
    return TorchModel(factory, mapping=c_slot, optimizer=optimizer)


# ----------------------------------------------------------------------------- BUGS8's mistakes
# written before any of them ran; each class or factory holds one mistake, on the line BUGS8 quotes

class KeysFirst(Mixer):                      # the fused output chunked as k, q, v
    def split_qkv(self, x):
        k, q, v = F.linear(x, self.w_in, self.b_in).chunk(3, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)


class ScaleByHeadSize(Mixer):                # 1/hs, not 1/sqrt(hs)
    def scores(self, q, k):
        return torch.einsum("bqhd,bkhd->bhqk", q, k) / self.hs


class MaskFilledWithZero(Mixer):             # the future's scores set to 0, not -inf
    def causal(self, s):
        keep = torch.ones(s.size(-2), s.size(-1), dtype=torch.bool, device=s.device).tril()
        return s.masked_fill(keep.logical_not(), 0.0)


class MaskNotInverted(Mixer):                # the kept triangle filled: the past hidden
    def causal(self, s):
        keep = torch.ones(s.size(-2), s.size(-1), dtype=torch.bool, device=s.device).tril()
        return s.masked_fill(keep, float("-inf"))


class SoftmaxOverQueries(Mixer):             # dim=-2 of (B, NH, Tq, Tk)
    def normalise(self, s):
        return F.softmax(s, dim=-2)


class SoftmaxInHalf(Mixer):                  # the softmax in float16 (a memory saving)
    def normalise(self, s):
        return F.softmax(s.half(), dim=-1).float()


class HeadsViewedSizeFirst(Mixer):           # channels viewed (hs, NH) then swapped
    def heads(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.hs, self.nh).transpose(2, 3)


class ValuesMergedHeadMajor(Mixer):          # the einsum's output (B, NH, T, hs) reshaped as (B, T, C)
    def mix_values(self, p, v):
        b, n = v.shape[:2]
        return torch.einsum("bhqk,bkhd->bhqd", p, v).reshape(b, n, self.nh * self.hs)


class UnbiasedVariance(Norm):                # var_mean's default correction=1
    def stats(self, x):
        return torch.var_mean(x, dim=-1, keepdim=True)


class EpsOutsideRoot(Norm):                  # sqrt(var) + eps
    def standardise(self, x, var, mean):
        return (x - mean) / (torch.sqrt(var) + self.eps)


class NormOverPositions(Norm):               # statistics over T, not C
    def stats(self, x):
        return torch.var_mean(x, dim=1, keepdim=True, correction=0)


class ErfGelu(FFN):                          # F.gelu's default, the erf GELU
    def act(self, h):
        return F.gelu(h)


class GeluWithoutHalf(FFN):                  # the 0.5 dropped
    def act(self, h):
        inner = math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3))
        return h * (1.0 + torch.tanh(inner))


class GeluCubeAsTimesThree(FFN):             # x * 3 typed for x ** 3
    def act(self, h):
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * 3)))


class ResidualFromNormed(Stage):             # the residual carries the normed stream
    def attend(self, h):
        n = self.norm_a(h)
        return n + self.mixer(n)


class PostNormFeed(Stage):                   # post-LN: the norm after the residual sum
    def feed(self, h):
        return self.norm_b(h + self.ffn(h))


class PositionsFromOne(FusedGPT):            # arange(1, T + 1)
    def positions(self, idx):
        return torch.arange(1, idx.shape[1] + 1, dtype=torch.long, device=idx.device)


class TokensScaled(FusedGPT):                # the token embedding times sqrt(C) (the Transformer paper's)
    def embed(self, idx):
        return self.lexicon(idx) * math.sqrt(self.width) + self.placement(self.positions(idx))


class PositionsDetached(FusedGPT):           # the position table frozen by a detach
    def embed(self, idx):
        return self.lexicon(idx) + self.placement(self.positions(idx)).detach()


class HeadScaled(FusedGPT):                  # logits divided by sqrt(C)
    def logits(self, h):
        return h @ self.lexicon.weight.t() / math.sqrt(self.width)


class LogSoftmaxOverTime(FusedGPT):          # log_softmax over T of (B, T, V)
    def nll(self, logits, targets):
        logp = F.log_softmax(logits, dim=1)
        return -torch.gather(logp, -1, targets[..., None]).squeeze(-1).mean()


class LossSummedOverTime(FusedGPT):          # summed over T, averaged over B
    def nll(self, logits, targets):
        logp = F.log_softmax(logits, dim=-1)
        return -torch.gather(logp, -1, targets[..., None]).squeeze(-1).sum(-1).mean()


def adamw_eps_1e6(model, h):
    """torch.optim.AdamW with eps 1e-6 (a common default elsewhere) for llm.c's 1e-8."""
    return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=1e-6, weight_decay=h.weight_decay)


def adamw_no_decay_on_vectors(model, h):
    """nanoGPT's parameter groups: no weight decay on biases and norms (llm.c decays all)."""
    ps = list(model.parameters())
    groups = [{"params": [p for p in ps if p.dim() >= 2]}, {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)


def adamw_betas_swapped(model, h):
    """torch.optim.AdamW with beta1 and beta2 given the other way round."""
    return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta2, h.beta1), eps=h.eps, weight_decay=h.weight_decay)


W = FusedGPT.variant
ATT, LN1, GELU0, ENC, LOSS = ("layer 0 attention attention_forward", "layer 0 ln1 layernorm_forward",
                              "layer 0 gelu gelu_forward", "encoder encoder_forward",
                              "crossentropy crossentropy_softmax_backward")
MASK = ("attention.mask", "attention.no-causal-mask")   # either of the mask's causes
# name -> (the port, where the first divergence must be, the cause's id (a prefix, or a tuple
# of prefixes); None: none expected), the text of the line holding the mistake)
BUGS8 = {
    "qkv-chunked-k-first": (port(W(mixer=KeysFirst)), ATT, "attention.qkv-order",
                            "k, q, v = F.linear(x, self.w_in, self.b_in).chunk(3, dim=-1)"),
    "scale-by-head-size": (port(W(mixer=ScaleByHeadSize)), ATT, "attention.scale",
                           'return torch.einsum("bqhd,bkhd->bhqk", q, k) / self.hs'),
    "mask-filled-with-zero": (port(W(mixer=MaskFilledWithZero)), ATT, MASK,
                              "return s.masked_fill(keep.logical_not(), 0.0)"),
    "mask-not-inverted": (port(W(mixer=MaskNotInverted)), ATT, MASK, 'return s.masked_fill(keep, float("-inf"))'),
    "softmax-over-queries": (port(W(mixer=SoftmaxOverQueries)), ATT, "attention.softmax-axis",
                             "return F.softmax(s, dim=-2)"),
    "softmax-in-half": (port(W(mixer=SoftmaxInHalf)), ATT, None, "return F.softmax(s.half(), dim=-1).float()"),
    "heads-viewed-size-first": (port(W(mixer=HeadsViewedSizeFirst)), ATT, "attention.layout",
                                "return t.view(b, n, self.hs, self.nh).transpose(2, 3)"),
    "values-merged-head-major": (port(W(mixer=ValuesMergedHeadMajor)), ATT, "attention.layout",
                                 'return torch.einsum("bhqk,bkhd->bhqd", p, v).reshape(b, n, self.nh * self.hs)'),
    "var-mean-unbiased": (port(W(norm=UnbiasedVariance)), LN1, "layernorm.",
                          "return torch.var_mean(x, dim=-1, keepdim=True)"),
    "eps-outside-root": (port(W(norm=EpsOutsideRoot)), LN1, "layernorm.eps",
                         "return (x - mean) / (torch.sqrt(var) + self.eps)"),
    "norm-over-positions": (port(W(norm=NormOverPositions)), LN1, "layernorm.axis",
                            "return torch.var_mean(x, dim=1, keepdim=True, correction=0)"),
    "gelu-erf": (port(W(ffn=ErfGelu)), GELU0, "gelu.erf", "return F.gelu(h)"),
    "gelu-without-half": (port(W(ffn=GeluWithoutHalf)), GELU0, "gelu.", "return h * (1.0 + torch.tanh(inner))"),
    "gelu-cube-as-times-three": (port(W(ffn=GeluCubeAsTimesThree)), GELU0, "gelu.",
                                 "return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h * 3)))"),
    "residual-from-normed": (port(W(stage=ResidualFromNormed)), "layer 0 residual2 residual_forward", "residual.",
                             "return n + self.mixer(n)"),
    "post-norm-feed": (port(W(stage=PostNormFeed)), "layer 0 ln2 layernorm_forward", "structure.",
                       "return self.norm_b(h + self.ffn(h))"),
    "positions-from-one": (port(PositionsFromOne), ENC, "embedding.position-shift",
                           "return torch.arange(1, idx.shape[1] + 1, dtype=torch.long, device=idx.device)"),
    "tokens-scaled-sqrt-C": (port(TokensScaled), ENC, "embedding.",
                             "return self.lexicon(idx) * math.sqrt(self.width) + self.placement(self.positions(idx))"),
    "positions-detached": (port(PositionsDetached), "encoder encoder_backward", "structure.no-gradient",
                           "return self.lexicon(idx) + self.placement(self.positions(idx)).detach()"),
    "head-scaled": (port(HeadScaled), "lm_head matmul_forward", "output.scale",
                    "return h @ self.lexicon.weight.t() / math.sqrt(self.width)"),
    "log-softmax-over-time": (port(LogSoftmaxOverTime), LOSS, "crossentropy.", "logp = F.log_softmax(logits, dim=1)"),
    "loss-summed-over-time": (port(LossSummedOverTime), LOSS, "crossentropy.divisor",
                              "return -torch.gather(logp, -1, targets[..., None]).squeeze(-1).sum(-1).mean()"),
    "adamw-eps-1e-6": (port(optimizer=adamw_eps_1e6), "gpt2_update wte", "adamw.",
                       "return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), "
                       "eps=1e-6, weight_decay=h.weight_decay)"),
    "adamw-no-decay-on-vectors": (port(optimizer=adamw_no_decay_on_vectors), "gpt2_update ln1w", "adamw.",
                                  'groups = [{"params": [p for p in ps if p.dim() >= 2]}, {"params": [p for p in ps '
                                  'if p.dim() < 2], "weight_decay": 0.0}]'),
    "adamw-betas-swapped": (port(optimizer=adamw_betas_swapped), "gpt2_update wte", "adamw.",
                            "return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta2, h.beta1), "
                            "eps=h.eps, weight_decay=h.weight_decay)"),
}


def line_of(text: str) -> int:
    """The line number of this file whose stripped text is ``text`` (it must be the only one)."""
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
