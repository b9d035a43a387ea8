"""Trust boundaries of the grow side (issue 16): the lock on OUT, content fingerprints and
resume, strict safetensors headers, confined shard names, OUT checked up front, and the
small refusals. Tiny models; seconds each."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from growth.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointReader,
    lock_path,
    manifest_path,
    parse_size,
    save_checkpoint,
    staging_dir,
)
from growth.config import get_flavor
from growth.init import init_checkpoint
from growth.parallel import ignoring_sigint
from growth.verify import verify
from tests.conftest import REPO, _env, assert_one_line_error, tree_hashes
from tests.conftest import grow_in_process as grow

EPOCH = "1700000000"


def start_apply(src: Path, out: Path, delay: str = "0.2") -> subprocess.Popen:
    env = {**_env(), "SOURCE_DATE_EPOCH": EPOCH}
    return subprocess.Popen([sys.executable, "-m", "tests.workers.grow_slow", delay, "apply", "--from", str(src),
                             "--to", "tiny-s2", "--out", str(out), "--max-shard-size", "20KB"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_shards(proc: subprocess.Popen, staging: Path, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(list(staging.glob("model-*.safetensors"))) < n:
        assert proc.poll() is None, "apply finished too early: " + (proc.stderr.read() if proc.stderr else "")
        assert time.monotonic() < deadline, "apply made no progress"
        time.sleep(0.02)


def kill_apply_after_3_shards(src: Path, out: Path) -> None:
    """SIGKILL a slowed ``grow apply src → tiny-s2`` once 3 of its shards are staged."""
    proc = start_apply(src, out, delay="0.1")
    wait_for_shards(proc, staging_dir(out), 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def s1(tmp_path: Path) -> Path:
    return init_checkpoint(get_flavor("tiny-s1"), tmp_path / "s1", seed=0, source="tiny-s1")


# ---------------------------------------------------------------------- #1 concurrent apply
@pytest.mark.slow
def test_concurrent_apply_to_one_out_is_refused(tmp_path, capsys, s1, monkeypatch):
    """Run B while run A writes the same --out: B is refused in one line and touches nothing;
    A publishes a checkpoint that verifies."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    out = tmp_path / "out"
    a = start_apply(s1, out)
    staging = staging_dir(out)
    wait_for_shards(a, staging, 2)
    # A's finished shards (one A is writing may be renamed from .partial meanwhile)
    before = sorted(p.name for p in staging.iterdir() if not p.name.endswith(".partial"))
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", out, "--max-shard-size", "20KB")
    assert_one_line_error(rc, err, str(out), "another process", f"pid {a.pid}")
    assert rc == 2
    assert set(before) <= {p.name for p in staging.iterdir()}, "B removed A's shards"
    assert a.wait(120) == 0, a.stderr.read()
    assert not lock_path(out).exists() and not staging.exists()
    result = verify(s1, out)
    assert result.passed and result.relative_logit_diff <= 1e-5
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "clean",
                      "--max-shard-size", "20KB")
    assert rc == 0, err
    assert tree_hashes(out) == tree_hashes(tmp_path / "clean")


@pytest.mark.slow
def test_dead_lock_holder_is_taken_over(tmp_path, capsys, s1):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(f"{dead.pid}\n")  # a holder that died without cleaning up
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", out)
    assert rc == 0, err
    assert not lock_path(out).exists()


# ---------------------------------------------------------------------- #2 content fingerprint
def header_only_fingerprint(d: Path) -> str:
    """The old fingerprint: config.json and each shard's name, size and header, no data."""
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        h.update(f.name.encode() + str(f.stat().st_size).encode() + json.dumps(header).encode())
    return h.hexdigest()


def test_fingerprint_is_content_based(tmp_path):
    a = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "a", seed=0)
    b = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "b", seed=1)
    assert header_only_fingerprint(a) == header_only_fingerprint(b)  # same headers …
    assert CheckpointReader(a).fingerprint() != CheckpointReader(b).fingerprint()  # … other data
    # A file written without digests (e.g. by safetensors itself) is hashed by its data.
    from safetensors.torch import load_file, save_file

    for src, name in ((a, "plain_a"), (b, "plain_b")):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes((src / "config.json").read_bytes())
        save_file(load_file(src / WEIGHTS_NAME), d / WEIGHTS_NAME, metadata={"format": "pt"})
    fa, fb = CheckpointReader(tmp_path / "plain_a").fingerprint(), CheckpointReader(tmp_path / "plain_b").fingerprint()
    assert fa != fb and header_only_fingerprint(tmp_path / "plain_a") == header_only_fingerprint(tmp_path / "plain_b")


