"""Real DeepSpeed on 2 CPU processes (gloo): ZeRO-1/2/3 and the 2-stage pipeline train,
export a canonical checkpoint that the rest of the toolkit reads, and agree with each other."""

from __future__ import annotations

import json

import pytest
import torch

from growth.checkpoint import MOMENT_KINDS, OPTIMIZER_DIR, OPTIMIZER_STATE_NAME, CheckpointReader
from growth.config import get_flavor
from growth.runs import StageDir
from tests.helpers.ds_helpers import (
    SHARED_RUNS,
    TINY_STAGE,
    eval_loss_of_checkpoint,
    read_log,
    read_summary,
    shared_run,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(SHARED_RUNS))
def test_stage_trains_and_exports(name):
    stage_dir = shared_run(name)
    log = read_log(stage_dir)
    assert [r["step"] for r in log] == list(range(1, 21))
    losses = [r["loss"] for r in log]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    s = read_summary(stage_dir)
    assert s["eval_loss_end"] < s["eval_loss_start"] - 0.5
    assert s["eval_loss_start"] == pytest.approx(5.57, abs=0.05)  # ≈ ln 259 for a fresh init
    run = {**TINY_STAGE, **SHARED_RUNS[name]}
    dp = 1 if run.get("pipeline") else 2
    config = get_flavor("tiny-s1")
    assert s["steps"] == 20 and s["tokens"] == 20 * dp * run["micro_batch_size"] * run["grad_accum"] * 32
    assert s["params"] == config.params and s["flops"] == config.flops_per_token(32) * s["tokens"]
    assert s["tokens_per_second"] > 0 and s["wall_seconds"] > 0 and s["parent_eval_loss_end"] is None
    assert any(StageDir(stage_dir).tb.iterdir())

    final = StageDir(stage_dir).final
    reader = CheckpointReader(final)
    assert reader.config.tensor_shapes() == config.tensor_shapes()
    assert reader.dtypes == {torch.float32}
    assert reader.history["events"][-1]["kind"] == "train"
    assert reader.history["events"][-1]["eval_loss_end"] == s["eval_loss_end"]
    state = json.loads((final / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).read_text())
    assert state["step"] == 20 and state["betas"] == [0.9, 0.95]
    for kind in MOMENT_KINDS:
        moments = CheckpointReader(final / OPTIMIZER_DIR / kind, config=config)
        assert moments.dtypes == {torch.float32}
        sq = moments.get("model.layers.1.mlp.down_proj.weight")  # outside ZeRO's first param group
        assert sq.abs().sum() > 0

    loss = eval_loss_of_checkpoint(final, micro_batch_size=run["micro_batch_size"])
    tol = 0.05 if SHARED_RUNS[name].get("precision") == "bf16" else 2e-6
    assert loss == pytest.approx(s["eval_loss_end"], abs=tol)


def test_zero_stages_agree():
    """ZeRO-1 and ZeRO-3 (with activation checkpointing) partition and recompute
    differently but compute the same fp32 training run."""
    a, b = (read_log(shared_run(n)) for n in ("zero1", "zero3"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_pipeline_checkpoint_files_follow_the_adapter():
    """DeepSpeed's layer_XX files hold exactly the adapter's keys, with the exported values."""
    from stages.engines.pipeline import hf_to_pipe, layer_file

    stage_dir = shared_run("pipe")
    config = get_flavor("tiny-s1")
    final = CheckpointReader(StageDir(stage_dir).final)
    tag = (StageDir(stage_dir).ds_ckpt / "latest").read_text().strip()
    by_spec: dict[int, dict[str, str]] = {}
    for name in config.tensor_shapes():
        spec, key = hf_to_pipe(name, config.num_hidden_layers).split(".", 1)
        by_spec.setdefault(int(spec), {})[key] = name
    assert sorted(by_spec) == list(range(config.num_hidden_layers + 2))
    for spec, keys in by_spec.items():
        saved = torch.load(StageDir(stage_dir).ds_ckpt / tag / layer_file(spec), weights_only=True)
        assert set(saved) == set(keys)
        for key, name in keys.items():
            torch.testing.assert_close(saved[key], final.get(name), rtol=0, atol=0)



def test_trainer_warns_when_an_exact_growth_does_not_start_at_the_parents_loss():
    """The trainer checks eval_loss_start against the parent's end after an exact growth
    (issue 16: an init/ grown from another parent); 1 step on a zero-grown tiny-s2."""
    from growth.executor import ApplyRequest
    from growth.parallel import apply_growth
    from operators import GrowthSpec
    from tests.helpers.ds_helpers import base_dir, data_info, new_stage_dir, run_worker, write_stage_config

    parent = shared_run("zero1")
    grown = base_dir() / "grown-zero"
    if not grown.exists():
        apply_growth(ApplyRequest(src=str(StageDir(parent).final), target="tiny-s2",
                                  spec=GrowthSpec.from_strategy("zero").to_dict(), out=str(grown)))
    parent_end = read_summary(parent)["eval_loss_end"]
    stage_dir = new_stage_dir("exactness-warning")
    proc = run_worker(write_stage_config(stage_dir, data_info(), init_checkpoint=grown, model="tiny-s2",
                                         model_config=CheckpointReader(grown).config.to_hf_dict(),
                                         parent_eval_loss_end=parent_end + 0.01, steps=1, save_every=0))
    s = read_summary(stage_dir)
    assert s["eval_loss_start"] == pytest.approx(parent_end, abs=1e-4)  # the growth itself is exact
    warnings = [ln for ln in proc.stderr.splitlines() if "differs from the parent's eval_loss_end" in ln]
    assert len(warnings) == 1 and f"{parent_end + 0.01:.6f}" in warnings[0], proc.stderr[-3000:]
