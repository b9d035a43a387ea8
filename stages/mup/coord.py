"""The coordinate check: does every activation's update stay the same size as width grows?

For each width, seed and step t = 0..T the model's activations on a fixed probe batch are
measured by type — ``embedding`` (embed_tokens out), ``attention`` (self_attn out),
``mlp`` (mlp out), ``residual`` (each block's output) and ``logits`` (scaled, padding
dropped) — as mean |x_t| and mean |x_t − x_0| (averaged over layers for the per-layer
types). Under μP the |Δx| curves are flat in width; under SP they grow (logits ∝ width).

Two regimes (issue 24): ``few`` trains on one small batch of few distinct inputs again and
again (2 × 16 tokens) — the infinite-width limit is reached at small widths there; ``many``
trains on the stream (8 × 64 tokens per step, a new batch each step) and probes held-out
text, where widths ≲ the number of distinct input directions are still pre-asymptotic and
|Δlogits| can fall with width even under μP. :func:`slopes` fits log |Δx_T| against
log width and :func:`flat_from` names the width from which the curve is flat.

Reference: Yang et al., Tensor Programs V (arXiv 2203.03466), the coordinate check of §D.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from growth.config import ModelConfig, at_width
from growth.model import TeleFLMForCausalLM
from stages.mup.proxy import Batch, Batches, ProxyRun, proxy_stage

KINDS = ("embedding", "attention", "mlp", "residual", "logits")
REGIMES = {"few": (2, 16), "many": (8, 64)}  # (micro batch, seq len)
TOLERANCE = 0.15  # |slope| of log|Δx| vs log width counted as flat (1.5× over 16×)


def _hooks(model: TeleFLMForCausalLM, out: dict[str, list[torch.Tensor]]) -> list[Any]:
    def keep(kind: str) -> Callable[..., None]:
        return lambda _m, _i, y: out.setdefault(kind, []).append(y.detach().float())

    m = model.model
    handles = [m.embed_tokens.register_forward_hook(keep("embedding"))]
    for layer in m.layers:
        handles += [layer.self_attn.register_forward_hook(keep("attention")),
                    layer.mlp.register_forward_hook(keep("mlp")),
                    layer.register_forward_hook(keep("residual"))]
    return handles


@torch.no_grad()
def activations(model: TeleFLMForCausalLM, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every probed activation of one forward pass on ``x``, by type (layers in order)."""
    out: dict[str, list[torch.Tensor]] = {}
    handles = _hooks(model, out)
    try:
        model.eval()
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    valid = model.config.valid_vocab_size or model.config.vocab_size
    out["embedding"] = [t * model.config.embedding_scale for t in out["embedding"]]
    out["logits"] = [logits[..., :valid].float()]
    return out


