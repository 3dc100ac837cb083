"""The update check: parameters, m and v after an implementation's AdamW step, against
AdamW in float64 from the common pre-step state and the implementation's own gradients."""
from __future__ import annotations

from math import prod

import numpy as np

from pyref.config import AdamW, GPT2Config, layout, param_shapes
from pyref.terms import adamw_magnitudes

from ..arbiter import fused
from ..arbiter.compare import comparison_of
from ..cores import shared, workers
from ..diagnosis import Call, is_one_d
from ..graph import Ref
from ..arbiter.oracle import ORACLE
from ..probe import marked, span
from ..arbiter.stats import group_bounds
from ..arbiter.tolerances import op_tolerance
from .results import Check
from .modelstate import axes
from .verdict import compared, explained


UPDATE_BLOCK = 1 << 16   # elements per block of the float64 AdamW: its temporaries stay in cache


@marked("update checks")
def check_update(cfg: GPT2Config, pre: tuple, grads: np.ndarray,
                 post: tuple[np.ndarray, np.ndarray, np.ndarray], hyper: AdamW, t: int, *,
                 step: int, impl: str, precision=None, held: dict | None = None) -> list[Check]:
    """AdamW in float64 from the common pre-step state ``pre`` = (params, m, v; m and v
    None at the first step: zeros) with ``grads``, against ``post`` (params, m, v after the
    implementation's update), tensor by tensor: in one pass per tensor by the compiled
    helper (:func:`harness.arbiter.fused.adamw_tallies`, the expected values never stored);
    where it is not at hand, or a tensor fails (its diagnosis needs the expected values),
    in NumPy, in cache-sized blocks into buffers made once for the largest tensor.
    ``precision``: ``label -> Precision or None`` (``"params"``, ``"m"``, ``"v"``) of a
    port whose parameters or optimizer state are held below float32 (None: float32).
    ``held``: the settings the implementation's optimizer holds itself (a torch port's:
    :meth:`pyref.config.AdamW.kernel_args`), judged as held where they are the run's."""
    at = precision or (lambda label: None)
    hp = hyper.kernel_args(t, held)
    shapes = param_shapes(cfg)
    buf: dict = {}
    checks = []
    for name, (offset, shape) in layout(shapes).items():
        n = prod(shape)
        sl = slice(offset, offset + n)
        hows = {label: dict(name=f"{label}.{name} (after update)",
                            tol=op_tolerance("adamw", "param" if label == "params" else label, 1, n, at(label)),
                            axes=axes(Ref(label, name), shape))
                for label in LABELS}
        actuals = {label: np.asarray(post[i][sl]).reshape(shape) for i, label in enumerate(LABELS)}
        found = _fused(pre, grads, sl, shape, actuals, hows, hp)
        if found is None:
            if not buf:   # made once, for the largest tensor
                largest = max(prod(s) for s in shapes.values())
                buf = {k: np.empty(largest, np.float64 if k in LABELS else np.float32)
                       for k in (*LABELS, "scale_params", "scale_m")}
            found = _numpy(pre, grads, offset, name, shape, actuals, hows, hp, buf)
        checks += [Check(step, impl, "update", Ref(label, name), c, precision=at(label))
                   for label, c in zip(LABELS, found)]
    return checks


LABELS = ("params", "m", "v")


def _fused(pre, grads, sl: slice, shape, actuals: dict, hows: dict, hp: dict) -> list | None:
    """The three comparisons of one tensor by the compiled helper, or None (not at hand, or
    a comparison failed: the NumPy path then judges and diagnoses it)."""
    tols = tuple(hows[label]["tol"] for label in LABELS)
    args = ((pre[0][sl], None if pre[1] is None else pre[1][sl], None if pre[2] is None else pre[2][sl]),
            grads[sl], tuple(np.asarray(actuals[label]).reshape(-1) for label in LABELS))
    with span("compare", actual=tuple(actuals[label] for label in LABELS)):
        # every element of an update rounds on its own: groups of any elements (span 0)
        tallies = fused.adamw_tallies(*args, hp, tols, group_bounds(int(np.prod(shape)), 1))
    if tallies is None:
        return None
    point = _Point(pre, grads, sl, shape, hp)
    out = []
    for label, tally in zip(LABELS, tallies):
        if tally.worst_index is not None:
            tally.worst_index = tuple(int(i) for i in np.unravel_index(tally.worst_index[0], shape))
        how = hows[label]
        c = comparison_of(tally, actuals[label], point.expected(label), point.size(label), how["tol"],
                          name=how["name"], shape=tuple(shape), axes=how["axes"])
        if not c.passed:
            return None
        out.append(c)
    return out


