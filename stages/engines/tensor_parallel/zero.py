"""A tensor-parallel Tele-FLM under a DeepSpeed ZeRO-0/1/2/3 engine (no pipeline).

:class:`TPStageEngine` implements ``stages.engines.protocol.Engine``, so ``stages.rank.trainer.Trainer``
drives it like the plain and pipeline engines; ``stages.engines.build.build_engine`` picks it when
``deepspeed.tensor_parallel > 1``.

Ranks form a TP × DP grid with TP innermost (:class:`ParallelGroups`): global rank ``r`` is
TP rank ``r % tp`` of data-parallel replica ``r // tp``. The groups object is also the
Megatron-style ``mpu`` DeepSpeed takes (``deepspeed.initialize(mpu=…)``), so

- gradients are averaged and ZeRO partitions Adam state over the **data-parallel** group only;
  under ZeRO-3 also the parameters: DeepSpeed partitions over the ``mpu``'s data-parallel
  group, so each parameter's ``ds_process_group`` is this rank's DP group and a forward
  all-gathers a module's TP shard from its DP peers, never across TP ranks;
- the global gradient norm for clipping counts every TP shard once: split parameters carry
  ``tensor_model_parallel = True`` (DeepSpeed's ``is_model_parallel_parameter``), replicated
  norms are counted on TP rank 0 only, and the partial sums are all-reduced over the
  model-parallel group (ZeRO-1/2 and ZeRO-3's ``get_grad_norm_direct`` count the same way);
- the reported loss is averaged over the data-parallel group (TP ranks hold the same loss).

Every TP rank of a replica sees the same batches: the trainer shards data by ``dp_rank`` /
``dp_world``. Adam moments are seeded from this rank's slices of ``init/optimizer/``
(:meth:`TPStageEngine.seed_adam_state`), and :meth:`TPStageEngine.gather` yields full
HF-named tensors on global rank 0 one at a time (ZeRO gathers a slice over DP, then the TP
slices are gathered and concatenated), which ``stages.rank.export.export_final`` streams to disk.
Both go through ``stages.engines.optim_state`` (DeepSpeed's ``safe_get/set_full_*`` helpers), as the
plain engine does under every ZeRO stage; under ZeRO-3 those gather (or write into) one
parameter's partitions over its ``ds_process_group``, the DP group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from growth.config import ModelConfig
from growth.model import init_tensor
from stages.engines import optim_state
from stages.engines.common import (
    DeepSpeedModule,
    checkpoint_layers,
    compile_layers,
    compile_on,
    ds_config,
    make_optimizer,
)
from stages.engines.protocol import Batch
from stages.engines.tensor_parallel.io import gather_tensors, read_shards, seed_sliced_moments, tp_model
from stages.engines.tensor_parallel.layers import (
    TPForCausalLM,
    all_reduce_norm_grads,
    shard,
    shard_dim,
)
from stages.schema import DeepSpeedCfg, StageCfg


class ParallelGroups:
    """TP and DP process groups of a TP × DP grid; the ``mpu`` handed to DeepSpeed.

    Note: ``dist.new_group`` is collective over the whole world, so every rank creates
    every group, in the same order."""

    def __init__(self, tp: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        if tp < 1 or world % tp:
            raise ValueError(f"tensor_parallel {tp} does not divide the world size {world}")
        self.tp, self.dp = tp, world // tp
        self.tp_rank, self.dp_rank = rank % tp, rank // tp
        self.tp_group = self.dp_group = None
        for replica in range(self.dp):
            ranks = list(range(replica * tp, (replica + 1) * tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group, self.tp_ranks = group, ranks
        for column in range(tp):
            ranks = list(range(column, world, tp))
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group, self.dp_ranks = group, ranks

    # Megatron's mpu names, as DeepSpeed queries them (deepspeed/utils/bwc.py, groups.py)
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> Any:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dp_ranks

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


class TPStageEngine(DeepSpeedModule):
    """A :class:`TPForCausalLM` rank under ``deepspeed.initialize`` with TP × DP groups."""

    pipeline = False

    def __init__(self, model: TPForCausalLM, groups: ParallelGroups, ds: DeepSpeedCfg, stage: StageCfg):
        import deepspeed

        self.model, self.groups = model, groups
        if ds.activation_checkpointing:
            checkpoint_layers(list(model.model.layers), ds.checkpoint_every)
        if compile_on(ds):
            compile_layers(list(model.model.layers))
        for name, p in model.named_parameters():
            p.tensor_model_parallel = shard_dim(name) is not None and groups.tp > 1
        self.dp_world, self.dp_rank = groups.dp, groups.dp_rank
        self.optimizer_inner = make_optimizer(list(model.named_parameters()), model.config, stage)
        self.ds_config = ds_config(ds, stage, self.dp_world)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer_inner, config=self.ds_config, mpu=groups)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The vocab-parallel chunked loss, computed inside the model (stages.engines.tensor_parallel.loss)."""
        return self.engine(x, y)

    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        """As ``stages.engines.zero.StageEngine.train_step``: the loss averaged over the DP group
        before the last micro batch's update, a non-finite one dropped on the device."""
        self.engine.train()
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for i, (x, y) in enumerate(batches):
            loss = self._loss(x, y)
            self.engine.backward(loss)
            total += loss.detach().double()
            if i == len(batches) - 1:
                total /= len(batches)
                dist.all_reduce(total, group=self.groups.dp_group)  # TP ranks already agree
                self.optimizer_inner.drop_if(~torch.isfinite(total))
            self.engine.step()
        self.optimizer_inner.drop_if(None)
        return total / self.dp_world

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Every rank runs every batch, so every rank gets the same number."""
        self.engine.eval()
        return float(torch.stack([self._loss(x, y) for x, y in batches]).double().mean())

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        self.model.set_growth_mask(record)

    def seed_adam_state(self, checkpoint: str | Path, config: ModelConfig) -> int:
        """``stages.engines.optim_state.seed_adam_state`` with each moment read as this rank's TP
        slices (safetensors ``get_slice``), sliced like the weights; returns the Adam step."""
        return seed_sliced_moments(self.optimizer, dict(self.named_params()), checkpoint, config,
                                   self.groups.tp_rank, self.groups.tp)

    def gather(self, kind: str | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Full fp32 tensors (weights, or Adam moment ``kind``) in canonical order on global
        rank 0, ``None`` elsewhere; every rank must iterate (collective over DP and TP)."""
        params = dict(self.named_params())
        for name in self.config.tensor_shapes():
            local = optim_state.get_full(self.optimizer, params[name], kind)  # collective over DP
            if self.groups.dp_rank != 0:
                yield name, None
                continue
            (_, full), = gather_tensors(self.model, {name: local}, names=[name])
            yield name, (full.cpu() if dist.get_rank() == 0 else None)


