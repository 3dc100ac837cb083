"""Hostile kernel calls: the C kernels called through the Library (and the CKernels
adapter) with arrays of the wrong dtype, size, layout or writability, things that are not
arrays, nonsense or int-overflowing dimensions, token ids out of range; and NaN or Inf in
a kernel's inputs, which is data to compare, not an error.

Each test asserts a clear exception (its type, and a message naming what is wrong) AND
that the process lives on: the binding's checks run before any C call, so a missing one
would take pytest down. tests/binding/hostile_common.py holds what the hostile tests share.
"""
from __future__ import annotations

import numpy as np
import pytest

from hostile_common import B, T, _user, lib  # noqa: F401 (fixtures)

from harness import CKernels, LlmcInputError, check_kernel, format_table, make_inputs
from pyref.cases import SHAPE_BY_NAME
from pyref.spec import SPEC


# ----------------------------------------------------------------------------- the C kernels

def _f(*shape):
    return np.zeros(shape, np.float32)


def _kernel_calls():
    """(name, call(lib, overrides) building a valid call of a kernel of the Library)."""
    C, Vp, V, maxT, NH, OC = 8, 12, 10, 6, 2, 5

    def enc(lib, **o):
        a = dict(out=_f(B, T // 2, C), inp=np.zeros((B, T // 2), np.int32), wte=_f(Vp, C),
                 wpe=_f(maxT, C), B=B, T=T // 2, C=C)
        a.update(o)
        lib.encoder_forward(**a)

    def ln(lib, **o):
        a = dict(out=_f(B, T, C), mean=_f(B, T), rstd=_f(B, T), inp=_f(B, T, C), weight=_f(C),
                 bias=_f(C), B=B, T=T, C=C)
        a.update(o)
        lib.layernorm_forward(**a)

    def mm(lib, **o):
        a = dict(out=_f(B, T, OC), inp=_f(B, T, C), weight=_f(OC, C), bias=_f(OC),
                 B=B, T=T, C=C, OC=OC)
        a.update(o)
        lib.matmul_forward(**a)

    def att(lib, **o):
        a = dict(out=_f(B, T, C), preatt=_f(B, NH, T, T), att=_f(B, NH, T, T),
                 inp=_f(B, T, 3 * C), B=B, T=T, C=C, NH=NH)
        a.update(o)
        lib.attention_forward(**a)

    def gelu(lib, **o):
        a = dict(out=_f(B * T), inp=_f(B * T), N=B * T)
        a.update(o)
        lib.gelu_forward(**a)

    def smax(lib, **o):
        a = dict(probs=_f(B, T, Vp), logits=_f(B, T, Vp), B=B, T=T, V=V, Vp=Vp)
        a.update(o)
        lib.softmax_forward(**a)

    def xent(lib, **o):
        a = dict(losses=_f(B, T), probs=np.full((B, T, Vp), 0.1, np.float32),
                 targets=np.zeros((B, T), np.int32), B=B, T=T, Vp=Vp)
        a.update(o)
        lib.crossentropy_forward(**a)

    def xentb(lib, **o):
        a = dict(dlogits=_f(B, T, Vp), dlosses=_f(B, T), probs=_f(B, T, Vp),
                 targets=np.zeros((B, T), np.int32), B=B, T=T, V=V, Vp=Vp)
        a.update(o)
        lib.crossentropy_softmax_backward(**a)

    return dict(encoder_forward=enc, layernorm_forward=ln, matmul_forward=mm,
                attention_forward=att, gelu_forward=gelu, softmax_forward=smax,
                crossentropy_forward=xent, crossentropy_softmax_backward=xentb)


KERNEL_CALLS = _kernel_calls()
# the output argument and a float input argument of each
OUT_IN = dict(encoder_forward=("out", "wte"), layernorm_forward=("out", "inp"),
              matmul_forward=("out", "weight"), attention_forward=("att", "inp"),
              gelu_forward=("out", "inp"), softmax_forward=("probs", "logits"),
              crossentropy_forward=("losses", "probs"),
              crossentropy_softmax_backward=("dlogits", "probs"))


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
def test_kernel_valid_call_runs(lib, kernel):
    KERNEL_CALLS[kernel](lib)


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
@pytest.mark.parametrize("role", ["out", "in"])
def test_kernel_wrong_dtype(lib, kernel, role):
    name = OUT_IN[kernel][role == "in"]
    good = _kernel_default(kernel, name)
    with pytest.raises(LlmcInputError, match=rf"^{name}: expected dtype float32, got float64"):
        KERNEL_CALLS[kernel](lib, **{name: good.astype(np.float64)})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
@pytest.mark.parametrize("role", ["out", "in"])
def test_kernel_wrong_size(lib, kernel, role):
    name = OUT_IN[kernel][role == "in"]
    good = _kernel_default(kernel, name)
    for bad in (good.ravel()[:-1], np.zeros(good.size + 1, np.float32)):
        # a table (wte, wpe) whose row count the binding infers: not a whole number of rows
        pattern = (rf"^{name}: (expected {good.size} elements, got {bad.size}|"
                   rf"{bad.size} elements is not a whole number of rows)")
        with pytest.raises(LlmcInputError, match=pattern):
            KERNEL_CALLS[kernel](lib, **{name: bad})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
@pytest.mark.parametrize("role", ["out", "in"])
def test_kernel_not_contiguous(lib, kernel, role):
    name = OUT_IN[kernel][role == "in"]
    good = _kernel_default(kernel, name)
    strided = np.zeros(2 * good.size, np.float32)[::2]          # right size, every other one
    with pytest.raises(LlmcInputError, match=rf"^{name}: array is not C-contiguous"):
        KERNEL_CALLS[kernel](lib, **{name: strided})
    if good.ndim == 2 and min(good.shape) > 1:
        with pytest.raises(LlmcInputError, match="not C-contiguous"):
            KERNEL_CALLS[kernel](lib, **{name: np.asfortranarray(good)})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
def test_kernel_read_only_output(lib, kernel):
    name = OUT_IN[kernel][0]
    ro = _kernel_default(kernel, name).copy()
    ro.flags.writeable = False
    with pytest.raises(LlmcInputError, match=rf"^{name}: output array is read-only"):
        KERNEL_CALLS[kernel](lib, **{name: ro})
    assert not ro.any()                    # and nothing was written into it


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
def test_kernel_read_only_input_is_fine(lib, kernel):
    name = OUT_IN[kernel][1]
    ro = _kernel_default(kernel, name).copy()
    ro.flags.writeable = False
    KERNEL_CALLS[kernel](lib, **{name: ro})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
def test_kernel_not_an_array(lib, kernel):
    name = OUT_IN[kernel][1]
    with pytest.raises(LlmcInputError, match=rf"^{name}: expected a numpy array, got list"):
        KERNEL_CALLS[kernel](lib, **{name: _kernel_default(kernel, name).tolist()})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
@pytest.mark.parametrize("value,pattern", [(0, "must be positive, got 0"),
                                           (-3, "must be positive, got -3"),
                                           (2.0, "must be an int, got float"),
                                           (True, "must be an int, got bool")])
def test_kernel_bad_dimension(lib, kernel, value, pattern):
    dim = "N" if kernel == "gelu_forward" else "B"
    with pytest.raises(LlmcInputError, match=rf"^{dim} {pattern}"):
        KERNEL_CALLS[kernel](lib, **{dim: value})


@pytest.mark.parametrize("kernel", KERNEL_CALLS)
def test_kernel_dimensions_overflowing_int(lib, kernel):
    """Sizes the C would compute in int (b*T*C...) and overflow: refused before the arrays
    are even looked at."""
    dims = dict(N=2**31) if kernel == "gelu_forward" else dict(B=2**20, T=2**12)
    with pytest.raises(LlmcInputError, match=r"overflows the C's int indexing"):
        KERNEL_CALLS[kernel](lib, **dims)


def _kernel_default(kernel, name):
    """The array a valid call of ``kernel`` passes as ``name``."""
    seen = {}

    class Spy:
        def __getattr__(self, fn):
            return lambda **kw: seen.update(kw)

    KERNEL_CALLS[kernel](Spy())
    return seen[name]


@pytest.mark.parametrize("bad_id", [-1, 12, 2**31 - 1])
def test_encoder_kernel_token_out_of_range(lib, bad_id):
    inp = np.zeros((B, T // 2), np.int32)
    inp[1, 2] = bad_id
    with pytest.raises(LlmcInputError, match=rf"^inp: token id {bad_id} at flat index 6 is outside \[0, 12\)"):
        KERNEL_CALLS["encoder_forward"](lib, inp=inp)
    with pytest.raises(LlmcInputError, match=r"^inp: expected dtype int32 \(C int\), got int64"):
        KERNEL_CALLS["encoder_forward"](lib, inp=np.zeros((B, T // 2), np.int64))


def test_encoder_kernel_T_above_wpe_rows(lib):
    with pytest.raises(LlmcInputError, match=r"T=7 exceeds the 6 rows of wpe"):
        KERNEL_CALLS["encoder_forward"](lib, T=7, out=_f(B, 7, 8), inp=np.zeros((B, 7), np.int32))
    with pytest.raises(LlmcInputError, match="not a whole number of rows"):
        KERNEL_CALLS["encoder_forward"](lib, wte=_f(12 * 8 + 1))


@pytest.mark.parametrize("bad_id", [-1, 12])
def test_crossentropy_kernel_target_out_of_range(lib, bad_id):
    tg = np.zeros((B, T), np.int32)
    tg[0, 5] = bad_id
    with pytest.raises(LlmcInputError, match=rf"^targets: token id {bad_id} .* outside \[0, 12\)"):
        KERNEL_CALLS["crossentropy_forward"](lib, targets=tg)


@pytest.mark.parametrize("bad_id", [-1, 10, 11])
def test_crossentropy_backward_kernel_target_out_of_range(lib, bad_id):
    """The backward indexes the one-hot over V: V..Vp-1 is out of range too."""
    tg = np.zeros((B, T), np.int32)
    tg[1, 7] = bad_id
    with pytest.raises(LlmcInputError, match=rf"^targets: token id {bad_id} .* outside \[0, 10\)"):
        KERNEL_CALLS["crossentropy_softmax_backward"](lib, targets=tg)


def test_softmax_kernel_V_above_Vp(lib):
    with pytest.raises(LlmcInputError, match=r"V=13 exceeds the padded vocabulary Vp=12"):
        KERNEL_CALLS["softmax_forward"](lib, V=13)


def test_attention_kernel_C_not_divisible_by_NH(lib):
    with pytest.raises(LlmcInputError, match=r"C=8 is not divisible by NH=3"):
        KERNEL_CALLS["attention_forward"](lib, NH=3)
    # the same through the protocol adapter, with the C's own shapes
    ck = CKernels(lib)
    with pytest.raises(LlmcInputError, match="not divisible by NH=3"):
        ck.attention_forward(_f(B, T, 24), 3)
    with pytest.raises(LlmcInputError, match="is not 3\\*C"):
        ck.attention_forward(_f(B, T, 25), 5)


def test_ckernels_adapter_refuses_too(lib):
    """CKernels (the C as a protocol implementation) gets the same guards."""
    ck = CKernels(lib)
    wte, wpe = _f(12, 8), _f(6, 8)
    with pytest.raises(LlmcInputError, match="outside"):
        ck.encoder_forward(np.full((B, 4), 12, np.int32), wte, wpe)
    with pytest.raises(LlmcInputError, match="float32"):
        ck.gelu_forward(np.zeros(10))
    with pytest.raises(LlmcInputError, match="3-d"):
        ck.layernorm_forward(_f(4, 8), _f(8), _f(8))
    with pytest.raises(LlmcInputError, match="C-contiguous"):
        ck.matmul_forward(_f(B, T, 16)[..., ::2], _f(5, 8), None)


def test_library_set_num_threads_refuses_nonsense(lib):
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            lib.set_num_threads(n)


# ----------------------------------------------------------------------------- non-finite inputs

def test_nonfinite_kernel_inputs_are_reported(lib):
    """Per-op: NaN in a kernel input propagates in the C as in the oracle (equal under
    nan_equal); a port that makes NaN where the oracle has numbers is a failed check with
    the non-finite count, not an exception."""
    s = SHAPE_BY_NAME["base"]
    args = make_inputs(SPEC["layernorm_forward"], s)
    args["inp"][0, 0, 0] = np.nan
    args["weight"][3] = np.inf
    res = check_kernel(CKernels(lib), "layernorm_forward", args)
    assert all(c.passed for c in res), format_table(res)

    args = make_inputs(SPEC["layernorm_forward"], s)

    def nan_port(inp, weight, bias):
        out, mean, rstd = (np.array(a) for a in CKernels(lib).layernorm_forward(inp, weight, bias))
        out[1, 2, 3] = np.nan
        rstd[0, 0] = np.inf
        return out, mean, rstd

    res = {c.name: c for c in check_kernel(_user(layernorm_forward=nan_port),
                                           "layernorm_forward", args)}
    assert res["layernorm_forward.out"].n_nonfinite_mismatch == 1
    assert res["layernorm_forward.out"].worst_index == (1, 2, 3)
    assert res["layernorm_forward.rstd"].n_nonfinite_mismatch == 1
    assert not res["layernorm_forward.out"].passed and res["layernorm_forward.mean"].passed