def sizes(now: dict[str, list[torch.Tensor]], start: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """kind → [mean |x|, mean |x − x_0|], each averaged over the kind's layers."""
    res = {}
    for kind in KINDS:
        xs, x0s = now[kind], start[kind]
        res[kind] = [sum(float(x.abs().mean()) for x in xs) / len(xs),
                     sum(float((x - x0).abs().mean()) for x, x0 in zip(xs, x0s, strict=True)) / len(xs)]
    return res


@dataclass
class CoordSpec:
    """What one coordinate check measures."""

    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    steps: int = 5
    seeds: tuple[int, ...] = (1, 2, 3)
    lr: float = 4e-3  # the proxy stage's peak LR, held constant (no warmup) for the T steps
    regime: str = "few"
    extra: dict[str, Any] = field(default_factory=dict)


Trajectory = list[dict[str, list[float]]]  # per step t = 0..T: kind → [|x|, |Δx|]


def trajectory(run: ProxyRun, data: Batches, probe: torch.Tensor, steps: int,
               same_batch: Batch | None) -> Trajectory:
    """Train ``steps`` updates (on ``same_batch`` every step, else the stream) and measure."""
    start = activations(run.model, probe)
    out = [sizes(start, start)]
    for t in range(steps):
        run.step([same_batch] if same_batch is not None else data.step(t))
        out.append(sizes(activations(run.model, probe), start))
    return out


def check_batches(info: dict[str, Any], regime: str) -> tuple[Batches, torch.Tensor, Batch | None]:
    """The data of a regime: the stream, the probe inputs, the one batch of ``few``."""
    mbs, seq = REGIMES[regime]
    data = Batches(info, proxy_stage(micro_batch_size=mbs, seq_len=seq, eval_batches=1))
    if regime == "few":
        batch = data.step(0)[0]
        return data, batch[0], batch
    return data, data.eval[0][0], None


def coord_check(base: ModelConfig, spec: CoordSpec, info: dict[str, Any], use_mup: bool,
                build: Callable[[ModelConfig, int, ProxyRun], ProxyRun] | None = None
                ) -> dict[int, list[Trajectory]]:
    """width → one trajectory per seed, for ``base`` at every width (μP or its SP twin).

    ``build`` may replace the run's model and optimizer (stages.mup.reference does)."""
    data, probe, same = check_batches(info, spec.regime)
    stage = proxy_stage(lr=spec.lr, warmup_steps=0, decay="constant", weight_decay=0.0)
    out: dict[int, list[Trajectory]] = {}
    for width in spec.widths:
        config = at_width(base, width, use_mup=use_mup)
        out[width] = []
        for seed in spec.seeds:
            run = ProxyRun(config, dataclasses.replace(stage, seed=seed))
            if build is not None:
                run = build(config, seed, run)
            out[width].append(trajectory(run, data, probe, spec.steps, same))
    return out


def final_delta(result: dict[int, list[Trajectory]], kind: str, step: int = -1) -> dict[int, float]:
    """width → mean |Δx| of ``kind`` at ``step`` (default the last), averaged over seeds."""
    return {w: sum(tr[step][kind][1] for tr in trs) / len(trs) for w, trs in result.items()}


def per_step(result: dict[int, list[Trajectory]]) -> dict[str, dict[str, list[list[float]]]]:
    """kind → width → per step t = 0..T [mean |x|, mean |Δx|], averaged over seeds."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for kind in KINDS:
        out[kind] = {str(w): [[sum(tr[t][kind][i] for tr in trs) / len(trs) for i in (0, 1)]
                              for t in range(len(trs[0]))] for w, trs in result.items()}
    return out


def fit_slope(points: dict[int, float]) -> float:
    """Least-squares slope of log value against log width."""
    xs = [math.log(w) for w in points]
    ys = [math.log(max(v, 1e-30)) for v in points.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def flat_from(points: dict[int, float], tol: float = TOLERANCE) -> int | None:
    """The smallest width from which the curve (≥ 3 widths) has |slope| ≤ tol; None: never."""
    widths = sorted(points)
    for i in range(len(widths) - 2):
        if abs(fit_slope({w: points[w] for w in widths[i:]})) <= tol:
            return widths[i]
    return None


def slopes(result: dict[int, list[Trajectory]], tol: float = TOLERANCE) -> dict[str, dict[str, Any]]:
    """kind → slope of log |Δx_T| vs log width, |Δx_T| per width and the flattening width."""
    out = {}
    for kind in KINDS:
        pts = final_delta(result, kind)
        out[kind] = {"slope": fit_slope(pts), "flat_from": flat_from(pts, tol),
                     "delta": {str(w): v for w, v in pts.items()}}
    return out


def verdict(mup: dict[str, dict[str, Any]], sp: dict[str, dict[str, Any]], tol: float = TOLERANCE) -> str:
    """One line: PASS when every μP curve is flat (|slope| ≤ tol), at least from some width on
    (a curve converging to its limit, e.g. |Δlogits| falling as the W_0·Δh/width term dies
    out), and SP grows in some activation (slope > tol)."""
    late = {k: s["flat_from"] for k, s in mup.items() if abs(s["slope"]) > tol and s["flat_from"]}
    bad = [k for k, s in mup.items() if abs(s["slope"]) > tol and not s["flat_from"]]
    grows = [k for k, s in sp.items() if s["slope"] > tol]
    ok = not bad and bool(grows)
    mup_text = "μP flat" if not bad else f"μP NOT flat in {', '.join(bad)}"
    if late:
        mup_text += " (" + ", ".join(f"{k} from width {w}" for k, w in late.items()) + ")"
    sp_text = f"SP grows in {', '.join(grows)}" if grows else "SP flat too (no contrast)"
    return f"{'PASS' if ok else 'FAIL'}: {mup_text} (|slope| ≤ {tol}); {sp_text}"
