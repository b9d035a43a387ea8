"""Wraps ``CheckpointReader.get`` so each call is logged (see tests/helpers/readcount/sitecustomize.py)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

_LOG: list[str] = []  # where this process logs (the latest install wins)


def install(log_path: str | os.PathLike) -> None:
    from growth.checkpoint import CheckpointReader

    _LOG[:] = [str(log_path)]
    if getattr(CheckpointReader.get, "counted", False):
        return
    plain = CheckpointReader.get

    def get(self, name, dtype=None):
        with open(_LOG[0], "a") as fh:
            fh.write(f"{os.getpid()}\t{Path(self.directory).resolve()}\t{name}\n")
        return plain(self, name, dtype)

    get.counted = True
    CheckpointReader.get = get


def reads(log_path: Path, directory: Path, pid: int | None = None,
          other_than: int | None = None) -> Counter[str]:
    """Tensor → reads from ``directory`` (by process ``pid``, or by every process but ``other_than``)."""
    out: Counter[str] = Counter()
    if not log_path.is_file():
        return out
    for line in log_path.read_text().splitlines():
        who, where, name = line.split("\t")
        if where != str(directory.resolve()):
            continue
        if (pid is not None and int(who) != pid) or (other_than is not None and int(who) == other_than):
            continue
        out[name] += 1
    return out
