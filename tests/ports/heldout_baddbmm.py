"""A fourth nanoGPT-style model and a sixth held-out batch of port bugs (BUGS6) for
tests/ports/test_model_bugs.py.

Written differently from tests/ports/model_ports.py and the two models of tests/ports/heldout_einsum_sdpa.py:
the hyperparameters read from a dict, the vocabulary padded to Vp as llm.c's train_gpt2.py
pads it (the loss sliced back to V), attention on (B*NH, T, hs) with an additive mask and
torch.baddbmm / torch.bmm, a layer norm over torch.var_mean with torch.addcmul for the
affine, GELU through F.gelu(approximate="tanh"), the loss as logsumexp minus the gathered
logit, and (for the optimizer's bugs) an AdamW of its own subclassing torch.optim.AdamW.

BUGS6: ordinary port bugs of the kinds of issue 23, none the same as an earlier batch's,
all written before any of them ran, run once, untuned (tests/ports/test_model_bugs.py records
that first run). ``BUGS6``: name -> (model factory, or a TorchModel with its optimizer,
where the first divergence must be, the right cause's id (a prefix)).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import TorchModel


class FourthNorm(nn.Module):
    """A layer norm over torch.var_mean; the affine through torch.addcmul."""

    def __init__(self, n, bug):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.bug = bug

    def forward(self, x):
        bug = self.bug
        dims = (-2, -1) if bug.get("ln_over_t_and_c") else (-1,)
        # var_mean's default is the unbiased estimate: correction=0 is the C's
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=1 if bug.get("ln_unbiased") else 0)
        if bug.get("ln_variance_not_std"):     # divided by the variance, the square root forgotten
            xhat = (x - mean) / (var + 1e-5)
        else:
            xhat = (x - mean) * torch.rsqrt(var + 1e-5)
        return torch.addcmul(self.bias, xhat, self.weight)


class FourthAttention(nn.Module):
    """Attention on (B*NH, T, hs): scores by torch.baddbmm onto an additive causal mask."""

    def __init__(self, C, nh, max_t, bug):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.nh = nh
        self.bug = bug
        keep = torch.tril(torch.ones(max_t, max_t))
        if bug.get("mask_ones_added"):        # the 0/1 tril added as if it were a 0/-inf bias
            bias = keep
        else:
            bias = torch.zeros(max_t, max_t).masked_fill(keep == 0, float("-inf"))
        self.register_buffer("mask", bias, persistent=False)

    def heads(self, t, B, T, hs):
        if self.bug.get("nh_major"):          # heads batched (NH, B): merged back as (B, NH) below
            return t.view(B, T, self.nh, hs).permute(2, 0, 1, 3).reshape(self.nh * B, T, hs)
        return t.view(B, T, self.nh, hs).transpose(1, 2).reshape(B * self.nh, T, hs)

    def scale(self, hs, T):
        if self.bug.get("scale_by_sqrt_t"):   # the sequence length for the head size
            return 1 / math.sqrt(T)
        if self.bug.get("scale_precedence"):  # hs ** -1/2 is (hs ** -1) / 2
            return hs ** -1 / 2
        return hs ** -0.5

    def forward(self, x):
        B, T, C = x.shape
        nh, hs, bug = self.nh, C // self.nh, self.bug
        qkv = self.c_attn(x)
        if bug.get("qkv_per_channel"):        # viewed (B, T, C, 3): q, k, v interleaved per channel
            q, k, v = qkv.view(B, T, C, 3).unbind(-1)
        else:
            q, k, v = qkv.split(C, dim=-1)
        if bug.get("k_is_q"):                 # k = q typed for the key
            k = q
        q, k, v = (self.heads(t, B, T, hs) for t in (q, k, v))
        att = torch.baddbmm(self.mask[:T, :T], q, k.transpose(1, 2), beta=1.0, alpha=self.scale(hs, T))
        y = torch.bmm(torch.softmax(att, dim=-1), v)                # (B*NH, T, hs)
        y = y.view(B, nh, T, hs).permute(0, 2, 1, 3).reshape(B, T, C)
        return self.c_proj(y)


def fourth_gelu(h, bug):
    if bug.get("gelu_sqrt_2pi"):              # sqrt(2*pi) typed for sqrt(2/pi)
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 * math.pi) * (h + 0.044715 * h ** 3)))
    if bug.get("gelu_sigmoid_form"):          # the sigmoid form, its factor 2 left out
        return h * torch.sigmoid(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))
    if bug.get("gelu_coef_shifted"):          # a zero too many in the cubic constant
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.0044715 * h ** 3)))
    if bug.get("gelu_twice"):
        return F.gelu(F.gelu(h, approximate="tanh"), approximate="tanh")
    return F.gelu(h, approximate="tanh")


class FourthMLP(nn.Module):
    def __init__(self, C, bug):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C)
        self.c_proj = nn.Linear(4 * C, C)
        self.bug = bug

    def forward(self, x):
        return self.c_proj(fourth_gelu(self.c_fc(x), self.bug))


class FourthBlock(nn.Module):
    def __init__(self, C, nh, max_t, n_layer, bug):
        super().__init__()
        self.ln_1 = FourthNorm(C, bug)
        self.attn = FourthAttention(C, nh, max_t, bug)
        self.ln_2 = FourthNorm(C, bug)
        self.mlp = FourthMLP(C, bug)
        self.bug = bug
        self.attn_gain = 1 / math.sqrt(n_layer) if bug.get("attn_branch_by_layers") else 1.0

    def forward(self, x):
        bug = self.bug
        if bug.get("norms_swapped"):          # ln_2 before the attention, ln_1 before the MLP
            x = x + self.attn(self.ln_2(x))
            return x + self.mlp(self.ln_1(x))
        x = x + self.attn_gain * self.attn(self.ln_1(x))
        h = self.ln_2(x)
        if bug.get("mlp_residual_from_ln_2"):  # the MLP's residual taken from its normalised input
            return h + self.mlp(h)
        return x + self.mlp(h)


class FourthGPT(nn.Module):
    """GPT-2 from a dict of hyperparameters, its vocabulary padded to Vp."""

    bug: dict = {}

    def __init__(self, hp):
        super().__init__()
        bug = self.bug
        C, L, maxT = hp["n_embd"], hp["n_layer"], hp["block_size"]
        self.V, self.Vp = hp["vocab_size"], hp["padded_vocab_size"]
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(self.Vp, C),
            "wpe": nn.Embedding(maxT, C),
            "h": nn.ModuleList(FourthBlock(C, hp["n_head"], maxT, L, bug) for _ in range(L)),
            "ln_f": FourthNorm(C, bug),
        })
        self.lm_head = nn.Linear(C, self.Vp, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def embed(self, idx):
        bug, T = self.bug, idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        if bug.get("pos_offset_by_t"):        # positions continued after a first chunk of length T
            pos = pos + T
        table = self.transformer.wte if bug.get("pos_from_wte") else self.transformer.wpe
        return self.transformer.wte(idx) + table(pos)

    def loss(self, logits, targets):
        bug = self.bug
        B, T = targets.shape
        z = logits if bug.get("loss_over_vp") else logits[..., :self.V]
        nll = torch.logsumexp(z, dim=-1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if bug.get("smoothing"):
            eps = bug["smoothing"]
            nll = (1 - eps) * nll + eps * (torch.logsumexp(z, dim=-1) - z.mean(-1))
        if bug.get("divide_by_t"):            # summed, then divided by T alone
            return nll.sum() / T
        if bug.get("last_masked_divisor_kept"):   # the last position masked, the divisor still B*T
            keep = (torch.arange(T) < T - 1).to(nll.dtype)
            return (nll * keep).sum() / (B * T)
        return nll.mean()

    def forward(self, idx, targets=None):
        bug = self.bug
        x = self.embed(idx)
        blocks = list(self.transformer.h)
        if bug.get("last_block_twice"):
            blocks.append(blocks[-1])
        for block in blocks:
            x = block(x)
        if bug.get("ln_f_discarded"):         # ln_f's result never assigned
            self.transformer.ln_f(x)
        else:
            x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        return logits, None if targets is None else self.loss(logits, targets)

    @classmethod
    def variant(cls, **bug):
        return type(f"FourthGPT_{'_'.join(bug)}", (cls,), {"bug": bug})


class FourthAdamW(torch.optim.AdamW):
    """AdamW's step written out (the state under torch's names: step, exp_avg, exp_avg_sq)."""

    bug: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is not None:
                    self.update(p, p.grad, lr, b1, b2, eps, wd)

    def update(self, p, grad, lr, b1, b2, eps, wd):
        st = self.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        st["step"] += 1
        t = float(st["step"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self.bug.get("no_bias_correction"):
            m_hat, v_hat = m, v
        else:
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        if self.bug.get("decay_without_lr"):  # p *= 1 - wd, not 1 - lr * wd
            p.mul_(1 - wd)
        else:
            p.mul_(1 - lr * wd)
        p.add_(m_hat / (v_hat.sqrt() + eps), alpha=-lr)

    @classmethod
    def factory(cls, **bug):
        kind = type(f"FourthAdamW_{'_'.join(bug)}", (cls,), {"bug": bug})

        def make(model, h):
            return kind(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps,
                        weight_decay=h.weight_decay)
        return make


def adam_with_l2(model, h):
    """torch.optim.Adam for AdamW: its weight_decay an L2 term in the gradient."""
    return torch.optim.Adam(model.parameters(), lr=h.learning_rate, betas=(h.beta1, h.beta2), eps=h.eps,
                            weight_decay=h.weight_decay)


Q = FourthGPT.variant
ATT = "layer 0 attention attention_forward"
GELU = "layer 0 gelu gelu_forward"
LN1 = "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]"
LOSS = "crossentropy crossentropy_softmax_backward"
UPDATE = "gpt2_update wte"
BUGS6 = {
    # attention
    "heads-batched-nh-major": (Q(nh_major=True), ATT, "attention.layout"),
    "qkv-viewed-per-channel": (Q(qkv_per_channel=True), ATT, "attention.layout"),
    "k-is-q": (Q(k_is_q=True), ATT, "attention.qkv-order"),
    "scale-by-sqrt-T": (Q(scale_by_sqrt_t=True), ATT, "attention.scale"),
    "scale-precedence-hs**-1/2": (Q(scale_precedence=True), ATT, "attention.scale"),
    "mask-tril-ones-added": (Q(mask_ones_added=True), ATT, "attention.masking"),
    # GELU
    "gelu-sqrt-2pi": (Q(gelu_sqrt_2pi=True), GELU, "gelu.tanh-scale"),
    "gelu-sigmoid-form-without-2": (Q(gelu_sigmoid_form=True), GELU, "gelu.tanh-scale"),
    "gelu-coefficient-0.0044715": (Q(gelu_coef_shifted=True), GELU, "gelu.cubic-constant"),
    "gelu-twice": (Q(gelu_twice=True), GELU, "gelu.twice"),
    # layer norm
    "var_mean-unbiased-default": (Q(ln_unbiased=True), LN1, "layernorm.unbiased-variance"),
    "layernorm-over-T-and-C": (Q(ln_over_t_and_c=True), LN1, "layernorm.axis"),
    "layernorm-variance-not-std": (Q(ln_variance_not_std=True), LN1, "layernorm.no-sqrt"),
    # embeddings
    "positions-offset-by-T": (Q(pos_offset_by_t=True), "encoder encoder_forward", "embedding.position-shift"),
    "positions-looked-up-in-wte": (Q(pos_from_wte=True), "encoder encoder_forward [transformer.wpe]",
                                   "structure.never-called"),
    # loss
    "label-smoothing-0.01": (Q(smoothing=0.01), LOSS, "crossentropy.label-smoothing"),
    "loss-divided-by-T": (Q(divide_by_t=True), LOSS, "crossentropy.divisor"),
    "last-position-masked-divisor-kept": (Q(last_masked_divisor_kept=True), LOSS, "crossentropy.ignored-positions"),
    "loss-over-padded-vocab": (Q(loss_over_vp=True), LOSS, "softmax.padded-columns"),
    # structure
    "attention-branch-by-1/sqrt(n_layer)": (Q(attn_branch_by_layers=True), "layer 0 residual2 residual_forward",
                                            "residual.branch-scale"),
    "block-norms-swapped": (Q(norms_swapped=True), LN1, "structure.out-of-order"),
    "last-block-twice": (Q(last_block_twice=True), "layer 1 ln1 layernorm_forward [transformer.h.1.ln_1]",
                         "structure.called-more"),
    "mlp-residual-from-ln_2": (Q(mlp_residual_from_ln_2=True), "layer 0 residual3 residual_forward",
                               "residual.wrong-input"),
    "ln_f-result-discarded": (Q(ln_f_discarded=True), "lnf layernorm_forward [transformer.ln_f]",
                              "structure.no-gradient"),
    # the optimizer
    "adamw-without-bias-correction": (TorchModel(FourthGPT, optimizer=FourthAdamW.factory(no_bias_correction=True)),
                                      UPDATE, "adamw.no-bias-correction"),
    "decay-not-scaled-by-lr": (TorchModel(FourthGPT, optimizer=FourthAdamW.factory(decay_without_lr=True)),
                               UPDATE, "adamw.weight-decay"),
    "adam-with-l2-decay": (TorchModel(FourthGPT, optimizer=adam_with_l2), UPDATE, "adamw.l2"),
}
