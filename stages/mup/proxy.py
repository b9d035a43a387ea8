"""A short stage in-process: the training path of ``train-stage`` without the processes.

What it shares with a ``train-stage`` run: the model (``growth.model.build_model`` with the
seeded μP init), the optimizer (``stages.engines.common.make_optimizer``: one AdamW group per μP LR
multiplier, decay on matrices only), the LR schedule (``stages.lr.stage_schedule``, set through
``stages.engines.common.set_lr`` before every update), global-norm clipping at
``DeepSpeedCfg.gradient_clipping``, the loss (``causal_lm_loss``) and the corpus batches
(``stages.data.TrainStream`` / ``eval_batches``). What it leaves out: torchrun, DeepSpeed's
engine wrapper (one fp32 rank: ZeRO-1 on one rank is plain AdamW), checkpoints and logs.

Note: a sweep of a few hundred tiny runs pays no 10–20 s of process and DeepSpeed start-up
per point; ``conf/schedule/mup_sweep.yaml`` runs the same sweep through ``train-stage``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from growth.config import ModelConfig
from growth.model import TeleFLMForCausalLM, build_model, causal_lm_loss, init_state_dict
from stages.engines.common import make_optimizer, set_lr
from stages.lr import stage_schedule
from stages.schema import DeepSpeedCfg, StageCfg

Batch = tuple[torch.Tensor, torch.Tensor]
EMBEDDED = {"source": "embedded", "max_bytes": 2_000_000}  # ~2M byte tokens: plenty for short runs


def proxy_stage(**changes: Any) -> StageCfg:
    """The stage settings of the μP proxy runs (conf/stage/mup_proxy.yaml has the same)."""
    base = StageCfg(name="mup_proxy", steps=120, micro_batch_size=8, seq_len=64, lr=4e-3,
                    warmup_steps=20, decay="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                    eval_batches=8, save_every=0, seed=1)
    return dataclasses.replace(base, **changes)


def corpus(cache_dir: str | Path) -> dict[str, Any]:
    """The embedded corpus, prepared once under ``cache_dir`` (the stage's data info)."""
    from stages.data import prepare_corpus

    return prepare_corpus(EMBEDDED, cache_dir)


class Batches:
    """The train and eval batches a stage of ``stage``'s shape reads from ``info``."""

    def __init__(self, info: dict[str, Any], stage: StageCfg):
        from stages.data import TrainStream, eval_batches

        self.train = TrainStream(info, stage.seq_len, stage.micro_batch_size)
        self.eval = eval_batches(info, stage.seq_len, stage.micro_batch_size, stage.eval_batches)

    def step(self, step: int) -> list[Batch]:
        return self.train.step_batches(step)


class ProxyRun:
    """One short stage on one CPU rank: ``step()`` is the trainer's update, nothing else."""

    def __init__(self, config: ModelConfig, stage: StageCfg, weights: dict[str, torch.Tensor] | None = None,
                 grown: bool = False, clip: float | None = None):
        self.config, self.stage = config, stage
        state = weights if weights is not None else init_state_dict(config, stage.seed)
        self.model: TeleFLMForCausalLM = build_model(config, state)
        self.optimizer = make_optimizer(list(self.model.named_parameters()), config, stage)
        self.schedule = stage_schedule(stage, grown=grown, parent_lr=None)
        self.clip = DeepSpeedCfg().gradient_clipping if clip is None else clip
        self.done = 0

    def step(self, batches: list[Batch]) -> float:
        self.model.train()
        set_lr(self.optimizer, self.schedule.lr(self.done))
        total = 0.0
        for x, y in batches:
            loss = causal_lm_loss(self.model(x), y) / len(batches)
            loss.backward()
            total += float(loss.detach())
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        return total

    @torch.no_grad()
    def eval_loss(self, batches: list[Batch]) -> float:
        self.model.eval()
        return float(torch.stack([causal_lm_loss(self.model(x), y) for x, y in batches]).double().mean())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def train(run: ProxyRun, data: Batches, steps: int | None = None,
          on_step: Callable[[int, float], None] | None = None) -> float:
    """Run ``steps`` (default: the stage's) updates, then the eval loss; NaN/inf gives inf."""
    for step in range(run.done, steps if steps is not None else run.stage.steps):
        loss = run.step(data.step(step))
        if on_step is not None:
            on_step(step, loss)
        if not torch.isfinite(torch.tensor(loss)):
            return float("inf")
    value = run.eval_loss(data.eval)
    return value if value == value else float("inf")

