"""The safetensors file format, one tensor at a time: strict header parsing, exact reads,
and a header-first streaming shard writer that digests the data while it writes.

Reading (:func:`read_header`, :func:`read_tensor`): the header is validated as strictly as
``safetensors.safe_open`` does — entries sorted by offset, contiguous from 0, no overlap,
each tensor's byte count exactly ``numel × itemsize``, the last one ending at the end of
the file. A tensor is read with plain reads (no memory map: a map keeps every touched page
resident until the file closes) and a read must deliver exactly the bytes it asked for.

Writing (:func:`write_shard_streaming`): every shape is known in advance, so the header is
written first and each tensor's bytes follow as soon as they are produced; a shard of any
size costs one tensor of memory. A sha256 of the data section is computed on the way and
stored in the header's ``__metadata__`` (``sha256``): the shard carries its own content
digest. The file is written as ``<name>.partial`` and renamed when complete, so a shard
either exists whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from flmcore.errors import FlmError
from flmcore.safe_files import open_nofollow
from growth.pipeline import CHUNK, WritePipeline, add_profile


class CheckpointError(FlmError):
    """A checkpoint is unusable; the one-line message names the file and tensor/field."""


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64}
ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
PARTIAL_SUFFIX = ".partial"
READ_CHUNK = 1 << 26  # bytes per read call when hashing or reading
MAX_HEADER = 100 * 1024**2  # safetensors' own limit
DIGEST_KEY = "sha256"  # __metadata__ key holding the data section's sha256
_PLACEHOLDER = "0" * 64


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------- headers
def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(entries, __metadata__, data start) of a safetensors file, strictly validated.

    Entries keep the file's JSON order; each has ``dtype``, ``shape`` (tuple) and
    ``data_offsets`` relative to the data start. Nothing but the header is read.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8 or n > MAX_HEADER:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {n} bytes, file has {size})")
            raw = fh.read(n)
        header = json.loads(raw)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing shard file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a shard file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must map to strings)")
    spans = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            start, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            if any(not isinstance(x, int) or isinstance(x, bool) for x in
                   [*info["data_offsets"], *info["shape"]]):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if any(s < 0 for s in shape) or start < 0:
            raise CheckpointError(f"{path}: tensor '{name}' has a negative shape or offset")
        need = math.prod(shape) * ITEMSIZE[dtype]
        if stop - start != need:
            raise CheckpointError(f"{path}: tensor '{name}' has data_offsets [{start}, {stop}] "
                                  f"({stop - start} bytes) but shape {list(shape)} {dtype} needs "
                                  f"{need}; the header is corrupt")
        info["shape"] = shape
        info["data_offsets"] = (start, stop)
        spans.append((start, stop, name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes"
            raise CheckpointError(f"{path}: tensor '{name}' at offset {start} {what}; "
                                  f"the header is corrupt")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded shard (header needs {8 + n + end} bytes, "
                              f"file has {size}); re-copy or regenerate it")
    return header, metadata, 8 + n


def read_exact(fh: BinaryIO, offset: int, out: memoryview, path: Path, what: str) -> None:
    """Fill ``out`` with the bytes at ``offset``: exactly ``len(out)`` of them or an error.
    Positional reads (pread): threads sharing ``fh`` never move each other's offset."""
    fd = fh.fileno()
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:]], offset + got)
        if not n:
            raise CheckpointError(f"{path}: {what} is cut short ({got} of {len(out)} bytes; "
                                  f"file changed while reading?)")
        got += n


