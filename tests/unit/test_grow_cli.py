"""`grow plan`, `grow verify`, `grow inspect`, `grow export-hf` on tiny checkpoints and on
the real flavors (plans only: no weights are read)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from growth.checkpoint import CheckpointReader, load_model
from growth.cli import main
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.inspect import open_checkpoint
from growth.verify import verify
from tests.conftest import assert_one_line_error


def grow(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def s1(tmp_path: Path) -> Path:
    return init_checkpoint(get_flavor("tiny-s1"), tmp_path / "s1", seed=0, source="tiny-s1")


# ---------------------------------------------------------------------- plan
@pytest.mark.parametrize("src,dst,layers", [("52b", "102b", 80), ("102b", "1t", 140)])
def test_plan_real_flavors_in_seconds(capsys, src, dst, layers):
    start = time.perf_counter()
    rc, out, err = grow(capsys, "plan", "--from", src, "--to", dst, "--json", "--bandwidth", "2GB/s")
    seconds = time.perf_counter() - start
    assert rc == 0, err
    assert seconds < 10, f"plan {src}→{dst} took {seconds:.1f}s"
    report = json.loads(out)
    target = get_flavor(dst)
    assert len(report["tensors"]) == len(target.tensor_shapes())
    assert report["summary"]["layers"] == [get_flavor(src).num_hidden_layers, layers]
    assert report["bytes_written"] == sum(r["bytes_written"] for r in report["tensors"])
    assert report["bytes_written"] == report["summary"]["to_params"] * 2  # bf16
    assert math.isclose(report["seconds_at_bandwidth"],
                        (report["bytes_read"] + report["bytes_written"]) / 2e9)
    # The bound: 1.5 GB + 3x the largest target tensor (bf16). Big tensors are grown
    # in row blocks, so the estimate is the source tensor plus a few blocks, far below it.
    largest = max(math.prod(shape) for shape in target.tensor_shapes().values()) * 2
    assert 1024**3 < report["peak_memory_bytes"] < 1.5e9 + 3 * largest
    rc, text, _ = grow(capsys, "plan", "--from", src, "--to", dst)
    assert rc == 0 and "peak" in text and "lm_head.weight" in text


def test_plan_of_a_checkpoint_matches_apply(tmp_path, capsys, s1):
    rc, out, err = grow(capsys, "plan", "--from", s1, "--to", "tiny-s2", "--json", "--max-shard-size", "100KB")
    assert rc == 0, err
    report = json.loads(out)
    assert report["source_dtype"] == "float32" and report["bytes_read"] >= CheckpointReader(s1).total_bytes
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                      "--max-shard-size", "100KB")
    assert rc == 0, err
    grown = CheckpointReader(tmp_path / "g")
    assert grown.total_bytes == report["bytes_written"] and len(grown.files) == report["shards"]


def test_plan_refuses_bad_strategy_combination(capsys):
    rc, _, err = grow(capsys, "plan", "--from", "tiny-s1", "--to", "tiny-s2", "--hidden", "clone")
    assert_one_line_error(rc, err, "hidden")


# ---------------------------------------------------------------------- apply output
def test_apply_verbose_lists_every_tensor_and_records_history(tmp_path, capsys, s1):
    rc, out, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                        "--verbose", "--seed", "3")
    assert rc == 0, err
    lines = [line for line in (out + err).splitlines() if line.startswith("weight ")]
    assert len(lines) == len(get_flavor("tiny-s2").tensor_shapes())
    history = json.loads((tmp_path / "g" / "growth.json").read_text())
    event = history["events"][-1]
    assert event["kind"] == "grow" and event["seed"] == 3 and event["spec"]["hidden"] == "zero"
    assert event["parent"]["fingerprint"] == CheckpointReader(s1).fingerprint()
    assert [e["kind"] for e in history["events"]] == ["init", "grow"]


# ---------------------------------------------------------------------- verify
@pytest.mark.parametrize("strategy,target", [("zero", "tiny-s2"), ("masked", "tiny-s2"),
                                             ("clone", "tiny-s3")])
def test_verify_exact_strategies_streaming_equals_memory(tmp_path, capsys, s1, strategy, target):
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", target, "--out", tmp_path / "g",
                      "--strategy", strategy)
    assert rc == 0, err
    memory = verify(s1, tmp_path / "g", tokens=96, seq_len=32, streaming=False)
    streaming = verify(s1, tmp_path / "g", tokens=96, seq_len=32, streaming=True)
    assert memory.passed and streaming.passed
    assert memory.mode == "memory" and streaming.mode == "streaming"
    assert memory.max_abs_logit_diff == streaming.max_abs_logit_diff
    assert memory.loss_grown == streaming.loss_grown
    assert (memory.grown_c == 0.0) == (strategy == "masked")


def test_verify_fails_on_copy_depth_and_reports_json(tmp_path, capsys, s1):
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                      "--depth", "copy")
    assert rc == 0, err
    rc, out, _ = grow(capsys, "verify", s1, tmp_path / "g", "--json", "--tokens", "64", "--seq-len", "32")
    assert rc == 1
    result = json.loads(out)
    for key in ("max_abs_logit_diff", "loss_source", "loss_grown", "tolerance", "passed"):
        assert key in result
    assert result["passed"] is False and result["max_abs_logit_diff"] > 0


def test_verify_masked_runs_at_stored_c(tmp_path, capsys, s1):
    assert grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                "--strategy", "masked", "--init-std", "0.5")[0] == 0
    config_path = tmp_path / "g" / "config.json"
    config = json.loads(config_path.read_text())
    config["growth_mask"]["c"] = 0.5
    config_path.write_text(json.dumps(config))
    rc, out, _ = grow(capsys, "verify", s1, tmp_path / "g", "--json", "--tokens", "64", "--seq-len", "32")
    result = json.loads(out)
    assert result["grown_c"] == 0.5 and rc == 1 and not result["passed"]


def test_verify_given_token_ids(tmp_path, capsys, s1):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6\n7 8 9 10 11 12\n")
    rc, out, err = grow(capsys, "verify", s1, s1, "--token-ids", ids, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert (result["batch"], result["seq_len"]) == (2, 5) and result["max_abs_logit_diff"] == 0.0


# ---------------------------------------------------------------------- inspect
def test_inspect_library_and_cli(tmp_path, capsys, s1):
    assert grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                "--strategy", "masked")[0] == 0
    with open_checkpoint(tmp_path / "g") as ck:
        rows = ck.tensors()
        assert [r.name for r in rows] == list(get_flavor("tiny-s2").tensor_shapes())
        assert ck.c == 0.0 and ck.mask["hidden_size"] == 64
        assert ck.dtypes == {"float32": len(rows)}
        name = "model.layers.0.mlp.down_proj.weight"
        t = CheckpointReader(tmp_path / "g").get(name).double()
        stats = ck.stats(name)
        assert math.isclose(stats.rms, t.square().mean().sqrt().item(), rel_tol=1e-9)
        assert math.isclose(stats.absmax, t.abs().max().item())
        assert math.isclose(stats.norm, torch.linalg.norm(t).item(), rel_tol=1e-9)
        assert [e["kind"] for e in ck.history["events"]] == ["init", "grow"]
    rc, out, err = grow(capsys, "inspect", tmp_path / "g", "--json", "--match", "*.o_proj.*")
    assert rc == 0, err
    info = json.loads(out)
    assert info["c"] == 0.0 and {r["name"].split(".")[-2] for r in info["tensors"]} == {"o_proj"}
    assert all("rms" in r for r in info["tensors"])
    rc, text, _ = grow(capsys, "inspect", tmp_path / "g")
    assert rc == 0 and "c = 0" in text and "model.norm.weight" in text


# ---------------------------------------------------------------------- export-hf
def test_export_refuses_live_masks_and_drops_finished_ones(tmp_path, capsys, s1):
    assert grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "g",
                "--strategy", "masked")[0] == 0
    rc, _, err = grow(capsys, "export-hf", tmp_path / "g", "--out", tmp_path / "hf")
    assert_one_line_error(rc, err, "growth_mask.c", "c = 1")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    config_path = tmp_path / "g" / "config.json"
    config = json.loads(config_path.read_text())
    config["growth_mask"]["c"] = 1.0
    config_path.write_text(json.dumps(config))
    rc, _, err = grow(capsys, "export-hf", tmp_path / "g", "--out", tmp_path / "hf")
    assert rc == 0, err
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "growth_mask" not in exported and exported["model_type"] == "llama"
    # at c = 1 the masked model is the plain one: transformers computes our masked model
    transformers = pytest.importorskip("transformers")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "g")
    assert ours.growth_c == 1.0
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids)[..., :259], plain(ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
