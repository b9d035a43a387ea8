"""Look inside a checkpoint: config, shards, history, mask state, per-tensor statistics.

A small library for ``grow inspect`` and notebooks::

    ck = open_checkpoint("runs/stage2/final")
    ck.config, ck.params, ck.dtypes, ck.mask, ck.c, ck.history["events"]
    for row in ck.tensors():            # name, shape, dtype, file, nbytes (headers only)
        print(row.name, ck.stats(row.name).rms)

Opening reads headers only. ``stats`` reads one tensor in 64 MB pieces (fp64 sums), so it
works on tensors of any size; every figure is over the stored values, upcast to fp32.
Works on flm-growth and HF Llama directories alike (tied HF embeddings show lm_head as
the embedding, as the reader unties them).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import DTYPE_NAMES, CheckpointReader
from growth.config import ModelConfig
from growth.tensor_io import TensorSource


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    nbytes: int


@dataclass(frozen=True)
class TensorStats:
    name: str
    numel: int
    rms: float  # sqrt(mean(x²))
    absmax: float  # max |x|
    norm: float  # Frobenius norm sqrt(Σ x²)
    mean: float
    std: float  # population std
    zero_fraction: float  # share of exact zeros (zero-initialised growth shows up here)
    finite: bool  # False if any NaN or inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckpointView:
    """Lazy view of one checkpoint directory; close() (or ``with``) releases its files."""

    def __init__(self, directory: str | Path):
        self.reader = CheckpointReader(directory)
        self.directory = self.reader.directory
        self._source = TensorSource(self.reader)

    # -------------------------------------------------------------- metadata
    @property
    def config(self) -> ModelConfig:
        return self.reader.config

    @property
    def params(self) -> int:
        return self.config.params

    @property
    def history(self) -> dict[str, Any]:
        return self.reader.history

    @property
    def mask(self) -> dict[str, Any] | None:
        """The live MSG mask record, or None for a plain model."""
        return self.config.growth_mask

    @property
    def c(self) -> float | None:
        """The mask ramp value (0 = just grown, 1 = finished), None without masks."""
        return None if self.mask is None else float(self.mask["c"])

    @property
    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.tensors():
            counts[row.dtype] = counts.get(row.dtype, 0) + 1
        return counts

    def shards(self) -> list[dict[str, Any]]:
        per_file = {f: {"file": f, "bytes": (self.directory / f).stat().st_size, "tensors": 0}
                    for f in self.reader.files}
        for fname in self.reader.weight_map.values():
            per_file[fname]["tensors"] += 1
        return list(per_file.values())

    def tensors(self, pattern: str | None = None) -> list[TensorRow]:
        """Every parameter in canonical order (optionally those matching a glob)."""
        rows = []
        for name in self.reader.names():
            if pattern and not fnmatch.fnmatchcase(name, pattern):
                continue
            _, fname = self._source.locate(name)
            dtype = self.reader.dtype(name)
            rows.append(TensorRow(name, self.reader.shape(name), DTYPE_NAMES.get(dtype, str(dtype)),
                                  fname, self.reader.nbytes(name)))
        return rows

    # -------------------------------------------------------------- data
    def stats(self, name: str) -> TensorStats:
        n, total, squares, zeros, absmax, finite = 0, 0.0, 0.0, 0, 0.0, True
        for piece in self._source.chunks(name):
            x = piece.to(torch.float64)
            ok = torch.isfinite(x)
            if not ok.all():
                finite = False
                x = x[ok]
            n += piece.numel()
            total += x.sum().item()
            squares += x.square().sum().item()
            zeros += int((x == 0).sum())
            if x.numel():
                absmax = max(absmax, x.abs().max().item())
        mean = total / n if n else 0.0
        return TensorStats(name=name, numel=n, rms=math.sqrt(squares / n) if n else 0.0, absmax=absmax,
                           norm=math.sqrt(squares), mean=mean,
                           std=math.sqrt(max(squares / n - mean * mean, 0.0)) if n else 0.0,
                           zero_fraction=zeros / n if n else 0.0, finite=finite)

    def summary(self, stats: bool = True, pattern: str | None = None) -> dict[str, Any]:
        """Everything ``grow inspect --json`` prints, as one JSON-safe dict."""
        rows = []
        for row in self.tensors(pattern):
            entry = {**asdict(row), "shape": list(row.shape)}
            if stats:
                entry.update({k: v for k, v in self.stats(row.name).to_dict().items() if k != "name"})
            rows.append(entry)
        return {"directory": str(self.directory), "config": self.config.to_hf_dict(),
                "params": self.params, "dtypes": self.dtypes, "tied_on_disk": self.reader.tied,
                "shards": self.shards(), "tensor_bytes": self.reader.total_bytes,
                "fingerprint": self.reader.fingerprint(), "mask": self.mask, "c": self.c,
                "history": self.history, "tensors": rows}

    def close(self) -> None:
        self._source.close()
        self.reader.close()

    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(directory: str | Path) -> CheckpointView:
    """A lazy :class:`CheckpointView` of ``directory`` (reads headers only)."""
    return CheckpointView(directory)
