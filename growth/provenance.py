"""Provenance of grown tensors: which elements were copied, zeroed, initialised, cloned.

Everything here comes from a :class:`operators.GrowthPlan` — replayed from the last
``grow`` event of a checkpoint's ``growth.json`` (:func:`plan_from_history`) or passed in
directly — so no weight is read and a 52B → 102B plan on flavors alone answers too::

    plan = plan_of("runs/tiny/tiny_s2/init")              # or make_plan(src, dst)
    provenance(plan, "model.layers.1.mlp.down_proj.weight")  # uint8 map, PROVENANCE codes
    provenance(plan, name, rows=slice(8000, 8400))          # a block: only that is built
    provenance_preview(plan, "lm_head.weight", 256)         # evenly spaced rows/cols
    provenance_counts(plan, name)                           # {"copied": n, "zero": m, …}

Note: a target element's code depends only on its tensor and on two facts per axis —
is the entry new, is it a second copy of a source entry. So a block of the map is the
plan's own :meth:`GrowthPlan.provenance` on the selected entries of each axis, and exact
counts need one representative entry per kind of axis entry (at most three per axis)
instead of the whole map (800 MB of uint8 for the 102B lm_head).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import read_history
from operators import PROVENANCE, GrowthPlan
from operators.axes import AxisMap

GROW_EVENT = "grow"
CODES = {name: code for code, name in PROVENANCE.items()}  # "copied" → 0, …

Index = slice | Sequence[int] | torch.Tensor | None


def plan_from_history(history: dict[str, Any]) -> GrowthPlan | None:
    """The plan of the last ``grow`` event of a growth history (None if it never grew)."""
    events = [e for e in history.get("events", []) if e.get("kind") == GROW_EVENT]
    return GrowthPlan.from_event(events[-1]) if events else None


def plan_of(source: GrowthPlan | dict[str, Any] | str | Path) -> GrowthPlan | None:
    """A plan from a plan, a growth history dict, or a checkpoint directory."""
    if isinstance(source, GrowthPlan):
        return source
    if isinstance(source, dict):
        return plan_from_history(source)
    return plan_from_history(read_history(Path(source)))


def axis_maps(plan: GrowthPlan, name: str) -> tuple[AxisMap, ...] | None:
    """The per-axis maps that fill ``name`` (:meth:`GrowthPlan.axis_maps`)."""
    return plan.axis_maps(name)


def target_shape(plan: GrowthPlan, name: str) -> tuple[int, ...]:
    return plan.target_shape(name)


def _index(sel: Index, size: int) -> torch.Tensor:
    if sel is None:
        return torch.arange(size)
    if isinstance(sel, slice):
        return torch.arange(size)[sel]
    idx = torch.as_tensor(sel, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < -size or int(idx.max()) >= size):
        raise IndexError(f"index out of range for an axis of {size}")
    return idx % size


def provenance(plan: GrowthPlan, name: str, rows: Index = None, cols: Index = None) -> torch.Tensor:
    """uint8 PROVENANCE codes of ``name`` (target shape), or of the block ``rows`` × ``cols``
    (slices or index lists; a 1-D tensor uses ``rows`` only). Only the block is built."""
    shape = target_shape(plan, name)
    if rows is None and cols is None:
        return plan.provenance(name)
    if len(shape) == 1 and cols is not None:
        raise IndexError(f"tensor '{name}' is 1-D: select with rows only")
    index = [_index(sel, n) for sel, n in zip((rows, cols)[:len(shape)], shape, strict=True)]
    return plan.provenance(name, *index)


def grid(size: int, points: int) -> torch.Tensor:
    """At most ``points`` evenly spaced indices of an axis of ``size``, first and last included."""
    if size <= points:
        return torch.arange(size)
    return torch.linspace(0, size - 1, points).round().long().unique()


def provenance_preview(plan: GrowthPlan, name: str, max_size: int = 512
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A map of at most ``max_size`` entries per axis (evenly spaced rows and columns) and
    the indices it sampled: enough to see the blocks of a 10⁹-element matrix.

    Note: sampling can step over blocks thinner than ``size / max_size`` entries; use
    :func:`provenance` with a slice to look at one closely, :func:`provenance_counts` for
    exact totals."""
    shape = target_shape(plan, name)
    index = [grid(n, max_size) for n in shape]
    return provenance(plan, name, *index), index


def _classes(m: AxisMap) -> tuple[torch.Tensor, torch.Tensor]:
    """One representative entry per kind of axis entry (old, duplicate, new) and how many
    entries of that kind the axis has."""
    kind = m.new.long() * 2 + m.duplicate_mask().long()
    reps, counts = [], []
    for k in kind.unique().tolist():
        where = (kind == k).nonzero()[:, 0]
        reps.append(int(where[0]))
        counts.append(int(where.numel()))
    return torch.tensor(reps), torch.tensor(counts)


def provenance_counts(plan: GrowthPlan, name: str) -> dict[str, int]:
    """Exact number of elements of ``name`` per provenance name (absent codes left out),
    from at most 3 × 3 representative elements."""
    shape = target_shape(plan, name)
    maps = axis_maps(plan, name)
    if maps is None:
        code = int(provenance(plan, name, *[[0]] * len(shape)).reshape(-1)[0])
        return {PROVENANCE[code]: int(torch.tensor(shape).prod())}
    classes = [_classes(m) for m in maps]
    codes = provenance(plan, name, *[reps for reps, _ in classes]).long()
    weight = classes[0][1]
    for _, counts in classes[1:]:
        weight = weight[..., None] * counts
    totals = torch.zeros(len(PROVENANCE), dtype=torch.long).index_add_(0, codes.reshape(-1),
                                                                     weight.reshape(-1))
    return {PROVENANCE[c]: int(n) for c, n in enumerate(totals.tolist()) if n}


def provenance_fractions(plan: GrowthPlan, name: str) -> dict[str, float]:
    """:func:`provenance_counts` as shares of the tensor's elements."""
    counts = provenance_counts(plan, name)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}
