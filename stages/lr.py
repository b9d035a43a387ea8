"""Learning-rate and MSG-mask schedules of one stage: pure functions of the optimizer step.

Both are recomputed from the step before every update (no scheduler object holds state),
so a resumed stage gets the same LR and mask value at the same step without restoring
anything but the step.

- warmup: linear from peak/warmup to peak over ``warmup_steps`` updates;
- decay: ``cosine`` | ``linear`` | ``constant`` from the peak down to
  ``min_lr_ratio × peak`` at the last step;
- after growth (``lr_after_growth``): ``restart`` uses the stage's own peak and warmup
  again (MSG); ``rewarm`` lowers the peak to ``parent_lr × rewarm_peak_ratio`` and warms
  up over ``rewarm_steps`` (FLM-101B).

References: Loshchilov & Hutter 2017 (cosine), Yao et al. 2024 (MSG), Li et al. 2023
(FLM-101B: 4e-4 → 3.4e-4 → 2e-4 with ~100 re-warm-up steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.schema import AfterGrowth, Decay, StageConfigError

if TYPE_CHECKING:
    from stages.schema import StageCfg


@dataclass(frozen=True)
class LRSchedule:
    peak: float  # LR at the end of the warmup (before μP per-width multipliers)
    warmup_steps: int
    total_steps: int
    decay: Decay = Decay.cosine
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "decay", Decay(self.decay))
        except ValueError:
            raise StageConfigError(f"field 'stage.decay' must be one of "
                                   f"{', '.join(d.value for d in Decay)}, got {self.decay!r}") from None
        if not self.peak > 0 or self.warmup_steps < 0 or self.total_steps < 1:
            raise StageConfigError(f"bad LR schedule {self}")

    def factor(self, step: int) -> float:
        """Multiplier on ``peak`` for the update that follows ``step`` completed updates."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == Decay.constant:
            return 1.0
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        floor = self.min_lr_ratio
        if self.decay == Decay.linear:
            return 1.0 - (1.0 - floor) * p
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

    def lr(self, step: int) -> float:
        return self.peak * self.factor(step)


def rewarm_peak(stage: StageCfg, grown: bool, parent_lr: float | None) -> float:
    """The peak LR a stage trains at: its own, or after growth with ``rewarm`` the
    parent's peak (``parent_lr``; None: this stage's own) × ``rewarm_peak_ratio``."""
    if grown and AfterGrowth(stage.lr_after_growth) == AfterGrowth.rewarm:
        return (parent_lr if parent_lr is not None else stage.lr) * stage.rewarm_peak_ratio
    return stage.lr


def stage_schedule(stage: StageCfg, grown: bool, parent_lr: float | None) -> LRSchedule:
    """The schedule of a stage; ``grown`` is true when it starts from a checkpoint."""
    rewarm = grown and AfterGrowth(stage.lr_after_growth) == AfterGrowth.rewarm
    return LRSchedule(peak=rewarm_peak(stage, grown, parent_lr),
                      warmup_steps=stage.rewarm_steps if rewarm else stage.warmup_steps,
                      total_steps=stage.steps, decay=stage.decay, min_lr_ratio=stage.min_lr_ratio)


def mask_c(step: int, ramp_steps: int, c_start: float = 0.0) -> float:
    """MSG mask value for the update that follows ``step`` completed updates.

    Linear from ``c_start`` (the c stored in the starting checkpoint, 0 right after a
    growth) to 1 over ``ramp_steps`` updates; the first update runs at ``c_start``, so the
    grown model's first loss is the parent's.
    """
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, c_start + step / ramp_steps)


def ramp_unfinished(stage: StageCfg, c_start: float) -> bool:
    """The MSG ramp ends with c < 1 (the stage exports its masks unfolded)."""
    from stages.lr import mask_c

    return mask_c(stage.steps, stage.ramp_steps, c_start) < 1.0
