"""The C's buffers are compared where they lie: every array of a CModel is a view of the
C's own memory, and every comparison run_parity makes of a C tensor (end to end, replay,
update) reads that memory, not a copy. (What keeps a 124M check within 3x the C model's
footprint; benchmarks/bench.py measures the footprint, this checks the cause.)"""
from __future__ import annotations

from math import prod

import numpy as np

from harness import CModel, run_parity
from harness.probe import listening
from pyref import numpy_kernels
from pyref.config import ACT_NAMES, PARAM_NAMES, PRESETS
from pyref.protocol import KernelSet
from pyref.synth import init_params, make_batch

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:                 # NumPy < 2
    byte_bounds = np.byte_bounds

TINY = PRESETS["tiny"]
BUFFERS = ("params_memory", "grads_memory", "m_memory", "v_memory", "acts_memory")


def test_every_cmodel_array_is_the_cs_own_memory():
    x, y = make_batch(TINY, 2, 8, seed=0)
    with CModel.from_params(TINY, init_params(TINY, seed=0)) as m:
        m.forward(x, y)
        m.zero_grad()
        m.backward()
        m.update(t=1)
        for field in BUFFERS:
            v = getattr(m, field)
            assert v.ctypes.data == m.address(field) and not v.flags.owndata, field
            assert np.shares_memory(v, getattr(m, field)), field
        for group, names, flat in (("params", PARAM_NAMES, m.params_memory), ("grads", PARAM_NAMES, m.grads_memory),
                                   ("acts", ACT_NAMES, m.acts_memory), ("grads_acts", ACT_NAMES, None)):
            for name in names:
                v = getattr(m, group)[name]
                if v.size:
                    assert v.ctypes.data == m.address(f"{group}.{name}") and not v.flags.owndata, (group, name)
                    assert flat is None or np.shares_memory(v, flat), (group, name)


class _ComparedArrays:
    """A probe listener: the byte range of every array a comparison reads."""

    def __init__(self):
        self.ranges = []

    def enter(self, category, detail):
        actual = detail.get("actual")
        if category == "compare":   # an array, or the arrays one pass compares (an update's)
            for a in actual if isinstance(actual, tuple) else (actual,):
                if isinstance(a, np.ndarray) and a.size > 1:
                    self.ranges.append(byte_bounds(a))

    def exit(self, token):
        pass


def test_run_parity_compares_the_cs_tensors_in_place():
    """Step 2's comparisons: by then the C has all its buffers (m and v come with its first
    update, at the end of step 1, maybe where a released reference's arrays were)."""
    x, y = make_batch(TINY, 2, 8, seed=0)
    c_memory = []

    def after_step(t, m):   # the C's buffers; made by step 1, they stay where they are
        if t == 1:
            n = m.acts_memory.size
            c_memory.extend((getattr(m, f).ctypes.data, getattr(m, f).ctypes.data + getattr(m, f).nbytes)
                            for f in BUFFERS)
            c_memory.append((m.address("grads_acts_memory"), m.address("grads_acts_memory") + 4 * n))
            seen.ranges.clear()

    with listening(_ComparedArrays()) as seen:
        report = run_parity(TINY, init_params(TINY, seed=0), iter([(x, y)] * 2), steps=2, replay=True,
                            impls={"numpy": KernelSet.from_module(numpy_kernels)}, on_step=after_step)
    assert report.passed
    in_c = sum(any(a <= lo and hi <= b for a, b in c_memory) for lo, hi in seen.ranges)
    c_checks = sum(1 for c in report.steps[1].checks
                   if c.impl == "C" and c.kind in ("e2e", "replay", "update") and prod(c.comparison.shape) > 1)
    # run_parity copies the C's pre-step params, m and v before the C's update (the
    # expected update's start state): inputs, never what is compared
    assert c_checks > 200 and in_c == c_checks
