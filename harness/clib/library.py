"""cffi binding (ABI mode) of a train_gpt2.c shared library.

``load_library()`` opens the library (``LLMC_LIB`` or the one ``make lib`` builds),
checks that every symbol of the spec is there and that the struct layout matches our
declaration, and returns a :class:`Library`. Its kernel methods take NumPy arrays with
the C's own argument list, check dtype, size, contiguity, writability, dimensions and
index ranges, and then pass pointers into the arrays: nothing is copied.

The C answers bad input with ``exit()`` or ``assert()``, which would take the Python
interpreter down; every such path is checked here first and raised as a Python
exception (:class:`LlmcInputError`, a ``ValueError``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
from cffi import FFI

from . import fpenv
from .build import BuildError, ensure_library, read_build_info
from .cdefs import CDEF, GPT2_FIELDS, REQUIRED_SYMBOLS
from ..errors import InputError

ffi = FFI()
ffi.cdef(CDEF)

INT_MAX = 2**31 - 1


class LibraryError(InputError, RuntimeError):
    """The library is missing, cannot be loaded, lacks symbols or disagrees on layout."""


class LlmcInputError(InputError, ValueError):
    """An argument the C would crash or exit() on; raised before the C is called."""


# ----------------------------------------------------------------------------
# argument checks: each returns a cffi pointer into the array's own memory

def _array(name: str, a, dtype, n: int) -> None:
    """``a`` is a C-contiguous numpy array of ``dtype`` with exactly ``n`` elements."""
    if not isinstance(a, np.ndarray):
        raise LlmcInputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        c = " (C int)" if dtype == np.int32 else ""
        raise LlmcInputError(f"{name}: expected dtype {np.dtype(dtype).name}{c}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise LlmcInputError(f"{name}: array is not C-contiguous (pass np.ascontiguousarray(...))")
    if a.size != n:
        raise LlmcInputError(f"{name}: expected {n} elements, got {a.size} (shape {a.shape})")


def _float_ptr(name: str, a, n: int, *, out: bool = False):
    """float* into ``a``: float32, C-contiguous, exactly ``n`` elements (writable if ``out``)."""
    _array(name, a, np.float32, n)
    if out and not a.flags.writeable:
        raise LlmcInputError(f"{name}: output array is read-only")
    return ffi.from_buffer("float[]", a, require_writable=out) if n else ffi.NULL


def _int_ptr(name: str, a, n: int, lo: int, hi: int):
    """int* into ``a``: int32, C-contiguous, ``n`` elements, every value in [lo, hi)."""
    _array(name, a, np.int32, n)
    if n:
        bad = (a < lo) | (a >= hi)
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            raise LlmcInputError(
                f"{name}: token id {int(a.ravel()[i])} at flat index {i} is outside [{lo}, {hi})")
    return ffi.from_buffer("int[]", a) if n else ffi.NULL


def _dims(**dims: int) -> None:
    """Every dimension a positive int, and every size the C indexes with int below INT_MAX."""
    for k, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise LlmcInputError(f"{k} must be an int, got {type(v).__name__}")
        if v <= 0:
            raise LlmcInputError(f"{k} must be positive, got {v}")


def _tables(wte_name: str, wte, wpe_name: str, wpe, B, T, C) -> tuple[int, int]:
    """The encoder's dimensions, and (V, maxT): the rows of its token and position tables
    (or their gradients), T within maxT."""
    _dims(B=B, T=T, C=C)
    _fits_int(**{"B*T*C": B * T * C})
    V, maxT = _rows(wte_name, wte, C), _rows(wpe_name, wpe, C)
    if T > maxT:
        raise LlmcInputError(f"T={T} exceeds the {maxT} rows of {wpe_name} (max_seq_len)")
    return V, maxT


def _fits_int(**sizes: int) -> None:
    """Every named size below INT_MAX: the C's kernels index with int (the one check of
    that, for the kernel calls here and for whole models in cmodel)."""
    for k, v in sizes.items():
        if v > INT_MAX:
            raise LlmcInputError(f"{k} = {v} overflows the C's int indexing (max {INT_MAX})")


def _rows(name: str, a, C: int) -> int:
    """Number of C-wide rows in a table such as wte (Vp, C)."""
    if not isinstance(a, np.ndarray):
        raise LlmcInputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.size % C:
        raise LlmcInputError(f"{name}: {a.size} elements is not a whole number of rows of C={C}")
    return a.size // C


# ----------------------------------------------------------------------------

_LOAD_ENV: dict[str, "fpenv.Env | None"] = {}


class _InEnv:
    """The cffi library with every function wrapped to run in the library's own
    floating-point environment (:func:`fpenv.calls_in`)."""

    def __init__(self, raw, env):
        self.raw = raw
        self._env = env
        try:
            self._team = raw.llmc_set_team_fenv
        except (AttributeError, NotImplementedError):
            self._team = None   # a library built elsewhere: the caller's thread only

    def __getattr__(self, name):
        fn = fpenv.calls_in(self._env, getattr(self.raw, name), self._team)
        setattr(self, name, fn)
        return fn


class Library:
    """A loaded train_gpt2.c library. Kernel methods mirror the C signatures exactly."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        if not os.path.isfile(self.path):
            raise LibraryError(f"library {self.path} does not exist (build it with `make lib`, "
                               "or point LLMC_LIB at a built libtrain_gpt2.so)")
        try:
            # Loaded from the default floating-point environment: what its load leaves
            # (FTZ/DAZ from -Ofast's crtfastmath) is the environment its calls run in,
            # and Python gets its own back (harness/clib/fpenv.py).
            # RTLD_NODELETE: the library, and through it the OpenMP runtime it links, stays
            # mapped until the process ends. Unloading them at interpreter teardown while
            # OpenMP's idle worker threads still run in libgomp's code crashed the process
            # (SIGSEGV after every check had passed, in a few percent of runs).
            with fpenv.default_env():
                raw = ffi.dlopen(self.path, ffi.RTLD_NOW | ffi.RTLD_LOCAL | ffi.RTLD_NODELETE)
                env = fpenv.Env.current()
        except OSError as e:
            raise LibraryError(f"cannot load {self.path}: {e}") from None
        # a library is loaded once per process: a second Library of the same path finds it
        # loaded, its constructors already run, so the environment of the first load counts
        self.fp_env = _LOAD_ENV.setdefault(self.path, env)
        self.fp_mode = self.fp_env.mode if self.fp_env is not None else fpenv.Mode(None, None)
        self.lib = _InEnv(raw, self.fp_env)
        missing = [s for s in REQUIRED_SYMBOLS if not self._has(s)]
        if missing:
            raise LibraryError(f"{self.path} does not export {', '.join(missing)}: "
                               "not a train_gpt2.c built with -DTESTING?")
        self.has_openmp = self._has("omp_set_num_threads") and self._has("omp_get_max_threads")
        # from the probe (llmc/abi_probe.c); None for a library built elsewhere
        features = self.lib.llmc_build_features() if self._has("llmc_build_features") else None
        self.finite_math = None if features is None else bool(features & 1)
        self.fast_math = None if features is None else bool(features & 2)
        self.build_info = read_build_info(self.path)
        self.abi_checked = self._check_layout()
        self._stdout_lock = threading.Lock()

    @property
    def fp_description(self) -> str:
        """How the C computes: its floating-point mode and what its compiler assumed."""
        what = [f"C runs with {self.fp_mode}"]
        if self.fp_mode.ftz and not fpenv.default_mode().ftz:
            what[0] += " (set by the library at load; Python keeps its own)"
        if self.finite_math:
            what.append("finite-math build (NaN/Inf assumed absent)")
        elif self.finite_math is None:
            what.append("compile assumptions unknown (no probe)")
        return ", ".join(what)

    def floating_point(self) -> dict:
        """The same, as data for reports: mode, FTZ/DAZ, finite-math and fast-math (None
        where unknown) and the sentence."""
        return {"mode": str(self.fp_mode), "ftz": self.fp_mode.ftz, "daz": self.fp_mode.daz,
                "finite_math": self.finite_math, "fast_math": self.fast_math,
                "description": self.fp_description}

    def _has(self, symbol: str) -> bool:
        try:
            getattr(self.lib, symbol)
            return True
        except (AttributeError, NotImplementedError):
            return False

    def _check_layout(self) -> bool:
        """Compare our cffi struct layout with the compiler's; False if the library has no probe."""
        if not self._has("llmc_abi_layout"):
            return False
        out = ffi.new("size_t[32]")
        n = self.lib.llmc_abi_layout(out)
        ours = [ffi.sizeof("GPT2Config"), ffi.sizeof("ParameterTensors"),
                ffi.sizeof("ActivationTensors"), ffi.sizeof("GPT2")]
        ours += [ffi.offsetof("GPT2", f) for f in GPT2_FIELDS]
        theirs = [out[i] for i in range(min(n, len(ours)))]
        if n != len(ours) + 1 or theirs != ours:
            raise LibraryError(f"struct layout of {self.path} differs from the harness's declaration: "
                               f"library {theirs}, harness {ours}")
        return True

    # -- OpenMP -------------------------------------------------------------
    def set_num_threads(self, n: int) -> None:
        """Set the C's OpenMP thread count (for calls made from this Python thread)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"thread count must be a positive int, got {n!r}")
        if not self.has_openmp:
            if n != 1:
                raise LibraryError(f"{self.path} was built without OpenMP; it runs on 1 thread")
            return
        self.lib.omp_set_num_threads(n)

    def get_num_threads(self) -> int:
        return self.lib.omp_get_max_threads() if self.has_openmp else 1

    @contextlib.contextmanager
    def num_threads(self, n: int | None):
        """Run a block with ``n`` OpenMP threads (None: leave as is)."""
        if n is None:
            yield
            return
        old = self.get_num_threads()
        self.set_num_threads(n)
        try:
            yield
        finally:
            self.set_num_threads(old)

    @contextlib.contextmanager
    def captured_stdout(self):
        """Collect what the C prints to stdout (the config, num_activations) instead of
        letting it interleave with the harness's own output. Yields a list that receives
        the text when the block ends."""
        sink: list[str] = []
        with self._stdout_lock:
            self.lib.fflush(ffi.NULL)
            saved = os.dup(1)
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), 1)
                try:
                    yield sink
                finally:
                    self.lib.fflush(ffi.NULL)
                    os.dup2(saved, 1)
                    os.close(saved)
                    tmp.seek(0)
                    sink.append(tmp.read().decode(errors="replace"))

    # -- kernels, with the C's argument lists ---------------------------------
    def encoder_forward(self, out, inp, wte, wpe, B, T, C):
        V, maxT = _tables("wte", wte, "wpe", wpe, B, T, C)
        self.lib.encoder_forward(_float_ptr("out", out, B * T * C, out=True),
                                 _int_ptr("inp", inp, B * T, 0, V),
                                 _float_ptr("wte", wte, V * C), _float_ptr("wpe", wpe, maxT * C),
                                 B, T, C)

    def encoder_backward(self, dwte, dwpe, dout, inp, B, T, C):
        V, maxT = _tables("dwte", dwte, "dwpe", dwpe, B, T, C)
        self.lib.encoder_backward(_float_ptr("dwte", dwte, V * C, out=True),
                                  _float_ptr("dwpe", dwpe, maxT * C, out=True),
                                  _float_ptr("dout", dout, B * T * C),
                                  _int_ptr("inp", inp, B * T, 0, V), B, T, C)

    def layernorm_forward(self, out, mean, rstd, inp, weight, bias, B, T, C):
        _dims(B=B, T=T, C=C)
        _fits_int(**{"B*T*C": B * T * C})
        N = B * T * C
        self.lib.layernorm_forward(_float_ptr("out", out, N, out=True),
                                   _float_ptr("mean", mean, B * T, out=True),
                                   _float_ptr("rstd", rstd, B * T, out=True),
                                   _float_ptr("inp", inp, N), _float_ptr("weight", weight, C),
                                   _float_ptr("bias", bias, C), B, T, C)

    def layernorm_backward(self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, B, T, C):
        _dims(B=B, T=T, C=C)
        _fits_int(**{"B*T*C": B * T * C})
        N = B * T * C
        self.lib.layernorm_backward(_float_ptr("dinp", dinp, N, out=True),
                                    _float_ptr("dweight", dweight, C, out=True),
                                    _float_ptr("dbias", dbias, C, out=True),
                                    _float_ptr("dout", dout, N), _float_ptr("inp", inp, N),
                                    _float_ptr("weight", weight, C), _float_ptr("mean", mean, B * T),
                                    _float_ptr("rstd", rstd, B * T), B, T, C)

    def _matmul_forward(self, fn, out, inp, weight, bias, B, T, C, OC):
        _dims(B=B, T=T, C=C, OC=OC)
        _fits_int(**{"B*T*C": B * T * C, "B*T*OC": B * T * OC, "OC*C": OC * C})
        fn(_float_ptr("out", out, B * T * OC, out=True), _float_ptr("inp", inp, B * T * C),
           _float_ptr("weight", weight, OC * C),
           ffi.NULL if bias is None else _float_ptr("bias", bias, OC), B, T, C, OC)

    def matmul_forward(self, out, inp, weight, bias, B, T, C, OC):
        self._matmul_forward(self.lib.matmul_forward, out, inp, weight, bias, B, T, C, OC)

    def matmul_forward_naive(self, out, inp, weight, bias, B, T, C, OC):
        self._matmul_forward(self.lib.matmul_forward_naive, out, inp, weight, bias, B, T, C, OC)

    def matmul_backward(self, dinp, dweight, dbias, dout, inp, weight, B, T, C, OC):
        _dims(B=B, T=T, C=C, OC=OC)
        _fits_int(**{"B*T*C": B * T * C, "B*T*OC": B * T * OC, "OC*C": OC * C})
        self.lib.matmul_backward(_float_ptr("dinp", dinp, B * T * C, out=True),
                                 _float_ptr("dweight", dweight, OC * C, out=True),
                                 ffi.NULL if dbias is None else _float_ptr("dbias", dbias, OC, out=True),
                                 _float_ptr("dout", dout, B * T * OC), _float_ptr("inp", inp, B * T * C),
                                 _float_ptr("weight", weight, OC * C), B, T, C, OC)

    @staticmethod
    def _attention_dims(B, T, C, NH):
        _dims(B=B, T=T, C=C, NH=NH)
        if C % NH:
            raise LlmcInputError(f"C={C} is not divisible by NH={NH}")
        _fits_int(**{"B*T*3C": B * T * 3 * C, "B*NH*T*T": B * NH * T * T})

    def attention_forward(self, out, preatt, att, inp, B, T, C, NH):
        self._attention_dims(B, T, C, NH)
        self.lib.attention_forward(_float_ptr("out", out, B * T * C, out=True),
                                   _float_ptr("preatt", preatt, B * NH * T * T, out=True),
                                   _float_ptr("att", att, B * NH * T * T, out=True),
                                   _float_ptr("inp", inp, B * T * 3 * C), B, T, C, NH)

    def attention_backward(self, dinp, dpreatt, datt, dout, inp, att, B, T, C, NH):
        self._attention_dims(B, T, C, NH)
        self.lib.attention_backward(_float_ptr("dinp", dinp, B * T * 3 * C, out=True),
                                    _float_ptr("dpreatt", dpreatt, B * NH * T * T, out=True),
                                    _float_ptr("datt", datt, B * NH * T * T, out=True),
                                    _float_ptr("dout", dout, B * T * C),
                                    _float_ptr("inp", inp, B * T * 3 * C),
                                    _float_ptr("att", att, B * NH * T * T), B, T, C, NH)

    def gelu_forward(self, out, inp, N):
        _dims(N=N)
        _fits_int(N=N)
        self.lib.gelu_forward(_float_ptr("out", out, N, out=True), _float_ptr("inp", inp, N), N)

    def gelu_backward(self, dinp, inp, dout, N):
        _dims(N=N)
        _fits_int(N=N)
        self.lib.gelu_backward(_float_ptr("dinp", dinp, N, out=True), _float_ptr("inp", inp, N),
                               _float_ptr("dout", dout, N), N)

    def residual_forward(self, out, inp1, inp2, N):
        _dims(N=N)
        _fits_int(N=N)
        self.lib.residual_forward(_float_ptr("out", out, N, out=True), _float_ptr("inp1", inp1, N),
                                  _float_ptr("inp2", inp2, N), N)

    def residual_backward(self, dinp1, dinp2, dout, N):
        _dims(N=N)
        _fits_int(N=N)
        self.lib.residual_backward(_float_ptr("dinp1", dinp1, N, out=True),
                                   _float_ptr("dinp2", dinp2, N, out=True),
                                   _float_ptr("dout", dout, N), N)

    @staticmethod
    def _vocab_dims(B, T, V, Vp):
        _dims(B=B, T=T, V=V, Vp=Vp)
        if V > Vp:
            raise LlmcInputError(f"V={V} exceeds the padded vocabulary Vp={Vp}")
        _fits_int(**{"B*T*Vp": B * T * Vp})

    def softmax_forward(self, probs, logits, B, T, V, Vp):
        self._vocab_dims(B, T, V, Vp)
        self.lib.softmax_forward(_float_ptr("probs", probs, B * T * Vp, out=True),
                                 _float_ptr("logits", logits, B * T * Vp), B, T, V, Vp)

    def crossentropy_forward(self, losses, probs, targets, B, T, Vp):
        self._vocab_dims(B, T, Vp, Vp)
        self.lib.crossentropy_forward(_float_ptr("losses", losses, B * T, out=True),
                                      _float_ptr("probs", probs, B * T * Vp),
                                      _int_ptr("targets", targets, B * T, 0, Vp), B, T, Vp)

    def crossentropy_softmax_backward(self, dlogits, dlosses, probs, targets, B, T, V, Vp):
        self._vocab_dims(B, T, V, Vp)
        self.lib.crossentropy_softmax_backward(
            _float_ptr("dlogits", dlogits, B * T * Vp, out=True), _float_ptr("dlosses", dlosses, B * T),
            _float_ptr("probs", probs, B * T * Vp), _int_ptr("targets", targets, B * T, 0, V),
            B, T, V, Vp)

    def __repr__(self) -> str:
        return f"<llmc Library {self.path}>"


_cache: dict[str, Library] = {}
_cache_lock = threading.Lock()


def as_library(lib: "Library | str | os.PathLike | None") -> Library:
    """A loaded Library from a Library, a path, or None (the default library)."""
    return lib if isinstance(lib, Library) else load_library(lib)


def default_library_path() -> str:
    """``$LLMC_LIB``, else our own train_gpt2.c built with the default flags in the
    build cache (:func:`harness.clib.build.build_dir`), compiled there on first use."""
    if os.environ.get("LLMC_LIB"):
        return os.environ["LLMC_LIB"]
    try:
        return ensure_library().library
    except BuildError as e:
        raise LibraryError(f"no library given (--lib or LLMC_LIB) and building our own failed: {e}") from None


def load_library(path: str | os.PathLike | None = None) -> Library:
    """Open (once per path) the library at ``path``, ``$LLMC_LIB``, or our own (built
    into the cache on first use)."""
    key = str(Path(path or default_library_path()).resolve())
    with _cache_lock:
        lib = _cache.get(key)
        if lib is None:
            lib = _cache[key] = Library(key)
        return lib
