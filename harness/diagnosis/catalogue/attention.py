"""attention: the scale (fitted; before or after the softmax), the causal mask (missing, off by
a diagonal, its fill value), the layouts of c_attn's output and of the heads, the order of q, k,
v, the softmax's axis; in the backward, the softmax Jacobian without its diagonal term or
without its off-diagonal sum (the reference's own steps, :mod:`pyref.intermediates`, with
one left out)."""
from __future__ import annotations

import math

import numpy as np

from pyref import numpy_kernels
from pyref.intermediates import intermediates
from pyref.spec import SPEC

from ..engine import Fit, Variant
from ._common import _forward, _oracle


def _causal(T, diagonal=True):
    return np.tril(np.ones((T, T), bool), 0 if diagonal else -1)


def _attention(inp, NH, scale=None, mask=None):
    """attention_forward in float64 with a given scale and set of visited (t, t2)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    mask = _causal(T) if mask is None else mask
    q, k, v = (inp[..., i * C:(i + 1) * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3) for i in range(3))
    pre = np.where(mask, (q @ k.transpose(0, 1, 3, 2)) * scale, 0.0)
    maxval = np.maximum(np.where(mask, pre, -np.inf).max(-1, keepdims=True), numpy_kernels.ATT_MAXVAL_INIT)
    att = np.exp(np.where(mask, pre - maxval, -np.inf))
    s = att.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        att = np.where(s == 0, 0.0, att / s)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return _forward("attention_forward", (out, pre, att))


def _att_scale(kernel, args, ctx, value):
    """The scores scaled by ``value`` instead of 1/sqrt(hs) (forward; in the backward, dq
    and dk, which are linear in the scale)."""
    C = args["inp"].shape[-1] // 3
    hs = C // int(args["NH"])
    if kernel == "attention_forward":
        return _attention(args["inp"], int(args["NH"]), scale=value)
    start = args["dinp"].copy()
    out = _oracle(kernel, args)
    delta = out["dinp"] - start
    delta[..., :2 * C] *= value * math.sqrt(hs)
    out["dinp"] = start + delta
    return out


def _att_scale_fit(kernel):
    # the forward is not linear in the scale (the softmax): a search over [1e-3, 10];
    # the backward's dq, dk are: a closed form
    return Fit(1e-3, 10.0, log=True) if kernel == "attention_forward" else Fit(-10.0, 10.0, linear=True)


def _att_scale_name(kernel, args, value, ctx):
    """Which dimension a fitted attention scale matches: 1/sqrt(hs) is the C's (no cause);
    1/hs and 1 keep their ids; the others are named in the description."""
    B, T, C3 = args["inp"].shape
    C, NH = C3 // 3, int(args["NH"])
    hs = C // NH
    known = [("1/sqrt(hs)", 1 / math.sqrt(hs)), ("1/hs", 1 / hs), ("1", 1.0), ("1/sqrt(C)", 1 / math.sqrt(C)),
             ("1/C", 1 / C), ("1/sqrt(NH)", 1 / math.sqrt(NH)), ("1/sqrt(3C)", 1 / math.sqrt(3 * C)),
             ("1/sqrt(T)", 1 / math.sqrt(T)), ("sqrt(hs)", math.sqrt(hs))]
    for label, x in known:
        if abs(value - x) <= 2e-3 * x:
            if label == "1/sqrt(hs)":
                return None, value, ""
            vid = {"1/hs": "attention.scale=1/hs", "1": "attention.no-scale"}.get(label, "attention.scale")
            return vid, x, f" = {label}" + (f" = 1/sqrt({round(1 / x ** 2)})" if label.startswith("1/sqrt(") else "")
    if abs(value * math.sqrt(hs) - 1) < 1e-6:
        return None, value, ""
    return "attention.scale", value, " (matches no dimension of the model)"


def _attention_any(inp, NH, *, order="qkv", split="heads-major", merge="transpose", axis=-1, diagonal=0,
                   causal=True, scale=None, masking="-inf", qkv_axes=("3", "NH", "hs"), upper=False, take="qkv",
                   batched=None, bias=None, nan_empty=False, inverted=False):
    """attention_forward in float64 with the mistakes a port makes: q, k, v taken in another
    ``order``; the heads split from the channels in another layout (``split``:
    ``"heads-major"`` as the C, ``"no-transpose"`` viewing (B,T,C) as (B,NH,T,hs),
    ``"interleaved"`` channel c = d*NH + h, ``"no-stride"`` head h sliced at channel h, not
    h*hs) or merged back without transposing
    (``merge="no-transpose"``); the softmax over another ``axis`` (-2: over the queries);
    the mask's ``diagonal`` (tril(k)); no mask (``causal=False``); another ``scale``; the
    mask applied after the softmax without renormalising (``masking="after"``) or as a
    finite score (``masking=0.0``) instead of -inf; c_attn's 3C outputs read in another
    layout (``qkv_axes``: the order of the axes (3, NH, hs) the port views them as, e.g.
    ("NH", "3", "hs"): q, k, v interleaved per head); the mask transposed (``upper``: each
    position sees itself and the later ones); q, k, v each taken from a chunk (``take``,
    "qqv": k is q's chunk); the heads batched as (NH*B) and read back as (B*NH), or the
    other way (``batched``: "nh-major", "b-major"); the mask a finite ``bias`` added to the
    left-out scores (a 0/1 tril added as if it were 0/-inf: -1, or -scale before the scale);
    ``nan_empty``: a softmax over an all -inf slice is NaN (torch's 0/0), not the C's 0;
    ``inverted``: the mask's complement (True read as masked where it means attend).
    Returns (out, preatt, att), preatt 0 where the mask leaves it out (as the C's)."""
    B, T, C3 = inp.shape
    C = C3 // 3
    hs = C // NH
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    if tuple(qkv_axes) != ("3", "NH", "hs"):
        sizes = {"3": 3, "NH": NH, "hs": hs}
        view = inp.reshape(B, T, *(sizes[a] for a in qkv_axes))
        inp = view.transpose(0, 1, *(2 + qkv_axes.index(a) for a in ("3", "NH", "hs"))).reshape(B, T, C3)
    chunks = dict(zip(order, (inp[..., i * C:(i + 1) * C] for i in range(3))))
    chunks = dict(zip("qkv", (chunks[x] for x in take)))

    axes = _SPLITS.get(split, split)     # (B,T,C) viewed as (B, *axes), then (B,NH,T,hs)
    sizes = {"T": T, "NH": NH, "hs": hs}

    def heads(a):
        if split == "no-stride":     # head h's slice at channel h, not h*hs (overlapping)
            return np.stack([a[..., h:h + hs] for h in range(NH)], axis=1)
        view = a.reshape(B, *(sizes[x] for x in axes))
        return view.transpose(0, *(1 + axes.index(x) for x in ("NH", "T", "hs")))
    q, k, v = (heads(chunks[x]) for x in "qkv")
    mask = np.tril(np.ones((T, T), bool), diagonal) if causal else np.ones((T, T), bool)
    if upper:
        mask = mask.T
    if inverted:
        mask = ~mask
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    if bias is not None:      # a finite bias on the left-out scores: every key weighed
        att = _softmax_biased(scores, mask, bias)
        return _merged(_rebatched(att @ v, batched), merge), np.where(mask, scores, 0.0), att
    if masking != "-inf":
        # the mask applied after the softmax (no renormalisation), or as a finite score
        e = np.exp(np.where(mask, scores, masking) - np.max(np.where(mask, scores, masking), axis, keepdims=True)) \
            if masking != "after" else np.exp(scores - scores.max(axis, keepdims=True))
        att = e / e.sum(axis, keepdims=True)
        if masking == "after":
            att = np.where(mask, att, 0.0)
        return _merged(att @ v, merge), np.where(mask, scores, 0.0), att
    pre = np.where(mask, scores, -np.inf)
    mx = np.max(pre, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(pre - mx)
    s = e.sum(axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        att = np.where(s == 0, np.nan if nan_empty else 0.0, e / s)
    return _merged(_rebatched(att @ v, batched), merge), np.where(mask, pre, 0.0), att


def _softmax_biased(scores, mask, bias):
    """The softmax over every key, ``bias`` added to the scores the mask leaves out."""
    e = np.where(mask, scores, scores + bias)
    e = np.exp(e - e.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rebatched(y, batched):
    """(B,NH,T,hs) as a port that batches the heads one way and reads them back the other:
    "nh-major" batched as (NH*B) and viewed back as (B,NH); "b-major" batched as (B*NH)
    and viewed back as (NH,B). None: as computed."""
    B, NH, T, hs = y.shape
    if batched == "nh-major":
        return y.transpose(1, 0, 2, 3).reshape(B, NH, T, hs)
    if batched == "b-major":
        return y.reshape(NH, B, T, hs).transpose(1, 0, 2, 3)
    return y


# the orders of the axes (T, NH, hs) a port views (B,T,C) as when it splits the heads, or
# permutes (B,NH,T,hs) to before it views the result as (B,T,C) when it merges them
_SPLITS = {"heads-major": ("T", "NH", "hs"), "no-transpose": ("NH", "T", "hs"), "interleaved": ("T", "hs", "NH")}
_MERGES = {"transpose": ("T", "NH", "hs"), "no-transpose": ("NH", "T", "hs"), "interleaved": ("T", "hs", "NH")}


def _merged(y, merge):
    """(B,NH,T,hs) -> (B,T,C): as the C (head-major channels), without transposing,
    interleaved (channel d*NH + h), or any order of the axes (``merge``: a tuple of "NH",
    "T", "hs") viewed as (B,T,C)."""
    B, NH, T, hs = y.shape
    axes = _MERGES.get(merge, merge)
    return y.transpose(0, *(1 + ("NH", "T", "hs").index(x) for x in axes)).reshape(B, T, NH * hs)




def _att_maskings(kernel, args, **kw):
    hs = args["inp"].shape[-1] // 3 // int(args["NH"])
    T = args["inp"].shape[1]
    forms = [_Form("the causal mask applied after the softmax (the kept weights not renormalised)", "masking",
                   "after", id="after-softmax"),
             _Form("the causal mask transposed (triu): each position attends to itself and the later ones",
                   "upper", True, id="transposed"),
             _Form("the 0/1 tril added to the scores as the mask bias (the future scores 1 lower, not -inf: "
                   "a float mask given to sdpa's attn_mask, or scores + tril)", "bias", -1.0, id="added"),
             _Form("the 0/1 tril added to the scores before the scale as the mask bias (the future scores "
                   "1/sqrt(hs) lower, not -inf)", "bias", -1.0 / math.sqrt(hs), id="added")]
    if T > 1:   # with T = 1 the inverted mask leaves nothing to attend: the same as no causal mask's NaN
        forms.append(_Form("the causal mask's sense inverted (True where masked, as nn.MultiheadAttention's, "
                           "given where True means attend, as sdpa's): each position attends only to the later "
                           "ones, the last to none (NaN)", "inverted", True, id="inverted", nan_empty=True))
    return forms


def _att_masking_name(kernel, args, value, ctx):
    """attention.masking.<form>: which way the mask went wrong (its form's id)."""
    return f"attention.masking.{ctx['choice'].id}", value, ""


def _att_scale_after(kernel, args, ctx, value):
    """The scores not scaled before the softmax, the weights (so the output) by ``value``
    after it: out = value * softmax(q.k) v, linear in the value."""
    if kernel != "attention_forward" or ctx["output"] != "out":
        return None
    out, _, _ = _attention_any(args["inp"], int(args["NH"]), scale=1.0)
    return {"out": value * out}


def _att_scale_after_name(kernel, args, value, ctx):
    B, T, C3 = args["inp"].shape
    hs = C3 // 3 // int(args["NH"])
    if abs(value - 1.0) < 1e-6:         # no scale at all: attention.scale's
        return None, value, ""
    known = [("1/sqrt(hs)", 1 / math.sqrt(hs)), ("1/hs", 1 / hs), ("1/sqrt(C)", 1 / math.sqrt(C3 // 3))]
    match = next((label for label, x in known if abs(value / x - 1) < 2e-3), None)
    return "attention.scale-after-softmax", value if match is None else dict(known)[match], \
        f" = {match}" if match else ""


def _att_mask_fill(kernel, args, ctx, value):
    return _forward(kernel, _attention_any(args["inp"], int(args["NH"]), masking=value))


def _mask_fill_name(kernel, args, value, ctx):
    if value < -60:
        return None, value, ""     # as good as -inf: the C's
    near = round(value)
    return "attention.mask-fill", float(near) if abs(value - near) < 1e-3 else value, ""


def _att_axes(kernel, args, **kw):
    """The axes a port's softmax may take instead of the keys': the queries (dim=-2; with a
    causal mask no column is all masked, so -inf and a finite fill agree), and the heads
    (dim=1 of (B,NH,T,T)): with -inf filled in, a future key is -inf in every head, 0/0 is
    NaN and the output NaN at every query but the last; with a large finite fill, the
    masked scores are equal in every head, so each weighs 1/NH."""
    return [_Form("the queries (dim=-2)", "axis", -2),
            _Form("the heads (dim=1): a future key is -inf in every head, so its weights are 0/0 = NaN",
                  "axis", 1, nan_empty=True),
            _Form("the heads (dim=1), the masked scores a finite fill (each future key weighs 1/NH)",
                  "axis", 1, masking=-1e30)]


def _att_changed(**fixed):
    """One family of attention mistakes: ``ctx["choice"]`` is the form tried (or ``fixed``)."""
    def run(kernel, args, ctx, value):
        change = dict(fixed)
        choice = ctx.get("choice")
        if choice is not None:
            key, x = choice.change
            change.update({key: x}, **choice.more)
        return _forward(kernel, _attention_any(args["inp"], int(args["NH"]), **change))
    return run


class _Form(str):
    """A choice of a variant: its text, the keyword of :func:`_attention_any` it sets, its
    ``id`` where the form names a cause of its own (``attention.masking.added``), and
    ``more`` keywords that go with it (the heads' softmax's -inf, or a finite fill)."""

    def __new__(cls, text, key, value, id=None, **more):
        obj = super().__new__(cls, text)
        obj.change = (key, value)
        obj.id = id
        obj.more = more
        return obj


_QKV_VIEWS = {("NH", "3", "hs"): "q, k, v interleaved per head (c_attn's output viewed as (B,T,NH,3,hs))",
              ("NH", "hs", "3"): "q, k, v interleaved per channel (c_attn's output viewed as (B,T,C,3))",
              ("hs", "3", "NH"): "c_attn's output viewed as (B,T,hs,3,NH)",
              ("hs", "NH", "3"): "c_attn's output viewed as (B,T,hs,NH,3)"}


def _att_layouts(kernel, args, **kw):
    return [*(_Form(text + " instead of (B,T,3,NH,hs)", "qkv_axes", axes) for axes, text in _QKV_VIEWS.items()),
            *_head_layouts(),
            _Form("the heads batched as (NH*B, T, hs) and read back as (B*NH)", "batched", "nh-major"),
            _Form("the heads batched as (B*NH, T, hs) and read back as (NH*B)", "batched", "b-major"),
            _Form("each head's slice taken at channel h instead of h*hs (the stride left out of the head's "
                  "offset: the heads overlap)", "split", "no-stride")]


def _head_layouts():
    """Every other order of the axes a port can split the heads from, or merge them back
    in, each as a form of attention.layout (the usual mistakes by their usual words)."""
    import itertools
    usual = {("split", ("NH", "T", "hs")): "the heads split without transposing ((B,T,C) viewed as (B,NH,T,hs))",
             ("split", ("T", "hs", "NH")): "the heads split interleaved (channel c = d*NH + h)",
             ("merge", ("NH", "T", "hs")): "the heads merged back without transposing ((B,NH,T,hs) viewed as (B,T,C))",
             ("merge", ("T", "hs", "NH")): "the heads merged back interleaved (channel c = d*NH + h)",
             ("merge", ("NH", "hs", "T")): "the heads merged back from (B,NH,hs,T) (transpose(2, 3) for transpose(1, 2))"}
    forms = []
    for key in ("split", "merge"):
        for axes in itertools.permutations(("T", "NH", "hs")):
            if axes == ("T", "NH", "hs"):
                continue          # the C's
            text = usual.get((key, axes)) or (
                f"the heads split from (B,T,C) viewed as (B,{','.join(axes)})" if key == "split" else
                f"the heads merged back from (B,NH,T,hs) permuted to (B,{','.join(axes)}) and viewed as (B,T,C)")
            forms.append(_Form(text, key, axes))
    return forms


# the other orders of c_attn's chunks, as (what chunks 0, 1, 2 are taken as, the form's id,
# its words): the same numbers whether the chunks are read in that order or sdpa (or the
# port's own attention) is given its arguments so
_ORDERS = (("kqv", "q-k-swapped", "q and k swapped (k, q, v: sdpa(k, q, v), or c_attn's chunks read k, q, v)"),
           ("qvk", "k-v-swapped", "k and v swapped (q, v, k: sdpa(q, v, k), or c_attn's chunks read q, v, k)"),
           ("vkq", "q-v-swapped", "q and v swapped (v, k, q: sdpa(v, k, q), or c_attn's chunks read v, k, q)"),
           ("kvq", "rotated", "q, k, v rotated (c_attn's chunks read k, v, q)"),
           ("vqk", "rotated", "q, k, v rotated (c_attn's chunks read v, q, k)"))
# one chunk taken twice (a typo: k = q), as (what q, k, v take, the form's id)
_DUPLICATES = (("qqv", "k-is-q"), ("qkk", "v-is-k"), ("qkq", "v-is-q"), ("kkv", "q-is-k"), ("vkv", "q-is-v"),
               ("qvv", "k-is-v"))
_ROLE = {"q": "the queries", "k": "the keys", "v": "the values"}


def _att_orders(kernel, args, **kw):
    forms = [_Form(text, "order", o, id=fid) for o, fid, text in _ORDERS]
    for take, fid in _DUPLICATES:
        role, src = fid[0], fid[-1]
        forms.append(_Form(f"{_ROLE[src]} taken as {_ROLE[role]} too ({role} = {src}: q, k, v are "
                           f"{', '.join(take)}, e.g. sdpa({', '.join(take)}))", "take", take, id=fid))
    return forms


def _att_order_name(kernel, args, value, ctx):
    """attention.qkv-order.<form>: which of q, k, v took which (its form's id)."""
    return f"attention.qkv-order.{ctx['choice'].id}", value, ""


# a finite fill as large as a port's minimum (torch.finfo(dtype).min, -1e9, -1e4): every masked
# score equal to it, so a query whose keys are all masked weighs every key alike
_FINITE_FILL = -1e30


def _empty_rows(k: int) -> list[tuple[str, dict]]:
    """The forms a mask tril(k) takes at the queries it leaves no key (k < 0: the first -k):
    their weights 0 (as the C's), 0/0 = NaN (a -inf fill, torch's softmax), or uniform over
    every key (a finite fill, whatever its value: the masked scores are all equal)."""
    if k >= 0:
        return [("", {})]
    rows = "position 0 sees" if k == -1 else f"positions 0..{-k - 1} see"
    return [("", {}),
            (f"; {rows} no key: its weights 0/0 = NaN (the mask filled with -inf)", {"nan_empty": True}),
            (f"; {rows} no key: with a finite fill (torch.finfo(dtype).min, -1e9) every key, the "
             f"future ones too, weighs 1/T", {"masking": _FINITE_FILL})]


def _att_diagonals(kernel, args, **kw):
    T = args["inp"].shape[1]
    return [_Form(f"tril({k})" + (" (position t sees t+%d)" % k if k > 0 else "") + rows, "diagonal", k, **more)
            for k in (1, 2, -2) if abs(k) < T for rows, more in _empty_rows(k)]


def _att_no_diagonal_forms(kernel, args, **kw):
    """attention.no-diagonal's forms: the first query's weights (it sees no key) as each fill makes them."""
    return [_Form(rows, "diagonal", -1, **more) for rows, more in _empty_rows(-1)]


def _att_mask(diagonal: bool):
    def run(kernel, args, ctx, value):
        T = args["inp"].shape[1]
        mask = np.ones((T, T), bool) if diagonal else _causal(T, diagonal=False)
        return _attention(args["inp"], int(args["NH"]), mask=mask)
    return run


def _att_no_diagonal_defined(kernel, output, args):
    T = args["inp"].shape[1]
    return _causal(T, diagonal=False) if output == "preatt" else np.ones((), bool)


def _without_step(kernel: str, step: str, instead):
    """``kernel`` recomputed from the reference's steps with ``step`` replaced by
    ``instead(steps so far)`` (:func:`pyref.intermediates.intermediates`): every later step,
    the outputs among them, follows from the changed one."""
    def run(k, args, ctx, value):
        if k != kernel:
            return None
        steps = intermediates(kernel, args, replace={step: instead})
        return {o: steps[o] for o in SPEC[kernel].output_names}
    return run


def _causal_of(s):
    """The causal triangle of a (B, NH, T, T) step."""
    return _causal(s["diag"].shape[-1])


# the softmax Jacobian att[t2] * ((t2 == t3) - att[t3]) applied to datt is the diagonal term
# att * datt less the off-diagonal sum att * sum(att * datt): one of the two left out
_NO_JACOBIAN_DIAGONAL = _without_step("attention_backward", "dpreatt_add",
                                      lambda s: np.where(_causal_of(s), -s["offdiag"], 0.0))
_NO_JACOBIAN_SUM = _without_step("attention_backward", "dpreatt_add",
                                 lambda s: np.where(_causal_of(s), s["diag"], 0.0))


VARIANTS: tuple[Variant, ...] = (
    Variant("attention.scale", "attention", ("attention_forward", "attention_backward"),
            "attention scores scaled by {value}{note} instead of 1/sqrt(hs)", _att_scale,
            fit=_att_scale_fit, name=_att_scale_name),
    Variant("attention.no-diagonal", "attention", ("attention_forward",),
            "the causal mask leaves out the diagonal (t2 < t instead of t2 <= t){choice}", _att_changed(),
            choices=_att_no_diagonal_forms, defined=_att_no_diagonal_defined, unwritten=True),
    Variant("attention.no-causal-mask", "attention", ("attention_forward",),
            "no causal mask: every position attends to the future too", _att_mask(True)),
    Variant("attention.mask-diagonal", "attention", ("attention_forward",),
            "the causal mask off by a diagonal: {choice} instead of tril(0)", _att_changed(),
            choices=_att_diagonals),
    Variant("attention.masking", "attention", ("attention_forward",),
            "{choice}", _att_changed(), choices=_att_maskings, name=_att_masking_name),
    Variant("attention.mask-fill", "attention", ("attention_forward",),
            "the masked scores set to {value} before the softmax instead of -inf", _att_mask_fill,
            fit=Fit(-100.0, 100.0), name=_mask_fill_name),
    Variant("attention.layout", "attention", ("attention_forward",),
            "{choice}", _att_changed(), choices=_att_layouts),
    Variant("attention.qkv-order", "attention", ("attention_forward",),
            "q, k, v mixed up: {choice}", _att_changed(), choices=_att_orders, name=_att_order_name),
    Variant("attention.scale-after-softmax", "attention", ("attention_forward",),
            "attention's scale ({value}{note}) applied to the weights after the softmax instead of to the scores "
            "before it", _att_scale_after, fit=Fit(-1e3, 1e3, linear=True), name=_att_scale_after_name),
    Variant("attention.softmax-axis", "attention", ("attention_forward",),
            "the attention softmax taken over {choice} instead of the keys (dim=-1)",
            _att_changed(), choices=_att_axes),
    Variant("attention.jacobian-no-diagonal", "attention", ("attention_backward",),
            "the softmax's backward without the Jacobian's diagonal term att * datt (dpreatt = "
            "-att * sum(att * datt): the indicator (t2 == t3) dropped)", _NO_JACOBIAN_DIAGONAL),
    Variant("attention.jacobian-no-sum", "attention", ("attention_backward",),
            "the softmax's backward without the Jacobian's off-diagonal sum att * sum(att * datt) "
            "(dpreatt = att * datt: the - att[t3] dropped)", _NO_JACOBIAN_SUM),
)
