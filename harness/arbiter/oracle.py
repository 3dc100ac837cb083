"""The references every check is measured against: the float64 oracle, and the witness
that measures how far float32-sized rounding noise carries through a model.

* :data:`ORACLE` -- pyref's NumPy kernels, run in float64 on the float32 inputs of a call
  (:func:`oracle_outputs`): the expected values of every per-op, replay and model check.
* :class:`Witness` -- the same kernels with float32-sized noise added to every result; a
  float64 model run on them sits from the oracle's by what an end-to-end tolerance must
  allow (:func:`witness_spread`, :func:`harness.arbiter.tolerances.e2e_tolerance`).
"""
from __future__ import annotations

from dataclasses import dataclass
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
        self.reseed(seed)
        self._scratch: dict[tuple, np.ndarray] = {}   # the backward's zeroed buffers (_zeros)
        for kernel in SIGNATURES:
            setattr(self, kernel, self._wrap(kernel))

    def reseed(self, seed: int) -> None:
        """Start the stream of ``seed`` from its first draw: what a new ``Witness(seed)``
        draws, with this one's scratch buffers kept (a run's witness, one seed per step)."""
        self.key = _splitmix64(seed)
        self.position = 0          # the stream position of the next draw

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

    def _zeros(self, shape: tuple, slot: int) -> np.ndarray:
        """A zeroed float64 scratch for one buffer of a backward kernel, kept for the next
        call: a fresh np.zeros of a parameter's gradient is touched page by page for the
        first time in the kernel's +=, which at 124M cost the witness's backward as much
        again as its arithmetic. The contribution is consumed by _add_noisy before the
        next call, so one buffer per shape serves every kernel (``slot``: the call's
        first, second ... buffer of that shape: residual_backward's two, attention's
        dpreatt and datt); the encoder's dwte and the LM head's dweight share one."""
        buf = self._scratch.get((shape, slot))
        if buf is None:
            buf = self._scratch[(shape, slot)] = np.zeros(shape)
        else:
            buf.fill(0.0)
        return buf

    def scratch_bytes(self) -> int:
        """What the backward's scratch buffers hold now."""
        return sum(b.nbytes for b in self._scratch.values())

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
            own = _scratch_of(self, spec.inplace, named)
            f(*(own.get(k, a) for k, a in zip(spec.signature, args)))
            for k, c in own.items():
                self._add_noisy(named[k], c, spec.n(k, named), kernel)
        return call


def _scratch_of(witness: Witness, inplace: tuple, named: dict) -> dict:
    """A backward call's zeroed scratch, buffer by buffer (those it was given)."""
    own, seen = {}, {}
    for k in inplace:
        if named.get(k) is not None:
            shape = named[k].shape
            seen[shape] = seen.get(shape, -1) + 1
            own[k] = witness._zeros(shape, seen[shape])
    return own


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


# ----------------------------------------------------------------------------- a run's witness

MARGIN = 1 << 30   # bytes left over, beyond what a run's buffers need, before a witness is kept


def _elements(cfg: GPT2Config, B: int, T: int) -> tuple[int, int, int]:
    """(parameters, activations, the witness's backward scratch) of ``cfg`` at (B, T), in
    elements: the scratch one buffer per distinct shape a backward kernel writes
    (:meth:`Witness._zeros`): the LM head's dlogits and dweight (wte's, shared with the
    encoder's), each layer's weight gradients and the activation gradients' shapes."""
    from math import prod
    from pyref.config import act_shapes
    C, Vp, NH, BT = cfg.channels, cfg.padded_vocab_size, cfg.num_heads, B * T
    P = cfg.num_parameters()
    A = sum(prod(s) for s in act_shapes(cfg, B, T).values())
    per_shape = {(Vp, C): 1, (BT, Vp): 1, (cfg.max_seq_len, C): 1, (3 * C, C): 1, (C, C): 1,
                 (4 * C, C): 1, (C, 4 * C): 1, (BT, C): 2, (BT, 4 * C): 1, (BT, 3 * C): 1,
                 (B * NH, T * T): 2, (C,): 2, (3 * C,): 1, (4 * C,): 1}
    return P, A, sum(n * prod(s) for s, n in per_shape.items())


