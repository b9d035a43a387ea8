"""Files opened without following symlinks: locks, staging, carried files, scripts' names.

A tree we read (a source checkpoint) or a name we write (``.OUT.lock``, ``.OUT.partial``)
may hold a symlink planted by someone else: following it would copy ``/etc/shadow`` into
a checkpoint or truncate the file it points to. Everything here opens with ``O_NOFOLLOW``
(and ``O_EXCL`` where the file must be new) and judges entries by ``lstat``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import unicodedata


class SymlinkError(OSError):
    """A path that must be a plain file or directory of ours is a symlink."""


def is_regular(path: str | os.PathLike) -> bool:
    """A regular file itself (a symlink to one is not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` with ``O_NOFOLLOW``: a symlink at ``path`` raises :class:`SymlinkError`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SymlinkError(errno.ELOOP, "is a symlink; remove it (it is never followed)", str(path)) from None
        raise


def try_flock(path: str | os.PathLike, mode: int = 0o644) -> int | None:
    """Open (create) the lock file ``path`` without following a symlink, take an exclusive
    ``flock`` without waiting and write our pid into it: the fd (give it to
    :func:`release_flock`), or None when a live process holds it (the kernel drops a dead
    holder's lock, so its file is simply taken over)."""
    for _ in range(10):
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed the file meanwhile: retry on the new one
    raise OSError(errno.EAGAIN, "could not take the lock (it keeps changing)", str(path))


def release_flock(path: str | os.PathLike, fd: int) -> None:
    """Remove the lock file (still holding it, so no one can be between open and flock on
    it and believe they hold it) and drop the lock."""
    try:
        os.unlink(path)
    finally:
        os.close(fd)


def copy_regular(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the regular file ``src`` (not through a symlink) to the new file ``dst``
    (``O_EXCL``: an existing file or symlink there is an error)."""
    fd = open_nofollow(src, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", str(src))
        out = open_nofollow(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(out, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)


def write_fresh(path: str | os.PathLike, data: bytes | str, mode: int = 0o666) -> None:
    """Write ``path`` as a new file: whatever is there (a planted symlink included) is
    removed first, never followed; ``O_EXCL | O_NOFOLLOW`` then fail rather than follow one
    planted in between. For the temporary names our atomic writes rename into place."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def refuse_control_chars(what: str, value: str) -> str | None:
    """A one-line complaint when ``value`` holds a control character (newline, tab, ESC, …)
    that would break a script or a log line it is written into; None when it is clean."""
    bad = next((ch for ch in value if unicodedata.category(ch) == "Cc"), None)
    if bad is None:
        return None
    return f"{what} {value!r} holds the control character {bad!r}; use a name without one"
