"""Say why a check failed: the failing op re-run in float64 under catalogued changes of
semantics, on the same inputs, judged with the failing check's own settings.

* :mod:`.engine` -- how: :class:`~.engine.Variant`, :class:`~.engine.Diagnosis`, the
  search over variants (:func:`~.engine.diagnose`), :func:`~.engine.attach`;
* :mod:`.catalogue` -- what: :data:`~.catalogue.CATALOGUE`, the changes tried (GELU's
  erf form, layernorm's eps, the attention scale, AdamW's conventions, ...).

:func:`diagnose` here is the engine over the catalogue: what the checks call.
"""
from __future__ import annotations

from typing import Sequence

from ..probe import span
from . import catalogue
from .catalogue import CATALOGUE, VARIANT_BY_ID, is_one_d, one_d_mask
from .engine import (MODEL_QUANTITIES, Call, Cause, DiagnosedComparison, Diagnosis, Fit, Variant, attach,
                     variants_for)
from .engine import diagnose as diagnose_with

__all__ = ["Variant", "Fit", "Cause", "Diagnosis", "Call", "DiagnosedComparison", "CATALOGUE",
           "VARIANT_BY_ID", "MODEL_QUANTITIES", "diagnose", "diagnose_with", "attach", "variants_for",
           "one_d_mask", "is_one_d"]


def diagnose(calls: Call | Sequence[Call], actual, expected, **how) -> Diagnosis:
    """:func:`.engine.diagnose` over the catalogue (as it is at the call:
    ``catalogue.CATALOGUE``); ``how`` are the failing check's settings (tol, mask,
    elem_scale, axes, ctx, name)."""
    with span("diagnose"):
        return diagnose_with(calls, actual, expected, variants=catalogue.CATALOGUE, **how)
