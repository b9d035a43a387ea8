"""The DeepSpeed pipeline: a PipelineModule of Tele-FLM layers, and its one name adapter.

Spec list (index = position in the list = DeepSpeed's ``layer_XX`` number)::

    0          EmbeddingPipe      embed_tokens (× input_mult, hidden mask)
    1 … L      DecoderLayerPipe   growth.model.DecoderLayer + its own RoPE tables
    L + 1      HeadPipe           norm; its lm_head gives the loss (chunked, × logit scale, padded ids masked)

The layers are the classes of growth.model (no second copy of the math), so MSG masks
work the same way. The adapter (:data:`PIPE_KEYS`, :func:`pipe_to_hf`,
:func:`hf_to_pipe`) is the only place that knows how spec indices map to HF names;
DeepSpeed checkpoints store layer ``i`` in :func:`layer_file` ``(i)`` with the local
key (``self_attn.q_proj.weight``), and ``named_parameters()`` prefixes it with ``i.``.

Pipeline parallelism runs with ZeRO-0 or ZeRO-1 only (DeepSpeed refuses 2 and 3). The
tensor-parallel ranks of the same specs (TP × PP × DP) are stages.engines.tensor_parallel.pipeline's
subclasses of these layers and of :class:`PipeStageEngine`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flmcore.params import LAYER_PARAMS, LAYER_PREFIX
from growth.config import ModelConfig
from growth.model import (
    DecoderLayer,
    LMHead,
    RMSNorm,
    TeleFLMModel,
    build_masks,
    embedding,
    init_tensor,
    put_layer_masks,
    put_mask,
    rope_cos_sin,
    scale_logits,
)
from stages.engines import ds_compat, optim_state
from stages.engines.common import (
    DeepSpeedEngine,
    checkpoint_layers,
    checkpointed,
    compile_layers,
    compile_on,
    ds_config,
    make_optimizer,
)
from stages.engines.protocol import Batch
from stages.schema import DeepSpeedCfg, StageCfg

# ---------------------------------------------------------------------- adapter
# Spec role → (local key → HF name template); "{i}" is the decoder layer index.
PIPE_KEYS: dict[str, dict[str, str]] = {
    "embed": {"embed_tokens.weight": "model.embed_tokens.weight"},
    "layer": {p.key: LAYER_PREFIX + p.key for p in LAYER_PARAMS},
    "head": {"norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"},
}
LAYER_FILE = "layer_{:02d}-model_states.pt"  # DeepSpeed's per-spec file (PipeDataParallelTopology; with TP
# DeepSpeed inserts the TP rank: layer_XX-model_YY-model_states.pt)
_HF_LAYER_PREFIX = "model.layers."


def pipe_to_hf(name: str, num_layers: int) -> str:
    """``'3.self_attn.q_proj.weight'`` → ``'model.layers.2.self_attn.q_proj.weight'``."""
    idx_text, _, key = name.partition(".")
    idx = int(idx_text)
    if idx == 0:
        role, layer = "embed", None
    elif idx <= num_layers:
        role, layer = "layer", idx - 1
    elif idx == num_layers + 1:
        role, layer = "head", None
    else:
        raise KeyError(f"pipeline spec index {idx} is outside 0..{num_layers + 1}")
    if key not in PIPE_KEYS[role]:
        raise KeyError(f"pipeline parameter '{name}' is not a {role} parameter")
    return PIPE_KEYS[role][key].format(i=layer)


def hf_to_pipe(name: str, num_layers: int) -> str:
    """``'model.layers.2.self_attn.q_proj.weight'`` → ``'3.self_attn.q_proj.weight'``."""
    if name.startswith(_HF_LAYER_PREFIX):
        layer_text, _, key = name[len(_HF_LAYER_PREFIX):].partition(".")
        layer = int(layer_text)
        if not 0 <= layer < num_layers or key not in PIPE_KEYS["layer"]:
            raise KeyError(f"'{name}' is not a parameter of a {num_layers}-layer model")
        return f"{layer + 1}.{key}"
    for role, idx in (("embed", 0), ("head", num_layers + 1)):
        for key, hf in PIPE_KEYS[role].items():
            if hf == name:
                return f"{idx}.{key}"
    raise KeyError(f"'{name}' is not a Tele-FLM/Llama parameter name")


def layer_file(spec_index: int) -> str:
    return LAYER_FILE.format(spec_index)


# ---------------------------------------------------------------------- layers
class EmbeddingPipe(nn.Module):
    """Spec 0: token ids (B, T) → hidden states (B, T, h)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.register_buffer("hidden_mask", None, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return TeleFLMModel.embed(self, input_ids)  # the plain model's own code path


class DecoderLayerPipe(DecoderLayer):
    """Specs 1…L: a decoder layer that builds its RoPE tables from the input length."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cos, sin = rope_cos_sin(h.shape[1], self.head_dim, self.rope_theta, h.device, h.dtype)
        return super().forward(h, cos, sin)


class HeadPipe(nn.Module):
    """Spec L+1: the final norm → normed hidden states (B, T, h); its ``lm_head``
    (growth.model.LMHead) turns them into the loss in the pipe's ``loss_fn`` (:class:`HeadLoss`),
    chunked, so the (B, T, V) logits are never held; :meth:`logits` gives them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = LMHead(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return scale_logits(self.config, self.lm_head(normed))


class HeadLoss:
    """The pipe ``loss_fn``: the head's chunked loss of the last stage's normed hidden states
    (``head`` is bound once the PipelineModule built this rank's layers).

    Note: ``lm_head`` is used here, outside the PipelineModule's forward; in bf16 its gradient
    reaches DeepSpeed's fp32 buffer only with ``bf16.immediate_grad_update``
    (``stages.engines.common.ds_config``)."""

    def __init__(self) -> None:
        self.head: nn.Module | None = None

    def __call__(self, normed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.lm_head(normed, labels)


PIPE_LAYERS = (EmbeddingPipe, DecoderLayerPipe, HeadPipe)  # spec 0, specs 1…L, spec L+1


def build_pipeline_module(config: ModelConfig, num_stages: int | None, ds: DeepSpeedCfg | None = None,
                          layers: tuple[type[nn.Module], type[nn.Module], type[nn.Module]] = PIPE_LAYERS,
                          layer_args: tuple[Any, ...] = (), topology: Any = None):
    """The PipelineModule; each rank builds only its own stage's layers.

    ``layers`` (embedding, decoder layer, head classes, each built as ``cls(config,
    *layer_args)``; the head's ``lm_head`` gives the loss, :class:`HeadLoss`) and ``topology``
    (DeepSpeed's ``ProcessTopology``; default: pipe × data over ``num_stages``) let
    stages.engines.tensor_parallel.pipeline build its TP ranks.
    ``ds``: activation checkpointing (DeepSpeed's own, one layer per checkpoint; every k-th
    layer: ``stages.engines.common.checkpoint_layers``) and per-layer ``torch.compile``."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    ds = ds or DeepSpeedCfg()
    embed, decoder, head = layers
    specs = [LayerSpec(embed, config, *layer_args)]
    specs += [LayerSpec(decoder, config, *layer_args) for _ in range(config.num_hidden_layers)]
    specs.append(LayerSpec(head, config, *layer_args))
    every = ds.checkpoint_every if ds.activation_checkpointing else 0
    loss_fn = HeadLoss()
    module = PipelineModule(layers=specs, num_stages=num_stages, topology=topology, loss_fn=loss_fn,
                            partition_method="type:DecoderLayerPipe",  # a regex: TPDecoderLayerPipe matches
                            activation_checkpoint_interval=1 if every == 1 else 0,
                            activation_checkpoint_func=checkpointed,
                            checkpointable_layers=[decoder.__name__])
    loss_fn.head = next((m for m in module.children() if isinstance(m, HeadPipe)), None)  # last stage only
    decoders = [m for m in module.children() if isinstance(m, DecoderLayerPipe)]
    if every > 1:  # by spec index, so "every k-th" counts the model's layers, not this stage's
        checkpoint_layers([m for name, m in module.named_children()
                           if isinstance(m, DecoderLayerPipe) and (int(name) - 1) % every == 0])
    if compile_on(ds):
        compile_layers(decoders)
    return module


def set_pipe_growth_mask(module: nn.Module, config: ModelConfig, record: dict[str, Any] | None,
                         slice_mask: Any = None) -> ModelConfig:
    """Install MSG masks on this rank's layers (the pipeline form of
    ``TeleFLMForCausalLM.set_growth_mask``); returns the config carrying ``record``.

    ``slice_mask(mask)`` cuts the head and FFN masks to this rank's heads and units (tensor
    parallelism); by default they are whole."""
    config = config.replace(growth_mask=record)
    masks = build_masks(config, next(module.parameters()).device)
    cut = slice_mask or (lambda mask: mask)
    num_layers = config.num_hidden_layers
    for name, layer in module.named_children():
        if not name.isdigit():
            continue
        idx = int(name)
        if isinstance(layer, EmbeddingPipe):
            put_mask(layer, "hidden_mask", masks["hidden"])
        elif isinstance(layer, HeadPipe):
            put_mask(layer.norm, "mask", masks["hidden"])
        elif isinstance(layer, DecoderLayerPipe) and 1 <= idx <= num_layers:
            put_layer_masks(layer, masks, cut(masks["heads"]), cut(masks["ffn"]), idx - 1 in masks["new_layers"])
    return config


# ---------------------------------------------------------------------- engine
class PipeStageEngine(DeepSpeedEngine):
    """The PipelineEngine behind the worker's engine interface (see stages.engines.common)."""

    pipeline = True

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor] | None, seed: int,
                 ds: DeepSpeedCfg, stage: StageCfg):
        import deepspeed
        import torch.distributed as dist

        from stages.validate import check_deepspeed

        self.config = config  # carries the current MSG mask record (see set_growth_mask)
        check_deepspeed(ds, dist.get_world_size())
        self.module = self.build_module(config, ds)
        self.load_start_weights(state_dict, seed)
        if config.growth_mask is not None:
            self.set_growth_mask(config.growth_mask)
        for hf, p in self.named_params():
            p.tensor_model_parallel = self.counts_in_grad_norm(hf)
        optimizer = make_optimizer(list(self.module.named_parameters()), config, stage)
        self.dp_world = self.module.mpu().get_data_parallel_world_size()
        self.ds_config = self.deepspeed_config(ds, stage)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=self.ds_config)
        self.dp_rank = ds_compat.pipe_dp_rank(self.engine)

    # ------------------------------------------------------------------ what a TP subclass changes
    def build_module(self, config: ModelConfig, ds: DeepSpeedCfg) -> nn.Module:
        return build_pipeline_module(config, ds.pipeline_stages, ds)

    def deepspeed_config(self, ds: DeepSpeedCfg, stage: StageCfg) -> dict[str, Any]:
        return ds_config(ds, stage, self.dp_world)

    def load_start_weights(self, state_dict: dict[str, torch.Tensor] | None, seed: int) -> None:
        """Full tensors from ``state_dict``, else growth.model's fresh init (``seed``)."""
        with torch.no_grad():
            for hf, p in self.named_params():
                p.copy_(state_dict[hf] if state_dict is not None else
                        init_tensor(self.config, hf, tuple(p.shape), seed))

    def counts_in_grad_norm(self, name: str) -> bool:
        """Whether this rank's gradient of ``name`` enters the clipping norm (every one here).

        Note: DeepSpeed reads ``tensor_model_parallel`` only to pick which ranks' gradients
        its norm counts. Under ZeRO-0 its ``clip_grad_norm_`` counts an unflagged parameter
        only on the first rank of a replica's pipe × model group, so without the flag the
        later stages' gradients were left out of the norm (measured: 0.385 instead of 0.533
        on the 2-stage tiny model); ZeRO-1 counts every stage either way."""
        return True

    def owner_rank(self, spec: int) -> int:
        """The global rank that sends spec ``spec``'s gathered tensors to rank 0."""
        return ds_compat.pipe_owner_rank(self.engine, self.module, spec)

    def full_tensor(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        """The full tensor from this rank's (data-parallel-gathered) ``local`` one."""
        return local

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(HF name, param) for this rank's stage."""
        for name, p in self.module.named_parameters():
            yield pipe_to_hf(name, self.config.num_hidden_layers), p

    def train_step(self, batches: list[Batch]) -> torch.Tensor:
        self.engine.train()
        return self.engine.train_batch(data_iter=iter(batches)).detach()

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        loss = self.engine.eval_batch(data_iter=iter(batches), num_micro_batches=len(batches),
                                      bcast_loss=True)
        return float(loss)

    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        self.config = set_pipe_growth_mask(self.module, self.config, record)

    def gather(self, kind: str | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Full fp32 tensors (weights, or moment ``kind``) in canonical order, on rank 0.

        The owning stage gathers over its data-parallel group (and its TP group, in a TP
        subclass); :meth:`owner_rank` sends the tensor to global rank 0. Other ranks get
        ``None``.
        """
        import torch.distributed as dist

        L = self.config.num_hidden_layers
        rank = dist.get_rank()
        local = dict(self.named_params())
        for name, shape in self.config.tensor_shapes().items():
            spec = int(hf_to_pipe(name, L).split(".", 1)[0])
            owner = self.owner_rank(spec)
            t = None
            if name in local:
                t = self.full_tensor(name, optim_state.get_full(self.optimizer, local[name], kind))
                if rank == owner and owner != 0:
                    dist.send(t.contiguous(), 0)
            if rank == 0 and owner != 0:
                t = torch.empty(shape, dtype=torch.float32, device=self.engine.device)
                dist.recv(t, owner)
            yield name, (t.cpu() if rank == 0 else None)
