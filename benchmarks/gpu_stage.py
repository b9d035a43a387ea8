"""One GPU stage check: train a ~1.3B Tele-FLM with DeepSpeed, measure MFU, then grow it.

Prepared for a lent H100/H200 (one GPU, ≤ 8 minutes in all). Phases, each timed:

1. **train**: the 1.3B config below (Tele-FLM shape rules: head_dim 128, MHA, SwiGLU
   f ≈ 2.7·h, untied, vocab 80,384, μP multipliers as the 52B) through the trainer itself
   (``stages.rank.trainer.Trainer.train_step``: its ZeRO-1 engine, μP LR groups, schedule and
   logging, the loss synced to the host every ``--log-every`` steps; bf16, torch AdamW, one
   process — RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT are set here), random tokens;
   ``--warmup`` steps, then ``--steps`` timed steps;
2. **MFU** = ``flops_per_token`` × tokens/s ÷ the card's dense bf16 peak (H100 SXM and
   H200: 989 TFLOP/s; H100 PCIe 756; A100 312; ``--peak-tflops`` otherwise). flops_per_token
   is ``ModelConfig.flops_per_token``: 6 × non-embedding parameters (lm_head included) +
   12·L·heads·head_dim·T for attention (PaLM's convention, no causal halving). Without
   activation checkpointing MFU equals hardware FLOPs utilisation. Target ≥ 50 %;
3. **export**: ``Trainer.finish`` (final eval, ``stages.rank.export.export_final`` → canonical
   checkpoint (fp32) + Adam moments, summary.json), on the machine's disk (``--workdir``);
4. **grow**: ``grow apply`` (the CLI, ``--workers N``) of that checkpoint into a ~2.3B
   target (hidden 2048→2560, heads 16→20, FFN 5504→6880, layers 20→24; zero strategy),
   bf16 weights, moments included; bytes and GB/s reported.

    python benchmarks/gpu_stage.py                  # on the GPU machine (see docs/benchmarks.md)
    python benchmarks/gpu_stage.py --dry-run        # shapes, FLOPs, memory and disk plan; trains nothing
    python benchmarks/gpu_stage.py --smoke          # CPU, tiny config, 2 steps, tiny grow (tests)

The GPU machine has no DeepSpeed/pydantic/hjson: carry them as wheels (docs/benchmarks.md).
The last line printed is a JSON object; ``mfu`` is null without a known peak (CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, fmt_bytes, fmt_seconds, machine_info, print_machine, print_table

from flmcore.process import free_port

# ~1.3B Tele-FLM: 20 × 50.6M per layer + 2 × 80384 × 2048 embeddings = 1.34B parameters
MODEL_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=16,
                head_dim=128, vocab_size=80384, use_mup=True, input_mult=1.0, output_mult=0.5,
                mup_scale_factor=2048 / 512, max_position_embeddings=4096)
GROWN_2B = dict(MODEL_1B, hidden_size=2560, intermediate_size=6880, num_hidden_layers=24,
                num_attention_heads=20, mup_scale_factor=2560 / 512)
# Tiny shapes for --smoke on a CPU (same code path).
MODEL_SMOKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   head_dim=16, vocab_size=264, use_mup=True, input_mult=1.0, output_mult=1.0,
                   mup_scale_factor=2.0, max_position_embeddings=512)
GROWN_SMOKE = dict(MODEL_SMOKE, hidden_size=80, intermediate_size=220, num_hidden_layers=3,
                   num_attention_heads=5, mup_scale_factor=2.5)
# Dense bf16 peak FLOP/s by card name (NVIDIA data sheets; sparsity excluded).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device_name is None:
        return None
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


# ---------------------------------------------------------------------- phases
def init_single_process() -> None:
    """A one-rank process group (what torchrun would set up), then DeepSpeed's comm layer.

    Note: on a GPU the group gets gloo for CPU tensors next to NCCL, so CPU-side
    collectives (loss averaging, exports) work in one process as well.
    """
    import torch
    import torch.distributed as dist

    from stages.engines.common import init_distributed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    if torch.cuda.is_available() and not dist.is_initialized():
        torch.cuda.set_device(0)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    init_distributed()


class RandomTokens:
    """The trainer's data interface (``stages.rank.trainer.StageData``) over random token ids."""

    def __init__(self, vocab: int, micro_batch: int, seq: int, grad_accum: int):
        import torch

        self.vocab, self.shape, self.grad_accum = vocab, (micro_batch, seq + 1), grad_accum
        self.gen = torch.Generator().manual_seed(0)
        self.eval = [self._one()]

    def _one(self):
        import torch

        tokens = torch.randint(0, self.vocab, self.shape, generator=self.gen)
        return tokens[:, :-1], tokens[:, 1:]

    tokens_start = 0  # random tokens are no stream: nothing to continue or record

    def batches(self, step: int):
        return [self._one() for _ in range(self.grad_accum)]

    def position(self, steps: int) -> dict:
        return {}


