"""Function-preservation check: a source and a grown checkpoint on the same tokens.

Both models run in fp32 (whatever the stored dtype) on the same token ids drawn from the
source's valid vocabulary; logits are compared over those ids (the grown model may pad
its vocab further) and the next-token loss over the full softmax. Masked checkpoints run
at their stored c (``config.growth_mask``), as the trainer would.

Two ways to run a model, with identical arithmetic (the same modules of
:mod:`growth.model`):

- in memory: :func:`growth.model.build_model` from the whole state dict;
- streaming: the model is built on the meta device, the embedding, final norm and lm_head
  are loaded, and each decoder layer is loaded, applied and dropped in turn, so only one
  layer's weights and the activations are resident. Used when the two models together
  exceed ``streaming_threshold`` bytes of fp32 (or when asked).

Note: the default tolerance is relative to the largest |logit| of the source: 1e-5 when
both checkpoints are stored in fp32 (growth is exact up to summation order). When either
is 16-bit it is derived from the source's own rounding error: the source is run a second
time with every weight rounded once more to the 16-bit dtype (an fp32 source cast to it;
a source already in 16 bits perturbed by half an ulp, seeded), and the tolerance is
CAST_ERROR_FACTOR times the relative logit error that one rounding causes (at least 1e-5).
A plain fp32 → bf16 cast therefore always passes, while a real defect (relative errors of
0.1 and more) still fails. A fixed 5e-3 sat at bf16's own noise: plain casts failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import CheckpointError, CheckpointReader, parse_size
from growth.model import TeleFLMForCausalLM, build_model, causal_lm_loss, rope_cos_sin, scale_logits
from growth.tensor_io import TensorSource

FP32_TOLERANCE = 1e-5
CAST_ERROR_FACTOR = 3.0
LOW_PRECISION = (torch.bfloat16, torch.float16)
DEFAULT_STREAMING_THRESHOLD = "8GB"


@dataclass
class VerifyResult:
    source: str
    grown: str
    mode: str  # "memory" | "streaming"
    batch: int
    seq_len: int
    seed: int
    compared_vocab: int
    grown_c: float | None
    max_abs_logit_diff: float
    max_abs_logit: float
    relative_logit_diff: float
    loss_source: float
    loss_grown: float
    loss_diff: float
    tolerance: float  # relative
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_ids(vocab: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(batch, seq_len + 1) token ids in [0, vocab): inputs are [:, :-1], labels [:, 1:]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)


def rounded(t: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``t`` (stored dtype) rounded once to ``dtype``, as fp32: a cast for wider tensors,
    a half-ulp relative perturbation (then the cast) for tensors already that narrow."""
    if t.dtype != dtype:
        return t.to(dtype).float()
    ulp = torch.finfo(dtype).eps
    noise = (torch.rand(t.shape, generator=gen) - 0.5) * ulp
    return (t.float() * (1 + noise)).to(dtype).float()


def _getter(reader: CheckpointReader, round_to: torch.dtype | None) -> Any:
    gen = torch.Generator().manual_seed(0)
    if round_to is None:
        return lambda name: reader.get(name, torch.float32)
    return lambda name: rounded(reader.get(name), round_to, gen)


@torch.inference_mode()
def logits_in_memory(reader: CheckpointReader, input_ids: torch.Tensor,
                     round_to: torch.dtype | None = None) -> torch.Tensor:
    get = _getter(reader, round_to)
    state = {name: get(name) for name in reader.names()}
    return build_model(reader.config, state)(input_ids).float()


@torch.inference_mode()
def logits_streaming(reader: CheckpointReader, input_ids: torch.Tensor,
                     round_to: torch.dtype | None = None) -> torch.Tensor:
    """The model's logits with one decoder layer's weights in memory at a time."""
    config = reader.config
    get = _getter(reader, round_to)
    with torch.device("meta"):
        model = TeleFLMForCausalLM(config)
    with TensorSource(reader):
        def load(module: torch.nn.Module, prefix: str) -> None:
            names = list(module.state_dict())
            module.load_state_dict({n: get(prefix + n) for n in names},
                                   assign=True, strict=True)

        load(model.model.embed_tokens, "model.embed_tokens.")
        load(model.model.norm, "model.norm.")
        load(model.lm_head, "lm_head.")
        if config.growth_mask is not None:
            model.set_growth_mask(config.growth_mask)  # masks follow lm_head's device (cpu)
        h = model.model.embed(input_ids)
        model.model.embed_tokens.to("meta")
        cos, sin = rope_cos_sin(input_ids.shape[1], config.head_dim, config.rope_theta, h.device, h.dtype)
        for i, layer in enumerate(model.model.layers):
            load(layer, f"model.layers.{i}.")
            h = layer(h, cos, sin)
            layer.to("meta")
        return scale_logits(config, model.lm_head(model.model.norm(h))).float()


