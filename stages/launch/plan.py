"""Plan a stage: every check that reads files, before anything is written (:func:`plan_stage`).

The :class:`StagePlan` says where the stage starts from (parent's final, ``init_from``, a
fresh init, or its own ``ds_ckpt/`` on resume), whether the start must be grown first and
what the growth request is (``grow_request``: the local workers and the distributed growth
of several nodes use the same one).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError
from growth.checkpoint import CheckpointError, CheckpointReader
from growth.config import ConfigError, ModelConfig, resolve_config
from growth.executor import ApplyRequest
from growth.runs import FINAL_DIR, INIT_DIR, SUMMARY_NAME, StageDir, read_json  # noqa: F401  (re-exported)
from operators import GrowthError, GrowthSpec, make_plan
from stages.data import check_data
from stages.launch.lock import StageLock
from stages.layout import check_stage_layout
from stages.lr import rewarm_peak
from stages.resolved import ResolvedStage
from stages.schema import TrainConfig, growth_spec

log = logging.getLogger(__name__)


class StageError(FlmError):
    """A stage cannot start or did not finish; the one-line message says what to do."""




# ---------------------------------------------------------------------- planning
@dataclass
class StagePlan:
    """What ``plan_stage`` decided; nothing has been written yet."""

    cfg: TrainConfig
    layout: StageDir
    target: ModelConfig  # the stage's model (flavor or config.json)
    source: Path | None = None  # checkpoint the stage starts from (parent final / init_from)
    grow: bool = False  # source must be grown into STAGE_DIR/init first
    spec: GrowthSpec | None = None
    resume: bool = False  # a DeepSpeed checkpoint exists and resume=true
    finished: bool = False  # summary.json and final/ exist: nothing to do
    parent: StageDir | None = None
    # positions=distance, measured once by the shape check (it reads every layer matrix):
    new_layers: list[int] | None = None  # the indices of the new layers it picked
    distances: list[float] | None = None  # d(j) between source layers j and j+1

    @property
    def name(self) -> str:
        return self.cfg.stage.name

    @property
    def run_dir(self) -> Path:
        return self.layout.root.parent

    @property
    def stage_dir(self) -> Path:
        return self.layout.root

    @property
    def init_checkpoint(self) -> Path | None:
        if self.source is None:
            return None
        return self.layout.init if self.grow else self.source


def checked_reader(path: Path, what: str) -> CheckpointReader:
    """A valid canonical checkpoint or a StageError naming ``what`` and the path."""
    if not path.is_dir():
        raise StageError(f"{what}: no checkpoint at {path}")
    try:
        return CheckpointReader(path)
    except CheckpointError as err:
        raise StageError(f"{what}: {err}") from None


def plan_stage(cfg: TrainConfig) -> StagePlan:
    """Every check that reads files, in the order a user would fix them; writes nothing."""
    stage = cfg.stage
    layout = StageDir.of(Path(cfg.run_dir).expanduser().resolve(), stage.name)
    holder = StageLock(layout.lock).holder()
    if holder is not None:
        raise StageError(f"{layout.root}: in use by process {holder} (lock {layout.lock}); wait for it "
                         f"to finish or stop it, then rerun")
    try:
        target = resolve_config(stage.model)
    except ConfigError as err:
        raise StageError(f"stage.model: {err}") from None
    plan = StagePlan(cfg=cfg, layout=layout, target=target)
    _check_launch(cfg, target)
    _check_data(cfg, target)
    if layout.finished:
        if not cfg.resume:
            raise StageError(f"stage {plan.name} already finished in {layout.root}; use another run_dir, "
                             f"or resume=true to skip finished stages")
        plan.finished = True
        return plan
    if layout.has_ds_checkpoint and not cfg.resume:
        raise StageError(f"{layout.root} holds an unfinished run of stage {plan.name} (a checkpoint in "
                         f"{layout.ds_ckpt}); resume=true continues it, or use another run_dir")
    plan.resume = cfg.resume and layout.has_ds_checkpoint
    if stage.parent is not None:
        plan.parent = StageDir.of(layout.root.parent, stage.parent)
        if not plan.parent.final.is_dir():
            raise StageError(f"stage {plan.name}: parent stage '{stage.parent}' has no final "
                             f"checkpoint at {plan.parent.final}; train stage {stage.parent} into this "
                             f"run_dir first (or start from a checkpoint with stage.init_from)")
        _plan_source(plan, plan.parent.final, f"parent stage '{stage.parent}'")
    elif stage.init_from is not None:
        _plan_source(plan, Path(stage.init_from).expanduser().resolve(), "stage.init_from")
    return plan


def _plan_source(plan: StagePlan, source: Path, what: str) -> None:
    """Open the starting checkpoint and check it grows into the stage's model.

    A checkpoint of the stage's own shapes is used as it is, masks included: a masked
    stage that ended at c < 1 continues its ramp in the next stage.
    """

    plan.source = source
    plan.spec = growth_spec(plan.cfg.stage.growth)
    with checked_reader(source, what) as reader:
        src_config = reader.config
        if src_config.tensor_shapes() == plan.target.tensor_shapes():
            return  # already the stage's shapes: start from it as it is
        if src_config.growth_mask is not None:
            raise StageError(f"stage {plan.name}: {what} still has MSG masks at c = {src_config.growth_mask['c']}"
                             f"; finish its ramp first (a stage with the same model and stage.init_from={source})")
        # shapes only; 'distance' positions also read the layers they compare
        get = reader.get if plan.spec.positions == "distance" else None
        try:
            grown = make_plan(src_config, plan.target, plan.spec, get_tensor=get)
        except GrowthError as err:
            raise StageError(f"stage {plan.name}: {what} ({src_config.params:,} parameters) does not "
                             f"grow into stage.model {plan.cfg.stage.model!r}: {err}") from None
    if get is not None:  # kept, so no process reads the layers for it again (stages.launch.dist_grow)
        plan.new_layers = [i for i, entry in enumerate(grown.layer_map) if entry["new"]]
        plan.distances = grown.distances
    plan.grow = True


def _check_launch(cfg: TrainConfig, target: ModelConfig) -> None:
    stage, ds = cfg.stage, cfg.deepspeed
    if stage.seq_len > target.max_position_embeddings:
        raise StageError(f"stage.seq_len {stage.seq_len} exceeds the model's max_position_embeddings "
                         f"({target.max_position_embeddings})")
    if ds.pipeline and ds.pipeline_stages > target.num_hidden_layers:
        raise StageError(f"deepspeed.pipeline_stages {ds.pipeline_stages} exceeds the model's "
                         f"{target.num_hidden_layers} decoder layers")
    check_stage_layout(cfg, target)  # TP splits the model
    if cfg.dry_run:
        return
    try:
        found = importlib.util.find_spec(cfg.worker_module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise StageError(f"worker_module: cannot find module {cfg.worker_module!r}")


def _check_data(cfg: TrainConfig, target: ModelConfig) -> None:
    # data (stages.data): inputs, tokenizer vs vocabulary, .idx/.bin, paths/weights

    check_data(cfg.data, target.valid_vocab_size or target.vocab_size, f"stage.model {cfg.stage.model!r}")


# ---------------------------------------------------------------------- preparation


def init_is_current(plan: StagePlan) -> tuple[str, bool]:
    """(the source's fingerprint, whether STAGE_DIR/init is complete and grown from it); an
    init/ grown from another version of the source is removed, with a warning."""
    import shutil

    out = plan.layout.init
    assert plan.source is not None and plan.spec is not None
    with checked_reader(plan.source, "starting checkpoint") as reader:
        fingerprint = reader.fingerprint()
    if (out / "config.json").is_file():
        with checked_reader(out, f"{out} (grown by an earlier attempt)") as grown:
            grown_from = grown.history["events"][-1]["parent"]["fingerprint"]
        if grown_from == fingerprint:
            return fingerprint, True
        log.warning("[%s] %s was grown from another version of %s; growing it again", plan.name, out, plan.source)
        shutil.rmtree(out)
    return fingerprint, False


def grow_request(plan: StagePlan) -> ApplyRequest:
    """The executor's job for this stage's growth (local workers or every rank of every node);
    positions=distance as the indices plan_stage measured (no growth process reads a layer for it)."""

    return ApplyRequest(src=str(plan.source), target=target_spec(plan), spec=resolve_positions(plan),
                        out=str(plan.layout.init), optimizer_state=plan.cfg.stage.growth.optimizer_state)


def target_spec(plan: StagePlan) -> str:
    """stage.model as the executor takes it: a flavor name or an absolute path."""
    path = Path(plan.cfg.stage.model).expanduser()
    return str(path.resolve()) if path.exists() else plan.cfg.stage.model


def parent_peak_lr(plan: StagePlan) -> float | None:
    """The peak LR the parent actually trained at (its own re-warmed peak if it was grown):
    the worker's ``lr_peak`` in the parent's summary, else recomputed from its config."""
    if plan.parent is None:
        return None
    summary = plan.parent.read_summary()
    if summary is not None:
        return float(summary["lr_peak"])
    if not plan.parent.resolved.is_file():
        return None

    parent = ResolvedStage.load(plan.parent.resolved)
    return rewarm_peak(parent.config.stage, parent.init_checkpoint is not None, parent.parent_lr)


# ---------------------------------------------------------------------- the job


def resolve_positions(plan: StagePlan) -> dict[str, Any]:
    """The growth spec as a dict, ``distance`` positions replaced by the indices they pick.

    ``plan_stage`` measured them while checking the shapes (``plan.new_layers``), so no growth
    process reads a layer for the positions. Note: the grown checkpoint's history then records
    the explicit indices (the distances are logged here), not ``distance``; the tensors are the same.
    """
    spec = plan.spec
    assert spec is not None and plan.source is not None
    out = spec.to_dict()
    if spec.positions != "distance":
        return out
    assert plan.new_layers is not None, "plan_stage measures distance positions"
    out["positions"] = list(plan.new_layers)
    log.info("[%s] positions=distance resolved once: layer distances %s, new layers at %s", plan.name,
             [round(d, 6) for d in plan.distances or []], out["positions"])
    return out
