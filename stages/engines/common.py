"""DeepSpeed for one stage: process group, config dict, μP param groups, the ZeRO engine.

Both engines — :class:`StageEngine` (ZeRO 0–3 over the plain model) and
``stages.engines.pipeline.PipeStageEngine`` — implement the :class:`Engine` protocol, so the
trainer (``stages.rank.trainer.Trainer``) does not know which one it drives. DeepSpeed
internals are confined to ``stages.engines.ds_compat``.

Reference: DeepSpeed config JSON (deepspeed.ai/docs/config-json).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growth.config import ModelConfig
from growth.model import DecoderLayer
from operators.mup import lr_multiplier
from stages.engines import ds_compat, optim_state
from stages.schema import DeepSpeedCfg, Precision, StageCfg
from stages.validate import check_deepspeed

LOG_LEVEL = logging.WARNING  # DeepSpeed logs every engine detail at INFO


# ---------------------------------------------------------------------- process group
def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def init_distributed(timeout: float | None = None) -> None:
    """torch.distributed through DeepSpeed: gloo on CPU, the accelerator's backend elsewhere."""
    import deepspeed

    ds_compat.check_version(deepspeed.__version__)
    deepspeed.utils.logger.setLevel(LOG_LEVEL)
    ds_compat.skip_muon_import()  # the optimizer is AdamW: no Muon kernels to compile (stages.engines.ds_compat)
    ds_compat.skip_bf16_memory_reports()  # a gc.collect() and a print per param group while BF16_Optimizer is built
    backend = None
    if on_cpu():
        ds_compat.skip_cpu_shm_build()
        backend = "gloo"
    else:  # fp32 matmuls (fp32 stages, the fp32 logits of the loss) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    extra = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}  # collective_timeout
    deepspeed.init_distributed(dist_backend=backend, verbose=False, **extra)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


# ---------------------------------------------------------------------- config
DS_CONFIG_NAME = "ds_config.json"  # RUN_DIR/<stage>/ds_config.json: the exact dict DeepSpeed got (rank 0)


