"""The pipelined shard writer writes exactly the bytes of the serial one it replaced.

tests/data/grow_golden.json holds the digest of every shard and index ``grow apply`` wrote
for each strategy × dtype (tiny-s1 with Adam moments; the file records the commit of the
serial writer that made it); today's writer must match it for several chunk sizes and
pipeline depths, and with several workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from growth import pipeline
from tests.helpers.grow_golden import DTYPES, STRATEGIES, apply_case, make_source

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "grow_golden.json").read_text())


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_and_dtype_matches_the_serial_writer(strategy, source, tmp_path):
    for dtype in DTYPES:
        got = apply_case(source, tmp_path / dtype, strategy, dtype)
        assert got == GOLDEN["cases"][f"{strategy}/{dtype}"], f"{strategy}/{dtype}"


@pytest.mark.parametrize(("chunk", "depth"), [(1000, 1), (777, 2), (1 << 12, 3)])
def test_chunk_size_and_depth_do_not_change_bytes(chunk, depth, source, tmp_path, monkeypatch):
    """Small chunks split tensors across many cast buffers and pieces; depth 1 is the old
    one-in-flight schedule."""
    monkeypatch.setattr(pipeline, "CHUNK", chunk)
    monkeypatch.setattr(pipeline, "DEPTH", depth)
    monkeypatch.setattr(pipeline, "POOL", pipeline.BufferPool(depth + 1))
    for strategy, dtype in (("zero", "bfloat16"), ("clone", "float16"))[:1 + (depth > 1)]:
        got = apply_case(source, tmp_path / f"{strategy}-{dtype}", strategy, dtype)
        assert got == GOLDEN["cases"][f"{strategy}/{dtype}"], f"{strategy}/{dtype}"


def test_unchanged_copies_pass_through_in_their_dtype(tmp_path):
    """Depth-only growth of a bf16 checkpoint: the tensors the plan copies unchanged are
    written straight from the source's bf16 (no fp32 round trip) — the same values as the
    operator's fp32 path cast back — and the pass-through path is the one taken."""
    import torch

    from growth.checkpoint import CheckpointReader
    from growth.config import get_flavor
    from growth.executor import ApplyRequest, ShardWriter, prepare
    from growth.init import init_checkpoint
    from growth.parallel import apply_growth
    from operators import GrowthSpec

    src = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "s1", seed=0, dtype="bfloat16")
    target = get_flavor("tiny-s1").replace(num_hidden_layers=4)
    target.save(tmp_path)
    request = ApplyRequest(str(src), str(tmp_path / "config.json"), GrowthSpec().to_dict(), str(tmp_path / "out"))
    job = prepare(request)
    writer = ShardWriter(job)
    copies = [op.name for op in job.plan.tensor_ops() if op.operator == "copy"]
    assert len(copies) > 5
    passed = [n for n in copies if next(iter(writer.tensor(n, "weight", torch.bfloat16))).dtype == torch.bfloat16]
    assert passed == copies
    writer.close()
    apply_growth(request)
    with CheckpointReader(tmp_path / "out") as out, CheckpointReader(src) as source:
        for name in out.names():
            expected = job.plan.grow_tensor(name, source.get).to(torch.bfloat16)
            assert torch.equal(out.get(name).view(torch.int16), expected.view(torch.int16)), name
