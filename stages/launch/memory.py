"""Per-GPU memory of a stage's layout: model states plus activations, against a GPU's size.

Pure arithmetic on a :class:`~growth.config.ModelConfig` and a
:class:`~stages.layout.Layout`; nothing is built. All counts are bytes.

**Model states** (weights, gradients, Adam) come from DeepSpeed's own estimators for the
parameters one GPU holds (the fullest pipeline stage, its matrices and vocab rows split
``1/TP``, norms replicated): ``estimate_zero2_model_states_mem_needs`` for ZeRO 0–2 (2 B
of 16-bit weights per parameter plus 18 B of gradients, fp32 master weights and moments
over the data-parallel ranks), ``estimate_zero3_model_states_mem_needs`` for ZeRO-3. ZeRO-1
shares ZeRO-2's optimizer in DeepSpeed (stage_1_and_2.py) but does not partition the 16-bit
gradients, so for ZeRO-0/1 the unpartitioned part, ``2·N·(1 − 1/DP)``, is added on top.

**Activations** are counted the way Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models") count them, but for what *our* eager PyTorch
decoder layer (growth.model) saves for backward; per token of one layer, with ``e`` bytes per
16-bit/32-bit element, width ``h``, query width ``hq`` (= heads·head_dim), FFN width ``f``,
``a`` heads and tensor-parallel degree ``t``::

    replicated across TP:  2 RMSNorms × (fp32 copy of the input 4h + normalised input e·h + rsqrt 4)
                           + inputs of the two column-parallel blocks 2·e·h
    split 1/t:             attention: q, k, v as the kernel sees them (k, v expanded to every
                           query head) and its output 4·e·hq, the o_proj input (a copy of the
                           output in (tokens, heads·d) order) e·hq, the fp32 log-sum-exp 4·a;
                           without flash attention also the probabilities e·a·s
                           SwiGLU: gate output, silu(gate), up output, their product 4·e·f

(Korthikanti's GPT count, 34·s·b·h + 5·a·s²·b, has dropout masks and a GeLU MLP of 4h; ours
has no dropout, RoPE and a SwiGLU of width f.) The formula is checked against the tensors
autograd actually saves (tests/unit/test_dry_run.py). bf16 runs use flash attention (PyTorch's
SDPA picks the flash kernel for 16-bit CUDA tensors); fp32 is counted without it.

- With activation checkpointing (per decoder layer, as stages.engines.common / stages.engines.pipeline do)
  a layer keeps only its input, ``e·h`` per token (``e·h/t`` with sequence parallelism), and
  while one layer is recomputed in the backward its full activations exist once.
- A pipeline stage also keeps its output, ``e·h`` per token, per micro-batch in flight.
- 1F1B keeps ``min(p − k, m)`` micro-batches in flight on stage ``k``: ``min(p, m)`` on the
  first; the last stage holds one, but also the logits: the 16-bit ``lm_head`` output, its
  fp32 copy, the log-softmax and its gradient, ``(e + 4 + 8)·V/t`` per token.
- The gradients flowing into and out of the layer in backward: ``2·e·h`` per token.
- Sequence parallelism (``deepspeed.sequence_parallel``) divides by ``t`` what the norms save
  and every hidden state between layers (the three items above); the projections' inputs stay
  whole (the column-parallel linears save the all-gathered sequence).

The total is the fullest stage's model states plus the larger of the first and the last
stage's activations. **Margin**: :data:`MARGIN` of the GPU is held back for the CUDA
context, NCCL buffers, DeepSpeed's communication buckets and allocator fragmentation, so a
layout *fits* when ``total ≤ (1 − MARGIN) × gpu_memory_gib``.
"""

from __future__ import annotations

from typing import Any

from growth.config import ModelConfig
from stages.layout import Layout

