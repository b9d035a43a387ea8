"""Adam state in and out of a DeepSpeed engine, by parameter, in full (unpartitioned) shape.

The canonical optimizer state of a checkpoint is ``DIR/optimizer/`` (growth.checkpoint:
``exp_avg/`` and ``exp_avg_sq/`` tensor directories with HF names, fp32, and
``state.json``). A stage exports it at the end; ``grow apply`` grows it with the same
operators as the weights; the next stage seeds its engine from it here. See
docs/optimizer_state.md for why this path was chosen over editing DeepSpeed universal
checkpoints.

Seeding (no files needed): a fresh engine has no Adam
state (torch creates it lazily at the first step), so :func:`create_adam_state` puts zero
moments and the parent's step on every flat fp32 partition and relinks DeepSpeed's
per-parameter views of them; then :func:`set_full` writes each full tensor, and every
rank keeps its own slice. Works for ZeRO-0 (plain or bf16 optimizer), 1, 2 and 3. The
DeepSpeed internals this needs are in ``stages.engines.ds_compat``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growth.checkpoint import OPTIMIZER_DIR, OPTIMIZER_STATE_NAME, CheckpointError, open_moments, read_optimizer_state
from growth.config import ModelConfig
from stages.engines.ds_compat import (
    base_optimizer,
    flat_partitions,
    fp32_twin,
    is_deepspeed_mapped,
    relink,
    update_lp_params,
)


def _state_targets(opt: Any) -> list[torch.Tensor]:
    flats = flat_partitions(opt)
    if flats is not None:
        return flats
    return [p for group in base_optimizer(opt).param_groups for p in group["params"]]


def create_adam_state(opt: Any, step: int, only_missing: bool = False) -> None:
    """Zero moments and Adam step ``step`` on every flat partition (torch AdamW layout)."""
    inner = base_optimizer(opt)
    state = inner.state
    fused = all(group.get("fused") for group in inner.param_groups)
    for t in _state_targets(opt):
        if only_missing and "exp_avg" in state.get(t, {}):
            continue
        # fused AdamW keeps ``step`` on the parameter's device (as torch's own lazy init does)
        state[t] = {"step": torch.tensor(float(step), dtype=torch.float32, device=t.device if fused else "cpu"),
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

    if is_deepspeed_mapped(p):
        t = safe_get_full_fp32_param(p) if kind is None else safe_get_full_optimizer_state(p, kind)
        return t.float()
    p = fp32_twin(opt, p)
    if kind is None:
        return p.detach().float()
    state = base_optimizer(opt).state.get(p, {})
    return state[kind].float() if kind in state else torch.zeros_like(p, dtype=torch.float32)


def set_full(opt: Any, p: nn.Parameter, value: torch.Tensor, kind: str | None = None) -> None:
    """Write the full fp32 ``value`` into this rank's slice (no communication)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(device=p.device, dtype=torch.float32)
    if is_deepspeed_mapped(p):
        if kind is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, kind)
        return
    p = fp32_twin(opt, p)
    if kind is None:
        with torch.no_grad():
            p.copy_(value)
    else:
        base_optimizer(opt).state[p][kind].copy_(value)


# ---------------------------------------------------------------------- canonical files
def has_optimizer_state(checkpoint: str | Path | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).is_file()


def seed_adam_state(opt: Any, named: Iterable[tuple[str, nn.Parameter]], checkpoint: str | Path,
                    config: ModelConfig) -> int:
    """Seed a fresh engine's Adam state from ``checkpoint/optimizer/``; returns the step.

    ``named`` yields ``(hf_name, param)`` for the parameters this rank holds. Every rank
    calls this (the final lp-parameter refresh is collective under ZeRO-1/2).
    """
    state = read_optimizer_state(checkpoint)
    if state is None:
        raise CheckpointError(f"{checkpoint}: no {OPTIMIZER_DIR}/ to seed Adam from")
    step = int(state["step"])
    create_adam_state(opt, step)
    readers = open_moments(checkpoint, config)
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
