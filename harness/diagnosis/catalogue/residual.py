"""the residual stream: a constant factor on a branch, attention and MLP in parallel, a branch
added to another tensor of the block."""
from __future__ import annotations

import numpy as np

from ..engine import Fit, Variant, const_text


def _branch_scale(kernel, args, ctx, value):
    """out = inp1 + value*inp2 (the branch scaled), or value*inp1 + inp2 (the stream)."""
    if ctx["choice"] == "branch":
        return {"out": args["inp1"] + value * args["inp2"]}
    return {"out": value * args["inp1"] + args["inp2"]}


def _branch_choices(kernel, args, **kw):
    return ["branch", "stream"]


def _not_one(kernel, args, value, ctx):
    if abs(value - 1.0) < 1e-9:
        return None, value, ""
    if ctx["choice"] == "branch" and abs(value) < 1e-6 and _parallel(args):
        return None, value, ""       # the branch not lost: added in parallel (residual.parallel)
    what = "the branch added as x + {v}*f(x)" if ctx["choice"] == "branch" else "the stream scaled: {v}*x + f(x)"
    return "residual.branch-scale", value, what.format(v=const_text(value))


def _streams(kernel, args, **kw):
    """The other tensors of the stream's shape the replay passed (``args["streams"]``:
    what the graph computed before this residual in the block, and the block's input)."""
    return [_Stream(label) for label in (args.get("streams") or {})]


class _Stream(str):
    pass


def _wrong_stream(kernel, args, ctx, value):
    """out = S + inp2: the branch added to another tensor S of the block (the block's
    input, a layer norm's output) instead of the stream inp1."""
    streams = args.get("streams") or {}
    other = streams.get(str(ctx["choice"]))
    if other is None or np.shape(other) != np.shape(args["inp1"]):
        return None
    return {"out": np.asarray(other, np.float64) + args["inp2"]}


def _parallel(args) -> bool:
    """Whether the block's second residual holds the stream plus both branches: its output
    (``args["next_residual"]``: output, branch) is inp1 + inp2 + its branch, to float32's
    rounding of the sum (the MLP read the block's input: a parallel block)."""
    nxt = args.get("next_residual")
    if nxt is None:
        return False
    out3, branch3 = nxt
    x, a = args["inp1"], args["inp2"]
    if np.shape(out3) != np.shape(x):
        return False
    size = np.abs(x) + np.abs(a) + np.abs(branch3)
    err = np.abs(out3 - (x + a + branch3))
    return bool(np.all(err <= 1e-5 * size + 1e-30)) and bool(np.any(np.abs(a) > 1e-6 * size))


def _parallel_block(kernel, args, ctx, value):
    """The stream after the attention's residual as the MLP reads it: the block's input
    (out = inp1), where the block's output has both branches (x + attn(ln_1(x)) +
    mlp(ln_2(x)))."""
    return {"out": args["inp1"].copy()} if _parallel(args) else None


def _wrong_stream_name(kernel, args, value, ctx):
    inp1, inp2 = (args.get("stream_names") or ("inp1", "inp2"))
    return "residual.wrong-input", value, f" instead of {inp1}: out = {ctx['choice']} + {inp2}"


VARIANTS: tuple[Variant, ...] = (
    Variant("residual.branch-scale", "residual", ("residual_forward",),
            "a constant factor on the residual: {note} instead of x + f(x)", _branch_scale,
            fit=Fit(-1e3, 1e3, linear=True), choices=_branch_choices, name=_not_one),
    Variant("residual.parallel", "residual", ("residual_forward",),
            "attention and MLP in parallel: the MLP reads the block's input, not the stream after the "
            "attention's residual (the block's output is x + attn(ln_1(x)) + mlp(ln_2(x)))", _parallel_block),
    Variant("residual.wrong-input", "residual", ("residual_forward",),
            "the residual branch added to {choice}{note}", _wrong_stream, choices=_streams,
            name=_wrong_stream_name),
)
