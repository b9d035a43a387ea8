"""`grow import`: the public Tele-FLM release layout (bf16 pickle shards + index, Tele-FLM
config, tokenizer and code files) end to end, booby-trapped pickles, bad inputs, HF
safetensors, workers, and DeepSpeed ZeRO-2/3 + universal checkpoints from a plain loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from growth.checkpoint import CheckpointReader, lock_path, open_moments, staging_dir
from growth.cli import main
from tests.conftest import REPO, _env, assert_one_line_error, kill_grow_mid_job

transformers = pytest.importorskip("transformers")

# A toy Tele-FLM release: the 52B release's config.json fields at tiny sizes.
RELEASE_CONFIG = {
    "architectures": ["TeleFLMForCausalLM"], "model_type": "TeleFLM",
    "auto_map": {"AutoConfig": "configuration_teleflm.TeleFLMConfig",
                 "AutoModel": "modeling_teleflm.TeleFLMModel",
                 "AutoModelForCausalLM": "modeling_teleflm.TeleFLMForCausalLM"},
    "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": 96, "hidden_act": "silu", "attention_bias": False,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_mup": True, "input_mult": 1.0,
    "output_mult": 0.5, "mup_scale_factor": 2.0, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 3, "pretraining_tp": 1, "initializer_range": 0.02, "transformers_version": "4.36.2",
    "use_cache": True,
}
RELEASE_FILES = {
    "tokenizer.model": b"\x0a\x0bsentencepiece-model-bytes",
    "tokenizer_config.json": b'{"tokenizer_class": "TeleFLMTokenizer", "use_fast": false}',
    "special_tokens_map.json": b'{"bos_token": "<s>", "eos_token": "</s>"}',
    "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
    "configuration_teleflm.py": b"# configuration code of the release\n",
    "modeling_teleflm.py": b"# modeling code of the release\n",
    "tokenization_teleflm.py": b"# tokenizer code of the release\n",
}


def grow(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def release_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    from growth.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(RELEASE_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in cfg.tensor_shapes().items():
        t = torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 0.1)
        sd[name] = (t if len(shape) == 2 else 1.0 + t).bfloat16()
    return sd


def write_release(d: Path, sd: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """The release layout: pytorch_model-0000k-of-0000N.bin + index + config + files."""
    d.mkdir(parents=True)
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[k * per:(k + 1) * per]}
        torch.save(part, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(RELEASE_CONFIG, indent=2))
    for name, data in RELEASE_FILES.items():
        (d / name).write_bytes(data)
    return d


def teleflm_logits(directory_or_sd, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """An independent forward: transformers' Llama with Tele-FLM's two μP multipliers applied
    by hand (embeddings × input_mult, logits × output_mult / mup_scale_factor)."""
    if isinstance(directory_or_sd, Path):
        sd = {}
        for f in sorted(directory_or_sd.glob("*.safetensors")):
            sd.update(load_file(f))
    else:
        sd = directory_or_sd
    llama = transformers.LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]),
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"],
        max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(llama).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids) * config["input_mult"]
        return model(inputs_embeds=embeds).logits * (config["output_mult"] / config["mup_scale_factor"])


# ---------------------------------------------------------------------- the release, end to end
def test_release_layout_import_grow_export_teleflm(tmp_path, capsys):
    sd = release_weights()
    src = write_release(tmp_path / "Tele-FLM", sd)
    # apply on the pickle release: one line saying to import first
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", "tiny", "--out", tmp_path / "nope")
    assert_one_line_error(rc, err, "pytorch_model", "grow import")
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "imported")
    assert rc == 0, err
    imported = tmp_path / "imported"
    with CheckpointReader(imported) as r:
        assert r.dtypes == {torch.bfloat16}
        for name, t in sd.items():
            assert torch.equal(r.get(name), t), name
    raw = json.loads((imported / "config.json").read_text())
    for key, value in RELEASE_CONFIG.items():
        assert raw[key] == value, key  # every field of the release, as it was
    for name, data in RELEASE_FILES.items():
        assert (imported / name).read_bytes() == data
    event = json.loads((imported / "growth.json").read_text())["events"][-1]
    assert event["kind"] == "import" and event["format"] == "hf-pickle"
    assert sorted(event["carried"]) == sorted(RELEASE_FILES)
    assert len(event["source"]["files"]) == 3

    # grow ×2 by cloning (hidden, heads, ffn), exact in bf16
    target = dict(RELEASE_CONFIG, hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=352, head_dim=16)
    (tmp_path / "target.json").write_text(json.dumps(target))
    rc, _, err = grow(capsys, "apply", "--from", imported, "--to", tmp_path / "target.json",
                      "--out", tmp_path / "grown", "--strategy", "clone")
    assert rc == 0, err
    grown_raw = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert grown_raw["model_type"] == "TeleFLM" and grown_raw["auto_map"] == RELEASE_CONFIG["auto_map"]
    assert grown_raw["hidden_size"] == 128 and grown_raw["pretraining_tp"] == 1
    assert sorted(json.loads((tmp_path / "grown" / "growth.json").read_text())["events"][-1]["carried"]) \
        == sorted(RELEASE_FILES)

    rc, _, err = grow(capsys, "export-hf", tmp_path / "grown", "--out", tmp_path / "export", "--format", "teleflm")
    assert rc == 0, err
    export = tmp_path / "export"
    exported = json.loads((export / "config.json").read_text())
    for key, value in RELEASE_CONFIG.items():
        if key not in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                       "mup_scale_factor"):
            assert exported[key] == value, key
    assert exported["hidden_size"] == 128
    for name, data in RELEASE_FILES.items():
        assert (export / name).read_bytes() == data
    assert {t.dtype for f in export.glob("*.safetensors") for t in load_file(f).values()} == {torch.bfloat16}

    ids = torch.randint(0, RELEASE_CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    want = teleflm_logits({k: v.float() for k, v in sd.items()}, RELEASE_CONFIG, ids)
    got = teleflm_logits(export, exported, ids)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max(), (want - got).abs().max()


@pytest.mark.slow
def test_import_workers_identical_and_single_bin(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    sd = release_weights(1)
    src = write_release(tmp_path / "rel", sd, shards=3)
    common = ["--max-shard-size", "60KB"]
    assert grow(capsys, "import", src, "--out", tmp_path / "w1", *common)[0] == 0
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "w2", *common, "--workers", "2")
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
    one = tmp_path / "one"
    one.mkdir()
    torch.save(sd, one / "pytorch_model.bin")
    (one / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    rc, _, err = grow(capsys, "import", one, "--out", tmp_path / "o1", "--dtype", "float32")
    assert rc == 0, err
    with CheckpointReader(tmp_path / "o1") as r:
        assert r.dtypes == {torch.float32}
        assert all(torch.equal(r.get(n), t.float()) for n, t in sd.items())
    assert json.loads((tmp_path / "o1" / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.slow
def test_import_resumes_after_sigkill_byte_identical(tmp_path, capsys, monkeypatch):
    """An import SIGKILLed once 4 shards are staged: the same command keeps them (writes only
    the rest) and the output equals an uninterrupted import's, byte for byte."""

    from growth import shardwork
    from tests.conftest import tree_hashes

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    src = write_release(tmp_path / "rel", release_weights(2), shards=3)
    args = ["import", str(src), "--out", str(tmp_path / "out"), "--max-shard-size", "20KB"]
    kept = set(kill_grow_mid_job(args, "0.2", tmp_path / "out", 4, "1700000000"))
    staging = staging_dir(tmp_path / "out")
    total = int(next(iter(kept)).split("-of-")[1].split(".")[0])
    assert 4 <= len(kept) < total and not (tmp_path / "out").exists()
    written: list[str] = []
    real = shardwork.ShardWorker.write

    def counting(self, task, *a, **kw):  # noqa: ANN001, ANN202
        done = real(self, task, *a, **kw)
        if done:
            written.append(Path(task.path).name)
        return done
    monkeypatch.setattr(shardwork.ShardWorker, "write", counting)
    rc, _, err = grow(capsys, *args)
    assert rc == 0, err
    assert not staging.exists() and set(written).isdisjoint(kept) and len(written) == total - len(kept)
    rc, _, err = grow(capsys, *args[:3], str(tmp_path / "clean"), *args[4:])
    assert rc == 0, err
    assert tree_hashes(tmp_path / "out") == tree_hashes(tmp_path / "clean")


