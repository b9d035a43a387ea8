"""The Tele-FLM decoder in plain PyTorch, with optional MSG growth masks.

Llama blocks (RoPE in the HF half-split layout, RMSNorm, SwiGLU, GQA/MHA, no biases)
with Tele-FLM's μP multipliers::

    h      = embed_tokens(ids) * input_mult
    h      = layers(h)
    logits = lm_head(norm(h)) * (output_mult / mup_scale_factor)

Module paths equal the HF Llama names (``model.layers.0.self_attn.q_proj.weight`` …), so
``state_dict()`` keys are the on-disk names. Build under ``torch.device("meta")`` and load
with ``load_state_dict(..., assign=True)`` to materialise only what is read.

MSG masks (Masked Structural Growth, Yao et al., ICLR 2024; docs/operators.md) are
non-persistent buffers set from ``config.growth_mask``:
``{"c": c, "hidden_size": h_old, "intermediate_size": f_old, "num_key_value_heads":
kv_old, "new_layers": [i, ...]}`` — each entry optional but ``c``. New residual
coordinates, FFN units and heads are multiplied by ``c``, norms use mask-weighted
statistics, and a new layer adds ``c · block(h)``. Without a record every module takes
its plain path (one ``is None`` check).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flmcore.errors import FlmError
from flmcore.init import param_init_std, seeded_generator
from flmcore.params import is_norm
from growth.config import ModelConfig

__all__ = ["TeleFLMForCausalLM", "build_masks", "build_model", "causal_lm_loss", "chunked_lm_loss",
           "init_state_dict", "init_tensor", "param_init_std", "scale_logits", "seeded_generator"]


class GrowthMaskError(FlmError, ValueError):
    """A mask ramp or fold the model's MSG mask state does not allow."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.register_buffer("mask", None, persistent=False)  # MSG hidden mask, set by set_growth_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.mask is None:
            var = x.pow(2).mean(-1, keepdim=True)
        else:
            m = self.mask.float()
            var = (x.pow(2) * m).sum(-1, keepdim=True) / m.sum()
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (HF half-split layout), bit for bit, on half widths.

    Note: the tables repeat their first half (``cat((freqs, freqs))``), so each output
    half needs only ``cos/sin[..., :d/2]``: four half-size products and one ``cat``
    instead of three full-size products, a negation and two ``cat``s (fewer passes over
    q and k, forward and backward). ``a + (-b) == a - b`` in IEEE arithmetic, so the
    result equals the textbook form exactly.
    """
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, head_dim) in the HF half-split layout, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                                .float() / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.head_dim, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, d)
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.register_buffer("head_mask", None, persistent=False)  # (num_heads,) MSG head mask

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.head_mask is not None:
            y = y * self.head_mask.to(y.dtype).view(1, -1, 1, 1)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.register_buffer("ffn_mask", None, persistent=False)  # (f,) MSG FFN mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.ffn_mask is not None:
            a = a * self.ffn_mask.to(a.dtype)
        return self.down_proj(a)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.register_buffer("hidden_mask", None, persistent=False)  # (h,) multiplies residual writes
        self.register_buffer("layer_c", None, persistent=False)  # scalar c for a layer added by MSG depth

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin)
        if self.hidden_mask is not None:
            a = a * self.hidden_mask.to(a.dtype)
        if self.layer_c is None:
            h = h + a
            m = self.mlp(self.post_attention_layernorm(h))
            if self.hidden_mask is not None:
                m = m * self.hidden_mask.to(m.dtype)
            return h + m
        m = self.mlp(self.post_attention_layernorm(h + a))
        if self.hidden_mask is not None:
            m = m * self.hidden_mask.to(m.dtype)
        return h + self.layer_c.to(h.dtype) * (a + m)  # MSG depth: h + c·block(h)


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(num, dim)``; on the meta device without its random init.

    Note: ``normal_`` on a meta tensor runs torch's Python reference, whose first call
    imports torch._dynamo (about 2–3 s of CPU in every process that builds a model on the
    meta device, then loads weights with ``assign=True``); a meta table needs no values.
    """
    if torch.empty(()).device.type == "meta":  # inside ``with torch.device("meta")``
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class TeleFLMModel(nn.Module):
    """Embedding, decoder layers and final norm: the ``model.`` prefix of the HF names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("hidden_mask", None, persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.config.embedding_scale != 1.0:
            h = h * self.config.embedding_scale
        if self.hidden_mask is not None:
            h = h * self.hidden_mask.to(h.dtype)
        return h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        cos, sin = rope_cos_sin(input_ids.shape[1], self.config.head_dim, self.config.rope_theta,
                                h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


def scale_logits(config: ModelConfig, logits: torch.Tensor) -> torch.Tensor:
    """μP logit scale, then −inf on padded vocab ids (kept out of the softmax)."""
    if config.logit_scale != 1.0:
        logits = logits * config.logit_scale
    valid = config.valid_vocab_size
    if valid is not None and valid < config.vocab_size:
        logits = logits.clone()
        logits[..., valid:] = float("-inf")
    return logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy; ``labels`` are already the next tokens, -100 is ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


LOSS_CHUNK_ROWS = 1024  # token rows of fp32 logits the chunked loss holds at once (1024 × 80k × 4 B = 0.33 GB)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``causal_lm_loss(scale_logits(config, h @ Wᵀ), labels)`` without the (tokens, V) logits.

    Forward walks ``chunk`` token rows at a time: fp32 logits of the chunk, μP logit scale,
    −inf on padded ids, log-sum-exp and the label's logit, and (when gradients are wanted)
    the chunk's gradients right away: ``g = (softmax − onehot) · scale / n`` on kept rows,
    ``∂h = g W``, ``∂W += gᵀ h`` (fp32). Backward only scales them by the incoming gradient.
    Peak: one chunk of fp32 logits and an fp32 weight-sized ``∂W`` instead of the logits in
    the model dtype, their fp32 copy, the log-softmax and its gradient (Liger/torchtune's
    chunked cross-entropy). No host sync.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float,
                valid: int | None, chunk: int) -> torch.Tensor:
        rows, target = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        count = (target != -100).sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, rows.shape[0], chunk):
            x, t = rows[start:start + chunk], target[start:start + chunk]
            z = (x @ weight.t()).float()
            z = z * scale if scale != 1.0 else z
            if valid is not None and valid < z.shape[-1]:
                z[:, valid:] = float("-inf")
            keep = t != -100
            safe = torch.where(keep, t, torch.zeros_like(t)).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1)
            total += torch.where(keep, lse - z.gather(1, safe).squeeze(1), torch.zeros_like(lse)).sum()
            if want_h or want_w:
                g = chunk_logit_grad(z, lse, safe, torch.ones_like(lse), keep, scale / count, h.dtype)
                if want_h:
                    grad_rows[start:start + chunk] = g @ weight
                if want_w:
                    grad_w += (g.t() @ x).float()
        ctx.save_for_backward(grad_rows, grad_w)
        ctx.shapes = (h.shape, weight.dtype)
        return total / count

    backward = staticmethod(lambda ctx, grad_out: (*chunked_loss_backward(ctx, grad_out), None, None, None, None))


def chunk_logit_grad(z: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, hit: torch.Tensor,
                     keep: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(softmax(z) − onehot) · factor`` on kept rows, in ``dtype``, in ``z``'s buffer;
    ``hit`` (per row) is 1 where this part of the vocab holds the label."""
    g = z.sub_(lse.unsqueeze(1)).exp_().scatter_add_(1, safe, -hit.unsqueeze(1))
    return g.mul_((keep.float() * factor).unsqueeze(1)).to(dtype)


