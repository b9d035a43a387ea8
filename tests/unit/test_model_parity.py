"""Parity with transformers' LlamaForCausalLM, the independent implementation.

Random tiny configs (MHA and GQA, head_dim·heads ≠ hidden in general), random weights
scaled so logits are O(1) (at init std 0.02 every diff would be trivially small), eager
attention on the HF side against our SDPA. With μP multipliers on, HF gets them folded
into its weights: embed *= input_mult, lm_head *= output_mult / mup_scale_factor.
Also both directions of on-disk exchange, bitwise.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from growth.checkpoint import CheckpointReader, load_model, save_checkpoint
from growth.config import ModelConfig
from growth.model import build_model
from tests.conftest import random_config

transformers.logging.set_verbosity_error()
TOL = 1e-5


def hf_config(c: ModelConfig, tie: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=tie,
        hidden_act="silu", attention_bias=False, mlp_bias=False, attn_implementation="eager")


def random_weights(c: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights with O(1) activations: matrices ~ N(0, 1/fan_in), norm gains ~ 1 ± 0.2."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in c.tensor_shapes().items():
        if len(shape) == 1:
            out[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return out


def fold_multipliers(c: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    out["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] * c.embedding_scale
    out["lm_head.weight"] = sd["lm_head.weight"] * c.logit_scale
    return out


def hf_logits(model: transformers.LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).float()


CASES = [(seed, gqa, mup) for seed in range(4) for gqa in (False, True) for mup in (False, True)]


@pytest.mark.parametrize(("seed", "gqa", "mup"), CASES,
                         ids=[f"s{s}-{'gqa' if g else 'mha'}-{'mup' if m else 'plain'}" for s, g, m in CASES])
def test_logits_match_transformers(seed, gqa, mup):
    rng = random.Random(1000 + seed)
    c = random_config(rng, gqa=gqa, mup=mup)
    assert (c.num_key_value_heads < c.num_attention_heads) == gqa
    assert c.is_plain_llama != mup
    sd = random_weights(c, seed)
    ours = build_model(c, sd).eval()
    hf = transformers.LlamaForCausalLM(hf_config(c)).eval()
    hf.load_state_dict(fold_multipliers(c, sd), strict=True)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (2, rng.randint(5, 24)), generator=gen)
    a, b = our_logits(ours, ids), hf_logits(hf, ids)
    assert a.shape == b.shape == (*ids.shape, c.vocab_size)
    assert a.abs().max() > 0.1  # the comparison is not trivially between near-zeros
    assert (a - b).abs().max().item() <= TOL


def test_loss_matches_transformers():
    c = random_config(random.Random(7), gqa=True)
    sd = random_weights(c, 7)
    ours = build_model(c, sd)
    hf = transformers.LlamaForCausalLM(hf_config(c))
    hf.load_state_dict(sd, strict=True)
    ids = torch.randint(0, c.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = hf(input_ids=ids, labels=ids).loss  # HF shifts labels internally
        got = ours.loss(ids[:, :-1], ids[:, 1:])
    assert abs(ref.item() - got.item()) <= TOL


# ---------------------------------------------------------------------- on-disk exchange
@pytest.mark.parametrize(("dtype", "shard"), [(torch.float32, None), (torch.float32, 20_000),
                                              (torch.bfloat16, None)])
def test_transformers_loads_our_checkpoint(tmp_path, dtype, shard):
    c = random_config(random.Random(11), gqa=True)
    sd = {k: v.to(dtype) for k, v in random_weights(c, 11).items()}
    save_checkpoint(tmp_path / "ours", c, sd, max_shard_size=shard or "5GB")
    if shard:
        assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=dtype)
    got = hf.state_dict()
    assert set(got) == set(sd)
    for name, tensor in sd.items():
        assert got[name].dtype == dtype and torch.equal(got[name], tensor), name
    if dtype == torch.float32:
        ids = torch.randint(0, c.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
        assert (hf_logits(hf.eval(), ids) - our_logits(build_model(c, sd), ids)).abs().max() <= TOL


@pytest.mark.parametrize(("tie", "shard"), [(False, None), (True, None), (False, "30KB")])
def test_we_load_transformers_checkpoint(tmp_path, tie, shard):
    c = random_config(random.Random(12), gqa=not tie)
    torch.manual_seed(12)
    hf = transformers.LlamaForCausalLM(hf_config(c, tie=tie)).eval()
    with torch.no_grad():  # HF init leaves norms at 1; make them count
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kwargs)
    assert ((tmp_path / "hf" / "model.safetensors.index.json").is_file()) == bool(shard)
    reference = hf.state_dict()
    with CheckpointReader(tmp_path / "hf") as reader:
        assert reader.tied == tie and not reader.config.tie_word_embeddings
        got = reader.state_dict()
    assert set(got) == set(c.tensor_shapes())
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
    model = load_model(tmp_path / "hf")
    if tie:  # untied on the way in: two tensors, equal values, no shared storage
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        assert torch.equal(emb, head) and emb.data_ptr() != head.data_ptr()
    ids = torch.randint(0, c.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    assert (our_logits(model.eval(), ids) - hf_logits(hf, ids)).abs().max() <= TOL