class _Point:
    """The expected values and term sizes of an update, element by element (the worst
    element of a fused comparison): AdamW in float64 on that element alone."""

    def __init__(self, pre, grads, sl: slice, shape, hp: dict):
        self.pre, self.grads, self.sl, self.shape, self.hp = pre, grads, sl, shape, hp

    def _at(self, index) -> dict:
        i = self.sl.start + int(np.ravel_multi_index(index, self.shape))
        one = slice(i, i + 1)
        a = _update_args(self.pre, self.grads, one, (1,), self.hp)
        p0, m0 = np.asarray(self.pre[0][one]), np.zeros(1, np.float32) if self.pre[1] is None else self.pre[1][one]
        ORACLE.adamw(a["param"], a["grad"], a["m"], a["v"], *self.hp.values())
        m_size, p_size = adamw_magnitudes(p0, m0, self.grads[one], a["v"], self.hp)
        return {"params": a["param"], "m": a["m"], "v": a["v"], "size_params": p_size, "size_m": m_size}

    def expected(self, label: str):
        return _Lazy(lambda index: self._at(index)[label][0], np.dtype(np.float64))

    def size(self, label: str):
        if label == "v":
            return None
        return _Lazy(lambda index: self._at(index)[f"size_{label}"][0], np.dtype(np.float32))


class _Lazy:
    """An array's ``[index]`` and ``dtype``, computed when asked (one element)."""

    def __init__(self, at, dtype):
        self.at, self.dtype = at, dtype

    def __getitem__(self, index):
        return self.at(index)


def _numpy(pre, grads, offset: int, name: str, shape, actuals: dict, hows: dict, hp: dict, buf: dict) -> list:
    """The three comparisons of one tensor in NumPy (the reference implementation), each
    failing one diagnosed."""
    n = prod(shape)
    expected = {k: buf[k][:n] for k in LABELS}
    scales = {"params": buf["scale_params"][:n], "m": buf["scale_m"][:n], "v": None}
    shared(lambda r: _expected_update(pre, grads, offset, expected, scales, hp, r), _runs(n))
    for label in LABELS:
        hows[label]["elem_scale"] = None if scales[label] is None else scales[label].reshape(shape)
    results = shared(lambda k: compared(actuals[k], expected[k].reshape(shape), engine="numpy", unit=1, **hows[k]),
                     LABELS)
    return [explained(c, actuals[label], expected[label].reshape(shape),
                      lambda label=label: Call("adamw", "param" if label == "params" else label,
                                               _update_args(pre, grads, slice(offset, offset + n), shape, hp)),
                      ctx=_ctx(name, shape, label, actuals), **hows[label])
            for label, c in zip(LABELS, results)]


def _ctx(name: str, shape, label: str, actuals: dict) -> dict:
    """What a failing update's diagnosis is told beside its kernel's arguments: whether the
    tensor is 1-D (nanoGPT's decay groups) and, for the parameters, the implementation's m
    and v after the step (a zero learning rate moves the moments, a tensor never stepped
    does not)."""
    ctx = {"one_d": is_one_d(name, shape)}
    if label == "params" and all(actuals.get(k) is not None for k in ("m", "v")):
        ctx["moments"] = {k: np.asarray(actuals[k]).reshape(shape) for k in ("m", "v")}
    return ctx


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