def data_digest(path: Path, data_start: int) -> str:
    """sha256 of a file's data section (everything after the header)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(data_start)
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class TensorSource:
    """A reader's tensors through the old ``TensorSource(reader)`` interface.

    Note: :class:`growth.checkpoint.CheckpointReader` is the one reader; this wrapper only
    keeps ``with TensorSource(reader) as s: s.get(...)`` call sites working.
    """

    def __init__(self, reader: Any):
        self.reader = reader
        self.directory = reader.directory

    def locate(self, name: str) -> tuple[str, str]:
        return self.reader._locate(name)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.reader.get(name, dtype)

    def chunks(self, name: str, elements: int = CHUNK) -> Iterator[torch.Tensor]:
        return self.reader.chunks(name, elements)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------- writing
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
                          label: Callable[[str], str] = lambda name: f"tensor '{name}'",
                          check_finite: bool = True, closer: Closer | None = None) -> str:
    """Write a safetensors shard whose tensors ``produce(name)`` returns one at a time;
    returns the sha256 of its data section (also stored in its ``__metadata__``).

    ``produce`` returns the tensor, or an iterable of its consecutive row blocks (so a
    tensor bigger than memory can be streamed). Together they must have the announced shape;
    it is cast to the announced dtype piece by piece as it is written. The file is written as
    ``<name>.partial`` (a new file: a symlink there is never followed), fsynced and renamed
    when complete; on any error the partial file is removed. ``after_tensor(name, nbytes)``
    is called after each piece is written; ``label(name)`` names a tensor in error messages.

    Note: the pieces go through a :class:`growth.pipeline.WritePipeline` — cast, sha256
    and write on their own threads, up to three pieces in flight — while ``produce``
    computes the next ones (torch, hashlib and file writes release the GIL). With a
    ``closer`` the fsync and rename run on its thread while the caller goes on to the next
    shard (the caller waits for it with ``closer.wait()`` before relying on the file).
    """
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    header = shard_header(entries, {"format": "pt", DIGEST_KEY: _PLACEHOLDER})
    digest = hashlib.sha256()
    try:
        with _open_new(tmp) as fh:
            fh.write(header)
            _stream_entries(fh, digest, path, entries, produce, after_tensor, label, check_finite)
            hexdigest = digest.hexdigest()
            fh.seek(header.index(_PLACEHOLDER.encode()))
            fh.write(hexdigest.encode())
            fh.flush()
        if closer is None:
            _publish(tmp, path)
        else:
            closer.submit(lambda: _publish(tmp, path))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hexdigest


def _naming(err: OSError, path: Path) -> OSError:
    if str(path) in str(err):
        return err
    wrapped = OSError(f"{path}: {err.strerror or err}")
    wrapped.errno = err.errno
    return wrapped


def _publish(tmp: Path, path: Path) -> None:
    """fsync the finished ``tmp`` and rename it to ``path`` (removed on failure)."""
    try:
        fd = open_nofollow(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, path) from None


class Closer:
    """Publishes finished shards (fsync + rename) on one background thread, at most one
    behind the writer, so a shard's flush to disk overlaps the next shard's production.
    Errors surface at the next :meth:`submit` or at :meth:`wait` / :meth:`close`."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-close")
        self.pending: Future | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        self.pending = self.pool.submit(fn)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _open_new(path: Path) -> BinaryIO:
    """``path`` opened for writing as a new file (whatever was there removed, a symlink never
    followed: ``O_EXCL | O_NOFOLLOW``)."""
    path.unlink(missing_ok=True)
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "w+b")


def _stream_entries(fh: BinaryIO, digest: Any, path: Path,
                    entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                    after_tensor: Callable[[str, int], None] | None,
                    label: Callable[[str], str], check_finite: bool) -> None:
    """Produce ``entries`` in order and hand every piece to a write pipeline (checking each
    piece's shape); returns when every byte is hashed and written."""
    pipe = WritePipeline(fh, digest, path, CheckpointError, check_finite, after_tensor)
    try:
        for name, shape, dtype in entries:
            start = time.thread_time()
            produced = produce(name)
            pieces = iter([produced] if isinstance(produced, torch.Tensor) else produced)
            rows = 0
            while (piece := next(pieces, None)) is not None:
                add_profile("produce", time.thread_time() - start)
                if tuple(piece.shape[1:]) != tuple(shape[1:]) or (len(shape) == 0 and piece.dim() != 0):
                    raise CheckpointError(f"{path}: {label(name)} came out {list(piece.shape)}, "
                                          f"expected {list(shape)}")
                rows += piece.shape[0] if piece.dim() else 1
                pipe.submit(piece, dtype, name, label(name), nbytes_of(piece.shape, dtype))
                del piece
                start = time.thread_time()
            add_profile("produce", time.thread_time() - start)
            if rows != (shape[0] if len(shape) else 1):
                raise CheckpointError(f"{path}: {label(name)} came out with {rows} rows, "
                                      f"expected {list(shape)}")
        pipe.close()
    except BaseException:
        pipe.abort()
        raise


