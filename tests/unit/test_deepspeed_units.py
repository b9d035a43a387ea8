"""Fast, single-process checks of the DeepSpeed side: schedules, the pipeline adapter and
layers, config/param-group building, activation checkpointing, start-state checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from growth.config import get_flavor
from growth.model import build_model, init_state_dict
from stages.engines.common import checkpoint_layers, ds_config, param_groups
from stages.engines.pipeline import (
    DecoderLayerPipe,
    EmbeddingPipe,
    HeadPipe,
    hf_to_pipe,
    layer_file,
    pipe_to_hf,
    set_pipe_growth_mask,
)
from stages.lr import LRSchedule, mask_c, stage_schedule
from stages.rank.worker import WorkerError, start_config
from stages.resolved import ResolvedStage
from stages.schema import DeepSpeedCfg, StageCfg, TrainConfig

STAGE = StageCfg(lr=1e-3, warmup_steps=4, steps=20, decay="cosine", min_lr_ratio=0.1,
                 lr_after_growth="restart", rewarm_peak_ratio=0.85, rewarm_steps=2,
                 micro_batch_size=4, grad_accum=2)


# ---------------------------------------------------------------------- schedules
def test_warmup_then_cosine_to_the_floor():
    s = LRSchedule(peak=1.0, warmup_steps=4, total_steps=20, decay="cosine", min_lr_ratio=0.1)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == 1.0 and s.factor(19) == pytest.approx(0.1)
    assert s.factor(11) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert all(a >= b for a, b in zip([s.factor(i) for i in range(4, 20)],
                                      [s.factor(i) for i in range(5, 20)], strict=False))


@pytest.mark.parametrize("decay,last", [("linear", 0.1), ("constant", 1.0)])
def test_linear_and_constant_decay(decay, last):
    s = LRSchedule(peak=2.0, warmup_steps=0, total_steps=11, decay=decay, min_lr_ratio=0.1)
    assert s.lr(0) == 2.0 and s.lr(10) == pytest.approx(2.0 * last)


def test_after_growth_restart_or_rewarm():
    assert stage_schedule(STAGE, grown=True, parent_lr=3e-3).peak == 1e-3  # MSG: own peak again
    rewarm = stage_schedule(dataclasses.replace(STAGE, lr_after_growth="rewarm"), grown=True, parent_lr=4e-4)
    assert rewarm.peak == pytest.approx(0.85 * 4e-4) and rewarm.warmup_steps == 2  # FLM-101B
    fresh = stage_schedule(dataclasses.replace(STAGE, lr_after_growth="rewarm"), grown=False, parent_lr=None)
    assert fresh.peak == 1e-3 and fresh.warmup_steps == 4


def test_mask_ramp():
    assert [mask_c(s, 4) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert mask_c(0, 4, c_start=0.5) == 0.5 and mask_c(2, 4, c_start=0.5) == 1.0
    assert mask_c(0, 0) == 1.0


# ---------------------------------------------------------------------- pipeline adapter
@pytest.mark.parametrize("flavor", ["tiny-s3", "52b"])
def test_adapter_round_trip(flavor):
    config = get_flavor(flavor)
    L = config.num_hidden_layers
    names = list(config.tensor_shapes())
    pipe = [hf_to_pipe(n, L) for n in names]
    assert [pipe_to_hf(p, L) for p in pipe] == names
    assert len(set(pipe)) == len(pipe)
    assert hf_to_pipe("model.embed_tokens.weight", L) == "0.embed_tokens.weight"
    assert hf_to_pipe(f"model.layers.{L - 1}.mlp.up_proj.weight", L) == f"{L}.mlp.up_proj.weight"
    assert hf_to_pipe("lm_head.weight", L) == f"{L + 1}.lm_head.weight"
    assert layer_file(3) == "layer_03-model_states.pt"


@pytest.mark.parametrize("bad", ["model.layers.9.mlp.up_proj.weight", "model.layers.0.mlp.bias",
                                 "lm_head.bias", "transformer.wte.weight"])
def test_adapter_refuses_unknown_names(bad):
    with pytest.raises(KeyError):
        hf_to_pipe(bad, 2)
    with pytest.raises(KeyError):
        pipe_to_hf("4.norm.weight", 2)


def pipe_sequential(config, state):
    """The pipeline's spec list as one nn.Sequential (children named 0…L+1, like
    PipelineModule), loaded through the adapter."""
    L = config.num_hidden_layers
    seq = nn.Sequential(EmbeddingPipe(config), *(DecoderLayerPipe(config) for _ in range(L)),
                        HeadPipe(config))
    names = dict(seq.named_parameters())
    assert {pipe_to_hf(n, L) for n in names} == set(config.tensor_shapes())
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(state[pipe_to_hf(n, L)])
    return seq


def test_pipeline_layers_compute_the_plain_model_with_masks():
    config = get_flavor("tiny-s2").replace(
        growth_mask={"c": 0.3, "hidden_size": 64, "intermediate_size": 176,
                     "num_key_value_heads": 4, "new_layers": [1]})
    state = init_state_dict(config, seed=3)
    model = build_model(config, state)
    seq = pipe_sequential(config.replace(), state)
    set_pipe_growth_mask(seq, seq[0].config, config.growth_mask)
    x = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(seq[-1].logits(seq(x)), model(x), rtol=0, atol=0)
    set_pipe_growth_mask(seq, seq[0].config, None)
    model.set_growth_mask(None)
    torch.testing.assert_close(seq[-1].logits(seq(x)), model(x), rtol=0, atol=0)
    y = torch.roll(x, -1, dims=1)  # the pipe's loss_fn: the head's chunked loss = the model's
    torch.testing.assert_close(seq[-1].lm_head(seq(x), y), model.loss(x, y), rtol=0, atol=0)


# ---------------------------------------------------------------------- engine pieces
def test_ds_config_sizes_and_refusals():
    cfg = ds_config(DeepSpeedCfg(zero_stage=3, precision="bf16", gradient_clipping=1.0), STAGE, dp_world=4)
    assert cfg["train_batch_size"] == 4 * 2 * 4 and cfg["bf16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="ZeRO-2 and ZeRO-3 are incompatible"):
        ds_config(DeepSpeedCfg(zero_stage=2, pipeline=True), STAGE, 1)
    with pytest.raises(ValueError, match="fp16"):
        ds_config(DeepSpeedCfg(precision="fp16"), STAGE, 1)


@pytest.mark.parametrize("zero,pipeline", [(1, False), (2, False), (3, False), (1, True)])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(zero, pipeline):
    """fp32 accumulation and reduction in every engine; the pipeline folds each gradient into
    its fp32 buffer at once (its loss_fn's lm_head: stages.engines.common.ds_config's Note)."""
    cfg = ds_config(DeepSpeedCfg(zero_stage=zero, pipeline=pipeline, precision="bf16"), STAGE, dp_world=2)
    assert cfg["communication_data_type"] == "fp32"
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    # with clipping the gradient-norm check runs on the device (ds_compat.DeviceGradCheck), not DeepSpeed's
    want = {"enabled": True, "check_grad_overflow": False, **({"immediate_grad_update": True} if pipeline else {})}
    assert cfg["bf16"] == want
    unclipped = ds_config(DeepSpeedCfg(zero_stage=zero, pipeline=pipeline, precision="bf16", gradient_clipping=0.0),
                          STAGE, dp_world=2)
    assert unclipped["bf16"]["check_grad_overflow"] is True  # no norm to check: DeepSpeed keeps its own
    fp32 = ds_config(DeepSpeedCfg(zero_stage=zero, pipeline=pipeline, precision="fp32"), STAGE, dp_world=2)
    assert "data_types" not in fp32 and "communication_data_type" not in fp32  # fp32 runs: as before
    assert fp32["bf16"] == {"enabled": False}


@pytest.mark.parametrize("field,value,needle", [("compile", "maybe", "must be one of auto, true, false"),
                                                ("checkpoint_every", 0, "must be >= 1")])
def test_compile_and_checkpoint_every_are_checked(field, value, needle):
    with pytest.raises(ValueError, match=f"deepspeed.{field}' {needle}"):
        ds_config(DeepSpeedCfg(**{field: value}), STAGE, 1)
    assert ds_config(DeepSpeedCfg(compile="True", checkpoint_every=3), STAGE, 1)  # Hydra's `true` arrives as 'True'


@pytest.mark.parametrize("pipeline", [False, True])
def test_zero0_bf16_is_refused_in_one_line(pipeline):
    """DeepSpeed 0.19 raises NotImplementedError on fp32 accumulation at ZeRO-0 (measured)."""
    with pytest.raises(ValueError, match=r"deepspeed.zero_stage.*bf16.*use deepspeed.zero_stage=1") as info:
        ds_config(DeepSpeedCfg(zero_stage=0, pipeline=pipeline, precision="bf16"), STAGE, 1)
    assert "\n" not in str(info.value)


def test_param_groups_carry_mup_multipliers():
    config = get_flavor("tiny-s3")  # mup_scale_factor 4
    model = build_model(config)
    groups = param_groups(list(model.named_parameters()), config, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    q = by_id[id(named["model.layers.0.self_attn.q_proj.weight"])]
    assert q["lr_mult"] == 1 / config.mup_scale_factor and q["weight_decay"] == 0.1
    norm = by_id[id(named["model.norm.weight"])]
    assert norm["lr_mult"] == 1.0 and norm["weight_decay"] == 0.0
    head = by_id[id(named["lm_head.weight"])]
    assert head["lr_mult"] == 1.0 and head["weight_decay"] == 0.1


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_recomputes_and_keeps_gradients(every):
    """Every layer (``every=1``) or every k-th (``deepspeed.checkpoint_every``) is recomputed in
    backward, without saving RNG state; the gradients stay bit-identical."""
    config = get_flavor("tiny-s3")  # 4 layers
    x = torch.randint(0, 259, (2, 8), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build_model(config), build_model(config)
    calls = []
    for i, layer in enumerate(ckpt.model.layers):
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, _i=i: (calls.append(_i), _f(*a))[1]
    checkpoint_layers(list(ckpt.model.layers), every)
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain.loss(x, x).backward()
    saved_rng = []
    real = torch.get_rng_state  # what torch.utils.checkpoint calls to save the CPU RNG state
    torch.get_rng_state = lambda: (saved_rng.append(1), real())[1]
    try:
        ckpt.loss(x, x).backward()
    finally:
        torch.get_rng_state = real
    layers = range(config.num_hidden_layers)
    assert sorted(calls) == sorted([*layers, *layers[::every]])  # forward, then the checkpointed ones again
    assert saved_rng == []  # preserve_rng_state=False: no dropout, nothing to replay
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------------- start state
def test_start_config_takes_the_checkpoint_and_refuses_a_mismatch(tiny_checkpoint):
    tiny = get_flavor("tiny")
    cfg = ResolvedStage(TrainConfig(), stage_dir="/nowhere", model_config=tiny.to_hf_dict(),
                        init_checkpoint=str(tiny_checkpoint))
    assert start_config(cfg).tensor_shapes() == tiny.tensor_shapes()
    cfg = dataclasses.replace(cfg, model_config=get_flavor("tiny-s1").to_hf_dict())
    with pytest.raises(WorkerError, match="model.layers.2"):
        start_config(cfg)
    assert start_config(dataclasses.replace(cfg, init_checkpoint=None)).num_hidden_layers == 2


# ---------------------------------------------------------------------- DeepSpeed versions
def test_deepspeed_outside_the_verified_range_is_refused_in_one_line():
    import deepspeed

    from stages.engines.ds_compat import DeepSpeedVersionError, check_version

    check_version()  # the installed one is in range (pyproject pins it)
    check_version("0.19.0")
    check_version("0.19.8+cpu")
    for bad in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(DeepSpeedVersionError, match=f"deepspeed {bad} is not supported") as err:
            check_version(bad)
        assert "\n" not in str(err.value) and "pip install 'deepspeed>=0.19,<0.20'" in str(err.value)
    assert deepspeed.__version__.startswith("0.19.")
