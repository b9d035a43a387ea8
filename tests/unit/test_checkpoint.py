"""Checkpoint format: round trips, sharding and index, bad input through `grow info`, `grow init`."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from growth.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    plan_shards,
    save_checkpoint,
)
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.model import init_state_dict
from tests.conftest import assert_one_line_error, grow_in_process, run_grow

TINY = get_flavor("tiny")


def shard_tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(directory.glob("*.safetensors"))}


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_shard_size", ["5GB", 100_000])
def test_save_load_round_trip_bitwise(tmp_path, dtype, max_shard_size):
    sd = init_state_dict(TINY, seed=1, dtype=dtype)
    sd["model.norm.weight"] = torch.randn(TINY.hidden_size).to(dtype)  # not just ones
    out = save_checkpoint(tmp_path / "c", TINY, iter(sd.items()), max_shard_size=max_shard_size)
    with CheckpointReader(out) as reader:
        assert reader.config == TINY
        assert reader.names() == list(sd)
        assert reader.dtypes == {dtype}
        back = reader.state_dict()
    for name, tensor in sd.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name


def test_save_casts_to_requested_dtype(tmp_path):
    sd = init_state_dict(TINY, seed=2)
    save_checkpoint(tmp_path / "c", TINY, sd, dtype="bfloat16")
    with CheckpointReader(tmp_path / "c") as reader:
        for name, tensor in reader.iter_tensors():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, sd[name].bfloat16())


def test_reader_returns_owned_tensors(tiny_checkpoint):
    with CheckpointReader(tiny_checkpoint) as reader:
        first = reader.get("model.layers.0.mlp.up_proj.weight")
        first.add_(1.0)
        again = reader.get("model.layers.0.mlp.up_proj.weight")
        assert not torch.equal(first, again)
        assert torch.equal(again + 1.0, first)


def test_sharding_respects_max_size_and_index(tmp_path):
    limit = 120_000
    sd = init_state_dict(TINY, seed=3)
    out = save_checkpoint(tmp_path / "c", TINY, sd, max_shard_size=limit)
    shards = shard_tensors(out)
    n = len(shards)
    assert n > 2 and not (out / WEIGHTS_NAME).exists()
    assert sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for tensors in shards.values():
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1  # a lone oversized tensor gets its own shard
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(sd)
    for name, fname in index["weight_map"].items():
        assert name in shards[fname]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    # Shards hold consecutive tensors in canonical order.
    assert [name for f in sorted(shards) for name in sorted(shards[f], key=list(sd).index)] == list(sd)


def test_single_file_checkpoint(tmp_path):
    out = save_checkpoint(tmp_path / "c", TINY, init_state_dict(TINY))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "growth.json", WEIGHTS_NAME]
    assert set(load_file(out / WEIGHTS_NAME)) == set(TINY.tensor_shapes())


def test_plan_shards():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]
    assert plan_shards([], 8) == []


def test_save_refuses_non_empty_and_accepts_empty_out(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(tmp_path / "full", TINY, init_state_dict(TINY))
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", TINY, init_state_dict(TINY))
    assert (tmp_path / "empty" / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_save_leaves_nothing(tmp_path, error):
    def tensors():
        for i, item in enumerate(init_state_dict(TINY).items()):
            if i == 20:
                raise error("boom")
            yield item

    with pytest.raises(error):
        save_checkpoint(tmp_path / "c", TINY, tensors(), max_shard_size=50_000)
    assert leftovers(tmp_path, set()) == []


# ---------------------------------------------------------------------- bad input, via the CLI
def sharded_tiny(tmp_path: Path) -> Path:
    return init_checkpoint(TINY, tmp_path / "sharded", seed=0, max_shard_size=300_000)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def break_missing_field(d: Path) -> tuple[str, ...]:
    edit_json(d / "config.json", lambda c: c.pop("intermediate_size"))
    return "config.json", "intermediate_size"


def break_ill_typed_field(d: Path) -> tuple[str, ...]:
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers="4"))
    return "config.json", "num_hidden_layers"


def break_missing_shard(d: Path) -> tuple[str, ...]:
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    return victim.name, "missing"


def break_tensor_left_out_of_index(d: Path) -> tuple[str, ...]:
    edit_json(d / INDEX_NAME, lambda i: i["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
    return INDEX_NAME, "model.layers.1.mlp.up_proj.weight"


def break_index_points_at_wrong_shard(d: Path) -> tuple[str, ...]:
    first = sorted(d.glob("model-*.safetensors"))[0].name
    edit_json(d / INDEX_NAME, lambda i: i["weight_map"].update({"lm_head.weight": first}))
    return INDEX_NAME, "lm_head.weight"


def break_truncated_shard(d: Path) -> tuple[str, ...]:
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    return victim.name, "truncated"


def break_garbage_header(d: Path) -> tuple[str, ...]:
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(struct.pack("<Q", 12) + b"not json at all")
    return victim.name, "header"


def break_wrong_shape(d: Path) -> tuple[str, ...]:
    name = "model.layers.2.self_attn.k_proj.weight"
    fname = json.loads((d / INDEX_NAME).read_text())["weight_map"][name]
    tensors = load_file(d / fname)
    tensors[name] = torch.zeros(TINY.head_dim * TINY.num_key_value_heads + 16, TINY.hidden_size)
    save_file(tensors, d / fname)
    return fname, name, "config.json implies"


def break_unknown_tensor(d: Path) -> tuple[str, ...]:
    fname = sorted(d.glob("model-*.safetensors"))[0].name
    tensors = load_file(d / fname)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(TINY.hidden_size)
    save_file(tensors, d / fname)
    edit_json(d / INDEX_NAME, lambda i: i["weight_map"].update(
        {"model.layers.0.self_attn.q_proj.bias": fname}))
    return fname, "model.layers.0.self_attn.q_proj.bias"


def break_history(d: Path) -> tuple[str, ...]:
    (d / "growth.json").write_text('{"format_version": 1, "events": "oops"}')
    return "growth.json", "events"


BREAKERS = [break_missing_field, break_ill_typed_field, break_missing_shard,
            break_tensor_left_out_of_index, break_index_points_at_wrong_shard, break_truncated_shard,
            break_garbage_header, break_wrong_shape, break_unknown_tensor, break_history]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[6:] for b in BREAKERS])
def test_grow_info_bad_checkpoint_in_process(tmp_path, capsys, breaker):
    d = sharded_tiny(tmp_path)
    rc, _, err = grow_in_process(capsys, "info", d)
    assert rc == 0, err
    needles = breaker(d)
    rc, out, err = grow_in_process(capsys, "info", d)
    assert out == ""
    assert_one_line_error(rc, err, *needles)
    assert err.startswith("grow: error: ")


@pytest.mark.slow
def test_grow_info_bad_checkpoint_subprocess(tmp_path):
    """The same path end to end: a real process, exit code 2, one line, no traceback."""
    d = sharded_tiny(tmp_path)
    needles = break_truncated_shard(d)
    rc, out, err = run_grow("info", d)
    assert rc == 2 and out == ""
    assert_one_line_error(rc, err, *needles)


class _Trap:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
@pytest.mark.parametrize(("fname", "subprocess"), [("pytorch_model.bin", True), ("model.pt", False)])
def test_pickle_weights_are_refused_never_unpickled(tmp_path, capsys, fname, subprocess):
    d = tmp_path / "pickled"
    d.mkdir()
    TINY.save(d)
    marker = tmp_path / "UNPICKLED"
    (d / fname).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Trap(marker)}))
    pickle.loads((d / fname).read_bytes()).clear()  # the trap works …
    assert marker.exists()
    marker.unlink()
    # … and grow info never springs it
    rc, out, err = run_grow("info", d) if subprocess else grow_in_process(capsys, "info", d)
    assert_one_line_error(rc, err, fname, "pickle")
    assert not marker.exists()


def test_grow_info_checkpoint_json(tmp_path, capsys):
    d = sharded_tiny(tmp_path)
    rc, out, err = grow_in_process(capsys, "info", d, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["kind"] == "checkpoint" and info["params"] == TINY.params
    assert info["dtypes"] == {"float32": len(TINY.tensor_shapes())}
    assert info["tensor_bytes"] == 4 * TINY.params
    assert sum(s["tensors"] for s in info["shards"]) == len(TINY.tensor_shapes())
    assert {s["file"] for s in info["shards"]} == {p.name for p in d.glob("model-*.safetensors")}
    assert [e["kind"] for e in info["history"]["events"]] == ["init"]
    rc, out, err = grow_in_process(capsys, "info", d)
    assert rc == 0 and "model-00001-of-" in out and "init: seed=0, config=custom" in out


# ---------------------------------------------------------------------- grow init
def test_init_deterministic_and_seeded(tmp_path):
    for name, seed, shard in (("a", 5, "5GB"), ("b", 5, "5GB"), ("c", 6, "5GB"), ("d", 5, "200KB")):
        init_checkpoint(TINY, tmp_path / name, seed=seed, max_shard_size=shard)
    a, b = (tmp_path / n / WEIGHTS_NAME for n in "ab")
    assert a.read_bytes() == b.read_bytes()  # same seed → identical bytes
    assert a.read_bytes() != (tmp_path / "c" / WEIGHTS_NAME).read_bytes()
    # The values depend on (seed, name) only, not on how the shards fall.
    with CheckpointReader(tmp_path / "a") as ra, CheckpointReader(tmp_path / "d") as rd:
        assert len(rd.files) > 1
        for name in ra.names():
            assert torch.equal(ra.get(name), rd.get(name)), name


@pytest.mark.slow
def test_init_cli_bf16_and_history(tmp_path):
    rc, out, err = run_grow("init", "tiny", "--out", tmp_path / "c", "--seed", "7", "--dtype", "bfloat16")
    assert rc == 0, err
    assert "235,072 params" in out
    with CheckpointReader(tmp_path / "c") as reader:
        assert reader.dtypes == {torch.bfloat16}
        assert reader.config == TINY
        (event,) = reader.history["events"]
    assert (event["kind"], event["seed"], event["config"], event["dtype"]) == ("init", 7, "tiny", "bfloat16")
    ref = init_state_dict(TINY, seed=7, dtype=torch.bfloat16)
    assert torch.equal(load_file(tmp_path / "c" / WEIGHTS_NAME)["lm_head.weight"], ref["lm_head.weight"])


def test_init_cli_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    rc, _, err = grow_in_process(capsys, "init", "tiny", "--out", out)
    assert_one_line_error(rc, err, str(out), "not empty")
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "do not touch"
    rc, _, err = grow_in_process(capsys, "init", "tiny", "--out", tmp_path / "x", "--max-shard-size", "lots")
    assert_one_line_error(rc, err, "lots")
    assert leftovers(tmp_path, {"taken"}) == []


def test_init_failure_leaves_nothing(tmp_path, monkeypatch):
    import growth.init

    real = growth.init.init_tensor
    calls = []

    def flaky(config, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 25:
            raise OSError(28, "No space left on device")
        return real(config, name, *args, **kwargs)

    monkeypatch.setattr(growth.init, "init_tensor", flaky)
    with pytest.raises(OSError):
        init_checkpoint(TINY, tmp_path / "c", max_shard_size=60_000)
    assert leftovers(tmp_path, set()) == []


def test_init_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    """When a piece is written, at most DEPTH pieces beyond it have been generated (the
    writer streams tensor by tensor through a pipeline holding at most DEPTH pieces, so this
    holds for every tensor written)."""
    import growth.init
    from growth import pipeline

    generated: list[str] = []
    written: list[str] = []
    real_init, real_write = growth.init.init_tensor, pipeline.WritePipeline._write

    def counting_init(config, name, *args, **kwargs):
        generated.append(name)
        return real_init(config, name, *args, **kwargs)

    def checking_write(self, item):
        if item.last:
            written.append(item.piece.name)
            assert len(generated) - len(written) <= pipeline.DEPTH
        return real_write(self, item)

    monkeypatch.setattr(growth.init, "init_tensor", counting_init)
    monkeypatch.setattr(pipeline.WritePipeline, "_write", checking_write)
    init_checkpoint(TINY, tmp_path / "c", max_shard_size=100_000)
    assert written == generated == list(TINY.tensor_shapes())
