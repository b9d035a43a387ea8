"""Tokens for a stage: corpus → memory-mapped token files → deterministic batches.

``prepare_corpus`` runs once, in the orchestrator, and writes into a cache directory::

    CACHE/<key>/train.bin   token ids of the training documents, each followed by EOS
    CACHE/<key>/eval.bin    the held-out documents, same layout
    CACHE/<key>/{train,eval}.idx.npy   int64 start offset of every document
    CACHE/<key>/info.json   what ``prepare_corpus`` returns (paths made absolute on read)

``key`` hashes every input (files with sizes and mtimes, tokenizer, split settings), so
the same inputs reuse the same files. Ids are ``uint16`` when the tokenizer's vocabulary
is below 65536, else ``uint32``. Each worker rank memory-maps the files read-only through
``TokenBatches`` (training windows) and ``eval_batches`` (fixed held-out windows).

The default corpus needs no download: real text already on any machine with Python —
the standard library's own ``.py`` sources and text files, in a fixed hashed order,
capped at ``max_bytes``. The default tokenizer is byte-level (ids 0..255 are bytes,
256 BOS, 257 EOS, 258 PAD → vocabulary 259, which the tiny flavors' ``valid_vocab_size``
matches); an HF ``tokenizers`` ``tokenizer.json`` is the other option.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flmcore.errors import FlmError

FORMAT_VERSION = 1
INFO_NAME = "info.json"
SPLITS = ("train", "eval")
TOKENS_NAME = "{split}.bin"
DOCS_NAME = "{split}.idx.npy"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl",)
EMBEDDED_SUFFIXES = (".py", ".txt", ".rst")
# Standard-library folders left out of the embedded corpus: test data (odd encodings,
# generated noise), installed packages (differ between machines), build products.
EMBEDDED_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests",
                 "idle_test", "lib2to3"}
# Names HF tokenizers give their end/begin-of-document tokens, tried in order.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")


class DataError(FlmError, ValueError):
    """The corpus or tokenizer cannot be used; the one-line message names the file or field."""


# ---------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus BOS/EOS/PAD: lossless, no vocabulary file."""

    name = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Any) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1"


class HFTokenizer:
    """An HF ``tokenizers`` ``tokenizer.json``; EOS/BOS found by name unless given."""

    def __init__(self, path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer file not found (data.tokenizer is 'byte' or a "
                            f"tokenizer.json path)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("data.tokenizer names a tokenizer.json but the 'tokenizers' package is "
                            "not installed (pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"{self.path}: not a tokenizers tokenizer.json ({err})") from None
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special(eos_token, EOS_CANDIDATES, "eos_token")
        if self.eos_id is None:
            raise DataError(f"{self.path}: no end-of-document token among {', '.join(EOS_CANDIDATES)};"
                            f" set data.eos_token")
        self.bos_id = self._special(bos_token, BOS_CANDIDATES, "bos_token")
        self.pad_id = self._tok.token_to_id("<pad>")

    def _special(self, given: str | None, candidates: tuple[str, ...], field: str) -> int | None:
        if given is not None:
            tid = self._tok.token_to_id(given)
            if tid is None:
                raise DataError(f"{self.path}: data.{field} {given!r} is not in the vocabulary")
            return tid
        for name in candidates:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def load_tokenizer(data_cfg: dict[str, Any]) -> ByteTokenizer | HFTokenizer:
    spec = data_cfg.get("tokenizer", "byte") or "byte"
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, data_cfg.get("eos_token"), data_cfg.get("bos_token"))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# ---------------------------------------------------------------------- documents
def embedded_files(max_bytes: int) -> tuple[Path, list[Path]]:
    """The standard library's text files in a fixed hashed order, up to ``max_bytes``.

    Note: the order hashes each relative path, so the capped corpus mixes many packages
    instead of taking the alphabetically first ones; it is the same on every run of one
    Python installation (and differs only as much as the installations differ).
    """
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in EMBEDDED_SKIP
                             and not (rel_dir == Path(".") and d.startswith("config-")))
        found.extend(rel_dir / f for f in filenames if Path(f).suffix in EMBEDDED_SUFFIXES)
    found.sort(key=lambda rel: hashlib.sha256(rel.as_posix().encode()).hexdigest())
    chosen, total = [], 0
    for rel in found:
        size = (root / rel).stat().st_size
        if 0 < size and total + size <= max_bytes:
            chosen.append(root / rel)
            total += size
    if not chosen:
        raise DataError(f"{root}: no standard-library text found for the embedded corpus "
                        f"(data.max_bytes={max_bytes})")
    return root, chosen


