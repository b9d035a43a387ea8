"""TP 2 × DP 2 under a real DeepSpeed ZeRO-2 engine (4 gloo ranks) vs the plain ZeRO-1 engine
at DP 2, both built by ``stages.trainer.build_engine``: same start, same global batches,
gradient clipping on. Eval loss, per-step losses, the clipped global gradient norm, the
exported weights and Adam moments (``stages.export.export_final``) must agree, and a fresh TP
engine seeded from the TP export's ``optimizer/`` holds exactly those moments again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from growth.checkpoint import CheckpointReader
from growth.config import ModelConfig
from growth.init import init_checkpoint

CONFIG = ModelConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     head_dim=8, vocab_size=264, valid_vocab_size=259, use_mup=True, input_mult=1.0,
                     output_mult=1.0, mup_scale_factor=2.0)
STEPS = 3

WORKER = textwrap.dedent('''
    import json, os, sys, zlib
    import torch
    import torch.distributed as dist
    from growth.checkpoint import CheckpointReader, new_history
    from stages.config import DeepSpeedCfg, StageCfg
    from stages.engine import init_distributed, set_lr
    from stages.export import export_final
    from stages.trainer import build_engine

    out, tp, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    init_distributed()
    ds = DeepSpeedCfg(name="zero2" if tp > 1 else "zero1", zero_stage=2 if tp > 1 else 1,
                      gradient_clipping=0.2, activation_checkpointing=tp > 1, tensor_parallel=tp)
    stage = StageCfg(micro_batch_size=2, grad_accum=2, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    meta = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}

    def engine(ckpt):  # TP: each rank reads its slices of ckpt (as the trainer's start_weights is {})
        with CheckpointReader(ckpt) as reader:
            weights = reader.state_dict(torch.float32) if tp == 1 else {}
            return build_engine(reader.config, weights, ds, stage, init=ckpt if tp > 1 else None)

    eng = engine(os.path.join(out, "start"))

    def batch(*key):
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        ids = torch.randint(0, 259, (2, 13), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    evals = [batch("eval", i) for i in range(2)]
    record = {"engine": type(eng).__name__, "zero_stage": eng.zero_stage, "eval_loss_start": eng.eval_loss(evals),
              "losses": [], "grad_norms": [], "dp_world": eng.dp_world}
    for step in range(steps):
        set_lr(eng.optimizer, 3e-3)
        loss = eng.train_step([batch("train", step, m, eng.dp_rank) for m in range(2)])
        record["losses"].append(float(loss))
        record["grad_norms"].append(float(eng.engine.get_global_grad_norm()))
    record["eval_loss_end"] = eng.eval_loss(evals)
    final = os.path.join(out, f"final-tp{tp}")
    export_final(eng, eng.config, new_history(), final, meta)
    if tp > 1:  # Adam seeding under TP: a fresh engine from the export, moments read as slices
        fresh = engine(final)
        record["seeded_step"] = fresh.seed_adam_state(final, fresh.config)
        seeded = {kind: {n: t for n, t in fresh.gather(kind) if t is not None} for kind in ("exp_avg", "exp_avg_sq")}
        if dist.get_rank() == 0:
            torch.save(seeded, os.path.join(out, "seeded.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(out, f"record-tp{tp}.json"), "w") as fh:
            json.dump(record, fh)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, tp: int, world: int) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, str(out / "worker.py"), str(out), str(tp), str(STEPS)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs[:2])


def tensors(directory) -> dict[str, torch.Tensor]:
    with CheckpointReader(directory, config=CONFIG) as reader:
        return {name: reader.get(name, torch.float32) for name in CONFIG.tensor_shapes()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-engine")
    init_checkpoint(CONFIG, out / "start", seed=5)
    (out / "worker.py").write_text(WORKER)
    launch(out, tp=1, world=2)
    launch(out, tp=2, world=4)
    return out, {tp: json.loads((out / f"record-tp{tp}.json").read_text()) for tp in (1, 2)}


def test_tp2_dp2_zero2_matches_dp2(runs):
    out, (dp, tp) = runs[0], (runs[1][1], runs[1][2])
    assert (dp["engine"], tp["engine"]) == ("StageEngine", "TPStageEngine")  # build_engine picks the TP engine
    assert (dp["zero_stage"], tp["zero_stage"]) == (1, 2)
    assert dp["dp_world"] == tp["dp_world"] == 2
    assert abs(tp["eval_loss_start"] - dp["eval_loss_start"]) <= 1e-6 * dp["eval_loss_start"]
    assert len(tp["losses"]) == STEPS
    for a, b in zip(tp["losses"], dp["losses"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)
    # the clipped norm is the whole model's: every TP shard once, replicated norms once
    assert min(dp["grad_norms"]) > 0.2  # clipping at 0.2 is active in every step
    for a, b in zip(tp["grad_norms"], dp["grad_norms"], strict=True):
        assert abs(a - b) <= 1e-5 * b
    assert abs(tp["eval_loss_end"] - dp["eval_loss_end"]) <= 1e-4 * dp["eval_loss_end"]
    assert tp["eval_loss_end"] < tp["eval_loss_start"]
    # the export gathers the TP slices back to the canonical checkpoint: weights and moments
    for sub, atol in (("", 1e-5), ("optimizer/exp_avg", 1e-6), ("optimizer/exp_avg_sq", 1e-8)):
        w_tp, w_dp = tensors(out / "final-tp2" / sub), tensors(out / "final-tp1" / sub)
        assert list(w_tp) == list(CONFIG.tensor_shapes()) == list(w_dp)
        assert any(bool(t.abs().max() > 0) for t in w_dp.values()), sub
        for name in w_dp:
            assert torch.allclose(w_tp[name], w_dp[name], rtol=1e-4, atol=atol), f"{sub} {name}"
    with CheckpointReader(out / "final-tp2", check_shapes=False) as final:
        assert final.config.tensor_shapes() == CONFIG.tensor_shapes()


def test_adam_seeding_under_tp_restores_the_moments(runs):
    out, (_, tp) = runs[0], (runs[1][1], runs[1][2])
    assert tp["seeded_step"] == STEPS
    seeded = torch.load(out / "seeded.pt")
    for kind in ("exp_avg", "exp_avg_sq"):
        written = tensors(out / "final-tp2" / "optimizer" / kind)
        assert list(seeded[kind]) == list(written)
        for name, t in written.items():
            assert torch.equal(seeded[kind][name], t), f"{kind} {name}"
