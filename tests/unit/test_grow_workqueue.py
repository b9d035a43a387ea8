"""Work dealt by bytes (growth.workqueue): balanced shares on the 1.3B → 2.3B plan, the same
bytes whatever the worker count, and split shards resumed part by part."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from growth.config import ModelConfig
from growth.executor import ApplyRequest, finalize, open_staging, prepare, shard_tasks, write_shards
from growth.parallel import apply_growth
from growth.workqueue import WORK_DIR, reset_claims, simulate_shares, work_items
from operators import GrowthSpec
from tests.helpers.grow_golden import make_source, shard_hashes

# benchmarks/gpu_stage.py's ~1.3B Tele-FLM and its ~2.3B growth (shapes only: no weights)
MODEL_1B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=20, num_attention_heads=16,
                head_dim=128, vocab_size=80384)
GROWN_2B = dict(MODEL_1B, hidden_size=2560, intermediate_size=6880, num_hidden_layers=24, num_attention_heads=20)


@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_largest_share_within_a_quarter_of_the_mean_on_the_2b_plan(world):
    """bf16 weights + fp32 Adam moments in 5 GiB shards: 5 shards, but every worker's bytes
    stay within 1.25× the mean (dealt by shard index, one worker wrote 2 of the 5)."""
    grown = ModelConfig(**GROWN_2B)
    tasks = shard_tasks(grown, torch.bfloat16, 5 * 1024**3)
    for kind in ("exp_avg", "exp_avg_sq"):
        tasks += shard_tasks(grown, torch.float32, 5 * 1024**3, f"optimizer/{kind}/", kind)
    assert len(tasks) == 5
    items = work_items(tasks, world)
    assert sum(i.nbytes for i in items) == sum(t.nbytes for t in tasks)
    shares = simulate_shares(items, world)
    assert max(shares) <= 1.25 * sum(shares) / world, shares
    by_index = [sum(t.nbytes for k, t in enumerate(tasks) if k % world == r) for r in range(world)]
    assert world < 4 or max(by_index) > 1.25 * sum(by_index) / world  # what the old dealing did


def test_one_worker_writes_whole_shards():
    tasks = shard_tasks(ModelConfig(**GROWN_2B), torch.bfloat16, 5 * 1024**3)
    assert all(i.whole for i in work_items(tasks, 1))


def run_workers(request: ApplyRequest, world: int, finish: bool = True) -> int:
    """The queue with ``world`` workers as threads of this process (the spawned and torchrun
    workers run the same write_shards); ``finish=False``: stop without finalising, keeping
    the staging dir as a kill would. Returns the items written."""
    job = prepare(request)
    counts = [0] * world
    with open_staging(job) as writer:
        reset_claims(job.staging)
        # each worker its own job (its own source readers), as each process has
        jobs = [job] + [prepare(request, check_out=False) for _ in range(world - 1)]
        threads = [threading.Thread(target=lambda r=r: counts.__setitem__(r, write_shards(jobs[r], r, world)))
                   for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if finish:
            finalize(job, writer)
        else:
            writer.abort(keep=True)
    return sum(counts)


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split the tiny test shards too (real parts are at least 64 MiB)."""
    from growth import workqueue

    monkeypatch.setattr(workqueue, "MIN_PART", 1)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("wq"))


def request_for(source: Path, out: Path) -> ApplyRequest:
    """tiny-s1 + moments → tiny-s2 in 1 MB shards: 5 shards, split into parts for ≥ 2 workers."""
    return ApplyRequest(str(source), "tiny-s2", GrowthSpec.from_strategy("zero", seed=5).to_dict(), str(out),
                        dtype="bfloat16", max_shard_size=1_000_000)


def test_workers_1_2_4_write_identical_bytes(source, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    apply_growth(request_for(source, tmp_path / "w1"))
    reference = shard_hashes(tmp_path / "w1")
    assert len(reference) == 7  # 5 shards + 2 indexes
    for world in (2, 4):
        job = prepare(request_for(source, tmp_path / f"w{world}"))
        assert sum(not i.whole for i in work_items(job.tasks, world)) >= world  # split shards
        run_workers(request_for(source, tmp_path / f"w{world}"), world)
        assert shard_hashes(tmp_path / f"w{world}") == reference, world
        assert not any(p.name == WORK_DIR for p in (tmp_path / f"w{world}").rglob("*"))
    full = {p.relative_to(tmp_path / "w1").as_posix(): hashlib.sha256(p.read_bytes()).digest()
            for p in (tmp_path / "w1").rglob("*") if p.is_file()}
    assert full == {p.relative_to(tmp_path / "w4").as_posix(): hashlib.sha256(p.read_bytes()).digest()
                    for p in (tmp_path / "w4").rglob("*") if p.is_file()}


def test_split_shards_resume_part_by_part(source, tmp_path, monkeypatch):
    """Workers stopped after half the items (as if killed): the rerun writes only the rest,
    keeps every finished part (and seals shards whose parts were all done), and the output
    is byte-identical to an uninterrupted run."""
    from growth import shardwork as executor

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    request = request_for(source, tmp_path / "out")
    total = len(work_items(prepare(request).tasks, 2))
    original, taken, lock = executor.claim, [0], threading.Lock()

    def claim_half(staging: Path, key: str) -> bool:
        with lock:
            if taken[0] >= total // 2 or not original(staging, key):
                return False
            taken[0] += 1
            return True
    monkeypatch.setattr(executor, "claim", claim_half)
    assert run_workers(request, 2, finish=False) == total // 2
    monkeypatch.setattr(executor, "claim", original)
    assert run_workers(request, 2) == total - total // 2
    run_workers(request_for(source, tmp_path / "clean"), 2)
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "clean")
