"""Typed configs of a training stage (registered in Hydra's ConfigStore).

The orchestrator (``stages.train``, the Hydra app) composes these from ``conf/``, turns the
result into the dataclasses with :func:`to_config` (``OmegaConf.to_object``), checks them
with ``stages.validate.validate`` (every range and cross-field rule, once) and writes a
``stages.resolved.ResolvedStage`` to ``RUN_DIR/<stage>/stage_config.json``; each worker rank
reads it back into the same dataclasses. A typo in an override
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
from dataclasses import dataclass, field
from enum import Enum
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


# ---------------------------------------------------------------------- what a field is, declared with it
MAY_CHANGE = "may_change"  # resume=true may change it (recorded in stage_config.json's resume_changes)
MUST_MATCH = "must_match"  # resume=true refuses a change (model, layout, world size, batch shape, seed, data)
NOT_COMPARED = "not_compared"  # follows from the attempt (resume, dry_run): never compared


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, resume: str = MUST_MATCH,
            per_node: bool = False, launcher_sets: bool = False) -> Any:
    """A config field with what it is declared next to it: whether a ``resume`` may change it,
    whether it may differ between the nodes of a stage (``per_node``: every other field must
    match, stages.launch.multinode), whether a launcher writes it into each node's command
    (``launcher_sets``, stages.launch.slurm). Plain fields are MUST_MATCH, shared, user-set."""
    return field(default=default, default_factory=factory,
                 metadata={"resume": resume, "per_node": per_node, "launcher_sets": launcher_sets})


def fields_where(key: str, value: Any, schema: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the TrainConfig fields whose ``setting`` metadata has ``key == value``
    (nested sections included; a field of the data section declares it with the same keys)."""
    out: list[str] = []
    for f in dataclasses.fields(schema or TrainConfig):
        sub = _FIELD_TYPES.get(((schema or TrainConfig).__name__, f.name))
        if sub is not None:
            out += fields_where(key, value, sub, f"{prefix}{f.name}.")
        elif f.metadata.get(key, MUST_MATCH if key == "resume" else False) == value:
            out.append(prefix + f.name)
    return tuple(out)


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
    """What a NaN/inf training loss does (stages.rank.elastic): ``stop`` the stage naming the step,
    or ``skip`` that step's update (weights and Adam state as before it) and go on."""

    stop = "stop"
    skip = "skip"


class Launcher(Choice):
    """Where the ranks start (stages.launch): ``local`` starts them here (one node, or this node
    of several), ``slurm`` writes launch.sbatch, ``print`` prints the per-node commands."""

    local = "local"
    slurm = "slurm"
    print = "print"


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
    # processes that write the grown shards on one node (a multi-node stage: all ranks)
    workers: int = setting(1, resume=MAY_CHANGE)


@dataclass
class StageCfg:
    """One stage: which model, from which parent, for how long, at which LR."""

    name: str = "tiny_s1"  # the stage's directory under run_dir, and the parent name children use
    model: str = "tiny-s1"  # a flavor name (growth.config.FLAVORS) or a config.json path
    parent: str | None = None  # name of the stage whose final checkpoint this one grows from
    init_from: str | None = None  # or: start from this checkpoint dir (already grown/imported)
    growth: GrowthCfg = field(default_factory=GrowthCfg)
    steps: int = setting(100, resume=MAY_CHANGE)  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    seq_len: int = 128  # tokens per sequence; ≤ the model's max_position_embeddings
    lr: float = setting(3e-3, resume=MAY_CHANGE)  # peak LR (before μP per-width multipliers)
    min_lr_ratio: float = setting(0.1, resume=MAY_CHANGE)  # decay floor as a fraction of the peak
    warmup_steps: int = setting(10, resume=MAY_CHANGE)  # linear warmup from peak/warmup_steps to the peak
    decay: Decay = setting(Decay.cosine, resume=MAY_CHANGE)
    lr_after_growth: AfterGrowth = AfterGrowth.restart  # only for a stage started from a parent/init_from
    rewarm_peak_ratio: float = setting(0.85, resume=MAY_CHANGE)  # rewarm: peak = parent's peak × this (FLM-101B: 0.85)
    rewarm_steps: int = setting(10, resume=MAY_CHANGE)  # rewarm: warmup length after growth (replaces warmup_steps)
    ramp_steps: int = 20  # MSG: c goes from the start's c to 1 over this many optimizer steps, then folds
    weight_decay: float = setting(0.1, resume=MAY_CHANGE)  # AdamW decoupled decay on matrices; norm gains never decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (β1, β2)
    eps: float = 1e-8  # AdamW epsilon
    seed: int = 1234  # seeds a fresh init's weights AND the training data order
    eval_batches: int = 4  # fixed held-out batches for eval_loss_start / eval_loss_end
    eval_every: int = setting(0, resume=MAY_CHANGE)  # 0 = only at start and end
    save_every: int = setting(50, resume=MAY_CHANGE)  # DeepSpeed-native checkpoint every N steps (0 = only at end)
    # train_log.jsonl / TensorBoard every N steps (the loss is synced to the host then)
    log_every: int = setting(1, resume=MAY_CHANGE)


