"""An eighth GPT-2, written unlike the other seven (tests/ports/model_ports.py,
heldout_einsum_sdpa.py, heldout_baddbmm.py, heldout_qkv.py, heldout_fused.py,
heldout_headloop.py), and BUGS10: the fourth held-out batch of issue 30, its mistakes
written (with the line of this file each one is on) and committed on 2026-12-07 before any
of them ran (only the unmodified model's forward and backward were run, in plain torch, to
see that it trains at all; no mistake was run, and the harness was not run on any of it).

The model is train_gpt2.c's computation (learned positions, pre-LN blocks, the tanh GELU,
the head tied to the token table, causal attention, the mean cross-entropy) as a user
porting it into a lit-gpt-style code base would write it:

* a ``Config`` dataclass (``n_embd``, ``n_head``, ``n_query_groups``, ``norm_eps``,
  ``gelu_approximate``, ``padded_vocab_size``, ...) built from the harness's GPT2Config by
  ``Config.from_gpt2``; ``head_size`` a property;
* ``GPT`` holds ``lm_head`` (an ``nn.Linear`` with no bias, its weight tied to
  ``transformer.wte``'s; lit-gpt builds ``lm_head`` first, so the tied
  weight's one name is ``lm_head.weight``) and ``transformer``, an ``nn.ModuleDict`` of ``wte`` (Vp rows,
  the padding kept), ``wpe``, ``h`` (an ``nn.ModuleList`` of ``Block``s) and ``ln_f``;
* a ``Block`` is ``norm_1``, ``attn`` (``CausalSelfAttention``: one fused (3C, C)
  ``nn.Linear`` ``qkv``, q/k/v cut by ``split`` into the grouped layout lit-gpt uses
  (query, key, value sizes from ``n_head`` and ``n_query_groups``, equal here),
  ``F.scaled_dot_product_attention(is_causal=True)`` with the scale passed explicitly,
  then ``proj``), ``norm_2``, ``mlp`` (``fc``, ``F.gelu(approximate="tanh")``, ``proj``);
  its forward is lit-gpt's ``attention_output + x`` / ``mlp(norm_2(x)) + x``;
* ``LayerNorm`` is torch's ``nn.LayerNorm`` with its forward written out as
  ``F.layer_norm``;
* the loss is lit-gpt's ``F.cross_entropy`` on the flattened logits, cut to the first V.

Its names are lit-gpt's, not nanoGPT's (``attn.qkv``, ``attn.proj``, ``norm_1``, ``mlp.fc``,
``mlp.proj``), and it is handed over with no map: a user would expect the names and the
parameters' use to place it. It trains with the harness's torch.optim.AdamW (llm.c's
learning rate, betas and eps; the run's weight decay).

Each mistake is a subclass overriding one small method (a ``Config`` subclass changing one
field, or an optimizer factory) with the mistake on one line: BUGS10 maps its name to (the
model, where the first divergence must be, the cause's id expected (a prefix; None where
none is expected to exist), the text of the line holding the mistake).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel


@dataclass
class Config:
    block_size: int = 1024
    vocab_size: int = 50257
    padded_vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_query_groups: Optional[int] = None
    bias: bool = True
    norm_eps: float = 1e-5
    gelu_approximate: str = "tanh"

    def __post_init__(self):
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return 4 * self.n_embd

    @classmethod
    def from_gpt2(cls, c):
        """From the harness's GPT2Config (llm.c's names)."""
        return cls(block_size=c.max_seq_len, vocab_size=c.vocab_size, padded_vocab_size=c.padded_vocab_size,
                   n_layer=c.num_layers, n_head=c.num_heads, n_embd=c.channels)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, its forward written out."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        shape = (config.n_head + 2 * config.n_query_groups) * config.head_size
        self.qkv = nn.Linear(config.n_embd, shape, bias=config.bias)
        self.proj = nn.Linear(config.head_size * config.n_head, config.n_embd, bias=config.bias)
        self.config = config

    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.config.head_size)

    def split_qkv(self, qkv):
        query_size = self.config.n_head * self.config.head_size
        key_size = value_size = self.config.n_query_groups * self.config.head_size
        return qkv.split((query_size, key_size, value_size), dim=-1)

    def to_heads(self, t, n):
        B, T, _ = t.shape
        return t.view(B, T, n, self.config.head_size).transpose(1, 2)

    def scaled_dot_product_attention(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(),
                                              is_causal=mask is None)

    def forward(self, x, mask=None):
        B, T, _ = x.shape
        q, k, v = self.split_qkv(self.qkv(x))
        q = self.to_heads(q, self.config.n_head)
        k = self.to_heads(k, self.config.n_query_groups)
        v = self.to_heads(v, self.config.n_query_groups)
        if self.config.n_query_groups != self.config.n_head:
            q_per_kv = self.config.n_head // self.config.n_query_groups
            k, v = k.repeat_interleave(q_per_kv, dim=1), v.repeat_interleave(q_per_kv, dim=1)
        y = self.scaled_dot_product_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.config.head_size * self.config.n_head)
        return self.proj(y)


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.config = config

    def activation(self, x):
        return F.gelu(x, approximate=self.config.gelu_approximate)

    def forward(self, x):
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: Config, norm=LayerNorm, attention=CausalSelfAttention, mlp=GptNeoxMLP):
        super().__init__()
        self.norm_1 = norm(config.n_embd, eps=config.norm_eps)
        self.attn = attention(config)
        self.norm_2 = norm(config.n_embd, eps=config.norm_eps)
        self.mlp = mlp(config)
        self.config = config

    def forward(self, x, mask=None):
        x_normed = self.norm_1(x)
        attention_output = self.attn(x_normed, mask)
        x = attention_output + x
        x = self.mlp(self.norm_2(x)) + x
        return x


class GPT(nn.Module):
    """GPT-2 from a ``Config``; ``norm``, ``attention``, ``mlp`` and ``block`` replace
    those classes (:func:`with_parts`)."""

    def __init__(self, config: Config, norm=LayerNorm, attention=CausalSelfAttention, mlp=GptNeoxMLP,
                 block=Block):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=self.position_embedding(config),
            h=nn.ModuleList(block(config, norm, attention, mlp) for _ in range(config.n_layer)),
            ln_f=norm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head.weight = self.transformer.wte.weight   # tied
        self.apply(self._init_weights)

    def position_embedding(self, config: Config):
        return nn.Embedding(config.block_size, config.n_embd)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        return tok_emb + pos_emb

    def trunk(self, x):
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def loss(self, logits, targets):
        logits = logits[..., : self.config.vocab_size]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def forward(self, idx, targets=None):
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {idx.size(1)}, block size is only "
                             f"{self.config.block_size}")
        logits = self.lm_head(self.trunk(self.embed(idx)))
        return logits, (None if targets is None else self.loss(logits, targets))


def with_parts(model=GPT, config=Config, **parts):
    """A factory (taking the harness's GPT2Config) of ``model`` built from ``config`` (a
    Config class) with some of its parts replaced."""
    def factory(gpt2_config):
        return model(config.from_gpt2(gpt2_config), **parts)
    names = [config.__name__] + [p.__name__ for p in parts.values()]
    factory.__name__ = f"{model.__name__}[{', '.join(names)}]"
    return factory


def port(factory=None, optimizer=None):
    """The model (or a mistake's variant) as the harness runs it: no map."""
    return TorchModel(factory or with_parts(), optimizer=optimizer)


# ----------------------------------------------------------------------------- BUGS10's mistakes
# written before any of them ran; each class or factory holds one mistake, on the line BUGS10 quotes

class ScaleAsDivisor(CausalSelfAttention):        # sdpa's scale= read as the divisor: scores * sqrt(hs)
    def softmax_scale(self) -> float:
        return math.sqrt(self.config.head_size)


class CausalFlagInverted(CausalSelfAttention):    # `is not None`: with no mask given, no causal masking
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), is_causal=mask is not None)


