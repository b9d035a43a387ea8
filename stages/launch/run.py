"""One stage, orchestrated: check everything, prepare data and weights, launch the ranks
(stages.launch.plan → stages.launch.prepare → stages.launch.local).

:func:`run_stage` is what the Hydra app calls once per job (one stage of a schedule)::

    to_config, validate      typed TrainConfig, every rule (stages.schema)
    plan_stage               every check that needs files, before anything is written:
                             stage dir state, parent/init checkpoint, growth shapes,
                             tokenizer vs vocab, worker module — a StageError otherwise
    StageLock                the stage dir is ours for the whole attempt (stages.launch.lock)
    prepare_stage            the tokenized corpus (cached), the parent's final grown into
                             STAGE_DIR/init (growth.executor, streaming), the ResolvedStage
                             (STAGE_DIR/stage_config.json; on resume diffed against the saved one)
    launch_workers           torchrun --nproc_per_node N -m stages.rank.worker SNAPSHOT, output
                             streamed to the terminal and STAGE_DIR/train.log
    summary.json             written by the workers; returned

Note: Hydra stays in this one process: the workers get a JSON snapshot, never Hydra
arguments, so ``--local_rank`` and per-rank ``${now}`` cannot bite. The snapshot each
attempt's workers read is a file of its own that nothing rewrites.
"""

from __future__ import annotations

import logging
from typing import Any

from stages.launch.dry_run import dry_run_stage
from stages.launch.lock import StageLock
from stages.launch.plan import plan_stage
from stages.launch.prepare import train_planned
from stages.launch.slurm import run_elsewhere
from stages.schema import Launcher, to_config
from stages.validate import validate

log = logging.getLogger(__name__)


def run_stage(cfg: Any) -> dict[str, Any]:
    """Check, prepare, train one stage; returns its summary (or dry-run report)."""
    typed = validate(to_config(cfg))
    if typed.dry_run:
        return dry_run_stage(typed)
    if typed.launcher != Launcher.local or typed.nnodes > 1:  # stages.launch.slurm, stages.launch.multinode
        return run_elsewhere(typed)
    plan = plan_stage(typed)
    if plan.finished:
        log.info("[%s] already finished in %s; skipped (resume=true)", plan.name, plan.stage_dir)
        return plan.layout.read_summary() or {}
    with StageLock(plan.layout.lock):
        return train_planned(plan)
