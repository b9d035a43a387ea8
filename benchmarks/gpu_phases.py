"""The five phases of benchmarks/gpu_stage.py, each a function ``(ctx) -> dict`` of what it measured.

``ctx`` is gpu_stage's :class:`Context`: the model sizes (real or ``--smoke``), the device,
the work directory and the arguments. Every phase frees what it built before it returns, so
the next starts from an empty device; timed windows hold nothing but the work they time.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO

PEAK_H100 = 989e12  # dense bf16 FLOP/s of an H100 SXM (the MFU denominator the issue names)


# ---------------------------------------------------------------------- helpers
class Timer:
    """Seconds of a window: CUDA events on a GPU (no host sync inside it), perf_counter on a CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class BigramTokens:
    """A learnable synthetic stream for the trainer (``StageData``'s interface): each token's
    successor is one of 4 drawn from a seeded table, so the loss can fall from ln V toward ln 4.
    Batches are a pure function of the step (both precisions see the same tokens)."""

    tokens_start = 0

    def __init__(self, vocab: int, micro_batch: int, seq: int, grad_accum: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.micro_batch, self.seq, self.grad_accum = vocab, micro_batch, seq, grad_accum
        self.table = torch.randint(0, vocab, (vocab, 4), generator=g)
        self.eval = [self.batch(10**6 + i) for i in range(2)]

    def batch(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(key)
        ids = torch.empty(self.micro_batch, self.seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (self.micro_batch,), generator=g)
        picks = torch.randint(0, 4, (self.micro_batch, self.seq), generator=g)
        for t in range(self.seq):
            ids[:, t + 1] = self.table[ids[:, t], picks[:, t]]
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.batch(step * self.grad_accum + m) for m in range(self.grad_accum)]

    def position(self, steps: int) -> dict[str, Any]:
        return {}


class RandomTokens(BigramTokens):
    """Uniform random tokens (the MFU phase: the work, not the learning, is measured)."""

    def batch(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(key)
        ids = torch.randint(0, self.vocab, (self.micro_batch, self.seq + 1), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def random_data(ctx: Any, config: Any) -> RandomTokens:
    return RandomTokens(config.vocab_size, ctx.args.micro_batch, ctx.args.seq, ctx.args.grad_accum)


def make_trainer(ctx: Any, config: Any, name: str, precision: str, compiled: bool, data: Any, steps: int) -> Any:
    """The stage Trainer (its engine, schedule and data path) of one ZeRO-1 rank: no saves, no
    evals between steps, the loss to the host only at the end (log_every = steps)."""
    from growth.runs import StageDir
    from stages.rank.trainer import Trainer
    from stages.resolved import ResolvedStage
    from stages.schema import DeepSpeedCfg, StageCfg, TrainConfig

    a = ctx.args
    stage = StageCfg(name=name, steps=steps, micro_batch_size=a.micro_batch, grad_accum=a.grad_accum,
                     seq_len=a.seq, lr=3e-4, warmup_steps=1, save_every=0, eval_batches=1, log_every=steps)
    ds = DeepSpeedCfg(zero_stage=1, precision=precision, compile="true" if compiled else "false",
                      activation_checkpointing=a.activation_checkpointing)
    stage_dir = ctx.workdir / name
    shutil.rmtree(stage_dir, ignore_errors=True)
    resolved = ResolvedStage(TrainConfig(stage=stage, deepspeed=ds, nproc=1, run_dir=str(ctx.workdir)),
                             stage_dir=str(StageDir(stage_dir).root), model_config=config.to_hf_dict())
    return Trainer(resolved, data=data)


def random_batches(ctx: Any, config: Any, n: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``n`` steps of random-token micro batches, already on the device (outside the timed window)."""
    a, g = ctx.args, torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        step = []
        for _ in range(a.grad_accum):
            t = torch.randint(0, config.vocab_size, (a.micro_batch, a.seq + 1), generator=g).to(ctx.device)
            step.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        out.append(step)
    return out


# ---------------------------------------------------------------------- 1. preflight
def preflight(ctx: Any) -> dict[str, Any]:
    """Versions, device, free disk and RAM, and one n³ matmul (bf16 8192³ on a GPU): the measured peak."""
    import deepspeed

    cuda = ctx.device.type == "cuda"
    n = 256 if ctx.args.smoke else 8192
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    with Timer(cuda) as t:
        for _ in range(reps):
            a @ b
    del a, b
    free_device()
    disk = shutil.disk_usage(ctx.workdir)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": sys.version.split()[0],
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "disk_free_bytes": disk.free, "ram_free_bytes": ram, "matmul": f"{n}^3 {str(dtype)[6:]}",
            "measured_peak_flops": 2 * n**3 * reps / t.seconds}


# ---------------------------------------------------------------------- 2. MFU
def mfu_variant(ctx: Any, compiled: bool, fused: bool, profile: bool) -> dict[str, Any]:
    """One engine (eager/compiled × fused/foreach AdamW) through ``engine.train_step``: warm-up,
    then the timed steps with nothing else in the window (no save, eval, log, host read)."""
    config, a = ctx.model, ctx.args
    precision = "fp32" if a.smoke else "bf16"
    trainer = make_trainer(ctx, config, "mfu", precision, compiled, random_data(ctx, config), a.warmup + a.steps)
    engine = trainer.engine
    if not fused:  # torch's foreach AdamW instead (read at every step: set before the first)
        for group in engine.adam.param_groups if hasattr(engine, "adam") else []:
            group["fused"], group["foreach"] = None, True
    batches = random_batches(ctx, config, a.warmup + a.steps)
    for b in batches[:a.warmup]:
        engine.train_step(b)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Timer(ctx.device.type == "cuda") as t:
        for b in batches[a.warmup:]:
            loss = engine.train_step(b)
    tokens = a.micro_batch * a.grad_accum * a.seq * a.steps
    flops = config.flops_per_token(a.seq) * tokens / t.seconds
    out = {"compiled": compiled, "adamw": "fused" if fused else "foreach", "seconds": t.seconds,
           "tokens_per_s": tokens / t.seconds, "tflops": flops / 1e12, "mfu_989": flops / PEAK_H100,
           "mfu_measured": flops / ctx.measured_peak if ctx.measured_peak else None, "final_loss": float(loss),
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if ctx.device.type == "cuda" else None}
    if profile:
        out["top_kernels"] = top_kernels(engine, batches[:2], ctx.device.type == "cuda")
    del trainer, engine, batches
    free_device()
    return out


def top_kernels(engine: Any, batches: list[Any], cuda: bool, rows: int = 8) -> list[dict[str, Any]]:
    """A 2-step torch.profiler trace: the kernels (CPU ops on a CPU) that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for b in batches:
            engine.train_step(b)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"name": e.key[:80], "ms": getattr(e, key) / 1e3, "calls": e.count} for e in events]


def mfu(ctx: Any) -> dict[str, Any]:
    """Eager vs compiled (fused AdamW), then foreach vs fused AdamW (eager), in this process."""
    variants = [(False, True), (True, True), (False, False)]
    runs = []
    for i, (compiled, fused) in enumerate(variants):
        if ctx.deadline.left() < ctx.estimate("mfu_variant"):
            runs.append({"compiled": compiled, "adamw": "fused" if fused else "foreach", "skipped": "deadline"})
            continue
        runs.append(mfu_variant(ctx, compiled, fused, profile=i == 0))
        ctx.record.update("mfu", {"variants": runs})  # on disk after each variant too
    return {"variants": runs, "params": ctx.model.params, "tokens_per_step":
            ctx.args.micro_batch * ctx.args.grad_accum * ctx.args.seq}


# ---------------------------------------------------------------------- 3. bf16 vs fp32
def parity(ctx: Any) -> dict[str, Any]:
    """bf16 vs fp32 (TF32 off) from one init, the same bigram stream: per-step relative loss gaps."""
    config, a = ctx.parity_model, ctx.args
    steps = 4 if a.smoke else 30
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        data = BigramTokens(config.vocab_size, a.micro_batch, a.seq, a.grad_accum)
        trainer = make_trainer(ctx, config, f"parity_{precision}", precision, False, data, steps)
        run = [trainer.engine.train_step(trainer.batches.take(s)) for s in range(steps)]
        losses[precision] = [float(v) for v in run]
        del trainer, run
        free_device()
    torch.backends.cuda.matmul.allow_tf32 = True
    gaps = [abs(b - f) / f for f, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    return {"params": config.params, "steps": steps, "losses": losses, "step0_rel_gap": gaps[0],
            "max_rel_gap": max(gaps), "final_rel_gap": gaps[-1]}


# ---------------------------------------------------------------------- 4. growth exactness
def growth_exactness(ctx: Any) -> dict[str, Any]:
    """The parity model grown (wider, more heads, bigger FFN, deeper; zero strategy; μP scale
    change) on the device in fp32: the grown model's loss equals the source's within 1e-4."""
    from growth.model import build_model, init_state_dict
    from operators import GrowthSpec, grow_state_dict

    src, dst = ctx.growth_pair
    torch.backends.cuda.matmul.allow_tf32 = False
    state = init_state_dict(src, seed=7)
    grown_config, grown = grow_state_dict(state, src, dst, GrowthSpec.from_strategy("zero"))
    data = BigramTokens(src.vocab_size, 2, ctx.args.seq, 1)
    x, y = (t.to(ctx.device) for t in data.batch(0))
    with torch.no_grad():
        before = float(build_model(src, state, device=ctx.device).loss(x, y))
        after = float(build_model(grown_config, grown, device=ctx.device).loss(x, y))
    torch.backends.cuda.matmul.allow_tf32 = True
    free_device()
    return {"from_params": src.params, "to_params": grown_config.params, "loss_before": before,
            "loss_after": after, "gap": abs(after - before), "exact": abs(after - before) <= 1e-4}


# ---------------------------------------------------------------------- 5. grow apply vs the I/O floor
def grow_io(ctx: Any) -> dict[str, Any]:
    """Export a trained checkpoint with Adam moments, ``grow apply --workers N`` it, and write the
    same bytes with fsync (the disk's floor). At most source + grown on disk at once."""
    config = ctx.model
    trainer = make_trainer(ctx, config, "export", "fp32" if ctx.args.smoke else "bf16", False,
                           random_data(ctx, config), 1)
    trainer.train_step()
    with Timer(False) as t_export:
        trainer.finish()
    source = trainer.layout.final
    del trainer
    free_device()
    out = ctx.workdir / "grown"
    shutil.rmtree(out, ignore_errors=True)
    target = ctx.workdir / "grow_target"
    target.mkdir(exist_ok=True)
    ctx.grown_model.save(target)
    cmd = [sys.executable, "-m", "growth.cli", "apply", "--from", str(source), "--to", str(target / "config.json"),
           "--out", str(out), "--dtype", "bfloat16", "--workers", str(ctx.args.grow_workers), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with Timer(False) as t_grow:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"grow apply failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    read, written = dir_bytes(source), dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)  # before the floor's file: never both on disk
    floor_s = write_floor(ctx.workdir / "floor.bin", written)
    shutil.rmtree(source.parent, ignore_errors=True)
    return {"export_s": t_export.seconds, "grow_s": t_grow.seconds, "workers": ctx.args.grow_workers,
            "bytes_read": read, "bytes_written": written, "grow_write_gbps": written / t_grow.seconds / 1e9,
            "floor_write_s": floor_s, "floor_write_gbps": written / floor_s / 1e9,
            "grow_vs_floor": floor_s / t_grow.seconds}


def write_floor(path: Path, size: int, block: int = 64 << 20) -> float:
    """Seconds to write ``size`` bytes to ``path`` in 64 MiB blocks and fsync (then delete it)."""
    buf = os.urandom(min(block, max(size, 1)))
    start = time.perf_counter()
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            left -= fh.write(buf[:left])
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
