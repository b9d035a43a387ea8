"""`grow import SRC --out DST`: an HF pickle release, HF safetensors or DeepSpeed checkpoint
→ the canonical checkpoint (HF-named safetensors shards with digests, index, config.json
with every field of the release kept, growth.json, the release's tokenizer and code files).

See :mod:`growth.importer`. Pickle files are read only with ``torch.load(weights_only=True)``
(DeepSpeed's files with an allowlist of its few plain classes, :mod:`flmcore.safe_load`):
nothing in them runs.
"""

from __future__ import annotations

import argparse
import sys

from growth.checkpoint import DEFAULT_MAX_SHARD_SIZE, parse_size
from growth.importer import ImportRequest, import_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import", help="convert a pickle release / HF / DeepSpeed checkpoint to the canonical layout",
        description="Write DST from SRC: an HF pickle release (pytorch_model-0000k-of-0000N.bin + "
                    "pytorch_model.bin.index.json, or pytorch_model.bin — the layout of the public "
                    "Tele-FLM checkpoints), an HF safetensors directory, or a DeepSpeed checkpoint "
                    "(a ZeRO-1/2/3 global_stepN/tag folder or its parent with 'latest', or a "
                    "universal-checkpoint folder; weights and Adam moments). Pickles, DeepSpeed's "
                    "included, are read only through torch.load(weights_only=True): tensors, plain "
                    "containers and DeepSpeed's few plain classes (loss scaler, stage enum, fragment "
                    "address), anything else refused before anything is unpickled, nothing in them "
                    "run; tensors stream one at a time. config.json keeps every field of the "
                    "release; tokenizer files and *.py code travel along (regular files only: a "
                    "symlink is never followed). An existing non-empty DST is never overwritten.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory to import")
    p.add_argument("--out", required=True, metavar="DST", help="new checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype on disk (default: the source's; Adam moments are float32)")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), metavar="SIZE",
                   help="largest output shard, e.g. 500MB, 5GB (default 5GiB)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes writing output shards in parallel (default 1; capped at the "
                        "shard count)")
    p.add_argument("--config", default=None, metavar="FLAVOR|CONFIG_JSON",
                   help="DeepSpeed sources only: the model config (default: config.json in SRC or "
                        "its parents)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    request = ImportRequest(src=args.src, out=args.out, dtype=args.dtype,
                            max_shard_size=parse_size(args.max_shard_size), config=args.config)
    out = import_checkpoint(request, workers=args.workers, progress=not args.quiet and sys.stderr.isatty())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from growth.cli import main

    sys.exit(main(["import", *sys.argv[1:]]))
