"""``python -m tests.workers.grow_slow SECONDS ARGS...``: the real ``grow`` CLI, each shard write
followed by a sleep — the seam the kill/resume and lock tests use to catch ``grow apply``
or ``grow import`` mid-job (production code has no such hook). With ``--workers N`` the spawned workers run
unpatched; the tests that kill mid-job use one process."""

from __future__ import annotations

import sys
import time

from growth import shardwork
from growth.cli import main


def slow_down(seconds: float) -> None:
    write = shardwork.ShardWorker.write

    def write_then_sleep(self, *args, **kwargs):  # noqa: ANN001, ANN202
        written = write(self, *args, **kwargs)
        if written:  # a shard kept from an earlier run costs nothing, as in a real resume
            time.sleep(seconds)
        return written

    shardwork.ShardWorker.write = write_then_sleep


if __name__ == "__main__":
    slow_down(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
