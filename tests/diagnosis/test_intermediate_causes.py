"""A failing attention_backward explained by one of the reference's intermediates left out
(harness/diagnosis/catalogue/attention.py, from pyref/intermediates.py).

The softmax Jacobian att[t2] * ((t2 == t3) - att[t3]) applied to datt is a diagonal term
(att * datt) less an off-diagonal sum (att * sum(att * datt)). A C edit that drops either
(the indicator, or the - att[t3]) was "no known cause" before the catalogue read the
reference's steps; now each is named, by its own variant and not the other's. The correct
C, and a C whose attention_backward is wrong in another way (no scale), are not: the variants
do not explain what they compute.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import edit_function, pristine_source

from harness import CKernels, DiagnosedComparison, build_library, check_kernel, load_library, make_inputs
from harness.checks.verdict import call_scale
from harness.arbiter.tolerances import op_tolerance
from harness.diagnosis import VARIANT_BY_ID, Call, diagnose_with
from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME
from pyref.protocol import KernelSet, as64, run_kernel
from pyref.spec import SPEC

F = np.float32
KERNEL = "attention_backward"
JACOBIAN = ("attention.jacobian-no-diagonal", "attention.jacobian-no-sum")

# (variant, old text, new text) in the C's attention_backward
C_EDITS = {
    "attention.jacobian-no-diagonal": ("float indicator = t2 == t3 ? 1.0f : 0.0f;", "float indicator = 0.0f;"),
    "attention.jacobian-no-sum": ("att_bth[t2] * (indicator - att_bth[t3]);", "att_bth[t2] * indicator;"),
}


def _failures(impl, shape="base", seed=0):
    results = check_kernel(impl, KERNEL, make_inputs(SPEC[KERNEL], SHAPE_BY_NAME[shape], seed=seed))
    return [c for c in results if not c.passed]


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """{variant: the C's kernels with that edit}, built in their own folders."""
    libs = {}
    for vid, (old, new) in C_EDITS.items():
        d = tmp_path_factory.mktemp(vid.split(".")[1])
        (d / "train_gpt2.c").write_text(edit_function(pristine_source(), KERNEL, old, new, once=True))
        libs[vid] = CKernels(load_library(build_library(d / "train_gpt2.c", d / "lib.so", quiet=True).library))
    return libs


@pytest.mark.parametrize("variant_id", JACOBIAN)
@pytest.mark.parametrize("shape", ["base", "odd"])
def test_the_edited_c_is_named_by_the_left_out_term(edited, variant_id, shape):
    failed = _failures(edited[variant_id], shape)
    assert {c.name for c in failed} >= {f"{KERNEL}.dinp", f"{KERNEL}.dpreatt"}   # datt is before the softmax
    for c in failed:
        assert isinstance(c, DiagnosedComparison)
        assert c.diagnosis.ids == (variant_id,), c.diagnosis.text()
        assert "Jacobian" in c.diagnosis.text()


def _port_without(term: str):
    """attention_backward in float32 as a port writes it, the Jacobian's ``term`` dropped
    (written from the C's loops, not from the reference's steps)."""
    def attention_backward(dinp, dpreatt, datt, dout, inp, att, NH):
        B, T, C3 = inp.shape
        C, hs = C3 // 3, C3 // 3 // NH
        heads = [inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3)]
        q, k, v = heads
        do = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
        tri = np.tril(np.ones((T, T), bool))
        da = np.where(tri, datt + do @ v.transpose(0, 1, 3, 2), datt).astype(F)
        datt[...] = da
        keep_diag, keep_sum = term != "diagonal", term != "sum"
        dsoft = (att * da * F(keep_diag) - att * (att * da).sum(-1, keepdims=True) * F(keep_sum)).astype(F)
        dpreatt += np.where(tri, dsoft, F(0))
        scale = F(1 / np.sqrt(hs))
        dq, dk, dv = (dpreatt @ k) * scale, (dpreatt.transpose(0, 1, 3, 2) @ q) * scale, att.transpose(0, 1, 3, 2) @ do
        dinp += np.concatenate([x.transpose(0, 2, 1, 3).reshape(B, T, C) for x in (dq, dk, dv)], -1)
    return attention_backward


@pytest.mark.parametrize("variant_id, term", [(JACOBIAN[0], "diagonal"), (JACOBIAN[1], "sum")])
def test_a_port_without_the_term_is_named(variant_id, term):
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs[KERNEL] = _port_without(term)
    failed = _failures(KernelSet(funcs, backend="numpy", name=f"port (no Jacobian {term})"))
    assert failed and all(c.diagnosis.ids == (variant_id,) for c in failed), [c.diagnosis.text() for c in failed]


def _diagnosed(actual_kernels, output: str):
    """The Jacobian variants' diagnosis of ``actual_kernels``' ``output``, judged as the
    per-op check judges it (whether or not the check fails)."""
    args = make_inputs(SPEC[KERNEL], SHAPE_BY_NAME["base"])
    a64 = as64(args, copy=True)
    expected = run_kernel(nk, KERNEL, a64, np.float64)
    actual = run_kernel(actual_kernels, KERNEL, args, np.float32)[output]
    tol = op_tolerance(KERNEL, output, SPEC[KERNEL].n(output, a64), actual.size)
    return diagnose_with(Call(KERNEL, output, a64), actual, expected[output], variants=[VARIANT_BY_ID[v] for v in JACOBIAN],
                         tol=tol, mask=SPEC[KERNEL].mask(output, a64), axes=SPEC[KERNEL].output(output).axes,
                         elem_scale=call_scale(KERNEL, output, a64, expected))


@pytest.mark.parametrize("output", ["dinp", "dpreatt"])
def test_the_correct_c_is_not_explained_by_a_left_out_term(output):
    """What the right C computes is not what either variant computes: the variants tell the
    Jacobian's terms apart from the whole."""
    d = _diagnosed(CKernels(load_library()), output)
    assert d.tried == JACOBIAN and not d.known, d.text()


def test_another_mistake_in_attention_backward_is_not_named_by_them():
    """dq and dk without the scale (test_ops' mutant): dpreatt is right, dinp is off, and
    neither term left out explains it."""
    def noscale(dinp, dpreatt, datt, dout, inp, att, NH):
        C = inp.shape[-1] // 3
        before = dinp.copy()
        nk.attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)
        dinp[..., :2 * C] = before[..., :2 * C] + (dinp[..., :2 * C] - before[..., :2 * C]) * np.sqrt(F(C // NH))
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs[KERNEL] = noscale
    d = _diagnosed(KernelSet(funcs, backend="numpy"), "dinp")
    assert not d.known, d.text()
    # and the whole catalogue names the scale, not a Jacobian term
    (c,) = _failures(KernelSet(funcs, backend="numpy"))
    assert c.diagnosis.known and not set(c.diagnosis.ids) & set(JACOBIAN), c.diagnosis.text()