@pytest.mark.slow
def test_resume_with_a_different_source_of_identical_headers_redoes(tmp_path, capsys, monkeypatch):
    """Kill an apply, swap the source for another of the same shapes (a longer-trained
    parent), rerun: the output is the fresh growth of the *new* source."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    src = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "src", seed=0)
    out = tmp_path / "out"
    kill_apply_after_3_shards(src, out)
    assert staging_dir(out).is_dir() and not out.exists()
    old_headers = header_only_fingerprint(src)
    for p in src.iterdir():
        p.unlink()
    src.rmdir()
    init_checkpoint(get_flavor("tiny-s1"), src, seed=1)  # same path, same headers, other data
    assert header_only_fingerprint(src) == old_headers
    args = ["--to", "tiny-s2", "--max-shard-size", "20KB"]
    rc, _, err = grow(capsys, "apply", "--from", src, "--out", out, *args)
    assert rc == 0, err
    assert "starting afresh" in err
    rc, _, err = grow(capsys, "apply", "--from", src, "--out", tmp_path / "clean", *args)
    assert rc == 0, err
    assert tree_hashes(out) == tree_hashes(tmp_path / "clean")
    assert verify(src, out).passed
    event = json.loads((out / "growth.json").read_text())["events"][-1]
    assert event["parent"]["fingerprint"] == CheckpointReader(src).fingerprint()


@pytest.mark.slow
def test_resume_refuses_a_corrupted_staged_shard(tmp_path, capsys, monkeypatch):
    """A staged shard whose bytes no longer match its digest is rewritten, not kept."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    src = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "src", seed=0)
    out = tmp_path / "out"
    kill_apply_after_3_shards(src, out)
    victim = sorted(staging_dir(out).glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size, same header, one flipped byte
    victim.write_bytes(bytes(data))
    args = ["--to", "tiny-s2", "--max-shard-size", "20KB"]
    assert grow(capsys, "apply", "--from", src, "--out", out, *args)[0] == 0
    assert grow(capsys, "apply", "--from", src, "--out", tmp_path / "clean", *args)[0] == 0
    assert tree_hashes(out) == tree_hashes(tmp_path / "clean")


# ---------------------------------------------------------------------- #3 strict headers
def rewrite_offsets(path: Path, edit) -> None:
    """Rewrite the header of ``path`` after ``edit(header)``; pad the data to what the
    old check (8 + n + max(stop) == size) accepts, so only the new checks can refuse it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    edit(header)
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    data = data[:end] + b"\0" * max(0, end - len(data))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data)


Q, K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"


def _reversed(h):
    a, b = h[Q]["data_offsets"]
    h[Q]["data_offsets"] = [b, a]


def _overlapping(h):  # k reads q's bytes: q == k
    h[K]["data_offsets"] = list(h[Q]["data_offsets"])


def _zero_length(h):
    a, _ = h[Q]["data_offsets"]
    h[Q]["data_offsets"] = [a, a]


def _gapped(h):
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    a, b = h[last]["data_offsets"]
    h[last]["data_offsets"] = [a + 8, b + 8]


@pytest.mark.parametrize("edit", [_reversed, _overlapping, _zero_length, _gapped],
                         ids=["reversed", "overlapping", "zero-length", "gapped"])
def test_loose_data_offsets_are_refused(tmp_path, capsys, edit):
    d = init_checkpoint(get_flavor("tiny"), tmp_path / "c", seed=0)
    rewrite_offsets(d / WEIGHTS_NAME, edit)
    with pytest.raises(Exception):  # safetensors itself refuses the file …  # noqa: B017
        with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):  # … and so do we
        CheckpointReader(d)
    rc, out, err = grow(capsys, "info", d)
    assert_one_line_error(rc, err, WEIGHTS_NAME)
    rc, _, err = grow(capsys, "apply", "--from", d, "--to", "tiny", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, WEIGHTS_NAME)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- confined shard names
@pytest.mark.parametrize("name", ["/etc/passwd", "../x.safetensors", "sub/model.safetensors"])
def test_index_pointing_outside_the_checkpoint_is_refused(tmp_path, capsys, name):
    d = init_checkpoint(get_flavor("tiny"), tmp_path / "c", seed=0, max_shard_size=100_000)
    (tmp_path / "x.safetensors").write_bytes((d / sorted(p.name for p in d.glob("model-*"))[0]).read_bytes())
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["lm_head.weight"] = name
    (d / INDEX_NAME).write_text(json.dumps(index))
    rc, _, err = grow(capsys, "info", d)
    assert_one_line_error(rc, err, INDEX_NAME, repr(name), "refused")


# ---------------------------------------------------------------------- #10 OUT checked up front
def test_out_symlink_refused_up_front(tmp_path, capsys, s1):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "link")
    assert_one_line_error(rc, err, "link", "symlink")
    assert list((tmp_path / "real").iterdir()) == [] and not staging_dir(tmp_path / "link").exists()


def _try_mount(target: Path) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_out_mount_point_refused_up_front(tmp_path, capsys, s1, monkeypatch):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = _try_mount(mnt)
    if not mounted:  # no privilege to mount here: present the same directory as a mount point
        real = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mnt or real(p))
    try:
        assert os.path.ismount(mnt)
        rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", mnt)
        assert_one_line_error(rc, err, str(mnt), "mount point")
        assert not staging_dir(mnt).exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_failed_publish_keeps_the_manifest_and_resumes(tmp_path, capsys, s1, monkeypatch):
    """OUT appears while apply works: publish refuses, the finished work and its manifest
    stay, and the same command finishes once OUT is moved away."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    out = tmp_path / "out"
    proc = start_apply(s1, out, delay="0.1")
    wait_for_shards(proc, staging_dir(out), 2)
    out.mkdir()
    (out / "someone-elses.txt").write_text("x")
    assert proc.wait(120) == 2
    err = proc.stderr.read()
    assert_one_line_error(2, err, str(out), "kept in")
    assert manifest_path(out).is_file() and staging_dir(out).is_dir()
    staged = len(list(staging_dir(out).glob("model-*.safetensors")))
    (out / "someone-elses.txt").unlink()
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", out, "--max-shard-size", "20KB")
    assert rc == 0, err
    assert "starting afresh" not in err and staged > 2
    assert not manifest_path(out).exists()


# ---------------------------------------------------------------------- low items
@pytest.mark.parametrize("text", ["infGB", "inf", "nanMB", "-5GB", "1e30TB"])
def test_unbounded_sizes_refused(text, capsys, s1, tmp_path):
    with pytest.raises(CheckpointError, match="bad size"):
        parse_size(text)
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "o",
                      f"--max-shard-size={text}")
    assert_one_line_error(rc, err, text)


