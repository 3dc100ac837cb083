"""softmax, cross-entropy and labels: the padded columns, an epsilon in the log, the logits
scaled, the loss of the probabilities, label smoothing, an auxiliary z-loss, the divisor of the
mean, ignored, shifted or permuted positions (the targets read time-major)."""
from __future__ import annotations

import numpy as np

from pyref import numpy_kernels

from ..engine import Fit, Variant, const_text
from ._common import _oracle


def _softmax_padded(kernel, args, ctx, value):
    """The softmax over all Vp columns; in the loss's backward (where the replay passes the
    logits too), dlogits over all Vp columns from those probabilities."""
    x = args.get("logits")
    if x is None or x.shape[-1] == int(args["V"]):
        return None
    e = np.exp(x - np.maximum(x.max(-1, keepdims=True), numpy_kernels.ATT_MAXVAL_INIT))
    probs = e / e.sum(-1, keepdims=True)
    if kernel == "softmax_forward":
        return {"probs": probs}
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    return {"dlogits": args["dlogits"] + args["dlosses"][..., None] * (probs - onehot)}


def _logit_scale(kernel, args, ctx, value):
    """The logits scaled by ``value`` (a temperature 1/value) before the softmax: the
    probabilities of value*logits over the V columns; in the loss's backward (given the
    logits) dlogits = dloss * value * (p - onehot)."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    z = value * x[..., :V]
    e = np.exp(z - z.max(-1, keepdims=True))
    probs = np.zeros_like(x)
    probs[..., :V] = e / e.sum(-1, keepdims=True)
    if kernel == "softmax_forward":
        return {"probs": probs}
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    d = args["dlosses"][..., None] * value * (probs - onehot)
    return {"dlogits": args["dlogits"] + np.where(np.arange(x.shape[-1]) < V, d, 0.0)}


def _logit_scale_estimate(kernel, args, actual, ctx=None):
    """The scale s of softmax(s*logits) from the output, in closed form: log p_i - log p_j
    = s*(l_i - l_j), so s is the slope of the log-probabilities (from dlogits: of log of
    the non-target columns' gradient) against the logits, over a few positions."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    rows = x.reshape(-1, x.shape[-1])[:, :V]
    act = actual.reshape(-1, actual.shape[-1])[:, :V]
    if kernel == "crossentropy_softmax_backward":
        act = act - args["dlogits"].reshape(-1, actual.shape[-1])[:, :V]
        tgt = args["targets"].reshape(-1)
        act[np.arange(act.shape[0]), tgt] = np.nan     # the target column holds p - 1
    take = np.linspace(0, rows.shape[0] - 1, min(8, rows.shape[0])).astype(int)
    slopes = []
    for i in take:
        y, l = act[i], rows[i]
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() < 3:
            continue
        ly, ll = np.log(y[ok]), l[ok]
        ll = ll - ll.mean()
        den = float(ll @ ll)
        if den > 0:
            slopes.append(float(ll @ (ly - ly.mean())) / den)
    return float(np.median(slopes)) if slopes else None


def _logit_scale_name(kernel, args, value, ctx):
    if abs(value - 1) < 1e-6:
        return None, value, ""
    return "crossentropy.logit-scale", value, f" (a temperature of {const_text(1 / value)})"


def _loss_on_probs(kernel, args, ctx, value):
    """The loss's gradient (given the logits) when the loss is taken of the probabilities
    instead of the logits (the choice): ``"softmax-twice"``, cross-entropy of
    softmax(logits) (a softmax before F.cross_entropy): -log softmax(p)[target];
    ``"no-log"``, nll_loss of softmax(logits) (the log forgotten): -p[target]."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    z = x[..., :V]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    if ctx["choice"].key == "softmax-twice":
        q = np.exp(p - p.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        g = q - onehot                                   # d loss / d p
    else:
        g = -onehot                                      # d(-p[target]) / d p
    d = p * (g - (p * g).sum(-1, keepdims=True))         # through the softmax
    out = args["dlogits"].copy()
    out[..., :V] += args["dlosses"][..., None] * d
    return {"dlogits": out}


def _losses_on_probs(kernel, args, **kw):
    return [_Loss("softmax-twice", "the loss taken of the probabilities: cross-entropy of softmax(logits) "
                  "(a softmax applied before the cross-entropy's own)"),
            _Loss("no-log", "the loss taken of the probabilities without their log: nll_loss(softmax(logits)) "
                  "= -p[target] (the log forgotten)")]


class _Loss(str):
    def __new__(cls, key, text):
        obj = super().__new__(cls, text)
        obj.key = key
        return obj


def _loss_on_probs_terms(kernel, args, output):
    """The sizes of the terms such a loss's gradient is made of, per element: a port
    recomputes the probabilities from the logits and multiplies them again (dloss*p*(g -
    <p,g>)), rounding relative to dloss*p*(|g| + <p,|g|>) and to the probabilities."""
    x = args.get("logits")
    if x is None or output != "dlogits":
        return 0.0
    V = int(args["V"])
    z = x[..., :V]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dl = np.abs(args["dlosses"])[..., None]
    out = np.zeros(x.shape)
    out[..., :V] = dl * p * (2.0 + (p * 1.0).sum(-1, keepdims=True))
    return out


def _loss_on_probs_name(kernel, args, value, ctx):
    return f"crossentropy.{ctx['choice'].key}", value, ""


def _ce_log_eps(kernel, args, ctx, value):
    """-log(p + eps) for the target's probability; in the backward, its gradient through the
    softmax: dloss * p/(p + eps) * (probs - onehot)."""
    p = np.take_along_axis(args["probs"], args["targets"][..., None].astype(np.intp), -1)[..., 0]
    if kernel == "crossentropy_forward":
        return {"losses": -np.log(p + value)}
    start, delta = _ce_delta(kernel, args)
    return {"dlogits": start + (p / (p + value))[..., None] * delta}


def _ce_log_eps_estimate(kernel, args, actual, ctx):
    """eps of -log(p + eps) from the loss's gradient, in closed form: each row is the C's
    scaled by r = p/(p + eps), so eps = p*(1/r - 1) (the median over the rows)."""
    if kernel != "crossentropy_softmax_backward":
        return None
    start, delta = _ce_delta(kernel, args)
    a = np.asarray(actual, np.float64) - start
    den = (delta * delta).sum(-1)
    ok = den > 0
    r = np.where(ok, (a * delta).sum(-1) / np.where(ok, den, 1.0), np.nan)
    p = np.take_along_axis(args["probs"], args["targets"][..., None].astype(np.intp), -1)[..., 0]
    ok &= (r > 0) & (r < 1) & (p > 0)
    if not ok.any():
        return None
    # each row's estimate p*(1/r - 1) carries the rounding of r times p: weighted by 1/p^2
    w = 1.0 / p[ok] ** 2
    return float(np.sum(w * p[ok] * (1.0 / r[ok] - 1.0)) / np.sum(w))


def _ce_log_eps_fit(kernel):
    if kernel == "crossentropy_softmax_backward":
        return Fit(1e-12, 1e-1, estimate=_ce_log_eps_estimate)
    return Fit(1e-12, 1e-1, log=True)


def _shift(step: int):
    """Labels of the neighbouring position: target t+step, within each sequence. In the
    loss's backward, its gradient scaled by ``value`` (fitted: a model that shifts the
    targets inside its loss averages over the B*(T-1) positions left, not B*T)."""
    def run(kernel, args, ctx, value):
        if args["targets"].shape[1] < 2:
            return None
        out = _oracle(kernel, args, targets=np.roll(args["targets"], -step, axis=1))
        if kernel == "crossentropy_softmax_backward" and value is not None and value != 1.0:
            start = args["dlogits"]
            out["dlogits"] = start + value * (out["dlogits"] - start)
        return out
    return run


def _shift_fit(kernel):
    return Fit(1e-3, 1e3, linear=True) if kernel == "crossentropy_softmax_backward" else None


def _shift_name(step: int):
    def name(kernel, args, value, ctx):
        vid = "labels.next-position" if step > 0 else "labels.previous-position"
        if value is None or abs(value - 1.0) < 1e-6:
            return vid, None, ""
        B, T = args["targets"].shape
        if abs(value - T / (T - 1)) < 1e-6 * T:
            return vid, T / (T - 1), (f"; the loss averaged over the B*(T-1) = {B * (T - 1)} positions left "
                                      f"(the {'last' if step > 0 else 'first'} position dropped)")
        return vid, value, f"; the loss scaled by {const_text(value)}"
    return name


def _shift_defined(step: int):
    def defined(kernel, output, args):
        B, T = args["targets"].shape
        d = np.ones((B, T), bool)
        d[:, T - 1 if step > 0 else 0] = False   # the label that falls off the end
        return d if kernel == "crossentropy_forward" else d[..., None]
    return defined


def _ce_delta(kernel, args):
    """The C's crossentropy_softmax_backward: (the buffer before, its contribution)."""
    start = args["dlogits"].copy()
    out = _oracle(kernel, args)
    return start, out["dlogits"] - start


