"""The μP LR sweep: `train-stage -m schedule=mup_sweep` composes (Hydra Compose API) into a
width × LR × seed grid of μP and SP proxies, one point trains through the real CLI, and
benchmarks/mup_transfer.py --smoke prints its JSON (docs/mup.md)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hydra import compose, initialize_config_dir

from growth.config import get_flavor
from stages.data import as_data_cfg
from stages.mup.proxy import EMBEDDED, proxy_stage
from stages.schema import to_config
from stages.train import CONF_DIR
from stages.validate import validate
from tests.integration.test_benchmarks_smoke import last_json, load
from tests.integration.test_schedule import run_cli


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda *overrides, hydra=False: compose(config_name="train", overrides=list(overrides),
                                                      return_hydra_config=hydra)


def test_sweep_config_composes_into_a_width_lr_seed_grid(hydra_conf):
    params = hydra_conf("schedule=mup_sweep", hydra=True).hydra.sweeper.params
    models = params["stage.model"].split(",")
    lrs = sorted(float(x) for x in params["stage.lr"].split(","))
    widths = {p: sorted(get_flavor(m).hidden_size for m in models if m.startswith(p)) for p in ("mup", "sp")}
    assert widths["mup"] == widths["sp"] and len(widths["mup"]) >= 4 and widths["mup"][-1] / widths["mup"][0] >= 8
    assert all(get_flavor(m).use_mup == m.startswith("mup") for m in models)
    assert len(lrs) >= 5 and all(math.isclose(b / a, 2.0) for a, b in zip(lrs, lrs[1:], strict=False))
    assert len(params["stage.seed"].split(",")) >= 2
    names = set()
    for model in models:  # every job composes, checks and gets its own stage dir
        cfg = to_config(hydra_conf("schedule=mup_sweep", f"stage.model={model}", f"stage.lr={lrs[0]}",
                                   "stage.seed=2"))
        validate(cfg)
        names.add(cfg.stage.name)
        assert cfg.nproc == 1 and cfg.stage.steps == proxy_stage().steps
    assert len(names) == len(models)


def test_proxy_stage_matches_the_in_process_runs(hydra_conf):
    """benchmarks/mup_transfer.py trains proxy_stage(); the Hydra stage must be the same run."""
    stage = to_config(hydra_conf("stage=mup_proxy")).stage
    mine = proxy_stage()
    for field in ("steps", "micro_batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "decay",
                  "min_lr_ratio", "weight_decay", "betas", "eps", "eval_batches", "seed"):
        ours, theirs = getattr(stage, field), getattr(mine, field)
        assert (tuple(ours) if field == "betas" else ours) == theirs, field
    data, embedded = to_config(hydra_conf("stage=mup_proxy")).data, as_data_cfg(EMBEDDED)
    assert data == dataclasses.replace(embedded, cache_dir=data.cache_dir)  # the same corpus


@pytest.mark.slow
def test_one_sweep_point_trains_through_train_stage(tmp_path):
    from stages.mup.cli import main

    run = tmp_path / "run"
    proc = run_cli(tmp_path, "-m", "schedule=mup_sweep", f"run_dir={run}", "stage.model=mup-w32,sp-w64",
                   "stage.lr=0.0078125", "stage.seed=1", "stage.steps=3", "stage.warmup_steps=1",
                   "stage.eval_batches=1", "data.max_bytes=1000000", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["--report", str(run)]) == 0


@pytest.mark.slow
def test_benchmark_smoke(capsys):
    load("mup_transfer").main(["--smoke"])
    result = last_json(capsys.readouterr().out)
    assert set(result) == {"lr_grid", "widths", "mup", "sp", "grown"}
    assert set(result["mup"]) == set(result["sp"]) == {str(w) for w in result["widths"]}
    assert "32->64" in result["grown"] and "sp:32->64" in result["grown"]
    for curve in [*result["mup"].values(), *result["sp"].values(), *result["grown"].values()]:
        assert curve and all(isinstance(v, list) and v for v in curve.values())
