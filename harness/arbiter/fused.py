"""The harness's compiled helper (``llmc/fused_checks.c``), bound through cffi: a
comparison's metrics in one pass over memory, the update check's float64 AdamW with its
three comparisons without storing the expected values, and the witness's noise.

Built on first use into the build cache (:func:`harness.clib.build.ensure_helper`), with
OpenMP and without floating-point contraction: each element's arithmetic is the NumPy
path's (:mod:`harness.arbiter.metrics`, the reference implementation), only the sums are added in
another (fixed) order, so metrics agree to ~1e-15 relative and counts, maxima and the
worst element exactly (tests/arbiter/test_fused.py). Where the helper cannot be built, or a
comparison's layout is one it does not take (a strided view, a broadcast element scale, a
mask other than the causal one), the NumPy path serves; ``LLMC_FUSED=0`` forces it.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from pyref.constants import Held

from .metrics import rms_scale

_CDEF = """
typedef struct { double tol_rel; int64_t tol_ulp; double floor; int32_t nan_equal; double scale; }
    llmc_rule;
typedef struct { int64_t n_compared, n_bad, n_nonfinite; int64_t worst_index;
    double max_abs, max_rel; int64_t max_ulp; double sumsq_diff, sumsq_size; }
    llmc_cmp_out;
typedef struct { const void* a; int32_t a_f64; const void* e; int32_t e_f64; const void* es; int32_t es_kind;
    int64_t n; int64_t causal_T; } llmc_pair;
typedef struct { double lr, beta1, beta2, eps, wd, bc1, bc2; float b1, one_minus_b1, c1, c2, eps_f, amp, wd_f, lr_f; }
    llmc_adamw_hp;
typedef struct { const float *p0, *m0, *v0, *g; const float *p1, *m1, *v1; int64_t n; } llmc_adamw_in;
double llmc_sumsq_expected(const llmc_pair* in, int64_t* count_out, int threads);
int llmc_compare(const llmc_pair* in, const llmc_rule* r, llmc_cmp_out* out, const int64_t* gbound, int64_t G,
                 double* gout, int threads);
void llmc_adamw_sumsq(const llmc_adamw_in* in, const llmc_adamw_hp* h, double sumsq[3], int64_t count[3],
                      int threads);
int llmc_adamw_compare(const llmc_adamw_in* in, const llmc_adamw_hp* h, const llmc_rule r[3],
                       llmc_cmp_out out[3], const int64_t* gbound, int64_t G, double* gout, int threads);
void llmc_noise(double* x, int64_t n, double s, uint64_t seed, uint64_t offset, int threads);
void llmc_add_noisy(double* buf, const double* c, int64_t n, double s, uint64_t seed, uint64_t offset,
                    int threads);
"""

PARALLEL_MIN = 1 << 17   # elements below which one thread is quicker than waking a team

_LOCK = threading.Lock()
_STATE: dict = {}


def _lib():
    """(ffi, lib) of the helper, built and loaded on first use; None where it cannot be."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = _load()
    return _STATE["lib"]


def _load():
    if os.environ.get("LLMC_FUSED", "1") == "0":
        return None
    try:
        from cffi import FFI

        from ..clib.build import BuildError, ensure_helper
        ffi = FFI()
        ffi.cdef(_CDEF)
        return ffi, ffi.dlopen(str(ensure_helper()))
    except (ImportError, OSError, BuildError):
        return None


def available() -> bool:
    return _lib() is not None


def _threads(n: int) -> int:
    """Threads for a call over ``n`` elements: the process's cores (at most 4) from the main
    thread, one from a worker thread (the caller already shares the work among cores)."""
    if n < PARALLEL_MIN or threading.current_thread() is not threading.main_thread():
        return 1
    from ..cores import workers
    return workers()


class Tally:
    """What a comparison's metrics pass returns, for :func:`harness.arbiter.compare.compare` to
    make a Comparison of (the NumPy path's :class:`harness.arbiter.metrics.Tally` alike)."""

    __slots__ = ("n_compared", "n_bad", "n_nonfinite", "max_abs", "max_rel", "max_ulp", "sumsq_diff",
                 "sumsq_size", "worst_index", "scale", "groups")

    @classmethod
    def of(cls, out, scale: float, shape: tuple[int, ...], groups: np.ndarray | None = None) -> "Tally":
        t = cls()
        t.n_compared, t.n_bad, t.n_nonfinite = int(out.n_compared), int(out.n_bad), int(out.n_nonfinite)
        t.max_abs, t.max_rel, t.max_ulp = float(out.max_abs), float(out.max_rel), int(out.max_ulp)
        t.sumsq_diff, t.sumsq_size = float(out.sumsq_diff), float(out.sumsq_size)
        t.groups = groups     # the bias test's sums, (G, 4): harness.arbiter.stats.SUMS
        t.worst_index = None if out.worst_index < 0 else \
            tuple(int(i) for i in np.unravel_index(int(out.worst_index), shape))
        t.scale = scale
        return t


