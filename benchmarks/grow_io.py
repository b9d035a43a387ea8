"""How close `grow apply` and `grow import` run to the disk, and how flat memory stays.

For a ≥ 1 GB source checkpoint (made with `grow init`) and a grown target (hidden ×1.25,
FFN ×1.25, heads ×1.25, layers ×1.25), measured side by side on the same disk:

- apply:  `grow apply` in a child process: wall time and the child's own peak RSS;
- floor:  a child process that reads every source byte (`safetensors.torch.load` of
          each shard's bytes) and writes every target byte (`save_file` of same-shaped
          tensors in the same shard layout) — plain safetensors I/O, no growth math.

Then the same at twice the model size (more layers, same largest tensor), to show
peak memory does not grow with the model. Targets: wall ≤ 1.2 × floor and
peak RSS ≤ 1.5 GB + 3 × the largest target tensor.

Import row: the 1× source written as an HF pickle release (``pytorch_model-0000k-of-0000N.bin``
+ index, ``torch.save``), `grow import` of it against its floor (read every source byte,
write the same tensors as safetensors shards). Memory row: importing one ~340 MB
``pytorch_model.bin`` peaks within 150 MB + 2 × its largest tensor of a tiny import's peak.

Start-up is measured as a *tiny run of the same command* (``grow apply`` tiny-s1 → tiny-s2,
``grow import`` of a tiny pickle release, and each floor child on the same tiny input),
fastest of ``--repeat``, and each side's own tiny run is subtracted from it before the
ratio (``*_startup_subtracted``): what is left is the time spent on the bytes. Every
written file is fsynced on both sides (``grow`` fsyncs each shard before its rename).

    python benchmarks/grow_io.py [--dtype bfloat16] [--workdir DIR] [--repeat 3]

Floor and apply runs are interleaved ``--repeat`` times and the fastest of each is
compared (the usual defence against background load); CPU seconds (user + system) are
reported next to wall time, with the per-thread CPU profile of the fastest ``grow`` run
(``FLM_GROW_PROFILE``: produce, cast, hash, write; growth.pipeline) and each stage's
share of the wall time. The last line printed is one JSON object with
``ratio_to_io_floor_startup_subtracted`` (apply), ``import_ratio_to_io_floor_startup_subtracted``
and ``peak_rss_bytes`` (the worst of the two sizes). Note: on a machine whose RAM holds
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
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import git_commit  # noqa: E402

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


def measured(argv: list[str], profile: Path | None = None) -> tuple[float, int, float, dict]:
    """Run argv; (wall seconds, the child's own peak RSS in bytes, its user + system CPU
    seconds, its per-thread CPU profile summed over its processes). Raises on failure."""
    os.sync()
    e = env()
    if profile is not None:
        shutil.rmtree(profile, ignore_errors=True)
        profile.mkdir(parents=True)
        e["FLM_GROW_PROFILE"] = str(profile / "p")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out}{err}")
    prof: dict[str, float] = {}
    for f in sorted(profile.iterdir()) if profile is not None else []:
        for k, v in json.loads(f.read_text()).items():
            if k != "pid":
                prof[k] = round(prof.get(k, 0.0) + v, 3)
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, prof


def fsync_tree(root: str | Path) -> None:
    """fsync every file written under ``root`` (the floor pays what ``grow`` pays)."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
    fsync_tree(out)


def tiny_runs(work: Path, dtype: str, workers: int, repeat: int) -> dict[str, float]:
    """Start-up of each measured command: the fastest of ``repeat`` tiny runs of it
    (tiny-s1 → tiny-s2 for apply and its floor; a tiny pickle release for import and its floor)."""
    grow = [sys.executable, "-m", "growth.cli"]
    tiny = work / "tiny"
    subprocess.run([*grow, "init", "tiny-s1", "--out", str(tiny / "src"), "--dtype", dtype, "--quiet"],
                   env=env(), check=True, stdout=subprocess.DEVNULL)
    from growth.config import get_flavor

    (tiny / "dst").mkdir()
    get_flavor("tiny-s2").save(tiny / "dst")
    subprocess.run([sys.executable, __file__, "--write-release", str(tiny / "src"), str(tiny / "rel"), SHARD],
                   env=env(), check=True)
    commands = {
        "apply": [*grow, "apply", "--from", str(tiny / "src"), "--to", str(tiny / "dst"), "--out",
                  str(tiny / "out"), "--quiet", "--workers", str(workers)],
        "floor": [sys.executable, __file__, "--floor-child", str(tiny / "src"), str(tiny / "dst" / "config.json"),
                  str(tiny / "out"), dtype],
        "import": [*grow, "import", str(tiny / "rel"), "--out", str(tiny / "out"), "--quiet", "--workers",
                   str(workers)],
        "import_floor": [sys.executable, __file__, "--import-floor-child", str(tiny / "rel"), str(tiny / "out")],
    }
    best = dict.fromkeys(commands, math.inf)
    for _ in range(repeat):
        for name, argv in commands.items():
            best[name] = min(best[name], measured(argv)[0])
            shutil.rmtree(tiny / "out")
    shutil.rmtree(tiny)
    return best


