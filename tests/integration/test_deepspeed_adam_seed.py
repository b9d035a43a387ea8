"""A stage started from a checkpoint with optimizer/ continues the parent's Adam state.

The parent (ZeRO-1, 20 steps) exports weights + moments + step. A child stage of one
step starts from that export (identity growth) under ZeRO-1, 2, 3 or the pipeline; its
update must equal one more AdamW step of the parent computed here in plain PyTorch with
the same batch, clipping, LR groups and the seeded moments, and must differ clearly from
a cold Adam start. So the seeded state really is what DeepSpeed steps with.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from growth.checkpoint import OPTIMIZER_DIR, OPTIMIZER_STATE_NAME, CheckpointReader, load_model
from growth.runs import StageDir
from stages.data import TrainStream
from stages.engines.common import make_optimizer, set_lr
from stages.schema import StageCfg
from tests.helpers.ds_helpers import (
    TINY_STAGE,
    data_info,
    new_stage_dir,
    read_summary,
    run_worker,
    shared_run,
    write_stage_config,
)

pytestmark = pytest.mark.slow

CHILD = {"steps": 1, "lr": 1e-3, "warmup_steps": 0, "save_every": 0}
CHILDREN = {"zero1": {"zero": 1}, "zero2": {"zero": 2}, "zero3": {"zero": 3}, "pipe": {"pipeline": True}}


def one_more_step(parent_final, dp_world: int, seeded: bool):
    """Weights and moments after one AdamW step from the parent's export, in-process."""
    stage = dataclasses.replace(StageCfg(), **{**TINY_STAGE, **CHILD})
    model = load_model(parent_final)
    rows = [TrainStream(data_info(), stage.seq_len, stage.micro_batch_size, 1, dp_world, r).batch(0, 0)
            for r in range(dp_world)]
    x, y = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    model.loss(x, y).backward()  # mean over all ranks' rows = DeepSpeed's averaged gradient
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    named = list(model.named_parameters())
    opt = make_optimizer(named, model.config, stage)
    set_lr(opt, stage.lr)
    if seeded:
        step = json.loads((parent_final / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).read_text())["step"]
        moments = {k: CheckpointReader(parent_final / OPTIMIZER_DIR / k, config=model.config)
                   for k in ("exp_avg", "exp_avg_sq")}
        for name, p in named:
            opt.state[p] = {"step": torch.tensor(float(step)),
                            **{k: r.get(name).clone() for k, r in moments.items()}}
    opt.step()
    weights = {n: p.detach().clone() for n, p in named}
    return weights, {n: opt.state[p]["exp_avg"] for n, p in named}


def rel_diff(a: dict, b: dict, base: dict) -> float:
    """‖(a − base) − (b − base)‖ / ‖b − base‖ over all tensors."""
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a)
    den = sum(float((b[n] - base[n]).double().pow(2).sum()) for n in a)
    return (num / den) ** 0.5


@pytest.mark.parametrize("child", list(CHILDREN))
def test_seeded_adam_state_gives_the_parents_next_update(child):
    parent = shared_run("zero1")
    final = StageDir(parent).final
    dp_world = 1 if CHILDREN[child].get("pipeline") else 2
    stage_dir = new_stage_dir(f"seeded-{child}")
    run_worker(write_stage_config(stage_dir, data_info(), init_checkpoint=final, **CHILDREN[child], **CHILD))

    s = read_summary(stage_dir)
    assert s["adam_seeded_step"] == 20
    assert s["eval_loss_start"] == pytest.approx(read_summary(parent)["eval_loss_end"], abs=2e-6)
    out = StageDir(stage_dir).final
    assert json.loads((out / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).read_text())["step"] == 21

    before = CheckpointReader(final).state_dict()
    got = CheckpointReader(out).state_dict()
    warm, warm_m = one_more_step(final, dp_world, seeded=True)
    cold, _ = one_more_step(final, dp_world, seeded=False)
    assert rel_diff(got, warm, before) < 1e-5  # measured 2e-7 (ZeRO-1/2) … 3e-7 (ZeRO-3, pipe)
    assert rel_diff(cold, warm, before) > 0.5  # measured 1.4: the test can tell seeded from cold
    got_m = CheckpointReader(out / OPTIMIZER_DIR / "exp_avg", config=CheckpointReader(out).config)
    for name, m in warm_m.items():
        torch.testing.assert_close(got_m.get(name), m, rtol=1e-3, atol=1e-7)
