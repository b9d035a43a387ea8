"""Typed configs of a training stage (registered in Hydra's ConfigStore), and their one check.

The orchestrator (``stages.train``, the Hydra app) composes these from ``conf/``, turns the
result into the dataclasses with :func:`to_config` (``OmegaConf.to_object``), checks them
with :func:`validate` (every range and cross-field rule, once) and writes a
:class:`ResolvedStage` to ``RUN_DIR/<stage>/stage_config.json``; each worker rank reads it
back with :meth:`ResolvedStage.load` into the same dataclasses. A typo in an override
fails in the orchestrator before any worker starts: ``conf/train.yaml`` extends the
``train_schema`` node stored by :func:`register_configs`, and a key added with ``+`` (which
bypasses the schema) is refused by :func:`to_config`.

Two different ways to (re)start, named differently (torchtitan's initial_load_path vs
resume): ``stage.parent`` / ``stage.init_from`` say where a *new* stage's weights come
from; ``resume=true`` continues a *crashed* stage from its own DeepSpeed checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError
from growth.runs import STAGE_CONFIG_NAME as RESOLVED_NAME  # noqa: F401  (the file's one name: StageDir)
from stages.data.stage import DataCfg  # the data group's schema lives with the data code

log = logging.getLogger(__name__)

SCHEMA_NAME = "train_schema"
RESOLVED_FORMAT_VERSION = 1
MAX_PORT = 65535


class StageConfigError(FlmError, ValueError):
    """A stage config value is out of range or inconsistent; the message names the field."""


class Choice(str, Enum):
    """A string-valued option; prints and formats as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Decay(Choice):
    """LR decay after the warmup (stages.lr)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class AfterGrowth(Choice):
    """LR schedule of a grown stage: ``restart`` its own peak and warmup (MSG), or
    ``rewarm`` to the parent's peak × rewarm_peak_ratio over rewarm_steps (FLM-101B)."""

    restart = "restart"
    rewarm = "rewarm"


class NonFinite(Choice):
    """What a NaN/inf training loss does (stages.elastic): ``stop`` the stage naming the step,
    or ``skip`` that step's update (weights and Adam state as before it) and go on."""

    stop = "stop"
    skip = "skip"


class Precision(Choice):
    """Training numerics; fp16 is unsupported (no loss scaling, and none on CPU)."""

    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class GrowthCfg:
    """How the parent's final checkpoint is grown into this stage's start (operators.GrowthSpec)."""

    strategy: str = "zero"  # default for every dimension: exact zero-init growth
    hidden: str | None = None  # per-dimension overrides (None = from strategy)
    ffn: str | None = None
    heads: str | None = None
    depth: str | None = None
    positions: str = "interleave"  # where new layers go: interleave | top | bottom | distance | "i,j,..."
    seed: int = 0  # seeds the fresh parts (masked/random strategies) and pair noise
    init_std: float | None = None  # None = the model's μP-scaled init
    noise: float = 0.0  # ± pair noise on cloned/split copies (stays exact)
    optimizer_state: bool = True  # grow Adam moments too, so the stage starts warm
    workers: int = 1  # processes that write the grown shards on one node (a multi-node stage: all ranks)


@dataclass
class StageCfg:
    """One stage: which model, from which parent, for how long, at which LR."""

    name: str = "tiny_s1"  # the stage's directory under run_dir, and the parent name children use
    model: str = "tiny-s1"  # a flavor name (growth.config.FLAVORS) or a config.json path
    parent: str | None = None  # name of the stage whose final checkpoint this one grows from
    init_from: str | None = None  # or: start from this checkpoint dir (already grown/imported)
    growth: GrowthCfg = field(default_factory=GrowthCfg)
    steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    seq_len: int = 128  # tokens per sequence; ≤ the model's max_position_embeddings
    lr: float = 3e-3  # peak LR (before μP per-width multipliers)
    min_lr_ratio: float = 0.1  # decay floor as a fraction of the peak
    warmup_steps: int = 10  # linear warmup from peak/warmup_steps to the peak
    decay: Decay = Decay.cosine
    lr_after_growth: AfterGrowth = AfterGrowth.restart  # only for a stage started from a parent/init_from
    rewarm_peak_ratio: float = 0.85  # rewarm: peak = parent's peak × this (FLM-101B: 0.85)
    rewarm_steps: int = 10  # rewarm: warmup length after growth (replaces warmup_steps)
    ramp_steps: int = 20  # MSG: c goes from the start's c to 1 over this many optimizer steps, then folds
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices; norm gains never decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (β1, β2)
    eps: float = 1e-8  # AdamW epsilon
    seed: int = 1234  # seeds a fresh init's weights AND the training data order
    eval_batches: int = 4  # fixed held-out batches for eval_loss_start / eval_loss_end
    eval_every: int = 0  # 0 = only at start and end
    save_every: int = 50  # DeepSpeed-native checkpoint every N steps (0 = only at end)
    log_every: int = 1  # train_log.jsonl / TensorBoard every N steps (the loss is synced to the host then)


