"""A growth plan: source config + target config + spec → grown config and per-tensor maps.

``make_plan`` reads no weights (except for ``positions="distance"``), so 52B → 102B → 1T
plans run on flavors alone. ``GrowthPlan.grow_tensor`` produces one target tensor from
one source tensor; the streaming executor calls it tensor by tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flmcore.config import ModelConfig
from flmcore.init import param_init_std, seeded_generator
from flmcore.params import EMBEDDING, LAYER_RE, LM_HEAD, PARAM_BY_KEY, RESIDUAL_WRITERS, Param, is_norm
from operators import axes as ax
from operators.depth import make_layer_map, new_layer_indices
from operators.mup import embedding_compensation, logit_compensation
from operators.spec import GrowthError, GrowthSpec
from operators.width import check_shapes, folded_source, width_axes

KINDS = ("weight", "exp_avg", "exp_avg_sq")
ROW_BLOCK = 256  # random fields are seeded per this many rows, so chunking never changes values
CHUNK_ELEMENTS = 1 << 25  # default row block of grow_tensor_chunks: 128 MB of fp32

# Provenance codes (uint8) of every element of a grown tensor.
COPIED, ZERO, INIT, CLONED, LAYER_COPY, MASKED = range(6)
PROVENANCE = {COPIED: "copied", ZERO: "zero", INIT: "init", CLONED: "cloned",
              LAYER_COPY: "layer-copy", MASKED: "masked"}


@dataclass
class TensorOp:
    name: str
    src_name: str | None  # None: built without reading (fresh init or zeros)
    src_shape: tuple[int, ...] | None
    shape: tuple[int, ...]
    operator: str



class GrowthPlan:
    """The growth of one source config into one target config under one spec (see make_plan)."""

    def __init__(self, src: ModelConfig, target: ModelConfig, spec: GrowthSpec,
                 get_tensor: Callable[[str], torch.Tensor] | None = None,
                 layer_map: list[dict[str, Any]] | None = None):
        spec.validate()
        self.spec = spec
        self.src_config = folded_source(src)
        self.target = target
        check_shapes(self.src_config, target, spec)
        s, t = self.src_config, target
        if layer_map is None:
            layer_map, self.distances = make_layer_map(
                s.num_hidden_layers, t.num_hidden_layers, spec.positions, spec.depth_source, get_tensor)
        else:
            self.distances = None
        self.layer_map = layer_map
        self.axes = width_axes(self.src_config, target, spec)
        self.config = self._grown_config()
        self._shapes = self.config.tensor_shapes()
        self._src_shapes = self.src_config.tensor_shapes()

    # ------------------------------------------------------------------ construction

    def _grown_config(self) -> ModelConfig:
        s, t, spec = self.src_config, self.target, self.spec
        mask: dict[str, Any] = {}
        if spec.hidden == "masked" and t.hidden_size > s.hidden_size:
            mask["hidden_size"] = s.hidden_size
        if spec.ffn == "masked" and t.intermediate_size > s.intermediate_size:
            mask["intermediate_size"] = s.intermediate_size
        if spec.heads == "masked" and t.num_key_value_heads > s.num_key_value_heads:
            mask["num_key_value_heads"] = s.num_key_value_heads
        if spec.depth == "masked" and t.num_hidden_layers > s.num_hidden_layers:
            mask["new_layers"] = new_layer_indices(self.layer_map)
        eps = s.rms_norm_eps * self.axes.norm_scale ** 2
        valid = s.valid_vocab_size
        if t.vocab_size > s.vocab_size and valid is None:
            valid = s.vocab_size
        return t.replace(rms_norm_eps=eps, rope_theta=s.rope_theta, valid_vocab_size=valid,
                         tie_word_embeddings=False, growth_mask={"c": 0.0, **mask} if mask else None,
                         extra=dict(t.extra))

    # ------------------------------------------------------------------ per-tensor plan
    def _route(self, name: str) -> tuple[str | None, str, dict[str, Any] | None]:
        """(source name or None, suffix, layer-map entry) of a target tensor."""
        m = LAYER_RE.match(name)
        if not m:
            return name, name, None
        entry = self.layer_map[int(m.group(1))]
        suffix = m.group(2)
        if entry["src"] is None:
            return None, suffix, entry
        if entry["new"] and self.spec.depth == "zero" and suffix in ZEROED_IN_IDENTITY:
            return None, suffix, entry
        return f"model.layers.{entry['src']}.{suffix}", suffix, entry

    def _param(self, suffix: str) -> Param:
        p = PARAM_BY_KEY.get(suffix)
        if p is None:
            raise GrowthError(f"tensor '{suffix}': not a Tele-FLM/Llama parameter")
        return p

    def _maps(self, suffix: str) -> tuple[ax.AxisMap, ...]:
        return tuple(self.axes.of(axis) for axis in self._param(suffix).axes)

    def tensor_ops(self) -> list[TensorOp]:
        ops = []
        for name, shape in self._shapes.items():
            src_name, suffix, entry = self._route(name)
            ops.append(TensorOp(name, src_name, self._src_shapes.get(src_name) if src_name else None,
                                shape, self._describe(name, suffix, entry)))
        return ops

    def _describe(self, name: str, suffix: str, entry: dict[str, Any] | None) -> str:
        parts = []
        if entry is not None and entry["new"]:
            src = "init" if entry["src"] is None else "neighbour"
            parts.append(f"new layer ({self.spec.depth}, from {src})")
            if self.spec.depth == "zero" and suffix in ZEROED_IN_IDENTITY:
                return parts[0] + ", zero"
        grows = {"hidden": self.target.hidden_size != self.src_config.hidden_size,
                 "ffn": self.target.intermediate_size != self.src_config.intermediate_size,
                 "heads": self.target.num_key_value_heads != self.src_config.num_key_value_heads}
        widths = {axis.split(".")[0] for axis in self._param(suffix).axes}
        touches = {"hidden": "hidden" in widths, "ffn": "ffn" in widths,
                   "heads": bool(widths & {"q", "kv"})}
        parts += [f"{dim}:{getattr(self.spec, dim)}" for dim in grows if grows[dim] and touches[dim]]
        if name in (EMBEDDING.key, LM_HEAD.key):
            if self.target.vocab_size != self.src_config.vocab_size:
                parts.append("vocab:pad")
            comp = (embedding_compensation if name == EMBEDDING.key else logit_compensation)(
                self.src_config, self.config)
            if comp != 1.0:
                parts.append(f"mup×{comp:.6g}")
        return ", ".join(parts) or "copy"

    # ------------------------------------------------------------------ the math
    def grow_tensor(self, name: str, get_src: Callable[[str], torch.Tensor],
                    kind: str = "weight") -> torch.Tensor:
        """Target tensor ``name`` (fp32) from its source, for weights or Adam moments."""
        return torch.cat(list(self.grow_tensor_chunks(name, get_src, kind, max_elements=None)))

    def grow_tensor_chunks(self, name: str, get_src: Callable[[str], torch.Tensor],
                           kind: str = "weight", max_elements: int | None = CHUNK_ELEMENTS
                           ) -> Iterator[torch.Tensor]:
        """The target tensor as consecutive fp32 row blocks of at most ``max_elements``
        (None: one block). The source is read once and kept in its own dtype; every block
        is computed on its own, so memory is the source plus one block, and the values do
        not depend on the block size (random fields are seeded per ROW_BLOCK rows)."""
        if kind not in KINDS:
            raise GrowthError(f"unknown tensor kind {kind!r}; use one of {KINDS}")
        if name not in self._shapes:
            raise GrowthError(f"tensor '{name}': not in the target model")
        shape = self._shapes[name]
        src_name, suffix, entry = self._route(name)
        src = None
        if src_name is not None:
            src = get_src(src_name)
            expected = self._src_shapes[src_name]
            if tuple(src.shape) != expected:
                raise GrowthError(f"tensor '{src_name}': shape {list(src.shape)} does not match the "
                                  f"source config's {list(expected)}")
        zero = kind != "weight" and entry is not None and entry["new"]  # new layers: zero moments
        if src is None and (kind != "weight" or suffix in ZEROED_IN_IDENTITY):
            zero = True
        for r0, r1 in self.row_blocks(shape, max_elements):
            rows_shape = (r1 - r0, *shape[1:])
            if zero:
                yield torch.zeros(rows_shape)
            elif src is None:  # a new layer built from fresh init
                if len(shape) == 1:
                    yield torch.ones(rows_shape)
                else:
                    yield self._normal(name + ":init", torch.arange(r0, r1), shape[1], self._std(name))
            else:
                yield self._grow_rows(name, suffix, src, kind, r0, r1)

    @staticmethod
    def row_blocks(shape: tuple[int, ...], max_elements: int | None) -> list[tuple[int, int]]:
        """[r0, r1) ranges covering dim 0, aligned to ROW_BLOCK (1-D tensors: one range)."""
        rows = shape[0]
        if max_elements is None or len(shape) == 1:
            return [(0, rows)]
        per_row = math.prod(shape[1:])
        step = max(ROW_BLOCK, (max_elements // max(per_row, 1)) // ROW_BLOCK * ROW_BLOCK)
        return [(r, min(r + step, rows)) for r in range(0, rows, step)]

    def _grow_rows(self, name: str, suffix: str, src: torch.Tensor, kind: str,
                   r0: int, r1: int) -> torch.Tensor:
        maps = self._maps(suffix)
        rows = maps[0].slice(r0, r1)
        squared = kind == "exp_avg_sq"
        out = self._copy_prefix(src, rows, maps[1] if len(maps) == 2 else None, kind)
        if out is None:  # general gather: clones, splits, permutations
            out = src.index_select(0, rows.src.clamp(min=0)).float()
            if len(maps) == 2:
                cols = maps[1]
                if not (cols.is_identity and cols.size == src.shape[1]):
                    out = out.index_select(1, cols.src.clamp(min=0))
                    _scale_(out, cols, squared, dim=1, fill_follows=kind == "weight")
            _scale_(out, rows, squared, dim=0, fill_follows=kind == "weight")
        if kind == "weight":
            self._fill_new(out, name, rows, maps[1] if len(maps) == 2 else None, r0)
            if self.spec.noise > 0 and len(maps) == 2 and maps[1].divided:
                self._add_pair_noise(out, name, maps[1], r0)
        comp = self._compensation(name)
        if is_norm(suffix):
            comp *= self.axes.norm_scale
        if comp != 1.0:
            out.mul_(comp * comp if squared else comp)
        return out

    @staticmethod
    def _copy_prefix(src: torch.Tensor, rows: ax.AxisMap, cols: ax.AxisMap | None,
                     kind: str) -> torch.Tensor | None:
        """Fast path for zero/masked padding: one block copy (with the fp32 upcast) instead
        of two gathers. New entries are left for _fill_new (weights) or zeroed (moments)."""
        run_r = rows.prefix_run()
        run_c = (0, src.shape[1]) if cols is not None and cols.is_identity and cols.size == src.shape[1] \
            else (cols.prefix_run() if cols is not None else None)
        if run_r is None or (cols is not None and (run_c is None or run_c[0] != 0)):
            return None
        (first, nr) = run_r
        if cols is None:
            out = torch.empty(rows.size)
            out[:nr] = src[first:first + nr]
            if kind != "weight":
                out[nr:] = 0.0
            return out
        nc = run_c[1]
        out = torch.empty(rows.size, cols.size)
        out[:nr, :nc] = src[first:first + nr, :nc]
        if kind != "weight":
            out[nr:] = 0.0
            out[:nr, nc:] = 0.0
        return out

    def _std(self, name: str) -> float:
        return self.spec.init_std if self.spec.init_std is not None else param_init_std(self.config, name)

    def _compensation(self, name: str) -> float:
        if name == EMBEDDING.key:
            return embedding_compensation(self.src_config, self.config)
        if name == LM_HEAD.key:
            return logit_compensation(self.src_config, self.config)
        return 1.0

    def _normal(self, tag: str, rows: torch.Tensor, ncols: int, std: float) -> torch.Tensor:
        """Rows ``rows`` of a normal(0, std) field over (∞ × ncols) seeded per ROW_BLOCK rows
        by (seed, tag, block): the same values whatever chunking asks for them."""
        out = torch.empty(len(rows), ncols)
        if len(rows) == 0:
            return out
        blocks = rows // ROW_BLOCK
        for b in torch.unique(blocks).tolist():
            pick = blocks == b
            field = torch.empty(ROW_BLOCK, ncols)
            field.normal_(0.0, std, generator=seeded_generator(self.spec.seed, f"{tag}:{b}"))
            out[pick] = field[rows[pick] - b * ROW_BLOCK] if std > 0 else 0.0
        return out

    def _fill_new(self, out: torch.Tensor, name: str, rows: ax.AxisMap, cols: ax.AxisMap | None,
                  r0: int) -> None:
        """Fresh values where a map says ``init`` and no axis forces zero; norm gains: 1."""
        new_r = rows.new
        if cols is None:
            if new_r.any():
                out[new_r] = 1.0  # gains of new coordinates (× norm_scale later)
            return
        new_c = cols.new
        if not (new_r.any() or new_c.any()):
            return
        std = self._std(name)
        if new_r.any():
            if rows.fill == "zero":
                out[new_r] = 0.0
            else:  # whole new rows, indexed by their ordinal among the new rows
                ordinal = rows.new_ordinal[new_r]
                out[new_r] = self._normal(name + ":rows", ordinal, out.shape[1], std)
        if new_c.any():
            old_r = (~new_r).nonzero()[:, 0]
            cidx = new_c.nonzero()[:, 0]
            if cols.fill == "zero":
                out[:, cidx] = 0.0
            elif len(old_r):
                block = self._normal(name + ":cols", old_r + r0, len(cidx), std)
                out[old_r[:, None], cidx[None, :]] = block

    def _add_pair_noise(self, out: torch.Tensor, name: str, cols: ax.AxisMap, r0: int) -> None:
        """± noise on column copies that share one source column: zero-sum over each source's
        copies, so Σ_copies w·x is unchanged while the copies' inputs stay identical."""
        noise = self._normal(name + ":noise", torch.arange(r0, r0 + out.shape[0]), out.shape[1],
                             self.spec.noise)
        src = cols.src.clamp(min=0)
        n_src = int(src.max()) + 1
        counts = torch.bincount(src, minlength=n_src).float()
        mean = torch.zeros(out.shape[0], n_src).index_add_(1, src, noise) / counts
        noise -= mean.index_select(1, src)
        keep = (counts[src] > 1) & ~cols.new
        out.add_(noise * keep.float())

    # ------------------------------------------------------------------ provenance / record
    def target_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise KeyError(f"tensor '{name}' is not in the grown model")
        return self._shapes[name]

    def axis_maps(self, name: str) -> tuple[ax.AxisMap, ...] | None:
        """The per-axis maps that fill target tensor ``name``, or None for a tensor built
        without a source (a new layer's zero or fresh tensor: one code throughout)."""
        self.target_shape(name)
        src_name, suffix, _ = self._route(name)
        return None if src_name is None else self._maps(suffix)

    def provenance(self, name: str, rows: torch.Tensor | None = None,
                   cols: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 PROVENANCE codes per element of ``name``: the whole target tensor, or only the
        block ``rows`` × ``cols`` (int64 index tensors into the target axes, None = the whole
        axis; a 1-D tensor takes ``rows`` only). Only the block is built.

        Note: an element's code depends on its tensor and on two facts per axis entry (new?
        a second copy of a source entry?), so a block is the same rule on selected entries."""
        shape = self.target_shape(name)
        picks = (rows, cols)[:len(shape)]
        block = tuple(n if i is None else len(i) for i, n in zip(picks, shape, strict=True))
        src_name, suffix, entry = self._route(name)
        if src_name is None:
            code = ZERO if suffix in ZEROED_IN_IDENTITY else INIT
            return torch.full(block, code, dtype=torch.uint8)
        maps = self._maps(suffix)

        def along(dim: int, values: torch.Tensor) -> torch.Tensor:
            if picks[dim] is not None:
                values = values[picks[dim]]
            view = [1] * len(block)
            view[dim] = -1
            return values.view(view).expand(block)

        base = LAYER_COPY if entry is not None and entry["new"] else COPIED
        out = torch.full(block, base, dtype=torch.uint8)
        for dim, m in enumerate(maps):
            out[along(dim, m.duplicate_mask()) & (out == COPIED)] = CLONED
        for dim, m in enumerate(maps):
            new = along(dim, m.new)
            if len(maps) == 1:  # norm gains of new coordinates
                out[new] = MASKED if m.masked else INIT
                continue
            code = ZERO if m.fill == "zero" else (MASKED if m.masked else INIT)
            if code == ZERO:
                out[new] = ZERO
            else:
                out[new & (out != ZERO)] = code
        return out

    def event(self) -> dict[str, Any]:
        """JSON-safe record of this growth for growth.json (replayable with from_event)."""
        return {
            "kind": "grow",
            "from_config": self.src_config.to_hf_dict(),
            "target_config": self.target.to_hf_dict(),
            "config": self.config.to_hf_dict(),
            "spec": self.spec.to_dict(),
            "layer_map": self.layer_map,
            "layer_distances": self.distances,
            "exact": self.spec.exact,
            "operators": dict(Counter(op.operator for op in self.tensor_ops())),  # operator → tensors
        }

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> GrowthPlan:
        """Replay a growth.json ``grow`` event; a missing or malformed field is a GrowthError."""
        if not isinstance(event, dict):
            raise GrowthError("growth.json: a grow event must be an object")
        for key in ("from_config", "target_config", "spec", "layer_map"):
            if key not in event:
                raise GrowthError(f"growth.json: grow event field '{key}' is missing")
        src = ModelConfig.from_hf_dict(event["from_config"], "growth.json from_config")
        target = ModelConfig.from_hf_dict(event["target_config"], "growth.json target_config")
        layer_map = event["layer_map"]
        if not (isinstance(layer_map, list) and len(layer_map) == target.num_hidden_layers and all(
                isinstance(e, dict) and isinstance(e.get("new"), bool)
                and (e.get("src") is None or (type(e.get("src")) is int
                                              and 0 <= e["src"] < src.num_hidden_layers))
                for e in layer_map)):
            raise GrowthError(f"growth.json: grow event field 'layer_map' must list "
                              f"{target.num_hidden_layers} entries {{'src': layer or null, 'new': bool}}")
        return cls(src, target, GrowthSpec.from_dict(event["spec"]), layer_map=layer_map)

    def summary(self) -> dict[str, Any]:
        s, c = self.src_config, self.config
        return {"from_params": s.params, "to_params": c.params,
                "layers": [s.num_hidden_layers, c.num_hidden_layers],
                "hidden": [s.hidden_size, c.hidden_size],
                "ffn": [s.intermediate_size, c.intermediate_size],
                "heads": [s.num_attention_heads, c.num_attention_heads],
                "vocab": [s.vocab_size, c.vocab_size],
                "new_layers": new_layer_indices(self.layer_map),
                "masked": c.growth_mask is not None, "exact": self.spec.exact}


ZEROED_IN_IDENTITY = RESIDUAL_WRITERS  # o_proj, down_proj: zero makes a new block the identity


def _scale_(out: torch.Tensor, m: ax.AxisMap, squared: bool, dim: int, fill_follows: bool) -> None:
    """Apply a map's copy scale along ``dim`` in place; new entries become 0 unless the
    caller overwrites them anyway (weights: _fill_new), in which case a pass is saved."""
    old_scaled = bool((m.scale[~m.new] != 1).any())
    if old_scaled:
        view = [-1 if d == dim else 1 for d in range(out.dim())]
        out.mul_(m.copy_scale(squared).view(view))
    elif not fill_follows and bool(m.new.any()):
        out.index_fill_(dim, m.new.nonzero()[:, 0], 0.0)



def make_plan(src: ModelConfig, target: ModelConfig, spec: GrowthSpec | None = None,
              get_tensor: Callable[[str], torch.Tensor] | None = None) -> GrowthPlan:
    """Plan growing ``src`` into ``target``'s shapes (see GrowthPlan)."""
    return GrowthPlan(src, target, spec or GrowthSpec(), get_tensor)


def grow_state_dict(state: dict[str, torch.Tensor], src: ModelConfig, target: ModelConfig,
                    spec: GrowthSpec | None = None, kind: str = "weight"
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """In-memory growth of a whole state dict (small models, tests, notebooks)."""
    plan = make_plan(src, target, spec, state.__getitem__)
    return plan.config, {op.name: plan.grow_tensor(op.name, state.__getitem__, kind)
                         for op in plan.tensor_ops()}
