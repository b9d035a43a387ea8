"""How close `grow apply` runs to the disk, and how flat its memory stays.

For a ≥ 1 GB source checkpoint (made with `grow init`) and a grown target (hidden ×1.25,
FFN ×1.25, heads ×1.25, layers ×1.25), measured side by side on the same disk:

- apply:  `grow apply` in a child process: wall time and the child's own peak RSS;
- floor:  a child process that reads every source byte (`safetensors.torch.load` of
          each shard's bytes) and writes every target byte (`save_file` of same-shaped
          tensors in the same shard layout) — plain safetensors I/O, no growth math.

Then the same at twice the model size (more layers, same largest tensor), to show
peak memory does not grow with the model. Targets (issue 4): wall ≤ 1.3 × floor and
peak RSS ≤ 1.5 GB + 3 × the largest target tensor.

    python benchmarks/grow_io.py [--dtype bfloat16] [--workdir DIR] [--keep]

The last line printed is one JSON object with ``ratio_to_io_floor`` and
``peak_rss_bytes`` (the worst of the two sizes). Both child processes start a Python
with torch, so interpreter start-up is on both sides. Floor and apply runs are interleaved
``--repeat`` times and the fastest of each is compared (the usual defence against
background load); CPU seconds (user + system) are reported next to wall time. Note: on a machine whose RAM holds
the files, reads come from the page cache; both sides see the same cache state (each
measurement starts after ``sync``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from growth.config import ModelConfig  # noqa: E402

SHARD = "500MB"


def bench_configs(layers: int) -> tuple[ModelConfig, ModelConfig]:
    src = ModelConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=8, head_dim=128, vocab_size=32000)
    dst = src.replace(hidden_size=1280, intermediate_size=3520, num_hidden_layers=layers * 5 // 4,
                      num_attention_heads=10, num_key_value_heads=10)
    return src, dst


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


def measured(argv: list[str]) -> tuple[float, int, float]:
    """Run argv; (wall seconds, the child's own peak RSS in bytes, its user + system CPU
    seconds). Raises on failure."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out}{err}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def floor_child(src: str, target_config: str, out: str, dtype: str, shard: str) -> None:
    """The I/O floor: read every source shard, write target-shaped shards. No growth math."""
    import torch
    from safetensors.torch import load, save_file

    from growth.checkpoint import DTYPES, parse_size, plan_shards, shard_file_names
    from growth.tensor_io import nbytes_of

    for f in sorted(Path(src).glob("*.safetensors")):
        tensors = load(f.read_bytes())  # load_file maps lazily: untouched pages are never read
        del tensors
    cast = DTYPES[dtype]
    shapes = ModelConfig.load(target_config).tensor_shapes()
    groups = plan_shards(((n, nbytes_of(s, cast)) for n, s in shapes.items()), parse_size(shard))
    Path(out).mkdir(parents=True)
    for fname, names in zip(shard_file_names(len(groups)), groups, strict=True):
        save_file({n: torch.empty(shapes[n], dtype=cast) for n in names}, str(Path(out) / fname))


def run_size(work: Path, layers: int, dtype: str, workers: int, repeat: int) -> dict:
    src_cfg, dst_cfg = bench_configs(layers)
    tag = f"L{layers}"
    cfg_dir = work / f"{tag}-configs"
    (cfg_dir / "src").mkdir(parents=True)
    (cfg_dir / "dst").mkdir(parents=True)
    src_cfg.save(cfg_dir / "src")
    dst_cfg.save(cfg_dir / "dst")
    src, out, floor_out = work / f"{tag}-src", work / f"{tag}-grown", work / f"{tag}-floor"
    grow = [sys.executable, "-m", "growth.cli"]
    subprocess.run([*grow, "init", str(cfg_dir / "src" / "config.json"), "--out", str(src), "--dtype", dtype,
                    "--max-shard-size", SHARD, "--quiet"], env=env(), check=True, stdout=subprocess.DEVNULL)
    floors, applies = [], []
    for _ in range(repeat):  # interleaved, so both sides see the same background load
        floors.append(measured([sys.executable, __file__, "--floor-child", str(src),
                                str(cfg_dir / "dst" / "config.json"), str(floor_out), dtype]))
        shutil.rmtree(floor_out)
        applies.append(measured([*grow, "apply", "--from", str(src), "--to", str(cfg_dir / "dst"),
                                 "--out", str(out), "--max-shard-size", SHARD, "--quiet",
                                 "--workers", str(workers)]))
        shutil.rmtree(out)
    floor_s, apply_s = min(f[0] for f in floors), min(a[0] for a in applies)
    floor_rss, apply_rss = max(f[1] for f in floors), max(a[1] for a in applies)
    element = 4 if dtype == "float32" else 2
    largest = max(math.prod(s) for s in dst_cfg.tensor_shapes().values()) * element
    result = {
        "layers": layers, "dtype": dtype, "workers": workers,
        "source_bytes": src_cfg.params * element, "target_bytes": dst_cfg.params * element,
        "largest_target_tensor_bytes": largest,
        "floor_seconds": round(floor_s, 3), "apply_seconds": round(apply_s, 3),
        "ratio_to_io_floor": round(apply_s / floor_s, 3),
        "floor_samples": [round(f[0], 2) for f in floors], "apply_samples": [round(a[0], 2) for a in applies],
        "floor_cpu_seconds": round(min(f[2] for f in floors), 2),
        "apply_cpu_seconds": round(min(a[2] for a in applies), 2),
        "peak_rss_bytes": apply_rss, "floor_peak_rss_bytes": floor_rss,
        "peak_rss_limit_bytes": int(1.5e9) + 3 * largest,
    }
    for path in (src, out, floor_out):
        shutil.rmtree(path, ignore_errors=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-child":
        floor_child(*sys.argv[2:6], SHARD)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="checkpoint dtype (default float32: 1.1 GB source)")
    p.add_argument("--layers", type=int, default=16, help="source layers of the 1× model (default 16)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved floor/apply pairs per size; the fastest of each counts (default 3)")
    p.add_argument("--workdir", default=None, help="where to write (default a temp dir on /tmp)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grow_io-", dir=args.workdir))
    try:
        results = []
        base = bench_configs(args.layers)[0].params
        double = next(n for n in range(args.layers, 8 * args.layers) if bench_configs(n)[0].params >= 2 * base)
        for layers in (args.layers, double):
            r = run_size(work, layers, args.dtype, args.workers, args.repeat)
            results.append(r)
            print(f"{r['source_bytes'] / 1e9:.2f} GB → {r['target_bytes'] / 1e9:.2f} GB {r['dtype']}: "
                  f"apply {r['apply_seconds']:.2f} s, I/O floor {r['floor_seconds']:.2f} s "
                  f"(ratio {r['ratio_to_io_floor']:.2f}, target ≤ 1.3; CPU {r['apply_cpu_seconds']:.1f} s vs "
                  f"{r['floor_cpu_seconds']:.1f} s); peak RSS "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} GB (limit {r['peak_rss_limit_bytes'] / 1e9:.2f} GB; "
                  f"floor child {r['floor_peak_rss_bytes'] / 1e9:.2f} GB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(results, key=lambda r: r["ratio_to_io_floor"])
    print(json.dumps({
        "ratio_to_io_floor": worst["ratio_to_io_floor"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "peak_rss_limit_bytes": results[0]["peak_rss_limit_bytes"],
        "rss_growth_at_2x": round(results[1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"], 3),
        "sizes": results,
    }))


if __name__ == "__main__":
    main()
