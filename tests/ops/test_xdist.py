"""The per-op sweep under pytest-xdist gives what a serial run gives: the same verdicts and
the same end-of-session summary (the workers' comparisons reach the controller)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/ops/test_ops.py", "-k", "gelu", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    return p.stdout


def test_xdist_matches_a_serial_run():
    pytest.importorskip("xdist")
    serial, parallel = _pytest(), _pytest("-n", "2")

    def summary(out):
        i = out.index("llmc-parity: worst error per op")
        return [line for line in out[i:].splitlines()[1:] if re.match(r"^(op |-|\w+ +\d+ +\d+ )", line)]

    def counts(out):
        return re.search(r"(\d+) passed", out).group(1)
    assert counts(serial) == counts(parallel)
    assert summary(serial) == summary(parallel) and len(summary(serial)) == 3, (serial[-1500:], parallel[-1500:])
