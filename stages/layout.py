"""The parallel layout of a stage: tensor × pipeline × data parallel degrees.

DeepSpeed's ranks are split ``world = TP × PP × DP`` with TP innermost (ranks that share a
tensor-parallel group are consecutive, so TP 8 stays inside one 8-GPU node), as
``PipeModelDataParallelTopology`` orders them. Data parallel is what is left:
``DP = world / (TP × PP)``.

Tensor parallelism splits every attention layer by whole heads (q by query heads, k/v by
key-value heads), every SwiGLU by whole FFN units, and embed_tokens / lm_head by vocab
rows, so TP must divide ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size`` and ``vocab_size``. The vocab is not padded here: a vocab that TP does
not divide is an error that says which multiple to pad to (``grow`` pads vocab rows with
``valid_vocab_size`` keeping the padding out of the softmax; 80384 and 81920, Tele-FLM's
padded vocabs, divide by every power of two up to 128 and 2048).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from growth.config import ModelConfig
from stages.schema import StageConfigError, TrainConfig


class LayoutError(StageConfigError):
    """A TP × PP × DP layout that cannot run (names the field and what to change)."""


@dataclass(frozen=True)
class Layout:
    """What the dry run and the engines need to know about a stage's parallel layout: the
    degrees of each kind of parallelism and the batch shape (torchtitan's ``ParallelDims``)."""

    tp: int  # tensor-parallel degree (deepspeed.tensor_parallel)
    pp: int  # pipeline stages (1 without deepspeed.pipeline)
    dp: int  # data-parallel replicas = ranks / (tp × pp)
    zero_stage: int
    micro_batch_size: int  # sequences per data-parallel replica per micro step
    grad_accum: int  # micro batches per optimizer step (m of the 1F1B schedule)
    seq_len: int
    activation_checkpointing: bool

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def bubble(self) -> float:
        """Idle fraction of plain 1F1B: (p − 1) / (m + p − 1); 0 without a pipeline."""
        return (self.pp - 1) / (self.grad_accum + self.pp - 1)

    @property
    def tokens_per_step(self) -> int:
        return self.dp * self.micro_batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, cfg: TrainConfig) -> Layout:
        """The layout of a checked TrainConfig (stages.validate.check_layout_fields holds its rules)."""
        stage, ds = cfg.stage, cfg.deepspeed
        tp = ds.tensor_parallel
        pp = ds.pipeline_stages if ds.pipeline else 1
        return cls(tp=tp, pp=pp, dp=cfg.world // (tp * pp), zero_stage=ds.zero_stage,
                   micro_batch_size=stage.micro_batch_size, grad_accum=stage.grad_accum,
                   seq_len=stage.seq_len, activation_checkpointing=bool(ds.activation_checkpointing))


def check_model_split(config: ModelConfig, tp: int, what: str = "stage.model") -> None:
    """TP divides heads, kv heads, FFN units and vocab rows of ``config`` (one-line error)."""
    if tp == 1:
        return
    for field_name, value in (("num_attention_heads", config.num_attention_heads),
                              ("num_key_value_heads", config.num_key_value_heads),
                              ("intermediate_size", config.intermediate_size),
                              ("vocab_size", config.vocab_size)):
        if value % tp:
            hint = (f"; pad the vocabulary to {-(-value // tp) * tp} rows (grow keeps padded rows out of "
                    f"the softmax via valid_vocab_size)" if field_name == "vocab_size" else
                    "; pick a tensor_parallel that divides it")
            raise LayoutError(f"deepspeed.tensor_parallel {tp} does not divide {what}'s {field_name} "
                              f"({value}): TP splits by whole heads / FFN units / vocab rows{hint}")


def check_stage_layout(cfg: TrainConfig, target: ModelConfig) -> None:
    """The orchestrator's layout check, before any worker starts: TP splits the stage's model.
    A training run with TP > 1 uses one of the TP engines: ZeRO-0/1/2/3 without a pipeline
    (stages.engines.tensor_parallel.zero; ZeRO-3 partitions over the data-parallel group only),
    ZeRO-0/1 inside DeepSpeed's pipeline (stages.engines.tensor_parallel.pipeline; the pipeline refuses
    ZeRO-2/3 itself, stages.validate.check_deepspeed)."""
    check_model_split(target, cfg.deepspeed.tensor_parallel)
