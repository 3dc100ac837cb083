"""The binding: symbols, struct layout, checkpoints, threads, and the C's exit paths."""
from __future__ import annotations

import subprocess
from math import prod
from pathlib import Path

import numpy as np
import pytest

from harness.clib.library import Library, LibraryError, LlmcInputError, ffi, load_library
from harness import build_library
from harness.clib.cdefs import GPT2_FIELDS, REQUIRED_SYMBOLS
from harness import CModel
from pyref import formats, synth
from pyref.config import PRESETS, act_shapes, layout, param_shapes

ROOT = Path(__file__).resolve().parents[2]
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def lib():
    return load_library()


@pytest.fixture(scope="module")
def params():
    return synth.init_params(TINY, seed=1)


def test_exports_every_spec_symbol(lib):
    for name in REQUIRED_SYMBOLS:
        assert getattr(lib.lib, name) is not None, name


def test_struct_layout_matches_the_compiler(lib):
    # llmc_abi_layout reports sizeof/offsetof as gcc laid the structs out
    assert lib.abi_checked
    out = ffi.new("size_t[32]")
    assert lib.lib.llmc_abi_layout(out) == 4 + len(GPT2_FIELDS) + 1
    assert out[3] == ffi.sizeof("GPT2")
    assert [out[4 + i] for i in range(len(GPT2_FIELDS))] == [ffi.offsetof("GPT2", f) for f in GPT2_FIELDS]


def test_named_pointers_sit_at_struct_order_offsets(lib, params):
    """Every params/grads/acts/grads_acts pointer equals memory + the preceding sizes."""
    with CModel.from_params(TINY, params, lib=lib) as m:
        x, y = synth.make_batch(TINY, 2, 8, seed=0)
        m.forward(x, y)
        m.backward()
        for group, shapes in (("params", param_shapes(TINY)), ("grads", param_shapes(TINY)),
                              ("acts", act_shapes(TINY, 2, 8)), ("grads_acts", act_shapes(TINY, 2, 8))):
            base = m.address(f"{group}_memory")
            for name, (offset, _) in layout(shapes).items():
                assert m.address(f"{group}.{name}") == base + 4 * offset, (group, name)
        # the offsets above are every size but the last; the total is num_activations
        assert m.acts_memory.size == sum(prod(v) for v in act_shapes(TINY, 2, 8).values())


def test_checkpoint_load_is_bit_identical_to_from_params(lib, params, tmp_path):
    path = tmp_path / "model.bin"
    formats.write_checkpoint(path, TINY, params)
    with CModel.from_checkpoint(path, lib=lib) as a, CModel.from_params(TINY, params, lib=lib) as b:
        assert a.config == TINY
        assert a.params_memory.tobytes() == b.params_memory.tobytes() == params.tobytes()
        assert any("num_parameters" in line for line in a.c_log)  # the C's print was captured


def _step(lib, params, threads):
    with CModel.from_params(PRESETS["small"], params, lib=lib) as m:
        x, y = synth.make_batch(PRESETS["small"], 2, 12, seed=3)  # B*T=24: the tiled matmul
        m.forward(x, y, threads=threads)
        m.zero_grad()
        m.backward(threads=threads)
        m.update(t=1, threads=threads)
        return (m.params_memory.copy(), m.grads_memory.copy(),
                {k: v.copy() for k, v in m.acts.items()})


def test_bit_identical_with_1_and_2_threads(lib):
    params = synth.init_params(PRESETS["small"], seed=2)
    p1, g1, a1 = _step(lib, params, 1)
    p2, g2, a2 = _step(lib, params, 2)
    assert p1.tobytes() == p2.tobytes() and g1.tobytes() == g2.tobytes()
    for k in a1:
        if k != "preatt":  # its upper triangle is never written
            assert a1[k].tobytes() == a2[k].tobytes(), k


def test_thread_control(lib):
    with lib.num_threads(1):
        assert lib.get_num_threads() == 1
    with pytest.raises(ValueError):
        lib.set_num_threads(0)