def profile_shares(prof: dict[str, float], seconds: float) -> str:
    """'produce 1.2 s (40 %), …': each stage's CPU seconds and share of the wall time."""
    return ", ".join(f"{k} {v:.2f} s ({100 * v / seconds:.0f} %)" for k, v in prof.items())


def write_pickle_release(src: Path, out: Path, shard: str) -> None:
    """The checkpoint at ``src`` as an HF pickle release (the Tele-FLM layout)."""
    import torch

    from growth.checkpoint import CheckpointReader, parse_size, plan_shards

    out.mkdir(parents=True)
    if shard == "single":
        with CheckpointReader(src) as r:
            torch.save(r.state_dict(), out / "pytorch_model.bin")
        shutil.copyfile(src / "config.json", out / "config.json")
        return
    with CheckpointReader(src) as r:
        groups = plan_shards(((n, r.nbytes(n)) for n in r.names()), parse_size(shard))
        weight_map = {}
        for k, names in enumerate(groups):
            fname = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
            torch.save({n: r.get(n) for n in names}, out / fname)
            weight_map.update(dict.fromkeys(names, fname))
        (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copyfile(src / "config.json", out / "config.json")


def import_floor_child(src: str, out: str, shard: str) -> None:
    """The import floor: read every source byte, write the same tensors as safetensors."""
    import torch
    from safetensors.torch import save_file

    from growth.checkpoint import parse_size, plan_shards, shard_file_names
    from growth.config import ModelConfig as MC

    for f in sorted(Path(src).glob("*.bin")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 26):
                pass
    config = MC.load(Path(src) / "config.json")
    index = json.loads((Path(src) / "pytorch_model.bin.index.json").read_text())["weight_map"]
    some = torch.load(Path(src) / next(iter(index.values())), mmap=True, weights_only=True)
    dtype = next(iter(some.values())).dtype
    shapes = config.tensor_shapes()
    size = torch.empty((), dtype=dtype).element_size()
    groups = plan_shards(((n, math.prod(s) * size) for n, s in shapes.items()), parse_size(shard))
    Path(out).mkdir(parents=True)
    for fname, names in zip(shard_file_names(len(groups)), groups, strict=True):
        save_file({n: torch.empty(shapes[n], dtype=dtype) for n in names}, str(Path(out) / fname))
    fsync_tree(out)


def run_import(work: Path, layers: int, dtype: str, workers: int, repeat: int, startup: dict) -> dict:
    src_cfg, _ = bench_configs(layers)
    cfg_dir = work / "import-config"
    cfg_dir.mkdir(parents=True)
    src_cfg.save(cfg_dir)
    grow = [sys.executable, "-m", "growth.cli"]
    init = work / "import-init"
    subprocess.run([*grow, "init", str(cfg_dir / "config.json"), "--out", str(init), "--dtype", dtype,
                    "--max-shard-size", SHARD, "--quiet"], env=env(), check=True, stdout=subprocess.DEVNULL)
    release = work / "import-release"
    # In a child: a forked child starts with its parent's peak RSS as its own ru_maxrss, so
    # this process must stay small for the measured children's peaks to mean anything.
    subprocess.run([sys.executable, __file__, "--write-release", str(init), str(release), SHARD], env=env(),
                   check=True)
    shutil.rmtree(init)
    out, floor_out = work / "import-out", work / "import-floor"
    floors, imports = [], []
    for _ in range(repeat):
        floors.append(measured([sys.executable, __file__, "--import-floor-child", str(release), str(floor_out)]))
        shutil.rmtree(floor_out)
        imports.append(measured([*grow, "import", str(release), "--out", str(out), "--max-shard-size", SHARD,
                                 "--quiet", "--workers", str(workers)], work / "profile"))
        shutil.rmtree(out)
    floor_s, import_s = min(f[0] for f in floors), min(a[0] for a in imports)
    shutil.rmtree(release)
    net_import, net_floor = import_s - startup["import"], floor_s - startup["import_floor"]
    return {"kind": "import", "layers": layers, "dtype": dtype, "workers": workers,
            "source_bytes": src_cfg.params * (4 if dtype == "float32" else 2),
            "floor_seconds": round(floor_s, 3), "import_seconds": round(import_s, 3),
            "startup_seconds": {"import": round(startup["import"], 3), "floor": round(startup["import_floor"], 3)},
            "ratio_to_io_floor": round(import_s / floor_s, 3),
            "ratio_to_io_floor_startup_subtracted": round(net_import / net_floor, 3),
            "profile_cpu_seconds": min(imports)[3],
            "import_cpu_seconds": round(min(a[2] for a in imports), 2),
            "floor_cpu_seconds": round(min(f[2] for f in floors), 2),
            "peak_rss_bytes": max(a[1] for a in imports)}


def run_import_memory(work: Path) -> dict:
    """Peak RSS importing one ~340 MB pytorch_model.bin vs a tiny one."""
    from growth.config import get_flavor

    grow = [sys.executable, "-m", "growth.cli"]
    big_cfg = ModelConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                          head_dim=128, vocab_size=32000)
    peaks = {}
    for tag, cfg in (("tiny", get_flavor("tiny")), ("big", big_cfg)):
        src = work / f"mem-{tag}"
        init = work / f"mem-{tag}-init"
        cfg_dir = work / f"mem-{tag}-cfg"
        cfg_dir.mkdir(parents=True)
        cfg.save(cfg_dir)
        subprocess.run([*grow, "init", str(cfg_dir / "config.json"), "--out", str(init), "--dtype", "bfloat16",
                        "--quiet"], env=env(), check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, __file__, "--write-release", str(init), str(src), "single"], env=env(),
                       check=True)
        shutil.rmtree(init)
        _, peak, _, _ = measured([*grow, "import", str(src), "--out", str(work / f"mem-{tag}-out"), "--quiet"])
        peaks[tag] = (peak, (src / "pytorch_model.bin").stat().st_size,
                      max(math.prod(s) for s in cfg.tensor_shapes().values()) * 2)
        shutil.rmtree(src)
        shutil.rmtree(work / f"mem-{tag}-out")
    (tiny_peak, _, _), (big_peak, big_bytes, largest) = peaks["tiny"], peaks["big"]
    limit = tiny_peak + 150 * 1024**2 + 2 * largest
    return {"kind": "import-memory", "shard_bytes": big_bytes, "largest_tensor_bytes": largest,
            "tiny_peak_rss_bytes": tiny_peak, "peak_rss_bytes": big_peak, "limit_bytes": limit,
            "within_limit": big_peak <= limit}


