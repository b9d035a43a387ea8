"""What may change when a crashed stage is resumed (``resume=true``), and what may not.

A resume continues one stage from its own DeepSpeed checkpoint, so everything that shapes
the model, the ranks' layout or the data stream must be what the checkpoint was written
with: a change there is refused in one line before any worker starts. Schedule and
bookkeeping fields may change; each change is recorded in ``stage_config.json``
(``resume_changes``) so the stage's summary can be read with it in mind.
"""

from __future__ import annotations

from typing import Any

from flmcore.errors import FlmError
from stages.resolved import ResolvedStage
from stages.schema import MAY_CHANGE, NOT_COMPARED, fields_where, to_plain

# Fields (dotted, in stage_config.json) that a resume may change: declared with each field
# (stages.schema.setting, resume=MAY_CHANGE); everything else must match.
ALLOWED = fields_where("resume", MAY_CHANGE)
# Fields that follow from the rest, from the machine or from the attempt: not compared.
IGNORED = fields_where("resume", NOT_COMPARED) + tuple(f"resolved.{k}" for k in ResolvedStage.NOT_COMPARED)


class ResumeMismatchError(FlmError):
    """resume=true with a config the stage's checkpoint was not written with."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _covered(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def diff_for_resume(saved: Any, new: Any) -> list[str]:
    """``saved`` and ``new`` are ResolvedStages; returns the allowed changes as
    ``"field: old → new"`` lines, or raises :class:`ResumeMismatchError` naming the first
    field that may not change."""

    def fields(resolved: Any) -> dict[str, Any]:
        extras = {k: getattr(resolved, k) for k in resolved.RESOLVED_KEYS}
        return {**flatten(to_plain(resolved.config)), **flatten(extras, "resolved.")}

    a, b = fields(saved), fields(new)
    changes = []
    order = sorted(set(a) | set(b), key=lambda k: (k.startswith("resolved."), k))  # the user's fields first
    for key in order:
        if _covered(key, IGNORED) or a.get(key) == b.get(key):
            continue
        if _covered(key, ALLOWED):
            changes.append(f"{key}: {a.get(key)!r} → {b.get(key)!r}")
            continue
        if key.startswith("resolved.data."):  # keyed by dataset paths: a moved run_dir or cache
            raise ResumeMismatchError(f"resume=true: the stage's data is not where its checkpoint's was ({key}); "
                                      f"if run_dir or data.cache_dir moved, move them back (the stream is "
                                      f"keyed by the datasets' paths), or start a new stage")
        raise ResumeMismatchError(f"resume=true: field '{key}' is {b.get(key)!r} but the stage's checkpoint was "
                                  f"written with {a.get(key)!r}; set it back, or start a new stage "
                                  f"(stage.init_from={saved.stage_dir}/final after it finishes)")
    return changes
