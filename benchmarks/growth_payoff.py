"""Does growth pay? The tiny schedule (grown stages) against the final size from scratch.

Both runs train on the embedded corpus with ``train-stage`` (2 CPU ranks, DeepSpeed
ZeRO-1, fp32), evaluate the same fixed held-out batches every ``--eval-every`` steps, and
spend the same total training FLOPs (``summary.json`` ``flops``: 6·N_non-embedding + attention
per token, ``ModelConfig.flops_per_token``):

- **growth**: ``train-stage -m schedule=tiny`` — tiny-s1 (fresh) → zero growth → tiny-s2
  (re-warm to 0.85× the peak) → MSG masked growth → tiny-s3 (restart at its peak), each
  stage with its own settings from conf/stage/tiny_s*.yaml;
- **scratch**: tiny-s3 from a fresh init (``stage=tiny_s3 stage.parent=null``) for as many
  steps as the growth run's FLOPs buy at tiny-s3's cost per step, with the LR rules of the
  schedule's from-scratch stage tiny_s1 (peak 3e-3, warmup 20, cosine to 0.1×; μP makes
  the peak width-independent), the same batch shape, the same data and eval batches.

The comparison: scratch's final eval loss L*; the FLOPs each run needs to first reach L*
(linear interpolation between eval points, along FLOPs); the ratio growth / scratch
(target ≤ 0.55). Nothing is tuned for the comparison: the schedule runs as configured.

    python benchmarks/growth_payoff.py                        # trains both (~10-30 min on 2 cores)
    python benchmarks/growth_payoff.py --run-dir runs/payoff  # re-run: finished stages are reused
    python benchmarks/growth_payoff.py --smoke                # synthetic curves, no training (tests)

Writes the loss-vs-FLOPs plot (``--png``, default docs/growth_payoff.png) with the growth
points marked. The last line printed is a JSON object; ``flops_ratio_to_reach_scratch_loss``
is growth / scratch (null when growth never reaches L*).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, emit_json, fmt_seconds, machine_info, print_machine, print_table

GROWTH_STAGES = ["tiny_s1", "tiny_s2", "tiny_s3"]
SCRATCH_STAGE = "scratch_s3"  # stage.name of the from-scratch run inside the run dir
SCRATCH_LR_FROM = "tiny_s1"  # the schedule's from-scratch stage: its LR rules apply to scratch


@dataclass
class Curve:
    """Eval loss against cumulative training FLOPs; ``marks`` are growth points."""

    name: str
    flops: list[float]
    loss: list[float]
    marks: list[tuple[float, str]] = field(default_factory=list)
    wall_seconds: float = 0.0


# ---------------------------------------------------------------------- analysis (pure)
def flops_to_reach(curve: Curve, target: float) -> float | None:
    """First FLOPs at which the piecewise-linear eval curve reaches ``target`` (≤), or None."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if l1 <= target < l0:
            return f0 + (l0 - target) / (l0 - l1) * (f1 - f0)
    return None


def loss_at(curve: Curve, flops: float) -> float:
    """Eval loss at ``flops`` by linear interpolation (clamped to the curve's ends)."""
    pts = list(zip(curve.flops, curve.loss, strict=True))
    if flops <= pts[0][0]:
        return pts[0][1]
    for (f0, l0), (f1, l1) in zip(pts, pts[1:], strict=False):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (flops - f0) / (f1 - f0) * (l1 - l0)
    return pts[-1][1]


def compare(growth: Curve, scratch: Curve) -> dict[str, Any]:
    target = scratch.loss[-1]
    g, s = flops_to_reach(growth, target), flops_to_reach(scratch, target)
    return {
        "scratch_final_eval_loss": target,
        "growth_final_eval_loss": growth.loss[-1],
        "growth_total_flops": growth.flops[-1],
        "scratch_total_flops": scratch.flops[-1],
        "growth_flops_to_reach": g,
        "scratch_flops_to_reach": s,
        "flops_ratio_to_reach_scratch_loss": None if g is None or not s else g / s,
        "growth_loss_at_half_budget": loss_at(growth, scratch.flops[-1] / 2),
        "scratch_loss_at_half_budget": loss_at(scratch, scratch.flops[-1] / 2),
    }


