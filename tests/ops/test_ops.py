"""Per-op checks: every kernel x every shape x every implementation, against the oracle.

One helper compares (harness.checks.perop.check_kernel); the tests are table rows. Test ids
carry the op name, so `pytest -k layernorm` runs layernorm's forward and backward rows.
"""
from __future__ import annotations

import numpy as np
import pytest

from harness import CKernels, assert_case, assert_kernel, case_id, cases, check_kernel, load_library, make_inputs
from harness.arbiter.compare import ParityError
from pyref.cases import SHAPE_BY_NAME
from pyref.spec import SPEC
from pyref import numpy_kernels as nk
from pyref import torch_kernels
from pyref.protocol import KernelSet

IMPLS = {
    "C": lambda: CKernels(load_library()),
    "C-naive-matmul": lambda: CKernels(load_library(), naive_matmul=True),
    "numpy": lambda: KernelSet.from_module(nk),
    "torch": lambda: KernelSet.from_module(torch_kernels),
}
_impl_cache: dict = {}


def impl(name):
    if name not in _impl_cache:
        _impl_cache[name] = IMPLS[name]()
    return _impl_cache[name]


# every kernel x shape x implementation; the naive matmul path only exists for matmul_forward
CASES = [pytest.param(spec.name, s.name, impl_name, id=f"{case_id(spec, s)}-{impl_name}")
         for spec, s in cases() for impl_name in IMPLS
         if impl_name != "C-naive-matmul" or spec.name == "matmul_forward"]


@pytest.mark.parametrize("kernel, shape, impl_name", CASES)
def test_kernel_matches_oracle(kernel, shape, impl_name, parity_record):
    parity_record(assert_case(impl(impl_name), kernel, shape, label=impl_name))


# ----------------------------------------------------------------------------
# Mutants: a deliberately wrong kernel must fail, with a message that names the op, the
# tensor and the worst element. Each is the NumPy kernel with one realistic bug.

def _ln_eps(inp, weight, bias):          # eps changed 1e-5 -> 1e-4
    m = inp.mean(-1, keepdims=True)
    v = ((inp - m) ** 2).mean(-1, keepdims=True)
    s = 1 / np.sqrt(v + inp.dtype.type(1e-4))
    return (s * (inp - m)) * weight + bias, m[..., 0], s[..., 0]


def _ln_back_drop(dinp, dweight, dbias, dout, inp, weight, mean, rstd):   # a term dropped
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = weight * dout
    dbias += dout.sum((0, 1))
    dweight += (norm * dout).sum((0, 1))
    dinp += (dnorm - dnorm.mean(-1, keepdims=True)) * rstd[..., None]


def _scaled(kernel, factor, index=0):
    """A systematic relative change: output ``index`` times ``factor``."""
    f = getattr(nk, kernel)

    def mutant(*args):
        out = f(*args)
        if isinstance(out, tuple):
            out = list(out)
            out[index] = out[index] * out[index].dtype.type(factor)
            return tuple(out)
        return out * out.dtype.type(factor)
    return mutant


def _overwrite(kernel, arg):
    """``+=`` turned into ``=`` for gradient ``arg``."""
    from pyref.protocol import SIGNATURES
    f = getattr(nk, kernel)
    pos = SIGNATURES[kernel].index(arg)

    def mutant(*args):
        args = list(args)
        args[pos][...] = 0
        f(*args)
    return mutant


def _matmul_nobias(inp, weight, bias):
    return inp @ weight.T


def _gelu_coef(inp):
    s = np.sqrt(inp.dtype.type(2.0) / inp.dtype.type(np.pi))
    return inp.dtype.type(0.5) * inp * (1 + np.tanh(s * (inp + inp.dtype.type(0.0447) * inp ** 3)))


def _gelu_back_drop(dinp, inp, dout):     # the sech^2 term dropped
    s = np.sqrt(inp.dtype.type(2.0) / inp.dtype.type(np.pi))
    th = np.tanh(s * (inp + inp.dtype.type(0.044715) * inp ** 3))
    dinp += inp.dtype.type(0.5) * (1 + th) * dout


