"""Reading torch pickles that may come from outside: ``weights_only=True``, always.

A torch checkpoint is a pickle, and unpickling may call any function the file names.
Every ``torch.load`` of flm-growth — ours, and DeepSpeed's own when it reads a checkpoint
for ``grow import`` or for ``resume=true`` — goes through :func:`load`:

1. ``torch.serialization.get_unsafe_globals_in_checkpoint`` lists the globals the file
   names beyond torch's own weights-only set, *without* unpickling anything;
2. any global not in the scoped allowlist (by default :data:`DEEPSPEED_GLOBALS`: the few
   plain DeepSpeed classes its own checkpoints hold) is refused in one line naming the
   file and the global;
3. the file is then read with ``torch.load(weights_only=True)`` inside
   ``torch.serialization.safe_globals(<exactly the allowed globals found>)``.

:func:`guarded_torch_load` replaces ``torch.load`` by :func:`load` for the duration of a
``with`` block, so code we do not own (DeepSpeed's checkpoint engine, ``zero_to_fp32``)
reads the same way; the patch points are listed in ``stages/engines/ds_compat.py``.

Note: the allowlist names classes whose construction has no side effect (a loss-scaler
record, an enum, a two-int dataclass); a class is resolved (imported) only after a file
was found to name it and it is on the list. Megatron-Core keeps the same kind of list
(``megatron/core/safe_globals.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from flmcore.errors import FlmError

# The globals (beyond torch's own weights-only set) in the checkpoints DeepSpeed 0.19 writes:
# ZeRO-1/2/3 and bf16 optimizer states, model states. Verified with deepspeed 0.19.8.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafePickleError(FlmError):
    """A torch file names a global outside the allowlist; nothing in it was run."""


class UnreadableTorchFileError(FlmError):
    """A torch file that cannot be read (truncated, not a zip, not a torch file)."""


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    obj: Any = importlib.import_module(module)
    return getattr(obj, attr)


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals ``path`` names beyond torch's weights-only set (nothing is unpickled);
    [] for a file that is not a zip-format torch file (``torch.load`` then judges it)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError):
        return []


def check(path: str | os.PathLike, allowed: Iterable[str] = DEEPSPEED_GLOBALS) -> list[str]:
    """The allowed globals ``path`` names; :class:`UnsafePickleError` for any other."""
    allowed = tuple(allowed)
    found = unsafe_globals(path)
    bad = [g for g in found if g not in allowed]
    if bad:
        raise UnsafePickleError(f"{path}: refused: the pickle names the global '{bad[0]}', which is not on "
                                f"the allowlist of plain classes a checkpoint may hold; nothing in it was run")
    return found


def load(f: Any, map_location: Any = "cpu", *, mmap: bool | None = None,
         allowed: Iterable[str] = DEEPSPEED_GLOBALS, **_ignored: Any) -> Any:
    """``torch.load(f, weights_only=True)`` under the scoped allowlist (see the module doc).

    Keyword arguments of ``torch.load`` other than ``map_location`` and ``mmap`` (notably
    ``weights_only=False`` from DeepSpeed) are ignored.
    """
    found = check(f, allowed) if isinstance(f, str | os.PathLike) else []
    kwargs: dict[str, Any] = {} if mmap is None else {"mmap": mmap}
    try:
        with torch.serialization.safe_globals([_resolve(g) for g in found]):
            return _original_load(f, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:  # a legacy-format file naming a forbidden global
        what = next((line.strip() for line in str(err).splitlines() if "global" in line.lower()),
                    str(err).splitlines()[0] if str(err) else "a forbidden object")
        raise UnsafePickleError(f"{f}: refused: {what[:200]}; nothing in it was run") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableTorchFileError(f"{f}: truncated or not a torch file ({first[:160]})") from None


_original_load = torch.load


@contextlib.contextmanager
def guarded_torch_load(allowed: Iterable[str] = DEEPSPEED_GLOBALS) -> Iterator[None]:
    """Within the block, every ``torch.load`` (anyone's) is :func:`load` with ``allowed``."""
    allowed = tuple(allowed)

    def guarded(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return load(f, "cpu" if map_location is None else map_location, mmap=kwargs.get("mmap"),
                    allowed=allowed)

    previous = torch.load
    torch.load = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = previous  # type: ignore[assignment]

