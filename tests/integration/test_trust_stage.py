"""Trust, second pass (issue 22), the stage side: nothing in a ds_ckpt tag runs on
``resume=true`` or on ``grow import``, a damaged newest tag is never resumed, carried files
never come through symlinks into ``final/``, the stage lock never follows a symlink, and
``launcher=slurm`` cannot be injected.

One real stage (ZeRO-1, 2 CPU ranks, 6 steps, a tag every 2) started from a checkpoint
whose tokenizer files are symlinks serves every slow test here; each copies what it breaks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from flmcore.safe_load import load
from growth.checkpoint import CheckpointReader
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.runs import StageDir
from stages import tag_seal
from stages.launch.lock import StageLock, StageLockedError
from stages.launch.slurm import sbatch_script
from stages.rank import elastic
from stages.schema import StageConfigError, TrainConfig
from stages.validate import validate
from tests.conftest import assert_one_line_error
from tests.conftest import grow_in_process as grow
from tests.helpers.ds_helpers import (
    REPO,
    _env,
    base_dir,
    data_info,
    new_stage_dir,
    read_log,
    torchrun_argv,
    write_stage_config,
)
from tests.unit.test_trust_import import Boom

STAGE = {"steps": 6, "save_every": 2}
NEWEST, OLDER = "step00000006", "step00000004"


# ---------------------------------------------------------------------- the one real stage
@pytest.fixture(scope="module")
def trained() -> dict[str, Path]:
    """A finished tiny stage started (stage.init_from) from a checkpoint with symlinked
    tokenizer files pointing at a secret and at /proc/self/environ."""
    src = base_dir() / "trust-src"
    shutil.rmtree(src, ignore_errors=True)
    init_checkpoint(get_flavor("tiny-s1"), src, seed=0, source="tiny-s1")
    secret = base_dir() / "trust-shadow"
    secret.write_text("root:SECRET-HASH\n")
    (src / "tokenizer.model").symlink_to(secret)
    (src / "tokenizer.json").symlink_to("/proc/self/environ")
    (src / "tokenizer_config.json").write_text('{"use_fast": false}')
    stage_dir = new_stage_dir("trust-stage")
    run(write_stage_config(stage_dir, data_info(), init_checkpoint=src, **STAGE), expect_ok=True)
    return {"src": src, "stage": stage_dir}


def run(config: Path, expect_ok: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_argv(config), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert (proc.returncode == 0) == expect_ok, proc.stderr[-4000:]
    return proc


def crashed_copy(trained: dict[str, Path], name: str) -> Path:
    """The stage's checkpoints in a new stage dir, as if its workers died after step 6."""
    stage_dir = new_stage_dir(name)
    shutil.copytree(StageDir(trained["stage"]).ds_ckpt, StageDir(stage_dir).ds_ckpt, symlinks=True)
    return stage_dir


def resume(stage_dir: Path, trained: dict[str, Path], expect_ok: bool) -> subprocess.CompletedProcess:
    return run(write_stage_config(stage_dir, data_info(), init_checkpoint=trained["src"], resume=True, **STAGE),
               expect_ok)


@pytest.mark.slow
def test_init_from_symlinks_are_not_carried_into_final(trained):
    final = StageDir(trained["stage"]).final
    assert not (final / "tokenizer.model").exists() and not (final / "tokenizer.json").exists()
    assert (final / "tokenizer_config.json").read_text() == '{"use_fast": false}'
    assert not [p for p in final.rglob("*") if p.is_file() and b"SECRET-HASH" in p.read_bytes()]


@pytest.mark.slow
def test_resume_of_a_tag_with_a_payload_is_refused_and_nothing_runs(trained, tmp_path):
    stage_dir = crashed_copy(trained, "trust-payload")
    marker = tmp_path / "PWNED"
    victim = StageDir(stage_dir).ds_ckpt / NEWEST / "mp_rank_00_model_states.pt"
    torch.save({**load(victim), "x": Boom(marker)}, victim)
    tag_seal.write_seal(victim.parent)  # sealed after the plant: the digest check cannot catch it
    proc = resume(stage_dir, trained, expect_ok=False)
    errors = [ln for ln in proc.stderr.splitlines() if "train-stage worker: error:" in ln]
    assert errors and all("mp_rank_00_model_states.pt" in ln and "posix.system" in ln for ln in errors), \
        proc.stderr[-3000:]
    assert not marker.exists(), "the pickle's command ran"


