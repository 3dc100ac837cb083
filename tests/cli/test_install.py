"""An installed llmc-parity works outside its checkout: it carries its C, builds into a
cache keyed by what decides the build, keeps baselines in the user's project, and (slow) a
wheel installed into a fresh virtual environment runs every command from another folder."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.clib import build
from harness.gate import BASELINE_NAME, default_baseline

ROOT = Path(__file__).resolve().parents[2]


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


def test_every_package_of_the_checkout_is_listed_for_the_wheel():
    """pyproject.toml lists its packages by name: a subpackage added to the checkout and
    not to the list is missing from an installed wheel (imports fail only there)."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for root in ("harness", "pyref", "llmc")
             for p in (ROOT / root).rglob("__init__.py")}
    assert found == listed, (found - listed, listed - found)


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


@pytest.mark.filterwarnings("ignore:.*project.license.*")   # the TOML-table form still works with setuptools 61
def test_sdist_carries_the_c_and_the_shipped_suite(tmp_path):
    """The source distribution (what ``python -m build`` makes first) holds what an
    installed llmc-parity needs at run time."""
    import tarfile
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        from setuptools import build_meta
        name = build_meta.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / name) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for wanted in ("llmc/train_gpt2.c", "llmc/abi_probe.c", "harness/suite/test_port.py",
                   "harness/suite/test_model.py", "harness/clib/fpenv.py", "pyproject.toml"):
        assert wanted in names, wanted


# ----------------------------------------------------------------------------- a real install

_PORT = """
import numpy as np
# a NumPy port of two kernels, one of them with a planted bug (gelu's 0.044715 -> 0.0447)
def gelu_forward(inp):
    s = np.sqrt(2.0 / np.pi).astype(inp.dtype)
    return 0.5 * inp * (1.0 + np.tanh(s * (inp + inp.dtype.type(0.0447) * inp ** 3)))
def residual_forward(inp1, inp2):
    return inp1 + inp2
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_from_another_folder(tmp_path):
    """Build the wheel, install it into a new virtual environment (numpy and cffi from the
    registry or pip's cache; no torch), and from a project folder outside the checkout run
    the commands a user runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMC_LIB", "PYTHONPATH", "LLMC_GATE_BASELINE")}
    env["LLMC_BUILD_DIR"] = str(tmp_path / "cache")

    def run(*cmd, cwd=tmp_path, ok=(0,)):
        p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode in ok, f"{cmd} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT,
        cwd=ROOT)
    (wheel,) = wheels.glob("llmc_parity-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py, cli = venv / "bin" / "python", venv / "bin" / "llmc-parity"
    run(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, "pytest")
    proj = tmp_path / "myport"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("[project]\nname = 'myport'\nversion = '0'\n")

    out = run(cli, "run", "--steps", "2", "--summary-only", cwd=proj).stdout
    assert "llmc-parity: PASS" in out and str(venv) in out     # the C source from the wheel
    mine = proj / "train_gpt2.c"
    shutil.copy(ROOT / "llmc" / "train_gpt2.c", mine)
    out = run(cli, "run", "--src", mine, "--steps", "1", "--summary-only", cwd=proj).stdout
    assert "llmc-parity: PASS" in out and str(mine) in out
    run(cli, "gate", "--update", cwd=proj)
    assert (proj / BASELINE_NAME).is_file()
    out = run(cli, "gate", cwd=proj).stdout
    assert "GATE PASS" in out and "identical to the baseline" in out
    assert not any(p.suffix == ".so" for p in venv.rglob("*.so") if "llmc" in p.name)   # nothing built into it

    (proj / "port.py").write_text(textwrap.dedent(_PORT))
    p = run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llmc-impl", "port.py", cwd=proj, ok=(1,))
    last = p.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ failed, \d+ passed", last), p.stdout[-3000:]
    assert "FAILED" in p.stdout and "gelu_forward" in p.stdout and "Diagnosis" in p.stdout
    assert "residual_forward.out [port]" in p.stdout                    # collected, and passing
    p = run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--llmc-impl", "port.py", "-k", "residual",
            cwd=proj)
    last = p.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed", last) and "failed" not in last, p.stdout[-3000:]
