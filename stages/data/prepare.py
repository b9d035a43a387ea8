"""prepare-data: documents → Megatron indexed dataset(s), in N worker processes.

    prepare-data INPUT... --tokenizer byte|FILE|CHECKPOINT_DIR --out PREFIX [--workers N]
                 [--shard-size SIZE] [--field text]
    python -m stages.prepare_data ...   (the same, without the console script)

Output: ``PREFIX.bin`` + ``PREFIX.idx`` ("MMIDIDX" version 1; every document followed by
EOS), or, when the tokens exceed ``--shard-size``, ``PREFIX-00000-of-0000N.{bin,idx}`` …;
and ``PREFIX.json``, the manifest (shards, tokenizer, counts, a digest of the job), written
last. How it runs:

1. inputs listed and checked, tokenizer loaded, first record of every jsonl/parquet read
   (one-line DataError, exit 2, before any worker starts);
2. inputs cut into units (whole text files grouped, big jsonl files in byte ranges at line
   boundaries); each unit is tokenized by a worker into ``PREFIX.parts/part-NNNNNN``, a
   small Megatron dataset, published by rename when complete;
3. parts grouped in order into shards of at most ``--shard-size`` bytes (a one-part shard
   is a rename, others a streamed concatenation); manifest; parts removed.

An interrupted run re-run with the same arguments keeps the finished parts and does the
rest; a finished one (manifest present, same job) is a no-op. Document order is the input
order whatever ``--workers`` is, so the output does not depend on the worker count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from flmcore.io import write_json_atomic
from flmcore.safe_files import release_flock, try_flock
from stages.data import indexed
from stages.data.errors import DataError
from stages.data.sources import Unit, iter_unit, list_inputs, plan_units, precheck
from stages.data.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

FORMAT = "flm-prepared-v1"
MANIFEST_SUFFIX = ".json"
PARTS_SUFFIX = ".parts"
LOCK_SUFFIX = ".lock"
PART_NAME = "part-{:06d}"
JOB_NAME = "job.json"
SHARD_NAME = "{prefix}-{i:05d}-of-{n:05d}"
MIN_SHARD_SIZE = 1 << 20  # a shard holds whole parts (stages.data.sources.MIN_UNIT_BYTES of input each)
DEFAULT_SHARD_SIZE = 4 << 30  # 4 GiB of tokens per .bin: big enough for few files, small enough to copy
SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
              "G": 1 << 30, "GB": 1 << 30, "T": 1 << 40, "TB": 1 << 40}


def manifest_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


def parse_size(text: str) -> int:
    """'512MB', '4G', '1000' → bytes (binary units); DataError on anything else."""
    raw = str(text).strip().upper()
    number = raw.rstrip("KMGTB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in SIZE_UNITS or not value > 0 or value == float("inf"):
        raise DataError(f"--shard-size {text!r}: expected a positive size like 512MB or 4GB")
    size = int(value * SIZE_UNITS[unit])
    if size < MIN_SHARD_SIZE:
        raise DataError(f"--shard-size {text!r}: below the 1MB minimum (a shard holds whole work units, "
                        f"each from 1MB of input or more)")
    return size


# ---------------------------------------------------------------------- the job
def _job(files: list[Path], tokenizer: Any, text_field: str, shard_size: int, strict: bool) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "inputs": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": tokenizer.name,
        "tokenizer_digest": tokenizer.fingerprint(),
        "eos_id": int(tokenizer.eos_id),
        "field": text_field,
        "shard_size": int(shard_size),
        "strict": bool(strict),
    }


def _digest(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(prefix: str | Path) -> dict[str, Any] | None:
    path = manifest_path(prefix)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable prepare-data manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shards"), list):
        raise DataError(f"{path}: not a prepare-data manifest (format {FORMAT})")
    if not data["shards"]:
        raise DataError(f"{path}: lists no shards")
    for name in data["shards"]:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise DataError(f"{path}: shard {name!r} is not a plain file name beside the manifest (a manifest "
                            f"never points outside its folder)")
    return data


# ---------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(spec: str, eos_token: str | None, bos_token: str | None) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, one message
    _WORKER["tok"] = load_tokenizer(spec, eos_token, bos_token)


def tokenize_unit(unit: Unit, parts_dir: str, text_field: str, strict: bool,
                  tokenizer: Any = None) -> tuple[int, int, int, int]:
    """Tokenize ``unit`` into ``parts_dir/part-NNNNNN``; (index, input bytes, docs, tokens)."""
    tok = tokenizer or _WORKER["tok"]
    dtype = indexed.optimal_dtype(tok.vocab_size)
    final = Path(parts_dir) / PART_NAME.format(unit.index)
    tmp = Path(parts_dir) / (PART_NAME.format(unit.index) + f".tmp{os.getpid()}")
    writer = indexed.IndexedWriter(tmp, dtype)
    docs = 0
    try:
        for text, _size in iter_unit(unit, text_field, strict):
            ids = tok.encode(text)
            if not len(ids):
                continue
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = tok.eos_id
            writer.add(doc)
            docs += 1
        writer.finish()
    except BaseException:
        writer.abort()
        indexed.remove(tmp)
        raise
    os.replace(indexed.bin_path(tmp), indexed.bin_path(final))
    os.replace(indexed.idx_path(tmp), indexed.idx_path(final))  # the .idx last: it marks the part done
    return unit.index, unit.size, docs, writer.tokens


def _worker_task(args: tuple[Unit, str, str, bool]) -> tuple[int, int, int, int]:
    return tokenize_unit(*args)


# ---------------------------------------------------------------------- prepare
def prepare(inputs: list[str], tokenizer: str = "byte", out: str | Path = "data/corpus", workers: int = 1,
            shard_size: int | str = DEFAULT_SHARD_SIZE, text_field: str = "text", eos_token: str | None = None,
            bos_token: str | None = None, strict: bool = True, progress: bool = True,
            files: list[Path] | None = None) -> dict[str, Any]:
    """Run prepare-data; returns the manifest (also at ``PREFIX.json``). See the module doc.

    ``files`` (already listed inputs) bypasses the listing, for the embedded corpus;
    ``strict=False`` skips non-UTF-8 text files instead of refusing them.
    """
    if isinstance(shard_size, str):
        shard_size = parse_size(shard_size)
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers!r}")
    prefix = Path(out).expanduser().resolve()
    if prefix.is_dir():
        raise DataError(f"--out {prefix}: is a directory; give a file prefix (PREFIX.bin/.idx are written)")
    files = list_inputs(list(inputs)) if files is None else files
    lock = _lock_path(prefix)
    fd = _lock(prefix, lock)
    try:
        return _prepare_locked(files, tokenizer, prefix, workers, shard_size, text_field, eos_token, bos_token,
                               strict, progress)
    finally:
        release_flock(lock, fd)


def _lock_path(prefix: Path) -> Path:
    return prefix.parent / f".{prefix.name}{LOCK_SUFFIX}"


def _lock(prefix: Path, path: Path) -> int:
    """An exclusive lock on ``--out`` (``.PREFIX.lock`` beside it): a second prepare-data on
    the same prefix is refused in one line instead of racing the first."""
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        fd = try_flock(path)
    except OSError as err:
        raise DataError(f"--out {prefix}: cannot write there ({err.strerror or err}: {path})") from None
    if fd is None:
        try:
            pid = path.read_text().strip() or "?"
        except OSError:
            pid = "?"
        raise DataError(f"--out {prefix}: another prepare-data (pid {pid}) is writing it (lock {path}); "
                        f"wait for it to finish or stop it")
    return fd


def _prepare_locked(files: list[Path], tokenizer: str, prefix: Path, workers: int, shard_size: int,
                    text_field: str, eos_token: str | None, bos_token: str | None, strict: bool,
                    progress: bool) -> dict[str, Any]:
    tok = load_tokenizer(tokenizer, eos_token, bos_token)
    precheck(files, text_field)
    job = _job(files, tok, text_field, shard_size, strict)
    digest = _digest(job)
    done = read_manifest(prefix)
    if done is not None:
        if done.get("job") == digest:
            log.info("%s: already prepared from the same inputs; nothing to do", prefix)
            return done
        raise DataError(f"--out {prefix}: already holds a dataset prepared from other inputs or settings; "
                        f"choose another --out or delete {manifest_path(prefix)} and its shards")
    parts = Path(f"{prefix}{PARTS_SUFFIX}")
    if parts.is_symlink():
        raise DataError(f"{parts}: the parts folder is a symlink; remove it (it is never followed)")
    old = None
    if (parts / JOB_NAME).is_file():
        try:
            old = json.loads((parts / JOB_NAME).read_text()).get("job")
        except (OSError, json.JSONDecodeError):
            old = None
    if old != digest:
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(exist_ok=True)
    (parts / JOB_NAME).write_text(json.dumps({"job": digest, **job}, indent=1) + "\n")

    units = plan_units(files)
    todo = [u for u in units if not indexed.exists(parts / PART_NAME.format(u.index))]
    if len(todo) < len(units):
        log.info("%s: %d of %d units already tokenized by an earlier run", prefix, len(units) - len(todo), len(units))
    _run_units(todo, units, parts, tok, tokenizer, eos_token, bos_token, text_field, strict, workers, progress)
    manifest = _publish(prefix, parts, units, tok, shard_size, digest, job)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest


def _run_units(todo: list[Unit], units: list[Unit], parts: Path, tok: Any, spec: str, eos_token: str | None,
               bos_token: str | None, text_field: str, strict: bool, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(u.size for u in units)
    bar = tqdm(total=total, initial=total - sum(u.size for u in todo), unit="B", unit_scale=True,
               desc="prepare-data", disable=not progress, file=sys.stderr, mininterval=0.5)
    docs = 0
    try:
        if workers == 1 or len(todo) <= 1:
            results = (tokenize_unit(u, str(parts), text_field, strict, tok) for u in todo)
            for _, size, n_docs, _ in results:
                docs += n_docs
                bar.update(size)
                bar.set_postfix(docs=docs)
            return
        import multiprocessing as mp

        # Note: fork where there is one: a spawned worker re-imports numpy and this package
        # (seconds on a loaded machine, per worker); the workers never touch torch, and each
        # loads its own tokenizer (_init_worker), so no thread pool crosses the fork.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                      initargs=(spec, eos_token, bos_token)) as pool:
            tasks = [(u, str(parts), text_field, strict) for u in todo]
            for _, size, n_docs, _ in pool.imap_unordered(_worker_task, tasks):
                docs += n_docs
                bar.update(size)
                bar.set_postfix(docs=docs)
    finally:
        bar.close()


def _publish(prefix: Path, parts: Path, units: list[Unit], tok: Any, shard_size: int, digest: str,
             job: dict[str, Any]) -> dict[str, Any]:
    datasets = [indexed.IndexedDataset(parts / PART_NAME.format(u.index)) for u in units]
    if not any(len(ds) for ds in datasets):
        raise DataError(f"{job['inputs'][0][0] if job['inputs'] else prefix}: the inputs hold no non-empty "
                        f"document (nothing to write to {prefix})")
    groups: list[list[int]] = []
    size = 0
    for i, ds in enumerate(datasets):
        nbytes = ds.n_tokens * ds.dtype.itemsize
        if not groups or (size + nbytes > shard_size and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    groups = [g for g in groups if any(len(datasets[i]) for i in g)] or groups[:1]
    n = len(groups)
    names = [prefix.name] if n == 1 else [SHARD_NAME.format(prefix=prefix.name, i=i, n=n) for i in range(n)]
    counts = []
    for name, group in zip(names, groups, strict=True):
        target = prefix.parent / name
        tmp = prefix.parent / f".{name}.tmp{os.getpid()}"
        members = [datasets[i] for i in group]
        if len(members) == 1:
            os.replace(indexed.bin_path(members[0].prefix), indexed.bin_path(tmp))
        else:
            with open(indexed.bin_path(tmp), "wb") as dst:
                for ds in members:
                    with open(indexed.bin_path(ds.prefix), "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
        lengths = np.concatenate([np.asarray(ds.lengths) for ds in members]) if members else np.zeros(0, np.int32)
        indexed.write_index(indexed.idx_path(tmp), indexed.optimal_dtype(tok.vocab_size), lengths)
        os.replace(indexed.bin_path(tmp), indexed.bin_path(target))
        os.replace(indexed.idx_path(tmp), indexed.idx_path(target))
        counts.append((len(lengths), int(lengths.sum(dtype=np.int64))))
    manifest = {
        "format": FORMAT,
        "job": digest,
        "shards": names,
        "documents": sum(c[0] for c in counts),
        "tokens": sum(c[1] for c in counts),
        "input_bytes": sum(u.size for u in units),
        "inputs": len(job["inputs"]),
        "tokenizer": tok.name,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "bos_id": None if tok.bos_id is None else int(tok.bos_id),
        "pad_id": None if tok.pad_id is None else int(tok.pad_id),
        "dtype": indexed.optimal_dtype(tok.vocab_size).name,
    }
    write_json_atomic(manifest_path(prefix), manifest)
    return manifest
