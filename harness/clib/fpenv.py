"""The C's floating-point environment is the C's business only.

A library built with ``-Ofast`` (llm.c's own Makefile flags) carries gcc's
``crtfastmath.o``, whose load-time constructor sets flush-to-zero and denormals-are-zero
in the control register of the thread that loads it. Loaded into Python, that would switch
NumPy, the float64 oracle and the comparison engine to FTZ/DAZ too, silently.

So the binding loads a library from the default environment, records the environment the
library's load left (what the library's own program would run with), gives Python its own
environment back, and runs every C call inside the library's environment
(:class:`Env.entered`). The environment is read and written with C99's ``fegetenv`` /
``fesetenv`` from the C library, which on x86-64 and AArch64 glibc save and restore the
whole control state (MXCSR with FTZ/DAZ; FPCR with FZ).
"""
from __future__ import annotations

import contextlib
import ctypes.util
import platform
import sys
from dataclasses import dataclass

from cffi import FFI

_ffi = FFI()
_ffi.cdef("int fegetenv(void* envp); int fesetenv(const void* envp);")
_ENV_BYTES = 64   # larger than fenv_t on every glibc target (x86-64: 32 bytes, AArch64: 8)


def _libm():
    for name in (ctypes.util.find_library("m"), "libm.so.6", None):
        try:
            lib = _ffi.dlopen(name)
            lib.fegetenv, lib.fesetenv   # noqa: B018: resolve both now
            return lib
        except (OSError, AttributeError):
            continue
    return None


_LIBM = _libm() if sys.platform.startswith("linux") else None
# glibc's FE_DFL_ENV is ((const fenv_t *) -1): the environment a program starts with
_FE_DFL_ENV = _ffi.cast("void*", -1)


@dataclass(frozen=True)
class Mode:
    """What a saved environment means for denormals."""

    ftz: bool | None    # flush-to-zero (results that would be subnormal become 0)
    daz: bool | None    # denormals-are-zero (subnormal inputs read as 0)

    def __str__(self) -> str:
        if self.ftz is None:
            return "unknown"
        on = [n for n, v in (("FTZ", self.ftz), ("DAZ", self.daz)) if v]
        return "+".join(on) if on else "IEEE (gradual underflow)"


_MACHINE = platform.machine().lower()


def _control(raw: bytes) -> bytes:
    """The control part of a saved environment: what decides how the next operations
    compute (rounding, FTZ/DAZ, exception masks), without the sticky exception flags that
    every computation sets. x86-64: the x87 control word and MXCSR less its flag bits;
    AArch64: FPCR. Elsewhere the whole environment."""
    if _MACHINE in ("x86_64", "amd64"):
        mxcsr = int.from_bytes(raw[28:32], "little") & ~0x3F
        return raw[0:2] + mxcsr.to_bytes(4, "little")
    if _MACHINE in ("aarch64", "arm64"):
        return raw[0:4]
    return raw


def _decode(raw: bytes) -> Mode:
    if _MACHINE in ("x86_64", "amd64"):
        mxcsr = int.from_bytes(raw[28:32], "little")   # glibc's fenv_t: x87 state, then __mxcsr
        return Mode(ftz=bool(mxcsr & 0x8000), daz=bool(mxcsr & 0x0040))
    if _MACHINE in ("aarch64", "arm64"):
        fpcr = int.from_bytes(raw[0:4], "little")      # fenv_t: __fpcr, __fpsr
        fz = bool(fpcr & (1 << 24))
        return Mode(ftz=fz, daz=fz)                     # FZ flushes inputs and outputs
    return Mode(None, None)


class Env:
    """One saved floating-point environment (opaque bytes of a ``fenv_t``)."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.mode = _decode(raw)

    @staticmethod
    def available() -> bool:
        return _LIBM is not None

    @classmethod
    def current(cls) -> "Env | None":
        if _LIBM is None:
            return None
        buf = _ffi.new(f"char[{_ENV_BYTES}]")
        if _LIBM.fegetenv(buf) != 0:
            return None
        return cls(bytes(_ffi.buffer(buf)))

    def set(self) -> None:
        buf = _ffi.new(f"char[{_ENV_BYTES}]", self.raw)
        _LIBM.fesetenv(buf)

    def __eq__(self, other) -> bool:
        """Same control state (the exception flags each computation leaves do not count)."""
        return isinstance(other, Env) and _control(self.raw) == _control(other.raw)

    def __hash__(self) -> int:
        return hash(_control(self.raw))


@contextlib.contextmanager
def default_env():
    """Run a block (a library's load) in the environment a fresh program starts with, then
    give the caller's environment back. Yields nothing; read :meth:`Env.current` inside."""
    saved = Env.current()
    if saved is None:
        yield
        return
    _LIBM.fesetenv(_FE_DFL_ENV)
    try:
        yield
    finally:
        saved.set()


def default_mode() -> Mode:
    with default_env():
        env = Env.current()
    return env.mode if env is not None else Mode(None, None)


def calls_in(lib_env: Env | None, fn, team=None):
    """``fn`` (a C function) wrapped to run inside ``lib_env`` and give the caller's
    environment back afterwards, whatever happens. Per call, so it is re-entrant and
    thread-safe (the environment is per thread). ``lib_env`` None: ``fn`` itself.

    ``team(env_buffer)`` (the probe's ``llmc_set_team_fenv``, where the library has it)
    sets the environment in the OpenMP worker threads too: the C's parallel loops run
    there, and the runtime may be shared with torch's, whose parallel ops must not inherit
    the C's flush-to-zero from a worker the C last used."""
    if lib_env is None or _LIBM is None:
        return fn
    want = _control(lib_env.raw)
    buf = _ffi.new(f"char[{_ENV_BYTES}]", lib_env.raw)

    def call(*args):
        mine = _ffi.new(f"char[{_ENV_BYTES}]")
        _LIBM.fegetenv(mine)
        if _control(_ffi.buffer(mine)[:]) == want:
            return fn(*args)   # the caller's mode is the C's: nothing to switch
        _LIBM.fesetenv(buf)
        if team is not None:
            team(buf)
        try:
            return fn(*args)
        finally:
            if team is not None:
                team(mine)
            _LIBM.fesetenv(mine)
    call.__name__ = getattr(fn, "__name__", "c_call")
    return call
