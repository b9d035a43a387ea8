"""A stand-in for ``train-stage -m schedule=tiny``: the same stages, models, growth
strategies and LR/mask schedules, shrunk to a few dozen plain-PyTorch Adam steps per stage
in one process, writing the run layout ``growth.runs`` reads::

    RUN_DIR/<stage>/stage_config.json, summary.json, tb/, init/ (grown start), final/ (+ optimizer/)

``examples/inspect_growth.ipynb`` builds one when no real run exists, so it always has
something to show. It is not the trainer: no DeepSpeed, no μP per-width LR multipliers, one
rank, a byte-level slice of the standard library as the corpus.

    python examples/stand_in_run.py RUN_DIR [STEPS]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from growth.checkpoint import (
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    CheckpointReader,
    append_event,
    new_history,
    save_checkpoint,
)
from growth.config import get_flavor
from growth.model import build_model, init_state_dict
from operators import GrowthSpec, make_plan
from stages.lr import mask_c, stage_schedule

SEQ_LEN, BATCH = 64, 8


def corpus(max_bytes: int = 400_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the embedded corpus (stages.data's standard-library text): train, eval."""
    from stages.data import embedded_files

    _, files = embedded_files(max_bytes)
    data = np.frombuffer(b"\n".join(p.read_bytes() for p in files), dtype=np.uint8).astype(np.int64)
    cut = int(len(data) * 0.9)
    return torch.from_numpy(data[:cut]), torch.from_numpy(data[cut:])


