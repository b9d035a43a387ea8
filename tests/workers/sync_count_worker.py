"""A worker that counts host syncs per training step through a seam (a ``Trainer`` subclass).

    torchrun … -m tests.workers.sync_count_worker STAGE_DIR/stage_config.json

Every way a tensor's value reaches Python (``item``, ``tolist``, ``__bool__``, ``__float__``,
``__int__``, ``__index__``, ``cpu``, ``numpy``; on a GPU each blocks the host until the device
is done) is wrapped by a counter while ``Trainer.train_step`` runs. Rank 0 writes
STAGE_DIR/.syncs.json: ``{"step": [calls, ...], ...}`` with each call's method name, and which
steps were log steps.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Iterator

import torch

from stages.rank import worker
from stages.rank.trainer import Trainer

SYNCS_NAME = ".syncs.json"
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def counted_syncs(calls: list[str]) -> Iterator[None]:
    """Append ``method@caller`` to ``calls`` for every host read of a tensor inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name: str, original):
        def counted(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            calls.append(f"{name}@{caller.filename}:{caller.lineno}")
            return original(self, *args, **kwargs)
        return counted

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


class SyncCountingTrainer(Trainer):
    def train_step(self) -> torch.Tensor:
        calls: list[str] = []
        with counted_syncs(calls):
            loss = super().train_step()
        if self.rank == 0:  # the only reader and writer of the record
            record = self.layout.root / SYNCS_NAME
            seen = json.loads(record.read_text()) if record.is_file() else {}
            logged = self.step % max(1, self.stage.log_every) == 0 or self.done
            seen[str(self.step)] = {"calls": calls, "log_step": logged}
            record.write_text(json.dumps(seen))
        return loss


if __name__ == "__main__":
    sys.exit(worker.main(trainer_cls=SyncCountingTrainer))
