"""The one training loop: a :class:`Trainer` drives an ``Engine`` (stages.engines.common) for one stage.

Components are attributes (torchtitan style): ``engine`` (ZeRO or pipeline, behind the
``stages.engines.protocol.Engine`` protocol), ``schedule`` (LR), ``data`` (batches), ``reporter``
(TensorBoard, train_log.jsonl, the progress bar), ``layout`` (the stage dir). The methods
are the steps of a stage::

    trainer = Trainer(resolved)      # model, start weights, engine, Adam seed or resume
    while not trainer.done:
        trainer.train_step()         # one optimizer step (+ log / eval / save when due)
    summary = trainer.finish()       # final eval, export final/, summary.json

:meth:`run` is that loop, with :meth:`after_step` as the seam tests override (stop after
step k, pause to be killed, …). The worker (``stages.rank.worker``), the notebook (through
``train-stage``) and ``benchmarks/gpu_stage.py`` all run this class.

"Start from grown weights" (``init_checkpoint``) and "resume a crashed stage"
(``resume=true``: continue from ``ds_ckpt/``, same data position, same loss trajectory)
are different things: a resume restores weights, Adam state and step from ``ds_ckpt/``
(``init_checkpoint`` then only supplies the config, MSG mask record and history).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from flmcore.errors import FlmError
from flmcore.io import write_json_atomic
from growth.checkpoint import CheckpointReader, append_event, new_history
from growth.config import ModelConfig
from growth.model import init_state_dict
from growth.runs import StageDir
from stages import tag_seal
from stages.engines import optim_state
from stages.engines.build import build_engine
from stages.engines.common import DS_CONFIG_NAME, device
from stages.engines.protocol import Batch
from stages.lr import mask_c, ramp_unfinished, stage_schedule
from stages.rank import elastic
from stages.rank.export import export_final
from stages.rank.prefetch import Prefetcher, to_device
from stages.resolved import ResolvedStage
from stages.schema import NonFinite, Precision, StageCfg

log = logging.getLogger(__name__)

EXACT_TOLERANCE = 1e-4  # |eval_loss_start − parent's eval_loss_end| an exact growth may show


class WorkerError(FlmError):
    """The stage cannot run as configured; the one-line message names the file or field."""


# ---------------------------------------------------------------------- start state
def start_config(resolved: ResolvedStage) -> ModelConfig:
    """The model of this stage: ``model_config``, or the init checkpoint's config.json
    (it carries what growth changed beyond shapes: MSG masks, rescaled norm eps, μP)."""
    config = ModelConfig.from_hf_dict(resolved.model_config, source="stage_config.json: model_config")
    init = resolved.init_checkpoint
    if init is None:
        return config
    ck = CheckpointReader(init).config
    mine, theirs = config.tensor_shapes(), ck.tensor_shapes()
    if theirs != mine:
        bad = next((n for n in {**mine, **theirs} if mine.get(n) != theirs.get(n)), "?")
        raise WorkerError(f"{init}: checkpoint does not match the stage's model: tensor '{bad}' is "
                          f"{list(theirs.get(bad, ()))} there, {list(mine.get(bad, ()))} in model_config")
    return ck


def start_weights(resolved: ResolvedStage, config: ModelConfig) -> dict[str, torch.Tensor]:
    if resolved.config.deepspeed.tensor_parallel > 1:  # the TP engines read their own slices
        return {}
    if resolved.init_checkpoint is None:
        return init_state_dict(config, resolved.config.stage.seed)
    with CheckpointReader(resolved.init_checkpoint) as reader:
        return reader.state_dict(torch.float32)


# ---------------------------------------------------------------------- data
class StageData:
    """The trainer's one view of the data: the micro batches of a step, the eval batches."""

    def __init__(self, info: dict[str, Any], stage: StageCfg, dp_rank: int, dp_world: int):
        from stages.data import TrainStream, eval_batches

        self.stage, self.dp_rank, self.dp_world = stage, dp_rank, dp_world
        # data (stages.data): one stream across stages; a batch is a pure function of (start, step)
        self.train = TrainStream(info, stage.seq_len, stage.micro_batch_size, stage.grad_accum, dp_world, dp_rank)
        self.eval = eval_batches(info, stage.seq_len, stage.micro_batch_size, stage.eval_batches)

    def batches(self, step: int) -> list[Batch]:
        """This rank's ``grad_accum`` micro batches of optimizer step ``step`` (a pure function)."""
        return self.train.step_batches(step)  # data (stages.data)

    def steps(self, start: int, stop: int) -> Iterator[list[Batch]]:
        for step in range(start, stop):
            yield self.batches(step)

    @property
    def tokens_start(self) -> int:
        """Where this stage's stream starts (tokens into the data), kept in DeepSpeed's client state."""
        return self.train.tokens_start

    def position(self, steps: int) -> dict[str, Any]:
        """The summary's stream fields after ``steps`` steps (data_tokens_start/_end, data_epoch, …)."""
        return self.train.position(steps)


