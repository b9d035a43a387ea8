"""HF-layout checkpoints: sharded safetensors + index + config.json + growth history.

Layout (the transformers convention, so ``from_pretrained`` reads our directories)::

    DIR/config.json                          ModelConfig.to_hf_dict()
    DIR/model.safetensors                    one shard, or
    DIR/model-00001-of-0000N.safetensors …   N shards, with
    DIR/model.safetensors.index.json         {"metadata": {"total_size"}, "weight_map"}
    DIR/growth.json                          history: format version, events, parents

Reads are lazy: headers are parsed by hand (shapes and dtypes without touching data) and
tensors come one at a time through ``safe_open``. Writes go to a hidden temporary
directory next to the target that is renamed into place only when complete.
Pickle weights (``*.bin``, ``*.pt``) are refused and never unpickled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flmcore.errors import FlmError
from growth.config import CONFIG_NAME, ConfigError, ModelConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HISTORY_NAME = "growth.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
FORMAT_VERSION = 1
# Adam state next to the weights (written by a stage's final export, grown by `grow apply`):
# DIR/optimizer/exp_avg/ and DIR/optimizer/exp_avg_sq/ are weight-less checkpoint layouts
# (safetensors shards + index, HF names, fp32) and DIR/optimizer/state.json holds
# {"step": int, "betas": [b1, b2], "eps": float, "weight_decay": float}.
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE_NAME = "state.json"
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old HF Llama checkpoints carry this buffer

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class CheckpointError(FlmError):
    """A checkpoint is unusable; the one-line message names the file and tensor/field."""


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1024' → bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise CheckpointError(f"bad size '{text}': use bytes or a unit such as 500MB, 5GB") from None


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype '{name}': use float32 or bfloat16")
    return DTYPES[name]


# ---------------------------------------------------------------------- headers
def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse a safetensors header without reading tensor data; check it fits the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8 or n > 100 * 1024**2:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header says {n} bytes, file has {size})")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing shard file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
            info["shape"] = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded shard (header needs {8 + n + end} bytes, "
                              f"file has {size}); re-copy or regenerate it")
    return header, metadata


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory / pickles[0]}: pickle weights are refused (never unpickled); convert the "
            f"checkpoint to safetensors, e.g. save_pretrained(..., safe_serialization=True)")


# ---------------------------------------------------------------------- reader
class CheckpointReader:
    """Lazy view of a checkpoint directory (ours or a transformers ``save_pretrained``).

    ``config`` is always untied: a tied HF checkpoint reports ``tie_word_embeddings=False``
    and ``lm_head.weight`` reads the embedding (the import unties on the way).
    """

    def __init__(self, directory: str | Path, check_shapes: bool = True,
                 config: ModelConfig | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a checkpoint directory")
        if config is not None:  # a config-less tensor directory, e.g. optimizer/exp_avg/
            self.config = config.replace()
        else:
            try:
                self.config = ModelConfig.load(self.directory / CONFIG_NAME)
            except ConfigError as err:
                raise CheckpointError(str(err)) from None
        self.tied = self.config.tie_word_embeddings
        self.config = self.config.replace(tie_word_embeddings=False)
        self.weight_map = self._weight_map()
        self.headers: dict[str, dict[str, Any]] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        for fname in sorted(set(self.weight_map.values())):
            header, meta = read_header(self.directory / fname)
            self.headers[fname] = header
            self.file_metadata[fname] = meta
        for name, fname in list(self.weight_map.items()):
            if name not in self.headers[fname]:
                raise CheckpointError(f"{self.directory / INDEX_NAME}: tensor '{name}' is indexed in "
                                      f"{fname} but that file does not hold it")
            if name.endswith(IGNORED_SUFFIXES):
                del self.weight_map[name]
        self.history = read_history(self.directory)
        self._handles: dict[str, Any] = {}
        if check_shapes:
            self.check_shapes()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = dict(data["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object)") from None
            for fname in sorted(set(weight_map.values())):
                if not (self.directory / fname).is_file():
                    raise CheckpointError(f"{self.directory / fname}: missing shard named by {INDEX_NAME}")
            return weight_map
        single = self.directory / WEIGHTS_NAME
        if single.is_file():
            header, _ = read_header(single)
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

    def fingerprint(self) -> str:
        """sha256 of config.json and every shard's name, size and header (no tensor data)."""
        h = hashlib.sha256((self.directory / CONFIG_NAME).read_bytes())
        for fname in self.files:
            path = self.directory / fname
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fname.encode() + str(path.stat().st_size).encode() + fh.read(n))
        return h.hexdigest()

    # -------------------------------------------------------------- tensor data
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        stored, fname = self._locate(name)
        handle = self._handles.get(fname)
        if handle is None:
            try:
                handle = safe_open(str(self.directory / fname), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{self.directory / fname}: cannot open ({err})") from None
            self._handles[fname] = handle
        tensor = handle.get_tensor(stored)
        # Note: safetensors hands out views of one private mmap per handle — the same name
        # twice (or a tied lm_head and embed_tokens) alias, and in-place edits show up in
        # later reads. Return an owned tensor (the cast already copies).
        return tensor.clone() if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name, dtype)

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor in memory: for small models, tests and verification only."""
        return dict(self.iter_tensors(dtype))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def append_event(history: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``history`` with ``event`` (timestamped) appended."""
    stamped = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **event}
    return {**history, "format_version": FORMAT_VERSION, "events": [*history["events"], stamped]}