def ds_config(ds: DeepSpeedCfg, stage: StageCfg, dp_world: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a stage (layout rules: ``stages.validate.check_deepspeed``).

    Note: in bf16 the masters stay fp32 and gradients accumulate and reduce in fp32, as in
    Megatron and torchtitan, in every engine: ``data_types.grad_accum_dtype = fp32`` (ZeRO-1,
    the pipeline and TP × PP then run DeepSpeed's ``BF16_Optimizer`` with fp32 gradient
    buffers; ZeRO-2/3 keep fp32 gradient partitions) and ``communication_data_type = fp32``
    (DeepSpeed would otherwise cast the gradients to bf16 for the all-reduce /
    reduce-scatter). ZeRO-0 in bf16 is refused by ``check_deepspeed``: DeepSpeed 0.19 raises
    on fp32 accumulation there. The pipeline also sets ``bf16.immediate_grad_update``: each
    parameter's bf16 gradient is added to its fp32 buffer as soon as autograd has accumulated
    it. Without it the last stage lost ``lm_head``'s gradient: the pipe's ``loss_fn`` uses
    ``lm_head`` outside the PipelineModule's forward, so its gradient exists before the
    backward reaches the module's output, where DeepSpeed's backward-prologue hook
    (``BF16_Optimizer.backward_prologue`` → ``clear_lp_grads``) zeroes it; the epilogue then
    adds zeros to the fp32 buffer (measured on the tiny 2-stage model: clip norm 0.386 instead
    of 0.533 = sqrt(0.533² − 0.367²), 0.367 being ``lm_head``'s gradient norm, and
    ``lm_head`` never trained).
    """
    check_deepspeed(ds, world=None)
    mbs, accum = stage.micro_batch_size, stage.grad_accum
    bf16 = ds.precision == Precision.bf16
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": accum,
        "train_batch_size": mbs * accum * dp_world,
        "gradient_clipping": float(ds.gradient_clipping),
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW, see make_optimizer
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        # the overflow check DeepSpeed adds for bf16 (a host read per step) is replaced by the
        # clip's norm check, kept on the device (ds_compat.DeviceGradCheck); without clipping
        # there is no norm to check, so DeepSpeed keeps its own
        config["bf16"]["check_grad_overflow"] = not ds.gradient_clipping
        config["communication_data_type"] = "fp32"
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        if ds.pipeline:  # see the Note: lm_head's gradient reaches the fp32 buffer
            config["bf16"]["immediate_grad_update"] = True
    return config


# ---------------------------------------------------------------------- optimizer
def param_groups(named: list[tuple[str, nn.Parameter]], config: ModelConfig,
                 weight_decay: float) -> list[dict[str, Any]]:
    """One AdamW group per (μP LR multiplier, decay or not), in a fixed order.

    Matrices decay, norm gains (1-D) do not. Each group carries ``lr_mult`` so the
    worker sets ``lr = schedule(step) × lr_mult`` before every update; names may carry
    any prefix (pipeline names start with the spec index).
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in named:
        key = (lr_multiplier(config, name), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0}
            for (mult, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether torch's fused AdamW kernel runs on ``device`` (CUDA; CPU since torch 2.4)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


class SkippableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose next update can be dropped without a host sync.

    :meth:`drop_if` takes a 0-d device tensor (1 = drop). With the fused kernel it becomes
    torch's ``found_inf`` (the GradScaler seam: the kernel leaves weights and moments as they
    were and the ``step`` count is stepped back, all on the device); without it (a device
    torch has no fused AdamW for) the flag is read on the host, as before.

    A step is also dropped where the DeepSpeed wrapper around it found the gradient norm
    NaN or inf (``ds_compat.DeviceGradCheck.flag``, kept on the device instead of DeepSpeed's
    host read).

    Note: DeepSpeed's ZeRO wrappers call this inner step and then copy its fp32 (master)
    weights back into the module; a dropped step leaves both, and the moments and step
    count, exactly as they were. ZeRO-0 in fp32 has no overflow check of its own.
    """

    skip_next = False  # host-side fallback of drop_if (no fused kernel)
    found_inf: torch.Tensor | None = None  # drop_if's flag, as torch's fused step reads it

    def drop_if(self, flag: torch.Tensor | None) -> None:
        """Drop the next ``step()`` where ``flag`` (0-d, on the device) is non-zero; None: keep it."""
        if flag is None:
            self.found_inf, self.skip_next = None, False
        elif self.fused:
            self.found_inf = flag.float()
        else:
            self.skip_next = bool(flag)  # a host sync (no fused AdamW on this device)

    @property
    def fused(self) -> bool:
        return all(group["fused"] for group in self.param_groups)

    def step(self, closure=None):  # noqa: D102
        from stages.engines.ds_compat import DeviceGradCheck

        wrapper_flag, dropped = DeviceGradCheck.flag, self.found_inf
        if wrapper_flag is not None and self.fused:  # torch's fused kernel reads self.found_inf
            self.found_inf = wrapper_flag if dropped is None else torch.maximum(dropped, wrapper_flag)
        elif wrapper_flag is not None and bool(wrapper_flag):  # a host sync (no fused AdamW)
            return None
        if self.skip_next:
            return None
        try:
            return super().step(closure)
        finally:
            self.found_inf = dropped


def make_optimizer(named: list[tuple[str, nn.Parameter]], config: ModelConfig,
                   stage: StageCfg) -> torch.optim.AdamW:
    """A plain ``torch.optim.AdamW``, fused where torch has the kernel for the parameters'
    device (DeepSpeed's FusedAdam/CPUAdam need compiled ops); ``step`` state on the device."""
    device = named[0][1].device if named else torch.device("cpu")
    return SkippableAdamW(param_groups(named, config, stage.weight_decay), lr=stage.lr,
                          betas=tuple(stage.betas), eps=stage.eps, fused=fused_adamw_supported(device) or None)


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


# ---------------------------------------------------------------------- activation checkpointing, compile
def checkpoint_layers(layers: list[DecoderLayer], every: int = 1) -> None:
    """Recompute every ``every``-th decoder layer (0, k, 2k, …) in the backward pass
    (``torch.utils.checkpoint``, non-reentrant).

    Note: the forward is replaced per instance, so parameter names stay the HF ones. No RNG
    state is saved or restored (``preserve_rng_state=False``): the model has no dropout, and
    saving it costs a device-RNG read per layer and step.
    """
    for layer in layers[::every]:
        plain = layer.forward
        layer.forward = (lambda *a, _f=plain: checkpointed(_f, *a))


def checkpointed(function: Any, *args: torch.Tensor) -> Any:
    """``function(*args)`` recomputed in the backward pass, without RNG-state saving."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


COMPILE_BACKEND_ENV = "FLM_COMPILE_BACKEND"  # torch.compile backend (default inductor); smoke runs: aot_eager


def compile_on(ds: DeepSpeedCfg) -> bool:
    """``deepspeed.compile``: auto = on for CUDA (and other accelerators), off for the CPU."""
    choice = str(ds.compile).lower()
    return not on_cpu() if choice == "auto" else choice == "true"


def compile_layers(layers: list[nn.Module], backend: Any = None) -> None:
    """``torch.compile`` each decoder layer in place (torchtitan's per-block compile: compile
    time flat in depth; works under activation checkpointing, whose wrapper it traces).

    Note: ``nn.Module.compile`` keeps the module, its parameter names and state dict; the MSG
    masks are buffers ramped in place (growth.model.put_mask), so a ramp step does not
    recompile. ``$FLM_COMPILE_BACKEND`` picks another backend (the benchmarks' ``--smoke``:
    ``aot_eager``, the same graphs and autograd without inductor's C++ build on a CPU)."""
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    for layer in layers:
        layer.compile(backend=backend)


# ---------------------------------------------------------------------- plain engine (ZeRO 0-3)
class DeepSpeedEngine:
    """What every engine answers the same way from ``self.engine`` (DeepSpeed's engine) and
    ``self.optimizer`` (its optimizer wrapper): the checkpoint, LR and Adam-seed parts of
    ``stages.engines.protocol.Engine``."""

    skip_nonfinite = False  # on_nonfinite=skip (set by the trainer; validate: ZeRO engine only)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def seed_adam_state(self, checkpoint: str | Path, config: ModelConfig) -> int:
        return optim_state.seed_adam_state(self.optimizer, self.named_params(), checkpoint, config)

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: str | Path, tag: str) -> tuple[str | None, dict[str, Any]]:
        with ds_compat.safe_checkpoint_loads():  # weights-only: nothing in the files runs
            return self.engine.load_checkpoint(str(directory), tag=tag)


class DeepSpeedModule(DeepSpeedEngine):
    """What every non-pipeline engine answers the same way from ``self.model`` (the module it
    built) and ``self.engine`` (DeepSpeed's engine around it)."""

    @property
    def config(self) -> ModelConfig:
        """The model's current config (it carries the live MSG mask state)."""
        return self.model.config

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def named_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.engine.module.named_parameters()


