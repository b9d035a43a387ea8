"""Figures of what growth did: provenance maps, norm profiles, the schedule's loss, the mask ramp.

Every function returns a :class:`matplotlib.figure.Figure` on the Agg canvas, built
without pyplot: nothing global changes, nothing opens a window, and a notebook shows the
figure when a cell returns it. The data stays readable from the figure (tests use this):

- the provenance image's array is the code map itself (``fig.axes[0].images[0]``);
- inserted layers are ``axvspan`` patches with gid ``"inserted-layer"``;
- growth points are vertical lines with gid ``"growth-point"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from growth.runs import Curve
from operators import PROVENANCE

# One colour per provenance code (operators.plan.PROVENANCE order).
PROVENANCE_COLORS = {
    "copied": "#4c72b0",  # blue: the parent's values
    "zero": "#e8e8e8",  # near white: zero by construction
    "init": "#dd8452",  # orange: freshly initialised
    "cloned": "#55a868",  # green: a second copy of a parent entry
    "layer-copy": "#8172b3",  # purple: an inserted layer copied from a neighbour
    "masked": "#c44e52",  # red: new, behind an MSG mask until c = 1
}
INSERTED_GID = "inserted-layer"
GROWTH_GID = "growth-point"


def _finish(fig: Figure, ax, title: str | None) -> Figure:
    ax.legend(fontsize="x-small")
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_provenance(codes: torch.Tensor | np.ndarray, title: str | None = None,
                    index: Sequence[torch.Tensor | np.ndarray] | None = None,
                    counts: dict[str, int] | None = None) -> Figure:
    """Map of one tensor's provenance codes (a 1-D tensor is drawn as one row).

    ``index`` (the row and column indices a preview or block sampled, as returned by
    :func:`growth.provenance.provenance_preview`) labels the axes with the tensor's own
    indices. The legend gives each code's share of the map, or of ``counts`` (e.g. the
    exact :func:`growth.provenance.provenance_counts` of the tensor a preview samples).
    """
    data = np.asarray(codes, dtype=np.uint8)
    if data.ndim == 1:
        data = data[None, :]
        index = [np.zeros(1), *(index or [np.arange(data.shape[1])])]
    names = list(PROVENANCE.values())
    cmap = ListedColormap([PROVENANCE_COLORS[n] for n in names])
    norm = BoundaryNorm(np.arange(len(names) + 1) - 0.5, len(names))
    fig = _figure(6.0, 4.6 if data.shape[0] > 1 else 2.0)
    ax = fig.add_subplot()
    extent = None
    if index is not None:
        r, c = (np.asarray(i) for i in index)
        extent = (c[0] - 0.5, c[-1] + 0.5, r[-1] + 0.5, r[0] - 0.5)
    ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto", extent=extent)
    ax.set_xlabel("column (input)")
    ax.set_ylabel("row (output)")
    if counts is None:
        counts = dict(zip(names, np.bincount(data.reshape(-1), minlength=len(names)).tolist(), strict=True))
    total = sum(counts.values())
    handles = [Patch(facecolor=PROVENANCE_COLORS[n], edgecolor="0.4", label=f"{n} {counts[n] / total:.1%}")
               for n in names if counts.get(n)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
              title="provenance")
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def plot_norm_profile(rows: Sequence[dict[str, Any]], stat: str = "norm",
                      tensors: Sequence[str] | None = None) -> Figure:
    """Per-layer profile of parent vs grown, one panel per tensor (rows of
    :func:`growth.inspect.compare`).

    The grown model's value is drawn at every grown layer index; the parent's value of
    the layer each kept layer came from is drawn at the same index, so an exact growth
    shows the two on top of each other. Inserted layers are shaded.
    """
    tensors = list(tensors or dict.fromkeys(r["tensor"] for r in rows))
    cols = min(len(tensors), 4)
    nrows = -(-len(tensors) // cols)
    fig = _figure(3.2 * cols, 2.6 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(tensors):
            ax.set_visible(False)
            continue
        mine = sorted((r for r in rows if r["tensor"] == tensors[k]), key=lambda r: r["layer"])
        for r in (r for r in mine if r["new"]):
            ax.axvspan(r["layer"] - 0.4, r["layer"] + 0.4, color="#dd8452", alpha=0.25, gid=INSERTED_GID,
                       label="inserted layer" if r is next(x for x in mine if x["new"]) else None)
        ax.plot([r["layer"] for r in mine], [r["grown"] for r in mine], "o-", color="#4c72b0",
                label="grown")
        kept = [r for r in mine if r["parent"] is not None]
        ax.plot([r["layer"] for r in kept], [r["parent"] for r in kept], "x", color="black", ms=7,
                label="parent (the layer it kept)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(tensors[k], fontsize="small")
        ax.set_xlabel("grown layer")
        ax.set_ylabel(stat)
        if k == 0:
            ax.legend(fontsize="x-small")
    return fig


def plot_schedule_loss(curve: Curve, eval_curve: Curve | None = None, title: str | None = None) -> Figure:
    """Loss over a whole schedule, one colour per stage, growth points as dashed lines."""
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    steps, values, stages = np.asarray(curve.steps), np.asarray(curve.values), np.asarray(curve.stage_of)
    for name in curve.offsets:
        sel = stages == name
        if sel.any():
            ax.plot(steps[sel], values[sel], lw=1.2, label=f"{name} ({curve.tag})")
    if eval_curve is not None and eval_curve.steps:
        ax.plot(eval_curve.steps, eval_curve.values, "ko", ms=4, label=eval_curve.tag)
    for step, name in curve.growth_points:
        ax.axvline(step, color="0.3", ls="--", lw=1, gid=GROWTH_GID)
        ax.annotate(f"grow → {name}", (step, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize="x-small")
    ax.set_xlabel("optimizer step (schedule)")
    ax.set_ylabel("loss")
    return _finish(fig, ax, title)


def plot_mask_ramp(points: Sequence[tuple[int, float]], ramp_steps: int | None = None,
                   title: str | None = None) -> Figure:
    """MSG mask value c against the logged step: 0 right after growth, linear to 1, then folded.

    Note: the trainer logs update k (k = 1 is the first) with the c it ran at,
    ``stages.lr.mask_c(k − 1, ramp_steps)``, so c first reaches 1 on update ``ramp_steps + 1``;
    that is where the dotted line goes.
    """
    fig = _figure(5.0, 3.0)
    ax = fig.add_subplot()
    steps = [s for s, _ in points]
    ax.plot(steps, [c for _, c in points], ".-", color="#c44e52", label="c")
    ax.axhline(1.0, color="0.6", lw=0.8)
    if ramp_steps:
        ax.axvline(ramp_steps + 1, color="0.3", ls=":", lw=1,
                   label=f"ramp_steps = {ramp_steps}: c = 1 from update {ramp_steps + 1}")
    ax.set_ylim(-0.05, 1.1)
    ax.set_xlabel("optimizer update (stage)")
    ax.set_ylabel("mask c")
    return _finish(fig, ax, title)
