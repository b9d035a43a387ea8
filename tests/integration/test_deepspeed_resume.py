"""Resuming a stage from its DeepSpeed checkpoints replays the uninterrupted run exactly
(CPU, fp32): a clean stop at step 10, and a SIGKILL three steps after a checkpoint."""

from __future__ import annotations

import pytest

from growth.checkpoint import CheckpointReader
from growth.runs import StageDir
from tests.helpers.ds_helpers import (
    SHARED_RUNS,
    data_info,
    new_stage_dir,
    read_log,
    read_summary,
    run_and_kill,
    run_worker,
    shared_run,
    write_stage_config,
)

pytestmark = pytest.mark.slow


def assert_same_run(resumed, reference):
    a, b = read_log(resumed), read_log(reference)
    assert [r["step"] for r in a] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise, not approximately
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    sa, sb = read_summary(resumed), read_summary(reference)
    for key in ("eval_loss_start", "eval_loss_end", "tokens", "steps"):
        assert sa[key] == sb[key], key
    ra, rb = CheckpointReader(StageDir(resumed).final), CheckpointReader(StageDir(reference).final)
    for name in ra.names():
        assert ra.get(name).equal(rb.get(name)), name


# ZeRO-1 resumes are run by tests/integration/test_elastic.py (a SIGKILLed rank's restart, a truncated
# latest checkpoint: losses within 1e-6 of the uninterrupted run); here the pipeline's clean
# stop and ZeRO-3's SIGKILL, compared bit for bit.
@pytest.mark.parametrize("name", ["pipe"])
def test_stop_at_10_then_resume_matches_uninterrupted(name):
    reference = shared_run(name)
    stage_dir = new_stage_dir(f"{name}-stopped")
    run_worker(write_stage_config(stage_dir, data_info(), **SHARED_RUNS[name]), stop_after=10)
    assert len(read_log(stage_dir)) == 10
    assert not StageDir(stage_dir).final.exists() and not StageDir(stage_dir).summary.exists()
    run_worker(write_stage_config(stage_dir, data_info(), resume=True, **SHARED_RUNS[name]))
    assert_same_run(stage_dir, reference)


def test_sigkill_then_resume_gives_identical_trajectory():
    """Killed (every process, SIGKILL) after step 13, three steps past the step-10
    checkpoint; the resume redoes 11–13 and must land on the same numbers."""
    reference = shared_run("zero3")
    stage_dir = new_stage_dir("zero3-killed")
    config = write_stage_config(stage_dir, data_info(), **SHARED_RUNS["zero3"])
    run_and_kill(config, pause_after=13)
    assert len(read_log(stage_dir)) == 13
    assert (StageDir(stage_dir).ds_ckpt / "latest").read_text().strip() == "step00000010"
    assert not StageDir(stage_dir).final.exists()
    run_worker(write_stage_config(stage_dir, data_info(), resume=True, **SHARED_RUNS["zero3"]))
    assert_same_run(stage_dir, reference)
