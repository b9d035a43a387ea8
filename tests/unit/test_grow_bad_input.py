"""Bad inputs to `grow apply` (and friends): one line naming the file/tensor/field, exit 2,
no traceback, nothing in OUT — and no staging dir left behind for deterministic errors."""

from __future__ import annotations

import json
import pickle
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from growth.checkpoint import INDEX_NAME, staging_dir
from growth.cli import main
from growth.config import ModelConfig, get_flavor
from growth.init import init_checkpoint
from tests.conftest import REPO, _env, assert_one_line_error


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """tiny-s1 in fp32, several shards (so one can go missing)."""
    return init_checkpoint(get_flavor("tiny-s1"), tmp_path / "src", seed=0, max_shard_size=100_000,
                           source="tiny-s1")


def grow(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def apply_fails(capsys, src: Path, *needles: str, to: str = "tiny-s2", extra: tuple = ()) -> str:
    out = src.parent / "out"
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", to, "--out", out, *extra)
    assert_one_line_error(rc, err, *needles)
    assert rc == 2
    assert not out.exists(), "bad input left an output directory"
    assert not staging_dir(out).exists(), "a deterministic input error left the staging dir"
    return err


def shard(src: Path, k: int = 1) -> Path:
    return src / json.loads((src / INDEX_NAME).read_text())["weight_map"]["model.embed_tokens.weight"] \
        if k == 0 else sorted(src.glob("model-*.safetensors"))[k]


def test_missing_shard(capsys, src):
    victim = shard(src, 2)
    victim.unlink()
    apply_fails(capsys, src, victim.name, "missing shard")


def test_truncated_shard(capsys, src):
    victim = shard(src, 1)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    apply_fails(capsys, src, victim.name, "truncated")


def test_corrupt_header(capsys, src):
    victim = shard(src, 1)
    data = bytearray(victim.read_bytes())
    data[8:16] = b"\x00garbage"
    victim.write_bytes(bytes(data))
    apply_fails(capsys, src, victim.name, "corrupt")


def test_huge_header_length(capsys, src):
    victim = shard(src, 1)
    data = bytearray(victim.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    victim.write_bytes(bytes(data))
    apply_fails(capsys, src, victim.name, "header")


def test_index_names_absent_tensor(capsys, src):
    index = json.loads((src / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = first  # really lives elsewhere
    (src / INDEX_NAME).write_text(json.dumps(index))
    apply_fails(capsys, src, "model.layers.0.mlp.gate_proj.weight", first)


def test_unknown_tensor_name(capsys, src):
    victim = shard(src, 1)
    tensors = load_file(str(victim))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(victim))
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = victim.name
    (src / INDEX_NAME).write_text(json.dumps(index))
    apply_fails(capsys, src, "model.layers.0.mlp.extra_proj.weight", "unknown tensor")


def test_mixed_dtypes_need_dtype(capsys, src):
    """Decision: a source with mixed dtypes is refused unless --dtype names the output dtype."""
    victim = shard(src, 1)
    tensors = load_file(str(victim))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, str(victim))
    apply_fails(capsys, src, name, "mixed dtypes", "--dtype")
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", "tiny-s2", "--out", src.parent / "ok",
                      "--dtype", "float32")
    assert rc == 0, err


def test_dtype_that_cannot_hold_the_values(capsys, src):
    """--dtype float16 on weights beyond its range: refused, naming the tensor."""
    victim = shard(src, 1)
    tensors = load_file(str(victim))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1e8  # |w| ~ 0.02 → 2e6 > 65504
    save_file(tensors, str(victim))
    apply_fails(capsys, src, name, "float16", extra=("--dtype", "float16"))


@pytest.mark.slow
def test_error_in_a_spawned_worker_is_one_line(capsys, src):
    """The same failure under --workers 2: raised in a worker, reported once by the parent."""
    victim = shard(src, 3)
    tensors = load_file(str(victim))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1e8
    save_file(tensors, str(victim))
    apply_fails(capsys, src, name, "float16", extra=("--dtype", "float16", "--workers", "2",
                                                     "--max-shard-size", "50KB"))


def test_target_smaller_than_source(capsys, tmp_path):
    big = init_checkpoint(get_flavor("tiny-s2"), tmp_path / "big", seed=0, source="tiny-s2")
    apply_fails(capsys, big, "hidden_size", "smaller", to="tiny-s1")


def write_target(tmp_path: Path, **changes) -> Path:
    data = get_flavor("tiny-s2").to_hf_dict()
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "target.json"
    path.write_text(json.dumps(data))
    return path


def test_heads_that_do_not_fit_head_dim(capsys, src, tmp_path):
    # hidden 96 over 4 heads with no explicit head_dim → head_dim 24, not the source's 16
    target = write_target(tmp_path, hidden_size=96, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=None)
    apply_fails(capsys, src, "head_dim", to=str(target))


def test_heads_that_do_not_fit_gqa_groups(capsys, tmp_path):
    gqa = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=64)
    src = init_checkpoint(gqa, tmp_path / "src", seed=0)
    target = tmp_path / "target.json"
    target.write_text(json.dumps(gqa.replace(num_attention_heads=6, num_key_value_heads=2).to_hf_dict()))
    apply_fails(capsys, src, "num_key_value_heads", "GQA", to=str(target))


def test_kv_heads_not_dividing_heads(capsys, src, tmp_path):
    target = write_target(tmp_path, num_attention_heads=6, num_key_value_heads=4)
    apply_fails(capsys, src, "num_key_value_heads", str(target), to=str(target))


def test_head_dim_change(capsys, src, tmp_path):
    target = write_target(tmp_path, head_dim=32)
    apply_fails(capsys, src, "head_dim", "RoPE", to=str(target))


def test_unfinished_masks_in_source(capsys, tmp_path):
    src = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "s1", seed=0)
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", "tiny-s2", "--out", tmp_path / "masked",
                      "--strategy", "masked")
    assert rc == 0, err
    apply_fails(capsys, tmp_path / "masked", "growth_mask.c", to="tiny-s3")


def test_pickle_weights_refused_never_unpickled(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    get_flavor("tiny-s1").save(src)
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    apply_fails(capsys, src, "pytorch_model.bin", "pickle")
    assert not marker.exists(), "the pickle was unpickled"


def test_existing_non_empty_out_never_overwritten(capsys, src):
    out = src.parent / "out"
    out.mkdir()
    keep = out / "precious.txt"
    keep.write_text("mine")
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", "tiny-s2", "--out", out)
    assert_one_line_error(rc, err, str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and keep.read_text() == "mine"
    rc, _, err = grow(capsys, "export-hf", src, "--out", out)
    assert_one_line_error(rc, err, str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_bad_optimizer_state(capsys, src):
    (src / "optimizer").mkdir()
    (src / "optimizer" / "state.json").write_text('{"step": -3}')
    apply_fails(capsys, src, "state.json", "step")


@pytest.mark.slow
def test_out_of_disk(tmp_path):
    """RLIMIT_FSIZE makes the shard write fail with EFBIG, as a full disk fails a write."""
    src = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "src", seed=0)
    out = tmp_path / "out"
    limit = 300_000  # the single target shard is ~1.1 MB

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "growth.cli", "apply", "--from", str(src), "--to",
                           "tiny-s2", "--out", str(out)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120, preexec_fn=small_files)
    assert_one_line_error(proc.returncode, proc.stderr, "model.safetensors", "while writing tensor '",
                          "rerun the same command")
    assert proc.returncode == 2
    assert not out.exists()
    assert not list(staging_dir(out).glob("*.partial")), "the half-written shard was left behind"
