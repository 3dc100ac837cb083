"""Python references for llm.c's GPT-2 CPU trainer ``train_gpt2.c``.

- ``pyref.config``: GPT2Config, parameter/activation names and shapes, presets
- ``pyref.numpy_kernels`` / ``pyref.torch_kernels``: the kernel protocol (docs/kernels.md)
- ``pyref.protocol``: KernelSet, the NumPy-facing adapter for any protocol module
- ``pyref.model``: GPT2, the model built only from a KernelSet
- ``pyref.formats``: checkpoint / debug state / token shard files
- ``pyref.synth``: deterministic parameters and batches

Importing ``pyref`` pulls in NumPy only (torch is imported by ``pyref.torch_kernels``).
"""
from .config import (ACT_NAMES, PARAM_NAMES, PRESETS, GPT2Config, act_shapes, pad_vocab,
                     param_shapes, preset)
from .formats import (Checkpoint, DebugState, FormatError, read_checkpoint, read_debug_state, read_tokens,
                      write_checkpoint, write_debug_state, write_tokens)
from .model import GPT2
from .protocol import KERNEL_NAMES, KernelNotProvided, KernelSet, kernel_set, missing
from .synth import batches, batches_from_tokens, init_params, make_batch, make_tokens

__all__ = [
    "ACT_NAMES", "PARAM_NAMES", "PRESETS", "GPT2Config", "act_shapes", "pad_vocab",
    "param_shapes", "preset",
    "Checkpoint", "DebugState", "FormatError", "read_checkpoint", "read_debug_state", "read_tokens",
    "write_checkpoint", "write_debug_state", "write_tokens",
    "GPT2", "KERNEL_NAMES", "KernelNotProvided", "KernelSet", "kernel_set", "missing",
    "batches", "batches_from_tokens", "init_params", "make_batch", "make_tokens",
]
