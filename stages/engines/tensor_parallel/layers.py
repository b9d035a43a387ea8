"""Megatron-style tensor-parallel Tele-FLM (Shoeybi et al. 2019), built from growth.model.

Each of the ``tp`` ranks of a process group holds (HF names, local shapes):

==========================================  ===============  ==================================
tensor                                       split            forward
==========================================  ===============  ==================================
q_proj, k_proj, v_proj                       rows (dim 0)     whole query / key-value heads
gate_proj, up_proj                           rows (dim 0)     whole FFN units
o_proj, down_proj                            columns (dim 1)  partial sums, all-reduced
embed_tokens, lm_head                        rows (dim 0)     vocab rows [r·V/tp, (r+1)·V/tp)
input/post_attention_layernorm, model.norm   replicated       as growth.model.RMSNorm
==========================================  ===============  ==================================

:data:`SHARD_DIM` is that table; :func:`shard_range` gives a rank's slice. A rank's attention
and MLP are growth.model's own ``Attention`` / ``MLP`` / ``DecoderLayer`` built for the local
head and unit counts (so RoPE, GQA, SDPA and the MSG masks are the same code), wrapped in the
two conjugate collectives of Megatron: *copy to the TP region* (identity forward,
all-reduce of the gradient backward) before the column-parallel projections and *reduce from
the TP region* (all-reduce forward, identity backward) after the row-parallel ones.

The logits stay split: :func:`vocab_parallel_cross_entropy` computes the full-vocab softmax
cross-entropy from per-rank max, sum of exponentials and target logit (three all-reduces of
(tokens,) vectors), so (tokens, V) is never gathered. μP multipliers apply as in growth.model
(the embedding after its all-reduce, the logit scale on each rank's slice); padded vocab ids
(``valid_vocab_size``) get −inf on the rank that holds them. MSG masks: the hidden mask is
replicated, the head and FFN masks are sliced with their shards, ``layer_c`` is a scalar.

Sequence parallelism (Korthikanti et al. 2022), with ``sp=True``: outside the TP regions the
hidden states are split along the sequence (rank r holds tokens ``[r·T/tp, (r+1)·T/tp)``), so
the norms, residual adds and what they keep for backward are ``1/tp``; *copy to* becomes an
all-gather along the sequence (reduce-scatter backward) and *reduce from* a reduce-scatter
(all-gather backward); the embedding reduce-scatters, the head gathers before ``lm_head``, and
the RMSNorm gains' gradients (each rank saw its shard only) are summed over the TP group by a
hook (:func:`all_reduce_norm_grads`). RoPE tables are built for the full length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flmcore.params import PARAMS
from growth.config import ModelConfig
from growth.model import (
    MLP,
    Attention,
    DecoderLayer,
    GrowthMaskError,
    RMSNorm,
    TeleFLMModel,
    build_masks,
    causal_lm_loss,
    embedding,
    put_layer_masks,
    put_mask,
)
from stages.engines.tensor_parallel.loss import vocab_parallel_chunked_loss
from stages.layout import check_model_split

# HF name suffix → dimension split across TP ranks (absent: replicated), from the parameter
# table: the axis that spans query/key-value heads, SwiGLU units or the vocabulary is split
# (column-parallel q/k/v/gate/up and the vocab-parallel embedding/lm_head on rows,
# row-parallel o/down on columns); norm gains span only the hidden width and stay whole.
TP_SPLIT_WIDTHS = ("q", "kv", "ffn", "vocab")
SHARD_DIM: dict[str, int] = {p.key: i for p in PARAMS for i, axis in enumerate(p.axes)
                             if axis.split(".", 1)[0] in TP_SPLIT_WIDTHS}


def shard_dim(name: str) -> int | None:
    """The split dimension of HF tensor ``name``, or None when every rank holds it whole."""
    for suffix, dim in SHARD_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def shard_range(size: int, rank: int, tp: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank`` along a dimension of ``size`` (tp divides size)."""
    step = size // tp
    return rank * step, (rank + 1) * step


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s shard of an in-memory full tensor (for tests and small models)."""
    dim = shard_dim(name)
    if dim is None or tp == 1:
        return full
    start, stop = shard_range(full.shape[dim], rank, tp)
    return full.narrow(dim, start, stop - start)


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The per-rank shapes: heads, kv heads, FFN units and vocab rows ÷ tp; no mask record."""
    check_model_split(config, tp)
    return config.replace(num_attention_heads=config.num_attention_heads // tp,
                          num_key_value_heads=config.num_key_value_heads // tp,
                          intermediate_size=config.intermediate_size // tp,
                          vocab_size=config.vocab_size // tp, valid_vocab_size=None, growth_mask=None)


# ---------------------------------------------------------------------- collectives
class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _seq_all_gather(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    """(B, T/tp, …) on each rank → (B, T, …), rank order along the sequence."""
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] * tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


def _seq_reduce_scatter(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    """(B, T, …) partial sums on each rank → this rank's (B, T/tp, …) rows of their sum."""
    xt = x.transpose(0, 1).contiguous()
    out = torch.empty((xt.shape[0] // tp, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()


def _sp_function(forward: Any, backward: Any, doc: str) -> type[torch.autograd.Function]:
    """An autograd function running ``forward(x, group, tp)`` and, on the gradient,
    ``backward(grad, group, tp)`` (the sequence-parallel collectives are each other's adjoints)."""

    class SequenceParallelOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
            ctx.group, ctx.tp = group, tp
            return forward(x, group, tp)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            return backward(grad, ctx.group, ctx.tp), None, None

    SequenceParallelOp.__doc__ = doc
    return SequenceParallelOp


# the sequence-parallel forms of _CopyToTP and _ReduceFromTP
_GatherFromSP = _sp_function(_seq_all_gather, _seq_reduce_scatter,
                             "All-gather along the sequence forward; reduce-scatter of the gradient backward.")
_ReduceScatterToSP = _sp_function(_seq_reduce_scatter, _seq_all_gather,
                                  "Reduce-scatter along the sequence forward; all-gather of the gradient backward.")


def copy_to_tp(x: torch.Tensor, group: Any, tp: int, sp: bool = False) -> torch.Tensor:
    """Into a TP region: the replicated input as is, or (``sp``) the sequence shards gathered."""
    if tp == 1:
        return x
    return _GatherFromSP.apply(x, group, tp) if sp else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any, tp: int, sp: bool = False) -> torch.Tensor:
    """Out of a TP region: the partial sums all-reduced, or (``sp``) reduce-scattered to this
    rank's sequence shard."""
    if tp == 1:
        return x
    return _ReduceScatterToSP.apply(x, group, tp) if sp else _ReduceFromTP.apply(x, group)


def all_reduce_norm_grads(module: nn.Module, group: Any) -> None:
    """Under sequence parallelism each rank's RMSNorm gains see only its sequence shard: sum
    their gradients over the TP group (a hook, before DeepSpeed accumulates them)."""

    def summed(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.weight.register_hook(summed)


# ---------------------------------------------------------------------- blocks
class TPAttention(Attention):
    """growth.model.Attention over this rank's heads; o_proj partial sums all-reduced (or, with
    ``sp``, the input gathered along the sequence and the output reduce-scattered)."""

    def __init__(self, local: ModelConfig, group: Any, tp: int, sp: bool = False):
        super().__init__(local)
        self.group, self.tp, self.sp = group, tp, sp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = super().forward(copy_to_tp(x, self.group, self.tp, self.sp), cos, sin)
        return reduce_from_tp(out, self.group, self.tp, self.sp)


class TPMLP(MLP):
    """growth.model.MLP over this rank's FFN units; down_proj partial sums all-reduced (or
    reduce-scattered, with ``sp``)."""

    def __init__(self, local: ModelConfig, group: Any, tp: int, sp: bool = False):
        super().__init__(local)
        self.group, self.tp, self.sp = group, tp, sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(super().forward(copy_to_tp(x, self.group, self.tp, self.sp)), self.group, self.tp,
                              self.sp)


def tp_decoder_layer(local: ModelConfig, group: Any, tp: int, sp: bool = False) -> DecoderLayer:
    """growth.model.DecoderLayer with its attention and MLP swapped for the TP ones."""
    layer = DecoderLayer(local)
    layer.self_attn = TPAttention(local, group, tp, sp)
    layer.mlp = TPMLP(local, group, tp, sp)
    return layer


def tp_embed(module: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel embedding of ``module`` (``embed_tokens``, ``vocab_start/stop``, ``group``,
    ``tp``, ``sp``, ``config``, ``hidden_mask``): rows outside this rank's vocab are 0, the
    partial sums all-reduced (with ``sp``: reduce-scattered to this rank's sequence shard)."""
    if module.tp == 1:
        h = module.embed_tokens(input_ids)
    else:
        outside = (input_ids < module.vocab_start) | (input_ids >= module.vocab_stop)
        local_ids = (input_ids - module.vocab_start).masked_fill(outside, 0)
        h = module.embed_tokens(local_ids).masked_fill(outside.unsqueeze(-1), 0.0)
        h = reduce_from_tp(h, module.group, module.tp, module.sp)
    if module.config.embedding_scale != 1.0:
        h = h * module.config.embedding_scale
    if module.hidden_mask is not None:
        h = h * module.hidden_mask.to(h.dtype)
    return h


class TPModel(TeleFLMModel):
    """The ``model.`` prefix: vocab-parallel embedding, TP decoder layers, final norm.

    TeleFLMModel's attributes with the matrices split; its ``forward`` (RoPE tables, the
    layers, the final norm) is used as is, around this class's vocab-parallel ``embed``."""

    def __init__(self, config: ModelConfig, local: ModelConfig, group: Any, tp: int, rank: int, sp: bool = False):
        nn.Module.__init__(self)  # not TeleFLMModel's: it would build the full-width layers
        self.config, self.group, self.tp, self.sp = config, group, tp, sp
        self.vocab_start, self.vocab_stop = shard_range(config.vocab_size, rank, tp)
        self.embed_tokens = embedding(local.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(tp_decoder_layer(local, group, tp, sp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("hidden_mask", None, persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return tp_embed(self, input_ids)


class TPForCausalLM(nn.Module):
    """One TP rank of TeleFLMForCausalLM; ``forward`` returns this rank's logit columns."""

    def __init__(self, config: ModelConfig, group: Any = None, tp: int = 1, rank: int = 0, sp: bool = False):
        super().__init__()
        self.config, self.group, self.tp, self.rank, self.sp = config, group, tp, rank, sp and tp > 1
        self.local = local_config(config, tp)
        self.model = TPModel(self.config, self.local, group, tp, rank, self.sp)
        self.lm_head = TPLMHead(config, tp, self.model.vocab_start, self.sp, group)

    @property
    def vocab_start(self) -> int:
        return self.model.vocab_start

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's logit columns; with ``labels`` the mean loss instead (vocab-parallel,
        chunked: stages.engines.tensor_parallel.loss), the logits never materialised."""
        h = self.model(input_ids)
        if labels is not None:
            return self.lm_head(h, labels)
        return vocab_parallel_logits(self.config, self.lm_head, h, self.vocab_start, self.model.vocab_stop,
                                     self.group, self.tp, self.sp)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self(input_ids, labels)

    # ------------------------------------------------------------------ MSG masks
    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        """Install (or remove) the MSG masks of ``record``, head and FFN masks sliced.

        Note: as in growth.model, the model owns its mask state: ``self.config`` becomes a new
        (frozen) config carrying ``record``; exporters read ``model.config``."""
        self.config = self.model.config = self.config.replace(growth_mask=record)  # validates
        masks = build_masks(self.config, self.lm_head.weight.device)
        heads = slice_mask(masks["heads"], self.rank, self.tp)
        ffn = slice_mask(masks["ffn"], self.rank, self.tp)
        put_mask(self.model, "hidden_mask", masks["hidden"])
        put_mask(self.model.norm, "mask", masks["hidden"])
        for i, layer in enumerate(self.model.layers):
            put_layer_masks(layer, masks, heads, ffn, i in masks["new_layers"])

    def set_growth_c(self, c: float) -> None:
        if self.config.growth_mask is None:
            raise GrowthMaskError("this model has no growth masks to ramp")
        self.set_growth_mask({**self.config.growth_mask, "c": float(c)})


class TPLMHead(nn.Linear):
    """A TP rank's ``lm_head`` rows: ``h Wᵀ`` (its logit columns, unscaled, as ``nn.Linear``),
    or with ``labels`` the loss (stages.engines.tensor_parallel.loss, chunked, vocab-parallel)
    inside this module's own forward, so ZeRO-3 has gathered the weight. ``group`` may be bound
    after the grid exists (the TP pipeline)."""

    def __init__(self, config: ModelConfig, tp: int, vocab_start: int, sp: bool = False, group: Any = None):
        super().__init__(config.hidden_size, config.vocab_size // tp, bias=False)
        self.config, self.tp, self.vocab_start, self.sp, self.group = config, tp, vocab_start, sp, group

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if labels is None:
            return super().forward(h)
        return vocab_parallel_chunked_loss(self.config, copy_to_tp(h, self.group, self.tp, self.sp), self.weight,
                                           labels, self.vocab_start, self.group, self.tp)


def vocab_parallel_logits(config: ModelConfig, lm_head: nn.Linear, h: torch.Tensor, vocab_start: int,
                          vocab_stop: int, group: Any, tp: int, sp: bool = False) -> torch.Tensor:
    """This rank's logit columns ``[vocab_start, vocab_stop)`` of the final-normed ``h`` (with
    ``sp``, its sequence shard, gathered first): the μP logit scale, and −inf on the padded
    vocab ids (``valid_vocab_size``) this rank holds."""
    logits = lm_head(copy_to_tp(h, group, tp, sp))
    if config.logit_scale != 1.0:
        logits = logits * config.logit_scale
    valid = config.valid_vocab_size
    if valid is not None and valid < vocab_stop:
        logits = logits.clone()
        logits[..., max(valid - vocab_start, 0):] = float("-inf")
    return logits


def slice_mask(mask: torch.Tensor | None, rank: int, tp: int) -> torch.Tensor | None:
    """Rank ``rank``'s rows of an MSG head or FFN mask (None stays None)."""
    if mask is None:
        return None
    start, stop = shard_range(mask.shape[0], rank, tp)
    return mask[start:stop]


# ---------------------------------------------------------------------- the loss
def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                                 group: Any, tp: int) -> torch.Tensor:
    """Mean cross-entropy over non-ignored labels (-100) from vocab-split logits.

    ``logits`` (..., V/tp) holds columns ``[vocab_start, vocab_start + V/tp)``. The loss is
    ``log Σ_v exp(z_v − M) − (z_label − M)`` with ``M`` the global max, computed in fp32;
    only (tokens,) vectors cross ranks. Autograd gives each rank ``softmax − onehot`` on its
    own columns, as the full-vocab cross-entropy would.
    """
    if tp == 1:
        return causal_lm_loss(logits, labels)  # growth.model's own loss, bit for bit
    z = logits.float().reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    with torch.no_grad():
        zmax = z.max(dim=-1).values
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
    shifted = z - zmax.unsqueeze(-1)
    sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), group, tp)
    local = target - vocab_start
    mine = (local >= 0) & (local < z.shape[-1])
    picked = shifted.gather(1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    picked = reduce_from_tp(torch.where(mine, picked, torch.zeros_like(picked)), group, tp)
    keep = target != -100
    losses = torch.log(sum_exp) - picked
    # torch.where, not losses[keep]: boolean indexing has a data-dependent shape (a host sync)
    return torch.where(keep, losses, torch.zeros_like(losses)).sum() / keep.sum().clamp(min=1)
