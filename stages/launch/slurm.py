"""Where a stage's ranks start: here (``launcher=local``, the default), a SLURM job, or your own tool.

``launcher=slurm`` writes ``RUN_DIR/<stage>/launch.sbatch`` — one task per node; each
task runs this same ``train-stage`` command with ``launcher=local``, its ``node_rank``
from ``SLURM_NODEID`` and ``MASTER_ADDR`` = the job's first node, and each node's
train-stage starts its local ranks with torchrun (``stages.launch.multinode``) — and prints the
``sbatch`` line. Inside a schedule (``-m schedule=…``) every job also writes
``RUN_DIR/launch.sbatch``, one script that runs the schedule's stages in order.
``launcher=print`` prints the per-node commands instead. Nothing is planned or trained
here: a schedule's later stages have no parent output yet.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from flmcore.io import write_text_atomic
from growth.runs import StageDir
from stages.launch.multinode import run_multinode
from stages.schema import TrainConfig, fields_where

log = logging.getLogger(__name__)

SBATCH_NAME = "launch.sbatch"
DEFAULT_PORT = 29500  # master_port of a written script when none is set (P, P+1, P+2 are used)
NODE_KEYS = fields_where("launcher_sets", True)  # set per node by the launcher
SLURM_NODE_RANK = "${oc.env:SLURM_NODEID}"  # resolved by each task's own train-stage


def run_elsewhere(cfg: TrainConfig) -> dict[str, Any]:
    """``launcher=slurm|print``, or a local multi-node stage (stages.launch.multinode)."""
    if cfg.launcher == "slurm":
        return write_slurm(cfg)
    if cfg.launcher == "print":
        return print_commands(cfg)

    return run_multinode(cfg)


def user_overrides(drop: tuple[str, ...] = NODE_KEYS) -> list[str]:
    """The command line's overrides (inside a Hydra app), without the per-node keys."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):  # not inside a Hydra app
        return []
    return [o for o in task if o.split("=", 1)[0].lstrip("+~") not in drop]


def node_command(cfg: TrainConfig, node_rank: str, master_addr: str, overrides: list[str]) -> list[str]:
    port = cfg.master_port or DEFAULT_PORT
    return [sys.executable, "-m", "stages.train", *overrides, "launcher=local", f"nnodes={cfg.nnodes}",
            f"node_rank={node_rank}", f"master_addr={master_addr}", f"master_port={port}"]


def print_commands(cfg: TrainConfig) -> dict[str, Any]:
    overrides = user_overrides()
    commands = [node_command(cfg, str(k), cfg.master_addr, overrides) for k in range(cfg.nnodes)]
    print(f"# stage {cfg.stage.name}: run on each of {cfg.nnodes} node(s), from {os.getcwd()}, with the run "
          f"dir on a shared filesystem (master_addr = node 0's address):")
    for k, cmd in enumerate(commands):
        print(f"node {k}: {shlex.join(cmd)}")
    return {"launcher": "print", "commands": [shlex.join(c) for c in commands]}


def sbatch_script(cfg: TrainConfig, stages: list[list[str]], name: str, output: Path) -> str:
    """A batch script: one task per node, one ``srun`` per stage (in order)."""
    from stages.script_text import sbatch_value as q

    lines = ["#!/bin/bash", f"#SBATCH --job-name={q(name)}", f"#SBATCH --nodes={q(cfg.nnodes)}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={q(f'{output}/slurm-%j.out')}",
             "# written by train-stage launcher=slurm: each task runs train-stage for its node, which",
             "# starts the node's ranks with torchrun (rendezvous at $MASTER_ADDR:$MASTER_PORT+1).",
             "set -euo pipefail",
             'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             f"MASTER_PORT={q(cfg.master_port or DEFAULT_PORT)}",
             f"cd {shlex.quote(os.getcwd())}"]
    for overrides in stages:
        cmd = node_command(cfg, SLURM_NODE_RANK, "MASTER_ADDR_", overrides)
        text = shlex.join(cmd).replace("master_addr=MASTER_ADDR_", 'master_addr="$MASTER_ADDR"')
        text = text.replace(f"master_port={cfg.master_port or DEFAULT_PORT}", 'master_port="$MASTER_PORT"')
        lines.append(f"srun --nodes={cfg.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {text}")
    return "\n".join(lines) + "\n"


def write_slurm(cfg: TrainConfig) -> dict[str, Any]:

    run_dir = Path(cfg.run_dir).expanduser().resolve()
    layout = StageDir.of(run_dir, cfg.stage.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    overrides = user_overrides()
    script = layout.root / SBATCH_NAME
    write_text_atomic(script, sbatch_script(cfg, [overrides], f"flm-{cfg.stage.name}", layout.root), mode=0o755)
    out: dict[str, Any] = {"launcher": "slurm", "script": str(script)}
    print(f"stage {cfg.stage.name}: wrote {script} ({cfg.nnodes} node(s) × {cfg.nproc} rank(s)); submit it "
          f"with: sbatch {shlex.quote(str(script))}")
    if cfg.schedule.stages:
        rest = [o for o in user_overrides(NODE_KEYS + ("stage", "hydra.mode")) if o]
        per_stage = [[*rest, f"stage={name}", "hydra.mode=RUN"] for name in cfg.schedule.stages]
        whole = run_dir / SBATCH_NAME
        write_text_atomic(whole, sbatch_script(cfg, per_stage, f"flm-{cfg.schedule.name}", run_dir), mode=0o755)
        out["schedule_script"] = str(whole)
        print(f"schedule {cfg.schedule.name}: wrote {whole} (stages {', '.join(cfg.schedule.stages)} in order); "
              f"submit it with: sbatch {shlex.quote(str(whole))}")
    return out

