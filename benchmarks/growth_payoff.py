"""Does growth pay? Four arms at equal training FLOPs, each with its LR fully decayed by its own end.

Every run is a real ``train-stage`` process (DeepSpeed ZeRO-1, fp32 on the CPU, 1 rank),
launched with Hydra overrides; the only thing read back is each stage's ``summary.json``
(``eval_loss_end`` on fixed held-out batches, ``flops`` = (6·N_non-embedding + attention) ×
tokens, ``wall_seconds``, ``train_seconds``). The arms, at a training budget of C FLOPs:

- **scratch_small**: the small model from a fresh init for C FLOPs (warmup, cosine to 0);
- **scratch_final**: the final model from a fresh init for C FLOPs (warmup, cosine to 0);
- **growth**: the small model for ``--grow-fraction`` × C (warmup, then constant LR: it
  is not the end product), grown with the exact ``zero`` operator (new layers are zero
  identity blocks, Adam moments grown too), then the final model for the rest of C
  (re-warm to the same peak, cosine to 0 at the end of C);
- **stack**: the same, grown with the depth-copying ``copy`` operator (each new layer a
  copy of the old layer below it: G_stack-style stacking, not function-preserving).

growth and stack share their small-model stage (same config, same seed: the same run).
The small and final models differ only in depth (the final has twice the layers), so
both operators apply, and every arm sees the same batch shape, data and eval batches.

Procedure (``--budgets`` skips step 1):

1. **coarse sweep**: scratch_small and scratch_final, seed 0, base LR, up a ×2 grid of
   budgets until scratch_final's final loss drops below scratch_small's (the crossover);
   the main budgets are the two grid budgets around it and their geometric mean;
2. **LR sweep**: every arm at the smallest main budget, seed 0, LR × {0.5, 1, 2} (``--lr-mults``);
   each arm then uses its own best peak LR everywhere (no arm is tuned more than another);
3. **main grid**: those 3 budgets × ``--seeds`` seeds × 4 arms.

The reading: at which budget growth (or stack) beats *both* controls by more than the
seed spread (its worst seed below every control seed), by how much in loss, and how many
FLOPs the better control needs to reach growth's mean loss (interpolated along the
control's budget frontier, log-FLOPs; "beyond" when outside the budgets run).

    python benchmarks/growth_payoff.py                  # CPU: coarse sweep + LR sweep + grid (~40 min, 2 cores)
    python benchmarks/growth_payoff.py --budgets 1e12,2e12,4e12   # skip the coarse sweep
    python benchmarks/growth_payoff.py --smoke          # one tiny budget, one seed (tests, ~1 min)
    python benchmarks/growth_payoff.py --device cuda    # the same design ~100x (sizes and tokens)

Runs are kept under ``--run-dir`` (one directory per budget × LR × seed); a re-run
reuses finished stages. Run it under ``nice`` on a shared machine; each train-stage
process gets ``OMP_NUM_THREADS=1`` (unless set) and ``--jobs`` of them run at once.
Writes the plot (``--png``, default docs/growth_payoff.png) and RUN_DIR/growth_payoff.json
(everything); the last line printed is one JSON object:
``{"budgets": [{"flops": F, "arms": {"growth": [...], "scratch_final": [...],
"scratch_small": [...], "stack": [...]}}, ...]}`` (final eval loss per seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, fmt_seconds, machine_info, print_machine, print_table

from flmcore.errors import FlmError

ARMS = ("growth", "stack", "scratch_final", "scratch_small")
CONTROLS = ("scratch_final", "scratch_small")
GROWN = {"growth": "zero", "stack": "copy"}  # arm → conf/growth/<strategy>.yaml
SUMMARY = "summary.json"


class PayoffError(FlmError):
    """A train-stage run failed or the setup is inconsistent; the message names the run."""


# ---------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Model sizes, batch shape and budget grid of one device."""

    small: dict[str, int]  # ModelConfig shape fields of the small model
    final: dict[str, int]  # … of the final model (same width, 2× the layers)
    seq_len: int
    micro_batch_size: int
    coarse: tuple[float, ...]  # coarse-sweep budgets (FLOPs)
    lr: float  # base peak LR (μP: hidden matrices get lr / mup_scale_factor)
    warmup_steps: int
    eval_batches: int
    overrides: tuple[str, ...] = ()  # device-specific train-stage overrides
    jobs: int = 2


def _shape(hidden: int, ffn: int, layers: int, heads: int, head_dim: int) -> dict[str, int]:
    return {"hidden": hidden, "ffn": ffn, "layers": layers, "heads": heads, "head_dim": head_dim}


