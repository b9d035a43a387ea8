"""One shard-writing loop for ``grow apply`` and ``grow import``: tasks, a worker, the queue.

A job (growth.executor.ApplyJob, growth.importer.ImportJob) is a list of
:class:`ShardTask` (the deterministic shard plan of its output) plus a
:class:`ShardWorker` subclass that says how one tensor is produced (``tensor``) and
named in errors (``label``). Everything else is shared, so both commands stream, resume
and parallelise the same way:

- :func:`write_items`: the items this worker claims (growth.workqueue), each written
  whole (:meth:`ShardWorker.write`) or as a part of a split shard (``write_part``);
- :meth:`ShardWorker.producer`: tensors that fit one row block are computed up to
  ``lookahead`` ahead in a small thread pool, bigger ones stream block by block;
- :func:`complete_shards`: the coordinator's check that every shard is there (sealing
  shards whose parts were all finished before a kill), then the work dir is dropped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint.writer import staging_dir
from growth.pipeline import add_profile
from growth.tensor_io import (
    CheckpointError,
    Closer,
    nbytes_of,
    shard_complete,
    write_shard_part,
    write_shard_streaming,
)
from growth.workqueue import (
    WorkItem,
    claim,
    clear_parts,
    mark_part,
    part_done,
    remove_work_dir,
    seal_if_complete,
    work_items,
)

BLOCK_ELEMENTS = 1 << 25  # operators.plan.CHUNK_ELEMENTS: a tensor up to this fits one block


@dataclass
class ShardTask:
    path: str  # relative to the output root
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    kind: str  # weight | exp_avg | exp_avg_sq

    @property
    def nbytes(self) -> int:
        return sum(nbytes_of(s, d) for _, s, d in self.entries)


class StagedJob:
    """What apply's and import's jobs share: the output, its staging dir, the bytes to write
    (a dataclass with ``request`` and ``tasks`` mixes this in)."""

    request: Any
    tasks: list[ShardTask]

    @property
    def out(self) -> Path:
        return Path(self.request.out)

    @property
    def staging(self) -> Path:
        return staging_dir(self.out)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


class ShardWorker:
    """Writes a job's shards (one instance per worker process); subclasses produce tensors."""

    lookahead = 2  # single-block tensors computed ahead of the one being written
    producers = 2  # threads computing them

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.producers, thread_name_prefix="grow-produce") \
            if self.lookahead else None
        self.sealed: dict[Path, bool] = {}
        self.closer = Closer()  # a shard's fsync + rename overlap the next one's production

    # ---------------------------------------------------------- what subclasses say
    def tensor(self, name: str, kind: str, dtype: torch.dtype) -> Iterable[torch.Tensor]:
        """Tensor ``name`` as consecutive row blocks (any dtype; cast while written)."""
        raise NotImplementedError

    def label(self, name: str, kind: str) -> str:
        return f"tensor '{name}'" if kind == "weight" else f"{kind} of '{name}'"

    def blame(self, task: ShardTask) -> None:
        """Given a NaN/inf in ``task``'s output: raise a better error, if there is one."""

    def piece_written(self, name: str, size: int, progress: Callable[[int], None] | None) -> None:
        if progress is not None:
            progress(size)

    def close(self) -> None:
        """Wait for the last shard's publish (raising its error); stop the threads."""
        try:
            self.closer.close()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    # ---------------------------------------------------------- producing
    def producer(self, task: ShardTask, first: int = 0, last: int | None = None
                 ) -> Callable[[str], Iterable[torch.Tensor]]:
        """``produce(name)`` over ``task.entries[first:last]``: single-block tensors come
        from futures submitted up to ``lookahead`` tensors ahead, in order."""
        ahead: dict[str, Future] = {}
        order = [(n, tuple(s), d) for n, s, d in task.entries[first:last]]
        position = {n: i for i, (n, _, _) in enumerate(order)}

        def compute(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
            start = time.thread_time()
            blocks = list(self.tensor(name, task.kind, dtype))
            add_profile("produce", time.thread_time() - start)
            return blocks

        def produce(name: str) -> Iterable[torch.Tensor]:
            i = position[name]
            if self.pool is not None:
                for n, shape, dtype in order[i:i + self.lookahead + 1]:
                    if n not in ahead and _one_block(shape):
                        ahead[n] = self.pool.submit(compute, n, dtype)
            if name in ahead:
                return ahead.pop(name).result()
            return self.tensor(name, task.kind, order[i][2])
        return produce

    # ---------------------------------------------------------- writing
    def write(self, task: ShardTask, root: Path, progress: Callable[[int], None] | None = None) -> bool:
        """Write ``task`` under ``root`` unless a complete copy exists; True if written."""
        path = root / task.path
        if shard_complete(path, task.entries) is not None:
            if progress is not None:
                progress(task.nbytes)
            return False
        clear_parts(root, task.path)  # written whole: the partial file is replaced
        with self._blaming(task):
            write_shard_streaming(path, task.entries, self.producer(task),
                                  after_tensor=lambda n, size: self.piece_written(n, size, progress),
                                  label=lambda n: self.label(n, task.kind), closer=self.closer)
        return True

    def write_part(self, task: ShardTask, item: WorkItem, root: Path,
                   progress: Callable[[int], None] | None = None) -> bool:
        """Write one part of a split shard unless it is done; seal the shard when this was
        its last part. True if written."""
        path = root / task.path
        if self._sealed(path, task) or part_done(root, task.path, task.entries, item.first, item.last):
            if progress is not None:
                progress(item.nbytes)
            return False
        with self._blaming(task):
            digest = write_shard_part(path, task.entries, item.first, item.last,
                                      self.producer(task, item.first, item.last),
                                      after_tensor=lambda n, size: self.piece_written(n, size, progress),
                                      label=lambda n: self.label(n, task.kind))
        mark_part(root, task.path, item.first, item.last, digest)
        seal_if_complete(root, task.path, task.entries)
        return True

    def _sealed(self, path: Path, task: ShardTask) -> bool:
        """A sealed shard is whole and intact (its data re-hashed once per worker)."""
        if path not in self.sealed:
            self.sealed[path] = path.is_file() and shard_complete(path, task.entries) is not None
        return self.sealed[path]

    @contextlib.contextmanager
    def _blaming(self, task: ShardTask) -> Iterator[None]:
        try:
            yield
        except CheckpointError as err:
            if "NaN or inf" in str(err):
                self.blame(task)
            raise


def _one_block(shape: tuple[int, ...]) -> bool:
    return math.prod(shape) <= BLOCK_ELEMENTS


def write_items(tasks: Sequence[ShardTask], staging: Path, worker: ShardWorker, world: int = 1,
                progress: Callable[[int], None] | None = None) -> int:
    """Write the items this worker claims (by bytes, largest first; one worker takes them
    all); returns how many it wrote. Closes ``worker``."""
    written = 0
    try:
        for item in work_items(tasks, world):
            if world > 1 and not claim(staging, item.key):
                continue
            task = tasks[item.task]
            if item.whole:
                written += worker.write(task, staging, progress)
            else:
                written += worker.write_part(task, item, staging, progress)
    finally:
        worker.close()
    return written


def complete_shards(tasks: Sequence[ShardTask], staging: Path) -> None:
    """Every shard is in ``staging`` (sealing those whose parts were all written before a
    kill), or a one-line error; then the claims and part markers go."""
    for task in tasks:
        if not (staging / task.path).is_file():
            seal_if_complete(staging, task.path, task.entries, once=False, verify=True)
        if shard_complete(staging / task.path, task.entries, verify_data=False) is None:
            raise CheckpointError(f"{staging / task.path}: shard missing or incomplete after all "
                                  f"workers finished; rerun the same command to resume")
    remove_work_dir(staging)
