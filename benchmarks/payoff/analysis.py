"""The analysis (pure): loss curves along FLOPs, the crossover, the reading of a grid."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from payoff.design import CONTROLS, GROWN


@dataclass
class Curve:
    """A piecewise-linear loss curve along FLOPs (an arm's frontier: final loss vs budget)."""

    name: str
    flops: list[float]
    loss: list[float]


def flops_to_reach(curve: Curve, target: float, log: bool = False) -> float | None:
    """First FLOPs at which the piecewise-linear curve reaches ``target`` (≤), or None.
    ``log``: interpolate in log FLOPs (for a frontier over a geometric grid of budgets)."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if l1 <= target < l0:
            t = (l0 - target) / (l0 - l1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))) if log else f0 + t * (f1 - f0)
    return None


def loss_at(curve: Curve, flops: float) -> float:
    """Loss at ``flops`` by linear interpolation (clamped to the curve's ends)."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if flops <= pts[0][0]:
        return pts[0][1]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (flops - f0) / (f1 - f0) * (l1 - l0)
    return pts[-1][1]


def crossover(budgets: list[float], small: list[float], final: list[float]) -> float | None:
    """The first budget (log-interpolated) at which ``final``'s loss drops below ``small``'s."""
    diff = [f - s for f, s in zip(final, small, strict=True)]
    if diff and diff[0] < 0:
        return None  # final is ahead already at the smallest budget: the crossover is below it
    for (b0, d0), (b1, d1) in zip(zip(budgets, diff, strict=True), list(zip(budgets, diff, strict=True))[1:],
                                  strict=False):
        if d0 >= 0 > d1:
            t = d0 / (d0 - d1)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def reading(table: dict[float, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per budget and grown arm: the margin over the better control, whether the arm's worst
    seed beats every seed of both controls, and FLOPs-to-reach along each control's frontier."""
    budgets = sorted(b for b in table if all(table[b].get(c) for c in CONTROLS))
    frontier = {c: Curve(c, budgets, [statistics.fmean(table[b][c]) for b in budgets]) for c in CONTROLS}
    out = []
    for b in budgets:
        for arm in GROWN:
            if not table[b].get(arm):
                continue
            mine = table[b][arm]
            mean = statistics.fmean(mine)
            best = min(CONTROLS, key=lambda c: statistics.fmean(table[b][c]))
            margin = statistics.fmean(table[b][best]) - mean
            beats_both = all(max(mine) < min(table[b][c]) for c in CONTROLS)
            reach = {}
            for c in CONTROLS:
                f = flops_to_reach(frontier[c], mean, log=True)
                where = ("beyond" if f is None else "below" if frontier[c].loss[0] <= mean else "inside")
                # below: the control is there already at the smallest budget (ratio is a lower bound);
                # beyond: not even at the largest budget (the saving is larger than budget ÷ largest)
                reach[c] = {"flops": f, "ratio": None if f is None else b / f, "where": where}
            out.append({"budget": b, "arm": arm, "mean": mean, "better_control": best, "margin": margin,
                        "seed_range": max(mine) - min(mine),
                        "control_seed_range": max(table[b][best]) - min(table[b][best]),
                        "beats_both_beyond_spread": beats_both, "flops_to_reach": reach})
    return out


def choose_budgets(grid: list[float], cross: float | None, small: list[float], final: list[float]) -> list[float]:
    """Three budgets around the coarse crossover: the two grid budgets that bracket it and
    their geometric mean; without a crossover, the top of the grid (or below its bottom,
    when the final model is ahead already there)."""
    grid = sorted(grid)
    if cross is None:
        if final and final[0] < small[0]:
            return [grid[0] / 4, grid[0] / 2, grid[0]]
        top = grid[-1]
        return [top / 2, top / math.sqrt(2), top] if len(grid) < 3 else grid[-3:]
    lo = max(g for g in grid if g <= cross)
    hi = min(g for g in grid if g > cross)
    return [lo, math.sqrt(lo * hi), hi]


def paired(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget and grown arm, the seeds paired: d = arm − best control *of that seed*
    (the lower of the two controls' losses at that seed; every arm of a seed shares its
    init and data order), and d against each control. Negative d: the arm is better.
    mean, sd, the sign count (seeds with d < 0 of n) and t = mean / (sd / √n)."""
    loss = {(r["budget"], r["arm"], r["seed"]): r["eval_loss"] for r in records}
    out = []
    for b in sorted({r["budget"] for r in records}):
        for arm in GROWN:
            seeds = sorted(s for (bb, a, s) in loss if bb == b and a == arm
                           and all((b, c, s) in loss for c in CONTROLS))
            if not seeds:
                continue
            mine = [loss[(b, arm, s)] for s in seeds]
            ref = {c: [loss[(b, c, s)] for s in seeds] for c in CONTROLS}
            ref["best"] = [min(v) for v in zip(*(ref[c] for c in CONTROLS), strict=True)]
            out.append({"budget": b, "arm": arm, "seeds": seeds,
                        **{k: diff_stats([m - r for m, r in zip(mine, v, strict=True)]) for k, v in ref.items()}})
    return out


def diff_stats(d: list[float]) -> dict[str, Any]:
    n = len(d)
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else 0.0
    return {"diffs": d, "mean": mean, "sd": sd, "wins": sum(x < 0 for x in d), "n": n,
            "t": mean / (sd / math.sqrt(n)) if n > 1 and sd > 1e-9 else None}
