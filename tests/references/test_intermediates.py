"""The reference's intermediates (pyref/intermediates.py): each kernel's named float64
steps end in its outputs, which are the float64 oracle's (pyref/numpy_kernels.py) bit for
bit; the steps come in the documented order; the steps that are not on the way to an output
are tied to it by an identity; and a deliberately wrong intermediate (a variance over C - 1,
the Jacobian without its diagonal) shows in the outputs, so these checks can fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyref import intermediates as I
from pyref import numpy_kernels as nk
from pyref.cases import SHAPES
from pyref.protocol import run_kernel
from pyref.spec import SPEC, SPECS

CASES = [pytest.param(spec.name, s, id=f"{spec.name}-{s.name}") for spec in SPECS for s in SHAPES
         if spec.shapes is None or s.name in spec.shapes]


def _args(kernel, shape, seed=0):
    return SPEC[kernel].make(shape, np.random.default_rng([seed, SHAPES.index(shape)]))


def outputs_off(kernel: str, args: dict, steps: dict) -> list[str]:
    """The outputs of ``kernel`` that ``steps`` do not hold as the oracle computes them on
    ``args`` (float64): equal, or within 1 ulp of the larger."""
    expected = run_kernel(nk, kernel, args, np.float64)
    off = []
    for name, want in expected.items():
        got = steps.get(name)
        if got is None or got.shape != want.shape:
            off.append(name)
            continue
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        ulp = np.spacing(np.maximum(np.abs(got), np.abs(want)))
        with np.errstate(invalid="ignore"):
            if not np.all(same | (np.abs(got - want) <= ulp)):
                off.append(name)
    return off


@pytest.mark.parametrize("kernel, shape", CASES)
def test_the_steps_end_in_the_oracles_outputs(kernel, shape):
    args = _args(kernel, shape)
    steps = I.intermediates(kernel, args)
    assert outputs_off(kernel, args, steps) == []
    assert all(v.dtype == np.float64 for v in steps.values())
    outputs = [o for o in SPEC[kernel].output_names if o in steps]
    names = list(steps)
    if SPEC[kernel].returns:           # a forward: its main output is its last step
        assert names[-1] == outputs[0]
    else:                              # a backward, AdamW: its outputs, in the row's order, last
        assert names[-len(outputs):] == outputs


@pytest.mark.parametrize("kernel", list(SPEC))
def test_the_steps_come_in_the_documented_order(kernel):
    shape = next(s for s in SHAPES if SPEC[kernel].shapes is None or s.name in SPEC[kernel].shapes)
    steps = I.intermediates(kernel, _args(kernel, shape))
    documented = [s.name for s in I.steps(kernel)]
    assert list(steps) == [n for n in documented if n in steps]
    assert len(steps) >= len(documented) - 2           # only an absent bias's two are left out
    assert set(SPEC[kernel].output_names) & set(documented) == set(SPEC[kernel].output_names)


def test_the_named_steps_of_the_issue():
    """The steps issue 30 names, in the order the C computes them."""
    want = {"attention_forward": ["q", "k", "v", "scores", "preatt", "masked", "att", "weighted", "out"],
            "layernorm_forward": ["mean", "xshift", "var", "rstd", "norm", "out"],
            "gelu_forward": ["inner", "scaled", "tanh", "out"],
            "matmul_forward": ["product", "out"],
            "layernorm_backward": ["norm", "dnorm", "dnorm_mean", "dnorm_norm_mean", "dinp_add", "dinp", "dweight",
                                   "dbias"],
            "gelu_backward": ["inner", "scaled", "tanh", "sech2", "local", "dinp"],
            "crossentropy_softmax_backward": ["onehot", "diff", "dlogits"]}
    for kernel, names in want.items():
        assert [s.name for s in I.steps(kernel)] == names, kernel
    softmax = [s.name for s in I.steps("softmax_forward")]
    assert softmax.index("shift") < softmax.index("lse") < softmax.index("logprobs") < softmax.index("probs")
    back = [s.name for s in I.steps("attention_backward")]
    assert back.index("datt_add") < back.index("diag") < back.index("dpreatt_add") < back.index("dq")
    assert back.index("offdiag") < back.index("dpreatt_add")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: s.name)
def test_the_steps_off_the_outputs_path_are_tied_to_them(shape):
    """The Jacobian's diagonal term less its off-diagonal sum is the softmax's backward;
    log-sum-exp and log-probabilities are the probabilities' logarithms; the weighted values
    per head are the output, merged; the picked entry's log is minus the loss."""
    att = I.intermediates("attention_backward", _args("attention_backward", shape))
    terms = np.abs(att["diag"]) + np.abs(att["offdiag"])
    tri = np.tril(np.ones(att["diag"].shape[-2:], bool))
    assert np.all(np.abs(np.where(tri, att["diag"] - att["offdiag"], 0) - att["dpreatt_add"]) <= 4e-16 * terms)
    sm = I.intermediates("softmax_forward", _args("softmax_forward", shape))
    V = sm["vlogits"].shape[-1]
    np.testing.assert_allclose(np.exp(sm["logprobs"]), sm["probs"][..., :V], rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(sm["vlogits"] - sm["lse"], sm["logprobs"], rtol=1e-13, atol=1e-13)
    fwd = I.intermediates("attention_forward", _args("attention_forward", shape))
    assert np.array_equal(fwd["weighted"].transpose(0, 2, 1, 3).reshape(fwd["out"].shape), fwd["out"])
    assert I.step("attention_forward", "weighted").layout_of == "out"
    ce = I.intermediates("crossentropy_forward", _args("crossentropy_forward", shape))
    assert np.array_equal(-ce["logpicked"], ce["losses"])


def test_a_variance_over_c_minus_1_fails():
    args = _args("layernorm_forward", SHAPES[0])
    C = args["inp"].shape[-1]
    right = I.intermediates("layernorm_forward", args, replace={"var": lambda s: (s["xshift"] ** 2).sum(-1) / C})
    assert outputs_off("layernorm_forward", args, right) == []       # the same variance, recomputed: no change
    wrong = I.intermediates("layernorm_forward", args, replace={"var": lambda s: (s["xshift"] ** 2).sum(-1) / (C - 1)})
    assert outputs_off("layernorm_forward", args, wrong) == ["out", "rstd"]
    assert np.array_equal(wrong["mean"], right["mean"]) and not np.array_equal(wrong["norm"], right["norm"])


@pytest.mark.parametrize("kernel, step, wrong, off", [
    ("attention_backward", "dpreatt_add", lambda s: -s["offdiag"] * np.tril(np.ones(s["diag"].shape[-2:])),
     ["dinp", "dpreatt"]),
    ("gelu_forward", "inner", lambda s: s["inner"] * (1 + 1e-15), ["out"]),
    ("softmax_forward", "shift", lambda s: s["shift"] + 1.0, ["probs"]),
    ("matmul_forward", "product", lambda s: s["product"] * 2, ["out"]),
    ("crossentropy_softmax_backward", "onehot", lambda s: s["onehot"] * 0, ["dlogits"]),
])
def test_a_wrong_intermediate_shows_in_the_outputs(kernel, step, wrong, off):
    """One step replaced: the outputs after it follow (a shift of the softmax by 1 cancels
    in exact arithmetic, not in float64's last bits: the probabilities are off by an ulp or
    more somewhere), those before it do not."""
    args = _args(kernel, SHAPES[0])
    got = I.intermediates(kernel, args, replace={step: wrong})
    assert outputs_off(kernel, args, got) == off


def test_bad_names_say_what_is_wrong():
    with pytest.raises(KeyError, match="no intermediates for 'nope'"):
        I.intermediates("nope", {})
    with pytest.raises(ValueError, match="need NH"):
        I.intermediates("attention_forward", {"inp": np.zeros((1, 2, 6))})
    with pytest.raises(KeyError, match="no step 'variance'"):
        I.intermediates("layernorm_forward", _args("layernorm_forward", SHAPES[0]), replace={"variance": abs})
    with pytest.raises(KeyError, match="has no step 'x'"):
        I.step("gelu_forward", "x")
