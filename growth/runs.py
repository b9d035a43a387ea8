"""Read a training run directory: stage summaries, TensorBoard scalars, the schedule's curve.

The layout of one stage directory is owned by :class:`StageDir` (here, so that readers
need no trainer); ``train-stage`` (``stages.rank.worker`` / ``stages.launch.plan``) writes it
through the same object. ``tb/`` holds train/loss, train/lr, train/c,
train/tokens_per_second and eval/loss.

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

SUMMARY_NAME = "summary.json"
STAGE_CONFIG_NAME = "stage_config.json"
TB_DIR = "tb"
TRAIN_LOG_NAME = "train_log.jsonl"
INIT_DIR = "init"
FINAL_DIR = "final"
DS_CKPT_DIR = "ds_ckpt"
LAUNCH_LOG_NAME = "train.log"
LOCK_NAME = ".lock"
DS_LATEST_NAME = "latest"  # DeepSpeed's pointer to the newest tag inside ds_ckpt/


@dataclass(frozen=True)
class StageDir:
    """The one owner of a stage directory's layout (``RUN_DIR/<stage>/``)::

        init/              the grown start (a canonical checkpoint with a grow event)
        final/             the canonical checkpoint at the end of the stage (+ optimizer/)
        ds_ckpt/           DeepSpeed-native checkpoints for resume=true (ds_ckpt/latest names the newest)
        summary.json       written by rank 0 when the stage finished
        stage_config.json  the resolved config the workers train from (stages.resolved.ResolvedStage)
        tb/                TensorBoard scalars
        train_log.jsonl    one JSON line per logged step
        train.log          the workers' terminal output, appended per attempt
        .lock              pid of the orchestrator that holds the stage (flock)
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, run_dir: str | Path, stage: str) -> StageDir:
        return cls(Path(run_dir) / stage)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def init(self) -> Path:
        return self.root / INIT_DIR

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def ds_ckpt(self) -> Path:
        return self.root / DS_CKPT_DIR

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_NAME

    @property
    def resolved(self) -> Path:
        return self.root / STAGE_CONFIG_NAME

    @property
    def tb(self) -> Path:
        return self.root / TB_DIR

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG_NAME

    @property
    def launch_log(self) -> Path:
        return self.root / LAUNCH_LOG_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def has_ds_checkpoint(self) -> bool:
        return (self.ds_ckpt / DS_LATEST_NAME).is_file()

    @property
    def finished(self) -> bool:
        return self.summary.is_file() and (self.final / "config.json").is_file()

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary)

    def read_resolved(self) -> dict[str, Any] | None:
        """The resolved config as plain JSON (stages.resolved.ResolvedStage reads it typed)."""
        return read_json(self.resolved)


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
    def layout(self) -> StageDir:
        return StageDir(self.directory)

    @property
    def init(self) -> Path | None:
        return self.layout.init if self.layout.init.is_dir() else None

    @property
    def final(self) -> Path | None:
        return self.layout.final if self.layout.final.is_dir() else None

    @property
    def grown(self) -> bool:
        """The stage started from a growth of its parent (a parent, or a grow event in init/)."""
        if self.parent is not None:
            return True
        from growth.checkpoint import HISTORY_NAME  # torch: only when a run is read
        from growth.provenance import GROW_EVENT

        history = read_json(self.layout.init / HISTORY_NAME) or {}
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
            tb, log = self.layout.tb, self.layout.train_log
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
    cfg = StageDir(directory).read_resolved() or {}
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
            layout = StageDir(sub)
            markers = (layout.summary, layout.resolved, layout.tb, layout.train_log, layout.final)
            if any(m.exists() for m in markers):
                found[sub.name] = StageRun(sub.name, sub, layout.read_summary(), _parent_of(sub))
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
