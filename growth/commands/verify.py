"""`grow verify SRC_DIR GROWN_DIR`: do both checkpoints compute the same function?

Exit 0 when logits (over the source's valid vocab) and loss agree within tolerance,
1 when they do not, 2 on a user error. See :mod:`growth.verify`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from growth.cli import UserError
from growth.verify import DEFAULT_STREAMING_THRESHOLD, verify


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "verify", help="compare a source and a grown checkpoint's logits and loss",
        description="Run SRC_DIR and GROWN_DIR (flm-growth or HF Llama checkpoints) in fp32 on the "
                    "same random tokens from the source's valid vocab and compare logits and "
                    "loss. Masked checkpoints run at their stored c. Exit 0 within tolerance, 1 "
                    "outside it. Big models run layer by layer (--streaming).")
    p.add_argument("source", metavar="SRC_DIR")
    p.add_argument("grown", metavar="GROWN_DIR")
    p.add_argument("--tokens", type=int, default=256, metavar="N", help="tokens to run (default 256)")
    p.add_argument("--seq-len", type=int, default=64, metavar="T", help="tokens per row (default 64)")
    p.add_argument("--seed", type=int, default=0, help="token sampling seed (default 0)")
    p.add_argument("--token-ids", metavar="FILE",
                   help="use these ids instead: one row per line, whitespace-separated integers")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="relative tolerance on max|Δlogit| / max|logit| and on the loss "
                        "(default 1e-5 for fp32 checkpoints; when either is 16-bit, 3× the error "
                        "one rounding of the source's weights to that dtype causes)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                      help="load one decoder layer at a time")
    mode.add_argument("--in-memory", dest="streaming", action="store_false",
                      help="load each whole model")
    p.add_argument("--streaming-threshold", default=DEFAULT_STREAMING_THRESHOLD, metavar="SIZE",
                   help="stream when both models together exceed SIZE of fp32 (default 8GB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def read_token_ids(path: str) -> torch.Tensor:
    try:
        rows = [[int(x) for x in line.split()] for line in Path(path).read_text().splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"{path}: token ids must be whitespace-separated integers") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise UserError(f"{path}: need at least one row, all rows of the same length")
    return torch.tensor(rows, dtype=torch.long)


def run(args: argparse.Namespace) -> int:
    ids = read_token_ids(args.token_ids) if args.token_ids else None
    result = verify(args.source, args.grown, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
                    tolerance=args.tolerance, streaming=args.streaming,
                    streaming_threshold=args.streaming_threshold, input_ids=ids)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        r = result
        c = f" at c = {r.grown_c:g}" if r.grown_c is not None else ""
        print(f"{'PASS' if r.passed else 'FAIL'}: {r.batch}×{r.seq_len} tokens, {r.mode}{c}; "
              f"max|Δlogit| {r.max_abs_logit_diff:.3g} (relative {r.relative_logit_diff:.3g}, "
              f"tolerance {r.tolerance:g}); loss {r.loss_source:.6f} → {r.loss_grown:.6f}")
    return 0 if result.passed else 1
