"""Growth at Tele-FLM scale, 52B → 102B → 1T, from configs alone (no weights, seconds).

For each growth of the ``teleflm`` schedule (conf/schedule/teleflm.yaml) it measures and
projects:

- **plan**: wall time and peak memory of ``operators.make_plan`` + ``tensor_ops()`` on the
  flavors, each in a fresh child process (peak RSS is the child's; the ``import`` baseline
  is shown apart), and of the user-facing ``grow plan --from A --to B --json`` command;
- **I/O**: bytes ``grow apply`` reads and writes — weights in bf16, plus the fp32 Adam
  moments (exp_avg, exp_avg_sq) when the stage grows optimizer state (it does);
- **apply RAM**: ``growth.executor.peak_memory_estimate`` per worker (the largest tensor
  in fp32, a few times over);
- **projected grow time** for N workers: bytes / min(N × per-worker bandwidth, aggregate
  bandwidth), N ≤ number of shards (a shard is the unit of work). Disk-bound by
  assumption — operator arithmetic is a few passes over each tensor in RAM;
- **DeepSpeed per-GPU model states** for each stage's layout from conf/stage/teleflm_*.yaml
  (via ``stages.launch.dry_run.memory_report``): ``estimate_zero2_model_states_mem_needs`` for
  ZeRO-0/1/2 — ZeRO-1 shares ZeRO-2's optimizer and DeepSpeed has no separate ZeRO-1
  formula — with the pipeline applied as *parameters ÷ pipeline degree per GPU and the
  data-parallel degree (ranks ÷ pipeline degree) as the GPU count over which Adam state
  is sharded*; ``estimate_zero3_model_states_mem_needs`` for ZeRO-3 over all ranks. Next
  to the configured layout, the same ranks without a pipeline (ZeRO-1, ZeRO-3) for
  comparison. Activations are not included.

    python benchmarks/plan_scale.py                       # 2 GB/s per worker, 25 GB/s aggregate
    python benchmarks/plan_scale.py --bandwidth 1GB/s --aggregate 10GB/s --workers 1,16,128
    python benchmarks/plan_scale.py --smoke               # tiny-s1 → tiny-s2 → tiny-s3, same tables

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, fmt_bytes, fmt_seconds, machine_info, print_machine, print_table

GB = 1e9
SCHEDULES = {
    # (stage name, flavor) in order; growth settings and layouts come from conf/stage/<name>.yaml
    "teleflm": ["teleflm_52b", "teleflm_102b", "teleflm_1t"],
    "tiny": ["tiny_s1", "tiny_s2", "tiny_s3"],
}


# ---------------------------------------------------------------------- child: one plan
def child_plan(src_json: str, target: str, spec_json: str) -> dict[str, Any]:
    """Run in a fresh process: import, then time make_plan + tensor_ops and their peak RSS.

    Note: the kernel's peak-RSS counter (VmHWM) is reset after the imports (``clear_refs``
    5), so the peak is the plan's own, not torch's import.
    """
    from growth.config import ModelConfig, resolve_config
    from operators import GrowthSpec, make_plan

    src = ModelConfig.from_hf_dict(json.loads(src_json), "source")
    target_config, spec = resolve_config(target), GrowthSpec.from_dict(json.loads(spec_json))
    base = _reset_peak_rss()
    start = time.perf_counter()
    plan = make_plan(src, target_config, spec)
    ops = plan.tensor_ops()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tensors": len(ops), "rss_before": base, "peak_rss": _peak_rss()}


def _reset_peak_rss() -> int:
    """Reset the peak-RSS counter where Linux allows it; the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(argv: list[str]) -> tuple[str, float, int]:
    """(stdout, wall seconds, the child's peak RSS in bytes) of a command; raises on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[:6])} … failed ({proc.returncode}): {err.read().strip()[-800:]}")
        return out.read(), wall, usage.ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------- stage configs
def compose_stages(names: list[str]) -> list[Any]:
    """Each stage's resolved TrainConfig (typed), composed from conf/ exactly as train-stage does."""
    from hydra import compose, initialize_config_dir

    from stages.schema import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return [to_config(compose(config_name="train", overrides=[f"stage={n}"])) for n in names]


