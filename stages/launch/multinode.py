"""One stage on several nodes: ``train-stage … nnodes=N node_rank=K master_addr=HOST master_port=P``.

The same command runs once per node (same config, its own ``node_rank``). Before any
worker starts the nodes meet at a small TCP store that node 0 hosts on ``master_port``
(``torch.distributed.TCPStore``, the store torchrun itself uses)::

    every node      publishes its resolved config (and its hash) under cfg/K
    node 0          waits up to rdzv_timeout for all of them, compares the hashes, and
                    refuses to start (every node gets the one-line reason) when a node
                    composed another config; then plans, locks, prepares (data, growth
                    into STAGE_DIR/init, distributed over all nodes' ranks when the
                    stage grows) and publishes the snapshot the workers read
    every node      runs ``torchrun --nnodes N --rdzv-backend c10d
                    --rdzv-endpoint HOST:P+1`` for its nproc local ranks (stages.launch.local)

The run dir must be the same path on a shared filesystem on every node. Global rank 0
(whichever node it lands on) writes summary.json, train_log.jsonl, TensorBoard, final/;
the other ranks meet it at the trainer's barriers. A node that never joins ends the
stage on the nodes that did with one line naming the missing node ranks, after
``rdzv_timeout`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError
from growth.runs import StageDir
from stages.launch.dist_grow import grow_on_all_nodes, run_grow_ranks
from stages.launch.local import launch_workers
from stages.launch.lock import StageLock
from stages.launch.plan import plan_stage
from stages.launch.prepare import train_planned
from stages.launch.resume import flatten
from stages.schema import MAX_PORT, TrainConfig, fields_where, to_plain

log = logging.getLogger(__name__)

NODE_FIELDS = fields_where("per_node", True)  # may differ between nodes; everything else must match
READY_WAIT = timedelta(days=7)  # node 0's preparation (data, growth) may take long; its death is seen at once
ACK_WAIT = timedelta(seconds=30)  # node 0 keeps its store up this long for the others to read a refusal


class MultiNodeError(FlmError):
    """The nodes of a stage did not meet, or did not agree; the one line says which and what to do."""


def check_launchable(cfg: TrainConfig) -> None:
    """A multi-node launch needs master_port and master_addr (checked when one starts,
    not in validate: a composed 112-node config without them is fine for a dry run)."""

    if cfg.master_port == 0:
        raise MultiNodeError(f"nnodes={cfg.nnodes} needs master_port: the same free TCP port on node 0 "
                             f"for every node (P for the config check, P+1 for torchrun's rendezvous)")
    if cfg.master_port + 1 > MAX_PORT:
        raise MultiNodeError(f"master_port={cfg.master_port} leaves no room for P+1 (torchrun's rendezvous); "
                             f"pick a port up to {MAX_PORT - 1}")
    if not cfg.master_addr:
        raise MultiNodeError("nnodes > 1 needs master_addr: node 0's address, the same on every node")


# ---------------------------------------------------------------------- the config every node composed
def node_view(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config without the fields that differ between nodes (node_rank, local_addr)."""

    plain = to_plain(cfg)
    for name in NODE_FIELDS:
        plain.pop(name, None)
    return plain


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(node_view(cfg), sort_keys=True).encode()).hexdigest()[:16]


def first_difference(mine: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, Any, Any]:

    a, b = flatten(mine), flatten(theirs)
    key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return key, a.get(key), b.get(key)


