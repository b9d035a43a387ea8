"""A worker module that injects faults for the elastic tests: a ``Trainer`` subclass.

    torchrun … -m tests.elastic_workers STAGE_DIR/stage_config.json

Reads STAGE_DIR/.test_faults.json (written by the test; absent = no faults):
``{"kill_at": K, "kill_rank": R}`` — on the first attempt (TORCHELASTIC_RESTART_COUNT 0)
rank R SIGKILLs itself after step K; ``{"nan_at": K}`` — after step K every rank fills its
first parameter with NaN, so step K + 1's loss is NaN. Each injected fault is recorded in
STAGE_DIR/.faults-done (one line per event) so the test sees it happened.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from stages import elastic, worker
from stages.trainer import Trainer

FAULTS_NAME = ".test_faults.json"
DONE_NAME = ".faults-done"


class FaultyTrainer(Trainer):
    def after_step(self) -> bool:
        path = self.layout.root / FAULTS_NAME
        faults = json.loads(path.read_text()) if path.is_file() else {}
        done = self.layout.root / DONE_NAME
        if (self.step == faults.get("kill_at") and self.rank == faults.get("kill_rank", 1)
                and elastic.restart_count() == 0):
            with open(done, "a") as fh:
                fh.write(f"killed rank {self.rank} after step {self.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == faults.get("nan_at"):
            with torch.no_grad():
                next(self.engine.engine.module.parameters()).fill_(float("nan"))
            if self.rank == 0:
                with open(done, "a") as fh:
                    fh.write(f"nan after step {self.step}\n")
        return True


def write_faults(stage_dir: Path, **faults: int) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / FAULTS_NAME).write_text(json.dumps(faults))


if __name__ == "__main__":
    sys.exit(worker.main(trainer_cls=FaultyTrainer))
