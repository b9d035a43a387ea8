"""A plain DeepSpeed training loop, as someone else's stage-1 job would be (for the import
tests): the tiny-s1 model with HF parameter names, AdamW, ZeRO-N, a few steps on random
tokens, ``engine.save_checkpoint``. Rank 0 also writes what the engine holds — every full
fp32 weight and both Adam moments — to ``reference.pt`` for a bitwise comparison.

Run: ``torchrun --nproc_per_node 2 tests/workers/ds_plain_loop.py OUT_DIR ZERO_STAGE``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from growth.config import get_flavor
from growth.model import build_model, causal_lm_loss, init_state_dict


def main() -> None:
    out, zero = Path(sys.argv[1]), int(sys.argv[2])
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # a CPU op gloo never uses
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = get_flavor("tiny-s1")
    model = build_model(config, init_state_dict(config, seed=3))
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named if p.dim() > 1], "weight_decay": 0.1},
              {"params": [p for _, p in named if p.dim() == 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        ids = torch.randint(0, config.valid_vocab_size, (2, 17), generator=gen)
        loss = causal_lm_loss(engine(ids[:, :-1]), ids[:, 1:])
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out))
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO-1/2 link group 0 only at step 1
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    ref = {"weight": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        ref["weight"][name] = safe_get_full_fp32_param(p).detach().clone().cpu()
        for kind in ("exp_avg", "exp_avg_sq"):
            ref[kind][name] = safe_get_full_optimizer_state(p, kind).detach().clone().cpu()
    if dist.get_rank() == 0:
        torch.save(ref, out / "reference.pt")
        config.save(out)
        (out / "steps.json").write_text(json.dumps({"steps": 3}))
    dist.barrier()


if __name__ == "__main__":
    main()
