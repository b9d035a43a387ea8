"""The design: the four arms, the presets (model shapes, batch, budgets) per device."""

from __future__ import annotations

from dataclasses import dataclass

from flmcore.errors import FlmError

ARMS = ("growth", "stack", "scratch_final", "scratch_small")


CONTROLS = ("scratch_final", "scratch_small")


GROWN = {"growth": "zero", "stack": "copy"}  # arm → conf/growth/<strategy>.yaml


SUMMARY = "summary.json"


class PayoffError(FlmError):
    """A train-stage run failed or the setup is inconsistent; the message names the run."""


@dataclass(frozen=True)
class Preset:
    """Model sizes, batch shape and budget grid of one device."""

    small: dict[str, int]  # ModelConfig shape fields of the small model
    final: dict[str, int]  # … of the final model (same width, 2× the layers)
    seq_len: int
    micro_batch_size: int
    coarse: tuple[float, ...]  # coarse-sweep budgets (FLOPs)
    lr: float  # base peak LR (μP: hidden matrices get lr / mup_scale_factor)
    warmup_steps: int
    eval_batches: int
    budgets: tuple[float, ...] = ()  # the main grid's budgets (the coarse sweep is opt-in: --coarse)
    arms: tuple[str, ...] = ARMS  # the arms run by default (--arms)
    overrides: tuple[str, ...] = ()  # device-specific train-stage overrides
    jobs: int = 2
    # the data (benchmarks/payoff/corpus.py): the embedded corpus's files cut into documents of
    # ≤ chunk_bytes; the eval set is the next eval_bytes of the standard library, never trained on
    max_bytes: int = 8_000_000
    eval_bytes: int = 1_000_000
    chunk_bytes: int = 2048


def _shape(hidden: int, ffn: int, layers: int, heads: int, head_dim: int) -> dict[str, int]:
    return {"hidden": hidden, "ffn": ffn, "layers": layers, "heads": heads, "head_dim": head_dim}


PRESETS: dict[str, Preset] = {
    # 2 CPU cores: 1 → 2 layers at width 32 (12.5k → 25k non-embedding parameters, 30k → 42k
    # in all). On these cores a step costs ~25-50 ms whatever the size (overhead-bound), and
    # every pair we tried is step-limited: at equal FLOPs the smaller model's extra steps win
    # until it saturates, which the 1-layer model does soonest (docs/benchmarks.md).
    "cpu": Preset(small=_shape(32, 88, 1, 2, 16), final=_shape(32, 88, 2, 2, 16), seq_len=128,
                  micro_batch_size=8, coarse=(2e11, 4e11, 8e11, 1.6e12), lr=3e-3, warmup_steps=20,
                  eval_batches=128, budgets=(2e11, 4e11, 8e11), arms=("growth", "scratch_final", "scratch_small"),
                  jobs=2),
    # One GPU, the same design ~100× in parameters (1 → 2 layers at width 320: 1.24M → 2.48M
    # non-embedding) and ~100× in tokens (10× the batch, 10× the steps), so ~1e4× the FLOPs,
    # bf16. Such budgets read ~1e8-1e9 tokens: far more than the embedded corpus (8 MB), so
    # pass a real corpus, e.g. --override data.source=/data/corpus.jsonl.
    "cuda": Preset(small=_shape(320, 864, 1, 5, 64), final=_shape(320, 864, 2, 5, 64), seq_len=128,
                   micro_batch_size=80, coarse=(2e15, 4e15, 8e15, 1.6e16), lr=3e-3, warmup_steps=200,
                   eval_batches=16, budgets=(4e15, 8e15, 1.6e16), overrides=("deepspeed.precision=bf16",), jobs=1),
    # The test suite: the smallest shapes that still grow 2 → 4 layers; one budget of ~30 steps.
    "smoke": Preset(small=_shape(32, 88, 2, 2, 16), final=_shape(32, 88, 4, 2, 16), seq_len=64,
                    micro_batch_size=4, coarse=(2e9,), lr=3e-3, warmup_steps=4, eval_batches=2,
                    budgets=(2e9,), max_bytes=300_000, eval_bytes=50_000),
}


def model_config(shape: dict[str, int]):
    """The ModelConfig of a preset shape: the tiny flavors' byte vocab and μP (base width 32)."""
    from growth.config import ModelConfig

    return ModelConfig(hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], head_dim=shape["head_dim"],
                       vocab_size=264, valid_vocab_size=259, max_position_embeddings=1024,
                       use_mup=True, input_mult=1.0, output_mult=1.0,
                       mup_scale_factor=shape["hidden"] / 32)
