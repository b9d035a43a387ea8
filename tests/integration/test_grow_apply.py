"""`grow apply` end to end: HF import/export exactness, resume after SIGKILL, workers,
optimizer moments. Tiny fp32 models; everything runs in a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growth.checkpoint import OPTIMIZER_DIR, CheckpointReader, load_model, save_checkpoint, staging_dir
from growth.config import ModelConfig, get_flavor
from growth.init import init_checkpoint
from growth.model import init_state_dict
from tests.conftest import REPO, _env, kill_grow_mid_job, tree_hashes
from tests.conftest import grow_in_process as grow

EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: growth.json's event time, for byte comparisons


@pytest.fixture
def epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


@pytest.fixture
def s1(tmp_path: Path) -> Path:
    return init_checkpoint(get_flavor("tiny-s1"), tmp_path / "s1", seed=0, source="tiny-s1")


# ---------------------------------------------------------------------- HF in, HF out
def test_hf_llama_gqa_grow_export_roundtrip(tmp_path, capsys):
    """transformers Llama (GQA, tied) → apply 64→80 hidden (×1.25), 2→4 layers, 4→8 heads →
    export-hf → transformers loads it → the same logits as the original."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(hf).eval()
    original.save_pretrained(tmp_path / "hf_src")
    target = ModelConfig(hidden_size=80, intermediate_size=200, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=16, vocab_size=96, max_position_embeddings=64)
    target.save(tmp_path)
    rc, _, err = grow(capsys, "apply", "--from", tmp_path / "hf_src", "--to", tmp_path / "config.json",
                      "--out", tmp_path / "grown")
    assert rc == 0, err
    rc, out, err = grow(capsys, "verify", tmp_path / "hf_src", tmp_path / "grown", "--json")
    assert rc == 0, out + err
    assert json.loads(out)["max_abs_logit_diff"] <= 1e-5 * json.loads(out)["max_abs_logit"]
    rc, _, err = grow(capsys, "export-hf", tmp_path / "grown", "--out", tmp_path / "hf_out")
    assert rc == 0, err
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_out").eval()
    assert exported.config.num_hidden_layers == 4 and exported.config.hidden_size == 80
    assert not exported.config.tie_word_embeddings
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = original(ids).logits, exported(ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_teleflm_export_folds_mup_and_crops_vocab(tmp_path, capsys, s1):
    """tiny-s1 → tiny-s3 (μP factor 2 → 4, vocab 264 → 272 padded, 259 valid) → plain Llama."""
    transformers = pytest.importorskip("transformers")
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s3", "--out", tmp_path / "s3")
    assert rc == 0, err
    rc, _, err = grow(capsys, "export-hf", tmp_path / "s3", "--out", tmp_path / "hf")
    assert rc == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 259 and "use_mup" not in config
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(s1)
    ids = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids)[..., :259], exported(ids).logits
    assert b.shape[-1] == 259
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    events = json.loads((tmp_path / "hf" / "growth.json").read_text())["events"]
    assert [e["kind"] for e in events] == ["init", "grow", "export-hf"]


# ---------------------------------------------------------------------- resume, workers
@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path, capsys, s1, epoch):
    out = tmp_path / "out"
    args = ["apply", "--from", str(s1), "--to", "tiny-s2", "--out", str(out), "--max-shard-size", "20KB"]
    kept = kill_grow_mid_job(args, "0.1", out, 5, EPOCH)
    staging = staging_dir(out)
    done = len(kept)
    total = int(kept[0].split("-of-")[1].split(".")[0])
    assert 5 <= done < total and not out.exists()
    rc, _, err = grow(capsys, *args)  # the same command resumes
    assert rc == 0, err
    assert not staging.exists()
    rc, _, err = grow(capsys, *args[:6], str(tmp_path / "clean"), *args[7:])
    assert rc == 0, err
    assert tree_hashes(out) == tree_hashes(tmp_path / "clean")


