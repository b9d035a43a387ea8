"""What to grow and how: the growth spec, its strategies and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flmcore.errors import FlmError

HIDDEN_STRATEGIES = ("zero", "masked", "clone")
FFN_STRATEGIES = ("zero", "masked", "split")
HEAD_STRATEGIES = ("zero", "masked", "clone")
DEPTH_STRATEGIES = ("zero", "masked", "copy")
POSITION_MODES = ("interleave", "top", "bottom", "distance")
ALL_STRATEGIES = ("zero", "masked", "clone", "split", "copy")

# What `--strategy X` means for each dimension when X does not apply to it literally:
# clone widens FFN by split (its exact analogue) and deepens by zero identity blocks;
# split and copy name one dimension each and leave the others exact (zero).
DEFAULTS_FOR = {
    "zero": {"hidden": "zero", "ffn": "zero", "heads": "zero", "depth": "zero"},
    "masked": {"hidden": "masked", "ffn": "masked", "heads": "masked", "depth": "masked"},
    "clone": {"hidden": "clone", "ffn": "split", "heads": "clone", "depth": "zero"},
    "split": {"hidden": "zero", "ffn": "split", "heads": "zero", "depth": "zero"},
    "copy": {"hidden": "zero", "ffn": "zero", "heads": "zero", "depth": "copy"},
}


class GrowthError(FlmError, ValueError):
    """A growth request that cannot be honoured; the one-line message names the field."""


@dataclass(frozen=True)
class GrowthSpec:
    """Strategy per dimension plus the knobs for new weights; frozen, checked when built.

    Defaults are the exact zero strategy everywhere with interleaved new layers. Build one
    with :meth:`from_strategy` (``--strategy`` plus per-dimension overrides) or
    :meth:`from_dict` (a growth.json record); the constructor normalises ``positions``
    (``"3,5"`` → ``(3, 5)``) and :meth:`validate` only checks. Derive a changed spec with
    ``dataclasses.replace``.
    """

    hidden: str = "zero"  # hidden-size operator: zero | masked | clone (integer factors only)
    ffn: str = "zero"  # FFN-width operator: zero | masked | split (any factor, Net2Net)
    heads: str = "zero"  # head-count operator (head_dim fixed): zero | masked | clone
    depth: str = "zero"  # new-layer operator: zero (identity blocks) | masked | copy (not exact)
    # Where new layers go: a mode of POSITION_MODES, or the sorted *target* indices that
    # hold new layers (given as a list or "3,5"; stored as a tuple).
    positions: str | tuple[int, ...] = "interleave"
    seed: int = 0  # seeds every new random value, per (seed, tensor name): order-independent
    # Std of new random weights; None = the model's own init (flmcore.init.param_init_std, μP-scaled).
    init_std: float | None = None
    # Std of the ± pairs added to cloned/split copies to break their symmetry (0 = off). The
    # pairs are zero-sum over each source's copies, so the function is kept in exact
    # arithmetic only: they amplify any rounding difference between copies by about
    # noise / weight std per matrix, compounding over layers, and a 16-bit output rounds
    # w ± noise (measured in docs/operators.md). So noise > 0 makes the spec not exact.
    noise: float = 0.0
    # Where a new layer's weights come from under zero/masked depth: "neighbour" (the layer
    # below, or above for a bottom insert) or "init" (fresh).
    depth_source: str = "neighbour"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in growth.json

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", parse_positions(self.positions))  # construction only
        for name in ("noise", "init_std"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        self.validate()

    @classmethod
    def from_strategy(cls, strategy: str = "zero", **overrides: Any) -> GrowthSpec:
        """``--strategy`` as the default for every dimension, then per-dimension overrides
        (None values are ignored, so argparse namespaces can be passed straight in)."""
        if strategy not in DEFAULTS_FOR:
            raise GrowthError(f"field 'strategy' must be one of {', '.join(ALL_STRATEGIES)}, got {strategy!r}")
        values: dict[str, Any] = dict(DEFAULTS_FOR[strategy])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        """Check every field (raises GrowthError naming it); never changes the spec."""
        for name, allowed in (("hidden", HIDDEN_STRATEGIES), ("ffn", FFN_STRATEGIES),
                              ("heads", HEAD_STRATEGIES), ("depth", DEPTH_STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise GrowthError(f"field '{name}' must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if parse_positions(self.positions) != self.positions:
            raise GrowthError(f"field 'positions' is not normalised: {self.positions!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise GrowthError(f"field 'seed' must be an integer, got {self.seed!r}")
        for name in ("noise", "init_std"):
            value = getattr(self, name)
            if value is None and name == "init_std":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GrowthError(f"field '{name}' must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise GrowthError(f"field '{name}' must be a finite number >= 0, got {value}")
        if self.depth_source not in ("neighbour", "init"):
            raise GrowthError(f"field 'depth_source' must be neighbour or init, got {self.depth_source!r}")
        if not isinstance(self.extra, dict):
            raise GrowthError(f"field 'extra' must be an object, got {self.extra!r}")

    @property
    def exact(self) -> bool:
        """Function-preserving up to rounding (copy depth and ± noise on copies are not)."""
        return self.depth != "copy" and self.noise == 0

    def not_exact_reasons(self) -> list[str]:
        """Why :attr:`exact` is False, one phrase each (empty when exact)."""
        out = []
        if self.depth == "copy":
            out.append("depth 'copy' stacks existing layers, which changes the function")
        if self.noise > 0:
            out.append(f"noise {self.noise:g} on copies cancels only in exact arithmetic (rounding "
                       f"differences between copies grow with it and with depth)")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.positions, tuple):
            out["positions"] = list(self.positions)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrowthSpec:
        """A spec from its :meth:`to_dict` record (growth.json); GrowthError names a bad field."""
        if not isinstance(data, dict):
            raise GrowthError(f"field 'spec' must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GrowthError(f"field 'spec' has unknown keys {unknown}")
        return cls(**data)


def parse_positions(value: str | list[int] | tuple[int, ...]) -> str | tuple[int, ...]:
    """'interleave' | 'top' | 'bottom' | 'distance' | '3,5' | [3, 5] → mode or sorted index tuple."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str) and value in POSITION_MODES:
        return value
    elif isinstance(value, str):
        items = [p for p in value.replace(" ", "").split(",") if p]
    else:
        raise GrowthError(f"field 'positions' must be a mode or a list of layer indices, got {value!r}")
    try:
        out = [int(p) for p in items]
    except (TypeError, ValueError):
        raise GrowthError(f"field 'positions' must be one of {', '.join(POSITION_MODES)} or "
                          f"comma-separated target layer indices, got {value!r}") from None
    if len(set(out)) != len(out) or any(p < 0 for p in out):
        raise GrowthError(f"field 'positions' must hold distinct non-negative indices, got {out}")
    return tuple(sorted(out))