PRESETS: dict[str, Preset] = {
    # 2 CPU cores: 1 → 2 layers at width 32 (12.5k → 25k non-embedding parameters, 30k → 42k
    # in all). On these cores a step costs ~25-50 ms whatever the size (overhead-bound), and
    # every pair we tried is step-limited: at equal FLOPs the smaller model's extra steps win
    # until it saturates, which the 1-layer model does soonest (docs/benchmarks.md).
    "cpu": Preset(small=_shape(32, 88, 1, 2, 16), final=_shape(32, 88, 2, 2, 16), seq_len=128,
                  micro_batch_size=8, coarse=(2e11, 4e11, 8e11, 1.6e12), lr=3e-3, warmup_steps=20,
                  eval_batches=16, jobs=4),
    # One GPU, the same design ~100× in parameters (1 → 2 layers at width 320: 1.24M → 2.48M
    # non-embedding) and ~100× in tokens (10× the batch, 10× the steps), so ~1e4× the FLOPs,
    # bf16. Such budgets read ~1e8-1e9 tokens: far more than the embedded corpus (8 MB), so
    # pass a real corpus, e.g. --override data.source=/data/corpus.jsonl.
    "cuda": Preset(small=_shape(320, 864, 1, 5, 64), final=_shape(320, 864, 2, 5, 64), seq_len=128,
                   micro_batch_size=80, coarse=(2e15, 4e15, 8e15, 1.6e16), lr=3e-3, warmup_steps=200,
                   eval_batches=16, overrides=("deepspeed.precision=bf16",), jobs=1),
    # The test suite: the smallest shapes that still grow 2 → 4 layers; one budget of ~30 steps.
    "smoke": Preset(small=_shape(32, 88, 2, 2, 16), final=_shape(32, 88, 4, 2, 16), seq_len=64,
                    micro_batch_size=4, coarse=(2e9,), lr=3e-3, warmup_steps=4, eval_batches=2),
}


def model_config(shape: dict[str, int]):
    """The ModelConfig of a preset shape: the tiny flavors' byte vocab and μP (base width 32)."""
    from growth.config import ModelConfig

    return ModelConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], head_dim=shape["head_dim"],
                       vocab_size=264, valid_vocab_size=259, max_position_embeddings=1024,
                       use_mup=True, input_mult=1.0, output_mult=1.0,
                       mup_scale_factor=shape["hidden"] / 32)


# ---------------------------------------------------------------------- one train-stage call
@dataclass
class Stage:
    """One train-stage invocation inside a cell's run dir."""

    name: str  # stage.name (the stage dir)
    model: str  # "small" | "final"
    steps: int
    lr: float
    seed: int
    decay: str = "cosine"
    parent: str | None = None
    strategy: str | None = None  # conf/growth group for a grown stage
    deps: tuple[str, ...] = ()  # keys of stages that must finish first


@dataclass
class Cell:
    """All arms at one (budget, LR, seed): one run dir, up to five stages."""

    budget: float
    lr: float
    seed: int
    arms: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"C{self.budget:.3g}_lr{self.lr:.3g}_s{self.seed}"


@dataclass
class Result:
    summary: dict[str, Any]
    process_seconds: float  # the train-stage process, start to exit
    cpu_seconds: float  # user + system of it and its children (torchrun, the rank)
    reused: bool = False


