"""Faults a stage survives: restarted worker groups, partial checkpoints, non-finite losses.

- ``max_restarts=N`` is torchrun's ``--max-restarts``: when a rank dies torchrun stops
  the group and starts it again (``TORCHELASTIC_RESTART_COUNT`` > 0). A restarted rank
  resumes by itself from this stage's newest *sound* DeepSpeed checkpoint, at the same
  data position (batches are a pure function of the step).
- Sound = sealed and intact: after every save, once all ranks passed the barrier,
  rank 0 writes ``TAG/.complete`` with every file's size and SHA-256 (a save killed
  midway has none; ``stages.tag_seal``) and deletes all but the newest
  ``keep_checkpoints`` tags (and any tag newer than this one: a crashed future). Before a
  resume the tag's files must be exactly the sealed ones, each with its sealed digest (a
  file overwritten in place, copied from another tag, deleted or added is caught). An
  unsound newest tag is skipped for the newest sound one, with one warning line.
- The loss of every step is checked on every rank before any checkpoint of that step is
  written: each step keeps a device flag, and at log, eval and save steps one all-reduce
  and one host read check them all (:func:`finite_flags`; no host sync on the other
  steps). The ZeRO and TP engines drop a non-finite step's update on the device (fused
  AdamW's ``found_inf``), so a NaN never reaches the weights; a NaN/inf stops the stage on
  all ranks with a message naming the first such step, and the last good checkpoint stays
  the newest sound one. A
  restarted group finds the stop record (``STAGE_DIR/.nonfinite``) and stops again
  instead of training into the same NaN.
- ``on_nonfinite=skip`` instead drops that step's update on every rank (the ZeRO engine
  sums the loss over the ranks before the optimizer step, ``stages.engines.zero.StageEngine``):
  weights and Adam state stay as they were, the step's batch is consumed, one warning
  names the step, and the summary counts the skipped steps. More than
  ``max_skips_in_a_row`` in a row stop the stage as above (the run diverged).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError
from stages import tag_seal

log = logging.getLogger(__name__)

SEAL_NAME = tag_seal.SEAL_NAME
NONFINITE_NAME = ".nonfinite"
TAG_PREFIX = "step"  # DeepSpeed checkpoint tags: step00000042 (tag_of)


class NonFiniteLossError(FlmError):
    """The training loss became NaN or infinite; the stage stopped."""


class NoSoundCheckpointError(FlmError):
    """ds_ckpt/ holds no checkpoint that can be resumed."""


def restart_count() -> int:
    """How often torchrun restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


# ---------------------------------------------------------------------- checkpoints
def tags(ds_dir: Path) -> list[Path]:
    """The checkpoint tags in ds_dir, oldest first (tags are step{:08d})."""
    if not ds_dir.is_dir():
        return []
    return sorted(p for p in ds_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))


def seal(ds_dir: Path, tag: str, keep: int, files: dict[str, Any] | None = None) -> None:
    """Rank 0, after every rank saved ``tag``: seal it with ``files`` (every rank's share of
    the digests, ``tag_seal.digests``; None: digest them all here) and rotate."""
    tag_seal.write_seal(ds_dir / tag, files)
    import shutil

    sound = [t for t in tags(ds_dir) if t.name <= tag and (t / SEAL_NAME).is_file()]
    stale = [t for t in tags(ds_dir) if t.name > tag]  # written by a run that crashed after it
    for old in [t for t in tags(ds_dir) if t.name < tag and t not in sound[-keep:]] + stale:
        shutil.rmtree(old, ignore_errors=True)


def unsound_reason(tag_dir: Path) -> str | None:
    """None for a sealed checkpoint whose files are as sealed; else why it cannot be resumed."""
    return tag_seal.problem(tag_dir)


