"""Look inside a checkpoint: config, shards, history, mask state, per-tensor statistics,
provenance of grown tensors, Adam moments, and parent vs grown side by side.

A small library for ``grow inspect`` and notebooks::

    ck = open_checkpoint("runs/stage2/final")
    ck.config, ck.params, ck.dtypes, ck.mask, ck.c, ck.history["events"]
    for row in ck.tensors():            # name, shape, dtype, file, nbytes (headers only)
        print(row.name, ck.stats(row.name).rms)
    ck.plan, ck.layer_map, ck.new_layers  # the last growth, replayed from growth.json
    ck.tensor_table()                   # + layer, operator and provenance shares (no data read)
    ck.provenance(name, rows=slice(0, 512))   # uint8 PROVENANCE codes (growth.provenance)
    ck.stats(name, kind="exp_avg_sq")   # Adam moments from DIR/optimizer/, where present
    ck.layer_stats(spectral=True)       # one row per (layer, matrix, kind)
    compare(parent_dir, grown_dir)      # per grown layer: parent and grown norm, new or not

Run directories (stage summaries, TensorBoard scalars) are :mod:`growth.runs`; plots of
all of this are :mod:`growth.plots`.

Opening reads headers only. ``stats`` reads one tensor in 64 MB pieces (fp64 sums), so it
works on tensors of any size; every figure is over the stored values, upcast to fp32.
Works on flm-growth and HF Llama directories alike (tied HF embeddings show lm_head as
the embedding, as the reader unties them).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flmcore.params import BLOCK_MATRICES, split_name
from growth import provenance as prov
from growth.checkpoint import (
    DTYPE_NAMES,
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    CheckpointError,
    CheckpointReader,
)
from growth.config import ModelConfig
from growth.tensor_io import TensorSource
from operators import GrowthPlan
from operators.depth import new_layer_indices

WEIGHT = "weight"
KINDS = (WEIGHT, *MOMENT_KINDS)
EXACT_SPECTRAL_MAX = 4096  # smaller side up to this: exact SVD norm; larger: power iteration


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
        self._moments: dict[str, TensorSource] = {}  # opened on first use

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
    def stats(self, name: str, kind: str = WEIGHT) -> TensorStats:
        """Statistics of one tensor (``kind``: weight, exp_avg or exp_avg_sq), read in pieces."""
        n, total, squares, zeros, absmax, finite = 0, 0.0, 0.0, 0, 0.0, True
        for piece in self._source_for(kind).chunks(name):
            x = piece.to(torch.float64)
            if not torch.isfinite(x.sum()):  # cheap test first; isfinite() only when needed
                ok = torch.isfinite(x)
                finite = finite and bool(ok.all())
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

    # -------------------------------------------------------------- growth record
    @cached_property
    def plan(self) -> GrowthPlan | None:
        """The plan of the last growth in ``growth.json`` (None if this model never grew):
        provenance and the layer map, known without reading a weight."""
        return prov.plan_from_history(self.history)

    @property
    def layer_map(self) -> list[dict[str, Any]]:
        """Per layer ``{"src": parent layer or None, "new": bool}`` (identity if never grown)."""
        if self.plan is None:
            return [{"src": i, "new": False} for i in range(self.config.num_hidden_layers)]
        return self.plan.layer_map

    @property
    def new_layers(self) -> list[int]:
        return new_layer_indices(self.layer_map)

    def provenance(self, name: str, rows: prov.Index = None, cols: prov.Index = None) -> torch.Tensor:
        """uint8 PROVENANCE codes of ``name`` (or of a block) as the last growth wrote it."""
        if self.plan is None:
            raise CheckpointError(f"{self.directory}: growth.json records no grow event, so every "
                                  f"tensor is as trained or initialised (no provenance)")
        return prov.provenance(self.plan, name, rows, cols)

    def tensor_table(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """:meth:`tensors` plus layer index, the growth operator and the share of each
        provenance (from the plan, no tensor data read)."""
        ops = {op.name: op.operator for op in self.plan.tensor_ops()} if self.plan else {}
        out = []
        for row in self.tensors(pattern):
            layer, _ = layer_of(row.name)
            entry = {**asdict(row), "layer": layer,
                     "new_layer": layer is not None and layer in set(self.new_layers),
                     "operator": ops.get(row.name),
                     "provenance": prov.provenance_fractions(self.plan, row.name) if self.plan else None}
            out.append(entry)
        return out

    # -------------------------------------------------------------- Adam moments
    @property
    def moment_kinds(self) -> tuple[str, ...]:
        """The Adam moments stored next to the weights (``DIR/optimizer/<kind>/``)."""
        return tuple(k for k in MOMENT_KINDS if (self.directory / OPTIMIZER_DIR / k).is_dir())

    @property
    def optimizer_state(self) -> dict[str, Any] | None:
        """``DIR/optimizer/state.json`` (step, betas, eps, weight_decay), if present."""
        path = self.directory / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME
        return json.loads(path.read_text()) if path.is_file() else None

    def _source_for(self, kind: str) -> TensorSource:
        if kind == WEIGHT:
            return self._source
        if kind not in MOMENT_KINDS:
            raise ValueError(f"unknown tensor kind {kind!r}; use one of {KINDS}")
        sources = self._moments
        if kind not in sources:
            path = self.directory / OPTIMIZER_DIR / kind
            if not path.is_dir():
                raise CheckpointError(f"{path}: no {kind} moments stored with this checkpoint")
            sources[kind] = TensorSource(CheckpointReader(path, check_shapes=False, config=self.config))
        return sources[kind]

    def get(self, name: str, kind: str = WEIGHT, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One whole tensor (weights or a moment), read on demand."""
        return self._source_for(kind).get(name, dtype)

    def spectral(self, name: str, kind: str = WEIGHT, iters: int | None = None) -> float:
        """Largest singular value of a matrix (reads it whole, in fp32)."""
        return spectral_norm(self.get(name, kind), iters)

    def layer_stats(self, tensors: tuple[str, ...] = BLOCK_MATRICES, kinds: tuple[str, ...] = (WEIGHT,),
                    spectral: bool = False) -> list[dict[str, Any]]:
        """One row per layer × tensor suffix × kind: rms, norm, absmax, zero share (and the
        spectral norm). Kinds not stored here are skipped."""
        rows = []
        for kind in (k for k in kinds if k == WEIGHT or k in self.moment_kinds):
            for i in range(self.config.num_hidden_layers):
                for suffix in tensors:
                    name = f"model.layers.{i}.{suffix}"
                    st = self.stats(name, kind)
                    row = {"layer": i, "tensor": suffix, "kind": kind, "rms": st.rms, "norm": st.norm,
                           "absmax": st.absmax, "zero_fraction": st.zero_fraction}
                    if spectral and len(self.reader.shape(name)) == 2:
                        row["spectral"] = self.spectral(name, kind)
                    rows.append(row)
        return rows

    def close(self) -> None:
        self._source.close()
        for source in self._moments.values():
            source.close()
        self._moments.clear()
        self.reader.close()

    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(directory: str | Path) -> CheckpointView:
    """A lazy :class:`CheckpointView` of ``directory`` (reads headers only)."""
    return CheckpointView(directory)