@pytest.mark.slow
def test_workers_capped_at_the_shard_count(tmp_path, capsys, s1, monkeypatch):
    import growth.parallel as par

    seen = []
    real = par._run_spawned
    monkeypatch.setattr(par, "_run_spawned", lambda fn, req, n, *a: (seen.append(n), real(fn, req, n, *a)))
    rc, _, err = grow(capsys, "apply", "--from", s1, "--to", "tiny-s2", "--out", tmp_path / "o",
                      "--max-shard-size", "400KB", "--workers", "12")
    assert rc == 0, err
    shards = len(list((tmp_path / "o").glob("model-*.safetensors")))
    assert 1 < shards < 12 and seen == [shards]


def test_source_nan_blamed_on_the_source(tmp_path, capsys):
    config = get_flavor("tiny-s1")
    with CheckpointReader(init_checkpoint(config, tmp_path / "a", seed=0)) as r:
        sd = r.state_dict()
    sd["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    src = tmp_path / "src"  # written by safetensors itself: our writer refuses NaN
    src.mkdir()
    config.save(src)
    from safetensors.torch import save_file

    save_file(sd, src / WEIGHTS_NAME, metadata={"format": "pt"})
    rc, _, err = grow(capsys, "apply", "--from", src, "--to", "tiny-s2", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, str(src / WEIGHTS_NAME), "model.layers.1.mlp.up_proj.weight", "source")
    assert not (tmp_path / "o").exists() and not staging_dir(tmp_path / "o").exists()


def test_verify_refuses_bad_tolerance_and_seq_len(capsys, s1):
    rc, _, err = grow(capsys, "verify", s1, s1, "--tolerance", "-1")
    assert_one_line_error(rc, err, "--tolerance")
    rc, _, err = grow(capsys, "verify", s1, s1, "--tolerance", "nan")
    assert_one_line_error(rc, err, "--tolerance")
    rc, _, err = grow(capsys, "verify", s1, s1, "--seq-len", "100000")
    assert_one_line_error(rc, err, "--seq-len", "max_position_embeddings")


@pytest.mark.parametrize("seed", range(6))
def test_verify_passes_a_plain_bf16_cast(tmp_path, seed):
    """#9: a plain fp32 → bf16 cast computes the same function up to bf16 rounding."""
    a = init_checkpoint(get_flavor("tiny"), tmp_path / "a", seed=seed)
    with CheckpointReader(a) as r:
        b = save_checkpoint(tmp_path / "b", r.config, r.state_dict(), dtype="bfloat16")
    result = verify(a, b, seed=seed)
    assert result.passed, result
    assert result.tolerance < 0.05  # still tight enough to catch real defects (copy depth: ~0.5)


def test_verify_bf16_still_fails_a_wrong_model(tmp_path):
    a = init_checkpoint(get_flavor("tiny"), tmp_path / "a", seed=0)
    b = init_checkpoint(get_flavor("tiny"), tmp_path / "b", seed=1, dtype="bfloat16")
    assert not verify(a, b).passed


def test_init_refuses_a_huge_tensor_up_front(tmp_path, capsys):
    config = get_flavor("tiny").replace(vocab_size=2**37)  # 2^37 × 64 × 4 B = 32 TiB per tensor
    config.save(tmp_path)
    rc, _, err = grow(capsys, "init", tmp_path / "config.json", "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "model.embed_tokens.weight")
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN], ids=["handled", "ignored"])
def test_a_ctrl_c_while_workers_start_is_deferred_or_stays_ignored(inherited):
    """Raised once the workers have started, never lost; ignored throughout if inherited so."""
    started = interrupted = False
    old = signal.signal(signal.SIGINT, inherited)
    try:
        with ignoring_sigint():
            signal.raise_signal(signal.SIGINT)  # blocked: pending until the window ends
            started = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        after = signal.signal(signal.SIGINT, old)
    assert started and after == inherited and interrupted == (inherited is signal.default_int_handler)


