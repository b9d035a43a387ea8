"""Every private DeepSpeed API the trainer uses, in one place, with the versions verified.

=============================================  ===========================================  ==========
attribute / call                               class (module)                               verified
=============================================  ===========================================  ==========
``single_partition_of_fp32_groups``            DeepSpeedZeroOptimizer (zero/stage_1_and_2)  0.19.8
``fp32_partitioned_groups_flat``               DeepSpeedZeroOptimizer_Stage3 (zero/stage3)  0.19.8
``fp32_groups_flat_partition``                 BF16_Optimizer (runtime/bf16_optimizer)      0.19.8
``fp16_groups`` / ``fp32_groups``              FP16_UnfusedOptimizer (fp16/unfused_opt.)    0.19.8
``_hp_optimizer_states_linked``,               DeepSpeedZeroOptimizer, BF16_Optimizer       0.19.8
``_lazy_init_hp_params_optimizer_state()``
``_reassign_or_swap_out_partitioned_params()``  DeepSpeedZeroOptimizer_Stage3                0.19.8
``update_lp_params()``                         DeepSpeedZeroOptimizer, BF16_Optimizer       0.19.8
``param.ds_id`` / ``param._hp_mapping``        ZeRO-3 params / ZeRO-1/2 + bf16 params       0.19.8
``build_shm_op`` (replaced on CPU)             module deepspeed.comm.torch                  0.19.8
``see_memory_usage`` (replaced)                module deepspeed.runtime.bf16_optimizer      0.19.8
``MuonWithAuxAdam`` (placeholder module)      module deepspeed.runtime.zero.muon.muon_opt. 0.19.8
``engine.grid.data_parallel_id``,              PipelineEngine (runtime/pipe/engine)         0.19.8
``grid.stage_to_global``, ``stage_owner``      PipelineModule (runtime/pipe/module)         0.19.8
``_zero2_merge_trainable_params``,             module deepspeed.utils.zero_to_fp32          0.19.8
``_zero3_merge_trainable_params`` (called only  (merge ZeRO flat partitions of the Adam
by ``growth.ds_import.zero_merge_moments``)    moments into per-parameter tensors)
``is_invalid_grad_norm``,                      modules zero/stage_1_and_2, zero/stage3,     0.19.8
``clip_tensors_by_global_norm`` (replaced by   runtime/bf16_optimizer
``DeviceGradCheck``: no host sync per step)
``torch.load(weights_only=False)`` calls       TorchCheckpointEngine.load, engine            0.19.8
(replaced by ``flmcore.safe_load.load``         ``_get_all_zero_checkpoint_state_dicts``,
while a checkpoint is loaded)                  utils/zero_to_fp32 (grow import)
=============================================  ===========================================  ==========

Why each is needed: a fresh engine has no Adam state (torch creates it lazily at the first
step), so seeding it from a grown checkpoint (``stages.engines.optim_state``) writes the moments
onto the wrapper's flat fp32 partitions and relinks DeepSpeed's per-parameter views of
them; the public ``safe_get/set_full_*`` helpers then work per parameter. On CPU,
``deepspeed.init_distributed`` compiles a shared-memory all-reduce op (30–40 s, 1.6 GB)
that gloo never uses; it is skipped. ``deepspeed.initialize`` (and the ZeRO/bf16 wrappers)
import the Muon optimizer module only to test ``isinstance(optimizer, MuonWithAuxAdam)``;
that import compiles Muon's kernels (``torch.compile`` pulls in dynamo: 1.9 s CPU per rank
here). The trainer's optimizer is always AdamW, so a placeholder module whose
``MuonWithAuxAdam`` nothing is an instance of answers those checks instead.
``BF16_Optimizer`` (bf16 ZeRO-1 and the bf16 pipeline) reports memory while it is built,
``see_memory_usage(force=True)`` 2 + 2 × (param groups) times: on rank 0 each a
``gc.collect()``, three lines on stdout and, on a GPU, a reset of the peak-memory counter;
1.4–1.8 s of every such engine's construction here (measured on the TP parity workers'
4-rank engines: 1.5–1.9 s with the reports, 0.07–0.16 s without). :func:`skip_bf16_memory_reports`
turns them off.

DeepSpeed reads its checkpoints with ``torch.load(weights_only=False)``: unpickling would
run whatever a damaged or planted file names. While ``engine.load_checkpoint`` runs,
:func:`safe_checkpoint_loads` makes every ``torch.load`` a weights-only read with the
allowlist of :data:`flmcore.safe_load.DEEPSPEED_GLOBALS` (the classes DeepSpeed's own
checkpoints hold); anything else is refused in one line naming the file and the global.

``pyproject.toml`` pins deepspeed to :data:`SUPPORTED`; :func:`check_version` refuses
anything else in one line before an engine is built.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from flmcore.errors import FlmError

SUPPORTED = ((0, 19), (0, 20))  # [low, high): the range in pyproject.toml
SUPPORTED_TEXT = "deepspeed>=0.19,<0.20"

# Attribute holding each param group's flat fp32 partition, per DeepSpeed optimizer wrapper.
FLAT_PARTITIONS = (
    "single_partition_of_fp32_groups",  # DeepSpeedZeroOptimizer (ZeRO-1/2)
    "fp32_partitioned_groups_flat",  # DeepSpeedZeroOptimizer_Stage3
    "fp32_groups_flat_partition",  # BF16_Optimizer (bf16 with fp32 accumulation: ZeRO-1, the pipeline, TP × PP)
)


class DeepSpeedVersionError(FlmError):
    """The installed DeepSpeed is outside the range this module was verified with."""


def version_tuple(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_version(installed: str | None = None) -> None:
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    low, high = SUPPORTED
    if not low <= version_tuple(installed) < high:
        raise DeepSpeedVersionError(f"deepspeed {installed} is not supported: stages/engines/ds_compat.py is verified "
                                    f"with {SUPPORTED_TEXT}; pip install '{SUPPORTED_TEXT}'")


def safe_checkpoint_loads() -> Any:
    """A context in which DeepSpeed's checkpoint reads are weights-only (see the module doc)."""
    from flmcore.safe_load import guarded_torch_load

    return guarded_torch_load()


