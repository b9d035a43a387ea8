"""Running one ``grow apply`` job in one process, N spawned workers, or torchrun ranks.

All three call the same :func:`growth.executor.write_shards` with a (rank, world) pair:
the workers take items (whole shards, or parts of big ones) from one queue by claiming
them (growth.workqueue), so the bytes each writes even out and the output is identical
for any worker count. The coordinator (the parent, or rank 0) validates, opens
the staging dir, and finalises once every worker reported; workers rebuild the job from
the picklable :class:`~growth.executor.ApplyRequest` (headers and plan only, cheap).

Errors cross process boundaries as (type name, one-line message) and are raised again in
the coordinator with the same type, so the CLI prints the same one-line error for any
worker count.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flmcore.process import die_with_parent
from growth.checkpoint import CheckpointError
from growth.config import ConfigError
from growth.executor import ApplyJob, ApplyRequest, finalize, open_staging, prepare, write_shards
from growth.pipeline import dump_profile
from growth.shardwork import write_items
from growth.workqueue import reset_claims, work_items
from operators import GrowthError

PASSED_ERRORS = {e.__name__: e for e in (CheckpointError, ConfigError, GrowthError, OSError)}


def torchrun_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) when launched by torchrun with more than one rank, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    return 0, 1


def apply_growth(request: ApplyRequest, workers: int = 1, progress: bool = False,
                 log_tensors: bool = False) -> Path | None:
    """Grow ``request.src`` into ``request.out``; returns the output (None on ranks > 0)."""
    rank, world = torchrun_rank()
    if world > 1:
        if workers != 1:
            raise CheckpointError("--workers cannot be combined with torchrun: the ranks are the workers")
        return _apply_distributed(request, rank, world, progress, log_tensors)
    check_workers(workers)
    return run_job(prepare(request), prepare, request, finalize, workers, progress, log_tensors)


def check_workers(workers: Any) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CheckpointError(f"--workers must be at least 1, got {workers}")


def run_job(job: Any, prepare_fn: Callable[..., Any], request: Any, finalize_fn: Callable[[Any, Any], Path],
            workers: int = 1, progress: bool = False, log_tensors: bool = False, desc: str = "grow") -> Path:
    """Open (or resume) ``job``'s staging dir, write its shards in this process or in
    ``workers`` spawned ones (each rebuilds the job with ``prepare_fn(request,
    check_out=False)``), then ``finalize_fn(job, writer)``. Shared by apply and import."""
    workers = min(workers, len(work_items(job.tasks, workers)))  # more processes than items would idle
    bar = _bar(job, progress or log_tensors, desc)
    log = bar.write if log_tensors else None
    try:
        # The writer keeps the staging dir on OSError / interrupt (resumable), removes it
        # on anything else, and holds OUT's lock throughout.
        with job.open_staging() as writer:
            reset_claims(job.staging)
            try:
                if workers == 1:
                    write_items(job.tasks, job.staging, job.worker(log), 1, bar.update)
                else:
                    _run_spawned(prepare_fn, request, workers, bar.update, log)
                return finalize_fn(job, writer)
            except OSError as err:  # disk full, I/O, a lost worker: keep the finished shards
                raise _resumable(err, job) from None
    finally:
        bar.close()


def _resumable(err: OSError, job: ApplyJob) -> OSError:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if err.filename and str(err.filename) not in message:
        message = f"{err.filename}: {message}"
    wrapped = OSError(f"{message}; finished shards are kept in {job.staging}: fix the cause and "
                      f"rerun the same command to resume")
    wrapped.errno = err.errno
    return wrapped


def _bar(job: Any, enabled: bool, desc: str = "grow") -> tqdm:
    return tqdm(total=job.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------- spawned workers
def _run_spawned(prepare_fn: Callable[..., Any], request: Any, workers: int, progress: Callable[[int], None],
                 log: Callable[[str], None] | None) -> None:
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(prepare_fn, request, rank, workers, messages, os.getpid(), log is not None))
             for rank in range(workers)]
    try:
        with ignoring_sigint():  # workers inherit SIG_IGN: a Ctrl-C is handled here, once
            for p in procs:
                p.start()
    except KeyboardInterrupt:  # Ctrl-C while the workers start: stop those already running
        for p in procs:
            if p.is_alive():
                p.terminate()
            if p.pid is not None:
                p.join()
        raise
    finished: dict[int, tuple[str, str] | None] = {}
    try:
        while len(finished) < workers:
            try:
                kind, rank, payload = messages.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in finished]
                if dead and messages.empty():
                    r = dead[0]
                    raise OSError(f"grow worker {r} died (exit code {procs[r].exitcode}) before "
                                  f"finishing; rerun the same command to resume") from None
                continue
            if kind == "bytes":
                progress(payload)
            elif kind == "log" and log is not None:
                log(payload)
            elif kind == "done":
                finished[rank] = None
            elif kind == "error":  # stop the others: the run fails either way
                finished[rank] = payload
                break
    finally:
        for p in procs:
            if p.is_alive() and len(finished) < workers:
                p.terminate()
            p.join()
    errors = [e for _, e in sorted(finished.items()) if e is not None]
    if errors:
        raise _rebuild(errors[0])


@contextlib.contextmanager
def ignoring_sigint() -> Iterator[None]:
    """Start child processes with SIGINT blocked, so only the coordinator handles Ctrl-C.

    Note: a terminal's Ctrl-C goes to the whole process group; children still importing
    torch would each print a KeyboardInterrupt traceback (55 lines for 2 workers). A
    blocked signal mask survives fork and exec, so children started here never see SIGINT
    (the coordinator stops them with SIGTERM), while a Ctrl-C that arrives meanwhile stays
    pending here and is raised as KeyboardInterrupt as soon as the block is lifted.

    A process that inherited SIGINT ignored (a background job ``grow ... &`` of a
    non-interactive shell) keeps ignoring it here too, as everywhere else in the run:
    catching it during this window alone would stop such a run only on a Ctrl-C that
    lands while its workers start.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)
    caught: list[int] = []  # a Ctrl-C taken by another thread must not interrupt a start
    if callable(old):
        signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if callable(old):
            signal.signal(signal.SIGINT, old)
    if caught:
        raise KeyboardInterrupt


