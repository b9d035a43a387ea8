"""The small process and file helpers every package shares: one atomic writer, one free port,
one "die with the parent" for child processes.

Note: a file is written next to its destination and renamed over it (``os.replace``), so a
reader sees the old file or the new one, never half of one; the temporary name starts with
a dot and ends in ``.partial`` so listings and globs of the real names skip it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` whole or not at all (``mode``: chmod before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = False) -> Path:
    """``data`` as indented JSON (one trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child before exec (``preexec_fn``): the kernel sends it ``sig`` when its parent
    dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
