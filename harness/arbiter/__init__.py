"""The arbiter: what judges every implementation, the C's and the ports'.

:mod:`.compare` (the comparison engine, its API), :mod:`.metrics` (its NumPy engine, the
reference) and :mod:`.fused` (its compiled engine, the update check's float64 AdamW and the
witness's noise: ``llmc/fused_checks.c``), :mod:`.tolerances` (the bounds), :mod:`.stats`
(the bias test's statistics), :mod:`.oracle` (the float64 oracle and the float32-noise
witness). It imports the references (``pyref``) and the shared modules (``harness.cores``,
``graph``, ``probe``) and nothing of the C under test, the ports or the checks.
"""
