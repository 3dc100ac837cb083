"""The PNG of a run: where drift starts and how it grows.

:func:`plot` draws three panels, each from the checks' structured identity
(:class:`harness.checks.results.Check`: kind, phase, layer, tensor), never from their text:

* the end-to-end error at each position of the graph, per implementation (:func:`_error_panel`);
* heat maps of the norm-wise error of the main per-layer tensors across layers (:func:`_heat_panel`);
* the loss per step and its difference to the oracle (:func:`_loss_panel`).

matplotlib is imported when :func:`plot` runs, not at import, and only its Agg canvas is
used (no pyplot, no global backend switch).
"""
from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyref.formats import refuse_existing, write_atomic

from ..checks.results import first_divergence_check, first_structure
from ..arbiter.compare import Comparison
from .text import config_text, rel_diff

# per-layer tensors of the heat map: the forward activations, then the activation
# gradients in the order the backward pass computes them, then the big weight gradients
HEAT_ROWS = (
    [("acts", n) for n in ("ln1", "qkv", "att", "atty", "attproj", "residual2", "ln2", "fch",
                           "fch_gelu", "fcproj", "residual3")]
    + [("grads_acts", n) for n in ("residual3", "fcproj", "fch_gelu", "fch", "ln2", "residual2",
                                   "attproj", "atty", "att", "qkv", "ln1")]
    + [("grads", n) for n in ("fcprojw", "fcw", "attprojw", "qkvw")]
)
LEAST_DRAWN = 1e-4    # fraction of tolerance drawn for a bit-identical tensor (log axes)


@dataclass(frozen=True)
class Band:
    """A run of consecutive graph positions in one phase and layer."""

    start: int
    end: int
    phase: str            # "forward" or "backward"
    layer: int | None


def graph_positions(report) -> dict[str, tuple[str, int | None]]:
    """The graph positions of the e2e checks (their ``position``: the call, without a torch
    model's module, so that every implementation shares them) in graph order, each with
    its (phase, layer of the call)."""
    pos: dict[str, tuple[str, int | None]] = {}
    for s in report.steps:
        for c in s.checks:
            if c.kind == "e2e":
                pos.setdefault(c.position, (c.phase, c.call_layer))
    return pos


def x_bands(info: list[tuple[str, int | None]]) -> list[Band]:
    """The bands of the x axis: the runs of positions with the same (phase, layer)."""
    bands = []
    start = 0
    for i in range(1, len(info) + 1):
        if i == len(info) or info[i] != info[start]:
            bands.append(Band(start, i - 1, *info[start]))
            start = i
    return bands


def plot(report, path, *, overwrite: bool = False, dpi: int = 110) -> Path:
    """Write a PNG of the run to ``path`` (refusing to replace a file unless
    ``overwrite=True``); returns the path.

    Top, one panel per implementation: the end-to-end error at each position of the graph
    (forward ops, then backward ops, left to right, layers shaded and numbered), as the
    fraction of its tolerance used (max over the op's tensors, log scale), one line per
    step; the dashed line at 1 is the tolerance, a vertical line marks the first divergence
    (the first op whose replay fails), an orange diamond at the top each op whose mean
    signed error is off (its replay or end-to-end check fails on bias). Middle: heat maps, one per implementation, of the
    norm-wise relative error of the main per-layer tensors (rows: activations, activation
    gradients, weight gradients) across layers (columns), as a fraction of its tolerance
    (max over steps; blue under, white at, red over the tolerance; cells over it boxed).
    Bottom: the loss per step (C, the float64 oracle, each implementation) and its
    relative difference to the oracle, with the loss check's tolerance.

    Without matplotlib this raises RuntimeError.
    """
    refuse_existing(path, overwrite)        # before the (slow) drawing
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("plot() needs matplotlib, which is not installed: "
                           "pip install llmc-parity[plot]") from e

    n = len(report.impls)
    h1, h2, h3 = 2.2 * n, 0.22 * len(HEAT_ROWS) + 1.0, 2.8
    fig = Figure(figsize=(16, h1 + h2 + h3 + 2.2), dpi=dpi)
    FigureCanvasAgg(fig)
    H = fig.get_figheight()
    outer = fig.add_gridspec(3, 1, height_ratios=[h1, h2, h3], hspace=0.9 / ((h1 + h2 + h3) / 3),
                             left=0.065, right=0.965, top=1 - 1.05 / H, bottom=0.5 / H)
    _title(fig, report, H)
    _error_panel(fig, outer[0], report)
    _heat_panel(fig, outer[1], report)
    _loss_panel(fig, outer[2], report)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, [buf.getvalue()], overwrite)
    return Path(path)