def witness_bytes(cfg: GPT2Config, B: int, T: int) -> int:
    """What a witness kept through a run holds: its float64 gradients, activations and
    their gradients (it reads the C's parameters) and its backward's scratch."""
    P, A, S = _elements(cfg, B, T)
    return 8 * (P + 2 * A + S)


def run_bytes(cfg: GPT2Config, B: int, T: int) -> int:
    """What a run holds besides the witness at its fullest: the C model (float32 params,
    grads, m, v, acts, grads_acts), the float64 oracle (grads, acts, grads_acts), one
    float32 reference as large as the C, and the pre-step params, m, v copied for the
    update checks."""
    P, A, _ = _elements(cfg, B, T)
    return 2 * 4 * (4 * P + 2 * A) + 8 * (P + 2 * A) + 4 * 3 * P


def mem_available() -> int | None:
    """The memory this machine can still give without swapping (``MemAvailable`` of
    /proc/meminfo), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_HELD: list[bool] = []     # hold_freed_memory's answer, once per process
_ARENA: list[bool] = []    # one_arena's


def _libc():
    """glibc's C library (ctypes), or None where this is not glibc (musl, macOS)."""
    import ctypes
    import ctypes.util
    import platform
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(settings: tuple) -> bool:
    """glibc's mallopt for each (parameter, value); False off glibc, with
    ``LLMC_HOLD_MEMORY=0`` in the environment (the benchmark's other side) or where one
    is refused."""
    import os
    libc = None if os.environ.get("LLMC_HOLD_MEMORY", "1") == "0" else _libc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in settings)


def one_arena() -> bool:
    """Every thread of this process allocating from glibc's main arena (``M_ARENA_MAX``
    1), so that :func:`hold_freed_memory` holds what the worker threads free too (a
    thread's own arena cannot grow past 64 MiB without mmap). Call it before the threads
    first allocate (a thread keeps the arena it first had); alone, it changes nothing else.
    Returns whether it is in force; once per process."""
    if not _ARENA:
        _ARENA.append(_mallopt(((_M_ARENA_MAX, 1),)))
    return _ARENA[0]


def hold_freed_memory() -> bool:
    """Keep the memory this process frees for its own reuse, for the rest of its life
    (``llmc-parity run`` calls it after its first step, where the memory allows): glibc's
    malloc told to serve every block from its heap (no mmap, ``M_MMAP_MAX`` 0) and never
    to trim the heap (``M_TRIM_THRESHOLD`` -1), with every thread in one arena
    (:func:`one_arena`). A step's fresh buffers (the kernels' outputs, the C's pre-step
    copies, the update checks' float64 AdamW) then reuse the pages the step before freed:
    on a VM whose host takes freed memory back (virtio balloon's free page reporting)
    each fresh page's first touch costs ~10 us, every step. After the first step, not
    before: the first step's long-lived buffers (the C's, the oracle's, the kept
    witness's) are made with its transients between them, and a heap that held the
    transients' holes would raise the run's peak (by 1.9 GiB at 124M, measured; from step
    2 on the transients reuse each other's places). Returns whether it is in force (False
    off glibc or with ``LLMC_HOLD_MEMORY=0``); called again, it does nothing more."""
    if not _HELD:
        _HELD.append(one_arena() and _mallopt(((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))))
    return _HELD[0]


