"""Work a step can share among the cores: the float64 oracle beside the witness, the
witness's spread, the update checks. Threads, not processes: NumPy lets go of the GIL in
its loops, and the models' buffers are shared without a copy."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def workers() -> int:
    """Threads for the work a step can share (the float64 models, the witness's spread,
    the update checks): the cores this process may use (at most 4)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


_POOL: list = []
if hasattr(os, "register_at_fork"):   # a forked child has the list but not the threads
    os.register_at_fork(after_in_child=_POOL.clear)


def shared(f, items) -> list:
    """``[f(x) for x in items]``, the items shared among the cores (NumPy lets go of the
    GIL in its loops; each result is what one thread makes, in the order of ``items``)."""
    items = list(items)
    if len(items) < 2 or workers() < 2:
        return [f(x) for x in items]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(workers(), thread_name_prefix="llmc-parity"))
    return list(_POOL[0].map(f, items))
