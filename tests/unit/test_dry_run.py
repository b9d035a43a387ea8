"""The dry run's "does it fit": activation bytes measured against what autograd saves,
two small layouts against memory worked out by hand, the teleflm schedule fitting (and the
seed's 1T layout evaluated), and bad layouts refused in one line before any worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from growth.config import ModelConfig, get_flavor
from growth.model import DecoderLayer, rope_cos_sin
from stages.launch.memory import GIB, activations, fit, layer_activation_bytes_per_token, model_states
from stages.launch.run import run_stage
from stages.layout import Layout, LayoutError, check_model_split, check_stage_layout
from stages.schema import StageConfigError, to_config
from stages.train import CONF_DIR
from stages.validate import validate

RECORD_FIELDS = {"layout", "memory_gib", "gpu_memory_gib", "fits", "bubble"}
LAYOUT_FIELDS = {"tp", "pp", "dp", "zero_stage", "micro_batch_size", "grad_accum", "seq_len",
                 "activation_checkpointing"}


# ---------------------------------------------------------------------- the formula vs autograd
def saved_bytes(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters and the RoPE
    tables excluded: they are not activations); the layer's input counts if it is kept."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


@pytest.mark.parametrize("precision,kv_heads", [("fp32", 4), ("bf16", 4), ("bf16", 2)])
def test_layer_activation_formula_is_what_autograd_saves(precision, kv_heads):
    config = ModelConfig(hidden_size=48, intermediate_size=136, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, head_dim=16, vocab_size=64)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    layer = DecoderLayer(config).to(dtype)
    b, s = 3, 40
    x = torch.randn(b, s, config.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(s, config.head_dim, config.rope_theta, x.device, dtype)
    # PyTorch's CPU SDPA runs its flash kernel (saves the log-sum-exp, not the probabilities)
    expected = layer_activation_bytes_per_token(config, 1, precision, s, flash=True) * b * s
    assert saved_bytes(layer, x, cos, sin) == expected


# ---------------------------------------------------------------------- two layouts by hand
TINY = get_flavor("tiny")  # h 64, f 176, 4 layers, 4 heads of 16, vocab 264


def test_hand_computed_tp2_pp2_zero1_bf16_checkpointed():
    layout = Layout(tp=2, pp=2, dp=2, zero_stage=1, micro_batch_size=2, grad_accum=3, seq_len=32,
                    activation_checkpointing=True)
    h, f, V, tokens = 64, 176, 264, 2 * 32
    # one decoder layer, bf16, per token: two norms keep an fp32 input copy (4h), the
    # normalised input (2h) and rsqrt (4 B); q/k/v and mlp inputs (2h each) are replicated;
    # per TP rank: q, k, v, attention output and o_proj input (2·2·16 heads·d each, 2 of 4
    # heads), the log-sum-exp (4 B × 2 heads), gate, silu, up, product (2 B × 88 units each)
    replicated = 2 * (4 * h + 2 * h + 4) + 2 * (2 * h)
    per_rank = 5 * (2 * 2 * 16) + 4 * 2 + 4 * (2 * 88)
    layer_full = (replicated + per_rank) * tokens
    assert layer_full == 132_096
    kept = 2 * (2 * h * tokens) + 2 * h * tokens  # 2 checkpointed layer inputs + stage output
    working = layer_full + 2 * (2 * h * tokens)  # one layer recomputed, its in/out gradients
    first = 2 * kept + working  # min(p=2, m=3) micro-batches in flight
    logits = (2 + 4 + 4 + 4) * (V // 2) * tokens  # bf16 head output, fp32 copy, log-softmax, grad
    last = kept + working + logits
    assert (first, last) == (197_632, 291_328)
    acts = activations(TINY, layout, "bf16")
    assert (acts["first_stage_bytes"], acts["last_stage_bytes"], acts["bytes"]) == (first, last, last)
    # parameters per GPU: 2 layers with halved matrices and whole norms + half the vocab rows + norm
    n = 2 * ((4 * h * h + 3 * h * f) // 2 + 2 * h) + V * h // 2 + h
    assert n == 58_944
    states = 2 * n + 18 * n // 2 + (2 * n - n)  # DeepSpeed's ZeRO-2 split + ZeRO-1's whole 16-bit grads
    assert model_states(TINY, layout)["bytes"] == states == 707_328
    verdict = fit(TINY, layout, "bf16", gpu_memory_gib=1e-3)
    assert verdict["total_bytes"] == states + last == 998_656
    assert verdict["fits"] is (998_656 <= 0.9 * 1e-3 * GIB)  # 0.9 MiB usable: 966,367 B → False
    assert verdict["fits"] is False and verdict["bubble"] == 1 / 4 and verdict["tokens_per_step"] == 2 * 2 * 3 * 32


def test_hand_computed_sequence_parallel_tp2_pp2_bf16_checkpointed():
    """The layout above with sequence parallelism: the norms' saves and every hidden state
    between layers are split over the 2 TP ranks; the projections' gathered inputs are not."""
    layout = Layout(tp=2, pp=2, dp=2, zero_stage=1, micro_batch_size=2, grad_accum=3, seq_len=32,
                    activation_checkpointing=True)
    h, V, tokens = 64, 264, 2 * 32
    norms = 2 * (4 * h + 2 * h + 4) // 2  # on this rank's 32 of the 64 tokens
    gathered = 2 * (2 * h)  # q/k/v and gate/up inputs: the whole sequence, all-gathered
    per_rank = 5 * (2 * 2 * 16) + 4 * 2 + 4 * (2 * 88)  # as without sequence parallelism
    layer_full = (norms + gathered + per_rank) * tokens
    assert layer_full == 107_264
    hidden = 2 * h * tokens // 2  # a bf16 hidden state of one micro-batch, half the tokens
    kept = 2 * hidden + hidden  # 2 checkpointed layer inputs + the stage output
    working = layer_full + 2 * hidden
    first, last = 2 * kept + working, kept + working + (2 + 4 + 4 + 4) * (V // 2) * tokens
    assert (first, last) == (140_032, 246_016)  # without sequence parallelism: 197,632 and 291,328
    acts = activations(TINY, layout, "bf16", sp=True)
    assert (acts["first_stage_bytes"], acts["last_stage_bytes"]) == (first, last)
    assert fit(TINY, layout, "bf16", gpu_memory_gib=1e-3, sp=True)["total_bytes"] == 707_328 + last
    assert fit(TINY, layout, "bf16", gpu_memory_gib=1e-3, sp=False)["total_bytes"] == 998_656


def test_hand_computed_tp1_zero2_fp32_no_checkpointing():
    layout = Layout(tp=1, pp=1, dp=4, zero_stage=2, micro_batch_size=1, grad_accum=4, seq_len=16,
                    activation_checkpointing=False)
    h, f, V, a, s, tokens = 64, 176, 264, 4, 16, 16
    # fp32: the norm's float() is the input itself (4h), no flash: the probabilities a·s per token
    replicated = 2 * (4 * h + 4 * h + 4) + 2 * (4 * h)
    attention = 5 * 4 * h + 4 * a * s
    mlp = 4 * 4 * f
    layer_full = (replicated + attention + mlp) * tokens
    assert layer_full == 94_336
    stored = 4 * layer_full  # all 4 layers, one micro-batch (gradient accumulation runs them in turn)
    working = 2 * 4 * h * tokens
    logits = (4 + 8) * V * tokens  # fp32 head output (no copy), log-softmax, its gradient
    acts = activations(TINY, layout, "fp32")
    assert acts["bytes"] == stored + working + logits == 436_224
    n = 4 * (4 * h * h + 3 * h * f + 2 * h) + 2 * V * h + h
    assert n == TINY.params == 235_072
    assert model_states(TINY, layout)["bytes"] == 2 * n + 18 * n // 4 == 1_527_968  # ZeRO-2: no extra
    verdict = fit(TINY, layout, "fp32", gpu_memory_gib=80)
    assert verdict["total_bytes"] == 1_964_192 and verdict["fits"] and verdict["bubble"] == 0.0


# ---------------------------------------------------------------------- the teleflm layouts
@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda *overrides: compose(config_name="train", overrides=list(overrides))


def test_teleflm_stages_fit_and_the_seed_layout_is_evaluated(hydra_conf, tmp_path, capsys):
    records = {}
    for name in ("teleflm_52b", "teleflm_102b", "teleflm_1t"):
        report = run_stage(hydra_conf("schedule=teleflm", f"stage={name}", "dry_run=true", f"run_dir={tmp_path}"))
        record = json.loads((tmp_path / name / "dry_run.json").read_text())
        assert set(record) == RECORD_FIELDS and set(record["layout"]) == LAYOUT_FIELDS
        assert set(record["memory_gib"]) == {"model_states", "activations", "total"}
        assert record == report["memory"]["record"] and record["gpu_memory_gib"] == 80.0
        lay = record["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 896 and lay["tp"] == 8
        assert record["fits"] and record["memory_gib"]["total"] <= 72.0 and record["bubble"] <= 0.05 + 1e-3
        records[name] = record
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["teleflm_102b", "teleflm_1t", "teleflm_52b"]
    assert all([p.name for p in (tmp_path / n).iterdir()] == ["dry_run.json"] for n in records)
    assert records["teleflm_1t"]["layout"]["pp"] == 28 and records["teleflm_1t"]["memory_gib"]["activations"] > 20
    out = capsys.readouterr().out
    assert out.count(": fits") == 3 and "tokens per step" in out
    # the seed's own 1T layout (TP 32 × PP 28 × DP 1) is evaluated; the old PP 112 × DP 8 is not fitting
    seed = run_stage(hydra_conf("stage=teleflm_1t", "deepspeed.tensor_parallel=32", "stage.grad_accum=2048",
                                "dry_run=true", f"run_dir={tmp_path / 'seed'}"))["memory"]["record"]
    assert (seed["layout"]["tp"], seed["layout"]["pp"], seed["layout"]["dp"]) == (32, 28, 1) and seed["fits"]
    old = run_stage(hydra_conf("stage=teleflm_1t", "deepspeed.tensor_parallel=1", "deepspeed.pipeline_stages=112",
                               "stage.grad_accum=256", "dry_run=true", f"run_dir={tmp_path / 'old'}"))
    assert not old["memory"]["record"]["fits"] and old["memory"]["record"]["memory_gib"]["total"] > 80


@pytest.mark.slow
def test_cli_teleflm_multirun_dry_run_reports_all_three_fitting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.train", "-m", "schedule=teleflm", "dry_run=true",
                           f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": fits") == 3 and "DOES NOT FIT" not in proc.stdout
    for name in ("teleflm_52b", "teleflm_102b", "teleflm_1t"):
        assert json.loads((tmp_path / name / "dry_run.json").read_text())["fits"] is True


# ---------------------------------------------------------------------- bad layouts
@pytest.mark.parametrize("config,tp,field", [
    (get_flavor("tiny-s2"), 2, "num_attention_heads"),  # 5 heads
    (ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=16, vocab_size=256), 2, "num_key_value_heads"),
    (get_flavor("tiny"), 8, "num_attention_heads"),
    (ModelConfig(hidden_size=64, intermediate_size=102, num_hidden_layers=1, num_attention_heads=4,
                 head_dim=16, vocab_size=256), 4, "intermediate_size"),
    (ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 head_dim=16, vocab_size=259), 2, "vocab_size"),
])
def test_tp_must_split_whole_heads_units_and_rows(config, tp, field):
    with pytest.raises(LayoutError, match=field) as err:
        check_model_split(config, tp)
    assert "\n" not in str(err.value)
    if field == "vocab_size":
        assert "pad the vocabulary to 260 rows" in str(err.value)


