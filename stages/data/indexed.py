"""Megatron-LM's indexed dataset ("MMIDIDX" version 1): one reader, one writer.

A dataset ``PREFIX`` is two files (layout in ``docs/data.md``)::

    PREFIX.bin   the token ids of every sequence, back to back, in one dtype
    PREFIX.idx   little-endian header + per-sequence tables:
                 b"MMIDIDX\\x00\\x00"   magic (9 bytes)
                 <Q  version = 1
                 <B  dtype code (DTYPE_CODES)
                 <Q  sequence count S
                 <Q  document count D + 1
                 int32[S] sequence lengths, int64[S] byte offsets into .bin,
                 int64[D + 1] document indices (0, …, S)

Every sequence written here is one document followed by EOS (Megatron's
``preprocess_data.py --append-eod``), so S = D and the document indices are 0..S. Files
written by Megatron itself with sentence splitting have several sequences per document;
the reader serves sequences, which is what Megatron's GPTDataset samples from too.

Note: megatron-core's own ``IndexedDataset`` reads this format, but importing it imports
all of ``megatron.core`` (9–14 s and four warnings per process on the test machine), for a
reader that is ~60 lines of numpy; the tests use it as the independent check instead.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from stages.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
BIN_SUFFIX, IDX_SUFFIX = ".bin", ".idx"


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{BIN_SUFFIX}")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{IDX_SUFFIX}")


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """``PREFIX.idx`` for sequences of ``lengths`` stored back to back in ``dtype``."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths):
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], len(lengths), len(lengths) + 1))
        fh.write(lengths.tobytes(order="C"))
        fh.write(pointers.tobytes(order="C"))
        fh.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))


class IndexedWriter:
    """Append documents to ``PREFIX.bin``; ``finish`` writes ``PREFIX.idx`` last.

    The ``.idx`` is written only after every token is on disk, so a dataset whose ``.idx``
    exists is complete; an interrupted writer leaves at most a ``.bin`` without one.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._fh = open(bin_path(prefix), "wb")
        self.lengths: list[int] = []
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._fh.write(arr.tobytes(order="C"))
        self.lengths.append(len(arr))
        self.tokens += len(arr)

    def finish(self) -> None:
        self._fh.close()
        write_index(idx_path(self.prefix), self.dtype, np.asarray(self.lengths, dtype=np.int32))

    def abort(self) -> None:
        self._fh.close()


class IndexedDataset:
    """A read-only, memory-mapped Megatron dataset; ``validate`` checks .idx against .bin.

    The O(1) checks (header, exact .idx size, .bin size = last offset + last length) run
    on every open; ``full=True`` also checks that the offsets are the running sum of the
    lengths (O(sequences), done once by the orchestrator and by prepare-data).
    """

    def __init__(self, prefix: str | Path, full: bool = False):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not path.is_file():
                raise DataError(f"{path}: not found (a Megatron dataset PREFIX needs PREFIX.bin and PREFIX.idx)")
        size = ipath.stat().st_size
        with open(ipath, "rb") as fh:
            head = fh.read(HEADER.size)
        if len(head) < HEADER.size:
            raise DataError(f"{ipath}: {size} bytes is too short for a Megatron .idx header")
        magic, version, code, n_seq, n_doc = HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{ipath}: not a Megatron MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise DataError(f"{ipath}: MMIDIDX version {version}, only {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise DataError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if self.dtype.kind == "f":
            raise DataError(f"{ipath}: dtype code {code} ({self.dtype.name}) is a float type; token ids must be "
                            f"integers (rebuild it with prepare-data)")
        expect = HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if size not in (expect, expect + n_seq):  # + an optional int8 mode per sequence
            raise DataError(f"{ipath}: {size} bytes, but its header ({n_seq} sequences, {n_doc} "
                            f"document indices) needs {expect}; the .idx is truncated or not this format")
        self.lengths = np.memmap(ipath, dtype=np.int32, mode="r", offset=HEADER.size, shape=(n_seq,)) \
            if n_seq else np.zeros(0, np.int32)
        self.pointers = np.memmap(ipath, dtype=np.int64, mode="r", offset=HEADER.size + 4 * n_seq,
                                  shape=(n_seq,)) if n_seq else np.zeros(0, np.int64)
        self.document_indices = np.memmap(ipath, dtype=np.int64, mode="r", offset=HEADER.size + 12 * n_seq,
                                          shape=(n_doc,))
        bsize = bpath.stat().st_size
        need = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if bsize != need:
            raise DataError(f"{bpath}: {bsize} bytes, but {ipath} describes {need}; the .idx does not "
                            f"match its .bin (rebuild both with prepare-data)")
        if full and n_seq:
            expected = np.zeros(n_seq, dtype=np.int64)
            np.cumsum(np.asarray(self.lengths[:-1], dtype=np.int64) * self.dtype.itemsize, out=expected[1:])
            bad = np.flatnonzero(expected != self.pointers)
            if len(bad) or (np.asarray(self.lengths) < 0).any():
                raise DataError(f"{ipath}: sequence {int(bad[0]) if len(bad) else 0} does not start where "
                                f"the previous one ends; the .idx does not match its .bin")
        self.tokens = np.memmap(bpath, dtype=self.dtype, mode="r") if bsize else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(len(self.tokens))

    def starts(self) -> np.ndarray:
        """Token offset of every sequence in ``.bin`` (int64)."""
        return np.asarray(self.pointers, dtype=np.int64) // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start:start + int(self.lengths[i])])


def exists(prefix: str | Path) -> bool:
    return idx_path(prefix).is_file() and bin_path(prefix).is_file()


def remove(prefix: str | Path) -> None:
    for path in (bin_path(prefix), idx_path(prefix)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
