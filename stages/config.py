"""Structured configs of a training stage (registered in Hydra's ConfigStore).

The orchestrator (``stages.train``, the Hydra app) composes these from ``conf/``, checks
them, resolves them to a plain dict and writes ``RUN_DIR/<stage>/stage_config.json``;
each worker rank (``stages.worker``) reads that file back with :func:`load_resolved`.
A typo in an override fails in the orchestrator before any worker starts: ``conf/train.yaml``
extends the ``train_schema`` node stored by :func:`register_configs`, so every group file
and override merges into these typed dataclasses.

Besides the resolved :class:`TrainConfig`, ``stage_config.json`` holds the keys the
orchestrator adds (``RESOLVED_KEYS``): ``stage_dir``, ``init_checkpoint`` (a canonical
checkpoint dir to start from, or null for a fresh init of ``model_config`` with
``stage.seed``), ``model_config`` (HF dict of the stage's model), ``parent_eval_loss_end``,
``parent_lr`` (the parent's peak LR, for ``lr_after_growth: rewarm``) and ``data`` (what
``stages.data.prepare_corpus`` returned).

Two different ways to (re)start, named differently (torchtitan's initial_load_path vs
resume): ``stage.parent`` / ``stage.init_from`` say where a *new* stage's weights come
from; ``resume=true`` continues a *crashed* stage from its own DeepSpeed checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError

RESOLVED_NAME = "stage_config.json"
SCHEMA_NAME = "train_schema"
RESOLVED_KEYS = ("stage_dir", "init_checkpoint", "model_config", "parent_eval_loss_end",
                 "parent_lr", "data")
DECAYS = ("cosine", "linear", "constant")
LR_AFTER_GROWTH = ("restart", "rewarm")
PRECISIONS = ("fp32", "bf16")


class StageConfigError(FlmError, ValueError):
    """A stage config value is out of range or inconsistent; the message names the field."""


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
    seed: int = 0  # picks the held-out documents; one value for all stages of a schedule
    eos_token: str | None = None  # HF tokenizer only: None = found by name (</s>, <|endoftext|>, …)
    bos_token: str | None = None


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
    nnodes: int = 1  # nodes of nproc GPUs each: sizes the dry run's memory estimates
    worker_module: str = "stages.worker"  # what torchrun runs per rank (tests swap in a fake)


def register_configs() -> None:
    """Store the schema that ``conf/train.yaml`` extends (its first defaults entry)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def check_config(cfg: dict[str, Any]) -> None:
    """Ranges and cross-field rules the types cannot say (a resolved TrainConfig dict).

    Raises :class:`StageConfigError` naming the first bad field. Files, checkpoints and
    growth shapes are checked by the orchestrator afterwards.
    """
    stage, ds = cfg["stage"], cfg["deepspeed"]
    positive = {"stage.steps": stage["steps"], "stage.micro_batch_size": stage["micro_batch_size"],
                "stage.grad_accum": stage["grad_accum"], "stage.seq_len": stage["seq_len"],
                "stage.lr": stage["lr"], "stage.eval_batches": stage["eval_batches"],
                "nproc": cfg["nproc"], "nnodes": cfg["nnodes"], "stage.eps": stage["eps"]}
    for name, value in positive.items():
        if value <= 0:
            raise StageConfigError(f"field '{name}' must be positive, got {value}")
    non_negative = {"stage.warmup_steps": stage["warmup_steps"], "stage.rewarm_steps": stage["rewarm_steps"],
                    "stage.ramp_steps": stage["ramp_steps"], "stage.weight_decay": stage["weight_decay"],
                    "stage.eval_every": stage["eval_every"], "stage.save_every": stage["save_every"],
                    "stage.log_every": stage["log_every"], "stage.seed": stage["seed"],
                    "deepspeed.gradient_clipping": ds["gradient_clipping"],
                    "master_port": cfg["master_port"]}
    for name, value in non_negative.items():
        if value < 0:
            raise StageConfigError(f"field '{name}' must be >= 0, got {value}")
    for name, value, allowed in (("stage.decay", stage["decay"], DECAYS),
                                 ("stage.lr_after_growth", stage["lr_after_growth"], LR_AFTER_GROWTH),
                                 ("deepspeed.precision", ds["precision"], PRECISIONS)):
        if value not in allowed:
            raise StageConfigError(f"field '{name}' must be one of {', '.join(allowed)}, got {value!r}")
    if not 0.0 <= stage["min_lr_ratio"] <= 1.0:
        raise StageConfigError(f"field 'stage.min_lr_ratio' must be in [0, 1], got {stage['min_lr_ratio']}")
    if not 0.0 < stage["rewarm_peak_ratio"] <= 1.0:
        raise StageConfigError(f"field 'stage.rewarm_peak_ratio' must be in (0, 1], "
                               f"got {stage['rewarm_peak_ratio']}")
    if not all(0.0 <= b < 1.0 for b in stage["betas"]) or len(stage["betas"]) != 2:
        raise StageConfigError(f"field 'stage.betas' must be two numbers in [0, 1), got {stage['betas']}")
    if stage["parent"] is not None and stage["init_from"] is not None:
        raise StageConfigError("fields 'stage.parent' and 'stage.init_from' are both set; a stage "
                               "starts from one of them (or neither, for a fresh init)")
    if stage["parent"] == stage["name"]:
        raise StageConfigError(f"field 'stage.parent' names the stage itself ({stage['name']!r})")
    if not 0 <= ds["zero_stage"] <= 3:
        raise StageConfigError(f"field 'deepspeed.zero_stage' must be 0..3, got {ds['zero_stage']}")
    if ds["pipeline"]:
        if ds["zero_stage"] > 1:
            raise StageConfigError(f"field 'deepspeed.zero_stage' is {ds['zero_stage']} with "
                                   f"deepspeed.pipeline=true; DeepSpeed's pipeline allows ZeRO 0 or 1 only")
        world = cfg["nproc"] * cfg["nnodes"]
        if ds["pipeline_stages"] < 1 or world % ds["pipeline_stages"]:
            raise StageConfigError(f"field 'deepspeed.pipeline_stages' ({ds['pipeline_stages']}) must "
                                   f"divide the number of ranks, nproc × nnodes = {world}")


def load_resolved(path: str | Path) -> dict[str, Any]:
    """The plain dict a worker trains from (written by the orchestrator)."""
    return json.loads(Path(path).read_text())


def to_plain(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