def skip_cpu_shm_build() -> None:
    """Make ``deepspeed.init_distributed`` skip building the CPU shared-memory op."""
    import deepspeed.comm.torch  # noqa: F401  (the module whose build_shm_op is replaced)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def skip_bf16_memory_reports() -> None:
    """Make ``BF16_Optimizer``'s forced memory reports no-ops (see the module doc)."""
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer

    bf16_optimizer.see_memory_usage = lambda message, force=False: None


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_muon_import() -> None:
    """Answer DeepSpeed's ``isinstance(optimizer, MuonWithAuxAdam)`` checks without importing
    (and compiling) Muon; a no-op once the real module is loaded."""
    import types

    if MUON_MODULE in sys.modules:
        return
    placeholder = types.ModuleType(MUON_MODULE, "flm-growth placeholder: the trainer never uses Muon")

    class MuonWithAuxAdam:  # never instantiated: every isinstance check is False
        pass

    placeholder.MuonWithAuxAdam = MuonWithAuxAdam
    sys.modules[MUON_MODULE] = placeholder


# ---------------------------------------------------------------------- optimizer wrappers
def base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a DeepSpeed wrapper (or ``opt`` itself)."""
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def flat_partitions(opt: Any) -> list[torch.Tensor] | None:
    for attr in FLAT_PARTITIONS:
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def is_deepspeed_mapped(p: nn.Parameter) -> bool:
    """ZeRO-3 (``ds_id``) or a ZeRO-1/2/bf16 fragment mapping (``_hp_mapping``): use the
    ``deepspeed.utils.safe_*_full_*`` helpers for this parameter."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def fp32_twin(opt: Any, p: nn.Parameter) -> nn.Parameter:
    """The fp32 master of ``p`` under FP16_UnfusedOptimizer (ZeRO-0 + bf16: one full fp32
    copy per parameter on every rank, no flat partitions); ``p`` itself otherwise."""
    if not hasattr(opt, "fp32_groups"):
        return p
    for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is p:
                return hp
    return p


