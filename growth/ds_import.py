"""DeepSpeed checkpoints from someone else's loop → weights + Adam moments (``grow import``).

Two layouts:

- a ZeRO-1/2/3 checkpoint: ``CKPT/latest`` naming a tag folder, or the tag folder itself
  (``global_stepN/`` with ``*_model_states.pt`` and ``zero_pp_rank_*_optim_states.pt``).
  Weights come from DeepSpeed's own consolidation,
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)``
  (fp32 masters, not the 16-bit module copy). The Adam moments are rebuilt by the same
  DeepSpeed merge functions fed with each rank's flat ``exp_avg`` / ``exp_avg_sq``
  partitions instead of its flat fp32 partition: the moments share the master's flat
  layout, partition for partition, so the same reconstruction applies.
- a universal checkpoint (``python -m deepspeed.checkpoint.ds_to_universal``): a folder
  with ``zero/<param name>/{fp32,exp_avg,exp_avg_sq}.pt``, each ``{"param": tensor, …}``
  (full shape for ZeRO-1/2, flat for ZeRO-3, reshaped here; a 2-D tensor of another
  shape is refused, never reshaped to fit).

Parameter names must be the HF Llama names of the module (a ``module.`` prefix is
dropped); the model config comes from ``--config`` or a config.json in the folder or its
parents. The Adam step is the optimizer's own (``state[...]["step"]``), or ``step.pt``.

Note: nothing in the files runs. A ZeRO checkpoint's files hold a few plain DeepSpeed
objects (loss scaler, stage enum, fragment addresses); every file — ours to read and the
ones DeepSpeed's ``zero_to_fp32`` reads — goes through :func:`flmcore.safe_load.load`:
``torch.load(weights_only=True)`` with exactly those classes allowed, any other global
refused in one line before anything is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from flmcore.errors import FlmError
from flmcore.safe_load import guarded_torch_load, load
from growth.checkpoint import CheckpointError
from growth.config import CONFIG_NAME, ConfigError, ModelConfig, resolve_config
from growth.import_source import Source, TensorInfo, canonical

log = logging.getLogger(__name__)

KINDS = ("exp_avg", "exp_avg_sq")
UNIVERSAL_OPTIMIZER = "optimizer_state.pt"  # zero/optimizer_state.pt: the param groups (ds_to_universal)


def _tag_dir(src: Path) -> Path | None:
    """The ZeRO tag folder SRC is or names, or None."""
    if list(src.glob("*_optim_states.pt")) or list(src.glob("*model_states.pt")):
        return src
    latest = src / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise CheckpointError(f"{latest}: names no usable tag ({tag!r})")
        if not (src / tag).is_dir():
            raise CheckpointError(f"{latest}: names tag '{tag}' but {src / tag} does not exist")
        return src / tag
    return None


def _universal_dir(src: Path) -> Path | None:
    for cand in (src / "zero", src):
        if cand.is_dir() and any((p / "fp32.pt").is_file() for p in cand.iterdir() if p.is_dir()):
            return cand
    return None


def detect(src: Path) -> str | None:
    if _universal_dir(src) is not None:
        return "deepspeed-universal"
    if _tag_dir(src) is not None:
        return "deepspeed-zero"
    tags = sorted(p.name for p in src.iterdir() if p.is_dir() and (
        list(p.glob("*_optim_states.pt")) or list(p.glob("*model_states.pt"))))
    if tags:
        raise CheckpointError(f"{src}: DeepSpeed checkpoint without a 'latest' file; pass the tag folder "
                              f"itself, e.g. {src / tags[-1]}")
    return None


def find_config(src: Path, config: str | None) -> tuple[ModelConfig, dict[str, Any] | None]:
    if config is not None:
        try:
            cfg = resolve_config(config)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        path = Path(config)
        raw = json.loads((path / CONFIG_NAME if path.is_dir() else path).read_text()) if path.exists() else None
        return cfg, raw
    for d in (src, *list(src.parents)[:3]):
        if (d / CONFIG_NAME).is_file():
            try:
                return ModelConfig.load(d / CONFIG_NAME), json.loads((d / CONFIG_NAME).read_text())
            except ConfigError as err:
                raise CheckpointError(str(err)) from None
    raise CheckpointError(f"{src}: no config.json in the DeepSpeed folder or its parents; pass "
                          f"--config FLAVOR|CONFIG_JSON (the model's HF config)")


def _hf_name(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _quiet_load(path: Path, mmap: bool = False) -> Any:
    try:
        return load(path, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except FlmError:
        raise
    except Exception as err:  # torch raises many types for a broken file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read ({first[:160]})") from None


_CACHE: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]] = {}


def _zero_states(tag: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(fp32 weights, {kind: moments}, optimizer state.json) of a ZeRO tag folder, via
    DeepSpeed's own consolidation (cached per process)."""
    key = str(tag.resolve())
    if key not in _CACHE:
        _CACHE[key] = _read_zero(tag)
    return _CACHE[key]


