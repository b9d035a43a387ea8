"""Does growth pay? Four arms at equal training FLOPs, each with its LR fully decayed by its own end.

Every run is a real ``train-stage`` process (DeepSpeed ZeRO-1, fp32 on the CPU, 1 rank),
launched with Hydra overrides; the only thing read back is each stage's ``summary.json``
(``eval_loss_end`` on fixed held-out batches, ``flops`` = (6·N_non-embedding + attention) ×
tokens, ``wall_seconds``, ``train_seconds``). The arms, at a training budget of C FLOPs:

- **scratch_small**: the small model from a fresh init for C FLOPs (warmup, cosine to 0);
- **scratch_final**: the final model from a fresh init for C FLOPs (warmup, cosine to 0);
- **growth**: the small model for ``--grow-fraction`` × C (warmup, then constant LR: it
  is not the end product), grown with the exact ``zero`` operator (new layers are zero
  identity blocks, Adam moments grown too), then the final model for the rest of C
  (re-warm to the same peak, cosine to 0 at the end of C);
- **stack**: the same, grown with the depth-copying ``copy`` operator (each new layer a
  copy of the old layer below it: G_stack-style stacking, not function-preserving).

growth and stack share their small-model stage (same config, same seed: the same run).
The small and final models differ only in depth (the final has twice the layers), so
both operators apply, and every arm sees the same batch shape, data and eval batches.

Procedure (``--budgets`` skips step 1):

1. **coarse sweep**: scratch_small and scratch_final, seed 0, base LR, up a ×2 grid of
   budgets until scratch_final's final loss drops below scratch_small's (the crossover);
   the main budgets are the two grid budgets around it and their geometric mean;
2. **LR sweep**: every arm at the smallest main budget, seed 0, LR × {0.5, 1, 2} (``--lr-mults``);
   each arm then uses its own best peak LR everywhere (no arm is tuned more than another);
3. **main grid**: those 3 budgets × ``--seeds`` seeds × 4 arms.

The reading: at which budget growth (or stack) beats *both* controls by more than the
seed spread (its worst seed below every control seed), by how much in loss, and how many
FLOPs the better control needs to reach growth's mean loss (interpolated along the
control's budget frontier, log-FLOPs; "beyond" when outside the budgets run).

    python benchmarks/growth_payoff.py                  # CPU: coarse sweep + LR sweep + grid (~40 min, 2 cores)
    python benchmarks/growth_payoff.py --budgets 1e12,2e12,4e12   # skip the coarse sweep
    python benchmarks/growth_payoff.py --smoke          # one tiny budget, one seed (tests, ~1 min)
    python benchmarks/growth_payoff.py --device cuda    # the same design ~100x (sizes and tokens)

Runs are kept under ``--run-dir`` (one directory per budget × LR × seed); a re-run
reuses finished stages. Run it under ``nice`` on a shared machine; each train-stage
process gets ``OMP_NUM_THREADS=1`` (unless set) and ``--jobs`` of them run at once.
Writes the plot (``--png``, default docs/growth_payoff.png) and RUN_DIR/growth_payoff.json
(everything); the last line printed is one JSON object:
``{"budgets": [{"flops": F, "arms": {"growth": [...], "scratch_final": [...],
"scratch_small": [...], "stack": [...]}}, ...]}`` (final eval loss per seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, machine_info, print_machine
from payoff.analysis import Curve, crossover, flops_to_reach, loss_at, reading  # noqa: F401  (the benchmark's API)
from payoff.design import ARMS, PRESETS, PayoffError
from payoff.procedure import run_real
from payoff.report import report


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
    p.add_argument("--coarse", default=None, help="comma-separated coarse-sweep budgets (default: the preset's)")
    p.add_argument("--coarse-only", action="store_true", help="stop after the coarse sweep")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm and budget (default 3)")
    p.add_argument("--lr-mults", default="0.5,1,2",
                   help="the LR sweep, as multiples of the preset's peak LR, run for every arm (default 0.5,1,2)")
    p.add_argument("--grow-fraction", type=float, default=0.25,
                   help="fraction of the budget spent on the small model before growing (default 0.25)")
    p.add_argument("--jobs", type=int, default=0, help="train-stage processes at once (default 4 on cpu, 1 on cuda)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra train-stage (Hydra) override for every run, e.g. data.source=DIR; repeatable")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: report from the finished runs in --run-dir (missing ones are listed)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each stage's ds_ckpt/ (deleted by default)")
    p.add_argument("--png", default=str(REPO / "docs" / "growth_payoff.png"),
                   help="the plot (default docs/growth_payoff.png; a temp dir with --smoke)")
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
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print_machine(info)
    try:
        res = run_real(args)
    except PayoffError as err:
        print(f"growth_payoff: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    read = report(res, Path(args.png), "smoke" if args.smoke else args.device)
    full = {"benchmark": "growth_payoff", **{k: v for k, v in res.items() if k != "table"},
            "table": [{"flops": b, "arms": res["table"][b]} for b in res["budgets"]], "reading": read,
            "png": args.png, "smoke": args.smoke, "device": args.device, "machine": info}
    out_path = Path(res["run_dir"]) / "growth_payoff.json"
    out_path.write_text(json.dumps(full, indent=1, sort_keys=True, default=str) + "\n")
    print(f"everything: {out_path}")
    out = {"budgets": [{"flops": b, "arms": {a: res["table"][b].get(a, []) for a in sorted(ARMS)}}
                       for b in res["budgets"]]}
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
