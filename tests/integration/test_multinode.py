"""Multi-node stages on localhost "nodes": two ``train-stage`` processes, one rendezvous.

Real torchrun (c10d) and DeepSpeed on CPU (gloo over loopback), a shared run dir, the
coordinator's config check (stages.launch.multinode), the SLURM script (stages.launch.slurm) run
under a stand-in ``srun`` that starts the node commands locally, and distributed growth
at the stage boundary (stages.launch.dist_grow). Losses are compared with one node's at 1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.launch.multinode import config_hash
from stages.schema import StageConfigError, TrainConfig
from stages.validate import validate
from tests.conftest import assert_one_line_error
from tests.helpers.ds_helpers import REPO, free_port, read_log, read_summary, shared_run

REL = 1e-6
# tests.helpers.ds_helpers.TINY_STAGE and DATA_CFG as overrides of stage=tiny_s1 (checked below)
TINY = ["stage=tiny_s1", "stage.steps=20", "stage.micro_batch_size=4", "stage.grad_accum=1", "stage.seq_len=32",
        "stage.lr=3e-3", "stage.warmup_steps=2", "stage.eval_batches=2", "stage.save_every=10",
        "stage.ramp_steps=5", "data.eval_fraction=0.1", "data.max_bytes=300000"]
PIPE = ["deepspeed=pipe", "deepspeed.activation_checkpointing=true", "stage.micro_batch_size=2",
        "stage.grad_accum=2"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def train_stage(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", *overrides]


def nodes(run_dir: Path, overrides: list[str], nnodes: int = 2, only: tuple[int, ...] | None = None,
          extra: dict[int, list[str]] | None = None, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``train-stage`` once per node rank (all at once), as a cluster would run them."""
    port = free_port()
    procs = []
    for k in only if only is not None else range(nnodes):
        cmd = train_stage(*overrides, f"run_dir={run_dir}", "nproc=1", f"nnodes={nnodes}", f"node_rank={k}",
                          "master_addr=127.0.0.1", f"master_port={port}", "local_addr=127.0.0.1",
                          *(extra or {}).get(k, []))
        procs.append((cmd, subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)))
    out = []
    for cmd, proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return out


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= REL * abs(b["loss"]), (a, b)


def stage_fields(stage_dir: Path) -> dict:
    stage = json.loads((stage_dir / "stage_config.json").read_text())["stage"]
    stage.pop("name")
    return stage


# ---------------------------------------------------------------------- no processes
def test_a_multinode_launch_needs_master_port():
    from stages.launch.multinode import MultiNodeError, run_multinode

    validate(TrainConfig(nnodes=112))  # composes and checks (a dry run needs no port)
    with pytest.raises(MultiNodeError, match="nnodes=2 needs master_port"):
        run_multinode(TrainConfig(nnodes=2))


def test_config_hash_ignores_only_the_per_node_fields():
    base = TrainConfig(nnodes=2, master_port=29400)
    assert config_hash(base) == config_hash(TrainConfig(nnodes=2, master_port=29400, node_rank=1,
                                                        local_addr="10.0.0.2"))
    other = TrainConfig(nnodes=2, master_port=29400)
    other.stage.lr = 1e-3
    assert config_hash(other) != config_hash(base)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"nnodes": 2, "master_port": 29400, "node_rank": 2}, "field 'node_rank' (2) must be below nnodes (2)"),
    ({"launcher": "ssh"}, "field 'launcher' must be one of local, slurm, print"),
    ({"rdzv_timeout": 0}, "field 'rdzv_timeout' must be positive"),
    ({"max_restarts": -1}, "field 'max_restarts' must be >= 0"),
])
def test_scale_fields_are_checked(fields, needle):
    with pytest.raises(StageConfigError) as info:
        validate(TrainConfig(**fields))
    assert needle in str(info.value)


# ---------------------------------------------------------------------- coordinator only (no workers)
@pytest.mark.slow
def test_a_node_that_never_starts_is_a_one_line_error_within_the_timeout(tmp_path):
    start = time.monotonic()
    node0, = nodes(tmp_path / "run", [*TINY, "rdzv_timeout=5"], only=(0,), timeout=120)
    assert_one_line_error(node0.returncode, node0.stderr, "node(s) 1 did not join at 127.0.0.1:",
                          "within rdzv_timeout=5 s")
    assert time.monotonic() - start < 5 + 60  # the timeout plus interpreter, torch and Hydra start-up
    node1, = nodes(tmp_path / "run", [*TINY, "rdzv_timeout=3"], only=(1,), timeout=120)
    assert_one_line_error(node1.returncode, node1.stderr, "node 1: node 0 did not answer at 127.0.0.1:")
    assert not (tmp_path / "run" / "tiny_s1" / "ds_ckpt").exists()


@pytest.mark.slow
def test_nodes_with_different_configs_refuse_to_start(tmp_path):
    results = nodes(tmp_path / "run", [*TINY, "rdzv_timeout=60"], extra={1: ["stage.lr=1e-3"]}, timeout=180)
    for proc in results:
        assert_one_line_error(proc.returncode, proc.stderr, "node 1 composed another config than node 0",
                              "'stage.lr' is 0.001 there, 0.003 on node 0")
    assert not (tmp_path / "run" / "tiny_s1" / "stage_config.json").exists()


