"""An independent Megatron "MMIDIDX" v1 writer and reader (struct + numpy, from the documented
layout in docs/data.md), and small corpora for the data tests. Nothing here imports
``stages.data``: the tests compare the project's files against these."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}


def write_megatron(prefix: Path, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """PREFIX.bin + PREFIX.idx holding ``docs`` (one sequence per document)."""
    code = {np.dtype(v): k for k, v in CODES.items()}[np.dtype(dtype)]
    lengths = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64))]) * np.dtype(dtype).itemsize
    with open(f"{prefix}.bin", "wb") as fh:
        for d in docs:
            fh.write(np.asarray(d, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00")
        fh.write(struct.pack("<Q", 1))
        fh.write(struct.pack("<B", code))
        fh.write(struct.pack("<Q", len(docs)))
        fh.write(struct.pack("<Q", len(docs) + 1))
        fh.write(lengths.tobytes())
        fh.write(pointers.astype(np.int64).tobytes())
        fh.write(np.arange(len(docs) + 1, dtype=np.int64).tobytes())


def read_megatron(prefix: Path | str) -> list[np.ndarray]:
    """Every sequence of PREFIX.bin/.idx, read with struct from the documented layout."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", raw, 18)
    assert version == 1 and n_doc == n_seq + 1
    off = 34
    lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=off)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
    assert list(doc_idx) == list(range(n_seq + 1))
    assert len(raw) == off + 12 * n_seq + 8 * n_doc
    dtype = np.dtype(CODES[code])
    data = Path(f"{prefix}.bin").read_bytes()
    assert len(data) == int(lengths.sum()) * dtype.itemsize
    return [np.frombuffer(data, dtype=dtype, count=int(n), offset=int(p)).copy()
            for n, p in zip(lengths, pointers, strict=True)]


def read_prepared(prefix: Path | str) -> list[np.ndarray]:
    """All documents of a prepare-data output, shards in the manifest's order."""
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    docs = []
    for name in manifest["shards"]:
        docs += read_megatron(Path(prefix).parent / name)
    return docs


TEXTS = ["héllo wörld — ünïcode ✓\n", "def f(x):\n    return x * 2\n", "日本語のテキスト", "plain ascii"]


def write_inputs(root: Path, zst: bool = True, parquet: bool = True) -> tuple[list[Path], list[str]]:
    """Text files, a jsonl, a jsonl.gz, (a jsonl.zst, a parquet): (paths, documents in order)."""
    root.mkdir(parents=True, exist_ok=True)
    paths, docs = [], []
    for i in range(5):
        p = root / f"doc{i}.txt"
        text = f"document {i}: " + TEXTS[i % 4] * (1 + i)
        p.write_text(text, encoding="utf-8")
        paths.append(p)
        docs.append(text)
    records = [f"record {i} " + TEXTS[i % 4] * (i % 3 + 1) for i in range(40)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(records)))
    paths.append(root / "a.jsonl")
    docs += records
    gz = [f"gz {i} " + TEXTS[(i + 1) % 4] for i in range(7)]
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    paths.append(root / "b.jsonl.gz")
    docs += gz
    if zst:
        import zstandard

        zs = [f"zst {i} " + TEXTS[(i + 2) % 4] for i in range(6)]
        data = "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()
        (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        paths.append(root / "c.jsonl.zst")
        docs += zs
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [f"parquet row {i} " + TEXTS[(i + 3) % 4] for i in range(9)]
        pq.write_table(pa.table({"text": rows, "n": list(range(9))}), root / "d.parquet", row_group_size=4)
        paths.append(root / "d.parquet")
        docs += rows
    return paths, docs


def prepare_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m stages.prepare_data ARGS`` (the prepare-data console script's module)."""
    return subprocess.run([sys.executable, "-m", "stages.prepare_data", *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=300)
