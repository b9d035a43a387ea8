"""Export a checkpoint for other tools (``grow export-hf --format llama|teleflm``).

``llama`` (default): a plain HF ``LlamaForCausalLM`` checkpoint. transformers' Llama has
no μP multipliers, growth masks or padded-vocab masking, so each is folded into the
weights (fp32 arithmetic, then the output dtype):

- μP: ``embed_tokens *= input_mult``; ``lm_head *= output_mult / mup_scale_factor``.
- MSG masks: refused while c < 1 (the masked model is a different function); at c = 1
  the masked model *is* the plain one, so the record is dropped.
- vocab padding: rows ≥ ``valid_vocab_size`` are cropped from embed_tokens and lm_head
  (our model gives them −inf logits; a plain Llama would not), so the exported softmax
  over the valid ids is exactly ours.

``teleflm``: what the Tele-FLM release's own code (``modeling_teleflm.py``) and vLLM's
TeleFLM load: the multipliers stay in config.json (``use_mup``, ``input_mult``,
``output_mult``, ``mup_scale_factor``), the release's fields (``model_type`` "TeleFLM",
``auto_map``, token ids, …) and files (tokenizer, ``*.py``) are kept, shards are bf16 by
default. Masks and vocab padding are handled as for ``llama``.

Tensors stream one at a time through :class:`growth.checkpoint.CheckpointWriter`; the
directory appears only when complete. The history is kept, with an ``export`` event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    append_event,
    config_dict,
    event_time,
    parse_size,
    torch_dtype,
)
from growth.config import CONFIG_NAME, ModelConfig
from growth.executor import output_dtype, shard_tasks

EXPORT_EVENT = "export-hf"
MUP_KEYS = ("use_mup", "input_mult", "output_mult", "mup_scale_factor")
FORMATS = ("llama", "teleflm")
TELEFLM_IDENTITY = {"model_type": "TeleFLM", "architectures": ["TeleFLMForCausalLM"]}


def plain_config(config: ModelConfig, source: str = CONFIG_NAME) -> ModelConfig:
    """The Llama config computing ``config``'s function on its valid vocab (see module doc)."""
    mask = config.growth_mask
    if mask is not None and float(mask["c"]) < 1.0:
        raise CheckpointError(
            f"{source}: field 'growth_mask.c' is {mask['c']}: MSG masks are still ramping and a plain "
            f"Llama cannot express them; train until c = 1 (the masks fold away), then export")
    return config.replace(use_mup=False, input_mult=1.0, output_mult=1.0, mup_scale_factor=1.0,
                          growth_mask=None, valid_vocab_size=None, tie_word_embeddings=False,
                          vocab_size=config.valid_vocab_size or config.vocab_size, extra=dict(config.extra))


def teleflm_config(config: ModelConfig, source: str = CONFIG_NAME) -> ModelConfig:
    """``config`` with finished masks dropped and vocab padding cropped; μP kept."""
    folded = plain_config(config, source)
    return config.replace(growth_mask=None, valid_vocab_size=None, tie_word_embeddings=False,
                          vocab_size=folded.vocab_size, extra=dict(config.extra))


def teleflm_config_dict(config: ModelConfig, raw: dict[str, Any] | None, dtype: torch.dtype) -> dict[str, Any]:
    data = config_dict(config, raw, dtype)
    if str(data.get("model_type", "")).lower() != "teleflm" or raw is None \
            or str(raw.get("model_type", "")).lower() != "teleflm":
        data.update(TELEFLM_IDENTITY)
    data.update({k: v for k, v in config.to_hf_dict().items() if k in MUP_KEYS})
    data["torch_dtype"] = DTYPE_NAMES[dtype]
    return data


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    data = config.to_hf_dict()
    for key in MUP_KEYS:
        data.pop(key, None)
    data["dtype"] = DTYPE_NAMES[dtype]
    return data


def exported_tensor(source: CheckpointReader, config: ModelConfig, name: str,
                    fold_mup: bool = True) -> torch.Tensor:
    """``name`` of the exported model: vocab rows cropped, μP multipliers folded (llama).
    Tensors that need no change come back in their stored dtype (no fp32 round trip)."""
    if name not in ("model.embed_tokens.weight", "lm_head.weight"):
        return source.get(name)
    valid = config.valid_vocab_size or config.vocab_size
    scale = (config.embedding_scale if name.startswith("model.") else config.logit_scale) if fold_mup else 1.0
    if scale == 1.0:
        t = source.get(name)
        return t[:valid].clone() if valid < t.shape[0] else t  # the clone frees the cropped rows
    return source.get(name, torch.float32)[:valid] * scale


def export_hf(src: str | Path, out: str | Path, dtype: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, format: str = "llama") -> Path:
    """Write ``src`` as a ``format`` checkpoint at ``out`` (which must be new or empty)."""
    if format not in FORMATS:
        raise CheckpointError(f"--format {format}: use one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise CheckpointError(f"--max-shard-size must be positive, got {max_shard_size!r}")
    with CheckpointWriter(out) as writer, CheckpointReader(src) as reader:
        config = reader.config
        if format == "llama":
            cast = output_dtype(reader, dtype)
            exported = plain_config(config, str(src / CONFIG_NAME))
            data = hf_config_dict(exported, cast)
        else:
            cast = torch_dtype(dtype) if dtype is not None else torch.bfloat16
            exported = teleflm_config(config, str(src / CONFIG_NAME))
            data = teleflm_config_dict(exported, reader.raw_config, cast)
        event = {"kind": EXPORT_EVENT, "time": event_time(),
                 "format": "hf-llama" if format == "llama" else "teleflm", "dtype": DTYPE_NAMES[cast],
                 "folded": {"input_mult": config.embedding_scale if format == "llama" else 1.0,
                            "logit_scale": config.logit_scale if format == "llama" else 1.0,
                            "growth_mask": config.growth_mask, "vocab_cropped_to": exported.vocab_size},
                 "parent": {"path": str(src.resolve()), "fingerprint": reader.fingerprint()}}
        tasks = shard_tasks(exported, cast, limit)
        for task in tasks:
            writer.write_shard(task.path, task.entries,
                               lambda n: exported_tensor(reader, config, n, fold_mup=format == "llama"))
        writer.write_index("", {n: t.path for t in tasks for n, _, _ in t.entries},
                           sum(t.nbytes for t in tasks))
        writer.write_config(exported, data=data)
        event["carried"] = writer.carry(src)
        writer.write_history(append_event(reader.history, event))
        return writer.publish()
