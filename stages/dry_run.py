"""``dry_run=true``: a stage's growth plan and DeepSpeed's per-GPU memory, without weights.

For each stage it prints

- the growth plan from the parent's model (operators.make_plan on configs, meta only):
  parameters before → after, tensors, bytes read and written (weights in the stage's
  precision, Adam moments in fp32 when ``stage.growth.optimizer_state``), new layers and
  the operators used;
- DeepSpeed's own estimate of the model states per GPU (weights, gradients, Adam):
  ``estimate_zero2_model_states_mem_needs`` for ZeRO 0–2 and
  ``estimate_zero3_model_states_mem_needs`` for ZeRO-3, from parameter counts.

Note: DeepSpeed has no ZeRO-1 formula; ZeRO-1 and ZeRO-2 share one optimizer
(stage_1_and_2.py), and the ZeRO-2 estimate (16-bit weights and gradients plus 18 B per
parameter divided over the data-parallel ranks) is used for both. For the pipeline
(ZeRO-1 + pipeline parallel) every GPU holds one pipeline stage, so the estimate gets
parameters ÷ pipeline degree and the data-parallel degree (ranks ÷ pipeline degree) as its
GPU count. Activations are not included; they depend on micro batch, sequence length and
activation checkpointing.

The parent's model is the parent's final checkpoint when it exists in RUN_DIR, else its
stage config composed with Hydra (and grown through its own parents, so eps/μP changes
of earlier growths carry over), so a whole schedule is checked before anything trains.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any

from growth.checkpoint import CheckpointReader
from growth.config import ModelConfig, resolve_config
from operators import GrowthSpec
from stages.config import growth_spec

GB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def fmt_params(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


# ---------------------------------------------------------------------- the parent's model
def compose_stage(name: str) -> dict[str, Any]:
    """The resolved TrainConfig of stage ``name`` as a plain dict (stages.config.compose_stage)."""
    from stages.config import compose_stage as compose_typed
    from stages.config import to_plain

    return to_plain(compose_typed(name))


def final_config(stage: dict[str, Any], run_dir: Path, depth: int = 0) -> ModelConfig:
    """The model a stage ends with: its final checkpoint's config if trained, else its
    flavor grown from its parent's final model (masks folded: a stage ends at c = 1)."""
    from operators import make_plan

    final = run_dir / stage["name"] / "final"
    if final.is_dir():
        with CheckpointReader(final) as reader:
            return reader.config
    target = resolve_config(stage["model"])
    if stage["parent"] is None or depth > 32:
        return target
    parent = compose_stage(stage["parent"])["stage"]
    src = final_config(parent, run_dir, depth + 1)
    if src.tensor_shapes() == target.tensor_shapes():
        return src
    return make_plan(src, target, growth_spec(stage["growth"])).config.replace(growth_mask=None)


# ---------------------------------------------------------------------- growth plan
def plan_report(src: ModelConfig, target: ModelConfig, spec: GrowthSpec, precision: str,
                optimizer_state: bool) -> dict[str, Any]:
    from operators import make_plan

    plan = make_plan(src, target, spec)
    ops = plan.tensor_ops()
    width = DTYPE_BYTES[precision]
    read = sum(_numel(op.src_shape) for op in ops if op.src_shape is not None)
    written = sum(_numel(op.shape) for op in ops)
    moments = 2 if optimizer_state else 0
    operators = Counter(re.sub(r"from layer \d+", "from layer i", op.operator) for op in ops)
    summary = plan.summary()
    return {
        "from_params": summary["from_params"], "to_params": summary["to_params"],
        "tensors": len(ops), "new_layers": summary["new_layers"],
        "masked": summary["masked"], "exact": summary["exact"],
        "bytes_read": read * width + read * 4 * moments,
        "bytes_written": written * width + written * 4 * moments,
        "operators": dict(operators.most_common()),
        "config": plan.config,
    }


