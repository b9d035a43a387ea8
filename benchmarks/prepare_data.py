"""prepare-data throughput with 1 and 2 workers, its memory on a big jsonl, and the share of a
tiny training step spent fetching a batch.

    python benchmarks/prepare_data.py [--mb 24] [--rss-mb 200] [--repeats 2] [--quick]

1. A jsonl of ``--mb`` MB (the standard library's text, repeated with distinct prefixes) is
   tokenized with a SentencePiece model trained here (vocabulary 2000, the kind Tele-FLM
   ships), by ``prepare`` with 1 and with 2 workers, alternating, fresh output each time;
   the two outputs must be byte-identical. Target: 2 workers ≥ 1.7× on 2 cores.
2. Peak RSS of ``python -m stages.prepare_data`` (byte tokenizer) on a ``--rss-mb`` MB jsonl:
   the reader streams, so it should stay near the interpreter's own size (issue 16: the old
   reader held the file, 651 MB for 200 MB).
3. One optimizer step of ``tiny-s1`` (micro batch 8 × 128 tokens, AdamW, in this process,
   no DeepSpeed, so a lower bound of a real step) against ``TrainStream.step_batches`` on
   the embedded corpus. Target: fetching < 1 % of the step.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit_json, machine_info, median, print_machine, print_table  # noqa: E402


def cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (the pool's workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_jsonl(path: Path, mb: float) -> int:
    from stages.data import embedded_files

    _, files = embedded_files(4_000_000)
    texts = [f.read_text(errors="replace") for f in files]
    target, written, i = int(mb * 2**20), 0, 0
    with open(path, "w") as fh:
        while written < target:
            line = json.dumps({"text": f"copy {i}\n" + texts[i % len(texts)]}) + "\n"
            fh.write(line)
            written += len(line)
            i += 1
    return written


def train_sp(tmp: Path) -> Path:
    import sentencepiece as spm

    from stages.data import embedded_files

    _, files = embedded_files(1_000_000)
    text = tmp / "sp.txt"
    text.write_text("\n".join(f.read_text(errors="ignore") for f in files))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "sp"), vocab_size=2000,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1,
                                   minloglevel=2, input_sentence_size=50000, shuffle_input_sentence=False)
    return tmp / "sp.model"


# Note: ru_maxrss survives exec, so a child forked from this (torch-sized) process would
# report at least our size; VmHWM belongs to the exec'd image alone.
PEAK_WRAPPER = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module("stages.prepare_data", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("VMHWM_KB", hwm, file=sys.stderr)
sys.exit(code)
"""


def peak_rss(args: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``python -m stages.prepare_data ARGS``."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, "prepare-data", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"prepare-data failed: {proc.stderr[-2000:]}")
    kb = int(proc.stderr.split("VMHWM_KB")[1].split()[0])
    return seconds, kb * 1024


def fetch_share(repeats: int) -> dict[str, float]:
    import torch

    from growth.config import get_flavor
    from growth.model import TeleFLMForCausalLM
    from stages.data import TrainStream, prepare_corpus

    tmp = Path(tempfile.mkdtemp(prefix="flm-bench-data-"))
    try:
        info = prepare_corpus({"source": "embedded", "max_bytes": 8_000_000}, tmp)
        stream = TrainStream(info, 128, micro_batch_size=8, grad_accum=1, dp_world=2, dp_rank=0)
        model = TeleFLMForCausalLM(get_flavor("tiny-s1"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = stream.batch(0)
        steps, fetches = [], []
        for step in range(repeats + 2):
            t0 = time.perf_counter()
            batches = stream.step_batches(step)
            t1 = time.perf_counter()
            for bx, by in batches:
                model.loss(bx, by).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if step >= 2:
                fetches.append(t1 - t0)
                steps.append(t2 - t0)
        return {"fetch_seconds": median(fetches), "step_seconds": median(steps),
                "fetch_share": median(fetches) / median(steps)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=24, help="jsonl size for the worker comparison (MB)")
    p.add_argument("--rss-mb", type=float, default=200, help="jsonl size for the memory check (MB)")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count (alternating)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps for the fetch share")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    args = p.parse_args()
    if args.quick:
        args.mb, args.rss_mb, args.repeats, args.steps = 2, 4, 1, 3
    info = machine_info()
    print_machine(info)
    from stages.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="flm-bench-prep-"))
    try:
        src = tmp / "in.jsonl"
        size = make_jsonl(src, args.mb)
        model = train_sp(tmp)
        times: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        outputs: dict[int, bytes] = {}
        for r in range(args.repeats):
            for workers in (1, 2):
                out = tmp / f"out{workers}-{r}" / "c"
                t0, c0 = time.perf_counter(), cpu_seconds()
                prepare([str(src)], str(model), out, workers=workers, progress=False)
                times[workers].append(time.perf_counter() - t0)
                cpus[workers].append(cpu_seconds() - c0)
                outputs[workers] = Path(f"{out}.bin").read_bytes() + Path(f"{out}.idx").read_bytes()
                shutil.rmtree(out.parent)
        identical = outputs[1] == outputs[2]
        mbps = {w: size / 2**20 / median(t) for w, t in times.items()}
        speedup = median(times[1]) / median(times[2])
        cpu_ratio = median(cpus[2]) / median(cpus[1])  # extra CPU work of the 2-worker path

        big = tmp / "big.jsonl"
        big_size = make_jsonl(big, args.rss_mb)
        src.unlink()
        rss_s, rss = peak_rss([str(big), "--tokenizer", "byte", "--out", str(tmp / "big_out" / "c"), "--quiet"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fetch = fetch_share(args.steps)

    print_table(["workers", "median s", "MB/s (input)"],
                [[w, f"{median(t):.2f}", f"{mbps[w]:.2f}"] for w, t in times.items()],
                title=f"prepare-data, {size / 2**20:.0f} MB jsonl, SentencePiece vocab 2000 (outputs identical: "
                      f"{identical})")
    print(f"2 workers / 1 worker: {speedup:.2f}x wall (target >= 1.7x on 2 cores); CPU seconds 1 worker "
          f"{median(cpus[1]):.1f}, 2 workers {median(cpus[2]):.1f} (ratio {cpu_ratio:.2f}: 2 idle cores would "
          f"give at most {2 / cpu_ratio:.2f}x)")
    print(f"peak RSS of prepare-data on a {big_size / 2**20:.0f} MB jsonl: {rss / 2**20:.0f} MB ({rss_s:.1f} s)")
    print(f"batch fetch {fetch['fetch_seconds'] * 1e3:.3f} ms of a {fetch['step_seconds'] * 1e3:.1f} ms tiny step: "
          f"{100 * fetch['fetch_share']:.3f} % (target < 1 %)")
    emit_json({"benchmark": "prepare_data", "input_mb": size / 2**20, "mb_per_s_1_worker": mbps[1],
               "mb_per_s_2_workers": mbps[2], "speedup_2_workers": speedup, "speedup_target": 1.7,
               "cpu_seconds_1_worker": median(cpus[1]), "cpu_seconds_2_workers": median(cpus[2]),
               "speedup_bound_from_cpu": 2 / cpu_ratio, "load_average": os.getloadavg()[0],
               "outputs_identical": identical, "rss_input_mb": big_size / 2**20, "rss_peak_mb": rss / 2**20,
               "fetch_ms": fetch["fetch_seconds"] * 1e3, "step_ms": fetch["step_seconds"] * 1e3,
               "fetch_share": fetch["fetch_share"], "fetch_share_target": 0.01, "machine": info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
