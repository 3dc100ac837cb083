"""The drift gate's verdicts, on a real run of its suite and on doctored baselines; the
fingerprint key's claim (same key, same bits) checked on real builds."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pristine_source

from harness import Library, build_library, load_library
from harness.gate import KEY_FIELDS, evaluate, load_baseline, run_suite, write_baseline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def suite_run():
    return run_suite()


def _baseline(run, tmp_path):
    path = tmp_path / "gate.json"
    write_baseline(run, path, None)
    return path, load_baseline(path)


def _mine(base, run):
    return next(e for e in base["fingerprints"] if e["key"] == run.build_key)


def _needs_record(run):
    if run.build_key is None:
        pytest.skip("the library under test has no build record: no bit check")


def test_unchanged_build_passes_with_its_bits(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    result = evaluate(suite_run, base)
    assert result.passed, result.text()
    if suite_run.build_key is not None:
        assert "identical to the baseline" in result.text() and result.bits["status"] == "checked"
        assert "NOT checked" not in result.lines[0]


def test_a_moved_bit_fails_and_names_the_tensor(suite_run, tmp_path):
    _needs_record(suite_run)
    _, base = _baseline(suite_run, tmp_path)
    key = "step 2 acts.ln2"
    _mine(base, suite_run)["bits"][key] = "0" * 16
    result = evaluate(suite_run, base)
    assert not result.passed and result.bits["status"] == "changed"
    assert key in result.text() and "gate --update" in result.text()
    # a bit-only change: accepting it is the remedy, and the advice says so
    assert "accept it" in result.lines[-1] and "will not make it pass" not in result.text()


def test_a_tolerance_violation_is_not_advised_away_by_update(suite_run, tmp_path):
    """A tolerance violation is the C's numbers being wrong, not drift: the advice says so
    and that --update is no remedy; and it is none (the updated baseline still fails)."""
    run = copy.copy(suite_run)
    run.failures = ["op layernorm_forward tiny out: max rel 3e-3 > tol 1e-5"]
    _, base = _baseline(suite_run, tmp_path)
    result = evaluate(run, base)
    assert not result.passed
    advice = result.lines[-1]
    assert "numbers are wrong" in advice and "will not make it pass" in advice and "accept it" not in advice
    path = tmp_path / "updated.json"
    write_baseline(run, path, base)
    again = evaluate(run, load_baseline(path))
    assert not again.passed and again.lines[-1] == advice


def test_grown_error_fails_and_says_by_how_much(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    # the check that uses most of its tolerance: well above the floor (FLOOR x tolerance)
    # under which growth is not counted
    key = max(base["metrics"], key=lambda k: base["metrics"][k]["max_rel"] / base["metrics"][k]["tol_rel"])
    base["metrics"][key]["max_rel"] = base["metrics"][key]["tol_rel"] * 0.01  # pretend it was tiny
    result = evaluate(suite_run, base)
    text = result.text()
    assert "GATE FAIL" in text and key in text and "grew beyond 4x" in text
    assert "accept it" in result.lines[-1]    # within tolerance: the baseline may accept it


@pytest.mark.parametrize("component", ["cflags", "libm_dispatch", "inputs"])
def test_no_matching_fingerprint_says_so_first_and_names_what_differs(suite_run, tmp_path, component):
    _needs_record(suite_run)
    _, base = _baseline(suite_run, tmp_path)
    other = _mine(base, suite_run)
    other["key"] = dict(other["key"], **{component: "something else"})
    result = evaluate(suite_run, base)
    assert result.passed   # tolerances and growth still pass ...
    assert result.lines[0].endswith("C output bits NOT checked"), result.text()
    assert result.lines[1].startswith("NO BIT CHECK") and f"differs in {component}" in result.lines[1]
    assert result.bits["status"] == "no-fingerprint" and result.bits["differs_in"] == [component]
    required = evaluate(suite_run, base, require_bits=True)   # ... unless bits are required
    assert not required.passed and "GATE FAIL" in required.lines[0]


def test_unknown_build_passes_on_tolerances_but_not_when_bits_are_required(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    run = copy.copy(suite_run)
    run.build_key = None
    assert evaluate(run, base).passed
    assert evaluate(run, base).bits["status"] == "unknown-build"
    assert not evaluate(run, base, require_bits=True).passed


def test_changed_suite_fails(suite_run, tmp_path):
    _, base = _baseline(suite_run, tmp_path)
    base["metrics"]["op a check that is gone"] = {"max_rel": 0, "norm_rel": 0, "tol_rel": 1, "tol_norm": 1}
    assert not evaluate(suite_run, base).passed


def test_update_drops_other_builds_fingerprints_when_the_bits_moved(suite_run, tmp_path):
    _needs_record(suite_run)
    path, base = _baseline(suite_run, tmp_path)
    old = copy.deepcopy(base)
    foreign = {"key": dict(suite_run.build_key, compiler="another compiler"), "bits": {"x": "1"}}
    old["fingerprints"].append(foreign)
    write_baseline(suite_run, path, old)
    assert foreign in load_baseline(path)["fingerprints"]          # kept: bits unchanged
    _mine(old, suite_run)["bits"]["step 1 acts.ln1"] = "moved"
    diff = write_baseline(suite_run, path, old)
    assert foreign not in load_baseline(path)["fingerprints"]      # dropped: stale
    assert any("stale" in line for line in diff)


def test_key_has_every_component(suite_run):
    _needs_record(suite_run)
    assert set(suite_run.build_key) == set(KEY_FIELDS)
    assert all(suite_run.build_key[f] not in (None, "") for f in KEY_FIELDS if f != "openmp")


# ----------------------------------------------------------------------------- real builds

_SUITE = """
import json, sys
from harness import load_library, run_suite
lib = load_library(sys.argv[1])
lib.set_num_threads(int(sys.argv[2])) if lib.has_openmp else None
r = run_suite(lib)
print(json.dumps({"key": r.build_key, "bits": r.fingerprints, "failures": len(r.failures)}))
"""


def _suite_in_child(lib_path, threads: int) -> dict:
    import json
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _SUITE, str(lib_path), str(threads)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def under_test_flags():
    lib = load_library()
    if lib.build_info is None:
        pytest.skip("the library under test has no build record: its flags are unknown")
    return lib.build_info


def test_same_key_gives_same_bits(under_test_flags, suite_run, tmp_path):
    """The key's claim, on this machine: a second build of the same source with the same
    compiler and flags, run with another OpenMP thread count, has the same key and gives
    every fingerprinted output the same bits. If this fails, something that decides the
    bits is missing from the key."""
    other = build_library(out=tmp_path / "lib_again.so", cflags=under_test_flags.cflags,
                          openmp=under_test_flags.openmp, quiet=True)
    threads = 1 if load_library().get_num_threads() != 1 else 2
    again = _suite_in_child(other.library, threads)
    assert again["key"] == suite_run.build_key
    moved = sorted(k for k in suite_run.fingerprints if again["bits"].get(k) != suite_run.fingerprints[k])
    assert not moved, (f"two builds with the same key ({suite_run.build_key}) gave different bits "
                       f"for {len(moved)} outputs, e.g. {moved[:5]}: the key misses what decides them")


def test_a_bit_only_change_of_the_c_fails_the_gate(under_test_flags, suite_run, tmp_path):
    """layernorm's mean one float32 ulp larger in the first row of every call (m / C *
    1.0000001f at b = t = 0): every error stays far inside its tolerance, but the bits move,
    and the gate fails on them. (m * (1.0f / C) would do at -O3, but -Ofast compiles m / C
    into exactly that. In every row, the change is a systematic lean of two units of
    roundoff that the bias test catches where the build's own lean adds to it: at -Ofast
    -march=native; one row of many moves no tensor's mean error.)

    What else the gate says depends on the build: the change moves every later rounding,
    so each of the suite's ~1,600 metrics is drawn anew, and one near its growth floor may
    land beyond 4x its baseline (a NumPy update's norm on a Xeon at -Ofast -march=native;
    here, with the ulp in row b = 1 instead, v.lnfw's x5.0 at -Ofast). So the bit check is
    shown to fail it on its own: against the mutant's own metrics with the unchanged C's
    fingerprints, nothing can have grown, and the gate still fails, on bits alone."""
    text = pristine_source()
    assert text.count("m = m / C;") == 1
    src = tmp_path / "train_gpt2.c"
    src.write_text(text.replace("m = m / C;", "m = (b == 0 && t == 0) ? m / C * 1.0000001f : m / C;"))
    built = build_library(src, tmp_path / "lib_mutant.so", cflags=under_test_flags.cflags,
                          openmp=under_test_flags.openmp, quiet=True)
    run = run_suite(Library(built.library))
    assert run.build_key == suite_run.build_key          # same compiler, flags, machine
    assert not run.failures                              # within every tolerance
    path, base = _baseline(suite_run, tmp_path)
    result = evaluate(run, base)
    assert not result.passed and result.bits["status"] == "changed", result.text()
    assert any("layernorm_forward" in k for k in result.bits["moved"]), result.bits["moved"][:10]
    bits_only = dict(copy.deepcopy(base), metrics=copy.deepcopy(run.metrics))
    alone = evaluate(run, bits_only)
    assert not alone.passed and alone.bits["status"] == "changed", alone.text()
    assert "4x" not in alone.text() and "tolerance violation" not in alone.text()   # bits, nothing else
    assert evaluate(suite_run, dict(bits_only, metrics=base["metrics"])).passed    # the C unchanged: pass
