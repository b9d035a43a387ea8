"""Adam state in and out of a DeepSpeed engine, by parameter, in full (unpartitioned) shape.

The canonical optimizer state of a checkpoint is ``DIR/optimizer/`` (growth.checkpoint:
``exp_avg/`` and ``exp_avg_sq/`` tensor directories with HF names, fp32, and
``state.json``). A stage exports it at the end; ``grow apply`` grows it with the same
operators as the weights; the next stage seeds its engine from it here. See
docs/optimizer_state.md for why this path was chosen over editing DeepSpeed universal
checkpoints.

Seeding (GROWTH_NOTES §6, "fallback that needs no files"): a fresh engine has no Adam
state (torch creates it lazily at the first step), so :func:`create_adam_state` puts zero
moments and the parent's step on every flat fp32 partition and relinks DeepSpeed's
per-parameter views of them; then :func:`set_full` writes each full tensor, and every
rank keeps its own slice. Works for ZeRO-0 (plain or bf16 optimizer), 1, 2 and 3.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growth.checkpoint import MOMENT_KINDS, OPTIMIZER_DIR, OPTIMIZER_STATE_NAME, CheckpointError, CheckpointReader
from growth.config import ModelConfig

# Attribute holding each param group's flat fp32 partition, per DeepSpeed optimizer wrapper.
FLAT_PARTITIONS = (
    "single_partition_of_fp32_groups",  # DeepSpeedZeroOptimizer (ZeRO-1/2)
    "fp32_partitioned_groups_flat",  # DeepSpeedZeroOptimizer_Stage3
    "fp32_groups_flat_partition",  # BF16_Optimizer (ZeRO-0 + bf16)
)


def base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a DeepSpeed wrapper (or ``opt`` itself)."""
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def flat_partitions(opt: Any) -> list[torch.Tensor] | None:
    for attr in FLAT_PARTITIONS:
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def _fp32_twin(opt: Any, p: nn.Parameter) -> torch.Tensor | None:
    """The fp32 master of ``p`` under FP16_UnfusedOptimizer (ZeRO-0 + bf16: one full fp32
    copy per parameter on every rank, no flat partitions)."""
    for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is p:
                return hp
    return None


def _state_targets(opt: Any) -> list[torch.Tensor]:
    flats = flat_partitions(opt)
    if flats is not None:
        return flats
    return [p for group in base_optimizer(opt).param_groups for p in group["params"]]


def relink(opt: Any) -> None:
    """Point DeepSpeed's per-parameter fragments at the current state tensors.

    Note: ZeRO-1/2 link once, right after the first param group's first step, when the
    later groups have no state yet; ``safe_get_full_optimizer_state`` then fails for every
    parameter outside group 0. Relinking after the state exists fixes that.
    """
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def create_adam_state(opt: Any, step: int, only_missing: bool = False) -> None:
    """Zero moments and Adam step ``step`` on every flat partition (torch AdamW layout)."""
    state = base_optimizer(opt).state
    for t in _state_targets(opt):
        if only_missing and "exp_avg" in state.get(t, {}):
            continue
        state[t] = {"step": torch.tensor(float(step), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
    relink(opt)


def adam_step(opt: Any) -> int:
    """The Adam step count of this rank's state (0 before the first update)."""
    state = base_optimizer(opt).state
    for t in _state_targets(opt):
        if "step" in state.get(t, {}):
            return int(state[t]["step"])
    return 0


# ---------------------------------------------------------------------- one parameter
def get_full(opt: Any, p: nn.Parameter, kind: str | None = None) -> torch.Tensor:
    """Full fp32 weight (``kind=None``) or Adam moment of ``p``.

    Collective over the data-parallel group under ZeRO-1/2/3: every rank of that group
    calls it for the same parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if kind is None else safe_get_full_optimizer_state(p, kind)
        return t.float()
    p = _fp32_twin(opt, p) if hasattr(opt, "fp32_groups") else p
    if kind is None:
        return p.detach().float()
    state = base_optimizer(opt).state.get(p, {})
    return state[kind].float() if kind in state else torch.zeros_like(p, dtype=torch.float32)


def set_full(opt: Any, p: nn.Parameter, value: torch.Tensor, kind: str | None = None) -> None:
    """Write the full fp32 ``value`` into this rank's slice (no communication)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(device=p.device, dtype=torch.float32)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        if kind is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, kind)
        return
    p = _fp32_twin(opt, p) if hasattr(opt, "fp32_groups") else p
    if kind is None:
        with torch.no_grad():
            p.copy_(value)
    else:
        base_optimizer(opt).state[p][kind].copy_(value)


def update_lp_params(opt: Any) -> None:
    """Copy the fp32 master partitions into the model's (bf16 or fp32) parameters."""
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2, BF16_Optimizer (collective)
        opt.update_lp_params()
    elif hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer (ZeRO-0 + bf16)
        with torch.no_grad():
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for lp, hp in zip(lp_group, hp_group, strict=True):
                    lp.copy_(hp)


# ---------------------------------------------------------------------- canonical files
def has_optimizer_state(checkpoint: str | Path | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).is_file()


def read_state_json(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME
    try:
        data = json.loads(path.read_text())
        step = data["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt optimizer state (needs an integer 'step' >= 0)") from None
    return data


def moment_readers(checkpoint: str | Path, config: ModelConfig) -> dict[str, CheckpointReader]:
    """One lazy reader per moment kind; shapes are checked against ``config``."""
    root = Path(checkpoint) / OPTIMIZER_DIR
    return {kind: CheckpointReader(root / kind, config=config) for kind in MOMENT_KINDS}


def seed_adam_state(opt: Any, named: Iterable[tuple[str, nn.Parameter]], checkpoint: str | Path,
                    config: ModelConfig) -> int:
    """Seed a fresh engine's Adam state from ``checkpoint/optimizer/``; returns the step.

    ``named`` yields ``(hf_name, param)`` for the parameters this rank holds. Every rank
    calls this (the final lp-parameter refresh is collective under ZeRO-1/2).
    """
    step = int(read_state_json(checkpoint)["step"])
    create_adam_state(opt, step)
    readers = moment_readers(checkpoint, config)
    try:
        for name, p in named:
            for kind, reader in readers.items():
                set_full(opt, p, reader.get(name, torch.float32), kind)
    finally:
        for reader in readers.values():
            reader.close()
    return step


def set_master_weights(opt: Any, named: Iterable[tuple[str, nn.Parameter]],
                       state_dict: dict[str, torch.Tensor]) -> None:
    """Write fp32 weights into the master copies and refresh the model's parameters.

    Note: in bf16 DeepSpeed builds the fp32 masters from the bf16-cast module; this puts
    the checkpoint's exact fp32 values back (a no-op in fp32).
    """
    for name, p in named:
        set_full(opt, p, state_dict[name])
    update_lp_params(opt)
