"""HF-layout checkpoints: one reader, one streaming writer.

Layout (the transformers convention, so ``from_pretrained`` reads our directories)::

    DIR/config.json                          the release's own dict, sizes updated
    DIR/model.safetensors                    one shard, or
    DIR/model-00001-of-0000N.safetensors …   N shards, with
    DIR/model.safetensors.index.json         {"metadata": {"total_size", "sha256"}, "weight_map"}
    DIR/growth.json                          history: format version, events, parents
    DIR/optimizer/exp_avg/, exp_avg_sq/      Adam moments (weight-less layouts, HF names, fp32)
    DIR/optimizer/state.json                 {"step", "betas", "eps", "weight_decay"}
    DIR/tokenizer.model, *.py, …             release files carried along (CARRIED_NAMES)

:class:`CheckpointReader` parses and validates headers (strictly, see
:mod:`growth.tensor_io`), confines shard names to the directory, and reads one tensor at
a time with exact plain reads. :class:`CheckpointWriter` is the only way a checkpoint is
written (init, apply, import, export-hf, a stage's final export): an exclusive staging
dir guarded by a lock file, header-first streaming shards each carrying the sha256 of its
data, an index with those digests, config, history, carried files, and an atomic rename
into place. :meth:`CheckpointReader.fingerprint` is built from the digests, so it changes
whenever any tensor byte does.
Pickle weights (``*.bin``, ``*.pt``) are never unpickled here; ``grow import`` reads them
with ``torch.load(weights_only=True)`` (:mod:`growth.importer`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from growth.config import CONFIG_NAME, ConfigError, ModelConfig
from growth.tensor_io import (
    DIGEST_KEY,
    SAFETENSORS_DTYPES,
    CheckpointError,
    _as_bytes,
    _umask,
    data_digest,
    nbytes_of,
    read_exact,
    read_header,
    shard_complete,
    write_shard_streaming,
)

__all__ = ["CheckpointError", "CheckpointReader", "CheckpointWriter", "save_checkpoint"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HISTORY_NAME = "growth.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
FORMAT_VERSION = 1
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE_NAME = "state.json"
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old HF Llama checkpoints carry this buffer
# Files of a release that travel with the weights (tokenizer, generation defaults, the
# release's own modeling/configuration/tokenization code).
CARRIED_NAMES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "*.py")
MANIFEST_SUFFIX = ".manifest.json"
LOCK_SUFFIX = ".lock"

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1024' → bytes (finite, positive or zero)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    number, mult = s, 1
    for unit, m in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)], m
            break
    try:
        value = float(number) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0 or value > 2**62:
        raise CheckpointError(f"bad size '{text}': use a finite number of bytes or a unit such as "
                              f"500MB, 5GB")
    return int(value)


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype '{name}': use float32 or bfloat16")
    return DTYPES[name]


def confined(directory: Path, fname: Any, source: Path) -> str:
    """``fname`` when it names a plain file inside ``directory``; else a CheckpointError.

    Note: shard names come from an index anyone can edit; an absolute path, ``..`` or a
    sub-path would make the reader open files outside the checkpoint (``/etc/passwd``).
    Symlinked shard files are allowed (the HF hub cache links into its blob store).
    """
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname
            or "\\" in fname or "\0" in fname or Path(fname).name != fname):
        raise CheckpointError(f"{source}: shard name {fname!r} is not a file name inside "
                              f"{directory}; refused")
    return fname


def carried_files(directory: Path) -> list[str]:
    """Names of the release files in ``directory`` that travel with the weights."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in CARRIED_NAMES))


