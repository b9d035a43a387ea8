"""The parameter table of a Tele-FLM / Llama decoder: every tensor's HF name, role and axes.

This is the one place the HF Llama names are spelled out. Everyone who needs a name, a
shape or "is this a norm gain / a hidden matrix" derives it from :data:`PARAMS`: the
model's shapes and counts (:func:`tensor_shapes`, :func:`num_params`), the growth
operators' per-axis maps, the μP learning-rate groups, the init rule and the pipeline
adapter.

Each tensor is 1-D (a norm gain) or a matrix ``(rows, cols)``. Its axes are named by
the width they span and the side of it::

    vocab           token ids (embed_tokens and lm_head rows)
    hidden.out      residual-stream coordinates the tensor writes (o/down rows, norm gains,
                    embed_tokens columns)
    hidden.in       residual-stream coordinates the tensor reads (q/k/v/gate/up/lm_head columns)
    q.out, q.in     query-head elements (num_attention_heads × head_dim): q_proj rows, o_proj columns
    kv.out          key/value-head elements (num_key_value_heads × head_dim): k/v rows
    ffn.out, ffn.in SwiGLU units: gate/up rows, down_proj columns

So a tensor's shape is the sizes of its axes, its fan-in is the size of its last axis,
and it grows along every axis whose width grows (the growth operators pick a map per
axis name). Nothing here imports a layer above (operators, growth, stages) or torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

LAYER_PREFIX = "model.layers.{i}."
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class Widths(Protocol):  # what the shape rule reads (flmcore.config.ModelConfig has it)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class Param:
    """One row of the table.

    ``key`` is the full HF name for a model-level tensor and the name after
    ``model.layers.{i}.`` for a per-layer one; ``role`` says what it does; ``axes`` are
    the axis names above, rows first.
    """

    key: str
    role: str  # embedding | norm | attn_q | attn_k | attn_v | attn_o | mlp_gate | mlp_up | mlp_down | lm_head
    axes: tuple[str, ...]
    per_layer: bool

    @property
    def is_norm(self) -> bool:
        return self.role == "norm"

    @property
    def is_block_matrix(self) -> bool:
        """q/k/v/o and gate/up/down: the matrices whose fan-in grows with width (μP)."""
        return self.per_layer and len(self.axes) == 2

    @property
    def writes_residual(self) -> bool:
        """o_proj and down_proj: a block's output into the residual stream."""
        return self.is_block_matrix and self.axes[0] == "hidden.out"

    def name(self, layer: int | None = None) -> str:
        return LAYER_PREFIX.format(i=layer) + self.key if self.per_layer else self.key

    def shape(self, config: Widths) -> tuple[int, ...]:
        return tuple(axis_size(config, a) for a in self.axes)

    def fan_in(self, config: Widths) -> int:
        return axis_size(config, self.axes[-1])


EMBEDDING = Param("model.embed_tokens.weight", "embedding", ("vocab", "hidden.out"), False)
LAYER_PARAMS: tuple[Param, ...] = (
    Param("input_layernorm.weight", "norm", ("hidden.out",), True),
    Param("self_attn.q_proj.weight", "attn_q", ("q.out", "hidden.in"), True),
    Param("self_attn.k_proj.weight", "attn_k", ("kv.out", "hidden.in"), True),
    Param("self_attn.v_proj.weight", "attn_v", ("kv.out", "hidden.in"), True),
    Param("self_attn.o_proj.weight", "attn_o", ("hidden.out", "q.in"), True),
    Param("post_attention_layernorm.weight", "norm", ("hidden.out",), True),
    Param("mlp.gate_proj.weight", "mlp_gate", ("ffn.out", "hidden.in"), True),
    Param("mlp.up_proj.weight", "mlp_up", ("ffn.out", "hidden.in"), True),
    Param("mlp.down_proj.weight", "mlp_down", ("hidden.out", "ffn.in"), True),
)
FINAL_NORM = Param("model.norm.weight", "norm", ("hidden.out",), False)
LM_HEAD = Param("lm_head.weight", "lm_head", ("vocab", "hidden.in"), False)
# Canonical order: embedding, layer 0 … L-1 in LAYER_PARAMS order, final norm, lm_head.
HEAD_PARAMS: tuple[Param, ...] = (EMBEDDING,)
TAIL_PARAMS: tuple[Param, ...] = (FINAL_NORM, LM_HEAD)
PARAMS: tuple[Param, ...] = (*HEAD_PARAMS, *LAYER_PARAMS, *TAIL_PARAMS)

PARAM_BY_KEY: dict[str, Param] = {p.key: p for p in PARAMS}  # table row of a key (layer index stripped)
BLOCK_MATRICES: tuple[str, ...] = tuple(p.key for p in LAYER_PARAMS if p.is_block_matrix)
RESIDUAL_WRITERS: tuple[str, ...] = tuple(p.key for p in LAYER_PARAMS if p.writes_residual)
NORM_KEYS: tuple[str, ...] = tuple(p.key for p in PARAMS if p.is_norm)


def axis_size(config: Widths, axis: str) -> int:
    width = axis.split(".", 1)[0]
    if width == "vocab":
        return config.vocab_size
    if width == "hidden":
        return config.hidden_size
    if width == "ffn":
        return config.intermediate_size
    if width == "q":
        return config.num_attention_heads * config.head_dim
    if width == "kv":
        return config.num_key_value_heads * config.head_dim
    raise KeyError(f"unknown axis {axis!r}")


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.up_proj.weight`` → (3, ``mlp.up_proj.weight``); model-level → (None, name)."""
    m = LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def is_norm(name: str) -> bool:
    """A norm gain, under its HF name or with any prefix (e.g. pipeline ``3.input_layernorm.weight``)."""
    return name.endswith(NORM_KEYS)


def is_block_matrix(name: str) -> bool:
    """q/k/v/o or gate/up/down, under its HF name or with any prefix."""
    return name.endswith(BLOCK_MATRICES)


def iter_tensor_shapes(config: Widths) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) for every parameter in canonical order, one at a time."""
    for p in HEAD_PARAMS:
        yield p.name(), p.shape(config)
    layer_shapes = [(p, p.shape(config)) for p in LAYER_PARAMS]
    for i in range(config.num_hidden_layers):
        for p, shape in layer_shapes:
            yield p.name(i), shape
    for p in TAIL_PARAMS:
        yield p.name(), p.shape(config)


def tensor_shapes(config: Widths) -> dict[str, tuple[int, ...]]:
    return dict(iter_tensor_shapes(config))


def num_tensors(config: Widths) -> int:
    """How many tensors :func:`tensor_shapes` would list, without listing them."""
    return len(HEAD_PARAMS) + len(TAIL_PARAMS) + len(LAYER_PARAMS) * config.num_hidden_layers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def num_params(config: Widths) -> int:
    """Total elements, arithmetically (a 10⁹-layer config is counted in microseconds)."""
    ends = sum(_numel(p.shape(config)) for p in (*HEAD_PARAMS, *TAIL_PARAMS))
    return ends + config.num_hidden_layers * sum(_numel(p.shape(config)) for p in LAYER_PARAMS)
