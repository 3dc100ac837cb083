"""Diagnosis: a failing check names the catalogued change of semantics that explains it.

Every kernel variant of harness.diagnosis.CATALOGUE has a port that carries the change,
written independently of the variant's own float64 code (float32 NumPy, the way a port
would be written): its per-op check fails and is diagnosed with exactly that cause. Every
family also has edits of llmc/train_gpt2.c (built into a temporary folder, several edits
of different functions per build so that three builds suffice), checked per op and, for
one build, through whole training steps (replay and update); the loss mean over B*T±1,
which is the model's and no kernel's, is an edit of gpt2_forward and gpt2_backward checked
through a step. Failures that no catalogued change explains say "no known cause", and
passing checks do no diagnosis work.

Each family's ports and edits are tested in its own module, test_diagnose_<family>.py (one
per module of harness/diagnosis/catalogue); this one holds what is no family's: that every
variant is covered, the fitted constants, "no known cause", the work a passing check does
not do, an edited C through a training step and a variant that raises.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from diagnose_common import (BASE, CAUSE_OF, C_EDITS, F, _builds, assert_diagnosed,  # noqa: F401 - c_mutants: a fixture
                             c_mutants, ce_log_eps, failures, family_of, gelu_coef_fwd, gelu_erf_fwd, port_with,
                             tiny_run)


from harness import CATALOGUE, VARIANT_BY_ID, check_kernel, first_divergence_check, make_inputs
from harness import report as R
from harness.diagnosis.catalogue import FAMILIES
from pyref import numpy_kernels as nk
from pyref.protocol import KernelSet
from pyref.spec import SPEC


def _family_tests() -> dict:
    """Each catalogue family's name -> its test module (test_diagnose_<family>.py, beside
    this one): the coverage test reads their PORTS, MODEL_LEVEL and MEAN_EDITS tables."""
    names = [m.__name__.rsplit(".", 1)[1] for m in FAMILIES]
    return {f: importlib.import_module(f"test_diagnose_{f}") for f in names}


# ----------------------------------------------------------------------------- coverage

def test_every_variant_has_a_port_and_a_c_edit_per_family():
    tests = _family_tests()
    PORTS = {vid: rows for mod in tests.values() for vid, rows in mod.PORTS.items()}
    MODEL_LEVEL = [vid for mod in tests.values() for vid in getattr(mod, "MODEL_LEVEL", [])]
    MEAN_EDITS = [e for mod in tests.values() for e in getattr(mod, "MEAN_EDITS", [])]
    for f, mod in tests.items():       # each family's module tests its own family's variants
        assert {family_of(v) for v in [*mod.PORTS, *getattr(mod, "MODEL_LEVEL", [])]} == {f}, f
    assert {CAUSE_OF.get(v, v) for v in [*PORTS, *MODEL_LEVEL]} | {v for v, *_ in MEAN_EDITS} == set(VARIANT_BY_ID)
    assert {VARIANT_BY_ID[CAUSE_OF.get(v, v)].family for v, *_ in C_EDITS + MEAN_EDITS} == \
        {v.family for v in CATALOGUE}
    for v in CATALOGUE:        # each variant's kernels are covered by its ports (some are
        covered = {row[0] for c, rows in PORTS.items() if CAUSE_OF.get(c, c) == v.id for row in rows}
        assert covered <= set(v.kernels)   # (some are invisible per op: zero scratch buffers)


def test_the_docs_list_every_cause_a_diagnosis_can_name():
    """docs/diagnosis.md's catalogue lists every variant's id and every id a variant's forms
    name (CAUSE_OF), each in backquotes; an id it lists is one of them."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "diagnosis.md").read_text()
    section = text[text.index("## The catalogue"):text.index("A new suspect is one `Variant`")]
    listed = set(re.findall(r"`([a-z]+\.[^`\s]+)`", section))
    known = set(VARIANT_BY_ID) | set(CAUSE_OF)
    assert known - listed == set(), "not in docs/diagnosis.md's list"
    families = {i.split(".")[0] for i in known}
    assert {i for i in listed if i.split(".")[0] in families} - known == set(), "listed but no cause"