def chunked_loss_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients forward computed, scaled in place by ``grad_out`` (no second copy)."""
    (grad_rows, grad_w), (shape, wdtype) = ctx.saved_tensors, ctx.shapes
    gh = None if grad_rows is None else grad_rows.mul_(grad_out.to(grad_rows.dtype)).view(shape)
    return gh, None if grad_w is None else grad_w.mul_(grad_out.float()).to(wdtype)


def chunked_lm_loss(config: ModelConfig, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """:class:`ChunkedLinearCrossEntropy` with ``config``'s μP logit scale and padded vocab."""
    return ChunkedLinearCrossEntropy.apply(h, weight, labels, float(config.logit_scale),
                                           config.valid_vocab_size, chunk)


class LMHead(nn.Linear):
    """``lm_head``: logits, or (given ``labels``) the loss straight from the hidden states.

    Note: the loss runs inside this module's own forward so that ZeRO-3 has gathered its
    weight (DeepSpeed gathers a module's parameters around the module's forward)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config.hidden_size, config.vocab_size, bias=False)
        self.config = config

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``h Wᵀ`` (unscaled, as ``nn.Linear``), or with ``labels`` the scaled, masked mean loss."""
        if labels is None:
            return super().forward(h)
        return chunked_lm_loss(self.config, h, self.weight, labels)


