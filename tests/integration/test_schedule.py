"""The tiny schedule end to end through the real CLI: `train-stage -m schedule=tiny`.

tiny_s1 (fresh) → grow (zero) → tiny_s2 → grow (masked, MSG ramp) → tiny_s3, real DeepSpeed
ZeRO-1 on 2 CPU processes, fp32. At each exact growth the child's first eval loss equals
the parent's last (1e-4); the last stage ends below the first. Fewer steps than the
schedule's default keep it near a minute on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from growth.checkpoint import OPTIMIZER_DIR, CheckpointReader
from growth.config import get_flavor
from growth.runs import StageDir

STAGES = ("tiny_s1", "tiny_s2", "tiny_s3")
FLAVORS = ("tiny-s1", "tiny-s2", "tiny-s3")
STEPS = 40


def train_stage_argv() -> list[str]:
    script = Path(sys.executable).with_name("train-stage")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stages.train"]


def run_cli(cwd: Path, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*train_stage_argv(), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_tiny_schedule_trains_grows_and_stays_exact(tmp_path):
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    proc = run_cli(cwd, "-m", "schedule=tiny", f"run_dir={run}", f"stage.steps={STEPS}",
                   "stage.ramp_steps=20", "stage.save_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(StageDir(run / name).summary.read_text()) for name in STAGES]

    # in order, each after its parent finished
    done = [proc.stdout.index(f"[{name}] done") for name in STAGES]
    starts = [proc.stdout.index(f"[{name}] 2 ranks") for name in STAGES]
    assert starts[0] < done[0] < starts[1] < done[1] < starts[2] < done[2]

    for parent, child in zip(summaries, summaries[1:], strict=False):
        assert child["parent_eval_loss_end"] == pytest.approx(parent["eval_loss_end"], abs=1e-12)
        assert abs(child["eval_loss_start"] - parent["eval_loss_end"]) < 1e-4, (parent, child)
    for s in summaries:
        assert s["steps"] == STEPS and s["eval_loss_end"] < s["eval_loss_start"]
    assert summaries[-1]["eval_loss_end"] < summaries[0]["eval_loss_end"]
    assert summaries[1]["adam_seeded_step"] == STEPS  # Adam moments grown across the boundary

    for name, flavor in zip(STAGES, FLAVORS, strict=True):
        with CheckpointReader(StageDir(run / name).final) as final:
            assert final.config.tensor_shapes() == get_flavor(flavor).tensor_shapes()
            assert final.config.growth_mask is None  # the MSG ramp ended and folded
    for name in STAGES[1:]:
        with CheckpointReader(StageDir(run / name).init) as init:
            assert init.history["events"][-1]["kind"] == "grow"
        assert (StageDir(run / name).init / OPTIMIZER_DIR).is_dir()
    with CheckpointReader(StageDir(run / "tiny_s3").init) as init:
        assert init.config.growth_mask is not None and init.config.growth_mask["c"] == 0.0

    assert list(cwd.iterdir()) == []  # Hydra's outputs went under run_dir/.hydra, not the cwd
    assert (run / ".hydra").is_dir()

    again = run_cli(cwd, "-m", "schedule=tiny", f"run_dir={run}", f"stage.steps={STEPS}", "resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already finished") == 3
