"""The rank process of the TP parity tests (tests/integration/test_tensor_parallel_engine.py), one module so
that one 4-rank launch runs every TP layout after a single start-up:

    python -m tests.workers.tp_parity_worker OUT TP STEPS PHASE [PHASE ...]

``dp``: the TP × DP check (TP 2 × DP 2 under ZeRO-2, and under ZeRO-3, vs plain DP 2 under ZeRO-1;
batches keyed by the data-parallel rank). ``pipe``: TP 2 × PP 2 inside DeepSpeed's pipeline vs
1 rank (batches not keyed by rank; with ``TP > 1`` also Adam seeding, resume, ZeRO-0, sequence
parallelism and bf16 under TP (the last two also under ZeRO-3), and the plain pipeline under
ZeRO-0 and in bf16). Both start from ``OUT/start``; every engine comes from
``stages.engines.build.build_engine``. Rank 0 writes ``OUT/<phase>-record-tp<TP>.json`` and the
exports ``OUT/<phase>-final-tp<TP>``.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Any

import torch
import torch.distributed as dist

from growth.checkpoint import CheckpointReader, new_history
from stages.engines.build import build_engine
from stages.engines.common import init_distributed, set_lr
from stages.rank.export import export_final
from stages.schema import DeepSpeedCfg, StageCfg

STAGE = StageCfg(micro_batch_size=2, grad_accum=2, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
META = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
MOMENTS = ("exp_avg", "exp_avg_sq")
MASK = {"c": 0.3, "hidden_size": 24, "intermediate_size": 60, "num_key_value_heads": 3, "new_layers": [1]}

CLIP_NORMS: list[float] = []  # what ZeRO-0's clipping returned, step by step (see record_clip_norms)


def record_clip_norms() -> None:
    """ZeRO-0 clips in ``deepspeed.runtime.utils.clip_grad_norm_`` and keeps no norm: wrap the
    engine module's reference to it (in the rank processes only) to record what it returns."""
    import deepspeed.runtime.engine as ds_engine

    clip = ds_engine.clip_grad_norm_

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        norm = clip(*args, **kwargs)
        CLIP_NORMS.append(float(norm))
        return norm

    ds_engine.clip_grad_norm_ = recording


def engine(ckpt: str, tp: int, *, zero: int, pipe: bool = False, precision: str = "fp32", sp: bool = False) -> Any:
    """TP: each rank reads its own slices of ``ckpt`` (as the trainer's start_weights is {})."""
    ds = DeepSpeedCfg(name="test", zero_stage=zero, pipeline=pipe, pipeline_stages=2, precision=precision,
                      gradient_clipping=0.2, activation_checkpointing=tp > 1, tensor_parallel=tp,
                      sequence_parallel=sp)
    with CheckpointReader(ckpt) as reader:
        weights = reader.state_dict(torch.float32) if tp == 1 else {}
        return build_engine(reader.config, weights, ds, STAGE, init=ckpt if tp > 1 else None)


