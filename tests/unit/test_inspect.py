"""growth.inspect / growth.provenance / growth.runs / growth.plots: checked on content.

Tiny fp32 checkpoints grown in memory (weights and Adam moments, history as
``grow apply`` records it), a 52B → 102B plan on flavors alone, and a fake run directory
with TensorBoard scalars. Plots are read back through their artists: the provenance
image's array, the gids of inserted-layer spans and growth-point lines.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from growth import plots
from growth.checkpoint import (
    MOMENT_KINDS,
    OPTIMIZER_DIR,
    OPTIMIZER_STATE_NAME,
    CheckpointReader,
    append_event,
    new_history,
    save_checkpoint,
)
from growth.config import get_flavor
from growth.inspect import compare, layer_of, open_checkpoint, spectral_norm
from growth.model import init_state_dict
from growth.provenance import (
    CODES,
    plan_of,
    provenance,
    provenance_counts,
    provenance_preview,
)
from growth.runs import EVAL_LOSS, LOSS, C, open_run
from operators import PROVENANCE, GrowthPlan, GrowthSpec, grow_state_dict, make_plan
from operators.depth import BLOCK_MATRICES, new_layer_indices
from tests.conftest import random_config

ZERO = CODES["zero"]


def save_with_moments(out: Path, config, weights, moments, history) -> Path:
    save_checkpoint(out, config, weights, history=history)
    for kind in MOMENT_KINDS:
        save_checkpoint(out / OPTIMIZER_DIR / kind, config, moments[kind])
    (out / OPTIMIZER_DIR / OPTIMIZER_STATE_NAME).write_text(json.dumps({"step": 7, "betas": [0.9, 0.95]}))
    return out


def grow_pair(tmp_path: Path, src_cfg, dst_cfg, spec: GrowthSpec) -> tuple[Path, Path, GrowthPlan]:
    """Parent (random weights + moments) and its growth, written like ``grow apply`` does."""
    # torch's normal_ yields an exact 0.0 now and then; nudge those, so that every zero in a
    # grown tensor was written by the operator
    weights = {n: t.masked_fill(t == 0, 1e-4) for n, t in init_state_dict(src_cfg, seed=3).items()}
    gen = torch.Generator().manual_seed(5)
    moments = {"exp_avg": {n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in weights.items()},
               "exp_avg_sq": {n: torch.rand(t.shape, generator=gen) * 1e-6 + 1e-8 for n, t in weights.items()}}
    history = append_event(new_history(), {"kind": "init", "seed": 3})
    parent = save_with_moments(tmp_path / "parent", src_cfg, weights, moments, history)
    plan = make_plan(src_cfg, dst_cfg, spec)
    grown_cfg, grown = grow_state_dict(weights, src_cfg, dst_cfg, spec)
    grown_moments = {k: grow_state_dict(moments[k], src_cfg, dst_cfg, spec, kind=k)[1] for k in MOMENT_KINDS}
    event = json.loads(json.dumps(plan.event()))  # as stored in growth.json
    child = save_with_moments(tmp_path / "grown", grown_cfg, grown, grown_moments, append_event(history, event))
    return parent, child, plan


@pytest.fixture
def zero_grown(tmp_path):
    """tiny-s1 → tiny-s2 with exact zero growth: width, heads, FFN and one new layer."""
    return grow_pair(tmp_path, get_flavor("tiny-s1"), get_flavor("tiny-s2"), GrowthSpec.from_strategy("zero"))


@pytest.fixture
def deep_grown(tmp_path):
    """tiny (4 layers) → 7 layers at target positions 1, 4, 6; width unchanged."""
    src = get_flavor("tiny")
    return grow_pair(tmp_path, src, src.replace(num_hidden_layers=7),
                     GrowthSpec.from_strategy("zero", positions=[1, 4, 6]))


# ---------------------------------------------------------------------- provenance
def test_provenance_map_marks_exactly_the_zero_region_the_operator_wrote(zero_grown):
    _, child, _ = zero_grown
    with open_checkpoint(child) as ck:
        assert ck.plan is not None and ck.new_layers == [1]
        for name in ck.reader.names():
            codes = ck.provenance(name)
            values = ck.get(name)
            # copied values are nonzero (see grow_pair), fresh ones too here: zeros are the zero fills
            assert torch.equal(codes == ZERO, values == 0), name
        name = "model.layers.0.self_attn.o_proj.weight"  # new hidden rows, new head columns
        fig = plots.plot_provenance(ck.provenance(name), title=name)
        shown = np.asarray(fig.axes[0].images[0].get_array())
        assert np.array_equal(shown == ZERO, (ck.get(name) == 0).numpy())
        assert (shown == ZERO).sum() == 80 * 80 - 64 * 64  # rows 64.. or columns 64.. of 80 × 80
        assert set(np.unique(shown)) == {CODES["copied"], ZERO}
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == ["copied 64.0%", "zero 36.0%"]


def test_blocks_and_counts_equal_the_full_map_for_every_strategy():
    rng = random.Random(11)
    checked = 0
    for strategy in ("zero", "masked", "clone", "split", "copy"):
        for _ in range(3):
            s = random_config(rng, gqa=rng.random() < 0.3)
            f = 2 if strategy == "clone" else rng.choice([1, 2])
            d = s.replace(hidden_size=s.hidden_size * f, intermediate_size=s.intermediate_size + rng.randint(0, 9),
                          num_hidden_layers=s.num_hidden_layers + rng.randint(0, 2),
                          num_attention_heads=s.num_attention_heads * f,
                          num_key_value_heads=s.num_key_value_heads * f, vocab_size=s.vocab_size + 3)
            plan = make_plan(s, d, GrowthSpec.from_strategy(strategy, depth_source=rng.choice(["neighbour", "init"])))
            for name in plan.config.tensor_shapes():
                full = plan.provenance(name)
                counts = torch.bincount(full.reshape(-1).long(), minlength=len(PROVENANCE))
                assert provenance_counts(plan, name) == {PROVENANCE[c]: int(n) for c, n in enumerate(counts) if n}
                rows = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(checked))[:5]
                if full.dim() == 2:
                    cols = slice(1, None, 2)
                    assert torch.equal(provenance(plan, name, rows, cols), full[rows][:, cols]), name
                else:
                    assert torch.equal(provenance(plan, name, rows), full[rows]), name
                checked += 1
    assert checked > 100


def test_provenance_of_52b_to_102b_from_flavors_without_weights():
    """Shapes only (the weights exist nowhere): the plan replayed from its growth.json event;
    blocks, previews and exact counts instead of 10⁸–10⁹-element maps."""
    start = time.perf_counter()
    plan = GrowthPlan.from_event(json.loads(json.dumps(make_plan(get_flavor("52b"), get_flavor("102b")).event())))
    assert plan_of(plan) is plan
    new = new_layer_indices(plan.layer_map)
    assert len(new) == 16 and plan.config.hidden_size == 10240
    old = next(i for i, e in enumerate(plan.layer_map) if not e["new"])

    q = f"model.layers.{old}.self_attn.q_proj.weight"  # 10240 × 10240: 8192² copied, new rows/cols init
    assert provenance_counts(plan, q) == {"copied": 8192**2, "init": 10240**2 - 8192**2}
    block = provenance(plan, q, rows=slice(8000, 8400), cols=slice(8100, 8300))
    r, c = torch.arange(8000, 8400)[:, None], torch.arange(8100, 8300)[None, :]
    expected = torch.where((r < 8192) & (c < 8192), CODES["copied"], CODES["init"]).to(torch.uint8)
    assert block.shape == (400, 200) and torch.equal(block, expected)

    down = f"model.layers.{old}.mlp.down_proj.weight"  # new hidden rows and new FFN columns are zero
    assert provenance_counts(plan, down) == {"copied": 8192 * 21824, "zero": 10240 * 27264 - 8192 * 21824}
    assert provenance_counts(plan, f"model.layers.{new[0]}.self_attn.o_proj.weight") == {"zero": 10240**2}
    assert provenance_counts(plan, "lm_head.weight") == {"copied": 80384 * 8192, "init": 80384 * 2048}

    preview, (rows, cols) = provenance_preview(plan, "lm_head.weight", max_size=256)
    assert preview.shape == (256, 256) and rows[-1] == 80383 and cols[-1] == 10239
    assert torch.equal(preview == CODES["init"], (cols >= 8192)[None, :].expand(256, 256))
    fig = plots.plot_provenance(preview, "lm_head.weight (102B)", index=(rows, cols))
    assert np.array_equal(np.asarray(fig.axes[0].images[0].get_array()), preview.numpy())
    assert fig.axes[0].images[0].get_extent()[1] == pytest.approx(10239.5)
    assert time.perf_counter() - start < 20  # seconds even on a busy CI box; ~1 s idle


# ---------------------------------------------------------------------- checkpoint view
def test_view_reads_only_the_tensors_asked_for(zero_grown, monkeypatch):
    from growth.tensor_io import TensorSource

    _, child, _ = zero_grown
    reads: list[str] = []
    original_get, original_chunks = TensorSource.get, TensorSource.chunks
    monkeypatch.setattr(TensorSource, "get", lambda self, n, *a: reads.append(n) or original_get(self, n, *a))
    monkeypatch.setattr(TensorSource, "chunks", lambda self, n, *a: reads.append(n) or original_chunks(self, n, *a))
    monkeypatch.setattr(CheckpointReader, "get", lambda *a, **k: pytest.fail("safe_open read"))
    with open_checkpoint(child) as ck:
        table = ck.tensor_table()
        ck.provenance("lm_head.weight")
        assert reads == []
        row = next(r for r in table if r["name"] == "model.layers.2.mlp.down_proj.weight")
        assert row["layer"] == 2 and not row["new_layer"] and "ffn:zero" in row["operator"]
        assert row["provenance"] == pytest.approx({"copied": 64 * 176 / (80 * 220), "zero": 1 - 64 * 176 / (80 * 220)})
        assert next(r for r in table if r["name"] == "model.layers.1.mlp.down_proj.weight")["new_layer"]
        ck.stats("model.layers.1.mlp.up_proj.weight", "exp_avg")
        assert reads == ["model.layers.1.mlp.up_proj.weight"]


def test_adam_moments_and_layer_stats(zero_grown):
    parent, child, _ = zero_grown
    with open_checkpoint(child) as ck:
        assert ck.moment_kinds == MOMENT_KINDS and ck.optimizer_state["step"] == 7
        name = "model.layers.0.self_attn.k_proj.weight"
        stored = CheckpointReader(child / OPTIMIZER_DIR / "exp_avg_sq", config=ck.config).get(name)
        st = ck.stats(name, "exp_avg_sq")
        assert st.norm == pytest.approx(float(stored.double().norm()), rel=1e-6)
        assert st.absmax == pytest.approx(float(stored.abs().max()))
        assert st.zero_fraction == pytest.approx(float((stored == 0).double().mean()))  # new rows/cols: zero
        rows = ck.layer_stats(kinds=("weight", "exp_avg"))
        assert len(rows) == 3 * len(BLOCK_MATRICES) * 2
        new_moment = [r for r in rows if r["layer"] == 1 and r["kind"] == "exp_avg"]
        assert all(r["norm"] == 0 and r["zero_fraction"] == 1 for r in new_moment)  # new layers start at zero
        w = ck.get(name)
        spec = ck.layer_stats(tensors=("self_attn.k_proj.weight",), spectral=True)[0]["spectral"]
        assert spec == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-5)
    with open_checkpoint(parent) as ck:
        assert ck.plan is None and ck.new_layers == [] and ck.tensor_table()[0]["provenance"] is None


def test_spectral_norm_power_iteration_matches_svd():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 40, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    s = torch.linspace(3.0, 0.1, 40)
    a = u @ torch.diag(s) @ v.T
    assert spectral_norm(a) == pytest.approx(3.0, rel=1e-5)
    assert spectral_norm(a, iters=300) == pytest.approx(3.0, rel=1e-4)
    assert spectral_norm(torch.zeros(5, 4), iters=10) == 0.0
    assert layer_of("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert layer_of("lm_head.weight") == (None, "lm_head.weight")


def test_compare_and_norm_profile_mark_the_inserted_layers(deep_grown):
    parent, child, plan = deep_grown
    rows = compare(parent, child)
    assert len(rows) == 7 * len(BLOCK_MATRICES)
    assert sorted({r["layer"] for r in rows if r["new"]}) == new_layer_indices(plan.layer_map) == [1, 4, 6]
    kept = [r for r in rows if not r["new"]]
    assert all(r["ratio"] == pytest.approx(1.0) for r in kept)  # width unchanged: kept layers are copies
    assert {r["src"] for r in kept} == {0, 1, 2, 3}
    assert all(r["grown"] == 0 for r in rows if r["new"] and r["tensor"] in ("self_attn.o_proj.weight",
                                                                         "mlp.down_proj.weight"))
    fig = plots.plot_norm_profile(rows, stat="norm")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(BLOCK_MATRICES)
    for ax in panels:
        spans = [p for p in ax.patches if p.get_gid() == plots.INSERTED_GID]
        centers = sorted(round(float(np.mean(p.get_patch_transform().transform(p.get_path().vertices)[:, 0])))
                         for p in spans)
        assert centers == [1, 4, 6]
        grown_line, parent_line = ax.lines[:2]
        mine = [r for r in rows if r["tensor"] == ax.get_title()]
        assert list(grown_line.get_ydata()) == pytest.approx([r["grown"] for r in mine])
        assert list(parent_line.get_xdata()) == [0, 2, 3, 5]  # old layers at their grown index


# ---------------------------------------------------------------------- run directory
def write_stage(run: Path, name: str, parent: str | None, steps: int, c_ramp: int | None = None,
                tb: bool = True) -> None:
    from torch.utils.tensorboard import SummaryWriter

    d = run / name
    d.mkdir(parents=True)
    (d / "stage_config.json").write_text(json.dumps({"stage": {"name": name, "parent": parent}}))
    (d / "summary.json").write_text(json.dumps({"stage": name, "steps": steps, "eval_loss_end": 1.0}))
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3,
                "c": None if c_ramp is None else min(1.0, (s - 1) / c_ramp)} for s in range(1, steps + 1)]
    if tb:
        writer = SummaryWriter(str(d / "tb"))
        for r in records:
            for key in ("loss", "lr", "c"):
                if r[key] is not None:
                    writer.add_scalar(f"train/{key}", r[key], r["step"])
        writer.add_scalar("eval/loss", 4.0, 0)
        writer.add_scalar("eval/loss", 3.0, steps)
        writer.close()
    else:
        (d / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_dir_orders_stages_and_marks_growth_points(tmp_path):
    run = tmp_path / "run"
    write_stage(run, "c_third", "b_second", 6, c_ramp=4)
    write_stage(run, "a_first", None, 10)
    write_stage(run, "b_second", "a_first", 8, tb=False)
    (run / "data").mkdir()  # not a stage
    r = open_run(run)
    assert [s.name for s in r.stages] == ["a_first", "b_second", "c_third"]
    assert set(r.summaries()) == {"a_first", "b_second", "c_third"}
    loss = r.curve(LOSS)
    assert loss.offsets == {"a_first": 0, "b_second": 10, "c_third": 18}
    assert loss.growth_points == [(10, "b_second"), (18, "c_third")]
    assert loss.steps == list(range(1, 25))  # the train log stands in for the missing tb/
    assert loss.values[10] == pytest.approx(4.9)  # b_second's first step
    evals = r.curve(EVAL_LOSS)
    assert evals.steps == [0, 10, 18, 24]
    fig = plots.plot_schedule_loss(loss, evals)
    ax = fig.axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == plots.GROWTH_GID) == [10, 18]
    assert sum(len(line.get_xdata()) for line in ax.lines[:3]) == 24

    ramp = r.stage("c_third").scalars(C)
    assert [c for _, c in ramp] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    fig = plots.plot_mask_ramp(ramp, ramp_steps=4)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(line.get_ydata()) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert fig.axes[0].lines[2].get_xdata()[0] == 5  # c = 1 from update ramp_steps + 1


def test_run_layout_names_match_the_trainer():
    import stages.launch.plan as orchestrate
    import stages.rank.worker as worker
    from growth import runs

    assert (runs.SUMMARY_NAME, runs.TB_DIR, runs.TRAIN_LOG_NAME, runs.FINAL_DIR) == (
        worker.SUMMARY_NAME, worker.TB_DIR, worker.TRAIN_LOG_NAME, worker.FINAL_DIR)
    assert runs.INIT_DIR == orchestrate.INIT_DIR
    from stages.schema import RESOLVED_NAME
    assert runs.STAGE_CONFIG_NAME == RESOLVED_NAME
