"""A user's PyTorch model (``--llmc-model file.py:name``, ``--llmc-optimizer``): trained
as its port trains it (autograd, its optimizer) for a few steps beside the C, from the C's
state each step. One run is shared by all the tests (the ``llmc_model_report`` fixture):

* ``test_model_op[<op>-model]``, one per op of the op table (``-k layernorm`` selects): the
  op judged on its own inputs (the replay of its calls, the update check for adamw), so
  a bug upstream fails its own op's test and not this one; an op with no such check is
  skipped, saying what the port does not show;
* ``test_model_step[e2e]``, ``[loss]``: the step end to end, where every bug shows.

A failing test's message is what the CLI says of the failure: the first divergence, the
line of the port it is pinned to, its cause."""
from __future__ import annotations

import pytest

from harness import pytest_plugin as plugin


def test_model_op(llmc_model_op, llmc_model_report):
    report, op = llmc_model_report, llmc_model_op
    impl = report.impls[-1]
    failure = plugin.op_failure(report, impl, op)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    if not plugin.checks_by_op(report, impl, plugin.OP_KINDS)[op]:
        pytest.skip(plugin.op_not_checked(report, impl, op))


def test_model_step(llmc_model_step, llmc_model_report):
    report = llmc_model_report
    failure = plugin.step_failure(report, report.impls[-1], llmc_model_step)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
