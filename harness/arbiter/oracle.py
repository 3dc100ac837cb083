"""The references every check is measured against: the float64 oracle, and the witness
that measures how far float32-sized rounding noise carries through a model.

* :data:`ORACLE` -- pyref's NumPy kernels, run in float64 on the float32 inputs of a call
  (:func:`oracle_outputs`): the expected values of every per-op, replay and model check.
* :class:`Witness` -- the same kernels with float32-sized noise added to every result; a
  float64 model run on them sits from the oracle's by what an end-to-end tolerance must
  allow (:func:`witness_spread`, :func:`harness.arbiter.tolerances.e2e_tolerance`).
"""
from __future__ import annotations

from math import sqrt

import numpy as np

from pyref import numpy_kernels
from pyref.config import GPT2Config
from pyref.constants import U
from pyref.protocol import SIGNATURES, KernelSet
from pyref.spec import SPEC

from .fused import add_noisy, noise
from .precision import round_to
from .compare import Comparison, Tolerance, compare
from ..cores import shared
from ..graph import Ref, backward_nodes, forward_nodes, writers
from ..probe import span
from pyref.protocol import run_kernel

ORACLE = KernelSet.from_module(numpy_kernels)


def oracle_outputs(kernel: str, args: dict) -> dict[str, np.ndarray]:
    """The oracle's outputs of ``kernel`` on ``args`` (float arrays taken as float64)."""
    return run_kernel(ORACLE, kernel, args, np.float64)


class Witness:
    """The oracle's kernels with float32-sized rounding noise added to every result.

    Each result (a forward's outputs, a backward's contribution to its buffers) is
    multiplied by ``1 + u sqrt(n) xi``, n that output's reduction length in its row of
    :mod:`pyref.spec` (the same n its per-op tolerance uses), xi uniform on [-sqrt 3,
    sqrt 3]: mean 0 and variance 1, the statistical size of a float32 implementation's
    rounding (a rounding error is uniform). Run as a float64 model, its distance from the
    clean oracle measures how much such noise grows through the depth of *this* model on
    *this* batch, which is what an end-to-end tolerance must allow and no more.

    The draws come from a counter-based generator (splitmix64 of the seed and the stream
    position: :func:`draws`), computed by the compiled helper in place
    (:func:`harness.arbiter.fused.noise`) or, where it is not at hand, by NumPy with the same
    draws and the same arithmetic: seeded, the same run gives the same tolerances either
    way, whatever the thread count. A backward kernel runs into zeroed buffers (its
    contribution alone), which are noised and added into the model's: no copy of a
    gradient buffer is made; the zeroed buffers are kept for the next call of the same
    shape until :meth:`release`. AdamW (a free run's witness trains) rewrites its buffers:
    there the change of each is noised.
    """

    BACKEND = "numpy"

    BLOCK = 1 << 15   # elements per block of the NumPy draws: they and the scratch stay in cache

    def __init__(self, seed: int = 0, precisions: dict | None = None):
        # kernel -> harness.arbiter.precision.Precision where a port computes it more coarsely
        # than float32: its results are noised at that precision's element scale
        # (Precision.unit(n), what its per-op tolerance allows) instead of u sqrt(n)
        self.precisions = {k: p for k, p in (precisions or {}).items() if not p.is_float32}
        self.key = _splitmix64(seed)
        self.position = 0          # the stream position of the next draw
        self._scratch: dict[tuple, np.ndarray] = {}   # the backward's zeroed buffers (_zeros)
        for kernel in SIGNATURES:
            setattr(self, kernel, self._wrap(kernel))

    def _take(self, size: int) -> int:
        at, self.position = self.position, self.position + size
        return at

    def _scale(self, kernel: str, n: int) -> float:
        """The noise's scale for a result of ``kernel`` over a chain of ``n``: ``u sqrt(n)``,
        or the element scale of the precision a port computes the kernel at."""
        p = self.precisions.get(kernel)
        return U * sqrt(max(n, 1)) if p is None else p.unit(n, inputs=not p.rounds_inputs)

    def _noise(self, x: np.ndarray, n: int, kernel: str = "") -> np.ndarray:
        """``x (1 + s xi)``, s = ``u sqrt(n)`` (:meth:`_scale`): in place on a result the
        caller owns outright (a kernel's fresh float64 output), else on a new float64 array."""
        own = x.dtype == np.float64 and x.flags.owndata and x.flags.writeable and x.flags.c_contiguous
        out = x if own else np.array(x, np.float64, order="C")
        s, at = self._scale(kernel, n), self._take(out.size)
        with span("witness noise"):
            if not noise(out, s, self.key, at):
                flat = out.reshape(-1)
                for lo in range(0, flat.size, self.BLOCK):
                    hi = min(flat.size, lo + self.BLOCK)
                    flat[lo:hi] += flat[lo:hi] * (s * draws(self.key, at + lo, hi - lo))
        return out

    def _add_noisy(self, buf: np.ndarray, c: np.ndarray, n: int, kernel: str = "") -> None:
        """``buf += c (1 + s xi)``: a backward's contribution, noised, added."""
        s, at = self._scale(kernel, n), self._take(c.size)
        with span("witness noise"):
            if not add_noisy(buf, c, s, self.key, at):
                b, cf = buf.reshape(-1), np.ascontiguousarray(c).reshape(-1)
                for lo in range(0, cf.size, self.BLOCK):
                    hi = min(cf.size, lo + self.BLOCK)
                    b[lo:hi] += cf[lo:hi] + cf[lo:hi] * (s * draws(self.key, at + lo, hi - lo))

    def _zeros(self, kernel: str, name: str, shape: tuple) -> np.ndarray:
        """A zeroed float64 scratch for one buffer of a backward kernel, kept for the next
        call of the same shape: a fresh np.zeros of a parameter's gradient is touched page
        by page for the first time in the kernel's +=, which at 124M cost the witness's
        backward as much again as its arithmetic (the contribution is consumed by
        _add_noisy before the next call, so one per (kernel, buffer, shape) serves)."""
        buf = self._scratch.get((kernel, name, shape))
        if buf is None:
            buf = self._scratch[(kernel, name, shape)] = np.zeros(shape)
        else:
            buf.fill(0.0)
        return buf

    def release(self) -> None:
        """Drop the backward's scratch buffers (a finished model's witness holds none)."""
        self._scratch.clear()

    def _wrap(self, kernel: str):
        f = getattr(ORACLE, kernel)
        spec = SPEC[kernel]

        p = self.precisions.get(kernel)

        def call(*args):
            if p is not None and p.rounds_inputs:
                args = _rounded_inputs(spec, args, p.compute)
            named = dict(zip(spec.signature, args))
            if spec.returns:
                out = f(*args)
                outs = out if isinstance(out, tuple) else (out,)
                noisy = tuple(self._noise(o, spec.n(name, named), kernel) for name, o in zip(spec.output_names, outs))
                return noisy if isinstance(out, tuple) else noisy[0]
            if spec.updates:   # AdamW rewrites its buffers: the change is what is noised
                before = {k: named[k].copy() for k in spec.inplace}
                f(*args)
                for k, old in before.items():
                    change = named[k] - old
                    named[k][...] = old
                    self._add_noisy(named[k], change, spec.n(k, named), kernel)
                return None
            own = {k: self._zeros(kernel, k, named[k].shape) for k in spec.inplace if named.get(k) is not None}
            f(*(own.get(k, a) for k, a in zip(spec.signature, args)))
            for k, c in own.items():
                self._add_noisy(named[k], c, spec.n(k, named), kernel)
        return call


