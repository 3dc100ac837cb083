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
``llmc_model_report`` (one run of ``--llmc-model``, shared by harness/suite/test_model.py's
tests: ``test_model_op[layernorm-model]``, one per op of ``llmc_model_op``, judges the op on
its own inputs (:data:`OP_KINDS`), so a bug upstream fails its own op's test and no other;
``test_model_step[e2e]`` and ``[loss]``, of ``llmc_model_step``, judge the step end to end
(:data:`STEP_KINDS`)), ``llmc_config``, ``llmc_steps``, ``parity_record`` (add Comparisons to
the end-of-session summary). A failing test's message is what the CLI says of the failure:
the first divergence, the line of the port it is pinned to, its cause. At the end of the
session it prints one table: the worst error per op.
"""
from __future__ import annotations

import os

import pytest

from pyref.protocol import KERNEL_OP, OPS

#: The kinds of check that judge one op on its own inputs (``test_model_op``): the replay
#: (each op of the graph re-run in float64 on the port's own inputs for it) and the update
#: check (AdamW in float64 from the common pre-step state and the port's own gradients:
#: the adamw op's). A bug upstream of the op does not reach them.
OP_KINDS = ("replay", "update")
#: The kinds that judge a step end to end (``test_model_step``): every tensor the port shows
#: against the float64 model's, and the mean loss. A bug anywhere upstream reaches them.
STEP_KINDS = ("e2e", "loss")

_RECORDS: list = []
# the shipped suite of each kind of user code (harness/suite): collected when it is named
_USER_CODE_SUITES = {"--llmc-impl": "test_port.py", "--llmc-model": "test_model.py"}


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
    # a user's code named: collect the shipped checks for it (harness/suite: those of the
    # kinds of code named, not a skipped test of the other) beside whatever else was asked
    # for, in any repository
    if not any(os.path.abspath(str(a)).startswith(SUITE) for a in config.args):
        config.args += [os.path.join(SUITE, name) for option, name in _USER_CODE_SUITES.items()
                        if config.getoption(option, default=None)]
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
    if "llmc_model_step" in metafunc.fixturenames:
        kinds = list(STEP_KINDS) if metafunc.config.getoption("--llmc-model", default=None) else []
        metafunc.parametrize("llmc_model_step", kinds, ids=kinds)


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


def checks_by_op(report, impl: str, kinds=None) -> dict[str, list]:
    """A run's checks of ``impl`` (of ``kinds``: default all) grouped by the op (OPS) that
    produced the tensor: a buffer that several ops accumulate into counts for each of them."""
    out: dict[str, list] = {op: [] for op in OPS}
    for s in report.steps:
        for c in s.checks:
            if c.impl == impl and (kinds is None or c.kind in kinds):
                for op in c.ops:
                    out[op].append(c)
    return out


def op_failure(report, impl: str, op: str) -> str | None:
    """Why ``op`` of ``impl`` fails on its own inputs (its checks of :data:`OP_KINDS`), as
    the CLI says it: the first step where one failed, its first divergence (with the line
    of the port it is pinned to) and cause, and where the model departs from GPT-2's graph
    (the census) if it does; or the error of a step that raised before the op was checked.
    None: no check of the op failed."""
    from .checks.results import first_divergence, first_divergence_check
    from .report import cause_lines
    for s in report.steps:
        mine = [c for c in s.checks if c.impl == impl and c.kind in OP_KINDS and op in c.ops]
        if impl in s.errors and not mine:
            return f"step {s.step} [{impl}] error: {s.errors[impl]} ({op} not checked)"
        text = first_divergence(mine)
        if text is not None:
            bad = sum(not c.passed for c in mine)
            # a model that departs from GPT-2's graph: where it departs, the step's first divergence
            departs = s.structure.get(impl)
            return "\n".join([f"{op}: {bad} of {len(mine)} checks on its own inputs failed in step {s.step}",
                              f"step {s.step} [{impl}] {text}", *cause_lines(first_divergence_check(mine), "  "),
                              *([f"the step's {first_divergence(mine, True, departs)}"] if departs else [])])
    return None


def op_not_checked(report, impl: str, op: str) -> str:
    """Why ``op`` has no check on its own inputs: the tensors its calls read or write that
    ``impl`` does not show (no check of any kind names them), from the graph."""
    from .graph import Ref, backward_nodes, forward_nodes
    checked = {c.ref for s in report.steps for c in s.checks if c.impl == impl}
    unseen = [f"{v.group}.{v.name}" for n in forward_nodes(report.config) + backward_nodes(report.config)
              if KERNEL_OP[n.kernel] == op for _, v in n.args
              if isinstance(v, Ref) and v.group in ("acts", "grads_acts") and v not in checked]
    return (f"{impl}: {op} not checked on its own inputs (no replay check); not observed: "
            + (", ".join(dict.fromkeys(unseen)) or "none of its tensors is missing, yet no call of it was replayed"))


def step_failure(report, impl: str, kind: str) -> str | None:
    """Why ``impl``'s steps fail end to end on the checks of ``kind`` (:data:`STEP_KINDS`):
    how many failed and the first, then what the CLI's summary says of the run (its first
    divergence, localised by the replay, with its line and cause; its errors). None: all passed."""
    from .report import divergence_lines
    mine = [c for s in report.steps for c in s.checks if c.impl == impl and c.kind == kind]
    bad = [c for c in mine if not c.passed]
    errors = [s.step for s in report.steps if impl in s.errors]
    if not bad and not errors:
        return None
    head = (f"{kind}: {len(bad)} of {len(mine)} checks failed, the first {bad[0].tensor} ({bad[0].where}, "
            f"step {bad[0].step})" if bad else f"{kind}: step {errors[0]} raised before it was checked")
    return "\n".join([head, *divergence_lines(report)])


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
