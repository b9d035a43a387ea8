"""The rank process of the compiled-vs-eager test (tests/integration/test_gpu_path.py): 2 ranks
train ZeRO-1 (DP 2), the 2-stage pipeline and TP 2 for a few fp32 steps each, once eager and
once with every decoder layer compiled (``deepspeed.compile=true``), the MSG masks ramping
over the steps; rank 0 writes ``OUT/compile-record.json`` ``{layout: {"eager": [...],
"compiled": [...], "graphs_eager": n, "graphs_compiled": n}}`` with the losses and how many
graphs dynamo compiled in each run.

    python -m tests.workers.compile_worker OUT STEPS
"""

from __future__ import annotations

import os
import sys

import torch

from growth.checkpoint import CheckpointReader
from stages.engines.build import build_engine
from stages.engines.common import init_distributed, set_lr
from stages.schema import DeepSpeedCfg
from tests.workers.tp_parity_worker import MASK, STAGE, batch, finish, save_record

LAYOUTS = {"zero1": dict(zero_stage=1), "pipe": dict(zero_stage=1, pipeline=True), "tp2": dict(zero_stage=1,
                                                                                       tensor_parallel=2)}


def engine(start: str, layout: str, compiled: bool):
    """tests.workers.tp_parity_worker's engine (clipping 0.2, activation checkpointing), compile on or off."""
    ds = DeepSpeedCfg(name="test", pipeline_stages=2, gradient_clipping=0.2, activation_checkpointing=True,
                      compile="true" if compiled else "false", **LAYOUTS[layout])
    tp = ds.tensor_parallel
    with CheckpointReader(start) as reader:
        weights = reader.state_dict(torch.float32) if tp == 1 else {}
        return build_engine(reader.config, weights, ds, STAGE, init=start if tp > 1 else None)


def train(layout: str, compiled: bool, start: str, steps: int) -> list[float]:
    eng = engine(start, layout, compiled)
    losses = []
    for i in range(steps):
        eng.set_growth_mask({**MASK, "c": MASK["c"] + 0.08 * i})
        set_lr(eng.optimizer, 3e-3)
        rows = eng.dp_rank if layout == "zero1" else 0  # TP ranks and pipeline stages: the same rows
        losses.append(float(eng.train_step([batch("train", i, m, rows) for m in range(2)])))
    return losses


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    init_distributed()
    torch.manual_seed(0)
    from torch._dynamo.utils import counters

    record = {}
    for layout in LAYOUTS:
        before = counters["stats"]["unique_graphs"]
        eager = train(layout, False, os.path.join(out, "start"), steps)
        graphs_eager = counters["stats"]["unique_graphs"] - before
        compiled = train(layout, True, os.path.join(out, "start"), steps)
        record[layout] = {"eager": eager, "compiled": compiled, "graphs_eager": graphs_eager,
                          "graphs_compiled": counters["stats"]["unique_graphs"] - before - graphs_eager}
    save_record(out, "compile-record.json", record)
    finish()


if __name__ == "__main__":
    main()