@dataclass
class DeepSpeedCfg:
    """Parallel layout and numerics; see conf/deepspeed/*.yaml."""

    name: str = "zero1"  # the conf/deepspeed option it came from (reported, not interpreted)
    zero_stage: int = 1  # 0..3; the pipeline allows 0 or 1 only
    pipeline: bool = False  # PipelineModule from LayerSpecs (+ ZeRO-1)
    pipeline_stages: int = 2  # pipeline degree; divides nproc × nnodes
    precision: Precision = Precision.fp32
    gradient_clipping: float = 1.0  # global gradient-norm clip (0 = off)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    # --- tensor parallelism (issue 13; stages.tensor_parallel, stages.dry_run) ---
    tensor_parallel: int = 1  # Megatron-style TP degree; data parallel = ranks / (TP × pipeline)
    sequence_parallel: bool = False  # with TP > 1: norms/residuals split along the sequence (seq_len % TP == 0)


@dataclass
class ScheduleCfg:
    """A named list of stages run in order by a Hydra multirun sweep over ``stage``."""

    name: str = "none"  # the conf/schedule option
    stages: list[str] = field(default_factory=list)  # stage names, parents first


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
    nnodes: int = 1  # nodes of nproc ranks each; > 1: one train-stage per node (stages.multinode)
    worker_module: str = "stages.worker"  # what torchrun runs per rank (tests swap in their own)
    gpu_memory_gib: float = 80.0  # per-GPU memory the dry run checks the layout against (A800/H100 80 GB)
    # scale-out settings (stages.multinode, stages.elastic, stages.launchers; docs/scale_out.md)
    node_rank: int = 0  # this node's rank when nnodes > 1 (node 0 coordinates)
    master_addr: str = "127.0.0.1"  # node 0's address (the coordinator and the rendezvous)
    local_addr: str | None = None  # this node's address for the rendezvous (None = its hostname)
    rdzv_timeout: int = 900  # seconds the nodes wait for each other (config check, rendezvous)
    collective_timeout: int = 1800  # seconds a collective may hang before the ranks fail
    max_restarts: int = 0  # torchrun restarts of the worker group; each resumes from ds_ckpt/
    keep_checkpoints: int = 2  # DeepSpeed checkpoints kept in ds_ckpt/ (older ones are deleted)
    launcher: str = "local"  # local (start the ranks) | slurm (write launch.sbatch) | print (commands)
    # stop: a diverged run should not train on; skip: a rare bad batch costs one step, not the stage
    on_nonfinite: NonFinite = NonFinite.stop
    max_skips_in_a_row: int = 10  # on_nonfinite=skip: more skipped steps in a row stop the stage (it diverged)

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes


def register_configs() -> None:
    """Store the schema that ``conf/train.yaml`` extends (its first defaults entry)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


# ---------------------------------------------------------------------- typed from Hydra
def to_config(cfg: Any) -> TrainConfig:
    """A composed DictConfig (or a TrainConfig) → TrainConfig; unknown keys are refused.

    Note: ``+stage.stepz=5`` adds a key the schema lacks (Hydra opens the node for ``+``)
    and ``OmegaConf.to_object`` would drop it silently; it is refused here instead.
    """
    if isinstance(cfg, TrainConfig):
        return cfg
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    unknown = _unknown_keys(cfg, TrainConfig, "")
    if unknown:
        raise StageConfigError(f"unknown config key '{unknown[0]}' (not in the stage schema, "
                               f"stages/config.py); check its spelling")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise StageConfigError(f"config: {str(err).splitlines()[0]}") from None


def _unknown_keys(node: Any, schema: type, prefix: str) -> list[str]:
    names = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in names:
            out.append(path)
            continue
        sub_type = _FIELD_TYPES.get((schema.__name__, key))
        if sub_type is not None and node[key] is not None:
            out += _unknown_keys(node[key], sub_type, path + ".")
    return out


# Nested dataclass fields (annotations are strings under `from __future__ import annotations`).
_FIELD_TYPES = {("TrainConfig", "stage"): StageCfg, ("TrainConfig", "deepspeed"): DeepSpeedCfg,
                ("TrainConfig", "data"): DataCfg, ("TrainConfig", "schedule"): ScheduleCfg,
                ("StageCfg", "growth"): GrowthCfg}


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from its plain-dict form (``to_plain``), typed and checked like Hydra's."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        node = OmegaConf.merge(OmegaConf.structured(TrainConfig), data)
    except OmegaConfBaseException as err:
        raise StageConfigError(f"config: {str(err).splitlines()[0]}") from None
    return to_config(node)


def to_plain(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a TrainConfig (or a composed DictConfig): enums as their values."""
    typed = to_config(cfg)
    return json.loads(json.dumps(dataclasses.asdict(typed), default=_enum_value))


