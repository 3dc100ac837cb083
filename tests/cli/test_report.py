"""Reports: step table, run summary, JSON (against docs/report-schema.md), plot."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from harness import KINDS, run_parity
from harness import report as R
from harness.report import png as P
from pyref import numpy_kernels, synth
from pyref.config import PRESETS
from pyref.protocol import KernelSet

ROOT = Path(__file__).resolve().parents[2]
TINY = PRESETS["tiny"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _numpy_funcs() -> dict:
    return {n: getattr(numpy_kernels, n) for n in KernelSet.from_module(numpy_kernels).provided}


def _mutant() -> KernelSet:
    """numpy kernels with layernorm_forward's output 0.1% too large."""
    funcs = _numpy_funcs()
    orig = funcs["layernorm_forward"]

    def layernorm_forward(inp, weight, bias):
        out, mean, rstd = orig(inp, weight, bias)
        return out * (1 + 1e-3), mean, rstd

    funcs["layernorm_forward"] = layernorm_forward
    return KernelSet(funcs, name="mutant")


def _broken() -> KernelSet:
    """Raises in gelu_forward; lacks attention_backward (taken from the numpy fallback)."""
    funcs = _numpy_funcs()
    del funcs["attention_backward"]

    def gelu_forward(inp):
        raise ValueError("broken on purpose")

    funcs["gelu_forward"] = gelu_forward
    return KernelSet(funcs, name="broken", fallback=KernelSet.from_module(numpy_kernels))


@pytest.fixture(scope="module")
def report():
    impls = {"numpy": KernelSet.from_module(numpy_kernels), "mutant": _mutant(), "broken": _broken()}
    return run_parity(TINY, synth.init_params(TINY, 0), synth.batches(TINY, 4, 16), impls=impls, steps=2)


@pytest.fixture(scope="module")
def passing(report):
    """The same run restricted to the C and numpy: a passing RunReport."""
    keep = ("C", "numpy")
    steps = [dataclasses.replace(
        s, checks=[c for c in s.checks if c.impl in keep],
        losses={k: v for k, v in s.losses.items() if k in keep + ("oracle",)},
        first_divergence={k: v for k, v in s.first_divergence.items() if k in keep},
        errors={k: v for k, v in s.errors.items() if k in keep}) for s in report.steps]
    return dataclasses.replace(report, impls=list(keep), steps=steps,
                               not_checked={k: v for k, v in report.not_checked.items() if k in keep})


# ---------------------------------------------------------------------------- the schema doc

from report_schema import documented as _documented, type_ok as _type_ok, validate as _validate  # noqa: E402


def test_schema_doc_lists_every_object():
    doc = _documented()
    assert set(doc) == {"run", "config", "hyperparameters", "library", "build", "versions", "count",
                        "step", "check", "worst", "tol", "diagnosis", "cause", "finding", "bias_stats",
                        "debug_state", "debug_state_tensor"}
    assert all(doc.values())


def test_json_is_strict_and_matches_the_documented_schema(report):
    data = R.to_json(report)
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    doc = _documented()
    _validate(data, "run", doc)
    assert data["schema"] == "llmc-parity/run/1"
    _validate(data["config"], "config", doc)
    _validate(data["hyperparameters"], "hyperparameters", doc)
    _validate(data["library"], "library", doc)
    if data["library"]["build"] is not None:
        _validate(data["library"]["build"], "build", doc)
    _validate(data["versions"], "versions", doc)
    assert data["versions"]["llmc-parity"]
    for impl, kinds in data["counts"].items():
        assert impl in data["impls"]
        for kind, count in kinds.items():
            assert kind in KINDS
            _validate(count, "count", doc)
    assert len(data["steps"]) == 2
    n_checks = n_diagnosed = 0
    for step, s in zip(data["steps"], report.steps):
        _validate(step, "step", doc)
        assert all(_type_ok(v, "float") for v in step["losses"].values())
        assert all(isinstance(v, str) for v in step["errors"].values())
        assert all(isinstance(v, str) for v in step["first_divergence"].values())
        assert len(step["checks"]) == len(s.checks)
        for c in step["checks"]:
            _validate(c, "check", doc)
            _validate(c["worst"], "worst", doc)
            _validate(c["tol"], "tol", doc)
            if c["bias_stats"] is not None:
                _validate(c["bias_stats"], "bias_stats", doc)
            if c["diagnosis"] is not None:
                _validate(c["diagnosis"], "diagnosis", doc)
                for cause in c["diagnosis"]["causes"]:
                    _validate(cause, "cause", doc)
                n_diagnosed += 1
            else:
                assert c["passed"] or c["kind"] in ("e2e", "loss")
            assert c["kind"] in KINDS
            n_checks += 1
    assert sum(c["checks"] for kinds in data["counts"].values() for c in kinds.values()) == n_checks
    assert data["not_checked"] == {"broken": ["attention_backward"]}
    assert n_diagnosed > 0      # the mutant's layernorm replay checks


