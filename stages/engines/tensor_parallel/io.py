"""Canonical checkpoint ⇄ tensor-parallel model, one tensor at a time.

- :func:`read_shard` / :func:`load_tp_model`: a TP rank reads only its slice of each split
  tensor with safetensors ``get_slice`` (rows ``[a:b]`` or columns ``[:, a:b]``; the bytes of
  other ranks' slices are never materialised) and the replicated norms whole, then assigns
  them into a model built on the meta device. growth.checkpoint's reader hands out whole
  tensors only, so the shard files it located are opened here with ``safe_open``.
- :func:`gather_tensors` / :func:`save_gathered`: the reverse, streaming. For each HF name
  in canonical order the TP ranks' shards are gathered to rank 0 (``dist.gather``, one tensor
  in flight), concatenated along the split dimension and handed to
  ``growth.checkpoint.save_checkpoint`` (which flushes shard files as they fill), so a stage
  exported at any TP degree is the same canonical checkpoint, and the next stage may read it
  at another degree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from growth.checkpoint import (
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    CheckpointError,
    CheckpointReader,
    read_optimizer_state,
    save_checkpoint,
    torch_dtype,
)
from growth.config import ModelConfig
from stages.engines import optim_state
from stages.engines.tensor_parallel.layers import TPForCausalLM, shard_dim, shard_range


class ShardReader:
    """A rank's view of a canonical checkpoint: ``get(name)`` is this rank's shard only."""

    def __init__(self, directory: str | Path, rank: int, tp: int, config: ModelConfig | None = None):
        self.reader = CheckpointReader(directory, config=config)  # config: a moment directory
        self.config: ModelConfig = self.reader.config
        self.rank, self.tp = rank, tp
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0  # bytes of tensor data materialised by get()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        fname = self.reader.weight_map[name]
        handle = self._handles.get(fname)
        if handle is None:
            handle = self._handles[fname] = safe_open(str(self.reader.directory / fname), framework="pt",
                                                      device="cpu")
        view = handle.get_slice(name)
        shape = tuple(view.get_shape())
        dim = shard_dim(name)
        if dim is None or self.tp == 1:
            t = view[:]
        else:
            start, stop = shard_range(shape[dim], self.rank, self.tp)
            t = view[start:stop] if dim == 0 else view[:, start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def close(self) -> None:
        self._handles.clear()
        self.reader.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_shards(directory: str | Path, rank: int, tp: int, config: ModelConfig | None = None,
                dtype: torch.dtype | None = torch.float32,
                names: Iterable[str] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, this rank's shard of every tensor, or of ``names`` only: a pipeline stage's)
    of a checkpoint or moment directory."""
    with ShardReader(directory, rank, tp, config) as shards:
        wanted = shards.config.tensor_shapes() if names is None else names
        return shards.config, {name: shards.get(name, dtype) for name in wanted}


def tp_model(config: ModelConfig, state: dict[str, torch.Tensor], group: Any = None, tp: int = 1,
             rank: int = 0, sp: bool = False) -> TPForCausalLM:
    """A TP rank whose parameters *are* the given shards (``assign=True``, no copy)."""
    with torch.device("meta"):
        model = TPForCausalLM(config, group, tp, rank, sp)
    model.load_state_dict(state, assign=True, strict=True)
    if config.growth_mask is not None:
        model.set_growth_mask(config.growth_mask)
    return model


def load_tp_model(directory: str | Path, group: Any = None, tp: int = 1, rank: int = 0,
                  dtype: torch.dtype = torch.float32, sp: bool = False) -> TPForCausalLM:
    """Rank ``rank`` of a TP-``tp`` model from a canonical checkpoint (its slices only)."""
    config, state = read_shards(directory, rank, tp, dtype=dtype)
    return tp_model(config, state, group, tp, rank, sp)


def gather_tensors(model: TPForCausalLM, tensors: dict[str, torch.Tensor] | None = None,
                   dst: int = 0, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(HF name, full tensor) in canonical order on the group's rank ``dst``, (name, None)
    elsewhere; every rank of the TP group must iterate it to the end (collective).

    ``tensors`` are per-rank shards laid out like the parameters (default: the parameters;
    gradients or Adam moments gather the same way); ``names`` defaults to every tensor."""
    params = dict(model.named_parameters()) if tensors is None else tensors
    for name in names or model.config.tensor_shapes():
        yield name, gather_shard(name, params[name], model.group, model.tp, model.rank, dst)


def gather_shard(name: str, local: torch.Tensor, group: Any, tp: int, rank: int,
                 dst: int = 0) -> torch.Tensor | None:
    """The full tensor ``name`` on TP rank ``dst`` of ``group`` (None on the others) from each
    rank's shard ``local`` (collective over the TP group; a replicated tensor is not sent)."""
    local = local.detach().contiguous()
    dim = shard_dim(name)
    if dim is None or tp == 1:
        return local.clone() if rank == dst else None
    parts = [torch.empty_like(local) for _ in range(tp)] if rank == dst else None
    dist.gather(local, parts, dst=dst if group is None else dist.get_global_rank(group, dst), group=group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def save_gathered(model: TPForCausalLM, out: str | Path, dtype: str | None = None,
                  history: dict[str, Any] | None = None) -> Path | None:
    """Gather a TP model into canonical checkpoint ``out`` (written by TP rank 0; the mask
    record as it stands). Returns the path on rank 0, None on the others."""
    stream = gather_tensors(model)
    if model.rank != 0:
        for _ in stream:
            pass
        return None
    pairs = ((name, t) for name, t in stream if t is not None)
    return save_checkpoint(out, model.config, pairs, history=history, dtype=torch_dtype(dtype))


def seed_sliced_moments(optimizer: Any, params: dict[str, torch.nn.Parameter], checkpoint: str | Path,
                        config: ModelConfig, tp_rank: int, tp: int) -> int:
    """Create Adam state at the step of ``checkpoint/optimizer/`` and set the moments of
    ``params`` (HF name → this rank's parameter) from TP rank ``tp_rank``'s slices of them."""
    meta = read_optimizer_state(checkpoint)
    if meta is None:
        raise CheckpointError(f"{checkpoint}: no {OPTIMIZER_DIR}/ to seed Adam from")
    step = int(meta["step"])
    optim_state.create_adam_state(optimizer, step)
    for kind in MOMENT_KINDS:
        moments = Path(checkpoint) / OPTIMIZER_DIR / kind
        _, slices = read_shards(moments, tp_rank, tp, config=config, names=list(params))
        for name, value in slices.items():
            optim_state.set_full(optimizer, params[name], value, kind)
        del slices
    return step
