"""`grow plan --from SRC --to DST`: what `grow apply` would do, without reading weights.

SRC and DST are each a flavor name, a config.json or a checkpoint directory, so
``grow plan --from 52b --to 102b`` runs in about a second. For a checkpoint directory the
bytes read come from its shard headers and its optimizer/ moments are included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    OPTIMIZER_DIR,
    CheckpointReader,
    parse_size,
    torch_dtype,
)
from growth.cli import UserError
from growth.commands.info import human_bytes, human_params
from growth.config import FLAVORS, resolve_config
from growth.executor import output_dtype, peak_memory_estimate, shard_tasks
from growth.strategy_args import add_strategy_args, spec_from_args
from growth.tensor_io import nbytes_of
from operators import GrowthPlan, make_plan


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="show the per-tensor growth plan, bytes, peak memory and time (no weights read)",
        description="Plan growing SRC into DST: one row per target tensor (source shape → target "
                    "shape, operator, bytes read and written), totals, the peak memory `grow "
                    "apply` will need and the time at a given disk bandwidth. Reads no weights.")
    p.add_argument("--from", dest="src", required=True, metavar="SRC",
                   help="source: a flavor, a config.json or a checkpoint dir")
    p.add_argument("--to", dest="target", required=True, metavar="DST",
                   help="target: a flavor, a config.json or a checkpoint dir")
    p.add_argument("--src-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="source dtype when SRC is a flavor or config (default bfloat16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype (default: the source's)")
    moments = p.add_mutually_exclusive_group()
    moments.add_argument("--optimizer", action="store_true",
                         help="count Adam moments too (automatic when SRC_DIR/optimizer exists)")
    moments.add_argument("--no-optimizer-state", dest="no_optimizer_state", action="store_true",
                         help="plan weights only, as `grow apply --no-optimizer-state` does")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), metavar="SIZE",
                   help="largest shard (default 5GiB)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="apply workers, N >= 1 (peak memory × N; default 1)")
    p.add_argument("--bandwidth", default="2GB/s", metavar="RATE",
                   help="disk bandwidth for the time estimate, e.g. 500MB/s, 2GB/s (default 2GB/s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_strategy_args(p)
    return p


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    src_path = Path(args.src)
    reader = None
    if args.src.lower() not in FLAVORS and src_path.is_dir():
        reader = CheckpointReader(src_path)
        src_config = reader.config
        dtype = output_dtype(reader, args.dtype)  # refuses what apply would refuse (mixed dtypes)
        src_dtype = max(reader.dtypes, key=lambda d: torch.empty((), dtype=d).element_size())
    else:
        src_config, src_dtype = resolve_config(args.src), torch_dtype(args.src_dtype)
        dtype = torch_dtype(args.dtype) if args.dtype else src_dtype
    plan = make_plan(src_config, resolve_config(args.target), spec_from_args(args))
    moments = not args.no_optimizer_state and (
        args.optimizer or (reader is not None and (src_path / OPTIMIZER_DIR).is_dir()))
    rows = [_row(op, reader, src_dtype, dtype) for op in plan.tensor_ops()]
    read = sum(r["bytes_read"] for r in rows)
    written = sum(r["bytes_written"] for r in rows)
    if moments:  # exp_avg and exp_avg_sq: fp32 in, fp32 out, same shapes as the weights
        read += 2 * sum(nbytes_of(op.src_shape, torch.float32) for op in plan.tensor_ops() if op.src_name)
        written += 2 * plan.config.params * 4
    bandwidth = parse_size(args.bandwidth.removesuffix("/s"))
    if bandwidth <= 0:
        raise UserError(f"--bandwidth must be positive, got {args.bandwidth!r}")
    limit = parse_size(args.max_shard_size)
    return {
        "source": args.src, "target": args.target, "spec": plan.spec.to_dict(),
        "summary": plan.summary(), "not_exact": plan.spec.not_exact_reasons(),
        "source_dtype": DTYPE_NAMES.get(src_dtype, str(src_dtype)),
        "dtype": DTYPE_NAMES[dtype],
        "optimizer_state": moments, "tensors": rows,
        "shards": len(shard_tasks(plan.config, dtype, limit)),
        "bytes_read": read, "bytes_written": written,
        "peak_memory_bytes": peak_memory_estimate(plan, src_dtype, dtype, args.workers),
        "bandwidth_bytes_per_s": bandwidth, "seconds_at_bandwidth": (read + written) / bandwidth,
        "config": plan.config.to_hf_dict(),
    }


def _row(op: Any, reader: CheckpointReader | None, src_dtype: torch.dtype,
         dtype: torch.dtype) -> dict[str, Any]:
    read = 0
    if op.src_name:
        read = reader.nbytes(op.src_name) if reader is not None else nbytes_of(op.src_shape, src_dtype)
    return {"name": op.name, "src_name": op.src_name,
            "src_shape": list(op.src_shape) if op.src_shape else None, "shape": list(op.shape),
            "operator": op.operator, "bytes_read": read, "bytes_written": nbytes_of(op.shape, dtype)}


def render(report: dict[str, Any]) -> str:
    rows = report["tensors"]
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'tensor':<{width}}  {'source':>14} → {'target':<14} {'read':>10} {'written':>10}  operator"]
    for r in rows:
        src = "×".join(map(str, r["src_shape"])) if r["src_shape"] else "-"
        dst = "×".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {src:>14} → {dst:<14} {human_bytes(r['bytes_read']):>10} "
                     f"{human_bytes(r['bytes_written']):>10}  {r['operator']}")
    s = report["summary"]
    lines += [
        "",
        f"params     {human_params(s['from_params'])} → {human_params(s['to_params'])}  "
        f"(layers {s['layers'][0]}→{s['layers'][1]}, hidden {s['hidden'][0]}→{s['hidden'][1]}, "
        f"ffn {s['ffn'][0]}→{s['ffn'][1]}, heads {s['heads'][0]}→{s['heads'][1]}, "
        f"vocab {s['vocab'][0]}→{s['vocab'][1]})",
        f"new layers {s['new_layers'] or 'none'}; "
        + ("exact" if s["exact"] else "NOT function-preserving: " + "; ".join(report["not_exact"]))
        + ("; MSG masks at c = 0" if s["masked"] else ""),
        f"dtype      {report['source_dtype']} → {report['dtype']}"
        + ("; Adam moments (float32) included" if report["optimizer_state"] else ""),
        f"I/O        read {human_bytes(report['bytes_read'])}, write {human_bytes(report['bytes_written'])}"
        f" in {report['shards']} weight shard(s)",
        f"memory     peak ≈ {human_bytes(report['peak_memory_bytes'])}",
        f"time       ≈ {_duration(report['seconds_at_bandwidth'])} at "
        f"{human_bytes(report['bandwidth_bytes_per_s'])}/s",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def run(args: argparse.Namespace) -> int:
    report = build_report(args)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


__all__ = ["GrowthPlan", "add_parser", "build_report", "run"]
