"""The references every check is measured against: the float64 oracle, and the witness
that measures how far float32-sized rounding noise carries through a model.

* :data:`ORACLE` -- pyref's NumPy kernels, run in float64 on the float32 inputs of a call
  (:func:`oracle_outputs`): the expected values of every per-op, replay and model check.
* :class:`Witness` -- the same kernels with float32-sized noise added to every result; a
  float64 model run on them sits from the oracle's by what an end-to-end tolerance must
  allow (:func:`witness_spread`, :func:`harness.tolerances.e2e_tolerance`).
"""
from __future__ import annotations

import numpy as np

from pyref import numpy_kernels
from pyref.config import GPT2Config
from pyref.constants import U
from pyref.protocol import SIGNATURES, KernelSet
from pyref.spec import SPEC

from .compare import Comparison, Tolerance, compare
from .cores import shared
from .graph import Ref, backward_nodes, forward_nodes, writers
from .probe import span
from pyref.protocol import run_kernel

ORACLE = KernelSet.from_module(numpy_kernels)


def oracle_outputs(kernel: str, args: dict) -> dict[str, np.ndarray]:
    """The oracle's outputs of ``kernel`` on ``args`` (float arrays taken as float64)."""
    return run_kernel(ORACLE, kernel, args, np.float64)


class Witness:
    """The oracle's kernels with float32-sized rounding noise added to every result.

    Each result (a forward's outputs, a backward's contribution to its buffers) is
    multiplied by ``1 + u sqrt(n) xi``, xi standard normal, n that output's reduction
    length in its row of :mod:`pyref.spec` (the same n its per-op tolerance uses): the
    statistical size of a float32 implementation's rounding. Run as a float64 model,
    its distance from the clean oracle measures how much such noise grows through the
    depth of *this* model on *this* batch, which is what an end-to-end tolerance must
    allow and no more. Seeded: the same run gives the same tolerances.
    """

    BACKEND = "numpy"

    BLOCK = 1 << 15   # elements per block of noise: the draws and the scratch stay in cache

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self._xi = np.empty(self.BLOCK, np.float32)
        self._prod = np.empty(self.BLOCK, np.float64)
        for kernel in SIGNATURES:
            setattr(self, kernel, self._wrap(kernel))

    def _noise(self, x: np.ndarray, n: int) -> np.ndarray:
        """``x (1 + u sqrt(n) xi)``, worked in cache-sized blocks. The draws are the same
        stream, in the same order, as one draw of ``x.size`` normals (the generator's
        state runs on across blocks), and each element is the same float64 arithmetic:
        ``x * xi + x``, xi the float32 draw times the float32 scale. A result the caller
        owns outright (a kernel's fresh output, a fresh difference) is perturbed in place
        (no second array of its size); any other gets a new one."""
        with span("witness noise"):
            return self._noisy(x, n)

    def _noisy(self, x: np.ndarray, n: int) -> np.ndarray:
        s = np.float32(U * np.sqrt(max(n, 1)))
        if x.dtype != np.float64:       # the model is float64; kept for any other input
            xi = self.rng.standard_normal(x.shape, dtype=np.float32)
            xi *= s
            out = x * xi
            out += x
            return out
        own = x.flags.owndata and x.flags.writeable and x.flags.c_contiguous
        out = x if own else np.empty(x.shape, np.float64)
        src, dst = np.ascontiguousarray(x).reshape(-1), out.reshape(-1)
        for lo in range(0, src.size, self.BLOCK):
            k = min(self.BLOCK, src.size - lo)
            xi, prod_ = self._xi[:k], self._prod[:k]
            self.rng.standard_normal(out=xi, dtype=np.float32)   # float32 draws: half the cost
            xi *= s
            np.multiply(src[lo:lo + k], xi, out=prod_)          # float64: the relative perturbation
            np.add(prod_, src[lo:lo + k], out=dst[lo:lo + k])    # without rounding 1 + delta to float32
        return out

    def _wrap(self, kernel: str):
        f = getattr(ORACLE, kernel)
        spec = SPEC[kernel]

        def call(*args):
            named = dict(zip(spec.signature, args))
            if spec.returns:
                out = f(*args)
                outs = out if isinstance(out, tuple) else (out,)
                noisy = tuple(self._noise(o, spec.n(name, named)) for name, o in zip(spec.output_names, outs))
                return noisy if isinstance(out, tuple) else noisy[0]
            before = {k: named[k].copy() for k in spec.inplace if named.get(k) is not None}
            f(*args)
            for k, old in before.items():
                # the contribution, perturbed in place (it is ours), added back into the buffer
                delta = self._noise(named[k] - old, spec.n(k, named))
                np.add(old, delta, out=named[k])
        return call


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
