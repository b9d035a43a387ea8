"""Export a checkpoint as a plain HF Llama checkpoint (``grow export-hf``).

transformers' ``LlamaForCausalLM`` has no μP multipliers, growth masks or padded-vocab
masking, so each is folded into the weights (fp32 arithmetic, then the output dtype):

- μP: ``embed_tokens *= input_mult``; ``lm_head *= output_mult / mup_scale_factor``.
- MSG masks: refused while c < 1 (the masked model is a different function); at c = 1
  the masked model *is* the plain one, so the record is dropped.
- vocab padding: rows ≥ ``valid_vocab_size`` are cropped from embed_tokens and lm_head
  (our model gives them −inf logits; a plain Llama would not), so the exported softmax
  over the valid ids is exactly ours.

Tensors stream one at a time into header-first shards (:mod:`growth.tensor_io`); the
directory appears only when complete. The history is kept, with an ``export`` event.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    HISTORY_NAME,
    CheckpointError,
    CheckpointReader,
    append_event,
    check_output_dir,
    parse_size,
    publish,
    write_index,
)
from growth.config import ModelConfig
from growth.executor import event_time, output_dtype, shard_tasks
from growth.tensor_io import TensorSource, write_shard_streaming

EXPORT_EVENT = "export-hf"
MUP_KEYS = ("use_mup", "input_mult", "output_mult", "mup_scale_factor")


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


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    data = config.to_hf_dict()
    for key in MUP_KEYS:
        data.pop(key, None)
    data["dtype"] = DTYPE_NAMES[dtype]
    return data


def exported_tensor(source: TensorSource, config: ModelConfig, name: str) -> torch.Tensor:
    """``name`` of the plain model, fp32: vocab rows cropped, μP multipliers folded."""
    t = source.get(name, torch.float32)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        valid = config.valid_vocab_size or config.vocab_size
        scale = config.embedding_scale if name.startswith("model.") else config.logit_scale
        t = t[:valid]
        t = t * scale if scale != 1.0 else t.clone()  # the clone frees the cropped rows
    return t


def export_hf(src: str | Path, out: str | Path, dtype: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``src`` as a plain Llama checkpoint at ``out`` (which must be new or empty)."""
    src, out = Path(src), Path(out)
    check_output_dir(out)
    reader = CheckpointReader(src)
    cast = output_dtype(reader, dtype)
    config = reader.config
    plain = plain_config(config, str(src / CONFIG_NAME))
    tasks = shard_tasks(plain, cast, parse_size(max_shard_size))
    event = {"kind": EXPORT_EVENT, "time": event_time(), "format": "hf-llama", "dtype": DTYPE_NAMES[cast],
             "folded": {"input_mult": config.embedding_scale, "logit_scale": config.logit_scale,
                        "growth_mask": config.growth_mask, "vocab_cropped_to": plain.vocab_size},
             "parent": {"path": str(src.resolve()), "fingerprint": reader.fingerprint()}}
    tmp = out.parent / f".{out.name}.export-partial"  # not resumable: always started afresh
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with TensorSource(reader) as source:
            for task in tasks:
                write_shard_streaming(tmp / task.path, task.entries,
                                      lambda n: exported_tensor(source, config, n))
        write_index(tmp, {n: t.path for t in tasks for n, _, _ in t.entries}, sum(t.nbytes for t in tasks))
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config_dict(plain, cast), indent=2, sort_keys=True) + "\n")
        history = append_event(reader.history, event)
        (tmp / HISTORY_NAME).write_text(json.dumps(history, indent=2) + "\n")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

