"""`grow inspect DIR [--json]`: config, params, dtypes, shards, history, masks, tensor stats.

The logic is :mod:`growth.inspect` (shared with notebooks); this only prints it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from growth.commands.info import human_bytes, human_params, shape_line
from growth.history import history_lines
from growth.inspect import open_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="config, shards, growth history, mask state and per-tensor statistics",
        description="Describe a checkpoint directory (flm-growth or HF Llama): config, parameter "
                    "count, dtypes, shards, growth history, MSG mask state (c) and, per tensor, "
                    "shape, dtype, rms, max|x|, norm and share of zeros. Statistics read every "
                    "tensor once (64 MB at a time); --no-stats reads headers only.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-stats", dest="stats", action="store_false", help="skip tensor statistics")
    p.add_argument("--match", metavar="GLOB", help="only tensors whose name matches, e.g. '*.mlp.*'")
    return p


def render(info: dict[str, Any]) -> str:
    c = info["config"]
    lines = [
        f"checkpoint {info['directory']}  ({c['model_type']})",
        shape_line(c),
        f"params     {info['params']:,} ({human_params(info['params'])})",
        "dtypes     " + ", ".join(f"{d} ×{n}" for d, n in sorted(info["dtypes"].items())),
        f"shards     {len(info['shards'])} file(s), {human_bytes(info['tensor_bytes'])} of tensors",
    ]
    if c.get("use_mup"):
        lines.append(f"μP         input_mult {c['input_mult']:g}, output_mult {c['output_mult']:g}, "
                     f"mup_scale_factor {c['mup_scale_factor']:g}")
    mask = info["mask"]
    lines.append("masks      none" if mask is None else
                 f"masks      MSG live at c = {info['c']:g}: "
                 + ", ".join(f"{k} {v}" for k, v in mask.items() if k != "c"))
    events = history_lines(info["history"], info["directory"])
    lines.append(f"history    {len(events)} event(s)")
    lines += [f"  {line}" for line in events]
    rows = info["tensors"]
    if rows:
        width = max(len(r["name"]) for r in rows)
        has_stats = "rms" in rows[0]
        head = f"{'tensor':<{width}}  {'shape':<14} {'dtype':<9}"
        lines += ["", head + (f" {'rms':>10} {'max|x|':>10} {'norm':>10} {'zeros':>6}" if has_stats else "")]
        for r in rows:
            line = f"{r['name']:<{width}}  {'×'.join(map(str, r['shape'])):<14} {r['dtype']:<9}"
            if has_stats:
                line += (f" {r['rms']:>10.4g} {r['absmax']:>10.4g} {r['norm']:>10.4g} "
                         f"{r['zero_fraction']:>6.1%}" + ("" if r["finite"] else "  NaN/inf!"))
            lines.append(line)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with open_checkpoint(args.directory) as ck:
        info = ck.summary(stats=args.stats, pattern=args.match)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