def _hparams(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """betas, eps and weight_decay of the first param group, when the state has them."""
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    group0 = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    if "betas" not in group0:
        return {}
    return {"betas": [float(b) for b in group0["betas"]], "eps": float(group0.get("eps", 1e-8)),
            "weight_decay": float(group0.get("weight_decay", 0.0))}


def zero_merge_moments(stage: int, merged: dict[str, Any], world: int, flats: Any, model_states: Any,
                       paddings: Any = None) -> None:
    """Merge the ZeRO flat partitions ``flats`` of one Adam moment into ``merged`` (name →
    tensor) with zero_to_fp32's private mergers, the ones its own fp32 consolidation uses.
    The one place grow import calls them; they are listed, with the version verified, in
    the DeepSpeed-privates table of stages/engines/ds_compat.py (growth sits below stages
    and cannot import it)."""
    from deepspeed.utils import zero_to_fp32 as z

    if stage <= 2:
        z._zero2_merge_trainable_params(merged, world, flats, model_states, paddings)
    else:
        z._zero3_merge_trainable_params(merged, world, flats, model_states)


def _read_zero(tag: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    from deepspeed.utils import zero_to_fp32 as z

    optim_files = sorted(tag.glob("*_optim_states.pt"))
    if not optim_files:
        raise CheckpointError(f"{tag}: no *_optim_states.pt files (a ZeRO checkpoint saved with its "
                              f"optimizer is needed)")
    sink = io.StringIO()
    quiet = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink))  # zero_to_fp32 prints progress
    with quiet[0], quiet[1], guarded_torch_load():
        try:
            weights = z.get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
            model_states = z.parse_model_states(z.get_model_state_files(str(tag)))
        except (ValueError, FileNotFoundError, KeyError, RuntimeError, TypeError, AttributeError,
                IndexError) as err:  # a file of another layout: DeepSpeed's own error, on one line
            raise CheckpointError(f"{tag}: DeepSpeed cannot consolidate it ({str(err).splitlines()[0]})") from None
        optim = [_quiet_load(f, mmap=True)["optimizer_state_dict"]
                 for f in z.get_optim_files(str(tag))]
        stage = int(optim[0]["zero_stage"])
        world = optim[0]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        inner = [o.get("base_optimizer_state") or o.get("optimizer_state_dict") for o in optim]
        groups = len(inner[0]["state"])
        moments: dict[str, dict[str, Any]] = {}
        state = {"step": int(inner[0]["state"][0]["step"]) if groups else 0, **_hparams(inner[0])}
        for kind in KINDS:
            flats = [[s["state"][g][kind] for g in range(groups)] for s in inner]
            merged: dict[str, Any] = {}
            zero_merge_moments(stage, merged, world, flats, model_states,
                               optim[0].get("param_alignment_paddings") if stage <= 2 else None)
            moments[kind] = merged
    return weights, moments, state


