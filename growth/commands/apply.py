"""`grow apply --from SRC_DIR --to TARGET --out OUT`: grow a checkpoint, streaming.

Thin over :func:`growth.parallel.apply_growth`; see :mod:`growth.executor` for how the
output stays memory-bounded, resumable (rerun the same command after a kill) and
identical for any ``--workers`` (or torchrun ranks).
"""

from __future__ import annotations

import argparse
import sys

from growth.checkpoint import DEFAULT_MAX_SHARD_SIZE, parse_size
from growth.executor import ApplyRequest
from growth.parallel import apply_growth, torchrun_rank
from growth.strategy_args import add_strategy_args, spec_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "apply", help="grow a checkpoint into a bigger config (streaming, resumable)",
        description="Grow SRC_DIR (a flm-growth or HF Llama checkpoint; optimizer/ moments "
                    "included when present) into TARGET's shapes and write OUT: HF shards, "
                    "index, config.json and growth.json with the event appended. Work happens "
                    "in a staging dir next to OUT; rerunning the same command after a kill "
                    "finishes the missing shards with byte-identical output (growth.json keeps "
                    "the first attempt's time, or SOURCE_DATE_EPOCH when set). An existing "
                    "non-empty OUT is never overwritten.")
    p.add_argument("--from", dest="src", required=True, metavar="SRC_DIR", help="source checkpoint directory")
    p.add_argument("--to", dest="target", required=True, metavar="FLAVOR|CONFIG_JSON|DIR",
                   help="target shapes: a flavor, a config.json or a checkpoint dir")
    p.add_argument("--out", required=True, metavar="OUT", help="new checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype on disk (default: the source's; required when the source "
                        "mixes dtypes). Adam moments are always float32")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), metavar="SIZE",
                   help="largest shard, e.g. 500MB, 5GB, 2GiB (default 5GiB)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes writing shards in parallel (default 1; under torchrun the "
                        "ranks are the workers)")
    p.add_argument("--no-optimizer-state", dest="optimizer_state", action="store_false",
                   help="grow the weights only, even when SRC_DIR/optimizer/ holds Adam moments "
                        "(the next stage then starts Adam cold)")
    add_strategy_args(p)
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="no progress bar")
    verbosity.add_argument("--verbose", action="store_true", help="one line per tensor")
    return p


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    request = ApplyRequest(src=args.src, target=args.target, spec=spec.to_dict(), out=args.out,
                           dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size),
                           optimizer_state=args.optimizer_state)
    # The bar goes to a terminal only, so a failure in a log or a test stays one line.
    progress = not args.quiet and sys.stderr.isatty()
    out = apply_growth(request, workers=args.workers, progress=progress, log_tensors=args.verbose)
    if torchrun_rank()[0] == 0:
        print(f"wrote {out}")
    return 0
