"""Per-axis index maps: how each axis of a target tensor is filled from its source.

Every width operator (hidden, FFN, heads, vocab) is, along one axis, a gather with a
per-entry scale plus a rule for the new entries. An :class:`AxisMap` holds exactly that:

- ``src[i]``: the source index copied into target index ``i``, or -1 for a new entry;
- ``scale[i]``: factor on the copied value (``1/count`` where a clone/split divides an
  input-side weight among its copies, 1 otherwise);
- ``fill``: what new entries must be — ``"zero"`` (they would otherwise change the
  function: output-side weights under zero-init) or ``"init"`` (free: their input is
  zero or masked);
- ``masked``: new entries are hidden behind an MSG mask (provenance only);
- ``divided``: copies share one source's value (``scale = 1/count``) and may carry
  ± pair noise that sums to zero over the copies.

Roles: a *writer* axis produces a quantity the rest of the network reads (rows of
o_proj/down_proj for the residual stream, embedding columns, rows of q/k/v/gate/up); a
*reader* axis consumes one (columns of q/k/v/gate/up/lm_head on the residual stream,
o_proj columns on heads, down_proj columns on FFN units).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from operators.spec import GrowthError


@dataclass
class AxisMap:
    src: torch.Tensor  # int64 (new_size,): source index or -1
    scale: torch.Tensor  # float32 (new_size,)
    fill: str = "zero"  # zero | init, for entries with src == -1
    masked: bool = False
    divided: bool = False
    cloned: bool = False  # some entries duplicate a source entry (provenance)
    offset: int | None = None  # new entries before this (sliced) map starts

    @property
    def size(self) -> int:
        return int(self.src.numel())

    @property
    def is_identity(self) -> bool:
        n = self.size
        return bool((self.src == torch.arange(n)).all() and (self.scale == 1).all())

    @property
    def new(self) -> torch.Tensor:
        return self.src < 0

    @property
    def new_ordinal(self) -> torch.Tensor:
        """For each entry, its index among the new entries (meaningful where ``new``)."""
        if self.offset is None:
            return torch.cumsum(self.new.long(), 0) - 1
        return self.offset + torch.cumsum(self.new.long(), 0) - 1

    def prefix_run(self) -> tuple[int, int] | None:
        """(first source index, count) when this map is a plain copy of consecutive source
        entries followed only by new ones (zero/masked padding), else None."""
        old = int((~self.new).sum())
        if old == 0:
            return (0, 0)  # all new
        if bool(self.new[:old].any()):
            return None
        first = int(self.src[0])
        if not bool((self.src[:old] == torch.arange(first, first + old)).all()):
            return None
        return (first, old) if bool((self.scale[:old] == 1).all()) else None

    def copy_scale(self, squared: bool = False) -> torch.Tensor:
        """Factor on gathered values: the scale (squared for exp_avg_sq), 0 on new entries."""
        scale = self.scale * self.scale if squared else self.scale
        return torch.where(self.new, 0.0, scale)

    def slice(self, start: int, stop: int) -> AxisMap:
        """Entries [start, stop) of this map (new-entry ordinals keep counting from 0 at 0)."""
        if start == 0 and stop == self.size:
            return self
        before = int(self.new[:start].sum())
        return AxisMap(self.src[start:stop], self.scale[start:stop], self.fill, self.masked,
                       self.divided, self.cloned, offset=before)

    def expand(self, unit: int) -> AxisMap:
        """Per-unit map (e.g. per head) → per-element map (head_dim elements per unit)."""
        offs = torch.arange(unit)
        src = torch.where(self.src[:, None] >= 0, self.src[:, None] * unit + offs, -1).reshape(-1)
        return AxisMap(src, self.scale.repeat_interleave(unit), self.fill, self.masked,
                       self.divided, self.cloned)

    def duplicate_mask(self) -> torch.Tensor:
        """True for target entries that are a second (or later) copy of a source entry
        (new entries, -1, never); vectorised for axes of 10⁵ entries."""
        values = self.src.numpy()
        _, first = np.unique(values, return_index=True)  # numpy: torch's threaded sort crawls here
        out = np.ones(values.shape, dtype=bool)
        out[first] = False
        return torch.from_numpy(out & (values >= 0))


def identity(n: int) -> AxisMap:
    return AxisMap(torch.arange(n), torch.ones(n))


def padded(old: int, new: int, fill: str, masked: bool = False) -> AxisMap:
    """Old entries first, then ``new - old`` new entries (zero-init / masked growth)."""
    src = torch.cat([torch.arange(old), torch.full((new - old,), -1, dtype=torch.long)])
    return AxisMap(src, torch.ones(new), fill, masked)


def duplicated(src: torch.Tensor, divide: bool) -> AxisMap:
    """Every target entry copies a source entry; with ``divide`` each copy carries
    1/count of it (input side of a clone/split), else the full value (output side)."""
    counts = torch.bincount(src)
    scale = (1.0 / counts[src].float()) if divide else torch.ones(src.numel())
    has_copies = bool((counts > 1).any())
    return AxisMap(src.clone(), scale, "zero", False, divide and has_copies, has_copies)


def tiled(old: int, new: int) -> torch.Tensor:
    """Clone order: target i copies source i mod old (so [x, x, …] for integer factors)."""
    return torch.arange(new) % old


def extra_choice(old: int, new: int, generator: torch.Generator) -> torch.Tensor:
    """Net2Net split: old units keep their place, each new unit copies a source unit drawn
    without replacement (cycling through fresh permutations when more are needed)."""
    need = new - old
    picks = [torch.randperm(old, generator=generator) for _ in range(-(-need // old))]
    extra = torch.cat(picks)[:need] if picks else torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(old), extra])


def check_grows(field: str, old: int, new: int) -> None:
    if new < old:
        raise GrowthError(f"field '{field}': target {new} is smaller than source {old}; "
                          f"growth only adds (shrinking is not function-preserving)")