# ---------------------------------------------------------------------- rank-0 outputs
class Reporter:
    """TensorBoard, train_log.jsonl and the tqdm bar; a no-op on ranks other than 0."""

    def __init__(self, layout: StageDir, total: int, start: int, active: bool):
        self.active, self.total = active, total
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(str(layout.tb), purge_step=start or None)
        self.log_path = layout.train_log
        kept = []
        if self.log_path.is_file():  # a resume drops what came after its checkpoint
            kept = [ln for ln in self.log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start]
        self.log_path.write_text("".join(ln + "\n" for ln in kept))
        self.bar = tqdm(total=total, initial=start, desc=layout.name, unit="step", mininterval=1.0,
                        file=sys.stderr, dynamic_ncols=True)

    def tick(self) -> None:
        if self.active:
            self.bar.update(1)

    def step(self, record: dict[str, Any]) -> None:
        """A logged step (``tick`` has been called for it)."""
        if not self.active:
            return
        for key in ("loss", "lr", "c", "tokens_per_second"):
            if record[key] is not None:
                self.tb.add_scalar(f"train/{key}", record[key], record["step"])
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["loss"] is not None:  # None: a skipped step (on_nonfinite=skip)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")

    def eval(self, step: int, loss: float) -> None:
        if self.active:
            self.tb.add_scalar("eval/loss", loss, step)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.tb.close()


