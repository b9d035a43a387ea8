"""Values that end up in scripts and command lines we write: checked, then quoted.

``launcher=slurm`` writes ``stage.name`` and ``run_dir`` into ``#SBATCH`` lines, which
``sbatch`` reads line by line before the shell ever quotes anything: a newline there
would start a line of its own (``stage.name='x⏎touch /tmp/INJECTED'`` runs ``touch``).
So every name and path a stage config gives is refused when it holds a control
character (:func:`check_config_text`, part of ``stages.validate.validate``), and every value
the script writes is quoted (:func:`sbatch_value`; ``srun`` lines are ``shlex.join``-ed).
"""

from __future__ import annotations

import shlex
from typing import Any

from flmcore.safe_files import refuse_control_chars
from stages.schema import StageConfigError, TrainConfig


def text_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The config's names and paths, by field name."""
    stage, data = cfg.stage, cfg.data
    fields: dict[str, Any] = {"stage.name": stage.name, "stage.parent": stage.parent,
                              "stage.init_from": stage.init_from, "run_dir": cfg.run_dir,
                              "schedule.name": cfg.schedule.name, "master_addr": cfg.master_addr,
                              "local_addr": cfg.local_addr, "data.source": data.source,
                              "data.cache_dir": data.cache_dir, "data.tokenizer": data.tokenizer}
    for group, values in (("schedule.stages", cfg.schedule.stages), ("data.paths", data.paths),
                          ("data.eval_paths", data.eval_paths)):
        fields.update({f"{group}[{i}]": v for i, v in enumerate(values)})
    return fields


def check_config_text(cfg: TrainConfig) -> None:
    """StageConfigError for the first name or path holding a control character."""
    for name, value in text_fields(cfg).items():
        problem = refuse_control_chars(f"field '{name}'", str(value)) if value is not None else None
        if problem:
            raise StageConfigError(problem)


def sbatch_value(value: object) -> str:
    """One ``#SBATCH --opt=VALUE`` value, quoted (sbatch strips the quotes); a control
    character is refused (it would end the line)."""
    text = str(value)
    problem = refuse_control_chars("an #SBATCH value", text)
    if problem:
        raise ValueError(problem)
    return shlex.quote(text)
