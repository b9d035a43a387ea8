"""The one check of a stage config: every range and cross-field rule, in :func:`validate`.

The orchestrator calls it once on the typed :class:`~stages.schema.TrainConfig` Hydra composed;
each rank calls it again on the snapshot it reads (:class:`~stages.resolved.ResolvedStage`).
Rules that need the disk (checkpoints, data, growth shapes) come after it, in
``stages.launch.plan``.
"""

from __future__ import annotations

import math

from operators import GrowthError
from stages.layout import LayoutError
from stages.schema import (
    MAX_PORT,
    DeepSpeedCfg,
    Launcher,
    NonFinite,
    Precision,
    StageCfg,
    StageConfigError,
    TrainConfig,
    growth_spec,
)
from stages.script_text import check_config_text

COMPILE_CHOICES = ("auto", "true", "false")  # deepspeed.compile (stages.engines.common.compile_on)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Every range and cross-field rule of a stage config, once; returns ``cfg``.

    Raises :class:`StageConfigError` naming the first bad field. Files, checkpoints and
    growth shapes are checked by the orchestrator afterwards (they need the disk).
    """
    stage, ds = cfg.stage, cfg.deepspeed
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
    check_growth_fields(stage)  # also on a stage with no parent: a typo is never silent
    check_deepspeed(ds, cfg.world)
    check_layout_fields(cfg)  # TP × PP × DP = ranks (model shapes: stages.layout.check_stage_layout)
    check_scale(cfg)
    return cfg


def check_growth_fields(stage: StageCfg) -> None:
    try:
        growth_spec(stage.growth).validate()
    except GrowthError as err:
        raise StageConfigError(f"stage.growth: {str(err).splitlines()[0]}") from None


def check_rewarm(stage: StageCfg) -> None:
    if not 0.0 < stage.rewarm_peak_ratio <= 1.0:
        raise StageConfigError(f"field 'stage.rewarm_peak_ratio' must be in (0, 1], got {stage.rewarm_peak_ratio}")


def check_deepspeed(ds: DeepSpeedCfg, world: int | None) -> None:
    """The layout rules (also what ``stages.engines.common.ds_config`` relies on); ``world`` = ranks."""
    try:
        Precision(ds.precision)
    except ValueError:
        raise StageConfigError(f"field 'deepspeed.precision' must be one of "
                               f"{', '.join(p.value for p in Precision)} (fp16 is unsupported), "
                               f"got {ds.precision!r}") from None
    if not 0 <= ds.zero_stage <= 3:
        raise StageConfigError(f"field 'deepspeed.zero_stage' must be 0..3, got {ds.zero_stage}")
    if str(ds.compile).lower() not in COMPILE_CHOICES:
        raise StageConfigError(f"field 'deepspeed.compile' must be one of {', '.join(COMPILE_CHOICES)}, "
                               f"got {ds.compile!r}")
    if ds.checkpoint_every < 1:
        raise StageConfigError(f"field 'deepspeed.checkpoint_every' must be >= 1 (1 = every layer), "
                               f"got {ds.checkpoint_every}")
    if ds.zero_stage == 0 and Precision(ds.precision) == Precision.bf16:
        raise StageConfigError("field 'deepspeed.zero_stage' is 0 with deepspeed.precision=bf16: DeepSpeed 0.19 "
                               "accumulates ZeRO-0 bf16 gradients in bf16 only (fp32 accumulation needs ZeRO >= 1); "
                               "use deepspeed.zero_stage=1 or precision fp32")
    if not ds.pipeline:
        return
    if ds.zero_stage > 1:
        raise StageConfigError(f"field 'deepspeed.zero_stage' is {ds.zero_stage} with deepspeed.pipeline=true; "
                               f"DeepSpeed's pipeline allows ZeRO 0 or 1 only (ZeRO-2 and ZeRO-3 are "
                               f"incompatible with pipeline parallelism)")
    if ds.pipeline_stages < 1 or (world is not None and world % ds.pipeline_stages):
        raise StageConfigError(f"field 'deepspeed.pipeline_stages' ({ds.pipeline_stages}) must divide the "
                               f"number of ranks, nproc × nnodes = {world}")


def check_scale(cfg: TrainConfig) -> None:
    """The scale-out fields' rules."""
    for name in ("node_rank", "max_restarts"):
        if getattr(cfg, name) < 0:
            raise StageConfigError(f"field '{name}' must be >= 0, got {getattr(cfg, name)}")
    for name in ("rdzv_timeout", "collective_timeout", "keep_checkpoints"):
        if getattr(cfg, name) <= 0:
            raise StageConfigError(f"field '{name}' must be positive, got {getattr(cfg, name)}")
    if cfg.stage.growth.workers < 1:
        raise StageConfigError(f"field 'stage.growth.workers' must be positive, got {cfg.stage.growth.workers}")
    if cfg.node_rank >= cfg.nnodes:
        raise StageConfigError(f"field 'node_rank' ({cfg.node_rank}) must be below nnodes ({cfg.nnodes})")
    try:
        Launcher(cfg.launcher)
    except ValueError:
        raise StageConfigError(f"field 'launcher' must be one of {', '.join(m.value for m in Launcher)}, "
                               f"got {cfg.launcher!r}") from None
    check_nonfinite(cfg)