@dataclass
class DeepSpeedCfg:
    """Parallel layout and numerics; see conf/deepspeed/*.yaml."""

    # the conf/deepspeed option it came from (reported, not interpreted)
    name: str = setting("zero1", resume=MAY_CHANGE)
    zero_stage: int = 1  # 0..3; the pipeline allows 0 or 1 only
    pipeline: bool = False  # PipelineModule from LayerSpecs (+ ZeRO-1)
    pipeline_stages: int = 2  # pipeline degree; divides nproc × nnodes
    precision: Precision = Precision.fp32
    gradient_clipping: float = setting(1.0, resume=MAY_CHANGE)  # global gradient-norm clip (0 = off)
    activation_checkpointing: bool = False  # recompute decoder layers in the backward pass
    # with activation_checkpointing: recompute every k-th decoder layer (1 = all; 2 = half the
    # recompute for the activations of the other half kept)
    checkpoint_every: int = 1
    # torch.compile each decoder layer (torchtitan's per-block compile): auto = on for CUDA,
    # off for CPU (inductor's compile time outweighs a CPU stage's gain); true | false
    compile: str = setting("auto", resume=MAY_CHANGE)
    # --- tensor parallelism (stages.engines.tensor_parallel; the dry run: stages.launch.dry_run) ---
    tensor_parallel: int = 1  # Megatron-style TP degree; data parallel = ranks / (TP × pipeline)
    sequence_parallel: bool = False  # with TP > 1: norms/residuals split along the sequence (seq_len % TP == 0)


@dataclass
class ScheduleCfg:
    """A named list of stages run in order by a Hydra multirun sweep over ``stage``."""

    name: str = setting("none", resume=MAY_CHANGE)  # the conf/schedule option
    stages: list[str] = setting(factory=list, resume=MAY_CHANGE)  # stage names, parents first


@dataclass
class TrainConfig:
    stage: StageCfg = field(default_factory=StageCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    data: DataCfg = field(default_factory=DataCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    nproc: int = 2  # worker processes (ranks) launched by torchrun
    run_dir: str = setting("runs/default", resume=MAY_CHANGE)  # every stage writes RUN_DIR/<stage.name>/
    resume: bool = setting(False, resume=NOT_COMPARED)  # resume a crashed stage from its latest DeepSpeed checkpoint
    dry_run: bool = setting(False, resume=NOT_COMPARED)  # print plans and memory estimates, train nothing
    master_port: int = setting(0, resume=MAY_CHANGE, launcher_sets=True)  # 0 = pick a free port
    # nodes of nproc ranks each; > 1: one train-stage per node (stages.launch.multinode)
    nnodes: int = setting(1, launcher_sets=True)
    # what torchrun runs per rank (tests swap in their own)
    worker_module: str = setting("stages.rank.worker", resume=MAY_CHANGE)
    gpu_memory_gib: float = 80.0  # per-GPU memory the dry run checks the layout against (A800/H100 80 GB)
    # scale-out settings (stages.launch.multinode, stages.rank.elastic, stages.launch.slurm; docs/scale_out.md)
    # this node's rank when nnodes > 1 (node 0 coordinates)
    node_rank: int = setting(0, resume=MAY_CHANGE, per_node=True, launcher_sets=True)
    # node 0's address (the coordinator and the rendezvous)
    master_addr: str = setting("127.0.0.1", resume=MAY_CHANGE, launcher_sets=True)
    # this node's address for the rendezvous (None = its hostname)
    local_addr: str | None = setting(None, resume=MAY_CHANGE, per_node=True)
    # seconds the nodes wait for each other (config check, rendezvous)
    rdzv_timeout: int = setting(900, resume=MAY_CHANGE)
    collective_timeout: int = setting(1800, resume=MAY_CHANGE)  # seconds a collective may hang before the ranks fail
    # torchrun restarts of the worker group; each resumes from ds_ckpt/
    max_restarts: int = setting(0, resume=MAY_CHANGE)
    # DeepSpeed checkpoints kept in ds_ckpt/ (older ones are deleted)
    keep_checkpoints: int = setting(2, resume=MAY_CHANGE)
    # local (start the ranks) | slurm (write launch.sbatch) | print (commands)
    launcher: Launcher = setting(Launcher.local, resume=MAY_CHANGE, launcher_sets=True)
    # stop: a diverged run should not train on; skip: a rare bad batch costs one step, not the stage
    on_nonfinite: NonFinite = setting(NonFinite.stop, resume=MAY_CHANGE)
    # on_nonfinite=skip: more skipped steps in a row stop the stage (it diverged)
    max_skips_in_a_row: int = setting(10, resume=MAY_CHANGE)

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
                               f"stages/schema.py); check its spelling")
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
