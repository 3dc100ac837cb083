"""The loss check: an implementation's mean loss against the float64 model's."""
from __future__ import annotations

import numpy as np

from ..arbiter.compare import Tolerance
from ..diagnosis import Call
from ..graph import Ref
from .results import Check
from .verdict import checked


def check_loss(step: int, impl: str, loss: float, oracle_loss: float, tol: Tolerance, n: int) -> Check:
    """The mean loss against the float64 model's (``n`` = B*T positions averaged)."""
    actual, expected = np.array([loss]), np.array([oracle_loss])
    c = checked(actual, expected, lambda: Call("loss_mean", "mean_loss", {"value": expected, "n": n}),
                name="mean_loss", tol=tol)
    return Check(step, impl, "loss", Ref("loss", "mean_loss"), c)