def layouts(cfg: Any) -> list[tuple[str, Any]]:
    """The stage's configured DeepSpeed layout, then the same ranks without a pipeline."""
    ds = cfg.deepspeed
    label = f"pipe {ds.pipeline_stages} + ZeRO-{ds.zero_stage}" if ds.pipeline else f"ZeRO-{ds.zero_stage}"
    out = [(f"{label} (configured)", cfg)]
    for stage in (1, 3):
        if ds.pipeline or ds.zero_stage != stage:
            alt = dataclasses.replace(cfg, deepspeed=dataclasses.replace(ds, pipeline=False, zero_stage=stage))
            out.append((f"ZeRO-{stage}, no pipeline", alt))
    return out


# ---------------------------------------------------------------------- the benchmark
def projected_seconds(nbytes: int, workers: int, per_worker: float, aggregate: float, shards: int) -> float:
    effective = min(workers, shards)
    return nbytes / min(effective * per_worker, aggregate)


def parse_rate(text: str) -> float:
    from growth.checkpoint import parse_size

    return float(parse_size(text.removesuffix("/s")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--bandwidth", default="2GB/s", help="disk bandwidth per worker (default 2GB/s)")
    p.add_argument("--aggregate", default="25GB/s",
                   help="aggregate bandwidth of the shared filesystem, the cap for many workers (default 25GB/s)")
    p.add_argument("--workers", default="1,8,64", help="worker counts to project (default 1,8,64)")
    p.add_argument("--max-shard-size", default="5GiB", help="shard size of grow apply (default 5GiB)")
    p.add_argument("--in-process", action="store_true",
                   help="plan in this process and skip the `grow plan` CLI run (no fresh-process RSS)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny schedule instead of Tele-FLM, in process (for tests)")
    p.add_argument("--child", nargs=3, metavar=("SRC_JSON", "TARGET", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.in_process = args.in_process or args.smoke
    return args


def measure_growths(args: argparse.Namespace, cfgs: list[dict[str, Any]], per_worker: float, aggregate: float,
                    worker_counts: list[int], shard_limit: int):
    """Each growth of the schedule: plan time and RAM (a fresh process), bytes moved, projected
    apply time → (records, the models each stage ends with, the three tables' rows)."""
    import torch

    from growth.config import resolve_config
    from growth.executor import peak_memory_estimate, shard_tasks
    from operators import make_plan
    from stages.schema import growth_spec

    bf16 = torch.bfloat16
    growths, plan_rows, io_rows, time_rows = [], [], [], []
    model = resolve_config(cfgs[0].stage.model)
    models = [model]
    for cfg in cfgs[1:]:
        stage = cfg.stage
        spec = growth_spec(stage.growth)
        if spec.positions == "distance":  # chosen from the weights; none here — same tensors and bytes
            spec = dataclasses.replace(spec, positions="interleave")
        target = resolve_config(stage.model)
        child_argv = [json.dumps(model.to_hf_dict()), stage.model, json.dumps(spec.to_dict())]
        if args.in_process:
            child, child_wall = child_plan(*child_argv), 0.0
        else:
            out, child_wall, _ = run_measured([sys.executable, str(Path(__file__).resolve()), "--child",
                                               *child_argv])
            child = json.loads(out.strip().splitlines()[-1])
        plan = make_plan(model, target, spec)
        ops = plan.tensor_ops()
        moments = stage.growth.optimizer_state
        w_read = sum(_numel(op.src_shape) for op in ops if op.src_shape) * 2
        w_written = plan.config.params * 2
        m_read = 2 * sum(_numel(op.src_shape) for op in ops if op.src_shape) * 4 if moments else 0
        m_written = 2 * plan.config.params * 4 if moments else 0
        total = w_read + w_written + m_read + m_written
        shards = len(shard_tasks(plan.config, bf16, shard_limit))
        moment_shards = len(shard_tasks(plan.config, torch.float32, shard_limit)) * 2 if moments else 0
        apply_ram = peak_memory_estimate(plan, bf16, bf16, 1)
        src_name = cfgs[cfgs.index(cfg) - 1].stage.model
        cli = {"wall_s": None, "max_rss": None}
        if not args.in_process:
            _, cli["wall_s"], cli["max_rss"] = run_measured(
                [str(Path(sys.executable).parent / "grow"), "plan", "--from", src_name, "--to", stage.model,
                 "--json", "--optimizer", "--strategy", stage.growth.strategy, "--positions", spec.positions])
        name = f"{src_name} → {stage.model}"
        plan_rows.append([name, f"{spec.hidden}/{spec.ffn}/{spec.heads}/{spec.depth}", child["tensors"],
                          f"{child['seconds']:.2f} s", fmt_bytes(child["peak_rss"] - child["rss_before"]),
                          fmt_bytes(child["peak_rss"]), _opt(cli["wall_s"], lambda v: f"{v:.1f} s"),
                          _opt(cli["max_rss"], fmt_bytes)])
        io_rows.append([name, f"{fmt_params(model.params)} → {fmt_params(plan.config.params)}",
                        fmt_bytes(w_read), fmt_bytes(w_written), fmt_bytes(m_read), fmt_bytes(m_written),
                        fmt_bytes(total), f"{shards} + {moment_shards}", fmt_bytes(apply_ram)])
        projections = {w: projected_seconds(total, w, per_worker, aggregate, shards + moment_shards)
                       for w in worker_counts}
        time_rows.append([name] + [fmt_seconds(s) for s in projections.values()])
        growths.append({
            "growth": name, "spec": f"{spec.hidden}/{spec.ffn}/{spec.heads}/{spec.depth}",
            "from_params": model.params, "to_params": plan.config.params, "tensors": child["tensors"],
            "plan_seconds": child["seconds"], "plan_child_wall_s": child_wall,
            "plan_peak_rss": child["peak_rss"], "plan_rss_growth": child["peak_rss"] - child["rss_before"],
            "grow_plan_cli_wall_s": cli["wall_s"], "grow_plan_cli_max_rss": cli["max_rss"],
            "bytes_read_weights_bf16": w_read, "bytes_written_weights_bf16": w_written,
            "bytes_read_moments_fp32": m_read, "bytes_written_moments_fp32": m_written,
            "bytes_total": total, "shards_weights": shards, "shards_moments": moment_shards,
            "apply_peak_ram_per_worker": apply_ram,
            "projected_seconds": {str(w): s for w, s in projections.items()},
        })
        model = plan.config.replace(growth_mask=None)  # the stage ends at c = 1, masks folded
        models.append(model)

    return growths, models, (plan_rows, io_rows, time_rows)


def memory_table(cfgs: list[dict[str, Any]], models: list[Any]) -> list[dict[str, Any]]:
    """DeepSpeed's per-GPU model states of each stage's layouts, printed and returned."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from stages.launch.dry_run import memory_report

    mem_rows, stage_mem = [], []
    for cfg, config in zip(cfgs, models, strict=True):
        for label, layout in layouts(cfg):
            mem = memory_report(config, layout)
            row = {"stage": cfg.stage.name, "layout": label, "ranks": mem["ranks"],
                   "pipeline_degree": mem["pipeline_degree"], "data_parallel": mem["data_parallel"],
                   "params_per_gpu": mem["params_per_gpu"], "gpu_bytes": mem["gpu_bytes"],
                   "function": mem["function"]}
            worst = row["gpu_bytes"]
            if mem["pipeline_degree"] > 1:  # the fullest pipeline stage decides whether it fits
                row["params_largest_stage"] = largest_pipeline_stage(config, mem["pipeline_degree"])
                ranks = mem["data_parallel"] if layout.deepspeed.zero_stage > 0 else 1
                _, worst = estimate_zero2_model_states_mem_needs(
                    row["params_largest_stage"], num_gpus_per_node=ranks, num_nodes=1, cpu_offload=False)
                row["gpu_bytes_largest_stage"] = worst
            mem_rows.append([row["stage"], label, row["ranks"], row["data_parallel"],
                             fmt_params(row["params_per_gpu"]), f"{row['gpu_bytes'] / GB:,.1f} GB",
                             _opt(row.get("params_largest_stage"), fmt_params),
                             _opt(row.get("gpu_bytes_largest_stage"), lambda v: f"{v / GB:,.1f} GB"),
                             "yes" if worst < 80 * GB else "no"])
            stage_mem.append(row)
    print_table(["stage", "layout", "ranks", "DP", "params/GPU", "states/GPU", "largest stage",
                 "its states", "< 80 GB"], mem_rows,
                title="DeepSpeed per-GPU model states (weights + grads + Adam, no offload, activations excluded)")
    print("  ZeRO-0/1/2: estimate_zero2_model_states_mem_needs(params per GPU, num_gpus_per_node=DP, num_nodes=1,"
          " cpu_offload=False)\n  — with a pipeline, params per GPU = params / pipeline degree "
          "(stages.launch.dry_run), and for the\n  fullest stage (layers split contiguously to balance "
          "parameters, embedding first, norm + lm_head last)\n  ZeRO-3: "
          "estimate_zero3_model_states_mem_needs(params, largest tensor, nproc, nnodes, cpu_offload=False)")
    return stage_mem


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_plan(*args.child)))
        return {}
    from growth.checkpoint import parse_size

    info = machine_info()
    print_machine(info)
    per_worker, aggregate = parse_rate(args.bandwidth), parse_rate(args.aggregate)
    worker_counts = [int(w) for w in args.workers.split(",")]
    shard_limit = parse_size(args.max_shard_size)
    schedule = "tiny" if args.smoke else "teleflm"
    cfgs = compose_stages(SCHEDULES[schedule])
    growths, models, (plan_rows, io_rows, time_rows) = measure_growths(args, cfgs, per_worker, aggregate,
                                                                       worker_counts, shard_limit)
    print_table(["growth", "hidden/ffn/heads/depth", "tensors", "plan time", "plan RAM", "child peak RSS",
                 "grow plan CLI", "CLI peak RSS"], plan_rows,
                title="plan (operators.make_plan + tensor_ops, fresh process each; `grow plan --json` for the CLI)")
    print("  plan RAM = peak RSS during the plan above the RSS before it (imports excluded); "
          "child peak RSS includes python + torch")
    print_table(["growth", "params", "read w (bf16)", "write w (bf16)", "read m (fp32)", "write m (fp32)",
                 "total I/O", "shards (w + m)", "apply RAM/worker"], io_rows,
                title="bytes grow apply moves (weights bf16, Adam exp_avg + exp_avg_sq fp32)")
    print_table(["growth"] + [f"{w} worker{'s' if w > 1 else ''}" for w in worker_counts], time_rows,
                title=f"projected grow apply time: I/O-bound at {args.bandwidth} per worker, "
                      f"capped at {args.aggregate} aggregate")

    stage_mem = memory_table(cfgs, models)
    result = {"benchmark": "plan_scale", "schedule": schedule, "growths": growths, "memory": stage_mem,
              "bandwidth_per_worker": per_worker, "aggregate_bandwidth": aggregate,
              "workers": worker_counts, "smoke": args.smoke, "machine": info}
    emit_json(result)
    return result


def largest_pipeline_stage(config: Any, stages: int) -> int:
    """Parameters of the fullest stage when [embedding, layer 0 … L-1, norm + lm_head] are cut
    into ``stages`` contiguous pieces with the smallest possible maximum (binary search)."""
    h, v = config.hidden_size, config.vocab_size
    per_layer = (config.params - 2 * v * h - h) // config.num_hidden_layers
    items = [v * h] + [per_layer] * config.num_hidden_layers + [v * h + h]

    def pieces(cap: int) -> int:
        count, load = 1, 0
        for item in items:
            if load + item > cap:
                count, load = count + 1, 0
            load += item
        return count

    lo, hi = max(items), sum(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if pieces(mid) <= stages:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fmt_params(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def _opt(value: Any, fmt: Any) -> str:
    return "-" if value is None else fmt(value)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
