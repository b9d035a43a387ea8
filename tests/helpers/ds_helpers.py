"""Helpers for the real-DeepSpeed tests: a stage_config.json, torchrun launches, logs.

Each run is ``torchrun --nproc_per_node 2 -m stages.rank.worker STAGE_DIR/stage_config.json``
on CPU (gloo), exactly what the orchestrator starts, with a tiny model and short
sequences so a run takes a few seconds after imports. Runs that must stop or pause
mid-stage use ``tests.workers.ds_workers`` (a Trainer subclass) as their worker module.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flmcore.process import free_port
from growth.config import get_flavor
from growth.runs import StageDir
from stages.resolved import ResolvedStage
from stages.schema import DeepSpeedCfg, StageCfg, TrainConfig

REPO = Path(__file__).resolve().parents[2]
DATA_CFG = {"source": "embedded", "tokenizer": "byte", "eval_fraction": 0.1, "max_bytes": 300_000,
            "jsonl_field": "text", "cache_dir": None}
# A tiny stage: 2 layers (one per pipeline stage), 20 steps of 2 ranks × 4 × 32 tokens.
TINY_STAGE = {"model": "tiny-s1", "steps": 20, "micro_batch_size": 4, "grad_accum": 1,
              "seq_len": 32, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 2, "save_every": 10,
              "ramp_steps": 5}


def prepare_data(cache_dir: Path) -> dict[str, Any]:
    from stages.data import prepare_corpus

    return prepare_corpus(DATA_CFG, cache_dir)


def write_stage_config(stage_dir: Path, data: dict[str, Any], *, zero: int = 1, pipeline: bool = False,
                       precision: str = "fp32", activation_checkpointing: bool = False,
                       init_checkpoint: Path | None = None,
                       resume: bool = False, parent_lr: float | None = None,
                       parent_eval_loss_end: float | None = None, model_config: dict | None = None,
                       **stage: Any) -> Path:
    """Write ``stage_dir/stage_config.json`` as the orchestrator would; returns its path."""
    stage_cfg = StageCfg(**{"name": stage_dir.name, **TINY_STAGE, **stage})
    ds = DeepSpeedCfg(name="pipe" if pipeline else f"zero{zero}", zero_stage=zero, pipeline=pipeline,
                      pipeline_stages=2, precision=precision, activation_checkpointing=activation_checkpointing)
    cfg = TrainConfig(stage=stage_cfg, deepspeed=ds, nproc=2, run_dir=str(stage_dir.parent), resume=resume)
    resolved = ResolvedStage(
        config=cfg, stage_dir=str(stage_dir.resolve()),
        init_checkpoint=None if init_checkpoint is None else str(Path(init_checkpoint).resolve()),
        model_config=model_config or get_flavor(stage_cfg.model).to_hf_dict(),
        parent_eval_loss_end=parent_eval_loss_end, data=data, parent_lr=parent_lr)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return resolved.save(StageDir(stage_dir).resolved)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def torchrun_argv(config_path: Path, nproc: int = 2, worker: list[str] | None = None) -> list[str]:
    """``worker``: the module and its options before the config path (default stages.rank.worker)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", *(worker or ["stages.rank.worker"]), str(config_path)]


