"""The loss's changes (the catalogue's loss module: softmax, cross-entropy, labels): the
softmax over the padded columns or of scaled logits, a log's eps, label smoothing, another
divisor, ignored positions, labels shifted a position, a loss of probabilities (judged as a
model's replay judges it), and the loss mean over B*T±1 (gpt2_forward's and gpt2_backward's,
no kernel's: an edit of the C checked through a training step).

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import edit_function, pristine_source

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, ce_log_eps, failures, judge_as_replay, port_cases, port_with, tiny_run)

from harness import build_library, load_library
from harness import report as R
from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME


# ----------------------------------------------------------------------------- ports

def ce_backward_log_eps(dlogits, dlosses, probs, targets, V):
    """The gradient of -log(p + 1e-8) through the softmax: dloss * p/(p + eps) * (probs - onehot)."""
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), -1)[..., 0]
    nk.crossentropy_softmax_backward(dlogits, dlosses * (p / (p + F(1e-8))), probs, targets, V)


def softmax_scaled(k):
    def softmax_forward(logits, V):
        z = logits[..., :V] * F(k)
        e = np.exp(z - z.max(-1, keepdims=True))
        out = np.zeros_like(logits)
        out[..., :V] = e / e.sum(-1, keepdims=True)
        return out
    return softmax_forward


def ce_backward_port(smoothing=0.0, factor=1.0, ignore=False):
    """The loss's backward as torch computes cross_entropy(label_smoothing=, reduction=,
    ignore_index=): smoothed targets, another divisor, positions ignored (those whose
    target is the first position's) with the mean over the rest."""
    def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
        target = np.zeros(probs.shape[:-1] + (V,), F)
        np.put_along_axis(target, targets[..., None].astype(np.intp), F(1), -1)
        target = F(1 - smoothing) * target + F(smoothing / V)
        dl = dlosses * F(factor)
        if ignore:
            skip = targets == targets.flat[0]
            dl = np.where(skip, F(0), dl * F(skip.size / (skip.size - skip.sum())))
        dlogits[..., :V] += (probs[..., :V] - target) * dl[..., None]
    return crossentropy_softmax_backward


def softmax_padded(logits, V):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _shifted(targets, step):
    out = targets.copy()
    if step > 0:
        out[:, :-1] = targets[:, 1:]        # the last position keeps its own label
    else:
        out[:, 1:] = targets[:, :-1]
    return out


def ce_forward_shift(step):
    return lambda probs, targets: nk.crossentropy_forward(probs, _shifted(targets, step))


def ce_backward_shift(step):
    def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
        nk.crossentropy_softmax_backward(dlogits, dlosses, probs, _shifted(targets, step), V)
    return crossentropy_softmax_backward


def ce_backward_shift_dropped(dlogits, dlosses, probs, targets, V):
    """A model's loss over logits[:, :-1] and targets[:, 1:]: position t scored against the
    target of t+1, the last position dropped, the mean over the B*(T-1) left."""
    B, T = targets.shape
    d = np.zeros_like(dlogits)
    nk.crossentropy_softmax_backward(d, dlosses * F(T / (T - 1)), probs, _shifted(targets, +1), V)
    d[:, -1] = 0
    dlogits += d


def _time_major(targets):
    """The (B, T) targets as a port reads them time-major: targets.t().reshape(-1) against
    the logits' (B*T) rows."""
    return targets.T.reshape(targets.shape)


def ce_forward_time_major(probs, targets):
    return nk.crossentropy_forward(probs, _time_major(targets))


def ce_backward_time_major(dlogits, dlosses, probs, targets, V):
    nk.crossentropy_softmax_backward(dlogits, dlosses, probs, _time_major(targets), V)


def ce_backward_reversed(dlogits, dlosses, probs, targets, V):
    nk.crossentropy_softmax_backward(dlogits, dlosses, probs, np.ascontiguousarray(targets[:, ::-1]), V)


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "crossentropy.logit-scale": [("softmax_forward", softmax_scaled(0.5))],
    "crossentropy.label-smoothing": [("crossentropy_softmax_backward", ce_backward_port(smoothing=0.1))],
    "crossentropy.divisor": [("crossentropy_softmax_backward", ce_backward_port(factor=4.0))],
    "crossentropy.ignored-positions": [("crossentropy_softmax_backward", ce_backward_port(ignore=True))],
    "softmax.padded-columns": [("softmax_forward", softmax_padded)],
    "crossentropy.log-eps": [("crossentropy_forward", ce_log_eps),
                             ("crossentropy_softmax_backward", ce_backward_log_eps)],
    "labels.next-position": [("crossentropy_forward", ce_forward_shift(+1)),
                             ("crossentropy_softmax_backward", ce_backward_shift(+1)),
                             ("crossentropy_softmax_backward", ce_backward_shift_dropped)],
    "labels.previous-position": [("crossentropy_forward", ce_forward_shift(-1)),
                                 ("crossentropy_softmax_backward", ce_backward_shift(-1))],
    "labels.time-major": [("crossentropy_forward", ce_forward_time_major),          # BUGS10
                          ("crossentropy_softmax_backward", ce_backward_time_major)],
    "labels.permuted": [("crossentropy_softmax_backward", ce_backward_reversed)],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- model level

# a variant that needs what only a model's replay passes (the logits beside the loss's
# backward): its float32 ports, judged as the replay judges them, with the call the replay
# hands the diagnosis
def _ce_probs_port(form):
    if form.startswith("z-loss"):
        return _z_loss_port(1e-4 if form == "z-loss" else 1e-3)

    def port(logits, dlosses, targets, V):
        z = logits[..., :V].astype(F)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, targets[..., None].astype(np.intp), F(1), -1)
        if form == "softmax-twice":
            q = np.exp(p - p.max(-1, keepdims=True))
            g = q / q.sum(-1, keepdims=True) - onehot
        else:
            g = -onehot
        out = np.zeros(logits.shape, F)
        out[..., :V] = dlosses[..., None] * p * (g - (p * g).sum(-1, keepdims=True))
        return out
    return port


