"""Input documents for prepare-data: listing, work units, streaming readers.

One text file is one document; a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` line is one
document (its ``field``); a parquet row is one document (its ``field`` column). Every
reader streams: a jsonl is read line by line, a parquet file batch by batch, so memory
stays at one unit's buffers whatever the file size. Plain ``.jsonl`` files are cut into
byte ranges at line boundaries so that several workers can share one big file; compressed
files and parquet files are one unit each.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
MIN_UNIT_BYTES, MAX_UNIT_BYTES, UNITS_PER_INPUT = 1 << 20, 64 << 20, 64


def kind_of(path: Path) -> str:
    name = path.name
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    return "text"


def list_inputs(inputs: list[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), in order.

    A directory contributes its text/jsonl/parquet files sorted by path; a file named
    directly is read whatever its suffix (as text unless jsonl/parquet).
    """
    if not inputs:
        raise DataError("no input given: name text/jsonl/parquet files, directories or globs")
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files: list[Path] = []
    for spec in inputs:
        if any(ch in spec for ch in "*?["):
            found = sorted(Path(p).resolve() for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"{spec}: input glob matches no file")
            files.extend(found)
            continue
        path = Path(spec).expanduser().resolve()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(known))
            if not found:
                raise DataError(f"{path}: input directory holds no {', '.join(known)} files")
            files.extend(found)
        elif path.exists():
            raise DataError(f"{path}: input is not a regular file (a FIFO, socket or device); give a file")
        else:
            raise DataError(f"{path}: input not found")
    return files


@dataclass
class Unit:
    """One worker task: whole files, or the byte range [start, end) of one plain jsonl."""

    index: int
    kind: str
    paths: list[str] = field(default_factory=list)
    start: int = 0
    end: int = -1  # -1 = to the end of the file
    size: int = 0  # input bytes, for the progress bar


