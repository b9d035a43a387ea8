"""`grow export-hf DIR --out OUT [--format llama|teleflm]`: a checkpoint other tools load.

``llama``: μP multipliers, finished MSG masks and vocab padding folded into the weights, a
plain transformers Llama. ``teleflm``: multipliers kept in config.json with the release's
fields and files, bf16 — what Tele-FLM's own code and vLLM's TeleFLM load. See
:mod:`growth.hf_export`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from growth.checkpoint import DEFAULT_MAX_SHARD_SIZE
from growth.config import CONFIG_NAME, ModelConfig
from growth.hf_export import export_hf


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-hf", help="write an HF checkpoint: plain Llama (μP folded) or Tele-FLM (μP kept)",
        description="--format llama (default): DIR as a plain transformers LlamaForCausalLM "
                    "checkpoint: embed_tokens × input_mult, lm_head × output_mult / "
                    "mup_scale_factor, vocab cropped to valid_vocab_size, MSG masks dropped at "
                    "c = 1 (refused while c < 1). --format teleflm: the multipliers stay in "
                    "config.json with the release's own fields (model_type TeleFLM, auto_map, "
                    "token ids) and files (tokenizer, *.py), bf16 by default, for the release's "
                    "modeling_teleflm.py and vLLM. Streams tensor by tensor; an existing "
                    "non-empty OUT is never overwritten.")
    p.add_argument("directory", metavar="DIR", help="checkpoint directory")
    p.add_argument("--out", required=True, metavar="OUT", help="new HF checkpoint directory")
    p.add_argument("--format", choices=["llama", "teleflm"], default="llama",
                   help="llama: plain LlamaForCausalLM, μP folded (default); teleflm: Tele-FLM "
                        "release layout, μP in the config")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype on disk (default: the source's for llama, bfloat16 for teleflm)")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), metavar="SIZE",
                   help="largest shard (default 5GiB)")
    return p


def run(args: argparse.Namespace) -> int:
    out = export_hf(args.directory, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    format=args.format)
    if args.format == "teleflm":
        if "auto_map" in json.loads((Path(out) / CONFIG_NAME).read_text()):
            print(f"wrote {out} (Tele-FLM layout; load with the release's code, trust_remote_code=True)")
        else:
            print(f"wrote {out} (Tele-FLM layout without the release's code: config.json has no auto_map, "
                  f"the source did not come from a Tele-FLM release; load it with vLLM's TeleFLM, or copy "
                  f"the release's *.py and auto_map in)")
        return 0
    print(f"wrote {out} (plain Llama; load with transformers.LlamaForCausalLM.from_pretrained)")
    config = ModelConfig.load(out)
    if config.hidden_size % config.num_attention_heads:
        print(f"grow: note: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
              f"{config.num_attention_heads}; transformers >= 5 refuses such Llama configs even with an "
              f"explicit head_dim", file=sys.stderr)
    return 0
