"""The printed tables and the plot of a finished grid."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _common import fmt_seconds, print_table

from payoff.analysis import paired, reading, stats
from payoff.design import ARMS, CONTROLS
from payoff.runner import _secs

COLORS = {"growth": "tab:blue", "stack": "tab:green", "scratch_final": "tab:gray", "scratch_small": "tab:orange"}


def plot(table: dict[float, dict[str, list[float]]], coarse: dict[float, dict[str, list[float]]],
         cross: float | None, title: str, path: Path, pairs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    plot_paired(bx, pairs)
    budgets = sorted(table)
    for arm in ARMS:
        xs = [b for b in budgets if arm in table[b]]
        if not xs:
            continue
        s = [stats(table[b][arm]) for b in xs]
        n = len(table[xs[0]][arm])
        ax.plot(xs, [v["mean"] for v in s], "-o", ms=4, color=COLORS[arm], label=f"{arm} (mean of {n} seeds)")
        ax.fill_between(xs, [v["min"] for v in s], [v["max"] for v in s], color=COLORS[arm], alpha=0.2, lw=0)
    for arm in CONTROLS:
        xs = [b for b in sorted(coarse) if arm in coarse[b]]
        if xs:
            ax.plot(xs, [coarse[b][arm][0] for b in xs], ":", marker="x", ms=4, lw=0.8, color=COLORS[arm],
                    label=f"{arm}, coarse sweep (seed 0, base LR)")
    if cross is not None:
        ax.axvline(cross, color="tab:red", ls="--", lw=1)
        ax.annotate(f"crossover ≈ {cross:.2g} FLOPs\n(final overtakes small)", (cross, 0.97),
                    xycoords=("data", "axes fraction"), xytext=(4, 0), textcoords="offset points",
                    fontsize=8, color="tab:red", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per run (6N + attention per token; every arm spends the same)")
    ax.set_ylabel("final eval loss (nats/byte, fixed eval set, never trained on)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_paired(ax: Any, pairs: list[dict[str, Any]]) -> None:
    """Right panel: per seed, the grown arm's loss minus the best control's of the same seed."""
    for arm in sorted({p["arm"] for p in pairs}):
        rows = [p for p in pairs if p["arm"] == arm]
        xs = [p["budget"] for p in rows]
        for p in rows:
            ax.plot([p["budget"]] * p["best"]["n"], p["best"]["diffs"], "o", ms=4, color=COLORS[arm], alpha=0.5)
        ax.plot(xs, [p["best"]["mean"] for p in rows], "-", color=COLORS[arm], label=f"{arm} − best control (per seed)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per run")
    ax.set_ylabel("paired loss difference (nats/byte; < 0: growth pays)")
    ax.set_title("paired by seed (same init and data order)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")


def print_paired(pairs: list[dict[str, Any]]) -> None:
    def cell(d: dict[str, Any]) -> str:
        t = "" if d["t"] is None else f", t {d['t']:+.1f}"
        return f"{d['mean']:+.4f} ± {d['sd']:.4f} ({d['wins']}/{d['n']} seeds < 0{t})"

    print_table(["budget", "arm", "− best control of each seed", *(f"− {c}" for c in CONTROLS), "per seed (− best)"],
                [[f"{p['budget']:.3g}", p["arm"], cell(p["best"]), *(cell(p[c]) for c in CONTROLS),
                  " ".join(f"{x:+.4f}" for x in p["best"]["diffs"])] for p in pairs],
                title="paired reading: arm − control at the same seed (mean ± sd over seeds; < 0: the arm is better)")


def report(res: dict[str, Any], png: Path, device: str) -> list[dict[str, Any]]:
    table, records = res["table"], res["records"]
    by = {(r["budget"], r["arm"]): [x for x in records if x["budget"] == r["budget"] and x["arm"] == r["arm"]]
          for r in records}
    rows = []
    for b in res["budgets"]:
        for arm in res["arms"]:
            rs = by.get((b, arm), [])
            if not rs:
                continue
            s = stats([r["eval_loss"] for r in rs])
            rows.append([f"{b:.3g}", arm, f"{res['best_lr'][arm]:.3g}",
                         " ".join(f"{r['eval_loss']:.4f}" for r in rs), f"{s['mean']:.4f}",
                         f"{(s['max'] - s['min']) / 2:.4f}", f"{statistics.fmean(r['flops'] for r in rs):.3g}",
                         fmt_seconds(statistics.fmean(r["process_seconds"] for r in rs)),
                         _secs(statistics.fmean(r["cpu_seconds"] for r in rs))])
    print_table(["budget", "arm", "peak LR", "eval loss per seed", "mean", "± half-range", "FLOPs run",
                 "wall/run", "CPU/run"], rows, title="main grid: final eval loss at equal training FLOPs")
    read = reading(table)
    lines = []
    for r in read:
        reach = ", ".join(
            f"{c}: " + ("not within the budgets run" if v["where"] == "beyond"
                        else f"≤ {v['flops']:.3g} FLOPs (≥ {v['ratio']:.2f}×)" if v["where"] == "below"
                        else f"{v['flops']:.3g} FLOPs ({v['ratio']:.2f}×)")
            for c, v in r["flops_to_reach"].items())
        lines.append([f"{r['budget']:.3g}", r["arm"], f"{r['margin']:+.4f}", r["better_control"],
                      "yes" if r["beats_both_beyond_spread"] else "no", reach])
    print_table(["budget", "arm", "margin over better control", "better control", "beats both beyond spread",
                 "control FLOPs to reach the arm's mean loss (budget ÷ that)"], lines, title="unpaired reading (means)")
    pairs = paired(records)
    print_paired(pairs)
    res["paired"] = pairs
    if res["missing_runs"]:
        print(f"NOT in this report ({len(res['missing_runs'])} runs never trained): "
              + ", ".join(res["missing_runs"]))
    cross = res["crossover"]
    print(f"crossover ({len(res['seeds'])}-seed means): "
          + (f"≈ {cross:.3g} FLOPs" if cross else "not inside the budgets run"))
    wins = [r for r in read if r["beats_both_beyond_spread"]]
    print("growth beats both controls beyond the seed spread at: "
          + (", ".join(f"{r['arm']} @ {r['budget']:.3g} ({r['margin']:+.4f})" for r in wins) or "no budget"))
    runs = res["runs"]
    if runs.get("runs"):
        print(f"runs: {runs['runs']} train-stage processes with known usage ({runs['reused']} reused from "
              f"earlier invocations); this invocation {fmt_seconds(res['wall_seconds'])} wall; summed over the runs: "
              f"{fmt_seconds(runs['process_seconds'])} process wall, {fmt_seconds(runs['train_seconds'])} of it "
              f"training, {fmt_seconds(runs['cpu_seconds'])} CPU (≈ {fmt_seconds(runs['cpu_seconds'] / 2)} on 2 "
              f"quiet cores); start-up (process − training wall) median {runs['startup_seconds_median']:.1f} s")
    title = (f"growth payoff ({device}, commit {res['commit']}): small {res['params']['small'] / 1e6:.3f}M → final "
             f"{res['params']['final'] / 1e6:.3f}M params, {len(res['seeds'])} seeds, grow at "
             f"{res['grow_fraction']:.0%} of the budget")
    plot(table, res["coarse"], cross, title, png, pairs)
    print(f"plot: {png}")
    return read