def check_nonfinite(cfg: TrainConfig) -> None:
    """``on_nonfinite``: skip needs an engine that sees the step's loss before its update."""
    try:
        mode = NonFinite(cfg.on_nonfinite)
    except ValueError:
        raise StageConfigError(f"field 'on_nonfinite' must be one of {', '.join(m.value for m in NonFinite)}, "
                               f"got {cfg.on_nonfinite!r}") from None
    if cfg.max_skips_in_a_row <= 0:
        raise StageConfigError(f"field 'max_skips_in_a_row' must be positive, got {cfg.max_skips_in_a_row}")
    if mode != NonFinite.skip:
        return
    ds = cfg.deepspeed
    if ds.pipeline or ds.tensor_parallel > 1:
        layout = "deepspeed.pipeline=true" if ds.pipeline else f"deepspeed.tensor_parallel={ds.tensor_parallel}"
        raise StageConfigError(f"field 'on_nonfinite' is skip with {layout}: only the ZeRO engine checks the "
                               f"loss before the optimizer step (the pipeline steps inside train_batch); "
                               f"use on_nonfinite=stop")


def check_layout_fields(cfg: TrainConfig) -> None:
    """TP × PP × DP = nproc × nnodes and a positive memory budget (config fields only)."""
    ds = cfg.deepspeed
    tp, world = ds.tensor_parallel, cfg.world
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise LayoutError(f"field 'deepspeed.tensor_parallel' must be a positive integer, got {tp!r}")
    pp = ds.pipeline_stages if ds.pipeline else 1
    if world % (tp * pp):
        what = f"tensor_parallel {tp} × pipeline_stages {pp}" if ds.pipeline else f"tensor_parallel {tp}"
        raise LayoutError(f"field 'deepspeed.tensor_parallel': {what} = {tp * pp} does not divide the "
                          f"{world} ranks (nproc × nnodes), so TP × PP × DP ≠ world size; pick degrees "
                          f"whose product divides {world}")
    if ds.sequence_parallel and tp == 1:
        raise LayoutError("field 'deepspeed.sequence_parallel' is true with deepspeed.tensor_parallel 1: it "
                          "splits the sequence over the TP ranks, so it would do nothing; set it to false or "
                          "set tensor_parallel > 1")
    if ds.sequence_parallel and tp > 1 and cfg.stage.seq_len % tp:
        raise LayoutError(f"field 'deepspeed.sequence_parallel': stage.seq_len {cfg.stage.seq_len} does not "
                          f"divide by tensor_parallel {tp} (each TP rank holds 1/{tp} of the sequence); pick a "
                          f"seq_len that is a multiple of {tp}")
    if not cfg.gpu_memory_gib > 0:
        raise LayoutError(f"field 'gpu_memory_gib' must be positive, got {cfg.gpu_memory_gib}")
