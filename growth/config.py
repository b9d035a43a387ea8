"""Model configuration, named flavors, HF ``config.json`` I/O and parameter counts.

One small dataclass describes every model size; sizes are *flavors* of it. The field
names are the HF Llama ones so ``config.json`` is read and written without a mapping,
plus the Tele-FLM μP fields (``use_mup``, ``input_mult``, ``output_mult``,
``mup_scale_factor``) and two growth fields (``valid_vocab_size``, ``growth_mask``).

References: GROWTH_NOTES.md §1 (architecture, published configs), the Tele-FLM seed
table (52.85B / 102.3B / 1,083.74B parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flmcore.errors import FlmError

CONFIG_NAME = "config.json"

# Fields a growth event may leave in the config while MSG masks are live.
MASK_KEYS = ("c", "hidden_size", "intermediate_size", "num_key_value_heads", "new_layers")


class ConfigError(FlmError, ValueError):
    """A config value is missing, ill-typed or inconsistent; the message names the field."""


@dataclass
class ModelConfig:
    """Architecture of a Tele-FLM / Llama decoder.

    Only what changes the function of the network lives here; training settings belong
    to the stage config. ``params`` and ``bytes`` count without building any weights.
    """

    hidden_size: int  # residual-stream width h
    intermediate_size: int  # SwiGLU inner width f (gate/up rows, down_proj columns)
    num_hidden_layers: int  # decoder blocks L
    num_attention_heads: int  # query heads; head_dim * heads need not equal hidden_size
    vocab_size: int  # rows of embed_tokens and lm_head, padding included
    num_key_value_heads: int | None = None  # None = MHA (Tele-FLM); fewer = GQA
    head_dim: int | None = None  # None = hidden_size // num_attention_heads (128 in Tele-FLM)
    rms_norm_eps: float = 1e-5  # Tele-FLM and Llama-2 default; zero hidden growth rescales it
    rope_theta: float = 10000.0  # Tele-FLM uses the original RoPE base
    max_position_embeddings: int = 4096  # Tele-FLM context length; RoPE is computed on the fly
    tie_word_embeddings: bool = False  # Tele-FLM unties; HF imports untie on the way in
    use_mup: bool = False  # apply input_mult / output_mult / mup_scale_factor below
    input_mult: float = 1.0  # embedding output multiplier (Tele-FLM: 1.0)
    output_mult: float = 1.0  # logit multiplier numerator (52B: 0.5, 1T: 2.0)
    mup_scale_factor: float = 1.0  # hidden_size / μP base width (52B: 8192/512 = 16)
    initializer_range: float = 0.02  # std of freshly initialised matrices (grow init, growth)
    valid_vocab_size: int | None = None  # ids >= this are padding, kept out of the softmax
    growth_mask: dict[str, Any] | None = None  # live MSG mask record (see growth.model)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, kept

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and all(isinstance(v, int) and v > 0 for v in
                                         (self.hidden_size, self.num_attention_heads)):
            self.head_dim = self.hidden_size // self.num_attention_heads  # else validate() names it
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "vocab_size", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"field '{name}' must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"field '{name}' must be positive, got {value}")
        for name in ("rms_norm_eps", "rope_theta", "input_mult", "output_mult",
                     "mup_scale_factor", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"field '{name}' must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"field '{name}' must be a positive finite number, got {value}")
            setattr(self, name, float(value))
        for name in ("tie_word_embeddings", "use_mup"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"field '{name}' must be true or false, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"field 'head_dim' must be even for RoPE, got {self.head_dim}")
        if self.valid_vocab_size is not None:
            v = self.valid_vocab_size
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= self.vocab_size:
                raise ConfigError(
                    f"field 'valid_vocab_size' must be an integer in 1..vocab_size "
                    f"({self.vocab_size}), got {v!r}")
        if self.growth_mask is not None:
            self._validate_mask(self.growth_mask)

    def _validate_mask(self, mask: dict[str, Any]) -> None:
        if not isinstance(mask, dict) or "c" not in mask:
            raise ConfigError("field 'growth_mask' must be an object with at least 'c'")
        unknown = set(mask) - set(MASK_KEYS)
        if unknown:
            raise ConfigError(f"field 'growth_mask' has unknown keys {sorted(unknown)}")
        c = mask["c"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise ConfigError(f"field 'growth_mask.c' must be a number in [0, 1], got {c!r}")
        for key, full in (("hidden_size", self.hidden_size),
                          ("intermediate_size", self.intermediate_size),
                          ("num_key_value_heads", self.num_key_value_heads)):
            old = mask.get(key)
            if old is not None and (not isinstance(old, int) or not 0 < old <= full):
                raise ConfigError(f"field 'growth_mask.{key}' must be an integer in 1..{full}, got {old!r}")
        for i in mask.get("new_layers") or []:
            if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                raise ConfigError(f"field 'growth_mask.new_layers' holds a bad layer index {i!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def logit_scale(self) -> float:
        """Factor on the logits: output_mult / mup_scale_factor with μP, else 1."""
        return self.output_mult / self.mup_scale_factor if self.use_mup else 1.0

    @property
    def embedding_scale(self) -> float:
        return self.input_mult if self.use_mup else 1.0

    @property
    def is_plain_llama(self) -> bool:
        """True when transformers' LlamaForCausalLM computes the same function."""
        return (not self.use_mup or (self.input_mult == 1.0 and self.logit_scale == 1.0)) \
            and self.growth_mask is None and self.valid_vocab_size in (None, self.vocab_size)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ counting
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF Llama name → shape for every parameter, in canonical order."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    @property
    def params(self) -> int:
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h

    def bytes(self, dtype: str = "bfloat16") -> int:
        return self.params * DTYPE_BYTES[dtype]

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (6N plus attention scores), PaLM appendix B."""
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * (self.params - self.vocab_size * self.hidden_size) + attn

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict[str, Any]:
        plain = self.is_plain_llama
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM" if plain else "TeleFLMForCausalLM"],
            "model_type": "llama" if plain else "teleflm",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_mup": self.use_mup,
            "input_mult": self.input_mult,
            "output_mult": self.output_mult,
            "mup_scale_factor": self.mup_scale_factor,
        }
        if self.valid_vocab_size is not None:
            out["valid_vocab_size"] = self.valid_vocab_size
        if self.growth_mask is not None:
            out["growth_mask"] = self.growth_mask
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read a Tele-FLM or plain HF Llama config dict; errors name ``source`` and the field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        data = dict(raw)
        for required in ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "vocab_size"):
            if data.get(required) is None:
                raise ConfigError(f"{source}: missing field '{required}'")
        rope = data.get("rope_parameters") or data.get("rope_scaling")
        if "rope_theta" not in data and isinstance(rope, dict) and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' = "
                              f"{rope.get('rope_type')!r} is not supported (only default RoPE)")
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' must be 'silu' (SwiGLU), got {data['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise ConfigError(f"{source}: field '{flag}' is true; biases are not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data[k] for k in names if k in data and data[k] is not None}
        if "use_mup" not in data and any(k in data for k in ("input_mult", "output_mult", "mup_scale_factor")):
            kwargs["use_mup"] = True  # Tele-FLM's own configs carry the multipliers without a flag
        skip = names | {"rope_parameters", "rope_scaling", "architectures", "model_type",
                        "hidden_act", "attention_bias", "mlp_bias", "transformers_version",
                        "torch_dtype", "dtype"}
        extra = {k: v for k, v in data.items() if k not in skip}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        except TypeError as err:  # e.g. a list where a number belongs
            raise ConfigError(f"{source}: {err}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(raw, source=str(path))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


FLAVORS: dict[str, ModelConfig] = {
    # For tests: ~0.24M parameters, Tele-FLM style (MHA, μP multipliers, untied).
    "tiny": _small(hidden=64, ffn=176, layers=4, heads=4, head_dim=16),
    # The tiny schedule (conf/schedule/tiny.yaml): stage 1 → 2 → 3 grows width, heads,
    # FFN (non-integer factors), depth and vocab padding, like 52B → 102B → 1T at toy scale.
    "tiny-s1": _small(hidden=64, ffn=176, layers=2, heads=4, head_dim=16),
    "tiny-s2": _small(hidden=80, ffn=220, layers=3, heads=5, head_dim=16),
    "tiny-s3": _small(hidden=128, ffn=352, layers=4, heads=8, head_dim=16),
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
# The seed table counts 80,000 real tokens; the padded vocabs above keep every count
# within 0.1% of it (52.82B / 102.21B / 1,083.81B vs 52.85B / 102.3B / 1,083.74B).
FLAVORS["tiny-s3"].vocab_size = 272  # vocab padding at toy scale, as 80384 → 81920


def get_flavor(name: str) -> ModelConfig:
    key = name.lower()
    if key not in FLAVORS:
        raise ConfigError(f"unknown flavor '{name}'; known flavors: {', '.join(FLAVORS)}")
    return FLAVORS[key].replace()


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