def _title(fig, report, H: float) -> None:
    steps = len(report.steps)
    verdict = "PASS" if report.passed else "FAIL"
    title = (f"llmc-parity: {verdict} | {steps} step{'s' * (steps != 1)} | {config_text(report.config)}"
             f" | B={report.B} T={report.T} | {Path(str(report.library)).name}"
             + (f" ({report.build.get('cflags')})" if report.build else ""))
    fig.suptitle(title, y=1 - 0.2 / H, fontsize=12, fontweight="bold",
                 color="black" if report.passed else "firebrick")
    first = report.first_divergence()
    if first:
        fig.text(0.5, 1 - 0.48 / H, "\n".join(textwrap.wrap(_clip(first, 400), 190)), ha="center", va="top",
                 fontsize=8, color="firebrick")


# ----------------------------------------------------------------------------
# panel 1: end-to-end error along the graph

def _error_panel(fig, cell, report) -> None:
    import matplotlib
    from matplotlib.lines import Line2D

    impls = list(report.impls)
    steps = [s.step for s in report.steps]
    cmap = matplotlib.colormaps["viridis"]
    colour = {t: cmap(0.85 * (k / max(1, len(steps) - 1))) for k, t in enumerate(steps)}
    positions = graph_positions(report)
    pos = {w: i for i, w in enumerate(positions)}
    bands = x_bands(list(positions.values()))
    grid = cell.subgridspec(len(impls), 1, hspace=0.42)
    axes = []
    for k, impl in enumerate(impls):
        ax = fig.add_subplot(grid[k], sharex=axes[0] if axes else None)
        axes.append(ax)
        _draw_bands(ax, bands, label=(k == 0))
        drawn = _error_lines(ax, report, impl, pos, colour)
        _error_axes(ax, report, impl, drawn)
        _mark_first_divergence(ax, report, impl, pos)
    if not axes:
        return
    _xticks(axes[-1], bands)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("position in the graph: forward ops (embedding, layers 0..L-1, head), "
                        "then backward ops (head, layers L-1..0, embedding)", fontsize=8)
    shown = steps if len(steps) <= 6 else [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
    handles = [Line2D([], [], color=colour[t], lw=1.5, label=f"step {t}") for t in shown]
    handles += [Line2D([], [], color="red", ls="--", label="tolerance"),
                Line2D([], [], color="red", marker="o", mfc="none", ls="none", label="over tolerance")]
    axes[0].legend(handles=handles, fontsize=7.5, loc="lower right", ncol=len(handles),
                   frameon=False, bbox_to_anchor=(1.0, 1.0), borderaxespad=0.1,
                   handlelength=1.6, columnspacing=1.0)


def _error_lines(ax, report, impl: str, pos: dict, colour: dict) -> bool:
    """One line per step: the worst fraction of tolerance used at each graph position.
    Returns whether anything was drawn."""
    drawn = False
    nonfinite: set[int] = set()
    x = np.arange(len(pos))
    for s in report.steps:
        y = np.full(len(pos), np.nan)
        for c in s.checks:
            if c.impl == impl and c.kind == "e2e":
                i = pos[c.position]
                u = c.comparison.used
                y[i] = u if np.isnan(y[i]) else max(y[i], u)
        if np.all(np.isnan(y)):
            continue
        drawn = True
        inf = np.isinf(y)
        nonfinite.update(np.flatnonzero(inf).tolist())
        yy = np.clip(np.where(inf, np.nan, y), LEAST_DRAWN, None)
        ax.plot(x, yy, "-", color=colour[s.step], lw=1.1, alpha=0.9, marker=".", ms=2.5)
        over = (y > 1) & ~inf
        if over.any():
            ax.plot(x[over], yy[over], "o", ms=3.5, mfc="none", mec="red", mew=0.8)
    if nonfinite:      # NaN/inf mismatches: off the scale, marked at the top
        xs = sorted(nonfinite)
        ax.plot(xs, [0.96] * len(xs), "^", ms=6, color="red", transform=ax.get_xaxis_transform())
        ax.text(0.995, 0.85, "▲ non-finite mismatch", transform=ax.transAxes, ha="right", va="top",
                fontsize=7.5, color="red")
    biased = sorted(bias_positions(report, impl, pos))
    if biased:         # ops whose mean error is off (replay or e2e): marked at the top
        ax.plot(biased, [0.9] * len(biased), "D", ms=5, color="darkorange", transform=ax.get_xaxis_transform())
        ax.text(0.995, 0.75, "◆ mean error off (bias)", transform=ax.transAxes, ha="right", va="top",
                fontsize=7.5, color="darkorange")
    return drawn


def bias_positions(report, impl: str, pos: dict) -> set[int]:
    """The graph positions where a check of ``impl`` (replay or e2e) fails on its bias."""
    return {pos[c.position] for s in report.steps for c in s.checks
            if c.impl == impl and c.kind in ("replay", "e2e") and c.position in pos
            and "bias" in c.comparison.failed_checks()}


def _error_axes(ax, report, impl: str, drawn: bool) -> None:
    ax.axhline(1.0, color="red", ls="--", lw=1.0)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, LEAST_DRAWN / 2), max(hi, 3.0))
    failed = any(not c.passed for s in report.steps for c in s.checks if c.impl == impl)
    errored = [s.step for s in report.steps if impl in s.errors]
    status = "FAIL" if failed or errored else "PASS"
    ax.set_title(f"{impl}: end-to-end error / tolerance (worst tensor of each op)  --  {status}"
                 + (f", errors at step {', '.join(map(str, errored))}" if errored else ""),
                 fontsize=9.5, loc="left", color="firebrick" if status == "FAIL" else "black")
    ax.set_ylabel("× tolerance", fontsize=8)
    ax.tick_params(labelsize=7.5)
    if not drawn:
        ax.text(0.5, 0.5, "no end-to-end checks" + (" (the implementation raised)" if errored else ""),
                transform=ax.transAxes, ha="center", va="center", fontsize=9, color="firebrick")


