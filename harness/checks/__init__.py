"""The checks: what is compared with what, under which tolerance, in what order.

* :mod:`.run` -- :func:`~.run.run_parity`, the orchestration: training steps of the C and
  the references, each step checked, each reference in turn;
* one module per kind of check of a step: :mod:`.replay`, :mod:`.e2e`, :mod:`.update`,
  :mod:`.loss`; all compare through :mod:`.verdict` (``judge``, the one verdict on a kernel
  call, and ``compared``, the comparison every check makes);
* :mod:`.perop` -- the op table and the per-op checks;
* :mod:`.freerun` -- each implementation on its own state, against the oracle's own run;
* :mod:`.debugstate` -- llm.c's debug-state check;
* :mod:`.results` -- what they found (``Check``, ``StepReport``, ``RunReport``), and
  :mod:`.modelstate` -- what they read of a model state, and how.
"""
