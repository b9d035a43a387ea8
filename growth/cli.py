"""`grow`: the command line between two stages. Thin: parse, call the library, report.

Each subcommand lives in ``growth/commands/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``. Errors the user can fix (an :class:`flmcore.errors.FlmError`:
bad config, bad checkpoint, bad growth spec; or an ``OSError``: disk full, permissions)
print one line ``grow: error: …`` and exit 2 — no traceback.

Note: only the chosen subcommand's module is imported, and ``grow --help`` imports none
(their one-line summaries are :data:`COMMANDS`), so help never waits for torch.
"""

from __future__ import annotations

import argparse
import codecs
import importlib
import importlib.util
import logging
import os
import sys

from flmcore.errors import FlmError

# Subcommand → (module in growth/commands/, its one-line summary in `grow --help`); a test
# checks each summary equals its module's own. A new subcommand adds one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "show a flavor's, config's or checkpoint's shape, size and history"),
    "init": ("init", "write a randomly initialised checkpoint (stage-1 start, test inputs)"),
    "plan": ("plan", "show the per-tensor growth plan, bytes, peak memory and time (no weights read)"),
    "apply": ("apply", "grow a checkpoint into a bigger config (streaming, resumable)"),
    "verify": ("verify", "compare a source and a grown checkpoint's logits and loss"),
    "inspect": ("inspect", "config, shards, growth history, mask state and per-tensor statistics"),
    "export-hf": ("export_hf", "write an HF checkpoint: plain Llama (μP folded) or Tele-FLM (μP kept)"),
    "import": ("import_", "convert a pickle release / HF / DeepSpeed checkpoint to the canonical layout"),
}


# How the text we print reads on a terminal that cannot show it (LC_ALL=C, PYTHONIOENCODING=ascii).
ASCII_FALLBACK = {"μ": "mu", "×": "x", "→": "->", "≈": "~", "…": "...", "Δ": "d", "≤": "<=", "≥": ">=",
                  "±": "+-", "·": "*", "—": "-", "–": "-", "²": "^2", "⁹": "^9", "⁶": "^6", "√": "sqrt"}


def _ascii_fallback(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    text = err.object[err.start:err.end]
    return "".join(ASCII_FALLBACK.get(ch, "?") for ch in text), err.end


codecs.register_error("flm-ascii", _ascii_fallback)


def readable_streams() -> None:
    """Let stdout/stderr fall back to ASCII spellings (μ → mu, × → x, → → ->) instead of
    raising UnicodeEncodeError when their encoding cannot show a character."""
    for stream in (sys.stdout, sys.stderr):
        try:
            "μ×→≈…".encode(stream.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="flm-ascii")


class _StderrHandler(logging.Handler):
    """``grow: warning: …`` on whatever ``sys.stderr`` is when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"grow: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def log_to_stderr() -> None:
    """Library warnings (``logging``) as one ``grow: warning: …`` line each on stderr."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler(logging.WARNING))


class UserError(FlmError):
    """Any other error with a one-line message meant for the user."""


def _module_name(command: str) -> str:
    return f"growth.commands.{COMMANDS[command][0]}"


def available_commands() -> dict[str, str]:
    """Command → summary for the COMMANDS whose module exists (found without importing it)."""
    return {c: summary for c, (_, summary) in COMMANDS.items()
            if importlib.util.find_spec(_module_name(c)) is not None}


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="grow",
        description="Plan, apply, verify and inspect function-preserving growth of Tele-FLM / "
                    "Llama checkpoints (HF-named sharded safetensors).",
        epilog="`grow COMMAND -h` explains each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, sub


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``grow`` parser: with ``command``, that subcommand's full parser (its module is
    imported); without, every subcommand as a summary line only (nothing imported)."""
    parser, sub = _top_parser()
    commands = available_commands()
    for name, summary in commands.items():
        if name == command:
            module = importlib.import_module(_module_name(name))
            module.add_parser(sub).set_defaults(_run=module.run)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    readable_streams()
    log_to_stderr()
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `grow plan ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FlmError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"grow: error: {message}", file=sys.stderr)
        return err.exit_code if isinstance(err, FlmError) else 2
    except KeyboardInterrupt:
        print("grow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
