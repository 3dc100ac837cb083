"""The drift gate's verdicts, on a real run of its suite and on doctored baselines."""
from __future__ import annotations

import copy

import pytest

from harness.gate import evaluate, load_baseline, run_suite, write_baseline


@pytest.fixture(scope="module")
def suite_run():
    return run_suite()


def _baseline(run, tmp_path):
    path = tmp_path / "gate.json"
    write_baseline(run, path, None)
    return path, load_baseline(path)


def test_unchanged_build_passes_with_its_bits(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    result = evaluate(suite_run, base)
    assert result.passed, result.text()
    if suite_run.build_key is not None:
        assert "identical to the baseline" in result.text()


def test_a_moved_bit_fails_and_names_the_tensor(suite_run, tmp_path):
    if suite_run.build_key is None:
        pytest.skip("the library has no build record: no bit check")
    _, base = _baseline(suite_run, tmp_path)
    key = "step 2 acts.ln2"
    base["fingerprints"][suite_run.build_key][key] = "0" * 16
    result = evaluate(suite_run, base)
    assert not result.passed
    assert key in result.text() and "gate --update" in result.text()


def test_grown_error_fails_and_says_by_how_much(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    # the check that uses most of its tolerance: well above the floor (FLOOR x tolerance)
    # under which growth is not counted
    key = max(base["metrics"], key=lambda k: base["metrics"][k]["max_rel"] / base["metrics"][k]["tol_rel"])
    base["metrics"][key]["max_rel"] = base["metrics"][key]["tol_rel"] * 0.01  # pretend it was tiny
    text = evaluate(suite_run, base).text()
    assert "GATE FAIL" in text and key in text and "grew beyond 4x" in text


def test_unknown_build_skips_the_bit_check_with_a_note(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    base["fingerprints"] = {"another compiler | -O2": {}}
    result = evaluate(suite_run, base)
    assert result.passed and "bit check skipped" in result.text()


def test_changed_suite_fails(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    base["metrics"]["op a check that is gone"] = {"max_rel": 0, "norm_rel": 0, "tol_rel": 1, "tol_norm": 1}
    assert not evaluate(suite_run, base).passed


def test_update_drops_other_builds_fingerprints_when_the_bits_moved(suite_run, tmp_path):
    if suite_run.build_key is None:
        pytest.skip("the library has no build record")
    path, base = _baseline(suite_run, tmp_path)
    old = copy.deepcopy(base)
    old["fingerprints"]["other machine"] = {"x": "1"}
    assert "other machine" in load_baseline_after(write_baseline(suite_run, path, old), path)
    old["fingerprints"][suite_run.build_key]["step 1 acts.ln1"] = "moved"
    diff = write_baseline(suite_run, path, old)
    assert "other machine" not in load_baseline(path)["fingerprints"]
    assert any("stale" in line for line in diff)


def load_baseline_after(_diff, path):
    return load_baseline(path)["fingerprints"]