@pytest.fixture(scope="module")
def debug_states(tmp_path_factory):
    """llm.c's debug-state check of a tiny checkpoint: a right debug state, and one whose
    gradient of wte is 1% off (harness.checks.debugstate.DebugStateReport each)."""
    from harness import check_debug_state
    from pyref import formats
    from pyref.model import GPT2
    d = tmp_path_factory.mktemp("debug_state")
    params = synth.init_params(TINY, seed=5)
    formats.write_checkpoint(d / "model.bin", TINY, params)
    x, y = synth.make_batch(TINY, 2, 8, seed=3)
    m = GPT2(TINY, params, kernels=KernelSet.from_module(numpy_kernels))
    loss = m.forward(x, y)
    m.zero_grad()
    m.backward()
    out = []
    for factor in (1.0, 1.01):
        grads = m.grads_memory.copy()
        grads[:TINY.padded_vocab_size * TINY.channels] *= factor       # wte comes first
        formats.write_debug_state(d / f"debug{factor}.bin", TINY, x, y, m.acts["logits"], loss, grads)
        out.append(check_debug_state(d / "model.bin", d / f"debug{factor}.bin"))
    return out


def test_the_debug_state_is_part_of_the_verdict_and_the_json(passing, debug_states):
    good, bad = debug_states
    assert good.passed and not bad.passed
    doc = _documented()
    for ds, verdict in ((good, "pass"), (bad, "fail")):
        run = dataclasses.replace(passing, debug_state=ds)
        data = R.to_json(run, versions=False)
        json.dumps(data, allow_nan=False)
        _validate(data, "run", doc)
        _validate(data["debug_state"], "debug_state", doc)
        for t in data["debug_state"]["tensors"]:
            _validate(t, "debug_state_tensor", doc)
        assert data["verdict"] == verdict and run.passed == (verdict == "pass")
        last = R.run_summary(run).splitlines()[-1]
        assert last == ("llmc-parity: PASS" if ds.passed else "llmc-parity: FAIL (the debug state failed)")
    assert [t["tensor"] for t in R.to_json(dataclasses.replace(passing, debug_state=bad))["debug_state"]["tensors"]
            if not t["passed"]] == ["grads.wte"]
    assert R.to_json(passing)["debug_state"] is None


def test_debug_state_and_free_run_tables_fold_to_what_matters(debug_states):
    from harness.checks.freerun import FreeRunRow
    good, bad = debug_states
    full, folded = R.debug_state_table(bad), R.debug_state_table(bad, verbose=False)
    assert "grads.lnfb" in full and "grads.lnfb" not in folded and "grads.wte" in folded
    assert folded.splitlines()[-1].startswith("debug state: FAIL (17 of 18 tensors OK; the failed shown")
    assert R.debug_state_table(good, verbose=False).splitlines()[-1].startswith(
        "debug state: PASS (18 of 18 tensors OK; the closest to its tolerance shown")
    rows = [FreeRunRow(t, impl, 4.0, 4.0, 1e-7 if (impl, t) != ("numpy", 2) else 1.0, 1e-6, 1e-7, 1e-6)
            for t in (1, 2, 3) for impl in ("C", "numpy")]
    folded = R.free_run_table(rows, verbose=False)
    body = [line.split() for line in folded.splitlines()[3:-1]]
    assert [(r[0], r[1]) for r in body] == [("2", "numpy"), ("3", "C"), ("3", "numpy")]
    assert folded.splitlines()[-1].startswith("free run: FAIL (5 of 6 rows ok")
    assert len(R.free_run_table(rows).splitlines()) == 3 + 6 + 1


