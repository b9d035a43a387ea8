"""``stage_config.json``: the checked TrainConfig plus what the orchestrator resolved for the ranks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flmcore.io import write_json_atomic
from stages.schema import RESOLVED_FORMAT_VERSION, StageConfigError, TrainConfig, from_dict, to_plain
from stages.validate import validate


@dataclass
class ResolvedStage:
    """``stage_config.json``: the checked TrainConfig plus what the orchestrator resolved.

    On disk the TrainConfig's fields sit at the top level (``stage``, ``deepspeed``, …;
    its ``data`` section as ``data_config``) next to the resolved ones below and
    ``format_version``; ``data`` is what the corpus preparation returned.
    """

    config: TrainConfig
    stage_dir: str  # absolute RUN_DIR/<stage.name>
    init_checkpoint: str | None = None  # canonical checkpoint to start from; None = fresh init with stage.seed
    model_config: dict[str, Any] = field(default_factory=dict)  # HF dict of the stage's model
    parent_eval_loss_end: float | None = None  # the parent's summary, for the exactness check
    parent_lr: float | None = None  # the parent's peak LR (lr_after_growth: rewarm)
    parent_fingerprint: str | None = None  # content fingerprint of the checkpoint init/ was grown from
    data: dict[str, Any] = field(default_factory=dict)  # what stages.data.prepare_stage_data returned
    resume_changes: list[str] = field(default_factory=list)  # "field: old → new" accepted by resume=true

    # what follows from the machine or the attempt: a resume does not compare it (stages.launch.resume)
    NOT_COMPARED = ("resume_changes", "stage_dir", "data.dir", "data.paths", "data.docs", "parent_eval_loss_end",
                    "parent_lr", "parent_fingerprint")
    RESOLVED_KEYS = ("stage_dir", "init_checkpoint", "model_config", "parent_eval_loss_end", "parent_lr",
                     "parent_fingerprint", "data", "resume_changes")

    def to_dict(self) -> dict[str, Any]:
        out = to_plain(self.config)
        out["data_config"] = out.pop("data")
        out.update({k: getattr(self, k) for k in self.RESOLVED_KEYS})
        out["format_version"] = RESOLVED_FORMAT_VERSION
        return out

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage_config.json") -> ResolvedStage:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != RESOLVED_FORMAT_VERSION:
            raise StageConfigError(f"{source}: format_version {version!r}, this trainer reads "
                                   f"{RESOLVED_FORMAT_VERSION}; rerun train-stage to rewrite it")
        extra = {k: data.pop(k) for k in cls.RESOLVED_KEYS if k in data}
        if "stage_dir" not in extra:
            raise StageConfigError(f"{source}: no 'stage_dir'")
        if "data_config" in data:
            data["data"] = data.pop("data_config")
        return cls(config=validate(from_dict(data)), **extra)

    @classmethod
    def load(cls, path: str | Path) -> ResolvedStage:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageConfigError(f"{path}: cannot read the stage config ({err})") from None
        return cls.from_dict(data, str(path))
