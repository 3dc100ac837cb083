"""Free-running trajectories: each implementation trains on its own state from the common start.

The per-step checks of :func:`harness.checks.run.run_parity` restart every implementation from
the C's state each step, so that a step's error is that step's own. A user also wants the
statement their training runs make: "my port trains like the C for 100 steps". Here every
implementation (the C, kernel ports, torch models) takes ``N`` steps on its own parameters
and optimizer state, from the same start and the same batches, and after each step its loss
and parameters are compared with the float64 oracle's own run.

How far apart may they be? Rounding noise compounds through the steps (the update feeds
the next forward), at a rate that depends on the model, the data and the learning rate. The
bound is measured, not guessed: witnesses (the oracle's kernels with float32-sized noise
on every result, :class:`harness.arbiter.oracle.Witness`, their parameters and moments rounded to
float32 after each step as a float32 run stores them) train alongside, and their distance from
the oracle at each step, times the end-to-end factors of :mod:`harness.arbiter.tolerances`, is that
step's bound, never below the per-op float32 tolerance. A float32 implementation computing
the C's step stays inside; a different step (other betas, another GELU) leaves it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pyref.config import AdamW, GPT2Config
from pyref.model import GPT2 as PyGPT2
from pyref.protocol import KernelSet

from ..arbiter.compare import compare, Tolerance
from ..arbiter.oracle import ORACLE
from ..arbiter.tolerances import E2E_K_NORM, E2E_K_REL, op_tolerance

WITNESSES = 2   # the bound takes the larger distance of two independently seeded witnesses


@dataclass
class FreeRunRow:
    """One implementation after one of its own steps, against the oracle's own run."""

    step: int
    impl: str
    loss: float
    oracle_loss: float
    loss_rel: float          # |loss - oracle| / |oracle|
    loss_bound: float
    param_norm_rel: float    # ||params - oracle params|| / ||oracle params||
    param_bound: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.loss_rel <= self.loss_bound and self.param_norm_rel <= self.param_bound


def free_run(config: GPT2Config, params: np.ndarray, batches: list, *, lib, impls: dict | None = None,
             models: dict | None = None, hyper=None, threads: int | None = None) -> list[FreeRunRow]:
    """``len(batches)`` training steps of the C (``lib``), each KernelSet in ``impls`` and each
    :class:`harness.ports.TorchModel` in ``models``, each on its own state; rows per step
    and implementation."""
    from ..clib.library import as_library
    from ..clib.cmodel import CModel
    from ..ports.torchstate import ModelState
    from ..arbiter.oracle import Witness
    hyper = hyper or AdamW()
    params = np.asarray(params, np.float32)
    oracle = PyGPT2(config, params, kernels=ORACLE, dtype=np.float64)
    noisy = [Witness(seed=10_000 + i) for i in range(WITNESSES)]
    witnesses = [PyGPT2(config, params, dtype=np.float64, kernels=KernelSet.from_module(n, name="witness"))
                 for n in noisy]
    cmodel = CModel.from_params(config, params, lib=as_library(lib))
    runners = {"C": cmodel}
    runners.update({n: PyGPT2(config, params, kernels=k, dtype=np.float32) for n, k in (impls or {}).items()})
    try:
        runners.update({n: ModelState(config, params, model, hyper) for n, model in (models or {}).items()})
        rows: list[FreeRunRow] = []
        failed: dict[str, str] = {}
        for t, (inputs, targets) in enumerate(batches, 1):
            oracle_loss = float(oracle.step(inputs, targets, hyper, t=t))
            w_loss, w_param = 0.0, 0.0
            for w, n in zip(witnesses, noisy):
                loss = float(w.step(inputs, targets, hyper, t=t))
                n.release()
                # a float32 run stores its parameters and moments in float32 after each step
                for buf in (w.params_memory, w.m_memory, w.v_memory):
                    buf[...] = buf.astype(np.float32)
                w_loss = max(w_loss, abs(loss - oracle_loss) / abs(oracle_loss))
                w_param = max(w_param, _norm_rel(w.params_memory, oracle.params_memory))
            loss_tol = op_tolerance("crossentropy_forward", "losses", inputs.size, 1)
            param_tol = op_tolerance("adamw", "param", 1, oracle.num_parameters)
            loss_bound = max(loss_tol.rel, E2E_K_REL * w_loss)
            param_bound = max(param_tol.norm, E2E_K_NORM * w_param)
            for name, model in runners.items():
                if name in failed:
                    continue
                try:
                    loss = _step(model, inputs, targets, hyper, t, threads)
                except Exception as e:   # a user's port may raise: report it, go on with the rest
                    failed[name] = f"{type(e).__name__}: {e}"
                    rows.append(FreeRunRow(t, name, float("nan"), oracle_loss, float("nan"), loss_bound,
                                           float("nan"), param_bound, failed[name]))
                    continue
                rows.append(FreeRunRow(t, name, loss, oracle_loss, abs(loss - oracle_loss) / abs(oracle_loss),
                                       loss_bound, _norm_rel(model.params_memory, oracle.params_memory),
                                       param_bound))
        return rows
    finally:
        cmodel.close()


def _step(model, inputs, targets, hyper: AdamW, t, threads) -> float:
    """forward, zero_grad, backward, update: the training step of llm.c's main loop."""
    from ..clib.cmodel import CModel
    if isinstance(model, CModel):
        loss = model.forward(inputs, targets, threads=threads)
        model.zero_grad()
        model.backward(threads=threads)
        model.update(*hyper.args(), t, threads=threads)
        return float(loss)
    loss = model.forward(inputs, targets)
    model.zero_grad()
    model.backward()
    model.update(*hyper.args(), t)
    return float(loss)


def _norm_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    c = compare(np.asarray(actual), np.asarray(expected), name="params", tol=Tolerance(rel=np.inf, norm=np.inf))
    return float(c.norm_rel)