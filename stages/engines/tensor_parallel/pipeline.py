"""Tensor parallelism inside DeepSpeed's pipeline: TP × PP × DP with ZeRO-1 over DP.

The pipeline runs on DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``
(axes ``pipe, data, model``, model innermost: global rank ``r`` is TP rank ``r % tp`` of
data-parallel replica ``(r // tp) % dp`` of stage ``r // (tp · dp)``). ``PipelineModule``
builds its grid from that topology and every group used here is the grid's own:

- the TP group is the grid's slice group (``get_slice_parallel_group``); the layers are built
  before the grid exists, so it is bound onto them right after (:func:`bind_tp_group`);
- the grid is DeepSpeed's ``mpu``: ZeRO-1 averages gradients and partitions Adam over the data
  group; the clipped norm counts split parameters (``tensor_model_parallel = True``) on every
  TP rank and replicated ones (norms) on TP rank 0 only, summed over the ranks of one
  replica (pipe × model, the grid's model-parallel group);
- the loss is the vocab-parallel chunked cross-entropy on the last stage (``TPLMHead``, every
  TP rank holds the same value), averaged over data-parallel replicas and broadcast along the
  pipe by DeepSpeed.

Each spec is the TP version of stages.engines.pipeline's (same math as stages.engines.tensor_parallel.layers):
:class:`TPEmbeddingPipe` (vocab rows ``1/tp``, all-reduced), :class:`TPDecoderLayerPipe`
(column/row-parallel attention and MLP), :class:`TPHeadPipe` (vocab-parallel ``lm_head``; the
full-vocab logits are never gathered). Activations between stages are replicated across TP;
DeepSpeed sends each TP rank's ``1/tp`` piece and all-gathers it on the receiving stage
(``pipeline.pipe_partitioned``, its default). The HF-name adapter of stages.engines.pipeline is
unchanged; DeepSpeed's own checkpoint files carry the TP rank (``layer_XX-model_YY-…``).

With ``deepspeed.sequence_parallel`` the hidden states between (and inside) stages are split
along the sequence (stages.engines.tensor_parallel.layers), so DeepSpeed's partitioned send is turned
off: each TP rank sends its own shard to the same TP rank of the next stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from growth.config import ModelConfig
from growth.model import DecoderLayer, RMSNorm, embedding, init_tensor, rope_cos_sin
from stages.engines import ds_compat
from stages.engines.pipeline import (
    DecoderLayerPipe,
    EmbeddingPipe,
    HeadPipe,
    PipeStageEngine,
    build_pipeline_module,
    set_pipe_growth_mask,
)
from stages.engines.tensor_parallel.io import gather_shard, read_shards
from stages.engines.tensor_parallel.layers import (
    TPMLP,
    TPAttention,
    TPLMHead,
    all_reduce_norm_grads,
    local_config,
    shard,
    shard_dim,
    shard_range,
    slice_mask,
    tp_embed,
    vocab_parallel_logits,
)
from stages.layout import LayoutError
from stages.schema import DeepSpeedCfg, StageCfg


# ---------------------------------------------------------------------- layers
class TPEmbeddingPipe(EmbeddingPipe):
    """Spec 0 on TP rank ``rank``: vocab rows ``[rank·V/tp, (rank+1)·V/tp)``, all-reduced."""

    def __init__(self, config: ModelConfig, tp: int, rank: int, sp: bool = False):
        nn.Module.__init__(self)
        self.config, self.tp, self.sp, self.group = config, tp, sp, None
        self.vocab_start, self.vocab_stop = shard_range(config.vocab_size, rank, tp)
        self.embed_tokens = embedding(config.vocab_size // tp, config.hidden_size)
        self.register_buffer("hidden_mask", None, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return tp_embed(self, input_ids)  # the TP model's own code path


class TPDecoderLayerPipe(DecoderLayerPipe):
    """Specs 1…L: this rank's heads and FFN units (column/row parallel), RoPE per input."""

    def __init__(self, config: ModelConfig, tp: int, rank: int, sp: bool = False):
        local = local_config(config, tp)
        super().__init__(local)
        self.self_attn = TPAttention(local, None, tp, sp)
        self.mlp = TPMLP(local, None, tp, sp)
        self.seq_parts = tp if sp else 1  # with sp the input is this rank's 1/tp of the sequence

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cos, sin = rope_cos_sin(h.shape[1] * self.seq_parts, self.head_dim, self.rope_theta, h.device, h.dtype)
        return DecoderLayer.forward(self, h, cos, sin)


class TPHeadPipe(HeadPipe):
    """Spec L+1: final norm (replicated) → normed hidden states; this rank's ``lm_head`` rows
    (``TPLMHead``) give the vocab-parallel chunked loss in the pipe's ``loss_fn``."""

    def __init__(self, config: ModelConfig, tp: int, rank: int, sp: bool = False):
        nn.Module.__init__(self)
        self.config, self.tp, self.sp, self.group = config, tp, sp, None
        self.vocab_start, self.vocab_stop = shard_range(config.vocab_size, rank, tp)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = TPLMHead(config, tp, self.vocab_start, sp)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(self.config, self.lm_head, normed, self.vocab_start, self.vocab_stop,
                                     self.group, self.tp, self.sp)


