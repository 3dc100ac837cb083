"""embeddings: positions shifted or counted per sequence, a table left out or scaled, the tables
multiplied; in the backward, rows of a table that get no gradient (nn.Embedding's padding_idx)."""
from __future__ import annotations

import math

import numpy as np

from ..engine import Fit, Variant, const_text


def _position_map(args, actual) -> np.ndarray:
    """Which row of wpe each position (b, t) took: the row nearest to what the output holds
    beyond the token embedding, (B, T) (nearest in closed form: |r|^2 - 2 r.w + |w|^2, one
    matmul)."""
    inp, wte, wpe = args["inp"], args["wte"], args["wpe"]
    rest = (np.asarray(actual, np.float64) - wte[inp]).reshape(-1, wpe.shape[1])      # (B*T, C)
    d = (rest * rest).sum(-1)[:, None] - 2.0 * (rest @ wpe.T) + (wpe * wpe).sum(-1)[None, :]
    return np.argmin(d, axis=1).reshape(inp.shape)


def _encoder_positions(kernel, args, ctx, value):
    """wte[token] + wpe[r(b, t)]: the position rows found by :func:`_position_map`."""
    rows = _position_map(args, ctx["actual"])
    T = args["inp"].shape[1]
    if np.array_equal(rows, np.broadcast_to(np.arange(T), rows.shape)):
        return None
    return {"out": args["wte"][args["inp"]] + args["wpe"][rows]}


def _positions_name(kernel, args, value, ctx):
    rows = _position_map(args, ctx["actual"])
    B, T = rows.shape
    maxT = args["wpe"].shape[0]
    t = np.arange(T)
    if not (rows == rows[0]).all():
        flat = np.arange(B * T).reshape(B, T)
        if np.array_equal(rows, flat % maxT):
            return "embedding.positions", value, ("positions counted over the flattened batch: wpe[b*T + t] "
                                                  "instead of wpe[t]")
        shown = "; ".join(f"b={b}: " + ", ".join(str(r) for r in rows[b, :4]) + (" ..." if T > 4 else "")
                          for b in range(min(B, 3)))
        return "embedding.positions", value, f"positions differ between the sequences ({shown}) instead of wpe[t]"
    rows = rows[0]
    k = int(rows[0])
    if np.array_equal(rows, t + k):
        return "embedding.position-shift", value, f"positions counted from {k}: wpe[t+{k}] instead of wpe[t]"
    if np.array_equal(rows, t[::-1]):
        return "embedding.positions", value, "positions reversed: wpe[T-1-t] instead of wpe[t]"
    shown = ", ".join(f"{a}->{b}" for a, b in zip(t[:6], rows[:6])) + (" ..." if T > 6 else "")
    return "embedding.positions", value, f"positions mapped to other rows of wpe ({shown}) instead of wpe[t]"


def _encoder_product(kernel, args, ctx, value):
    """wte[token] * wpe[t]: the embeddings multiplied instead of added."""
    T = args["inp"].shape[1]
    return {"out": args["wte"][args["inp"]] * args["wpe"][:T]}


def _encoder_without(table):
    def run(kernel, args, ctx, value):
        T = args["inp"].shape[1]
        return {"out": args["wpe"][:T] + 0 * args["wte"][args["inp"]] if table == "wte"
                else args["wte"][args["inp"]]}
    return run


def _table_scale(kernel, args, ctx, value):
    """value*wte[token] + wpe[t] (the token table scaled), or wte[token] + value*wpe[t]."""
    T = args["inp"].shape[1]
    tok, pos = args["wte"][args["inp"]], args["wpe"][:T]
    return {"out": value * tok + pos if ctx["choice"] == "wte" else tok + value * pos}


def _tables():
    return lambda kernel, args, **kw: ["wte", "wpe"]


def _table_scale_name(kernel, args, value, ctx):
    if abs(value - 1.0) < 1e-9 or abs(value) < 1e-9:
        return None, value, ""      # the C's, or a missing table (embedding.no-*)
    C = args["wte"].shape[1]
    known = [("sqrt(C)", math.sqrt(C)), ("1/sqrt(C)", 1 / math.sqrt(C)), ("C", float(C)), ("2", 2.0), ("0.5", 0.5)]
    match = next((label for label, x in known if abs(value / x - 1) < 1e-4), None)
    table = "token" if ctx["choice"] == "wte" else "position"
    return "embedding.table-scale", value, f"the {table} embedding ({ctx['choice']}) scaled by {const_text(value)}" + \
        (f" = {match}" if match else "")


def _rows_without_gradient(kernel, args, ctx):
    """(the table's output name, the rows of it the encoder's gradient does not reach in the
    judged output, the C's contribution) or None: a row whose contribution in the output
    (the output less what it held before this call) is under half the C's."""
    out = ctx["output"]
    start = np.asarray(args[out], np.float64).copy()
    from ._common import _oracle
    delta = _oracle(kernel, args)[out] - start
    got = np.asarray(ctx["actual"], np.float64) - start
    size = np.sqrt((delta * delta).sum(-1))
    rows = np.flatnonzero((size > 0) & (np.sqrt((got * got).sum(-1)) < 0.5 * size))
    reached = int((size > 0).sum())
    if rows.size == 0 or 2 * rows.size >= reached:
        return None       # none, or most of the table: a table without gradient, not padding rows
    return out, rows, start, delta


def _padding_rows(kernel, args, ctx, value):
    """The encoder's backward with some rows of a table left without gradient (torch's
    padding_idx: its row's gradient is zeroed), the rows found where the output's
    contribution is missing."""
    found = _rows_without_gradient(kernel, args, ctx)
    if found is None:
        return None
    out, rows, start, delta = found
    delta[rows] = 0.0
    other = "dwpe" if out == "dwte" else "dwte"
    return {out: start + delta, other: args[other]}


def _padding_name(kernel, args, value, ctx):
    found = _rows_without_gradient(kernel, args, ctx)
    if found is None:
        return None, value, ""
    out, rows, _, _ = found
    table = {"dwte": "token embedding (wte)", "dwpe": "position embedding (wpe)"}[out]
    shown = ", ".join(str(int(r)) for r in rows[:4]) + (" ..." if rows.size > 4 else "")
    how = f" (nn.Embedding(..., padding_idx={int(rows[0])}))" if rows.size == 1 else ""
    return "embedding.padding-idx", value, (f"row{'s' if rows.size > 1 else ''} {shown} of the {table} "
                                            f"get{'' if rows.size > 1 else 's'} no gradient{how}")


VARIANTS: tuple[Variant, ...] = (
    Variant("embedding.position-shift", "embedding", ("encoder_forward",),
            "{note}", _encoder_positions, name=_positions_name),
    Variant("embedding.no-wpe", "embedding", ("encoder_forward",),
            "the position embedding (wpe) not added", _encoder_without("wpe")),
    Variant("embedding.no-wte", "embedding", ("encoder_forward",),
            "the token embedding (wte) not added", _encoder_without("wte")),
    Variant("embedding.product", "embedding", ("encoder_forward",),
            "the token and position embeddings multiplied (wte[token] * wpe[t]) instead of added",
            _encoder_product),
    Variant("embedding.table-scale", "embedding", ("encoder_forward",),
            "{note}", _table_scale, fit=Fit(-1e4, 1e4, linear=True), choices=_tables(), name=_table_scale_name),
    Variant("embedding.padding-idx", "embedding", ("encoder_backward",), "{note}", _padding_rows,
            name=_padding_name),
)
