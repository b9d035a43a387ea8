"""Where new layers go: the layer map of a depth growth.

A layer map has one entry per target layer: ``{"src": j, "new": bool}``. Old layers keep
their order (``src`` = their source index). A new layer's ``src`` is the neighbour whose
weights seed it (the old layer just below; layer 0 for a bottom insert), or None for a
fresh init (``depth_source="init"``).

Positions:
- ``interleave``: new layers spread evenly between old ones (after every k-th layer);
- ``top`` / ``bottom``: all new layers after the last / before the first old layer;
- an explicit list of target indices;
- ``distance``: our reading of Tele-FLM's "distance-based layer selection" (the rule
  is not public). Between adjacent old layers j and j+1 we measure

      d(j) = Σ_t ‖W_t^j − W_t^{j+1}‖²_F / Σ_t (‖W_t^j‖²_F + ‖W_t^{j+1}‖²_F)

  over the seven block matrices t (q, k, v, o, gate, up, down): 0 for identical layers,
  1 for orthogonal ones of equal norm. New layers go into the gaps with the smallest
  d, most similar first, so an inserted layer sits where the function changes least
  from one layer to the next; with more new layers than gaps the order repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flmcore.params import BLOCK_MATRICES, LAYER_PARAMS
from operators.spec import GrowthError

__all__ = ["BLOCK_MATRICES", "make_layer_map", "new_layer_indices"]


def gaps_to_layer_map(counts: list[int], n_old: int, source: str) -> list[dict[str, Any]]:
    """``counts[g]`` new layers in gap g (g = 0: below layer 0; g = j + 1: above layer j)."""
    out: list[dict[str, Any]] = []
    for gap, k in enumerate(counts):
        if gap > 0:
            out.append({"src": gap - 1, "new": False})
        neighbour = gap - 1 if gap > 0 else 0
        out.extend({"src": neighbour if source == "neighbour" else None, "new": True}
                   for _ in range(k))
    return out


def interleave_counts(n_old: int, n_new: int) -> list[int]:
    counts = [0] * (n_old + 1)
    for k in range(n_new):
        after = max(round((k + 1) * n_old / (n_new + 1)), 1)  # never below layer 0
        counts[after] += 1
    return counts


def explicit_map(positions: list[int], n_old: int, n_dst: int, source: str) -> list[dict[str, Any]]:
    n_new = n_dst - n_old
    if len(positions) != n_new or any(p >= n_dst for p in positions):
        raise GrowthError(f"field 'positions': need {n_new} distinct target indices in 0..{n_dst - 1} "
                          f"for {n_old} → {n_dst} layers, got {positions}")
    out: list[dict[str, Any]] = []
    old = 0
    new_set = set(positions)
    for i in range(n_dst):
        if i in new_set:
            neighbour = max(old - 1, 0)
            out.append({"src": neighbour if source == "neighbour" else None, "new": True})
        else:
            out.append({"src": old, "new": False})
            old += 1
    return out


def layer_distances(n_old: int, get_tensor: Callable[[str], torch.Tensor]) -> list[float]:
    """d(j) for j = 0 .. n_old − 2, reading one layer at a time (two held at once)."""
    def norms(j: int) -> dict[str, torch.Tensor]:
        return {p.key: get_tensor(p.name(j)).float() for p in LAYER_PARAMS if p.is_block_matrix}

    out: list[float] = []
    below = norms(0) if n_old else {}
    for j in range(n_old - 1):
        above = norms(j + 1)
        num = sum(float((below[t] - above[t]).pow(2).sum()) for t in BLOCK_MATRICES)
        den = sum(float(below[t].pow(2).sum() + above[t].pow(2).sum()) for t in BLOCK_MATRICES)
        out.append(num / den if den > 0 else 0.0)
        below = above
    return out


def distance_counts(distances: list[float], n_old: int, n_new: int) -> list[int]:
    counts = [0] * (n_old + 1)
    if n_old < 2:
        counts[-1] = n_new
        return counts
    order = sorted(range(len(distances)), key=lambda j: (distances[j], j))
    for k in range(n_new):
        counts[order[k % len(order)] + 1] += 1
    return counts


def make_layer_map(n_old: int, n_dst: int, positions: str | tuple[int, ...], source: str,
                   get_tensor: Callable[[str], torch.Tensor] | None = None
                   ) -> tuple[list[dict[str, Any]], list[float] | None]:
    """The layer map and, for ``distance``, the measured distances (for the history)."""
    n_new = n_dst - n_old
    if n_new == 0:
        return [{"src": j, "new": False} for j in range(n_old)], None
    if isinstance(positions, (list, tuple)):
        return explicit_map(list(positions), n_old, n_dst, source), None
    if positions == "interleave":
        return gaps_to_layer_map(interleave_counts(n_old, n_new), n_old, source), None
    if positions == "top":
        return gaps_to_layer_map([0] * n_old + [n_new], n_old, source), None
    if positions == "bottom":
        return gaps_to_layer_map([n_new] + [0] * n_old, n_old, source), None
    if positions == "distance":
        if get_tensor is None:
            raise GrowthError("field 'positions': 'distance' needs the source weights; plan it from a "
                              "checkpoint directory, or pass explicit positions")
        distances = layer_distances(n_old, get_tensor)
        return gaps_to_layer_map(distance_counts(distances, n_old, n_new), n_old, source), distances
    raise GrowthError(f"field 'positions': unknown mode {positions!r}")


def new_layer_indices(layer_map: list[dict[str, Any]]) -> list[int]:
    return [i for i, entry in enumerate(layer_map) if entry["new"]]