# ---------------------------------------------------------------------- plot
def plot(growth: Curve, scratch: Curve, controls: list[Curve], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(scratch.flops, scratch.loss, "-o", ms=2.5, color="tab:gray", label=scratch.name)
    for curve, color in zip(controls, ("tab:orange", "tab:green", "tab:purple"), strict=False):
        ax.plot(curve.flops, curve.loss, "--", lw=1.2, color=color, label=f"control, {curve.name}")
    ax.plot(growth.flops, growth.loss, "-o", ms=2.5, color="tab:blue", label=growth.name)
    for x, label in growth.marks:
        ax.axvline(x, color="tab:blue", ls=":", lw=1)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="tab:blue", va="top")
    target = result["scratch_final_eval_loss"]
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"scratch final eval loss {target:.3f}")
    for key, color in (("growth_flops_to_reach", "tab:blue"), ("scratch_flops_to_reach", "tab:gray")):
        if result[key] is not None:
            ax.plot([result[key]], [target], "x", color=color, ms=9, mew=2)
    ratio = result["flops_ratio_to_reach_scratch_loss"]
    ax.set_title("growth vs scratch on the embedded corpus: "
                 + (f"growth needs {ratio:.2f}× scratch's FLOPs" if ratio is not None
                    else "growth does not reach scratch's final loss"), fontsize=10)
    ax.set_xlabel("training FLOPs (cumulative, 6N + attention per token)")
    ax.set_ylabel("eval loss (nats/byte, fixed held-out batches)")
    top = max(growth.loss[min(2, len(growth.loss) - 1)], scratch.loss[min(2, len(scratch.loss) - 1)])
    ax.set_ylim(min(min(c.loss) for c in (growth, scratch, *controls)) - 0.05, top)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- running train-stage