class ValuesAreKeys(CausalSelfAttention):         # k passed as the values
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, k, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), is_causal=mask is None)


class QueryKeySwapped(CausalSelfAttention):       # sdpa's first two arguments the other way round
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(k, q, v, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), is_causal=mask is None)


class QueryPrescaled(CausalSelfAttention):        # q scaled by hand, and sdpa given the scale too: 1/hs
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        q = q * self.softmax_scale()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(),
                                              is_causal=mask is None)


class AttentionInBF16(CausalSelfAttention):       # a bf16-mixed training script's cast left in
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        y = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), is_causal=mask is None)
        return y.float()


class FloatTrilMask(CausalSelfAttention):         # the mask built without dtype=torch.bool: 0/1 added to the scores
    def scaled_dot_product_attention(self, q, k, v, mask=None):
        mask = torch.ones(q.size(2), k.size(2), device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(),
                                              is_causal=mask is None)


class UnitOffsetNorm(LayerNorm):                  # Gemma's add_unit_offset carried over: the gain as 1 + weight
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)


class NormWithoutBias(LayerNorm):                 # the bias left out of the call
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)


@dataclass
class LlamaEpsConfig(Config):                     # a LLaMA config's norm_eps
    norm_eps: float = 1e-6


class MLPNormedByNorm1(Block):                    # copy-paste: norm_1 where norm_2 belongs
    def forward(self, x, mask=None):
        x_normed = self.norm_1(x)
        attention_output = self.attn(x_normed, mask)
        x = attention_output + x
        x = self.mlp(self.norm_1(x)) + x
        return x


