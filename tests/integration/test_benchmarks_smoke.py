"""The benchmark scripts run: each in its tiny ``--smoke`` mode prints a table and ends
with one JSON line. No timing assertions — these machines are noisy; the numbers live
in docs/benchmarks.md.

Three scripts run in this process (torch is imported once); gpu_stage runs as a
subprocess because it sets up a process group and torchrun-style environment variables.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling _common
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    return result


def has_table(stdout: str) -> bool:
    """A header row followed by a dashes rule, as _common.print_table writes it."""
    lines = stdout.splitlines()
    return any(line.startswith("---") and set(line) <= {"-", " "} for line in lines[1:])


@pytest.mark.slow
def test_train_throughput_smoke(capsys):
    load("train_throughput").main(["--smoke"])
    out = capsys.readouterr().out
    result = last_json(out)
    assert has_table(out) and "ratio ours / transformers" in out
    assert result["benchmark"] == "train_throughput" and result["smoke"] is True
    assert result["ratio_vs_transformers"] > 0
    assert result["step0_loss_diff"] < 1e-4  # both sides compute the same loss
    assert "vs eager" in out and result["compiled_tokens_per_s"] > 0  # the compiled side ran too


@pytest.mark.slow
def test_plan_scale_smoke(capsys):
    load("plan_scale").main(["--smoke"])
    out = capsys.readouterr().out
    result = last_json(out)
    assert has_table(out) and "projected grow apply time" in out
    assert [g["growth"] for g in result["growths"]] == ["tiny-s1 → tiny-s2", "tiny-s2 → tiny-s3"]
    assert all(g["bytes_total"] > 0 and g["to_params"] > g["from_params"] for g in result["growths"])
    assert {m["stage"] for m in result["memory"]} == {"tiny_s1", "tiny_s2", "tiny_s3"}


@pytest.mark.slow
def test_growth_payoff_smoke(capsys, tmp_path):
    """Real train-stage runs (5 processes, a few seconds of training each): every arm at one
    tiny budget and one seed; the zero growth is exact, the budgets are equal."""
    png = tmp_path / "payoff.png"
    mod = load("growth_payoff")
    mod.main(["--smoke", "--png", str(png), "--run-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    result = last_json(out)
    assert has_table(out) and png.stat().st_size > 0
    assert list(result) == ["budgets"] and len(result["budgets"]) == 1
    budget = result["budgets"][0]
    assert sorted(budget["arms"]) == ["growth", "scratch_final", "scratch_small", "stack"]
    assert all(len(v) == 1 and 0 < v[0] < 6 for v in budget["arms"].values())
    full = json.loads((tmp_path / "runs" / "growth_payoff.json").read_text())
    records = {r["arm"]: r for r in full["records"]}
    for arm in records.values():  # equal training FLOPs, up to whole steps
        assert arm["flops"] == pytest.approx(budget["flops"], rel=0.06)
    # zero growth is function-preserving: the grown model starts at the small model's loss
    assert records["growth"]["eval_loss_start"] == pytest.approx(records["growth"]["parent_eval_loss_end"], abs=1e-4)
    assert records["growth"]["steps"][1] > 0 and records["stack"]["steps"][1] == records["growth"]["steps"][1]
    # the fixed eval set (never trained on) and the paired reading are recorded with the commit
    assert full["data"]["eval"]["documents"] > 0 and full["commit"] and full["arms"] == sorted(budget["arms"], key=(
        ["growth", "stack", "scratch_final", "scratch_small"].index))
    assert {p["arm"] for p in full["paired"]} == {"growth", "stack"}
    best = full["paired"][0]["best"]
    assert best["n"] == 1 and best["diffs"][0] == pytest.approx(
        records[full["paired"][0]["arm"]]["eval_loss"] - min(records[c]["eval_loss"] for c in
                                                             ("scratch_small", "scratch_final")))


def test_growth_payoff_reading():
    """The analysis on made-up losses: the crossover and a growth arm that beats both."""
    mod = load("growth_payoff")
    budgets = [1e12, 2e12, 4e12]
    assert mod.crossover(budgets, [2.0, 1.8, 1.7], [2.2, 1.85, 1.65]) == pytest.approx(2e12 * 2 ** 0.5, rel=1e-3)
    assert mod.crossover(budgets, [2.0, 1.8, 1.7], [2.2, 1.9, 1.8]) is None
    table = {b: {"scratch_small": [s - 0.01, s, s + 0.01], "scratch_final": [f - 0.01, f, f + 0.01],
                 "growth": [g - 0.01, g, g + 0.01], "stack": [k - 0.01, k, k + 0.01]}
             for b, s, f, g, k in zip(budgets, [2.0, 1.8, 1.7], [2.2, 1.85, 1.6], [2.05, 1.7, 1.55],
                                      [2.3, 1.9, 1.65], strict=True)}
    read = {(r["budget"], r["arm"]): r for r in mod.reading(table)}
    assert not read[(1e12, "growth")]["beats_both_beyond_spread"]  # worse than scratch_small there
    win = read[(2e12, "growth")]
    assert win["beats_both_beyond_spread"] and win["margin"] == pytest.approx(0.1)
    ratio = win["flops_to_reach"]["scratch_final"]["ratio"]
    assert 0 < ratio < 1 and win["flops_to_reach"]["scratch_final"]["where"] == "inside"
    assert not any(read[(b, "stack")]["beats_both_beyond_spread"] for b in budgets)


def test_growth_payoff_paired():
    """The paired reading on made-up records: per seed, the arm minus the better control of that seed."""
    mod = load("growth_payoff")
    from payoff.analysis import paired

    losses = {"growth": [1.90, 2.00, 1.80], "stack": [1.95, 2.05, 1.85],
              "scratch_small": [1.92, 1.99, 1.83], "scratch_final": [1.93, 2.03, 1.79]}
    records = [{"budget": 1e12, "arm": a, "seed": s, "eval_loss": v[s]} for a, v in losses.items() for s in range(3)]
    records.pop()  # scratch_final seed 2 missing: that seed is not paired
    rows = {r["arm"]: r for r in paired(records)}
    g = rows["growth"]
    assert g["seeds"] == [0, 1] and g["best"]["diffs"] == pytest.approx([-0.02, 0.01])
    assert g["best"]["wins"] == 1 and g["best"]["n"] == 2 and g["best"]["mean"] == pytest.approx(-0.005)
    assert g["scratch_final"]["diffs"] == pytest.approx([-0.03, -0.03]) and g["scratch_final"]["wins"] == 2
    assert g["scratch_final"]["t"] is None  # no spread: no t
    assert rows["stack"]["best"]["wins"] == 0
    assert mod.paired is paired


def test_growth_payoff_refuses_dirty_docs(monkeypatch, tmp_path, capsys):
    """Writing docs/ from a checkout with uncommitted changes is refused unless --allow-dirty."""
    mod = load("growth_payoff")
    monkeypatch.setattr(mod, "dirty_files", lambda: ["benchmarks/growth_payoff.py"])
    with pytest.raises(SystemExit) as exc:
        mod.check_docs(mod.parse_args([]))
    assert exc.value.code == 2 and "uncommitted changes" in capsys.readouterr().err
    assert mod.check_docs(mod.parse_args(["--allow-dirty"])) is True
    assert "+dirty" in capsys.readouterr().out
    assert mod.check_docs(mod.parse_args(["--png", str(tmp_path / "p.png")])) is False  # not docs/: allowed
    monkeypatch.setattr(mod, "dirty_files", lambda: [])
    assert mod.check_docs(mod.parse_args([])) is True


def test_growth_payoff_corpus_chunks():
    """Documents are cut at line ends into pieces of at most the limit; nothing is lost."""
    load("growth_payoff")
    from payoff.corpus import chunks

    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(200)) + "y" * 130 + "\nend"
    out = chunks(text, 64)
    assert "".join(out) == text and all(len(c) <= 64 for c in out)
    assert all(c.endswith("\n") for c in out[:-3])  # cut at line ends except inside the 130-char line
    assert chunks("  \n\n", 8) == []


def test_growth_payoff_interpolation():
    mod = load("growth_payoff")
    curve = mod.Curve("c", [0.0, 10.0, 20.0], [4.0, 2.0, 1.0])
    assert mod.flops_to_reach(curve, 3.0) == pytest.approx(5.0)
    assert mod.flops_to_reach(curve, 1.0) == pytest.approx(20.0)
    assert mod.flops_to_reach(curve, 0.5) is None
    assert mod.loss_at(curve, 15.0) == pytest.approx(1.5)


@pytest.mark.slow
def test_gpu_stage_deadline_skips_every_phase_and_records_it(tmp_path, capsys):
    """With no time left every phase is skipped (nothing trained, no process group), and the
    record on disk says so phase by phase."""
    result = load("gpu_stage").main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "gpu_stage.json").read_text())
    assert on_disk == last_json(capsys.readouterr().out) == result
    assert list(on_disk["phases"]) == ["preflight", "mfu", "parity", "growth", "grow_io"]
    assert all(p["skipped"].startswith("deadline") for p in on_disk["phases"].values())


@pytest.mark.slow
def test_gpu_stage_smoke(tmp_path):
    """Every phase on the CPU (tiny models): the record after each phase, then the JSON line."""
    smoke = subprocess.run([sys.executable, str(BENCH / "gpu_stage.py"), "--smoke", "--out", str(tmp_path),
                            "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    result = last_json(smoke.stdout)
    assert result == json.loads((tmp_path / "gpu_stage.json").read_text()) and result["smoke"] is True
    phases = result["phases"]
    assert all("error" not in p and "skipped" not in p for p in phases.values()), phases
    assert phases["preflight"]["measured_peak_flops"] > 0
    variants = phases["mfu"]["variants"]
    assert [(v["compiled"], v["adamw"]) for v in variants] == [(False, "fused"), (True, "fused"), (False, "foreach")]
    assert all(v["tokens_per_s"] > 0 for v in variants) and variants[0]["top_kernels"]
    assert phases["parity"]["max_rel_gap"] < 0.05 and len(phases["parity"]["losses"]["bf16"]) == 4
    assert phases["growth"]["exact"] and phases["growth"]["to_params"] > phases["growth"]["from_params"]
    assert phases["grow_io"]["bytes_written"] > 0 and phases["grow_io"]["floor_write_s"] > 0
    assert not (tmp_path / "w").exists()  # nothing left on disk
