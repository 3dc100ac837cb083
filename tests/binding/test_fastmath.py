"""Beside a library built as llm.c builds it (-Ofast): Python keeps its own floating-point
mode, the C runs in the one its load sets, and a NaN never takes the process down.

An -Ofast library's load-time constructor (gcc's crtfastmath) switches on flush-to-zero
and denormals-are-zero; under finite-math assumptions, the C's `mean_loss == -1.0f` guard in
gpt2_backward may read a NaN loss as -1 and exit(). Each scenario runs in a fresh process,
so a regression shows as a failed test, not as a dead test session.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.clib import fpenv
from harness import build_library

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not fpenv.Env.available(), reason="needs the C library's fegetenv")


@pytest.fixture(scope="module")
def ofast() -> str:
    out = ROOT / "build" / "variants" / "lib_Ofast-native.so"
    build_library(out=out, cflags="-Ofast -march=native", quiet=True)
    return str(out)


def _run(code: str, lib: str) -> str:
    env = dict(os.environ, LLMC_LIB=lib, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    tail = f"\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
    assert p.returncode == 0 and "ALIVE" in p.stdout, f"the process died ({p.returncode}){tail}"
    return p.stdout


def test_python_keeps_gradual_underflow_and_the_c_runs_flush_to_zero(ofast):
    out = _run("""
        import numpy as np
        from harness import load_library
        tiny = np.float32(1e-39)                  # subnormal in float32
        lib = load_library()
        print("ftz", lib.fp_mode.ftz, "daz", lib.fp_mode.daz, "finite", lib.finite_math)
        # Python (NumPy) still computes with subnormals, before and after a C call
        print("py", tiny * np.float32(1) == tiny)
        x = np.array([1e-39, -1e-39, 1e-30, 1.0], np.float32); y = np.zeros(4, np.float32)
        out = np.empty(4, np.float32)
        lib.residual_forward(out, x, y, 4)        # DAZ: subnormal inputs read as 0
        print("c", out.tolist())
        print("py-after", tiny * np.float32(1) == tiny, float(np.float64(1e-310) * 1.0) > 0)
        print(lib.fp_description)
        print("ALIVE")
    """, ofast)
    assert "ftz True daz True finite True" in out, out
    assert "py True" in out and "py-after True True" in out, out
    assert "c [0.0, 0.0, 1.0000000031710769e-30, 1.0]" in out, out
    assert "FTZ+DAZ" in out and "finite-math" in out, out


def test_library_under_test_leaves_python_in_its_own_mode():
    """Whatever build is under test: after loading it and calling it, Python's mode is the
    one it had (NumPy computes with subnormals), and the C's mode is the one its load set."""
    import numpy as np

    from harness import load_library
    before = fpenv.Env.current().mode
    lib = load_library()
    x = np.array([1e-39, 2.0], np.float32)
    out = np.empty(2, np.float32)
    lib.residual_forward(out, x, np.zeros(2, np.float32), 2)
    assert fpenv.Env.current().mode == before
    assert np.float32(1e-39) * np.float32(1) != 0
    assert (out[0] == 0) == bool(lib.fp_mode.daz), (out, lib.fp_mode)


_NAN_STEP = """
    import numpy as np
    from harness import CModel
    from pyref.config import PRESETS
    from pyref.synth import init_params, make_batch
    cfg = PRESETS["tiny"]
    params = init_params(cfg, seed=3)
    x, y = make_batch(cfg, 2, 8, seed=0)
    params[x[0, 0] * cfg.channels + 5] = np.float32("{poison}")   # a wte row the batch uses
    with CModel.from_params(cfg, params) as m, np.errstate(all="ignore"):
        loss = m.forward(x, y)
        m.zero_grad(); m.backward(); m.update(t=1)
        print("loss finite", np.isfinite(loss), "mean_loss kept", np.isnan(m.mean_loss) == np.isnan(loss))
        print("grads finite", bool(np.isfinite(m.grads_memory).all()))
    print("ALIVE")
"""


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_nonfinite_loss_backward_survives_a_finite_math_build(ofast, poison):
    out = _run(_NAN_STEP.format(poison=poison), ofast)
    assert "loss finite False mean_loss kept True" in out, out
    assert "grads finite False" in out, out


