"""CheckpointWriter: the one way a checkpoint directory is written (lock, staging, publish)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from flmcore.io import write_json_atomic
from flmcore.safe_files import SymlinkError, copy_regular, open_nofollow
from growth.checkpoint.format import (
    DEFAULT_MAX_SHARD_SIZE,
    HISTORY_NAME,
    INDEX_NAME,
    LOCK_SUFFIX,
    MANIFEST_SUFFIX,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    SHARD_NAME,
    WEIGHTS_NAME,
    carried_files,
    config_dict,
    new_history,
    parse_size,
    torch_dtype,
)
from growth.checkpoint.reader import read_optimizer_state
from growth.config import CONFIG_NAME, ModelConfig
from growth.tensor_io import (
    DIGEST_KEY,
    CheckpointError,
    _umask,
    nbytes_of,
    read_header,
    shard_complete,
    write_shard_streaming,
)


# ---------------------------------------------------------------------- output dirs
def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an OUT that publishing could not replace."""
    out = Path(out)
    if out.is_symlink():
        raise CheckpointError(f"{out}: output is a symlink; pass the real path (a checkpoint is "
                              f"published by renaming a directory into place)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output exists and is not empty; choose a new --out "
                              f"(existing checkpoints are never overwritten)")
    if out.exists() and os.path.ismount(out):
        raise CheckpointError(f"{out}: output is a mount point, which cannot be replaced by a "
                              f"rename; use a new directory inside it, e.g. {out / 'checkpoint'}")
    if not out.parent.exists():
        return
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{out.parent}: not writable; choose another --out")


