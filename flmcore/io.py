"""One atomic writer for every package (JSON records, scripts, summaries).

Note: a file is written next to its destination and renamed over it (``os.replace``), so a
reader sees the old file or the new one, never half of one; the temporary name starts with
a dot and ends in ``.partial`` so listings and globs of the real names skip it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flmcore.safe_files import write_fresh


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` whole or not at all (``mode``: chmod before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write_fresh(tmp, text)  # a symlink planted at the temporary name is never followed
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = False) -> Path:
    """``data`` as indented JSON (one trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
