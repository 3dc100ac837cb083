"""nanoGPT (tests/ports/model_ports.py) whose attention casts q, k, v to bf16 and the
result back to the stream's dtype: a bf16-mixed training script's cast left in a float32 port
(BUGS10's ``attention-in-bf16``, written again here for tests/ports/test_undeclared.py)."""
from __future__ import annotations

import torch.nn.functional as F

import model_ports as mp

CAST_LINE = "y = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)"


class CastAttention(mp.CausalSelfAttention):
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
        y = y.to(x.dtype)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GPTAttentionInBf16(mp.GPT):
    def __init__(self, config):
        super().__init__(config)
        for block in self.transformer.h:
            block.attn.__class__ = CastAttention
