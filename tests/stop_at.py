"""Test-only seam: run the `circuitlab` command line, but freeze the process (SIGSTOP) at a chosen point so a test
can kill it there. Production code carries no sleep hook for this: the seam wraps one of its functions.

    python tests/stop_at.py stage NAME -- ARGS...   stop right after stage NAME is saved (`StageCache.save`)
    python tests/stop_at.py cells N -- ARGS...      stop right after a sweep records its N-th cell (`_write_cell`)
"""

import os
import signal
import sys

from circuitlab.reports import cli, grid, save


def _stop() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not exited: locks stay held and nothing more is written


def main(argv: list[str]) -> int:
    kind, value, separator, *args = argv
    assert separator == "--", argv
    if kind == "stage":
        original_save = save.StageCache.save

        def save_then_stop(self, stage, *rest, **kwargs):
            original_save(self, stage, *rest, **kwargs)
            if stage == value:
                _stop()

        save.StageCache.save = save_then_stop
    elif kind == "cells":
        original_write, written = grid._write_cell, []

        def write_then_stop(*rest, **kwargs):
            original_write(*rest, **kwargs)
            written.append(1)
            if len(written) == int(value):
                _stop()

        grid._write_cell = write_then_stop
    else:
        raise SystemExit(f"unknown stop point {kind!r}: use 'stage' or 'cells'")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