def test_import_hf_safetensors(tmp_path, capsys):
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).eval()
    model.save_pretrained(tmp_path / "hf")
    rc, _, err = grow(capsys, "import", tmp_path / "hf", "--out", tmp_path / "ours")
    assert rc == 0, err
    with CheckpointReader(tmp_path / "ours") as r:
        assert not r.tied and torch.equal(r.get("lm_head.weight"), model.model.embed_tokens.weight.detach())
    assert (tmp_path / "ours" / "generation_config.json").is_file()


# ---------------------------------------------------------------------- booby traps
class _Trap:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_booby_trapped_bin_refused_never_run(tmp_path, capsys, zip_format):
    src = tmp_path / "rel"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    marker = tmp_path / "PWNED"
    payload = {"model.embed_tokens.weight": _Trap(marker)}
    if zip_format:
        torch.save(payload, src / "pytorch_model.bin")
    else:
        import pickle

        (src / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "pytorch_model.bin")
    assert rc == 2 and not marker.exists(), "the pickle's command ran"
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()
    assert not lock_path(tmp_path / "out").exists()
    # in a fresh process too
    proc = subprocess.run([sys.executable, "-m", "growth.cli", "import", str(src), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "pytorch_model.bin")
    assert not marker.exists()


# ---------------------------------------------------------------------- bad inputs
def _truncated(d: Path) -> tuple[str, ...]:
    victim = d / "pytorch_model-00002-of-00003.bin"
    victim.write_bytes(victim.read_bytes()[:-300])
    return victim.name, "truncated"


def _missing_shard(d: Path) -> tuple[str, ...]:
    (d / "pytorch_model-00003-of-00003.bin").unlink()
    return "pytorch_model-00003-of-00003.bin", "missing"


def _tensor_missing_from_shard(d: Path) -> tuple[str, ...]:
    f = d / "pytorch_model-00001-of-00003.bin"
    part = torch.load(f, weights_only=True)
    victim = list(part)[-1]
    part.pop(victim)
    torch.save(part, f)
    return victim, f.name


def _shape_disagrees(d: Path) -> tuple[str, ...]:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 160
    (d / "config.json").write_text(json.dumps(cfg))
    return "config.json implies", "mlp"


def _non_tensor(d: Path) -> tuple[str, ...]:
    f = d / "pytorch_model-00002-of-00003.bin"
    part = torch.load(f, weights_only=True)
    part["model.layers.1.mlp.up_proj.weight"] = "not a tensor"
    torch.save(part, f)
    return f.name, "not a tensor"


def _index_outside(d: Path) -> tuple[str, ...]:
    index = json.loads((d / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "/etc/passwd"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return "pytorch_model.bin.index.json", "/etc/passwd"


BAD = [_truncated, _missing_shard, _tensor_missing_from_shard, _shape_disagrees, _non_tensor, _index_outside]


@pytest.mark.parametrize("breaker", BAD, ids=[b.__name__[1:] for b in BAD])
def test_bad_release_is_one_line_and_no_output(tmp_path, capsys, breaker):
    src = write_release(tmp_path / "rel", release_weights())
    needles = breaker(src)
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, *needles)
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"], "bad input left output behind"


def test_existing_non_empty_out_refused(tmp_path, capsys):
    src = write_release(tmp_path / "rel", release_weights())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, str(tmp_path / "out"), "not empty")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_deepspeed_folder_without_latest(tmp_path, capsys):
    ckpt = tmp_path / "ds"
    (ckpt / "global_step7").mkdir(parents=True)
    torch.save({"module": {}}, ckpt / "global_step7" / "mp_rank_00_model_states.pt")
    rc, _, err = grow(capsys, "import", ckpt, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, str(ckpt), "latest", "global_step7")
    (ckpt / "latest").write_text("global_step9")
    rc, _, err = grow(capsys, "import", ckpt, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "latest", "global_step9")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- DeepSpeed from a plain loop
@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> dict[int, Path]:
    """ZeRO-2 and ZeRO-3 checkpoints of a plain DeepSpeed loop (2 CPU ranks, gloo)."""
    from tests.helpers.ds_helpers import free_port

    root = tmp_path_factory.mktemp("ds")
    runs = {}
    for zero in (2, 3):
        out = root / f"zero{zero}"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(REPO / "tests" / "workers" / "ds_plain_loop.py"),
                               str(out), str(zero)], cwd=REPO, env={**_env(), "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[zero] = out
    return runs


def assert_engine_state(imported: Path, reference: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    with CheckpointReader(imported) as r:
        assert r.dtypes == {torch.float32}
        for name in r.names():
            assert torch.equal(r.get(name), reference["weight"][name]), name
        moments = open_moments(imported, r.config)
        for kind, reader in moments.items():
            for name in r.names():
                assert torch.equal(reader.get(name), reference[kind][name]), (kind, name)
    assert json.loads((imported / "optimizer" / "state.json").read_text())["step"] == step


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_import_is_bitwise(tmp_path, capsys, ds_runs, zero):
    ckpt = ds_runs[zero]
    reference = torch.load(ckpt / "reference.pt", weights_only=True)
    rc, _, err = grow(capsys, "import", ckpt, "--out", tmp_path / "imported")
    assert rc == 0, err
    assert_engine_state(tmp_path / "imported", reference, 3)
    event = json.loads((tmp_path / "imported" / "growth.json").read_text())["events"][-1]
    assert event["format"] == "deepspeed-zero" and event["optimizer_state"] is True
    # the tag folder itself imports the same
    rc, _, err = grow(capsys, "import", ckpt / "global_step3", "--out", tmp_path / "tag")
    assert rc == 0, err
    assert_engine_state(tmp_path / "tag", reference, 3)


@pytest.mark.slow
def test_deepspeed_universal_import_is_bitwise(tmp_path, capsys, ds_runs):
    ckpt = ds_runs[2]
    reference = torch.load(ckpt / "reference.pt", weights_only=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt / "global_step3"), "--output_folder", str(tmp_path / "universal"),
                           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, _, err = grow(capsys, "import", tmp_path / "universal", "--out", tmp_path / "imported",
                      "--config", ckpt / "config.json")
    assert rc == 0, err
    assert_engine_state(tmp_path / "imported", reference, 3)
