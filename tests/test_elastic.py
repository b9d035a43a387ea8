"""Faults a stage survives (stages.elastic): a killed rank, a truncated checkpoint, a NaN loss.

Real torchrun (``--max-restarts``) and real DeepSpeed ZeRO-1 on 2 CPU ranks, the tiny
stage of tests.ds_helpers; faults are injected by a Trainer subclass
(tests.elastic_workers), and every run is compared with the uninterrupted shared run.
"""

from __future__ import annotations

import dataclasses
import shutil
import zipfile

import pytest
import torch

from growth.runs import StageDir
from stages import elastic
from stages.config import ResolvedStage
from stages.launch import LaunchError, launch_workers, worker_command
from tests.ds_helpers import (
    REPO,
    data_info,
    new_stage_dir,
    read_log,
    read_summary,
    run_worker,
    shared_run,
    write_stage_config,
)
from tests.elastic_workers import DONE_NAME, write_faults

REL = 1e-6


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= REL * abs(b["loss"]), (a, b)


def scaled(path, **fields):
    """The stage config at ``path`` with scale-out fields set (written back to it)."""
    resolved = ResolvedStage.load(path)
    resolved.config = dataclasses.replace(resolved.config, worker_module="tests.elastic_workers", **fields)
    resolved.save(path)
    return resolved.config


@pytest.fixture
def worker_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))


# ---------------------------------------------------------------------- checkpoints, no processes
def fake_tag(ds_dir, step, sealed=True, truncated=False):
    tag = ds_dir / f"step{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, tag / "mp_rank_00_model_states.pt")
    if truncated:
        path = tag / "mp_rank_00_model_states.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if sealed:
        (tag / elastic.SEAL_NAME).write_text("")
    return tag


def test_pick_tag_skips_unsound_newest_with_one_warning(tmp_path, caplog):
    ds = tmp_path / "ds_ckpt"
    fake_tag(ds, 10)
    fake_tag(ds, 20, truncated=True)
    fake_tag(ds, 30, sealed=False)
    with caplog.at_level("WARNING"):
        assert elastic.pick_tag(ds, warn=True) == "step00000010"
    assert len(caplog.records) == 1 and "step00000030" in caplog.text and "resuming from step00000010" in caplog.text
    assert elastic.unsound_reason(ds / "step00000020").startswith("truncated")
    shutil.rmtree(ds / "step00000010")
    with pytest.raises(elastic.NoSoundCheckpointError, match="no sound DeepSpeed checkpoint"):
        elastic.pick_tag(ds, warn=False)


def test_seal_keeps_newest_k_and_drops_a_crashed_future(tmp_path):
    ds = tmp_path / "ds_ckpt"
    for step in (10, 20, 30):
        fake_tag(ds, step)
    fake_tag(ds, 50, sealed=False)  # a later run's partial save, then a resume from 30
    fake_tag(ds, 40, sealed=False)
    elastic.seal(ds, "step00000040", keep=2)
    assert [t.name for t in elastic.tags(ds)] == ["step00000030", "step00000040"]
    assert elastic.unsound_reason(ds / "step00000040") is None
    with zipfile.ZipFile(ds / "step00000040" / "mp_rank_00_model_states.pt") as z:
        assert z.infolist()


def test_max_restarts_reaches_torchrun():
    cfg = dataclasses.replace(ResolvedStage.load(shared_run("zero1") / "stage_config.json").config, max_restarts=3)
    cmd = worker_command(cfg, REPO / "x.json", 12345)
    assert cmd[cmd.index("--max-restarts") + 1] == "3"


# ---------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_sigkill_of_one_rank_restarts_and_matches_an_uninterrupted_run(worker_env):
    want = read_log(shared_run("zero1"))
    stage_dir = new_stage_dir("elastic-kill")
    path = write_stage_config(stage_dir, data_info())  # save_every 10: the restart resumes from step 10
    write_faults(stage_dir, kill_at=13, kill_rank=1)
    cfg = scaled(path, max_restarts=2)
    launch_workers(cfg, path, StageDir(stage_dir))
    assert (stage_dir / DONE_NAME).read_text() == "killed rank 1 after step 13\n"
    assert_same_losses(read_log(stage_dir), want)
    assert read_summary(stage_dir)["eval_loss_end"] == pytest.approx(
        read_summary(shared_run("zero1"))["eval_loss_end"], rel=REL)


@pytest.mark.slow
def test_truncated_latest_checkpoint_resumes_from_the_previous_one():
    src = shared_run("zero1")
    want = [r for r in read_log(src) if r["step"] > 10]
    stage_dir = new_stage_dir("elastic-truncated")
    shutil.copytree(StageDir(src).ds_ckpt, StageDir(stage_dir).ds_ckpt)
    victim = StageDir(stage_dir).ds_ckpt / "step00000020" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_worker(write_stage_config(stage_dir, data_info(), resume=True))
    warnings = [ln for ln in proc.stderr.splitlines() if "resuming from step00000010 instead" in ln]
    assert len(warnings) == 1 and "step00000020 is truncated" in warnings[0], proc.stderr[-3000:]
    assert_same_losses(read_log(stage_dir), want)


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(worker_env):
    stage_dir = new_stage_dir("elastic-nan")
    path = write_stage_config(stage_dir, data_info())
    write_faults(stage_dir, nan_at=12)
    cfg = scaled(path, max_restarts=1)  # the restarted group finds the record and stops again
    with pytest.raises(LaunchError) as info:
        launch_workers(cfg, path, StageDir(stage_dir))
    message = str(info.value)
    assert "\n" not in message
    assert "non-finite loss at step 13" in message and "step00000010" in message, message
    assert "failed 2 times (max_restarts=1)" in message
    layout = StageDir(stage_dir)
    assert layout.read_summary() is None and not layout.final.exists()
    assert [t.name for t in elastic.tags(layout.ds_ckpt)] == ["step00000010"]
    assert elastic.pick_tag(layout.ds_ckpt, warn=False) == "step00000010"
    assert max(r["step"] for r in read_log(stage_dir)) == 12
