"""DeepSpeed for one stage: process group, config dict, μP param groups, the ZeRO engine.

Both engines — :class:`StageEngine` (ZeRO 0–3 over the plain model) and
``stages.pipeline.PipeStageEngine`` — implement the :class:`Engine` protocol, so the
trainer (``stages.trainer.Trainer``) does not know which one it drives. DeepSpeed
internals are confined to ``stages.ds_compat``.

Reference: DeepSpeed config JSON (deepspeed.ai/docs/config-json).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Protocol

import torch
from torch import nn

from growth.config import ModelConfig
from growth.model import DecoderLayer, TeleFLMForCausalLM, build_model, causal_lm_loss
from operators.mup import lr_multiplier
from stages import ds_compat, optim_state
from stages.config import DeepSpeedCfg, Precision, StageCfg, check_deepspeed

LOG_LEVEL = logging.WARNING  # DeepSpeed logs every engine detail at INFO
Batch = tuple[torch.Tensor, torch.Tensor]


class Engine(Protocol):
    """What the trainer needs from a parallel layout."""

    config: ModelConfig
    engine: Any  # the DeepSpeed engine (save_checkpoint / load_checkpoint)
    optimizer: Any  # the DeepSpeed optimizer wrapper (param groups carry ``lr_mult``)
    dp_rank: int  # data-parallel position: which rows of a global batch this rank trains on
    dp_world: int

    @property
    def zero_stage(self) -> int: ...

    def named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(hf_name, param)`` for the parameters this rank holds."""

    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro batches → the mean loss, a 0-d tensor
        on the device (not synced to the host: the trainer does that every log_every steps)."""

    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean loss over fixed batches (no grad); every rank gets the same value."""

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        """Install, ramp or remove MSG masks on this rank's modules."""

    def gather(self, kind: str | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Full fp32 weights (or Adam moment ``kind``) in canonical order, on rank 0 (collective)."""


# ---------------------------------------------------------------------- process group
def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed(timeout: float | None = None) -> None:
    """torch.distributed through DeepSpeed: gloo on CPU, the accelerator's backend elsewhere."""
    import deepspeed

    ds_compat.check_version(deepspeed.__version__)
    deepspeed.utils.logger.setLevel(LOG_LEVEL)
    ds_compat.skip_muon_import()  # the optimizer is AdamW: no Muon kernels to compile (stages.ds_compat)
    backend = None
    if on_cpu():
        ds_compat.skip_cpu_shm_build()
        backend = "gloo"
    extra = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}  # collective_timeout
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **extra)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


# ---------------------------------------------------------------------- config
def ds_config(ds: DeepSpeedCfg, stage: StageCfg, dp_world: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a stage (layout rules: ``stages.config.check_deepspeed``)."""
    check_deepspeed(ds, world=None)
    mbs, accum = stage.micro_batch_size, stage.grad_accum
    return {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mbs * accum * dp_world,
        "gradient_clipping": float(ds.gradient_clipping),
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == Precision.bf16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW, see make_optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------- optimizer
def param_groups(named: list[tuple[str, nn.Parameter]], config: ModelConfig,
                 weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW group per (μP LR multiplier, decay or not), in a fixed order.

    Matrices decay, norm gains (1-D) do not. Each group carries ``lr_mult`` so the
    worker sets ``lr = schedule(step) × lr_mult`` before every update; names may carry
    any prefix (pipeline names start with the spec index).
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in named:
        key = (lr_multiplier(config, name), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0}
            for (mult, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


class SkippableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose next ``step()`` can be dropped (``on_nonfinite=skip``).

    Note: DeepSpeed's ZeRO wrappers call this inner step and then copy its fp32 (master)
    weights back into the module; a dropped step leaves both, and the moments and step
    count, exactly as they were. ZeRO-0 in fp32 has no overflow check of its own.
    """

    skip_next = False  # set by StageEngine.train_step for the update it decided to drop

    def step(self, closure=None):  # noqa: D102
        if self.skip_next:
            return None
        return super().step(closure)


def make_optimizer(named: list[tuple[str, nn.Parameter]], config: ModelConfig,
                   stage: StageCfg) -> torch.optim.AdamW:
    """A plain ``torch.optim.AdamW`` (DeepSpeed's fused/CPU Adam need compiled ops)."""
    return SkippableAdamW(param_groups(named, config, stage.weight_decay), lr=stage.lr,
                          betas=tuple(stage.betas), eps=stage.eps)


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# ---------------------------------------------------------------------- activation checkpointing
def checkpoint_layers(layers: list[DecoderLayer]) -> None:
    """Recompute each decoder layer in the backward pass (``torch.utils.checkpoint``).

    Note: the forward is replaced per instance, so parameter names stay the HF ones.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        plain = layer.forward
        layer.forward = (lambda *a, _f=plain: checkpoint(_f, *a, use_reentrant=False))


# ---------------------------------------------------------------------- plain engine (ZeRO 0-3)
class DeepSpeedModule:
    """What every non-pipeline engine answers the same way from ``self.model`` (the module it
    built) and ``self.engine`` (DeepSpeed's engine around it)."""

    @property
    def config(self) -> ModelConfig:
        """The model's current config (it carries the live MSG mask state)."""
        return self.model.config

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.engine.module.named_parameters()


class StageEngine(DeepSpeedModule):
    """A ``TeleFLMForCausalLM`` under a DeepSpeed ZeRO engine (stage 0, 1, 2 or 3)."""

    pipeline = False

    def __init__(self, model: TeleFLMForCausalLM, ds: DeepSpeedCfg, stage: StageCfg):
        import deepspeed
        import torch.distributed as dist

        self.model = model
        if ds.activation_checkpointing:
            checkpoint_layers(list(model.model.layers))
        self.dp_world = dist.get_world_size()
        self.dp_rank = dist.get_rank()
        named = list(model.named_parameters())
        self.adam = make_optimizer(named, model.config, stage)  # the torch optimizer inside DeepSpeed's
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.adam, config=ds_config(ds, stage, self.dp_world))
        self.skip_nonfinite = False  # on_nonfinite=skip (set by the trainer)
        self.skipped = False  # the last train_step dropped its update (its loss was NaN/inf)

    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        """With ``skip_nonfinite`` the step's loss is summed over the ranks BEFORE the last
        micro batch's ``engine.step()`` (the one that updates), so every rank sees the same
        NaN/inf and drops the same update; DeepSpeed still zeroes the gradients."""
        import torch.distributed as dist

        self.engine.train()
        # On the engine's device: with NCCL (GPU) a CPU tensor cannot be all-reduced.
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        self.skipped = False
        for i, (x, y) in enumerate(batches):
            loss = causal_lm_loss(self.engine(x.to(self.engine.device)), y.to(self.engine.device))
            self.engine.backward(loss)
            total += loss.detach().double()
            if i == len(batches) - 1:  # one all-reduce per step, before the update
                total /= len(batches)
                dist.all_reduce(total)
                self.skipped = self.skip_nonfinite and not bool(torch.isfinite(total))  # a host sync (skip only)
                self.adam.skip_next = self.skipped
            self.engine.step()
        self.adam.skip_next = False
        return total / self.dp_world

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        """Every rank runs every batch (ZeRO-3 forwards are collective), so all agree."""
        self.engine.eval()
        losses = [causal_lm_loss(self.engine(x.to(self.engine.device)), y.to(self.engine.device))
                  for x, y in batches]
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
