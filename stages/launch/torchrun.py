"""``torchrun`` without its failure report: ``python -m stages.launch.torchrun <torchrun args>``.

torch.distributed.run's ``main`` prints a traceback and a "Root Cause" table of every
failed rank when a rank exits non-zero — 25 to 130 lines on top of the rank's own one-line
error (``stages.rank.worker``). This runs the same launcher (``torch.distributed.run.run``) and,
when ranks fail, exits with the first failed rank's exit code and nothing else; the ranks'
own output (one line for a user error, a full traceback for a bug) is untouched.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return next((c for c in codes if c > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
