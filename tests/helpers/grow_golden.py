"""The byte-exactness reference of ``grow apply``: digests of every shard and index an apply
writes for each strategy and dtype (tiny-s1 with Adam moments → tiny-s2, or tiny-s3 for clone/split; 20 KB shards).

``python -m tests.helpers.grow_golden tests/data/grow_golden.json`` regenerates the table;
it was generated from the writer before the pipelined one (see the file's ``commit``), and
tests/unit/test_grow_pipeline.py checks today's writer against it for several block sizes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("zero", "masked", "clone", "split", "copy")
SHARD = 20_000


def make_source(root: Path) -> Path:
    """tiny-s1 (seed 0) with Adam moments (seeds 10, 11) in optimizer/."""
    from growth.checkpoint import OPTIMIZER_DIR, save_checkpoint
    from growth.config import get_flavor
    from growth.init import init_checkpoint
    from growth.model import init_state_dict

    config = get_flavor("tiny-s1")
    src = init_checkpoint(config, root / "s1", seed=0, source="tiny-s1")
    for i, kind in enumerate(("exp_avg", "exp_avg_sq")):
        state = {n: (t.abs() if kind == "exp_avg_sq" else t) for n, t in init_state_dict(config, seed=10 + i).items()}
        path = save_checkpoint(src / OPTIMIZER_DIR / kind, config, state, max_shard_size=100_000)
        (path / "config.json").unlink()
        (path / "growth.json").unlink()
    (src / OPTIMIZER_DIR / "state.json").write_text(json.dumps({"step": 7, "betas": [0.9, 0.95], "eps": 1e-8}))
    return src


def shard_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".index.json"))}


def apply_case(src: Path, out: Path, strategy: str, dtype: str, workers: int = 1) -> dict[str, str]:
    from growth.executor import ApplyRequest
    from growth.parallel import apply_growth
    from operators import GrowthSpec

    spec = GrowthSpec.from_strategy(strategy, seed=5, noise=0.01 if strategy == "clone" else None)
    target = "tiny-s3" if strategy in ("clone", "split") else "tiny-s2"  # clone/split: integer factors
    apply_growth(ApplyRequest(str(src), target, spec.to_dict(), str(out), dtype=dtype,
                              max_shard_size=SHARD), workers=workers)
    return shard_hashes(out)


def main(target: str) -> None:
    table: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp))
        for strategy in STRATEGIES:
            for dtype in DTYPES:
                table[f"{strategy}/{dtype}"] = apply_case(src, Path(tmp) / f"{strategy}-{dtype}", strategy, dtype)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(target).write_text(json.dumps({"commit": commit, "note": "written by the pre-pipeline writer",
                                        "cases": table}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
