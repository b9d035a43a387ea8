"""ModelConfig: flavors, parameter counts, config.json I/O (ours and plain HF Llama), errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys

import pytest
import torch

from growth.config import FLAVORS, ConfigError, ModelConfig, get_flavor, resolve_config
from tests.conftest import assert_one_line_error, grow_in_process, random_config, run_grow, run_measured

# The seed table (Tele-FLM-1T README): parameters of each published size.
SEED_PARAMS = {"52b": 52.85e9, "102b": 102.3e9, "1t": 1083.74e9}


# ---------------------------------------------------------------------- flavors
@pytest.mark.parametrize(("name", "layers", "heads", "hidden", "ffn", "vocab", "out_mult", "scale"), [
    ("52b", 64, 64, 8192, 21824, 80384, 0.5, 16.0),
    ("102b", 80, 80, 10240, 27264, 80384, 0.5, 20.0),
    ("1t", 140, 160, 20480, 98304, 81920, 2.0, 80.0),
])
def test_published_flavors(name, layers, heads, hidden, ffn, vocab, out_mult, scale):
    c = get_flavor(name)
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.intermediate_size,
            c.vocab_size) == (layers, heads, hidden, ffn, vocab)
    assert c.num_key_value_heads == heads and c.head_dim == 128  # MHA, head_dim 128
    assert not c.tie_word_embeddings and c.use_mup
    assert (c.input_mult, c.output_mult, c.mup_scale_factor) == (1.0, out_mult, scale)
    assert (c.rope_theta, c.rms_norm_eps) == (10000.0, 1e-5)
    assert abs(c.params / SEED_PARAMS[name] - 1) < 0.002


def test_tiny_flavors_are_small_and_grow():
    assert 1e5 < get_flavor("tiny").params < 1e6
    s1, s2, s3 = (get_flavor(f"tiny-s{i}") for i in (1, 2, 3))
    for a, b in ((s1, s2), (s2, s3)):
        assert b.hidden_size > a.hidden_size and b.intermediate_size > a.intermediate_size
        assert b.num_hidden_layers > a.num_hidden_layers
        assert b.num_attention_heads > a.num_attention_heads and b.head_dim == a.head_dim
    assert s3.vocab_size > s2.vocab_size  # vocab padding grows, like 80384 → 81920


def test_get_flavor_returns_a_copy():
    """Flavors are frozen: a caller cannot change them, only derive a new config."""
    c = get_flavor("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vocab_size = 999
    with pytest.raises(TypeError):
        c.extra["x"] = 1
    c = c.replace(vocab_size=999)
    assert FLAVORS["tiny"].vocab_size != 999 and get_flavor("TINY").vocab_size != 999


@pytest.mark.parametrize("name", list(FLAVORS))
def test_params_equal_sum_of_tensor_shapes(name):
    c = get_flavor(name)
    assert sum(math.prod(s) for s in c.tensor_shapes().values()) == c.params
    assert c.bytes("float32") == 4 * c.params and c.bytes("bfloat16") == 2 * c.params


@pytest.mark.parametrize("name", ["tiny", "tiny-s3", "52b"])
def test_meta_model_has_config_params(name):
    from growth.model import TeleFLMForCausalLM

    with torch.device("meta"):
        model = TeleFLMForCausalLM(get_flavor(name))
    assert sum(p.numel() for p in model.parameters()) == get_flavor(name).params
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == get_flavor(name).tensor_shapes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["52b", "102b", "1t"])
def test_grow_info_big_flavors_fast_and_small(name):
    argv = [sys.executable, "-m", "growth.cli", "info", name, "--json"]
    m = run_measured(argv)
    if m.seconds >= 5 and os.getloadavg()[0] > (os.cpu_count() or 1):
        m = run_measured(argv)  # a busy machine (parallel test runs) stretches wall time; retry once
    assert m.rc == 0, m.stderr
    info = json.loads(m.stdout)
    assert abs(info["params"] / SEED_PARAMS[name] - 1) < 0.002, info["params"]
    assert info["params"] == get_flavor(name).params
    assert info["vocab_size"] == get_flavor(name).vocab_size
    assert info["bytes"]["bfloat16"] == 2 * info["params"]
    assert m.cpu_seconds < 5, f"grow info {name} used {m.cpu_seconds:.2f}s of CPU"
    loaded = os.getloadavg()[0] > (os.cpu_count() or 1)
    assert m.seconds < 5 or loaded, f"grow info {name} took {m.seconds:.2f}s on an idle machine"
    assert m.max_rss < 1024**3, f"grow info {name} peaked at {m.max_rss / 2**20:.0f} MiB"


@pytest.mark.slow
def test_grow_info_text_and_errors(tmp_path, capsys):
    rc, out, err = grow_in_process(capsys, "info", "1t")
    assert rc == 0, err
    assert "1,083,813,908,480" in out and "vocab 81920" in out
    rc, _, err = run_grow("info", "no-such-flavor")
    assert_one_line_error(rc, err, "no-such-flavor")
    get_flavor("tiny").save(tmp_path)
    rc, out, err = grow_in_process(capsys, "info", tmp_path / "config.json", "--json")
    assert rc == 0, err
    assert json.loads(out)["params"] == get_flavor("tiny").params


# ---------------------------------------------------------------------- config.json
@pytest.mark.parametrize("seed", range(4))
def test_config_json_round_trip(tmp_path, seed):
    r = random.Random(seed)
    c = random_config(r, gqa=seed % 2 == 1, mup=seed >= 2,
                      valid_vocab_size=None if seed < 3 else 11,
                      tie_word_embeddings=seed == 1)
    c.save(tmp_path)
    back = ModelConfig.load(tmp_path)
    assert back == c
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    assert resolve_config(tmp_path / "config.json") == c


@pytest.mark.parametrize("name", list(FLAVORS))
def test_flavor_round_trip(tmp_path, name):
    get_flavor(name).save(tmp_path)
    assert ModelConfig.load(tmp_path / "config.json") == get_flavor(name)


def test_unknown_keys_are_kept(tmp_path):
    raw = {**get_flavor("tiny").to_hf_dict(), "bos_token_id": 1, "my_note": "hello"}
    c = ModelConfig.from_hf_dict(raw)
    assert c.extra == {"bos_token_id": 1, "my_note": "hello"}
    assert c.to_hf_dict()["my_note"] == "hello"


def test_reads_transformers_llama_config(tmp_path):
    """GQA, rope_parameters (transformers ≥ 5 writes no top-level rope_theta), tied embeddings."""
    import transformers

    hf = transformers.LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                  head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    c = ModelConfig.load(tmp_path)
    assert (c.num_attention_heads, c.num_key_value_heads, c.num_key_value_groups) == (4, 2, 2)
    assert (c.head_dim, c.rope_theta, c.rms_norm_eps) == (16, 500000.0, 1e-6)
    assert c.tie_word_embeddings and not c.use_mup and c.is_plain_llama
    assert c.logit_scale == 1.0 and c.embedding_scale == 1.0


@pytest.mark.parametrize("rope", [
    {"rope_theta": 123456.0},  # transformers < 5: top-level, rope_scaling null
    {"rope_theta": 123456.0, "rope_scaling": None},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 123456.0}},  # transformers ≥ 5
    {"rope_scaling": {"rope_type": "default", "rope_theta": 123456.0}},
])
def test_rope_theta_spellings(rope):
    raw = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, **rope}
    c = ModelConfig.from_hf_dict(raw)
    assert c.rope_theta == 123456.0 and c.head_dim == 16 and c.num_key_value_heads == 4


def test_plain_llama_defaults_and_teleflm_detection():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100}
    c = ModelConfig.from_hf_dict(base)
    assert c.to_hf_dict()["model_type"] == "llama" and not c.use_mup
    # Tele-FLM's own config.json carries multipliers without a use_mup flag.
    t = ModelConfig.from_hf_dict({**base, "output_mult": 2.0, "mup_scale_factor": 80.0})
    assert t.use_mup and t.logit_scale == 2.0 / 80.0 and t.to_hf_dict()["model_type"] == "teleflm"


BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100}


@pytest.mark.parametrize(("change", "field"), [
    ({"hidden_size": None}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_attention_heads": "4"}, "num_attention_heads"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"intermediate_size": True}, "intermediate_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"mup_scale_factor": float("inf")}, "mup_scale_factor"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"valid_vocab_size": 101}, "valid_vocab_size"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
    ({"growth_mask": {"c": 2.0}}, "growth_mask.c"),
])
def test_validation_errors_name_the_field(change, field):
    raw = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=field) as err:
        ModelConfig.from_hf_dict(raw, source="some/config.json")
    assert str(err.value).startswith("some/config.json: ")


def test_missing_config_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="flavor"):
        resolve_config(tmp_path / "nothing-here")
