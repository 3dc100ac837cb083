"""hold_freed_memory (harness.arbiter.oracle): a process that holds its freed memory
serves a large buffer freed and asked for again from pages it has already touched (no
page faults), in the main thread and in a worker thread (whose arena could not hold a
block over 64 MiB without mmap); without it, every such buffer is fresh memory. Each case
runs in a process of its own: the setting is the process's, for its life."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import resource, threading
import numpy as np
from harness.arbiter.oracle import hold_freed_memory

held = hold_freed_memory()
N = 128 * 2**20 // 8          # 128 MiB of float64: over glibc's mmap threshold and a thread arena's 64 MiB

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def again():
    a = np.ones(N)            # first touch, then freed
    del a
    f0 = faults()
    b = np.ones(N)            # the same size again
    del b
    return faults() - f0

main = again()
out = []
t = threading.Thread(target=lambda: out.append(again()))
t.start()
t.join()
print(held, main, out[0])
"""


def _probe(hold: str) -> tuple[bool, int, int]:
    env = dict(os.environ, LLMC_HOLD_MEMORY=hold, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    held, main, thread = proc.stdout.split()
    return held == "True", int(main), int(thread)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, Linux's fault counts")
def test_a_held_process_reuses_freed_memory_without_faults_and_a_plain_one_does_not():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: hold_freed_memory does nothing here")
    held, main, thread = _probe("1")
    assert held
    assert main < 20 and thread < 20, (main, thread)       # 128 MiB is 32,768 pages (64 huge pages)
    plain, main0, thread0 = _probe("0")
    assert not plain
    assert main0 > 50 and thread0 > 50, (main0, thread0)   # the probe can tell: fresh pages fault


def test_hold_freed_memory_is_off_where_asked_and_said_once():
    from harness.arbiter import oracle
    code = ("from harness.arbiter.oracle import hold_freed_memory as h; "
            "print(h(), h())")
    env = dict(os.environ, LLMC_HOLD_MEMORY="0", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60).stdout.split()
    assert out == ["False", "False"]
    assert oracle.trim_heap() in (True, False)
