"""CheckpointReader: the one reader of checkpoint directories, and the optimizer/ layout's readers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint.format import (
    IGNORED_SUFFIXES,
    INDEX_NAME,
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    carried_files,
    confined,
    read_history,
)
from growth.config import CONFIG_NAME, ConfigError, ModelConfig
from growth.tensor_io import (
    DIGEST_KEY,
    SAFETENSORS_DTYPES,
    CheckpointError,
    _as_bytes,
    data_digest,
    read_exact,
    read_header,
)


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




def load_model(directory: str | Path, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu"):
    """Build the model on the meta device and materialise it from a checkpoint."""
    from growth.model import build_model

    with CheckpointReader(directory) as reader:
        return build_model(reader.config, reader.state_dict(dtype), device=device)