@pytest.mark.slow
def test_ctrl_c_during_worker_start_up_is_one_line(tmp_path, s1):
    """SIGINT to the whole process group (a terminal's Ctrl-C) while the spawned workers
    are still starting: one line, exit 130, nothing published."""
    out = tmp_path / "out"
    # SIGINT handled here, so grow gets it at its default (exec resets a handler), as in a terminal:
    # a background job `pytest ... &` ignores SIGINT, and grow would inherit that and keep it.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "growth.cli", "apply", "--from", str(s1), "--to", "tiny-s2",
                                 "--out", str(out), "--workers", "2", "--max-shard-size", "20KB"], cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, old)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")

    def spawned_workers() -> int:
        """Children that are spawned workers (multiprocessing's resource tracker is a child too)."""
        count = 0
        for pid in children.read_text().split():
            try:
                count += b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # gone meanwhile
                pass
        return count
    deadline = time.monotonic() + 60
    while spawned_workers() < 2:  # both spawned workers exist: they are starting
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["grow: interrupted"], err
    assert not out.exists() and not lock_path(out).exists()


def test_parent_fingerprint_tells_a_retrained_parent(tmp_path, capsys):
    """What train-stage's reuse of init/ checks: the grown checkpoint's recorded parent
    fingerprint against the parent as it is now (retrained: same shapes, other data)."""
    from growth.checkpoint import parent_fingerprint

    parent = init_checkpoint(get_flavor("tiny-s1"), tmp_path / "parent", seed=0)
    assert grow(capsys, "apply", "--from", parent, "--to", "tiny-s2", "--out", tmp_path / "init")[0] == 0
    assert parent_fingerprint(tmp_path / "init") == CheckpointReader(parent).fingerprint()
    for p in parent.iterdir():
        p.unlink()
    parent.rmdir()
    init_checkpoint(get_flavor("tiny-s1"), parent, seed=5)  # "retrained"
    assert parent_fingerprint(tmp_path / "init") != CheckpointReader(parent).fingerprint()
    assert parent_fingerprint(parent) is None