def _f64(x) -> int | None:
    """1 for a C-contiguous float64 array, 0 for a float32 one (the layouts the helper
    reads as they lie), None for anything else."""
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or x.dtype not in (np.float32, np.float64):
        return None
    return int(x.dtype == np.float64)


def _causal_T(m: np.ndarray | None, shape: tuple[int, ...]) -> int | None:
    """0 for no mask, T for the causal lower triangle over the last two axes (a (T, T)
    np.tril broadcast over the leading axes), None for any other mask (the NumPy path
    takes it)."""
    if m is None:
        return 0
    if len(shape) < 2 or shape[-1] != shape[-2] or any(m.strides[:-2]):
        return None
    T = shape[-1]
    if not np.array_equal(m[(0,) * (m.ndim - 2)], np.tril(np.ones((T, T), bool))):
        return None
    return T


def _pair(a: np.ndarray, e: np.ndarray, m, es):
    """(ffi, lib, the helper's ``llmc_pair`` of the arrays) where the helper reads them as
    they lie, else None."""
    lib = _lib()
    if lib is None or a.size == 0:
        return None
    fa, fe = _f64(a), _f64(e)
    T = _causal_T(m, a.shape)
    if fa is None or fe is None or T is None:
        return None
    es_kind = 0
    if es is not None:
        if es.shape != a.shape or _f64(es) is None:
            return None
        es_kind = 1 + _f64(es)
    ffi, L = lib
    pair = ffi.new("llmc_pair*")
    pair.a, pair.a_f64 = ffi.cast("void*", a.ctypes.data), fa
    pair.e, pair.e_f64 = ffi.cast("void*", e.ctypes.data), fe
    pair.es, pair.es_kind = (ffi.NULL if es is None else ffi.cast("void*", es.ctypes.data)), es_kind
    pair.n, pair.causal_T = a.size, T
    return ffi, L, pair


def _expected_scale(L, ffi, pair, threads: int) -> float:
    """The RMS of the pair's finite compared expected values (in fixed blocks: the same on
    any number of threads)."""
    count = ffi.new("int64_t*")
    sumsq = L.llmc_sumsq_expected(pair, count, threads)
    return rms_scale(sumsq, count[0])


def expected_scale(a: np.ndarray, e: np.ndarray, m, es, shared: dict) -> float | None:
    """The RMS scale :func:`tally` computes for ``e`` (under the mask ``m``), kept in
    ``shared`` for the next comparison with the same expected values (another
    implementation's against one float64 tensor); None where the helper does not take the
    arrays (the NumPy path then computes its own)."""
    got = _pair(a, e, m, es)
    if got is None:
        return None
    ffi, L, pair = got
    key = (e.__array_interface__["data"][0], e.shape, e.dtype.str, int(pair.causal_T))
    if key not in shared:
        shared[key] = _expected_scale(L, ffi, pair, _threads(a.size))
    return shared[key]


def tally(a: np.ndarray, e: np.ndarray, m, es, scale: float | None, tol, nan_equal: bool,
          bounds: np.ndarray | None = None) -> Tally | None:
    """The metrics of ``a`` against ``e`` in one pass (two with the RMS scale), with the bias
    test's sums over the groups ``bounds`` delimits (:func:`harness.arbiter.stats.group_bounds`),
    or None when the helper is unavailable or the layout is not one it reads as it lies."""
    got = _pair(a, e, m, es)
    if got is None:
        return None
    ffi, L, pair = got
    threads = _threads(a.size)
    if scale is None:
        scale = _expected_scale(L, ffi, pair, threads)
    r = _rule(ffi.new("llmc_rule*"), tol, nan_equal, scale)
    out = ffi.new("llmc_cmp_out*")
    bounds = None if bounds is None else np.ascontiguousarray(bounds, np.int64)
    gb, G, gout, groups = _groups(ffi, bounds, 1)
    if L.llmc_compare(pair, r, out, gb, G, gout, threads) != 0:
        raise MemoryError("the fused comparison could not allocate its block results")
    return Tally.of(out, scale + tol.floor, a.shape, None if groups is None else groups[0])


def _groups(ffi, bounds: np.ndarray | None, k: int):
    """The group arguments of a call: (boundaries, G, the sums' buffer, the sums: an array
    (k, G, 4) that the buffer is), NULLs and None without groups. ``bounds`` must be a
    C-contiguous int64 array (the caller holds it through the call)."""
    if bounds is None or len(bounds) < 2:
        return ffi.NULL, 0, ffi.NULL, None
    G = len(bounds) - 1
    groups = np.zeros((k, G, 4))
    return ffi.cast("int64_t*", bounds.ctypes.data), G, ffi.cast("double*", groups.ctypes.data), groups


def _rule(r, tol, nan_equal: bool, scale: float):
    r.tol_rel = tol.rel
    r.tol_ulp = -1 if tol.ulp is None else tol.ulp
    r.floor = tol.floor
    r.nan_equal = bool(nan_equal)
    r.scale = scale + tol.floor
    return r


# ----------------------------------------------------------------------------
# the update check