def _mark_first_divergence(ax, report, impl: str, pos: dict) -> None:
    """A vertical line at the first failing replay op of the first failing step."""
    for s in report.steps:
        c = first_divergence_check([c for c in s.checks if c.impl == impl])
        f = first_structure(getattr(s, "structure", {}).get(impl), c)
        if c is None and f is None:
            continue
        where, position = (f"{f.where} [{f.module}]", f.where) if f is not None else (c.where, c.position)
        text = f"first divergence (step {s.step}): {where}"
        if position in pos:
            x = pos[position]
            ax.axvline(x, color="magenta", lw=1.4, alpha=0.8)
            ax.annotate(text, (x, 1.0), xytext=(4, 6), textcoords="offset points", fontsize=8,
                        color="darkmagenta", ha="left" if x < 0.7 * len(pos) else "right")
        else:
            ax.text(0.99, 0.92, text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
                    color="darkmagenta")
        return


def _draw_bands(ax, bands: list[Band], label: bool) -> None:
    """Shade alternate layers, mark the forward/backward boundary."""
    for b in bands:
        if b.layer is not None and b.layer % 2 == 0:
            ax.axvspan(b.start - 0.5, b.end + 0.5, color="0.92", lw=0, zorder=0)
        elif b.layer is None:
            ax.axvspan(b.start - 0.5, b.end + 0.5, color="#e6eef8", lw=0, zorder=0)
    for b0, b1 in zip(bands, bands[1:]):
        if b0.phase != b1.phase:
            ax.axvline(b1.start - 0.5, color="0.3", lw=1.6, zorder=1)
            if label:
                ax.text(b1.start - 1, 1.02, "forward ←", transform=ax.get_xaxis_transform(), ha="right",
                        va="bottom", fontsize=7.5, color="0.3")
                ax.text(b1.start, 1.02, "→ backward", transform=ax.get_xaxis_transform(), ha="left",
                        va="bottom", fontsize=7.5, color="0.3")
    ax.grid(axis="y", alpha=0.3, which="major")


