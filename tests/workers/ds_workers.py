"""Worker modules for tests that stop or kill a stage mid-way: ``Trainer`` subclasses.

    torchrun ... -m tests.workers.ds_workers --stop-after K  STAGE_DIR/stage_config.json
    torchrun ... -m tests.workers.ds_workers --pause-after K STAGE_DIR/stage_config.json

``--stop-after K``: after step K save a DeepSpeed checkpoint and exit 0 (no export, no
summary), as a job stopped by its scheduler would leave the stage. ``--pause-after K``:
after step K write STAGE_DIR/.paused-<rank> (holding the rank's pid) and wait to be killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from stages.rank import worker
from stages.rank.trainer import Trainer

PAUSED_MARK = ".paused-{}"


def make_trainer(stop_after: int | None, pause_after: int | None) -> type[Trainer]:
    class TestTrainer(Trainer):
        def after_step(self) -> bool:
            if self.step == stop_after:
                if self.saved_step != self.step:
                    self.save()
                return False
            if self.step == pause_after:
                (self.layout.root / PAUSED_MARK.format(self.rank)).write_text(str(os.getpid()))
                while True:
                    time.sleep(1)
            return True

    return TestTrainer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stop-after", type=int)
    p.add_argument("--pause-after", type=int)
    p.add_argument("config")
    args = p.parse_args()
    return worker.main([args.config], trainer_cls=make_trainer(args.stop_after, args.pause_after))


if __name__ == "__main__":
    sys.exit(main())
