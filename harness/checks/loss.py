"""The loss check: an implementation's mean loss against the float64 model's."""
from __future__ import annotations

import numpy as np

from ..arbiter.compare import Tolerance
from ..diagnosis import Call, attach, diagnose
from ..graph import Ref
from .results import Check
from .verdict import compared


def check_loss(step: int, impl: str, loss: float, oracle_loss: float, tol: Tolerance, n: int) -> Check:
    """The mean loss against the float64 model's (``n`` = B*T positions averaged)."""
    actual, expected = np.array([loss]), np.array([oracle_loss])
    c = compared(actual, expected, name="mean_loss", tol=tol)
    if not c.passed:
        c = attach(c, diagnose(Call("loss_mean", "mean_loss", {"value": expected, "n": n}),
                               actual, expected, tol=tol, name="mean_loss"))
    return Check(step, impl, "loss", Ref("loss", "mean_loss"), c)
