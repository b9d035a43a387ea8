"""`train-stage` in a subprocess with a fake worker module (no DeepSpeed), for the CLI tests.

The fake worker records that it ran (FAKE_WORKER_MARK) and writes a summary; the failing
one prints the worker's one-line user error and exits 2, as ``stages.rank.worker`` does.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_CACHE: list[Path] = []

FAKE_WORKER = textwrap.dedent('''
    """Stands in for stages.rank.worker: records that it ran and writes a summary."""
    import json, os, sys
    from pathlib import Path

    cfg = json.loads(Path(sys.argv[1]).read_text())
    if os.environ.get("RANK", "0") == "0":
        Path(os.environ["FAKE_WORKER_MARK"]).write_text(json.dumps(sorted(cfg)))
        summary = {"stage": cfg["stage"]["name"], "eval_loss_start": 3.0, "eval_loss_end": 2.5,
                   "lr_peak": cfg["stage"]["lr"]}
        (Path(cfg["stage_dir"]) / "summary.json").write_text(json.dumps(summary))
''')
FAILING_WORKER = textwrap.dedent('''
    """Fails like stages.rank.worker on a user error: one line on rank 0, exit 2."""
    import os, sys
    from pathlib import Path

    Path(os.environ["FAKE_WORKER_MARK"]).write_text("ran")
    if os.environ.get("RANK", "0") == "0":
        print("train-stage worker: error: data.source: corpus.txt is unreadable", file=sys.stderr)
    sys.exit(2)
''')


def data_cache() -> Path:
    """One tokenized-corpus cache for every CLI run of this pytest process (the corpus is the
    same; tokenizing it again per test is most of a run's time)."""
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="flm-cli-data-")))
        atexit.register(shutil.rmtree, _CACHE[0], ignore_errors=True)
    return _CACHE[0]


def make_cli(tmp_path: Path):
    """``run(*overrides) -> (rc, stdout, stderr, worker_ran)`` with run_dir=tmp_path/run and
    the shared data cache."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "fake_worker.py").write_text(FAKE_WORKER)
    (fake / "failing_worker.py").write_text(FAILING_WORKER)
    mark = tmp_path / "worker-ran"
    env = dict(os.environ, FAKE_WORKER_MARK=str(mark), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    env.pop("HYDRA_FULL_ERROR", None)

    def run(*overrides: str, timeout: float = 120):
        mark.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "stages.train", f"run_dir={tmp_path / 'run'}",
                f"data.cache_dir={data_cache()}", "worker_module=fake_worker", *overrides]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=tmp_path)
        return proc.returncode, proc.stdout, proc.stderr, mark.exists()

    return run
