"""llm.c's debug-state check (what its ``test_gpt2.c`` does), with our tolerances.

A debug state (version 2) holds what PyTorch computed for one step of a checkpoint: the
batch, the logits (V wide), the mean loss and every parameter gradient. The C is run on
the same checkpoint and batch and compared with it; the float64 oracle runs too and says
which side is closer to the exact answer, so a debug state that is itself off (written on
a GPU with TF32, say) is told apart from a C that is off.

PyTorch's side is float32 with its own summation order, so C - expected may be up to the
sum of both sides' rounding: the tolerance is twice the end-to-end tolerance the C gets
against the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyref.config import PARAM_NAMES
from pyref.formats import read_checkpoint, read_debug_state
from pyref.model import GPT2 as PyGPT2
from pyref.protocol import KernelSet

from ..arbiter.compare import Comparison, Tolerance, compare
from ..arbiter.oracle import ORACLE, Witness
from .modelstate import PARAM_AXES
from ..arbiter.tolerances import e2e_tolerance


@dataclass
class DebugStateRow:
    tensor: str
    vs_expected: Comparison   # C vs the debug state (the verdict)
    c_vs_oracle: Comparison   # information: how far each side is from the exact answer
    expected_vs_oracle: Comparison

    @property
    def passed(self) -> bool:
        return self.vs_expected.passed

    @property
    def closer(self) -> str:
        a, b = self.c_vs_oracle.norm_rel, self.expected_vs_oracle.norm_rel
        return "C" if a < b else "debug state" if b < a else "tie"


@dataclass
class DebugStateReport:
    path: str
    B: int
    T: int
    rows: list[DebugStateRow]
    c_loss: float
    expected_loss: float
    oracle_loss: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


def _widen(tol: Tolerance, factor: float, why: str) -> Tolerance:
    return Tolerance(rel=tol.rel * factor, norm=tol.norm * factor, floor=tol.floor, why=f"{tol.why}; {why}")


def check_debug_state(checkpoint: str, debug_state: str, lib=None, threads: int | None = None) -> DebugStateReport:
    """Run the C on the checkpoint and the debug state's batch; compare logits, loss and
    all 16 parameter gradients with the debug state (and both with the oracle)."""
    from ..clib.library import as_library
    from ..clib.cmodel import CModel

    lib = as_library(lib)
    config, params = read_checkpoint(checkpoint)
    ds = read_debug_state(debug_state, config)
    V, B, T = config.vocab_size, ds.B, ds.T
    rows: list[DebugStateRow] = []
    # float64 models reading the checkpoint's float32 parameters where they lie (no copies)
    params = np.ascontiguousarray(params, np.float32)
    oracle = PyGPT2(config, params, kernels=ORACLE, dtype=np.float64, share_params=True)
    noisy = Witness(seed=0)
    witness = PyGPT2(config, params, kernels=KernelSet.from_module(noisy, name="witness"),
                     dtype=np.float64, share_params=True)
    for m in (oracle, witness):
        m.forward(ds.inputs, ds.targets)
        m.zero_grad()
        m.backward()
    noisy.release()
    oracle_loss = float(oracle.mean_loss)
    free = Tolerance(rel=np.inf, norm=np.inf)

    def carried(w, o):
        return compare(w, o, name="witness", tol=free)
    with CModel.from_checkpoint(checkpoint, lib=lib) as c:
        c_loss = c.forward(ds.inputs, ds.targets, threads=threads)
        c.zero_grad()
        c.backward(threads=threads)

        def row(name, actual, expected, oracle_value, tol, axes):
            both = _widen(tol, 2.0, "x2: the debug state is float32 with its own rounding")
            rows.append(DebugStateRow(
                name,
                compare(actual, expected, name=f"{name} (C vs debug state)", tol=both, axes=axes),
                compare(actual, oracle_value, name=f"{name} (C vs oracle)", tol=tol, axes=axes),
                compare(expected, oracle_value, name=f"{name} (debug state vs oracle)", tol=tol, axes=axes)))

        o_logits = oracle.acts["logits"][..., :V]
        tol_logits = e2e_tolerance("matmul_forward", "out", config.channels, o_logits.size,
                                   carried(witness.acts["logits"][..., :V], o_logits))
        row("logits", c.acts["logits"][..., :V], ds.logits, o_logits, tol_logits, ("b", "t", "v"))
        tol_loss = e2e_tolerance("crossentropy_forward", "losses", B * T, 1,
                                 carried(np.array([witness.mean_loss]), np.array([oracle_loss])))
        row("loss", np.array([c_loss], np.float32), np.array([ds.loss]), np.array([oracle_loss]), tol_loss, None)
        expected = ds.grads_by_name()
        for name in PARAM_NAMES:
            tol = e2e_tolerance("matmul_backward", "dweight", B * T, oracle.grads[name].size,
                                carried(witness.grads[name], oracle.grads[name]))
            a = c.grads[name]
            row(f"grads.{name}", a, expected[name], oracle.grads[name], tol,
                PARAM_AXES.get(a.ndim))
    return DebugStateReport(str(debug_state), B, T, rows, float(c_loss), float(ds.loss), oracle_loss)