def run_size(work: Path, layers: int, dtype: str, workers: int, repeat: int, startup: dict) -> dict:
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
                                 "--workers", str(workers)], work / "profile"))
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
        "ratio_to_io_floor_startup_subtracted": round((apply_s - startup["apply"]) / (floor_s - startup["floor"]), 3),
        "startup_seconds": {"apply": round(startup["apply"], 3), "floor": round(startup["floor"], 3)},
        "profile_cpu_seconds": min(applies)[3],
        "floor_samples": [round(f[0], 2) for f in floors], "apply_samples": [round(a[0], 2) for a in applies],
        "floor_cpu_seconds": round(min(f[2] for f in floors), 2),
        "apply_cpu_seconds": round(min(a[2] for a in applies), 2),
        "peak_rss_bytes": apply_rss, "floor_peak_rss_bytes": floor_rss,
        "peak_rss_limit_bytes": int(1.5e9) + 3 * largest,
    }
    for path in (src, out, floor_out):
        shutil.rmtree(path, ignore_errors=True)
    return result


def report_size(r: dict) -> None:
    print(f"{r['source_bytes'] / 1e9:.2f} GB → {r['target_bytes'] / 1e9:.2f} GB {r['dtype']}: "
          f"apply {r['apply_seconds']:.2f} s, I/O floor {r['floor_seconds']:.2f} s "
          f"(ratio {r['ratio_to_io_floor']:.2f}, {r['ratio_to_io_floor_startup_subtracted']:.2f} "
          f"start-up subtracted, target ≤ 1.2; CPU {r['apply_cpu_seconds']:.1f} s vs "
          f"{r['floor_cpu_seconds']:.1f} s); peak RSS "
          f"{r['peak_rss_bytes'] / 1e9:.2f} GB (limit {r['peak_rss_limit_bytes'] / 1e9:.2f} GB; "
          f"floor child {r['floor_peak_rss_bytes'] / 1e9:.2f} GB)", flush=True)
    print(f"  apply threads (CPU s, share of wall): "
          f"{profile_shares(r['profile_cpu_seconds'], r['apply_seconds'])}", flush=True)


