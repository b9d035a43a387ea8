"""Megatron-style TP on 2 real gloo processes vs the 1-rank model: loss, gradients, MSG
masks (also with sequence parallelism), slice-only loading, and the gathered export loading in
transformers' Llama."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flmcore.process import free_port
from growth.checkpoint import CheckpointReader, load_model
from growth.config import ModelConfig
from growth.init import init_checkpoint
from stages.engines.tensor_parallel import io as tp_io
from stages.engines.tensor_parallel.io import ShardReader, load_tp_model
from stages.engines.tensor_parallel.layers import TPForCausalLM, shard, shard_dim

LR = 0.05  # one plain SGD step before the export, so the gathered weights are trained ones
# GQA (4 query heads, 2 kv heads: one kv head per rank), μP logit scale, padded vocab rows on rank 1
CONFIG = ModelConfig(hidden_size=48, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=264, valid_vocab_size=259,
                     use_mup=True, input_mult=1.5, output_mult=1.0, mup_scale_factor=2.0)
MASK = {"c": 0.3, "hidden_size": 40, "intermediate_size": 100, "num_key_value_heads": 1, "new_layers": [1]}

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.distributed as dist
    from stages.engines.tensor_parallel.io import load_tp_model, save_gathered, gather_tensors
    from stages.engines.tensor_parallel.layers import all_reduce_norm_grads

    out, lr = sys.argv[1], float(sys.argv[2])
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    batch = torch.load(os.path.join(out, "batch.pt"))
    result = {}
    for kind in ("plain", "masked", "masked-sp"):
        ckpt, sp = kind.removesuffix("-sp"), kind.endswith("-sp")  # sp: sequence parallelism
        model = load_tp_model(os.path.join(out, ckpt), dist.group.WORLD, tp, rank, sp=sp)
        if sp:
            all_reduce_norm_grads(model, dist.group.WORLD)
            result["sp_embed_tokens"] = model.model.embed(batch["ids"]).shape[1]  # this rank's share of 16
        loss = model.loss(batch["ids"], batch["labels"])
        loss.backward()
        local = {name: p.grad for name, p in model.named_parameters()}
        grads = dict(gather_tensors(model, local))  # each gradient gathered like its weight
        if sp:
            result[kind] = {"loss": loss.item(), "grads": grads}
            continue
        model = load_tp_model(os.path.join(out, kind), dist.group.WORLD, tp, rank)
        model.loss(batch["ids"], batch["labels"]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        save_gathered(model, os.path.join(out, kind + "-tp-gathered"))
        result[kind] = {"loss": loss.item(), "grads": grads}
    # what one TP decoder layer saves for backward, with and without sequence parallelism
    from growth.model import rope_cos_sin
    for sp in (False, True):
        layer = load_tp_model(os.path.join(out, "plain"), dist.group.WORLD, tp, rank, sp=sp).model.layers[0]
        b, s = batch["ids"].shape
        x = torch.randn(b, s // tp if sp else s, layer.input_layernorm.weight.shape[0], requires_grad=True)
        cos, sin = rope_cos_sin(s, layer.self_attn.head_dim, 10000.0, x.device, x.dtype)
        storages, skip = {}, {p.untyped_storage().data_ptr() for p in layer.parameters()}
        skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, cos, sin)
        result[f"saved_bytes_sp{int(sp)}"] = sum(n for ptr, n in storages.items() if ptr not in skip)
    if rank == 0:
        torch.save(result, os.path.join(out, "tp-result.pt"))
    dist.destroy_process_group()
''')


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 259, (3, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    return {"ids": ids[:, :-1].contiguous(), "labels": labels}


def reference(ckpt: Path, b: dict[str, torch.Tensor]):
    model = load_model(ckpt)
    loss = model.loss(b["ids"], b["labels"])
    loss.backward()
    return model, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Two gloo ranks: TP 2 loss + gathered grads, and one SGD step gathered to disk."""
    out = tmp_path_factory.mktemp("tp")
    init_checkpoint(CONFIG, out / "plain", seed=3)
    init_checkpoint(CONFIG.replace(growth_mask=dict(MASK)), out / "masked", seed=3)
    torch.save(batch(), out / "batch.pt")
    (out / "worker.py").write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(out / "worker.py"), str(out), str(LR)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return out, torch.load(out / "tp-result.pt")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "masked", "masked-sp"])
