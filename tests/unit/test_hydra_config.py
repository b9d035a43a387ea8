"""train-stage's Hydra config: composition, overrides, typos, the teleflm dry run, and bad
input caught before any worker starts (proved with a fake worker that leaves a mark)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from growth.checkpoint import CheckpointReader
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.runs import DS_LATEST_NAME, StageDir
from growth.runs import STAGE_CONFIG_NAME as RESOLVED_NAME
from stages.launch.plan import StageError
from stages.launch.run import run_stage
from stages.resolved import ResolvedStage
from stages.schema import to_config, to_plain
from stages.train import CONF_DIR
from stages.validate import validate
from tests.helpers.stage_cli import make_cli

RESOLVED_KEYS = ResolvedStage.RESOLVED_KEYS
GROUPS = ("model", "stage", "growth", "deepspeed", "data", "schedule")
SMALL_DATA = "data.max_bytes=1000000"  # a quick corpus for runs that get past the checks

def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.fixture
def hydra_conf():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda *overrides, hydra=False: compose(config_name="train", overrides=list(overrides),
                                                      return_hydra_config=hydra)


# ---------------------------------------------------------------------- composition
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_checks(hydra_conf, group):
    assert options(group)
    for option in options(group):
        validate(to_config(hydra_conf(f"{group}={option}")))
        cfg = to_plain(hydra_conf(f"{group}={option}"))
        if group == "stage":
            assert cfg["stage"]["name"] == option
        elif group == "model":
            assert cfg["stage"]["model"] == option and get_flavor(option)
        elif group in ("deepspeed", "schedule"):
            assert cfg[group]["name"] == option
        elif group == "growth":
            assert cfg["stage"]["growth"]["strategy"] == option


def test_required_overrides_work(hydra_conf):
    cfg = to_plain(hydra_conf("stage=tiny_s2", "deepspeed=zero3", "nproc=4", "stage.steps=7",
                              "run_dir=/somewhere/run"))
    assert (cfg["stage"]["name"], cfg["stage"]["parent"], cfg["stage"]["model"]) == ("tiny_s2", "tiny_s1", "tiny-s2")
    assert (cfg["deepspeed"]["name"], cfg["deepspeed"]["zero_stage"]) == ("zero3", 3)
    assert (cfg["nproc"], cfg["stage"]["steps"], cfg["run_dir"]) == (4, 7, "/somewhere/run")
    pipe = to_plain(hydra_conf("deepspeed=pipe"))["deepspeed"]
    assert pipe["pipeline"] and pipe["zero_stage"] == 1


def test_stage_chooses_its_groups_and_the_command_line_wins(hydra_conf):
    cfg = to_plain(hydra_conf("stage=tiny_s3"))
    assert cfg["stage"]["model"] == "tiny-s3" and cfg["stage"]["growth"]["strategy"] == "masked"
    cfg = to_plain(hydra_conf("stage=tiny_s3", "growth=zero", "model=tiny"))
    assert cfg["stage"]["model"] == "tiny" and cfg["stage"]["growth"]["strategy"] == "zero"
    big = to_plain(hydra_conf("stage=teleflm_102b"))
    assert (big["deepspeed"]["name"], big["deepspeed"]["precision"], big["nnodes"]) == ("zero1", "bf16", 112)
    assert to_plain(hydra_conf("stage=teleflm_102b", "deepspeed=zero3"))["deepspeed"]["zero_stage"] == 3


def test_typos_fail_at_composition(hydra_conf):
    with pytest.raises(ConfigCompositionException, match="stpes"):
        hydra_conf("stage.stpes=3")
    with pytest.raises(ConfigCompositionException):
        hydra_conf("stage.steps=many")
    with pytest.raises(Exception, match="zero4"):
        hydra_conf("deepspeed=zero4")


def test_typo_in_a_config_file_fails(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    text = (conf / "stage" / "tiny_s1.yaml").read_text().replace("warmup_steps:", "warmup_stpes:")
    (conf / "stage" / "tiny_s1.yaml").write_text(text)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        with pytest.raises(Exception, match="warmup_stpes"):
            compose(config_name="train", overrides=["stage=tiny_s1"])


def test_schedules_are_ordered_sweeps_writing_under_run_dir(hydra_conf):
    cfg = hydra_conf("schedule=tiny", "run_dir=/r/tiny", hydra=True)
    assert cfg.schedule.stages == ["tiny_s1", "tiny_s2", "tiny_s3"]
    assert cfg.hydra.sweeper.params.stage == "tiny_s1,tiny_s2,tiny_s3"
    assert cfg.hydra.sweeper.max_batch_size == 1 and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweep.dir.startswith("/r/tiny/.hydra/") and cfg.hydra.run.dir.startswith("/r/tiny/.hydra/")
    assert cfg.hydra.job.chdir is False
    for i, name in enumerate(cfg.schedule.stages[1:]):  # each stage's parent is the one before
        assert to_plain(hydra_conf(f"stage={name}"))["stage"]["parent"] == cfg.schedule.stages[i]


# ---------------------------------------------------------------------- teleflm dry run
def test_teleflm_dry_run_plans_and_memory(hydra_conf, tmp_path, capsys):
    names = to_plain(hydra_conf("schedule=teleflm"))["schedule"]["stages"]
    assert names == ["teleflm_52b", "teleflm_102b", "teleflm_1t"]
    reports = [run_stage(hydra_conf("schedule=teleflm", f"stage={n}", "dry_run=true", f"run_dir={tmp_path}"))
               for n in names]
    out = capsys.readouterr().out
    assert "growth" not in reports[0] and "fresh init" in out
    g102, g1t = reports[1]["growth"], reports[2]["growth"]
    assert abs(g102["from_params"] / 52.85e9 - 1) < 2e-3 and abs(g102["to_params"] / 102.3e9 - 1) < 2e-3
    assert abs(g1t["from_params"] - g102["to_params"]) == 0 and abs(g1t["to_params"] / 1083.74e9 - 1) < 2e-3
    assert g102["exact"] and not g102["masked"] and g1t["masked"] and len(g1t["new_layers"]) == 60
    assert g102["tensors"] > 700 and g102["bytes_written"] > g102["bytes_read"] > 0
    for report in reports:
        mem = report["memory"]
        assert mem["function"] == "estimate_zero2_model_states_mem_needs"
        assert mem["params_per_gpu"] * mem["pipeline_degree"] * mem["tensor_parallel"] >= mem["params"]
        assert 0 < mem["gpu_bytes"] < 80 * 1024**3  # the realistic settings fit an 80 GB card
    assert out.count("model states per GPU") == 3 and "the fullest holds" in out
    assert "52.82B → 102.21B" in out and "102.21B → 1,083.81B" in out
    zero3 = run_stage(hydra_conf("stage=teleflm_1t", "deepspeed=zero3", "dry_run=true", f"run_dir={tmp_path}"))
    assert zero3["memory"]["function"] == "estimate_zero3_model_states_mem_needs"
    # a dry run writes nothing but RUN_DIR/<stage>/dry_run.json (issue 13)
    assert all([f.name for f in d.iterdir()] == ["dry_run.json"] for d in tmp_path.iterdir())


# ---------------------------------------------------------------------- the real CLI
@pytest.fixture
def cli(tmp_path):
    """Run train-stage in a subprocess with the fake worker; returns (rc, out, err, ran)."""
    return make_cli(tmp_path)


@pytest.mark.slow
def test_cli_teleflm_dry_run_runs_the_schedule_in_order(cli):
    rc, out, err, ran = cli("schedule=teleflm", "dry_run=true")
    assert rc == 0, err
    order = [out.index(f"== stage {n}") for n in ("teleflm_52b", "teleflm_102b", "teleflm_1t")]
    assert order == sorted(order) and out.count("model states per GPU") == 3 and not ran


def parent_final(run: Path, config, name: str = "tiny_s1") -> Path:
    return init_checkpoint(config, StageDir(run / name).final, seed=0)


def fake_ds_checkpoint(layout: StageDir) -> None:
    """What a crashed stage leaves: ds_ckpt/ with DeepSpeed's ``latest`` pointer."""
    layout.ds_ckpt.mkdir(parents=True, exist_ok=True)
    (layout.ds_ckpt / DS_LATEST_NAME).write_text("step00000020")


