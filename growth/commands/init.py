"""`grow init FLAVOR|CONFIG_JSON --out DIR`: a randomly initialised checkpoint, streamed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from growth.checkpoint import DEFAULT_MAX_SHARD_SIZE, check_output_dir, parse_size
from growth.cli import UserError
from growth.config import resolve_config
from growth.init import init_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "init", help="write a randomly initialised checkpoint (stage-1 start, test inputs)",
        description="Write a randomly initialised HF-layout checkpoint, one tensor at a time. "
                    "Values depend only on (seed, tensor name, dtype). An existing non-empty "
                    "--out is refused, never overwritten.")
    p.add_argument("config", metavar="FLAVOR|CONFIG_JSON",
                   help="a flavor name (e.g. tiny, 52b, 1t) or a config.json / checkpoint dir")
    p.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="on-disk dtype (default float32)")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), metavar="SIZE",
                   help="largest shard, e.g. 500MB, 5GB, 2GiB (default 5GiB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="one line per tensor")
    return p


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    out = Path(args.out)
    check_output_dir(out)  # fail before any work, not after generating a shard
    limit = parse_size(args.max_shard_size)
    if limit <= 0:
        raise UserError(f"--max-shard-size must be positive, got {args.max_shard_size!r}")
    # The bar goes to a terminal only, so a failure in a log or a test stays one line.
    progress = args.verbose or (not args.quiet and sys.stderr.isatty())
    path = init_checkpoint(config, out, seed=args.seed, dtype=args.dtype, max_shard_size=limit,
                           progress=progress, log_tensors=args.verbose, source=args.config)
    print(f"wrote {path} ({config.params:,} params, {args.dtype}, seed {args.seed})")
    return 0