def _label_smoothing(kernel, args, ctx, value):
    """Targets smoothed (torch's label_smoothing=eps): (1-eps)*onehot + eps/V over the V
    real columns; dlogits gains dloss*eps*(onehot - 1/V)."""
    V = int(args["V"])
    start, delta = _ce_delta(kernel, args)
    dl = args["dlosses"][..., None]
    onehot = np.zeros(delta.shape[:-1] + (V,))
    np.put_along_axis(onehot, args["targets"][..., None].astype(np.intp), 1.0, -1)
    delta[..., :V] += dl * value * (onehot - 1.0 / V)
    return {"dlogits": start + delta}


def _divisor(kernel, args, ctx, value):
    """The loss (and so dlosses) scaled by ``value``: averaged over another count."""
    if kernel == "loss_mean":
        return {ctx["output"]: args["value"] * value}
    start, delta = _ce_delta(kernel, args)
    return {"dlogits": start + value * delta}


def _divisor_name(kernel, args, value, ctx):
    n_c = int(args["n"]) if kernel == "loss_mean" else int(np.prod(args["targets"].shape))
    if value <= 0:
        return None, value, ""
    n = n_c / value
    B, T = (None, None) if kernel == "loss_mean" else args["targets"].shape
    near = round(n)
    if near < 1 or abs(n - near) > 1e-3 * max(n, 1) or near in (n_c, n_c - 1, n_c + 1):
        return None, value, ""
    named = {1: "summed, not averaged", B: f"B={B}", T: f"T={T}"}
    return "crossentropy.divisor", n_c / near, f"{near}" + (f" ({named[near]})" if near in named else "") + \
        f" instead of B*T={n_c}"