def _xticks(ax, bands: list[Band]) -> None:
    """A tick per layer band, numbered; "emb" and "head" for the bands outside the layers
    (the forward and the backward head bands, adjacent, share one "head" tick)."""
    ticks, labels = [], []
    last = len(bands) - 1
    for k, b in enumerate(bands):
        nxt = bands[k + 1] if k < last else None
        prev = bands[k - 1] if k > 0 else None
        if b.layer is not None:
            ticks.append((b.start + b.end) / 2)
            labels.append(str(b.layer))
        elif k == 0 or k == last:
            ticks.append((b.start + b.end) / 2)
            labels.append("emb")
        elif b.phase == "forward" and nxt is not None and nxt.layer is None and nxt.phase == "backward":
            ticks.append(nxt.start - 0.5)
            labels.append("head")
        elif b.phase == "backward" and prev is not None and prev.layer is None and prev.phase == "forward":
            continue
        else:
            ticks.append((b.start + b.end) / 2)
            labels.append("head")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=7)
    if bands:
        ax.set_xlim(-0.5, bands[-1].end + 0.5)


# ----------------------------------------------------------------------------
# panel 2: heat maps across layers

def _heat_values(report, impl: str, rows: list, L: int) -> np.ndarray:
    """log10 of norm_rel / tol.norm for each (row, layer), max over steps; NaN unchecked."""
    ridx = {r: i for i, r in enumerate(rows)}
    val = np.full((len(rows), L), np.nan)
    for s in report.steps:
        for c in s.checks:
            i = ridx.get((c.ref.group, c.ref.name))
            if c.impl != impl or c.kind != "e2e" or i is None or c.layer is None:
                continue
            cmp = c.comparison
            r = cmp.norm_rel / cmp.tol.norm if cmp.tol.norm > 0 else (0.0 if cmp.norm_rel == 0 else math.inf)
            v = math.log10(max(r, LEAST_DRAWN)) if math.isfinite(r) else math.inf
            old = val[i, c.layer]
            val[i, c.layer] = v if np.isnan(old) else max(old, v)
    return val


def _heat_panel(fig, cell, report) -> None:
    from matplotlib.colors import TwoSlopeNorm

    impls = list(report.impls)
    L = report.config.num_layers
    present = {(c.ref.group, c.ref.name) for s in report.steps for c in s.checks
               if c.kind == "e2e" and c.layer is not None}
    rows = [r for r in HEAT_ROWS if r in present]
    if not rows:
        ax = fig.add_subplot(cell)
        ax.axis("off")
        ax.text(0.5, 0.5, "no per-layer end-to-end checks to show", transform=ax.transAxes,
                ha="center", va="center", fontsize=10)
        return
    heat = {impl: _heat_values(report, impl, rows, L) for impl in impls}
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in heat.values()] or [np.array([])])
    lo = math.floor(min(float(finite.min()) if finite.size else -2.0, -1.0))
    hi = math.ceil(max(float(finite.max()) if finite.size else 1.0, 1.0))
    norm = TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    grid = cell.subgridspec(1, len(impls) + 1, width_ratios=[1.0] * len(impls) + [0.04], wspace=0.06)
    first = im = None
    for k, impl in enumerate(impls):
        ax = fig.add_subplot(grid[0, k], sharey=first)
        first = first or ax
        im = _heat_map(ax, impl, heat[impl], rows, norm, hi, labels=(k == 0))
    cb = fig.colorbar(im, cax=fig.add_subplot(grid[0, len(impls)]))
    ticks = list(range(lo, hi + 1))
    cb.set_ticks(ticks)
    cb.set_ticklabels([f"{10.0 ** t:g}" for t in ticks])
    cb.set_label("||a-e|| / ||e||  as a fraction of its tolerance (max over steps; 1 = tolerance, "
                 "boxed: over)", fontsize=7.5)
    cb.ax.tick_params(labelsize=7)


