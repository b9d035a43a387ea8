"""A worker module that injects faults for the elastic tests: a ``Trainer`` subclass.

    torchrun … -m tests.workers.elastic_workers STAGE_DIR/stage_config.json

Reads STAGE_DIR/.test_faults.json (written by the test; absent = no faults):
``{"kill_at": K, "kill_rank": R}`` — on the first attempt (TORCHELASTIC_RESTART_COUNT 0)
rank R SIGKILLs itself after step K; ``{"nan_at": K}`` — after step K every rank fills its
first parameter with NaN, so step K + 1's loss is NaN; ``{"nan_batch_at": K}`` — step K's
forward alone gives NaN logits (a forward hook on the model for that one step; the weights
stay finite), the fault ``on_nonfinite=skip`` is for; ``{"digest_at": [S, …]}`` — after step
S rank 0 records a SHA-256 of its weights and of its Adam state (moments and step count).
Each injected fault is recorded in STAGE_DIR/.faults-done (one line per event) so the test
sees it happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from stages.rank import elastic, worker
from stages.rank.trainer import Trainer

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
        if self.step == faults.get("nan_batch_at", 0) - 1:  # the next forward (step K's) gives NaN
            self._nan_hook = self.engine.engine.module.register_forward_hook(lambda m, i, out: out * float("nan"))
        if self.step == faults.get("nan_batch_at"):
            self._nan_hook.remove()
            if self.rank == 0:
                with open(done, "a") as fh:
                    fh.write(f"nan batch at step {self.step}\n")
        if self.step in faults.get("digest_at", ()) and self.rank == 0:
            with open(done, "a") as fh:
                fh.write(json.dumps({"step": self.step, **self.digests()}) + "\n")
        if self.step == faults.get("nan_at"):
            with torch.no_grad():
                next(self.engine.engine.module.parameters()).fill_(float("nan"))
            if self.rank == 0:
                with open(done, "a") as fh:
                    fh.write(f"nan after step {self.step}\n")
        return True

    def digests(self) -> dict[str, str]:
        """SHA-256 of this rank's weights, and of its Adam moments and step counts (ZeRO-0: all of them)."""
        weights, adam, n = hashlib.sha256(), hashlib.sha256(), 0
        for _, p in self.engine.named_params():
            weights.update(p.detach().cpu().float().numpy().tobytes())
            for key, value in sorted(self.engine.adam.state.get(p, {}).items()):
                adam.update(key.encode() + torch.as_tensor(value).detach().cpu().double().numpy().tobytes())
                n += 1
        finite = all(bool(torch.isfinite(p).all()) for _, p in self.engine.named_params())
        return {"weights": weights.hexdigest(), "adam": adam.hexdigest(), "adam_tensors": n, "finite": finite}


def write_faults(stage_dir: Path, **faults) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / FAULTS_NAME).write_text(json.dumps(faults))


if __name__ == "__main__":
    sys.exit(worker.main(trainer_cls=FaultyTrainer))
