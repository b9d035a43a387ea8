"""Read a training run directory: stage summaries, TensorBoard scalars, the schedule's curve.

The layout is what ``train-stage`` writes (``stages.worker`` / ``stages.orchestrate``)::

    RUN_DIR/<stage>/summary.json        params, steps, tokens, eval_loss_start/end, …
    RUN_DIR/<stage>/stage_config.json   the resolved stage config (stage.parent names the parent)
    RUN_DIR/<stage>/tb/                 TensorBoard scalars: train/loss, train/lr, train/c, eval/loss
    RUN_DIR/<stage>/train_log.jsonl     the same train scalars, one JSON line per step
    RUN_DIR/<stage>/init/               the grown start (a checkpoint with a grow event)
    RUN_DIR/<stage>/final/              the canonical checkpoint at the end of the stage

Usage::

    run = open_run("runs/tiny")
    run.stages                        # StageRun objects, parents before children
    run.summaries()                   # {stage: summary.json}
    run.stage("tiny_s3").scalars(C)   # [(step, c), …]
    run.curve(LOSS)                   # one x axis across the schedule, growth points marked

Only reading: nothing here imports the trainer, so a laptop without DeepSpeed can look
at a cluster's run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growth.checkpoint import HISTORY_NAME
from growth.provenance import GROW_EVENT

SUMMARY_NAME = "summary.json"
STAGE_CONFIG_NAME = "stage_config.json"
TB_DIR = "tb"
TRAIN_LOG_NAME = "train_log.jsonl"
INIT_DIR = "init"
FINAL_DIR = "final"
LOSS, LR, C, TOKENS_PER_SECOND, EVAL_LOSS = ("train/loss", "train/lr", "train/c",
                                             "train/tokens_per_second", "eval/loss")


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_tensorboard(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log directory → [(step, value)] by step.

    Note: a resumed stage writes a second event file with ``purge_step``; the accumulator
    drops the purged steps, so each step appears once.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    return {tag: sorted((int(e.step), float(e.value)) for e in acc.Scalars(tag))
            for tag in acc.Tags().get("scalars", [])}


def read_train_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``train_log.jsonl`` → the same shape as :func:`read_tensorboard` (train/* tags)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(f"train/{key}", []).append((int(record["step"]), float(value)))
    return out


@dataclass
class StageRun:
    """One stage's directory inside a run."""

    name: str
    directory: Path
    summary: dict[str, Any] | None = None
    parent: str | None = None
    _scalars: dict[str, list[tuple[int, float]]] | None = field(default=None, repr=False)

    @property
    def init(self) -> Path | None:
        return self.directory / INIT_DIR if (self.directory / INIT_DIR).is_dir() else None

    @property
    def final(self) -> Path | None:
        return self.directory / FINAL_DIR if (self.directory / FINAL_DIR).is_dir() else None

    @property
    def grown(self) -> bool:
        """The stage started from a growth of its parent (a parent, or a grow event in init/)."""
        if self.parent is not None:
            return True
        history = read_json(self.directory / INIT_DIR / HISTORY_NAME) or {}
        return any(e.get("kind") == GROW_EVENT for e in history.get("events", []))

    @property
    def steps(self) -> int:
        """Optimizer steps of the stage (summary, else the last logged step)."""
        if self.summary and self.summary.get("steps") is not None:
            return int(self.summary["steps"])
        return max((s for points in self.all_scalars().values() for s, _ in points), default=0)

    def all_scalars(self) -> dict[str, list[tuple[int, float]]]:
        """TensorBoard scalars (tb/), else the train log; empty if neither exists."""
        if self._scalars is None:
            tb, log = self.directory / TB_DIR, self.directory / TRAIN_LOG_NAME
            if tb.is_dir() and any(tb.iterdir()):
                self._scalars = read_tensorboard(tb)
            elif log.is_file():
                self._scalars = read_train_log(log)
            else:
                self._scalars = {}
        return self._scalars

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return self.all_scalars().get(tag, [])


def _parent_of(directory: Path) -> str | None:
    cfg = read_json(directory / STAGE_CONFIG_NAME) or {}
    return (cfg.get("stage") or {}).get("parent")


def _schedule_order(stages: dict[str, StageRun]) -> list[StageRun]:
    """Parents before children; among equals, by name (tiny_s1 < tiny_s2 < …)."""
    ordered: list[StageRun] = []
    placed: set[str] = set()

    def place(run: StageRun, seen: tuple[str, ...] = ()) -> None:
        if run.name in placed or run.name in seen:
            return
        if run.parent in stages:
            place(stages[run.parent], (*seen, run.name))
        ordered.append(run)
        placed.add(run.name)

    for name in sorted(stages):
        place(stages[name])
    return ordered


@dataclass
class Curve:
    """One scalar across a schedule: steps shifted so the stages follow one another."""

    tag: str
    steps: list[int]  # global step (stage offset + stage step)
    values: list[float]
    stage_of: list[str]  # stage of each point
    offsets: dict[str, int]  # global step at which each stage starts
    growth_points: list[tuple[int, str]]  # (global step, grown stage) where a stage starts from a growth


class RunDir:
    """A run directory with one subdirectory per stage."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such run directory")
        found = {}
        for sub in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            markers = (SUMMARY_NAME, STAGE_CONFIG_NAME, TB_DIR, TRAIN_LOG_NAME, FINAL_DIR)
            if any((sub / m).exists() for m in markers):
                found[sub.name] = StageRun(sub.name, sub, read_json(sub / SUMMARY_NAME), _parent_of(sub))
        self.stages = _schedule_order(found)

    def stage(self, name: str) -> StageRun:
        for run in self.stages:
            if run.name == name:
                return run
        raise KeyError(f"{self.directory}: no stage '{name}' (found {[s.name for s in self.stages]})")

    def summaries(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.summary for s in self.stages if s.summary is not None}

    def curve(self, tag: str = LOSS) -> Curve:
        """``tag`` over the whole schedule; a stage starts where its predecessor ended."""
        steps, values, stage_of, offsets, growth = [], [], [], {}, []
        offset = 0
        for run in self.stages:
            offsets[run.name] = offset
            if run.grown:
                growth.append((offset, run.name))
            for step, value in run.scalars(tag):
                steps.append(offset + step)
                values.append(value)
                stage_of.append(run.name)
            offset += run.steps
        return Curve(tag, steps, values, stage_of, offsets, growth)


def open_run(directory: str | Path) -> RunDir:
    return RunDir(directory)
