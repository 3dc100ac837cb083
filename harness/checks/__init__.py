"""The checks: what is compared with what, under which tolerance, and in what order.

* :mod:`.optable`, :mod:`.perop` -- the op table and the per-op checks;
* :mod:`.run` -- :func:`~.run.run_parity`: training steps of the C and the references,
  each step checked (replay, end to end, update, loss);
* :mod:`.freerun` -- each implementation on its own state, against the oracle's run;
* :mod:`.debugstate` -- llm.c's debug-state check.
"""