def test_tp_times_pp_must_divide_the_world(hydra_conf):
    validate(to_config(hydra_conf("deepspeed=pipe", "deepspeed.tensor_parallel=2", "nproc=4")))
    with pytest.raises(StageConfigError, match=r"TP × PP × DP ≠ world size"):
        validate(to_config(hydra_conf("deepspeed=pipe", "deepspeed.tensor_parallel=2", "nproc=6")))
    with pytest.raises(StageConfigError, match="tensor_parallel"):
        validate(to_config(hydra_conf("deepspeed.tensor_parallel=0")))


def test_tp_without_a_pipeline_takes_every_zero_stage(hydra_conf):
    """TP × DP runs under ZeRO-0/1/2/3 (tests/integration/test_tensor_parallel_engine.py): the orchestrator's
    layout check lets each through."""
    for zero in (0, 1, 2, 3):
        cfg = to_config(hydra_conf("deepspeed=zero3", f"deepspeed.zero_stage={zero}", "deepspeed.tensor_parallel=2",
                                   "nproc=4"))
        validate(cfg)
        check_stage_layout(cfg, get_flavor("tiny"))


def test_sequence_parallel_needs_seq_len_divisible_by_tp(hydra_conf):
    validate(to_config(hydra_conf("deepspeed.tensor_parallel=2", "deepspeed.sequence_parallel=true",
                                  "stage.seq_len=32", "nproc=2")))
    with pytest.raises(LayoutError, match=r"sequence_parallel.*seq_len 33") as err:
        validate(to_config(hydra_conf("deepspeed.tensor_parallel=2", "deepspeed.sequence_parallel=true",
                                      "stage.seq_len=33", "nproc=2")))
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,message", [
    (["deepspeed.tensor_parallel=3", "nproc=3"], "does not divide stage.model's num_attention_heads (4)"),
    (["deepspeed=pipe", "deepspeed.tensor_parallel=2", "nproc=2"], "TP × PP × DP ≠ world size"),
    (["deepspeed=pipe", "deepspeed.zero_stage=2", "deepspeed.tensor_parallel=2", "nproc=4"],
     "DeepSpeed's pipeline allows ZeRO 0 or 1 only"),
    (["deepspeed=pipe", "deepspeed.zero_stage=3", "deepspeed.tensor_parallel=2", "nproc=4"],
     "DeepSpeed's pipeline allows ZeRO 0 or 1 only"),
])
def test_cli_refuses_bad_tp_in_one_line_before_any_worker(tmp_path, overrides, message):
    proc = subprocess.run([sys.executable, "-m", "stages.train", f"run_dir={tmp_path / 'run'}",
                           "worker_module=no_such_worker_module", *overrides],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train-stage: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run" / "tiny_s1").exists()