@pytest.mark.slow
def test_print_launcher_prints_one_command_per_node(tmp_path):
    proc = subprocess.run(train_stage(*TINY, f"run_dir={tmp_path}", "launcher=print", "nnodes=2",
                                      "master_addr=node-a", "master_port=29400"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("node ")]
    assert len(lines) == 2
    for k, line in enumerate(lines):
        assert f"node_rank={k}" in line and "master_addr=node-a" in line and "launcher=local" in line
        assert "stage.steps=20" in line and "launcher=print" not in line
    assert not (tmp_path / "tiny_s1").exists()


# ---------------------------------------------------------------------- real multi-node runs
def stand_in_slurm(bin_dir: Path, log_dir: Path) -> dict[str, str]:
    """``srun`` that starts the command once per node here (SLURM_NODEID set), ``scontrol``
    that names this host; returns the job environment sbatch would give the script."""
    bin_dir.mkdir()
    log_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/bin/bash
# stand-in for srun: one local task per node, SLURM_NODEID set, each task's output in a file
while [[ "$1" == --* ]]; do shift; done
n=$(ls {log_dir} | grep -c node0)
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" > {log_dir}/srun$n.node$i.log 2>&1 &
  pids+=($!)
done
rc=0
for p in "${{pids[@]}}"; do wait "$p" || rc=$?; done
exit $rc
""")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return dict(env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_NNODES="2",
                SLURM_JOB_NODELIST="node[0-1]", SLURM_JOB_ID="1")


# All three tiny stages, two growths (zero, then masked with its MSG ramp), 3 steps each: what
# costs here is starting processes (≈ 10 per stage on 2 nodes), not steps.
STAGES = ("tiny_s1", "tiny_s2", "tiny_s3")
SCHEDULE = ["-m", "schedule=tiny", "stage.steps=3", "stage.seq_len=16", "stage.micro_batch_size=2",
            "stage.eval_batches=2", "stage.save_every=0", "stage.rewarm_steps=1", "stage.warmup_steps=1",
            "stage.ramp_steps=2", "data.max_bytes=100000"]


@pytest.mark.slow
def test_schedule_on_two_nodes_from_the_sbatch_script_matches_one_node(tmp_path):
    """The tiny schedule's three stages, the growths between them, as launch.sbatch runs
    them on 2 nodes × 1 rank (stand-in srun), against the same schedule on 1 node × 2 ranks."""
    one, two = tmp_path / "one", tmp_path / "two"
    # The 1 node × 2 ranks reference runs alongside: each run is mostly process start-up,
    # under one core on average, so on 2 cores the pair takes little more than the slower one.
    with open(tmp_path / "one.log", "w") as out:
        reference = subprocess.Popen(train_stage(*SCHEDULE, f"run_dir={one}", "nproc=2"), cwd=REPO, env=env(),
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        run_two_nodes(tmp_path, two)
        assert reference.wait(timeout=900) == 0, (tmp_path / "one.log").read_text()[-4000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    for name in STAGES:
        assert_same_losses(read_log(two / name), read_log(one / name))
        a, b = read_summary(two / name), read_summary(one / name)
        assert a["world_size"] == b["world_size"] == 2
        for key in ("eval_loss_start", "eval_loss_end"):
            assert a[key] == pytest.approx(b[key], rel=REL), (name, key)
        assert (two / name / "train.node1.log").is_file()
    assert read_summary(two / "tiny_s3")["eval_loss_start"] == pytest.approx(
        read_summary(two / "tiny_s2")["eval_loss_end"], abs=1e-4)  # both growths exact, on 2 nodes too


def run_two_nodes(tmp_path: Path, two: Path) -> None:
    """``train-stage launcher=slurm`` writes launch.sbatch; bash runs it under the stand-in srun."""
    port = free_port()
    proc = subprocess.run(train_stage(*SCHEDULE, f"run_dir={two}", "nproc=1", "nnodes=2", "launcher=slurm",
                                      f"master_port={port}", "local_addr=127.0.0.1"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = two / "launch.sbatch"
    assert f"sbatch {script}" in proc.stdout and f"sbatch {two / 'tiny_s2' / 'launch.sbatch'}" in proc.stdout
    assert f"sbatch {two / 'tiny_s3' / 'launch.sbatch'}" in proc.stdout
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert text.index("stage=tiny_s1") < text.index("stage=tiny_s2") < text.index("stage=tiny_s3")
    assert text.count("srun ") == 3
    assert not (two / "tiny_s1" / "stage_config.json").exists()  # nothing ran yet

    job_env = stand_in_slurm(tmp_path / "bin", tmp_path / "srun-logs")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(script)], cwd=REPO, env=job_env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)
    logs = {p.name: p.read_text() for p in sorted((tmp_path / "srun-logs").iterdir())}
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(f"== {k}\n{v[-3000:]}" for k, v in logs.items())
    print(f"2-node schedule: {time.monotonic() - start:.0f} s (machine shared with other jobs)")
    assert len(logs) == 6  # 3 stages × 2 nodes
    assert "node 1 of 2 joined node 0" in logs["srun1.node1.log"]

    for k, name in enumerate(STAGES[1:], start=1):
        assert "growing" in logs[f"srun{k}.node0.log"] and "on 2 nodes × 1 ranks" in logs[f"srun{k}.node0.log"]
        assert "-m stages.launch.dist_grow" in (two / name / "train.node1.log").read_text()  # node 1 grew too


@pytest.mark.slow
def test_pipe_stage_0_and_1_on_two_nodes_match_one_node():
    want = shared_run("pipe")
    run_dir = want.parent / "multinode-pipe"
    results = nodes(run_dir, [*TINY, *PIPE, "stage.name=pipe2"])
    for proc in results:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stage_dir = run_dir / "pipe2"
    mine, theirs = stage_fields(stage_dir), stage_fields(want)
    assert mine == theirs  # the same stage as the shared 1 node × 2 ranks run, only launched differently
    assert_same_losses(read_log(stage_dir), read_log(want))
    summary = read_summary(stage_dir)
    assert summary["world_size"] == 2 and summary["pipeline"]
    assert summary["eval_loss_end"] == pytest.approx(read_summary(want)["eval_loss_end"], rel=REL)
