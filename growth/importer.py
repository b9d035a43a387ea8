"""``grow import``: other people's checkpoints → the canonical checkpoint, streamed.

Sources (detected from the files, see :func:`detect`):

- **HF pickle releases** (the public Tele-FLM checkpoints): ``pytorch_model-0000k-of-0000N.bin``
  + ``pytorch_model.bin.index.json``, or one ``pytorch_model.bin``. Read *only* through
  ``torch.load(path, map_location="cpu", weights_only=True, mmap=True)``: torch's restricted
  unpickler admits tensors and plain containers and refuses every other global before it
  is called, so nothing in the file runs; a value that is not a tensor is refused here.
  With ``mmap`` the storages are file-backed; each tensor's pages are dropped
  (``madvise(MADV_DONTNEED)``) once it is written, so peak memory is about one tensor,
  not one shard.
- **HF safetensors** directories (:class:`growth.checkpoint.CheckpointReader`).
- **DeepSpeed** checkpoints (:mod:`growth.ds_import`): a ZeRO-1/2/3 ``global_stepN`` / tag
  folder, or a universal-checkpoint folder; weights and Adam moments.

Every input check (index, shard files, tensor names, shapes against config.json, dtypes)
runs before the first byte is written. Output goes through
:class:`growth.checkpoint.CheckpointWriter`: HF-named shards with digests, index,
config.json (the release's dict with every field kept, ``torch_dtype`` updated), the
release's files (tokenizer, ``*.py``), and growth.json with an ``import`` event listing
the source files and what was carried. The writing is ``grow apply``'s
(growth.parallel.run_job, growth.shardwork): the same pipelined shard writer, staging dir
keyed by the request and the source files' names, sizes and mtimes (a rerun after a kill
keeps the finished shards; growth.json keeps the first attempt's time), and ``--workers
N`` processes taking shards from the same byte-balanced queue.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_NAMES,
    IGNORED_SUFFIXES,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    append_event,
    check_output_dir,
    confined,
    plan_entries,
    read_history,
    torch_dtype,
)
from growth.config import CONFIG_NAME, ConfigError, ModelConfig
from growth.import_source import Source, TensorInfo, canonical
from growth.parallel import check_workers, run_job
from growth.shardwork import ShardTask, ShardWorker, StagedJob, complete_shards

log = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
IMPORT_EVENT = "import"
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MADV_DONTNEED = 4


# ---------------------------------------------------------------------- pickle shards
def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """One pickle shard, loaded safely (weights_only, mmap): name → tensor, or an error."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing shard file") from None
    except pickle.UnpicklingError as err:
        what = next((line.strip() for line in str(err).splitlines() if "global" in line.lower()),
                    str(err).splitlines()[0] if str(err) else "a forbidden object")
        raise CheckpointError(f"{path}: refused: the pickle holds something other than tensors and "
                              f"plain containers ({what[:160]}); nothing in it was run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "mmap" in first or "zipfile" in first.lower() and "new" in first.lower():
            raise CheckpointError(f"{path}: not a zip-format torch file (legacy torch.save format or "
                                  f"not a torch file); re-save it with torch >= 1.6") from None
        raise CheckpointError(f"{path}: truncated or corrupt torch file ({first[:160]}); "
                              f"re-download it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  f"only state dicts of tensors are imported")
    return obj


def release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a file-backed (mmap) tensor; they are re-read on demand."""
    try:
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    lo = (start + page - 1) // page * page
    hi = (start + size) // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


# ---------------------------------------------------------------------- sources


def read_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = directory / CONFIG_NAME
    try:
        config = ModelConfig.load(path)
        raw = json.loads(path.read_text())
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return config, raw


def detect(src: Path) -> str:
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (grow import takes a checkpoint folder)")
    if (src / PICKLE_INDEX).is_file() or (src / PICKLE_SINGLE).is_file():
        return "hf-pickle"
    if (src / INDEX_NAME).is_file() or (src / WEIGHTS_NAME).is_file():
        return "hf-safetensors"
    from growth import ds_import

    kind = ds_import.detect(src)
    if kind is not None:
        return kind
    raise CheckpointError(f"{src}: no {PICKLE_INDEX}, {PICKLE_SINGLE}, {INDEX_NAME}, {WEIGHTS_NAME} "
                          f"or DeepSpeed checkpoint found; nothing to import")


def pickle_source(src: Path) -> Source:
    config, raw = read_config(src)
    index = src / PICKLE_INDEX
    if index.is_file():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object)") from None
        for fname in sorted(set(weight_map.values()), key=str):
            confined(src, fname, index)
            if not (src / fname).is_file():
                raise CheckpointError(f"{src / fname}: missing shard named by {PICKLE_INDEX}")
        listing = index
    else:
        weight_map = None
        listing = src / PICKLE_SINGLE
    files = sorted(set(weight_map.values())) if weight_map is not None else [PICKLE_SINGLE]
    found: dict[str, TensorInfo] = {}
    for fname in files:
        shard = load_pickle(src / fname)
        for key, t in shard.items():
            if weight_map is not None and weight_map.get(key) != fname:
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                raise CheckpointError(f"{src / fname}: tensor '{key}' is not indexed to this shard "
                                      f"in {PICKLE_INDEX}")
            found[key] = TensorInfo(fname, key, tuple(t.shape), t.dtype)
        del shard
    if weight_map is not None:
        for key, fname in weight_map.items():
            if key not in found and not key.endswith(IGNORED_SUFFIXES):
                raise CheckpointError(f"{src / fname}: tensor '{key}' is indexed in {fname} but that "
                                      f"shard does not hold it")
    tensors = canonical(found, config, src, listing)
    return Source(src, "hf-pickle", config.replace(tie_word_embeddings=False), raw, tensors,
                  {f: (src / f).stat().st_size for f in files}, history=read_history(src))


def safetensors_source(src: Path) -> Source:
    reader = CheckpointReader(src)
    tensors = {}
    for name in reader.names():
        stored, fname = reader.locate(name)
        tensors[name] = TensorInfo(fname, stored, reader.shape(name), reader.dtype(name))
    return Source(src, "hf-safetensors", reader.config, reader.raw_config, tensors,
                  {f: (src / f).stat().st_size for f in reader.files}, history=reader.history)


def open_source(src: Path, config: str | None = None) -> Source:
    kind = detect(src)
    if kind == "hf-pickle":
        return pickle_source(src)
    if kind == "hf-safetensors":
        return safetensors_source(src)
    from growth import ds_import

    return ds_import.open_source(src, kind, config)


class TensorFeed:
    """Reads a source's tensors (one process); pickle shards stay mmap'ed, two at a time."""

    def __init__(self, source: Source):
        self.source = source
        self._shards: dict[str, dict[str, torch.Tensor]] = {}
        self._reader: CheckpointReader | None = None
        self._ds: Any = None

    def get(self, name: str, kind: str = "weight") -> torch.Tensor:
        fmt = self.source.format
        if fmt == "hf-safetensors":
            if self._reader is None:
                self._reader = CheckpointReader(self.source.directory, check_shapes=False)
            return self._reader.get(name)
        if fmt == "hf-pickle":
            info = self.source.tensors[name]
            shard = self._shards.get(info.file)
            if shard is None:
                if len(self._shards) >= 2:
                    self._shards.pop(next(iter(self._shards)))
                shard = self._shards[info.file] = load_pickle(self.source.directory / info.file)
            return shard[info.key]
        if self._ds is None:
            from growth import ds_import

            self._ds = ds_import.Feed(self.source)
        return self._ds.get(name, kind)

    def done(self, t: torch.Tensor) -> None:
        if self.source.format == "hf-pickle":
            release_pages(t)

    def close(self) -> None:
        self._shards.clear()
        if self._reader is not None:
            self._reader.close()


# ---------------------------------------------------------------------- the job
@dataclass(frozen=True)
class ImportRequest:
    src: str
    out: str
    dtype: str | None = None
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    config: str | None = None  # DeepSpeed sources: the model's config.json / flavor


def output_dtype(source: Source, requested: str | None) -> torch.dtype:
    if requested is not None:
        dtype = torch_dtype(requested)
        if dtype not in OUTPUT_DTYPES:
            raise CheckpointError(f"--dtype {requested}: use float32, bfloat16 or float16")
        return dtype
    dtypes = source.dtypes
    if len(dtypes) != 1:
        names = sorted(DTYPE_NAMES.get(d, str(d)) for d in dtypes)
        raise CheckpointError(f"{source.directory}: tensors mix dtypes {', '.join(names)}; pass --dtype "
                              f"to choose the output dtype")
    (dtype,) = dtypes
    if dtype not in OUTPUT_DTYPES:
        raise CheckpointError(f"{source.directory}: stored dtype {dtype} is not written; pass --dtype float32")
    return dtype


def plan_tasks(source: Source, dtype: torch.dtype, max_shard_size: int) -> list[ShardTask]:
    """Every output shard: weights in ``dtype``, then the Adam moments (fp32) when present."""
    shapes = source.config.tensor_shapes()
    tasks = [ShardTask(path, group, "weight") for path, group in
             plan_entries([(n, shapes[n], dtype) for n in shapes], max_shard_size)]
    if source.moments:
        for kind in ("exp_avg", "exp_avg_sq"):
            tasks += [ShardTask(path, group, kind) for path, group in
                      plan_entries([(n, shapes[n], torch.float32) for n in shapes], max_shard_size,
                                   f"optimizer/{kind}/")]
    return tasks


class ImportWorker(ShardWorker):
    """Streams a source's tensors into shards. One reading thread (the feed keeps pickle
    shards mmap'ed; a tensor's pages are dropped once it is hashed and written)."""

    lookahead = 0

    def __init__(self, source: Source):
        super().__init__()
        self.source = source
        self.feed = TensorFeed(source)
        self.pending: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, kind: str, dtype: torch.dtype) -> list[torch.Tensor]:
        t = self.feed.get(name, kind)
        self.pending[name] = t
        return [t]

    def label(self, name: str, kind: str) -> str:
        return source_label(self.source, name, kind)

    def piece_written(self, name: str, size: int, progress: Callable[[int], None] | None) -> None:
        t = self.pending.pop(name, None)
        if t is not None:
            self.feed.done(t)
        super().piece_written(name, size, progress)

    def close(self) -> None:
        super().close()
        self.feed.close()


def source_label(source: Source, name: str, kind: str) -> str:
    """How errors name a tensor: with the source file it comes from."""
    where = source.directory / source.tensors[name].file
    return f"tensor '{name}' (from {where})" if kind == "weight" else f"{kind} of '{name}' (from {where})"


@dataclass
class ImportJob(StagedJob):
    request: ImportRequest
    source: Source
    dtype: torch.dtype
    tasks: list[ShardTask]

    def worker(self, log: Callable[[str], None] | None = None) -> ImportWorker:
        return ImportWorker(self.source)

    def open_staging(self) -> CheckpointWriter:
        """Lock and create or resume the staging dir, keyed by the request and the source
        files' names, sizes and modification times (a changed source starts afresh)."""
        r = self.request
        files = {f: self._stamp(f) for f in sorted(self.source.files, key=str)}
        key = {"import": str(Path(r.src).resolve()), "format": self.source.format, "files": files,
               "dtype": DTYPE_NAMES[self.dtype], "max_shard_size": r.max_shard_size, "config": r.config}
        return CheckpointWriter(self.out, key=key)


    def _stamp(self, fname: str) -> list[int | None]:
        """[size, mtime_ns] of a source file (DeepSpeed names are relative to the tag dir)."""
        first = next(iter(self.source.tensors.values()), None)
        for base in (self.source.directory, *([Path(first.file)] if first else [])):
            try:
                st = (base / fname).stat()
            except OSError:
                continue
            return [st.st_size, st.st_mtime_ns]
        return [self.source.files[fname], None]


def prepare_import(request: ImportRequest, check_out: bool = True) -> ImportJob:
    """Open and check the source and plan the shards; writes nothing (one-line errors)."""
    if request.max_shard_size <= 0:
        raise CheckpointError(f"--max-shard-size must be positive, got {request.max_shard_size}")
    src, out = Path(request.src), Path(request.out)
    if src.resolve() == out.resolve() or out.resolve().is_relative_to(src.resolve()) and out.exists():
        raise CheckpointError(f"{out}: --out must be a new directory outside {src}")
    if check_out:
        check_output_dir(out)
    source = open_source(src, request.config)
    dtype = output_dtype(source, request.dtype)
    return ImportJob(request, source, dtype, plan_tasks(source, dtype, request.max_shard_size))


def finalize_import(job: ImportJob, writer: CheckpointWriter) -> Path:
    """Check every shard; write indexes, optimizer state, config, carried files and the
    history (event time: the first attempt's, so a resumed import is byte-identical); publish."""
    source, src = job.source, Path(job.request.src)
    complete_shards(job.tasks, writer.staging)
    for kind, root in [("weight", "")] + ([(k, f"optimizer/{k}/") for k in ("exp_avg", "exp_avg_sq")]
                                         if source.moments else []):
        group = [t for t in job.tasks if t.kind == kind]
        writer.write_index(root, {n: Path(t.path).name for t in group for n, _, _ in t.entries},
                           sum(t.nbytes for t in group))
    if source.moments:
        writer.write_optimizer_state(source.optimizer_state or {"step": 0})
    writer.write_config(source.config, raw=source.raw_config, dtype=job.dtype)
    carried = writer.carry(src)
    event = {"kind": IMPORT_EVENT, "time": writer.time, "format": source.format,
             "source": {"path": str(src.resolve()), "files": source.files},
             "dtype": DTYPE_NAMES[job.dtype], "optimizer_state": source.moments, "carried": carried}
    writer.write_history(append_event(source.history, event))
    return writer.publish()


def import_checkpoint(request: ImportRequest, workers: int = 1, progress: bool = False) -> Path:
    """Import ``request.src`` into ``request.out`` (new or empty); returns OUT. The same
    staging, queue, workers and resume as ``grow apply`` (growth.parallel.run_job): rerun
    the same command after a kill and the finished shards are kept."""
    check_workers(workers)
    job = prepare_import(request)
    return run_job(job, prepare_import, request, finalize_import, workers, progress, desc="import")
