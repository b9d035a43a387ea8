"""``dry_run=true``: a stage's growth plan and whether its parallel layout fits, without weights.

For each stage it prints

- the growth plan from the parent's model (operators.make_plan on configs, meta only):
  parameters before → after, tensors, bytes read and written (weights in the stage's
  precision, Adam moments in fp32 when ``stage.growth.optimizer_state``), new layers and
  the operators used;
- whether the stage's TP × PP × DP layout fits a GPU of ``gpu_memory_gib`` (default 80):
  model states per GPU (DeepSpeed's estimators, for the fullest pipeline stage split over
  TP) plus activations (1F1B micro-batches in flight, activation checkpointing, TP, SwiGLU
  width, flash attention) less a stated margin, the pipeline bubble and the tokens per step;
  every term is stated in :mod:`stages.launch.memory`.

Each stage writes ``RUN_DIR/<stage>/dry_run.json`` (:data:`DRY_RUN_NAME`): ``layout``
(tp, pp, dp, zero_stage, micro_batch_size, grad_accum, seq_len, activation_checkpointing),
``memory_gib`` (model_states, activations, total), ``gpu_memory_gib``, ``fits``, ``bubble``.
Nothing else is written; a stage directory holding only that file still counts as empty
when the stage is trained.

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

from flmcore.io import write_json_atomic
from growth.checkpoint import CheckpointReader
from growth.config import ModelConfig, resolve_config
from operators import GrowthSpec, make_plan
from stages.data import check_data
from stages.launch.memory import MARGIN, dry_run_record, fit
from stages.layout import Layout, check_model_split
from stages.schema import StageCfg, TrainConfig, growth_spec
from stages.schema import compose_stage as compose_typed

GB = 1024**3
DRY_RUN_NAME = "dry_run.json"  # RUN_DIR/<stage>/dry_run.json: layout, memory, fits, bubble
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def fmt_params(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


# ---------------------------------------------------------------------- the parent's model
def compose_stage(name: str) -> TrainConfig:
    """The resolved TrainConfig of stage ``name`` (stages.schema.compose_stage, typed)."""
    return compose_typed(name)


def final_config(stage: StageCfg, run_dir: Path, depth: int = 0) -> ModelConfig:
    """The model a stage ends with: its final checkpoint's config if trained, else its
    flavor grown from its parent's final model (masks folded: a stage ends at c = 1)."""

    final = run_dir / stage.name / "final"
    if final.is_dir():
        with CheckpointReader(final) as reader:
            return reader.config
    target = resolve_config(stage.model)
    if stage.parent is None or depth > 32:
        return target
    parent = compose_stage(stage.parent).stage
    src = final_config(parent, run_dir, depth + 1)
    if src.tensor_shapes() == target.tensor_shapes():
        return src
    return make_plan(src, target, growth_spec(stage.growth)).config.replace(growth_mask=None)