@pytest.mark.slow
def test_workers_output_identical(tmp_path, capsys, s1, epoch):
    common = ["--to", "tiny-s2", "--max-shard-size", "60KB"]
    assert grow(capsys, "apply", "--from", s1, "--out", tmp_path / "w1", *common)[0] == 0
    rc, _, err = grow(capsys, "apply", "--from", s1, "--out", tmp_path / "w2", *common, "--workers", "2")
    assert rc == 0, err
    hashes = tree_hashes(tmp_path / "w1")
    assert len(hashes) > 10 and hashes == tree_hashes(tmp_path / "w2")


@pytest.mark.slow
def test_torchrun_ranks_output_identical(tmp_path, capsys, s1, epoch):
    common = ["--to", "tiny-s2", "--max-shard-size", "60KB"]
    assert grow(capsys, "apply", "--from", s1, "--out", tmp_path / "w1", *common)[0] == 0
    env = {**_env(), "SOURCE_DATE_EPOCH": EPOCH}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m", "growth.cli", "apply", "--from", str(s1), "--out", str(tmp_path / "tr"),
                           *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 reports
    assert tree_hashes(tmp_path / "w1") == tree_hashes(tmp_path / "tr")


# ---------------------------------------------------------------------- optimizer state
def write_moments(src: Path, config: ModelConfig, step: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """SRC/optimizer/{exp_avg,exp_avg_sq} (shards + index, no config) and state.json."""
    moments = {}
    for i, kind in enumerate(("exp_avg", "exp_avg_sq")):
        state = {n: (t.abs() if kind == "exp_avg_sq" else t) for n, t in init_state_dict(config, seed=10 + i).items()}
        path = save_checkpoint(src / OPTIMIZER_DIR / kind, config, state, max_shard_size=100_000)
        (path / "config.json").unlink()
        (path / "growth.json").unlink()
        moments[kind] = state
    (src / OPTIMIZER_DIR / "state.json").write_text(json.dumps(
        {"step": step, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}))
    return moments


def test_optimizer_state_grows_with_weights(tmp_path, capsys, s1):
    moments = write_moments(s1, get_flavor("tiny-s1"))
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                      "--dtype", "bfloat16")
    assert rc == 0, err
    g = tmp_path / "g"
    assert (g / OPTIMIZER_DIR / "state.json").read_bytes() == (s1 / OPTIMIZER_DIR / "state.json").read_bytes()
    assert CheckpointReader(g).dtypes == {torch.bfloat16}
    history = json.loads((g / "growth.json").read_text())["events"][-1]
    layer_map = history["layer_map"]
    new = [i for i, e in enumerate(layer_map) if e["new"]]
    assert new, "tiny-s1 → tiny-s2 adds a layer"
    grown_config = ModelConfig.load(g)
    for kind, src_state in moments.items():
        reader = CheckpointReader(g / OPTIMIZER_DIR / kind, config=grown_config)
        assert reader.dtypes == {torch.float32}
        for i, entry in enumerate(layer_map):
            # matrices only: zero hidden growth rescales norm gains, and their moments with them
            for suffix in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight",
                           "mlp.gate_proj.weight"):
                grown = reader.get(f"model.layers.{i}.{suffix}")
                if entry["new"]:
                    assert not grown.any(), f"new layer {i} {kind} must start at zero"
                    continue
                old = src_state[f"model.layers.{entry['src']}.{suffix}"]
                region = tuple(slice(0, s) for s in old.shape)
                assert torch.equal(grown[region], old), (kind, i, suffix)
                rest = grown.clone()
                rest[region] = 0
                assert not rest.any(), f"new slices of {kind} must start at zero"
        assert torch.equal(reader.get("model.embed_tokens.weight")[:, :64], src_state["model.embed_tokens.weight"])


def test_no_optimizer_state_grows_weights_only(tmp_path, capsys, s1):
    write_moments(s1, get_flavor("tiny-s1"))
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                      "--no-optimizer-state")
    assert rc == 0, err
    assert not (tmp_path / "g" / OPTIMIZER_DIR).exists()
    assert CheckpointReader(tmp_path / "g").config.hidden_size == get_flavor("tiny-s2").hidden_size
