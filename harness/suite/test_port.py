"""A user's kernel port (``--llmc-impl``): every kernel of the op table, on every shape,
against the float64 oracle; then the whole model, a few training steps, with replay
localisation. Kernels the port does not define are skipped as not checked. A failure's
message is what the CLI says of it: the first divergence and its cause."""
from __future__ import annotations

import pytest

from harness import assert_case, case_id, cases


def pytest_generate_tests(metafunc):
    if "port_case" in metafunc.fixturenames:
        given = metafunc.config.getoption("--llmc-impl", default=None)
        cs = list(cases()) if given else []
        metafunc.parametrize("port_case", [(spec.name, s.name) for spec, s in cs],
                             ids=[f"{case_id(spec, s)}-port" for spec, s in cs])


def test_port_kernel(port_case, llmc_impl, parity_record):
    kernel, shape = port_case
    if kernel in llmc_impl.missing:
        pytest.skip(f"{llmc_impl.name} does not define {kernel}: not checked")
    parity_record(assert_case(llmc_impl, kernel, shape, label=llmc_impl.name))


def test_port_trains_like_the_c(llmc_impl, llmc_lib, llmc_config, llmc_steps):
    """The port's kernels in the GPT-2 model (the reference's where it has none), checked
    step by step against the C and the oracle; a failure names the first divergence."""
    if llmc_impl is None:
        pytest.skip("no --llmc-impl given")
    from pyref import synth

    from harness import run_parity
    from harness.report import divergence_lines
    cfg = llmc_config
    report = run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 2, min(cfg.max_seq_len, 16), seed=1000),
                        lib=llmc_lib, impls={llmc_impl.name: llmc_impl}, steps=llmc_steps)
    if not report.passed:
        # what the CLI's summary says: the first divergence, with its cause; the C's own
        # failure said as such
        ours = any(not c.passed for s in report.steps for c in s.checks if c.impl == llmc_impl.name) or \
            any(llmc_impl.name in s.errors for s in report.steps)
        pytest.fail("\n".join([*([] if ours else ["C itself failed"]), *divergence_lines(report)]), pytrace=False)
