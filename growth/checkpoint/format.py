"""The checkpoint directory's names, sizes, dtypes, history (growth.json) and config.json."""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import torch

from flmcore.safe_files import is_regular
from growth.config import ModelConfig
from growth.tensor_io import (
    CheckpointError,
)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HISTORY_NAME = "growth.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
FORMAT_VERSION = 1
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE_NAME = "state.json"
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old HF Llama checkpoints carry this buffer
# Files of a release that travel with the weights (tokenizer, generation defaults, the
# release's own modeling/configuration/tokenization code).
CARRIED_NAMES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "*.py")
MANIFEST_SUFFIX = ".manifest.json"
LOCK_SUFFIX = ".lock"

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1024' → bytes (finite, positive or zero)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    number, mult = s, 1
    for unit, m in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)], m
            break
    try:
        value = float(number) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0 or value > 2**62:
        raise CheckpointError(f"bad size '{text}': use a finite number of bytes or a unit such as "
                              f"500MB, 5GB")
    return int(value)


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype '{name}': use float32 or bfloat16")
    return DTYPES[name]


def confined(directory: Path, fname: Any, source: Path) -> str:
    """``fname`` when it names a plain file inside ``directory``; else a CheckpointError.

    Note: shard names come from an index anyone can edit; an absolute path, ``..`` or a
    sub-path would make the reader open files outside the checkpoint (``/etc/passwd``).
    Symlinked shard files are allowed (the HF hub cache links into its blob store).
    """
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname
            or "\\" in fname or "\0" in fname or Path(fname).name != fname):
        raise CheckpointError(f"{source}: shard name {fname!r} is not a file name inside "
                              f"{directory}; refused")
    return fname


def carried_files(directory: Path, regular: bool = True) -> list[str]:
    """Names of the release files in ``directory`` that travel with the weights: regular
    files only (``regular=False``: the symlinks and other entries of those names instead)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if is_regular(p) == regular and any(fnmatch.fnmatch(p.name, pat) for pat in CARRIED_NAMES))



# ---------------------------------------------------------------------- history
def new_history() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "events": []}


def read_history(directory: Path) -> dict[str, Any]:
    path = directory / HISTORY_NAME
    if not path.is_file():
        return new_history()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("events"), list):
            raise ValueError
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: corrupt growth history (needs an 'events' list)") from None
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' {data['format_version']} is newer "
                              f"than this flm-growth ({FORMAT_VERSION}); upgrade flm-growth")
    return data


def parent_fingerprint(directory: str | Path) -> str | None:
    """The content fingerprint of the parent DIRECTORY was last grown from (growth.json's
    last ``grow`` event), or None. Compare it with ``CheckpointReader(parent).fingerprint()``
    to know whether a grown checkpoint still matches its parent."""
    for event in reversed(read_history(Path(directory))["events"]):
        if isinstance(event, dict) and event.get("kind") == "grow":
            parent = event.get("parent")
            return parent.get("fingerprint") if isinstance(parent, dict) else None
    return None


def append_event(history: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``history`` with ``event`` (timestamped) appended."""
    stamped = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **event}
    return {**history, "format_version": FORMAT_VERSION, "events": [*history["events"], stamped]}


# ---------------------------------------------------------------------- config.json
KEEP_RELEASE_KEYS = ("architectures", "model_type", "auto_map")
ADDED_ONLY_IF_NEW = ("rope_parameters", "mlp_bias", "attention_bias", "hidden_act", "head_dim",
                     "initializer_range")


def config_dict(config: ModelConfig, raw: dict[str, Any] | None = None,
                dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json for ``config``: ``raw`` (the source's own dict) with every field kept and
    only what ``config`` changes updated; without ``raw``, ``config.to_hf_dict()``.

    Note: a release's ``model_type`` / ``architectures`` / ``auto_map`` are kept (the
    release's code loads by them), except that a plain Llama source that growth made
    non-plain (masks, μP) takes ours, so transformers cannot load it as a plain Llama.
    """
    new = config.to_hf_dict()
    if raw is None:
        return new
    out = dict(raw)
    plain_source = str(raw.get("model_type", "llama")).lower() == "llama"
    keep_release = not (plain_source and not config.is_plain_llama)
    implied_head_dim = config.hidden_size // config.num_attention_heads
    for key, value in new.items():
        if key in KEEP_RELEASE_KEYS and key in raw and keep_release:
            continue
        if key not in raw and key in ADDED_ONLY_IF_NEW and not (key == "head_dim" and value != implied_head_dim):
            continue
        out[key] = value
    for key in ("growth_mask", "valid_vocab_size"):
        if key not in new:
            out.pop(key, None)
    if dtype is not None:
        name = DTYPE_NAMES[dtype]
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        for k in keys:
            out[k] = name
    return out