def _model(lib, params, **kw):
    return CModel.from_params(TINY, params, lib=lib)


# Each path on which the C would exit() or assert() raises in Python first.
def test_bad_magic_raises(lib, tmp_path, params):
    path = tmp_path / "bad.bin"
    formats.write_checkpoint(path, TINY, params)
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.int32(1234).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(formats.FormatError, match="magic"):
        CModel.from_checkpoint(path, lib=lib)


@pytest.mark.parametrize("version", [1, 2, 5])
def test_bad_version_raises(lib, tmp_path, params, version):
    path = tmp_path / "bad.bin"
    formats.write_checkpoint(path, TINY, params)
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.int32(version).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(formats.FormatError, match="version"):
        CModel.from_checkpoint(path, lib=lib)


def test_token_out_of_range_raises(lib, params):
    with _model(lib, params) as m:
        x, y = synth.make_batch(TINY, 2, 4)
        with pytest.raises(LlmcInputError, match="outside"):
            m.forward(x + TINY.vocab_size, y)
        with pytest.raises(LlmcInputError, match="outside"):
            m.forward(x, y - TINY.vocab_size)


def test_changing_B_or_T_after_first_forward_raises(lib, params):
    with _model(lib, params) as m:
        m.forward(*synth.make_batch(TINY, 2, 4))
        with pytest.raises(LlmcInputError, match="B=2 T=4"):
            m.forward(*synth.make_batch(TINY, 3, 4))
        with pytest.raises(LlmcInputError, match="B=2 T=4"):
            m.forward(*synth.make_batch(TINY, 2, 5))


def test_backward_before_forward_with_targets_raises(lib, params):
    with _model(lib, params) as m:
        with pytest.raises(LlmcInputError, match="targets"):
            m.backward()
        x, _ = synth.make_batch(TINY, 2, 4)
        m.forward(x)
        with pytest.raises(LlmcInputError, match="targets"):
            m.backward()


def test_T_beyond_max_seq_len_raises(lib, params):
    with _model(lib, params) as m:
        x = np.zeros((1, TINY.max_seq_len + 1), np.int32)
        with pytest.raises(LlmcInputError, match="max_seq_len"):
            m.forward(x, x)


def test_C_not_divisible_by_NH_raises(lib):
    with pytest.raises(ValueError, match="divisible"):
        CModel.from_params(TINY.replace(num_heads=5), np.zeros(1, np.float32), lib=lib)
    qkv = np.zeros((1, 2, 3 * 10), np.float32)
    with pytest.raises(LlmcInputError, match="divisible"):
        lib.attention_forward(np.zeros((1, 2, 10), np.float32), np.zeros((1, 3, 2, 2), np.float32),
                              np.zeros((1, 3, 2, 2), np.float32), qkv, 1, 2, 10, 3)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 4, 8), np.float64), "float32"),
    (np.zeros((2, 4, 9), np.float32), "elements"),
    (np.zeros((2, 4, 16), np.float32)[..., ::2], "contiguous"),
])
def test_kernel_argument_checks(lib, bad, match):
    ok = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(LlmcInputError, match=match):
        lib.residual_forward(ok, bad, ok, ok.size)


def test_read_only_output_raises(lib):
    out = np.zeros(8, np.float32)
    out.flags.writeable = False
    with pytest.raises(LlmcInputError, match="read-only"):
        lib.gelu_forward(out, np.zeros(8, np.float32), 8)


def test_views_outlive_close(lib, params):
    m = _model(lib, params)
    wte = m.params["wte"]
    m.close()
    assert wte.shape == (TINY.padded_vocab_size, TINY.channels)
    assert wte.sum() == pytest.approx(float(params[:wte.size].sum()), rel=1e-5)
    with pytest.raises(RuntimeError, match="closed"):
        m.forward(*synth.make_batch(TINY, 1, 2))


