"""μP hyperparameter transfer on CPU: coordinate check, LR × width sweeps, transfer through growth.

    python benchmarks/mup_transfer.py            # the whole study (docs/mup.md; ≤ 45 min on 2 quiet cores)
    python benchmarks/mup_transfer.py --smoke    # the suite's run (≤ 60 s)

1. the coordinate check (stages.mup.coord) in both regimes, μP vs SP vs microsoft's ``mup``;
2. the proxy (tiny-s1 at widths 32…256: ``mup-wW`` / ``sp-wW`` flavors) swept over a ×2 LR
   grid × seeds, μP and SP, each width's grid extended until its optimum is interior;
3. a μP (and an SP) parent at width 64 trained at its best LR, grown exactly (zero) ×2 and
   ×4, and the grown stage's LR swept the same way.

Every run is the stage's training path in-process (stages.mup.proxy). Writes
docs/mup_transfer.png, docs/mup_coord.png and docs/mup_transfer.json (everything, with
timings); the last line is the JSON object {"lr_grid", "widths", "mup", "sp", "grown"}:
"mup"/"sp" map width → LR → final eval loss per seed; "grown" maps "64->128" (μP) and
"sp:64->128" (SP) the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, git_commit, print_table

from growth.config import get_flavor
from stages.mup import coord
from stages.mup.cli import compare, render
from stages.mup.sweep import Curve, Key, SweepSpec, best_lr, steps_apart, sweep

FULL = {"widths": (32, 64, 128, 256), "coord_widths": (32, 64, 128, 256, 512), "coord_seeds": (1, 2, 3),
        "window": list(range(-9, -4)), "spec": SweepSpec(steps=120, parent_steps=120, seeds=(1, 2)),
        "parent": 64, "grown": (128, 256)}
SMOKE = {"widths": (32, 64), "coord_widths": (32, 64, 128), "coord_seeds": (1,),
         "window": [-8, -7, -6], "spec": SweepSpec(steps=4, parent_steps=4, seeds=(1,), min_points=3,
                                                    max_rounds=1),
         "parent": 32, "grown": (64,)}


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def coord_part(base: Any, info: dict[str, Any], setup: dict[str, Any], smoke: bool) -> dict[str, Any]:
    out = {}
    for regime in coord.REGIMES:
        spec = coord.CoordSpec(widths=setup["coord_widths"], steps=2 if smoke else 5,
                               seeds=setup["coord_seeds"], regime=regime)
        out[regime] = compare(base, spec, info, reference=True)
        print("\n" + render(regime, out[regime]), flush=True)
    return out


def as_json(curves: dict[Key, Curve]) -> dict[str, dict[str, list[float]]]:
    return {f"{k[1]}": {f"{lr:g}": v for lr, v in c.items()} for k, c in curves.items()}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def scratch_rows(curves: dict[Key, Curve]) -> list[list[Any]]:
    return [[k[0], k[1], f"{best_lr(c):g}", f"{mean(c[best_lr(c)]):.4f}", len(c)] for k, c in curves.items()]


def grown_part(base: Any, info: dict[str, Any], scratch: dict[Key, Curve], setup: dict[str, Any],
               map_fn: Any, on_round: Any) -> dict[Key, Curve]:
    """Parents at ``setup["parent"]`` trained at their best LR, grown, their LR swept."""
    windows = {}
    for param in ("mup", "sp"):
        e = round(math.log2(best_lr(scratch[(param, setup["parent"], None, None)])))
        for width in setup["grown"]:
            windows[(param, width, setup["parent"], e)] = [e - 1, e, e + 1]
    spec = dataclasses.replace(setup["spec"], min_points=3)  # the question is only "where is the optimum"
    return sweep(base, info, windows, spec, map_fn, on_round)


def grown_rows(grown: dict[Key, Curve], scratch: dict[Key, Curve]) -> list[list[Any]]:
    rows = []
    for (param, width, parent, _), c in grown.items():
        small, wide = best_lr(scratch[(param, parent, None, None)]), best_lr(scratch[(param, width, None, None)])
        g = best_lr(c)
        rows.append([param, f"{parent}->{width}", f"{g:g}", f"{small:g}", steps_apart(g, small),
                     f"{wide:g}", steps_apart(g, wide)])
    return rows


def partial(out: Path, part: str) -> Any:
    """A sweep's ``on_round``: the curves so far to OUT/mup_transfer.partial.json (a long run's progress)."""
    def write(curves: dict[Key, Curve]) -> None:
        path = out / "mup_transfer.partial.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        done[part] = {"/".join(str(x) for x in k): {f"{lr:g}": v for lr, v in c.items()} for k, c in curves.items()}
        path.write_text(json.dumps(done, indent=1) + "\n")
        print(f"[{part}] round done: {sum(len(c) for c in curves.values())} LR points", flush=True)
    return write


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (the test suite)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: 2; smoke: 1)")
    p.add_argument("--out", default=None, help="where the figures and JSON go (default: docs/; smoke: a temp dir)")
    return p.parse_args(argv)


def run_study(args: argparse.Namespace, out: Path, tmp: str) -> dict[str, Any]:
    import torch

    from stages.mup.plot import coord_plot, transfer_plot
    from stages.mup.proxy import corpus

    torch.set_num_threads(1)  # tiny models: one thread per process (the pool adds processes)
    setup = SMOKE if args.smoke else FULL
    base, info = get_flavor("mup-w32"), corpus(tmp)  # the proxy family at its base width
    coords = coord_part(base, info, setup, args.smoke)
    coord_plot({f"{run} {r}": {k: v["delta"] for k, v in res[run].items()}
                for r, res in coords.items() for run in ("mup", "sp", "mup_package") if run in res},
               out / "mup_coord.png")
    jobs = args.jobs or (1 if args.smoke else 2)
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    map_fn = pool.imap if pool else map
    try:
        windows = {(p, w, None, None): setup["window"] for p in ("mup", "sp") for w in setup["widths"]}
        scratch = sweep(base, info, windows, setup["spec"], map_fn, partial(out, "scratch"))
        print_table(["param", "width", "best lr", "loss", "points"], scratch_rows(scratch),
                    title="LR sweep from scratch (mean over seeds)")
        grown = grown_part(base, info, scratch, setup, map_fn, partial(out, "grown"))
    finally:
        if pool:
            pool.close()
            pool.join()
    print_table(["param", "growth", "best lr", "small's", "steps", "scratch's", "steps"],
                grown_rows(grown, scratch), title="LR sweep after exact growth")
    result = {
        "lr_grid": sorted({lr for c in [*scratch.values(), *grown.values()] for lr in c}),
        "widths": list(setup["widths"]),
        "mup": as_json({k: c for k, c in scratch.items() if k[0] == "mup"}),
        "sp": as_json({k: c for k, c in scratch.items() if k[0] == "sp"}),
        "grown": {("" if k[0] == "mup" else "sp:") + f"{k[2]}->{k[1]}": {f"{lr:g}": v for lr, v in c.items()}
                  for k, c in grown.items()},
    }
    transfer_plot(result, out / "mup_transfer.png")
    return {"result": result, "coord": coords, "jobs": jobs, "setup": {k: str(v) for k, v in setup.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    wall, cpu, load0, commit = time.perf_counter(), cpu_seconds(), os.getloadavg(), git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else (Path(tmp) if args.smoke else REPO / "docs")
        out.mkdir(parents=True, exist_ok=True)
        study = run_study(args, out, tmp)
        timing = {"wall_s": time.perf_counter() - wall, "cpu_s": cpu_seconds() - cpu,
                  "loadavg_start": load0, "loadavg_end": os.getloadavg(), "jobs": study["jobs"]}
        print(f"\nwall {timing['wall_s']:.0f} s, CPU {timing['cpu_s']:.0f} s (user+sys, all processes), "
              f"load average {load0[0]:.2f} → {timing['loadavg_end'][0]:.2f}; "
              f"quiet 2-core estimate ≈ CPU / {min(2, study['jobs'])} = "
              f"{timing['cpu_s'] / min(2, study['jobs']):.0f} s", flush=True)
        record = {"commit": commit, **study, "timing": timing}  # the code the numbers come from
        (out / "mup_transfer.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / "mup_transfer.partial.json").unlink(missing_ok=True)  # the progress file of this run
    emit_json(study["result"])
    return study["result"]


if __name__ == "__main__":
    main(sys.argv[1:])