def overwrite_floats(path: Path, value: float = 10.0, count: int = 3) -> None:
    """Overwrite ``count`` float32 values in the largest tensor record of a torch zip file,
    in place: the file stays a valid zip (only its CRC is off)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(torch.full((count,), value).numpy().tobytes())
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is not None  # still a zip; the damage shows only in its CRC


@pytest.mark.slow
def test_a_damaged_newest_tag_is_not_resumed(trained):
    stage_dir = crashed_copy(trained, "trust-damaged")
    ds = StageDir(stage_dir).ds_ckpt
    overwrite_floats(next(iter(sorted((ds / NEWEST).glob("*optim_states.pt")))))
    proc = resume(stage_dir, trained, expect_ok=True)
    warnings = [ln for ln in proc.stderr.splitlines() if f"resuming from {OLDER} instead" in ln]
    assert len(warnings) == 1 and f"{NEWEST} is damaged" in warnings[0], proc.stderr[-3000:]
    want = [r for r in read_log(trained["stage"]) if r["step"] > 4]
    got = read_log(stage_dir)
    assert [r["step"] for r in got] == [5, 6]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
    with CheckpointReader(StageDir(stage_dir).final) as r, CheckpointReader(StageDir(trained["stage"]).final) as w:
        for name in r.names():
            assert torch.allclose(r.get(name), w.get(name), rtol=1e-5, atol=1e-6), name


def _copied_from_older(tag: Path) -> None:
    name = next(iter(sorted(tag.glob("*optim_states.pt")))).name
    shutil.copyfile(tag.parent / OLDER / name, tag / name)


def _deleted(tag: Path) -> None:
    next(iter(sorted(tag.glob("*optim_states.pt")))).unlink()


def _floats(tag: Path) -> None:
    overwrite_floats(tag / "mp_rank_00_model_states.pt")


def _added(tag: Path) -> None:
    (tag / "extra.pt").write_bytes(b"")


def _symlinked(tag: Path) -> None:
    f = next(iter(sorted(tag.glob("*optim_states.pt"))))
    moved = tag.parent / "moved.pt"
    f.rename(moved)
    f.symlink_to(moved)


@pytest.mark.slow
@pytest.mark.parametrize("damage,reason", [(_copied_from_older, "differs from its sealed digest"),
                                           (_deleted, "is missing"), (_floats, "differs from its sealed digest"),
                                           (_added, "was added after it was sealed"),
                                           (_symlinked, "not a regular file")],
                         ids=["copied-from-older", "deleted", "floats", "added", "symlinked"])
def test_every_damage_of_the_newest_tag_falls_back_to_the_older_one(trained, tmp_path, caplog, damage, reason):
    ds = tmp_path / "ds_ckpt"
    shutil.copytree(StageDir(trained["stage"]).ds_ckpt, ds, symlinks=True)
    assert elastic.pick_tag(ds, warn=True) == NEWEST
    damage(ds / NEWEST)
    with caplog.at_level(logging.WARNING):
        assert elastic.pick_tag(ds, warn=True) == OLDER
    assert len(caplog.records) == 1 and reason in caplog.text and f"resuming from {OLDER}" in caplog.text


# ---------------------------------------------------------------------- grow import of a real tag
def real_tag(trained: dict[str, Path], root: Path) -> Path:
    """``B``: the stage's newest ds_ckpt tag copied into a folder with ``latest`` and config.json."""
    shutil.copytree(StageDir(trained["stage"]).ds_ckpt / NEWEST, root / NEWEST)
    (root / NEWEST / tag_seal.SEAL_NAME).unlink()
    (root / "latest").write_text(NEWEST)
    get_flavor("tiny-s1").save(root)
    return root


@pytest.mark.slow
def test_grow_import_of_a_deepspeed_written_tag_needs_no_flag(trained, tmp_path, capsys):
    b = real_tag(trained, tmp_path / "B")
    rc, _, err = grow(capsys, "import", b, "--out", tmp_path / "out")
    assert rc == 0, err
    with CheckpointReader(tmp_path / "out") as r, CheckpointReader(StageDir(trained["stage"]).final) as w:
        for name in w.names():
            assert torch.equal(r.get(name), w.get(name)), name


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_grow_import_of_a_tag_with_a_payload_is_refused_and_nothing_runs(trained, tmp_path, capsys, victim):
    b = real_tag(trained, tmp_path / "B")
    marker = tmp_path / "PWNED"
    path = b / NEWEST / victim
    torch.save({**load(path), "x": Boom(marker)}, path)
    rc, _, err = grow(capsys, "import", b, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, victim, "posix.system", "nothing in it was run")
    assert rc == 2 and not marker.exists(), "the pickle's command ran"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the stage lock
def test_a_symlinked_stage_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    layout = StageDir(tmp_path / "run" / "s")
    layout.root.mkdir(parents=True)
    layout.lock.symlink_to(victim)
    assert StageLock(layout.lock).holder() is None
    with pytest.raises(StageLockedError, match="symlink") as err:
        StageLock(layout.lock).acquire()
    assert len(str(err.value).splitlines()) == 1 and victim.read_text() == "precious\n"


# ---------------------------------------------------------------------- launcher=slurm
@pytest.mark.parametrize("field", ["stage.name", "run_dir", "schedule.stages", "data.paths"])
@pytest.mark.parametrize("char", ["\n", "\r", "\x1b"], ids=["newline", "cr", "esc"])
def test_names_and_paths_with_control_characters_are_refused(field, char):
    cfg = TrainConfig()
    value = f"x{char}touch /tmp/INJECTED"
    if field == "stage.name":
        cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, name=value))
    elif field == "run_dir":
        cfg = dataclasses.replace(cfg, run_dir=value)
    elif field == "schedule.stages":
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, stages=["a", value]))
    else:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="indexed", paths=[value]))
    with pytest.raises(StageConfigError, match="control character") as err:
        validate(cfg)
    assert field.split(".")[0] in str(err.value) and len(str(err.value).splitlines()) == 1


