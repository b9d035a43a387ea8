"""`grow info FLAVOR|CONFIG_JSON|CHECKPOINT_DIR [--json]`: config, sizes, shards, history.

Flavors and config files are described from the config alone (shapes are arithmetic, no
tensor is built, not even on the meta device), so ``grow info 1t`` is instant. A directory
is opened with :class:`growth.checkpoint.CheckpointReader`, which reads headers only and
checks every tensor's shape against ``config.json``: ``grow info DIR`` is also the quick
"is this checkpoint sound?" check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from growth.config import DTYPE_BYTES, FLAVORS, ModelConfig, resolve_config
from growth.history import event_line

SIZE_DTYPES = ("float32", "bfloat16")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info", help="show a flavor's, config's or checkpoint's shape, size and history",
        description="Show the config, parameter count and bytes per dtype of a flavor, a "
                    "config.json or a checkpoint directory; for a directory also its shards, "
                    "dtypes and growth history. Reads headers only, never tensor data.")
    p.add_argument("target", metavar="FLAVOR|CONFIG_JSON|CHECKPOINT_DIR",
                   help=f"one of {', '.join(FLAVORS)}, a config.json, or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def describe_config(config: ModelConfig) -> dict[str, Any]:
    """Counts that need only the config: params (and which vocab they used), bytes."""
    params = config.params
    return {
        "params": params,
        "vocab_size": config.vocab_size,
        "num_tensors": config.num_tensors,  # arithmetic: a 10⁹-layer config is not listed
        "bytes": {d: params * DTYPE_BYTES[d] for d in SIZE_DTYPES},
        "config": config.to_hf_dict(),
        # Tele-FLM's releases change output_mult with the size: compare the product (docs/mup.md)
        "mup": {"logit_scale": config.logit_scale, "base_width": config.hidden_size / config.mup_scale_factor}
        if config.use_mup else None,
    }


def describe_checkpoint(directory: Path) -> dict[str, Any]:
    """describe_config plus what is on disk: shards, stored dtypes, history."""
    from growth.checkpoint import DTYPE_NAMES, CheckpointReader  # torch: only for directories

    with CheckpointReader(directory) as reader:
        info = describe_config(reader.config)
        per_file: dict[str, dict[str, Any]] = {f: {"file": f, "tensors": 0} for f in reader.files}
        for fname in reader.weight_map.values():
            per_file[fname]["tensors"] += 1
        for fname, entry in per_file.items():
            entry["bytes"] = (directory / fname).stat().st_size
        dtypes: dict[str, int] = {}
        for name in reader.weight_map:
            key = DTYPE_NAMES.get(reader.dtype(name), str(reader.dtype(name)))
            dtypes[key] = dtypes.get(key, 0) + 1
        info.update({
            "tied_on_disk": reader.tied,
            "shards": list(per_file.values()),
            "tensor_bytes": reader.total_bytes,
            "dtypes": dtypes,
            "fingerprint": reader.fingerprint(),
            "history": reader.history,
        })
    return info


def describe(target: str) -> dict[str, Any]:
    path = Path(target)
    if target.lower() not in FLAVORS and path.is_dir():
        return {"source": str(path), "kind": "checkpoint", **describe_checkpoint(path)}
    kind = "flavor" if target.lower() in FLAVORS else "config"
    return {"source": target, "kind": kind, **describe_config(resolve_config(target))}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def human_params(n: int) -> str:
    """Billions above 1e9 (the seed table writes 1,083.74B, not 1.08T)."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return str(n)


def shape_line(c: dict[str, Any]) -> str:
    """One line with the shape of an HF config dict (shared with `grow inspect`)."""
    return (f"{'shape':<10} layers {c['num_hidden_layers']}, hidden {c['hidden_size']}, "
            f"ffn {c['intermediate_size']}, heads {c['num_attention_heads']} "
            f"(kv {c['num_key_value_heads']}, head_dim {c['head_dim']}), vocab {c['vocab_size']}"
            + (f" ({c['valid_vocab_size']} valid)" if c.get("valid_vocab_size") else ""))


def render(info: dict[str, Any]) -> str:
    c = info["config"]
    lines = [
        f"{info['kind']:<10} {info['source']}  ({c['model_type']})",
        shape_line(c),
        f"{'':<10} rope_theta {c['rope_theta']:g}, rms_norm_eps {c['rms_norm_eps']:g}, "
        f"tie_word_embeddings {str(c['tie_word_embeddings']).lower()}",
    ]
    if c["use_mup"]:
        scale, base = c["output_mult"] / c["mup_scale_factor"], c["hidden_size"] / c["mup_scale_factor"]
        lines.append(f"{'μP':<10} input_mult {c['input_mult']:g}, output_mult {c['output_mult']:g}, "
                     f"mup_scale_factor {c['mup_scale_factor']:g}")
        lines.append(f"{'':<10} effective logit scale output_mult / mup_scale_factor = {scale:.6g} "
                     f"(1/{1 / scale:.4g}); implied base width hidden / mup_scale_factor = {base:g}")
    if c.get("growth_mask"):
        lines.append(f"{'masks':<10} MSG growth masks live: {json.dumps(c['growth_mask'])}")
    lines.append(f"{'params':<10} {info['params']:,} ({human_params(info['params'])}, "
                 f"counted with vocab {info['vocab_size']}, untied lm_head)")
    lines.append(f"{'bytes':<10} " + ", ".join(f"{d} {human_bytes(b)}" for d, b in info["bytes"].items()))
    if info["kind"] != "checkpoint":
        return "\n".join(lines)
    dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(info["dtypes"].items()))
    lines.append(f"{'on disk':<10} {human_bytes(info['tensor_bytes'])} of tensors in "
                 f"{len(info['shards'])} file(s); dtypes {dtypes}"
                 + ("; tied embeddings (lm_head reads embed_tokens)" if info["tied_on_disk"] else ""))
    for shard in info["shards"]:
        lines.append(f"{'':<10} {shard['file']}  {human_bytes(shard['bytes'])}, {shard['tensors']} tensors")
    events = info["history"].get("events", [])
    lines.append(f"{'history':<10} format {info['history'].get('format_version')}, {len(events)} event(s)")
    for i, event in enumerate(events):
        lines.append(f"{'':<10} {event_line(event, i, info['source'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.target)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
