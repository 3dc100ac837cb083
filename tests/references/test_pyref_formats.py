"""llm.c file formats and the synthetic generators: round trips, determinism, bad files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pyref import formats
from pyref.config import PARAM_NAMES, preset
from pyref.formats import (HEADER_BYTES, Checkpoint, FormatError, bf16_to_float32,
                           checkpoint_dtype, checkpoint_note, float32_to_bf16, read_checkpoint,
                           read_checkpoint_header, read_debug_state, read_tokens,
                           write_checkpoint, write_debug_state, write_tokens)
from pyref.model import GPT2
from pyref.synth import batches_from_tokens, init_params, make_batch, make_tokens

CFG = preset("tiny")
N = CFG.num_parameters()
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
    "checkpoint_bf16": (lambda p, seed=0, **kw: write_checkpoint(p, CFG, init_params(CFG, seed),
                                                                 dtype="bf16", **kw),
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
    elif kind == "checkpoint_bf16":     # the widened values are bf16 values: rounding keeps them
        write_checkpoint(b, *got, dtype="bf16")
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
    ("checkpoint", "v3_body_under_version5", _patch_header(1, 5),
     f"header implies {HEADER_BYTES + 2 * N} (version 5: bf16 parameters, 2 bytes each)"),
    ("checkpoint", "unknown_version4", _patch_header(1, 4), "unsupported checkpoint version 4"),
    ("checkpoint_bf16", "v5_body_under_version3", _patch_header(1, 3),
     f"holds {HEADER_BYTES + 2 * N} bytes, header implies {HEADER_BYTES + 4 * N}"),
    ("checkpoint_bf16", "odd_byte_cut", lambda raw: raw[:-1], "bf16 parameters, 2 bytes each"),
    ("checkpoint_bf16", "negative_layers", _patch_header(4, -1), "num_layers"),
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


# ----------------------------------------------------------------------------- bf16 (version 5)

def _torch_bf16(x):
    """What llm.c's train_gpt2.py writes a version 5 with: torch's ``.to(torch.bfloat16)``."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(torch.bfloat16)


def _torch_bits(x) -> np.ndarray:
    import torch
    return _torch_bf16(x).view(torch.int16).numpy().view(np.uint16)


def _assert_reads_as_torch_rounds(path, p):
    """The file holds torch's bf16 bits of ``p`` after the header, and reads back as
    torch's bf16 values widened to float32."""
    body = np.frombuffer(path.read_bytes()[HEADER_BYTES:], "<u2")
    assert np.array_equal(body, _torch_bits(p)), "stored bits are not torch's rounding"
    cfg, q = read_checkpoint(path)
    assert cfg == CFG and q.dtype == np.float32
    assert np.array_equal(q, _torch_bf16(p).float().numpy()), "read values are not torch's bf16"


def test_bf16_checkpoint_contents(tmp_path):
    p = _with_ties(1)
    path = tmp_path / "c_bf16.bin"
    write_checkpoint(path, CFG, p, dtype="bf16")
    raw = path.read_bytes()
    head = np.frombuffer(raw[:HEADER_BYTES], "<i4")
    assert list(head[:8]) == [20240326, 5, CFG.maxT, CFG.V, CFG.L, CFG.NH, CFG.C, CFG.Vp]
    assert not head[8:].any() and len(raw) == HEADER_BYTES + 2 * N
    _assert_reads_as_torch_rounds(path, p)
    ck = Checkpoint.read(path)
    assert (ck.dtype, ck.version, ck.stored.dtype) == ("bf16", 5, np.uint16)
    assert np.array_equal(ck.stored, np.frombuffer(raw[HEADER_BYTES:], "<u2"))
    assert not GPT2(ck.config, ck.params).params["wte"][CFG.V:].any()   # padding rows stay 0
    stored = ck.stored_torch()
    assert str(stored.dtype) == "torch.bfloat16" and np.array_equal(stored.float().numpy(), ck.params)


def test_float32_checkpoint_is_stored_as_itself(tmp_path):
    p = init_params(CFG, 1)
    write_checkpoint(tmp_path / "c.bin", CFG, p)
    ck = Checkpoint.read(tmp_path / "c.bin")
    assert (ck.dtype, ck.version) == ("float32", 3) and ck.stored is ck.params
    assert np.array_equal(ck.params, p)
    assert checkpoint_dtype(tmp_path / "c.bin") == "float32" and checkpoint_note(tmp_path / "c.bin") == ""


# float32 bits -> bf16 bits, round to nearest, ties to even (independent of torch)
NEAREST_EVEN = {
    0x3F800000: 0x3F80,   # 1.0
    0x3F807FFF: 0x3F80,   # below half an ulp: down
    0x3F808000: 0x3F80,   # a tie, kept bit even: down
    0x3F818000: 0x3F82,   # a tie, kept bit odd: up to even
    0x3F80C000: 0x3F81,   # above half: up (truncation keeps 0x3F80)
    0xBF80C000: 0xBF81,   # the same, negative
    0x3FFFFFFF: 0x4000,   # the carry runs into the exponent
    0x7F7FFFFF: 0x7F80,   # past bf16's largest: Inf
    0x7F800000: 0x7F80, 0xFF800000: 0xFF80, 0x80000000: 0x8000,   # Inf, -Inf, -0
    0x00018000: 0x0002,   # a subnormal tie, odd: up
    0x7F800001: 0x7FC0,   # a signalling NaN: a quiet NaN (truncation would make it Inf)
    0xFFC00001: 0xFFC0,   # a negative NaN keeps its sign
}


