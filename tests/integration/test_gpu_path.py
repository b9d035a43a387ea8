"""The GPU-grade training path, checked on CPU processes (issue 21).

- bf16 keeps fp32 masters and accumulates and reduces gradients in fp32: the exact DeepSpeed
  config lands in ``RUN_DIR/<stage>/ds_config.json``, and a bf16 stage through ``train-stage``
  (grad_accum 4, 30 steps) ends within 1 % of the same stage in fp32;
- no host sync on a step that is not a log step: every host read of a tensor during
  ``Trainer.train_step`` is counted through a seam (tests.workers.sync_count_worker), with an
  MSG mask ramping over those steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from growth.config import get_flavor
from growth.runs import StageDir
from stages.engines.common import DS_CONFIG_NAME
from tests.helpers.ds_helpers import REPO, _env, data_info, new_stage_dir, torchrun_argv, write_stage_config
from tests.workers.sync_count_worker import SYNCS_NAME

pytestmark = pytest.mark.slow


def train_stage(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("train-stage")
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "stages.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*argv, *overrides, f"data.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_bf16_accumulates_in_fp32_and_matches_fp32_within_one_percent(tmp_path):
    common = ["stage=tiny_s1", "nproc=1", "stage.steps=30", "stage.grad_accum=4", "stage.micro_batch_size=2",
              "stage.seq_len=32", "stage.eval_batches=4", "stage.save_every=0", "stage.log_every=10"]
    ends = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        proc = train_stage(tmp_path, *common, f"run_dir={run}", f"deepspeed.precision={precision}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        layout = StageDir(run / "tiny_s1")
        summary = json.loads(layout.summary.read_text())
        assert summary["precision"] == precision and summary["eval_loss_end"] < summary["eval_loss_start"] - 0.5
        ends[precision] = summary["eval_loss_end"]
        got = json.loads((layout.root / DS_CONFIG_NAME).read_text())
        assert got["gradient_accumulation_steps"] == 4 and got["bf16"]["enabled"] == (precision == "bf16")
        if precision == "bf16":  # fp32 accumulation and reduction, what DeepSpeed was handed
            assert got["data_types"] == {"grad_accum_dtype": "fp32"} and got["communication_data_type"] == "fp32"
        else:
            assert "data_types" not in got
    assert ends["bf16"] != ends["fp32"]  # the bf16 run really ran in bf16
    assert abs(ends["bf16"] - ends["fp32"]) <= 0.01 * ends["fp32"], ends


def masked_config() -> dict:
    """tiny-s2 grown from tiny-s1 with every MSG mask (hidden, FFN, heads, a new layer) at c = 0."""
    a, b = get_flavor("tiny-s1"), get_flavor("tiny-s2")
    return b.replace(growth_mask={"c": 0.0, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
                                  "num_key_value_heads": a.num_key_value_heads, "new_layers": [1]}).to_hf_dict()


def test_no_host_sync_outside_log_steps():
    """The 2-stage pipeline in bf16 (2 ranks): nothing at all reads a tensor on the host on
    steps 1, 2, 4, 5 (log steps 3 and 6), while the mask ramp moves c every step and batches
    are prefetched: the trainer, the engine, the model, the mask ramp, DeepSpeed's pipeline
    schedule and its optimizer wrapper (whose gradient-norm check ``ds_compat.DeviceGradCheck``
    keeps on the device; the ZeRO engines: the test below)."""
    stage_dir = new_stage_dir("sync-count")
    path = write_stage_config(stage_dir, data_info(), pipeline=True, precision="bf16", model_config=masked_config(),
                              steps=6, log_every=3, save_every=0, ramp_steps=5, grad_accum=2, micro_batch_size=2)
    proc = subprocess.run(torchrun_argv(path, 2, ["tests.workers.sync_count_worker"]), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((stage_dir / SYNCS_NAME).read_text())
    assert sorted(seen, key=int) == ["1", "2", "3", "4", "5", "6"]
    for step, record in seen.items():
        if record["log_step"]:  # the loss and the finite flags reach the host here, once each
            assert any("trainer.py" in c for c in record["calls"]) and any("elastic.py" in c for c in record["calls"])
        else:
            assert record["calls"] == [], (step, record["calls"])


def test_deepspeed_zero_steps_read_nothing_on_the_host_and_still_drop_nan_gradients(tmp_path):
    """ZeRO-1/2/3, DP 2, bf16 with clipping: DeepSpeed's wrappers read the gradient norm on the
    host every step unless ``ds_compat.DeviceGradCheck`` keeps that check on the device. With
    it, an engine step makes no host read after ZeRO-3's first two (its parameter-order trace
    compares lists across ranks once), and a step with NaN gradients under a finite loss still
    leaves the weights and Adam moments bit-equal, on every stage."""
    from growth.init import init_checkpoint
    from tests.integration.test_tensor_parallel_engine import CONFIG, launch_module

    init_checkpoint(CONFIG, tmp_path / "start", seed=5)
    launch_module("tests.workers.engine_sync_worker", 2, [str(tmp_path)])
    record = json.loads((tmp_path / "engine-syncs.json").read_text())
    assert sorted(record) == ["zero1", "zero2", "zero3"]
    for layout, run in record.items():
        first = 3 if layout == "zero3" else 1
        assert all(run["calls"][str(step)] == [] for step in range(first, 7)), (layout, run["calls"])
        assert run["kept"] and run["moved"], layout  # the NaN step was dropped, the next one applied
        assert all(math.isfinite(loss) for loss in run["losses"]), (layout, run["losses"])


def test_compiled_layers_train_as_eager_under_zero1_pipeline_and_tp2(tmp_path):
    """fp32, 8 steps, activation checkpointing on, MSG masks ramping: the losses with every
    decoder layer compiled equal the eager ones within 1e-5 relative, for ZeRO-1 (DP 2), the
    2-stage pipeline and TP 2. Backend inductor (the default: generated C++ kernels on the CPU,
    one compile thread per rank; about 50 s of the test's time on 2 cores with a cold cache)."""
    from growth.init import init_checkpoint
    from tests.integration.test_tensor_parallel_engine import CONFIG, launch_module

    init_checkpoint(CONFIG, tmp_path / "start", seed=5)
    launch_module("tests.workers.compile_worker", 2, [str(tmp_path), "8"], {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    record = json.loads((tmp_path / "compile-record.json").read_text())
    assert sorted(record) == ["pipe", "tp2", "zero1"]
    for layout, losses in record.items():
        eager, compiled = losses["eager"], losses["compiled"]
        assert len(eager) == 8 and len(set(eager)) == 8  # it trains (random tokens: no trend to assert)
        assert losses["graphs_eager"] == 0 and losses["graphs_compiled"] > 0  # compile really ran
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, compiled, strict=True)), (layout, losses)