def _ignored(kernel, args, ctx, value):
    """Some positions ignored (ignore_index, a padding mask): their gradient is zero, the
    others' scaled by ``value`` (averaged over the rest). Which positions: those whose
    gradient is zero in the judged output where the C's is not."""
    start, delta = _ce_delta(kernel, args)
    actual = np.asarray(ctx["actual"], np.float64) - start
    zero = np.all(actual == 0, axis=-1) & np.any(delta != 0, axis=-1)
    if not zero.any() or zero.all():
        return None
    return {"dlogits": start + np.where(zero[..., None], 0.0, value * delta)}


def _ignored_name(kernel, args, value, ctx):
    start, delta = _ce_delta(kernel, args)
    a = np.asarray(ctx["actual"], np.float64) - start
    zero = np.all(a == 0, axis=-1) & np.any(delta != 0, axis=-1)
    targets = np.unique(args["targets"][zero])
    n = int(zero.sum())
    text = f"{n} of the {zero.size} positions ignored"
    if targets.size == 1:
        text += f" (those whose target is {int(targets[0])}: ignore_index={int(targets[0])})"
    return "crossentropy.ignored-positions", value, text


def _z_loss(kernel, args, ctx, value):
    """The loss plus ``value`` * logsumexp(logits)^2 averaged as the loss is (PaLM's z-loss):
    its gradient adds dloss * 2 * value * lse * p to the logits' (the softmax over the V
    columns the loss reads); needs the logits (the replay passes them)."""
    x = args.get("logits")
    if x is None:
        return None
    V = int(args["V"])
    z = x[..., :V]
    mx = z.max(-1, keepdims=True)
    lse = mx + np.log(np.exp(z - mx).sum(-1, keepdims=True))
    start, delta = _ce_delta(kernel, args)
    delta[..., :V] += args["dlosses"][..., None] * 2.0 * value * lse * np.exp(z - lse)
    return {"dlogits": start + delta}


def _z_loss_name(kernel, args, value, ctx):
    if abs(value) < 1e-9:
        return None, value, ""
    return "crossentropy.z-loss", value, ""


def _targets_used(kernel, args, actual):
    """The target each position was scored against, read from the output: in the loss's
    gradient, the column of p - 1 (the most negative of dlogits/dloss); in the losses, the
    column whose -log p is the loss. (B, T), or None where no gradient says it."""
    if kernel == "crossentropy_forward":      # (its probabilities are zero past V)
        lp = np.log(np.maximum(args["probs"], 1e-300))
        return np.argmin(np.abs(lp + np.asarray(actual, np.float64)[..., None]), axis=-1)
    V, dl = int(args["V"]), args["dlosses"]
    if np.any(dl == 0):
        return None
    g = (np.asarray(actual, np.float64) - args["dlogits"])[..., :V] / dl[..., None]
    return np.argmin(g, axis=-1)


def _targets_permuted(kernel, args, ctx, value):
    """The loss against the targets found by :func:`_targets_used`, where they are the
    targets of other positions (:func:`_permutation`)."""
    used = _targets_used(kernel, args, ctx["actual"])
    if used is None or _permutation(args["targets"], used) is None:
        return None
    return _oracle(kernel, args, targets=used.astype(args["targets"].dtype))


