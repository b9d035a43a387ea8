"""A stage's final export: the canonical checkpoint (HF names, fp32) plus its Adam state.

Layout (growth.checkpoint names)::

    final/                       shards, index, config.json, growth.json
    final/optimizer/exp_avg/     tensor directory (shards + index, no config.json)
    final/optimizer/exp_avg_sq/
    final/optimizer/state.json   {"step", "betas", "eps", "weight_decay"}
    final/tokenizer.model, …     the release files of the stage's init checkpoint, carried

Every rank takes part (the fp32 masters and moments are gathered collectively, one tensor
at a time); rank 0 streams them through :class:`growth.checkpoint.CheckpointWriter`
(locked staging dir, header-first shards with digests, renamed to ``final/`` only when
everything is written), and the other ranks wait on a barrier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import MOMENT_KINDS, OPTIMIZER_DIR, CheckpointReader, CheckpointWriter
from growth.config import ModelConfig
from stages.engines import optim_state


def export_final(eng: Any, config: ModelConfig, history: dict[str, Any], out: str | Path,
                 optimizer_meta: dict[str, Any], source: str | Path | None = None) -> Path:
    """Write ``out`` from the engine ``eng`` (a StageEngine or PipeStageEngine).

    ``optimizer_meta`` holds betas, eps and weight_decay; the step is read from the
    optimizer. ``source`` (the stage's init checkpoint, if any) gives config.json's other
    fields and the release files carried along. A leftover staging directory from a
    killed export is replaced.
    """
    import torch.distributed as dist

    out = Path(out)
    rank = dist.get_rank()
    writer = CheckpointWriter(out) if rank == 0 else None
    try:
        optim_state.create_adam_state(eng.optimizer, 0, only_missing=True)  # a stage of 0 steps
        step = optim_state.adam_step(eng.optimizer)
        for kind in (None, *MOMENT_KINDS):
            stream = eng.gather(kind)
            if writer is not None:
                root = "" if kind is None else f"{OPTIMIZER_DIR}/{kind}/"
                writer.write_tensors(config, stream, root=root, dtype=torch.float32)
            else:
                for _ in stream:
                    pass
        if writer is not None:
            writer.write_optimizer_state({"step": step, **optimizer_meta})
            raw = None
            if source is not None:
                with CheckpointReader(source, check_shapes=False) as reader:
                    raw = reader.raw_config
            writer.write_config(config, raw=raw)
            carried = writer.carry(source)
            if carried:
                history = {**history, "events": [*history["events"][:-1],
                                                 {**history["events"][-1], "carried": carried}]} \
                    if history.get("events") else history
            writer.write_history(history)
            writer.publish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    dist.barrier()
    return out
