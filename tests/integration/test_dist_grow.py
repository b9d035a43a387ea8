"""The growth at a stage boundary (stages.launch.dist_grow, stages.launch.prepare.grow_into), no training.

``positions: distance`` is measured once, by node 0's ``plan_stage`` (it reads every layer
matrix of the parent); the growth processes — torchrun ranks of a multi-node stage, or the
``stage.growth.workers`` spawned on one node — then get explicit indices and read each
tensor only to grow it. Reads are counted in every process by a seam that logs each
``CheckpointReader.get`` and still reads from disk (tests/readcount). Outputs are
compared byte for byte with a single-process ``grow apply``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from flmcore.params import LAYER_PARAMS
from growth.config import get_flavor
from growth.init import init_checkpoint
from stages.schema import GrowthCfg, StageCfg, TrainConfig
from stages.validate import validate
from tests.conftest import grow_in_process
from tests.helpers.ds_helpers import REPO, free_port
from tests.helpers.readcount.counter import install, reads
from tests.integration.test_grow_apply import EPOCH, write_moments

SRC_LAYERS, DST_LAYERS = 4, 7  # tiny (4 layers) → 3 new layers placed by the distance rule


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def block_matrices(layers: int) -> set[str]:
    return {p.name(j) for j in range(layers) for p in LAYER_PARAMS if p.is_block_matrix}


def growing_reads(src: Path, target: Path, positions: list[int]) -> Counter[str]:
    """Source tensor → the grown tensors made from it (one read each), from the plan alone."""
    from growth.checkpoint import CheckpointReader
    from growth.config import resolve_config
    from operators import GrowthSpec, make_plan

    spec = GrowthSpec.from_strategy("zero", positions=positions)
    plan = make_plan(CheckpointReader(src).config, resolve_config(str(target)), spec)
    return Counter(op.src_name for op in plan.tensor_ops() if op.src_name)


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint with Adam moments (3 shards to write: weights, exp_avg, exp_avg_sq)
    and a deeper target config.json."""
    root = tmp_path_factory.mktemp("dist-grow")
    config = get_flavor("tiny")
    src = init_checkpoint(config, root / "parent", seed=3, source="tiny")
    write_moments(src, config)
    target = root / "deep" / "config.json"
    target.parent.mkdir()
    target.write_text(json.dumps(config.replace(num_hidden_layers=DST_LAYERS).to_hf_dict()))
    return src, target


@pytest.fixture
def counted(tmp_path, monkeypatch) -> Path:
    """Reads of this process and of every process it starts go to the returned log."""
    log = tmp_path / "reads.log"
    monkeypatch.setenv("FLM_TEST_READ_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests" / "helpers" / "readcount"), str(REPO)]))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    install(log)
    return log


def stage_config(run_dir: Path, src: Path, target: Path, **fields) -> TrainConfig:
    stage = StageCfg(name="deep", model=str(target), init_from=str(src),
                     growth=GrowthCfg(strategy="zero", positions="distance", workers=fields.pop("workers", 1)))
    return validate(TrainConfig(stage=stage, run_dir=str(run_dir), **fields))


class Published:
    """Node 0's side of the coordinator: what grow_on_all_nodes tells the other nodes."""

    def __init__(self):
        self.messages: dict[str, dict] = {}

    def publish(self, key: str, message: dict) -> None:
        self.messages[key] = message


@pytest.mark.slow
def test_distance_positions_on_two_ranks_equal_grow_apply_and_the_layers_are_read_once(parent, counted, tmp_path,
                                                                                       capsys):
    from stages.launch.dist_grow import grow_on_all_nodes
    from stages.launch.plan import plan_stage

    src, target = parent
    ref = tmp_path / "ref"
    rc, _, err = grow_in_process(capsys, "apply", "--from", src, "--to", target, "--out", ref, "--strategy", "zero",
                                 "--positions", "distance", "--quiet")
    assert rc == 0, err
    ref_reads = reads(counted, src)
    assert all(ref_reads[n] >= 2 for n in block_matrices(SRC_LAYERS)), ref_reads  # distance, copy (the CLI: 3)
    counted.unlink()

    cfg = stage_config(tmp_path / "run", src, target, nproc=2, master_port=free_port(), local_addr="127.0.0.1")
    plan = plan_stage(cfg)  # node 0: the shape check measures the distances (the one read)
    coord = Published()
    grow_on_all_nodes(plan, coord)  # and this node's ranks: torchrun --nnodes 1 --nproc-per-node 2
    out = plan.layout.init

    mine = reads(counted, src, pid=os.getpid())
    assert mine == {n: 1 for n in block_matrices(SRC_LAYERS)}  # every layer matrix once, nothing else
    ranks = reads(counted, src, other_than=os.getpid())
    assert ranks == growing_reads(src, target, plan.new_layers)  # only to grow them, none for the positions
    job = coord.messages["ready"]["grow"]
    ref_event = json.loads((ref / "growth.json").read_text())["events"][-1]
    new = [i for i, e in enumerate(ref_event["layer_map"]) if e["new"]]
    assert job["spec"]["positions"] == new == plan.new_layers and len(new) == DST_LAYERS - SRC_LAYERS
    assert len(ref_event["layer_distances"]) == SRC_LAYERS - 1  # the distance rule picked them

    a, b = hashes(out), hashes(ref)
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(".safetensors")]) == 3
    assert {k: v for k, v in a.items() if k != "growth.json"} == {k: v for k, v in b.items() if k != "growth.json"}
    event = json.loads((out / "growth.json").read_text())["events"][-1]
    assert event["layer_map"] == ref_event["layer_map"] and event["operators"] == ref_event["operators"]
    assert {**event["spec"], "positions": "distance"} == ref_event["spec"]  # the history has the indices
    assert plan.distances == pytest.approx(ref_event["layer_distances"], rel=1e-12)


@pytest.mark.slow
def test_growth_workers_2_on_one_node_write_the_same_bytes_as_1(parent, counted, tmp_path):
    from stages.launch.plan import plan_stage
    from stages.launch.prepare import grow_into

    src, target = parent
    outs = []
    for workers in (1, 2):
        counted.unlink(missing_ok=True)
        plan = plan_stage(stage_config(tmp_path / f"w{workers}", src, target, workers=workers))
        grow_into(plan)
        outs.append(plan.layout.init)
        if workers == 2:  # the spawned workers read each source tensor once, none for the positions
            spawned = reads(counted, src, other_than=os.getpid())
            assert spawned == growing_reads(src, target, plan.new_layers)
            assert reads(counted, src, pid=os.getpid()) == {n: 1 for n in block_matrices(SRC_LAYERS)}
    one, two = map(hashes, outs)
    assert len([k for k in one if k.endswith(".safetensors")]) == 3
    assert one == two  # growth.json included (SOURCE_DATE_EPOCH)
    assert dataclasses.asdict(plan.cfg.stage.growth)["workers"] == 2
