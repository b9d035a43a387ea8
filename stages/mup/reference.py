"""The same architecture under microsoft's ``mup`` package: an independent μP reference.

The decoder is the project's (``growth.model``) built in standard parametrisation; the
package then does all of μP: ``lm_head`` becomes a ``mup.MuReadout`` (logits × output_mult /
width_mult), ``mup.set_base_shapes`` marks widths against base and delta models of the
proxy at base width and twice that, ``mup.init.normal_`` re-initialises every tensor (the
config's initializer_range, /
sqrt(width_mult) for hidden matrices) and ``mup.MuAdamW`` sets the per-width LRs. Nothing
from ``operators.mup`` or ``flmcore.init`` is used, so agreement with the project's own μP
is a check of both.

Note: ``mup`` (1.0.0) is installed by the README and CI with ``pip install --no-deps`` (its torchvision
requirement would replace a CPU torch with a CUDA build); :func:`available` says whether
it is installed.
"""

from __future__ import annotations

import importlib.util

import torch

from growth.config import ModelConfig, at_width
from growth.model import TeleFLMForCausalLM
from stages.mup.proxy import ProxyRun


def available() -> bool:
    return importlib.util.find_spec("mup") is not None


def _readout_model(config: ModelConfig, device: str = "cpu") -> TeleFLMForCausalLM:
    import mup

    with torch.device(device):
        model = TeleFLMForCausalLM(config)
        model.lm_head = mup.MuReadout(config.hidden_size, config.vocab_size, bias=False,
                                      output_mult=config.output_mult)
    return model


def build(config: ModelConfig, seed: int, run: ProxyRun) -> ProxyRun:
    """``run`` with its model and optimizer replaced by the ``mup`` package's (SP ``config``)."""
    import mup

    base_width = config.hidden_size / config.mup_scale_factor
    sp = config.replace(use_mup=False)
    model = _readout_model(sp)
    base = _readout_model(at_width(sp, int(base_width)), "meta")
    delta = _readout_model(at_width(sp, int(2 * base_width)), "meta")
    mup.set_base_shapes(model, base, delta=delta, rescale_params=False)
    torch.manual_seed(seed)  # mup.init samples from the global generator
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
            else:
                mup.init.normal_(p, 0.0, config.initializer_range)  # std / sqrt(width_mult) for hidden matrices
    stage = run.stage
    run.model = model
    run.optimizer = mup.MuAdamW(model.parameters(), lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps,
                                weight_decay=stage.weight_decay)
    for group in run.optimizer.param_groups:  # stages.engines.common.set_lr multiplies by lr_mult
        group["lr_mult"] = group["lr"] / stage.lr
    return run
