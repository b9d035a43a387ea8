"""The benchmark's data: the embedded corpus cut into short documents, and a fixed eval set.

Why not ``data=embedded`` as it is (found on 48c50fc, docs/benchmarks.md): its 430
standard-library files range up to 757k tokens (one file is ~10% of the corpus); the
stream reads documents back to back, so a run whose last ~16% of steps fall inside that
one file ends specialised to it (scratch_small at 8e11 FLOPs got *worse* than at
5.66e11 on every seed); and ``eval_fraction`` holds out 6 documents, of which 16 × 8
windows were read. Here:

- **train**: the same files as the embedded corpus (the first ``max_bytes`` of the
  standard library in its hashed order), each cut at line ends into documents of at most
  ``chunk_bytes``: the stream moves to another random file every few batches;
- **eval**: the *next* files of that order (never trained on), cut the same way, up to
  ``eval_bytes``: fixed for every arm, seed and budget (``data.eval_paths``), so
  ``data.seed`` varies only the training order.

Both are prepared once into RUN_DIR/corpus as indexed datasets (``data=indexed``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TRAIN, EVAL = "train", "eval"


def chunks(text: str, limit: int) -> list[str]:
    """``text`` cut at line ends into pieces of at most ``limit`` characters (a longer line
    is cut where it must); empty pieces are dropped."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                out.append("".join(cur))
                cur, size = [], 0
            out.append(line[:limit])
            line = line[limit:]
        if size + len(line) > limit and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def split_files(max_bytes: int, eval_bytes: int) -> tuple[list[Path], list[Path]]:
    """(train files: the embedded corpus's, eval files: the ones after them in the same order)."""
    from stages.data.stage import embedded_files

    _, every = embedded_files(max_bytes + eval_bytes + (1 << 30))
    train, total = [], 0
    for f in every:  # the embedded corpus's own rule: files in order while they fit
        size = f.stat().st_size
        if total + size <= max_bytes:
            train.append(f)
            total += size
    chosen = set(train)
    rest = [f for f in every if f not in chosen]
    held, total = [], 0
    for f in rest:
        if total >= eval_bytes:
            break
        held.append(f)
        total += f.stat().st_size
    return train, held


def _write_jsonl(path: Path, files: list[Path], limit: int) -> dict[str, int]:
    lines = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        lines.extend(json.dumps({"text": c}) for c in chunks(text, limit))
    body = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != body:  # unchanged content keeps its mtime (the cache key)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return {"files": len(files), "documents": len(lines), "bytes": sum(f.stat().st_size for f in files)}


def build(root: Path, max_bytes: int, eval_bytes: int, chunk_bytes: int) -> dict[str, Any]:
    """Prepare (once) the train and eval datasets under ``root``; returns their prefixes
    and counts (``overrides``: the train-stage overrides that select them)."""
    from stages.data.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    train_files, eval_files = split_files(max_bytes, eval_bytes)
    out: dict[str, Any] = {"chunk_bytes": chunk_bytes}
    for name, files in ((TRAIN, train_files), (EVAL, eval_files)):
        src = root / f"{name}.jsonl"
        out[name] = _write_jsonl(src, files, chunk_bytes)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        prefix = root / f"{name}-{digest}"
        if not Path(str(prefix) + ".json").is_file():
            prepare([str(src)], "byte", prefix, progress=False)
        out[name]["prefix"] = str(prefix)
    out["overrides"] = ["data=indexed", f"data.paths=[{out[TRAIN]['prefix']}]",
                        f"data.eval_paths=[{out[EVAL]['prefix']}]"]
    return out