class SiluMLP(GptNeoxMLP):                        # LLaMA's activation
    def activation(self, x):
        return F.silu(x)


class ReluSquaredMLP(GptNeoxMLP):                 # modded-nanogpt's ReLU squared
    def activation(self, x):
        return F.relu(x).square()


class ActivationAfterProj(GptNeoxMLP):            # the GELU applied to proj's output, not fc's
    def forward(self, x):
        return self.activation(self.proj(self.fc(x)))


class EmbeddingsMultiplied(GPT):                  # `*` typed for `+`
    def embed(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        return tok_emb * pos_emb


class PositionPaddingIdx(GPT):                    # an NLP tutorial's padding_idx=0 on the position table
    def position_embedding(self, config: Config):
        return nn.Embedding(config.block_size, config.n_embd, padding_idx=0)


class PositionsAcrossBatch(GPT):                  # positions numbered as if the batch were one packed sequence
    def embed(self, idx):
        B, T = idx.shape
        pos = torch.arange(B * T, device=idx.device).view(B, T)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        return tok_emb + pos_emb


class MLPBranchScaled(Block):                     # GPT-2's 1/sqrt(2L) init scaling applied to the forward
    def forward(self, x, mask=None):
        x_normed = self.norm_1(x)
        attention_output = self.attn(x_normed, mask)
        x = attention_output + x
        x = self.mlp(self.norm_2(x)) / math.sqrt(2 * self.config.n_layer) + x
        return x


class BlocksNotChained(GPT):                      # each block applied to the embeddings; the last one's output kept
    def trunk(self, x):
        for block in self.transformer.h:
            h = block(x)
        return self.transformer.ln_f(h)


class FinalNormInLoop(GPT):                       # ln_f indented into the loop: applied after every block
    def trunk(self, x):
        for block in self.transformer.h:
            x = self.transformer.ln_f(block(x))
        return x


class LabelSmoothed(GPT):                         # a fine-tuning recipe's label_smoothing
    def loss(self, logits, targets):
        logits = logits[..., : self.config.vocab_size]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), label_smoothing=0.1)


class WithZLoss(GPT):                             # PaLM/OLMo's auxiliary z-loss added
    def loss(self, logits, targets):
        logits = logits[..., : self.config.vocab_size]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()


class TargetsTimeMajor(GPT):                      # the targets flattened (T, B) while the logits are (B, T)
    def loss(self, logits, targets):
        logits = logits[..., : self.config.vocab_size]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.t().reshape(-1))


def adamw_beta1_twice(model, h):
    """beta1 typed where beta2 belongs: betas (0.9, 0.9)."""
    return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta1), eps=h.eps, weight_decay=h.weight_decay)


def adamw_blocks_only(model, h):
    """Only the blocks' parameters handed to the optimizer (a fine-tuning script's): wte, wpe, ln_f never step."""
    return torch.optim.AdamW(model.transformer.h.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)


W = with_parts
ATT, LN1, GELU0, ENC, LOSS, UPDATE = ("layer 0 attention attention_forward", "layer 0 ln1 layernorm_forward",
                                      "layer 0 gelu gelu_forward", "encoder encoder_forward", "crossentropy ",
                                      "gpt2_update")
SDPA_LINE = ("return F.scaled_dot_product_attention({}, attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), "
             "is_causal={})")
