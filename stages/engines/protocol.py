"""What the trainer needs from an engine: the :class:`Engine` protocol, and the batch type.

Every engine (``stages.engines.zero``, ``stages.engines.pipeline`` and the two in
``stages.engines.tensor_parallel``) implements it; ``stages.engines.build.build_engine`` picks
one, and the trainer (``stages.rank.trainer``) calls nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from growth.config import ModelConfig

Batch = tuple[torch.Tensor, torch.Tensor]


class Engine(Protocol):
    """What the trainer needs from a parallel layout."""

    config: ModelConfig  # the model's current config (it carries the live MSG mask record)
    optimizer: Any  # the DeepSpeed optimizer wrapper (param groups carry ``lr_mult``)
    dp_rank: int  # data-parallel position: which rows of a global batch this rank trains on
    dp_world: int
    skip_nonfinite: bool  # on_nonfinite=skip: drop an update whose loss is NaN/inf (ZeRO engine only)
    ds_config: dict[str, Any]  # the exact config dict handed to deepspeed.initialize

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

    def set_lr(self, lr: float) -> None:
        """The LR of the next update: ``lr × lr_mult`` in every param group (μP)."""

    def seed_adam_state(self, checkpoint: str | Path, config: ModelConfig) -> int:
        """Adam state from ``checkpoint/optimizer/`` (a grown stage starts warm); returns its step."""

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict[str, Any]) -> None:
        """A DeepSpeed-native checkpoint of weights and optimizer state (collective)."""

    def load_checkpoint(self, directory: str | Path, tag: str) -> tuple[str | None, dict[str, Any]]:
        """Weights and optimizer state from ``directory/tag`` → (its path or None, client_state)."""