def test_tp2_loss_and_gradients_match_one_rank(tp_run, kind):
    out, result = tp_run
    ckpt = kind.removesuffix("-sp")
    if kind.endswith("-sp"):  # sequence parallel: each rank's hidden states are 8 of the 16 tokens
        assert result["sp_embed_tokens"] == 8
    model, loss, grads = reference(out / ckpt, batch())
    assert (model.config.growth_mask is not None) == (ckpt == "masked")
    tp = result[kind]
    assert abs(tp["loss"] - loss) <= 1e-6 * abs(loss)
    assert set(tp["grads"]) == set(grads)
    for name, g in grads.items():
        scale = g.abs().max().item()
        assert scale > 0 or ckpt == "masked", name
        assert (tp["grads"][name] - g).abs().max().item() <= 1e-6 * max(scale, 1e-6), name


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_dry_run_layer_formula_is_what_a_tp_rank_saves(tp_run, sp):
    """stages.launch.memory's per-layer count, checked against autograd on TP rank 0
    (fp32; CPU SDPA runs its flash kernel), with and without sequence parallelism."""
    from stages.launch.memory import layer_activation_bytes_per_token

    b, s = batch()["ids"].shape
    expected = layer_activation_bytes_per_token(CONFIG, 2, "fp32", s, flash=True, sp=sp) * b * s
    assert tp_run[1][f"saved_bytes_sp{int(sp)}"] == expected


def test_tp1_model_is_the_model(tmp_path):
    init_checkpoint(CONFIG, tmp_path / "c", seed=3)
    b = batch()
    _, loss, grads = reference(tmp_path / "c", b)
    tp1 = load_tp_model(tmp_path / "c")
    tp1_loss = tp1.loss(b["ids"], b["labels"])
    tp1_loss.backward()
    assert tp1_loss.item() == loss
    for name, p in tp1.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


@pytest.mark.slow
def test_gathered_export_loads_in_transformers_with_our_logits(tp_run, tmp_path):
    from transformers import LlamaForCausalLM

    from growth.hf_export import export_hf

    out, _ = tp_run
    model, _, _ = reference(out / "plain", batch())
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    gathered = out / "plain-tp-gathered"
    with CheckpointReader(gathered) as reader:
        assert reader.config.tensor_shapes() == CONFIG.tensor_shapes()
        for name, p in model.named_parameters():
            assert torch.allclose(reader.get(name), p.detach(), rtol=0, atol=1e-7), name
    hf = LlamaForCausalLM.from_pretrained(export_hf(gathered, tmp_path / "hf"), torch_dtype=torch.float32).eval()
    ids = batch()["ids"]
    with torch.no_grad():
        ours = load_model(gathered)(ids)[..., :259]
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_each_rank_reads_only_its_slices(tmp_path, monkeypatch):
    init_checkpoint(CONFIG, tmp_path / "c", seed=3)
    real = tp_io.safe_open

    class SliceOnly:  # safetensors handle that refuses whole-tensor reads
        def __init__(self, *a, **k):
            self.handle = real(*a, **k)

        def get_slice(self, name):
            return self.handle.get_slice(name)

    monkeypatch.setattr(tp_io, "safe_open", SliceOnly)
    with CheckpointReader(tmp_path / "c") as full:
        whole = full.state_dict()
    total = sum(t.numel() * 4 for t in whole.values())
    split = sum(t.numel() * 4 for n, t in whole.items() if shard_dim(n) is not None)
    for rank in range(2):
        with ShardReader(tmp_path / "c", rank, 2) as shards:
            for name, t in whole.items():
                assert torch.equal(shards.get(name), shard(name, t, rank, 2)), name
            assert shards.bytes_read == total - split // 2
    model = load_tp_model(tmp_path / "c", None, 2, 1)
    assert isinstance(model, TPForCausalLM) and model.lm_head.weight.shape == (132, 48)
