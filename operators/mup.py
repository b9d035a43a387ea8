"""μP bookkeeping across growth: logit/embedding compensation and per-width LR multipliers.

Tele-FLM multiplies embeddings by ``input_mult`` and logits by ``output_mult /
mup_scale_factor`` (docs/operators.md, "μP"). When growth changes these, the function is kept by
scaling the stored weights the other way: ``embed_tokens`` by ``in_old / in_new`` and
``lm_head`` by ``scale_old / scale_new``.

Per-width learning rates follow μP for Adam (Yang et al. 2022, Table 3, with the readout
multiplier in the forward): matrices whose fan-in grows with width (q/k/v/o, gate/up/down)
take ``lr / mup_scale_factor``; embeddings, norm gains and ``lm_head`` take ``lr``.
"""

from __future__ import annotations

from flmcore.config import ModelConfig
from flmcore.params import is_block_matrix


def embedding_compensation(src: ModelConfig, dst: ModelConfig) -> float:
    return src.embedding_scale / dst.embedding_scale


def logit_compensation(src: ModelConfig, dst: ModelConfig) -> float:
    return src.logit_scale / dst.logit_scale


def lr_multiplier(config: ModelConfig, name: str) -> float:
    """Factor on the stage's LR for parameter ``name`` (HF name; any prefix allowed)."""
    if config.use_mup and is_block_matrix(name):
        return 1.0 / config.mup_scale_factor
    return 1.0


def lr_groups(config: ModelConfig, names: list[str]) -> dict[float, list[str]]:
    """Parameter names grouped by LR multiplier (one optimizer param group each)."""
    groups: dict[float, list[str]] = {}
    for name in names:
        groups.setdefault(lr_multiplier(config, name), []).append(name)
    return groups
