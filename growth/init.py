"""Randomly initialised checkpoints, written tensor by tensor (``grow init``).

The usual start of stage 1, and what tests and benchmarks build their inputs with.
Every tensor comes from :func:`growth.model.init_tensor`, seeded by (seed, name), so the
bytes depend only on config, seed and dtype — not on shard size or write order. Tensors
are generated lazily and fed to :func:`growth.checkpoint.save_checkpoint`, which flushes a
shard as soon as it fills: at most one shard plus one fp32 tensor is in memory.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from growth.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    CheckpointError,
    append_event,
    new_history,
    save_checkpoint,
    torch_dtype,
)
from growth.config import ModelConfig
from growth.model import init_tensor

INIT_EVENT = "init"


def iter_init_tensors(config: ModelConfig, seed: int, dtype: torch.dtype,
                      progress: tqdm | None = None,
                      log_tensors: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fresh tensor) in canonical order, generated one at a time."""
    for name, shape in config.tensor_shapes().items():
        tensor = init_tensor(config, name, shape, seed, dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if progress is not None:
            progress.update(nbytes)
            if log_tensors:
                progress.write(f"{name} {list(shape)} {DTYPE_NAMES[dtype]} {nbytes} B")
        yield name, tensor


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), or physical memory where that is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_resources(config: ModelConfig, dtype: torch.dtype, out: Path) -> None:
    """Refuse, before any work, a checkpoint whose largest tensor cannot be held in memory
    (generated in fp32, then cast) or whose bytes do not fit on OUT's filesystem."""
    name, shape = max(config.tensor_shapes().items(), key=lambda kv: math.prod(kv[1]))
    need = math.prod(shape) * 4 * 2  # the fp32 draw and its cast
    have = available_memory()
    if need > have:
        raise CheckpointError(f"tensor '{name}' {list(shape)} needs {need / 1e9:.3g} GB of memory to "
                              f"generate, {have / 1e9:.3g} GB are available; choose a smaller config")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    total = config.bytes(DTYPE_NAMES[dtype])
    if total > free:
        raise CheckpointError(f"{out}: the checkpoint needs {total / 1e9:.3g} GB, {parent} has "
                              f"{free / 1e9:.3g} GB free")


def init_checkpoint(config: ModelConfig, out: str | Path, seed: int = 0,
                    dtype: torch.dtype | str = "float32",
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    progress: bool = False, log_tensors: bool = False,
                    source: str | None = None) -> Path:
    """Write a fresh checkpoint of ``config`` to ``out`` (which must not exist or be empty).

    ``source`` (a flavor name or config path) is recorded in the history's init event;
    ``progress`` shows a byte-counting bar on stderr, ``log_tensors`` one line per tensor.
    Note: the directory appears only when complete (``save_checkpoint`` stages it), so a
    failed or interrupted init leaves nothing that looks like a checkpoint.
    """
    cast = torch_dtype(dtype)
    check_resources(config, cast, Path(out))
    event = {"kind": INIT_EVENT, "seed": int(seed), "config": source or "custom",
             "dtype": DTYPE_NAMES[cast]}
    history = append_event(new_history(), event)
    bar = tqdm(total=config.bytes(DTYPE_NAMES[cast]), unit="B", unit_scale=True,
               unit_divisor=1024, desc="init", disable=not (progress or log_tensors))
    try:
        tensors = iter_init_tensors(config, seed, cast, bar if not bar.disable else None, log_tensors)
        return save_checkpoint(out, config, tensors, history=history,
                               max_shard_size=max_shard_size, dtype=cast)
    finally:
        bar.close()
