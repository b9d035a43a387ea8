"""Does growth pay? Arms at equal training FLOPs, each with its LR fully decayed by its own end.

Every run is a real ``train-stage`` process (DeepSpeed ZeRO-1, fp32 on the CPU, 1 rank),
launched with Hydra overrides; the only thing read back is each stage's ``summary.json``
(``eval_loss_end`` on a fixed eval set, ``flops`` = (6·N_non-embedding + attention) ×
tokens, ``wall_seconds``, ``train_seconds``). The arms, at a training budget of C FLOPs:

- **scratch_small**: the small model from a fresh init for C FLOPs (warmup, cosine to 0);
- **scratch_final**: the final model from a fresh init for C FLOPs (warmup, cosine to 0);
- **growth**: the small model for ``--grow-fraction`` × C (warmup, then constant LR: it
  is not the end product), grown with the exact ``zero`` operator (new layers are zero
  identity blocks, Adam moments grown too), then the final model for the rest of C
  (re-warm to the same peak, cosine to 0 at the end of C), continuing the same data stream;
- **stack**: the same, grown with the depth-copying ``copy`` operator (each new layer a
  copy of the old layer below it: G_stack-style stacking, not function-preserving). Not
  in the CPU default (``--arms``): on 48c50fc it ended within 0.002 of growth everywhere.

growth and stack share their small-model stage (same config, same seed: the same run).
The small and final models differ only in depth (the final has twice the layers).
**Seed k** is one draw of the init (``stage.seed``) *and* of the training order
(``data.seed``), shared by every arm: the arms are paired by seed. The data
(benchmarks/payoff/corpus.py): the embedded corpus's files cut into ≤ 2 KB documents,
and a fixed eval set of the next 1 MB of standard-library files (never trained on,
the same for every arm, seed and budget; 128 × 8 × 128 tokens on the CPU).

Procedure:

1. (``--coarse``, opt-in) **coarse sweep**: scratch_small and scratch_final, seed 0, base
   LR, up a ×2 grid of budgets until scratch_final's final loss drops below
   scratch_small's; the main budgets are then the two grid budgets around it and their
   geometric mean. By default the main budgets are the preset's (cpu: 2e11, 4e11, 8e11);
2. **LR sweep**: every arm at the middle main budget, seed 0, LR × ``--lr-mults``
   (default 0.5, 1: ×2 was 0.18-0.31 worse for every arm on 48c50fc and 0.23 worse for
   scratch_small on this data); each arm then uses its own best peak LR everywhere;
3. **main grid**: the budgets × ``--seeds`` seeds × the arms.

The reading, unpaired: per budget, the grown arm's mean against the better control's,
whether its worst seed beats every control seed, and the FLOPs the controls need to
reach its mean loss (interpolated along each control's budget frontier, log-FLOPs;
"beyond" when outside the budgets run). Paired: per seed, the grown arm's loss minus the
better control's *at that seed* (and minus each control): mean, sd, sign count, t.

    python benchmarks/growth_payoff.py                  # CPU: 3 budgets × 3 seeds × 3 arms (~15 min, 2 quiet cores)
    python benchmarks/growth_payoff.py --budgets 1e12,2e12,4e12 --arms growth,stack,scratch_final,scratch_small
    python benchmarks/growth_payoff.py --coarse preset  # find the crossover first (the old default)
    python benchmarks/growth_payoff.py --smoke          # one tiny budget, one seed, all four arms (tests, ~1 min)
    python benchmarks/growth_payoff.py --device cuda    # the same design ~100x (sizes and tokens)

Runs are kept under ``--run-dir`` (one directory per budget × LR × seed); a re-run
reuses finished stages. Run it under ``nice`` on a shared machine; each train-stage
process gets ``OMP_NUM_THREADS=1`` (unless set) and ``--jobs`` of them run at once.
Writes the plot (``--png``, default docs/growth_payoff.png; then also
docs/growth_payoff.json, refused from a checkout with uncommitted changes unless
``--allow-dirty``) and RUN_DIR/growth_payoff.json (everything, with the commit); the last
line printed is one JSON object:
``{"budgets": [{"flops": F, "arms": {"growth": [...], "scratch_final": [...],
"scratch_small": [...]}}, ...]}`` (final eval loss per seed, for the arms run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, git_commit, machine_info, print_machine
from payoff.analysis import Curve, crossover, flops_to_reach, loss_at, paired, reading  # noqa: F401  (the API)
from payoff.design import ARMS, PRESETS, PayoffError
from payoff.procedure import run_real
from payoff.report import report

DOCS = REPO / "docs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the 2-core design; cuda: the same design ~100x (sizes and tokens), bf16")
    p.add_argument("--smoke", action="store_true",
                   help="one tiny budget, one seed, one LR, no coarse sweep (seconds of training per run)")
    p.add_argument("--run-dir", default=None,
                   help="where the runs live (default runs/growth_payoff[_cuda|_smoke]); finished stages are reused")
    p.add_argument("--budgets", default=None,
                   help="comma-separated training budgets in FLOPs for the main grid; skips the coarse sweep")
    p.add_argument("--coarse", default=None,
                   help="run the coarse sweep over these comma-separated budgets (\"preset\": the preset's) and "
                        "take the main budgets around its crossover; default: the preset's main budgets")
    p.add_argument("--coarse-only", action="store_true", help="stop after the coarse sweep")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated arms of the main grid, from {', '.join(ARMS)} (default: the preset's; "
                        "cpu: all but stack)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm and budget (default 3)")
    p.add_argument("--lr-mults", default="0.5,1",
                   help="the LR sweep, as multiples of the preset's peak LR, run for every arm (default 0.5,1: "
                        "×2 was never best and 0.18-0.31 worse for every arm, docs/benchmarks.md)")
    p.add_argument("--grow-fraction", type=float, default=0.25,
                   help="fraction of the budget spent on the small model before growing (default 0.25)")
    p.add_argument("--jobs", type=int, default=0, help="train-stage processes at once (default 4 on cpu, 1 on cuda)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra train-stage (Hydra) override for every run, e.g. data.source=DIR; repeatable")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: report from the finished runs in --run-dir (missing ones are listed)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each stage's ds_ckpt/ (deleted by default)")
    p.add_argument("--png", default=str(DOCS / "growth_payoff.png"),
                   help="the plot (default docs/growth_payoff.png, and then docs/growth_payoff.json too; "
                        "a temp dir with --smoke)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into docs/ from a checkout with uncommitted changes (recorded as commit+dirty "
                        "in the JSON and the plot title); refused by default")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.smoke:
        args.seeds = 1 if "--seeds" not in given else args.seeds
        args.lr_mults = "1" if "--lr-mults" not in given else args.lr_mults
        if not args.budgets:
            args.budgets = ",".join(str(b) for b in PRESETS["smoke"].coarse)
        if "--png" not in given:
            args.png = str(Path(tempfile.mkdtemp(prefix="growth_payoff-")) / "growth_payoff.png")
    if args.run_dir is None:
        args.run_dir = str(REPO / "runs" / ("growth_payoff_smoke" if args.smoke else
                                            "growth_payoff" + ("_cuda" if args.device == "cuda" else "")))
    if not 0 < args.grow_fraction < 1:
        p.error(f"--grow-fraction must be in (0, 1), got {args.grow_fraction}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    preset = PRESETS["smoke" if args.smoke else args.device]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else list(preset.arms)
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f"--arms: unknown arm {bad[0] if bad else '(none given)'}; choose from {', '.join(ARMS)}")
    if args.coarse == "preset":
        args.coarse = ",".join(str(b) for b in preset.coarse)
    return args


def dirty_files() -> list[str]:
    """Tracked files with uncommitted changes and untracked, not ignored files ([] when clean)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["(not a git checkout)"]
    return [line[3:] for line in out.splitlines() if line.strip()]


