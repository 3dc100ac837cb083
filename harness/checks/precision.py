"""A mixed-precision port's checks at the precision each op ran in: the precision of the
ops behind a check (:func:`precision_of`, None for the C, a kernel port and a float32
torch port: the float32 bounds unchanged), and the witness's spread at a port's precision
(:func:`spread_at`): the float64 model with noise of each op's own precision injected
where the port computes it (:class:`harness.arbiter.oracle.Witness`), so that end-to-end
bounds grow as that noise really grows through the model."""
from __future__ import annotations

import numpy as np

from pyref.model import GPT2 as PyGPT2
from pyref.protocol import KernelSet

from ..arbiter.oracle import Witness, witness_spread
from ..cores import shared
from ..probe import span


def precision_of(state, nodes, ref=None):
    """The precision ``state`` ran ``nodes`` at writing ``ref`` (they accumulate into one
    tensor), or None (float32; a state that does not say, as the C and kernel ports do not)."""
    return state.precision_of(tuple(nodes), ref)


def update_precision(state):
    """``label -> Precision or None`` of a state's update (None for every label: float32)."""
    return state.update_precision


def spread_at(state, step, params, oracle, spread: dict, cache: dict) -> dict:
    """The witness's spread for ``state``: ``spread`` (the float32 witness's) for a port
    that computes at float32; else that of a witness noising each kernel at the port's
    precision (made once per step for each distinct profile, in ``cache``)."""
    precisions = state.witness_precisions()
    if not precisions:
        return spread
    key = tuple(sorted(precisions.items()))
    if key not in cache:
        with span("witness spread"):
            cache[key] = _spread(step, params, oracle, precisions)
    return cache[key]


def _spread(step, params, oracle, precisions: dict) -> dict:
    """The spread of a witness computing each kernel at ``precisions`` (its inputs rounded
    where the port rounds them, its results noised at the precision's own scale)."""
    noisy = Witness(seed=step.t, precisions=precisions)
    witness = PyGPT2(step.config, params, dtype=np.float64, share_params=True,
                     kernels=KernelSet.from_module(noisy, name="witness"))

    def run(_):
        witness.forward(step.inputs, step.targets)
        witness.zero_grad()
        witness.backward()
    shared(run, [0])
    noisy.release()
    return witness_spread(step.config, witness, oracle)


def loss_tolerance(state, step, spread: dict, oracle):
    """``(tolerance, precision)`` of the mean loss of a port that computes below float32,
    or ``(None, None)`` (the step's float32 tolerance serves).

    The mean loss is one number: one witness draw of it can sit far inside the spread
    its noise has (the witness's logits may be off as much as the port's while the mean
    of their losses happens to cancel). So its bound is also taken from the per-position
    losses the witness moved: their errors' root-mean-square over sqrt(B) (the B
    sequences round independently; the positions of one may be correlated), times the
    extreme-value factor of one element, relative to the mean loss."""
    from dataclasses import replace
    from math import sqrt
    from ..arbiter.tolerances import e2e_tolerance, extreme
    from ..graph import Ref, forward_nodes
    if not state.witness_precisions():
        return None, None
    B, T = step.inputs.shape
    node = next(nd for nd in forward_nodes(step.config) if nd.kernel == "crossentropy_forward")
    p = precision_of(state, (node,), node.arg_dict["losses"])
    base = e2e_tolerance("crossentropy_forward", "losses", B * T, 1, spread["mean_loss"], p)
    losses = np.asarray(oracle.acts["losses"], np.float64)
    mean = abs(float(losses.mean()))
    if mean == 0.0:
        return base, p
    per = spread[Ref("acts", "losses")].norm_rel * sqrt(float((losses ** 2).mean())) / (mean * sqrt(B))
    bound = extreme(1) * per
    return replace(base, rel=max(base.rel, bound), norm=max(base.norm, bound),
                   why=f"{base.why}; the mean of B*T per-position losses the witness moved by "
                       f"{per:.2g} relative (their rms over sqrt(B)), x{extreme(1):.2f}"), p
