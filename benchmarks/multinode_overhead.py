"""What a multi-node stage costs over one node: the same tiny stage as 1 node × 2 ranks and
as 2 localhost "nodes" × 1 rank (two train-stage processes, one rendezvous), side by side.

    python benchmarks/multinode_overhead.py [--steps 20] [--work DIR]

Prints both wall times (process start to exit, as a user sees it), the trainers' own
wall_seconds and tokens/s from summary.json, and the ratios; the last line is JSON. The
per-step losses are checked equal (1e-6 relative) so the two runs did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flmcore.process import free_port

REPO = Path(__file__).resolve().parents[1]


def stage_args(steps: int) -> list[str]:
    return ["stage=tiny_s1", f"stage.steps={steps}", "stage.seq_len=32", "stage.micro_batch_size=4",
            "stage.eval_batches=2", "stage.save_every=0", "data.max_bytes=300000"]


def run(cmds: list[list[str]]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - start
    for p, out in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f"multinode_overhead: a run failed:\n{out[-3000:]}")
    return seconds


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage_dir / "train_log.jsonl").read_text().splitlines() if ln]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="flm-multinode-"))
    train = [sys.executable, "-m", "stages.train", *stage_args(args.steps)]
    try:
        one = run([[*train, f"run_dir={work / 'one'}", "nproc=2"]])
        port = free_port()
        two = run([[*train, f"run_dir={work / 'two'}", "nproc=1", "nnodes=2", f"node_rank={k}",
                    "master_addr=127.0.0.1", f"master_port={port}", "local_addr=127.0.0.1"] for k in (0, 1)])
        a, b = (json.loads((work / d / "tiny_s1" / "summary.json").read_text()) for d in ("one", "two"))
        la, lb = losses(work / "one" / "tiny_s1"), losses(work / "two" / "tiny_s1")
        same = len(la) == len(lb) and all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(la, lb, strict=True))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"steps": args.steps, "one_node_wall_s": round(one, 2), "two_nodes_wall_s": round(two, 2),
              "wall_ratio": round(two / one, 3),
              "one_node_train_wall_s": round(a["wall_seconds"], 2),
              "two_nodes_train_wall_s": round(b["wall_seconds"], 2),
              "train_wall_ratio": round(b["wall_seconds"] / a["wall_seconds"], 3),
              "tokens_per_second_ratio": round(b["tokens_per_second"] / a["tokens_per_second"], 3),
              "losses_equal": same, "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 1)}
    print(f"1 node × 2 ranks: {one:.1f} s; 2 nodes × 1 rank: {two:.1f} s (×{two / one:.2f}); "
          f"in the trainer ×{result['train_wall_ratio']:.2f}, tokens/s ×{result['tokens_per_second_ratio']:.2f}; "
          f"losses equal: {same}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