def _worker_main(prepare_fn: Callable[..., Any], request: Any, rank: int, world: int, messages: Any,
                 parent: int, log_tensors: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C and stops us
    _die_with_parent(parent)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        job = prepare_fn(request, check_out=False)
        log = (lambda line: messages.put(("log", rank, line))) if log_tensors else None
        write_items(job.tasks, job.staging, job.worker(log), world, lambda n: messages.put(("bytes", rank, n)))
        dump_profile()  # a spawned worker leaves by os._exit: no atexit
        messages.put(("done", rank, None))
    except BaseException as err:  # reported to the coordinator, raised there
        messages.put(("error", rank, _describe(err)))


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed coordinator (it would race a rerun's writes)."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _describe(err: BaseException) -> tuple[str, str]:
    for base in type(err).__mro__:
        if base.__name__ in PASSED_ERRORS:
            return base.__name__, str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, KeyboardInterrupt):
        return "OSError", "interrupted"
    return "RuntimeError", "".join(traceback.format_exception(err))


def _rebuild(error: tuple[str, str]) -> BaseException:
    name, message = error
    return PASSED_ERRORS.get(name, RuntimeError)(message)


# ---------------------------------------------------------------------- torchrun ranks
def _open_and_reset(job: ApplyJob) -> Any:
    writer = open_staging(job)
    reset_claims(job.staging)
    return writer


def _apply_distributed(request: ApplyRequest, rank: int, world: int, progress: bool,
                       log_tensors: bool) -> Path | None:
    """Every rank validates and writes its shards; rank 0 opens staging and finalises.

    Each phase ends in an all_gather of (ok | error), so a failure on one rank is raised on
    all of them instead of leaving the others waiting in a barrier.
    """
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")

    def phase(fn: Callable[[], Any]) -> Any:
        result, error = None, None
        try:
            result = fn()
        except BaseException as err:  # noqa: B036 (shared with the other ranks, then re-raised)
            error = _describe(err)
        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise _rebuild(first)
        return result

    try:
        job = phase(lambda: prepare(request, check_out=True))
        writer = phase(lambda: _open_and_reset(job) if rank == 0 else None)
        bar = _bar(job, (progress or log_tensors) and rank == 0)
        try:
            phase(lambda: write_shards(job, rank, world, bar.update, bar.write if log_tensors else None))
            return phase(lambda: finalize(job, writer) if rank == 0 else None)
        except OSError as err:
            if writer is not None:
                writer.abort(keep=True)
            raise _resumable(err, job) from None
        except KeyboardInterrupt:
            if writer is not None:
                writer.abort(keep=True)
            raise
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()
    finally:
        if owned:
            dist.destroy_process_group()
