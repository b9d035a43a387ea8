"""A checkpoint's growth history (``growth.json`` events) as one readable line per event.

Shared by ``grow info`` and ``grow inspect``::

    0. 2026-12-01T09:00:00+00:00 init: seed=0, config=tiny-s1, float32
    1. 2026-12-01T09:05:00+00:00 train tiny_s1: 300 steps, 1.97M tokens, eval loss 4.3512
    2. 2026-12-01T09:06:00+00:00 grow 64h×2L → 80h×3L, zero, exact, with Adam state

A field of the wrong type is a one-line :class:`HistoryError` naming the event and field
(the file is user input), never a traceback. Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flmcore.errors import FlmError

_MISSING = object()
DIMENSIONS = ("hidden", "ffn", "heads", "depth")


class HistoryError(FlmError):
    """A growth.json event whose fields cannot be read; the message names the field."""


class _Event:
    def __init__(self, event: Any, index: int, source: str):
        self.where = f"{source}: growth.json event {index}"
        if not isinstance(event, dict):
            raise HistoryError(f"{self.where} must be an object, got {_short(event)}")
        self.event = event
        self.where += f" ({_short(event.get('kind', '?'), 20)})"

    def get(self, key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        value = self.event.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise HistoryError(f"{self.where}: field '{key}' is missing")
            return default
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            value = _MISSING
        if value is _MISSING or not isinstance(value, types):
            raise HistoryError(f"{self.where}: field '{key}' has the wrong type "
                               f"({_short(self.event.get(key))})")
        return value

    def shape(self, key: str) -> str:
        config = self.get(key, dict)
        parts = []
        for field, unit in (("hidden_size", "h"), ("num_hidden_layers", "L")):
            value = config.get(field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise HistoryError(f"{self.where}: field '{key}.{field}' must be an integer, "
                                   f"got {_short(value)}")
            parts.append(f"{value}{unit}")
        return "×".join(parts)


def _grow(e: _Event) -> str:
    spec = e.get("spec", dict)
    strategies = [spec.get(d) for d in DIMENSIONS]
    if not all(isinstance(s, str) for s in strategies):
        raise HistoryError(f"{e.where}: field 'spec' needs strings for {', '.join(DIMENSIONS)}")
    strategy = strategies[0] if len(set(strategies)) == 1 else \
        "/".join(strategies) + " (hidden/ffn/heads/depth)"
    parts = [f"grow {e.shape('from_config')} → {e.shape('config')}", strategy,
             "exact" if e.get("exact", bool) else "NOT exact"]
    if e.get("config", dict).get("growth_mask"):
        parts.append("MSG masks")
    moments = e.get("optimizer_state", bool, None)
    if moments is not None:
        parts.append("with Adam state" if moments else "weights only")
    return ", ".join(parts)


def _init(e: _Event) -> str:
    seed, config = e.get("seed", int, "?"), e.get("config", str, "?")
    dtype = e.get("dtype", str, None)
    return f"init: seed={seed}, config={config}" + (f", {dtype}" if dtype else "")


def _train(e: _Event) -> str:
    parts = [f"{e.get('steps', int):,} steps"]
    tokens = e.get("tokens", int, None)
    if tokens is not None:
        parts.append(f"{_count(tokens)} tokens")
    loss = e.get("eval_loss_end", (int, float), None)
    if loss is not None:
        parts.append(f"eval loss {loss:.4f}")
    return f"train {e.get('stage', str, '?')}: " + ", ".join(parts)


def _export(e: _Event) -> str:
    dtype = e.get("dtype", str, None)
    return f"{e.get('kind', str)}: {e.get('format', str, '?')}" + (f", {dtype}" if dtype else "")


def _other(e: _Event) -> str:
    rest = {k: v for k, v in e.event.items() if k not in ("kind", "time")}
    return f"{_short(e.event.get('kind', '?'), 30)}: " + ", ".join(f"{k}={_short(v)}" for k, v in rest.items())


FORMATS: dict[str, Callable[[_Event], str]] = {"grow": _grow, "init": _init, "train": _train,
                                               "export-hf": _export}


def event_line(event: Any, index: int, source: str = "checkpoint") -> str:
    """``"{index}. {time} {what happened}"`` for one growth.json event."""
    e = _Event(event, index, source)
    kind = event.get("kind")
    line = FORMATS.get(kind, _other)(e) if isinstance(kind, str) else _other(e)
    return f"{index}. {_short(event.get('time', '?'), 40)} {line}"


def history_lines(history: Any, source: str = "checkpoint") -> list[str]:
    events = history.get("events", []) if isinstance(history, dict) else None
    if not isinstance(events, list):
        raise HistoryError(f"{source}: growth.json needs an 'events' list")
    return [event_line(e, i, source) for i, e in enumerate(events)]


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
