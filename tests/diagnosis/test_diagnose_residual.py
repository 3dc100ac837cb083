"""The residual's changes: a scaled branch or stream, and the model-level ones that only a
replay shows (a parallel block, the branch added to the wrong stream), judged as the replay
judges them.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, judge_as_replay, port_cases, port_with)

from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def residual_port(branch=1.0, stream=1.0):
    def residual_forward(inp1, inp2):
        return F(stream) * inp1 + F(branch) * inp2
    return residual_forward


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "residual.branch-scale": [("residual_forward", residual_port(branch=0.5)),
                              ("residual_forward", residual_port(stream=2.0))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- model level

# variants that need what only a model's replay passes (the block's other tensors beside a
# residual): each with a float32 port, judged as the replay judges it, with the call the
# replay hands the diagnosis
def _model_level_case(vid):
    from harness.diagnosis import Call
    rng = np.random.default_rng(0)
    B, T, C = 2, 8, 32
    if vid == "residual.parallel":
        x, a, m = (rng.standard_normal((B, T, C)).astype(F) for _ in range(3))
        args = {"inp1": x, "inp2": a}
        actual = x.copy()                          # the stream the MLP reads: the block's input
        expected = nk.residual_forward(x.astype(np.float64), a.astype(np.float64))
        call = Call("residual_forward", "out", dict(args, next_residual=((x + a + m).astype(np.float64),
                                                                         m.astype(np.float64))))
    else:
        x, ln, branch = (rng.standard_normal((B, T, C)).astype(F) for _ in range(3))
        args = {"inp1": x, "inp2": branch}
        actual = ln + branch                         # the branch added to the normalised stream
        expected = nk.residual_forward(x.astype(np.float64), branch.astype(np.float64))
        call = Call("residual_forward", "out", dict(args, streams={"acts.ln1[layer 0]": ln.astype(np.float64)},
                                                    stream_names=("acts.encoded", "acts.attproj[layer 0]")))
    return judge_as_replay(vid, "residual_forward", "out", actual, expected, args, call)


MODEL_LEVEL = ["residual.wrong-input", "residual.parallel"]


@pytest.mark.parametrize("variant_id", MODEL_LEVEL)
def test_a_model_level_change_is_diagnosed_with_it(variant_id):
    assert_diagnosed([_model_level_case(variant_id)], variant_id)


def test_a_dropped_branch_is_not_a_parallel_block():
    """The attention's branch lost (the block's output without it) is a factor 0 on the
    branch, not attention and MLP in parallel (the output would hold both branches)."""
    from harness.checks.verdict import call_scale, judge
    from harness.diagnosis import Call
    rng = np.random.default_rng(1)
    x, a, m = (rng.standard_normal((2, 8, 32)).astype(F) for _ in range(3))
    a64 = {"inp1": x.astype(np.float64), "inp2": a.astype(np.float64)}
    expected = a64["inp1"] + a64["inp2"]
    call = Call("residual_forward", "out", dict(a64, next_residual=((x + m).astype(np.float64), m.astype(np.float64))))
    c = judge("residual_forward", "out", x.copy(), expected, a64, name="dropped",
              elem_scale=call_scale("residual_forward", "out", a64, {"out": expected}), calls=lambda: call)
    assert c.diagnosis.ids == ("residual.branch-scale",), c.diagnosis.text()


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("residual"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)
