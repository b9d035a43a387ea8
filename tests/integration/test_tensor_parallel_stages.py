"""Whole stages at changing TP degrees through `train-stage` (real orchestrator, torchrun,
``stages.rank.trainer.Trainer`` driving the TP engine under DeepSpeed ZeRO-1 on gloo): TP 2 →
grow → TP 1 → MSG-masked grow → TP 2, in one chain of three tiny stages. Each child's
eval_loss_start equals its parent's eval_loss_end (exact growth across a TP change), the
grown Adam moments are seeded into the TP engine (steps add up), the masked stage ramps c to
1 and folds, and the TP run's export loads in transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growth.checkpoint import CheckpointReader, load_model
from growth.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
COMMON = ["data.max_bytes=300000", "stage.steps=3", "stage.micro_batch_size=2", "stage.seq_len=32",
          "stage.eval_batches=2", "stage.save_every=0", "stage.warmup_steps=1", "stage.rewarm_steps=1",
          "deepspeed=zero1"]
# tiny-s3 grown once more: heads 8 → 10, width 128 → 160, FFN 352 → 440, 4 → 5 layers (TP 2 splits all)
BIG = ModelConfig(hidden_size=160, intermediate_size=440, num_hidden_layers=5, num_attention_heads=10,
                  head_dim=16, vocab_size=272, valid_vocab_size=259, max_position_embeddings=512,
                  use_mup=True, input_mult=1.0, output_mult=1.0, mup_scale_factor=160 / 32)


def train(run: Path, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "stages.train", f"run_dir={run}", *COMMON, *overrides],
                          env=env, cwd=run.parent, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("stage="))
    return json.loads((run / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-stages")
    run = root / "run"
    big = root / "big"
    big.mkdir()
    BIG.save(big)
    s1 = train(run, "stage=tiny_s1", "deepspeed.tensor_parallel=2", "nproc=2")
    s2 = train(run, "stage=tiny_s2", "stage.model=tiny-s3", "nproc=2")  # TP 1 × DP 2
    s3 = train(run, "stage=tiny_s3", f"stage.model={big / 'config.json'}", "deepspeed.tensor_parallel=2",
               "nproc=2", "stage.ramp_steps=2")
    return run, (s1, s2, s3)


@pytest.mark.slow
def test_exact_growth_across_tp_changes(chain):
    _, (s1, s2, s3) = chain
    assert (s1["world_size"], s2["world_size"], s3["world_size"]) == (2, 2, 2)
    for parent, child in ((s1, s2), (s2, s3)):  # TP 2 → TP 1, then TP 1 → TP 2
        assert child["parent_eval_loss_end"] == parent["eval_loss_end"]
        assert abs(child["eval_loss_start"] - parent["eval_loss_end"]) <= 1e-4 * parent["eval_loss_end"]
    assert (s2["adam_seeded_step"], s3["adam_seeded_step"]) == (3, 6)  # moments grown and seeded, steps add up


@pytest.mark.slow
def test_masked_stage_under_tp_ramps_and_folds(chain):
    run, _ = chain
    log = [json.loads(line) for line in (run / "tiny_s3" / "train_log.jsonl").read_text().splitlines()]
    cs = [r["c"] for r in log]
    assert cs[0] == 0.0 and cs[-1] == 1.0 and cs == sorted(cs)
    with CheckpointReader(run / "tiny_s3" / "init") as init:
        assert init.config.growth_mask is not None
    with CheckpointReader(run / "tiny_s3" / "final") as final:
        assert final.config.growth_mask is None and final.config.tensor_shapes() == BIG.tensor_shapes()


@pytest.mark.slow
def test_tp_stage_export_loads_in_transformers(chain, tmp_path):
    from transformers import LlamaForCausalLM

    from growth.hf_export import export_hf

    run, _ = chain
    final = run / "tiny_s3" / "final"
    hf = LlamaForCausalLM.from_pretrained(export_hf(final, tmp_path / "hf"), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(final)(ids)[..., :259]
        theirs = hf(ids).logits
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)
