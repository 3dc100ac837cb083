"""The catalogue of changes of semantics a diagnosis tries (:mod:`..engine` runs them), one
module per family: :mod:`.gelu`, :mod:`.layernorm`, :mod:`.attention`, :mod:`.loss`
(softmax, cross-entropy, labels), :mod:`.embedding`, :mod:`.residual`, :mod:`.matmul`
(and the backward's accumulation), :mod:`.adamw`, :mod:`.precision` (an op computed in
bfloat16 or float16 by a cast of the port's own), and :mod:`.output` (a constant factor or
offset on any op's output, tried last); :mod:`._common` holds what they share.

Each :class:`~..engine.Variant` is one op under one change: a float64 function plus a
one-line description. A new diagnosis is a few lines in its family's module, e.g.
``Variant("layernorm.eps=1e-3", "layernorm", ("layernorm_forward",),
"layernorm's eps is 1e-3 instead of 1e-5", _ln_eps(1e-3))`` in its ``VARIANTS``, and a
port of the change in tests/diagnosis/test_diagnose_layernorm.py that shows the check names it.
"""
from __future__ import annotations

from pyref.protocol import SIGNATURES

from ..engine import MODEL_QUANTITIES, Variant
from . import adamw, attention, embedding, gelu, layernorm, loss, matmul, output, precision, residual
from .adamw import is_one_d, one_d_mask

# the order is the search's: a family's own changes before the generic ones of output
FAMILIES = (gelu, layernorm, attention, loss, embedding, residual, matmul, adamw, precision, output)

CATALOGUE: tuple[Variant, ...] = tuple(v for family in FAMILIES for v in family.VARIANTS)
VARIANT_BY_ID = {v.id: v for v in CATALOGUE}
assert len(VARIANT_BY_ID) == len(CATALOGUE), "duplicate variant ids"
assert all(k in SIGNATURES or k in MODEL_QUANTITIES for v in CATALOGUE for k in v.kernels)

__all__ = ["CATALOGUE", "VARIANT_BY_ID", "FAMILIES", "one_d_mask", "is_one_d"]