def test_missing_library_and_symbols(tmp_path):
    with pytest.raises(LibraryError, match="does not exist"):
        Library(tmp_path / "nope.so")
    src = tmp_path / "one.c"
    src.write_text("void gelu_forward(float* out, float* inp, int N) {}\n")
    so = tmp_path / "libone.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    with pytest.raises(LibraryError, match="does not export .*encoder_forward"):
        Library(so)


def test_llmc_src_builds_another_source_that_binds(tmp_path, params):
    """`make lib LLMC_SRC=...`: a train_gpt2.c elsewhere, with its own llmc/ include dir."""
    src_dir = tmp_path / "llm.c"
    (src_dir / "llmc").mkdir(parents=True)
    (src_dir / "llmc" / "utils.h").write_text("#define LLMC_TEST_UTILS 1\n")
    text = (ROOT / "llmc" / "train_gpt2.c").read_text()
    (src_dir / "train_gpt2.c").write_text('#include "llmc/utils.h"\n' + text)
    under_test = load_library()
    if under_test.build_info is None:
        pytest.skip("the library under test has no build record: its flags are unknown, "
                    "so no build can be expected to give its bits")
    # the same flags as the library under test: the same source text then gives the same
    # bits whatever those flags are (an extra #include changes no arithmetic)
    out = tmp_path / "libother.so"
    info = build_library(src_dir / "train_gpt2.c", out, cflags=under_test.build_info.cflags,
                         openmp=under_test.build_info.openmp, quiet=True)
    assert info.source == str(src_dir / "train_gpt2.c")
    other = Library(out)
    assert other.abi_checked
    x, y = synth.make_batch(TINY, 2, 8)
    with CModel.from_params(TINY, params, lib=other) as a, CModel.from_params(TINY, params, lib=under_test) as b:
        a.forward(x, y, threads=1)
        b.forward(x, y, threads=1)
        assert a.acts["logits"].tobytes() == b.acts["logits"].tobytes()


def test_standalone_trainer_runs(tmp_path, params):
    """`make train_gpt2`: main() trains on a token shard."""
    exe = tmp_path / "train_gpt2"
    subprocess.run(["gcc", "-O2", "-fopenmp", "-DOMP", str(ROOT / "llmc" / "train_gpt2.c"), "-lm", "-o", str(exe)],
                   check=True)
    formats.write_checkpoint(tmp_path / "m.bin", TINY, params)
    formats.write_tokens(tmp_path / "t.bin", synth.make_tokens(TINY, 400, seed=0))
    r = subprocess.run([str(exe), "-c", str(tmp_path / "m.bin"), "-i", str(tmp_path / "t.bin"),
                        "-b", "2", "-t", "8", "-n", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("train loss") == 3


def test_missing_openmp_is_said_clearly(tmp_path):
    """A compiler without OpenMP: a clear BuildError naming OpenMP and the way out."""
    from harness import BuildError
    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                    '{ echo "unsupported option -fopenmp" >&2; exit 1; }; done\nexec gcc "$@"\n')
    fake.chmod(0o755)
    with pytest.raises(BuildError, match="(?s)OpenMP is not available.*NO_OMP=1"):
        build_library(out=tmp_path / "lib.so", cc=str(fake), quiet=True)


def test_build_without_openmp(tmp_path, params):
    """`make lib NO_OMP=1`: one thread, same numbers (as a build with the same flags)."""
    under_test = load_library()
    if under_test.build_info is None:
        pytest.skip("the library under test has no build record: its flags are unknown")
    out = tmp_path / "lib_noomp.so"
    build_library(out=out, cflags=under_test.build_info.cflags, openmp=False, quiet=True)
    lib = Library(out)
    assert not lib.has_openmp and lib.get_num_threads() == 1
    with pytest.raises(LibraryError, match="without OpenMP"):
        lib.set_num_threads(2)
    x, y = synth.make_batch(TINY, 2, 8)
    with CModel.from_params(TINY, params, lib=lib) as a, CModel.from_params(TINY, params, lib=under_test) as b:
        a.forward(x, y)
        b.forward(x, y)
        assert a.acts["logits"].tobytes() == b.acts["logits"].tobytes()