TP_PIPE_LAYERS = (TPEmbeddingPipe, TPDecoderLayerPipe, TPHeadPipe)
_GROUP_HOLDERS = (TPEmbeddingPipe, TPHeadPipe, TPAttention, TPMLP, TPLMHead)


def bind_tp_group(module: nn.Module, group: Any) -> None:
    """Hand the grid's TP group to every layer that communicates over it (the loss included)."""
    for m in module.modules():
        if isinstance(m, _GROUP_HOLDERS):
            m.group = group


# ---------------------------------------------------------------------- engine
class TPPipeStageEngine(PipeStageEngine):
    """stages.engines.pipeline's engine with TP ranks: a TP × PP × DP grid, ZeRO-0/1 over DP."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor] | None, ds: DeepSpeedCfg,
                 stage: StageCfg, init: str | Path | None = None):
        self.tp, self.init = ds.tensor_parallel, init
        self.sp = ds.sequence_parallel and self.tp > 1
        self.start_state: dict[str, torch.Tensor] = {}  # this rank's fp32 start slices
        super().__init__(config, weights or None, stage.seed, ds, stage)
        self.tp_group = self.module.mpu().get_slice_parallel_group()

    def build_module(self, config: ModelConfig, ds: DeepSpeedCfg) -> nn.Module:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        world, pp = dist.get_world_size(), ds.pipeline_stages
        if world % (self.tp * pp):
            raise LayoutError(f"deepspeed.tensor_parallel {self.tp} × pipeline_stages {pp} does not divide the "
                              f"{world} ranks; pick degrees whose product divides {world}")
        topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=self.tp, num_dp=world // (self.tp * pp))
        self.tp_rank = topology.get_coord(dist.get_rank()).model
        module = build_pipeline_module(config, None, ds, layers=TP_PIPE_LAYERS,
                                       layer_args=(self.tp, self.tp_rank, self.sp), topology=topology)
        group = module.mpu().get_slice_parallel_group()
        bind_tp_group(module, group)
        if self.sp:
            all_reduce_norm_grads(module, group)
        return module

    def deepspeed_config(self, ds: DeepSpeedCfg, stage: StageCfg) -> dict[str, Any]:
        """With sequence parallelism a stage's output differs across its TP ranks (each holds its
        shard), so DeepSpeed must not split and re-gather it as if it were replicated."""
        config = super().deepspeed_config(ds, stage)
        if self.sp:
            config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        return config

    def load_start_weights(self, state_dict: dict[str, torch.Tensor] | None, seed: int) -> None:
        """This rank's slices of its stage's tensors only: read from the canonical checkpoint
        ``init`` (safetensors ``get_slice``), else cut from ``state_dict``, else from
        growth.model's fresh init drawn one tensor at a time."""
        params = dict(self.named_params())
        shapes = self.config.tensor_shapes()
        if self.init is not None:
            _, state = read_shards(self.init, self.tp_rank, self.tp, names=list(params))
        else:
            state = {}
            for name in params:
                full = state_dict[name] if state_dict is not None else init_tensor(self.config, name, shapes[name],
                                                                                    seed)
                state[name] = shard(name, full, self.tp_rank, self.tp).clone()
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
        self.start_state = state

    def counts_in_grad_norm(self, name: str) -> bool:
        """Split tensors on every TP rank, replicated ones (norm gains) on TP rank 0 only."""
        return shard_dim(name) is not None or self.tp_rank == 0

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        self.config = set_pipe_growth_mask(self.module, self.config, record,
                                           slice_mask=lambda mask: slice_mask(mask, self.tp_rank, self.tp))

    def owner_rank(self, spec: int) -> int:
        return ds_compat.pipe_owner_rank(self.engine, self.module, spec, model=0)

    def full_tensor(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        """Data-parallel replica 0 gathers the TP slices on its TP rank 0."""
        if self.dp_rank != 0:
            return None
        return gather_shard(name, local, self.tp_group, self.tp, self.tp_rank)

    def seed_adam_state(self, checkpoint: str | Path, config: ModelConfig) -> int:
        """Adam moments of this rank's stage, read as its TP slices; returns the Adam step."""
        from stages.engines.tensor_parallel.io import seed_sliced_moments

        return seed_sliced_moments(self.optimizer, dict(self.named_params()), checkpoint, config,
                                   self.tp_rank, self.tp)


def build_tp_pipe(config: ModelConfig, weights: dict[str, torch.Tensor], ds: DeepSpeedCfg, stage: StageCfg,
                  init: str | Path | None = None) -> tuple[TPPipeStageEngine, dict[str, torch.Tensor]]:
    """The TP pipeline engine of a stage (start weights as :meth:`TPPipeStageEngine.load_start_weights`)
    and its fp32 start slices (``stages.engines.build`` sets the bf16 masters from them)."""
    eng = TPPipeStageEngine(config, weights, ds, stage, init)
    state, eng.start_state = eng.start_state, {}
    return eng, state