def _heat_map(ax, impl: str, val: np.ndarray, rows: list, norm, hi: float, labels: bool):
    from matplotlib.patches import Rectangle

    if np.all(np.isnan(val)):
        ax.text(0.5, 0.5, "not checked\n(the implementation raised)", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="firebrick")
    shown = np.where(np.isinf(val), hi, val)
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="RdBu_r", norm=norm,
                   interpolation="nearest")
    ax.set_facecolor("0.85")                   # not checked
    ys, xs = np.nonzero(np.nan_to_num(val, nan=-np.inf) > 0)
    for y, x in zip(ys, xs):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, ec="black", lw=0.6))
    ax.set_title(f"{impl}: norm-wise error / tolerance by layer" + (f" ({len(ys)} over)" if len(ys) else ""),
                 fontsize=9, loc="left", color="firebrick" if len(ys) else "black")
    L = val.shape[1]
    ax.set_xticks(range(L))
    ax.set_xticklabels([str(layer) for layer in range(L)], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_yticks(range(len(rows)))
    if labels:
        ax.set_yticklabels([n if g == "acts" else f"d {n}" for g, n in rows], fontsize=7.5)
    else:
        ax.tick_params(labelleft=False)
    # separators between the activations, activation gradients, weight gradients
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axhline(i - 0.5, color="black", lw=1.2)
    return im


# ----------------------------------------------------------------------------
# panel 3: losses

_OTHERS = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
_STYLES = {"C": dict(color="black", lw=2.2, marker="o", ms=5),
           "oracle": dict(color="tab:blue", lw=1.2, ls="--", marker="s", ms=4, mfc="none")}


def _loss_panel(fig, cell, report) -> None:
    grid = cell.subgridspec(1, 2, wspace=0.15)
    ax_l, ax_d = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    series = ["C", "oracle", *[i for i in report.impls if i != "C"]]
    for j, name in enumerate(series):
        style = _STYLES.get(name) or dict(color=_OTHERS[(j - 2) % len(_OTHERS)], lw=1.0,
                                          marker="^x+dv*"[(j - 2) % 6], ms=5)
        pts = [(s.step, s.losses[name], rel_diff(s.losses[name], s.losses.get("oracle")))
               for s in report.steps if s.losses.get(name) is not None]
        if not pts:
            continue
        xs, ls, ds = zip(*pts)
        ax_l.plot(xs, ls, label=name, **style)
        if name != "oracle":
            ds = [np.nan if d is None or not math.isfinite(d) else d for d in ds]
            ax_d.plot(xs, np.clip(ds, 1e-10, None), label=name, **style)
    threshold = [(s.step, _loss_threshold(c.comparison)) for s in report.steps for c in s.checks
                 if c.kind == "loss" and c.impl == "C"]
    if threshold:
        tx, ty = zip(*threshold)
        ax_d.plot(tx, ty, color="red", ls="--", lw=1.0, label="tolerance")
    ax_l.set_title("loss per step (curves that agree overlap: see the differences on the right)",
                   fontsize=9, loc="left")
    ax_l.ticklabel_format(axis="y", useOffset=False)
    ax_d.set_title("loss: relative difference to the float64 oracle", fontsize=9, loc="left")
    ax_d.set_yscale("log")
    for ax in (ax_l, ax_d):
        ax.set_xlabel("step", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7, ncol=min(6, len(series)), loc="best")
        ax.tick_params(labelsize=7.5)
        ax.set_xticks([s.step for s in report.steps])
        ax.grid(alpha=0.3)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _loss_threshold(c: Comparison) -> float:
    """The |a-e|/|e| at which the (scalar) loss comparison fails: the element-wise bound is
    on |a-e|/(|e|+scale), the norm-wise one on |a-e|/|e| itself."""
    e = abs(c.worst_expected) if c.worst_expected is not None else 0.0
    elem = c.tol.rel * (1.0 + c.scale / e) if e > 0 else math.inf
    return min(elem, c.tol.norm)