def batch(*key: Any) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    ids = torch.randint(0, 259, (2, 13), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def grad_norm(eng: Any) -> float:
    return float(eng.engine.get_global_grad_norm() if eng.zero_stage else CLIP_NORMS[-1])


def save_record(out: str, name: str, record: dict[str, Any], tensors: dict[str, Any] | None = None) -> None:
    if dist.get_rank() == 0:
        with open(os.path.join(out, name), "w") as fh:
            json.dump(record, fh)
        if tensors is not None:
            torch.save(tensors, os.path.join(out, name.replace("record", "seeded").replace(".json", ".pt")))


def gathered_moments(eng: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {kind: {n: t for n, t in eng.gather(kind) if t is not None} for kind in MOMENTS}


# ---------------------------------------------------------------------- dp: TP × DP vs DP
def dp_train(out: str, tp: int, steps: int, zero: int, final: str) -> tuple[dict[str, Any], Any]:
    """Train ``steps`` steps (batches keyed by the data-parallel rank), export to ``OUT/final``;
    with ``tp > 1`` also seed a fresh engine's Adam state from that export (moments read as slices)."""
    eng = engine(os.path.join(out, "start"), tp, zero=zero)
    evals = [batch("eval", i) for i in range(2)]
    record = {"engine": type(eng).__name__, "zero_stage": eng.zero_stage, "eval_loss_start": eng.eval_loss(evals),
              "losses": [], "grad_norms": [], "dp_world": eng.dp_world}
    for step in range(steps):
        set_lr(eng.optimizer, 3e-3)
        loss = eng.train_step([batch("train", step, m, eng.dp_rank) for m in range(2)])
        record["losses"].append(float(loss))
        record["grad_norms"].append(grad_norm(eng))
    record["eval_loss_end"] = eng.eval_loss(evals)
    if zero == 3:  # what ZeRO-3 partitioned, and over which group (this TP rank's shards, over DP)
        held = [p for _, p in eng.named_params()]
        record["zero3_partition"] = {"ranks": sorted({tuple(dist.get_process_group_ranks(p.ds_process_group))
                                                      for p in held}),
                                     "numel": sum(p.ds_numel for p in held),
                                     "held": sum(p.ds_tensor.numel() for p in held)}
    export_final(eng, eng.config, new_history(), os.path.join(out, final), META)
    seeded = None
    if tp > 1:  # Adam seeding under TP: a fresh engine from the export, moments read as slices
        fresh = engine(os.path.join(out, final), tp, zero=zero)
        record["seeded_step"] = fresh.seed_adam_state(os.path.join(out, final), fresh.config)
        seeded = gathered_moments(fresh)
    return record, seeded


def dp_phase(out: str, tp: int, steps: int) -> None:
    """TP × DP under ZeRO-2 (DP 2 under ZeRO-1 at ``tp == 1``); with ``tp > 1`` also TP × DP
    under ZeRO-3 (``zero3_dp``: parameters partitioned over the data-parallel group)."""
    record, seeded = dp_train(out, tp, steps, 2 if tp > 1 else 1, f"dp-final-tp{tp}")
    if tp > 1:
        record["zero3_dp"], seeded3 = dp_train(out, tp, steps, 3, f"dp-zero3-final-tp{tp}")
        seeded = {"zero2": seeded, "zero3": seeded3}
    save_record(out, f"dp-record-tp{tp}.json", record, seeded)


# ---------------------------------------------------------------------- pipe: TP × PP vs 1 rank
def pipe_step(eng: Any, i: int) -> tuple[float, float]:
    """One optimizer step of the pipe phase, the MSG mask ramping (c = 0.3, 0.5, 0.7, …)."""
    eng.set_growth_mask({**MASK, "c": MASK["c"] + 0.2 * i})
    set_lr(eng.optimizer, 3e-3)
    loss = float(eng.train_step([batch("train", i, m) for m in range(2)]))  # TP × DP replicas: the same rows
    return loss, grad_norm(eng)


def layer_input_tokens(eng: Any) -> list[int]:
    """Record the sequence length each decoder-layer input has on this rank (a forward pre-hook
    on this rank's first decoder layer): the full 12 tokens, or 6 under sequence parallelism."""
    from growth.model import DecoderLayer

    seen: list[int] = []
    layer = next(m for m in eng.engine.module.modules() if isinstance(m, DecoderLayer))
    layer.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[1])))
    return seen


def numerics(eng: Any) -> dict[str, Any]:
    """What DeepSpeed was handed and built: its optimizer wrapper, the ``data_types`` and ``bf16``
    sections of the config, and the dtypes of BF16_Optimizer's flat gradient buffers."""
    buffers = getattr(eng.optimizer, "fp32_groups_gradients_flat", [])
    return {"optimizer": type(eng.optimizer).__name__, "data_types": eng.ds_config.get("data_types"),
            "bf16_config": eng.ds_config["bf16"], "grad_buffers": sorted({str(t.dtype) for t in buffers})}


