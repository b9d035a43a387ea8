"""One stage, orchestrated: check everything, prepare data and weights, launch the ranks.

``run_stage`` is what the Hydra app calls once per job (one stage of a schedule)::

    check_config             ranges and cross-field rules (stages.config)
    plan_stage               every check that needs files, before anything is written:
                             stage dir state, parent/init checkpoint, growth shapes,
                             tokenizer vs vocab, worker module — a StageError otherwise
    prepare_stage            RUN_DIR/<stage>/, tokenized corpus (cached), the parent's final
                             grown into RUN_DIR/<stage>/init (growth.executor, streaming),
                             RUN_DIR/<stage>/stage_config.json
    launch_workers           torchrun --nproc_per_node N -m stages.worker stage_config.json,
                             output streamed to the terminal and RUN_DIR/<stage>/train.log
    summary.json             written by the workers; returned

Note: Hydra stays in this one process (GROWTH_NOTES §5): the workers get a plain JSON file,
never Hydra arguments, so ``--local_rank`` and per-rank ``${now}`` cannot bite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from flmcore.errors import FlmError
from growth.checkpoint import CheckpointError, CheckpointReader
from growth.config import ConfigError, ModelConfig, resolve_config
from operators import GrowthError, GrowthSpec
from stages.config import RESOLVED_NAME, StageConfigError, check_config, to_plain
from stages.data import DataError, corpus_files, load_tokenizer, prepare_corpus
from stages.launch import LaunchError, launch_workers

SUMMARY_NAME = "summary.json"
FINAL_DIR = "final"
INIT_DIR = "init"
DS_CKPT_DIR = "ds_ckpt"
DATA_DIR = "data"
LATEST_FILE = "latest"  # DeepSpeed's pointer to the newest tag inside ds_ckpt/


class StageError(FlmError):
    """A stage cannot start or did not finish; the one-line message says what to do."""


USER_ERRORS = (StageError, LaunchError, StageConfigError, ConfigError, CheckpointError, GrowthError,
               DataError, OmegaConfBaseException)


# ---------------------------------------------------------------------- planning
@dataclass
class StagePlan:
    """What ``plan_stage`` decided; nothing has been written yet."""

    cfg: dict[str, Any]  # the resolved TrainConfig
    run_dir: Path
    stage_dir: Path
    target: ModelConfig  # the stage's model (flavor or config.json)
    source: Path | None = None  # checkpoint the stage starts from (parent final / init_from)
    grow: bool = False  # source must be grown into stage_dir/init first
    spec: GrowthSpec | None = None
    resume: bool = False  # a DeepSpeed checkpoint exists and resume=true
    finished: bool = False  # summary.json and final/ exist: nothing to do
    parent_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.cfg["stage"]["name"]

    @property
    def init_checkpoint(self) -> Path | None:
        if self.source is None:
            return None
        return self.stage_dir / INIT_DIR if self.grow else self.source


def growth_spec(growth: dict[str, Any]) -> GrowthSpec:
    """``stage.growth`` (GrowthCfg) → operators.GrowthSpec; GrowthError names a bad field."""
    return GrowthSpec.from_strategy(
        growth["strategy"], hidden=growth["hidden"], ffn=growth["ffn"], heads=growth["heads"],
        depth=growth["depth"], positions=growth["positions"], seed=growth["seed"],
        init_std=growth["init_std"], noise=growth["noise"])


def same_shapes(a: ModelConfig, b: ModelConfig) -> bool:
    return a.tensor_shapes() == b.tensor_shapes()


def open_checkpoint(path: Path, what: str) -> CheckpointReader:
    """A valid canonical checkpoint or a StageError naming ``what`` and the path."""
    if not path.is_dir():
        raise StageError(f"{what}: no checkpoint at {path}")
    try:
        return CheckpointReader(path)
    except CheckpointError as err:
        raise StageError(f"{what}: {err}") from None


def has_ds_checkpoint(stage_dir: Path) -> bool:
    return (stage_dir / DS_CKPT_DIR / LATEST_FILE).is_file()


def plan_stage(cfg: dict[str, Any]) -> StagePlan:
    """Every check that reads files, in the order a user would fix them; writes nothing."""
    stage = cfg["stage"]
    run_dir = Path(cfg["run_dir"]).expanduser().resolve()
    stage_dir = run_dir / stage["name"]
    try:
        target = resolve_config(stage["model"])
    except ConfigError as err:
        raise StageError(f"stage.model: {err}") from None
    plan = StagePlan(cfg=cfg, run_dir=run_dir, stage_dir=stage_dir, target=target)
    _check_launch(cfg, target)
    _check_data(cfg, target)
    if (stage_dir / SUMMARY_NAME).is_file() and (stage_dir / FINAL_DIR).is_dir():
        if not cfg["resume"]:
            raise StageError(f"stage {plan.name} already finished in {stage_dir}; use another run_dir, "
                             f"or resume=true to skip finished stages")
        plan.finished = True
        return plan
    if stage_dir.is_dir() and any(stage_dir.iterdir()) and not cfg["resume"]:
        raise StageError(f"{stage_dir} holds an unfinished run of stage {plan.name}; resume=true "
                         f"continues it, or use another run_dir")
    plan.resume = bool(cfg["resume"]) and has_ds_checkpoint(stage_dir)
    if stage["parent"] is not None:
        plan.parent_dir = run_dir / stage["parent"]
        final = plan.parent_dir / FINAL_DIR
        if not final.is_dir():
            raise StageError(f"stage {plan.name}: parent stage '{stage['parent']}' has no final "
                             f"checkpoint at {final}; train stage {stage['parent']} into this "
                             f"run_dir first (or start from a checkpoint with stage.init_from)")
        _plan_source(plan, final, f"parent stage '{stage['parent']}'")
    elif stage["init_from"] is not None:
        _plan_source(plan, Path(stage["init_from"]).expanduser().resolve(), "stage.init_from")
    return plan


def _plan_source(plan: StagePlan, source: Path, what: str) -> None:
    """Open the starting checkpoint and check it grows into the stage's model."""
    from operators import make_plan

    plan.source = source
    plan.spec = growth_spec(plan.cfg["stage"]["growth"])
    with open_checkpoint(source, what) as reader:
        src_config = reader.config
        if same_shapes(src_config, plan.target) and src_config.growth_mask is None:
            return  # already the stage's shapes: start from it as it is
        # shapes only; 'distance' positions also read the layers they compare
        get = reader.get if plan.spec.positions == "distance" else None
        try:
            make_plan(src_config, plan.target, plan.spec, get_tensor=get)
        except GrowthError as err:
            raise StageError(f"stage {plan.name}: {what} ({src_config.params:,} parameters) does not "
                             f"grow into stage.model {plan.cfg['stage']['model']!r}: {err}") from None
    plan.grow = True


