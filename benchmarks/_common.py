"""Shared helpers of the benchmark scripts: machine info, side-by-side timing, output.

Every benchmark measures the things it compares *in one run*, alternating between them
(these machines are noisy: absolute times mean little, ratios measured side by side do),
prints a readable table, and ends with exactly one line that is a JSON object — the line
scripts and tests parse (``json.loads(stdout.splitlines()[-1])``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(1, str(REPO))


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the cgroup/affinity view, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def git_commit() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files are modified."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to put a number in context: CPU, cores, versions, date, commit."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
          + (f", {info['gpu']}" if "gpu" in info else "")
          + f"; python {info['python']}, torch {info['torch']}; {info['date']}; commit {info['commit']}")


# ---------------------------------------------------------------------- timing
def alternate(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
              ) -> dict[str, list[float]]:
    """Seconds per call of each contender, measured side by side.

    Each round runs every contender once; the order flips every round (A B, B A, …) so
    a slow drift of the machine (thermal, a neighbour's job) hits all of them alike.
    ``warmup`` rounds run first and are not recorded (allocator, caches, lazy init).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            elapsed = time.perf_counter() - start
            if rnd >= warmup:
                times[name].append(elapsed)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """Relative half-range of the middle half (IQR / 2 / median): how noisy a series was."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / statistics.median(values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(values)


# ---------------------------------------------------------------------- output
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    if title:
        print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def emit_json(result: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object (flushed, nothing after it)."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=True, default=str), flush=True)
