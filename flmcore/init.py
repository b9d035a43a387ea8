"""The init rule of fresh weights, shared by ``grow init``, the model and the growth operators.

Matrices are normal(0, std) with ``std = initializer_range``, divided by
sqrt(mup_scale_factor) for the block matrices under μP (their fan-in grows with width);
norm gains are ones. Random values are seeded by (seed, tensor name), so the same tensor
gets the same values whatever order or process writes it.
"""

from __future__ import annotations

import hashlib
import math

import torch

from flmcore.config import ModelConfig
from flmcore.params import is_block_matrix, is_norm


def param_init_std(config: ModelConfig, name: str) -> float:
    """Std of a fresh tensor ``name`` (HF name): 0 for norm gains (they start at one)."""
    if is_norm(name):
        return 0.0
    std = config.initializer_range
    if config.use_mup and is_block_matrix(name):
        std /= math.sqrt(config.mup_scale_factor)
    return std


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