def run_worker(config_path: Path, env: dict[str, str] | None = None, timeout: float = 180,
               nproc: int = 2, stop_after: int | None = None) -> subprocess.CompletedProcess:
    """Run a stage to completion (or, with ``stop_after``, save and stop after that step:
    tests.workers.ds_workers); raises with the output tail when it fails."""
    worker = None if stop_after is None else ["tests.workers.ds_workers", "--stop-after", str(stop_after)]
    proc = subprocess.run(torchrun_argv(config_path, nproc, worker), env=_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        ranks = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank") or "error:" in ln]
        raise AssertionError(f"worker failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             + "\n".join(ranks[-80:]) + "\n" + proc.stderr[-2000:])
    return proc


def run_and_kill(config_path: Path, pause_after: int, nproc: int = 2, timeout: float = 180) -> None:
    """Start a stage that pauses after step ``pause_after`` (tests.workers.ds_workers), then SIGKILL
    torchrun's process group and every rank (torchrun starts each rank in a session of its own)."""
    from tests.workers.ds_workers import PAUSED_MARK

    marks = [config_path.parent / PAUSED_MARK.format(r) for r in range(nproc)]
    for mark in marks:
        mark.unlink(missing_ok=True)
    worker = ["tests.workers.ds_workers", "--pause-after", str(pause_after)]
    proc = subprocess.Popen(torchrun_argv(config_path, nproc, worker), env=_env(),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    pids: list[int] = []
    try:
        while not all(m.exists() and m.read_text() for m in marks):
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early (rc {proc.returncode}): "
                                     f"{proc.stderr.read()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("worker never reached the pause mark")
            time.sleep(0.2)
        pids = [int(m.read_text()) for m in marks]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stderr.close()
    for mark in marks:
        mark.unlink()


def read_log(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in StageDir(stage_dir).train_log.read_text().splitlines() if ln]


def read_summary(stage_dir: Path) -> dict[str, Any]:
    return json.loads(StageDir(stage_dir).summary.read_text())


# ---------------------------------------------------------------------- shared runs
# Runs several test modules compare against, made once per pytest session: under
# pytest-xdist every worker sees the one directory the controller named in SHARED_ENV
# (tests/conftest.py), and a flock per run makes the first worker that needs it train it
# while the others wait for it.
SHARED_RUNS: dict[str, dict[str, Any]] = {
    "zero1": {"zero": 1},
    "zero2-bf16": {"zero": 2, "precision": "bf16", "micro_batch_size": 2, "grad_accum": 2},
    "zero3": {"zero": 3, "activation_checkpointing": True},
    "pipe": {"pipeline": True, "activation_checkpointing": True, "micro_batch_size": 2, "grad_accum": 2},
}
SHARED_ENV = "FLM_TEST_SHARED_DIR"
_state: dict[str, Any] = {"base": None, "data": None, "runs": {}}


def base_dir() -> Path:
    if _state["base"] is None:
        if os.environ.get(SHARED_ENV):
            base = Path(os.environ[SHARED_ENV])
            base.mkdir(parents=True, exist_ok=True)
        else:  # outside pytest: a directory of this process's own
            base = Path(tempfile.mkdtemp(prefix="flm-ds-tests-"))
            atexit.register(shutil.rmtree, base, ignore_errors=True)
        _state["base"] = base
    return _state["base"]


@contextlib.contextmanager
def _made_once(name: str) -> Iterator[Path]:
    """An exclusive lock on ``base_dir()/name`` across the session's processes; yields the path."""
    path = base_dir() / name
    with open(base_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def data_info() -> dict[str, Any]:
    if _state["data"] is None:
        with _made_once("data") as path:
            _state["data"] = prepare_data(path)
    return _state["data"]


def shared_run(name: str) -> Path:
    """The stage dir of the shared run ``name`` (trained on first use in the session)."""
    if name not in _state["runs"]:
        data = data_info()
        with _made_once(name) as stage_dir:
            if not StageDir(stage_dir).summary.is_file():  # none yet, or a crashed attempt's leftovers
                shutil.rmtree(stage_dir, ignore_errors=True)
                run_worker(write_stage_config(stage_dir, data, **SHARED_RUNS[name]))
        _state["runs"][name] = stage_dir
    return _state["runs"][name]


def new_stage_dir(name: str) -> Path:
    path = base_dir() / name
    shutil.rmtree(path, ignore_errors=True)
    return path


def eval_loss_of_checkpoint(directory: Path, seq_len: int = 32, micro_batch_size: int = 4,
                            n: int = 2) -> float:
    """The worker's eval loss, recomputed in this process from a canonical checkpoint."""
    import torch

    from growth.checkpoint import load_model
    from stages.data import eval_batches

    model = load_model(directory)
    with torch.no_grad():
        losses = [model.loss(x, y) for x, y in eval_batches(data_info(), seq_len, micro_batch_size, n)]
    return float(torch.stack(losses).double().mean())