class Runner:
    """Plans and runs train-stage processes, ``jobs`` at a time, reusing finished stages."""

    def __init__(self, root: Path, preset: Preset, grow_fraction: float, jobs: int, keep: bool):
        self.root, self.preset, self.grow_fraction, self.jobs, self.keep = root, preset, grow_fraction, jobs, keep
        self.extra: list[str] = []  # --override: passed to every train-stage run
        self.no_train = False  # --no-train: report from finished runs only
        self.missing: set[str] = set()  # stage keys left untrained under no_train
        self.models = root / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.flops_per_step: dict[str, float] = {}
        for size in ("small", "final"):
            config = model_config(getattr(preset, size))
            (self.models / f"{size}.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
            tokens = preset.seq_len * preset.micro_batch_size
            self.flops_per_step[size] = float(config.flops_per_token(preset.seq_len) * tokens)
        self.params = {s: model_config(getattr(preset, s)).params for s in ("small", "final")}
        self.results: dict[str, Result] = {}
        self.procs: set[subprocess.Popen] = set()  # running train-stage processes
        self.lock = threading.Lock()
        self.bar: Any = None

    # -------------------------------------------------------------- planning
    def stages(self, cell: Cell) -> dict[str, Stage]:
        """The stages a cell needs for its arms (keys are "<cell>/<stage name>")."""
        fps, c, out = self.flops_per_step, cell.budget, {}
        k = cell.key
        if "scratch_small" in cell.arms:
            out[f"{k}/scratch_small"] = Stage("scratch_small", "small", _steps(c, fps["small"]), cell.lr, cell.seed)
        if "scratch_final" in cell.arms:
            out[f"{k}/scratch_final"] = Stage("scratch_final", "final", _steps(c, fps["final"]), cell.lr, cell.seed)
        grown = [a for a in ("growth", "stack") if a in cell.arms]
        if grown:
            base_steps = _steps(self.grow_fraction * c, fps["small"])
            out[f"{k}/grow_base"] = Stage("grow_base", "small", base_steps, cell.lr, cell.seed, decay="constant")
            rest = _steps(c - base_steps * fps["small"], fps["final"])
            for arm in grown:
                # a different data seed: the grown stage restarts at step 0 and must not replay
                # the base stage's batches (scratch runs see fresh batches all along)
                out[f"{k}/{arm}"] = Stage(arm, "final", rest, cell.lr, cell.seed + 7919, parent="grow_base",
                                          strategy=GROWN[arm], deps=(f"{k}/grow_base",))
        return out

    def overrides(self, cell: Cell, stage: Stage) -> list[str]:
        p = self.preset
        args = [f"run_dir={self.root / cell.key}", "nproc=1", f"data.cache_dir={self.root / 'data'}",
                f"stage.name={stage.name}", f"stage.model={self.models / (stage.model + '.json')}",
                f"stage.steps={stage.steps}", f"stage.micro_batch_size={p.micro_batch_size}", "stage.grad_accum=1",
                f"stage.seq_len={p.seq_len}", f"stage.lr={stage.lr}", f"stage.warmup_steps={p.warmup_steps}",
                f"stage.decay={stage.decay}", "stage.min_lr_ratio=0.0", f"stage.eval_batches={p.eval_batches}",
                "stage.eval_every=0", "stage.save_every=0", "stage.log_every=10", f"stage.seed={stage.seed}",
                *p.overrides, *self.extra]
        if stage.parent is None:
            args.append("stage.parent=null")
        else:  # re-warm to the parent's peak (ratio 1) over warmup_steps, then cosine to 0
            args += [f"stage.parent={stage.parent}", f"growth={stage.strategy}", "stage.growth.positions=interleave",
                     "stage.lr_after_growth=rewarm", "stage.rewarm_peak_ratio=1.0",
                     f"stage.rewarm_steps={p.warmup_steps}"]
        return args

    # -------------------------------------------------------------- running
    def run(self, cells: list[Cell], label: str) -> None:
        """Train every stage the cells need (reusing finished ones), ``jobs`` at once."""
        todo: dict[str, tuple[Cell, Stage]] = {}
        for cell in cells:
            for key, stage in self.stages(cell).items():
                todo.setdefault(key, (cell, stage))
        pending = {k: v for k, v in todo.items() if k not in self.results}
        for key, (cell, stage) in list(pending.items()):
            summary = _read_json(self.root / cell.key / stage.name / SUMMARY)
            if summary is not None and summary.get("steps") == stage.steps:
                usage = _read_json(self.root / cell.key / f"{stage.name}.usage.json") or {}
                self.results[key] = Result(summary, usage.get("process_seconds", summary["wall_seconds"]),
                                           usage.get("cpu_seconds", float("nan")), reused=True)
                del pending[key]
        if not pending:
            return
        if self.no_train:
            self.missing.update(pending)
            print(f"\n{label}: --no-train: {len(pending)} runs not trained, left out of the report", flush=True)
            return
        from tqdm import tqdm

        print(f"\n{label}: {len(pending)} train-stage runs, {self.jobs} at a time", flush=True)
        self.bar = tqdm(total=len(pending), desc=label, unit="run", file=sys.stderr, dynamic_ncols=True)
        data_ready = (self.root / "data").is_dir() and any((self.root / "data").iterdir())
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool, self.stop_on_exit():
            while pending or running:
                ready = [k for k, (_, s) in pending.items() if all(d in self.results for d in s.deps)]
                slots = (self.jobs if data_ready else 1) - len(running)  # the first run tokenizes alone
                for key in ready[:max(0, slots)]:
                    cell, stage = pending.pop(key)
                    running[pool.submit(self.train, key, cell, stage)] = key
                if not running:
                    raise PayoffError(f"{label}: stages wait on runs that never finished: {sorted(pending)}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    running.pop(fut)
                    fut.result()  # re-raise a failed run here
                    data_ready = True
        self.bar.close()

    @contextlib.contextmanager
    def stop_on_exit(self):
        """On an error, Ctrl-C or SIGTERM: stop the running train-stage processes (each stops
        its own ranks) before leaving, so no run outlives the benchmark."""
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            yield
        except BaseException:
            with self.lock:
                procs = list(self.procs)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def train(self, key: str, cell: Cell, stage: Stage) -> None:
        stage_dir = self.root / cell.key / stage.name
        if stage_dir.exists():  # a half-finished earlier attempt: start that stage over
            shutil.rmtree(stage_dir)
        stage_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.root / cell.key / f"{stage.name}.log"
        argv = [sys.executable, "-m", "stages.train", *self.overrides(cell, stage)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("OMP_NUM_THREADS", "1")
        start = time.perf_counter()
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            with self.lock:
                self.procs.add(proc)
            _, status, usage = os.wait4(proc.pid, 0)  # its CPU time, children included
            proc.returncode = os.waitstatus_to_exitcode(status)
            with self.lock:
                self.procs.discard(proc)
        seconds = time.perf_counter() - start
        summary = _read_json(stage_dir / SUMMARY)
        if proc.returncode or summary is None:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
            raise PayoffError(f"train-stage run {cell.key}/{stage.name} failed (exit {proc.returncode}); "
                              f"log {log}: {tail[-400:]}")
        if not self.keep:
            shutil.rmtree(stage_dir / "ds_ckpt", ignore_errors=True)  # final/ stays: a parent needs it
        result = Result(summary, seconds, usage.ru_utime + usage.ru_stime)
        (self.root / cell.key / f"{stage.name}.usage.json").write_text(
            json.dumps({"process_seconds": seconds, "cpu_seconds": result.cpu_seconds}) + "\n")
        with self.lock:
            self.results[key] = result
            self.bar.update(1)
            self.bar.write(f"  {cell.key}/{stage.name}: {stage.steps} steps, eval loss {summary['eval_loss_end']:.4f}, "
                           f"{fmt_seconds(seconds)} wall ({fmt_seconds(summary['train_seconds'])} training), "
                           f"{fmt_seconds(result.cpu_seconds)} CPU")

    # -------------------------------------------------------------- reading back
    def complete(self, cell: Cell, arm: str) -> bool:
        keys = [f"{cell.key}/{arm}"] + ([f"{cell.key}/grow_base"] if arm in GROWN else [])
        return all(k in self.results for k in keys)

    def arm_result(self, cell: Cell, arm: str) -> dict[str, Any]:
        """Final eval loss, total FLOPs, wall and CPU seconds of one arm in one cell."""
        keys = [f"{cell.key}/{arm}"] + ([f"{cell.key}/grow_base"] if arm in GROWN else [])
        parts = [self.results[k] for k in keys]
        top = parts[0].summary
        return {"arm": arm, "budget": cell.budget, "lr": cell.lr, "seed": cell.seed,
                "eval_loss": top["eval_loss_end"], "flops": sum(p.summary["flops"] for p in parts),
                "steps": [p.summary["steps"] for p in parts], "eval_loss_start": top["eval_loss_start"],
                "parent_eval_loss_end": top.get("parent_eval_loss_end"),
                "train_seconds": sum(p.summary["train_seconds"] for p in parts),
                "process_seconds": sum(p.process_seconds for p in parts),
                "cpu_seconds": sum(p.cpu_seconds for p in parts), "reused": any(p.reused for p in parts)}

    def run_stats(self) -> dict[str, Any]:
        """Start-up cost and totals over every run whose usage is known (made now, or earlier
        with its RUN_DIR/<cell>/<stage>.usage.json)."""
        fresh = [r for r in self.results.values() if not math.isnan(r.cpu_seconds)]
        if not fresh:
            return {"runs": 0}
        overhead = [r.process_seconds - r.summary["train_seconds"] for r in fresh]
        return {"runs": len(fresh), "reused": sum(r.reused for r in self.results.values()),
                "process_seconds": sum(r.process_seconds for r in fresh),
                "train_seconds": sum(r.summary["train_seconds"] for r in fresh),
                "cpu_seconds": sum(r.cpu_seconds for r in fresh),
                "startup_seconds_median": statistics.median(overhead),
                "startup_seconds_total": sum(overhead)}


def _secs(seconds: float) -> str:
    return "?" if math.isnan(seconds) else fmt_seconds(seconds)  # ? = usage not recorded


def _steps(flops: float, per_step: float) -> int:
    return max(1, round(flops / per_step))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- analysis (pure)
@dataclass
class Curve:
    """A piecewise-linear loss curve along FLOPs (an arm's frontier: final loss vs budget)."""

    name: str
    flops: list[float]
    loss: list[float]


def flops_to_reach(curve: Curve, target: float, log: bool = False) -> float | None:
    """First FLOPs at which the piecewise-linear curve reaches ``target`` (≤), or None.
    ``log``: interpolate in log FLOPs (for a frontier over a geometric grid of budgets)."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if l1 <= target < l0:
            t = (l0 - target) / (l0 - l1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))) if log else f0 + t * (f1 - f0)
    return None


def loss_at(curve: Curve, flops: float) -> float:
    """Loss at ``flops`` by linear interpolation (clamped to the curve's ends)."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if flops <= pts[0][0]:
        return pts[0][1]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (flops - f0) / (f1 - f0) * (l1 - l0)
    return pts[-1][1]


def crossover(budgets: list[float], small: list[float], final: list[float]) -> float | None:
    """The first budget (log-interpolated) at which ``final``'s loss drops below ``small``'s."""
    diff = [f - s for f, s in zip(final, small, strict=True)]
    if diff and diff[0] < 0:
        return None  # final is ahead already at the smallest budget: the crossover is below it
    for (b0, d0), (b1, d1) in zip(zip(budgets, diff, strict=True), list(zip(budgets, diff, strict=True))[1:],
                                  strict=False):
        if d0 >= 0 > d1:
            t = d0 / (d0 - d1)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def reading(table: dict[float, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per budget and grown arm: the margin over the better control, whether the arm's worst
    seed beats every seed of both controls, and FLOPs-to-reach along each control's frontier."""
    budgets = sorted(b for b in table if all(table[b].get(c) for c in CONTROLS))
    frontier = {c: Curve(c, budgets, [statistics.fmean(table[b][c]) for b in budgets]) for c in CONTROLS}
    out = []
    for b in budgets:
        for arm in GROWN:
            if not table[b].get(arm):
                continue
            mine = table[b][arm]
            mean = statistics.fmean(mine)
            best = min(CONTROLS, key=lambda c: statistics.fmean(table[b][c]))
            margin = statistics.fmean(table[b][best]) - mean
            beats_both = all(max(mine) < min(table[b][c]) for c in CONTROLS)
            reach = {}
            for c in CONTROLS:
                f = flops_to_reach(frontier[c], mean, log=True)
                where = ("beyond" if f is None else "below" if frontier[c].loss[0] <= mean else "inside")
                # below: the control is there already at the smallest budget (ratio is a lower bound);
                # beyond: not even at the largest budget (the saving is larger than budget ÷ largest)
                reach[c] = {"flops": f, "ratio": None if f is None else b / f, "where": where}
            out.append({"budget": b, "arm": arm, "mean": mean, "better_control": best, "margin": margin,
                        "seed_range": max(mine) - min(mine),
                        "control_seed_range": max(table[b][best]) - min(table[b][best]),
                        "beats_both_beyond_spread": beats_both, "flops_to_reach": reach})
    return out


# ---------------------------------------------------------------------- plot
COLORS = {"growth": "tab:blue", "stack": "tab:green", "scratch_final": "tab:gray", "scratch_small": "tab:orange"}


def plot(table: dict[float, dict[str, list[float]]], coarse: dict[float, dict[str, list[float]]],
         cross: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    budgets = sorted(table)
    for arm in ARMS:
        xs = [b for b in budgets if arm in table[b]]
        if not xs:
            continue
        s = [stats(table[b][arm]) for b in xs]
        n = len(table[xs[0]][arm])
        ax.plot(xs, [v["mean"] for v in s], "-o", ms=4, color=COLORS[arm], label=f"{arm} (mean of {n} seeds)")
        ax.fill_between(xs, [v["min"] for v in s], [v["max"] for v in s], color=COLORS[arm], alpha=0.2, lw=0)
    for arm in CONTROLS:
        xs = [b for b in sorted(coarse) if arm in coarse[b]]
        if xs:
            ax.plot(xs, [coarse[b][arm][0] for b in xs], ":", marker="x", ms=4, lw=0.8, color=COLORS[arm],
                    label=f"{arm}, coarse sweep (seed 0, base LR)")
    if cross is not None:
        ax.axvline(cross, color="tab:red", ls="--", lw=1)
        ax.annotate(f"crossover ≈ {cross:.2g} FLOPs\n(final overtakes small)", (cross, 0.97),
                    xycoords=("data", "axes fraction"), xytext=(4, 0), textcoords="offset points",
                    fontsize=8, color="tab:red", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per run (6N + attention per token; every arm spends the same)")
    ax.set_ylabel("final eval loss (nats/byte, fixed held-out batches)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- the procedure
def choose_budgets(grid: list[float], cross: float | None, small: list[float], final: list[float]) -> list[float]:
    """Three budgets around the coarse crossover: the two grid budgets that bracket it and
    their geometric mean; without a crossover, the top of the grid (or below its bottom,
    when the final model is ahead already there)."""
    grid = sorted(grid)
    if cross is None:
        if final and final[0] < small[0]:
            return [grid[0] / 4, grid[0] / 2, grid[0]]
        top = grid[-1]
        return [top / 2, top / math.sqrt(2), top] if len(grid) < 3 else grid[-3:]
    lo = max(g for g in grid if g <= cross)
    hi = min(g for g in grid if g > cross)
    return [lo, math.sqrt(lo * hi), hi]


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS["smoke" if args.smoke else args.device]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PayoffError("--device cuda: torch sees no CUDA device here; run it on a GPU machine "
                              "(or drop --device for the CPU design)")
    root = Path(args.run_dir).resolve()
    jobs = args.jobs or preset.jobs
    runner = Runner(root, preset, args.grow_fraction, jobs, args.keep_checkpoints)
    runner.extra = list(args.override)
    runner.no_train = args.no_train
    seeds = list(range(args.seeds))
    lr_mults = [float(x) for x in args.lr_mults.split(",") if x]
    t0 = time.perf_counter()
    print(f"models: small {runner.params['small']:,} params ({runner.flops_per_step['small']:.3g} FLOPs/step), "
          f"final {runner.params['final']:,} params ({runner.flops_per_step['final']:.3g} FLOPs/step); "
          f"batch {preset.micro_batch_size} × {preset.seq_len} tokens; grow at {args.grow_fraction:.0%} of the budget; "
          f"{jobs} runs at a time; run dir {root}", flush=True)

    # 1. coarse sweep
    coarse: dict[float, dict[str, list[float]]] = {}
    coarse_cross = None
    if args.budgets:
        budgets = sorted(float(b) for b in args.budgets.split(","))
    else:
        grid = sorted(float(b) for b in (args.coarse.split(",") if args.coarse else preset.coarse))
        # upwards, a few budgets at a time (as many as the parallel runs take); stop once
        # scratch_final is ahead (the crossover is bracketed) and one more budget confirms it
        step = max(1, jobs // 2)
        for i in range(0, len(grid), step):
            cells = [Cell(b, preset.lr, 0, set(CONTROLS)) for b in grid[i:i + step]]
            runner.run(cells, f"coarse sweep {i // step + 1}")
            for cell in cells:
                if all(runner.complete(cell, a) for a in CONTROLS):
                    coarse[cell.budget] = {a: [runner.arm_result(cell, a)["eval_loss"]] for a in CONTROLS}
            done = sorted(coarse)
            ahead = [coarse[b]["scratch_final"][0] < coarse[b]["scratch_small"][0] for b in done]
            if len(done) >= 2 and ahead[-1] and not ahead[0]:
                break
        grid = sorted(coarse)
        small = [coarse[b]["scratch_small"][0] for b in grid]
        final = [coarse[b]["scratch_final"][0] for b in grid]
        coarse_cross = crossover(grid, small, final)
        budgets = [float(f"{b:.3g}") for b in choose_budgets(grid, coarse_cross, small, final)]
        print_table(["budget", "scratch_small", "scratch_final"],
                    [[f"{b:.3g}", f"{coarse[b]['scratch_small'][0]:.4f}", f"{coarse[b]['scratch_final'][0]:.4f}"]
                     for b in grid], title="coarse sweep (seed 0, base LR): final eval loss")
        print("crossover: " + (f"≈ {coarse_cross:.3g} FLOPs" if coarse_cross else "not inside the grid")
              + f"; main budgets {', '.join(f'{b:.3g}' for b in budgets)}", flush=True)
        if args.coarse_only:
            sys.exit(0)

    # 2. LR sweep at the smallest main budget (the cheapest), seed 0, every arm alike
    mid = budgets[0]
    lrs = [preset.lr * m for m in lr_mults]
    sweep_cells = [Cell(mid, lr, 0, set(ARMS)) for lr in lrs]
    best_lr = {a: preset.lr for a in ARMS}
    sweep: dict[str, dict[float, float]] = {a: {} for a in ARMS}
    if len(lrs) > 1:
        runner.run(sweep_cells, "LR sweep")
        for cell in sweep_cells:
            for arm in ARMS:
                sweep[arm][cell.lr] = (runner.arm_result(cell, arm)["eval_loss"] if runner.complete(cell, arm)
                                       else float("inf"))
        best_lr = {a: min(sweep[a], key=sweep[a].get) for a in ARMS}
        print_table(["arm", *(f"LR {lr:.3g}" for lr in lrs), "best"],
                    [[a, *(f"{sweep[a][lr]:.4f}" for lr in lrs), f"{best_lr[a]:.3g}"] for a in ARMS],
                    title=f"LR sweep at {mid:.3g} FLOPs (seed 0): final eval loss")

    # 3. main grid: every arm at its own best LR
    cells: dict[tuple[float, float, int], Cell] = {}
    for s in seeds:  # seed-major: an interrupted grid still covers every budget
        for b in budgets:
            for arm in ARMS:
                cells.setdefault((b, best_lr[arm], s), Cell(b, best_lr[arm], s)).arms.add(arm)
    runner.run(list(cells.values()), "main grid")
    records = [runner.arm_result(cell, arm) for cell in cells.values() for arm in sorted(cell.arms)
               if runner.complete(cell, arm)]
    table: dict[float, dict[str, list[float]]] = {b: {} for b in budgets}
    for r in sorted(records, key=lambda r: (r["budget"], r["arm"], r["seed"])):
        table[r["budget"]].setdefault(r["arm"], []).append(r["eval_loss"])
    both = [b for b in budgets if all(table[b].get(c) for c in CONTROLS)]
    cross = crossover(both, [statistics.fmean(table[b]["scratch_small"]) for b in both],
                      [statistics.fmean(table[b]["scratch_final"]) for b in both])
    return {"table": table, "records": records, "missing_runs": sorted(runner.missing),
            "coarse": coarse, "coarse_crossover": coarse_cross,
            "crossover": cross, "budgets": budgets, "best_lr": best_lr, "lr_sweep": sweep, "lr_sweep_budget": mid,
            "preset": preset.__dict__, "params": runner.params, "flops_per_step": runner.flops_per_step,
            "grow_fraction": args.grow_fraction, "jobs": jobs, "run_dir": str(root),
            "wall_seconds": time.perf_counter() - t0, "runs": runner.run_stats(), "seeds": seeds}


def report(res: dict[str, Any], png: Path, device: str) -> list[dict[str, Any]]:
    table, records = res["table"], res["records"]
    by = {(r["budget"], r["arm"]): [x for x in records if x["budget"] == r["budget"] and x["arm"] == r["arm"]]
          for r in records}
    rows = []
    for b in res["budgets"]:
        for arm in ARMS:
            rs = by.get((b, arm), [])
            if not rs:
                continue
            s = stats([r["eval_loss"] for r in rs])
            rows.append([f"{b:.3g}", arm, f"{res['best_lr'][arm]:.3g}",
                         " ".join(f"{r['eval_loss']:.4f}" for r in rs), f"{s['mean']:.4f}",
                         f"{(s['max'] - s['min']) / 2:.4f}", f"{statistics.fmean(r['flops'] for r in rs):.3g}",
                         fmt_seconds(statistics.fmean(r["process_seconds"] for r in rs)),
                         _secs(statistics.fmean(r["cpu_seconds"] for r in rs))])
    print_table(["budget", "arm", "peak LR", "eval loss per seed", "mean", "± half-range", "FLOPs run",
                 "wall/run", "CPU/run"], rows, title="main grid: final eval loss at equal training FLOPs")
    read = reading(table)
    lines = []
    for r in read:
        reach = ", ".join(
            f"{c}: " + ("not within the budgets run" if v["where"] == "beyond"
                        else f"≤ {v['flops']:.3g} FLOPs (≥ {v['ratio']:.2f}×)" if v["where"] == "below"
                        else f"{v['flops']:.3g} FLOPs ({v['ratio']:.2f}×)")
            for c, v in r["flops_to_reach"].items())
        lines.append([f"{r['budget']:.3g}", r["arm"], f"{r['margin']:+.4f}", r["better_control"],
                      "yes" if r["beats_both_beyond_spread"] else "no", reach])
    print_table(["budget", "arm", "margin over better control", "better control", "beats both beyond spread",
                 "control FLOPs to reach the arm's mean loss (budget ÷ that)"], lines, title="reading")
    if res["missing_runs"]:
        print(f"NOT in this report ({len(res['missing_runs'])} runs never trained): "
              + ", ".join(res["missing_runs"]))
    cross = res["crossover"]
    print(f"crossover ({len(res['seeds'])}-seed means): "
          + (f"≈ {cross:.3g} FLOPs" if cross else "not inside the budgets run"))
    wins = [r for r in read if r["beats_both_beyond_spread"]]
    print("growth beats both controls beyond the seed spread at: "
          + (", ".join(f"{r['arm']} @ {r['budget']:.3g} ({r['margin']:+.4f})" for r in wins) or "no budget"))
    runs = res["runs"]
    if runs.get("runs"):
        print(f"runs: {runs['runs']} train-stage processes with known usage ({runs['reused']} reused from "
              f"earlier invocations); this invocation {fmt_seconds(res['wall_seconds'])} wall; summed over the runs: "
              f"{fmt_seconds(runs['process_seconds'])} process wall, {fmt_seconds(runs['train_seconds'])} of it "
              f"training, {fmt_seconds(runs['cpu_seconds'])} CPU (≈ {fmt_seconds(runs['cpu_seconds'] / 2)} on 2 "
              f"quiet cores); start-up (process − training wall) median {runs['startup_seconds_median']:.1f} s")
    title = (f"growth payoff ({device}): small {res['params']['small'] / 1e6:.2f}M → final "
             f"{res['params']['final'] / 1e6:.2f}M params, {len(res['seeds'])} seeds, grow at "
             f"{res['grow_fraction']:.0%} of the budget")
    plot(table, res["coarse"], cross, title, png)
    print(f"plot: {png}")
    return read


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the 2-core design; cuda: the same design ~100x (sizes and tokens), bf16")
    p.add_argument("--smoke", action="store_true",
                   help="one tiny budget, one seed, one LR, no coarse sweep (seconds of training per run)")
    p.add_argument("--run-dir", default=None,
                   help="where the runs live (default runs/growth_payoff[_cuda|_smoke]); finished stages are reused")
    p.add_argument("--budgets", default=None,
                   help="comma-separated training budgets in FLOPs for the main grid; skips the coarse sweep")
    p.add_argument("--coarse", default=None, help="comma-separated coarse-sweep budgets (default: the preset's)")
    p.add_argument("--coarse-only", action="store_true", help="stop after the coarse sweep")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm and budget (default 3)")
    p.add_argument("--lr-mults", default="0.5,1,2",
                   help="the LR sweep, as multiples of the preset's peak LR, run for every arm (default 0.5,1,2)")
    p.add_argument("--grow-fraction", type=float, default=0.25,
                   help="fraction of the budget spent on the small model before growing (default 0.25)")
    p.add_argument("--jobs", type=int, default=0, help="train-stage processes at once (default 4 on cpu, 1 on cuda)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra train-stage (Hydra) override for every run, e.g. data.source=DIR; repeatable")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: report from the finished runs in --run-dir (missing ones are listed)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each stage's ds_ckpt/ (deleted by default)")
    p.add_argument("--png", default=str(REPO / "docs" / "growth_payoff.png"),
                   help="the plot (default docs/growth_payoff.png; a temp dir with --smoke)")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.smoke:
        args.seeds = 1 if "--seeds" not in given else args.seeds
        args.lr_mults = "1" if "--lr-mults" not in given else args.lr_mults
        if not args.budgets:
            args.budgets = ",".join(str(b) for b in PRESETS["smoke"].coarse)
        if "--png" not in given:
            args.png = str(Path(tempfile.mkdtemp(prefix="growth_payoff-")) / "growth_payoff.png")
    if args.run_dir is None:
        args.run_dir = str(REPO / "runs" / ("growth_payoff_smoke" if args.smoke else
                                            "growth_payoff" + ("_cuda" if args.device == "cuda" else "")))
    if not 0 < args.grow_fraction < 1:
        p.error(f"--grow-fraction must be in (0, 1), got {args.grow_fraction}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print_machine(info)
    try:
        res = run_real(args)
    except PayoffError as err:
        print(f"growth_payoff: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    read = report(res, Path(args.png), "smoke" if args.smoke else args.device)
    full = {"benchmark": "growth_payoff", **{k: v for k, v in res.items() if k != "table"},
            "table": [{"flops": b, "arms": res["table"][b]} for b in res["budgets"]], "reading": read,
            "png": args.png, "smoke": args.smoke, "device": args.device, "machine": info}
    out_path = Path(res["run_dir"]) / "growth_payoff.json"
    out_path.write_text(json.dumps(full, indent=1, sort_keys=True, default=str) + "\n")
    print(f"everything: {out_path}")
    out = {"budgets": [{"flops": b, "arms": {a: res["table"][b].get(a, []) for a in sorted(ARMS)}}
                       for b in res["budgets"]]}
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
