"""The one error base class of flm-growth.

Every error a user can act on (bad config field, unusable file, refused growth, a stage that
cannot start) derives from :class:`FlmError`. Entry points (``grow``, ``train-stage``,
``prepare-data``, the workers) catch ``FlmError`` alone, print ``str(err)`` as one line and
exit with :attr:`FlmError.exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlmError(Exception):
    """A one-line, user-facing error: the message names the file/field and what to do."""

    exit_code = 2
