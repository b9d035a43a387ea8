"""MSG masks under DeepSpeed: a masked grown checkpoint starts at the parent's loss, c
ramps 0 → 1 over ramp_steps, and the export is folded (plain) — plain model and pipeline.

The grown checkpoint is made by hand here (no operator code): the 2-layer parent gets a
new random layer at index 1 and 24 new random FFN units per layer, with
growth_mask = {c: 0, intermediate_size: 176, new_layers: [1]}; at c = 0 it computes the
parent's function exactly, at c = 1 it does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from growth.checkpoint import CheckpointReader, save_checkpoint
from growth.model import build_model, init_tensor
from growth.runs import StageDir
from tests.helpers.ds_helpers import (
    base_dir,
    data_info,
    eval_loss_of_checkpoint,
    new_stage_dir,
    read_log,
    read_summary,
    run_worker,
    shared_run,
    write_stage_config,
)

pytestmark = pytest.mark.slow

CHILD = {"steps": 8, "ramp_steps": 5, "lr": 1e-3, "warmup_steps": 0, "save_every": 0}
OLD_LAYER = {0: 0, 2: 1}  # new index → parent index; layer 1 is new


def grow_by_hand(parent: Path, out: Path) -> Path:
    reader = CheckpointReader(parent)
    src = reader.config
    dst = src.replace(num_hidden_layers=3, intermediate_size=src.intermediate_size + 24,
                      growth_mask={"c": 0.0, "intermediate_size": src.intermediate_size,
                                   "new_layers": [1]})
    tensors = {}
    for name, shape in dst.tensor_shapes().items():
        if not name.startswith("model.layers."):
            tensors[name] = reader.get(name)
            continue
        _, _, index, rest = name.split(".", 3)
        fresh = init_tensor(dst, name, shape, seed=7)
        if int(index) in OLD_LAYER:
            old = reader.get(f"model.layers.{OLD_LAYER[int(index)]}.{rest}")
            fresh[tuple(slice(0, n) for n in old.shape)] = old  # old block, new rows/columns random
        tensors[name] = fresh
    return save_checkpoint(out, dst, tensors, history=reader.history)


@pytest.fixture(scope="module")
def grown() -> Path:
    out = base_dir() / "grown-masked"
    if not out.exists():
        grow_by_hand(StageDir(shared_run("zero1")).final, out)
    return out


def test_hand_grown_checkpoint_is_exact_only_at_c0(grown):
    parent = CheckpointReader(StageDir(shared_run("zero1")).final)
    reader = CheckpointReader(grown)
    x = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    valid = parent.config.valid_vocab_size  # padded ids are -inf in both
    ref = build_model(parent.config, parent.state_dict())(x)[..., :valid]
    model = build_model(reader.config, reader.state_dict())
    torch.testing.assert_close(model(x)[..., :valid], ref, rtol=0, atol=1e-5)
    model.set_growth_c(1.0)
    assert (model(x)[..., :valid] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["zero2", "pipe"])
def test_masks_ramp_and_fold(grown, layout):
    parent_end = read_summary(shared_run("zero1"))["eval_loss_end"]
    stage_dir = new_stage_dir(f"masked-{layout}")
    kw = {"pipeline": True} if layout == "pipe" else {"zero": 2}
    run_worker(write_stage_config(stage_dir, data_info(), init_checkpoint=grown,
                                  model_config=CheckpointReader(grown).config.to_hf_dict(), **kw, **CHILD))
    s = read_summary(stage_dir)
    assert s["eval_loss_start"] == pytest.approx(parent_end, abs=1e-5)
    assert [r["c"] for r in read_log(stage_dir)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1])
    final = CheckpointReader(StageDir(stage_dir).final)
    assert final.config.growth_mask is None and final.config.num_hidden_layers == 3
    assert [e["kind"] for e in final.history["events"]][-2:] == ["train", "train"]
    assert eval_loss_of_checkpoint(StageDir(stage_dir).final) == pytest.approx(s["eval_loss_end"], abs=2e-6)
