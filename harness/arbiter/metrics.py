"""The metrics of a comparison in NumPy: the reference implementation of what
:func:`harness.arbiter.compare.compare` reports (the compiled helper, :mod:`harness.arbiter.fused`,
computes the same in one pass; tests/arbiter/test_fused.py holds the two to each other).

Large arrays are processed in blocks along the leading axes, with scratch buffers
allocated once per call and reused, so the extra memory stays bounded (at most
``CHUNK_ELEMS * 75`` bytes, ~5 MB) even for the 124M-element tensors of GPT-2 124M, and
nothing is written into the arrays compared.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

#: Elements per block. The reused scratch buffers take up to ~75 bytes per element
#: (float64 copies, errors, ulp keys, flags), so 2**16 elements is ~5 MB: small enough to
#: stay in cache, large enough that the per-block Python overhead is negligible.
#: Arrays of at most this many elements are processed in one go (the small path).
CHUNK_ELEMS = 1 << 16

#: Smallest normal float32: the fallback ``scale`` when the expected values are all zero.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def tally(a: np.ndarray, e: np.ndarray, m: np.ndarray | None, es: np.ndarray | None, scale: float | None,
          tol, nan_equal: bool, bounds: np.ndarray | None = None) -> "_Accumulator":
    """The metrics of ``a`` against ``e`` (validated, same shape; ``m`` the broadcast mask,
    ``es`` the broadcast element scale): pass 1 the RMS scale unless given, pass 2 the
    metrics, block by block. The result has the fields :func:`harness.arbiter.compare.compare`
    reads (n_compared, n_bad, n_nonfinite, max_abs, max_rel, max_ulp, sumsq_diff,
    sumsq_size, worst_index, scale) and ``groups``: the bias test's sums (G, 4) over the
    groups ``bounds`` delimits (:mod:`harness.arbiter.stats`), None without."""
    blocks = list(_chunks(a.shape, CHUNK_ELEMS)) if a.size else []
    # Scratch arrays sized for the largest block (the first one), reused by every block.
    ws = _Workspace(a[blocks[0][0]].size if blocks else 0, reuse=len(blocks) > 1)
    acc = _Accumulator(tol, nan_equal, ws)
    if bounds is not None and len(bounds) > 1:
        acc.bounds = np.asarray(bounds, np.int64)
        acc.groups = np.zeros((len(bounds) - 1, 4))
    with np.errstate(all="ignore"):
        cached_e64 = None
        if scale is None:               # pass 1: RMS of the finite compared expected values
            scale, cached_e64 = _rms_scale(e, m, blocks, ws)
        acc.scale = scale + tol.floor
        acc.elem_scale = es
        acc.floor = tol.floor
        for key, outer, start in blocks:   # pass 2: the metrics
            ab = a[key]
            locate = _Locator(ab.shape, outer, start)
            acc.flat0 = 0 if not key else int(np.ravel_multi_index(locate(0), a.shape))
            acc.update(ab, e[key], None if m is None else m[key], locate, cached_e64,
                       None if es is None else es[key])
    return acc


def rms_scale(sumsq: float, count: int) -> float:
    """The RMS sqrt(sumsq / count) of ``count`` expected values, FLOAT32_TINY where it is 0
    (all zeros, or none: a denominator that avoids 0/0)."""
    scale = math.sqrt(sumsq / count) if count else 0.0
    return scale if scale > 0.0 else FLOAT32_TINY


def _rms_scale(e, m, blocks, ws) -> tuple[float, np.ndarray | None]:
    """The RMS of the finite compared expected values (the smallest normal float32 when
    that is 0), and, for a one-block tensor, its float64 expected values to reuse."""
    sumsq, count, cached = 0.0, 0, None
    for key, _, _ in blocks:
        e64 = ws.as_float64(e[key], "e64")
        s, c = _finite_sumsq(e64, None if m is None else m[key], ws)
        sumsq, count = sumsq + s, count + c
        if len(blocks) == 1:
            cached = e64    # the small path: reuse it instead of converting twice
    return rms_scale(sumsq, count), cached



class _Workspace:
    """Scratch arrays for the blocks of one comparison, allocated once and reused.

    Fresh multi-megabyte temporaries for every block would make the allocator map and
    unmap them each time (every page faulted in anew), which costs more than the
    arithmetic; with reused buffers a large comparison runs several times faster.
    """

    def __init__(self, capacity: int, reuse: bool = True):
        self.capacity = capacity
        self.reuse = reuse      # False for a single block: plain np.empty is cheapest
        self._buffers: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def take(self, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        """A C-contiguous array of ``shape`` backed by the buffer ``name`` (contents undefined)."""
        if not self.reuse:
            return np.empty(shape, dtype)
        view = self._views.get((name, shape))
        if view is None:
            buf = self._buffers.get(name)
            if buf is None:
                buf = self._buffers[name] = np.empty(self.capacity, dtype)
            view = self._views[name, shape] = buf[:math.prod(shape)].reshape(shape)
        return view

    def as_float64(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x`` as a C-contiguous float64 array: ``x`` itself if it is one, else a copy."""
        if x.dtype == np.float64 and x.flags.c_contiguous:
            return x
        out = self.take(name, np.float64, x.shape)
        np.copyto(out, x, casting="unsafe")
        return out

    def as_float32(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x`` itself if float32 (any layout: only its bits are read), else rounded copy."""
        if x.dtype == np.float32:
            return x
        out = self.take(name, np.float32, x.shape)
        np.copyto(out, x, casting="unsafe")
        return out


class _Accumulator:
    """Running metrics over the blocks of one comparison."""

    def __init__(self, tol, nan_equal: bool, ws: _Workspace):
        self.tol = tol
        self.nan_equal = nan_equal
        self.ws = ws
        self.scale = FLOAT32_TINY
        self.elem_scale: np.ndarray | None = None
        self.floor = 0.0
        self.n_compared = 0
        self.n_bad = 0
        self.n_nonfinite = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.max_ulp = 0
        self.sumsq_diff = 0.0
        self.sumsq_size = 0.0
        self.worst_rel = -1.0            # rel of the worst finite element so far
        self.worst_index: tuple[int, ...] | None = None
        self.worst_is_nonfinite = False
        self.bounds: np.ndarray | None = None    # the bias test's groups (harness.arbiter.stats)
        self.groups: np.ndarray | None = None
        self.flat0 = 0                           # the flat index of the block's first element

    def update(self, a: np.ndarray, e: np.ndarray, m: np.ndarray | None,
               locate: "_Locator", e64: np.ndarray | None = None,
               es: np.ndarray | None = None) -> None:
        """Fold one block (views of actual, expected and the mask) into the running metrics.

        ``e64`` is ``e`` already converted by ``ws.as_float64`` (the one-block path).
        Nothing is written into ``a`` or ``e``: every result goes into workspace buffers.
        Elements that are masked out, or pairs with a NaN/inf, are *invalid*: they get
        diff 0, rel -1 (below any real rel, so never the worst) and ulp 0.
        """
        ws, shape = self.ws, a.shape
        invalid = None
        if m is None:
            self.n_compared += a.size
        else:
            n_sel = int(np.count_nonzero(m))
            if n_sel == 0:
                return
            self.n_compared += n_sel
            invalid = ws.take("invalid", np.bool_, shape)
            np.logical_not(m, out=invalid)
        a64 = ws.as_float64(a, "a64")
        if e64 is None:
            e64 = ws.as_float64(e, "e64")
        diff, rel = self._diff_rel(a64, e64, es)
        if not math.isfinite(diff.max()):   # some pair has a NaN or an inf (maybe masked out)
            invalid = self._nonfinite(a64, e64, m, invalid, locate)
        if invalid is not None:
            np.copyto(diff, 0.0, where=invalid)
            np.copyto(rel, -1.0, where=invalid)
        if self.groups is not None:
            self._group_sums(a64, e64, rel, es, invalid)
        self._sums(diff, e64, es, invalid)
        bad = self._worst(rel, locate)
        self._ulps(a, e, invalid, bad)
        self.n_bad += int(np.count_nonzero(bad))

    def _diff_rel(self, a64, e64, es):
        """|a - e| and |a - e| / (|e| + scale + elem_scale), in workspace buffers."""
        ws, shape = self.ws, a64.shape
        diff = ws.take("diff", np.float64, shape)
        np.subtract(a64, e64, out=diff)
        np.abs(diff, out=diff)
        rel = ws.take("rel", np.float64, shape)
        np.abs(e64, out=rel)
        rel += self.scale
        if es is not None:
            rel += es
        np.divide(diff, rel, out=rel)
        return diff, rel

    def _group_sums(self, a64, e64, rel, es, invalid) -> None:
        """The bias test's sums over the block's pieces of each group (:mod:`harness.arbiter.stats`):
        ``copysign(rel, a - e)`` in the direction of ``e`` (F) and alone (S), ``|e| / den``
        (R), and the count (N), over the valid elements, element by element the compiled
        helper's arithmetic."""
        ws, shape = self.ws, a64.shape
        sgn = ws.take("g_sgn", np.float64, shape)
        np.subtract(a64, e64, out=sgn)
        np.copysign(rel, sgn, out=sgn)                       # S
        rho = ws.take("g_rho", np.float64, shape)
        f = ws.take("g_f", np.float64, shape)
        np.abs(e64, out=f)
        np.add(f, self.scale, out=rho)
        if es is not None:
            rho += es
        np.divide(f, rho, out=rho)                           # R
        np.sign(e64, out=f)
        np.multiply(sgn, f, out=f)                           # F
        cols = [f, sgn, rho]
        if invalid is not None:
            for x in cols:
                np.copyto(x, 0.0, where=invalid)
        n = a64.size
        lo, hi = self.flat0, self.flat0 + n
        b = self.bounds
        g0 = int(np.searchsorted(b, lo, side="right")) - 1
        g1 = int(np.searchsorted(b, hi, side="left"))        # groups g0 .. g1-1 meet the block
        starts = np.maximum(b[g0:g1], lo) - lo
        for k, x in enumerate(cols):
            self.groups[g0:g1, k] += np.add.reduceat(x.reshape(-1), starts)
        if invalid is None:
            counts = np.diff(np.append(starts, n))
        else:
            counts = np.add.reduceat((~invalid).reshape(-1).astype(np.int64), starts)
        self.groups[g0:g1, 3] += counts

    def _nonfinite(self, a64, e64, m, invalid, locate):
        """Count pairs with a NaN or inf that differ (the first is the worst element);
        returns the invalid elements: masked out, or not both finite."""
        ws, shape = self.ws, a64.shape
        finite = ws.take("finite", np.bool_, shape)
        nonfinite = ws.take("nonfinite", np.bool_, shape)
        np.isfinite(a64, out=finite)
        np.isfinite(e64, out=nonfinite)
        finite &= nonfinite
        np.logical_not(finite, out=nonfinite)
        if m is not None:
            nonfinite &= m
        if nonfinite.any():
            an, en = a64[nonfinite], e64[nonfinite]     # few: plain temporaries
            equal = an == en                              # same-sign infinities
            if self.nan_equal:
                equal |= np.isnan(an) & np.isnan(en)
            n_mismatch = int(an.size - np.count_nonzero(equal))
            if n_mismatch:
                self.n_nonfinite += n_mismatch
                self.n_bad += n_mismatch
                if not self.worst_is_nonfinite:       # the first one is the worst element
                    first = int(np.flatnonzero(nonfinite)[np.argmin(equal)])
                    self.worst_index = locate(first)
                    self.worst_is_nonfinite = True
        np.logical_not(finite, out=finite)
        if invalid is None:
            return finite
        invalid |= finite
        return invalid

    def _sums(self, diff, e64, es, invalid) -> None:
        """max |a - e|, and the sums of squares of the differences and of each element's
        size (value, terms, floor) behind the norm-wise error."""
        ws, shape = self.ws, diff.shape
        self.max_abs = max(self.max_abs, float(diff.max()))
        # Sums of squares as square-then-sum (pairwise, no BLAS: a threaded ddot can stall
        # on a busy machine). a64 and diff are not needed after this.
        self.sumsq_diff += _sumsq(diff, diff)
        squares = ws.take("a64", np.float64, shape)
        if es is not None or self.floor:   # each element's size: value, terms, floor
            np.abs(e64, out=squares)
            if es is not None:
                squares += es
            squares += self.floor
            if invalid is not None:
                np.copyto(squares, 0.0, where=invalid)
            self.sumsq_size += _sumsq(squares, squares)
        elif invalid is None:
            self.sumsq_size += _sumsq(e64, squares)
        else:
            np.copyto(squares, e64)
            np.copyto(squares, 0.0, where=invalid)
            self.sumsq_size += _sumsq(squares, squares)

    def _worst(self, rel, locate) -> np.ndarray:
        """The largest rel and where it is; returns the elements over the bound."""
        r = float(rel.max())
        if r > self.max_rel:
            self.max_rel = r
        if r > self.worst_rel and not self.worst_is_nonfinite:
            self.worst_rel = r
            self.worst_index = locate(int(rel.argmax()))   # argmax only when needed
        bad = self.ws.take("bad", np.bool_, rel.shape)
        np.greater(rel, self.tol.rel, out=bad)
        return bad

    def _ulps(self, a, e, invalid, bad) -> None:
        """The largest ulp distance (float32 bits); over tol.ulp, if set, is bad too."""
        ws, shape = self.ws, a.shape
        ulp = ws.take("ulp", np.int64, shape)
        np.subtract(_ulp_keys(ws.as_float32(a, "a32"), ws, "ka"),
                    _ulp_keys(ws.as_float32(e, "e32"), ws, "ke"), out=ulp, dtype=np.int64)
        np.abs(ulp, out=ulp)
        if invalid is not None:
            np.copyto(ulp, 0, where=invalid)
        self.max_ulp = max(self.max_ulp, int(ulp.max()))
        if self.tol.ulp is not None:
            over = ws.take("over", np.bool_, shape)
            np.greater(ulp, self.tol.ulp, out=over)
            bad |= over

def _chunks(shape: tuple[int, ...], limit: int) -> Iterator[tuple[tuple, tuple[int, ...], int]]:
    """Split an array of ``shape`` into blocks of at most ``limit`` elements, in C order.

    Yields ``(key, outer, start)``: ``arr[key]`` is a view of the block; a block index
    ``(j, *rest)`` is ``outer + (start + j, *rest)`` in the full array. An array that fits
    is a single block with ``key == ()`` (the whole array, identity mapping).
    """
    if math.prod(shape) <= limit:
        yield (), (), 0
        return
    # Find the smallest axis k whose trailing block shape[k+1:] still fits, then slice
    # axis k into runs of `step` and loop over all indices of the axes before it.
    k, inner = len(shape) - 1, 1
    while k > 0 and inner * shape[k] <= limit:
        inner *= shape[k]
        k -= 1
    step = max(1, limit // inner)
    for outer in np.ndindex(*shape[:k]):
        outer = tuple(int(i) for i in outer)
        for s in range(0, shape[k], step):
            yield outer + (slice(s, min(s + step, shape[k])),), outer, s


class _Locator:
    """Maps a C-order flat index into a block to a multi-index of the full tensor.

    A block is ``arr[key]`` for a key from :func:`_chunks`: block index ``(j, *rest)`` is
    ``outer + (start + j, *rest)`` in the full array.
    """

    __slots__ = ("shape", "outer", "start")

    def __init__(self, shape: tuple[int, ...], outer: tuple[int, ...], start: int):
        self.shape, self.outer, self.start = shape, outer, start

    def __call__(self, flat: int) -> tuple[int, ...]:
        local = tuple(int(i) for i in np.unravel_index(flat, self.shape))
        return self.outer + (self.start + local[0],) + local[1:]


def _sumsq(x: np.ndarray, out: np.ndarray) -> float:
    """Sum of the squares of ``x``, squared into the scratch array ``out`` (may be ``x``)."""
    np.square(x, out=out)
    return float(out.sum())


def _finite_sumsq(e64: np.ndarray, m: np.ndarray | None, ws: _Workspace) -> tuple[float, int]:
    """Sum of squares and count of the finite values of ``e64`` where ``m`` is True."""
    squares = ws.take("diff", np.float64, e64.shape)  # pass 2's buffers are free in pass 1
    if m is None:
        s = _sumsq(e64, squares)
        if math.isfinite(s):
            return s, e64.size
    keep = ws.take("bad", np.bool_, e64.shape)
    np.isfinite(e64, out=keep)
    if m is not None:
        keep &= m
    squares.fill(0.0)
    np.copyto(squares, e64, where=keep)
    return _sumsq(squares, squares), int(np.count_nonzero(keep))


def _ulp_keys(x32: np.ndarray, ws: _Workspace | None = None, name: str = "") -> np.ndarray:
    """Map float32 values to int32 keys that are monotone in the value (-0 and +0 -> 0).

    Non-negative floats keep their bit pattern; a negative float maps to minus the bit
    pattern of its magnitude, so adjacent floats are 1 apart, across zero too.
    """
    bits = x32.view(np.int32)
    if ws is None:
        key, sign = np.empty(bits.shape, np.int32), np.empty(bits.shape, np.int32)
    else:
        key, sign = ws.take(name, np.int32, bits.shape), ws.take("sign", np.int32, bits.shape)
    np.right_shift(bits, 31, out=sign)         # 0 for +, -1 for -
    np.bitwise_and(bits, 0x7FFFFFFF, out=key)  # magnitude
    np.bitwise_xor(key, sign, out=key)
    np.subtract(key, sign, out=key)            # -magnitude for negative values
    return key


def ulp_key(x: Any) -> int:
    """:func:`_ulp_keys` of one value (rounded to float32), as a Python int."""
    bits = int(np.array(x, dtype=np.float32).view(np.int32))
    return -(bits & 0x7FFFFFFF) if bits < 0 else bits


def ulp_diff(a32: np.ndarray, e32: np.ndarray) -> np.ndarray:
    diff = np.subtract(_ulp_keys(a32), _ulp_keys(e32), dtype=np.int64)
    np.abs(diff, out=diff)
    return diff
