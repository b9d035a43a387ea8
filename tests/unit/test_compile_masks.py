"""MSG masks are non-persistent buffers ramped in place: ``.to()`` moves them, the state dict
does not hold them, and a compiled decoder layer is not recompiled while c ramps (counted
with dynamo's CompileCounter over stages.engines.common.compile_layers). The chunked
linear + cross-entropy equals the full-logits loss."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from growth.config import get_flavor
from growth.model import build_model, causal_lm_loss, chunked_lm_loss, scale_logits
from stages.engines.common import checkpoint_layers, compile_layers


def masked_model(c: float = 0.0):
    a, b = get_flavor("tiny-s1"), get_flavor("tiny-s2")
    config = b.replace(growth_mask={"c": c, "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
                                    "num_key_value_heads": a.num_key_value_heads, "new_layers": [1]})
    return build_model(config, seed=5)


def test_masks_are_buffers_that_move_and_stay_out_of_the_state_dict():
    model = masked_model(0.25)
    names = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    assert {"model.hidden_mask", "model.norm.mask", "model.layers.1.layer_c", "model.layers.0.mlp.ffn_mask",
            "model.layers.0.self_attn.head_mask", "model.layers.2.input_layernorm.mask"} <= names
    assert not names & set(model.state_dict())
    mask = model.model.layers[0].mlp.ffn_mask
    model.set_growth_c(0.5)  # in place: the same tensor, new values
    assert model.model.layers[0].mlp.ffn_mask is mask and float(mask[-1]) == 0.5 and float(mask[0]) == 1.0
    moved = model.to(torch.float64)
    assert moved.model.layers[0].mlp.ffn_mask.dtype == torch.float64  # .to() reaches them
    model.set_growth_c(1.0)
    model.fold_growth_mask()
    assert not any(True for _ in model.buffers())


def test_a_compiled_layer_is_not_recompiled_across_a_mask_ramp():
    torch._dynamo.reset()
    eager, compiled = masked_model(), masked_model()
    counter = CompileCounterWithBackend("aot_eager")
    checkpoint_layers(list(compiled.model.layers), every=2)  # with activation checkpointing too
    compile_layers(list(compiled.model.layers), backend=counter)
    x = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    frames = []
    for c in (0.0, 0.2, 0.4, 0.6, 0.8):
        losses = []
        for model in (eager, compiled):
            model.set_growth_c(c)
            model.zero_grad()
            loss = model.loss(x, x)
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), c  # aot_eager: the same kernels, bit for bit
        grads = [dict(m.named_parameters())["model.layers.1.mlp.up_proj.weight"].grad for m in (eager, compiled)]
        assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
        frames.append(counter.frame_count)
    # the layers' graphs are compiled at the first c and never again while c ramps
    assert frames[0] > 0 and frames[1:] == [frames[0]] * 4, frames


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_equals_the_full_logits_loss(chunk):
    """Loss, ∂h and ∂W of the chunked linear + cross-entropy (μP logit scale ≠ 1, padded vocab,
    ignored labels) equal growth.model's full-logits loss within 1e-6 relative in fp32."""
    config = get_flavor("tiny-s3")
    assert config.logit_scale != 1.0 and config.valid_vocab_size < config.vocab_size
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 10, config.hidden_size, generator=g)
    w = torch.randn(config.vocab_size, config.hidden_size, generator=g) * 0.2
    labels = torch.randint(0, config.valid_vocab_size, (3, 10), generator=g)
    labels[0, :4] = -100
    grads = []
    for fn in (lambda a, b: causal_lm_loss(scale_logits(config, a @ b.t()), labels),
               lambda a, b: chunked_lm_loss(config, a, b, labels, chunk=chunk)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        (loss * 1.7).backward()
        grads.append((loss.detach(), a.grad, b.grad))
    (full, gh, gw), (chunked, ch, cw) = grads
    assert torch.allclose(chunked, full, rtol=1e-6, atol=0)
    for got, want in ((ch, gh), (cw, gw)):
        assert float((got - want).norm() / want.norm()) < 1e-6
    assert float(cw[config.valid_vocab_size:].abs().max()) == 0.0  # padded rows get no gradient
