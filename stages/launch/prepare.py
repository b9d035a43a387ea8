"""Between plan and ranks: prepare the data, grow the parent into STAGE_DIR/init, write the
snapshot the ranks read and launch them (``train_planned``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from growth.parallel import apply_growth
from stages.data import prepare_stage_data
from stages.launch.local import launch_workers
from stages.launch.plan import (
    StageError,
    StagePlan,
    checked_reader,
    grow_request,
    init_is_current,
    parent_peak_lr,
)
from stages.launch.resume import diff_for_resume
from stages.resolved import ResolvedStage

log = logging.getLogger(__name__)


def prepare_stage(plan: StagePlan) -> ResolvedStage:
    """Data, the starting checkpoint and the resolved config (saved to STAGE_DIR/stage_config.json)."""

    cfg, layout = plan.cfg, plan.layout
    data_dir = Path(cfg.data.cache_dir or plan.run_dir / "data").expanduser().resolve()
    # data (stages.data): a grown stage's stream starts where its parent's summary says it ended
    parent_summary = plan.parent.read_summary() if plan.parent is not None else None
    data = prepare_stage_data(cfg.data, data_dir, parent=parent_summary)
    for split in ("train", "eval"):
        if data["n_tokens"][split] < cfg.stage.seq_len + 1:
            raise StageError(f"data: the {split} split has {data['n_tokens'][split]} tokens, fewer than "
                             f"stage.seq_len + 1; add text or lower data.eval_fraction / stage.seq_len")
    fingerprint = None
    if plan.grow:
        fingerprint = grow_into(plan)
    init = plan.init_checkpoint
    if init is not None:
        with checked_reader(init, "starting checkpoint") as reader:
            model_config = reader.config
    else:
        model_config = plan.target
    parent_summary = plan.parent.read_summary() if plan.parent is not None else None
    effective = dataclasses.replace(cfg, run_dir=str(plan.run_dir), resume=plan.resume)
    resolved = ResolvedStage(
        config=effective, stage_dir=str(layout.root), init_checkpoint=None if init is None else str(init),
        model_config=model_config.to_hf_dict(),
        parent_eval_loss_end=None if parent_summary is None else parent_summary["eval_loss_end"],
        parent_lr=parent_peak_lr(plan), parent_fingerprint=fingerprint, data=data)
    if layout.resolved.is_file() and plan.resume:
        saved = ResolvedStage.load(layout.resolved)
        resolved.resume_changes = saved.resume_changes + diff_for_resume(saved, resolved)
    resolved.save(layout.resolved)
    return resolved


def grow_into(plan: StagePlan) -> str:
    """Grow ``plan.source`` into STAGE_DIR/init with the streaming executor (resumable);
    returns the source's fingerprint.

    A complete init/ from an earlier attempt is reused when it was grown from this very
    source (the fingerprint in its grow event); one grown from another version of the
    source (the parent was retrained since) is grown again. A partial one (killed
    mid-grow) is finished by the executor's own resume. Adam moments come along when the
    source has them and ``stage.growth.optimizer_state`` is true.
    """

    fingerprint, current = init_is_current(plan)
    if current:
        return fingerprint
    spec = plan.spec
    log.info("[%s] growing %s → %s (%s/%s/%s/%s)", plan.name, plan.source, plan.layout.init, spec.hidden,
             spec.ffn, spec.heads, spec.depth)
    apply_growth(grow_request(plan), workers=plan.cfg.stage.growth.workers, progress=True)
    return fingerprint


def train_planned(plan: StagePlan, on_ready: Any = None) -> dict[str, Any]:
    """``on_ready(snapshot)`` is called before the workers start (stages.launch.multinode: tell the other nodes)."""
    start = time.time()
    resolved = prepare_stage(plan)
    cfg = plan.cfg
    how = "resuming from its DeepSpeed checkpoint" if plan.resume else (
        f"from {plan.init_checkpoint}" if plan.init_checkpoint else f"fresh init (seed {cfg.stage.seed})")
    log.info("[%s] %d ranks, %s, %s", plan.name, cfg.nproc, cfg.deepspeed.name, how)
    snapshot = plan.layout.root / f".stage_config.{os.getpid()}.{int(start)}.json"
    resolved.save(snapshot)  # this attempt's workers read this file; nothing rewrites it
    os.chmod(snapshot, 0o444)
    try:
        if on_ready is not None:
            on_ready(snapshot)
        launch_workers(cfg, snapshot, plan.layout)
    finally:
        snapshot.unlink(missing_ok=True)
    summary = plan.layout.read_summary()
    if summary is None:
        raise StageError(f"stage {plan.name}: the workers exited cleanly but wrote no {plan.layout.summary}")
    log.info("[%s] done in %.0f s: eval loss %s → %s", plan.name, time.time() - start,
             summary["eval_loss_start"], summary["eval_loss_end"])
    return summary