# ---------------------------------------------------------------------- reader
class CheckpointReader:
    """Lazy view of a checkpoint directory (ours or a transformers ``save_pretrained``).

    ``config`` is always untied: a tied HF checkpoint reports ``tie_word_embeddings=False``
    and ``lm_head.weight`` reads the embedding (the import unties on the way).
    ``raw_config`` is config.json exactly as stored (every field of a release kept), or
    None for a config-less tensor directory such as ``optimizer/exp_avg/``.
    """

    def __init__(self, directory: str | Path, check_shapes: bool = True,
                 config: ModelConfig | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        self.raw_config: dict[str, Any] | None = None
        if config is not None:  # a config-less tensor directory, e.g. optimizer/exp_avg/
            loaded = config
        else:
            try:
                loaded = ModelConfig.load(self.directory / CONFIG_NAME)
                self.raw_config = json.loads((self.directory / CONFIG_NAME).read_text())
            except ConfigError as err:
                raise CheckpointError(str(err)) from None
        self.tied = loaded.tie_word_embeddings
        self.config = loaded.replace(tie_word_embeddings=False)
        self.index_digests: dict[str, str] = {}
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict[str, Any]] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        self.data_start: dict[str, int] = {}
        for fname in sorted(set(self.weight_map.values())):
            header, meta, start = read_header(self.directory / fname)
            self.headers[fname], self.file_metadata[fname], self.data_start[fname] = header, meta, start
            listed = self.index_digests.get(fname)
            if listed is not None and meta.get(DIGEST_KEY) not in (None, listed):
                raise CheckpointError(f"{self.directory / INDEX_NAME}: digest of {fname} differs from "
                                      f"the one in its header; the shard was replaced")
        for name, fname in list(self.weight_map.items()):
            if name not in self.headers[fname]:
                raise CheckpointError(f"{self.directory / INDEX_NAME}: tensor '{name}' is indexed in "
                                      f"{fname} but that file does not hold it")
            if name.endswith(IGNORED_SUFFIXES):
                del self.weight_map[name]
        self.history = read_history(self.directory)
        self._files: dict[str, Any] = {}
        self._fingerprint: str | None = None
        if check_shapes:
            self.check_shapes()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = dict(data["weight_map"])
                digests = (data.get("metadata") or {}).get(DIGEST_KEY) or {}
                if not isinstance(digests, dict):
                    raise ValueError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object)") from None
            for fname in sorted(set(weight_map.values()), key=str):
                confined(self.directory, fname, index)
                if not (self.directory / fname).is_file():
                    raise CheckpointError(f"{self.directory / fname}: missing shard named by {INDEX_NAME}")
            self.index_digests = {str(k): str(v) for k, v in digests.items()}
            return weight_map
        single = self.directory / WEIGHTS_NAME
        if single.is_file():
            header, _, _ = read_header(single)
            return {name: WEIGHTS_NAME for name in header}
        _refuse_pickles(self.directory)
        raise CheckpointError(f"{self.directory}: no {WEIGHTS_NAME} or {INDEX_NAME} found")

    # -------------------------------------------------------------- metadata only
    def names(self) -> list[str]:
        """Canonical names in config order (lm_head included for tied checkpoints)."""
        return list(self.config.tensor_shapes())

    def _locate(self, name: str) -> tuple[str, str]:
        if name in self.weight_map:
            return name, self.weight_map[name]
        if name == "lm_head.weight" and self.tied:
            return "model.embed_tokens.weight", self.weight_map["model.embed_tokens.weight"]
        raise CheckpointError(f"{self.directory}: tensor '{name}' is not in this checkpoint")

    locate = _locate

    def shape(self, name: str) -> tuple[int, ...]:
        stored, fname = self._locate(name)
        return self.headers[fname][stored]["shape"]

    def dtype(self, name: str) -> torch.dtype:
        stored, fname = self._locate(name)
        return SAFETENSORS_DTYPES[self.headers[fname][stored]["dtype"]]

    def nbytes(self, name: str) -> int:
        stored, fname = self._locate(name)
        start, stop = self.headers[fname][stored]["data_offsets"]
        return stop - start

    @property
    def files(self) -> list[str]:
        return sorted(self.headers)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.weight_map)

    @property
    def dtypes(self) -> set[torch.dtype]:
        return {self.dtype(n) for n in self.weight_map}

    def carried_files(self) -> list[str]:
        return carried_files(self.directory)

    def check_shapes(self) -> None:
        if self.config.num_tensors > len(self.weight_map) + 1:  # never list a 10⁹-layer config
            missing = next(n for n, _ in self.config.iter_tensor_shapes() if n not in self.weight_map)
            listing = INDEX_NAME if (self.directory / INDEX_NAME).is_file() else WEIGHTS_NAME
            raise CheckpointError(f"{self.directory / listing}: tensor '{missing}' is missing")
        expected = self.config.tensor_shapes()
        where = lambda n: self.directory / self._locate(n)[1]  # noqa: E731
        for name in self.weight_map:
            if name not in expected and not (name == "lm_head.weight" and self.tied):
                raise CheckpointError(f"{self.directory / self.weight_map[name]}: unknown tensor "
                                      f"'{name}' (not a Tele-FLM/Llama parameter of this config)")
        for name, shape in expected.items():
            if name not in self.weight_map and not (name == "lm_head.weight" and self.tied):
                listing = INDEX_NAME if (self.directory / INDEX_NAME).is_file() else WEIGHTS_NAME
                raise CheckpointError(f"{self.directory / listing}: tensor '{name}' is missing")
            if self.shape(name) != shape:
                raise CheckpointError(f"{where(name)}: tensor '{name}' has shape {list(self.shape(name))}"
                                      f" but config.json implies {list(shape)}")

    def digests(self) -> dict[str, str | None]:
        """Each shard's stored data digest (None for files written without one)."""
        return {f: self.file_metadata[f].get(DIGEST_KEY) or self.index_digests.get(f) for f in self.files}

    def fingerprint(self) -> str:
        """sha256 over config.json and, per shard, its name, header and data digest.

        Content-based: any changed tensor byte changes it. Shards written by
        :class:`CheckpointWriter` carry their digest; for others (HF downloads) the data
        is hashed here, once per reader.
        """
        if self._fingerprint is None:
            h = hashlib.sha256((self.directory / CONFIG_NAME).read_bytes()
                               if (self.directory / CONFIG_NAME).is_file() else b"")
            for fname, digest in self.digests().items():
                path = self.directory / fname
                if digest is None:
                    digest = data_digest(path, self.data_start[fname])
                header = {k: [v["dtype"], list(v["shape"])] for k, v in self.headers[fname].items()}
                h.update(json.dumps([fname, header, digest]).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -------------------------------------------------------------- tensor data
    def _open(self, fname: str) -> Any:
        fh = self._files.get(fname)
        if fh is None:
            fh = open(self.directory / fname, "rb")  # noqa: SIM115 (kept open until close())
            self._files[fname] = fh
        return fh

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An owned tensor read with plain reads: exactly its bytes, or an error."""
        stored, fname = self._locate(name)
        info = self.headers[fname][stored]
        start, _ = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        read_exact(self._open(fname), self.data_start[fname] + start, _as_bytes(out),
                   self.directory / fname, f"tensor '{stored}'")
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def chunks(self, name: str, elements: int = 1 << 24) -> Iterator[torch.Tensor]:
        """``name`` flattened, in pieces of at most ``elements`` (stored dtype): bounded
        memory for statistics over tensors of any size."""
        stored, fname = self._locate(name)
        info = self.headers[fname][stored]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        size = torch.empty((), dtype=dtype).element_size()
        total = (stop - start) // size
        for first in range(0, total, elements):
            piece = torch.empty(min(elements, total - first), dtype=dtype)
            read_exact(self._open(fname), self.data_start[fname] + start + first * size,
                       _as_bytes(piece), self.directory / fname, f"tensor '{stored}'")
            yield piece

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name, dtype)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor in memory: for small models, tests and verification only."""
        return dict(self.iter_tensors(dtype))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory / pickles[0]}: pickle weights are not read here (never unpickled); run "
            f"`grow import {directory} --out NEW_DIR` first, which converts them safely")


