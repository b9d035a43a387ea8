"""Width growth: the per-axis maps of a plan (hidden, FFN, heads, vocab) and the shape rules.

:func:`check_shapes` refuses, in one line, a target a plan cannot grow into; :func:`width_axes`
builds the :class:`Axes` (``operators.axes`` maps) that ``operators.plan.GrowthPlan`` applies
tensor by tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flmcore.config import ModelConfig
from flmcore.init import seeded_generator
from flmcore.params import axis_size
from operators import axes as ax
from operators.spec import GrowthError, GrowthSpec

# Largest axis (entries) and depth a plan builds maps for: a plan holds a few int64/fp32
# maps per axis (~50 MB each at this size), far beyond any real width (Tele-FLM-1T's
# largest axis is FFN 98,304; large vocabularies are ~256K), so a typo such as hidden 10⁹
# is refused in one line instead of allocating gigabytes.
MAX_AXIS = 1 << 22
MAX_LAYERS = 1 << 16


@dataclass
class Axes:
    """The maps of one plan, by role."""

    hidden_write: ax.AxisMap
    hidden_read: ax.AxisMap
    ffn_write: ax.AxisMap  # gate/up rows
    ffn_read: ax.AxisMap  # down_proj columns
    q_write: ax.AxisMap  # q_proj rows (elements)
    kv_write: ax.AxisMap  # k/v rows
    heads_read: ax.AxisMap  # o_proj columns
    vocab: ax.AxisMap
    norm_scale: float  # zero hidden growth: gains × sqrt(h_old/h_new)

    def of(self, axis: str) -> ax.AxisMap:
        """The map of a parameter-table axis name (flmcore.params)."""
        return {"vocab": self.vocab, "hidden.out": self.hidden_write, "hidden.in": self.hidden_read,
                "q.out": self.q_write, "kv.out": self.kv_write, "q.in": self.heads_read,
                "ffn.out": self.ffn_write, "ffn.in": self.ffn_read}[axis]



def width_axes(s: ModelConfig, t: ModelConfig, spec: GrowthSpec) -> Axes:
    """The axis maps of growing ``s`` into ``t``'s widths (hidden, FFN, heads, vocab) under ``spec``."""
    gen = seeded_generator(spec.seed, "operators:choices")
    h0, h1 = s.hidden_size, t.hidden_size
    if h1 == h0:
        hw = hr = ax.identity(h0)
        norm_scale = 1.0
    elif spec.hidden == "clone":
        src = ax.tiled(h0, h1)
        hw, hr = ax.duplicated(src, divide=False), ax.duplicated(src, divide=True)
        norm_scale = 1.0
    else:
        masked = spec.hidden == "masked"
        hw = ax.padded(h0, h1, "init" if masked else "zero", masked)
        hr = ax.padded(h0, h1, "init", masked)
        norm_scale = 1.0 if masked else math.sqrt(h0 / h1)
    f0, f1 = s.intermediate_size, t.intermediate_size
    if f1 == f0:
        fw = fr = ax.identity(f0)
    elif spec.ffn == "split":
        src = ax.extra_choice(f0, f1, gen)
        fw, fr = ax.duplicated(src, divide=False), ax.duplicated(src, divide=True)
    else:
        masked = spec.ffn == "masked"
        fw = ax.padded(f0, f1, "init", masked)
        fr = ax.padded(f0, f1, "init" if masked else "zero", masked)
    k0, k1, g = s.num_key_value_heads, t.num_key_value_heads, s.num_key_value_groups
    if k1 == k0:
        kvw = ax.identity(k0)
        qw = ax.identity(k0 * g)
        hr_heads = ax.identity(k0 * g)
    elif spec.heads == "clone":
        kv_src = ax.extra_choice(k0, k1, gen) if k1 % k0 else ax.tiled(k0, k1)
        q_src = (kv_src[:, None] * g + torch.arange(g)).reshape(-1)
        kvw, qw = ax.duplicated(kv_src, divide=False), ax.duplicated(q_src, divide=False)
        hr_heads = ax.duplicated(q_src, divide=True)
    else:
        masked = spec.heads == "masked"
        kvw = ax.padded(k0, k1, "init", masked)
        qw = ax.padded(k0 * g, k1 * g, "init", masked)
        hr_heads = ax.padded(k0 * g, k1 * g, "init" if masked else "zero", masked)
    d = s.head_dim
    vocab = (ax.identity(s.vocab_size) if t.vocab_size == s.vocab_size
             else ax.padded(s.vocab_size, t.vocab_size, "zero"))
    return Axes(hw, hr, fw, fr, qw.expand(d), kvw.expand(d), hr_heads.expand(d), vocab, norm_scale)


def folded_source(src: ModelConfig) -> ModelConfig:
    mask = src.growth_mask
    if mask is None:
        return src
    if float(mask["c"]) < 1.0:
        raise GrowthError(f"field 'growth_mask.c': the source has an unfinished masked growth "
                          f"(c = {mask['c']}); train until the ramp reaches c = 1 (the trainer folds "
                          f"the masks) before growing again")
    return src.replace(growth_mask=None)  # at c = 1 the masked model is the plain model


def check_shapes(s: ModelConfig, t: ModelConfig, spec: GrowthSpec) -> None:
    for field, value, limit in [(axis, axis_size(t, axis), MAX_AXIS) for axis in
                                ("vocab", "hidden", "ffn", "q", "kv")] + \
            [("num_hidden_layers", t.num_hidden_layers, MAX_LAYERS)]:
        if value > limit:
            name = {"vocab": "vocab_size", "hidden": "hidden_size", "ffn": "intermediate_size",
                    "q": "num_attention_heads × head_dim", "kv": "num_key_value_heads × head_dim"
                    }.get(field, field)
            raise GrowthError(f"field '{name}': the target's {value:,} exceeds what a growth plan "
                              f"builds maps for ({limit:,}); check the target config")
    if t.head_dim != s.head_dim:
        raise GrowthError(f"field 'head_dim': growing head_dim ({s.head_dim} → {t.head_dim}) is not "
                          f"exact under RoPE (rotation pairs move); keep head_dim and grow "
                          f"num_attention_heads instead")
    for field, a, b in (("hidden_size", s.hidden_size, t.hidden_size),
                        ("intermediate_size", s.intermediate_size, t.intermediate_size),
                        ("num_hidden_layers", s.num_hidden_layers, t.num_hidden_layers),
                        ("num_attention_heads", s.num_attention_heads, t.num_attention_heads),
                        ("num_key_value_heads", s.num_key_value_heads, t.num_key_value_heads),
                        ("vocab_size", s.vocab_size, t.vocab_size)):
        ax.check_grows(field, a, b)
    if t.num_key_value_groups != s.num_key_value_groups:
        raise GrowthError(
            f"field 'num_key_value_heads': heads must grow by whole GQA groups of "
            f"{s.num_key_value_groups} query heads per KV head (source {s.num_attention_heads}/"
            f"{s.num_key_value_heads}, target {t.num_attention_heads}/{t.num_key_value_heads})")
    if t.rope_theta != s.rope_theta:
        raise GrowthError(f"field 'rope_theta': changing the RoPE base ({s.rope_theta} → {t.rope_theta}) "
                          f"changes the function; keep it")
    if spec.hidden == "clone" and t.hidden_size % s.hidden_size:
        raise GrowthError(f"field 'hidden': clone needs an integer factor ({s.hidden_size} → "
                          f"{t.hidden_size} is {t.hidden_size / s.hidden_size:g}×); use zero or masked")