def trim_heap() -> bool:
    """Give the heap's free pages back to the system now (glibc's ``malloc_trim(0)``):
    a benchmark's baseline, so that memory freed before it is not reused unseen. False
    off glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)      # its answer says whether any was given back, not whether it worked
    return True


@dataclass(frozen=True)
class WitnessPlan:
    """Whether a run keeps its witness's buffers from step to step, and why: kept when
    the memory available holds them beside what the run needs anyway (and a margin)."""

    keep: bool
    need: int                  # bytes: the kept witness + the rest of the run + MARGIN
    available: int | None      # bytes: MemAvailable when decided (None: unknown)

    def line(self) -> str:
        gib = lambda b: f"{b / 2**30:.1f} GiB"   # noqa: E731
        have = "unknown" if self.available is None else gib(self.available)
        if self.keep:
            return f"witness: kept from step to step (needs {gib(self.need)}; {have} available)"
        return (f"witness: made afresh each step (kept, the run would need {gib(self.need)}; "
                f"{have} available)")


def plan_witness(cfg: GPT2Config, B: int, T: int, available: int | None = -1) -> WitnessPlan:
    """Keep the witness (:class:`WitnessRun`) when ``available`` (default: MemAvailable
    now) holds its buffers, the run's others (:func:`run_bytes`) and :data:`MARGIN`;
    unknown memory: kept only below 1 GiB of need."""
    if available == -1:
        available = mem_available()
    need = witness_bytes(cfg, B, T) + run_bytes(cfg, B, T) + MARGIN
    keep = need <= available if available is not None else need <= 2 * MARGIN
    return WitnessPlan(keep, need, available)


class WitnessRun:
    """A run's witness: the float64 model on :class:`Witness` kernels, reading ``params``
    (the C's float32 parameters, shared), run once per step with that step's seed.

    Kept (``keep=True``), its buffers (activations, gradients, the backward's scratch)
    are made by the first step and reused by every later one, which therefore pays no
    first touch of fresh memory; its results are those of a witness made afresh for the
    step, bit for bit (every activation is rewritten by the forward, the gradients and
    the scratch are zeroed before they accumulate, the stream restarts at the step's
    seed). Not kept, it is made for each step and dropped by :meth:`done`. ``keep=None``:
    decided by the first step from its batch's shape (:func:`plan_witness`).

    ``every``: the spread is measured at steps 1, 1 + every, 1 + 2 every, ... (:meth:`due`)
    and the last one measured (:attr:`spread`) serves the steps between (1, the default:
    every step; benchmarks/witness_drift.py measures what a larger one costs in margin)."""

    def __init__(self, cfg: GPT2Config, params: np.ndarray, keep: bool | None = None,
                 precisions: dict | None = None, every: int = 1):
        if int(every) != every or every < 1:
            raise ValueError(f"the witness is measured every k >= 1 steps, got {every!r}")
        self.config, self.params, self.keep, self.precisions = cfg, params, keep, precisions
        self.every = int(every)
        self.plan: WitnessPlan | None = None
        self.noisy: Witness | None = None
        self.model = None
        self.spread: dict | None = None     # the last spread measured (run_parity's)

    def due(self, t: int) -> bool:
        """Whether step ``t`` (from 1) measures the spread afresh."""
        return self.spread is None or (t - 1) % self.every == 0

    def run(self, seed: int, inputs: np.ndarray, targets: np.ndarray) -> float:
        """The witness's forward and backward of one step (seeded ``seed``): its loss."""
        from pyref.model import GPT2
        if self.keep is None:
            self.plan = plan_witness(self.config, *np.shape(inputs))
            self.keep = self.plan.keep
        if self.model is None:
            self.noisy = Witness(seed, self.precisions)
            self.model = GPT2(self.config, self.params, dtype=np.float64, share_params=True,
                              kernels=KernelSet.from_module(self.noisy, name="witness"))
        else:
            self.noisy.reseed(seed)
            self.model.load_state(self.params)
        loss = float(self.model.forward(inputs, targets))
        self.model.zero_grad()
        self.model.backward()
        if not self.keep:
            self.noisy.release()    # not needed by the spread
        return loss

    def measures_after(self, t: int, steps: int) -> bool:
        """Whether a step after ``t`` (up to ``steps``) runs the witness again."""
        return any((u - 1) % self.every == 0 for u in range(t + 1, steps + 1))

    def done(self, again: bool = True) -> None:
        """The step's spread measured: a witness not kept is dropped, and a kept one where
        it will not run ``again`` (its buffers, as large as the oracle's, are not held
        through the rest of the run: a failing check's diagnosis and recording)."""
        if not self.keep or not again:
            self.release()

    def release(self) -> None:
        """Drop every buffer (the next :meth:`run` makes them again)."""
        self.model = self.noisy = None
