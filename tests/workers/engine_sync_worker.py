"""The rank process of the DeepSpeed host-sync test (tests/integration/test_gpu_path.py): 2 ranks
train the ZeRO-1, ZeRO-2 and ZeRO-3 engines (DP 2, bf16 with clipping, as a stage builds them)
for 6 steps each and count every host read of a tensor inside ``engine.train_step``
(tests.workers.sync_count_worker.counted_syncs). Step 3's gradients are NaN while its loss is
finite (a hook on the first decoder layer's backward): the update must still be dropped (on the
device: DeepSpeed's own host check is replaced, stages.engines.ds_compat.DeviceGradCheck).
Rank 0 writes ``OUT/engine-syncs.json``: ``{layout: {"calls": {step: [...]}, "losses": [...],
"kept": bool (weights, moments and Adam step count after step 3 bit-equal to those after step 2),
"moved": bool (step 4 changed the weights again)}}``.

    python -m tests.workers.engine_sync_worker OUT
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from growth.checkpoint import CheckpointReader
from stages.engines import ds_compat, optim_state
from stages.engines.build import build_engine
from stages.engines.common import init_distributed, set_lr
from stages.schema import DeepSpeedCfg
from tests.workers.sync_count_worker import counted_syncs
from tests.workers.tp_parity_worker import STAGE, batch, finish, save_record

LAYOUTS = {"zero1": 1, "zero2": 2, "zero3": 3}
STEPS, POISONED = 6, 3


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: finite loss, non-finite gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def state(eng: Any) -> dict[str, torch.Tensor]:
    """Weights, both Adam moments (full fp32; collective, rank 0 gets them) and the step count."""
    ds_compat.relink(eng.optimizer)  # ZeRO-1/2 linked their per-parameter views before group 1 had state
    out = {"step": torch.tensor(optim_state.adam_step(eng.optimizer))}
    for kind in (None, "exp_avg", "exp_avg_sq"):
        for name, t in eng.gather(kind):
            if t is not None:
                out[f"{kind}:{name}"] = t.clone()
    return out


def train(start: str, zero: int) -> dict[str, Any]:
    ds = DeepSpeedCfg(name="test", zero_stage=zero, precision="bf16", gradient_clipping=1.0)
    with CheckpointReader(start) as reader:
        eng = build_engine(reader.config, reader.state_dict(torch.float32), ds, STAGE)
    poison = {"on": False}
    eng.model.model.layers[0].register_forward_hook(
        lambda _m, _i, out: NanGrad.apply(out) if poison["on"] else out)
    calls, losses, snapshots = {}, [], {}
    for step in range(1, STEPS + 1):
        batches = [batch("train", step, m, eng.dp_rank) for m in range(2)]
        poison["on"] = step == POISONED
        seen: list[str] = []
        with counted_syncs(seen):
            set_lr(eng.optimizer, 3e-3)
            loss = eng.train_step(batches)
        calls[step] = seen
        losses.append(float(loss))
        if step in (POISONED - 1, POISONED, POISONED + 1):
            snapshots[step] = state(eng)
    before, after, later = (snapshots[s] for s in (POISONED - 1, POISONED, POISONED + 1))
    kept = all(torch.equal(before[k], after[k]) for k in before)
    moved = any(not torch.equal(after[k], later[k]) for k in after if k.startswith("None:"))
    return {"calls": calls, "losses": losses, "kept": kept, "moved": moved}


def main() -> None:
    out = sys.argv[1]
    init_distributed()
    record = {layout: train(os.path.join(out, "start"), zero) for layout, zero in LAYOUTS.items()}
    save_record(out, "engine-syncs.json", record)
    finish()


if __name__ == "__main__":
    main()
