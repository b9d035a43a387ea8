"""The growth-strategy flags shared by ``grow plan`` and ``grow apply``.

``--strategy`` sets every dimension; ``--hidden/--ffn/--heads/--depth`` override one each.
Defaults are the exact ``zero`` strategy with interleaved new layers (operators.spec).
"""

from __future__ import annotations

import argparse
import logging

from operators.spec import (
    ALL_STRATEGIES,
    DEPTH_STRATEGIES,
    FFN_STRATEGIES,
    HEAD_STRATEGIES,
    HIDDEN_STRATEGIES,
    POSITION_MODES,
    GrowthSpec,
)

log = logging.getLogger(__name__)


def add_strategy_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("growth strategy")
    g.add_argument("--strategy", choices=ALL_STRATEGIES, default="zero",
                   help="default operator for every dimension (default zero: exact, new parts "
                        "zero on the output side; masked = MSG masks ramped by the trainer; "
                        "clone/split = duplicate and rescale; copy = stack existing layers, "
                        "not exact)")
    for name, allowed in (("hidden", HIDDEN_STRATEGIES), ("ffn", FFN_STRATEGIES),
                          ("heads", HEAD_STRATEGIES), ("depth", DEPTH_STRATEGIES)):
        g.add_argument(f"--{name}", choices=allowed, default=None,
                       help=f"operator for {name} growth (overrides --strategy)")
    g.add_argument("--positions", default=None, metavar="MODE|I,J,...",
                   help=f"where new layers go: {', '.join(POSITION_MODES)} or comma-separated "
                        "target layer indices (default interleave)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed for new random weights; values depend on (seed, tensor name) only "
                        "(default 0)")
    g.add_argument("--init-std", type=float, default=None, metavar="STD",
                   help="std of new random weights (default: the model's μP-scaled init)")
    g.add_argument("--noise", type=float, default=None, metavar="STD",
                   help="std of zero-sum ± noise on cloned/split copies, to break their symmetry "
                        "(default 0). Keeps the function only in exact arithmetic: rounding "
                        "differences between copies grow with it and with depth, so a growth "
                        "with noise is recorded as not exact; check it with `grow verify`")


def spec_from_args(args: argparse.Namespace) -> GrowthSpec:
    """The GrowthSpec the flags describe (raises GrowthError naming a bad field); a spec
    that is not function-preserving is logged as a warning, once, with the reason."""
    spec = GrowthSpec.from_strategy(
        args.strategy, hidden=args.hidden, ffn=args.ffn, heads=args.heads, depth=args.depth,
        positions=args.positions, seed=args.seed, init_std=args.init_std, noise=args.noise)
    for reason in spec.not_exact_reasons():
        log.warning("not function-preserving: %s", reason)
    return spec
