"""The next step's batches on the device before the step needs them (torchtitan/nanoGPT style).

:class:`Prefetcher` builds step ``k + 1``'s micro batches (a pure function of the step,
``stages.rank.trainer.StageData``) right after step ``k`` was issued, so the host work overlaps
the device's; on CUDA they are copied from pinned memory with ``non_blocking=True`` (an
unpinned ``.to(cuda)`` blocks the host until the copy is done). On the CPU nothing is copied
or pinned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stages.engines.protocol import Batch


def to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    """``batches`` on ``device``: pinned and copied asynchronously on CUDA, as they are on the CPU."""
    if device.type == "cpu":
        return batches
    pin = device.type == "cuda"
    return [tuple(t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)  # type: ignore[misc]
                  for t in batch) for batch in batches]


class Prefetcher:
    """Step ``k``'s batches on the device; ``prefetch(k + 1)`` after step ``k`` is issued."""

    def __init__(self, load: Callable[[int], list[Batch]], device: torch.device):
        self.load, self.device = load, device
        self.ready: tuple[int, list[Batch]] | None = None

    def prefetch(self, step: int) -> None:
        self.ready = (step, to_device(self.load(step), self.device))

    def take(self, step: int) -> list[Batch]:
        """Step ``step``'s batches (prefetched, or loaded now on a first step or a jump)."""
        if self.ready is None or self.ready[0] != step:
            self.prefetch(step)
        batches = self.ready[1]
        self.ready = None
        return batches
