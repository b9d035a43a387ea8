"""Named model sizes (*flavors*) of :class:`ModelConfig`, and where a config comes from.

``ModelConfig`` itself (fields, validation, HF ``config.json`` I/O, counts) is the bottom
layer's :mod:`flmcore.config`, re-exported here. The Tele-FLM flavors follow the released
configs and the Tele-FLM paper's size table (52.85B / 102.3B / 1,083.74B parameters); see
docs/operators.md for the architecture facts they encode.
"""

from __future__ import annotations

from pathlib import Path

from flmcore.config import CONFIG_NAME, DTYPE_BYTES, MASK_KEYS, ConfigError, FrozenDict, ModelConfig

__all__ = ["CONFIG_NAME", "DTYPE_BYTES", "FLAVORS", "MASK_KEYS", "PROXY_WIDTHS", "ConfigError", "FrozenDict",
           "ModelConfig", "at_width", "get_flavor", "resolve_config"]


def _teleflm(layers: int, heads: int, hidden: int, ffn: int, vocab: int, output_mult: float,
             base_width: int) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=128, vocab_size=vocab,
        use_mup=True, input_mult=1.0, output_mult=output_mult,
        mup_scale_factor=hidden / base_width,
    )


def _small(hidden: int, ffn: int, layers: int, heads: int, head_dim: int) -> ModelConfig:
    # Byte-level vocab (256 bytes + 3 specials, padded to 264 for tidy shapes); μP base 32.
    return ModelConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        vocab_size=264, valid_vocab_size=259, max_position_embeddings=512, use_mup=True,
        input_mult=1.0, output_mult=1.0, mup_scale_factor=hidden / 32,
    )


def at_width(config: ModelConfig, hidden: int, use_mup: bool | None = None) -> ModelConfig:
    """``config`` at another width: same depth, head_dim, FFN ratio and μP base width.

    Heads = hidden / head_dim (KV heads keep their ratio); ``mup_scale_factor`` = hidden /
    base width, the base being ``config.hidden_size / config.mup_scale_factor``. With
    ``use_mup=False`` the standard parametrisation of the same shape (the μP proxy's SP twin).
    """
    base = config.hidden_size / config.mup_scale_factor
    heads = hidden // config.head_dim
    groups = config.num_key_value_groups
    if heads * config.head_dim != hidden or heads % groups:
        raise ConfigError(f"width {hidden} is not a multiple of head_dim {config.head_dim} × "
                          f"{groups} query heads per KV head")
    ffn = round(config.intermediate_size * hidden / config.hidden_size)
    return config.replace(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                          num_key_value_heads=heads // groups, mup_scale_factor=hidden / base,
                          use_mup=config.use_mup if use_mup is None else use_mup)


FLAVORS: dict[str, ModelConfig] = {
    # For tests: ~0.24M parameters, Tele-FLM style (MHA, μP multipliers, untied).
    "tiny": _small(hidden=64, ffn=176, layers=4, heads=4, head_dim=16),
    # The tiny schedule (conf/schedule/tiny.yaml): stage 1 → 2 → 3 grows width, heads,
    # FFN (non-integer factors), depth and vocab padding, like 52B → 102B → 1T at toy scale.
    "tiny-s1": _small(hidden=64, ffn=176, layers=2, heads=4, head_dim=16),
    "tiny-s2": _small(hidden=80, ffn=220, layers=3, heads=5, head_dim=16),
    # Its vocab is padded to 272, vocab padding at toy scale (as 80384 → 81920).
    "tiny-s3": _small(hidden=128, ffn=352, layers=4, heads=8, head_dim=16).replace(vocab_size=272),
    # Tele-FLM-52B's released config.json: vocab 80384 (80,000 tokens padded to a multiple
    # of 128 for tensor parallelism), μP base width 512 → mup_scale_factor 16, output_mult 0.5.
    "52b": _teleflm(64, 64, 8192, 21824, 80384, output_mult=0.5, base_width=512),
    # Tele-FLM-102B was not released: the seed table gives its shape; vocab and μP are
    # carried over from the 52B it grew from (80384, base width 512 → factor 20).
    "102b": _teleflm(80, 80, 10240, 27264, 80384, output_mult=0.5, base_width=512),
    # Tele-FLM-1T's released config.json: vocab padded to 81920, base width 256 → factor 80,
    # output_mult 2.0 (effective logit scale 1/40).
    "1t": _teleflm(140, 160, 20480, 98304, 81920, output_mult=2.0, base_width=256),
}
# μP transfer proxies (docs/mup.md): tiny-s1's shape (depth 2, head_dim 16, FFN 2.75×, base
# width 32) at width w, μP (mup-wW) and its standard-parametrisation twin (sp-wW). Their init
# std is 0.1, tuned at the base width where μP and SP coincide (0.02 under-trains at width 32).
PROXY_WIDTHS = (32, 64, 128, 256, 512, 1024)
PROXY_INIT_STD = 0.1
for _w in PROXY_WIDTHS:
    _proxy = FLAVORS["tiny-s1"].replace(initializer_range=PROXY_INIT_STD)
    FLAVORS[f"mup-w{_w}"] = at_width(_proxy, _w, use_mup=True)
    FLAVORS[f"sp-w{_w}"] = at_width(_proxy, _w, use_mup=False)
# The seed table counts 80,000 real tokens; the padded vocabs above keep every count
# within 0.1% of it (52.82B / 102.21B / 1,083.81B vs 52.85B / 102.3B / 1,083.74B).


def get_flavor(name: str) -> ModelConfig:
    key = name.lower()
    if key not in FLAVORS:
        raise ConfigError(f"unknown flavor '{name}'; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[key]  # frozen: shared safely


def resolve_config(spec: str | Path) -> ModelConfig:
    """A flavor name, a config.json path, or a checkpoint directory → ModelConfig."""
    text = str(spec)
    if text.lower() in FLAVORS:
        return get_flavor(text)
    path = Path(text)
    if path.is_dir() or path.is_file():
        return ModelConfig.load(path)
    raise ConfigError(f"'{text}' is neither a flavor ({', '.join(FLAVORS)}) nor an existing "
                      f"config.json or checkpoint directory")