def report_import(r: dict, m: dict) -> None:
    print(f"import {r['source_bytes'] / 1e9:.2f} GB pickle release {r['dtype']}: import "
          f"{r['import_seconds']:.2f} s, I/O floor {r['floor_seconds']:.2f} s (ratio "
          f"{r['ratio_to_io_floor']:.2f}, {r['ratio_to_io_floor_startup_subtracted']:.2f} start-up "
          f"subtracted, target ≤ 1.2; CPU {r['import_cpu_seconds']:.1f} s vs {r['floor_cpu_seconds']:.1f} s)",
          flush=True)
    print(f"  import threads (CPU s, share of wall): "
          f"{profile_shares(r['profile_cpu_seconds'], r['import_seconds'])}", flush=True)
    print(f"import memory: one {m['shard_bytes'] / 1e6:.0f} MB pytorch_model.bin peaks at "
          f"{m['peak_rss_bytes'] / 1e6:.0f} MB; limit {m['limit_bytes'] / 1e6:.0f} MB (tiny import "
          f"{m['tiny_peak_rss_bytes'] / 1e6:.0f} MB + 150 MB + 2 × {m['largest_tensor_bytes'] / 1e6:.0f} MB)"
          f" {'ok' if m['within_limit'] else 'MISSED'}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-child":
        floor_child(*sys.argv[2:6], SHARD)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--import-floor-child":
        import_floor_child(*sys.argv[2:4], SHARD)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--write-release":
        write_pickle_release(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="checkpoint dtype (default float32: 1.1 GB source)")
    p.add_argument("--layers", type=int, default=16, help="source layers of the 1× model (default 16)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved floor/apply pairs per size; the fastest of each counts (default 3)")
    p.add_argument("--workdir", default=None, help="where to write (default a temp dir on /tmp)")
    p.add_argument("--no-import", dest="with_import", action="store_false", help="skip the import rows")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grow_io-", dir=args.workdir))
    extra = []
    load_before = os.getloadavg()
    try:
        startup = tiny_runs(work, args.dtype, args.workers, args.repeat)
        print("start-up (tiny runs of the same commands, subtracted below): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()), flush=True)
        results = []
        base = bench_configs(args.layers)[0].params
        double = next(n for n in range(args.layers, 8 * args.layers) if bench_configs(n)[0].params >= 2 * base)
        for layers in (args.layers, double):
            results.append(run_size(work, layers, args.dtype, args.workers, args.repeat, startup))
            report_size(results[-1])
        if args.with_import:
            extra.append(run_import(work, args.layers, args.dtype, args.workers, args.repeat, startup))
            extra.append(run_import_memory(work))
            report_import(*extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "ratio_to_io_floor_startup_subtracted": max(r["ratio_to_io_floor_startup_subtracted"] for r in results),
        "import_ratio_to_io_floor_startup_subtracted": next(
            (r["ratio_to_io_floor_startup_subtracted"] for r in extra if r["kind"] == "import"), None),
        "ratio_to_io_floor": max(r["ratio_to_io_floor"] for r in results),
        "import_memory_within_limit": next((r["within_limit"] for r in extra if r["kind"] == "import-memory"), None),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "peak_rss_limit_bytes": results[0]["peak_rss_limit_bytes"],
        "rss_growth_at_2x": round(results[1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"], 3),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "commit": git_commit(),
        "extra": extra, "sizes": results,
    }))


if __name__ == "__main__":
    main()