def test_json_versions_can_be_left_out(passing):
    data = R.to_json(passing, versions=False)
    assert data["versions"] is None
    assert data["verdict"] == "pass" and data["first_divergence"] is None
    json.dumps(data, allow_nan=False)


def test_json_of_checks_judged_below_float32_matches_the_schema(passing):
    """A mixed-precision port's check carries precision and precision_detail, last and as
    documented; a float32 check has neither (the schema's ``or absent``)."""
    from harness.arbiter.precision import Precision
    p = Precision("bfloat16", "bfloat16", rounds_inputs=True)
    s = passing.steps[0]
    low = dataclasses.replace(s, checks=[dataclasses.replace(c, precision=p) for c in s.checks[:3]] + s.checks[3:])
    data = R.to_json(dataclasses.replace(passing, steps=[low]))
    doc = _documented()
    checks = data["steps"][0]["checks"]
    for c in checks:
        _validate(c, "check", doc)
    assert [list(c)[-2:] for c in checks[:3]] == [["precision", "precision_detail"]] * 3
    assert checks[0]["precision"] == "bf16" and "float32 accumulation" in checks[0]["precision_detail"]
    assert all("precision" not in c and "precision_detail" not in c for c in checks[3:])


def test_json_non_finite_values_become_strings(report):
    s = report.steps[0]
    c = s.checks[1]
    bad = dataclasses.replace(c, comparison=dataclasses.replace(c.comparison, norm_rel=float("inf"),
                                                                  worst_actual=float("nan")))
    step = dataclasses.replace(s, checks=[bad], losses={**s.losses, "C": float("nan")})
    data = R.to_json(dataclasses.replace(report, steps=[step]), versions=False)
    json.dumps(data, allow_nan=False)
    check = data["steps"][0]["checks"][0]
    assert check["norm_rel"] == "inf" and check["worst"]["actual"] == "nan"
    assert data["steps"][0]["losses"]["C"] == "nan"


# ---------------------------------------------------------------------------- failing run

def test_failing_run_names_the_mutant_and_its_kernel(report):
    assert not report.passed
    first = report.first_divergence()
    assert "[mutant]" in first and "layernorm_forward" in first
    assert "layernorm_forward" in report.steps[0].first_divergence["mutant"]
    assert "C" not in report.steps[0].first_divergence and "numpy" not in report.steps[0].first_divergence

    summary = R.run_summary(report)
    assert summary.splitlines()[-1] == "llmc-parity: FAIL (2 of 2 steps failed)"
    fd = next(line for line in summary.splitlines() if line.startswith("first divergence:"))
    assert "[mutant]" in fd and "layernorm_forward" in fd
    assert "broken: attention_backward" in summary          # kernels not checked
    assert "ValueError: broken on purpose" in summary
    assert str(report.library) in summary and "loss trajectory" in summary

    data = R.to_json(report, versions=False)
    assert data["verdict"] == "fail"
    assert "[mutant]" in data["first_divergence"] and "layernorm_forward" in data["first_divergence"]
    assert data["counts"]["mutant"]["replay"]["failed"] > 0
    assert data["counts"]["C"]["replay"]["failed"] == 0
    assert "broken" in data["steps"][0]["errors"]


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if re.match(r"^\s*\d+\s{2}", line)]