def source_files(source: str) -> tuple[Path, list[Path]]:
    """A file, a directory (searched recursively) or a glob → sorted text/jsonl files."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if not source.strip():
        raise DataError("data.source is empty: give data.source=PATH (a text/jsonl file, a directory or a glob)")
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p).resolve() for p in glob.glob(source, recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    else:
        path = Path(source).resolve()
        if path.is_file():
            files, root = [path], path.parent
        elif path.is_dir():
            files, root = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes), path
        else:
            raise DataError(f"{path}: data.source is not 'embedded' or an existing file, directory or glob")
    if not files:
        raise DataError(f"{source}: no {', '.join(suffixes)} files found for data.source")
    return root, files


def iter_documents(files: list[Path], root: Path, jsonl_field: str,
                   strict: bool) -> Iterator[tuple[str, str]]:
    """(identity, text) per document: a text file is one document, a jsonl line is one.

    ``strict`` refuses undecodable files (user data); the embedded corpus skips them.
    """
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise DataError(f"{path}: not UTF-8 text") from None
            continue
        if path.suffix not in JSONL_SUFFIXES:
            if raw.strip():
                yield rel, raw
            continue
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{lineno}: not valid JSON") from None
            text = record.get(jsonl_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field '{jsonl_field}' (data.jsonl_field)")
            if text.strip():
                yield f"{rel}:{lineno}", text


def is_eval_document(identity: str, seed: int, fraction: float) -> bool:
    """Held-out membership by a hash of (seed, document identity): stable under reordering."""
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


# ---------------------------------------------------------------------- preparation
def corpus_files(data_cfg: dict[str, Any]) -> tuple[Path, list[Path], bool]:
    """(root, files, strict) of ``data_cfg``: the listing only, nothing read."""
    source = data_cfg.get("source", "embedded")
    if source == "embedded":
        root, files = embedded_files(int(data_cfg.get("max_bytes", 8_000_000)))
        return root, files, False
    root, files = source_files(str(source))
    return root, files, True


def _cache_key(data_cfg: dict[str, Any], tokenizer: Any, files: list[Path], seed: int) -> str:
    record = {
        "format": FORMAT_VERSION,
        "source": data_cfg.get("source", "embedded"),
        "max_bytes": data_cfg.get("max_bytes") if data_cfg.get("source", "embedded") == "embedded" else None,
        "tokenizer": tokenizer.fingerprint(),
        "eos": tokenizer.eos_id,
        "eval_fraction": float(data_cfg.get("eval_fraction", 0.02)),
        "jsonl_field": data_cfg.get("jsonl_field", "text"),
        "seed": int(seed),
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def prepare_corpus(data_cfg: dict[str, Any], out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Tokenize the corpus of ``data_cfg`` (a ``DataCfg`` as a dict) into ``out_dir/<key>/``.

    Returns a JSON-safe info dict: ``dir``, ``paths`` {train, eval}, ``docs`` (offset
    files), ``n_tokens`` and ``n_docs`` {train, eval}, ``dtype``, ``vocab_size`` (the
    tokenizer's), ``eos_id``, ``bos_id``, ``pad_id``, ``tokenizer``, ``source``,
    ``files``, ``bytes``. ``seed`` picks the held-out documents (keep it fixed across the
    stages of a schedule so every stage evaluates on the same text). Documents are
    streamed one at a time; an existing complete cache entry is reused as is.
    """
    fraction = float(data_cfg.get("eval_fraction", 0.02))
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in (0, 1), got {fraction}")
    tokenizer = load_tokenizer(data_cfg)
    root, files, strict = corpus_files(data_cfg)
    key = _cache_key(data_cfg, tokenizer, files, seed)
    out_dir = Path(out_dir).resolve()
    final = out_dir / key
    if (final / INFO_NAME).is_file():
        return _read_info(final)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = _write_corpus(tmp, tokenizer, files, root, strict, data_cfg, seed, fraction)
        info["key"] = key
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same key first: theirs is identical
            if not (final / INFO_NAME).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _read_info(final)