def fresh_slices(config: ModelConfig, seed: int, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """This rank's slices of growth.model's fresh init (the values one rank would draw).

    Note: each full tensor is drawn (deterministic in (seed, name)) and sliced, one at a time."""
    return {name: shard(name, init_tensor(config, name, shape, seed), groups.tp_rank, groups.tp).clone()
            for name, shape in config.tensor_shapes().items()}


def build_tp(config: ModelConfig, weights: dict[str, torch.Tensor], ds: DeepSpeedCfg, stage: StageCfg,
             init: str | Path | None = None) -> tuple[TPStageEngine, dict[str, torch.Tensor]]:
    """The TP × ZeRO engine of a stage (groups from ``ds.tensor_parallel``) and its fp32 start
    slices (``stages.engines.build`` sets the bf16 masters from them). Start weights: this rank's
    slices of the canonical checkpoint ``init`` (safetensors ``get_slice``, never a full
    tensor), else of ``weights`` when given, else of a fresh init (``stage.seed``)."""
    groups = ParallelGroups(ds.tensor_parallel)
    if init is not None:
        _, state = read_shards(init, groups.tp_rank, groups.tp)
    elif weights:
        state = {name: shard(name, weights.pop(name), groups.tp_rank, groups.tp).clone()
                 for name in config.tensor_shapes()}
    else:
        state = fresh_slices(config, stage.seed, groups)
    model = tp_model(config, state, groups.tp_group, groups.tp, groups.tp_rank, ds.sequence_parallel)
    if model.sp:
        all_reduce_norm_grads(model, groups.tp_group)
    return TPStageEngine(model, groups, ds, stage), state
