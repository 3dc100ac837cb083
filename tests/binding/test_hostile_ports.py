"""Hostile ports: a user's kernel module whose kernels return the wrong number of
outputs, the wrong shape, None or junk, are missing, raise, or overwrite a backward's
gradients: each is a clear error naming the kernel, or a failed check, never a crash.
"""
from __future__ import annotations

import pytest

from hostile_common import _user

from harness import check_kernel, make_inputs
from pyref.cases import SHAPE_BY_NAME
from pyref.spec import SPEC


# ----------------------------------------------------------------------------- user kernel modules

def _case(kernel):
    s = SHAPE_BY_NAME["base"]
    return make_inputs(SPEC[kernel], s), s


def test_user_kernel_wrong_number_of_outputs():
    args, s = _case("layernorm_forward")
    ks = _user(layernorm_forward=lambda inp, w, b: (inp, inp))
    with pytest.raises(TypeError, match=r"userport\.layernorm_forward returned 2 output\(s\), expected 3"):
        check_kernel(ks, "layernorm_forward", args)


def test_user_kernel_wrong_shape():
    args, s = _case("layernorm_forward")
    ks = _user(layernorm_forward=lambda inp, w, b: (inp[..., :3], inp[..., 0], inp[..., 0]))
    with pytest.raises(ValueError, match=r"userport\.layernorm_forward output 0 has shape \(2, 8, 3\), "
                                         r"expected \(2, 8, 32\)"):
        check_kernel(ks, "layernorm_forward", args)
    args, s = _case("softmax_forward")
    ks = _user(softmax_forward=lambda logits, V: logits[..., :V])       # V wide, not Vp
    with pytest.raises(ValueError, match=r"userport\.softmax_forward output has shape .*expected"):
        check_kernel(ks, "softmax_forward", args)


def test_user_kernel_returns_none_or_junk():
    args, s = _case("gelu_forward")
    with pytest.raises(TypeError, match=r"userport\.gelu_forward returned None"):
        check_kernel(_user(gelu_forward=lambda x: None), "gelu_forward", args)
    with pytest.raises(ValueError, match=r"userport\.gelu_forward output has shape \(\)"):
        check_kernel(_user(gelu_forward=lambda x: "junk"), "gelu_forward", args)


def test_user_kernel_missing():
    args, s = _case("gelu_forward")
    with pytest.raises(NotImplementedError, match=r"userport does not define kernel gelu_forward"):
        check_kernel(_user(), "gelu_forward", args)


@pytest.mark.parametrize("kernel", ["layernorm_forward", "matmul_backward"])
def test_user_kernel_that_raises_is_named(kernel):
    """A kernel that raises: the error that reaches the user names the kernel (and the
    implementation), not just the port's own message."""
    args, s = _case(kernel)

    def boom(*a):
        raise RuntimeError("index 99 is out of bounds")

    with pytest.raises(Exception) as info:
        check_kernel(_user(**{kernel: boom}), kernel, args)
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert kernel in text, f"the error does not name the kernel: {text!r}"
    assert "index 99 is out of bounds" in text


def test_user_backward_that_overwrites_is_a_failed_check_not_an_error():
    args, s = _case("residual_backward")

    def overwrite(dinp1, dinp2, dout):
        dinp1[...] = dout
        dinp2[...] = dout

    res = check_kernel(_user(residual_backward=overwrite), "residual_backward", args)
    assert res and not any(c.passed for c in res)
