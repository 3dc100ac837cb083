"""``llmc-parity run`` keeps the memory it frees for its own reuse when it is the process's
own command (harness.arbiter.oracle.hold_freed_memory), says so in its header, and leaves a
caller's process as it is (main(argv) from a test or a notebook)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAID = "; freed memory kept for reuse from step 2 on"


def _header(hold: str) -> str:
    env = dict(os.environ, LLMC_HOLD_MEMORY=hold, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--steps", "1", "-q", "--ref", "oracle"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    return next(ln for ln in proc.stdout.splitlines() if ln.startswith("witness: "))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_command_holds_its_freed_memory_and_says_so():
    assert _header("1").endswith(SAID)
    assert not _header("0").endswith(SAID)


def test_a_callers_process_is_left_as_it_is(capsys, monkeypatch):
    from harness.arbiter import oracle
    called = []
    monkeypatch.setattr(oracle, "hold_freed_memory", lambda: called.append(1) or True)
    monkeypatch.setattr(oracle, "one_arena", lambda: called.append(0) or True)
    assert main(["run", "--steps", "2", "-q", "--ref", "oracle"]) == 0
    out = capsys.readouterr().out
    assert not called and SAID not in out


def test_the_estimate_counts_the_start_the_later_steps_and_the_debug_state():
    from harness.cli import run_estimate
    # 5 s before step 1 ended, step 1 took 10 s: 9 more steps and the debug state as long
    assert run_estimate(10.0, 15.0, 10, 0, True) == 15.0 + 10 * 10.0
    assert run_estimate(10.0, 15.0, 10, 0, False) == 15.0 + 9 * 10.0
    assert run_estimate(10.0, 15.0, 1, 3, False) == 15.0 + 10.0      # a free-run step: a third of one
    # after step 2 (40 s since the start): 8 more steps and the debug state as long as step 2
    assert run_estimate(8.0, 40.0, 10, 0, True, done=2) == 40.0 + 9 * 8.0


def test_the_estimate_is_said_again_after_step_2_from_its_measured_time(capsys):
    import argparse
    from harness import cli
    from harness.report.progress import Progress
    progress = Progress(enabled=False)
    args = argparse.Namespace(json_only=False, steps=10, free_run=0, debug_state="debug.bin",
                              started=progress.start - 5.0)
    said = cli._first_step_said(args, progress, large=True)
    progress.step_began[1] = progress.start - 5.0 + 2.0
    said(1, None)
    progress.step_began[2] = cli.time.perf_counter() - 30.0     # step 2 took 30 s
    args.started = cli.time.perf_counter() - 62.0                # the run began 62 s ago
    said(2, None)
    said(3, None)                                                # nothing after later steps
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 1 took ")
    step2, total = lines[1].split("; ")
    assert step2 == "step 2 took 30s"
    # 62 s since the start, then 8 steps and the debug state of 30 s each: 332 s
    assert total.startswith("the run about 5.") and total.endswith(" min in all")
    args.steps, args.debug_state = 2, None                       # nothing left after step 2: no line
    said(2, None)
    assert capsys.readouterr().out == ""


def test_a_later_step_is_the_first_less_its_first_touches_where_memory_is_held():
    from harness.cli import later_step
    assert later_step(37.0, 10.0, hold=True) == 27.0     # the kernel's 10 s: fresh pages, not paid again
    assert later_step(37.0, 10.0, hold=False) == 37.0    # freed memory given back: paid again each step
    assert later_step(5.0, 8.0, hold=True) == 0.0        # threads' system time summed past the wall time


def test_the_hold_comes_after_the_first_step(monkeypatch):
    import argparse
    from harness import cli
    from harness.arbiter import oracle
    from harness.report.progress import Progress
    called = []
    monkeypatch.setattr(oracle, "hold_freed_memory", lambda: called.append(1) or True)
    args = argparse.Namespace(json_only=True)
    for hold in (False, True):
        said = cli._first_step_said(args, Progress(enabled=False), large=False, hold=hold)
        said(2, None)           # not after a later step
        assert not called
        said(1, None)
        assert called == ([1] if hold else [])
