"""GPT-2 shapes, names and presets, shared by the C binding and the Python references.

Everything here restates the layout contract of llm.c's ``train_gpt2.c``: the field
order of ``GPT2Config``, the 16 parameter tensors of ``ParameterTensors`` and the 23
activation tensors of ``ActivationTensors``, with the shapes that
``fill_in_parameter_sizes`` and ``fill_in_activation_sizes`` give them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, asdict, replace
from math import prod

import numpy as np

from pyref.constants import Held

# ParameterTensors, in struct (and checkpoint file) order.
PARAM_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)

# ActivationTensors, in struct order.
ACT_NAMES = (
    "encoded", "ln1", "ln1_mean", "ln1_rstd", "qkv", "atty", "preatt", "att",
    "attproj", "residual2", "ln2", "ln2_mean", "ln2_rstd", "fch", "fch_gelu",
    "fcproj", "residual3", "lnf", "lnf_mean", "lnf_rstd", "logits", "probs", "losses",
)

# Parameters whose leading axis is the layer (L, ...).
LAYER_PARAMS = frozenset(PARAM_NAMES[2:14])


class ConfigError(ValueError):
    """A model configuration that cannot be (a non-positive size, C not divisible by NH,
    an unknown preset name)."""


@dataclass(frozen=True)
class GPT2Config:
    """Mirror of the C ``GPT2Config`` (field order is the ABI)."""

    max_seq_len: int          # maxT
    vocab_size: int           # V
    padded_vocab_size: int    # Vp, V rounded up (50257 -> 50304)
    num_layers: int           # L
    num_heads: int            # NH
    channels: int             # C

    def validate(self) -> "GPT2Config":
        """Raise ValueError naming the first field that the C would choke on."""
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"padded_vocab_size ({self.padded_vocab_size}) < vocab_size ({self.vocab_size})")
        if self.channels % self.num_heads:
            raise ConfigError(
                f"channels ({self.channels}) is not divisible by num_heads ({self.num_heads})")
        if self.num_parameters() >= 2**62:
            raise ConfigError("config would need more parameters than fit in size_t arithmetic")
        return self

    # short names as used in the C and the spec
    L = property(lambda self: self.num_layers)
    C = property(lambda self: self.channels)
    NH = property(lambda self: self.num_heads)
    V = property(lambda self: self.vocab_size)
    Vp = property(lambda self: self.padded_vocab_size)
    maxT = property(lambda self: self.max_seq_len)

    def replace(self, **changes) -> "GPT2Config":
        return replace(self, **changes)

    def num_parameters(self) -> int:
        return sum(prod(s) for s in param_shapes(self).values())


def param_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Shapes of the 16 parameter tensors, as ``fill_in_parameter_sizes`` sizes them."""
    Vp, C, L, maxT = config.padded_vocab_size, config.channels, config.num_layers, config.max_seq_len
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


