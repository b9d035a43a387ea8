"""Plans and runs the train-stage processes of the grid, reusing finished stages."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, fmt_seconds

from payoff.design import GROWN, SUMMARY, PayoffError, Preset, model_config


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
        self.data: list[str] = []  # the data overrides (benchmarks/payoff/corpus.py)
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
                # the same seed: the grown stage continues its parent's data stream (same order,
                # from where the parent stopped); its weights come from the parent
                out[f"{k}/{arm}"] = Stage(arm, "final", rest, cell.lr, cell.seed, parent="grow_base",
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
                f"data.seed={stage.seed}", *self.data, *p.overrides, *self.extra]
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
        # a document source is tokenized by the first run, alone; prepared datasets are ready
        data_ready = bool(self.data) or ((self.root / "data").is_dir() and any((self.root / "data").iterdir()))
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