def corrupt(final: Path) -> None:
    shard = final / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


BAD_INPUTS = {
    "unknown stage": (["stage=nope"], None, "Could not find 'stage/nope'"),
    "typo override": (["stage.stpes=3"], None, "Key 'stpes' not in 'StageCfg'"),
    "unknown option": (["deepspeed=zero4"], None, "Could not find 'deepspeed/zero4'"),
    "unknown model": (["stage.model=tiny-s9"], None, "neither a flavor"),
    "parent output missing": (["stage=tiny_s2"], None,
                              "parent stage 'tiny_s1' has no final checkpoint at"),
    "target smaller than parent": (["stage=tiny_s2"], lambda run: parent_final(run, get_flavor("tiny-s3")),
                                   "does not grow into stage.model 'tiny-s2'"),
    "head_dim change": (["stage=tiny_s2"], lambda run: parent_final(run, get_flavor("tiny-s1").replace(
        head_dim=8)), "head_dim"),
    "corrupt parent checkpoint": (["stage=tiny_s2"], lambda run: corrupt(parent_final(run, get_flavor("tiny-s1"))),
                                  "model.safetensors: truncated"),
    "pipeline with ZeRO-2": (["deepspeed=pipe", "deepspeed.zero_stage=2"], None, "ZeRO 0 or 1 only"),
    # issue 16: Hydra's own errors, keys added with "+", values the ranks must never see
    "added unknown key": (["+stage.stepz=5"], None, "unknown config key 'stage.stepz'"),
    "wrong type": (["stage.steps=many"], None, "Value 'many' of type 'str' could not be converted"),
    "unwritable run_dir": (["run_dir=/proc/flm-no-such-dir"], None, "/proc/flm-no-such-dir"),
    "nan lr": (["stage.lr=nan"], None, "field 'stage.lr' must be a finite number"),
    "port out of range": (["master_port=99999"], None, "field 'master_port' must be a TCP port"),
    "unfinished stage without resume": (["stage=tiny_s1"], lambda run: fake_ds_checkpoint(StageDir(run / "tiny_s1")),
                                        "resume=true"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_worker(cli, tmp_path, case):
    overrides, setup, needle = BAD_INPUTS[case]
    if setup is not None:
        setup(tmp_path / "run")
    rc, out, err, ran = cli(*overrides)
    assert rc == 2 and not ran, (rc, out, err)
    assert needle in err and "Traceback" not in err, err
    if "train-stage: error:" in err:  # ours: exactly one line
        assert len(err.strip().splitlines()) == 1, err
    stage_dirs = [p.name for p in (tmp_path / "run").glob("*") if not p.name.startswith(".")]
    assert "tiny_s2" not in stage_dirs  # nothing was prepared for the failed stage


@pytest.mark.slow
def test_fake_worker_gets_the_contract(cli, tmp_path):
    """Positive control: the same harness does reach the worker, with every contract key."""
    rc, out, err, ran = cli("stage=tiny_s1", "nproc=1", SMALL_DATA)
    assert rc == 0 and ran, err
    resolved = json.loads((tmp_path / "run" / "tiny_s1" / RESOLVED_NAME).read_text())
    assert set(RESOLVED_KEYS) <= set(resolved) and resolved["init_checkpoint"] is None
    assert resolved["stage_dir"] == str(tmp_path / "run" / "tiny_s1")
    assert resolved["model_config"] == get_flavor("tiny-s1").to_hf_dict()
    assert resolved["parent_eval_loss_end"] is None and resolved["parent_lr"] is None
    assert Path(resolved["data"]["paths"]["train"]).is_file() and resolved["data"]["vocab_size"] == 259
    parent_final(tmp_path / "run", get_flavor("tiny-s1"))  # the export a real worker writes
    rc, out, err, ran = cli("stage=tiny_s1", "nproc=1", SMALL_DATA)  # finished: refuse …
    assert rc != 0 and not ran and "already finished" in err
    rc, out, err, ran = cli("stage=tiny_s1", "nproc=1", SMALL_DATA, "resume=true")  # … or skip
    assert rc == 0 and not ran and "skipped" in out


@pytest.mark.slow
def test_parent_is_grown_into_the_stage_init(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err, _ = cli("stage=tiny_s1", "nproc=1", SMALL_DATA)
    assert rc == 0, err
    parent_final(run, get_flavor("tiny-s1"))  # what the real worker would have exported
    rc, out, err, ran = cli("stage=tiny_s2", "nproc=1", SMALL_DATA)
    assert rc == 0 and ran, err
    resolved = json.loads((run / "tiny_s2" / RESOLVED_NAME).read_text())
    assert resolved["init_checkpoint"] == str(StageDir(run / "tiny_s2").init)
    with CheckpointReader(resolved["init_checkpoint"]) as grown:
        assert grown.config.tensor_shapes() == get_flavor("tiny-s2").tensor_shapes()
        assert resolved["model_config"] == grown.config.to_hf_dict()  # eps rescaled by zero growth
        assert grown.history["events"][-1]["kind"] == "grow"
    assert resolved["parent_eval_loss_end"] == 2.5 and resolved["parent_lr"] == 3e-3
    # no growth needed: the parent's final is used as it is
    rc, out, err, ran = cli("stage=tiny_s2", "stage.name=same", "model=tiny-s1", "nproc=1", SMALL_DATA)
    assert rc == 0 and ran, err
    same = json.loads((run / "same" / RESOLVED_NAME).read_text())
    assert same["init_checkpoint"] == str(StageDir(run / "tiny_s1").final) and not StageDir(run / "same").init.exists()


def test_run_stage_in_process_raises_stage_error(hydra_conf, tmp_path):
    with pytest.raises(StageError, match="parent stage 'tiny_s1'"):
        run_stage(hydra_conf("stage=tiny_s2", f"run_dir={tmp_path}"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resume_continues_only_from_a_deepspeed_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    for name, has_ckpt in (("crashed", True), ("died_early", False)):
        StageDir(run / name).ds_ckpt.mkdir(parents=True)
        if has_ckpt:
            fake_ds_checkpoint(StageDir(run / name))
        rc, out, err, ran = cli("stage=tiny_s1", f"stage.name={name}", "nproc=1", SMALL_DATA, "resume=true")
        assert rc == 0 and ran, err
        resolved = json.loads((run / name / RESOLVED_NAME).read_text())
        assert resolved["resume"] is has_ckpt  # no checkpoint yet: the stage starts over
        assert ("resuming from its DeepSpeed checkpoint" in out) is has_ckpt