class TeleFLMForCausalLM(nn.Module):
    """Decoder plus untied ``lm_head``; ``forward`` returns fp32-able logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TeleFLMModel(config)
        self.lm_head = LMHead(config)
        if config.growth_mask is not None and not _on_meta(self):
            self.set_growth_mask(config.growth_mask)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V); with ``labels`` the mean loss instead, the (B, T, V) logits never
        materialised (:class:`ChunkedLinearCrossEntropy`)."""
        h = self.model(input_ids)
        return scale_logits(self.config, self.lm_head(h)) if labels is None else self.lm_head(h, labels)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self(input_ids, labels)

    # ------------------------------------------------------------------ MSG masks
    def set_growth_mask(self, record: dict[str, Any] | None) -> None:
        """Install (or with ``None`` remove) the MSG masks described by ``record``.

        Note: the model owns its mask state: ``self.config`` becomes a new (frozen) config
        carrying ``record``, so whoever exports the model reads ``model.config`` (the config
        it was built from is never changed)."""
        self.config = self.model.config = self.config.replace(growth_mask=record)  # validates
        device = self.lm_head.weight.device
        masks = build_masks(self.config, device)
        put_mask(self.model, "hidden_mask", masks["hidden"])
        put_mask(self.model.norm, "mask", masks["hidden"])
        for i, layer in enumerate(self.model.layers):
            put_layer_masks(layer, masks, masks["heads"], masks["ffn"], i in masks["new_layers"])

    @property
    def growth_c(self) -> float | None:
        mask = self.config.growth_mask
        return None if mask is None else float(mask["c"])

    def set_growth_c(self, c: float) -> None:
        """Move the mask ramp to ``c`` in [0, 1] (the trainer calls this every step)."""
        if self.config.growth_mask is None:
            raise GrowthMaskError("this model has no growth masks to ramp")
        self.set_growth_mask({**self.config.growth_mask, "c": float(c)})

    def fold_growth_mask(self) -> None:
        """Remove the masks at c = 1, leaving a plain model with the same function."""
        c = self.growth_c
        if c is None:
            return
        if c != 1.0:
            raise GrowthMaskError(f"cannot fold growth masks at c = {c}: ramp c to 1 first")
        self.set_growth_mask(None)


def build_masks(config: ModelConfig, device: torch.device | str) -> dict[str, Any]:
    """Mask vectors for ``config.growth_mask``: 1 on old parts, c on new parts."""
    record = config.growth_mask
    out: dict[str, Any] = {"hidden": None, "ffn": None, "heads": None, "c": None, "new_layers": set()}
    if record is None:
        return out
    c = float(record["c"])
    out["c"] = torch.full((), c, device=device)  # a fill kernel: no host-to-device copy (no sync)

    def vec(full: int, old: int | None) -> torch.Tensor | None:
        if old is None or old >= full:
            return None
        m = torch.ones(full, device=device)
        m[old:] = c
        return m

    out["hidden"] = vec(config.hidden_size, record.get("hidden_size"))
    out["ffn"] = vec(config.intermediate_size, record.get("intermediate_size"))
    kv_old = record.get("num_key_value_heads")
    if kv_old is not None:
        out["heads"] = vec(config.num_attention_heads, kv_old * config.num_key_value_groups)
    out["new_layers"] = set(record.get("new_layers") or [])
    return out


def put_mask(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set MSG mask buffer ``name`` of ``module``: in place when one of the same shape is
    installed (a ramp step: the buffer keeps its identity, so a compiled layer is not
    recompiled and a ``.to()``-moved copy is updated where it is), else (install, remove)
    the buffer itself. No host sync: ``copy_`` between tensors of one device."""
    current = getattr(module, name)
    if current is not None and value is not None and current.shape == value.shape:
        with torch.no_grad():
            current.copy_(value)
    else:
        setattr(module, name, value)


def put_layer_masks(layer: DecoderLayer, masks: dict[str, Any], heads: torch.Tensor | None,
                    ffn: torch.Tensor | None, new_layer: bool) -> None:
    """One decoder layer's MSG masks (``heads``/``ffn``: this rank's slices under TP)."""
    for module, name in ((layer, "hidden_mask"), (layer.input_layernorm, "mask"),
                         (layer.post_attention_layernorm, "mask")):
        put_mask(module, name, masks["hidden"])
    put_mask(layer.self_attn, "head_mask", heads)
    put_mask(layer.mlp, "ffn_mask", ffn)
    put_mask(layer, "layer_c", masks["c"] if new_layer else None)


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------- initialisation
def init_tensor(config: ModelConfig, name: str, shape: tuple[int, ...], seed: int,
                dtype: torch.dtype = torch.float32, std: float | None = None) -> torch.Tensor:
    """A freshly initialised parameter (normal(0, std) matrices, ones for norms), in fp32
    then cast, deterministic in (seed, name)."""
    std = param_init_std(config, name) if std is None else std
    if is_norm(name):
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, std, generator=seeded_generator(seed, name))
    return t.to(dtype)


def init_state_dict(config: ModelConfig, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every parameter freshly initialised (small configs; ``grow init`` streams instead)."""
    return {n: init_tensor(config, n, s, seed, dtype) for n, s in config.tensor_shapes().items()}


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None,
                seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> TeleFLMForCausalLM:
    """A model on ``device``: from ``state_dict`` when given, else freshly initialised.

    Note: the parameters *are* the given tensors (``assign=True``, no copy, so a 100 GB
    model is never held twice); training the model changes them in place.
    """
    with torch.device("meta"):
        model = TeleFLMForCausalLM(config)
    if state_dict is None:
        state_dict = init_state_dict(config, seed, dtype)
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, assign=True, strict=True)
    if config.growth_mask is not None:
        model.set_growth_mask(config.growth_mask)
    return model