def _with_ties(seed):
    """init_params with NEAREST_EVEN's non-NaN cases planted at the front of wte: random
    parameters almost never hold a tie, where nearest-even and half-up differ."""
    p = init_params(CFG, seed)
    cases = np.array([u for u in NEAREST_EVEN if (u & 0x7FFFFFFF) <= 0x7F800000], np.uint32)
    p[:cases.size] = cases.view(np.float32)
    return p


def _assert_rounds_nearest_even(to_bf16):
    f32 = np.array(list(NEAREST_EVEN), np.uint32).view(np.float32)
    got = to_bf16(f32)
    want = np.array(list(NEAREST_EVEN.values()), np.uint16)
    assert np.array_equal(got, want), [f"{a:#010x}->{g:#06x} not {w:#06x}"
                                       for a, g, w in zip(NEAREST_EVEN, got, want) if g != w]


def _truncating(x):
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _half_up(x):   # ties away from zero
    return ((np.asarray(x, np.float32).view(np.uint32) + 0x8000) >> 16).astype(np.uint16)


def test_rounding_is_nearest_even():
    _assert_rounds_nearest_even(float32_to_bf16)
    for wrong in (_truncating, _half_up):
        with pytest.raises(AssertionError):
            _assert_rounds_nearest_even(wrong)


def test_rounding_matches_torch_on_every_kind_of_float32():
    u = np.random.default_rng(0).integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    u[:len(NEAREST_EVEN)] = list(NEAREST_EVEN)
    x = u.view(np.float32)
    ours, theirs, nan = float32_to_bf16(x), _torch_bits(x), np.isnan(x)
    assert nan.any() and np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_to_float32(ours[nan])).all()     # torch's NaN pattern is its own


def test_widening_is_exact_for_every_bf16():
    torch = pytest.importorskip("torch")
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    wide = bf16_to_float32(bits)
    assert wide.dtype == np.float32 and np.array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)
    nan = np.isnan(wide)
    assert np.array_equal(float32_to_bf16(wide)[~nan], bits[~nan])   # a bf16 value rounds to itself
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(wide.view(np.uint32)[~nan], theirs.view(np.uint32)[~nan])
    assert np.isnan(theirs[nan]).all()


def test_bf16_from_a_float32_checkpoint_reads_as_its_rounded_parameters(tmp_path):
    p = init_params(CFG, 2)
    write_checkpoint(tmp_path / "f32.bin", CFG, p)
    cfg, p32 = read_checkpoint(tmp_path / "f32.bin")
    write_checkpoint(tmp_path / "bf16.bin", cfg, p32, dtype="bf16")
    _, q = read_checkpoint(tmp_path / "bf16.bin")
    assert not np.array_equal(q, p) and not (q.view(np.uint32) & 0xFFFF).any()
    assert np.all(np.abs(q - p) <= np.abs(p) * 2.0**-8)      # within half a bf16 ulp
    _assert_reads_as_torch_rounds(tmp_path / "bf16.bin", p)


def _swapped(bits):    # the two bytes of each bf16 the wrong way round
    return (bits.byteswap().astype(np.uint32) << 16).view(np.float32)


def _low_half(bits):   # the bf16 put in the low half of the float32
    return bits.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("where, wrong", [("bf16_to_float32", _swapped), ("bf16_to_float32", _low_half),
                                          ("float32_to_bf16", _truncating), ("float32_to_bf16", _half_up)])
def test_a_wrong_reader_or_writer_fails_the_checks(where, wrong, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, where, wrong)
    write_checkpoint(tmp_path / "c.bin", CFG, _with_ties(1), dtype="bf16")
    with pytest.raises(AssertionError):
        _assert_reads_as_torch_rounds(tmp_path / "c.bin", _with_ties(1))


def test_the_c_check_refuses_bf16_and_the_reader_reads_it(tmp_path):
    path = tmp_path / "c_bf16.bin"
    write_checkpoint(path, CFG, init_params(CFG, 0), dtype="bf16")
    with pytest.raises(FormatError, match="reads version 3 .float32. only") as e:
        read_checkpoint_header(path)
    assert str(path) in str(e.value)
    assert read_checkpoint(path)[0] == CFG and checkpoint_dtype(path) == "bf16"
    assert "bf16" in checkpoint_note(path) and "widened exactly to float32" in checkpoint_note(path)
    with pytest.raises(ValueError, match="float32, bf16"):
        write_checkpoint(tmp_path / "x.bin", CFG, init_params(CFG, 0), dtype="float16")


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
