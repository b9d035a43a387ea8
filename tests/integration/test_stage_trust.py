"""train-stage at its trust boundaries (issue 16): who may use a stage dir, what a resume may
change, what a failed attempt leaves, what a stage may start from. Real CLI, fake workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.runs import DS_LATEST_NAME, StageDir
from stages.launch.lock import StageLock, StageLockedError
from stages.launch.resume import ResumeMismatchError, diff_for_resume
from stages.resolved import ResolvedStage
from stages.schema import TrainConfig, from_dict, to_plain
from tests.helpers.stage_cli import make_cli

SMALL_DATA = "data.max_bytes=1000000"
ONE = ("stage=tiny_s1", "nproc=1", SMALL_DATA)


@pytest.fixture
def cli(tmp_path):
    return make_cli(tmp_path)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train-stage: error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- the lock
@pytest.mark.slow
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(cli, tmp_path):
    layout = StageDir(tmp_path / "run" / "tiny_s1")
    with StageLock(layout.lock):  # this test process is the live holder
        with pytest.raises(StageLockedError, match=f"in use by process {os.getpid()}"):
            StageLock(layout.lock).acquire()
        rc, out, err, ran = cli(*ONE)
        assert rc == 2 and not ran
        assert f"in use by process {os.getpid()}" in one_error_line(err)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from stages.launch.lock import StageLock; StageLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"), str(layout.lock)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert holder.stdout.readline().strip() == "locked"
    assert StageLock(layout.lock).holder() == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert StageLock(layout.lock).holder() is None  # the kernel dropped the dead holder's flock
    rc, out, err, ran = cli(*ONE)
    assert rc == 0 and ran, err
    # the workers read the attempt's own snapshot (removed with the attempt), not stage_config.json
    seen = json.loads((tmp_path / "worker-ran").read_text())
    assert "format_version" in seen and "stage_dir" in seen and layout.resolved.is_file()
    assert not list(layout.root.glob(".stage_config.*.json"))


# ---------------------------------------------------------------------- failed attempts
@pytest.mark.slow
def test_a_failed_first_attempt_does_not_lock_the_stage_dir(cli, tmp_path):
    rc, out, err, ran = cli(*ONE, "worker_module=failing_worker")
    assert rc == 2 and ran
    line = one_error_line(err)
    assert "data.source: corpus.txt is unreadable" in line and "resume=true" not in line
    assert "no checkpoint was written" in line
    assert "Traceback" not in out and "Root Cause" not in out, out  # torchrun's report is not shown
    rc, out, err, ran = cli(*ONE)  # no resume=true needed: nothing was trained
    assert rc == 0 and ran, err


@pytest.mark.slow
def test_failure_with_a_checkpoint_hints_resume(cli, tmp_path):
    layout = StageDir(tmp_path / "run" / "tiny_s1")
    layout.ds_ckpt.mkdir(parents=True)
    (layout.ds_ckpt / DS_LATEST_NAME).write_text("step00000010")
    rc, out, err, ran = cli(*ONE, "resume=true", "worker_module=failing_worker")
    assert rc == 2 and ran
    assert "resume=true continues" in one_error_line(err)


# ---------------------------------------------------------------------- resume compares configs
@pytest.fixture
def crashed(cli, tmp_path):
    """A stage whose first attempt wrote stage_config.json and a DeepSpeed checkpoint."""
    rc, out, err, ran = cli(*ONE)
    assert rc == 0 and ran, err
    layout = StageDir(tmp_path / "run" / "tiny_s1")
    layout.summary.unlink()  # as if the workers had died after a checkpoint
    layout.ds_ckpt.mkdir()
    (layout.ds_ckpt / DS_LATEST_NAME).write_text("step00000010")
    return layout


@pytest.mark.slow
def test_resume_refuses_a_changed_seq_len_before_any_worker(cli, crashed):
    before = crashed.resolved.read_text()
    rc, out, err, ran = cli(*ONE, "stage.seq_len=64", "resume=true")
    assert rc == 2 and not ran, err
    assert "resume=true: field 'stage.seq_len' is 64" in one_error_line(err)
    assert crashed.resolved.read_text() == before  # the saved config is untouched


@pytest.mark.parametrize("change,field", [
    ({"stage": {"seq_len": 64}}, "stage.seq_len"), ({"nproc": 4}, "nproc"),
    ({"stage": {"model": "tiny"}}, "stage.model"), ({"stage": {"seed": 7}}, "stage.seed"),
    ({"stage": {"micro_batch_size": 2}}, "stage.micro_batch_size"),
    ({"deepspeed": {"zero_stage": 3}}, "deepspeed.zero_stage"),
    ({"data": {"eval_fraction": 0.1}}, "data.eval_fraction"),
    ({"model_config": {"num_hidden_layers": 4}}, "resolved.model_config.num_hidden_layers")])
def test_resume_diff_refuses_shape_world_and_data_fields(change, field):
    saved = resolved_stage()
    with pytest.raises(ResumeMismatchError, match=f"field '{field}'"):
        diff_for_resume(saved, resolved_stage(change))


def test_resume_diff_lists_allowed_changes():
    changes = diff_for_resume(resolved_stage(), resolved_stage({"stage": {"lr": 1e-3, "steps": 400},
                                                                "resume": True, "master_port": 29500}))
    assert changes == ["master_port: 0 → 29500", "stage.lr: 0.003 → 0.001", "stage.steps: 100 → 400"]


def resolved_stage(change: dict | None = None) -> ResolvedStage:
    change = dict(change or {})
    model_config = {**get_flavor("tiny-s1").to_hf_dict(), **change.pop("model_config", {})}
    plain = to_plain(TrainConfig())
    for key, value in change.items():
        if isinstance(value, dict):
            plain[key].update(value)
        else:
            plain[key] = value
    return ResolvedStage(from_dict(plain), stage_dir="/r/s", model_config=model_config, data={"key": "abc"})


@pytest.mark.slow
def test_resume_records_allowed_changes(cli, crashed):
    rc, out, err, ran = cli(*ONE, "stage.lr=0.001", "stage.steps=500", "resume=true")
    assert rc == 0 and ran, err
    resolved = json.loads(crashed.resolved.read_text())
    assert resolved["stage"]["lr"] == 0.001 and resolved["resume"] is True
    assert any(c.startswith("stage.lr: ") for c in resolved["resume_changes"])
    assert any(c.startswith("stage.steps: 300 → 500") for c in resolved["resume_changes"]), resolved["resume_changes"]


# ---------------------------------------------------------------------- what a stage starts from
@pytest.mark.slow
def test_a_masked_stage_that_ended_at_c_below_1_continues_with_the_same_model(cli, tmp_path):
    """A stage ended mid-ramp (c = 0.5) is used as stage.init_from of a stage with the same
    model (it continues the ramp) instead of being refused as 'not growable'."""
    s2 = get_flavor("tiny-s2")
    masked = s2.replace(growth_mask={"c": 0.5, "hidden_size": 64, "intermediate_size": 176,
                                     "num_key_value_heads": 4, "new_layers": [1]})
    ckpt = init_checkpoint(masked, tmp_path / "ended-mid-ramp", seed=0)
    rc, out, err, ran = cli("stage=tiny_s2", "stage.parent=null", f"stage.init_from={ckpt}", "nproc=1", SMALL_DATA)
    assert rc == 0 and ran, err
    resolved = json.loads(StageDir(tmp_path / "run" / "tiny_s2").resolved.read_text())
    assert resolved["init_checkpoint"] == str(ckpt)
    assert resolved["model_config"]["growth_mask"]["c"] == 0.5


@pytest.mark.slow
def test_init_is_grown_again_when_the_parent_changed(cli, tmp_path):
    run = tmp_path / "run"
    parent = StageDir(run / "tiny_s1")
    init_checkpoint(get_flavor("tiny-s1"), parent.final, seed=0)
    parent.summary.write_text(json.dumps({"eval_loss_end": 2.5, "lr_peak": 3e-3}))
    rc, out, err, ran = cli("stage=tiny_s2", "nproc=1", SMALL_DATA, "worker_module=failing_worker")
    assert rc == 2 and ran  # init/ was grown, then the attempt failed
    child = StageDir(run / "tiny_s2")
    first = json.loads(child.resolved.read_text())["parent_fingerprint"]
    grown_at = child.init.stat().st_mtime_ns
    rc, out, err, ran = cli("stage=tiny_s2", "nproc=1", SMALL_DATA)  # same parent: init/ reused
    assert rc == 0 and ran, err
    assert child.init.stat().st_mtime_ns == grown_at
    child.summary.unlink()
    import shutil

    shutil.rmtree(parent.final)  # the parent was retrained: another checkpoint in its place
    init_checkpoint(get_flavor("tiny-s1").replace(rms_norm_eps=2e-5), parent.final, seed=1)
    time.sleep(0.01)
    rc, out, err, ran = cli("stage=tiny_s2", "nproc=1", SMALL_DATA)
    assert rc == 0 and ran, err
    second = json.loads(child.resolved.read_text())["parent_fingerprint"]
    assert second != first and "growing it again" in out + err
    from growth.checkpoint import CheckpointReader

    with CheckpointReader(child.init) as grown:
        assert grown.history["events"][-1]["parent"]["fingerprint"] == second
