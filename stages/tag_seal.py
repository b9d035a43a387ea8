"""The seal of a ``ds_ckpt/<tag>``: every file's size and SHA-256, checked before a resume.

Rank 0 writes ``TAG/.complete`` once every rank has saved ``TAG`` (``stages.rank.elastic.seal``)::

    {"format": 1, "files": {"mp_rank_00_model_states.pt": {"size": 1234, "sha256": "…"}, …}}

A tag is sound when its seal lists exactly the regular files the tag holds and each still
has its size and digest: a file overwritten in place (still a valid zip), copied in from
another tag, deleted, added or replaced by a symlink makes it unsound, and the resume
falls back to the newest sound tag with one warning (``stages.rank.elastic.pick_tag``).

The digests are shared out: with ``world`` ranks, rank ``r`` reads the ``r``-th of every
``world`` files in name order (:func:`digests`, :func:`problem`), so sealing and checking a
tag reads each byte once across the job, not once per rank or all on rank 0.

Note: an empty ``.complete`` is the seal of older flm-growth versions (no digests); such a
tag is judged as before: every ``*.pt`` must open as a zip archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from flmcore.io import write_text_atomic

SEAL_NAME = ".complete"
SEAL_FORMAT = 1


def _digest(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(tag_dir: Path) -> dict[str, os.stat_result]:
    """Every entry of the tag but the seal, by name (lstat: a symlink is not followed)."""
    return {p.name: p.lstat() for p in sorted(tag_dir.iterdir()) if p.name != SEAL_NAME}


def share(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's part of ``names`` (every ``world``-th in name order, from ``rank``)."""
    return sorted(names)[rank::world]


def digests(tag_dir: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of this rank's share of the regular files of ``tag_dir``."""
    regular = {name: st for name, st in _files(tag_dir).items() if stat.S_ISREG(st.st_mode)}
    return {name: {"size": regular[name].st_size, "sha256": _digest(tag_dir / name)}
            for name in share(list(regular), rank, world)}


def write_seal(tag_dir: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Seal ``tag_dir`` with ``files`` (every rank's :func:`digests`, merged), or digest
    every file here when None; written last, atomically."""
    files = digests(tag_dir) if files is None else files
    write_text_atomic(tag_dir / SEAL_NAME,
                      json.dumps({"format": SEAL_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")


def _legacy_problem(tag_dir: Path) -> str | None:
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        return "empty (no .pt files)"
    for path in files:
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"truncated or corrupt ({path.name}: {err})"
    return None


def problem(tag_dir: Path, rank: int = 0, world: int = 1) -> str | None:
    """None for a sealed tag whose files are all as sealed; else what is wrong, phrased to
    follow "TAG is …". Sizes and names are checked whole; digests only for this rank's
    :func:`share` (every rank's answer together judge the tag)."""
    seal = tag_dir / SEAL_NAME
    if not seal.is_file():
        return "incomplete (no seal: the save did not finish on every rank)"
    text = seal.read_text()
    if not text.strip():
        return _legacy_problem(tag_dir)
    try:
        sealed: dict[str, Any] = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"damaged (its seal {SEAL_NAME} is not readable)"
    present = _files(tag_dir)
    if not any(name.endswith(".pt") for name in sealed):
        return "empty (no .pt files)"
    mine = set(share(list(sealed), rank, world))
    for name, want in sorted(sealed.items()):
        st = present.get(name)
        if st is None:
            return f"damaged ({name}, listed in its seal, is missing)"
        if not stat.S_ISREG(st.st_mode):
            return f"damaged ({name} is not a regular file)"
        if st.st_size != want.get("size"):
            return f"truncated ({name} has {st.st_size} bytes, {want.get('size')} when sealed)"
        if name in mine and _digest(tag_dir / name) != want.get("sha256"):
            return f"damaged ({name} differs from its sealed digest)"
    extra = sorted(set(present) - set(sealed))
    if extra:
        return f"damaged ({extra[0]} was added after it was sealed)"
    return None
