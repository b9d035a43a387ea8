"""What to grow and how: the growth spec, its strategies and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from flmcore.errors import FlmError

HIDDEN_STRATEGIES = ("zero", "masked", "clone")
FFN_STRATEGIES = ("zero", "masked", "split")
HEAD_STRATEGIES = ("zero", "masked", "clone")
DEPTH_STRATEGIES = ("zero", "masked", "copy")
POSITION_MODES = ("interleave", "top", "bottom", "distance")
ALL_STRATEGIES = ("zero", "masked", "clone", "split", "copy")
EXACT_STRATEGIES = ("zero", "masked", "clone", "split")

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


@dataclass
class GrowthSpec:
    """Strategy per dimension plus the knobs for new weights.

    Defaults are the exact zero strategy everywhere with interleaved new layers.
    ``positions`` is a mode from POSITION_MODES or an explicit list of the *target*
    indices that hold new layers. ``init_std`` None means the model's own init
    (``growth.model.param_init_std``, μP-scaled). ``noise`` > 0 adds ± pairs of that
    std to cloned/split copies, which breaks their symmetry and keeps the function.
    ``depth_source`` says where a new layer's weights come from under zero/masked depth:
    ``neighbour`` (the layer below, or above for a bottom insert) or ``init``.
    """

    hidden: str = "zero"
    ffn: str = "zero"
    heads: str = "zero"
    depth: str = "zero"
    positions: str | list[int] = "interleave"
    seed: int = 0
    init_std: float | None = None
    noise: float = 0.0
    depth_source: str = "neighbour"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_strategy(cls, strategy: str = "zero", **overrides: Any) -> GrowthSpec:
        """``--strategy`` as the default for every dimension, then per-dimension overrides
        (None values are ignored, so argparse namespaces can be passed straight in)."""
        if strategy not in DEFAULTS_FOR:
            raise GrowthError(f"field 'strategy' must be one of {', '.join(ALL_STRATEGIES)}, got {strategy!r}")
        values: dict[str, Any] = dict(DEFAULTS_FOR[strategy])
        values.update({k: v for k, v in overrides.items() if v is not None})
        spec = cls(**values)
        spec.validate()
        return spec

    def validate(self) -> None:
        for name, allowed in (("hidden", HIDDEN_STRATEGIES), ("ffn", FFN_STRATEGIES),
                              ("heads", HEAD_STRATEGIES), ("depth", DEPTH_STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise GrowthError(f"field '{name}' must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        self.positions = parse_positions(self.positions)
        if self.noise < 0:
            raise GrowthError(f"field 'noise' must be >= 0, got {self.noise}")
        if self.init_std is not None and self.init_std < 0:
            raise GrowthError(f"field 'init_std' must be >= 0, got {self.init_std}")
        if self.depth_source not in ("neighbour", "init"):
            raise GrowthError(f"field 'depth_source' must be neighbour or init, got {self.depth_source!r}")

    @property
    def exact(self) -> bool:
        return self.depth != "copy"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrowthSpec:
        spec = cls(**data)
        spec.validate()
        return spec


def parse_positions(value: str | list[int] | tuple[int, ...]) -> str | list[int]:
    """'interleave' | 'top' | 'bottom' | 'distance' | '3,5' | [3, 5] → mode or index list."""
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
    return sorted(out)
