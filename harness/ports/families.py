"""What the recognised families of GPT-2 ports call things: parameters and module
boundaries, by name. A new family of models (another naming scheme) is a few patterns
here; anything else takes an explicit mapping (:func:`harness.ports.mapping.parse_slot`).

* the walkthrough's: the C's own names and stacked shapes (``wte``, ``ln1w`` (L, C),
  ``qkvw`` (L, 3C, C), ...), the head being ``wte`` itself (:data:`C_NAMED`);
* llm.c's ``train_gpt2.py`` / nanoGPT: ``transformer.h.{i}.attn.c_attn.weight``, ``nn.Linear``
  weights (out, in) as the C stores them, ``lm_head.weight`` tied to ``transformer.wte.weight``;
* Hugging Face ``GPT2LMHeadModel``: the same names, ``Conv1D`` weights stored (in, out),
  so transposed (:func:`transposed_module`);
* any other common convention, by a module's own name (:func:`named_role`:
  ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``query``, ``wq``, ``fc1``/``fc2``,
  ``w1``/``w2``, ``norm1``/``norm2``, ``embed_tokens``, ``final_norm``, ``lm_head`` ...),
  a block being whatever the first integer of a name indexes (``layers.3``, ``blocks.3``,
  or a key ending in one: ``stage0``, ``layer_3``; :func:`block_key`);
* a name whose parts are separated by ``/`` (Flax's, JAX's, TensorFlow checkpoints'
  flattened paths, as the keys of an ``nn.ParameterDict``: ``transformer/h/0/attn/c_proj/kernel``)
  is read as the same name with ``.`` (:func:`name_parts`), with Flax's own leaves: ``kernel``
  a ``Dense``'s weight stored (in, out) (:func:`in_out_layout`), ``scale`` a norm's weight,
  ``embedding`` an ``Embed``'s table.

:data:`HOOKS` names the activations' module boundaries of the first three only; for the
others :func:`harness.ports.capture.anchors` finds them by the parameters modules hold.
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


# ----------------------------------------------------------------------------- any family, by name
# what the common conventions call a block's modules (nanoGPT, Hugging Face's GPT-2, Llama,
# OPT/BART, BERT, torch.nn.MultiheadAttention, minGPT, hand-written ports): a module's own
# name -> its role; q, k, v are the row pieces of the C's qkv
ROLE_NAMES = {
    "ln1": ("ln_1", "ln1", "norm1", "norm_1", "input_layernorm", "attention_norm", "attn_norm", "ln_attn",
            "self_attn_layer_norm", "layernorm_before", "norm_attn", "attn_ln"),
    "ln2": ("ln_2", "ln2", "norm2", "norm_2", "post_attention_layernorm", "ffn_norm", "mlp_norm", "ln_mlp",
            "layernorm_after", "norm_mlp", "mlp_ln", "ffn_layer_norm"),
    "qkv": ("c_attn", "qkv", "qkv_proj", "in_proj", "wqkv", "query_key_value", "to_qkv", "attn_qkv"),
    "q": ("q_proj", "query", "wq", "q", "to_q", "q_lin", "q_linear"),
    "k": ("k_proj", "key", "wk", "k", "to_k", "k_lin", "k_linear"),
    "v": ("v_proj", "value", "wv", "v", "to_v", "v_lin", "v_linear"),
    "attproj": ("o_proj", "out_proj", "wo", "to_out", "out_lin", "attn_out", "o"),
    "fc": ("c_fc", "fc1", "fc_1", "w1", "fc_in", "up_proj", "dense_h_to_4h", "lin1", "linear1", "ff1"),
    "fcproj": ("fc2", "fc_2", "w2", "fc_out", "down_proj", "dense_4h_to_h", "lin2", "linear2", "ff2"),
}
# names that say "a projection" and need the enclosing module to tell attention's from the MLP's
PROJ_NAMES = ("c_proj", "proj", "dense", "out", "output", "linear")
ATTN_PARENTS = ("attn", "attention", "self_attn", "self_attention", "mha", "sa", "selfattention")
MLP_PARENTS = ("mlp", "ffn", "feed_forward", "feedforward", "ff", "ffwd")
# outside the blocks: a module's own name -> the C tensor (the head is wte itself)
TOP_NAMES = {
    "wte": ("wte", "embed_tokens", "tok_embeddings", "token_embedding", "tok_emb", "token_embeddings",
            "word_embeddings", "tok_embedding", "embed_in", "embedding", "embed", "tokens", "tok"),
    "wpe": ("wpe", "embed_positions", "pos_emb", "position_embedding", "position_embeddings", "pos_embedding",
            "pos_embed", "positional_embedding", "pos", "positions"),
    "lnf": ("ln_f", "final_norm", "norm_f", "final_layernorm", "final_layer_norm", "norm", "ln_final", "ln_out",
            "lnf"),
    "head": ("lm_head", "head", "unembed", "out_head", "output", "classifier"),
}
# a parameter's own name -> weight ("w") or bias ("b"); MultiheadAttention's fused in_proj
KINDS = {"weight": "w", "bias": "b", "gamma": "w", "beta": "b", "scale": "w", "shift": "b", "gain": "w",
         "in_proj_weight": "w", "in_proj_bias": "b", "kernel": "w", "embedding": "w"}
# the leaves naming a weight stored (in, out), the transpose of the C's (out, in): Flax's Dense
IN_OUT_LEAVES = ("kernel",)
# a name's separators: torch's modules' dots, and the slashes of a flattened path (Flax, JAX, TF)
_SEPARATORS = re.compile(r"[./]")
PIECES = ("q", "k", "v")
_ROLE_OF = {n: role for role, names in ROLE_NAMES.items() for n in names}
_TOP_OF = {n: c for c, names in TOP_NAMES.items() for n in names}


_KEYED = re.compile(r"^[A-Za-z_]*?[_-]?(\d+)$")


def block_key(part: str) -> int | None:
    """The block index a part of a dotted name gives: a number (``layers.3``), or a key
    ending in one (an ``nn.ModuleDict``'s ``stage0``, ``layer_3``, ``block-2``) that is not
    a module's own name with a digit in it (``fc1``, ``w2``, ``norm1``, ``ln_1``)."""
    if part.isdigit():
        return int(part)
    m = _KEYED.match(part)
    if m is None or part.lower() in _ROLE_OF or part.lower() in _TOP_OF:
        return None
    return int(m.group(1))


def block_of(path: list[str]) -> int | None:
    """Where in ``path`` (a dotted name's parts) its block's index is: the first number, or
    else the first key ending in one (:func:`block_key`); None outside the blocks."""
    numbers = [i for i, p in enumerate(path) if p.isdigit()]
    if numbers:
        return numbers[0]
    return next((i for i, p in enumerate(path) if block_key(p) is not None), None)


def name_parts(name: str) -> list[str]:
    """A parameter's name as its parts: split at torch's ``.`` and at the ``/`` of a
    flattened path (a ``nn.ParameterDict`` keyed ``transformer/h/0/ln_1/scale``)."""
    return [p for p in _SEPARATORS.split(name) if p]


def leaf_and_stem(name: str) -> tuple[str, str]:
    """(the name without its last part, with its separator; the last part)."""
    m = None
    for m in _SEPARATORS.finditer(name):
        pass
    return (name[:m.end()], name[m.end():]) if m else ("", name)


def in_out_layout(name: str) -> bool:
    """Whether the name says its weight is stored (in, out), transposed from the C's:
    Flax's ``Dense`` ``kernel``."""
    parts = name_parts(name)
    return bool(parts) and parts[-1] in IN_OUT_LEAVES


def split_name(name: str) -> tuple[int | None, list[str], list[str], str] | None:
    """A parameter's dotted name as (its block's index (:func:`block_of`), the module path
    inside the block (or the whole path outside one), the path above the block, the
    parameter's own name); None for a name that is not a module's weight or bias."""
    parts = name_parts(name)
    if not parts or parts[-1] not in KINDS:
        return None
    path = parts[:-1]
    i = block_of(path)
    if i is not None:
        return block_key(path[i]), path[i + 1:], path[:i], parts[-1]
    return None, path, [], parts[-1]


def named_role(name: str) -> tuple[int | None, str, str] | None:
    """(layer, role, "w"/"b") a parameter's name says it holds, by the common conventions
    (:data:`ROLE_NAMES`, :data:`TOP_NAMES`; role: ``ln1``, ``q``, ``attproj``, ..., or
    outside the blocks ``wte``, ``wpe``, ``lnf``, ``head``); None where its name does not
    say (then its shape may: :func:`harness.ports.mapping.map_parameters`)."""
    parsed = split_name(name)
    if parsed is None:
        return None
    layer, inner, _, leaf = parsed
    kind = KINDS[leaf]
    if leaf.startswith("in_proj"):
        return (layer, "qkv", kind) if layer is not None else None
    if not inner:
        return None
    own = inner[-1].lower()
    if layer is None:
        top = _TOP_OF.get(own)
        if top in ("wte", "wpe", "head") and kind != "w":
            return None
        return (None, top, kind) if top else None
    role = _ROLE_OF.get(own)
    if role is None and own in PROJ_NAMES:
        above = {p.lower() for p in inner[:-1]}
        if above & set(ATTN_PARENTS):
            role = "attproj"
        elif above & set(MLP_PARENTS):
            role = "fcproj" if own in ("c_proj", "proj", "output", "out") else None
    return (layer, role, kind) if role else None
