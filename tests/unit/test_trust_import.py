"""Trust, second pass (issue 22), the grow side: nothing in a DeepSpeed file runs on
``grow import``, no symlink is followed out of a source or into a lock/staging name, a
universal tensor is never reshaped to fit, and ``grow apply``'s resume covers the moments.
In-process, tiny models; the DeepSpeed-written checkpoints are in tests/test_trust_stage.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from growth.checkpoint import (
    OPTIMIZER_DIR,
    CheckpointReader,
    lock_path,
    manifest_path,
    open_moments,
    save_checkpoint,
    staging_dir,
)
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.model import init_state_dict
from tests.conftest import assert_one_line_error
from tests.conftest import grow_in_process as grow

CONFIG = get_flavor("tiny-s1")


class Boom:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------- pickled code never runs
def universal_folder(root: Path, step: float | None = 4, shapes: dict | None = None) -> Path:
    """A universal checkpoint by hand: zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt ({"param": t})."""
    weights = init_state_dict(CONFIG, seed=1)
    for name, t in weights.items():
        d = root / "zero" / name
        d.mkdir(parents=True)
        for i, kind in enumerate(("fp32", "exp_avg", "exp_avg_sq")):
            value = t.float() * (i + 1)
            if shapes and name in shapes:
                value = value.reshape(shapes[name])
            torch.save({"param": value}, d / f"{kind}.pt")
        if step is not None:
            torch.save(torch.tensor(step), d / "step.pt")
    CONFIG.save(root)
    return root


def test_universal_folder_imports(tmp_path, capsys):
    src = universal_folder(tmp_path / "uni")
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert rc == 0, err
    with CheckpointReader(tmp_path / "out") as r:
        name = "model.layers.0.mlp.gate_proj.weight"
        assert torch.equal(r.get(name), init_state_dict(CONFIG, seed=1)[name].float())
    assert json.loads((tmp_path / "out" / OPTIMIZER_DIR / "state.json").read_text())["step"] == 4


def test_universal_root_model_states_with_a_payload_is_refused_and_nothing_runs(tmp_path, capsys):
    src = universal_folder(tmp_path / "uni", step=None)  # no step.pt: the root *model_states.pt is read
    marker = tmp_path / "PWNED"
    torch.save({"global_steps": 4, "x": Boom(marker)}, src / "mp_rank_00_model_states.pt")
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "mp_rank_00_model_states.pt", "system", "nothing in it was run")
    assert rc == 2 and not marker.exists(), "the pickle's command ran"
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()


def zero_folder(root: Path, marker: Path) -> Path:
    """A ZeRO layout (latest → global_step4) whose model states carry a payload."""
    tag = root / "global_step4"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step4")
    torch.save({"optimizer_state_dict": {"zero_stage": 1, "partition_count": 1}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {}, "buffer_names": [], "x": Boom(marker)}, tag / "mp_rank_00_model_states.pt")
    CONFIG.save(root)
    return root


def test_zero_folder_with_a_payload_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    src = zero_folder(tmp_path / "ds", marker)
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "mp_rank_00_model_states.pt", "posix.system", "nothing in it was run")
    assert rc == 2 and not marker.exists(), "the pickle's command ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "not-a-dict"])
def test_a_broken_zero_file_is_one_line_naming_it(tmp_path, capsys, damage):
    src = zero_folder(tmp_path / "ds", tmp_path / "PWNED")
    model = src / "global_step4" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": []}, model)
    victim = model if damage == "truncated" else src / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:300])
    else:
        torch.save([1, 2, 3], victim)
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "global_step4")
    assert rc == 2 and (damage != "truncated" or victim.name in err)


def test_universal_param_groups_keep_betas_eps_and_weight_decay(tmp_path, capsys):
    src = universal_folder(tmp_path / "uni")
    torch.save({"param_groups": [{"betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1}]},
               src / "zero" / "optimizer_state.pt")
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert rc == 0, err
    state = json.loads((tmp_path / "out" / OPTIMIZER_DIR / "state.json").read_text())
    assert state == {"step": 4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}


def test_universal_tensor_of_the_wrong_2d_shape_is_refused(tmp_path, capsys):
    name = "model.layers.0.mlp.gate_proj.weight"  # [176, 64]
    src = universal_folder(tmp_path / "uni", shapes={name: (64, 176)})
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, f"{name}/fp32.pt", "[64, 176]", "[176, 64]")
    assert rc == 2 and not (tmp_path / "out").exists()


def test_universal_flat_zero3_tensor_is_still_accepted(tmp_path, capsys):
    name = "model.layers.0.mlp.gate_proj.weight"
    src = universal_folder(tmp_path / "uni", shapes={name: (176 * 64,)})
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert rc == 0, err
    with CheckpointReader(tmp_path / "out") as r:
        assert torch.equal(r.get(name), init_state_dict(CONFIG, seed=1)[name].float())


@pytest.mark.parametrize("step", [-7.5, 2.5, -3])
def test_universal_step_must_be_a_whole_number(tmp_path, capsys, step):
    src = universal_folder(tmp_path / "uni", step=step)
    rc, _, err = grow(capsys, "import", src, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "step.pt", "whole number")
    assert rc == 2 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- symlinks
@pytest.fixture
def s1(tmp_path: Path) -> Path:
    return init_checkpoint(CONFIG, tmp_path / "s1", seed=0, source="tiny-s1")


def plant_links(src: Path, tmp_path: Path) -> Path:
    secret = tmp_path / "shadow"
    secret.write_text("root:SECRET-HASH\n")
    (src / "tokenizer.model").symlink_to(secret)
    (src / "tokenizer.json").symlink_to("/proc/self/environ")
    (src / "tokenizer_config.json").write_text('{"use_fast": false}')  # a real file still travels
    return secret


@pytest.mark.parametrize("command", ["import", "apply"])
def test_carried_symlinks_are_never_followed(tmp_path, capsys, s1, command):
    plant_links(s1, tmp_path)
    args = ["import", s1] if command == "import" else ["apply", "--from", s1, "--to", "tiny-s2"]
    rc, _, err = grow(capsys, *args, "--out", tmp_path / "X")
    assert rc == 0, err
    assert "not carried" in err and "tokenizer.json, tokenizer.model" in err
    out = tmp_path / "X"
    assert not (out / "tokenizer.model").exists() and not (out / "tokenizer.json").exists()
    assert (out / "tokenizer_config.json").read_text() == '{"use_fast": false}'
    leaked = [p for p in out.rglob("*") if p.is_file() and b"SECRET-HASH" in p.read_bytes()]
    assert not leaked


def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys, s1):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "X"
    lock_path(out).symlink_to(victim)
    rc, _, err = grow(capsys, "import", s1, "--out", out)
    assert_one_line_error(rc, err, str(lock_path(out)), "symlink")
    assert rc == 2 and victim.read_text() == "precious\n" and not out.exists()


def test_symlinked_staging_dir_is_refused_and_its_target_untouched(tmp_path, capsys, s1):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    out = tmp_path / "X"
    staging_dir(out).symlink_to(target)
    rc, _, err = grow(capsys, "import", s1, "--out", out)
    assert_one_line_error(rc, err, str(staging_dir(out)), "symlink")
    assert rc == 2 and sorted(p.name for p in target.iterdir()) == ["keep.txt"] and not out.exists()
    assert not lock_path(out).exists()


def test_a_planted_symlink_at_a_temporary_name_is_never_followed(tmp_path, capsys, s1):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "X"
    manifest = manifest_path(out)  # flmcore.io's temporary name (this process writes it)
    manifest.with_name(f".{manifest.name}.{os.getpid()}.partial").symlink_to(victim)
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", out)
    assert rc == 0, err
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------- grow apply resume
def write_moments(src: Path, seed: int) -> None:
    for i, kind in enumerate(("exp_avg", "exp_avg_sq")):
        state = {n: (t.abs() if kind == "exp_avg_sq" else t)
                 for n, t in init_state_dict(CONFIG, seed=seed + i).items()}
        path = save_checkpoint(src / OPTIMIZER_DIR / kind, CONFIG, state, max_shard_size=20_000)
        (path / "config.json").unlink()
        (path / "growth.json").unlink()
    (src / OPTIMIZER_DIR / "state.json").write_text(json.dumps(
        {"step": 7, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}))


def test_apply_resume_redoes_moments_when_the_source_moments_changed(tmp_path, capsys, s1, monkeypatch):
    """Killed once 5 exp_avg shards are staged; the source's exp_avg then changes (weights
    unchanged): the rerun must equal a fresh apply, not mix in stale moments."""
    import growth.shardwork as executor

    write_moments(s1, seed=10)
    args = ["apply", "--from", s1, "--to", "tiny-s2", "--max-shard-size", "20KB"]
    real = executor.write_shard_streaming
    staged: list[str] = []

    def dying(path, *a, **kw):
        if "exp_avg/" in str(path) and "exp_avg_sq" not in str(path):
            if len(staged) == 5:
                raise OSError(28, "No space left on device (simulated kill)")
            staged.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(executor, "write_shard_streaming", dying)
    rc, _, err = grow(capsys, *args, "--out", tmp_path / "X")
    assert rc != 0 and len(staged) == 5 and staging_dir(tmp_path / "X").is_dir(), err
    monkeypatch.setattr(executor, "write_shard_streaming", real)
    weights = sorted(p.name for p in s1.glob("*.safetensors"))
    before = {n: (s1 / n).read_bytes() for n in weights}
    for kind in ("exp_avg", "exp_avg_sq"):
        for p in sorted((s1 / OPTIMIZER_DIR / kind).iterdir()):
            p.unlink()
        (s1 / OPTIMIZER_DIR / kind).rmdir()
    write_moments(s1, seed=20)
    assert {n: (s1 / n).read_bytes() for n in weights} == before  # weights unchanged
    rc, _, err = grow(capsys, *args, "--out", tmp_path / "X")
    assert rc == 0, err
    rc, _, err = grow(capsys, *args, "--out", tmp_path / "fresh")
    assert rc == 0, err
    resumed = open_moments(tmp_path / "X", get_flavor("tiny-s2"))
    fresh = open_moments(tmp_path / "fresh", get_flavor("tiny-s2"))
    for kind in resumed:
        for name in resumed[kind].names():
            assert torch.equal(resumed[kind].get(name), fresh[kind].get(name)), (kind, name)


def test_export_teleflm_of_a_non_release_does_not_promise_remote_code(tmp_path, capsys, s1):
    rc, out, err = grow(capsys, "export-hf", s1, "--out", tmp_path / "t", "--format", "teleflm")
    assert rc == 0, err
    assert "auto_map" not in json.loads((tmp_path / "t" / "config.json").read_text())
    assert "trust_remote_code" not in out and "no auto_map" in out