def _enum_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------- the one check
def validate(cfg: TrainConfig) -> TrainConfig:
    """Every range and cross-field rule of a stage config, once; returns ``cfg``.

    Raises :class:`StageConfigError` naming the first bad field. Files, checkpoints and
    growth shapes are checked by the orchestrator afterwards (they need the disk).
    """
    stage, ds = cfg.stage, cfg.deepspeed
    from stages.script_text import check_config_text

    check_config_text(cfg)  # names and paths reach scripts: no control characters
    for name, value in {"stage.lr": stage.lr, "stage.eps": stage.eps, "stage.weight_decay": stage.weight_decay,
                        "stage.min_lr_ratio": stage.min_lr_ratio, "stage.rewarm_peak_ratio": stage.rewarm_peak_ratio,
                        "deepspeed.gradient_clipping": ds.gradient_clipping,
                        "stage.growth.noise": stage.growth.noise, "data.eval_fraction": cfg.data.eval_fraction,
                        **{f"stage.betas[{i}]": b for i, b in enumerate(stage.betas)}}.items():
        if not math.isfinite(value):
            raise StageConfigError(f"field '{name}' must be a finite number, got {value}")
    positive = {"stage.steps": stage.steps, "stage.micro_batch_size": stage.micro_batch_size,
                "stage.grad_accum": stage.grad_accum, "stage.seq_len": stage.seq_len,
                "stage.lr": stage.lr, "stage.eval_batches": stage.eval_batches,
                "nproc": cfg.nproc, "nnodes": cfg.nnodes, "stage.eps": stage.eps}
    for name, value in positive.items():
        if value <= 0:
            raise StageConfigError(f"field '{name}' must be positive, got {value}")
    non_negative = {"stage.warmup_steps": stage.warmup_steps, "stage.rewarm_steps": stage.rewarm_steps,
                    "stage.ramp_steps": stage.ramp_steps, "stage.weight_decay": stage.weight_decay,
                    "stage.eval_every": stage.eval_every, "stage.save_every": stage.save_every,
                    "stage.log_every": stage.log_every, "stage.seed": stage.seed,
                    "deepspeed.gradient_clipping": ds.gradient_clipping, "master_port": cfg.master_port}
    for name, value in non_negative.items():
        if value < 0:
            raise StageConfigError(f"field '{name}' must be >= 0, got {value}")
    if cfg.master_port > MAX_PORT:
        raise StageConfigError(f"field 'master_port' must be a TCP port (1..{MAX_PORT}, or 0 for a free one), "
                               f"got {cfg.master_port}")
    if not 0.0 <= stage.min_lr_ratio <= 1.0:
        raise StageConfigError(f"field 'stage.min_lr_ratio' must be in [0, 1], got {stage.min_lr_ratio}")
    check_rewarm(stage)
    if len(stage.betas) != 2 or not all(0.0 <= b < 1.0 for b in stage.betas):
        raise StageConfigError(f"field 'stage.betas' must be two numbers in [0, 1), got {list(stage.betas)}")
    if stage.parent is not None and stage.init_from is not None:
        raise StageConfigError("fields 'stage.parent' and 'stage.init_from' are both set; a stage "
                               "starts from one of them (or neither, for a fresh init)")
    if stage.parent == stage.name:
        raise StageConfigError(f"field 'stage.parent' names the stage itself ({stage.name!r})")
    check_growth_fields(stage.growth)  # also on a stage with no parent: a typo is never silent
    check_deepspeed(ds, cfg.world)
    # --- tensor parallelism (issue 13): TP × PP × DP = ranks; model shapes: stages.tensor_parallel ---
    from stages.tensor_parallel.layout import check_layout_fields

    check_layout_fields(dataclasses.asdict(cfg))
    from stages.multinode import check_scale

    check_scale(cfg)
    return cfg


def check_growth_fields(growth: GrowthCfg) -> None:
    from operators import GrowthError

    try:
        growth_spec(growth).validate()
    except GrowthError as err:
        raise StageConfigError(f"stage.growth: {str(err).splitlines()[0]}") from None


def check_rewarm(stage: StageCfg) -> None:
    if not 0.0 < stage.rewarm_peak_ratio <= 1.0:
        raise StageConfigError(f"field 'stage.rewarm_peak_ratio' must be in (0, 1], got {stage.rewarm_peak_ratio}")


