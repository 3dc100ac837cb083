"""llm.c file formats and the synthetic generators: round trips, determinism, bad files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pyref.config import PARAM_NAMES, preset
from pyref.formats import (HEADER_BYTES, FormatError, read_checkpoint, read_debug_state,
                           read_tokens, write_checkpoint, write_debug_state, write_tokens)
from pyref.model import GPT2
from pyref.synth import batches_from_tokens, init_params, make_batch, make_tokens

CFG = preset("tiny")
B, T = 2, 8


def _debug_payload(seed=0):
    m = GPT2(CFG, init_params(CFG, seed))
    x, y = make_batch(CFG, B, T, seed)
    m.forward(x, y)
    m.zero_grad()
    m.backward()
    return dict(inputs=x, targets=y, logits=m.acts["logits"], loss=m.mean_loss,
                grads=m.grads_memory)


# (kind, writer(path, **kw), reader(path))
KINDS = {
    "checkpoint": (lambda p, seed=0, **kw: write_checkpoint(p, CFG, init_params(CFG, seed), **kw),
                   read_checkpoint),
    "debug_state": (lambda p, seed=0, **kw: write_debug_state(p, CFG, **_debug_payload(seed), **kw),
                    lambda p: read_debug_state(p, CFG)),
    "tokens": (lambda p, seed=0, **kw: write_tokens(p, make_tokens(CFG, 1000, seed), **kw),
               read_tokens),
}


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_byte_identical(kind, tmp_path):
    write, read = KINDS[kind]
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    write(a)
    got = read(a)
    if kind == "checkpoint":
        write_checkpoint(b, *got)
    elif kind == "debug_state":
        write_debug_state(b, CFG, got.inputs, got.targets, got.logits, got.loss, got.grads)
    else:
        write_tokens(b, got)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(kind, tmp_path):
    write, _ = KINDS[kind]
    write(tmp_path / "1.bin", seed=3)
    write(tmp_path / "2.bin", seed=3)
    write(tmp_path / "3.bin", seed=4)
    assert (tmp_path / "1.bin").read_bytes() == (tmp_path / "2.bin").read_bytes()
    assert (tmp_path / "1.bin").read_bytes() != (tmp_path / "3.bin").read_bytes()


def test_checkpoint_contents(tmp_path):
    p = init_params(CFG, 1)
    write_checkpoint(tmp_path / "c.bin", CFG, p)
    raw = (tmp_path / "c.bin").read_bytes()
    head = np.frombuffer(raw[:HEADER_BYTES], "<i4")
    assert list(head[:8]) == [20240326, 3, CFG.maxT, CFG.V, CFG.L, CFG.NH, CFG.C, CFG.Vp]
    assert not head[8:].any()
    assert len(raw) == HEADER_BYTES + 4 * CFG.num_parameters()
    cfg, q = read_checkpoint(tmp_path / "c.bin")
    assert cfg == CFG and q.dtype == np.float32 and np.array_equal(p, q)
    m = GPT2(cfg, q)        # loads into the model as is
    assert np.array_equal(m.params_memory, p)


def test_debug_state_contents(tmp_path):
    d = _debug_payload(2)
    write_debug_state(tmp_path / "d.bin", CFG, **d)
    s = read_debug_state(tmp_path / "d.bin", CFG)
    assert (s.B, s.T) == (B, T)
    assert s.logits.shape == (B, T, CFG.V)          # stored unpadded
    assert np.array_equal(s.logits, d["logits"][..., :CFG.V])
    assert s.loss == d["loss"] and s.loss.dtype == np.float32
    assert np.array_equal(s.inputs, d["inputs"]) and np.array_equal(s.targets, d["targets"])
    g = s.grads_by_name()
    assert list(g) == list(PARAM_NAMES) and g["wte"].shape == (CFG.Vp, CFG.C)
    assert not g["wte"][CFG.V:].any()
    raw = (tmp_path / "d.bin").read_bytes()
    assert list(np.frombuffer(raw[:16], "<i4")) == [20240327, 2, B, T]


def test_tokens_contents(tmp_path):
    tok = make_tokens(CFG, 100, 1)
    write_tokens(tmp_path / "t.bin", tok)
    raw = (tmp_path / "t.bin").read_bytes()
    assert list(np.frombuffer(raw[:12], "<i4")) == [20240520, 1, 100]
    assert len(raw) == HEADER_BYTES + 200
    got = read_tokens(tmp_path / "t.bin")
    assert got.dtype == np.uint16 and np.array_equal(got, tok)
    with pytest.raises(ValueError, match="uint16"):
        write_tokens(tmp_path / "u.bin", np.array([70000]))


# ----------------------------------------------------------------------------- safe writes

@pytest.mark.parametrize("kind", KINDS)
def test_writers_never_clobber(kind, tmp_path):
    write, read = KINDS[kind]
    path = tmp_path / "f.bin"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write(path)
    assert path.read_bytes() == b"precious"
    write(path, overwrite=True)
    read(path)
    assert sorted(os.listdir(tmp_path)) == ["f.bin"], "temporary files left behind"


# ----------------------------------------------------------------------------- bad files

def _patch_header(i, value):
    def f(raw):
        h = np.frombuffer(raw[:HEADER_BYTES], "<i4").copy()
        h[i] = value
        return h.tobytes() + raw[HEADER_BYTES:]
    return f


# (kind, what is done to a good file, expected words in the message)
BAD = [
    (kind, name, mutate, words)
    for kind in KINDS
    for name, mutate, words in [
        ("empty", lambda raw: b"", "truncated header"),
        ("short_header", lambda raw: raw[:100], "truncated header"),
        ("wrong_magic", _patch_header(0, 12345), "wrong magic number: found 12345, expected"),
        ("wrong_version", _patch_header(1, 99), "unsupported"),
        ("truncated_data", lambda raw: raw[:-2], "header implies"),
        ("extra_data", lambda raw: raw + b"\0\0\0\0", "header implies"),
    ]
] + [
    ("checkpoint", "bf16_version5", _patch_header(1, 5), "bf16"),
    ("checkpoint", "negative_channels", _patch_header(6, -48), "channels"),
    ("checkpoint", "heads_not_dividing", _patch_header(5, 5), "divisible"),
    ("checkpoint", "vp_below_v", _patch_header(7, 100), "padded_vocab_size"),
    ("checkpoint", "absurd_sizes", _patch_header(3, 2**31 - 1), "invalid config"),
    ("checkpoint", "huge_but_valid", _patch_header(6, 2**20), "header implies"),
    ("checkpoint", "overflowing", _patch_header(6, 2**30), "more parameters than fit"),
    ("debug_state", "zero_batch", _patch_header(2, 0), "B=0"),
    ("debug_state", "t_above_max", _patch_header(3, CFG.maxT + 1), "max_seq_len"),
    ("debug_state", "bad_token_id", lambda raw: raw[:HEADER_BYTES] + np.int32(CFG.V).tobytes()
     + raw[HEADER_BYTES + 4:], "token id"),
    ("tokens", "negative_count", _patch_header(2, -1), "negative"),
    ("tokens", "count_too_big", _patch_header(2, 10**9), "header implies"),
]


@pytest.mark.parametrize("kind, name, mutate, words", BAD, ids=[f"{k}-{n}" for k, n, *_ in BAD])
def test_bad_files_raise_format_error(kind, name, mutate, words, tmp_path):
    write, read = KINDS[kind]
    good = tmp_path / "good.bin"
    write(good)
    bad = tmp_path / f"bad-{name}.bin"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(FormatError) as e:
        read(bad)
    msg = str(e.value)
    assert str(bad) in msg, f"message does not name the file: {msg}"
    assert words in msg, f"message does not say {words!r}: {msg}"
    assert isinstance(e.value, ValueError)


def test_missing_file_is_a_plain_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.bin")


# ----------------------------------------------------------------------------- synth

def test_init_params():
    p = init_params(CFG, 0)
    assert p.dtype == np.float32 and p.size == CFG.num_parameters()
    assert np.array_equal(p, init_params(CFG, 0)) and not np.array_equal(p, init_params(CFG, 1))
    m = GPT2(CFG, p)
    P = m.params
    assert not P["wte"][CFG.V:].any() and P["wte"][:CFG.V].all()
    assert 0.015 < P["qkvw"].std() < 0.025 and 0.007 < P["wpe"].std() < 0.013
    assert P["fcprojw"].std() < 0.6 * P["fcw"].std()                 # 0.02/sqrt(2L)
    assert P["qkvb"].any() and not np.allclose(P["ln1w"], 1)         # "test" style
    g = GPT2(CFG, init_params(CFG, 0, style="gpt2")).params
    assert np.all(g["ln1w"] == 1) and np.all(g["lnfw"] == 1) and not g["fcb"].any()
    with pytest.raises(ValueError, match="style"):
        init_params(CFG, 0, style="xavier")


def test_make_batch():
    x, y = make_batch(CFG, B, T, seed=5)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (B, T)
    for ids in (x, y):
        assert 0 in ids and CFG.V - 1 in ids and ids.min() >= 0 and ids.max() < CFG.V
    assert len(np.unique(x)) < x.size, "a repeated id exercises encoder_backward's scatter"
    assert np.array_equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])     # targets = next tokens
    x2, y2 = make_batch(CFG, B, T, seed=5)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    with pytest.raises(ValueError, match="max_seq_len"):
        make_batch(CFG, 1, CFG.maxT + 1)


def test_batches_from_tokens_is_llmc_dataloader():
    tok = np.arange(25, dtype=np.uint16)
    it = batches_from_tokens(tok, 2, 3)          # B*T = 6, a batch reads 7 tokens
    got = [next(it) for _ in range(5)]
    starts = [0, 6, 12, 18, 0]                   # 18 + 7 = 25 fits; 24 + 7 > 25 wraps
    for (x, y), s in zip(got, starts):
        assert x.dtype == np.int32
        assert np.array_equal(x.reshape(-1), np.arange(s, s + 6))
        assert np.array_equal(y.reshape(-1), np.arange(s + 1, s + 7))
    with pytest.raises(ValueError, match="at least"):
        batches_from_tokens(tok[:6], 2, 3)
