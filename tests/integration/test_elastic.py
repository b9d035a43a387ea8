"""Faults a stage survives (stages.rank.elastic): a killed rank, a truncated checkpoint, a NaN loss.

Real torchrun (``--max-restarts``) and real DeepSpeed ZeRO-1 on 2 CPU ranks, the tiny
stage of tests.helpers.ds_helpers; faults are injected by a Trainer subclass
(tests.workers.elastic_workers), and every run is compared with the uninterrupted shared run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile

import pytest
import torch

from growth.runs import StageDir
from stages.launch.local import LaunchError, launch_workers, worker_command
from stages.rank import elastic
from stages.resolved import ResolvedStage
from stages.schema import StageConfigError, TrainConfig
from stages.validate import validate
from tests.helpers.ds_helpers import (
    REPO,
    data_info,
    new_stage_dir,
    read_log,
    read_summary,
    run_worker,
    shared_run,
    write_stage_config,
)
from tests.workers.elastic_workers import DONE_NAME, write_faults

REL = 1e-6


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= REL * abs(b["loss"]), (a, b)


def scaled(path, **fields):
    """The stage config at ``path`` with scale-out fields set (written back to it)."""
    resolved = ResolvedStage.load(path)
    resolved.config = dataclasses.replace(resolved.config, worker_module="tests.workers.elastic_workers", **fields)
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


def test_skips_stop_after_too_many_in_a_row(tmp_path):
    skips = elastic.Skips(limit=2)
    for step, bad in [(1, True), (2, False), (3, True), (4, True)]:
        skips.record(step, bad, tmp_path, rank=0)
    assert skips.steps == [1, 3, 4] and skips.in_a_row == 2
    with pytest.raises(elastic.NonFiniteLossError) as info:
        skips.record(5, True, tmp_path, rank=0)
    message = str(info.value)
    assert "\n" not in message and "steps 3..5: 3 steps in a row skipped (max_skips_in_a_row=2)" in message
    assert "weights of step 2" in message
    assert json.loads((tmp_path / elastic.NONFINITE_NAME).read_text())["step"] == 5  # a restart stops again


@pytest.mark.parametrize(("fields", "needle"), [
    ({"on_nonfinite": "ignore"}, "field 'on_nonfinite' must be one of stop, skip, got 'ignore'"),
    ({"on_nonfinite": "skip", "max_skips_in_a_row": 0}, "field 'max_skips_in_a_row' must be positive"),
    ({"on_nonfinite": "skip", "nproc": 2, "deepspeed": {"pipeline": True}},
     "field 'on_nonfinite' is skip with deepspeed.pipeline=true: only the ZeRO engine"),
])
def test_on_nonfinite_is_checked(fields, needle):
    from stages.schema import DeepSpeedCfg

    if "deepspeed" in fields:
        fields = {**fields, "deepspeed": DeepSpeedCfg(zero_stage=1, **fields["deepspeed"])}
    with pytest.raises(StageConfigError) as info:
        validate(TrainConfig(**fields))
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
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
def test_nan_loss_with_skip_drops_that_update_and_the_stage_finishes(worker_env):
    """ZeRO-0 fp32: DeepSpeed itself would apply a NaN update (ZeRO-1/2 drop one whose gradient
    norm is NaN on their own); the step's weights and Adam state must equal the step before's."""
    stage_dir = new_stage_dir("elastic-skip")
    path = write_stage_config(stage_dir, data_info(), zero=0, steps=5, save_every=0)
    write_faults(stage_dir, nan_batch_at=3, digest_at=[2, 3, 4])
    cfg = scaled(path, on_nonfinite="skip")
    launch_workers(cfg, path, StageDir(stage_dir))
    lines = (stage_dir / DONE_NAME).read_text().splitlines()
    assert "nan batch at step 3" in lines
    digests = {d["step"]: d for d in map(json.loads, (ln for ln in lines if ln.startswith("{")))}
    assert digests[2]["adam_tensors"] > 0 and all(d["finite"] for d in digests.values())
    assert digests[3]["weights"] == digests[2]["weights"] and digests[3]["adam"] == digests[2]["adam"]
    assert digests[4]["weights"] != digests[3]["weights"] and digests[4]["adam"] != digests[3]["adam"]
    records = read_log(stage_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["loss"] is None and records[2]["skipped"]
    assert all(r["loss"] > 0 and "skipped" not in r for i, r in enumerate(records) if i != 2)
    summary = read_summary(stage_dir)
    assert (summary["skipped_steps"], summary["skipped_at"]) == (1, [3])
    warnings = [ln for ln in StageDir(stage_dir).launch_log.read_text().splitlines() if "update was skipped" in ln]
    assert len(warnings) == 1 and "non-finite loss at step 3" in warnings[0], warnings


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