# ---------------------------------------------------------------------- memory
def memory_report(config: ModelConfig, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's model-state estimate per GPU for this stage's parallel layout."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ds = cfg["deepspeed"]
    world = cfg["nproc"] * cfg["nnodes"]
    params = config.params
    pp = ds["pipeline_stages"] if ds["pipeline"] else 1
    dp = world // pp
    out: dict[str, Any] = {"params": params, "ranks": world, "pipeline_degree": pp, "data_parallel": dp,
                           "zero_stage": ds["zero_stage"]}
    if ds["zero_stage"] == 3:
        largest = max(_numel(s) for s in config.tensor_shapes().values())
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest, num_gpus_per_node=cfg["nproc"], num_nodes=cfg["nnodes"], cpu_offload=False)
        out.update(function="estimate_zero3_model_states_mem_needs", params_per_gpu=params,
                   largest_layer_params=largest)
    else:
        per_stage = fullest_pipeline_stage(config, pp)
        ranks = dp if ds["zero_stage"] > 0 else 1  # ZeRO-0: every rank keeps all Adam state
        # the formula divides the Adam state by num_nodes × num_gpus_per_node: pass the DP degree
        _, gpu = estimate_zero2_model_states_mem_needs(per_stage, num_gpus_per_node=ranks, num_nodes=1,
                                                       cpu_offload=False)
        out.update(function="estimate_zero2_model_states_mem_needs", params_per_gpu=per_stage,
                   params_per_gpu_mean=-(-params // pp))
    out["gpu_bytes"] = gpu
    return out


def fullest_pipeline_stage(config: ModelConfig, pp: int) -> int:
    """Parameters on the fullest GPU of a ``pp``-stage pipeline partitioned by decoder layer
    (stages.pipeline uses ``partition_method="type:DecoderLayerPipe"``): ceil(L / pp) layers,
    plus the embedding or the final norm + lm_head that ride on the first / last stage."""
    if pp == 1:
        return config.params
    shapes = config.tensor_shapes()
    layer = sum(_numel(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    ends = max(_numel(shapes["model.embed_tokens.weight"]),
               _numel(shapes["lm_head.weight"]) + config.hidden_size)
    return -(-config.num_hidden_layers // pp) * layer + ends


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------- the report
def dry_run_stage(cfg: dict[str, Any], echo: Any = print) -> dict[str, Any]:
    """Print (via ``echo``) and return this stage's growth plan and memory estimate."""
    stage, ds = cfg["stage"], cfg["deepspeed"]
    run_dir = Path(cfg["run_dir"]).expanduser().resolve()
    target = resolve_config(stage["model"])
    report: dict[str, Any] = {"stage": stage["name"], "model": stage["model"], "parent": stage["parent"]}
    echo(f"== stage {stage['name']}: {stage['model']} ({fmt_params(target.params)} parameters), "
         f"{stage['steps']:,} steps × {stage['micro_batch_size'] * stage['grad_accum']} sequences "
         f"× {stage['seq_len']} tokens per data-parallel rank")
    model = target
    if stage["parent"] is not None or stage["init_from"] is not None:
        if stage["parent"] is not None:
            parent = compose_stage(stage["parent"])["stage"]
            src, source = final_config(parent, run_dir), f"stage {stage['parent']} ({parent['model']})"
        else:
            with CheckpointReader(Path(stage["init_from"]).expanduser()) as reader:
                src, source = reader.config, stage["init_from"]
        spec = growth_spec(stage["growth"])
        if spec.positions == "distance":  # picks layers by their weights: none to read here
            echo("   positions 'distance' choose layers from the weights; planned with 'interleave' "
                 "(same tensors and bytes, other indices)")
            spec = dataclasses.replace(spec, positions="interleave")
        growth = plan_report(src, target, spec, ds["precision"], stage["growth"]["optimizer_state"])
        model = growth.pop("config")
        report["growth"] = growth
        kind = f"{spec.hidden}/{spec.ffn}/{spec.heads}/{spec.depth}"
        echo(f"   growth from {source}: {fmt_params(growth['from_params'])} → {fmt_params(growth['to_params'])}"
             f", strategy {stage['growth']['strategy']} (hidden/ffn/heads/depth = {kind}), "
             f"{'exact' if growth['exact'] else 'NOT exact'}{', MSG masks' if growth['masked'] else ''}")
        moments = " + Adam moments (fp32)" if stage["growth"]["optimizer_state"] else ""
        echo(f"   plan: {growth['tensors']} tensors, reads {fmt_bytes(growth['bytes_read'])}, writes "
             f"{fmt_bytes(growth['bytes_written'])} ({ds['precision']} weights{moments})")
        echo(f"   new layers at {_ranges(growth['new_layers'])} "
             f"(positions: {spec.positions})")
        for op, count in growth["operators"].items():
            echo(f"     {count:5d} × {op}")
    else:
        echo(f"   fresh init (seed {stage['seed']}): no growth plan")
    mem = memory_report(model, cfg)
    report["memory"] = mem
    layout = (f"pipeline {mem['pipeline_degree']} stages + ZeRO-{ds['zero_stage']}" if ds["pipeline"]
              else f"ZeRO-{ds['zero_stage']}")
    echo(f"   DeepSpeed {layout}, {ds['precision']}, {cfg['nnodes']} node(s) × {cfg['nproc']} GPUs = "
         f"{mem['ranks']} ranks, data parallel {mem['data_parallel']}")
    if ds["pipeline"]:
        echo(f"     pipeline: {mem['pipeline_degree']} stages of {fmt_params(mem['params_per_gpu_mean'])} "
             f"on average; the fullest holds {fmt_params(mem['params_per_gpu'])} (ceil(layers / stages) "
             f"layers + embedding or lm_head), which is what DeepSpeed's estimate gets")
    echo(f"     model states per GPU: {fmt_bytes(mem['gpu_bytes'])} (DeepSpeed {mem['function']}, "
         f"no offload; weights, gradients and Adam state, activations not included)")
    return report


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    text = ", ".join(str(i) for i in indices[:12])
    return text + (f", … ({len(indices)} in all)" if len(indices) > 12 else "")