def _write_corpus(tmp: Path, tokenizer: Any, files: list[Path], root: Path, strict: bool,
                  data_cfg: dict[str, Any], seed: int, fraction: float) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.vocab_size)
    handles = {s: open(tmp / TOKENS_NAME.format(split=s), "wb") for s in SPLITS}
    offsets: dict[str, list[int]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    n_bytes = 0
    try:
        for identity, text in iter_documents(files, root, data_cfg.get("jsonl_field", "text"), strict):
            ids = tokenizer.encode(text)
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = tokenizer.eos_id
            split = "eval" if is_eval_document(identity, seed, fraction) else "train"
            offsets[split].append(counts[split])
            doc.tofile(handles[split])
            counts[split] += len(doc)
            n_bytes += len(text.encode("utf-8"))
    finally:
        for fh in handles.values():
            fh.close()
    _ensure_both_splits(tmp, offsets, counts, dtype)
    for split in SPLITS:
        np.save(tmp / DOCS_NAME.format(split=split), np.asarray(offsets[split], dtype=np.int64))
    source = data_cfg.get("source", "embedded")
    return {
        "format": FORMAT_VERSION,
        "source": source if source == "embedded" else str(root),
        "files": len(files),
        "bytes": n_bytes,
        "tokenizer": tokenizer.name,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "bos_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "pad_id": None if tokenizer.pad_id is None else int(tokenizer.pad_id),
        "dtype": dtype.name,
        "seed": int(seed),
        "eval_fraction": fraction,
        "n_tokens": dict(counts),
        "n_docs": {s: len(offsets[s]) for s in SPLITS},
    }


def _ensure_both_splits(tmp: Path, offsets: dict[str, list[int]], counts: dict[str, int],
                        dtype: np.dtype) -> None:
    """A small corpus may hash no document into one split: move the other's last one."""
    for empty, full in (("eval", "train"), ("train", "eval")):
        if offsets[empty]:
            continue
        if len(offsets[full]) < 2:
            raise DataError(f"the corpus has {len(offsets[full])} document(s); a held-out split "
                            f"needs at least 2 (add files or jsonl lines)")
        start = offsets[full].pop()
        path = tmp / TOKENS_NAME.format(split=full)
        tail = np.fromfile(path, dtype=dtype, offset=start * dtype.itemsize)
        with open(path, "r+b") as fh:
            fh.truncate(start * dtype.itemsize)
        tail.tofile(tmp / TOKENS_NAME.format(split=empty))
        offsets[empty].append(0)
        counts[full], counts[empty] = start, len(tail)


def _read_info(directory: Path) -> dict[str, Any]:
    info = json.loads((directory / INFO_NAME).read_text())
    info["dir"] = str(directory)
    info["paths"] = {s: str(directory / TOKENS_NAME.format(split=s)) for s in SPLITS}
    info["docs"] = {s: str(directory / DOCS_NAME.format(split=s)) for s in SPLITS}
    return info


# ---------------------------------------------------------------------- batches
def open_tokens(info: dict[str, Any], split: str) -> np.memmap:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = info["paths"][split]
    if info["n_tokens"][split] == 0:
        raise DataError(f"{path}: the {split} split is empty")
    return np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    chunk = torch.from_numpy(rows)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _check_length(tokens: np.ndarray, seq_len: int, split: str, path: str) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"{path}: the {split} split has {len(tokens)} tokens, fewer than "
                        f"seq_len + 1 = {seq_len + 1}; use more data or a shorter stage.seq_len")


class TokenBatches:
    """Random training windows as a pure function of (seed, step, micro, dp_rank, dp_world).

    Every (step, micro) draws ``dp_world × micro_batch_size`` window starts from one
    generator seeded by (seed, step, micro); rank r takes rows r·B … r·B + B − 1. So the
    global batch of a step does not depend on which rank asks or how often, and resuming
    at step k replays exactly the data an uninterrupted run sees at step k. Windows may
    cross document boundaries (the EOS token separates documents), as in GPT pre-training.
    """

    def __init__(self, info: dict[str, Any], split: str, seq_len: int, micro_batch_size: int,
                 seed: int = 0):
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be positive, "
                            f"got {seq_len}, {micro_batch_size}")
        self.split, self.seq_len, self.micro_batch_size, self.seed = split, seq_len, micro_batch_size, seed
        self.tokens = open_tokens(info, split)
        _check_length(self.tokens, seq_len, split, info["paths"][split])
        self._split_code = SPLITS.index(split)

    def batch(self, step: int, micro: int = 0, dp_rank: int = 0,
              dp_world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [B, T] with y = x shifted left by one token."""
        if not 0 <= dp_rank < dp_world or step < 0 or micro < 0:
            raise DataError(f"bad batch coordinates step={step} micro={micro} rank={dp_rank}/{dp_world}")
        rng = np.random.default_rng([self.seed, self._split_code, step, micro])
        high = len(self.tokens) - self.seq_len  # last start with a full (T + 1)-token window
        starts = rng.integers(0, high, size=dp_world * self.micro_batch_size)
        B = self.micro_batch_size
        return _windows(self.tokens, starts[dp_rank * B:(dp_rank + 1) * B], self.seq_len)


def eval_batches(info: dict[str, Any], seq_len: int, micro_batch_size: int,
                 n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed held-out batches: windows spread evenly over the eval split.

    No seed and no rank: every stage and every rank sees the same batches, which is what
    makes a stage's ``eval_loss_start`` comparable with its parent's ``eval_loss_end``.
    """
    tokens = open_tokens(info, "eval")
    _check_length(tokens, seq_len, "eval", info["paths"]["eval"])
    total = n * micro_batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, total).round().astype(np.int64)
    return [_windows(tokens, starts[i * micro_batch_size:(i + 1) * micro_batch_size], seq_len)
            for i in range(n)]