def layer_of(name: str) -> tuple[int | None, str]:
    """``model.layers.7.mlp.up_proj.weight`` → (7, ``mlp.up_proj.weight``); others (None, name)."""
    return split_name(name)


def spectral_norm(matrix: torch.Tensor, iters: int | None = None, seed: int = 0) -> float:
    """Largest singular value of a 2-D tensor.

    Exact (``torch.linalg.matrix_norm(ord=2)``) when the smaller side is at most
    ``EXACT_SPECTRAL_MAX`` and ``iters`` is None; otherwise ``iters`` (default 100) steps of
    power iteration on AᵀA from a seeded start, stopping early at 1e-6 relative change.
    Note: power iteration approaches σ_max from below; a close second singular value
    slows it down (the gap sets the rate), so the result is a lower bound.
    """
    a = matrix.detach().float()
    if a.dim() != 2:
        raise ValueError(f"spectral norm needs a matrix, got shape {list(a.shape)}")
    if not a.numel():
        return 0.0
    if iters is None and min(a.shape) <= EXACT_SPECTRAL_MAX:
        return float(torch.linalg.matrix_norm(a, ord=2))
    v = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(seed))
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters or 100):
        u = a @ v
        w = a.T @ u
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        new_sigma = math.sqrt(norm)  # ‖AᵀAv‖ → σ² for the top singular vector v
        v = w / norm
        if abs(new_sigma - sigma) <= 1e-6 * new_sigma:
            return new_sigma
        sigma = new_sigma
    return sigma


def compare(parent: CheckpointView | str | Path, grown: CheckpointView | str | Path,
            tensors: tuple[str, ...] = BLOCK_MATRICES, kind: str = WEIGHT, stat: str = "norm",
            plan: GrowthPlan | None = None) -> list[dict[str, Any]]:
    """Parent and grown side by side, one row per grown layer × tensor suffix.

    Rows: ``layer`` (grown index), ``src`` (the parent layer it came from, or None),
    ``new`` (inserted by the growth), ``tensor``, ``parent`` (the statistic of the parent
    layer it kept — None for an inserted layer), ``grown`` and ``ratio`` (grown / parent).
    The layer map is ``plan``'s, else the grown checkpoint's last growth. ``stat`` is a
    :class:`TensorStats` field or ``spectral``.
    """
    opened = [open_checkpoint(x) for x in (parent, grown) if not isinstance(x, CheckpointView)]
    p = parent if isinstance(parent, CheckpointView) else opened[0]
    g = grown if isinstance(grown, CheckpointView) else opened[-1]

    def value(view: CheckpointView, name: str) -> float:
        return view.spectral(name, kind) if stat == "spectral" else getattr(view.stats(name, kind), stat)

    rows = []
    try:
        for i, entry in enumerate(plan.layer_map if plan is not None else g.layer_map):
            for suffix in tensors:
                old = (None if entry["new"] or entry["src"] is None
                       else value(p, f"model.layers.{entry['src']}.{suffix}"))
                new = value(g, f"model.layers.{i}.{suffix}")
                rows.append({"layer": i, "src": entry["src"], "new": bool(entry["new"]), "tensor": suffix,
                             "parent": old, "grown": new,
                             "ratio": new / old if old not in (None, 0.0) else None})
    finally:
        for view in opened:  # only the views opened here
            view.close()
    return rows