def test_step_table_shows_fail_rows_for_the_mutant(report):
    table = R.step_table(report.steps[0])
    rows = _rows(table)
    fails = [r for r in rows if r[-1] == "FAIL" or r[-2] == "FAIL"]
    assert fails and all(r[1] == "mutant" for r in fails)
    ln1 = [r for r in rows if r[1] == "mutant" and r[2] == "replay" and r[3] == "acts.ln1"]
    assert len(ln1) == 1 and "FAIL" in ln1[0]
    assert any(r[1] == "C" for r in rows) and any(r[1] == "numpy" for r in rows)
    L = TINY.num_layers
    assert f"of {L}]" in table                        # per-layer rows folded
    assert "step 1 losses: oracle" in table
    assert "[mutant] first divergence: layer 0 ln1 layernorm_forward" in table
    assert "[broken] error: ValueError: broken on purpose" in table


def test_step_table_filter_and_verbose(report):
    step = report.steps[0]
    only_c = R.step_table(step, impl_filter="C")
    assert {r[1] for r in _rows(only_c)} == {"C"}
    assert all("FAIL" not in r for r in _rows(only_c)) and "[mutant]" not in only_c
    verbose = R.step_table(step, impl_filter=["mutant"], verbose=True)
    rows = _rows(verbose)
    n_mutant = sum(c.impl == "mutant" for c in step.checks)
    assert len(rows) == n_mutant
    for layer in range(TINY.num_layers):
        assert any(r[3] == f"acts.ln1[layer" and r[4] == f"{layer}]" for r in rows)
    folded = _rows(R.step_table(step, impl_filter="mutant"))
    assert len(folded) < len(rows)


def test_passing_summary(passing):
    summary = R.run_summary(passing)
    assert summary.splitlines()[-1] == "llmc-parity: PASS"
    assert "first divergence: none" in summary
    table = R.step_table(passing.steps[0])
    rows = _rows(table)
    assert rows and all(r[-1] == "OK" for r in rows)
    assert ", 0 FAIL" in table


def test_worst_per_op_table_unchanged(report):
    records = [c.comparison for c in report.steps[0].checks if c.impl == "C"]
    table = R.worst_per_op_table(records)
    assert table.splitlines()[0].split()[:3] == ["op", "checks", "failed"]


# ---------------------------------------------------------------------------- files

def test_write_json_refuses_to_overwrite(passing, tmp_path):
    path = tmp_path / "run.json"
    assert R.write_json(passing, path) == path
    first = path.read_bytes()
    assert json.loads(first)["schema"] == "llmc-parity/run/1"
    with pytest.raises(FileExistsError):
        R.write_json(passing, path)
    assert path.read_bytes() == first
    user = tmp_path / "notes.txt"
    user.write_text("mine")
    with pytest.raises(FileExistsError):
        R.write_json(passing, user)
    assert user.read_text() == "mine"
    R.write_json(passing, path, overwrite=True, versions=False, indent=1)
    assert json.loads(path.read_text())["versions"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.json"]   # no temp files


def test_plot_writes_a_png_and_refuses_to_overwrite(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    assert P.plot(report, path) == path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    with pytest.raises(FileExistsError):
        P.plot(report, path)
    assert path.read_bytes() == data
    P.plot(report, path, overwrite=True)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["run.png"]


def test_plot_without_matplotlib_says_what_to_install(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeError, match=re.escape("pip install llmc-parity[plot]")):
        P.plot(report, tmp_path / "run.png")
    assert not (tmp_path / "run.png").exists()


def test_plot_bands_follow_the_graph_from_the_checks_fields(report):
    """The plot's x axis is laid out from the checks' phase and call layer (no text is
    parsed): embedding, layers 0..L-1, head forward; head, layers L-1..0, embedding back."""
    bands = P.x_bands(list(P.graph_positions(report).values()))
    L = TINY.num_layers
    assert [(b.phase, b.layer) for b in bands] == (
        [("forward", None)] + [("forward", l) for l in range(L)] + [("forward", None)]
        + [("backward", None)] + [("backward", l) for l in reversed(range(L))] + [("backward", None)])
