"""What the recognised families of GPT-2 ports call things: parameters and module
boundaries, by name. A new family of models (another naming scheme) is a few patterns
here; anything else takes an explicit mapping (:func:`harness.ports.mapping.parse_slot`).

* the walkthrough's: the C's own names and stacked shapes (``wte``, ``ln1w`` (L, C),
  ``qkvw`` (L, 3C, C), ...), the head being ``wte`` itself (:data:`C_NAMED`);
* llm.c's ``train_gpt2.py`` / nanoGPT: ``transformer.h.{i}.attn.c_attn.weight``, ``nn.Linear``
  weights (out, in) as the C stores them, ``lm_head.weight`` tied to ``transformer.wte.weight``;
* Hugging Face ``GPT2LMHeadModel``: the same names, ``Conv1D`` weights stored (in, out),
  so transposed (:func:`transposed_module`).
"""
from __future__ import annotations

import re

from pyref.config import PARAM_NAMES

# nanoGPT / llm.c train_gpt2.py / Hugging Face names (any prefix) -> C tensor
BLOCK = r"(?:^|\.)h\.(\d+)\."
_TOP = {"wte.weight": "wte", "wpe.weight": "wpe", "lm_head.weight": "wte", "ln_f.weight": "lnfw",
        "ln_f.bias": "lnfb"}

_IN_BLOCK = {"ln_1": "ln1", "attn.c_attn": "qkv", "attn.c_proj": "attproj", "ln_2": "ln2",
             "mlp.c_fc": "fc", "mlp.c_proj": "fcproj"}   # + .weight / .bias -> <C name>w / b

# (pattern of a parameter's name, C tensor); a layer's number from the pattern's group
NAMED = [(re.compile(r"(?:^|\.)" + re.escape(k) + "$"), v) for k, v in _TOP.items()] + [
    (re.compile(BLOCK + re.escape(f"{module}.{kind}") + "$"), c + kind[0])
    for module, c in _IN_BLOCK.items() for kind in ("weight", "bias")]
# the walkthrough's: the C's own names
C_NAMED = re.compile(r"(?:^|\.)(" + "|".join(PARAM_NAMES) + r")$")

# (module name pattern, "in"/"out", C activation); a layer's number from the pattern's group
HOOKS = [
    (re.compile(BLOCK[:-2] + r"$"), "in", "encoded"),      # block 0's input
    (re.compile(BLOCK[:-2] + r"$"), "out", "residual3"),
    (re.compile(BLOCK + r"ln_1$"), "out", "ln1"),
    (re.compile(BLOCK + r"attn\.c_attn$"), "out", "qkv"),
    (re.compile(BLOCK + r"attn\.c_proj$"), "in", "atty"),
    (re.compile(BLOCK + r"attn\.c_proj$"), "out", "attproj"),
    (re.compile(BLOCK + r"ln_2$"), "in", "residual2"),
    (re.compile(BLOCK + r"ln_2$"), "out", "ln2"),
    (re.compile(BLOCK + r"mlp\.c_fc$"), "out", "fch"),
    (re.compile(BLOCK + r"mlp\.c_proj$"), "in", "fch_gelu"),
    (re.compile(BLOCK + r"mlp\.c_proj$"), "out", "fcproj"),
    (re.compile(r"(?:^|\.)ln_f$"), "out", "lnf"),
    (re.compile(r"(?:^|\.)lm_head$"), "out", "logits"),
]


def transposed_module(module) -> bool:
    """Whether the module stores its weight (in, out), transposed from the C's (out, in):
    Hugging Face's ``Conv1D``."""
    return type(module).__name__ == "Conv1D"


def hugging_face(model) -> bool:
    """Whether ``model`` is Hugging Face's (its forward's labels are shifted: not the C's loss)."""
    return any(transposed_module(c) for c in model.modules()) or type(model).__module__.startswith("transformers.")