def layout(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each tensor's (offset, shape) in the one flat buffer that holds them all, in order:
    the walk of llm.c's ``malloc_and_point_parameters`` / ``_activations``, and the only
    place the harness and the references make it."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        out[name] = (offset, tuple(shape))
        offset += prod(shape)
    return out


def point(memory: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Named views into the flat buffer ``memory``, which holds exactly the tensors of
    ``shapes`` in order (what ``malloc_and_point_*`` makes of its buffer)."""
    where = layout(shapes)
    size = sum(prod(s) for s in shapes.values())
    if memory.size != size:
        raise ValueError(f"a buffer of {memory.size} values for tensors of {size}")
    return {name: memory[off:off + prod(shape)].reshape(shape) for name, (off, shape) in where.items()}


class ParamsError(ValueError):
    """Parameters that do not fit their config: a tensor missing, unknown or misshaped, or
    a flat array of the wrong length."""


def flat_params(config: GPT2Config, params, what: str = "params") -> np.ndarray:
    """The config's parameters as one flat array in the C's order (params_memory), from a
    flat array or a dict of the 16 named tensors with their shapes. The dtype is kept:
    each caller says which it accepts. The one place where parameters are flattened."""
    if isinstance(params, Mapping):
        missing = [n for n in PARAM_NAMES if n not in params]
        extra = sorted(set(params) - set(PARAM_NAMES))
        if missing or extra:
            raise ParamsError(f"{what}: missing tensors {missing}, unknown tensors {extra}")
        shapes = param_shapes(config)
        for n in PARAM_NAMES:
            if np.shape(params[n]) != shapes[n]:
                raise ParamsError(f"{what}[{n!r}] has shape {np.shape(params[n])}, expected {shapes[n]}")
        return np.concatenate([np.asarray(params[n]).reshape(-1) for n in PARAM_NAMES])
    a = np.asarray(params)
    if a.size != config.num_parameters():
        raise ParamsError(f"{what}: the config needs {config.num_parameters()} parameters, got {a.size}")
    return a.reshape(-1)


def act_shapes(config: GPT2Config, B: int, T: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the 23 activation tensors, as ``fill_in_activation_sizes`` sizes them."""
    C, L, NH, Vp = config.channels, config.num_layers, config.num_heads, config.padded_vocab_size
    return {
        "encoded": (B, T, C),
        "ln1": (L, B, T, C), "ln1_mean": (L, B, T), "ln1_rstd": (L, B, T),
        "qkv": (L, B, T, 3 * C), "atty": (L, B, T, C),
        "preatt": (L, B, NH, T, T), "att": (L, B, NH, T, T),
        "attproj": (L, B, T, C), "residual2": (L, B, T, C),
        "ln2": (L, B, T, C), "ln2_mean": (L, B, T), "ln2_rstd": (L, B, T),
        "fch": (L, B, T, 4 * C), "fch_gelu": (L, B, T, 4 * C),
        "fcproj": (L, B, T, C), "residual3": (L, B, T, C),
        "lnf": (B, T, C), "lnf_mean": (B, T), "lnf_rstd": (B, T),
        "logits": (B, T, Vp), "probs": (B, T, Vp), "losses": (B, T),
    }


@dataclass(frozen=True)
class AdamW:
    """AdamW's settings, in the order ``gpt2_update`` takes them (after the model).

    The defaults are a harness run's: train_gpt2.c's main() (learning rate 1e-4, betas
    0.9 and 0.999, eps 1e-8) with weight decay 0.1 instead of main()'s 0, so that the
    decay term is exercised. :data:`LLMC_MAIN` is main()'s own."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1

    def args(self) -> tuple[float, float, float, float, float]:
        """The five values, in gpt2_update's (and the protocol's ``adamw``) order."""
        return (self.learning_rate, self.beta1, self.beta2, self.eps, self.weight_decay)

    def as_float32(self) -> "AdamW":
        """The settings as the C holds them (``float``): 0.999f, not 0.999. A double
        0.999 makes 1 - beta2 differ from the C's 1.0f - 0.999f by 1.3e-5 relative. A
        :class:`pyref.constants.Held` setting (an optimizer's own double) stays as held."""
        return AdamW(*(x if isinstance(x, Held) else float(np.float32(x)) for x in self.args()))

    def kernel_args(self, t: int, held: Mapping | None = None) -> dict:
        """The protocol kernel ``adamw``'s scalar arguments for step ``t``, as the C's
        floats (:meth:`as_float32`). ``held``: the settings an optimizer holds itself
        (argument name -> its double); each one that is the C's up to float rounding is
        passed as it is held (:class:`pyref.constants.Held`), any other as the C's float, so
        that a different setting (beta2 0.95 for 0.999) still fails the update check."""
        args = dict(zip(ADAMW_ARGS, self.as_float32().args()))
        for k, x in (held or {}).items():
            if k in args and float(np.float32(x)) == args[k]:
                args[k] = Held(x)
        return {**args, "t": t}

    @classmethod
    def from_kernel_args(cls, args: Mapping) -> "AdamW":
        """The settings of an ``adamw`` call's named arguments (as they are, not rounded)."""
        return cls(*(args[k] for k in ADAMW_ARGS))


# the protocol kernel adamw's names for AdamW's fields, in order
ADAMW_ARGS = ("lr", "beta1", "beta2", "eps", "weight_decay")
# train_gpt2.c's main(): weight decay 0 (what gpt2_update and GPT2.step default to)
LLMC_MAIN = AdamW(weight_decay=0.0)


def pad_vocab(V: int, multiple: int = 64) -> int:
    """Round V up to a multiple (llm.c pads 50257 to 50304 = 786 * 64)."""
    return -(-V // multiple) * multiple


# Built-in configs. "tiny" is the default for `make parity`, the tests and the gate:
# awkward on purpose (V < Vp, C not a power of two, hs not a power of two).
PRESETS: dict[str, GPT2Config] = {
    "tiny": GPT2Config(max_seq_len=32, vocab_size=123, padded_vocab_size=128,
                       num_layers=2, num_heads=4, channels=48),
    "small": GPT2Config(max_seq_len=64, vocab_size=500, padded_vocab_size=512,
                        num_layers=4, num_heads=6, channels=96),
    "d12": GPT2Config(max_seq_len=1024, vocab_size=50257, padded_vocab_size=50304,
                      num_layers=12, num_heads=12, channels=768),   # the real GPT-2 124M
}
PRESETS["124M"] = PRESETS["d12"]


def preset(name: str) -> GPT2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def check_tokens(what: str, ids, V: int, error: type = ValueError, like=None) -> np.ndarray:
    """``ids`` as a C-contiguous int32 (B, T) array of token ids in [0, V) (of the shape of
    the inputs ``like``, for targets), or ``error`` naming what is wrong: the one check
    every model (the C's, the references, the CLI's batches) makes before tokens reach it
    (the C asserts, an index would wrap)."""
    a = np.asarray(ids)
    if a.ndim != 2:
        raise error(f"{what}: expected a (B, T) array of token ids, got shape {a.shape}")
    if like is not None and a.shape != like.shape:
        raise error(f"{what} shape {a.shape} != inputs shape {like.shape}")
    if a.size == 0:
        raise error(f"{what}: empty batch {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise error(f"{what}: expected integer token ids, got {a.dtype}")
    bad = (a < 0) | (a >= V)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise error(f"{what}: token id {int(a[idx])} at {idx} is outside [0, V={V})")
    return np.ascontiguousarray(a, dtype=np.int32)