def _rounded_inputs(spec, args: tuple, dtype: str) -> tuple:
    """A kernel's inputs rounded to ``dtype`` as a port computing the kernel at it rounds
    them (its operands cast, its parameters held in it): exactly, nearest even, not
    noise -- a rounded weight is the same at every position, so its error does not
    average away over a batch as independent noise would. Buffers it writes stay as they are."""
    out = []
    for name, a in zip(spec.signature, args):
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and name not in spec.inplace:
            a = round_to(np.asarray(a, np.float32), dtype).astype(np.float64)
        out.append(a)
    return tuple(out)


_GAMMA = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _splitmix64(seed: int) -> int:
    """A 64-bit key from a seed (splitmix64's finaliser), so that seeds 1, 2, 3 give
    unrelated streams."""
    z = (seed + _GAMMA) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def draws(key: int, at: int, size: int) -> np.ndarray:
    """The witness's draws at stream positions ``at .. at + size``: uniform on [-sqrt 3,
    sqrt 3), splitmix64 of ``key + (i + 1) gamma``, bit for bit what the compiled helper
    draws (llmc/fused_checks.c)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(at + 1, at + size + 1, dtype=np.uint64) * np.uint64(_GAMMA))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (z >> np.uint64(11)).astype(np.float64)
    u *= 2.0 ** -53
    u *= 2.0
    u -= 1.0
    u *= 1.7320508075688772
    return u


_FREE = Tolerance(rel=np.inf, norm=np.inf)


def _spread(ref: Ref, witness_state, oracle_state) -> Comparison:
    return compare(ref.get(witness_state), ref.get(oracle_state), name=str(ref), tol=_FREE)


def witness_spread(cfg: GPT2Config, witness_state, oracle_state) -> dict:
    """For every tensor the graph produces, how far the witness sits from the oracle."""
    refs = list(writers(forward_nodes(cfg) + backward_nodes(cfg)))
    spread = dict(zip(refs, shared(lambda ref: _spread(ref, witness_state, oracle_state), refs)))
    spread["mean_loss"] = compare(np.array([witness_state.mean_loss]), np.array([oracle_state.mean_loss]),
                                  name="mean_loss", tol=_FREE)
    return spread
