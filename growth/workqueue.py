"""Work dealt by bytes: the items N workers take from one dynamic queue.

A shard plan (growth.executor.shard_tasks) is fixed by the output: its files and their
tensors do not depend on the worker count. With few big shards (a 1.3B → 2.3B growth
with Adam moments has 5 shards of up to 5 GiB) one item per shard cannot keep 8 workers
equally busy, so :func:`work_items` cuts a shard bigger than ``total / (SPLIT × N)`` (and
than MIN_PART) into parts at tensor boundaries. Every worker walks the same item list, largest first, and
takes the items it can *claim* — a file created with ``O_EXCL`` in the staging dir, so
the queue works alike for spawned processes and for torchrun ranks on several nodes
(staging on a shared filesystem). With equal speeds that is longest-first list scheduling:
each worker's bytes are within one item of the mean (:func:`simulate_shares`).

A part is written at its place in the shard's ``.partial`` file and recorded by a marker
holding its sha256 (``.work/parts/``); the worker that completes a shard's last part
*seals* it (hash of the data section, header, fsync, rename). A resumed run keeps every
part whose marker matches the bytes on disk; shards whose parts were all finished before a
kill are sealed by the coordinator's finalize. The bytes are those of a shard written
whole, whatever N.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flmcore.io import write_text_atomic
from flmcore.safe_files import open_nofollow
from growth.checkpoint import plan_shards
from growth.tensor_io import nbytes_of, part_digest, seal_shard

SPLIT = 4  # items per worker a big shard is cut to (share ≤ mean + one item)
MIN_PART = 64 * 1024**2  # no part smaller: a small job is not worth more processes or seals
WORK_DIR = ".work"  # claims and part markers, inside the staging dir; removed before publish


@dataclass(frozen=True)
class WorkItem:
    task: int  # index in job.tasks
    first: int  # the item is entries[first:last] of that shard
    last: int
    nbytes: int
    whole: bool  # the whole shard: written streaming, hashed on the way

    @property
    def key(self) -> str:
        return f"{self.task}-{self.first}-{self.last}"


def work_items(tasks: Sequence[Any], world: int) -> list[WorkItem]:
    """The items of ``tasks`` (ShardTask-like: ``entries``, ``nbytes``) for ``world``
    workers, largest first (ties in plan order)."""
    total = sum(t.nbytes for t in tasks)
    target = max(MIN_PART, -(-total // (SPLIT * world))) if world > 1 else None
    items = []
    for i, task in enumerate(tasks):
        if target is None or task.nbytes <= target or len(task.entries) == 1:
            items.append(WorkItem(i, 0, len(task.entries), task.nbytes, True))
            continue
        sizes = [(str(k), nbytes_of(s, d)) for k, (_, s, d) in enumerate(task.entries)]
        first = 0
        for group in plan_shards(sizes, target):
            last = first + len(group)
            items.append(WorkItem(i, first, last, sum(sizes[k][1] for k in range(first, last)), False))
            first = last
    return sorted(items, key=lambda it: (-it.nbytes, it.task, it.first))


def simulate_shares(items: Sequence[WorkItem], world: int) -> list[int]:
    """Bytes each worker writes when all run at the same speed: each free worker claims the
    next item of the list (what the claim queue does)."""
    shares = [0] * world
    for item in items:
        shares[shares.index(min(shares))] += item.nbytes
    return shares


# ---------------------------------------------------------------------- claims
def reset_claims(staging: Path) -> None:
    """Drop a previous run's claims (the coordinator does this before the workers start)."""
    shutil.rmtree(staging / WORK_DIR / "claims", ignore_errors=True)
    (staging / WORK_DIR / "claims").mkdir(parents=True, exist_ok=True)


def claim(staging: Path, key: str) -> bool:
    """True for exactly one caller per key and run (O_CREAT | O_EXCL)."""
    try:
        fd = open_nofollow(staging / WORK_DIR / "claims" / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def remove_work_dir(staging: Path) -> None:
    shutil.rmtree(staging / WORK_DIR, ignore_errors=True)


# ---------------------------------------------------------------------- part markers
def _marker(staging: Path, relpath: str, first: int, last: int) -> Path:
    return staging / WORK_DIR / "parts" / f"{relpath.replace('/', '%')}@{first}-{last}"


def mark_part(staging: Path, relpath: str, first: int, last: int, digest: str) -> None:
    write_text_atomic(_marker(staging, relpath, first, last), digest)


def part_done(staging: Path, relpath: str, entries: Sequence[Any], first: int, last: int) -> bool:
    """A marker says this part was written, and the bytes on disk still hash to it."""
    marker = _marker(staging, relpath, first, last)
    if not marker.is_file():
        return False
    return part_digest(staging / relpath, entries, first, last) == marker.read_text().strip()


def clear_parts(staging: Path, relpath: str) -> None:
    """Forget a shard's part markers (before it is written whole: that replaces the file)."""
    parts = staging / WORK_DIR / "parts"
    if parts.is_dir():
        for p in parts.glob(relpath.replace("/", "%") + "@*"):
            p.unlink(missing_ok=True)


def finished_chain(staging: Path, relpath: str, count: int) -> list[tuple[int, int]] | None:
    """Markers of this shard that cover entries [0, count) end to end (any split), or None."""
    parts = staging / WORK_DIR / "parts"
    prefix = relpath.replace("/", "%") + "@"
    spans = sorted(tuple(int(x) for x in p.name[len(prefix):].split("-"))
                   for p in parts.glob(f"{prefix}*")) if parts.is_dir() else []
    chain: list[tuple[int, int]] = []
    end = 0
    for first, last in spans:
        if first == end:
            chain.append((first, last))
            end = last
    return chain if end == count and chain else None


def seal_if_complete(staging: Path, relpath: str, entries: Sequence[Any], once: bool = True,
                     verify: bool = False) -> bool:
    """Seal the shard when its parts are all written (``once``: only the claimant of its
    seal does; ``verify``: re-hash every part against its marker first); True if sealed."""
    chain = finished_chain(staging, relpath, len(entries))
    if chain is None:
        return False
    if verify and not all(part_done(staging, relpath, entries, a, b) for a, b in chain):
        return False
    if once and not claim(staging, "seal-" + relpath.replace("/", "%")):
        return False
    seal_shard(staging / relpath, entries)
    clear_parts(staging, relpath)
    return True
