"""`grow`: the command line between two stages. Thin: parse, call the library, report.

Each subcommand lives in ``growth/commands/<name>.py`` with ``add_parser(subparsers)``
and ``run(args) -> int``. Errors the user can fix (bad config, bad checkpoint, bad
growth spec, disk full) print one line ``grow: error: …`` and exit 2 — no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flmcore.errors import FlmError
from growth.checkpoint import CheckpointError
from growth.config import ConfigError

COMMANDS = ["info", "init", "plan", "apply", "verify", "inspect", "export_hf"]


class UserError(FlmError):
    """Any other error with a one-line message meant for the user."""


def user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CheckpointError, ConfigError, UserError, OSError]
    try:
        from operators import GrowthError
        errors.append(GrowthError)
    except ImportError:  # operators not installed yet
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grow",
        description="Plan, apply, verify and inspect function-preserving growth of Tele-FLM / "
                    "Llama checkpoints (HF-named sharded safetensors).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"growth.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"growth.commands.{name}":
                continue  # not built yet
            raise
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `grow plan ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except user_errors() as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"grow: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
