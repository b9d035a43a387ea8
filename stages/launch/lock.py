"""An exclusive lock on a stage directory: a lock file holding the owner's pid, under ``flock``.

``flock`` is released by the kernel when its holder dies (even by SIGKILL), so a dead
holder's lock is simply taken over; the pid in the file only names a live holder in the
refusal. The lock is held by the orchestrator for the whole attempt (planning, growth,
the workers' run), so a second ``train-stage`` on the same stage (say, a requeued job
while the first still runs) is refused instead of rewriting the config under live ranks.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from flmcore.errors import FlmError
from flmcore.safe_files import SymlinkError, is_regular, open_nofollow


class StageLockedError(FlmError):
    """Another live process holds the stage directory."""


class StageLock:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of a live holder, or None when the lock is free (nothing is taken)."""
        if not is_regular(self.path):
            return None
        fd = open_nofollow(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(self.path) or -1
        finally:
            os.close(fd)
        return None

    def acquire(self) -> StageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except SymlinkError as err:
            raise StageLockedError(f"{self.path}: the stage's lock file {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _read_pid(self.path)
            who = f"process {pid}" if pid else "another process"
            raise StageLockedError(f"{self.path.parent}: in use by {who} (lock {self.path}); wait for it "
                                   f"to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (its pid is stale now)
            self._fd = None

    def __enter__(self) -> StageLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
