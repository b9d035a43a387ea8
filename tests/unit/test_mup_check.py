"""μP checks (stages.mup, docs/mup.md): the proxy widths, the coordinate check on tiny widths
(μP flat, SP not, microsoft's ``mup`` package agreeing), the sweep's grid rule, exact growth
on the sweep's path, `grow info`'s multipliers and the `mup-check` console script."""

from __future__ import annotations

import json

import pytest

from growth.config import ConfigError, at_width, get_flavor
from stages.mup import coord, reference
from stages.mup.proxy import Batches, ProxyRun, corpus, proxy_stage, train
from stages.mup.sweep import best_lr, needs_more

TINY_WIDTHS = (32, 64, 128)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("mup_data"))


def test_at_width_keeps_depth_head_dim_ffn_ratio_and_base_width():
    base = get_flavor("tiny-s1")
    for w in (32, 256, 1024):
        c = at_width(base, w)
        assert (c.num_hidden_layers, c.head_dim, c.num_attention_heads) == (2, 16, w // 16)
        assert c.intermediate_size / w == base.intermediate_size / base.hidden_size
        assert c.hidden_size / c.mup_scale_factor == 32 and c.use_mup
    assert not at_width(base, 128, use_mup=False).use_mup
    proxy = get_flavor("mup-w32")
    assert get_flavor("mup-w256") == at_width(proxy, 256) and get_flavor("sp-w64") == at_width(proxy, 64, False)
    assert proxy.replace(initializer_range=base.initializer_range) == at_width(base, 32)
    with pytest.raises(ConfigError, match="head_dim"):
        at_width(base, 40)


def test_coordinate_check_tiny_widths(info):
    """μP: every activation's |Δx| flat across 32…128; SP: hidden outputs and logits grow."""
    spec = coord.CoordSpec(widths=TINY_WIDTHS, steps=2, seeds=(1,), regime="few")
    base = get_flavor("tiny-s1")
    mup = coord.slopes(coord.coord_check(base, spec, info, use_mup=True))
    sp = coord.slopes(coord.coord_check(base, spec, info, use_mup=False))
    assert all(abs(s["slope"]) < 0.3 for s in mup.values()), mup
    assert sp["logits"]["slope"] > 0.5 and sp["mlp"]["slope"] > 1.0, sp
    assert coord.verdict(mup, sp, tol=0.3).startswith("PASS")
    assert set(mup) == set(coord.KINDS) and set(mup["logits"]["delta"]) == {"32", "64", "128"}


_NO_MUP = "microsoft's mup is not installed: pip install --no-deps \"mup>=1.0\" (README, .ci/run)"


@pytest.mark.skipif(not reference.available(), reason=_NO_MUP)
def test_mup_package_reference_is_flat_too(info):
    spec = coord.CoordSpec(widths=TINY_WIDTHS, steps=2, seeds=(1,), regime="few")
    ref = coord.slopes(coord.coord_check(get_flavor("tiny-s1"), spec, info, True, build=reference.build))
    assert all(abs(s["slope"]) < 0.3 for s in ref.values()), ref


def test_mup_and_sp_coincide_at_the_base_width(info):
    """At the base width (32) μP's multipliers are all 1: the same run, bit for bit."""
    stage = proxy_stage(steps=2, eval_batches=1)
    losses = [train(ProxyRun(get_flavor(f"{p}-w32"), stage), Batches(info, stage)) for p in ("mup", "sp")]
    assert losses[0] == losses[1]


def test_slope_and_flattening_width():
    assert coord.fit_slope({32: 1.0, 64: 2.0, 128: 4.0}) == pytest.approx(1.0)
    falling = {32: 4.0, 64: 2.0, 128: 1.0, 256: 1.0, 512: 1.0}
    assert coord.flat_from(falling) == 128 and coord.flat_from({32: 1.0, 64: 2.0, 128: 4.0}) is None


def test_grid_extends_until_the_optimum_is_interior():
    curve = {2.0 ** e: [loss] for e, loss in zip(range(-8, -3), (3.0, 2.9, 2.8, 2.7, 2.6), strict=True)}
    assert best_lr(curve) == 2.0 ** -4 and needs_more(curve, -16, -1) == [-3]
    curve[2.0 ** -3] = [float("inf")]  # diverged: the optimum is now interior
    assert needs_more(curve, -16, -1) == []
    assert needs_more({2.0 ** -6: [1.0], 2.0 ** -5: [2.0]}, -16, -1, min_points=3) == [-7]


def test_growth_on_the_sweep_path_is_exact(info):
    """The grown stage starts from the parent's function (zero strategy, μP compensation)."""
    from operators import GrowthSpec, grow_state_dict

    stage = proxy_stage(steps=3, eval_batches=2)
    data = Batches(info, stage)
    small, wide = get_flavor("mup-w32"), get_flavor("mup-w64")
    parent = ProxyRun(small, stage)
    train(parent, data)
    config, weights = grow_state_dict(parent.state_dict(), small, wide, GrowthSpec.from_strategy("zero"))
    grown = ProxyRun(config, stage, weights=weights, grown=True)
    assert grown.eval_loss(data.eval) == pytest.approx(parent.eval_loss(data.eval), abs=1e-5)


def test_grow_info_prints_logit_scale_and_base_width(capsys):
    from growth.cli import main

    assert main(["info", "1t"]) == 0
    out = capsys.readouterr().out
    assert "effective logit scale output_mult / mup_scale_factor = 0.025 (1/40)" in out
    assert "implied base width hidden / mup_scale_factor = 256" in out
    assert main(["info", "52b", "--json"]) == 0
    mup = json.loads(capsys.readouterr().out)["mup"]
    assert mup == {"logit_scale": 1 / 32, "base_width": 512.0}


def test_mup_check_console_script(capsys):
    from stages.mup.cli import main

    assert main(["--widths", "32,64,128", "--steps", "2", "--seeds", "1", "--regime", "few", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["few"]["verdict"].startswith("PASS") and result["few"]["sp"]["logits"]["slope"] > 0.5
    steps = result["few"]["steps"]["mup"]["logits"]["64"]  # [mean |x|, mean |Δx|] at t = 0, 1, 2
    assert len(steps) == 3 and steps[0][1] == 0.0 and all(x > 0 and d > 0 for x, d in steps[1:])
