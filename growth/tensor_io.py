"""Tensor-at-a-time safetensors I/O for the streaming commands (apply, verify, export-hf).

Reading: :class:`TensorSource` reads one tensor's bytes with ``readinto`` at the offsets
``CheckpointReader`` already parsed, instead of ``safe_open``'s memory map. A map keeps
every page it touched resident (and counted in RSS) until the file is closed, so reading a
2 TB model through it looks like 2 TB of memory; a plain read holds one tensor only.

Writing: :func:`write_shard_streaming` writes the header first (every shape is known in
advance) and then each tensor's bytes as soon as it is produced, so a shard of any size
costs one tensor of memory. The file is a standard safetensors file (8-byte little-endian
header length, JSON header padded with spaces to 8 bytes, data in header order), written
under a temporary name and renamed, so a shard either exists complete or not at all.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from growth.checkpoint import SAFETENSORS_DTYPES, CheckpointError, CheckpointReader, read_header

ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 24  # elements cast and written at a time (64 MB of fp32)


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class TensorSource:
    """Read whole tensors of a checkpoint with plain file reads (no memory map).

    ``get(name, dtype)`` has the signature of ``CheckpointReader.get``; a tied HF
    checkpoint's ``lm_head.weight`` reads the embedding, as the reader does.
    """

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.directory = reader.directory
        self._files: dict[str, BinaryIO] = {}
        self._data_start: dict[str, int] = {}

    def locate(self, name: str) -> tuple[str, str]:
        """(stored name, file) of ``name``."""
        wm = self.reader.weight_map
        if name in wm:
            return name, wm[name]
        if name == "lm_head.weight" and self.reader.tied:
            return "model.embed_tokens.weight", wm["model.embed_tokens.weight"]
        raise CheckpointError(f"{self.directory}: tensor '{name}' is not in this checkpoint")

    def _open(self, fname: str) -> BinaryIO:
        fh = self._files.get(fname)
        if fh is None:
            fh = open(self.directory / fname, "rb")  # noqa: SIM115 (kept open until close())
            (n,) = struct.unpack("<Q", fh.read(8))
            self._files[fname], self._data_start[fname] = fh, 8 + n
        return fh

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, fname = self.locate(name)
        info = self.reader.headers[fname][stored]
        start, stop = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        fh = self._open(fname)
        fh.seek(self._data_start[fname] + start)
        if stop > start and fh.readinto(_as_bytes(out)) != stop - start:
            raise CheckpointError(f"{self.directory / fname}: tensor '{stored}' is cut short "
                                  f"(file changed while reading?)")
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def chunks(self, name: str, elements: int = 1 << 24) -> Iterator[torch.Tensor]:
        """``name`` flattened, in pieces of at most ``elements`` (stored dtype): bounded
        memory for statistics over tensors of any size."""
        stored, fname = self.locate(name)
        info = self.reader.headers[fname][stored]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        size = torch.empty((), dtype=dtype).element_size()
        fh = self._open(fname)
        for first in range(0, (stop - start) // size, elements):
            piece = torch.empty(min(elements, (stop - start) // size - first), dtype=dtype)
            fh.seek(self._data_start[fname] + start + first * size)
            if fh.readinto(_as_bytes(piece)) != piece.numel() * size:
                raise CheckpointError(f"{self.directory / fname}: tensor '{stored}' is cut short")
            yield piece

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def shard_header(entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed, 8-byte padded safetensors header for ``entries`` in order."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = nbytes_of(shape, dtype)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard_streaming(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                          produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                          after_tensor: Callable[[str, int], None] | None = None,
                          label: Callable[[str], str] = lambda name: f"tensor '{name}'") -> None:
    """Write a safetensors shard whose tensors ``produce(name)`` returns one at a time.

    ``produce`` returns the tensor, or an iterable of its consecutive row blocks (so a
    tensor bigger than memory can be streamed). Together they must have the announced shape;
    it is cast to the announced dtype piece by piece as it is written (so a float32 result
    costs no extra bf16 copy). The file is written as ``<name>.partial`` and renamed when
    complete; on any error the partial file is removed. ``after_tensor(name, nbytes)`` is
    called after each piece is written; ``label(name)`` names a tensor in error messages
    (e.g. with the source it came from).

    Note: one background thread writes tensor k while ``produce`` computes tensor k + 1
    (both release the GIL), so I/O and growth math overlap; one finished tensor (or row
    block) is in flight at a time, never more.
    """
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as fh, ThreadPoolExecutor(1, thread_name_prefix="shard-writer") as pool:
            fh.write(shard_header(entries))
            pending: tuple[Future, str, int] | None = None
            for name, shape, dtype in entries:
                produced = produce(name)
                pieces = [produced] if isinstance(produced, torch.Tensor) else produced
                rows = 0
                for piece in pieces:
                    if tuple(piece.shape[1:]) != tuple(shape[1:]) or (
                            len(shape) == 0 and piece.dim() != 0):
                        raise CheckpointError(f"{path}: {label(name)} came out {list(piece.shape)}, "
                                              f"expected {list(shape)}")
                    rows += piece.shape[0] if piece.dim() else 1
                    if pending is not None:
                        _finish(pending, after_tensor)
                    pending = (pool.submit(_write_tensor, fh, piece, dtype, path, label(name)), name,
                               nbytes_of(piece.shape, dtype))
                    del piece
                if rows != (shape[0] if len(shape) else 1):
                    raise CheckpointError(f"{path}: {label(name)} came out with {rows} rows, "
                                          f"expected {list(shape)}")
            if pending is not None:
                _finish(pending, after_tensor)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if str(path) in str(err):
            raise
        wrapped = OSError(f"{path}: {err.strerror or err}")
        wrapped.errno = err.errno
        raise wrapped from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finish(pending: tuple[Future, str, int], after_tensor: Callable[[str, int], None] | None) -> None:
    future, name, size = pending
    future.result()
    if after_tensor is not None:
        after_tensor(name, size)


def _write_tensor(fh: BinaryIO, tensor: torch.Tensor, dtype: torch.dtype, path: Path, label: str) -> None:
    """Cast to ``dtype`` and write in CHUNK-element pieces (no full-size cast copy), refusing
    NaN/inf so that an overflowing cast (e.g. to float16) or a broken source is caught."""
    flat = tensor.contiguous().reshape(-1)
    for chunk in flat.split(CHUNK):
        out = chunk if chunk.dtype == dtype else chunk.to(dtype)
        # A sum is finite iff every element is (torch accumulates in fp32; a sum too big for
        # the dtype only sends us to the exact check), and it is ~10× cheaper than
        # isfinite().all(), which materialises a bool tensor.
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise CheckpointError(f"{path}: {label} holds NaN or inf as "
                                  f"{str(dtype).replace('torch.', '')} (values out of the dtype's "
                                  f"range, or NaN/inf in the source)")
        try:
            fh.write(_as_bytes(out))
        except OSError as err:  # disk full, file size limit, I/O error
            wrapped = OSError(f"{path}: {err.strerror or err} while writing {label}")
            wrapped.errno = err.errno
            raise wrapped from None


def shard_complete(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> bool:
    """True when ``path`` is a whole safetensors file holding exactly ``entries``.

    Note: shards are renamed into place only when complete, so a header that parses and a
    size that matches it mean the data was written in full by a run of the same plan.
    """
    if not path.is_file():
        return False
    try:
        header, _ = read_header(path)
    except CheckpointError:
        return False
    expected = {n: (tuple(s), ST_NAMES[d]) for n, s, d in entries}
    return {n: (tuple(i["shape"]), i["dtype"]) for n, i in header.items()} == expected