def _softmax_padded(logits, V):           # normalises over the padding too
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce_back_no_dloss(dlogits, dlosses, probs, targets, V):  # forgets the chain rule factor
    nk.crossentropy_softmax_backward(dlogits, np.ones_like(dlosses), probs, targets, V)


def _attention_back_noscale(dinp, dpreatt, datt, dout, inp, att, NH):
    # runs the correct kernel, then undoes nothing but drops the 1/sqrt(hs) on dq, dk
    C = inp.shape[-1] // 3
    before = dinp.copy()
    nk.attention_backward(dinp, dpreatt, datt, dout, inp, att, NH)
    hs = C // NH
    delta = dinp[..., :2 * C] - before[..., :2 * C]
    dinp[..., :2 * C] = before[..., :2 * C] + delta * np.sqrt(dinp.dtype.type(hs))


def _adamw_off_by_one(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    nk.adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t + 1)


def _encoder_no_wpe(inp, wte, wpe):
    return wte[inp]


MUTANTS = {
    "encoder_forward": ("position embedding dropped", _encoder_no_wpe),
    "encoder_backward": ("dwpe: += turned into =", _overwrite("encoder_backward", "dwpe")),
    "layernorm_forward": ("eps 1e-5 -> 1e-4", _ln_eps),
    "layernorm_backward": ("norm * dnorm_norm_mean term dropped", _ln_back_drop),
    "matmul_forward": ("bias dropped", _matmul_nobias),
    "matmul_backward": ("dbias: += turned into =", _overwrite("matmul_backward", "dbias")),
    "attention_forward": ("output off by 1e-5 relative", _scaled("attention_forward", 1 + 1e-5)),
    "attention_backward": ("1/sqrt(hs) dropped from dq, dk", _attention_back_noscale),
    "gelu_forward": ("0.044715 -> 0.0447", _gelu_coef),
    "gelu_backward": ("sech^2 term dropped", _gelu_back_drop),
    "residual_forward": ("output off by 1e-5 relative", _scaled("residual_forward", 1 + 1e-5)),
    "residual_backward": ("dinp2: += turned into =", _overwrite("residual_backward", "dinp2")),
    "softmax_forward": ("normalised over the padded columns too", _softmax_padded),
    "crossentropy_forward": ("losses off by 1e-5 relative", _scaled("crossentropy_forward", 1 + 1e-5)),
    "crossentropy_softmax_backward": ("dlosses factor dropped", _ce_back_no_dloss),
    "adamw": ("bias correction step off by one", _adamw_off_by_one),
}


def test_every_kernel_has_a_mutant():
    assert set(MUTANTS) == set(SPEC)


@pytest.mark.parametrize("kernel", [pytest.param(k, id=f"{SPEC[k].op}-{k}") for k in MUTANTS])
def test_mutant_kernel_fails(kernel):
    what, fn = MUTANTS[kernel]
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs[kernel] = fn
    mutant = KernelSet(funcs, backend="numpy", name=f"mutant ({what})")
    s = SHAPE_BY_NAME["base"]
    with pytest.raises(ParityError) as info:
        assert_kernel(mutant, kernel, make_inputs(SPEC[kernel], s, seed=0), label="mutant")
    msg = str(info.value)
    assert kernel in msg, msg                      # names the op
    assert "worst" in msg.lower(), msg             # and the worst element


def test_systematic_1e5_change_fails_every_forward_output():
    """A 1e-5 relative change of any forward output fails its norm-wise bound."""
    from pyref.protocol import FORWARD_OUTPUTS
    s = SHAPE_BY_NAME["wide"]
    for kernel, outs in FORWARD_OUTPUTS.items():
        for i, out in enumerate(outs):
            funcs = {name: getattr(nk, name) for name in SPEC}
            funcs[kernel] = _scaled(kernel, 1 + 1e-5, i)
            results = check_kernel(KernelSet(funcs, backend="numpy"), kernel,
                                   make_inputs(SPEC[kernel], s, seed=1))
            failed = [c for c in results if not c.passed]
            assert any(c.name.startswith(f"{kernel}.{out}") for c in failed), (kernel, out)