def test_fitted_constants_are_reported():
    (c,) = failures(port_with("gelu_forward", gelu_coef_fwd), "gelu_forward")
    (cause,) = c.diagnosis.causes
    assert cause.value == pytest.approx(0.0447, rel=1e-3) and "0.0447 instead of 0.044715" in cause.description
    (c,) = failures(port_with("crossentropy_forward", ce_log_eps), "crossentropy_forward")
    assert c.diagnosis.causes[0].value == pytest.approx(1e-6, rel=0.05)


# ----------------------------------------------------------------------------- no known cause

def _noisy(kernel, index=0):
    """The right kernel with 1e-4 relative noise added to one element of one output."""
    f = getattr(nk, kernel)

    def port(*args):
        out = f(*args)
        if out is None:                       # in place (backward, AdamW): the first buffer
            buf = args[0]
        else:
            buf = out[index] if isinstance(out, tuple) else out
        flat = buf.reshape(-1)
        j = flat.size // 3
        flat[j] += F(1e-4) * (abs(flat[j]) + F(np.sqrt(np.mean(flat.astype(np.float64) ** 2))))
        return out
    return port


@pytest.mark.parametrize("kernel", ["gelu_forward", "gelu_backward", "layernorm_forward", "matmul_forward",
                                    "matmul_backward", "attention_forward", "softmax_forward",
                                    "crossentropy_forward", "crossentropy_softmax_backward", "adamw"])
def test_noise_on_one_element_has_no_known_cause(kernel):
    failed = failures(port_with(kernel, _noisy(kernel)), kernel)
    assert failed
    for c in failed:
        assert not c.diagnosis.known, c.diagnosis.text()
        assert c.diagnosis.tried                        # it did look
        assert c.diagnosis.text().startswith("no known cause")


# test_ops' mutants: those whose change the catalogue has are named with it (the systematic
# 1e-5 factors by the constant fitted to the output); the others have no known cause
MUTANT_CAUSES = {"encoder_forward": "embedding.no-wpe", "attention_forward": "output.scale",
                 "residual_forward": "output.scale", "crossentropy_forward": "output.scale"}


def test_uncatalogued_bugs_have_no_known_cause():
    """test_ops' mutants whose change is not in the catalogue: never a wrong cause."""
    from tests.ops.test_ops import MUTANTS
    for kernel in ("layernorm_backward", "gelu_backward", "crossentropy_softmax_backward"):
        failed = failures(port_with(kernel, MUTANTS[kernel][1]), kernel)
        assert failed and all(not c.diagnosis.known for c in failed), (kernel, [c.diagnosis.text() for c in failed])


@pytest.mark.parametrize("kernel", list(MUTANT_CAUSES))
def test_mutants_of_a_catalogued_kind_are_named(kernel):
    from tests.ops.test_ops import MUTANTS
    failed = failures(port_with(kernel, MUTANTS[kernel][1]), kernel)
    assert_diagnosed(failed, MUTANT_CAUSES[kernel])
    if MUTANT_CAUSES[kernel] == "output.scale":
        assert all(c.diagnosis.causes[0].value == pytest.approx(1 + 1e-5, abs=1e-7) for c in failed)


# ----------------------------------------------------------------------------- passing: no work

class _Counter:
    """A probe listener (harness.probe) counting the diagnoses the checks run."""

    def __init__(self):
        self.calls = 0

    def enter(self, category, detail):
        self.calls += category == "diagnose"

    def exit(self, token):
        pass


@pytest.fixture
def counted():
    from harness.probe import listening
    with listening(_Counter()) as c:
        yield c