def _z_loss_port(coef):
    """The loss's gradient with PaLM's z-loss: loss + coef * mean(logsumexp(logits)^2)."""
    def port(logits, dlosses, targets, V):
        z = logits[..., :V].astype(F)
        mx = z.max(-1, keepdims=True)
        lse = mx + np.log(np.exp(z - mx).sum(-1, keepdims=True))
        p = np.exp(z - lse)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, targets[..., None].astype(np.intp), F(1), -1)
        out = np.zeros(logits.shape, F)
        out[..., :V] = dlosses[..., None] * (p - onehot + F(2 * coef) * lse * p)
        return out
    return port


def _model_level_case(vid, form=None):
    """The loss's backward of a model whose loss is of the probabilities (the softmax
    twice; no log), judged as the replay judges it, with the logits beside the call."""
    from harness.diagnosis import Call
    rng = np.random.default_rng(0)
    B, T, V, Vp = 2, 8, 50, 64
    logits = np.zeros((B, T, Vp), F)
    logits[..., :V] = 2 * rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    probs = nk.softmax_forward(logits, V)
    dlosses = np.full((B, T), F(1 / (B * T)))
    args = {"dlogits": np.zeros((B, T, Vp), F), "dlosses": dlosses, "probs": probs, "targets": targets, "V": V}
    actual = _ce_probs_port(form or vid.split(".")[1])(logits, dlosses, targets, V)
    a64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
           for k, v in args.items()}
    expected = {"dlogits": a64["dlogits"].copy()}
    nk.crossentropy_softmax_backward(expected["dlogits"], a64["dlosses"], a64["probs"], targets, V)
    expected = expected["dlogits"]
    call = Call("crossentropy_softmax_backward", "dlogits", dict(a64, logits=logits.astype(np.float64)))
    return judge_as_replay(vid, "crossentropy_softmax_backward", "dlogits", actual, expected, args, call)


MODEL_LEVEL = ["crossentropy.softmax-twice", "crossentropy.no-log", "crossentropy.z-loss"]
# the forms each is tried in: (variant id, the port's form)
MODEL_LEVEL_FORMS = [("crossentropy.softmax-twice", None), ("crossentropy.no-log", None),
                     ("crossentropy.z-loss", "z-loss"), ("crossentropy.z-loss", "z-loss-1e-3")]     # BUGS10


@pytest.mark.parametrize("variant_id, form", MODEL_LEVEL_FORMS)
def test_a_model_level_change_is_diagnosed_with_it(variant_id, form):
    c = _model_level_case(variant_id, form)
    assert_diagnosed([c], variant_id)
    if form and form.startswith("z-loss"):      # the coefficient found
        assert c.diagnosis.causes[0].value == pytest.approx(1e-3 if form.endswith("1e-3") else 1e-4, rel=1e-3)


# ----------------------------------------------------------------------------- the loss mean, edited in the C

# The loss mean is gpt2_forward's and gpt2_backward's, not a kernel's: each is seen by one
# check of a step (the mean loss; the end-to-end gradients, which all scale with dlosses)
MEAN_EDITS = [("crossentropy.mean-over-BT+1", "gpt2_forward", "mean_loss /= B * T;", "mean_loss /= B * T + 1;"),
              ("crossentropy.mean-over-BT-1", "gpt2_backward", "1.0f / (B*T)", "1.0f / (B*T - 1)")]


@pytest.fixture(scope="module")
def mean_mutant(tmp_path_factory):
    text = pristine_source()
    for _, func, old, new in MEAN_EDITS:
        text = edit_function(text, func, old, new)
    d = tmp_path_factory.mktemp("diag_mean")
    (d / "train_gpt2.c").write_text(text)
    return load_library(build_library(d / "train_gpt2.c", d / "lib.so", quiet=True).library)


def test_edited_loss_mean_is_diagnosed(mean_mutant):
    report = tiny_run(lib=mean_mutant)
    (step,) = report.steps
    failed = [c for c in step.checks if not c.passed]
    assert {c.kind for c in failed} == {"loss", "e2e"}          # replay and update pass
    loss = next(c for c in failed if c.kind == "loss")
    assert loss.diagnosis.ids == ("crossentropy.mean-over-BT+1",)
    grads = [c for c in failed if c.kind == "e2e"]
    assert all(c.tensor.startswith(("grads", "grads_acts")) for c in grads)
    assert all(c.diagnosis.ids == ("crossentropy.mean-over-BT-1",) for c in grads), \
        [c.diagnosis.text() for c in grads if c.diagnosis.ids != ("crossentropy.mean-over-BT-1",)]
    assert "why: probable cause: the loss (or its gradient, dlosses) averaged over B*T+1" in R.run_summary(report)


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("loss"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)
