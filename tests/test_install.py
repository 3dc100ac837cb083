"""An installed llmc-parity works outside its checkout: it carries its C, builds into a
cache keyed by what decides the build, and keeps baselines in the user's project."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import build
from harness.gate import BASELINE_NAME, default_baseline


def test_cache_key_follows_source_flags_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_BUILD_DIR", str(tmp_path / "cache"))
    a = build.cached_library(cflags="-O3")
    assert a.parent == tmp_path / "cache" and a.name.startswith("libtrain_gpt2-")
    assert build.cached_library(cflags="-O3") == a                    # stable
    assert build.cached_library(cflags="-O2") != a                    # flags
    assert build.cached_library(cflags="-O3", openmp=False) != a      # OpenMP
    src = tmp_path / "train_gpt2.c"
    src.write_text(build.DEFAULT_SRC.read_text())
    same_text = build.cached_library(src, cflags="-O3")
    src.write_text(build.DEFAULT_SRC.read_text() + "\n// an edit\n")
    assert build.cached_library(src, cflags="-O3") != same_text       # contents, not path


def test_ensure_library_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_BUILD_DIR", str(tmp_path / "cache"))
    info = build.ensure_library(cflags="-O1")
    lib = Path(info.library)
    assert lib.is_file() and lib.parent == tmp_path / "cache"
    stamp = lib.stat().st_mtime_ns
    assert build.ensure_library(cflags="-O1").library == info.library
    assert lib.stat().st_mtime_ns == stamp                            # not rebuilt


def test_sources_ship_inside_the_package():
    import llmc
    assert (llmc.SOURCE_DIR / "train_gpt2.c").is_file() and (llmc.SOURCE_DIR / "abi_probe.c").is_file()
    assert build.DEFAULT_SRC == llmc.SOURCE_DIR / "train_gpt2.c"


def test_default_baseline_lives_in_the_users_project(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMC_GATE_BASELINE", raising=False)
    proj = tmp_path / "myport"
    (proj / "src" / "deep").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("[project]\nname='x'\n")
    assert default_baseline(proj / "src" / "deep") == proj / BASELINE_NAME
    bare = tmp_path / "bare"
    bare.mkdir()
    assert default_baseline(bare) == bare / BASELINE_NAME
    monkeypatch.setenv("LLMC_GATE_BASELINE", str(tmp_path / "x.json"))
    assert default_baseline(proj) == tmp_path / "x.json"
