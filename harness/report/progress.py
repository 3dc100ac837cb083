"""The progress bar on stderr, for anything that takes more than a couple of seconds."""
from __future__ import annotations

import os
import sys
import time


class Progress:
    """A bar on stderr: the step, what it is doing, the time taken and, from the second
    step on, an estimate of the time left (the mean step so far)."""

    def __init__(self, enabled: bool = True, delay: float = 2.0):
        self.enabled = enabled
        self.delay = delay
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False
        self.tty = sys.stderr.isatty()
        self.step_began: dict[int, float] = {}
        # the process's system CPU seconds as each step began: the kernel's share of a step,
        # where a fresh page's first touch is paid (harness.cli.later_step)
        self.system_began: dict[int, float] = {}

    def __call__(self, step: int, steps: int, what: str) -> None:
        now = time.perf_counter()
        self.step_began.setdefault(step, now)
        self.system_began.setdefault(step, os.times().system)
        if not self.enabled:
            return
        elapsed = now - self.start
        if elapsed < self.delay or (not self.tty and now - self.last < 5.0):
            return
        self.last = now
        width = 24
        done = int(width * (step - 1) / max(steps, 1))
        line = f"[{'#' * done}{'-' * (width - done)}] step {step}/{steps}: {what} ({duration(elapsed)}"
        left = self.left(step, steps, now)
        line += f", about {duration(left)} left)" if left is not None else ")"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.shown = True

    def left(self, step: int, steps: int, now: float) -> float | None:
        """The time left at ``now`` in ``step``: the mean of the steps done, for the rest."""
        began = self.step_began.get(step)
        if step < 2 or began is None:
            return None
        per = (began - self.step_began.get(1, self.start)) / (step - 1)
        return max(0.0, per * (steps - step + 1) - (now - began))

    def done(self) -> None:
        if self.shown and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def duration(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f} min"
