"""What a run checks by default, by its size: which references run beside the float64
oracle, and whether every op is replayed each step or only where a check failed.

From :data:`LARGE` parameters (GPT-2 124M has 124M), or with a debug state, a run checks
the C against the float64 oracle alone and replays the ops only where an end-to-end check
failed: the NumPy and torch references are ours, not the user's, each costs a step of its
own at that size, and a replay on failure localises a failure as well as one every step.
Below that, the references are NumPy's and torch's (where torch is installed) and every op
is replayed each step. What the user asks for always wins.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pyref.config import GPT2Config

LARGE = 50_000_000
REPLAYS = ("always", "on-failure", "never")


@dataclass(frozen=True)
class Plan:
    """What a run checks: ``refs`` (reference names beside the oracle), ``replay`` (one of
    :data:`REPLAYS`), ``large`` (the defaults were chosen for a large run) and ``why``
    (a line saying so where they were, else None)."""

    refs: list[str]
    replay: str
    large: bool
    why: str | None = None

    @property
    def replay_arg(self) -> bool | str:
        """``replay`` as :func:`harness.checks.run.run_parity` takes it."""
        return {"always": True, "on-failure": "on-failure", "never": False}[self.replay]


def is_large(config: GPT2Config, debug_state: bool = False) -> bool:
    """Whether a run gets the large-run defaults: from LARGE parameters, or with a debug
    state."""
    return config.num_parameters() >= LARGE or bool(debug_state)


def plan(config: GPT2Config, *, refs: list[str] | None = None, replay: str | None = None,
         debug_state: bool = False) -> Plan:
    """The references and the replay of a run: what the user asked for (``refs``,
    ``replay``; None: not asked), else what fits the job."""
    large = is_large(config, debug_state)
    torch = ["torch"] if importlib.util.find_spec("torch") is not None else []
    chosen_refs = refs if refs is not None else ([] if large else ["numpy", *torch])
    chosen_replay = replay or ("on-failure" if large else "always")
    if not large or (refs is not None and replay is not None):
        return Plan(chosen_refs, chosen_replay, large)
    size = "with --debug-state" if debug_state else f"at {config.num_parameters() / 1e6:.0f}M parameters"
    return Plan(chosen_refs, chosen_replay, large,
                f"{size}: the C against the float64 oracle, each op replayed where a check fails "
                "(--ref numpy,torch adds our own references, --replay always every op each step)")
