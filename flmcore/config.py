"""``ModelConfig``: the architecture of a Tele-FLM / Llama decoder, as a frozen value object.

One small dataclass describes every model size (the named sizes, *flavors*, live in
``growth.config``). The field names are the HF Llama ones so ``config.json`` is read and
written without a mapping, plus the Tele-FLM μP fields (``use_mup``, ``input_mult``,
``output_mult``, ``mup_scale_factor``) and two growth fields (``valid_vocab_size``,
``growth_mask``). Shapes and counts come from the parameter table
(:mod:`flmcore.params`), arithmetically: no tensor is built, not even on the meta device.

A config never changes after construction: derive a new one with :meth:`ModelConfig.replace`
(``dataclasses.replace``), which validates again. Its two dict fields are read-only
(:class:`FrozenDict`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flmcore import params as _params
from flmcore.errors import FlmError

CONFIG_NAME = "config.json"
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "input_mult", "output_mult", "mup_scale_factor",
                 "initializer_range")

# Fields a growth event may leave in the config while MSG masks are live.
MASK_KEYS = ("c", "hidden_size", "intermediate_size", "num_key_value_heads", "new_layers")


class ConfigError(FlmError, ValueError):
    """A config value is missing, ill-typed or inconsistent; the message names the field."""


class FrozenDict(dict):
    """A read-only dict (JSON-, pickle- and copy-friendly) for the dict fields of a frozen config."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this mapping belongs to a frozen ModelConfig; build a new config with "
                        "config.replace(...) instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Tele-FLM / Llama decoder.

    Only what changes the function of the network lives here; training settings belong
    to the stage config. ``params`` and ``bytes`` count without building any weights.
    ``__post_init__`` fills the derived defaults (``num_key_value_heads``, ``head_dim``),
    makes numbers floats and dicts read-only, then :meth:`validate` checks (and never
    changes) every field.
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
    # Live MSG mask record {"c", "hidden_size", "intermediate_size", "num_key_value_heads",
    # "new_layers"} (all but c optional; the old widths and the new layer indices): set by a
    # masked growth at c = 0, ramped by the trainer through the model, gone once folded at c = 1.
    growth_mask: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, kept

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # normalising at construction only

        if self.num_key_value_heads is None:
            put("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and all(isinstance(v, int) and v > 0 for v in
                                         (self.hidden_size, self.num_attention_heads)):
            put("head_dim", self.hidden_size // self.num_attention_heads)  # else validate() names it
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                put(name, float(value))
        if isinstance(self.growth_mask, dict) and not isinstance(self.growth_mask, FrozenDict):
            put("growth_mask", FrozenDict(self.growth_mask))
        if not isinstance(self.extra, FrozenDict):
            put("extra", FrozenDict(self.extra))
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
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"field '{name}' must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"field '{name}' must be a positive finite number, got {value}")
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
        """HF Llama name → shape for every parameter, in canonical order (flmcore.params).

        Note: this lists every tensor; for counts use :attr:`num_tensors` / :attr:`params`,
        which are arithmetic (a 10⁹-layer config has 9·10⁹ tensors)."""
        return _params.tensor_shapes(self)

    def iter_tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) one at a time, in canonical order."""
        return _params.iter_tensor_shapes(self)

    @property
    def num_tensors(self) -> int:
        return _params.num_tensors(self)

    @property
    def params(self) -> int:
        return _params.num_params(self)

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
            out["growth_mask"] = dict(self.growth_mask)
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