def relink(opt: Any) -> None:
    """Point DeepSpeed's per-parameter fragments at the current state tensors.

    Note: ZeRO-1/2 link once, right after the first param group's first step, when the
    later groups have no state yet; ``safe_get_full_optimizer_state`` then fails for every
    parameter outside group 0. Relinking after the state exists fixes that.
    """
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def update_lp_params(opt: Any) -> None:
    """Copy the fp32 master partitions into the model's (bf16 or fp32) parameters."""
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2, BF16_Optimizer (collective)
        opt.update_lp_params()
    elif hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO-3
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer (ZeRO-0 + bf16)
        with torch.no_grad():
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for lp, hp in zip(lp_group, hp_group, strict=True):
                    lp.copy_(hp)


# ---------------------------------------------------------------------- gradient checks on the device
GRAD_CHECK_MODULES = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
                      "deepspeed.runtime.bf16_optimizer")


class DeviceGradCheck:
    """DeepSpeed's ZeRO-1/2/3 and bf16 wrappers check the gradient norm on the host in every
    ``step()`` (``is_invalid_grad_norm``: a ``bool()`` of a device tensor; the bf16 wrapper's
    clip also compares its coefficient on the host): a GPU sync per step. :func:`install`
    replaces both names in those modules: the check keeps its flag (1 = the norm was NaN, inf
    or DeepSpeed's negative sentinel) on the device and answers "valid"; the clip scales by
    ``min(1, max_norm / norm)`` on the device (bit-equal: ×1.0 where DeepSpeed skipped).

    The update is still never applied with such a norm: ``SkippableAdamW.step`` (the torch
    optimizer every wrapper calls after its check, in the same ``step()``) drops it through
    the fused kernel's ``found_inf`` on the device, or reads the flag on the host where torch
    has no fused AdamW (what DeepSpeed did). Each wrapper step checks before its inner steps,
    so :attr:`flag` always belongs to the step in progress (``make_optimizer`` clears it).
    """

    flag: torch.Tensor | None = None

    @classmethod
    def is_invalid_grad_norm(cls, norm: Any) -> bool:
        if not torch.is_tensor(norm):
            from deepspeed.runtime.utils import is_invalid_grad_norm

            return is_invalid_grad_norm(norm)
        cls.flag = (~torch.isfinite(norm) | (norm < 0)).any().float().reshape(())
        return False

    @staticmethod
    def clip_tensors_by_global_norm(input_tensors: list[torch.Tensor], max_norm: float = 1.0,
                                    global_norm: Any = None, mpu: Any = None, eps: float = 1e-6) -> Any:
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        if global_norm is None:
            global_norm = get_global_norm_of_tensors(input_tensors, mpu=mpu)
        coef = (max_norm / (global_norm + eps)).clamp(0.0, 1.0)  # 0 for the -1 sentinel (dropped)
        for tensor in input_tensors:
            tensor.detach().mul_(coef)
        return global_norm

    @classmethod
    def install(cls) -> None:
        """Replace the checks in DeepSpeed's wrapper modules (idempotent); clear the flag."""
        import importlib

        cls.flag = None
        for name in GRAD_CHECK_MODULES:
            module = importlib.import_module(name)
            module.is_invalid_grad_norm = cls.is_invalid_grad_norm
            if hasattr(module, "clip_tensors_by_global_norm"):
                module.clip_tensors_by_global_norm = cls.clip_tensors_by_global_norm


# ---------------------------------------------------------------------- pipeline engine
def pipe_dp_rank(engine: Any) -> int:
    return engine.grid.data_parallel_id


def pipe_owner_rank(engine: Any, module: Any, spec_index: int, **coords: int) -> int:
    """Global rank of data-parallel replica 0 of the pipeline stage holding spec ``spec_index``
    (other topology axes: ``coords``, e.g. ``model=0``, else this rank's own)."""
    return engine.grid.stage_to_global(module.stage_owner(spec_index), data=0, **coords)


# ---------------------------------------------------------------------- memory estimates (the dry run)
def estimate_zero2_model_states_mem_needs(*args: Any, **kwargs: Any) -> Any:
    """DeepSpeed's ZeRO-0/1/2 model-state estimator (public; imported here so the dry run in
    ``stages.launch`` does not import deepspeed itself)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as estimate

    return estimate(*args, **kwargs)


def estimate_zero3_model_states_mem_needs(*args: Any, **kwargs: Any) -> Any:
    """DeepSpeed's ZeRO-3 model-state estimator (public)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as estimate

    return estimate(*args, **kwargs)