def test_sbatch_values_are_quoted_and_a_newline_never_written(tmp_path):
    cfg = TrainConfig()
    text = sbatch_script(cfg, [["stage=a b"]], "flm-x $(touch M) 'q'", tmp_path / "o dir")
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --job-name='flm-x $(touch M) '\"'\"'q'\"'\"''" in header
    assert f"#SBATCH --output='{tmp_path}/o dir/slurm-%j.out'" in header
    with pytest.raises(ValueError, match="control character"):
        sbatch_script(cfg, [[]], "flm-x\ntouch /tmp/INJECTED", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("field", ["stage.name", "run_dir"])
def test_launcher_slurm_with_a_newline_in_a_name_writes_no_script(tmp_path, field):
    from tests.helpers.stage_cli import make_cli

    cli = make_cli(tmp_path)
    marker = tmp_path / "INJECTED"
    rc, out, err, ran = cli("stage=tiny_s1", "launcher=slurm", f"{field}='x\ntouch {marker}'")
    assert rc == 2 and not ran and not marker.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "control character" in lines[0], err
    assert not list(tmp_path.rglob("*.sbatch"))


def test_seal_records_every_file(tmp_path):
    tag = tmp_path / "step00000002"
    tag.mkdir()
    torch.save({"w": torch.ones(3)}, tag / "a.pt")
    tag_seal.write_seal(tag)
    sealed = json.loads((tag / tag_seal.SEAL_NAME).read_text())["files"]
    assert list(sealed) == ["a.pt"] and sealed["a.pt"]["size"] == (tag / "a.pt").stat().st_size
    assert tag_seal.problem(tag) is None
    os.truncate(tag / "a.pt", 10)
    assert tag_seal.problem(tag).startswith("truncated (a.pt has 10 bytes")


# ---------------------------------------------------------------------- small refusals, one line each
def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert len(text.splitlines()) == 1 and all(n in text for n in needles), text


def test_a_bogus_growth_strategy_is_refused_without_a_parent():
    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, stage=dataclasses.replace(
        cfg.stage, parent=None, growth=dataclasses.replace(cfg.stage.growth, strategy="bogus")))
    with pytest.raises(StageConfigError) as err:
        validate(cfg)
    _one_line(err, "stage.growth", "'strategy'", "bogus")


def test_sequence_parallel_with_tp_1_is_refused():
    from stages.layout import LayoutError

    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, sequence_parallel=True))
    with pytest.raises(LayoutError) as err:
        validate(cfg)
    _one_line(err, "sequence_parallel", "tensor_parallel 1")


def test_master_port_65535_names_the_real_reason():
    from stages.launch.multinode import MultiNodeError, check_launchable

    with pytest.raises(MultiNodeError) as err:
        check_launchable(dataclasses.replace(TrainConfig(), nnodes=2, master_port=65535, master_addr="10.0.0.1"))
    _one_line(err, "master_port=65535", "P+1")


def test_dry_run_checks_the_data(tmp_path):
    from stages.data import DataError
    from stages.launch.dry_run import dry_run_stage

    cfg = TrainConfig(run_dir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="indexed",
                                                            paths=[str(tmp_path / "missing")]))
    with pytest.raises(DataError) as err:
        dry_run_stage(cfg, echo=lambda *_: None)
    _one_line(err, "missing", "no dataset here")


def test_a_moved_run_dir_is_named_on_resume():
    from stages.launch.resume import ResumeMismatchError, diff_for_resume
    from tests.integration.test_stage_trust import resolved_stage

    old, new = resolved_stage(), resolved_stage({"run_dir": "/new"})
    old.data = {"key": "k", "start": {"positions": {"/old/run/data/k/corpus": 0}}}
    new.data = {"key": "k", "start": {"positions": {"/new/run/data/k/corpus": 0}}}
    with pytest.raises(ResumeMismatchError) as err:
        diff_for_resume(old, new)
    _one_line(err, "run_dir or data.cache_dir moved")
    assert "None" not in str(err.value)


def test_an_empty_sealed_tag_reads_as_a_sentence(tmp_path, caplog):
    ds = tmp_path / "ds_ckpt"
    for step in (2, 4):
        (ds / f"step{step:08d}").mkdir(parents=True)
        torch.save({"w": torch.ones(2)}, ds / f"step{step:08d}" / "a.pt")
        tag_seal.write_seal(ds / f"step{step:08d}")
    (ds / "step00000004" / "a.pt").unlink()
    (ds / "step00000004" / tag_seal.SEAL_NAME).write_text("")  # an older seal: no digests
    with caplog.at_level(logging.WARNING):
        assert elastic.pick_tag(ds, warn=True) == "step00000002"
    assert "step00000004 is empty (no .pt files)" in caplog.text and "is holds" not in caplog.text