def test_passing_checks_do_no_diagnosis_work(counted):
    impl = KernelSet.from_module(nk)
    for kernel, check in SPEC.items():
        assert all(c.passed for c in check_kernel(impl, kernel, make_inputs(check, BASE)))
    assert tiny_run(impls={"numpy": impl}).passed
    assert counted.calls == 0
    # and the counter does see a failure (the test above could not pass vacuously)
    failures(port_with("gelu_forward", gelu_erf_fwd), "gelu_forward")
    assert counted.calls == 1


# ----------------------------------------------------------------------------- the C, edited

def test_c_edits_need_few_builds():
    assert len(_builds()) <= 3


def test_edited_c_is_diagnosed_through_a_training_step(c_mutants):
    """One build carries an edit in each of several functions; the replay judges every op
    on the C's own inputs, so each failing op is diagnosed with its own edit."""
    group, lib = c_mutants[0]
    edited = {vid for vid, *_ in group}
    report = tiny_run(lib=lib, steps=2)
    assert not report.passed
    failed = [c for s in report.steps for c in s.checks if not c.passed and c.kind in ("replay", "update")]
    found = set()
    for c in failed:
        assert c.diagnosis is not None and c.diagnosis.known, (c.where, c.diagnosis.text())
        assert set(c.diagnosis.ids) <= edited, (c.where, c.diagnosis.text())
        found |= set(c.diagnosis.ids)
    # visible in a step: all but the overwrite of residual_backward (its buffers start at
    # zero in gpt2_backward) and labels and mean (the losses are not replayed)
    assert {"gelu.erf", "layernorm.eps=1e-06", "attention.scale=1/hs", "adamw.no-bias-correction",
            "matmul.no-bias", "backward.overwrite", "softmax.padded-columns"} <= found

    first = first_divergence_check([c for c in report.steps[0].checks if c.impl == "C"])
    assert first.diagnosis.known
    summary = R.run_summary(report)
    assert f"  why: {first.diagnosis.text()}" in summary
    table = R.step_table(report.steps[0])
    assert f"[C]   why: {first.diagnosis.text()}" in table
    data = R.to_json(report, versions=False)
    diagnosed = [c for s in data["steps"] for c in s["checks"] if c["diagnosis"] is not None]
    assert diagnosed and all(not c["passed"] for c in diagnosed)
    assert {cause["id"] for c in diagnosed for cause in c["diagnosis"]["causes"]} == found
    # the end-to-end gradients fail from the edits upstream, which the loss mean does not explain
    e2e = [c for c in diagnosed if c["kind"] in ("e2e", "loss")]
    assert e2e and not any(c["diagnosis"]["known"] for c in e2e)


# ----------------------------------------------------------------------------- the engine

def test_a_variant_that_raises_is_skipped_not_fatal(monkeypatch):
    import harness.diagnosis as D

    def boom(kernel, args, ctx, value):
        raise RuntimeError("variant bug")
    broken = D.Variant("gelu.broken", "gelu", ("gelu_forward",), "a variant that raises", boom)
    monkeypatch.setattr(D.catalogue, "CATALOGUE", D.CATALOGUE + (broken,))
    (c,) = failures(port_with("gelu_forward", gelu_erf_fwd), "gelu_forward")
    assert not c.passed and c.diagnosis.ids == ("gelu.erf",)
    assert c.diagnosis.skipped == (("gelu.broken", "RuntimeError: variant bug"),)


def test_kernels_without_variants_say_so(monkeypatch):
    import harness.diagnosis as D
    from tests.ops.test_ops import MUTANTS
    monkeypatch.setattr(D.catalogue, "CATALOGUE", tuple(v for v in D.CATALOGUE if "encoder_forward" not in v.kernels))
    (c,) = failures(port_with("encoder_forward", MUTANTS["encoder_forward"][1]), "encoder_forward")
    assert c.diagnosis.text() == "no known cause: the catalogue has no change to encoder_forward"