def _check_launch(cfg: dict[str, Any], target: ModelConfig) -> None:
    stage, ds = cfg["stage"], cfg["deepspeed"]
    if stage["seq_len"] > target.max_position_embeddings:
        raise StageError(f"stage.seq_len {stage['seq_len']} exceeds the model's max_position_embeddings "
                         f"({target.max_position_embeddings})")
    if ds["pipeline"] and ds["pipeline_stages"] > target.num_hidden_layers:
        raise StageError(f"deepspeed.pipeline_stages {ds['pipeline_stages']} exceeds the model's "
                         f"{target.num_hidden_layers} decoder layers")
    if cfg["dry_run"]:
        return
    if cfg["nnodes"] != 1:
        raise StageError(f"nnodes={cfg['nnodes']}: train-stage launches one node; on a cluster run "
                         f"`torchrun ... -m {cfg['worker_module']} RUN_DIR/<stage>/{RESOLVED_NAME}` on "
                         f"every node (dry_run=true sizes the multi-node job)")
    try:
        found = importlib.util.find_spec(cfg["worker_module"]) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise StageError(f"worker_module: cannot find module {cfg['worker_module']!r}")


def _check_data(cfg: dict[str, Any], target: ModelConfig) -> None:
    corpus_files(cfg["data"])  # the source exists and holds text (listing only)
    vocab = load_tokenizer(cfg["data"]).vocab_size
    usable = target.valid_vocab_size or target.vocab_size
    if vocab > usable:
        raise StageError(f"data.tokenizer has {vocab} tokens but stage.model {cfg['stage']['model']!r} "
                         f"has only {usable} usable vocabulary rows")