class Feed:
    """Tensors of an opened DeepSpeed source, fp32, by canonical name and kind."""

    def __init__(self, source: Any):
        self.source = source
        tag = Path(source.tensors[next(iter(source.tensors))].file)
        if source.format == "deepspeed-zero":
            self.weights, self.moments, _ = _zero_states(tag)
        else:
            self.root = tag

    def get(self, name: str, kind: str = "weight") -> torch.Tensor:
        info = self.source.tensors[name]
        if self.source.format == "deepspeed-zero":
            table = self.weights if kind == "weight" else self.moments[kind]
            t = table[info.key]
            t = t.contiguous() if not isinstance(t, torch.Tensor) else t
            return t.detach().float().clone().view(info.shape)
        fname = "fp32.pt" if kind == "weight" else f"{kind}.pt"
        return _universal_tensor(self.root / info.key / fname, info.shape).float().clone()


def _universal_tensor(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of a universal ``*.pt`` file in ``shape``: stored in that shape, or flat
    (ZeRO-3) with as many values; any other shape is refused, never reshaped to fit."""
    data = _quiet_load(path, mmap=True)  # the shape check reads no data
    t = data["param"] if isinstance(data, dict) else data
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: holds a {type(t).__name__}, not a tensor")
    if tuple(t.shape) == tuple(shape):
        return t
    if t.dim() == 1 and t.numel() == torch.Size(shape).numel():
        return t.reshape(shape)
    raise CheckpointError(f"{path}: holds a tensor of shape {list(t.shape)}, config.json implies "
                          f"{list(shape)}")


def _step(path: Path) -> int:
    s = _quiet_load(path)
    value = s.item() if isinstance(s, torch.Tensor) and s.numel() == 1 else s
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or value != int(value):
        raise CheckpointError(f"{path}: holds step {value!r}, not a whole number >= 0")
    return int(value)


def open_source(src: Path, kind: str, config: str | None) -> Any:
    model, raw = find_config(src, config)
    found: dict[str, TensorInfo] = {}
    if kind == "deepspeed-zero":
        tag = _tag_dir(src)
        assert tag is not None
        weights, _, state = _zero_states(tag)
        for key, t in weights.items():
            found[_hf_name(key)] = TensorInfo(str(tag.resolve()), key, tuple(t.shape), torch.float32)
        files = {p.name: p.stat().st_size for p in sorted(tag.glob("*.pt"))}
    else:
        root = _universal_dir(src)
        assert root is not None
        step = 0
        state = {}
        for p in sorted(root.iterdir()):
            if not (p / "fp32.pt").is_file():
                continue
            missing = [k for k in KINDS if not (p / f"{k}.pt").is_file()]
            if missing:
                raise CheckpointError(f"{p}: no {missing[0]}.pt (the universal checkpoint lacks Adam state)")
            shape = model.tensor_shapes().get(_hf_name(p.name))
            data = _quiet_load(p / "fp32.pt")
            t = data["param"] if isinstance(data, dict) else data
            found[_hf_name(p.name)] = TensorInfo(str(root.resolve()), p.name, tuple(shape or t.shape), torch.float32)
            if (p / "step.pt").is_file() and not step:
                step = _step(p / "step.pt")
        if not step:  # ZeRO-3 universal folders carry no step.pt: the engine's own count
            for f in sorted(src.glob("*model_states.pt")):
                ms = _quiet_load(f)
                step = int(ms.get("global_steps", 0)) - int(ms.get("skipped_steps", 0) or 0)
                break
        files = {}
        state = {"step": step}
        if (root / UNIVERSAL_OPTIMIZER).is_file():  # ds_to_universal's param groups: betas, eps, decay
            state.update(_hparams(_quiet_load(root / UNIVERSAL_OPTIMIZER)))
    tensors = canonical(found, model, src, src)
    if kind == "deepspeed-universal":
        for info in tensors.values():
            for fname in ("fp32.pt", *(f"{k}.pt" for k in KINDS)):
                _universal_tensor(Path(info.file) / info.key / fname, info.shape)
    return Source(src, kind, model.replace(tie_word_embeddings=False), raw, tensors, files, moments=True,
                  optimizer_state=state)
