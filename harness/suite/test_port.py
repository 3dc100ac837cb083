"""A user's kernel port (``--llmc-impl``): every kernel of the op table, on every shape,
against the float64 oracle; then the whole model, a few training steps, with replay
localisation. Kernels the port does not define are skipped as not checked."""
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
    cfg = llmc_config
    report = run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 2, min(cfg.max_seq_len, 16), seed=1000),
                        lib=llmc_lib, impls={llmc_impl.name: llmc_impl}, steps=llmc_steps)
    bad = [c for s in report.steps for c in s.checks if not c.passed and c.impl == llmc_impl.name]
    assert report.passed or not bad, "C itself failed: " + (report.first_divergence() or "")
    assert not bad and not any(s.errors for s in report.steps), \
        (report.first_divergence() or "") + "\n" + "\n".join(c.comparison.message() for c in bad[:2])
