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
  (full shape for ZeRO-1/2, flat for ZeRO-3, reshaped here); read with
  ``torch.load(weights_only=True)``.

Parameter names must be the HF Llama names of the module (a ``module.`` prefix is
dropped); the model config comes from ``--config`` or a config.json in the folder or its
parents. The Adam step is the optimizer's own (``state[...]["step"]``), or ``step.pt``.

Note: a ZeRO checkpoint's files hold DeepSpeed objects (loss scaler, enums, configs), so
they are read the way DeepSpeed itself reads them, ``torch.load(weights_only=False)``:
unpickling runs code named in the file. Import only DeepSpeed checkpoints you trust; the
HF pickle path (:mod:`growth.importer`) never does this.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from growth.checkpoint import CheckpointError
from growth.config import CONFIG_NAME, ConfigError, ModelConfig, resolve_config
from growth.import_source import Source, TensorInfo, canonical

log = logging.getLogger(__name__)

KINDS = ("exp_avg", "exp_avg_sq")


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


def _quiet_load(path: Path, **kwargs: Any) -> Any:
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
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


def _read_zero(tag: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    from deepspeed.utils import zero_to_fp32 as z

    optim_files = sorted(tag.glob("*_optim_states.pt"))
    if not optim_files:
        raise CheckpointError(f"{tag}: no *_optim_states.pt files (a ZeRO checkpoint saved with its "
                              f"optimizer is needed)")
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # zero_to_fp32 prints progress
        try:
            weights = z.get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
            model_states = z.parse_model_states(z.get_model_state_files(str(tag)))
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{tag}: DeepSpeed cannot consolidate it ({str(err).splitlines()[0]})") from None
        optim = [_quiet_load(f, weights_only=False, mmap=True)["optimizer_state_dict"]
                 for f in z.get_optim_files(str(tag))]
        stage = int(optim[0]["zero_stage"])
        world = optim[0]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        inner = [o.get("base_optimizer_state") or o.get("optimizer_state_dict") for o in optim]
        groups = len(inner[0]["state"])
        moments: dict[str, dict[str, Any]] = {}
        group0 = inner[0]["param_groups"][0] if inner[0].get("param_groups") else {}
        state = {"step": int(inner[0]["state"][0]["step"]) if groups else 0}
        if "betas" in group0:
            state.update(betas=[float(b) for b in group0["betas"]], eps=float(group0.get("eps", 1e-8)),
                         weight_decay=float(group0.get("weight_decay", 0.0)))
        for kind in KINDS:
            flats = [[s["state"][g][kind] for g in range(groups)] for s in inner]
            merged: dict[str, Any] = {}
            if stage <= 2:
                z._zero2_merge_trainable_params(merged, world, flats, model_states,
                                                optim[0].get("param_alignment_paddings"))
            else:
                z._zero3_merge_trainable_params(merged, world, flats, model_states)
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
        data = _quiet_load(self.root / info.key / fname, weights_only=True)
        t = data["param"] if isinstance(data, dict) else data
        if t.numel() != torch.Size(info.shape).numel():
            raise CheckpointError(f"{self.root / info.key / fname}: holds {t.numel()} values, "
                                  f"config.json implies {list(info.shape)}")
        return t.float().reshape(info.shape).clone()


def open_source(src: Path, kind: str, config: str | None) -> Any:
    model, raw = find_config(src, config)
    found: dict[str, TensorInfo] = {}
    if kind == "deepspeed-zero":
        tag = _tag_dir(src)
        assert tag is not None
        weights, _, state = _zero_states(tag)
        for key, t in weights.items():
            found[_hf_name(key)] = TensorInfo(str(tag), key, tuple(t.shape), torch.float32)
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
            data = _quiet_load(p / "fp32.pt", weights_only=True)
            t = data["param"] if isinstance(data, dict) else data
            found[_hf_name(p.name)] = TensorInfo(str(root), p.name, tuple(shape or t.shape), torch.float32)
            if (p / "step.pt").is_file() and not step:
                s = _quiet_load(p / "step.pt", weights_only=True)
                step = int(s.item() if isinstance(s, torch.Tensor) else s)
        if not step:  # ZeRO-3 universal folders carry no step.pt: the engine's own count
            for f in sorted(src.glob("*model_states.pt")):
                ms = _quiet_load(f, weights_only=False)
                step = int(ms.get("global_steps", 0)) - int(ms.get("skipped_steps", 0) or 0)
                break
        files = {}
        state = {"step": step}
    tensors = canonical(found, model, src, src)
    if kind == "deepspeed-universal":
        for info in tensors.values():
            data = _quiet_load(Path(info.file) / info.key / "fp32.pt", weights_only=True)
            t = data["param"] if isinstance(data, dict) else data
            if t.numel() != torch.Size(info.shape).numel():
                raise CheckpointError(f"{Path(info.file) / info.key / 'fp32.pt'}: holds {t.numel()} values, "
                                      f"config.json implies {list(info.shape)}")
    return Source(src, kind, model.replace(tie_word_embeddings=False), raw, tensors, files, moments=True,
                  optimizer_state=state)