def check_deepspeed(ds: DeepSpeedCfg, world: int | None) -> None:
    """The layout rules (also what ``stages.engine.ds_config`` relies on); ``world`` = ranks."""
    try:
        Precision(ds.precision)
    except ValueError:
        raise StageConfigError(f"field 'deepspeed.precision' must be one of "
                               f"{', '.join(p.value for p in Precision)} (fp16 is unsupported), "
                               f"got {ds.precision!r}") from None
    if not 0 <= ds.zero_stage <= 3:
        raise StageConfigError(f"field 'deepspeed.zero_stage' must be 0..3, got {ds.zero_stage}")
    if not ds.pipeline:
        return
    if ds.zero_stage > 1:
        raise StageConfigError(f"field 'deepspeed.zero_stage' is {ds.zero_stage} with deepspeed.pipeline=true; "
                               f"DeepSpeed's pipeline allows ZeRO 0 or 1 only (ZeRO-2 and ZeRO-3 are "
                               f"incompatible with pipeline parallelism)")
    if ds.pipeline_stages < 1 or (world is not None and world % ds.pipeline_stages):
        raise StageConfigError(f"field 'deepspeed.pipeline_stages' ({ds.pipeline_stages}) must divide the "
                               f"number of ranks, nproc × nnodes = {world}")


def ramp_unfinished(stage: StageCfg, c_start: float) -> bool:
    """The MSG ramp ends with c < 1 (the stage exports its masks unfolded)."""
    from stages.lr import mask_c

    return mask_c(stage.steps, stage.ramp_steps, c_start) < 1.0


# ---------------------------------------------------------------------- shared with the dry run
def growth_spec(growth: GrowthCfg | dict[str, Any]):
    """``stage.growth`` (typed, or its plain-dict form) → operators.GrowthSpec; GrowthError
    names a bad field."""
    from operators import GrowthSpec

    if isinstance(growth, dict):
        growth = GrowthCfg(**growth)
    return GrowthSpec.from_strategy(
        growth.strategy, hidden=growth.hidden, ffn=growth.ffn, heads=growth.heads, depth=growth.depth,
        positions=growth.positions, seed=growth.seed, init_std=growth.init_std, noise=growth.noise)


def compose_stage(name: str) -> TrainConfig:
    """The TrainConfig of stage ``name`` (Hydra compose, inside the app or a test)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        raise StageConfigError(f"cannot compose stage {name!r} outside a Hydra app")
    return to_config(compose(config_name="train", overrides=[f"stage={name}"]))


# ---------------------------------------------------------------------- what the workers read
@dataclass
class ResolvedStage:
    """``stage_config.json``: the checked TrainConfig plus what the orchestrator resolved.

    On disk the TrainConfig's fields sit at the top level (``stage``, ``deepspeed``, …;
    its ``data`` section as ``data_config``) next to the resolved ones below and
    ``format_version``; ``data`` is what the corpus preparation returned.
    """

    config: TrainConfig
    stage_dir: str  # absolute RUN_DIR/<stage.name>
    init_checkpoint: str | None = None  # canonical checkpoint to start from; None = fresh init with stage.seed
    model_config: dict[str, Any] = field(default_factory=dict)  # HF dict of the stage's model
    parent_eval_loss_end: float | None = None  # the parent's summary, for the exactness check
    parent_lr: float | None = None  # the parent's peak LR (lr_after_growth: rewarm)
    parent_fingerprint: str | None = None  # content fingerprint of the checkpoint init/ was grown from
    data: dict[str, Any] = field(default_factory=dict)  # what stages.data.prepare_stage_data returned
    resume_changes: list[str] = field(default_factory=list)  # "field: old → new" accepted by resume=true

    RESOLVED_KEYS = ("stage_dir", "init_checkpoint", "model_config", "parent_eval_loss_end", "parent_lr",
                     "parent_fingerprint", "data", "resume_changes")

    def to_dict(self) -> dict[str, Any]:
        out = to_plain(self.config)
        out["data_config"] = out.pop("data")
        out.update({k: getattr(self, k) for k in self.RESOLVED_KEYS})
        out["format_version"] = RESOLVED_FORMAT_VERSION
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage_config.json") -> ResolvedStage:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != RESOLVED_FORMAT_VERSION:
            raise StageConfigError(f"{source}: format_version {version!r}, this trainer reads "
                                   f"{RESOLVED_FORMAT_VERSION}; rerun train-stage to rewrite it")
        extra = {k: data.pop(k) for k in cls.RESOLVED_KEYS if k in data}
        if "stage_dir" not in extra:
            raise StageConfigError(f"{source}: no 'stage_dir'")
        if "data_config" in data:
            data["data"] = data.pop("data_config")
        return cls(config=validate(from_dict(data)), **extra)

    @classmethod
    def load(cls, path: str | Path) -> ResolvedStage:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageConfigError(f"{path}: cannot read the stage config ({err})") from None
        return cls.from_dict(data, str(path))