GIB = 1024**3
MARGIN = 0.10  # of gpu_memory_gib, held back (CUDA context, NCCL/DeepSpeed buffers, fragmentation)
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------------- parameters per GPU
def layer_params(config: ModelConfig, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank: matrices ÷ tp, two norms whole."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return (2 * h * q + 2 * h * kv + 3 * h * f) // tp + 2 * h


def fullest_stage_params(config: ModelConfig, pp: int, tp: int = 1) -> int:
    """Parameters on the fullest GPU: ceil(L / pp) layers plus the embedding or the final
    norm + lm_head (whichever is larger; both when pp = 1), vocab rows ÷ tp.

    Note: stages.engines.pipeline partitions with ``partition_method="type:DecoderLayerPipe"``
    (decoder layers only count), so the ends ride on the first / last stage."""
    vocab = config.vocab_size * config.hidden_size // tp
    if pp == 1:
        return config.num_hidden_layers * layer_params(config, tp) + 2 * vocab + config.hidden_size
    return -(-config.num_hidden_layers // pp) * layer_params(config, tp) + vocab + config.hidden_size


def model_states(config: ModelConfig, layout: Layout) -> dict[str, Any]:
    """DeepSpeed's model-state estimate per GPU, plus ZeRO-0/1's unpartitioned 16-bit grads."""
    from stages.engines.ds_compat import estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs

    out: dict[str, Any] = {}
    if layout.zero_stage == 3:
        # ZeRO-3 partitions the whole (TP-sharded) model over the data-parallel ranks
        per_rank = fullest_stage_params(config, 1, layout.tp)
        largest = max(config.vocab_size * config.hidden_size,
                      config.intermediate_size * config.hidden_size) // layout.tp
        _, gpu, _ = estimate_zero3_model_states_mem_needs(per_rank, largest, num_gpus_per_node=layout.dp,
                                                          num_nodes=1, cpu_offload=False)
        out.update(function="estimate_zero3_model_states_mem_needs", params_per_gpu=per_rank,
                   largest_layer_params=largest, unpartitioned_grad_bytes=0)
    else:
        per_gpu = fullest_stage_params(config, layout.pp, layout.tp)
        ranks = layout.dp if layout.zero_stage > 0 else 1  # ZeRO-0: every rank keeps all Adam state
        _, gpu = estimate_zero2_model_states_mem_needs(per_gpu, num_gpus_per_node=ranks, num_nodes=1,
                                                       cpu_offload=False)
        extra = 0 if layout.zero_stage == 2 else 2 * per_gpu - 2 * per_gpu // ranks
        out.update(function="estimate_zero2_model_states_mem_needs", params_per_gpu=per_gpu,
                   unpartitioned_grad_bytes=extra)
    out["estimator_bytes"] = gpu
    out["bytes"] = gpu + out["unpartitioned_grad_bytes"]
    return out


# ---------------------------------------------------------------------- activations
def layer_activation_bytes_per_token(config: ModelConfig, tp: int, precision: str, seq_len: int,
                                     flash: bool | None = None, sp: bool = False) -> float:
    """Bytes one decoder layer saves for backward per token, without recomputation.

    ``sp`` (sequence parallelism, stages.engines.tensor_parallel.layers): the two RMSNorms run on
    this rank's 1/tp of the tokens, so what they save is split too; the projections' inputs
    are the all-gathered sequence (saved whole by the column-parallel linears)."""
    e = ELEMENT_BYTES[precision]
    flash = precision == "bf16" if flash is None else flash
    h, f, a = config.hidden_size, config.intermediate_size, config.num_attention_heads
    hq = a * config.head_dim
    norms = 2 * (4 * h + e * h + 4)
    gathered = 2 * e * h
    split = 5 * e * hq + 4 * e * f + (4 * a if flash else e * a * seq_len)
    return norms / (tp if sp else 1) + gathered + split / tp


def activations(config: ModelConfig, layout: Layout, precision: str, sp: bool = False) -> dict[str, Any]:
    """Activation bytes of the first and the last pipeline stage (one stage when pp = 1).

    ``sp``: the hidden states between layers (a checkpointed layer's input, a stage's
    output, the gradients into and out of a layer) are this rank's 1/tp of the sequence."""
    e = ELEMENT_BYTES[precision]
    h, tp, pp, m = config.hidden_size, layout.tp, layout.pp, layout.grad_accum
    tokens = layout.micro_batch_size * layout.seq_len
    per_layer = layer_activation_bytes_per_token(config, tp, precision, layout.seq_len, sp=sp) * tokens
    layers = -(-config.num_hidden_layers // pp)
    hidden = e * h * tokens / (tp if sp else 1)  # one hidden state of the micro-batch on this rank
    kept_layer = hidden if layout.activation_checkpointing else per_layer
    kept = layers * kept_layer + (hidden if pp > 1 else 0)  # + the stage's output buffer
    working = (per_layer if layout.activation_checkpointing else 0) + 2 * hidden
    logits = (e + (4 if e < 4 else 0) + 8) * (config.vocab_size // tp) * tokens
    in_flight = min(pp, m)
    first = in_flight * kept + working + (logits if pp == 1 else 0)
    last = kept + working + logits
    return {"in_flight_first_stage": in_flight, "layers_per_stage": layers,
            "layer_bytes_per_microbatch": per_layer, "kept_bytes_per_microbatch": kept,
            "working_bytes": working, "logits_bytes": logits, "first_stage_bytes": first,
            "last_stage_bytes": last, "bytes": max(first, last)}


# ---------------------------------------------------------------------- verdict
def fit(config: ModelConfig, layout: Layout, precision: str, gpu_memory_gib: float,
        sp: bool = False) -> dict[str, Any]:
    """Model states + activations vs ``(1 − MARGIN) × gpu_memory_gib``, bubble, tokens/step."""
    states = model_states(config, layout)
    acts = activations(config, layout, precision, sp=sp and layout.tp > 1)
    total = states["bytes"] + acts["bytes"]
    usable = (1.0 - MARGIN) * gpu_memory_gib
    return {"model_states": states, "activations": acts, "total_bytes": total,
            "usable_gib": usable, "fits": total / GIB <= usable, "bubble": layout.bubble,
            "tokens_per_step": layout.tokens_per_step}


def dry_run_record(layout: Layout, verdict: dict[str, Any], gpu_memory_gib: float) -> dict[str, Any]:
    """The ``dry_run.json`` record: layout, memory terms, the verdict and the pipeline bubble."""
    return {
        "layout": layout.to_dict(),
        "memory_gib": {"model_states": verdict["model_states"]["bytes"] / GIB,
                       "activations": verdict["activations"]["bytes"] / GIB,
                       "total": verdict["total_bytes"] / GIB},
        "gpu_memory_gib": float(gpu_memory_gib),
        "fits": bool(verdict["fits"]),
        "bubble": verdict["bubble"],
    }
