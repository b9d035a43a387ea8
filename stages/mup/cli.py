"""`mup-check`: the coordinate check of a proxy model, μP against its SP twin (docs/mup.md).

    mup-check                                   # tiny-s1 at widths 32…512, both regimes
    mup-check --model my_proxy/config.json --widths 256,512,1024,2048,4096 --regime few
    mup-check --reference --plot coord.png --json

The model is the stage's (a flavor, config.json or checkpoint dir, ``stage.model``) at
every width with depth, head_dim and FFN ratio kept; μP uses its ``mup_scale_factor`` rule
(base width = hidden / mup_scale_factor), SP the same shape with ``use_mup=false``. Each
run takes T AdamW steps through the stage's μP parameter groups on embedded-corpus
batches. ``--reference`` adds microsoft's ``mup`` package on the same architecture.
Exit status 0 when the verdict is PASS, 1 when FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from stages.mup import coord

RUNS = {"mup": {"use_mup": True}, "sp": {"use_mup": False}}


def compare(base: Any, spec: coord.CoordSpec, info: dict[str, Any], reference: bool) -> dict[str, Any]:
    """μP, SP (and the ``mup`` package): slopes per activation and the verdict of one regime."""
    from stages.mup import reference as ref

    runs = dict(RUNS)
    if reference and ref.available():
        runs["mup_package"] = {"use_mup": True, "build": ref.build}
    out: dict[str, Any] = {"steps": {}}
    for name, kw in runs.items():
        result = coord.coord_check(base, spec, info, **kw)
        out[name], out["steps"][name] = coord.slopes(result), coord.per_step(result)
    out["verdict"] = coord.verdict(out["mup"], out["sp"])
    return out


def render_steps(regime: str, result: dict[str, Any]) -> str:
    """mean |x| and |Δx| per step and width, per run and activation type (seed means)."""
    lines = []
    for run, kinds in result["steps"].items():
        for kind, widths in kinds.items():
            lines.append(f"{regime} {run} {kind}: " + "; ".join(
                f"w{w} " + " ".join(f"{x:.3g}/{d:.3g}" for x, d in traj) for w, traj in widths.items()))
    return "mean |x| / mean |Δx| at steps 0..T\n" + "\n".join(lines)


def render(regime: str, result: dict[str, Any]) -> str:
    runs = [r for r in ("mup", "sp", "mup_package") if r in result]
    head = f"{'regime ' + regime:<14}" + "".join(f"{r + ' slope':>18}{'flat from':>10}" for r in runs)
    lines = [head, "-" * len(head)]
    for kind in coord.KINDS:
        cells = "".join(f"{result[r][kind]['slope']:>18.3f}{str(result[r][kind]['flat_from'] or '-'):>10}"
                        for r in runs)
        lines.append(f"{kind:<14}{cells}")
    lines.append(result["verdict"])
    return "\n".join(lines)


def report(run_dir: str, as_json: bool) -> int:
    """Best LR and loss per model of a finished (or partial) Hydra sweep."""
    from stages.mup.sweep import best_lr, collect

    curves = collect(run_dir)
    if as_json:
        print(json.dumps({m: {f"{lr:g}": v for lr, v in c.items()} for m, c in curves.items()}))
        return 0
    print(f"{'model':<20}{'best lr':>12}{'mean loss':>12}{'points':>8}")
    for model, curve in curves.items():
        lr = best_lr(curve)
        edge = " (at an end of the grid: extend it)" if lr in (min(curve), max(curve)) else ""
        print(f"{model:<20}{lr:>12g}{sum(curve[lr]) / len(curve[lr]):>12.4f}{len(curve):>8}{edge}")
    return 0 if curves else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mup-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-s1", help="flavor, config.json or checkpoint dir (μP proxy)")
    p.add_argument("--widths", default="32,64,128,256,512", help="comma-separated hidden sizes")
    p.add_argument("--steps", type=int, default=5, help="AdamW steps T")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--lr", type=float, default=4e-3, help="peak LR (before μP multipliers)")
    p.add_argument("--regime", choices=("few", "many", "both"), default="both")
    p.add_argument("--reference", action="store_true", help="also run microsoft's mup package")
    p.add_argument("--data-cache", default=None, help="where the embedded corpus is prepared (default: a temp dir)")
    p.add_argument("--plot", default=None, help="write |Δx| vs width to this PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--per-step", action="store_true", help="also print mean |x| / |Δx| per step and width")
    p.add_argument("--report", metavar="RUN_DIR", default=None,
                   help="instead: read a `train-stage -m schedule=mup_sweep` run dir, print the best LR per model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from growth.config import resolve_config
    from stages.mup.plot import coord_plot
    from stages.mup.proxy import corpus

    args = parse(argv)
    if args.report:
        return report(args.report, args.json)
    base = resolve_config(args.model)
    if not base.use_mup:
        print(f"mup-check: error: {args.model} has use_mup false; give the μP proxy", file=sys.stderr)
        return 2
    regimes = ("few", "many") if args.regime == "both" else (args.regime,)
    with tempfile.TemporaryDirectory() as tmp:
        info = corpus(args.data_cache or tmp)
        results = {r: compare(base, coord.CoordSpec(
            widths=tuple(int(w) for w in args.widths.split(",")), steps=args.steps,
            seeds=tuple(int(s) for s in args.seeds.split(",")), lr=args.lr, regime=r), info, args.reference)
            for r in regimes}
    if args.plot:
        coord_plot({f"{run} {r}": {k: v["delta"] for k, v in res[run].items()}
                    for r, res in results.items() for run in ("mup", "sp", "mup_package") if run in res},
                   args.plot)
    if args.json:
        print(json.dumps(results))
    else:
        print("\n\n".join(render(r, res) + ("\n" + render_steps(r, res) if args.per_step else "")
                          for r, res in results.items()))
    return 0 if all(res["verdict"].startswith("PASS") for res in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
