"""The parent → child growth of a multi-node stage, on every rank of every node.

Node 0 (the coordinator, ``stages.launch.multinode``) decides the job once: the
``growth.executor.ApplyRequest`` with ``positions: distance`` already resolved to explicit
layer indices (the distance rule reads every layer matrix of the parent; resolved here
once, the ranks only read the tensors they grow). It publishes the job; every node then
runs ``torchrun --nnodes N --nproc-per-node nproc -m stages.launch.dist_grow JOB.json`` with a
rendezvous on ``master_port + 2``; the ranks of all nodes take the work items (whole
shards, or parts of big ones, largest first) from one queue of claims in the shared staging
dir (``growth.workqueue``), so each writes about the same bytes, and global rank 0
finalises STAGE_DIR/init (``growth.parallel``, the executor's torchrun mode). Afterwards
``stages.launch.prepare.grow_into`` finds the complete init/ grown from this parent and
reuses it.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from flmcore.errors import FlmError
from flmcore.process import report_error, run_child
from growth.executor import ApplyRequest
from growth.parallel import apply_growth
from growth.runs import StageDir
from stages.launch.local import node_log, rdzv_id, worker_env
from stages.launch.plan import StagePlan, grow_request, init_is_current
from stages.schema import TrainConfig

log = logging.getLogger(__name__)

GROW_PORT_OFFSET = 2  # master_port + 2: the growth ranks' rendezvous


class DistGrowError(FlmError):
    """The distributed growth failed; the message names the stage and the log."""


class Publisher(Protocol):
    """Where node 0 publishes to the other nodes (``stages.launch.multinode.Coordinator``)."""

    def publish(self, key: str, message: dict[str, Any]) -> None: ...


def grow_on_all_nodes(plan: StagePlan, coord: Publisher) -> None:
    """Node 0: publish the growth job, run this node's ranks of it (the others run theirs)."""

    if init_is_current(plan)[1]:
        return
    job = asdict(grow_request(plan))
    coord.publish("ready", {"grow": job})
    run_grow_ranks(plan.cfg, job, plan.layout)


def grow_command(cfg: TrainConfig, job_path: Path) -> list[str]:

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cfg.nnodes),
           "--nproc-per-node", str(cfg.nproc), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"{cfg.master_addr}:{cfg.master_port + GROW_PORT_OFFSET}",
           "--rdzv-id", rdzv_id(cfg) + "-grow", "--rdzv-conf", f"join_timeout={cfg.rdzv_timeout}"]
    if cfg.local_addr:
        cmd += ["--local-addr", cfg.local_addr]
    return cmd + ["-m", "stages.launch.dist_grow", str(job_path)]


def run_grow_ranks(cfg: TrainConfig, job: dict[str, Any], layout: StageDir) -> None:
    """This node's growth ranks (torchrun), output appended to this node's launch log."""


    job_path = layout.root / f".grow_job.node{cfg.node_rank}.json"
    layout.root.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job))
    log_path = node_log(cfg, layout)
    cmd = grow_command(cfg, job_path)
    log.info("[%s] growing %s → %s on %d nodes × %d ranks", cfg.stage.name, job["src"], job["out"],
             cfg.nnodes, cfg.nproc)
    try:
        rc, error = run_child(cmd, worker_env(cfg), log_path, echo=False)
    finally:
        job_path.unlink(missing_ok=True)
    if rc != 0:
        cause = error or f"torchrun exit code {rc}"
        raise DistGrowError(f"stage {cfg.stage.name}: the distributed growth into {job['out']} failed: {cause} "
                            f"(full output: {log_path}); a rerun resumes it")


def main(argv: list[str] | None = None) -> int:
    """One growth rank: ``torchrun … -m stages.launch.dist_grow JOB.json``."""
    import os

    import torch.distributed as dist


    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    request = ApplyRequest(**json.loads(Path(args[0]).read_text()))
    dist.init_process_group("gloo")
    try:
        apply_growth(request, progress=int(os.environ.get("RANK", "0")) == 0)
    except (FlmError, OSError) as err:
        if dist.get_rank() == 0:
            report_error(err)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
