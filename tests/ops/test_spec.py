"""The kernel rows of pyref/spec.py: everything else reads them (the protocol, the
tolerances, the witness, docs/kernels.md's tables)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pyref import spec as S

DOC = Path(__file__).resolve().parents[2] / "docs" / "kernels.md"


def test_kernel_tables_in_docs_match_the_spec():
    text = DOC.read_text(encoding="utf-8")
    for table in S.markdown().split("\n\n"):
        assert table.strip() in text, (
            "docs/kernels.md is out of date with pyref/spec.py; paste pyref.spec.markdown()'s tables in:\n"
            + table)


def test_the_docs_test_fails_when_a_row_changes(monkeypatch):
    """Changing one output's rule in its row makes the docs stale, and the test says so."""
    row = S.SPEC["gelu_forward"]
    out = row.outputs[0]
    changed = S.KernelSpec(**{**row.__dict__, "outputs": (S.Output(**{**out.__dict__, "rule": S.Rule(9.0, 2.0, "x")}),)})
    monkeypatch.setattr(S, "SPECS", tuple(changed if r is row else r for r in S.SPECS))
    with pytest.raises(AssertionError, match="out of date"):
        test_kernel_tables_in_docs_match_the_spec()


def test_every_protocol_table_is_read_from_the_rows():
    from pyref import protocol as P
    assert P.KERNEL_NAMES == tuple(s.name for s in S.SPECS if s.returns) + tuple(
        s.name for s in S.SPECS if s.backward) + tuple(s.name for s in S.SPECS if s.updates)
    assert P.OPS == tuple(dict.fromkeys(s.op for s in S.SPECS))
    for s in S.SPECS:
        assert P.SIGNATURES[s.name] == s.signature
        assert P.KERNEL_OP[s.name] == s.op
        assert P.INPLACE_ARGS.get(s.name, ()) == s.inplace
        assert s.returns + s.backward + s.updates == 1   # a forward, a backward or the update
        if s.omissible:
            assert P.SHORT_OUTPUTS[s.name] == s.omissible


def test_the_kernels_facts_elsewhere_follow_the_rows():
    """What the harness knows of a kernel beyond the protocol is read from its row: the
    outputs a port may leave out (derived for a torch model's replay), the C symbols a
    library must export, the ops the pytest plugin groups a model's checks by."""
    from harness.clib.cdefs import REQUIRED_SYMBOLS
    from harness.ports.torchstate import DERIVED
    from harness.pytest_plugin import OPS
    assert {s.name for s in S.SPECS if not s.updates} <= set(REQUIRED_SYMBOLS)
    assert DERIVED == {"layernorm_forward": ("mean", "rstd"), "attention_forward": ("preatt", "att"),
                        "softmax_forward": ("probs",), "crossentropy_forward": ("losses",)}
    assert S.SPEC["layernorm_forward"].omissible == ("mean", "rstd")
    assert S.SPEC["softmax_forward"].omissible == ()
    assert OPS[0] == "encoder" and OPS[-1] == "adamw"


def test_reduction_lengths_come_from_the_call():
    """One expression per output, evaluated on the call's own arguments: the per-op case,
    the replay and the witness all get the same n."""
    from pyref.cases import SHAPE_BY_NAME, matmul_backward, attention_forward
    import numpy as np
    s = SHAPE_BY_NAME["odd"]
    a = matmul_backward(s, np.random.default_rng(0))
    row = S.SPEC["matmul_backward"]
    assert (row.n("dinp", a), row.n("dweight", a), row.n("dbias", a)) == (s.OC, s.B * s.T, s.B * s.T)
    a = attention_forward(s, np.random.default_rng(0))
    assert S.SPEC["attention_forward"].n("att", a) == s.T + s.hs
    assert S.SPEC["attention_forward"].mask("preatt", a).shape == (s.T, s.T)
    with pytest.raises(ValueError, match="OC"):
        S.SPEC["matmul_backward"].n("dinp", {"inp": a["inp"]})


def test_a_rows_rule_is_the_tolerance_and_its_n_the_witness_noise(monkeypatch):
    """Editing one row changes the per-op tolerance and the witness's noise of that output."""
    import numpy as np

    from harness import Witness, op_tolerance
    from pyref import numpy_kernels
    row = S.SPEC["gelu_forward"]
    out = row.outputs[0]
    before = op_tolerance("gelu_forward", "out", 1, 100)
    changed = S.KernelSpec(**{**row.__dict__, "outputs": (
        S.Output(**{**out.__dict__, "rule": S.Rule(10 * out.rule.sigma, 10 * out.rule.k_norm, "x"), "n": "C"}),)})
    monkeypatch.setitem(S.SPEC, "gelu_forward", changed)
    after = op_tolerance("gelu_forward", "out", 1, 100)
    assert after.rel == 10 * before.rel and after.norm == 10 * before.norm
    x = np.ones((1, 1, 400))
    clean = numpy_kernels.gelu_forward(x)

    def spread():
        return float(np.std(Witness(seed=0).gelu_forward(x) - clean))
    wide = spread()
    monkeypatch.setitem(S.SPEC, "gelu_forward", row)
    assert wide > 15 * spread()     # sqrt(C) = 20 x the noise of n = 1
