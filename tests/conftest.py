"""Shared test helpers: tiny random configs, tiny checkpoints, the `grow` CLI in a subprocess.

Keep this file small and its names stable — every test module may use them:

- ``random_config(rng, gqa=False, mup=False, **overrides)``: a tiny random ModelConfig.
- ``run_grow(*args, cwd=None, timeout=120)`` → ``(rc, stdout, stderr)``.
- ``grow_in_process(capsys, *args)`` → ``(rc, stdout, stderr)``: ``growth.cli.main`` in this
  process (same code path, no 2 s torch import; use ``run_grow`` where the process matters).
- ``run_measured(argv, timeout=60)`` → ``Measured(rc, stdout, stderr, seconds, cpu_seconds,
  max_rss_bytes)`` (a named tuple).
- ``tree_hashes(root)`` → {relative path: sha256} of every file below ``root``.
- ``assert_one_line_error(rc, stderr, *needles)``: a user error, one line, no traceback.
- fixtures ``rng`` (seeded ``random.Random``), ``tiny_config``, ``tiny_checkpoint``.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from growth.config import ModelConfig, get_flavor

REPO = Path(__file__).resolve().parents[1]


def random_config(rng: random.Random, gqa: bool = False, mup: bool = False, **overrides) -> ModelConfig:
    """A small random Llama/Tele-FLM config: 1–3 layers, h ≤ 72, head_dim·heads ≠ h in general.

    ``gqa`` picks fewer kv heads than query heads (at least 2 query heads); ``mup`` turns on
    random μP multipliers. Sizes stay tiny so a forward pass takes milliseconds.
    """
    kv = rng.randint(1, 3)
    heads = kv * (rng.randint(2, 3) if gqa else 1)
    if not gqa and rng.random() < 0.5:
        heads = kv = rng.randint(1, 4)
    fields = dict(
        hidden_size=heads * rng.choice([2, 4, 6, 8]),  # transformers ≥ 5 insists heads | hidden
        intermediate_size=rng.randint(8, 72),
        num_hidden_layers=rng.randint(1, 3),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=rng.choice([4, 8, 16]),
        vocab_size=rng.randint(17, 97),
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
        rope_theta=rng.choice([10000.0, 500000.0]),
        max_position_embeddings=64,
    )
    if mup:
        fields.update(use_mup=True, input_mult=rng.uniform(0.5, 4.0),
                      output_mult=rng.uniform(0.5, 4.0), mup_scale_factor=rng.uniform(1.0, 16.0))
    fields.update(overrides)
    return ModelConfig(**fields)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_grow(*args: str | os.PathLike, cwd: str | os.PathLike | None = None,
             timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m growth.cli ARGS`` in a fresh process: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "growth.cli", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def kill_grow_mid_job(args: list[str], seconds: str, out: Path, shards: int, epoch: str) -> list[str]:
    """Run ``grow ARGS`` slowed by ``seconds`` per shard (tests.workers.grow_slow), SIGKILL it
    once ``shards`` shards sit in ``out``'s staging folder; the shard names left there."""
    from growth.checkpoint import staging_dir

    proc = subprocess.Popen([sys.executable, "-m", "tests.workers.grow_slow", seconds, *args], cwd=REPO,
                            env={**_env(), "SOURCE_DATE_EPOCH": epoch}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staging = staging_dir(out)
    deadline = time.monotonic() + 60
    while len(list(staging.glob("model-*.safetensors"))) < shards:
        assert proc.poll() is None, f"{args[0]} finished before it could be killed"
        assert time.monotonic() < deadline, f"{args[0]} made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in staging.glob("model-*.safetensors"))


def grow_in_process(capsys: pytest.CaptureFixture, *args: str | os.PathLike) -> tuple[int, str, str]:
    """``growth.cli.main(ARGS)`` here, with output captured by pytest's ``capsys``."""
    from growth.cli import main

    capsys.readouterr()  # drop whatever came before
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (byte-identical outputs compare equal)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Measured(NamedTuple):
    rc: int
    stdout: str
    stderr: str
    seconds: float  # wall clock
    cpu_seconds: float  # user + system of the child: what it cost, whatever else runs
    max_rss: int  # bytes


def run_measured(argv: list[str], timeout: float = 60) -> Measured:
    """Run ``argv``; also return its wall and CPU time and *its own* peak RSS in bytes.

    Note: ``os.wait4`` reports the rusage of exactly this child, unlike
    ``getrusage(RUSAGE_CHILDREN)``, which keeps the maximum over every child ever reaped.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env())
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.waitpid(proc.pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.01)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read().decode(), err.read().decode(), seconds,
                        usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)  # Linux: KiB


def assert_one_line_error(rc: int, stderr: str, *needles: str) -> None:
    """A user error: rc != 0, exactly one line on stderr naming every needle, no traceback."""
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml): one worker per core, at most 4; each multi-process test
    starts 2–4 ranks of its own, so more workers only contend for the cores."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def pytest_configure(config: pytest.Config) -> None:
    """The session's directory for runs several test modules share (tests/helpers/ds_helpers.py): made
    by the controlling process, so pytest-xdist workers, started after this, inherit it."""
    if hasattr(config, "workerinput") or os.environ.get("FLM_TEST_SHARED_DIR"):
        return
    path = tempfile.mkdtemp(prefix="flm-ds-tests-")
    os.environ["FLM_TEST_SHARED_DIR"] = path
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))


@pytest.fixture
def rng() -> random.Random:
    return random.Random(20240731)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return get_flavor("tiny")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A fresh fp32 `tiny` checkpoint (seed 0, one file) in tmp_path/tiny."""
    from growth.init import init_checkpoint

    return init_checkpoint(get_flavor("tiny"), tmp_path / "tiny", seed=0, source="tiny")