# ---------------------------------------------------------------------- the loop
class Trainer:
    """One stage on this rank (every rank builds one; collectives keep them in step)."""

    def __init__(self, resolved: ResolvedStage, data: StageData | None = None):
        """``data``: another source of batches (the GPU benchmark's random tokens); by
        default the prepared corpus in ``resolved.data``."""
        import torch.distributed as dist

        self.begin = time.perf_counter()
        self.resolved, self.cfg = resolved, resolved.config
        self.stage = self.cfg.stage
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.layout = StageDir(resolved.stage_dir)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        # Decided once, before any rank can publish final/: a rank that looked later could see
        # rank 0's fresh export, skip its own part and leave the ranks' collectives out of step.
        self.exported = (self.layout.final / "config.json").is_file()
        self.init = resolved.init_checkpoint
        config = start_config(resolved)
        self.mask0 = None if config.growth_mask is None else dict(config.growth_mask)
        weights = start_weights(resolved, config)
        self.engine = build_engine(config, weights, self.cfg.deepspeed, self.stage, self.init)
        del weights
        if self.rank == 0:  # what DeepSpeed got, for users to read (fp32 accumulation in bf16, …)
            write_json_atomic(self.layout.root / DS_CONFIG_NAME, self.engine.ds_config)
        self.schedule = stage_schedule(self.stage, grown=self.init is not None, parent_lr=resolved.parent_lr)
        self.data = data or StageData(resolved.data, self.stage, self.engine.dp_rank, self.engine.dp_world)
        self.device = device()
        self.batches = Prefetcher(self.data.batches, self.device)  # the next step's, on the device
        self.eval_set = to_device(self.data.eval, self.device)
        self.pending: list[torch.Tensor] = []  # finite flags of the steps since the last check (device)
        self.tokens_per_step = (self.stage.micro_batch_size * self.stage.grad_accum * self.engine.dp_world
                                * self.stage.seq_len)
        self.step, self.seeded_step = 0, None
        self.train_seconds, self.wall_before, self.eval_loss_start = 0.0, 0.0, None
        self._window = [0.0, 0]  # seconds and steps since the last logged step
        self.saved_step = -1  # the step of the newest ds_ckpt/ checkpoint this run wrote
        self.skips = elastic.Skips(self.cfg.max_skips_in_a_row)  # on_nonfinite=skip
        self.engine.skip_nonfinite = self.cfg.on_nonfinite == NonFinite.skip  # validate: ZeRO engine only
        self.resuming = (self.cfg.resume or elastic.restart_count() > 0) and self.layout.has_ds_checkpoint
        self.start(config)

    # ------------------------------------------------------------------ start
    def start(self, config: ModelConfig) -> None:
        """Resume from ds_ckpt/ or seed Adam from the init checkpoint; the start eval; warnings."""
        if self.resuming:
            self.restore()
        elif optim_state.has_optimizer_state(self.init):
            self.seeded_step = self.engine.seed_adam_state(self.init, config)
        self.set_mask(self.step)
        if self.eval_loss_start is None:
            self.eval_loss_start = self.engine.eval_loss(self.eval_set)
        self.reporter = Reporter(self.layout, self.stage.steps, self.step, active=self.rank == 0)
        if not self.resuming:
            self.reporter.eval(0, self.eval_loss_start)
        self.check_start()
    def restore(self) -> None:
        """Weights, Adam state and step from the latest ``ds_ckpt/`` checkpoint."""
        tag = elastic.pick_tag(self.layout.ds_ckpt, warn=self.rank == 0, rank=self.rank, world=self.world,
                               agree=self.first_problem)  # the newest sound one; each rank digests a share
        path, client = self.engine.load_checkpoint(self.layout.ds_ckpt, tag)
        if path is None:
            raise WorkerError(f"{self.layout.ds_ckpt}: could not load the latest DeepSpeed checkpoint")
        self.step = int(client["step"])
        self.eval_loss_start = client["eval_loss_start"]
        self.train_seconds, self.wall_before = float(client["train_seconds"]), float(client["wall_seconds"])
        self.seeded_step = client["seeded_step"]
        self.skips.steps = list(client.get("skipped_steps", []))
        start = client.get("data_tokens_start", self.data.tokens_start)  # data (stages.data)
        if start != self.data.tokens_start:
            raise WorkerError(f"{self.layout.ds_ckpt}: the checkpoint's data stream started at token {start}, "
                              f"this resume at {self.data.tokens_start}; keep the parent's summary.json")

    def first_problem(self, reason: str | None) -> str | None:
        """Collective: the first rank's complaint about a tag (None when no rank has one)."""
        import torch.distributed as dist

        reasons: list[str | None] = [None] * self.world
        dist.all_gather_object(reasons, reason)
        return next((r for r in reasons if r is not None), None)

    def check_start(self) -> None:
        """Warnings about the start, once, on rank 0."""
        if self.rank != 0:
            return
        if self.mask0 is not None and ramp_unfinished(self.stage, float(self.mask0["c"])):
            log.warning("stage.ramp_steps (%d) exceeds stage.steps (%d): the stage ends with the MSG masks "
                        "at c < 1 and exports them unfolded; a next stage with the same model "
                        "(stage.init_from) continues the ramp", self.stage.ramp_steps, self.stage.steps)
        parent_end = self.resolved.parent_eval_loss_end
        if (not self.resuming and parent_end is not None and self.exact_growth()
                and abs(self.eval_loss_start - parent_end) > EXACT_TOLERANCE):
            log.warning("eval_loss_start %.6f differs from the parent's eval_loss_end %.6f by more than %g "
                        "after an exact growth: init/ may come from another parent checkpoint",
                        self.eval_loss_start, parent_end, EXACT_TOLERANCE)

    def exact_growth(self) -> bool:
        if self.init is None:
            return False
        events = CheckpointReader(self.init).history["events"]
        return bool(events) and events[-1]["kind"] == "grow" and bool(events[-1]["exact"])

    # ------------------------------------------------------------------ steps
    @property
    def done(self) -> bool:
        return self.step >= self.stage.steps

    def set_mask(self, step: int) -> float | None:
        """The MSG mask value c for the update after ``step`` steps; folds at c = 1."""
        if self.mask0 is None:
            return None
        c = mask_c(step, self.stage.ramp_steps, float(self.mask0["c"]))
        if c >= 1.0:  # the ramp is over: fold (plain model, cheaper steps)
            if self.engine.config.growth_mask is not None:
                self.engine.set_growth_mask(None)
            return 1.0
        self.engine.set_growth_mask({**self.mask0, "c": c})
        return c

    def train_step(self) -> torch.Tensor:
        """One optimizer step; logs every ``stage.log_every`` steps, evaluates and saves when
        due. The loss and its finite flag reach the host only at those steps (no host sync on
        the others: :meth:`check_losses`). Returns the loss (a device tensor)."""
        c = self.set_mask(self.step)
        lr = self.schedule.lr(self.step)
        self.engine.set_lr(lr)
        batches = self.batches.take(self.step)
        t0 = time.perf_counter()
        loss = self.engine.train_step(batches)
        self.batches.prefetch(self.step + 1)  # built and copied while the device works on this step
        self.pending.append(torch.isfinite(loss))
        self.step += 1
        every = self.stage.eval_every
        evals = bool(every and self.step % every == 0 and not self.done)
        saves = bool((self.stage.save_every and self.step % self.stage.save_every == 0) or self.done)
        logged = self.step % max(1, self.stage.log_every) == 0 or self.done
        skipped = self.check_losses() if logged or evals or saves else set()
        value = None if self.step in skipped or not logged else float(loss)  # the host sync
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self._window[0] += dt
        self._window[1] += 1
        self.reporter.tick()
        if logged:
            seconds, steps = self._window
            self._window = [0.0, 0]
            record = {"step": self.step, "loss": value, "lr": lr, "c": c,
                      "tokens_per_second": self.tokens_per_step * steps / seconds}
            self.reporter.step({**record, "skipped": True} if self.step in skipped else record)
        if evals:
            self.reporter.eval(self.step, self.eval())
        if saves:
            self.save()
        return loss

    def check_losses(self) -> set[int]:
        """The steps since the last check with a non-finite loss on some rank (collective).

        ``on_nonfinite=skip``: their updates were dropped (the engine did it on the device);
        recorded, and too many in a row stop the stage. ``stop``: the first one stops the
        stage naming it (its update was dropped too, so nothing non-finite is saved)."""
        first = self.step - len(self.pending) + 1
        flags, self.pending = elastic.finite_flags(self.pending), []
        bad = {first + i for i, ok in enumerate(flags) if not ok}
        for step in range(first, self.step + 1):
            if self.engine.skip_nonfinite:
                self.skips.record(step, step in bad, self.layout.root, self.rank)
            elif step in bad:
                elastic.stop_nonfinite(step, self.layout.root, self.rank, self.layout.ds_ckpt, self.saved_step)
        return bad

    def eval(self) -> float:
        return self.engine.eval_loss(self.eval_set)

    def save(self) -> None:
        """A DeepSpeed-native checkpoint of this step (collective); keeps the newest two."""
        import torch.distributed as dist

        ds_dir = self.layout.ds_ckpt
        client = {"step": self.step, "eval_loss_start": self.eval_loss_start,
                  "train_seconds": self.train_seconds, "seeded_step": self.seeded_step,
                  "wall_seconds": self.wall_before + time.perf_counter() - self.begin,
                  "data_tokens_start": self.data.tokens_start,  # data (stages.data)
                  "skipped_steps": self.skips.steps}
        tag = elastic.tag_of(self.step)
        self.engine.save_checkpoint(ds_dir, tag, client)
        dist.barrier()  # every rank saved: each digests its share of the files, rank 0 seals
        shares: list[dict[str, Any] | None] = [None] * self.world
        dist.all_gather_object(shares, tag_seal.digests(ds_dir / tag, self.rank, self.world))
        if self.rank == 0:  # keeps the newest cfg.keep_checkpoints
            elastic.seal(ds_dir, tag, self.cfg.keep_checkpoints, {k: v for part in shares for k, v in part.items()})
        dist.barrier()
        self.saved_step = self.step

    # ------------------------------------------------------------------ end
    def finish(self) -> dict[str, Any] | None:
        """Final eval, the canonical export and summary.json; the summary on rank 0, else None."""
        import torch.distributed as dist

        stage, total = self.stage, self.stage.steps
        self.set_mask(total)
        eval_end = self.eval()
        self.reporter.eval(total, eval_end)
        self.reporter.close()
        config = self.engine.config  # carries the mask record the stage ends with (None if folded)
        tokens = total * self.tokens_per_step
        history = CheckpointReader(self.init).history if self.init is not None else new_history()
        history = append_event(history, {"kind": "train", "stage": stage.name, "steps": total,
                                         "tokens": tokens, "eval_loss_end": eval_end})
        if not self.exported:
            meta = {"betas": list(stage.betas), "eps": stage.eps, "weight_decay": stage.weight_decay}
            export_final(self.engine, config, history, self.layout.final, meta, source=self.init)
        ds = self.cfg.deepspeed
        summary = {
            "stage": stage.name, "params": config.params, "steps": total, "tokens": tokens,
            "flops": config.flops_per_token(stage.seq_len) * tokens,
            "wall_seconds": self.wall_before + time.perf_counter() - self.begin,
            "train_seconds": self.train_seconds,
            "tokens_per_second": tokens / self.train_seconds if self.train_seconds else None,
            "eval_loss_start": self.eval_loss_start, "eval_loss_end": eval_end,
            "parent_eval_loss_end": self.resolved.parent_eval_loss_end, "lr_peak": self.schedule.peak,
            "adam_seeded_step": self.seeded_step, "zero_stage": self.engine.zero_stage,
            "pipeline": ds.pipeline, "precision": Precision(ds.precision).value, "world_size": self.world,
            "skipped_steps": len(self.skips.steps), "skipped_at": self.skips.steps,  # on_nonfinite=skip
            "final": str(self.layout.final),
            **self.data.position(total),  # data (stages.data): data_tokens_start/_end, data_epoch, positions
        }
        if self.rank == 0:
            write_json_atomic(self.layout.summary, summary)
        dist.barrier()
        return summary if self.rank == 0 else None

    def after_step(self) -> bool:
        """Called after every step; False stops the stage here (no export). The test seam."""
        return True

    def run(self) -> dict[str, Any] | None:
        while not self.done:
            self.train_step()
            if not self.after_step():
                self.reporter.close()
                return None
        return self.finish()
