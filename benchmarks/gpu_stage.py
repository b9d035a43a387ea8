"""One lent GPU, at most 8 minutes: the training path's speed and numerics, phase by phase.

Phases (benchmarks/gpu_phases.py), each writing the JSON record ``$OUT/gpu_stage.json`` when
it ends (``--out``; atomic, so a killed run leaves every finished phase on disk); an internal
deadline (``--budget-s``, default 450 s) skips a phase, or an MFU variant, that would not fit:

1. **preflight**: torch/DeepSpeed/CUDA versions, the GPU, free disk and RAM, one 8192³ bf16
   matmul (the measured peak);
2. **mfu**: the ~1.3B model below through the trainer's engine (``Engine.train_step``: ZeRO-1,
   bf16, fp32 gradient accumulation, chunked loss), CUDA-event timing of 20 steps after 3
   warm-up steps with nothing else in the window (no saves, evals, logs or host reads);
   eager vs compiled layers and fused vs foreach AdamW in this process; tokens/s, TFLOP/s,
   MFU against 989 TFLOP/s and against the measured peak, peak memory, and the top kernels
   of a 2-step profile. flops_per_token is ``ModelConfig.flops_per_token`` (6 × non-embedding
   parameters with lm_head + 12·L·heads·head_dim·T, PaLM's convention);
3. **parity**: bf16 vs fp32 (TF32 off) from one init of a ~0.22B model, 30 steps of a
   learnable bigram stream: step-0 gap, max and final relative gap;
4. **growth**: the parity pair grown on the GPU (wider, more heads, bigger FFN, deeper; zero
   strategy; μP scale change), fp32: loss gap ≤ 1e-4;
5. **grow_io**: export the 1.3B (weights + Adam moments, fp32), ``grow apply --workers 8`` to
   ~2.3B (bf16 + moments), and the same bytes written with fsync on the same disk (the
   floor); the grown output is deleted before the floor file is written (≤ ~40 GB at once).

    python benchmarks/gpu_stage.py --out $OUT         # on the GPU machine (docs/benchmarks.md)
    python benchmarks/gpu_stage.py --smoke            # CPU, tiny models, every phase (the suite)

The last line printed is the record as one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gpu_phases
from _common import emit_json, machine_info, print_machine

from flmcore.io import write_json_atomic
from flmcore.process import free_port

# ~1.3B Tele-FLM: 20 × 50.6M per layer + 2 × 80384 × 2048 embeddings = 1.34B parameters
MODEL_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=16,
                head_dim=128, vocab_size=80384, use_mup=True, input_mult=1.0, output_mult=0.5,
                mup_scale_factor=2048 / 512, max_position_embeddings=4096)
GROWN_2B = dict(MODEL_1B, hidden_size=2560, intermediate_size=6880, num_hidden_layers=24,
                num_attention_heads=20, mup_scale_factor=2560 / 512)
PARITY = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
              head_dim=128, vocab_size=32768, use_mup=True, input_mult=1.0, output_mult=0.5,
              mup_scale_factor=1024 / 512, max_position_embeddings=4096)
GROWN_PARITY = dict(PARITY, hidden_size=1280, intermediate_size=3520, num_hidden_layers=16, num_attention_heads=10,
                    mup_scale_factor=1280 / 512)
# Tiny shapes for --smoke on a CPU (the same code path).
SMOKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
             vocab_size=264, use_mup=True, input_mult=1.0, output_mult=1.0, mup_scale_factor=2.0,
             max_position_embeddings=512)
GROWN_SMOKE = dict(SMOKE, hidden_size=80, intermediate_size=220, num_hidden_layers=3, num_attention_heads=5,
                   mup_scale_factor=2.5)
# Seconds each phase needs at most on an H100 (measured nowhere yet: the budget split).
ESTIMATES = {"preflight": 20, "mfu": 150, "mfu_variant": 50, "parity": 60, "growth": 30, "grow_io": 150}
RECORD_NAME = "gpu_stage.json"


class Record:
    """The JSON record, rewritten atomically after every phase (and MFU variant)."""

    def __init__(self, path: Path, head: dict[str, Any]):
        self.path, self.data = path, {**head, "phases": {}}
        self.write()

    def update(self, phase: str, result: dict[str, Any]) -> None:
        self.data["phases"][phase] = result
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


class Deadline:
    def __init__(self, budget_s: float):
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


class Context:
    """What every phase reads: sizes, device, work directory, arguments, record, deadline."""

    def __init__(self, args: argparse.Namespace, record: Record):
        import torch

        from growth.config import ModelConfig

        self.args, self.record, self.deadline = args, record, Deadline(args.budget_s)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = ModelConfig(**(SMOKE if args.smoke else MODEL_1B))
        self.grown_model = ModelConfig(**(GROWN_SMOKE if args.smoke else GROWN_2B))
        self.parity_model = ModelConfig(**(SMOKE if args.smoke else PARITY))
        self.growth_pair = (self.parity_model, ModelConfig(**(GROWN_SMOKE if args.smoke else GROWN_PARITY)))
        self.workdir = Path(args.workdir)
        self.measured_peak: float | None = None

    def estimate(self, phase: str) -> float:
        return 0.0 if self.args.smoke else ESTIMATES[phase]


def init_single_process() -> None:
    """A one-rank process group (what torchrun would set up), then DeepSpeed's comm layer; on a
    GPU gloo serves CPU tensors next to NCCL."""
    import torch
    import torch.distributed as dist

    from stages.engines.common import init_distributed

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    init_distributed()


PHASES = [("preflight", gpu_phases.preflight), ("mfu", gpu_phases.mfu), ("parity", gpu_phases.parity),
          ("growth", gpu_phases.growth_exactness), ("grow_io", gpu_phases.grow_io)]


def run_phases(ctx: Context) -> None:
    for name, phase in PHASES:
        if ctx.deadline.left() < ctx.estimate(name):
            ctx.record.update(name, {"skipped": f"deadline: {ctx.deadline.left():.0f} s left, needs "
                                                f"~{ctx.estimate(name)} s"})
            print(f"[{name}] skipped (deadline)", flush=True)
            continue
        init_single_process()  # once, before the first phase that runs
        start = time.perf_counter()
        try:
            result = {**phase(ctx), "wall_s": time.perf_counter() - start}
        except Exception as err:  # a failed phase is recorded; the next ones still run
            result = {"error": f"{type(err).__name__}: {err}"[:800], "wall_s": time.perf_counter() - start}
        if name == "preflight":
            ctx.measured_peak = result.get("measured_peak_flops")
        ctx.record.update(name, result)
        print(f"[{name}] {time.perf_counter() - start:.1f} s: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            if not isinstance(v, (dict, list)))[:400], flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT") or ".", help="the record's directory (default $OUT)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro step (default 4)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro steps per optimizer step (default 2)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--budget-s", type=float, default=450, help="internal deadline in seconds (default 450)")
    p.add_argument("--workdir", default=None, help="checkpoints go here (default a temp dir on the same disk)")
    p.add_argument("--grow-workers", type=int, default=8, help="grow apply --workers (default 8)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny models, every phase")
    args = p.parse_args(argv)
    if args.smoke:
        args.micro_batch, args.grad_accum, args.seq, args.warmup, args.steps, args.grow_workers = 2, 1, 32, 1, 2, 1
        os.environ.setdefault("FLM_COMPILE_BACKEND", "aot_eager")  # no inductor C++ build on a CPU
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print_machine(info)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_stage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = str(workdir)
    record = Record(Path(args.out) / RECORD_NAME, {"benchmark": "gpu_stage", "smoke": args.smoke, "machine": info,
                                                   "args": {k: v for k, v in vars(args).items()}})
    try:
        run_phases(Context(args, record))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit_json(record.data)
    return record.data


if __name__ == "__main__":
    main()