def batch(tokens: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (BATCH,), generator=gen)
    rows = torch.stack([tokens[s:s + SEQ_LEN + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def scaled(stage: dict[str, Any], steps: int) -> dict[str, Any]:
    """The stage's schedule squeezed into ``steps`` updates (warmups and ramp in proportion)."""
    f = steps / int(stage["steps"])
    out = dict(stage, steps=steps)
    for key in ("warmup_steps", "rewarm_steps", "ramp_steps"):
        out[key] = max(1, round(int(stage[key]) * f))
    return out


def save_with_moments(out: Path, config, weights, moments, history, step: int, stage) -> None:
    save_checkpoint(out, config, weights, history=history)
    for kind in MOMENT_KINDS:
        save_checkpoint(out / OPTIMIZER_DIR / kind, config, moments[kind])
    state = {"step": step, "betas": list(stage["betas"]), "eps": stage["eps"],
             "weight_decay": stage["weight_decay"]}
    (out / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).write_text(json.dumps(state) + "\n")


def grow_from(parent: Path, stage: dict[str, Any]):
    """The parent's final grown to this stage's model: weights, Adam moments, history."""
    g = stage["growth"]
    spec = GrowthSpec.from_strategy(g["strategy"], positions=g["positions"], seed=g["seed"])
    src = CheckpointReader(parent)
    plan = make_plan(src.config, get_flavor(stage["model"]), spec, src.get)
    weights = {op.name: plan.grow_tensor(op.name, src.get) for op in plan.tensor_ops()}
    moments = {}
    for kind in MOMENT_KINDS:
        reader = CheckpointReader(parent / OPTIMIZER_DIR / kind, config=src.config)
        moments[kind] = {op.name: plan.grow_tensor(op.name, reader.get, kind) for op in plan.tensor_ops()}
    step = json.loads((parent / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).read_text())["step"]
    return plan.config, weights, moments, append_event(src.history, plan.event()), step


def train_stage(run_dir: Path, stage: dict[str, Any], data, parent_summary: dict | None) -> dict[str, Any]:
    d = run_dir / stage["name"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "stage_config.json").write_text(json.dumps({"stage": stage}, indent=2) + "\n")
    parent = run_dir / stage["parent"] / "final" if stage["parent"] else None
    if parent is None:
        config = get_flavor(stage["model"])
        weights, moments, history, step0 = init_state_dict(config, seed=stage["seed"]), None, new_history(), 0
    else:
        config, weights, moments, history, step0 = grow_from(parent, stage)
        save_with_moments(d / "init", config, weights, moments, history, step0, stage)
    mask0 = dict(config.growth_mask) if config.growth_mask else None
    model = build_model(config.replace(), {k: v.clone() for k, v in weights.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=stage["lr"], betas=tuple(stage["betas"]),
                            eps=stage["eps"], weight_decay=stage["weight_decay"])
    params = dict(model.named_parameters())
    if moments is not None:  # the grown Adam state: old slices keep their moments and step
        for name, p in params.items():
            opt.state[p] = {"step": torch.tensor(float(step0)), "exp_avg": moments["exp_avg"][name].clone(),
                            "exp_avg_sq": moments["exp_avg_sq"][name].clone()}
    schedule = stage_schedule(stage, grown=parent is not None,
                              parent_lr=parent_summary["lr_peak"] if parent_summary else None)
    train, evals = data
    gen = torch.Generator().manual_seed(stage["seed"])
    eval_batches = [batch(evals, torch.Generator().manual_seed(i)) for i in range(2)]

    def eval_loss() -> float:
        with torch.no_grad():
            return sum(float(model.loss(x, y)) for x, y in eval_batches) / len(eval_batches)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(d / "tb"))
    c = None
    for step in range(stage["steps"]):
        if mask0 is not None:
            c = mask_c(step, stage["ramp_steps"], float(mask0["c"]))
            model.set_growth_mask({**mask0, "c": c} if c < 1.0 else None)  # folded at c = 1
        if step == 0:
            start = eval_loss()
            writer.add_scalar("eval/loss", start, 0)
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        x, y = batch(train, gen)
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for tag, value in (("loss", loss.item()), ("lr", schedule.lr(step)), ("c", c)):
            if value is not None:
                writer.add_scalar(f"train/{tag}", value, step + 1)
    if mask0 is not None:
        model.set_growth_mask(None)  # the ramp ended inside the stage: plain model
    end = eval_loss()
    writer.add_scalar("eval/loss", end, stage["steps"])
    writer.close()
    steps = stage["steps"]
    history = append_event(history, {"kind": "train", "stage": stage["name"], "steps": steps,
                                     "eval_loss_end": end})
    final = {n: p.detach() for n, p in params.items()}
    moments = {k: {n: opt.state[p][k] for n, p in params.items()} for k in MOMENT_KINDS}
    save_with_moments(d / "final", model.config, final, moments, history, step0 + steps, stage)
    summary = {"stage": stage["name"], "params": model.config.params, "steps": steps,
               "tokens": steps * BATCH * SEQ_LEN, "eval_loss_start": start, "eval_loss_end": end,
               "parent_eval_loss_end": parent_summary["eval_loss_end"] if parent_summary else None,
               "lr_peak": schedule.peak, "stand_in": True}
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build(run_dir: str | Path, stages: Sequence[dict[str, Any]], steps: int = 40) -> Path:
    """Train ``stages`` (resolved ``stage`` config dicts, parents first) into ``run_dir``."""
    run_dir = Path(run_dir)
    data = corpus()
    summaries: dict[str, dict[str, Any]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend (10× slower on a busy box)
    try:
        for stage in stages:
            s = scaled(stage, steps)
            summaries[s["name"]] = train_stage(run_dir, s, data, summaries.get(s["parent"]))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def tiny_stages(conf_dir: str | Path) -> list[dict[str, Any]]:
    """tiny_s1..3 composed with Hydra's Compose API from ``conf_dir``, as plain dicts."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stages.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        return [OmegaConf.to_container(compose("train", overrides=[f"stage={s}"]).stage, resolve=True)
                for s in ("tiny_s1", "tiny_s2", "tiny_s3")]


if __name__ == "__main__":
    repo = Path(__file__).resolve().parents[1]
    build(sys.argv[1], tiny_stages(repo / "conf"), int(sys.argv[2]) if len(sys.argv) > 2 else 40)
