"""A user's kernel port (``--llmc-impl``): every kernel of the op table, on every shape,
against the float64 oracle; then the whole model, a few training steps, with replay
localisation. Kernels the port does not define are skipped as not checked."""
from __future__ import annotations

import pytest

from harness.opcheck import assert_kernel
from harness.ops import CHECK_BY_KERNEL, SHAPE_BY_NAME, cases, make_inputs


def pytest_generate_tests(metafunc):
    if "port_case" in metafunc.fixturenames:
        given = metafunc.config.getoption("--llmc-impl", default=None)
        cs = [(check.kernel, s.name) for check, s in cases()] if given else []
        metafunc.parametrize("port_case", cs, ids=[f"{CHECK_BY_KERNEL[k].op}-{k}-{s}-port" for k, s in cs])


def test_port_kernel(port_case, llmc_impl, parity_record):
    kernel, shape = port_case
    if kernel in llmc_impl.missing:
        pytest.skip(f"{llmc_impl.name} does not define {kernel}: not checked")
    s = SHAPE_BY_NAME[shape]
    parity_record(assert_kernel(llmc_impl, kernel, make_inputs(CHECK_BY_KERNEL[kernel], s, seed=0), s,
                                label=llmc_impl.name))


def test_port_trains_like_the_c(llmc_impl, llmc_lib, llmc_config, llmc_steps):
    """The port's kernels in the GPT-2 model (the reference's where it has none), checked
    step by step against the C and the oracle; a failure names the first divergence."""
    if llmc_impl is None:
        pytest.skip("no --llmc-impl given")
    from pyref import synth

    from harness.runner import run_parity
    cfg = llmc_config
    report = run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 2, min(cfg.max_seq_len, 16), seed=1000),
                        lib=llmc_lib, impls={llmc_impl.name: llmc_impl}, steps=llmc_steps)
    bad = [c for s in report.steps for c in s.checks if not c.passed and c.impl == llmc_impl.name]
    assert report.passed or not bad, "C itself failed: " + (report.first_divergence() or "")
    assert not bad and not any(s.errors for s in report.steps), \
        (report.first_divergence() or "") + "\n" + "\n".join(c.comparison.message() for c in bad[:2])
