"""One rank of a training stage: ``torchrun … -m stages.rank.worker STAGE_DIR/stage_config.json``.

The orchestrator (``stages.train``) writes the resolved config and starts N of these; each
reads it (:class:`stages.resolved.ResolvedStage`, typed and checked again) and runs
:class:`stages.rank.trainer.Trainer`. Outputs (``growth.runs.StageDir`` names)::

    summary.json       stage, params, steps, tokens, flops, wall_seconds, tokens_per_second,
                       eval_loss_start, eval_loss_end, parent_eval_loss_end (+ a few more)
    train_log.jsonl    one line per logged step: step, loss, lr, c, tokens_per_second (rank 0)
    tb/                TensorBoard scalars (rank 0); a tqdm bar on rank 0's stderr
    ds_ckpt/           DeepSpeed-native checkpoints (every stage.save_every steps and at the end)
    final/             the canonical checkpoint + optimizer/ (stages.rank.export)

A user error (an FlmError: bad checkpoint, config, data) prints one line on rank 0
(``train-stage worker: error: …``) and exits 2 on every rank. Tests run their own
``Trainer`` subclass through :func:`main` (``trainer_cls``), as their own worker module.
"""

from __future__ import annotations

import logging
import sys

from flmcore.errors import FlmError
from flmcore.process import report_error
from growth.runs import FINAL_DIR, SUMMARY_NAME, TB_DIR, TRAIN_LOG_NAME  # noqa: F401  (re-exported names)
from stages.rank.trainer import Trainer, WorkerError, start_config  # noqa: F401  (the worker's API)

USAGE = "usage: torchrun --nproc_per_node N -m stages.rank.worker STAGE_DIR/stage_config.json"


def main(argv: list[str] | None = None, trainer_cls: type[Trainer] = Trainer) -> int:
    """Run one rank; 0 on success, 2 on a user error (one line on rank 0)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    import torch.distributed as dist

    from stages.engines.common import init_distributed
    from stages.rank import elastic
    from stages.resolved import ResolvedStage

    try:
        resolved = ResolvedStage.load(args[0])
        elastic.before_start(resolved.stage_dir)  # a restarted group after a non-finite loss stops again
        init_distributed(timeout=resolved.config.collective_timeout)
        trainer_cls(resolved).run()
    except FlmError as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            report_error(err)  # the one line launch_workers reads back (flmcore.process)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
