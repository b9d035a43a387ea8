"""Start the ranks of one stage: ``torchrun … -m <worker_module> SNAPSHOT.json``.

(torchrun as ``stages.launch.torchrun``: the same launcher without its multi-line failure report.)

The workers' output (tqdm bars included) is passed through byte for byte to this
process's stdout and appended to ``STAGE_DIR/train.log``. torchrun runs in its own
session; Ctrl-C, SIGTERM or even SIGKILL of the orchestrator stops it and its ranks, so no
rank outlives the stage that started it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from flmcore.errors import FlmError
from flmcore.process import free_port, run_child
from growth.runs import StageDir
from stages.schema import TrainConfig


class LaunchError(FlmError):
    """The workers exited non-zero; the message names the stage and the log."""


def torchrun_args(cfg: TrainConfig, port: int) -> list[str]:
    """torchrun's options for this node: a c10d rendezvous — on 127.0.0.1:port for one node,
    at master_addr:master_port+1 for ``--nnodes N`` (node ranks by join order) — with
    ``--max-restarts`` and the rendezvous timeout.

    Note: c10d, not the static backend, even for one node, and the ranks' store is not the
    agents' (``worker_env``): a store that outlives an attempt still holds the dead group's
    keys, and the restarted ranks try to reach their dead peers' old gloo addresses.
    """

    endpoint = f"127.0.0.1:{port}" if cfg.nnodes == 1 else f"{cfg.master_addr}:{cfg.master_port + 1}"
    args = ["--nnodes", str(cfg.nnodes), "--nproc_per_node", str(cfg.nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id(cfg), "--rdzv-conf", f"join_timeout={cfg.rdzv_timeout}",
            "--max-restarts", str(cfg.max_restarts)]
    local = cfg.local_addr or ("127.0.0.1" if cfg.nnodes == 1 else None)
    if local:
        args += ["--local-addr", local]
    return args


def worker_command(cfg: TrainConfig, resolved_path: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "stages.launch.torchrun", *torchrun_args(cfg, port),
            "-m", cfg.worker_module, str(resolved_path)]


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """The caller's environment plus: unbuffered output and one core's share of threads
    per rank (OMP_NUM_THREADS = cores // nproc, at least 1; a value you set wins); on a
    loopback ``local_addr``, gloo on the loopback interface (GLOO_SOCKET_IFNAME=lo)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, cfg.nproc))))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The c10d agents share their rendezvous store with the ranks by default, and a restarted
    # group then finds the dead group's process-group keys in it (its ranks wait forever for
    # peers at stale addresses); unshared, rank 0 hosts a fresh store for every attempt.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if cfg.local_addr in ("127.0.0.1", "localhost"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def node_log(cfg: TrainConfig, layout: StageDir) -> Path:
    """STAGE_DIR/train.log on node 0, train.node<K>.log on node K (a shared run dir)."""
    path = layout.launch_log
    return path if cfg.node_rank == 0 else path.with_name(f"{path.stem}.node{cfg.node_rank}{path.suffix}")


def launch_workers(cfg: TrainConfig, resolved_path: Path, layout: StageDir) -> None:
    """Run the ranks, tee their output to the terminal and STAGE_DIR/train.log."""
    port = cfg.master_port or free_port()
    log_path = node_log(cfg, layout)
    rc, error = run_child(worker_command(cfg, resolved_path, port), worker_env(cfg), log_path)
    if rc != 0:
        cause = error or f"torchrun exit code {rc}"
        if cfg.max_restarts:
            cause += f"; it failed {cfg.max_restarts + 1} times (max_restarts={cfg.max_restarts})"
        hint = ("; resume=true continues from the last DeepSpeed checkpoint" if layout.has_ds_checkpoint
                else "; no checkpoint was written, so a rerun starts the stage over")
        raise LaunchError(f"stage {cfg.stage.name}: the workers failed: {cause} (full output: {log_path}){hint}")


def rdzv_id(cfg: TrainConfig) -> str:
    """The same on every node, another for every stage and run dir (torchrun's --rdzv-id)."""
    where = f"{Path(cfg.run_dir).expanduser().resolve()}/{cfg.stage.name}"
    return "flm-" + hashlib.sha256(where.encode()).hexdigest()[:12]
