"""Data end to end with real DeepSpeed ranks: Megatron files from an independent writer and
a SentencePiece model trained here, blended, trained on; a grown stage planned by the
orchestrator continues the parent's stream; megatron-core reads prepare-data's output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from growth.config import get_flavor
from stages.data import check_data, embedded_files, prepare_stage_data
from stages.schema import TrainConfig, from_dict, to_plain
from tests.helpers.data_helpers import prepare_cli, read_megatron, write_megatron
from tests.helpers.ds_helpers import read_log, read_summary, run_worker, write_stage_config
from tests.unit.test_data import train_sentencepiece

pytestmark = pytest.mark.slow

SP_VOCAB = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(SentencePiece model, its prepared prefix, an independently written prefix, input files)."""
    tmp = tmp_path_factory.mktemp("data_train")
    model = train_sentencepiece(tmp, SP_VOCAB)
    _, files = embedded_files(200_000)
    proc = prepare_cli(*files, "--tokenizer", model, "--out", tmp / "sp" / "stdlib", "--workers", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, SP_VOCAB, size=int(rng.integers(20, 400))), 2) for _ in range(200)]
    write_megatron(tmp / "indep", docs, dtype=np.uint16)
    return model, tmp / "sp" / "stdlib", tmp / "indep", files


def model_config(vocab: int) -> dict:
    """tiny-s1 with the vocabulary of the tokenizer (no padding rows)."""
    cfg = get_flavor("tiny-s1").to_hf_dict()
    cfg["vocab_size"] = vocab
    cfg.pop("valid_vocab_size", None)
    return cfg


def test_prepare_data_output_reads_back_in_megatron_core(corpus):
    """megatron-core's own IndexedDataset is a second independent reader of prepare-data's files."""
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import sentencepiece as spm

    model, prefix, _, files = corpus
    sp = spm.SentencePieceProcessor(model_file=str(model))
    theirs = indexed_dataset.IndexedDataset(str(prefix), multimodal=False, mmap=True)
    mine = read_megatron(prefix)
    want = [sp.encode(f.read_text()) + [sp.eos_id()] for f in files]
    assert len(theirs) == len(mine) == len(want)
    for i in range(len(want)):
        assert list(theirs[i]) == list(mine[i]) == want[i]


def test_train_on_blend_then_grown_stage_continues(corpus, tmp_path):
    from stages.launch.lock import StageLock
    from stages.launch.plan import plan_stage
    from stages.launch.prepare import prepare_stage

    _, sp_prefix, indep, _ = corpus
    data_cfg = {"source": "indexed", "paths": [str(sp_prefix), str(indep)], "weights": [0.7, 0.3],
                "eval_fraction": 0.1}
    check_data(data_cfg, SP_VOCAB)  # the SentencePiece vocabulary fits the model exactly
    with pytest.raises(Exception, match=f"has {SP_VOCAB} tokens but .* only {SP_VOCAB - 1}"):
        check_data(data_cfg, SP_VOCAB - 1)
    info = prepare_stage_data(data_cfg, tmp_path / "cache")
    assert info["vocab_size"] == SP_VOCAB and [d["weight"] for d in info["train"]] == pytest.approx([0.7, 0.3])

    run = tmp_path / "run"
    parent = run / "s1"
    run_worker(write_stage_config(parent, info, model_config=model_config(SP_VOCAB), steps=4, save_every=0,
                                  warmup_steps=1))
    first = read_summary(parent)
    tokens = 4 * 4 * 2 * 32  # steps × micro batch × ranks × seq_len
    assert (first["data_tokens_start"], first["data_tokens_end"], first["data_epoch"]) == (0, tokens, 0)
    assert sum(first["data_positions"].values()) == tokens and all(first["data_positions"].values())
    assert all(math.isfinite(r["loss"]) for r in read_log(parent)) and math.isfinite(first["eval_loss_end"])

    # The child is planned and prepared by the orchestrator, exactly as train-stage does it.
    (tmp_path / "child_model").mkdir()
    (tmp_path / "child_model" / "config.json").write_text(json.dumps(model_config(SP_VOCAB)))
    cfg = to_plain(TrainConfig())
    cfg["stage"].update({"name": "s2", "parent": "s1", "model": str(tmp_path / "child_model" / "config.json"),
                         "steps": 2, "micro_batch_size": 2, "grad_accum": 2, "seq_len": 16, "save_every": 0,
                         "warmup_steps": 1, "eval_batches": 2})
    cfg["data"].update({**data_cfg, "weights": [0.5, 0.5], "cache_dir": str(tmp_path / "cache")})
    cfg.update({"run_dir": str(run), "nproc": 2})
    plan = plan_stage(from_dict(cfg))
    with StageLock(plan.layout.lock):  # as run_stage does (the lock creates the stage dir)
        resolved = prepare_stage(plan)
    resolved_path = run / "s2" / "stage_config.json"
    assert resolved_path.is_file()
    assert resolved.data["start"] == {"tokens": first["data_tokens_end"], "positions": first["data_positions"]}
    run_worker(resolved_path)
    second = read_summary(run / "s2")
    assert second["data_tokens_start"] == first["data_tokens_end"]
    assert second["data_tokens_end"] == first["data_tokens_end"] + 2 * 2 * 2 * 2 * 16
    for name, pos in second["data_positions"].items():
        assert pos > first["data_positions"][name]  # both datasets went on from where s1 stopped
    assert math.isfinite(second["eval_loss_end"])


@pytest.mark.parametrize("case", ["weights", "idx", "vocab"])
def test_stage_planning_refuses_bad_data(corpus, tmp_path, case):
    """The orchestrator's planning (train-stage's first step) refuses before writing anything."""
    from stages.data import DataError
    from stages.launch.plan import plan_stage

    _, sp_prefix, indep, _ = corpus
    broken = tmp_path / "broken"
    write_megatron(broken, [np.arange(5, 50), np.arange(7, 90)])
    with open(f"{broken}.bin", "ab") as fh:
        fh.write(b"\0\0\0\0")
    data, message = {
        "weights": ({"paths": [str(sp_prefix), str(indep)], "weights": [1.0]},
                    "data.weights has 1 values but data.paths has 2"),
        "idx": ({"paths": [str(broken)]}, r"broken.bin: 260 bytes, but .*broken.idx describes 256"),
        "vocab": ({"paths": [str(indep)], "vocab_size": 300},
                  "data.tokenizer has 300 tokens but stage.model 'tiny-s1' has only 259"),
    }[case]
    cfg = to_plain(TrainConfig())
    cfg["stage"].update({"name": "s1", "model": "tiny-s1"})
    cfg["data"].update({"source": "indexed", **data})
    cfg.update({"run_dir": str(tmp_path / "run")})
    with pytest.raises(DataError, match=message):
        plan_stage(from_dict(cfg))
    assert not (tmp_path / "run").exists()


def test_train_stage_cli_refuses_a_mismatched_idx(tmp_path):
    """Through the real train-stage CLI: one line naming the file, exit 2, no stage dir."""
    import os
    import subprocess
    import sys

    from tests.conftest import assert_one_line_error

    broken = tmp_path / "broken"
    write_megatron(broken, [np.arange(5, 50), np.arange(7, 90)])
    with open(f"{broken}.bin", "ab") as fh:
        fh.write(b"\0\0\0\0")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "stages.train", "stage=tiny_s1", "data=indexed", f"run_dir={run}",
                           "nproc=1", f"data.paths=[{broken}]"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "broken.bin", "broken.idx", "does not match")
    assert not (run / "tiny_s1").exists()  # refused in planning: no stage dir, no worker
