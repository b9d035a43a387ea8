"""The procedure: coarse sweep (brackets the crossover) → LR sweep → main grid."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import print_table

from payoff import corpus
from payoff.analysis import choose_budgets, crossover
from payoff.design import CONTROLS, PRESETS, PayoffError
from payoff.runner import Cell, Runner


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS["smoke" if args.smoke else args.device]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PayoffError("--device cuda: torch sees no CUDA device here; run it on a GPU machine "
                              "(or drop --device for the CPU design)")
    root = Path(args.run_dir).resolve()
    jobs = args.jobs or preset.jobs
    runner = Runner(root, preset, args.grow_fraction, jobs, args.keep_checkpoints)
    runner.extra = list(args.override)
    runner.no_train = args.no_train
    data = None
    if not any(o.split("=", 1)[0].lstrip("+").startswith("data") for o in args.override):
        data = corpus.build(root / "corpus", preset.max_bytes, preset.eval_bytes, preset.chunk_bytes)
        runner.data = data["overrides"]
    arms = tuple(args.arms)
    seeds = list(range(args.seeds))
    lr_mults = [float(x) for x in args.lr_mults.split(",") if x]
    t0 = time.perf_counter()
    print(f"models: small {runner.params['small']:,} params ({runner.flops_per_step['small']:.3g} FLOPs/step), "
          f"final {runner.params['final']:,} params ({runner.flops_per_step['final']:.3g} FLOPs/step); "
          f"batch {preset.micro_batch_size} × {preset.seq_len} tokens; grow at {args.grow_fraction:.0%} of the budget; "
          f"{jobs} runs at a time; run dir {root}", flush=True)
    budgets, coarse, coarse_cross = coarse_sweep(args, runner, preset, jobs)
    mid = budgets[len(budgets) // 2]  # the LR sweep runs at the middle main budget
    best_lr, sweep = lr_sweep(runner, preset, mid, lr_mults, arms)
    records, table, cross = main_grid(runner, budgets, best_lr, seeds, arms)
    return {"table": table, "arms": list(arms), "data": data, "lr_mults": lr_mults,
            "records": records, "missing_runs": sorted(runner.missing),
            "coarse": coarse, "coarse_crossover": coarse_cross,
            "crossover": cross, "budgets": budgets, "best_lr": best_lr, "lr_sweep": sweep, "lr_sweep_budget": mid,
            "preset": preset.__dict__, "params": runner.params, "flops_per_step": runner.flops_per_step,
            "grow_fraction": args.grow_fraction, "jobs": jobs, "run_dir": str(root),
            "wall_seconds": time.perf_counter() - t0, "runs": runner.run_stats(), "seeds": seeds}


def coarse_sweep(args: argparse.Namespace, runner: Runner, preset: Any,
                 jobs: int) -> tuple[list[float], dict[float, dict[str, list[float]]], float | None]:
    """1. The controls upwards in budget until the crossover is bracketed → (main budgets,
    the coarse table, the coarse crossover); only with ``--coarse`` (else ``--budgets``, or
    the preset's budgets)."""
    coarse: dict[float, dict[str, list[float]]] = {}
    if args.budgets:
        return sorted(float(b) for b in args.budgets.split(",")), coarse, None
    if not (args.coarse or args.coarse_only):
        return sorted(preset.budgets), coarse, None
    grid = sorted(float(b) for b in (args.coarse.split(",") if args.coarse else preset.coarse))
    # upwards, a few budgets at a time (as many as the parallel runs take); stop once
    # scratch_final is ahead (the crossover is bracketed) and one more budget confirms it
    step = max(1, jobs // 2)
    for i in range(0, len(grid), step):
        cells = [Cell(b, preset.lr, 0, set(CONTROLS)) for b in grid[i:i + step]]
        runner.run(cells, f"coarse sweep {i // step + 1}")
        for cell in cells:
            if all(runner.complete(cell, a) for a in CONTROLS):
                coarse[cell.budget] = {a: [runner.arm_result(cell, a)["eval_loss"]] for a in CONTROLS}
        done = sorted(coarse)
        ahead = [coarse[b]["scratch_final"][0] < coarse[b]["scratch_small"][0] for b in done]
        if len(done) >= 2 and ahead[-1] and not ahead[0]:
            break
    grid = sorted(coarse)
    small = [coarse[b]["scratch_small"][0] for b in grid]
    final = [coarse[b]["scratch_final"][0] for b in grid]
    coarse_cross = crossover(grid, small, final)
    budgets = [float(f"{b:.3g}") for b in choose_budgets(grid, coarse_cross, small, final)]
    print_table(["budget", "scratch_small", "scratch_final"],
                [[f"{b:.3g}", f"{coarse[b]['scratch_small'][0]:.4f}", f"{coarse[b]['scratch_final'][0]:.4f}"]
                 for b in grid], title="coarse sweep (seed 0, base LR): final eval loss")
    print("crossover: " + (f"≈ {coarse_cross:.3g} FLOPs" if coarse_cross else "not inside the grid")
          + f"; main budgets {', '.join(f'{b:.3g}' for b in budgets)}", flush=True)
    if args.coarse_only:
        sys.exit(0)
    return budgets, coarse, coarse_cross


def lr_sweep(runner: Runner, preset: Any, mid: float, lr_mults: list[float],
             arms: tuple[str, ...]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """2. Every arm alike at budget ``mid``, seed 0 → (each arm's best peak LR, the sweep)."""
    lrs = [preset.lr * m for m in lr_mults]
    sweep_cells = [Cell(mid, lr, 0, set(arms)) for lr in lrs]
    best_lr = {a: preset.lr * (lr_mults[0] if len(lr_mults) == 1 else 1.0) for a in arms}
    sweep: dict[str, dict[float, float]] = {a: {} for a in arms}
    if len(lrs) > 1:
        runner.run(sweep_cells, "LR sweep")
        for cell in sweep_cells:
            for arm in arms:
                sweep[arm][cell.lr] = (runner.arm_result(cell, arm)["eval_loss"] if runner.complete(cell, arm)
                                       else float("inf"))
        best_lr = {a: min(sweep[a], key=sweep[a].get) for a in arms}
        print_table(["arm", *(f"LR {lr:.3g}" for lr in lrs), "best"],
                    [[a, *(f"{sweep[a][lr]:.4f}" for lr in lrs), f"{best_lr[a]:.3g}"] for a in arms],
                    title=f"LR sweep at {mid:.3g} FLOPs (seed 0): final eval loss")
    return best_lr, sweep


def main_grid(runner: Runner, budgets: list[float], best_lr: dict[str, float], seeds: list[int],
              arms: tuple[str, ...]):
    """3. Every arm at its own best LR, every budget and seed → (records, table, crossover)."""
    cells: dict[tuple[float, float, int], Cell] = {}
    for s in seeds:  # seed-major: an interrupted grid still covers every budget
        for b in budgets:
            for arm in arms:
                cells.setdefault((b, best_lr[arm], s), Cell(b, best_lr[arm], s)).arms.add(arm)
    runner.run(list(cells.values()), "main grid")
    records = [runner.arm_result(cell, arm) for cell in cells.values() for arm in sorted(cell.arms)
               if runner.complete(cell, arm)]
    table: dict[float, dict[str, list[float]]] = {b: {} for b in budgets}
    for r in sorted(records, key=lambda r: (r["budget"], r["arm"], r["seed"])):
        table[r["budget"]].setdefault(r["arm"], []).append(r["eval_loss"])
    both = [b for b in budgets if all(table[b].get(c) for c in CONTROLS)]
    cross = crossover(both, [statistics.fmean(table[b]["scratch_small"]) for b in both],
                      [statistics.fmean(table[b]["scratch_final"]) for b in both])
    return records, table, cross
