"""One rank of a training stage: ``torchrun … -m stages.worker STAGE_DIR/stage_config.json``.

The orchestrator (``stages.train``) writes the resolved config and starts N of these.
Each rank builds the model, loads the start weights into it *before*
``deepspeed.initialize``, seeds the Adam state from ``init_checkpoint/optimizer/`` when
there is one, trains ``stage.steps`` updates and exports. Outputs (STAGE_DIR/…):

    summary.json       stage, params, steps, tokens, flops, wall_seconds, tokens_per_second,
                       eval_loss_start, eval_loss_end, parent_eval_loss_end (+ a few more)
    train_log.jsonl    one line per step: step, loss, lr, c, tokens_per_second (rank 0)
    tb/                TensorBoard scalars (rank 0); a tqdm bar on rank 0's stderr
    ds_ckpt/           DeepSpeed-native checkpoints (every stage.save_every steps and at the end)
    final/             the canonical checkpoint + optimizer/ (stages.export)

"Start from grown weights" (``init_checkpoint``) and "resume a crashed stage"
(``resume=true``: continue from ``ds_ckpt/``, same data position, same loss trajectory)
are different things: a resume restores weights, Adam state and step from ``ds_ckpt/``
(``init_checkpoint`` then only supplies the config, MSG mask record and history).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flmcore.errors import FlmError
from growth.checkpoint import CheckpointError, CheckpointReader, append_event, new_history
from growth.config import ConfigError, ModelConfig
from growth.model import init_state_dict
from stages import optim_state
from stages.config import load_resolved
from stages.data import DataError
from stages.engine import build_plain, init_distributed, set_lr
from stages.export import export_final
from stages.lr import mask_c, stage_schedule

SUMMARY_NAME = "summary.json"
TRAIN_LOG_NAME = "train_log.jsonl"
TB_DIR = "tb"
DS_CKPT_DIR = "ds_ckpt"
FINAL_DIR = "final"
DS_TAG = "step{:08d}"
KEEP_DS_CHECKPOINTS = 2  # older DeepSpeed checkpoints are deleted after each save
# Test hooks (environment): after step k, save a DeepSpeed checkpoint and exit 0 …
STOP_AFTER_ENV = "FLM_WORKER_STOP_AFTER_STEP"
# … or write STAGE_DIR/.paused-<rank> (holding the rank's pid) and sleep until killed.
PAUSE_AFTER_ENV = "FLM_WORKER_PAUSE_AFTER_STEP"
PAUSED_MARK = ".paused-{}"


class WorkerError(FlmError):
    """The stage cannot run as configured; the one-line message names the file or field."""


# ---------------------------------------------------------------------- start state
def start_config(cfg: dict[str, Any]) -> ModelConfig:
    """The model of this stage: ``model_config``, or the init checkpoint's config.json
    (it carries what growth changed beyond shapes: MSG masks, rescaled norm eps, μP)."""
    config = ModelConfig.from_hf_dict(cfg["model_config"], source="stage_config.json: model_config")
    init = cfg.get("init_checkpoint")
    if init is None:
        return config
    ck = CheckpointReader(init).config
    if ck.tensor_shapes() != config.tensor_shapes():
        mine, theirs = config.tensor_shapes(), ck.tensor_shapes()
        bad = next((n for n in {**mine, **theirs} if mine.get(n) != theirs.get(n)), "?")
        raise WorkerError(f"{init}: checkpoint does not match the stage's model: tensor '{bad}' is "
                          f"{list(theirs.get(bad, ()))} there, {list(mine.get(bad, ()))} in model_config")
    return ck


def start_weights(cfg: dict[str, Any], config: ModelConfig) -> dict[str, torch.Tensor]:
    init = cfg.get("init_checkpoint")
    if init is None:
        return init_state_dict(config, int(cfg["stage"]["seed"]))
    with CheckpointReader(init) as reader:
        return reader.state_dict(torch.float32)


def build_engine(cfg: dict[str, Any], config: ModelConfig, weights: dict[str, torch.Tensor]):
    ds, stage = cfg["deepspeed"], cfg["stage"]
    if ds.get("pipeline"):
        from stages.pipeline import PipeStageEngine

        eng = PipeStageEngine(config, weights, int(stage["seed"]), ds, stage)
    else:
        eng = build_plain(config, weights, ds, stage)
    if ds.get("precision") == "bf16":  # fp32 masters from the fp32 checkpoint, not from bf16
        optim_state.set_master_weights(eng.optimizer, eng.named_params(), weights)
    return eng


# ---------------------------------------------------------------------- rank-0 outputs
class Reporter:
    """TensorBoard, train_log.jsonl and the tqdm bar; a no-op on ranks other than 0."""

    def __init__(self, stage_dir: Path, name: str, total: int, start: int, active: bool,
                 log_every: int = 1):
        self.active, self.total, self.log_every = active, total, max(1, log_every)
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(str(stage_dir / TB_DIR), purge_step=start or None)
        self.log_path = stage_dir / TRAIN_LOG_NAME
        kept = []
        if self.log_path.is_file():  # a resume drops what came after its checkpoint
            kept = [ln for ln in self.log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
        self.log_path.write_text("".join(ln + "\n" for ln in kept))
        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", mininterval=1.0,
                        file=sys.stderr, dynamic_ncols=True)

    def step(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        step = record["step"]
        self.bar.update(1)
        if step % self.log_every and step != self.total:
            return
        for key in ("loss", "lr", "c", "tokens_per_second"):
            if record.get(key) is not None:
                self.tb.add_scalar(f"train/{key}", record[key], step)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")

    def eval(self, step: int, loss: float) -> None:
        if self.active:
            self.tb.add_scalar("eval/loss", loss, step)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.tb.close()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- DeepSpeed checkpoints
def save_ds_checkpoint(eng: Any, ds_dir: Path, step: int, client: dict[str, Any]) -> None:
    import torch.distributed as dist

    eng.engine.save_checkpoint(str(ds_dir), tag=DS_TAG.format(step), client_state=client)
    dist.barrier()
    if dist.get_rank() == 0:
        tags = sorted(p for p in ds_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-KEEP_DS_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _env_step(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


# ---------------------------------------------------------------------- the stage
def run_stage(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Train one stage on this rank; returns the summary (rank 0) or None."""
    import torch.distributed as dist

    from stages.data import TokenBatches, eval_batches

    begin = time.perf_counter()
    rank = dist.get_rank()
    stage, ds = cfg["stage"], cfg["deepspeed"]
    stage_dir = Path(cfg["stage_dir"])
    stage_dir.mkdir(parents=True, exist_ok=True)
    ds_dir, final_dir = stage_dir / DS_CKPT_DIR, stage_dir / FINAL_DIR
    total, accum = int(stage["steps"]), int(stage["grad_accum"])
    seq_len, mbs = int(stage["seq_len"]), int(stage["micro_batch_size"])
    init = cfg.get("init_checkpoint")
    # Decided once, before any rank can publish final/: a rank that looked later could see
    # rank 0's fresh export, skip its own part and leave the ranks' collectives out of step.
    exported = (final_dir / "config.json").is_file()

    config = start_config(cfg)
    mask0 = dict(config.growth_mask) if config.growth_mask is not None else None
    weights = start_weights(cfg, config)
    eng = build_engine(cfg, config, weights)
    del weights

    start, client = 0, {}
    resuming = bool(cfg.get("resume")) and (ds_dir / "latest").is_file()
    if resuming:
        path, client = eng.engine.load_checkpoint(str(ds_dir))
        if path is None:
            raise WorkerError(f"{ds_dir}: could not load the latest DeepSpeed checkpoint")
        start = int(client["step"])
    seeded_step = None
    if not resuming and optim_state.has_optimizer_state(init):
        seeded_step = optim_state.seed_adam_state(eng.optimizer, eng.named_params(), init, config)

    schedule = stage_schedule(stage, grown=init is not None, parent_lr=cfg.get("parent_lr"))
    train = TokenBatches(cfg["data"], "train", seq_len, mbs, int(stage["seed"]))
    evals = eval_batches(cfg["data"], seq_len, mbs, int(stage["eval_batches"]))
    tokens_per_step = mbs * accum * eng.dp_world * seq_len

    def set_mask(step: int) -> float | None:
        if mask0 is None:
            return None
        c = mask_c(step, int(stage["ramp_steps"]), float(mask0["c"]))
        if c >= 1.0:  # the ramp is over: fold (plain model, cheaper steps)
            if eng.config.growth_mask is not None:
                eng.set_growth_mask(None)
            return 1.0
        eng.set_growth_mask({**mask0, "c": c})
        return c

    set_mask(start)
    if resuming:
        eval_start = client["eval_loss_start"]
    else:
        eval_start = eng.eval_loss(evals)
    reporter = Reporter(stage_dir, stage["name"], total, start, active=rank == 0,
                        log_every=int(stage.get("log_every", 1)))
    if mask0 is not None and rank == 0 and mask_c(total, int(stage["ramp_steps"]), float(mask0["c"])) < 1:
        print(f"warning: stage.ramp_steps ({stage['ramp_steps']}) exceeds stage.steps ({total}): the "
              f"stage ends with the MSG masks at c < 1 and exports them unfolded", file=sys.stderr)
    if not resuming:
        reporter.eval(0, eval_start)
    train_seconds = float(client.get("train_seconds", 0.0))
    wall_before = float(client.get("wall_seconds", 0.0))
    stop_after, pause_after = _env_step(STOP_AFTER_ENV), _env_step(PAUSE_AFTER_ENV)
    save_every, eval_every = int(stage["save_every"]), int(stage["eval_every"])

    def client_state(step: int) -> dict[str, Any]:
        return {"step": step, "eval_loss_start": eval_start, "train_seconds": train_seconds,
                "wall_seconds": wall_before + time.perf_counter() - begin, "seeded_step": seeded_step}

    for step in range(start, total):
        c = set_mask(step)
        lr = schedule.lr(step)
        set_lr(eng.optimizer, lr)
        batches = [train.batch(step, m, eng.dp_rank, eng.dp_world) for m in range(accum)]
        t0 = time.perf_counter()
        loss = eng.train_step(batches)
        dt = time.perf_counter() - t0
        train_seconds += dt
        done = step + 1
        reporter.step({"step": done, "loss": loss, "lr": lr, "c": c,
                       "tokens_per_second": tokens_per_step / dt})
        if eval_every and done % eval_every == 0 and done < total:
            reporter.eval(done, eng.eval_loss(evals))
        if (save_every and done % save_every == 0) or done == total or done == stop_after:
            save_ds_checkpoint(eng, ds_dir, done, client_state(done))
        if done == stop_after:
            reporter.close()
            return None
        if done == pause_after:
            (stage_dir / PAUSED_MARK.format(rank)).write_text(str(os.getpid()))
            time.sleep(3600)

    set_mask(total)
    eval_end = eng.eval_loss(evals)
    reporter.eval(total, eval_end)
    reporter.close()

    tokens = total * tokens_per_step
    history = CheckpointReader(init).history if init is not None else new_history()
    history = append_event(history, {"kind": "train", "stage": stage["name"], "steps": total,
                                     "tokens": tokens, "eval_loss_end": eval_end})
    if not exported:
        meta = {"betas": list(stage["betas"]), "eps": float(stage["eps"]),
                "weight_decay": float(stage["weight_decay"])}
        export_final(eng, eng.config, history, final_dir, meta, source=init)  # the model's mask state
    wall = wall_before + time.perf_counter() - begin
    summary = {
        "stage": stage["name"],
        "params": config.params,
        "steps": total,
        "tokens": tokens,
        "flops": config.flops_per_token(seq_len) * tokens,
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds if train_seconds else None,
        "eval_loss_start": eval_start,
        "eval_loss_end": eval_end,
        "parent_eval_loss_end": cfg.get("parent_eval_loss_end"),
        "lr_peak": schedule.peak,
        "adam_seeded_step": client.get("seeded_step", seeded_step),
        "zero_stage": eng.zero_stage,
        "pipeline": bool(ds.get("pipeline")),
        "precision": ds.get("precision", "fp32"),
        "world_size": dist.get_world_size(),
        "final": str(final_dir),
    }
    if rank == 0:
        write_json_atomic(stage_dir / SUMMARY_NAME, summary)
    dist.barrier()
    return summary if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun --nproc_per_node N -m stages.worker STAGE_DIR/stage_config.json",
              file=sys.stderr)
        return 2
    cfg = load_resolved(args[0])
    init_distributed()
    import torch.distributed as dist

    try:
        run_stage(cfg)
    except (WorkerError, ConfigError, CheckpointError, DataError) as err:
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Note: every file is closed and the process group destroyed by now; interpreter
    # teardown of torch/DeepSpeed/gloo state then takes ~4 s per rank on CPU for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