def staging_dir(out: str | Path) -> Path:
    """The one staging directory of OUT (``.OUT.partial`` beside it)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def manifest_path(out: str | Path) -> Path:
    """What the staging dir holds (kept beside it, so a failed publish never loses it)."""
    out = Path(out)
    return out.parent / f".{out.name}{MANIFEST_SUFFIX}"


class DirLock:
    """An exclusive ``flock`` on a lock file holding the holder's pid.

    A live holder means a one-line refusal; a dead one's lock is gone with its process
    (the kernel drops flocks), so its file is simply taken over.
    """

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            try:
                fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            except SymlinkError as err:
                raise CheckpointError(f"{self.path}: the lock file {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    pid = self.path.read_text().strip() or "?"
                except OSError:
                    pid = "?"
                raise CheckpointError(f"{self.what} is being written by another process (pid {pid}, "
                                      f"lock {self.path}); wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file meanwhile: retry on the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise CheckpointError(f"{self.path}: could not take the lock (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) in order into shards of at most ``max_shard_size``
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    return [WEIGHTS_NAME] if count == 1 else [SHARD_NAME.format(i + 1, count) for i in range(count)]


Entry = tuple[str, tuple[int, ...], torch.dtype]


def plan_entries(entries: Sequence[Entry], max_shard_size: int, root: str = "") -> list[tuple[str, list[Entry]]]:
    """(relative shard path, entries) of the deterministic shard plan of ``entries``."""
    by_name = {e[0]: e for e in entries}
    groups = plan_shards(((n, nbytes_of(s, d)) for n, s, d in entries), max_shard_size)
    return [(root + fname, [by_name[n] for n in names])
            for fname, names in zip(shard_file_names(len(groups)), groups, strict=True)]


def write_json(path: Path, data: Any, sort_keys: bool = False) -> None:
    write_json_atomic(path, data, sort_keys=sort_keys)  # flmcore.io: the one atomic writer


# ---------------------------------------------------------------------- the writer
class CheckpointWriter:
    """The one way a checkpoint directory is written.

    ::

        with CheckpointWriter(out, key=request_key) as w:   # lock, staging (resumed if same key)
            w.write_shard("model-00001-of-00002.safetensors", entries, produce)
            w.write_index("", {name: file}, total)           # digests read from the shards
            w.write_config(config, raw=source_raw, dtype=torch.bfloat16)
            w.carry(source_dir)                              # tokenizer, *.py, …
            w.write_history(history)
            w.publish()

    ``key`` (any JSON value) makes the staging dir resumable: a later writer with the same
    key keeps the complete, digest-checked shards; another key starts afresh. Without a
    key every attempt starts afresh. On an error inside the ``with``: an OSError or an
    interrupt keeps a keyed staging dir for a resume; anything else removes it. The lock
    file (``.OUT.lock``) is held from construction to publish/abort.
    """

    def __init__(self, out: str | Path, key: Any = None, time: str | None = None):
        self.out = Path(out)
        check_output_dir(self.out)
        self.staging = staging_dir(self.out)
        self.key = key
        self._lock = DirLock(lock_path(self.out), str(self.out)).acquire()
        self.resumed = False
        try:
            self.manifest = self._open_staging(time)
        except BaseException:
            self._lock.release()
            raise
        self._done = False
        self._publishing = False

    @property
    def time(self) -> str:
        return self.manifest["time"]

    def _open_staging(self, time: str | None) -> dict[str, Any]:
        mpath = manifest_path(self.out)
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            raise CheckpointError(f"{self.staging}: the staging directory is a symlink or a file; remove it "
                                  f"(it is never followed)")
        if self.key is not None and self.staging.is_dir():
            try:
                old = json.loads(mpath.read_text())
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("key") == json.loads(json.dumps(self.key)):
                self.resumed = True
                return old
            print(f"grow: {self.staging} holds the partial output of another request (or of a "
                  f"source that has changed since); starting afresh", file=sys.stderr)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        manifest = {"key": self.key, "time": time or event_time()}
        if self.key is not None:
            write_json(mpath, manifest)
        else:
            mpath.unlink(missing_ok=True)
        return manifest

    # ---------------------------------------------------------- shards
    def shard_done(self, relpath: str, entries: Sequence[Entry]) -> bool:
        """True when a resumed staging dir already holds this shard, whole and intact."""
        return self.resumed and shard_complete(self.staging / relpath, entries) is not None

    def write_shard(self, relpath: str, entries: Sequence[Entry],
                    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                    **kwargs: Any) -> str:
        """Stream one shard into the staging dir (see tensor_io.write_shard_streaming)."""
        return write_shard_streaming(self.staging / relpath, entries, produce, **kwargs)

    def write_tensors(self, config: ModelConfig | None,
                      tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                      root: str = "", dtype: torch.dtype | None = None,
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                      on_tensor: Callable[[str, int], None] | None = None) -> dict[str, str]:
        """Stream (name, tensor) pairs into shards + index under ``root``; returns the
        weight map. A dict gives its own names and dtypes; a stream must follow
        ``config``'s canonical order (it is planned from the config before it is read)."""
        if isinstance(tensors, dict):
            entries = [(n, tuple(t.shape), dtype or t.dtype) for n, t in tensors.items()]
            it: Iterator[tuple[str, torch.Tensor]] = iter(tensors.items())
            first = None
        else:
            it = iter(tensors)
            first = next(it, None)
            if config is None or first is None:
                rest = dict([first] if first else []) | dict(it)
                return self.write_tensors(config, rest, root, dtype, max_shard_size, on_tensor)
            kind = dtype or first[1].dtype
            entries = [(n, tuple(s), kind) for n, s in config.tensor_shapes().items()]
        pending = [first] if first is not None else []

        def produce(name: str) -> torch.Tensor:
            got, t = pending.pop() if pending else next(it, (None, None))
            if got != name:
                raise CheckpointError(f"{self.out}: tensor stream gave {got!r} where '{name}' was "
                                      f"expected (canonical order)")
            t = t.detach().cpu()
            if dtype is None and t.dtype != entries[0][2] and not isinstance(tensors, dict):
                raise CheckpointError(f"{self.out}: tensor '{name}' is {t.dtype}, the others "
                                      f"{entries[0][2]}; pass a dtype")
            return t

        weight_map: dict[str, str] = {}
        total = 0
        for relpath, group in plan_entries(entries, max_shard_size, root):
            self.write_shard(relpath, group, produce, after_tensor=on_tensor)
            weight_map.update(dict.fromkeys((n for n, _, _ in group), Path(relpath).name))
            total += sum(nbytes_of(s, d) for _, s, d in group)
        leftover = pending or [x for x in [next(it, None)] if x is not None]
        if leftover:
            raise CheckpointError(f"{self.out}: tensor '{leftover[0][0]}' is not a parameter of the config")
        self.write_index(root, weight_map, total)
        return weight_map

    def write_index(self, root: str, weight_map: dict[str, str], total_size: int) -> None:
        """The index of the shards under ``root`` with their digests (none for one shard:
        its digest is in its own header)."""
        directory = self.staging / root
        files = sorted(set(weight_map.values()))
        if files == [WEIGHTS_NAME]:
            return
        digests = {}
        for fname in files:
            _, meta, _ = read_header(directory / fname)
            digests[fname] = meta.get(DIGEST_KEY)
        index = {"metadata": {"total_size": total_size, DIGEST_KEY: digests},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / INDEX_NAME, index)

    # ---------------------------------------------------------- the small files
    def write_config(self, config: ModelConfig, raw: dict[str, Any] | None = None,
                     dtype: torch.dtype | None = None, data: dict[str, Any] | None = None) -> None:
        write_json(self.staging / CONFIG_NAME, data if data is not None else config_dict(config, raw, dtype),
                   sort_keys=True)

    def write_history(self, history: dict[str, Any]) -> None:
        write_json(self.staging / HISTORY_NAME, history)

    def write_optimizer_state(self, state: dict[str, Any]) -> None:
        write_json(self.staging / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME, state)

    def copy_optimizer_state(self, source: str | Path) -> None:
        """SOURCE/optimizer/state.json, validated, copied byte for byte."""
        read_optimizer_state(source)
        target = self.staging / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME, target)

    def carry(self, source: str | Path | None) -> list[str]:
        """Copy the release files of ``source`` (CARRIED_NAMES) into the output."""
        if source is None:
            return []
        names = carried_files(Path(source))
        skipped = carried_files(Path(source), regular=False)
        if skipped:
            print(f"grow: warning: {Path(source)}: not carried (not regular files; symlinks are never "
                  f"followed): {', '.join(skipped)}", file=sys.stderr)
        for name in names:
            copy_regular(Path(source) / name, self.staging / name)
        return names

    # ---------------------------------------------------------- finish
    def publish(self) -> Path:
        """Rename the finished staging dir into place and drop the lock. If that fails the
        staging dir and its manifest are kept (the same command then resumes)."""
        self._publishing = True
        if self.out.is_symlink() or (self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir()))):
            raise CheckpointError(f"{self.out}: output appeared while writing; the finished work is "
                                  f"kept in {self.staging}: move {self.out} away and rerun")
        os.chmod(self.staging, 0o777 & ~_umask())
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.staging, self.out)
        manifest_path(self.out).unlink(missing_ok=True)
        self._done = True
        self._lock.release()
        return self.out

    def abort(self, keep: bool = False) -> None:
        """Give up: remove the staging dir (``keep``: leave it for a resume); drop the lock."""
        if not self._done:
            if not keep:
                shutil.rmtree(self.staging, ignore_errors=True)
                manifest_path(self.out).unlink(missing_ok=True)
            self._done = True
        self._lock.release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._done:
                self.abort()
            return
        keep = self.key is not None and (self._publishing or (
            issubclass(exc_type, (OSError, KeyboardInterrupt)) and not isinstance(exc, CheckpointError)))
        self.abort(keep=keep)


def event_time() -> str:
    """Now (UTC, ISO 8601), or ``SOURCE_DATE_EPOCH`` when set, for reproducible outputs."""
    import time

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch) if epoch else time.time(), datetime.timezone.utc)
    return when.isoformat(timespec="seconds")


def save_checkpoint(out: str | Path, config: ModelConfig,
                    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                    history: dict[str, Any] | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | str | None = None,
                    raw_config: dict[str, Any] | None = None) -> Path:
    """Stream (name, tensor) pairs into a new checkpoint directory (a CheckpointWriter).

    A stream is written tensor by tensor (header first, one tensor in memory); the
    directory appears only when complete; on any error nothing is left.
    """
    limit = parse_size(max_shard_size)
    cast = torch_dtype(dtype)
    with CheckpointWriter(out) as writer:
        writer.write_tensors(config, tensors, dtype=cast, max_shard_size=limit)
        writer.write_config(config, raw_config)
        writer.write_history(history or new_history())
        return writer.publish()

