"""The one error class of ``stages.data``."""

from __future__ import annotations

from flmcore.errors import FlmError


class DataError(FlmError, ValueError):
    """The corpus, dataset or tokenizer cannot be used; the one-line message names the file or field."""
