"""DeepSpeed for one stage: process group, config dict, μP param groups, the plain engine.

Everything DeepSpeed-specific that is not the pipeline lives here; ``stages.pipeline``
holds the PipelineModule and its name adapter. Both expose the same small interface
(:class:`StageEngine`), so the worker loop does not know which one it drives:

- ``train_step(batches)`` one optimizer step over ``grad_accum`` micro batches → mean loss
- ``eval_loss(batches)`` mean loss over fixed batches (no grad, every rank gets it)
- ``named_params()`` ``(hf_name, param)`` for the parameters this rank holds
- ``set_growth_mask(record)`` install/ramp/remove MSG masks on the local modules
- ``dp_rank`` / ``dp_world`` data-parallel position (data sharding)

References: DeepSpeed config JSON (deepspeed.ai/docs/config-json), GROWTH_NOTES §5–§6.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from growth.config import ModelConfig
from growth.model import DecoderLayer, TeleFLMForCausalLM, build_model, causal_lm_loss
from operators.mup import lr_multiplier
from stages import optim_state

PRECISIONS = ("fp32", "bf16")
LOG_LEVEL = logging.WARNING  # DeepSpeed logs every engine detail at INFO


# ---------------------------------------------------------------------- process group
def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed() -> None:
    """torch.distributed through DeepSpeed: gloo on CPU, the accelerator's backend elsewhere.

    Note: on CPU ``deepspeed.init_distributed`` compiles a shared-memory all-reduce op
    (30–40 s, 1.6 GB) that gloo never uses; it is skipped.
    """
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op is replaced)

    deepspeed.utils.logger.setLevel(LOG_LEVEL)
    backend = None
    if on_cpu():
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


# ---------------------------------------------------------------------- config
def ds_config(ds: dict[str, Any], stage: dict[str, Any], dp_world: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a stage (``DeepSpeedCfg`` and ``StageCfg`` as dicts)."""
    precision = ds.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"deepspeed.precision must be one of {PRECISIONS} (fp16 is not "
                         f"supported on CPU), got {precision!r}")
    zero = int(ds.get("zero_stage", 1))
    if ds.get("pipeline") and zero > 1:
        raise ValueError("deepspeed.zero_stage must be 0 or 1 with pipeline: true "
                         "(DeepSpeed: ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism)")
    mbs, accum = int(stage["micro_batch_size"]), int(stage["grad_accum"])
    return {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mbs * accum * dp_world,
        "gradient_clipping": float(ds.get("gradient_clipping") or 0.0),
        "zero_optimization": {"stage": zero},
        "bf16": {"enabled": precision == "bf16"},
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


def make_optimizer(named: list[tuple[str, nn.Parameter]], config: ModelConfig,
                   stage: dict[str, Any]) -> torch.optim.AdamW:
    """A plain ``torch.optim.AdamW`` (DeepSpeed's fused/CPU Adam need compiled ops)."""
    return torch.optim.AdamW(param_groups(named, config, float(stage["weight_decay"])),
                             lr=float(stage["lr"]), betas=tuple(stage["betas"]),
                             eps=float(stage["eps"]))


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


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
class StageEngine:
    """A ``TeleFLMForCausalLM`` under a DeepSpeed ZeRO engine (stage 0, 1, 2 or 3)."""

    pipeline = False

    def __init__(self, model: TeleFLMForCausalLM, ds: dict[str, Any], stage: dict[str, Any]):
        import deepspeed
        import torch.distributed as dist

        self.model = model
        if ds.get("activation_checkpointing"):
            checkpoint_layers(list(model.model.layers))
        self.dp_world = dist.get_world_size()
        self.dp_rank = dist.get_rank()
        named = list(model.named_parameters())
        optimizer = make_optimizer(named, self.config, stage)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(ds, stage, self.dp_world))

    @property
    def config(self) -> ModelConfig:
        """The model's current config (it carries the live MSG mask state)."""
        return self.model.config

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.engine.module.named_parameters()

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        import torch.distributed as dist

        self.engine.train()
        # On the engine's device: with NCCL (GPU) a CPU tensor cannot be all-reduced.
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for x, y in batches:
            loss = causal_lm_loss(self.engine(x.to(self.engine.device)), y.to(self.engine.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double()
        total /= len(batches)
        dist.all_reduce(total)
        return float(total) / self.dp_world

    @torch.no_grad()
    def eval_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Every rank runs every batch (ZeRO-3 forwards are collective), so all agree."""
        self.engine.eval()
        losses = [causal_lm_loss(self.engine(x.to(self.engine.device)), y.to(self.engine.device))
                  for x, y in batches]
        return float(torch.stack(losses).double().mean())

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        self.model.set_growth_mask(record)

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

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
                ds: dict[str, Any], stage: dict[str, Any]) -> StageEngine:
    """Load the weights into the module, then hand it to ``deepspeed.initialize``.

    Note: weights go in before the engine exists; DeepSpeed's weight-only loading has a
    history of loss jumps after step 0 (GROWTH_NOTES §5).
    """
    model = build_model(config, state_dict)
    return StageEngine(model, ds, stage)
