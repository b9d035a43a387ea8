"""Structured configs of a training stage (registered in Hydra's ConfigStore).

The orchestrator (``stages.train``, the Hydra app) composes these from ``conf/``, checks
them, resolves them to a plain dict and writes ``RUN_DIR/<stage>/stage_config.json``;
each worker rank (``stages.worker``) reads that file back with :func:`load_resolved`.
A typo in an override fails in the orchestrator before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESOLVED_NAME = "stage_config.json"


@dataclass
class GrowthCfg:
    """How the parent's final checkpoint is grown into this stage's start (operators.GrowthSpec)."""

    strategy: str = "zero"  # default for every dimension: exact zero-init growth
    hidden: str | None = None  # per-dimension overrides (None = from strategy)
    ffn: str | None = None
    heads: str | None = None
    depth: str | None = None
    positions: str = "interleave"  # interleave | top | bottom | distance | "i,j,..."
    seed: int = 0
    init_std: float | None = None  # None = the model's μP-scaled init
    noise: float = 0.0  # ± pair noise on cloned/split copies (stays exact)
    optimizer_state: bool = True  # grow Adam moments too, so the stage starts warm


@dataclass
class StageCfg:
    """One stage: which model, from which parent, for how long, at which LR."""

    name: str = "tiny_s1"
    model: str = "tiny-s1"  # a flavor name (growth.config.FLAVORS) or a config.json path
    parent: str | None = None  # name of the stage whose final checkpoint this one grows from
    init_from: str | None = None  # or: start from this checkpoint dir (already grown/imported)
    growth: GrowthCfg = field(default_factory=GrowthCfg)
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    seq_len: int = 128
    lr: float = 3e-3  # peak LR (before μP per-width multipliers)
    min_lr_ratio: float = 0.1  # decay floor as a fraction of the peak
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | constant
    lr_after_growth: str = "restart"  # restart: MSG, full peak again | rewarm: FLM-101B
    rewarm_peak_ratio: float = 0.85  # rewarm: peak = parent's peak × this
    rewarm_steps: int = 10
    ramp_steps: int = 20  # MSG: c goes 0 → 1 over this many optimizer steps, then folds
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    seed: int = 1234
    eval_batches: int = 4  # fixed held-out batches for eval_loss_start / eval_loss_end
    eval_every: int = 0  # 0 = only at start and end
    save_every: int = 50  # DeepSpeed-native checkpoint every N steps (0 = only at end)
    log_every: int = 1


@dataclass
class DeepSpeedCfg:
    """Parallel layout and numerics; see conf/deepspeed/*.yaml."""

    name: str = "zero1"
    zero_stage: int = 1  # 0..3; the pipeline allows 0 or 1 only
    pipeline: bool = False  # PipelineModule from LayerSpecs (+ ZeRO-1)
    pipeline_stages: int = 2
    precision: str = "fp32"  # fp32 | bf16 (fp16 is unsupported on CPU)
    gradient_clipping: float = 1.0
    activation_checkpointing: bool = False


@dataclass
class DataCfg:
    """Where tokens come from; defaults need no download."""

    source: str = "embedded"  # embedded | a file/dir/glob of .txt/.jsonl
    tokenizer: str = "byte"  # byte | path to an HF tokenizers tokenizer.json
    cache_dir: str | None = None  # where the memmapped token file goes (default RUN_DIR/data)
    eval_fraction: float = 0.02
    max_bytes: int = 8_000_000  # cap on the embedded corpus size
    jsonl_field: str = "text"


@dataclass
class ScheduleCfg:
    """A named list of stages run in order by a Hydra multirun sweep over ``stage``."""

    name: str = "none"
    stages: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    stage: StageCfg = field(default_factory=StageCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    data: DataCfg = field(default_factory=DataCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    nproc: int = 2  # worker processes (ranks) launched by torchrun
    run_dir: str = "runs/default"  # every stage writes RUN_DIR/<stage.name>/
    resume: bool = False  # resume a crashed stage from its latest DeepSpeed checkpoint
    dry_run: bool = False  # print plans and memory estimates, train nothing
    master_port: int = 0  # 0 = pick a free port


def load_resolved(path: str | Path) -> dict[str, Any]:
    """The plain dict a worker trains from (written by the orchestrator)."""
    return json.loads(Path(path).read_text())


def to_plain(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
