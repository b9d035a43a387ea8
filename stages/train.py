"""`train-stage`: the Hydra app that trains one stage, or a schedule of them (``-m``).

Thin: Hydra composes ``conf/train.yaml`` over the typed schema, and
:func:`stages.launch.run.run_stage` does the rest. Errors a user can fix — Hydra's own
(unknown group or option, a typo, a wrong type, an unwritable run_dir) and ours (unknown
model, missing parent output, a checkpoint that does not grow into the stage, corrupt
files, failed workers) — print one line ``train-stage: error: …`` and exit 2.
``HYDRA_FULL_ERROR=1`` shows Hydra's full report instead.

    train-stage stage=tiny_s1 run_dir=runs/tiny
    train-stage -m schedule=tiny run_dir=runs/tiny
    train-stage schedule=teleflm dry_run=true
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from stages.schema import register_configs

register_configs()
# conf/ sits at the repository root (next to stages/, the "../conf" of this file). The path
# is absolute because Hydra resolves a relative config_path against the *package* when the
# app runs as the `train-stage` console script, and conf/ is not a package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


def one_line(err: BaseException) -> str:
    """The first line of ``err``, plus the first line of its cause (Hydra wraps OmegaConf's)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in message:
            message = f"{message}: {first}"
    return message


def report(err: BaseException) -> None:
    print(f"train-stage: error: {one_line(err)}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def app(cfg: DictConfig) -> Any:
    from flmcore.errors import FlmError
    from stages.launch.run import run_stage  # torch: after Hydra's own checks

    try:
        return run_stage(cfg)
    except FlmError as err:
        report(err)
        sys.exit(2)  # SystemExit passes through Hydra's job wrapper: a sweep stops here


def main() -> None:
    """The console script: Hydra's errors become one line and exit 2 (unless HYDRA_FULL_ERROR)."""
    if os.environ.get(FULL_ERROR_ENV):
        app()
        return
    os.environ[FULL_ERROR_ENV] = "1"  # Hydra then raises instead of printing its report and exiting 1
    try:
        app()
    except KeyboardInterrupt:
        print("train-stage: interrupted", file=sys.stderr)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException, OSError) as err:  # composition, output dir
        report(err)
        sys.exit(2)
    finally:
        os.environ.pop(FULL_ERROR_ENV, None)


if __name__ == "__main__":
    main()
