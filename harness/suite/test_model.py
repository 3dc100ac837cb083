"""A user's PyTorch model (``--llmc-model file.py:name``, ``--llmc-optimizer``): trained
as its port trains it (autograd, its optimizer) for a few steps beside the C, from the C's
state each step; its checks grouped by op, so ``-k layernorm`` selects. One run is shared
by all of them (the ``llmc_model_report`` fixture)."""
from __future__ import annotations

import pytest

from harness.pytest_plugin import checks_by_op


def test_model_op(llmc_model_op, llmc_model_report):
    impl = llmc_model_report.impls[-1]
    errors = [e for s in llmc_model_report.steps for e in s.errors.values()]
    assert not errors, errors[0]
    checks = checks_by_op(llmc_model_report, impl)[llmc_model_op]
    if not checks:
        pytest.skip(f"{impl} shows no tensor of {llmc_model_op} (not observed)")
    bad = [c for c in checks if not c.passed]
    assert not bad, f"{bad[0].where}: {bad[0].comparison.message()}"
