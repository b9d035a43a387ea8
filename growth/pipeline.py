"""The shard writer's pipeline: cast → (sha256 ‖ write), several pieces in flight.

:func:`growth.tensor_io.write_shard_streaming` hands each produced piece (a tensor or a row
block of one) to :class:`WritePipeline` and goes on producing the next. Three threads work
beside the producer:

- **cast**: splits a piece into ``CHUNK``-element chunks; a chunk already in the output
  dtype is passed on as it is (no copy, no fp32 round trip), another is cast into a reused
  buffer (``copy_``, the same rounding as ``.to``) and checked for NaN/inf;
- **hash**: ``sha256.update`` on each chunk, in order (hashlib releases the GIL on large
  buffers, so it runs beside the write on another core);
- **write**: ``write`` of each chunk, in order.

A chunk's buffer goes back to the pool when both hash and write are done with it; a piece
counts as in flight from its hand-over until its last chunk is hashed and written, and at
most ``depth`` (default 3) are, so memory stays a few blocks whatever the model size.
The bytes and the digest are exactly those of the serial loop it replaces: same chunks,
same order. The first error in any thread stops the pipeline and is raised to the caller.

Per-thread CPU seconds (produce is the caller's) are summed in :data:`PROFILE`; with
``FLM_GROW_PROFILE=FILE`` set, ``grow`` writes them there as JSON when it exits
(benchmarks/grow_io.py prints them).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHUNK = 1 << 24  # elements cast, hashed and written at a time (64 MB of fp32)
DEPTH = 3  # pieces in flight at once
PROFILE: dict[str, float] = {"produce": 0.0, "cast": 0.0, "hash": 0.0, "write": 0.0}
_PROFILE_LOCK = threading.Lock()


def add_profile(stage: str, seconds: float) -> None:
    with _PROFILE_LOCK:
        PROFILE[stage] = PROFILE.get(stage, 0.0) + seconds


def dump_profile() -> None:
    target = os.environ.get("FLM_GROW_PROFILE")
    if target:
        with _PROFILE_LOCK:
            data = dict(PROFILE, pid=os.getpid())
        with open(f"{target}.{os.getpid()}", "w") as fh:
            json.dump(data, fh)


atexit.register(dump_profile)


class BufferPool:
    """Reused CHUNK-element cast buffers, a few per dtype, shared by every shard of a process."""

    def __init__(self, per_dtype: int = DEPTH + 1):
        self.per_dtype = per_dtype
        self.free: dict[torch.dtype, list[torch.Tensor]] = {}
        self.made: dict[torch.dtype, int] = {}
        self.cond = threading.Condition()

    def take(self, dtype: torch.dtype, stop: threading.Event) -> torch.Tensor | None:
        with self.cond:
            while True:
                if self.free.get(dtype):
                    return self.free[dtype].pop()
                if self.made.get(dtype, 0) < self.per_dtype:
                    self.made[dtype] = self.made.get(dtype, 0) + 1
                    return torch.empty(CHUNK, dtype=dtype)
                if stop.is_set():
                    return None
                self.cond.wait(0.1)

    def give(self, buf: torch.Tensor) -> None:
        with self.cond:
            self.free.setdefault(buf.dtype, []).append(buf)
            self.cond.notify_all()


POOL = BufferPool()


class _Piece:
    __slots__ = ("tensor", "dtype", "name", "label", "nbytes")

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype, name: str, label: str, nbytes: int):
        self.tensor, self.dtype, self.name, self.label, self.nbytes = tensor, dtype, name, label, nbytes


class _Chunk:
    __slots__ = ("data", "buf", "piece", "last", "left")

    def __init__(self, data: memoryview, buf: torch.Tensor | None, piece: _Piece, last: bool):
        self.data, self.buf, self.piece, self.last, self.left = data, buf, piece, last, 2


class WritePipeline:
    """cast → (hash ‖ write) of the pieces :meth:`submit` hands over, in order.

    ``fh`` must be positioned where the first byte goes; ``digest`` is updated with every
    byte written; ``after_piece(name, nbytes)`` is called once a piece is hashed and written.
    """

    def __init__(self, fh: BinaryIO, digest: Any, path: Path, error_type: type[Exception],
                 check_finite: bool = True, after_piece: Callable[[str, int], None] | None = None,
                 depth: int | None = None):
        self.fh, self.digest, self.path, self.check_finite = fh, digest, path, check_finite
        self.error_type = error_type
        self.after_piece = after_piece
        self.slots = threading.Semaphore(depth or DEPTH)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.queues = {"cast": queue.Queue(), "hash": queue.Queue(), "write": queue.Queue()}
        self.threads = [threading.Thread(target=self._run, args=(stage, fn), daemon=True,
                                         name=f"shard-{stage}")
                        for stage, fn in (("cast", self._cast), ("hash", self._hash), ("write", self._write))]
        for t in self.threads:
            t.start()

    # ---------------------------------------------------------- caller side
    def submit(self, tensor: torch.Tensor, dtype: torch.dtype, name: str, label: str, nbytes: int) -> None:
        while not self.slots.acquire(timeout=0.1):
            self._raise_if_failed()
        self._raise_if_failed()
        self.queues["cast"].put(_Piece(tensor, dtype, name, label, nbytes))

    def close(self) -> None:
        """Wait for every piece to be hashed and written; raise the first error."""
        self.queues["cast"].put(None)
        for t in self.threads:
            t.join()
        self._raise_if_failed()

    def abort(self) -> None:
        self.stop.set()
        self.queues["cast"].put(None)
        for t in self.threads:
            t.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # ---------------------------------------------------------- threads
    def _run(self, stage: str, fn: Callable[[Any], None]) -> None:
        q = self.queues[stage]
        start = time.thread_time()
        try:
            while (item := q.get()) is not None:
                if self.stop.is_set():
                    continue
                try:
                    fn(item)
                except BaseException as err:  # noqa: B036 (raised again in the caller's thread)
                    with self.lock:
                        self.error = self.error or err
                    self.stop.set()
        finally:
            if stage == "cast":  # the end of the line: pass it on
                self.queues["hash"].put(None)
                self.queues["write"].put(None)
            add_profile(stage, time.thread_time() - start)

    def _cast(self, piece: _Piece) -> None:
        flat = piece.tensor.contiguous().reshape(-1)
        chunks = flat.split(CHUNK) if flat.numel() else [flat]
        for i, chunk in enumerate(chunks):
            buf = None
            if chunk.dtype == piece.dtype:
                out = chunk
            else:
                buf = POOL.take(piece.dtype, self.stop)
                if buf is None:
                    return
                out = buf[:chunk.numel()]
                out.copy_(chunk)
            # A sum is finite iff every element is (a sum too big for the dtype only sends us
            # to the exact check), and it is ~10× cheaper than isfinite().all().
            if self.check_finite and not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
                if buf is not None:
                    POOL.give(buf)
                raise self.error_type(f"{self.path}: {piece.label} holds NaN or inf as "
                                      f"{str(piece.dtype).replace('torch.', '')} (values out of the "
                                      f"dtype's range, or NaN/inf in the source)")
            data = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
            item = _Chunk(data, buf, piece, i == len(chunks) - 1)
            self.queues["hash"].put(item)
            self.queues["write"].put(item)
        piece.tensor = None  # the chunks keep what they need

    def _hash(self, item: _Chunk) -> None:
        self.digest.update(item.data)
        self._done(item)

    def _write(self, item: _Chunk) -> None:
        try:
            self.fh.write(item.data)
        except OSError as err:  # disk full, file size limit, I/O error
            wrapped = OSError(f"{self.path}: {err.strerror or err} while writing {item.piece.label}")
            wrapped.errno = err.errno
            raise wrapped from None
        self._done(item)

    def _done(self, item: _Chunk) -> None:
        with self.lock:
            item.left -= 1
            finished = item.left == 0
        if not finished:
            return
        item.data = None
        if item.buf is not None:
            POOL.give(item.buf)
        if item.last:
            self.slots.release()
            if self.after_piece is not None:
                self.after_piece(item.piece.name, item.piece.nbytes)