# ---------------------------------------------------------------------- optimizer/ layout
def read_optimizer_state(directory: str | Path) -> dict[str, Any] | None:
    """DIR/optimizer/state.json, validated; None when DIR has no optimizer/ dir."""
    opt = Path(directory) / OPTIMIZER_DIR
    if not opt.is_dir():
        return None
    path = opt / OPTIMIZER_STATE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (optimizer state needs step, betas, eps)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt optimizer state (not a JSON object)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt optimizer state (not a JSON object)")
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: field 'step' must be a non-negative integer, got {step!r}")
    return data


def open_moments(directory: str | Path, config: ModelConfig) -> dict[str, CheckpointReader]:
    """Readers for DIR/optimizer/{exp_avg,exp_avg_sq} (shapes checked against ``config``),
    or {} when DIR has no optimizer/ dir."""
    if read_optimizer_state(directory) is None:
        return {}
    root = Path(directory) / OPTIMIZER_DIR
    return {kind: CheckpointReader(root / kind, config=config) for kind in MOMENT_KINDS}


# ---------------------------------------------------------------------- history
def new_history() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "events": []}


def read_history(directory: Path) -> dict[str, Any]:
    path = directory / HISTORY_NAME
    if not path.is_file():
        return new_history()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("events"), list):
            raise ValueError
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: corrupt growth history (needs an 'events' list)") from None
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: field 'format_version' {data['format_version']} is newer "
                              f"than this flm-growth ({FORMAT_VERSION}); upgrade flm-growth")
    return data


