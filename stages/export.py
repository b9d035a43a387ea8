"""A stage's final export: the canonical checkpoint (HF names, fp32) plus its Adam state.

Layout (growth.checkpoint names)::

    final/                       save_checkpoint: shards, index, config.json, growth.json
    final/optimizer/exp_avg/     tensor directory (shards + index, no config.json)
    final/optimizer/exp_avg_sq/
    final/optimizer/state.json   {"step", "betas", "eps", "weight_decay"}

Every rank takes part (the fp32 masters and moments are gathered collectively, one tensor
at a time); rank 0 streams them into a hidden staging directory, which is renamed to
``final/`` only when everything is written, and the other ranks wait on a barrier.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from growth.checkpoint import (
    CONFIG_NAME,
    HISTORY_NAME,
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    save_checkpoint,
)
from growth.config import ModelConfig
from stages import optim_state


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.export"


def export_final(eng: Any, config: ModelConfig, history: dict[str, Any], out: str | Path,
                 optimizer_meta: dict[str, Any]) -> Path:
    """Write ``out`` from the engine ``eng`` (a StageEngine or PipeStageEngine).

    ``optimizer_meta`` holds betas, eps and weight_decay; the step is read from the
    optimizer. A leftover staging directory from a killed export is replaced.
    """
    import torch.distributed as dist

    out = Path(out)
    rank = dist.get_rank()
    tmp = staging_path(out)
    if rank == 0:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out}: a final checkpoint already exists")
        shutil.rmtree(tmp, ignore_errors=True)
    optim_state.create_adam_state(eng.optimizer, 0, only_missing=True)  # a stage of 0 steps
    step = optim_state.adam_step(eng.optimizer)
    targets = [(tmp, None)] + [(tmp / OPTIMIZER_DIR / kind, kind) for kind in MOMENT_KINDS]
    for target, kind in targets:
        stream = eng.gather(kind)
        if rank == 0:
            save_checkpoint(target, config, stream, history if kind is None else None)
            if kind is not None:  # moments are config-less tensor directories
                (target / CONFIG_NAME).unlink()
                (target / HISTORY_NAME).unlink()
        else:
            for _ in stream:
                pass
    if rank == 0:
        state = {"step": step, **optimizer_meta}
        (tmp / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    dist.barrier()
    return out