def write_shard_part(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                     first: int, last: int,
                     produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                     after_tensor: Callable[[str, int], None] | None = None,
                     label: Callable[[str], str] = lambda name: f"tensor '{name}'",
                     check_finite: bool = True) -> str:
    """Write ``entries[first:last]`` of a shard at their place in ``<name>.partial`` (shared
    by the workers writing the other parts; created and sized by whichever comes first,
    never through a symlink) and fdatasync it; returns the sha256 of the bytes written.
    :func:`seal_shard` finishes the file once every part is there."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    header = shard_header(entries, {"format": "pt", DIGEST_KEY: _PLACEHOLDER})
    offset = len(header) + sum(nbytes_of(s, d) for _, s, d in entries[:first])
    size = len(header) + sum(nbytes_of(s, d) for _, s, d in entries)
    digest = hashlib.sha256()
    try:
        fd = open_nofollow(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # every part sizes it the same: never cuts another's bytes
            fh.seek(offset)
            _stream_entries(fh, digest, path, entries[first:last], produce, after_tensor, label, check_finite)
            fh.flush()
            os.fdatasync(fd)
    except OSError as err:
        if str(path) in str(err):
            raise
        wrapped = OSError(f"{path}: {err.strerror or err}")
        wrapped.errno = err.errno
        raise wrapped from None
    return digest.hexdigest()


def part_digest(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                first: int, last: int) -> str | None:
    """sha256 of what ``<name>.partial`` holds where ``entries[first:last]`` go (None: no file)."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    start = len(shard_header(entries, {"format": "pt", DIGEST_KEY: _PLACEHOLDER})) + sum(
        nbytes_of(s, d) for _, s, d in entries[:first])
    left = sum(nbytes_of(s, d) for _, s, d in entries[first:last])
    h = hashlib.sha256()
    try:
        fd = open_nofollow(tmp, os.O_RDONLY)
    except (FileNotFoundError, OSError):
        return None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        fh.seek(start)
        while left > 0 and (chunk := fh.read(min(READ_CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest() if left == 0 else None


def seal_shard(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> str:
    """Finish a shard written in parts: hash its data section, write the header with the
    digest, fsync, rename into place. Returns the digest."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    placeholder = shard_header(entries, {"format": "pt", DIGEST_KEY: _PLACEHOLDER})
    hexdigest = data_digest(tmp, len(placeholder))
    header = shard_header(entries, {"format": "pt", DIGEST_KEY: hexdigest})
    fd = open_nofollow(tmp, os.O_RDWR)
    with os.fdopen(fd, "r+b") as fh:
        fh.write(header)
        fh.flush()
        os.fsync(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return hexdigest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard_complete(path: Path, entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                   verify_data: bool = True) -> str | None:
    """The shard's digest when ``path`` is a whole safetensors file holding exactly
    ``entries`` with a digest that matches its data; None otherwise.

    Note: names, shapes and dtypes alone prove nothing about the data (a shard written for
    another source has the same header); the stored digest is re-checked against the bytes
    unless ``verify_data`` is false.
    """
    if not path.is_file():
        return None
    try:
        header, meta, start = read_header(path)
    except CheckpointError:
        return None
    expected = {n: (tuple(s), ST_NAMES[d]) for n, s, d in entries}
    if {n: (tuple(i["shape"]), i["dtype"]) for n, i in header.items()} != expected:
        return None
    stored = meta.get(DIGEST_KEY)
    if not stored or stored == _PLACEHOLDER:
        return None
    if verify_data and data_digest(path, start) != stored:
        return None
    return stored
