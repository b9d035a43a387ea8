"""Figures of the μP study: loss vs LR per width (docs/mup_transfer.png), |Δx| vs width."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _curve(ax: Any, curve: dict[str, list[float]], label: str, **style: Any) -> None:
    lrs = sorted(curve, key=float)
    means = [sum(curve[lr]) / len(curve[lr]) for lr in lrs]
    pts = [(float(lr), m) for lr, m in zip(lrs, means, strict=True) if m != float("inf")]
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, **style)
    best = min(pts, key=lambda p: p[1])
    ax.plot([best[0]], [best[1]], marker="*", ms=12, color=ax.lines[-1].get_color())


def transfer_plot(result: dict[str, Any], path: str | Path, ylim: tuple[float, float] | None = None) -> Path:
    """Three panels: μP from scratch, SP from scratch, grown vs scratch; one curve per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, param, title in ((axes[0], "mup", "μP from scratch"), (axes[1], "sp", "SP from scratch")):
        for width, curve in result[param].items():
            _curve(ax, curve, f"width {width}")
        ax.set_title(title)
    for key, curve in result["grown"].items():
        param, pair = key.split(":") if ":" in key else ("mup", key)
        _curve(axes[2], curve, f"{param} grown {pair}", linestyle="-" if param == "mup" else "--")
    axes[2].set_title("after exact zero growth (★ = best)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak LR (before μP multipliers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if ylim:
            ax.set_ylim(*ylim)
    axes[0].set_ylabel("eval loss at the end")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coord_plot(deltas: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """One panel per run kind (e.g. "μP few"): mean |Δx| at the last step vs width, per activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(deltas), figsize=(4 * len(deltas), 3.6), sharey=True, squeeze=False)
    for ax, (title, kinds) in zip(axes[0], deltas.items(), strict=True):
        for kind, points in kinds.items():
            ws = sorted(points, key=int)
            ax.plot([int(w) for w in ws], [points[w] for w in ws], marker="o", ms=3, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("width")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean |Δx| after T steps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