# ---------------------------------------------------------------------- the meeting point
class Coordinator:
    """Node 0 hosts a TCPStore on master_port; the other nodes connect to it."""

    def __init__(self, cfg: TrainConfig):
        import torch.distributed as dist

        self.cfg, self.node, self.nnodes = cfg, cfg.node_rank, cfg.nnodes
        self.where = f"{cfg.master_addr}:{cfg.master_port}"
        timeout = timedelta(seconds=cfg.rdzv_timeout)
        if self.node != 0 and not _listening(cfg.master_addr, cfg.master_port, cfg.rdzv_timeout):
            raise MultiNodeError(f"node {self.node}: node 0 did not answer at {self.where} within "
                                 f"rdzv_timeout={cfg.rdzv_timeout} s; start train-stage with node_rank=0 "
                                 f"there (same master_addr/master_port)")
        try:
            self.store = dist.TCPStore(cfg.master_addr, cfg.master_port, is_master=self.node == 0,
                                       timeout=timeout, wait_for_workers=False)
        except (RuntimeError, TimeoutError, OSError) as err:
            if self.node == 0:
                raise MultiNodeError(f"node 0 cannot listen on {self.where} (master_addr:master_port): "
                                     f"{_first_line(err)}; pick a free master_port") from None
            raise MultiNodeError(f"node {self.node}: node 0 did not answer at {self.where} within "
                                 f"rdzv_timeout={cfg.rdzv_timeout} s; start train-stage with node_rank=0 "
                                 f"there (same master_addr/master_port)") from None

    # every node ------------------------------------------------------------
    def agree(self) -> None:
        """Exchange resolved configs; raises on every node if any node's hash differs."""
        view = node_view(self.cfg)
        mine = {"hash": config_hash(self.cfg), "config": view}
        if self.node != 0:
            self.store.set(f"cfg/{self.node}", json.dumps(mine))
            verdict = self._get("verdict", timedelta(seconds=2 * self.cfg.rdzv_timeout))
            if verdict != "ok":
                self.store.set(f"ack/{self.node}", "1")
                raise MultiNodeError(verdict)
            return
        others = [f"cfg/{k}" for k in range(1, self.nnodes)]
        if not self._poll(others, self.cfg.rdzv_timeout):
            missing = [k for k in range(1, self.nnodes) if not self.store.check([f"cfg/{k}"])]
            raise MultiNodeError(
                f"nnodes={self.nnodes}: node(s) {', '.join(map(str, missing))} did not join at {self.where} "
                f"within rdzv_timeout={self.cfg.rdzv_timeout} s; start `train-stage … node_rank=K` on "
                f"every node with the same master_addr/master_port") from None
        for k in range(1, self.nnodes):
            theirs = json.loads(self.store.get(f"cfg/{k}"))
            if theirs["hash"] != mine["hash"]:
                key, here, there = first_difference(view, theirs["config"])
                message = (f"node {k} composed another config than node 0 (hash {theirs['hash']} vs "
                           f"{mine['hash']}): '{key}' is {there!r} there, {here!r} on node 0; run the same "
                           f"command and config on every node")
                self.refuse(message)
                raise MultiNodeError(message)
        self.store.set("verdict", "ok")

    def wait_for(self, key: str) -> dict[str, Any]:
        """Nodes > 0: node 0's next message (``ready``: snapshot or growth job; ``train``)."""
        message = json.loads(self._get(key, READY_WAIT))
        if "error" in message:
            self.store.set(f"ack/{self.node}", "1")
            raise MultiNodeError(f"node 0 could not start the stage: {message['error']}")
        return message

    # node 0 ------------------------------------------------------------------
    def publish(self, key: str, message: dict[str, Any]) -> None:
        self.store.set(key, json.dumps(message))

    def refuse(self, message: str) -> None:
        """Tell every node why the stage does not start, and give them time to read it."""
        for key in ("verdict", "ready", "train"):
            self.store.set(key, message if key == "verdict" else json.dumps({"error": message}))
        deadline = time.monotonic() + ACK_WAIT.total_seconds()
        while time.monotonic() < deadline:
            if all(self.store.check([f"ack/{k}"]) for k in range(1, self.nnodes)):
                return
            time.sleep(0.1)

    def _poll(self, keys: list[str], seconds: float) -> bool:
        """Wait until all ``keys`` exist (polling: a blocking wait makes c10d print warnings)."""
        deadline = time.monotonic() + seconds
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def _get(self, key: str, timeout: timedelta | None = None) -> str:
        try:
            if timeout is not None and not self._poll([key], timeout.total_seconds()):
                raise TimeoutError(f"no '{key}' after {timeout.total_seconds():.0f} s")
            return self.store.get(key).decode()
        except (RuntimeError, TimeoutError, OSError) as err:
            raise MultiNodeError(f"node {self.node}: lost node 0 at {self.where} while waiting for '{key}' "
                                 f"({_first_line(err)}); see node 0's output") from None


def _listening(host: str, port: int, seconds: float) -> bool:
    """Wait until something accepts TCP connections at host:port (a failed TCPStore
    connect prints a C++ stack trace, so the store is only opened once this is true)."""
    import socket

    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------- the stage on one node
def run_multinode(cfg: TrainConfig) -> dict[str, Any]:
    """This node's part of a multi-node stage; returns the stage's summary."""

    check_launchable(cfg)
    coord = Coordinator(cfg)
    coord.agree()
    layout = StageDir.of(Path(cfg.run_dir).expanduser().resolve(), cfg.stage.name)
    if cfg.node_rank == 0:
        return _run_node0(cfg, coord)
    log.info("[%s] node %d of %d joined node 0 at %s (config %s)", cfg.stage.name, cfg.node_rank, cfg.nnodes,
             coord.where, config_hash(cfg))
    message = coord.wait_for("ready")
    if message.get("finished"):
        return layout.read_summary() or {}
    if "grow" in message:

        run_grow_ranks(cfg, message["grow"], layout)
        message = coord.wait_for("train")
    start = time.time()
    if not Path(message["snapshot"]).is_file():  # node 0's run_dir is not this node's
        raise MultiNodeError(f"node {cfg.node_rank}: node 0's stage config {message['snapshot']} is not visible "
                             f"here; run_dir ({cfg.run_dir!r}) must be one shared directory, the same path on "
                             f"every node (a relative run_dir resolves against each node's working directory)")
    launch_workers(cfg, Path(message["snapshot"]), layout)
    log.info("[%s] node %d done in %.0f s", cfg.stage.name, cfg.node_rank, time.time() - start)
    return layout.read_summary() or {}


def _run_node0(cfg: TrainConfig, coord: Coordinator) -> dict[str, Any]:

    try:
        plan = plan_stage(cfg)
    except FlmError as err:
        coord.refuse(_first_line(err))
        raise
    if plan.finished:
        coord.publish("ready", {"finished": True})
        log.info("[%s] already finished in %s; skipped (resume=true)", plan.name, plan.stage_dir)
        return plan.layout.read_summary() or {}
    try:
        with StageLock(plan.layout.lock):
            if plan.grow:

                grow_on_all_nodes(plan, coord)
            return train_planned(plan, on_ready=lambda snapshot: coord.publish(
                "train" if plan.grow else "ready", {"snapshot": str(snapshot)}))
    except FlmError as err:
        coord.refuse(_first_line(err))
        raise