# name -> (the port, where the first divergence must be, the cause's id (a prefix; None:
# none expected), the text of the line holding the mistake)
BUGS10 = {
    "sdpa-scale-as-divisor": (port(W(attention=ScaleAsDivisor)), ATT, "attention.scale",
                              "return math.sqrt(self.config.head_size)"),
    "causal-flag-inverted": (port(W(attention=CausalFlagInverted)), ATT, "attention.no-causal-mask",
                             SDPA_LINE.format("q, k, v", "mask is not None")),
    "values-are-keys": (port(W(attention=ValuesAreKeys)), ATT, None, SDPA_LINE.format("q, k, k", "mask is None")),
    "query-key-swapped": (port(W(attention=QueryKeySwapped)), ATT, None, SDPA_LINE.format("k, q, v", "mask is None")),
    "query-prescaled": (port(W(attention=QueryPrescaled)), ATT, "attention.scale", "q = q * self.softmax_scale()"),
    "attention-in-bf16": (port(W(attention=AttentionInBF16)), ATT, None,
                          "y = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "
                          "attn_mask=mask, dropout_p=0.0, scale=self.softmax_scale(), is_causal=mask is None)"),
    "float-tril-mask": (port(W(attention=FloatTrilMask)), ATT, None,
                        "mask = torch.ones(q.size(2), k.size(2), device=q.device).tril()"),
    "ln-unit-offset": (port(W(norm=UnitOffsetNorm)), LN1, "layernorm.weight-plus-one",
                       "return F.layer_norm(x, self.normalized_shape, 1 + self.weight, self.bias, self.eps)"),
    "ln-without-bias": (port(W(norm=NormWithoutBias)), LN1, None,
                        "return F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)"),
    "ln-llama-eps": (port(W(config=LlamaEpsConfig)), LN1, "layernorm.eps", "norm_eps: float = 1e-6"),
    "mlp-normed-by-norm-1": (port(W(block=MLPNormedByNorm1)), "layer 0 ln2 layernorm_forward",
                             "structure.never-called", "x = self.mlp(self.norm_1(x)) + x"),
    "silu": (port(W(mlp=SiluMLP)), GELU0, "gelu.silu", "return F.silu(x)"),
    "relu-squared": (port(W(mlp=ReluSquaredMLP)), GELU0, None, "return F.relu(x).square()"),
    "activation-after-proj": (port(W(mlp=ActivationAfterProj)), GELU0, "gelu.",
                              "return self.activation(self.proj(self.fc(x)))"),
    "embeddings-multiplied": (port(W(EmbeddingsMultiplied)), ENC, "embedding.product", "return tok_emb * pos_emb"),
    "position-padding-idx": (port(W(PositionPaddingIdx)), "encoder encoder_backward", None,
                             "return nn.Embedding(config.block_size, config.n_embd, padding_idx=0)"),
    "positions-across-batch": (port(W(PositionsAcrossBatch)), ENC, "embedding.positions",
                               "pos = torch.arange(B * T, device=idx.device).view(B, T)"),
    "mlp-branch-scaled": (port(W(block=MLPBranchScaled)), "layer 0 residual3", "residual.branch-scale",
                          "x = self.mlp(self.norm_2(x)) / math.sqrt(2 * self.config.n_layer) + x"),
    "blocks-not-chained": (port(W(BlocksNotChained)), "layer 1 ln1", "structure.", "h = block(x)"),
    "final-norm-in-loop": (port(W(FinalNormInLoop)), "layer 1 ln1", "structure.called-more",
                           "x = self.transformer.ln_f(block(x))"),
    "label-smoothing": (port(W(LabelSmoothed)), LOSS, "crossentropy.label-smoothing",
                        "return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), "
                        "label_smoothing=0.1)"),
    "z-loss": (port(W(WithZLoss)), LOSS, None, "return loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()"),
    "targets-time-major": (port(W(TargetsTimeMajor)), LOSS, None,
                           "return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.t().reshape(-1))"),
    "adamw-beta1-twice": (port(optimizer=adamw_beta1_twice), UPDATE, None,
                          "return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta1), "
                          "eps=h.eps, weight_decay=h.weight_decay)"),
    "adamw-blocks-only": (port(optimizer=adamw_blocks_only), UPDATE, None,
                          "return torch.optim.AdamW(model.transformer.h.parameters(), lr=h.learning_rate, "
                          "betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay)"),
}


def line_of(text: str) -> int:
    """The line number of this file whose stripped text is ``text`` (it must be the only one)."""
    with open(__file__) as f:
        found = [i for i, line in enumerate(f, 1) if line.strip() == text]
    if len(found) != 1:
        raise ValueError(f"{text!r} is on {len(found)} lines of {__file__}, not one")
    return found[0]
