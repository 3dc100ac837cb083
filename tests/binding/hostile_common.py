"""What the hostile-input tests (tests/binding/test_hostile_*.py) share: the tiny preset's
library, parameters and batch (module-scoped fixtures, imported by each test module), a
model per test, a user kernel module built from functions, and the subprocess guard that
runs a snippet in a fresh interpreter so that a missing check shows as a failed test with
the C's last words instead of a dead test session.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import CModel, Library, load_library  # noqa: E402
from pyref.config import PRESETS  # noqa: E402
from pyref.protocol import KernelSet  # noqa: E402
from pyref.synth import init_params, make_batch  # noqa: E402

TINY = PRESETS["tiny"]
B, T = 2, 8


@pytest.fixture(scope="module")
def lib() -> Library:
    return load_library()


@pytest.fixture(scope="module")
def params() -> np.ndarray:
    return init_params(TINY, seed=3)


@pytest.fixture(scope="module")
def batch():
    return make_batch(TINY, B, T, seed=3)


@pytest.fixture
def model(lib, params):
    m = CModel.from_params(TINY, params, lib=lib)
    yield m
    m.close()


# ----------------------------------------------------------------------------- subprocess guard

def run_isolated(code: str, lib: Library, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter bound to the same library (and, under
    ``make sanitize``, the same LD_PRELOAD'ed ASan runtime, inherited through the env)."""
    env = dict(os.environ, LLMC_LIB=lib.path,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    prelude = "import sys\nsys.path.insert(0, %r)\n" % str(ROOT)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_survived(proc: subprocess.CompletedProcess, *expect: str) -> str:
    """The child exited normally (no exit(1) from the C, no abort, no signal) and its
    stdout holds each of ``expect`` (regexes)."""
    tail = f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"the process died (return code {proc.returncode}){tail}"
    assert "ALIVE" in proc.stdout, f"the snippet did not run to its end{tail}"
    for pattern in expect:
        assert re.search(pattern, proc.stdout), f"{pattern!r} not in the output{tail}"
    return proc.stdout



def _user(**funcs):
    """A user's kernel module (named userport) holding ``funcs``."""
    return KernelSet.from_module(SimpleNamespace(**funcs), name="userport")
