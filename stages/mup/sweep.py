"""LR × width × seed sweeps of the proxy, from scratch and after exact growth.

The LR grid is powers of two (a ×2 grid, Tele-FLM/μScaling practice). A sweep starts each
(parametrisation, width) on a window of the grid and extends it, one point past whichever
end holds the best mean loss, until every optimum is interior (:func:`needs_more`).

Transfer through growth (:func:`grown_loss`): a parent trained at the small width is grown
exactly (``operators.grow_state_dict``, zero strategy, fresh Adam state) to the wider
proxy, whose stage then trains on the next tokens of the same stream with its own warmup
(``lr_after_growth: restart``) at the swept LR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from growth.config import ModelConfig, at_width
from operators import GrowthSpec, grow_state_dict
from stages.mup.proxy import Batches, ProxyRun, proxy_stage, train

Curve = dict[float, list[float]]  # lr → final eval loss per seed


def lr_at(exponent: int) -> float:
    """The grid point 2**exponent."""
    return float(2.0 ** exponent)


def best_lr(curve: Curve) -> float:
    """The LR of the lowest mean loss (inf counts as diverged)."""
    return min(curve, key=lambda lr: (sum(curve[lr]) / len(curve[lr]), lr))


def needs_more(curve: Curve, lo: int, hi: int, min_points: int = 5) -> list[int]:
    """Exponents to add so the optimum is interior and the curve has ``min_points``."""
    exps = sorted(round(math.log2(lr)) for lr in curve)
    best = round(math.log2(best_lr(curve)))
    add = []
    if best == exps[0] and best - 1 >= lo:
        add.append(best - 1)
    if best == exps[-1] and best + 1 <= hi:
        add.append(best + 1)
    if len(exps) + len(add) < min_points:  # widen on the side with fewer points around the optimum
        left, right = exps.index(best), len(exps) - 1 - exps.index(best)
        add.append(exps[0] - 1 if left <= right else exps[-1] + 1)
    return sorted(set(add))


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    param: str  # "mup" | "sp" (the proxy's μP flavor or its SP twin)
    width: int
    exponent: int  # lr = 2**exponent
    seed: int
    parent_width: int | None = None  # grown from a parent of this width (None: from scratch)
    parent_exponent: int | None = None  # the parent's LR


def point_config(base: ModelConfig, param: str, width: int) -> ModelConfig:
    return at_width(base, width, use_mup=param == "mup")


def scratch_loss(base: ModelConfig, info: dict[str, Any], p: Point, steps: int) -> float:
    stage = proxy_stage(steps=steps, lr=lr_at(p.exponent), seed=p.seed)
    run = ProxyRun(point_config(base, p.param, p.width), stage)
    return train(run, Batches(info, stage))


_PARENTS: dict[tuple[str, int, int, int, int], dict[str, torch.Tensor]] = {}  # per process: trained once


def parent_weights(base: ModelConfig, info: dict[str, Any], p: Point, parent_steps: int) -> dict[str, torch.Tensor]:
    """The parent of a grown point, trained at width ``p.parent_width`` (cached in this process)."""
    assert p.parent_width is not None and p.parent_exponent is not None
    key = (p.param, p.parent_width, p.parent_exponent, p.seed, parent_steps)
    if key not in _PARENTS:
        pstage = proxy_stage(steps=parent_steps, lr=lr_at(p.parent_exponent), seed=p.seed)
        parent = ProxyRun(point_config(base, p.param, p.parent_width), pstage)
        train(parent, Batches(info, pstage))
        _PARENTS[key] = parent.state_dict()
    return _PARENTS[key]


def grown_loss(base: ModelConfig, info: dict[str, Any], p: Point, parent_steps: int, steps: int) -> float:
    """Train the parent (width ``p.parent_width``), grow it (zero, exact), train the grown stage."""
    assert p.parent_width is not None
    small = point_config(base, p.param, p.parent_width)
    data = Batches(info, proxy_stage(seed=p.seed))
    target = point_config(base, p.param, p.width)
    config, weights = grow_state_dict(parent_weights(base, info, p, parent_steps), small, target,
                                      GrowthSpec.from_strategy("zero"))
    stage = proxy_stage(steps=steps, lr=lr_at(p.exponent), seed=p.seed)
    run = ProxyRun(config, stage, weights=weights, grown=True)
    return train(run, Offset(data, parent_steps))


class Offset:
    """A stream view that starts ``offset`` steps in (a grown stage continues its parent's tokens)."""

    def __init__(self, data: Batches, offset: int):
        self.data, self.offset, self.eval = data, offset, data.eval

    def step(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.data.step(self.offset + step)


def run_point(args: tuple[ModelConfig, dict[str, Any], Point, int, int]) -> tuple[Point, float]:
    """One sweep point (a pool task): its loss, inf for a diverged run."""
    base, info, p, steps, parent_steps = args
    torch.set_num_threads(1)
    if p.parent_width is None:
        return p, scratch_loss(base, info, p, steps)
    return p, grown_loss(base, info, p, parent_steps, steps)



@dataclass
class SweepSpec:
    """The shape of a sweep: steps per stage, seeds, the grid bounds and the stopping rule."""

    steps: int = 120
    parent_steps: int = 120
    seeds: tuple[int, ...] = (1, 2)
    lo: int = -16  # grid bounds: 2**lo … 2**hi
    hi: int = -1
    min_points: int = 5
    max_rounds: int = 6


Key = tuple[str, int, "int | None", "int | None"]  # param, width, parent width, parent exponent


def sweep(base: ModelConfig, info: dict[str, Any], windows: dict[Key, list[int]], spec: SweepSpec,
          map_fn: Any = map, on_round: Any = None) -> dict[Key, Curve]:
    """Run every key's window, then extend each curve until its optimum is interior.

    ``map_fn(run_point, tasks)`` runs the points (``map``, or a process pool's ``imap``);
    ``on_round(curves)`` sees the curves after every round (partial results)."""
    curves: dict[Key, Curve] = {k: {} for k in windows}
    todo = dict(windows)
    for _ in range(spec.max_rounds):
        tasks = [(base, info, Point(k[0], k[1], e, s, k[2], k[3]), spec.steps, spec.parent_steps)
                 for k, exps in todo.items() for e in exps for s in spec.seeds]
        if not tasks:
            break
        for p, loss in map_fn(run_point, tasks):
            key = (p.param, p.width, p.parent_width, p.parent_exponent)
            curves[key].setdefault(lr_at(p.exponent), []).append(loss)
        if on_round is not None:
            on_round(curves)
        todo = {k: more for k, c in curves.items()
                if (more := needs_more(c, spec.lo, spec.hi, spec.min_points))}
    return {k: dict(sorted(c.items())) for k, c in curves.items()}


def steps_apart(a: float, b: float) -> int:
    """Grid steps between two LRs of the ×2 grid."""
    return abs(round(math.log2(a) - math.log2(b)))


def collect(run_dir: str | Path) -> dict[str, Curve]:
    """A ``train-stage -m schedule=mup_sweep`` run dir → stage.model → {lr: [eval_loss_end per seed]}."""
    from growth.runs import StageDir

    rows = []
    for path in sorted(Path(run_dir).iterdir()):
        layout = StageDir(path)
        if not path.is_dir():
            continue
        summary, resolved = layout.read_summary(), layout.read_resolved()
        if summary and resolved:
            stage = resolved["stage"]
            rows.append((stage["model"], float(stage["lr"]), int(stage["seed"]), summary["eval_loss_end"]))
    out: dict[str, Curve] = {}
    for model, lr, _, loss in sorted(rows):
        out.setdefault(model, {}).setdefault(lr, []).append(loss)
    return out
