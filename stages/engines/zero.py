"""The plain model under a DeepSpeed ZeRO engine (stage 0, 1, 2 or 3)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from growth.config import ModelConfig
from growth.model import TeleFLMForCausalLM, build_model
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
from stages.schema import DeepSpeedCfg, StageCfg


class StageEngine(DeepSpeedModule):
    """A ``TeleFLMForCausalLM`` under a DeepSpeed ZeRO engine (stage 0, 1, 2 or 3)."""

    pipeline = False

    def __init__(self, model: TeleFLMForCausalLM, ds: DeepSpeedCfg, stage: StageCfg):
        import deepspeed
        import torch.distributed as dist

        self.model = model
        if ds.activation_checkpointing:
            checkpoint_layers(list(model.model.layers), ds.checkpoint_every)
        if compile_on(ds):
            compile_layers(list(model.model.layers))
        self.dp_world = dist.get_world_size()
        self.dp_rank = dist.get_rank()
        named = list(model.named_parameters())
        self.adam = make_optimizer(named, model.config, stage)  # the torch optimizer inside DeepSpeed's
        self.ds_config = ds_config(ds, stage, self.dp_world)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.adam, config=self.ds_config)

    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        """The step's loss is summed over the ranks BEFORE the last micro batch's
        ``engine.step()`` (the one that updates), so every rank sees the same NaN/inf and drops
        the same update (``SkippableAdamW.drop_if``: on the device with the fused kernel, no
        host sync); DeepSpeed still zeroes the gradients. A NaN is never applied to the
        weights, under ``on_nonfinite`` stop or skip; the trainer reads the flag at log steps."""
        import torch.distributed as dist

        self.engine.train()
        # On the engine's device: with NCCL (GPU) a CPU tensor cannot be all-reduced.
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for i, (x, y) in enumerate(batches):
            loss = self.engine(x, y)  # the chunked loss inside the model (growth.model.LMHead)
            self.engine.backward(loss)
            total += loss.detach().double()
            if i == len(batches) - 1:  # one all-reduce per step, before the update
                total /= len(batches)
                dist.all_reduce(total)
                self.adam.drop_if(~torch.isfinite(total))
            self.engine.step()
        self.adam.drop_if(None)
        return total / self.dp_world

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Every rank runs every batch (ZeRO-3 forwards are collective), so all agree."""
        self.engine.eval()
        losses = [self.engine(x, y) for x, y in batches]
        return float(torch.stack(losses).double().mean())

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        self.model.set_growth_mask(record)

    def gather(self, kind: str | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Full fp32 tensors (weights, or moment ``kind``) in canonical order: rank 0 gets
        them, the others ``None`` (every rank must iterate: the gathers are collective)."""
        import torch.distributed as dist

        rank = dist.get_rank()
        params = dict(self.named_params())
        for name in self.config.tensor_shapes():
            t = optim_state.get_full(self.optimizer, params[name], kind)
            yield name, (t.cpu() if rank == 0 else None)


def build_plain(config: ModelConfig, state_dict: dict[str, torch.Tensor],
                ds: DeepSpeedCfg, stage: StageCfg) -> StageEngine:
    """Load the weights into the module, then hand it to ``deepspeed.initialize``.

    Note: weights go in before the engine exists; DeepSpeed's weight-only loading has a
    history of loss jumps after step 0 (docs/optimizer_state.md).
    """
    model = build_model(config, state_dict)
    return StageEngine(model, ds, stage)
