"""The update check: parameters, m and v after an implementation's AdamW step, against
AdamW in float64 from the common pre-step state and the implementation's own gradients."""
from __future__ import annotations

from math import prod

import numpy as np

from pyref.config import AdamW, GPT2Config, param_shapes
from pyref.terms import adamw_magnitudes

from ..cores import shared, workers
from ..diagnosis import Call, attach, diagnose, is_one_d
from ..graph import Ref
from ..oracle import ORACLE
from ..probe import marked
from ..tolerances import op_tolerance
from .results import Check
from .state import axes
from .verdict import compared


UPDATE_BLOCK = 1 << 16   # elements per block of the float64 AdamW: its temporaries stay in cache


@marked("update checks")
def check_update(cfg: GPT2Config, pre: tuple, grads: np.ndarray,
                 post: tuple[np.ndarray, np.ndarray, np.ndarray], hyper: AdamW, t: int, *,
                 step: int, impl: str) -> list[Check]:
    """AdamW in float64 from the common pre-step state ``pre`` = (params, m, v; m and v
    None at the first step: zeros) with ``grads``, against ``post`` (params, m, v after the
    implementation's update), tensor by tensor. Worked in cache-sized blocks into buffers
    made once for the largest tensor: at 124M scale only the expected values of one tensor
    are held in float64, and no tensor-sized temporary is made and dropped."""
    hp = hyper.kernel_args(t)
    shapes = param_shapes(cfg)
    largest = max(prod(s) for s in shapes.values())
    buf = {k: np.empty(largest, np.float64) for k in ("params", "m", "v")}
    buf_scale = {k: np.empty(largest, np.float32) for k in ("params", "m")}
    checks = []
    offset = 0
    labels = ("params", "m", "v")
    for name, shape in shapes.items():
        n = prod(shape)
        expected = {k: b[:n] for k, b in buf.items()}
        scales = {"params": buf_scale["params"][:n], "m": buf_scale["m"][:n], "v": None}
        shared(lambda r: _expected_update(pre, grads, offset, expected, scales, hp, r), _runs(n))
        hows = {label: dict(name=f"{label}.{name} (after update)",
                            tol=op_tolerance("adamw", "param" if label == "params" else label, 1, n),
                            elem_scale=None if scales[label] is None else scales[label].reshape(shape),
                            axes=axes(Ref(label, name), shape))
                for label in labels}
        actuals = {label: np.asarray(post[i][offset:offset + n]).reshape(shape) for i, label in enumerate(labels)}
        results = shared(lambda k: compared(actuals[k], expected[k].reshape(shape), **hows[k]), labels)
        for label, c in zip(labels, results):
            output, actual, how = "param" if label == "params" else label, actuals[label], hows[label]
            if not c.passed:
                call = Call("adamw", output, _update_args(pre, grads, slice(offset, offset + n), shape, hp))
                c = attach(c, diagnose(call, actual, expected[label].reshape(shape),
                                       ctx={"one_d": is_one_d(name, shape)}, **how))
            checks.append(Check(step, impl, "update", Ref(label, name), c))
        offset += n
    return checks


def _runs(n: int) -> list[tuple[int, int]]:
    """``[0, n)`` in one run of whole blocks per worker."""
    blocks = -(-n // UPDATE_BLOCK)
    per = -(-blocks // workers())
    return [(lo * UPDATE_BLOCK, min(n, (lo + per) * UPDATE_BLOCK)) for lo in range(0, blocks, per)]


def _expected_update(pre: tuple, grads, offset: int, expected: dict, scales: dict, hp: dict,
                     run: tuple[int, int]) -> None:
    """One tensor's float64 AdamW (params, m, v into ``expected``) and its term sizes (into
    ``scales``), block by block over ``run`` from ``pre`` and ``grads`` at ``offset``.
    Element by element the same arithmetic as on whole tensors: the results do not depend
    on the blocks."""
    zeros = np.zeros(UPDATE_BLOCK, np.float32)
    for lo in range(run[0], run[1], UPDATE_BLOCK):
        hi = min(run[1], lo + UPDATE_BLOCK)
        sl = slice(offset + lo, offset + hi)
        p, m, v = (expected[k][lo:hi] for k in ("params", "m", "v"))
        p0 = pre[0][sl]                # float32 (every float32 is a float64: exact in p)
        m0 = zeros[:hi - lo] if pre[1] is None else pre[1][sl]
        np.copyto(p, p0)
        np.copyto(m, m0)
        np.copyto(v, zeros[:hi - lo] if pre[2] is None else pre[2][sl])
        ORACLE.adamw(p, grads[sl], m, v, *hp.values())
        scales["m"][lo:hi], scales["params"][lo:hi] = adamw_magnitudes(p0, m0, grads[sl], v, hp)


def _update_args(pre: tuple, grads, sl: slice, shape, hp: dict) -> dict:
    """AdamW's arguments for one parameter tensor (m, v zero at the first step)."""
    p0 = np.array(pre[0][sl], np.float64).reshape(shape)
    m0 = np.zeros(shape) if pre[1] is None else np.array(pre[1][sl], np.float64).reshape(shape)
    v0 = np.zeros(shape) if pre[2] is None else np.array(pre[2][sl], np.float64).reshape(shape)
    return dict(param=p0, grad=np.asarray(grads[sl]).reshape(shape), m=m0, v=v0, **hp)