def pipe_train(eng: Any, steps: int, out: str | None = None, save_at: int | None = None) -> dict[str, Any]:
    eng.set_growth_mask(MASK)
    tokens = layer_input_tokens(eng)
    evals = [batch("eval", i) for i in range(2)]
    record = {"engine": type(eng).__name__, "dp_world": eng.dp_world, "zero_stage": eng.zero_stage,
              "dtype": str(next(p for _, p in eng.named_params()).dtype),
              "eval_loss_start": eng.eval_loss(evals), "losses": [], "grad_norms": [], **numerics(eng)}
    for i in range(steps):
        loss, norm = pipe_step(eng, i)
        record["losses"].append(loss)
        record["grad_norms"].append(norm)
        if i == save_at:
            eng.engine.save_checkpoint(os.path.join(out, "pipe-ds_ckpt"), tag="resume")
    record["eval_loss_end"] = eng.eval_loss(evals)
    record["layer_input_tokens"] = sorted(set(tokens))
    return record


def pipe_phase(out: str, tp: int, steps: int) -> None:
    start = os.path.join(out, "start")
    pipe = tp > 1  # TP 2 × PP 2 on 4 ranks, else the plain engine on 1 rank
    eng = engine(start, tp, zero=1, pipe=pipe)
    record = pipe_train(eng, steps, out, save_at=steps - 2 if pipe else None)
    final = os.path.join(out, f"pipe-final-tp{tp}")
    export_final(eng, eng.config, new_history(), final, META)
    seeded = None
    if pipe:
        # Adam seeding: a fresh TP pipeline engine from the export, moments read as slices; then
        # resume: it loads the DeepSpeed checkpoint of step steps-1 and redoes the last step
        fresh = engine(final, tp, zero=1, pipe=True)
        record["seeded_step"] = fresh.seed_adam_state(final, fresh.config)
        seeded = gathered_moments(fresh)
        fresh.engine.load_checkpoint(os.path.join(out, "pipe-ds_ckpt"), tag="resume")
        record["resumed_last"] = pipe_step(fresh, steps - 1)
        # ZeRO-0 (plain DeepSpeed) under TP, inside the pipeline and without it (TP 2 × DP 2)
        record["zero0_pipe"] = pipe_train(engine(start, tp, zero=0, pipe=True), 2)
        record["zero0_dp"] = pipe_train(engine(start, tp, zero=0), 2)
        # ... and the plain pipeline's (PP 2 × DP 2, no TP): its clipping norm counts every stage
        record["zero0_plain_pipe"] = pipe_train(engine(start, 1, zero=0, pipe=True), 2)
        # sequence parallelism, both engines (12 tokens: 6 a TP rank)
        record["sp_pipe"] = pipe_train(engine(start, tp, zero=1, pipe=True, sp=True), 2)
        record["sp_dp"] = pipe_train(engine(start, tp, zero=2, sp=True), 2)
        record["sp_dp3"] = pipe_train(engine(start, tp, zero=3, sp=True), 2)  # ... and under ZeRO-3
        # bf16 under TP, both engines
        record["bf16_pipe"] = pipe_train(engine(start, tp, zero=1, pipe=True, precision="bf16"), steps)
        record["bf16_dp"] = pipe_train(engine(start, tp, zero=1, precision="bf16"), steps)
        record["bf16_dp3"] = pipe_train(engine(start, tp, zero=3, precision="bf16"), steps)  # ... and under ZeRO-3
        # ... and the plain bf16 pipeline, PP 2 × DP 2 (both replicas see the 1-rank rows)
        record["bf16_plain_pipe"] = pipe_train(engine(start, 1, zero=1, pipe=True, precision="bf16"), steps)
    else:
        record["bf16"] = pipe_train(engine(start, tp, zero=1, precision="bf16"), steps)
    save_record(out, f"pipe-record-tp{tp}.json", record, seeded)


PHASES = {"dp": dp_phase, "pipe": pipe_phase}


def main() -> None:
    out, tp, steps, phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    init_distributed()
    record_clip_norms()
    for phase in phases:
        PHASES[phase](out, tp, steps)
    finish()


def finish() -> None:
    """Leave the process group together and exit at once (no interpreter teardown)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