def unit_bytes(total: int) -> int:
    """Unit size from the input size alone (not the worker count: outputs must not depend on it)."""
    return max(MIN_UNIT_BYTES, min(MAX_UNIT_BYTES, total // UNITS_PER_INPUT))


def plan_units(files: list[Path]) -> list[Unit]:
    sizes = [f.stat().st_size for f in files]
    target = unit_bytes(sum(sizes))
    units: list[Unit] = []
    group: list[str] = []
    group_size = 0

    def flush() -> None:
        nonlocal group, group_size
        if group:
            units.append(Unit(len(units), "text", group, size=group_size))
            group, group_size = [], 0

    for path, size in zip(files, sizes, strict=True):
        kind = kind_of(path)
        if kind == "text":
            if group_size + size > target:
                flush()
            group.append(str(path))
            group_size += size
            continue
        flush()
        if kind == "jsonl" and size > target:
            for start in range(0, size, target):
                end = min(size, start + target)
                units.append(Unit(len(units), kind, [str(path)], start, end, end - start))
        else:
            units.append(Unit(len(units), kind, [str(path)], size=size))
    flush()
    return units


# ---------------------------------------------------------------------- readers
def _record_text(raw: bytes | str, path: str, where: str, text_field: str) -> str:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}:{where}: not valid UTF-8 JSON") from None
    except RecursionError:
        raise DataError(f"{path}:{where}: JSON nested too deeply to read") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path}:{where}: no string field '{text_field}' (--field / data.jsonl_field)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: "\ud800", or CESU-8 bytes (json's surrogatepass)
        raise DataError(f"{path}:{where}: field '{text_field}' holds a lone surrogate "
                        f"({text[err.start]!r}), not valid Unicode") from None
    return text


def _line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` (only computed for errors)."""
    count, done = 1, 0
    with open(path, "rb") as fh:
        while done < offset:
            chunk = fh.read(min(1 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def _jsonl_range(path: str, start: int, end: int, text_field: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as fh:
        if start:
            fh.seek(start - 1)
            fh.readline()  # finish the line that began before this range
        stop = os.path.getsize(path) if end < 0 else end
        while True:
            offset = fh.tell()
            if offset >= stop:
                return
            line = fh.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                text = _record_text(line, path, "?", text_field)
            except DataError:
                where = _line_number(path, offset)
                raise DataError(str(_try_error(line, path, where, text_field))) from None
            yield text, len(line)


def _try_error(line: bytes, path: str, where: int, text_field: str) -> DataError:
    try:
        _record_text(line, path, str(where), text_field)
    except DataError as err:
        return err
    return DataError(f"{path}:{where}: unreadable line")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of a file, in order; a file that ends
    inside a frame raises :class:`DataError` (zstandard's stream reader would just stop)."""

    def __init__(self, path: str):
        import zstandard

        self.path, self._raw = path, open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj, self._in_frame, self._pending = self._dctx.decompressobj(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise DataError(f"{self.path}: truncated zstd stream (the file ends inside a frame); "
                                    f"re-download or re-compress it")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._dobj.decompress(chunk)
                if not self._dobj.eof:
                    break
                chunk, self._in_frame = self._dobj.unused_data, False
                self._dobj = self._dctx.decompressobj()
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_compressed(path: str, kind: str) -> io.BufferedIOBase:
    """The decompressed bytes of a ``.jsonl.gz`` / ``.jsonl.zst``; both must end cleanly."""
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: .zst input needs the 'zstandard' package (pip install zstandard)") from None
    return io.BufferedReader(_ZstdFrames(path), 1 << 20)


def _jsonl_compressed(path: str, kind: str, text_field: str) -> Iterator[tuple[str, int]]:
    """Lines split on b"\\n" and decoded one by one, exactly as a plain ``.jsonl`` (a BOM or a
    ``\\r`` inside a record reads the same compressed or not)."""
    with _open_compressed(path, kind) as fh:
        lineno = 0
        try:
            for line in fh:
                lineno += 1
                if line.strip():
                    yield _record_text(line, path, str(lineno), text_field), len(line)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}:{lineno + 1}: cannot decompress ({err})") from None
        except Exception as err:  # zstandard.ZstdError
            if type(err).__name__ == "ZstdError":
                raise DataError(f"{path}: not a valid zstd stream ({err})") from None
            raise


def parquet_column_check(path: str, text_field: str) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: parquet input needs the 'pyarrow' package (pip install pyarrow)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow.ArrowInvalid on a non-parquet file
        raise DataError(f"{path}: not a parquet file ({str(err).splitlines()[0]})") from None
    if text_field not in schema.names:
        raise DataError(f"{path}: no column '{text_field}' (--field / data.jsonl_field; "
                        f"columns: {', '.join(schema.names)})")


def _parquet(path: str, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    parquet_column_check(path, text_field)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{path}: row {row}: column '{text_field}' is not a string")
            yield value, len(value.encode("utf-8"))


def iter_unit(unit: Unit, text_field: str, strict: bool = True) -> Iterator[tuple[str, int]]:
    """(text, input bytes) per document of ``unit``; empty documents are skipped.

    ``strict=False`` skips text files that are not UTF-8 (the embedded corpus) instead of
    refusing them.
    """
    if unit.kind == "text":
        for path in unit.paths:
            raw = Path(path).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if strict:
                    raise DataError(f"{path}: not UTF-8 text") from None
                continue
            yield text, len(raw)
        return
    path = unit.paths[0]
    if unit.kind == "jsonl":
        yield from _jsonl_range(path, unit.start, unit.end, text_field)
    elif unit.kind == "parquet":
        yield from _parquet(path, text_field)
    else:
        yield from _jsonl_compressed(path, unit.kind, text_field)


def precheck(files: list[Path], text_field: str) -> None:
    """Cheap checks before any worker starts: each jsonl's first record has the field,
    each parquet file has the column. Later records are checked by the workers."""
    for path in files:
        kind = kind_of(path)
        if kind == "parquet":
            parquet_column_check(str(path), text_field)
        elif kind.startswith("jsonl"):
            unit = Unit(0, kind, [str(path)], 0, -1)
            reader = iter_unit(unit, text_field)
            try:
                next(reader, None)
            finally:
                reader.close()