# ---------------------------------------------------------------------- preparation
def prepare_stage(plan: StagePlan) -> Path:
    """Create the stage dir, data and starting checkpoint; write stage_config.json."""
    cfg = plan.cfg
    plan.stage_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg["data"]["cache_dir"] or plan.run_dir / DATA_DIR).expanduser().resolve()
    data = prepare_corpus(cfg["data"], data_dir, seed=cfg["data"]["seed"])
    for split in ("train", "eval"):
        if data["n_tokens"][split] < cfg["stage"]["seq_len"] + 1:
            raise StageError(f"data: the {split} split has {data['n_tokens'][split]} tokens, fewer than "
                             f"stage.seq_len + 1; add text or lower data.eval_fraction / stage.seq_len")
    if plan.grow:
        grow_into(plan)
    init = plan.init_checkpoint
    if init is not None:
        with open_checkpoint(init, "starting checkpoint") as reader:
            model_config = reader.config
    else:
        model_config = plan.target
    mask = model_config.growth_mask
    if mask is not None and cfg["stage"]["steps"] < cfg["stage"]["ramp_steps"] * (1.0 - float(mask["c"])):
        print(f"[{plan.name}] warning: stage.steps {cfg['stage']['steps']} ends the MSG ramp before c "
              f"reaches 1 (stage.ramp_steps {cfg['stage']['ramp_steps']}); final/ keeps its masks and "
              f"cannot be grown again until a stage finishes the ramp", flush=True)
    resolved = dict(cfg)
    resolved.update({
        "run_dir": str(plan.run_dir),
        "resume": plan.resume,
        "stage_dir": str(plan.stage_dir),
        "init_checkpoint": None if init is None else str(init),
        "model_config": model_config.to_hf_dict(),
        "parent_eval_loss_end": parent_eval_loss(plan),
        "parent_lr": parent_peak_lr(plan),
        "data": data,
    })
    path = plan.stage_dir / RESOLVED_NAME
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(resolved, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def grow_into(plan: StagePlan) -> Path:
    """Grow ``plan.source`` into STAGE_DIR/init with the streaming executor (resumable).

    A complete init/ from an earlier attempt is reused; a partial one (killed mid-grow)
    is finished by the executor's own resume. Adam moments come along when the source
    has them and ``stage.growth.optimizer_state`` is true.
    """
    from growth.executor import ApplyRequest
    from growth.parallel import apply_growth

    out = plan.stage_dir / INIT_DIR
    if out.is_dir() and any(out.iterdir()):
        open_checkpoint(out, f"{out} (grown by an earlier attempt)").close()
        return out
    growth = plan.cfg["stage"]["growth"]
    assert plan.source is not None and plan.spec is not None
    print(f"[{plan.name}] growing {plan.source} → {out} "
          f"({plan.spec.hidden}/{plan.spec.ffn}/{plan.spec.heads}/{plan.spec.depth})", flush=True)
    request = ApplyRequest(src=str(plan.source), target=target_spec(plan), spec=plan.spec.to_dict(),
                           out=str(out), optimizer_state=bool(growth["optimizer_state"]))
    apply_growth(request, progress=True)
    return out


def target_spec(plan: StagePlan) -> str:
    """stage.model as the executor takes it: a flavor name or an absolute path."""
    model = plan.cfg["stage"]["model"]
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def parent_eval_loss(plan: StagePlan) -> float | None:
    if plan.parent_dir is None:
        return None
    summary = read_json(plan.parent_dir / SUMMARY_NAME) or {}
    value = summary.get("eval_loss_end")
    return None if value is None else float(value)


def parent_peak_lr(plan: StagePlan) -> float | None:
    """The peak LR the parent actually trained at (its own re-warmed peak if it was grown):
    the worker's ``lr_peak`` in the parent's summary, else recomputed from its config."""
    if plan.parent_dir is None:
        return None
    peak = (read_json(plan.parent_dir / SUMMARY_NAME) or {}).get("lr_peak")
    if peak is not None:
        return float(peak)
    resolved = read_json(plan.parent_dir / RESOLVED_NAME)
    if resolved is None:
        return None
    stage = resolved["stage"]
    if stage["lr_after_growth"] == "rewarm" and resolved.get("init_checkpoint") is not None \
            and resolved.get("parent_lr") is not None:
        return float(resolved["parent_lr"]) * float(stage["rewarm_peak_ratio"])
    return float(stage["lr"])


# ---------------------------------------------------------------------- the job
def run_stage(cfg: Any) -> dict[str, Any]:
    """Check, prepare, train one stage; returns its summary (or dry-run report)."""
    plain = to_plain(cfg)
    check_config(plain)
    if plain["dry_run"]:
        from stages.dry_run import dry_run_stage

        return dry_run_stage(plain)
    plan = plan_stage(plain)
    if plan.finished:
        print(f"[{plan.name}] already finished in {plan.stage_dir}; skipped (resume=true)", flush=True)
        return read_json(plan.stage_dir / SUMMARY_NAME) or {}
    start = time.time()
    resolved_path = prepare_stage(plan)
    how = "resuming from its DeepSpeed checkpoint" if plan.resume else (
        f"from {plan.init_checkpoint}" if plan.init_checkpoint else f"fresh init (seed {plain['stage']['seed']})")
    print(f"[{plan.name}] {plain['nproc']} ranks, {plain['deepspeed']['name']}, {how}", flush=True)
    launch_workers(plain, resolved_path)
    summary = read_json(plan.stage_dir / SUMMARY_NAME)
    if summary is None:
        raise StageError(f"stage {plan.name}: the workers exited cleanly but wrote no "
                         f"{plan.stage_dir / SUMMARY_NAME}")
    print(f"[{plan.name}] done in {time.time() - start:.0f} s: eval loss "
          f"{summary.get('eval_loss_start')} → {summary.get('eval_loss_end')}", flush=True)
    return summary