def _fp32_bytes(reader: CheckpointReader) -> int:
    return reader.config.params * 4


def low_precision_dtype(*readers: CheckpointReader) -> torch.dtype | None:
    """The narrowest 16-bit dtype either checkpoint stores, or None when all are wider."""
    found = [d for r in readers for d in r.dtypes if d in LOW_PRECISION]
    return None if not found else (torch.bfloat16 if torch.bfloat16 in found else found[0])


def relative_diff(a: torch.Tensor, b: torch.Tensor, vocab: int) -> float:
    peak = a[..., :vocab].abs().max().item()
    diff = (a[..., :vocab] - b[..., :vocab]).abs().max().item()
    return diff / peak if peak else diff


def verify(source_dir: str | Path, grown_dir: str | Path, tokens: int = 256, seq_len: int = 64,
           seed: int = 0, tolerance: float | None = None, streaming: bool | None = None,
           streaming_threshold: int | str = DEFAULT_STREAMING_THRESHOLD,
           input_ids: torch.Tensor | None = None) -> VerifyResult:
    """Run both checkpoints on the same tokens; ``passed`` when logits and loss agree.

    ``tokens`` ids are drawn (seeded) in rows of ``seq_len`` unless ``input_ids``
    (batch, seq_len + 1) is given. ``tolerance`` is relative to max |source logit| (and to
    max(1, loss) for the loss); None picks it from the stored dtypes (module note).
    """
    src, grown = CheckpointReader(source_dir), CheckpointReader(grown_dir)
    vocab = src.config.valid_vocab_size or src.config.vocab_size
    if grown.config.vocab_size < vocab:
        raise CheckpointError(f"{grown.directory}: vocab_size {grown.config.vocab_size} is smaller "
                              f"than the source's valid vocab {vocab}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise CheckpointError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    limit = min(src.config.max_position_embeddings, grown.config.max_position_embeddings)
    if input_ids is None:
        if tokens < 1 or seq_len < 1:
            raise CheckpointError(f"--tokens and --seq-len must be positive, got {tokens}, {seq_len}")
        if seq_len > limit:
            raise CheckpointError(f"--seq-len {seq_len} is beyond the models' max_position_embeddings "
                                  f"({limit}); use at most {limit}")
        input_ids = random_ids(vocab, max(1, math.ceil(tokens / seq_len)), seq_len, seed)
    elif int(input_ids.max()) >= vocab or int(input_ids.min()) < 0 or input_ids.shape[1] < 2:
        raise CheckpointError(f"token ids must lie in 0..{vocab - 1} with at least 2 per row")
    elif input_ids.shape[1] - 1 > limit:
        raise CheckpointError(f"token id rows of {input_ids.shape[1]} are beyond the models' "
                              f"max_position_embeddings ({limit} + 1)")
    inputs, labels = input_ids[:, :-1], input_ids[:, 1:]
    if streaming is None:
        streaming = _fp32_bytes(src) + _fp32_bytes(grown) > parse_size(streaming_threshold)
    run = logits_streaming if streaming else logits_in_memory
    logits_s = run(src, inputs)
    logits_g = run(grown, inputs)
    diff = (logits_s[..., :vocab] - logits_g[..., :vocab]).abs().max().item()
    peak = logits_s[..., :vocab].abs().max().item()
    loss_s = causal_lm_loss(logits_s, labels).item()
    loss_g = causal_lm_loss(logits_g, labels).item()
    tol = tolerance
    if tol is None:
        narrow = low_precision_dtype(src, grown)
        tol = FP32_TOLERANCE
        if narrow is not None:
            cast_error = relative_diff(logits_s, run(src, inputs, round_to=narrow), vocab)
            tol = max(FP32_TOLERANCE, CAST_ERROR_FACTOR * cast_error)
    passed = (math.isfinite(diff) and diff <= tol * peak
              and abs(loss_s - loss_g) <= tol * max(1.0, abs(loss_s)))
    mask = grown.config.growth_mask
    return VerifyResult(
        source=str(source_dir), grown=str(grown_dir), mode="streaming" if streaming else "memory",
        batch=int(inputs.shape[0]), seq_len=int(inputs.shape[1]), seed=seed, compared_vocab=vocab,
        grown_c=None if mask is None else float(mask["c"]), max_abs_logit_diff=diff,
        max_abs_logit=peak, relative_logit_diff=diff / peak if peak else diff,
        loss_source=loss_s, loss_grown=loss_g, loss_diff=abs(loss_s - loss_g), tolerance=tol,
        passed=bool(passed))