def make_trainer(config: Any, args: argparse.Namespace, stage_dir: Path) -> Any:
    """A Trainer of one stage on random tokens: ``warmup + steps`` steps, no DeepSpeed saves."""
    from growth.runs import StageDir
    from stages.rank.trainer import Trainer
    from stages.resolved import ResolvedStage
    from stages.schema import DeepSpeedCfg, StageCfg, TrainConfig

    stage = StageCfg(name="gpu_stage", steps=args.warmup + args.steps, micro_batch_size=args.micro_batch,
                     grad_accum=args.grad_accum, seq_len=args.seq, lr=3e-4, warmup_steps=1, save_every=0,
                     eval_batches=1, log_every=args.log_every)
    ds = DeepSpeedCfg(zero_stage=1, precision=args.precision, activation_checkpointing=args.activation_checkpointing)
    resolved = ResolvedStage(TrainConfig(stage=stage, deepspeed=ds, nproc=1, run_dir=str(stage_dir.parent)),
                             stage_dir=str(StageDir(stage_dir).root), model_config=config.to_hf_dict())
    data = RandomTokens(config.vocab_size, args.micro_batch, args.seq, args.grad_accum)
    return Trainer(resolved, data=data)


def train(config: Any, args: argparse.Namespace, stage_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Build the trainer (fresh init, engine), run warmup + timed ``train_step``s; (trainer, timings)."""
    import torch

    t0 = time.perf_counter()
    trainer = make_trainer(config, args, stage_dir)
    t_engine = time.perf_counter() - t0
    if args.compile:
        trainer.engine.engine.compile()
    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    losses = [trainer.train_step() for _ in range(args.warmup)]
    sync()
    t_warmup = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    losses += [trainer.train_step() for _ in range(args.steps)]
    sync()
    t_timed = time.perf_counter() - t0
    losses_f = [float(v) for v in losses]
    return trainer, {"engine_s": t_engine, "warmup_s": t_warmup, "timed_s": t_timed,
                     "losses": losses_f, "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def export(trainer: Any) -> float:
    start = time.perf_counter()
    trainer.finish()
    return time.perf_counter() - start


def grow(src: Path, target: Any, out: Path, workers: int) -> dict[str, Any]:
    """``grow apply`` as a user runs it, in a clean environment (no torchrun variables)."""
    target_dir = out.parent / "grow_target"
    target_dir.mkdir(parents=True, exist_ok=True)
    target.save(target_dir)
    exe = Path(sys.executable).parent / "grow"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "growth.cli"]
    argv = [*cmd, "apply", "--from", str(src), "--to", str(target_dir / "config.json"), "--out", str(out),
            "--dtype", "bfloat16", "--workers", str(workers), "--quiet"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"grow apply failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return {"seconds": seconds, "bytes_read": dir_bytes(src), "bytes_written": dir_bytes(out)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------- plan (no GPU needed)
def plan(config: Any, grown: Any, args: argparse.Namespace) -> dict[str, Any]:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    tokens = args.micro_batch * args.grad_accum * args.seq
    _, states = estimate_zero2_model_states_mem_needs(config.params, 1, 1, cpu_offload=False)
    return {
        "params": config.params, "grown_params": grown.params, "flops_per_token": config.flops_per_token(args.seq),
        "tokens_per_step": tokens, "model_states_bytes": states,
        "export_bytes": config.params * 4 * 3,  # fp32 weights + exp_avg + exp_avg_sq
        "grown_bytes": grown.params * (2 + 8),  # bf16 weights + fp32 moments
    }


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro step (default 4)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro steps per optimizer step (default 4)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    p.add_argument("--log-every", type=int, default=10,
                   help="the trainer's stage.log_every: loss to the host every N steps (default 10)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's module first")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, when the card is not known")
    p.add_argument("--workdir", default="/tmp/gpu_stage", help="checkpoints go here (default /tmp/gpu_stage)")
    p.add_argument("--grow-workers", type=int, default=8, help="grow apply --workers (default 8)")
    p.add_argument("--no-grow", action="store_true", help="skip export and grow apply")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    p.add_argument("--dry-run", action="store_true", help="print the plan only; trains nothing")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny config, 2 steps, tiny grow")
    args = p.parse_args(argv)
    if args.smoke:
        args.micro_batch, args.grad_accum, args.seq, args.warmup, args.steps, args.log_every = 2, 1, 32, 1, 2, 1
        args.grow_workers = 1
        if args.workdir == "/tmp/gpu_stage":
            import tempfile

            args.workdir = tempfile.mkdtemp(prefix="gpu_stage-")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from growth.config import ModelConfig

    info = machine_info()
    print_machine(info)
    config = ModelConfig(**(MODEL_SMOKE if args.smoke else MODEL_1B))
    grown = ModelConfig(**(GROWN_SMOKE if args.smoke else GROWN_2B))
    p = plan(config, grown, args)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_flops(device_name, args.peak_tflops)
    print(f"model: hidden {config.hidden_size}, ffn {config.intermediate_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads × {config.head_dim}, vocab {config.vocab_size}: "
          f"{config.params / 1e9:.3f}B params; {p['flops_per_token'] / 1e9:.2f} GFLOP/token at seq {args.seq}")
    print(f"step: {args.micro_batch} × {args.grad_accum} × {args.seq} = {p['tokens_per_step']:,} tokens; "
          f"DeepSpeed ZeRO-1 {args.precision}, 1 {'GPU' if device_name else 'CPU process'}"
          f"{' (' + device_name + ')' if device_name else ''}; model states ≈ {fmt_bytes(p['model_states_bytes'])} "
          f"(estimate_zero2_model_states_mem_needs); peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown'}")
    print(f"disk: export {fmt_bytes(p['export_bytes'])} (fp32 + Adam), grown {grown.params / 1e9:.3f}B → "
          f"{fmt_bytes(p['grown_bytes'])} (bf16 + fp32 Adam) in {args.workdir}")
    result: dict[str, Any] = {"benchmark": "gpu_stage", "device": device_name, "peak_flops": peak, **p,
                              "precision": args.precision, "smoke": args.smoke, "dry_run": args.dry_run,
                              "machine": info}
    if args.dry_run:
        print("dry run: nothing trained")
        result["mfu"] = None
        emit_json(result)
        return result

    init_single_process()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "stage", ignore_errors=True)
    trainer, t = train(config, args, workdir / "stage")
    tokens_per_s = p["tokens_per_step"] * args.steps / t["timed_s"]
    achieved = p["flops_per_token"] * tokens_per_s
    mfu = achieved / peak if peak else None
    rows = [["Trainer (init weights, deepspeed.initialize, eval)", fmt_seconds(t["engine_s"]), ""],
            [f"warmup ({args.warmup} steps)", fmt_seconds(t["warmup_s"]), ""],
            [f"timed ({args.steps} steps)", fmt_seconds(t["timed_s"]),
             f"{tokens_per_s:,.0f} tok/s, {achieved / 1e12:.1f} TFLOP/s"
             + (f", MFU {mfu * 100:.1f}%" if mfu is not None else ", MFU n/a (no known peak)")]]
    result.update(tokens_per_s=tokens_per_s, achieved_flops=achieved, mfu=mfu, train=t)
    if not args.no_grow:
        ckpt, grown_dir = trainer.layout.final, workdir / "grown"
        shutil.rmtree(grown_dir, ignore_errors=True)
        t_export = export(trainer)
        rows.append(["export (fp32 + Adam)", fmt_seconds(t_export), fmt_bytes(dir_bytes(ckpt))])
        g = grow(ckpt, grown, grown_dir, args.grow_workers)
        moved = g["bytes_read"] + g["bytes_written"]
        rows.append([f"grow apply ({args.grow_workers} workers)", fmt_seconds(g["seconds"]),
                     f"read {fmt_bytes(g['bytes_read'])}, wrote {fmt_bytes(g['bytes_written'])}, "
                     f"{moved / g['seconds'] / 1e9:.2f} GB/s"])
        result.update(export_s=t_export, grow=g)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(["phase", "time", "result"], rows, title="gpu stage")
    if t["gpu_peak_bytes"]:
        print(f"GPU peak allocated: {fmt_bytes(t['gpu_peak_bytes'])}")
    print(f"losses (first, last): {t['losses'][0]:.4f}, {t['losses'][-1]:.4f}")
    if mfu is not None:
        print(f"MFU {mfu * 100:.1f}% ({'meets' if mfu >= 0.5 else 'misses'} the ≥ 50% target)")
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