def train_stage(args: list[str], log: Path) -> float:
    """``train-stage ARGS`` with output to ``log``; seconds; raises with the log's tail on failure."""
    exe = Path(sys.executable).parent / "train-stage"
    argv = [str(exe) if exe.exists() else "train-stage", *args]
    print(f"$ {' '.join(argv[1:] if exe.exists() else argv)}   (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"train-stage {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return seconds


def eval_points(stage_dir: Path) -> list[tuple[int, float]]:
    """(step, eval loss) from the stage's TensorBoard scalars ``eval/loss``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    points: dict[int, float] = {}
    for event in acc.Scalars("eval/loss"):
        points[event.step] = event.value  # a resumed stage may log a step twice: keep the last
    return sorted(points.items())


def stage_curve(stage_dirs: list[Path], name: str, labels: list[str]) -> Curve:
    """Concatenate stages along cumulative FLOPs; a mark where each later stage starts."""
    curve = Curve(name, [], [])
    offset = 0.0
    for i, stage_dir in enumerate(stage_dirs):
        summary = json.loads((stage_dir / "summary.json").read_text())
        per_step = summary["flops"] / summary["steps"]
        if i:
            curve.marks.append((offset, labels[i]))
        for step, loss in eval_points(stage_dir):
            curve.flops.append(offset + step * per_step)
            curve.loss.append(loss)
        offset += summary["flops"]
        curve.wall_seconds += summary["wall_seconds"]
    return curve


def summaries(run_dir: Path, names: list[str]) -> list[dict[str, Any]]:
    return [json.loads((run_dir / n / "summary.json").read_text()) for n in names]


def run_real(args: argparse.Namespace) -> tuple[Curve, Curve, list[Curve], list[list[Any]], dict[str, Any]]:
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "growth_payoff.log"
    common = [f"run_dir={run_dir}", f"stage.eval_every={args.eval_every}", f"nproc={args.nproc}"]
    if not all((run_dir / n / "summary.json").is_file() for n in GROWTH_STAGES):
        train_stage(["-m", "schedule=tiny", *common], log)
    grown = summaries(run_dir, GROWTH_STAGES)
    growth_flops = sum(s["flops"] for s in grown)

    lr_rules = _lr_rules(_stage_yaml(SCRATCH_LR_FROM))
    scratch_runs = [(GROWTH_STAGES[-1], SCRATCH_STAGE)]
    scratch_runs += [(c, f"scratch_{c.removeprefix('tiny_')}") for c in args.controls if c != GROWTH_STAGES[-1]]
    curves, run_summaries, steps_of = [], [], {}
    for stage_name, run_name in scratch_runs:
        steps = scratch_steps(stage_name, growth_flops, args.nproc)
        steps_of[run_name] = steps
        if not (run_dir / run_name / "summary.json").is_file():
            train_stage([f"stage={stage_name}", f"stage.name={run_name}", "stage.parent=null",
                         f"stage.steps={steps}", *(f"stage.{k}={v}" for k, v in lr_rules.items()), *common], log)
        run_summaries.append(summaries(run_dir, [run_name])[0])
        model = _stage_yaml(stage_name)["model"]
        curves.append(stage_curve([run_dir / run_name], f"scratch: {model}, {steps} steps", [""]))

    labels = ["", "grow s1→s2 (zero)", "grow s2→s3 (masked)"]
    growth = stage_curve([run_dir / n for n in GROWTH_STAGES], "growth: tiny-s1 → s2 → s3", labels)
    rows = [[s["stage"], _params(s["params"]), s["steps"], f"{s['flops']:.3g}", f"{s['eval_loss_start']:.4f}",
             f"{s['eval_loss_end']:.4f}", f"{s['lr_peak']:.2g}", fmt_seconds(s["wall_seconds"])]
            for s in [*grown, *run_summaries]]
    setup = {"run_dir": str(run_dir), "scratch_steps": steps_of, "scratch_lr_rules": lr_rules,
             "scratch_lr_from": SCRATCH_LR_FROM, "nproc": args.nproc, "eval_every": args.eval_every,
             "stages": grown + run_summaries}
    return growth, curves[0], curves[1:], rows, setup


def scratch_steps(stage_name: str, flops: float, nproc: int) -> int:
    """Optimizer steps of ``stage_name``'s model and batch shape that cost ``flops``."""
    from growth.config import resolve_config

    stage = _stage_yaml(stage_name)
    model = resolve_config(stage["model"])
    tokens_per_step = stage["micro_batch_size"] * stage["grad_accum"] * stage["seq_len"] * nproc
    return round(flops / (model.flops_per_token(stage["seq_len"]) * tokens_per_step))


def _lr_rules(stage: dict[str, Any]) -> dict[str, Any]:
    """The from-scratch stage's LR rules and seed (StageCfg defaults where the yaml is silent)."""
    from stages.config import StageCfg

    keys = ("lr", "warmup_steps", "decay", "min_lr_ratio", "seed")
    return {k: stage.get(k, getattr(StageCfg(), k)) for k in keys}


def _stage_yaml(name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "stage" / f"{name}.yaml"))
    stage = dict(raw["stage"])  # type: ignore[index]
    model = next((d["override /model"] for d in raw.get("defaults", [])  # type: ignore[union-attr]
                  if isinstance(d, dict) and "override /model" in d), None)
    stage["model"] = model or stage.get("model")
    return stage


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------------- smoke: synthetic curves
def synthetic() -> tuple[Curve, Curve, list[Curve], list[list[Any]], dict[str, Any]]:
    """Made-up power-law curves with two growth points: exercises analysis, table, plot, JSON."""
    def law(f: float, a: float) -> float:
        return 1.5 + a * (1 + f / 1e12) ** -0.5

    xs = [i * 1e11 for i in range(31)]
    growth = Curve("growth (synthetic)", xs, [law(x, 3.3) - (0.1 if x > 1e12 else 0) for x in xs],
                   marks=[(1e12, "grow 1"), (2e12, "grow 2")])
    scratch = Curve("scratch (synthetic)", xs, [law(x, 3.5) for x in xs])
    small = Curve("scratch small (synthetic)", xs, [law(x, 3.2) + 0.05 for x in xs])
    return growth, scratch, [small], [["synthetic", "-", 30, "3e12", "-", "-", "-", "-"]], {"synthetic": True}


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run-dir", default="runs/growth_payoff",
                   help="where both runs train (default runs/growth_payoff); finished stages are reused")
    p.add_argument("--eval-every", type=int, default=20, help="eval every N steps in every stage (default 20)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per stage (default 2)")
    p.add_argument("--controls", default="tiny_s2",
                   help="comma-separated stages whose model also trains from scratch at the same FLOPs, "
                        "to tell growth from 'a smaller model is more FLOP-efficient here' (default tiny_s2; "
                        "'' for none)")
    p.add_argument("--png", default=str(REPO / "docs" / "growth_payoff.png"),
                   help="loss-vs-FLOPs plot (default docs/growth_payoff.png)")
    p.add_argument("--smoke", action="store_true",
                   help="synthetic curves, no training; the plot goes to a temp dir unless --png is given")
    args = p.parse_args(argv)
    args.controls = [c for c in args.controls.split(",") if c]
    if args.smoke and "--png" not in (argv if argv is not None else sys.argv[1:]):
        args.png = str(Path(tempfile.mkdtemp(prefix="growth_payoff-")) / "growth_payoff.png")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = machine_info()
    print_machine(info)
    growth, scratch, controls, rows, setup = synthetic() if args.smoke else run_real(args)
    result = compare(growth, scratch)
    target = result["scratch_final_eval_loss"]
    print_table(["stage", "params", "steps", "FLOPs", "eval start", "eval end", "peak LR", "wall"], rows,
                title="stages (summary.json)")
    table, control_results = [], []
    base = result["scratch_flops_to_reach"]
    for curve in [growth, scratch, *controls]:
        reach = flops_to_reach(curve, target)
        rel = None if reach is None or not base else reach / base
        table.append([curve.name, f"{curve.flops[-1]:.3g}", f"{curve.loss[-1]:.4f}",
                      "never" if reach is None else f"{reach:.3g}", "-" if rel is None else f"{rel:.3f}",
                      f"{loss_at(curve, scratch.flops[-1] / 2):.4f}", fmt_seconds(curve.wall_seconds)])
        if curve in controls:
            control_results.append({"name": curve.name, "final_eval_loss": curve.loss[-1], "flops_to_reach": reach,
                                    "flops_ratio_to_reach_scratch_loss": rel,
                                    "curve": {"flops": curve.flops, "eval_loss": curve.loss}})
    print_table(["run", "total FLOPs", "final eval loss", f"FLOPs to reach {target:.4f}", "÷ scratch",
                 "loss at ½ budget", "wall"], table, title="at equal total FLOPs (target: scratch's final eval loss)")
    ratio = result["flops_ratio_to_reach_scratch_loss"]
    if ratio is None:
        print(f"\ngrowth does NOT reach scratch's final eval loss {target:.4f} "
              f"(it ends at {result['growth_final_eval_loss']:.4f}): no FLOPs saving at this scale")
    else:
        verdict = "meets" if ratio <= 0.55 else "misses"
        print(f"\ngrowth reaches scratch's final eval loss with {ratio:.3f}× scratch's FLOPs "
              f"({verdict} the ≤ 0.55 target; {1 / ratio:.2f}× speed-up)")
    for c in control_results:
        r = c["flops_ratio_to_reach_scratch_loss"]
        print(f"control {c['name']}: " + ("never reaches it" if r is None else f"{r:.3f}× scratch's FLOPs")
              + f", ends at {c['final_eval_loss']:.4f}")
    plot(growth, scratch, controls, result, Path(args.png))
    print(f"plot: {args.png}")
    out = {"benchmark": "growth_payoff", **result, "controls": control_results,
           "growth_curve": {"flops": growth.flops, "eval_loss": growth.loss, "marks": growth.marks},
           "scratch_curve": {"flops": scratch.flops, "eval_loss": scratch.loss},
           "png": args.png, "setup": setup, "smoke": args.smoke, "machine": info}
    ratio_out = out["flops_ratio_to_reach_scratch_loss"]
    if ratio_out is not None and not math.isfinite(ratio_out):
        out["flops_ratio_to_reach_scratch_loss"] = None
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