def _permutation(targets, used):
    """How ``used`` takes the (B, T) ``targets`` from other positions: (id, words), or None
    where it is the targets themselves or not a rearrangement of them."""
    B, T = targets.shape
    if np.array_equal(used, targets) or not np.array_equal(np.sort(used, None), np.sort(targets, None)):
        return None
    if any(np.array_equal(used, np.roll(targets, k, axis=1)) for k in (1, -1)):
        return None       # shifted a position: labels.next-position's, labels.previous-position's
    flat = targets.reshape(-1)
    if B > 1 and T > 1 and np.array_equal(used.reshape(-1), targets.T.reshape(-1)):
        return "labels.time-major", ("the targets read in (T, B) order against the logits' (B, T): "
                                     "targets.t().reshape(-1) (position b*T+t scored against the target of "
                                     "(b', t') = ((b*T+t) % B, (b*T+t) // B))")
    if B > 1 and T > 1 and np.array_equal(used, flat.reshape(T, B).T):
        return "labels.time-major", ("the logits flattened in (T, B) order against the targets' (B, T) "
                                     "(position (b, t) scored against the target at b + t*B of the flat targets)")
    if np.array_equal(used, targets[:, ::-1]):
        return "labels.permuted", "the targets reversed in time (position t scored against the target of T-1-t)"
    if all(any(np.array_equal(used[b], targets[c]) for c in range(B)) for b in range(B)):
        return "labels.permuted", "the sequences' targets given to other sequences of the batch"
    return "labels.permuted", "each position scored against the target of another position"


def _targets_permuted_name(kernel, args, value, ctx):
    used = _targets_used(kernel, args, ctx["actual"])
    found = None if used is None else _permutation(args["targets"], used)
    return (None, value, "") if found is None else (found[0], value, found[1])


def _mean_over(delta: int):
    def run(kernel, args, ctx, value):
        n = int(args["n"])
        return None if n + delta < 1 else {ctx["output"]: args["value"] * (n / (n + delta))}
    return run


VARIANTS: tuple[Variant, ...] = (
    Variant("softmax.padded-columns", "softmax", ("softmax_forward", "crossentropy_softmax_backward"),
            "softmax normalises over all Vp columns, padding included, instead of the V real ones",
            _softmax_padded),
    Variant("crossentropy.log-eps", "crossentropy", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "cross-entropy takes -log(p + {value}): an epsilon inside the log", _ce_log_eps,
            fit=_ce_log_eps_fit),
    Variant("crossentropy.mean-over-BT+1", "crossentropy", ("loss_mean",),
            "the loss (or its gradient, dlosses) averaged over B*T+1 positions instead of B*T",
            _mean_over(+1)),
    Variant("crossentropy.mean-over-BT-1", "crossentropy", ("loss_mean",),
            "the loss (or its gradient, dlosses) averaged over B*T-1 positions instead of B*T",
            _mean_over(-1)),
    Variant("labels.next-position", "labels", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "labels shifted one position: position t is scored against the target of t+1{note}",
            _shift(+1), defined=_shift_defined(+1), fit=_shift_fit, name=_shift_name(+1)),
    Variant("labels.previous-position", "labels", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "labels shifted one position: position t is scored against the target of t-1{note}",
            _shift(-1), defined=_shift_defined(-1), fit=_shift_fit, name=_shift_name(-1)),
    Variant("crossentropy.logit-scale", "crossentropy", ("softmax_forward", "crossentropy_softmax_backward"),
            "the logits scaled by {value}{note} before the softmax", _logit_scale,
            fit=Fit(0.01, 100.0, estimate=_logit_scale_estimate), name=_logit_scale_name),
    Variant("crossentropy.loss-of-probabilities", "crossentropy", ("crossentropy_softmax_backward",),
            "{choice}", _loss_on_probs, choices=_losses_on_probs, name=_loss_on_probs_name,
            terms=_loss_on_probs_terms),
    Variant("crossentropy.label-smoothing", "crossentropy", ("crossentropy_softmax_backward",),
            "the targets label-smoothed: (1-{value})*onehot + {value}/V (label_smoothing={value})",
            _label_smoothing, fit=Fit(1e-4, 1.0, linear=True)),
    Variant("crossentropy.z-loss", "crossentropy", ("crossentropy_softmax_backward",),
            "an auxiliary z-loss {value} * logsumexp(logits)^2 added to the loss (PaLM's; averaged as the loss is)",
            _z_loss, fit=Fit(-1e3, 1e3, linear=True), name=_z_loss_name),
    Variant("labels.permuted", "labels", ("crossentropy_forward", "crossentropy_softmax_backward"),
            "{note}", _targets_permuted, name=_targets_permuted_name),
    Variant("crossentropy.divisor", "crossentropy", ("crossentropy_softmax_backward", "loss_mean"),
            "the loss divided by {note}", _divisor, fit=Fit(1e-9, 1e9, linear=True), name=_divisor_name),
    Variant("crossentropy.ignored-positions", "crossentropy", ("crossentropy_softmax_backward",),
            "{note}, the loss averaged over the others", _ignored, fit=Fit(1e-9, 1e9, linear=True),
            name=_ignored_name),
)