# ---------------------------------------------------------------------- writer
def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: output exists and is not empty; choose a new --out "
                              f"(existing checkpoints are never overwritten)")


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


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file atomically (temp name, then rename)."""
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; shared checkpoints need the umask
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    if set(weight_map.values()) == {WEIGHTS_NAME}:
        return
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_metadata(directory: Path, config: ModelConfig, history: dict[str, Any]) -> None:
    config.save(directory)
    (directory / HISTORY_NAME).write_text(json.dumps(history, indent=2) + "\n")


def staging_dir(out: Path) -> Path:
    """The deterministic temporary directory ``grow apply`` resumes into."""
    return out.parent / f".{out.name}.partial"


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory into place."""
    if out.exists():
        out.rmdir()  # only ever an empty directory here (check_output_dir ran first)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
    os.replace(tmp, out)


def save_checkpoint(out: str | Path, config: ModelConfig,
                    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                    history: dict[str, Any] | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Stream (name, tensor) pairs into a new checkpoint directory.

    Shards are flushed as they fill, so only one shard's tensors are held at a time. The
    directory appears only when complete; on any error the temporary one is removed.
    """
    out = Path(out)
    check_output_dir(out)
    limit = parse_size(max_shard_size)
    cast = torch_dtype(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    items = tensors.items() if isinstance(tensors, dict) else tensors
    try:
        staged: list[list[str]] = []
        buffer: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:
            nonlocal buffer, size
            if buffer:
                write_shard(tmp / f"staged-{len(staged):05d}.safetensors", buffer)
                staged.append(list(buffer))
                buffer, size = {}, 0

        for name, tensor in items:
            t = tensor.detach().to("cpu", cast) if cast is not None else tensor.detach().cpu()
            nbytes = t.numel() * t.element_size()
            if buffer and size + nbytes > limit:
                flush()
            buffer[name] = t
            size += nbytes
            total += nbytes
        flush()
        weight_map: dict[str, str] = {}
        for i, fname in enumerate(shard_file_names(len(staged))):
            os.replace(tmp / f"staged-{i:05d}.safetensors", tmp / fname)
            weight_map.update(dict.fromkeys(staged[i], fname))
        write_index(tmp, weight_map, total)
        write_metadata(tmp, config, history or new_history())
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_model(directory: str | Path, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu"):
    """Build the model on the meta device and materialise it from a checkpoint."""
    from growth.model import build_model

    with CheckpointReader(directory) as reader:
        return build_model(reader.config, reader.state_dict(dtype), device=device)
