"""Hostile files: corrupt or truncated checkpoints (read in process, and through
CModel.from_checkpoint in a subprocess, since the C's reader would exit or read past the
end), libraries that are missing, not shared objects or lacking symbols, and user files
that the writers must never write over (a file, a symlink, a directory).

Each test asserts a clear exception (its type, and a message naming what is wrong) AND
that the process lives on; tests/binding/hostile_common.py holds what the hostile tests
share.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hostile_common import TINY, assert_survived, lib, params, run_isolated  # noqa: F401 (fixtures)

from harness import CModel, Library, LibraryError, load_library
from pyref import formats
from pyref.formats import FormatError
from pyref.synth import make_batch


# ----------------------------------------------------------------------------- checkpoints

HEADER_INTS = formats.HEADER_INTS


def _header_of(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<i4", count=HEADER_INTS)


def _set_header(path: Path, **fields) -> None:
    idx = dict(magic=0, version=1, maxT=2, V=3, L=4, NH=5, C=6, Vp=7)
    raw = bytearray(path.read_bytes())
    h = np.frombuffer(raw, dtype="<i4", count=HEADER_INTS).copy()
    for k, v in fields.items():
        h[idx[k]] = v
    raw[:4 * HEADER_INTS] = h.tobytes()
    path.write_bytes(bytes(raw))


def _truncate(path: Path, nbytes: int) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:nbytes])


# name -> (corrupt(path), the exception the reader raises, regex its message must match)
CORRUPTIONS = {
    "wrong_magic": (lambda p: _set_header(p, magic=20240327), FormatError, r"magic"),
    "wrong_version": (lambda p: _set_header(p, version=1), FormatError, r"version 1"),
    "bf16_version_5": (lambda p: _set_header(p, version=5), FormatError, r"version 5|bf16"),
    "empty_file": (lambda p: _truncate(p, 0), FormatError, r"truncated header"),
    "truncated_header": (lambda p: _truncate(p, 100), FormatError, r"truncated header"),
    "truncated_parameters": (lambda p: _truncate(p, p.stat().st_size - 4), FormatError,
                             r"bytes"),
    "header_only": (lambda p: _truncate(p, 4 * HEADER_INTS), FormatError, r"bytes"),
    "trailing_garbage": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8), FormatError,
                         r"bytes"),
    # sizes that overflow: C*C*12*L beyond size_t arithmetic, or a file far too short
    "huge_C": (lambda p: _set_header(p, C=2**30, NH=1), FormatError,
               r"parameters|size_t|bytes"),
    "huge_L": (lambda p: _set_header(p, L=2**31 - 1), FormatError, r"parameters|size_t|bytes"),
    "huge_V": (lambda p: _set_header(p, V=2**31 - 1, Vp=2**31 - 1), FormatError,
               r"parameters|size_t|bytes"),
    "negative_C": (lambda p: _set_header(p, C=-48), FormatError, r"channels"),
    "negative_L": (lambda p: _set_header(p, L=-2), FormatError, r"num_layers"),
    "zero_NH": (lambda p: _set_header(p, NH=0), FormatError, r"num_heads"),
    "negative_maxT": (lambda p: _set_header(p, maxT=-1), FormatError, r"max_seq_len"),
    "C_not_divisible_by_NH": (lambda p: _set_header(p, NH=5), FormatError, r"divisible"),
    "V_above_Vp": (lambda p: _set_header(p, V=200), FormatError, r"padded_vocab_size"),
}


@pytest.fixture
def checkpoint(tmp_path, params) -> Path:
    path = tmp_path / "model.bin"
    formats.write_checkpoint(path, TINY, params)
    return path


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_read_checkpoint_refuses(case, checkpoint):
    corrupt, exc, pattern = CORRUPTIONS[case]
    corrupt(checkpoint)
    with pytest.raises(exc, match=pattern) as info:
        formats.read_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)       # the message names the file


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_read_checkpoint_header_refuses(case, checkpoint):
    """The header-only validator CModel.from_checkpoint relies on (it must see a short
    file from its size, without reading the parameters)."""
    from pyref.formats import read_checkpoint_header   # see the module docstring of cmodel

    corrupt, exc, pattern = CORRUPTIONS[case]
    corrupt(checkpoint)
    with pytest.raises(exc, match=pattern):
        read_checkpoint_header(checkpoint)


def test_read_checkpoint_header_returns_the_config(checkpoint):
    from pyref.formats import read_checkpoint_header

    assert read_checkpoint_header(checkpoint) == TINY


_FROM_CHECKPOINT = """
    import sys
    from harness import CModel
    try:
        m = CModel.from_checkpoint(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    except BaseException as e:
        print("RAISED", type(e).__name__, "valueerror=%s" % isinstance(e, ValueError), e)
    else:
        print("LOADED", m.num_parameters)
    print("ALIVE")
"""


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_cmodel_from_checkpoint_refuses_and_survives(case, checkpoint, lib):
    """gpt2_build_from_checkpoint exit(1)s on a bad magic or version and freads past the
    end of a short file: CModel.from_checkpoint must refuse first. In a subprocess: a
    missing check would kill the interpreter."""
    corrupt, exc, pattern = CORRUPTIONS[case]
    corrupt(checkpoint)
    out = assert_survived(run_isolated(_FROM_CHECKPOINT.format(path=str(checkpoint)), lib))
    assert f"RAISED {exc.__name__} valueerror=True" in out, out
    assert re.search(pattern, out), out


def test_cmodel_from_checkpoint_missing_file_and_directory(tmp_path, lib):
    # fopenCheck would exit(1) on both
    code = _FROM_CHECKPOINT.format(path=str(tmp_path / "absent.bin"))
    out = assert_survived(run_isolated(code, lib))
    assert "RAISED FileNotFoundError" in out, out
    out = assert_survived(run_isolated(_FROM_CHECKPOINT.format(path=str(tmp_path)), lib))
    assert re.search(r"RAISED (FormatError|IsADirectoryError).*directory", out), out


def test_cmodel_from_valid_checkpoint_loads_it(checkpoint, lib, params):
    with CModel.from_checkpoint(checkpoint, lib=lib) as m:
        assert m.config == TINY
        assert np.array_equal(m.params_memory, params)


# ----------------------------------------------------------------------------- the library

def test_library_path_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "libtrain_gpt2.so"
    with pytest.raises(LibraryError, match=r"does not exist.*make lib"):
        load_library(missing)
    with pytest.raises(LibraryError, match="does not exist"):
        Library(missing)


def test_library_not_a_shared_object(tmp_path):
    fake = tmp_path / "libfake.so"
    fake.write_text("this is not an ELF file\n")
    with pytest.raises(LibraryError, match=r"cannot load .*libfake\.so"):
        load_library(fake)
    assert fake.read_text() == "this is not an ELF file\n"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the stub library")
def test_library_lacking_symbols(tmp_path):
    src = tmp_path / "stub.c"
    src.write_text("void gelu_forward(float* out, float* inp, int N) { (void)out; (void)inp; (void)N; }\n")
    so = tmp_path / "libstub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(so)], check=True,
                   capture_output=True)
    with pytest.raises(LibraryError, match=r"does not export .*gpt2_forward.*-DTESTING"):
        load_library(so)
    with pytest.raises(LibraryError) as info:
        Library(so)
    missing = str(info.value).split("does not export")[1]
    assert "gpt2_backward" in missing
    assert not re.search(r"\bgelu_forward\b", missing)         # the one it has


# ----------------------------------------------------------------------------- user files

def _writers(tmp_path, params):
    x, y = make_batch(TINY, 1, 4)
    logits = np.zeros((1, 4, TINY.vocab_size), np.float32)
    return {
        "checkpoint": lambda p, **kw: formats.write_checkpoint(p, TINY, params, **kw),
        "tokens": lambda p, **kw: formats.write_tokens(p, np.arange(100), **kw),
        "debug_state": lambda p, **kw: formats.write_debug_state(p, TINY, x, y, logits, 1.5,
                                                                 np.zeros_like(params), **kw),
    }


@pytest.mark.parametrize("kind", ["checkpoint", "tokens", "debug_state"])
def test_writers_never_clobber(tmp_path, params, kind):
    write = _writers(tmp_path, params)[kind]
    target = tmp_path / "precious.bin"
    original = os.urandom(4096)
    target.write_bytes(original)
    with pytest.raises(FileExistsError, match=r"precious\.bin exists; pass overwrite=True"):
        write(target)
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.bin"]   # no temp left

    # a symlink to a user file: refused, and with overwrite=True the link is replaced, the
    # file it pointed at is never written through
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write(link)
    write(link, overwrite=True)
    assert not link.is_symlink() and target.read_bytes() == original

    # a dangling symlink is a name in use too
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "not-there")
    with pytest.raises(FileExistsError):
        write(dangling)
    assert dangling.is_symlink() and not (tmp_path / "not-there").exists()

    # overwrite=True replaces the file itself
    write(target, overwrite=True)
    assert target.read_bytes() != original


@pytest.mark.parametrize("kind", ["checkpoint", "tokens", "debug_state"])
def test_writers_never_replace_a_directory(tmp_path, params, kind):
    write = _writers(tmp_path, params)[kind]
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("keep")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(OSError):
            write(d, **kw)
    assert (d / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_read_back(tmp_path, params):
    path = tmp_path / "ckpt.bin"
    formats.write_checkpoint(path, TINY, params)
    cfg, p = formats.read_checkpoint(path)
    assert cfg == TINY and np.array_equal(p, params)