# ---------------------------------------------------------------------- growth plan
def plan_report(src: ModelConfig, target: ModelConfig, spec: GrowthSpec, precision: str,
                optimizer_state: bool) -> dict[str, Any]:

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
def memory_report(config: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    """Per-GPU model states (DeepSpeed's estimators), activations and the fits verdict for
    this stage's TP × PP × DP layout (stages.launch.memory states every term)."""
    layout = Layout.of(cfg)
    check_model_split(config, layout.tp)
    verdict = fit(config, layout, cfg.deepspeed.precision, cfg.gpu_memory_gib,
                  sp=bool(cfg.deepspeed.sequence_parallel))
    states = verdict["model_states"]
    out: dict[str, Any] = {"params": config.params, "ranks": layout.world, "pipeline_degree": layout.pp,
                           "tensor_parallel": layout.tp, "data_parallel": layout.dp,
                           "zero_stage": layout.zero_stage, **states, "gpu_bytes": states["bytes"]}
    if layout.pp > 1:
        out["params_per_gpu_mean"] = -(-config.params // (layout.pp * layout.tp))
    out["verdict"] = verdict
    out["record"] = dry_run_record(layout, verdict, cfg.gpu_memory_gib)
    return out


def write_record(stage_dir: Path, record: dict[str, Any]) -> Path:
    """RUN_DIR/<stage>/dry_run.json, written whole or not at all."""
    return write_json_atomic(stage_dir / DRY_RUN_NAME, record)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------- the report
def dry_run_stage(cfg: TrainConfig, echo: Any = print) -> dict[str, Any]:
    """Print (via ``echo``) and return this stage's growth plan and memory estimate."""
    stage, ds = cfg.stage, cfg.deepspeed
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    target = resolve_config(stage.model)
    report: dict[str, Any] = {"stage": stage.name, "model": stage.model, "parent": stage.parent}
    echo(f"== stage {stage.name}: {stage.model} ({fmt_params(target.params)} parameters), "
         f"{stage.steps:,} steps × {stage.micro_batch_size * stage.grad_accum} sequences "
         f"× {stage.seq_len} tokens per data-parallel rank")
    model = target
    if stage.parent is not None or stage.init_from is not None:
        if stage.parent is not None:
            parent = compose_stage(stage.parent).stage
            src, source = final_config(parent, run_dir), f"stage {stage.parent} ({parent.model})"
        else:
            with CheckpointReader(Path(stage.init_from).expanduser()) as reader:
                src, source = reader.config, stage.init_from
        spec = growth_spec(stage.growth)
        if spec.positions == "distance":  # picks layers by their weights: none to read here
            echo("   positions 'distance' choose layers from the weights; planned with 'interleave' "
                 "(same tensors and bytes, other indices)")
            spec = dataclasses.replace(spec, positions="interleave")
        growth = plan_report(src, target, spec, ds.precision, stage.growth.optimizer_state)
        model = growth.pop("config")
        report["growth"] = growth
        kind = f"{spec.hidden}/{spec.ffn}/{spec.heads}/{spec.depth}"
        echo(f"   growth from {source}: {fmt_params(growth['from_params'])} → {fmt_params(growth['to_params'])}"
             f", strategy {stage.growth.strategy} (hidden/ffn/heads/depth = {kind}), "
             f"{'exact' if growth['exact'] else 'NOT exact'}{', MSG masks' if growth['masked'] else ''}")
        moments = " + Adam moments (fp32)" if stage.growth.optimizer_state else ""
        echo(f"   plan: {growth['tensors']} tensors, reads {fmt_bytes(growth['bytes_read'])}, writes "
             f"{fmt_bytes(growth['bytes_written'])} ({ds.precision} weights{moments})")
        echo(f"   new layers at {_ranges(growth['new_layers'])} "
             f"(positions: {spec.positions})")
        for op, count in growth["operators"].items():
            echo(f"     {count:5d} × {op}")
    else:
        echo(f"   fresh init (seed {stage.seed}): no growth plan")
    check_data(cfg.data, model.valid_vocab_size or model.vocab_size, f"stage.model {stage.model!r}")
    mem = memory_report(model, cfg)
    report["memory"] = mem
    echo_memory(mem, cfg, echo)
    report["dry_run_json"] = str(write_record(run_dir / stage.name, mem["record"]))
    return report


def echo_memory(mem: dict[str, Any], cfg: TrainConfig, echo: Any) -> None:
    ds, verdict = cfg.deepspeed, mem["verdict"]
    acts, lay = verdict["activations"], mem["record"]["layout"]
    engine = (f"pipeline {mem['pipeline_degree']} stages + ZeRO-{ds.zero_stage}" if ds.pipeline
              else f"ZeRO-{ds.zero_stage}")
    echo(f"   layout TP {mem['tensor_parallel']} × PP {mem['pipeline_degree']} × DP {mem['data_parallel']} = "
         f"{mem['ranks']} ranks ({cfg.nnodes} node(s) × {cfg.nproc} GPUs), DeepSpeed {engine}, "
         f"{ds.precision}, activation checkpointing {'on' if lay['activation_checkpointing'] else 'off'}"
         + (", sequence parallelism" if ds.sequence_parallel and mem["tensor_parallel"] > 1 else ""))
    if ds.pipeline:
        echo(f"     pipeline: {mem['pipeline_degree']} stages of {fmt_params(mem['params_per_gpu_mean'])} "
             f"per GPU on average; the fullest holds {fmt_params(mem['params_per_gpu'])} (ceil(layers / "
             f"stages) layers + embedding or lm_head, ÷ TP), which is what DeepSpeed's estimate gets")
    extra = (f" + {fmt_bytes(mem['unpartitioned_grad_bytes'])} of 16-bit gradients ZeRO-{ds.zero_stage} "
             f"does not partition" if mem["unpartitioned_grad_bytes"] else "")
    echo(f"     model states per GPU: {fmt_bytes(mem['gpu_bytes'])} (DeepSpeed {mem['function']}, no "
         f"offload, for {fmt_params(mem['params_per_gpu'])} parameters{extra})")
    echo(f"     activations per GPU: {fmt_bytes(acts['bytes'])} (first stage: {acts['in_flight_first_stage']} "
         f"micro-batch(es) in flight × {acts['layers_per_stage']} layers; last stage: logits "
         f"{fmt_bytes(acts['logits_bytes'])})")
    word = "fits" if verdict["fits"] else "DOES NOT FIT"
    echo(f"     total {fmt_bytes(verdict['total_bytes'])} per GPU vs {verdict['usable_gib']:.1f} GiB usable "
         f"({cfg.gpu_memory_gib:g} GiB less a {MARGIN:.0%} margin): {word}")
    echo(f"     pipeline bubble (p−1)/(m+p−1) = {verdict['bubble']:.1%}; "
         f"{verdict['tokens_per_step']:,} tokens per step")


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    text = ", ".join(str(i) for i in indices[:12])
    return text + (f", … ({len(indices)} in all)" if len(indices) > 12 else "")
