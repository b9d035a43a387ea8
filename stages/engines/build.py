"""The one engine choice, tensor parallel or not × pipeline or not (2 × 2), and the one place
the bf16 masters are set from the fp32 start weights."""

from __future__ import annotations

import torch

from growth.config import ModelConfig
from stages.engines import ds_compat, optim_state
from stages.engines.pipeline import PipeStageEngine
from stages.engines.protocol import Engine
from stages.engines.tensor_parallel.pipeline import build_tp_pipe
from stages.engines.tensor_parallel.zero import build_tp
from stages.engines.zero import build_plain
from stages.schema import DeepSpeedCfg, Precision, StageCfg


def build_engine(config: ModelConfig, weights: dict[str, torch.Tensor], ds: DeepSpeedCfg,
                 stage: StageCfg, init: str | None = None) -> Engine:
    """The engine of this layout, weights loaded before ``deepspeed.initialize``:

    ==================  ==========================  ==========================================
    layout              engine                      start weights
    ==================  ==========================  ==========================================
    ZeRO 0–3            ``zero.StageEngine``        ``weights`` (full tensors)
    pipeline            ``pipeline.PipeStageEngine``  ``weights``, or a fresh init (``stage.seed``)
    TP × ZeRO 0–3       ``tensor_parallel.zero``    this rank's slices of ``init`` / ``weights``
    TP × pipeline       ``tensor_parallel.pipeline``  / a fresh init (never a full tensor of ``init``)
    ==================  ==========================  ==========================================

    Note: in bf16 DeepSpeed builds its fp32 masters from the bf16-cast module; they are set
    here from the fp32 start tensors instead (once, for every layout). DeepSpeed's per-step
    gradient-norm checks are moved onto the device first (``ds_compat.DeviceGradCheck``).
    """
    ds_compat.DeviceGradCheck.install()
    if ds.tensor_parallel > 1:
        build = build_tp_pipe if ds.pipeline else build_tp
        eng, masters = build(config, weights, ds, stage, init)
    elif ds.pipeline:
        eng, masters = PipeStageEngine(config, weights, stage.seed, ds, stage), weights
    else:
        eng, masters = build_plain(config, weights, ds, stage), weights
    if ds.precision == Precision.bf16:  # fp32 masters from the fp32 checkpoint, not from bf16
        optim_state.set_master_weights(eng.optimizer, eng.named_params(), masters)
    return eng
