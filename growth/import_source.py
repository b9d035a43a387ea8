"""What ``grow import`` found in a source checkpoint: :class:`Source`, :class:`TensorInfo` and
:func:`canonical`, shared by the HF readers (growth.importer) and the DeepSpeed one
(growth.ds_import), below both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import IGNORED_SUFFIXES, CheckpointError, new_history
from growth.config import ModelConfig


@dataclass
class TensorInfo:
    file: str  # shard file name (or reader name)
    key: str  # name inside the file
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Source:
    """A checked source: config, where every canonical tensor lives, how to read it."""

    directory: Path
    format: str  # hf-pickle | hf-safetensors | deepspeed-zero | deepspeed-universal
    config: ModelConfig
    raw_config: dict[str, Any] | None
    tensors: dict[str, TensorInfo]
    files: dict[str, int] = field(default_factory=dict)  # source file → size
    moments: bool = False
    optimizer_state: dict[str, Any] | None = None
    history: dict[str, Any] = field(default_factory=new_history)

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self.tensors.values()}


def canonical(found: dict[str, TensorInfo], config: ModelConfig, src: Path,
              listing: Path) -> dict[str, TensorInfo]:
    """Map the found tensors onto config's canonical names (untying a tied embedding),
    checking names and shapes against config.json."""
    expected = config.tensor_shapes()
    for key, info in found.items():
        if key not in expected and not key.endswith(IGNORED_SUFFIXES):
            raise CheckpointError(f"{src / info.file}: unknown tensor '{key}' (not a Tele-FLM/Llama "
                                  f"parameter of config.json)")
    out: dict[str, TensorInfo] = {}
    for name, shape in expected.items():
        info = found.get(name)
        if info is None and name == "lm_head.weight" and config.tie_word_embeddings:
            info = found.get("model.embed_tokens.weight")
        if info is None:
            raise CheckpointError(f"{listing}: tensor '{name}' is missing")
        if info.shape != shape:
            raise CheckpointError(f"{src / info.file}: tensor '{info.key}' has shape {list(info.shape)} "
                                  f"but config.json implies {list(shape)}")
        out[name] = info
    return out
