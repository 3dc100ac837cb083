"""Deterministic synthetic parameters, batches and token streams (from a seed).

Everything comes from ``np.random.default_rng(seed)``, so the same seed gives the same
bytes on every machine.
"""
from __future__ import annotations

from math import sqrt
from typing import Iterator

import numpy as np

from .config import GPT2Config, param_shapes, point

STYLES = ("test", "gpt2")


def init_params(config: GPT2Config, seed: int = 0, style: str = "test") -> np.ndarray:
    """GPT-2 style initialisation -> flat float32 of ``config.num_parameters()``.

    Weights N(0, 0.02); the residual projections (attprojw, fcprojw) N(0, 0.02/sqrt(2L));
    wpe N(0, 0.01); wte's padded rows V..Vp exactly 0.
    ``style="gpt2"``: biases 0 and layernorm gains 1, as GPT-2 starts.
    ``style="test"`` (default): biases N(0, 0.02) and gains 1 + N(0, 0.1), so that a
    kernel that ignores a bias or a gain changes the numbers.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    config.validate()
    rng = np.random.default_rng(seed)
    L = config.num_layers
    test = style == "test"
    std = {"wte": 0.02, "wpe": 0.01, "qkvw": 0.02, "fcw": 0.02,
           "attprojw": 0.02 / sqrt(2 * L), "fcprojw": 0.02 / sqrt(2 * L)}
    out = np.empty(config.num_parameters(), dtype=np.float32)
    for name, view in point(out, param_shapes(config)).items():
        n, dst = view.size, view.reshape(-1)
        if name in std:                                   # weights
            rng.standard_normal(n, dtype=np.float32, out=dst)
            dst *= np.float32(std[name])
        elif name.endswith("w"):                          # layernorm gains
            if test:
                rng.standard_normal(n, dtype=np.float32, out=dst)
                dst *= np.float32(0.1)
                dst += np.float32(1)
            else:
                dst.fill(1)
        elif test:                                        # biases
            rng.standard_normal(n, dtype=np.float32, out=dst)
            dst *= np.float32(0.02)
        else:
            dst.fill(0)
    wte = out[:config.padded_vocab_size * config.channels].reshape(config.padded_vocab_size, -1)
    wte[config.vocab_size:] = 0
    return out


def make_tokens(config: GPT2Config, n: int, seed: int = 0) -> np.ndarray:
    """n token ids, uniform in [0, V), int32 (ids 0 and V-1 both present when n >= 2)."""
    rng = np.random.default_rng(seed)
    V = config.vocab_size
    tok = rng.integers(0, V, size=n, dtype=np.int32)
    if n >= 2:
        i, j = rng.choice(n, size=2, replace=False)
        tok[i], tok[j] = 0, V - 1
    return tok


def make_batch(config: GPT2Config, B: int, T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int32 (B, T): a random stream of B*T+1 tokens cut as llm.c's
    dataloader cuts it (targets are the inputs shifted by one). Ids are uniform in [0, V);
    0 and V-1 both occur in the inputs and in the targets (when B*T >= 3), and some id
    repeats in the inputs (when B*T >= 4), so the padded-vocab edge and encoder_backward's scatter of
    repeated ids are exercised."""
    if B < 1 or T < 1:
        raise ValueError(f"B and T must be >= 1, got B={B}, T={T}")
    if T > config.max_seq_len:
        raise ValueError(f"T={T} exceeds max_seq_len={config.max_seq_len}")
    rng = np.random.default_rng(seed)
    V, N = config.vocab_size, B * T
    tok = rng.integers(0, V, size=N + 1, dtype=np.int32)
    if N >= 3:   # positions 1..N-1 are in both inputs (tok[:N]) and targets (tok[1:])
        pos = rng.permutation(np.arange(1, N))
        tok[pos[0]], tok[pos[-1]] = 0, V - 1
        if N >= 4 and len(np.unique(tok[:N])) == N:
            tok[pos[1]] = 0   # a repeated id
    else:        # too short for both ids in both: 0 in the inputs, V-1 in the targets
        tok[0], tok[-1] = 0, V - 1
    return tok[:N].reshape(B, T).copy(), tok[1:].reshape(B, T).copy()


def batches(config: GPT2Config, B: int, T: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Generated batches forever: ``make_batch`` with seeds ``seed``, ``seed + 1``, ...
    (the one generator the CLI, the gate and the tests share)."""
    make_batch(config, B, T, seed)   # refuse bad B, T now, not at the first next()

    def gen():
        i = 0
        while True:
            yield make_batch(config, B, T, seed=seed + i)
            i += 1

    return gen()


def batches_from_tokens(tokens, B: int, T: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """llm.c's dataloader over one token stream, forever: each batch is B*T+1 consecutive
    tokens (inputs: the first B*T, targets: the last B*T), the position advances by B*T,
    and wraps to 0 when the next B*T+1 tokens would run past the end."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-d, got shape {tokens.shape}")
    N = B * T
    if B < 1 or T < 1 or tokens.size < N + 1:
        raise ValueError(f"need at least B*T+1 = {N + 1} tokens for B={B}, T={T}, "
                         f"got {tokens.size}")

    def gen():
        pos = 0
        while True:
            if pos + N + 1 > tokens.size:
                pos = 0
            buf = tokens[pos:pos + N + 1].astype(np.int32)
            yield buf[:N].reshape(B, T), buf[1:].reshape(B, T)
            pos += N

    return gen()