def adamw_tallies(pre: tuple, grads: np.ndarray, post: tuple, hp: dict, tols: tuple,
                  bounds: np.ndarray | None = None) -> tuple[Tally, ...] | None:
    """The tallies of params, m and v after AdamW (``post``, float32 views of one tensor)
    against AdamW in float64 from ``pre`` (params, m, v; m and v None: zeros) and ``grads``,
    ``hp`` as :meth:`pyref.config.AdamW.kernel_args` gives them, with the bias test's sums
    over the groups ``bounds`` delimits; None where the helper cannot take them."""
    lib = _lib()
    arrays = [x for x in (*pre, grads, *post) if x is not None]
    if (pre[1] is None) != (pre[2] is None):    # m and v are both given, or both zeros
        return None
    if lib is None or not all(isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                              for x in arrays):
        return None
    ffi, L = lib
    n = post[0].size
    p = ffi.new("llmc_adamw_in*")
    ptr = lambda x: ffi.NULL if x is None else ffi.cast("float*", x.ctypes.data)   # noqa: E731
    p.p0, p.m0, p.v0, p.g = ptr(pre[0]), ptr(pre[1]), ptr(pre[2]), ptr(grads)
    p.p1, p.m1, p.v1 = ptr(post[0]), ptr(post[1]), ptr(post[2])
    p.n = n
    h = _adamw_hp(ffi.new("llmc_adamw_hp*"), hp)
    threads = _threads(n)
    sumsq, count = ffi.new("double[3]"), ffi.new("int64_t[3]")
    L.llmc_adamw_sumsq(p, h, sumsq, count, threads)
    rules, outs = ffi.new("llmc_rule[3]"), ffi.new("llmc_cmp_out[3]")
    scales = []
    for k in range(3):
        scales.append(rms_scale(sumsq[k], count[k]))
        _rule(rules[k], tols[k], True, scales[k])
    bounds = None if bounds is None else np.ascontiguousarray(bounds, np.int64)
    gb, G, gout, groups = _groups(ffi, bounds, 3)
    if L.llmc_adamw_compare(p, h, rules, outs, gb, G, gout, threads) != 0:
        raise MemoryError("the fused update check could not allocate its block results")
    return tuple(Tally.of(outs[k], scales[k] + tols[k].floor, (n,), None if groups is None else groups[k])
                 for k in range(3))


def _adamw_hp(h, hp: dict):
    """AdamW's constants as the float64 reference and the float32 term sizes use them
    (pyref.numpy_kernels.adamw, pyref.terms.adamw_magnitudes)."""
    t = int(hp["t"])
    w = {k: float(hp[k]) if isinstance(hp[k], Held) else float(np.float64(np.float32(hp[k])))
         for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}   # Held: an optimizer's own double
    h.lr, h.beta1, h.beta2, h.eps, h.wd = w["lr"], w["beta1"], w["beta2"], w["eps"], w["weight_decay"]
    h.bc1 = float(np.float64(1) - np.float64(w["beta1"]) ** t)
    h.bc2 = float(np.float64(1) - np.float64(w["beta2"]) ** t)
    b1, b2 = hp["beta1"], hp["beta2"]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    h.b1, h.one_minus_b1, h.c1, h.c2, h.eps_f = b1, 1 - b1, c1, c2, hp["eps"]
    h.amp = 1.0 if t == 1 else 1 + 1 / c1 + 0.5 / c2
    h.wd_f, h.lr_f = hp["weight_decay"], hp["lr"]
    return h


# ----------------------------------------------------------------------------
# the witness's noise

# The noise passes run on one thread: each follows a kernel's matmul, whose BLAS threads
# still spin on the cores for a while after it returns, so a second OpenMP thread waits for
# a core: measured at GPT-2 124M on 2 cores, 21 ns per element on two threads against 1.5
# on one (a pass over memory, which a second thread speeds up little even when it gets a
# core); the draws are counter-based, so the values do not depend on the threads.
NOISE_THREADS = 1


def noise(x: np.ndarray, s: float, seed: int, offset: int) -> bool:
    """``x *= 1 + s xi`` in place (float64, C-contiguous), xi uniform with variance 1 at
    stream positions ``offset ...``; False where the helper cannot (the caller draws)."""
    lib = _lib()
    if lib is None or x.dtype != np.float64 or not x.flags.c_contiguous or not x.flags.writeable:
        return False
    ffi, L = lib
    L.llmc_noise(ffi.cast("double*", x.ctypes.data), x.size, s, seed, offset, NOISE_THREADS)
    return True


def add_noisy(buf: np.ndarray, c: np.ndarray, s: float, seed: int, offset: int) -> bool:
    """``buf += c (1 + s xi)`` in place (both float64, C-contiguous, one shape)."""
    lib = _lib()
    if lib is None or any(x.dtype != np.float64 or not x.flags.c_contiguous for x in (buf, c)) \
            or buf.shape != c.shape or not buf.flags.writeable:
        return False
    ffi, L = lib
    L.llmc_add_noisy(ffi.cast("double*", buf.ctypes.data), ffi.cast("double*", c.ctypes.data), buf.size, s,
                     seed, offset, NOISE_THREADS)
    return True
