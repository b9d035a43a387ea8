"""`train-stage`: the Hydra app that trains one stage, or a schedule of them (``-m``).

Thin: Hydra composes ``conf/train.yaml`` over the typed schema, and
:func:`stages.orchestrate.run_stage` does the rest. Errors a user can fix (unknown
model, missing parent output, a checkpoint that does not grow into the stage, corrupt
files, failed workers) print one line ``train-stage: error: …`` and exit 2.

    train-stage stage=tiny_s1 run_dir=runs/tiny
    train-stage -m schedule=tiny run_dir=runs/tiny
    train-stage schedule=teleflm dry_run=true
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from stages.config import register_configs

register_configs()
# conf/ sits at the repository root (next to stages/, the "../conf" of this file). The path
# is absolute because Hydra resolves a relative config_path against the *package* when the
# app runs as the `train-stage` console script, and conf/ is not a package.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def report(err: BaseException) -> None:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    print(f"train-stage: error: {message}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> Any:
    from stages.orchestrate import USER_ERRORS, run_stage  # torch: after Hydra's own checks

    try:
        return run_stage(cfg)
    except USER_ERRORS as err:
        report(err)
        sys.exit(2)  # SystemExit passes through Hydra's job wrapper: a sweep stops here
    except KeyboardInterrupt:
        print("train-stage: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