def check_docs(args: argparse.Namespace) -> bool:
    """True when this run writes into docs/; exits (2) when that would record a dirty tree."""
    into_docs = Path(args.png).resolve().parent == DOCS.resolve()
    dirty = dirty_files()
    if into_docs and dirty and not args.allow_dirty:
        print(f"growth_payoff: error: the checkout has uncommitted changes ({', '.join(dirty[:3])}"
              f"{', …' if len(dirty) > 3 else ''}); commit them so docs/ records the code that ran, give "
              f"--png elsewhere, or pass --allow-dirty (recorded as +dirty)", file=sys.stderr, flush=True)
        sys.exit(2)
    if dirty:
        print(f"WARNING: uncommitted changes in the checkout ({len(dirty)} files): the results are recorded "
              f"as commit {git_commit().split('+')[0]}+dirty", flush=True)
    return into_docs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    into_docs = check_docs(args)
    commit = git_commit().split("+")[0] + ("+dirty" if dirty_files() else "")
    info = {**machine_info(), "commit": commit}
    print_machine(info)
    try:
        res = run_real(args)
    except PayoffError as err:
        print(f"growth_payoff: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    res["commit"] = commit
    read = report(res, Path(args.png), "smoke" if args.smoke else args.device)
    full = {"benchmark": "growth_payoff", **{k: v for k, v in res.items() if k != "table"},
            "table": [{"flops": b, "arms": res["table"][b]} for b in res["budgets"]], "reading": read,
            "png": args.png, "smoke": args.smoke, "device": args.device, "machine": info}
    text = json.dumps(full, indent=1, sort_keys=True, default=str) + "\n"
    out_path = Path(res["run_dir"]) / "growth_payoff.json"
    out_path.write_text(text)
    print(f"everything: {out_path}")
    if into_docs:
        (DOCS / "growth_payoff.json").write_text(text)
        print(f"docs: {DOCS / 'growth_payoff.json'} (commit {commit})")
    out = {"budgets": [{"flops": b, "arms": {a: res["table"][b].get(a, []) for a in sorted(res["arms"])}}
                       for b in res["budgets"]]}
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
