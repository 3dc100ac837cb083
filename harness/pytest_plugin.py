"""pytest plugin of llmc-parity (registered through the ``pytest11`` entry point).

Options:
  --llmc-lib PATH       the library under test (default: $LLMC_LIB or build/libtrain_gpt2.so)
  --llmc-impl TARGET    a Python port to check too: a file path or ``module[:attr]``
  --llmc-config NAME    model config for model-level checks (default: tiny)
  --llmc-steps N        training steps for model-level checks (default: 3 in tests)
  --llmc-model TARGET   a PyTorch model to check (``file.py:name`` or ``module:name``),
                        with autograd and its optimizer; ``-k layernorm`` selects by op
  --llmc-optimizer TARGET its optimizer factory, or ``configure_optimizers``

Fixtures: ``llmc_lib`` (the bound Library), ``llmc_impl`` (the user's KernelSet or None),
``llmc_model_report`` (one run of ``--llmc-model``, shared by the per-op tests of
``llmc_model_op``: harness/suite/test_model.py's ``test_model_op[layernorm-model]``),
``llmc_config``, ``llmc_steps``, ``parity_record`` (add Comparisons to the end-of-session
summary). At the end of the session it prints one table: the worst error per op.
"""
from __future__ import annotations

import os

import pytest

from pyref.protocol import OPS

_RECORDS: list = []
_USER_CODE_OPTIONS = ("--llmc-impl", "--llmc-model")


def pytest_addoption(parser):
    group = parser.getgroup("llmc-parity")
    group.addoption("--llmc-lib", default=None, help="train_gpt2 shared library under test")
    group.addoption("--llmc-impl", default=None,
                    help="a Python port to check: file path or module[:attr] (kernel protocol)")
    group.addoption("--llmc-config", default="tiny", help="model config for model-level checks")
    group.addoption("--llmc-steps", type=int, default=3, help="steps for model-level checks")
    group.addoption("--llmc-model", default=None,
                    help="a PyTorch model to check: file.py:name or module:name (nn.Module class or factory)")
    group.addoption("--llmc-optimizer", default=None,
                    help="the model's optimizer: file.py:name of a factory (model, hyper), or configure_optimizers")


SUITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite")


def pytest_configure(config):
    lib = config.getoption("--llmc-lib", default=None)
    if lib:
        os.environ["LLMC_LIB"] = os.path.abspath(lib)
    # a user's code named: collect the shipped checks for it (harness/suite) beside whatever
    # else was asked for, in any repository
    if any(config.getoption(o, default=None) for o in _USER_CODE_OPTIONS) and \
            not any(os.path.abspath(str(a)).startswith(SUITE) for a in config.args):
        config.args.append(SUITE)
    config.addinivalue_line("markers", "slow: long-running (C variant builds, big shapes)")


@pytest.fixture(scope="session")
def llmc_lib():
    from .clib.library import load_library
    return load_library()


@pytest.fixture(scope="session")
def llmc_impl(request):
    target = request.config.getoption("--llmc-impl")
    if not target:
        return None
    from .ports.loader import load_kernels
    return load_kernels(target, fallback=True)


@pytest.fixture(scope="session")
def llmc_config(request):
    from pyref.config import preset
    return preset(request.config.getoption("--llmc-config"))


@pytest.fixture(scope="session")
def llmc_steps(request):
    return request.config.getoption("--llmc-steps")


def pytest_generate_tests(metafunc):
    if "llmc_model_op" in metafunc.fixturenames:
        given = metafunc.config.getoption("--llmc-model", default=None)
        ops = list(OPS) if given else []
        metafunc.parametrize("llmc_model_op", ops, ids=[f"{op}-model" for op in ops])


@pytest.fixture(scope="session")
def llmc_model_report(request, llmc_lib, llmc_config, llmc_steps):
    """One run of the ``--llmc-model`` model (B=2, T<=16) for every per-op test."""
    target = request.config.getoption("--llmc-model")
    if not target:
        pytest.skip("no --llmc-model given")
    from pyref import synth

    from .checks.run import run_parity
    from .ports.loader import load_model
    cfg = llmc_config
    T = min(cfg.max_seq_len, 16)
    model = load_model(target, optimizer=request.config.getoption("--llmc-optimizer"))
    return run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 2, T, seed=1000),
                      lib=llmc_lib, steps=llmc_steps, models={model.name: model})


def checks_by_op(report, impl: str) -> dict[str, list]:
    """A run's checks of ``impl`` grouped by the op (OPS) that produced the tensor:
    a buffer that several ops accumulate into counts for each of them."""
    out: dict[str, list] = {op: [] for op in OPS}
    for s in report.steps:
        for c in s.checks:
            if c.impl == impl:
                for op in c.ops:
                    out[op].append(c)
    return out


@pytest.fixture
def parity_record():
    """Call with a Comparison (or a list) to have it counted in the session summary."""
    def record(*comparisons):
        for c in comparisons:
            if isinstance(c, (list, tuple)):
                _RECORDS.extend(c)
            else:
                _RECORDS.append(c)
    return record


# pytest-xdist: each worker records its own comparisons; they travel to the controller,
# which prints the one summary (execnet carries plain data, so only what it needs)
_FIELDS = ("name", "passed", "max_rel", "norm_rel", "used")


def pytest_sessionfinish(session):
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["llmc_records"] = [{**{f: getattr(c, f) for f in _FIELDS},
                                "tol_rel": c.tol.rel, "tol_norm": c.tol.norm} for c in _RECORDS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from types import SimpleNamespace
    for r in getattr(node, "workeroutput", {}).get("llmc_records", []):
        _RECORDS.append(SimpleNamespace(**{f: r[f] for f in _FIELDS},
                                        tol=SimpleNamespace(rel=r["tol_rel"], norm=r["tol_norm"])))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDS:
        return
    from .report import worst_per_op_table
    terminalreporter.write_sep("=", "llmc-parity: worst error per op")
    terminalreporter.write_line(worst_per_op_table(_RECORDS))