def parent_fingerprint(directory: str | Path) -> str | None:
    """The content fingerprint of the parent DIRECTORY was last grown from (growth.json's
    last ``grow`` event), or None. Compare it with ``CheckpointReader(parent).fingerprint()``
    to know whether a grown checkpoint still matches its parent."""
    for event in reversed(read_history(Path(directory))["events"]):
        if isinstance(event, dict) and event.get("kind") == "grow":
            parent = event.get("parent")
            return parent.get("fingerprint") if isinstance(parent, dict) else None
    return None


def append_event(history: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``history`` with ``event`` (timestamped) appended."""
    stamped = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **event}
    return {**history, "format_version": FORMAT_VERSION, "events": [*history["events"], stamped]}


# ---------------------------------------------------------------------- config.json
KEEP_RELEASE_KEYS = ("architectures", "model_type", "auto_map")
ADDED_ONLY_IF_NEW = ("rope_parameters", "mlp_bias", "attention_bias", "hidden_act", "head_dim",
                     "initializer_range")


def config_dict(config: ModelConfig, raw: dict[str, Any] | None = None,
                dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json for ``config``: ``raw`` (the source's own dict) with every field kept and
    only what ``config`` changes updated; without ``raw``, ``config.to_hf_dict()``.

    Note: a release's ``model_type`` / ``architectures`` / ``auto_map`` are kept (the
    release's code loads by them), except that a plain Llama source that growth made
    non-plain (masks, μP) takes ours, so transformers cannot load it as a plain Llama.
    """
    new = config.to_hf_dict()
    if raw is None:
        return new
    out = dict(raw)
    plain_source = str(raw.get("model_type", "llama")).lower() == "llama"
    keep_release = not (plain_source and not config.is_plain_llama)
    implied_head_dim = config.hidden_size // config.num_attention_heads
    for key, value in new.items():
        if key in KEEP_RELEASE_KEYS and key in raw and keep_release:
            continue
        if key not in raw and key in ADDED_ONLY_IF_NEW and not (key == "head_dim" and value != implied_head_dim):
            continue
        out[key] = value
    for key in ("growth_mask", "valid_vocab_size"):
        if key not in new:
            out.pop(key, None)
    if dtype is not None:
        name = DTYPE_NAMES[dtype]
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        for k in keys:
            out[k] = name
    return out


# ---------------------------------------------------------------------- output dirs
def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an OUT that publishing could not replace."""
    out = Path(out)
    if out.is_symlink():
        raise CheckpointError(f"{out}: output is a symlink; pass the real path (a checkpoint is "
                              f"published by renaming a directory into place)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output exists and is not empty; choose a new --out "
                              f"(existing checkpoints are never overwritten)")
    if out.exists() and os.path.ismount(out):
        raise CheckpointError(f"{out}: output is a mount point, which cannot be replaced by a "
                              f"rename; use a new directory inside it, e.g. {out / 'checkpoint'}")
    if not out.parent.exists():
        return
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{out.parent}: not writable; choose another --out")


def staging_dir(out: str | Path) -> Path:
    """The one staging directory of OUT (``.OUT.partial`` beside it)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def manifest_path(out: str | Path) -> Path:
    """What the staging dir holds (kept beside it, so a failed publish never loses it)."""
    out = Path(out)
    return out.parent / f".{out.name}{MANIFEST_SUFFIX}"


class DirLock:
    """An exclusive ``flock`` on a lock file holding the holder's pid.

    A live holder means a one-line refusal; a dead one's lock is gone with its process
    (the kernel drops flocks), so its file is simply taken over.
    """

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                try:
                    pid = self.path.read_text().strip() or "?"
                except OSError:
                    pid = "?"
                raise CheckpointError(f"{self.what} is being written by another process (pid {pid}, "
                                      f"lock {self.path}); wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file meanwhile: retry on the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise CheckpointError(f"{self.path}: could not take the lock (it keeps changing)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) in order into shards of at most ``max_shard_size``
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    return [WEIGHTS_NAME] if count == 1 else [SHARD_NAME.format(i + 1, count) for i in range(count)]


Entry = tuple[str, tuple[int, ...], torch.dtype]


def plan_entries(entries: Sequence[Entry], max_shard_size: int, root: str = "") -> list[tuple[str, list[Entry]]]:
    """(relative shard path, entries) of the deterministic shard plan of ``entries``."""
    by_name = {e[0]: e for e in entries}
    groups = plan_shards(((n, nbytes_of(s, d)) for n, s, d in entries), max_shard_size)
    return [(root + fname, [by_name[n] for n in names])
            for fname, names in zip(shard_file_names(len(groups)), groups, strict=True)]


def write_json(path: Path, data: Any, sort_keys: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the writer
class CheckpointWriter:
    """The one way a checkpoint directory is written.

    ::

        with CheckpointWriter(out, key=request_key) as w:   # lock, staging (resumed if same key)
            w.write_shard("model-00001-of-00002.safetensors", entries, produce)
            w.write_index("", {name: file}, total)           # digests read from the shards
            w.write_config(config, raw=source_raw, dtype=torch.bfloat16)
            w.carry(source_dir)                              # tokenizer, *.py, …
            w.write_history(history)
            w.publish()

    ``key`` (any JSON value) makes the staging dir resumable: a later writer with the same
    key keeps the complete, digest-checked shards; another key starts afresh. Without a
    key every attempt starts afresh. On an error inside the ``with``: an OSError or an
    interrupt keeps a keyed staging dir for a resume; anything else removes it. The lock
    file (``.OUT.lock``) is held from construction to publish/abort.
    """

    def __init__(self, out: str | Path, key: Any = None, time: str | None = None):
        self.out = Path(out)
        check_output_dir(self.out)
        self.staging = staging_dir(self.out)
        self.key = key
        self._lock = DirLock(lock_path(self.out), str(self.out)).acquire()
        self.resumed = False
        try:
            self.manifest = self._open_staging(time)
        except BaseException:
            self._lock.release()
            raise
        self._done = False
        self._publishing = False

    @property
    def time(self) -> str:
        return self.manifest["time"]

    def _open_staging(self, time: str | None) -> dict[str, Any]:
        mpath = manifest_path(self.out)
        if self.key is not None and self.staging.is_dir():
            try:
                old = json.loads(mpath.read_text())
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("key") == json.loads(json.dumps(self.key)):
                self.resumed = True
                return old
            print(f"grow: {self.staging} holds the partial output of another request (or of a "
                  f"source that has changed since); starting afresh", file=sys.stderr)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        manifest = {"key": self.key, "time": time or event_time()}
        if self.key is not None:
            write_json(mpath, manifest)
        else:
            mpath.unlink(missing_ok=True)
        return manifest

    # ---------------------------------------------------------- shards
    def shard_done(self, relpath: str, entries: Sequence[Entry]) -> bool:
        """True when a resumed staging dir already holds this shard, whole and intact."""
        return self.resumed and shard_complete(self.staging / relpath, entries) is not None

    def write_shard(self, relpath: str, entries: Sequence[Entry],
                    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
                    **kwargs: Any) -> str:
        """Stream one shard into the staging dir (see tensor_io.write_shard_streaming)."""
        return write_shard_streaming(self.staging / relpath, entries, produce, **kwargs)

    def write_tensors(self, config: ModelConfig | None,
                      tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                      root: str = "", dtype: torch.dtype | None = None,
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                      on_tensor: Callable[[str, int], None] | None = None) -> dict[str, str]:
        """Stream (name, tensor) pairs into shards + index under ``root``; returns the
        weight map. A dict gives its own names and dtypes; a stream must follow
        ``config``'s canonical order (it is planned from the config before it is read)."""
        if isinstance(tensors, dict):
            entries = [(n, tuple(t.shape), dtype or t.dtype) for n, t in tensors.items()]
            it: Iterator[tuple[str, torch.Tensor]] = iter(tensors.items())
            first = None
        else:
            it = iter(tensors)
            first = next(it, None)
            if config is None or first is None:
                rest = dict([first] if first else []) | dict(it)
                return self.write_tensors(config, rest, root, dtype, max_shard_size, on_tensor)
            kind = dtype or first[1].dtype
            entries = [(n, tuple(s), kind) for n, s in config.tensor_shapes().items()]
        pending = [first] if first is not None else []

        def produce(name: str) -> torch.Tensor:
            got, t = pending.pop() if pending else next(it, (None, None))
            if got != name:
                raise CheckpointError(f"{self.out}: tensor stream gave {got!r} where '{name}' was "
                                      f"expected (canonical order)")
            t = t.detach().cpu()
            if dtype is None and t.dtype != entries[0][2] and not isinstance(tensors, dict):
                raise CheckpointError(f"{self.out}: tensor '{name}' is {t.dtype}, the others "
                                      f"{entries[0][2]}; pass a dtype")
            return t

        weight_map: dict[str, str] = {}
        total = 0
        for relpath, group in plan_entries(entries, max_shard_size, root):
            self.write_shard(relpath, group, produce, after_tensor=on_tensor)
            weight_map.update(dict.fromkeys((n for n, _, _ in group), Path(relpath).name))
            total += sum(nbytes_of(s, d) for _, s, d in group)
        leftover = pending or [x for x in [next(it, None)] if x is not None]
        if leftover:
            raise CheckpointError(f"{self.out}: tensor '{leftover[0][0]}' is not a parameter of the config")
        self.write_index(root, weight_map, total)
        return weight_map

    def write_index(self, root: str, weight_map: dict[str, str], total_size: int) -> None:
        """The index of the shards under ``root`` with their digests (none for one shard:
        its digest is in its own header)."""
        directory = self.staging / root
        files = sorted(set(weight_map.values()))
        if files == [WEIGHTS_NAME]:
            return
        digests = {}
        for fname in files:
            _, meta, _ = read_header(directory / fname)
            digests[fname] = meta.get(DIGEST_KEY)
        index = {"metadata": {"total_size": total_size, DIGEST_KEY: digests},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(directory / INDEX_NAME, index)

    # ---------------------------------------------------------- the small files
    def write_config(self, config: ModelConfig, raw: dict[str, Any] | None = None,
                     dtype: torch.dtype | None = None, data: dict[str, Any] | None = None) -> None:
        write_json(self.staging / CONFIG_NAME, data if data is not None else config_dict(config, raw, dtype),
                   sort_keys=True)

    def write_history(self, history: dict[str, Any]) -> None:
        write_json(self.staging / HISTORY_NAME, history)

    def write_optimizer_state(self, state: dict[str, Any]) -> None:
        write_json(self.staging / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME, state)

    def copy_optimizer_state(self, source: str | Path) -> None:
        """SOURCE/optimizer/state.json, validated, copied byte for byte."""
        read_optimizer_state(source)
        target = self.staging / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source) / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME, target)

    def carry(self, source: str | Path | None) -> list[str]:
        """Copy the release files of ``source`` (CARRIED_NAMES) into the output."""
        if source is None:
            return []
        names = carried_files(Path(source))
        for name in names:
            shutil.copyfile(Path(source) / name, self.staging / name)
        return names

    # ---------------------------------------------------------- finish
    def publish(self) -> Path:
        """Rename the finished staging dir into place and drop the lock. If that fails the
        staging dir and its manifest are kept (the same command then resumes)."""
        self._publishing = True
        if self.out.is_symlink() or (self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir()))):
            raise CheckpointError(f"{self.out}: output appeared while writing; the finished work is "
                                  f"kept in {self.staging}: move {self.out} away and rerun")
        os.chmod(self.staging, 0o777 & ~_umask())
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.staging, self.out)
        manifest_path(self.out).unlink(missing_ok=True)
        self._done = True
        self._lock.release()
        return self.out

    def abort(self, keep: bool = False) -> None:
        """Give up: remove the staging dir (``keep``: leave it for a resume); drop the lock."""
        if not self._done:
            if not keep:
                shutil.rmtree(self.staging, ignore_errors=True)
                manifest_path(self.out).unlink(missing_ok=True)
            self._done = True
        self._lock.release()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._done:
                self.abort()
            return
        keep = self.key is not None and (self._publishing or (
            issubclass(exc_type, (OSError, KeyboardInterrupt)) and not isinstance(exc, CheckpointError)))
        self.abort(keep=keep)


def event_time() -> str:
    """Now (UTC, ISO 8601), or ``SOURCE_DATE_EPOCH`` when set, for reproducible outputs."""
    import time

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch) if epoch else time.time(), datetime.timezone.utc)
    return when.isoformat(timespec="seconds")


def save_checkpoint(out: str | Path, config: ModelConfig,
                    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                    history: dict[str, Any] | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | str | None = None,
                    raw_config: dict[str, Any] | None = None) -> Path:
    """Stream (name, tensor) pairs into a new checkpoint directory (a CheckpointWriter).

    A stream is written tensor by tensor (header first, one tensor in memory); the
    directory appears only when complete; on any error nothing is left.
    """
    limit = parse_size(max_shard_size)
    cast = torch_dtype(dtype)
    with CheckpointWriter(out) as writer:
        writer.write_tensors(config, tensors, dtype=cast, max_shard_size=limit)
        writer.write_config(config, raw_config)
        writer.write_history(history or new_history())
        return writer.publish()


def load_model(directory: str | Path, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu"):
    """Build the model on the meta device and materialise it from a checkpoint."""
    from growth.model import build_model

    with CheckpointReader(directory) as reader:
        return build_model(reader.config, reader.state_dict(dtype), device=device)