def test_nan_checkpoint_gives_a_clear_error_not_an_exit(ofast, tmp_path):
    """The whole CLI on a checkpoint with a NaN, against an -Ofast library: a one-line
    usage error naming the parameter (exit 2), never the C's exit(1) without one."""
    code = f"""
        import numpy as np
        from pyref import formats
        from pyref.config import PRESETS
        from pyref.synth import init_params
        cfg = PRESETS["tiny"]
        p = init_params(cfg, seed=1)
        p[cfg.padded_vocab_size * cfg.channels + 3 * cfg.channels + 2] = np.nan   # wpe[3, 2]
        formats.write_checkpoint({str(tmp_path / 'nan.bin')!r}, cfg, p)
        print("ALIVE")
    """
    _run(code, ofast)
    env = dict(os.environ, LLMC_LIB=ofast, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--checkpoint",
                        str(tmp_path / "nan.bin"), "--steps", "1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 2, f"{p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "non-finite parameter" in p.stderr and "wpe[3, 2] = nan" in p.stderr, p.stderr


@pytest.mark.parametrize("first", ["C", "torch"])
def test_openmp_workers_shared_with_torch_run_each_in_its_own_mode(ofast, first):
    """torch ships a libgomp.so.1 of the same soname, so once torch is loaded the C's
    parallel loops run on the same OpenMP worker threads as torch's ops. Whichever of the
    two starts them: the C's matmul computes in its mode on every thread (DAZ: subnormal
    inputs read as 0), and torch's ops after it in Python's (subnormals kept)."""
    pytest.importorskip("torch")
    out = _run(f"""
        import numpy as np, torch
        torch.set_num_threads(4)
        x = torch.full((1 << 22,), 1e-40, dtype=torch.float32)        # subnormal
        if {first!r} == "torch":
            x * 3.0                                                    # torch starts the workers
        from harness import load_library
        lib = load_library()
        lib.set_num_threads(4)
        B, T, C, OC = 8, 64, 16, 32                                    # B*T % 8 == 0: the parallel path
        inp = np.full((B, T, C), 1e-39, np.float32); w = np.ones((OC, C), np.float32)
        out = np.empty((B, T, OC), np.float32)
        for _ in range(3):
            lib.matmul_forward(out, inp, w, None, B, T, C, OC)
        print("c nonzero", int(np.count_nonzero(out)))
        print("torch nonzero", (x * 3.0).count_nonzero().item(), "of", x.numel())
        print("ALIVE")
    """, ofast)
    assert "c nonzero 0\n" in out, out
    assert f"torch nonzero {1 << 22} of {1 << 22}" in out, out


def test_a_default_build_switches_nothing():
    """The mode is compared on its control part: the sticky exception flags every
    computation leaves (inexact, ...) do not make a library whose mode is Python's look
    different, so a default build's calls run without any switch (nor a parallel region
    to switch its workers)."""
    import platform

    from harness import load_library
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flag layout below is x86-64's")
    lib = load_library()
    if lib.fp_mode.ftz:
        pytest.skip("the library under test runs flush-to-zero: it does switch")
    raw = fpenv.Env.current().raw
    flagged = fpenv.Env(raw[:28] + bytes([raw[28] ^ 0x20]) + raw[29:])   # MXCSR's inexact flag
    assert flagged == fpenv.Env.current() and flagged.raw != raw
    calls = []
    wrapped = fpenv.calls_in(flagged, lambda: "ran", team=lambda env: calls.append(env))
    assert wrapped() == "ran" and calls == []   # no switch, no team region