def pick_tag(ds_dir: Path, warn: bool, rank: int = 0, world: int = 1,
             agree: Callable[[str | None], str | None] = lambda reason: reason) -> str:
    """The newest sound tag; a one-line warning (if ``warn``) for each newer one skipped.

    With ``world`` ranks each checks its share of the digests and ``agree`` (a collective:
    the first rank's reason that is not None) makes every rank judge a tag alike."""
    skipped = []
    for tag_dir in reversed(tags(ds_dir)):
        reason = agree(tag_seal.problem(tag_dir, rank, world))
        if reason is None:
            if skipped and warn:
                log.warning("%s: the newest checkpoint %s is %s; resuming from %s instead",
                            ds_dir, skipped[0][0], skipped[0][1], tag_dir.name)
            return tag_dir.name
        skipped.append((tag_dir.name, reason))
    detail = f" ({skipped[0][0]} is {skipped[0][1]})" if skipped else ""
    raise NoSoundCheckpointError(f"{ds_dir}: no sound DeepSpeed checkpoint to resume from{detail}; "
                                 f"start the stage over in a new run_dir")


def tag_of(step: int) -> str:
    """The DeepSpeed checkpoint tag of ``step`` (sorts in step order)."""
    return f"{TAG_PREFIX}{step:08d}"


def unseal(ds_dir: Path, tag: str) -> None:
    (ds_dir / tag / SEAL_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------------- non-finite losses
def finite_flags(flags: list[Any]) -> list[bool]:
    """Collective: which of the steps since the last check had a finite loss on EVERY rank.

    ``flags`` are 0-d device tensors (1 = finite) kept since the last check: one all-reduce
    and one host sync for all of them (the trainer calls this at log, eval and save steps)."""
    import torch
    import torch.distributed as dist

    if not flags:
        return []
    stacked = torch.stack([f.float() for f in flags])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.MIN)
    return [v > 0 for v in stacked.tolist()]  # the host sync


def stop_nonfinite(step: int, stage_dir: Path, rank: int, ds_dir: Path, saved_step: int) -> None:
    """Collective: stop the stage on every rank for the non-finite loss of ``step``.

    The checkpoint of the step before (if one was written right after the update that
    produced this loss) holds the weights that gave it, so it is unsealed too.
    """
    if rank == 0 and saved_step == step - 1:
        unseal(ds_dir, tag_of(saved_step))
    good = [t.name for t in tags(ds_dir) if (t / SEAL_NAME).is_file()]  # the resume checks the digests
    keep = f"the last good checkpoint is {ds_dir / good[-1]} (resume=true continues from it)" if good else \
        "no checkpoint was written before it"
    message = (f"non-finite loss at step {step}: the stage stopped; {keep}; lower stage.lr or check the "
               f"data of that step")
    stop(message, step, stage_dir, rank)


def stop(message: str, step: int, stage_dir: Path, rank: int) -> None:
    """Collective: record the stop (a restarted group stops again) and raise on every rank."""
    import torch.distributed as dist

    if rank == 0:
        (stage_dir / NONFINITE_NAME).write_text(json.dumps({"step": step, "message": message}))
    if dist.is_initialized():
        dist.barrier()
    raise NonFiniteLossError(message)


class Skips:
    """``on_nonfinite=skip``: the steps whose update was dropped, and the stop after too many in a row.

    Every rank records the same decision (the engine's all-reduced loss), so all raise together.
    """

    def __init__(self, limit: int, steps: list[int] | None = None):
        self.limit = limit
        self.steps = list(steps or [])  # 1-based step numbers, as in train_log.jsonl
        self.in_a_row = 0

    def record(self, step: int, skipped: bool, stage_dir: Path, rank: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.steps.append(step)
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            first = step - self.in_a_row + 1
            stop(f"non-finite loss at steps {first}..{step}: {self.in_a_row} steps in a row skipped "
                 f"(max_skips_in_a_row={self.limit}), the run diverged and the stage stopped; the checkpoints "
                 f"hold the weights of step {first - 1}; lower stage.lr or check the data", step, stage_dir, rank)
        if rank == 0:
            log.warning("non-finite loss at step %d: its update was skipped (on_nonfinite=skip; %d in a row, "
                        "%d in this stage)", step, self.in_a_row, len(self.steps))


def before_start(stage_dir: str | Path) -> None:
    """Worker start: a restarted group stops again on a recorded non-finite loss; the first
    attempt of a run forgets an older record (resume=true after fixing the cause)."""
    record = Path(stage_dir) / NONFINITE_NAME
    if restart_count() == 0:
        if int(os.environ.get("RANK", "0") or 0) == 0:
            record.unlink(missing_ok=True)
        return
    if record.is_file():
        raise NonFiniteLossError(json.loads(record.read_text())["message"])
