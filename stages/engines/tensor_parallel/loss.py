"""The vocab-parallel chunked linear + cross-entropy: the loss of a TP rank's ``lm_head`` rows
without the (tokens, V/tp) logits (growth.model.ChunkedLinearCrossEntropy, split over the
vocabulary as stages.engines.tensor_parallel.layers.vocab_parallel_cross_entropy).

Per chunk of token rows each rank computes its fp32 logit columns (μP scale, −inf on the
padded ids it holds), and three all-reduces over the TP group give the global max, the sum
of exponentials and the label's logit; the chunk's gradients (``softmax − onehot`` on this
rank's columns) are formed right away, so backward only scales them. The caller passes the
hidden states through ``copy_to_tp`` first (identity forward, all-reduce of ∂h backward: each
rank's ∂h is its partial sum over its vocab rows); ``TPLMHead`` in
stages.engines.tensor_parallel.layers does. No host sync.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from growth.config import ModelConfig
from growth.model import LOSS_CHUNK_ROWS, chunk_logit_grad, chunked_lm_loss, chunked_loss_backward


class VocabParallelChunkedCE(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weightᵀ`` (this rank's vocab rows ``[start, start + V/tp)``)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float,
                valid_local: int | None, start: int, group: Any, chunk: int) -> torch.Tensor:
        rows, target = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        width = weight.shape[0]
        count = (target != -100).sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for first in range(0, rows.shape[0], chunk):
            x, t = rows[first:first + chunk], target[first:first + chunk]
            z = (x @ weight.t()).float() * scale
            if valid_local is not None:
                z[:, valid_local:] = float("-inf")
            zmax = z.max(dim=-1).values
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            sum_exp = torch.exp(z - zmax.unsqueeze(1)).sum(dim=-1)
            dist.all_reduce(sum_exp, group=group)
            lse = zmax + torch.log(sum_exp)
            keep = t != -100
            local = t - start
            mine = keep & (local >= 0) & (local < width)
            safe = torch.where(mine, local, torch.zeros_like(local)).unsqueeze(1)
            picked = torch.where(mine, z.gather(1, safe).squeeze(1), torch.zeros_like(lse))
            dist.all_reduce(picked, group=group)
            total += torch.where(keep, lse - picked, torch.zeros_like(lse)).sum()
            if want_h or want_w:
                g = chunk_logit_grad(z, lse, safe, mine.float(), keep, scale / count, h.dtype)
                if want_h:
                    grad_rows[first:first + chunk] = g @ weight
                if want_w:
                    grad_w += (g.t() @ x).float()
        ctx.save_for_backward(grad_rows, grad_w)
        ctx.shapes = (h.shape, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        return (*chunked_loss_backward(ctx, grad_out), None, None, None, None, None, None)


def vocab_parallel_chunked_loss(config: ModelConfig, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                vocab_start: int, group: Any, tp: int, chunk: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """The mean loss of the final-normed, TP-replicated ``h`` (already through ``copy_to_tp``)
    against ``labels`` from this rank's ``lm_head`` rows ``weight``; at ``tp == 1`` the plain
    model's chunked loss (growth.model.chunked_lm_loss), bit for bit."""
    if tp == 1:
        return chunked_lm_loss(config, h, weight, labels, chunk)
    stop = vocab_start + weight.shape[0]
    valid = config.valid_vocab_size
    valid_local = max(valid - vocab_start, 0) if valid is not None and valid < stop else None
    return VocabParallelChunkedCE.apply(h, weight, labels, float(config.logit_scale), valid_local, vocab_start,
                                        group, chunk)
