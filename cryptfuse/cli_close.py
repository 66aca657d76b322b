"""``cryptfuse close MOUNTPOINT|DIR`` (cryptsetup ``close``): undo a mount completely.

Unmounts the ``--mount-fs`` filesystem (and its loop device or fuse2fs), flushes and
unmounts the volume, and returns 0 only once the daemon has exited, i.e. the container
is synced and closed.  Busy (a loop device or process of the user holds the volume or
the filesystem): says by what and exits 5, changing nothing; ``--deferred`` detaches
instead and the container closes when the last user lets go.  See :mod:`mountfs`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli_input import PROG, _Parser
from .mountfs import close

__all__ = ["CLOSE_SUBCOMMANDS", "build_close_parser", "close_command"]


def build_close_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} close",
        add_help=False,
        allow_abbrev=False,
        description=(
            "Close a mounted container: unmount its --mount-fs filesystem and loop device, "
            "flush and unmount the volume, and wait until the daemon has closed the "
            "container. Exit 5 (busy) when something else still uses it."
        ),
    )
    p.add_argument(
        "path", metavar="MOUNTPOINT", help="the volume's mountpoint, or its --mount-fs DIR"
    )
    p.add_argument(
        "--deferred",
        action="store_true",
        help="if in use, detach now and close when the last user lets go",
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    return p


def close_command(argv: Sequence[str]) -> int:
    """``cryptfuse close [--deferred] MOUNTPOINT``."""
    args = build_close_parser().parse_args(argv)
    note = close(args.path, deferred=args.deferred)
    if note is not None:
        print(f"{PROG}: {note}", file=sys.stderr)
    return 0


CLOSE_SUBCOMMANDS = {"close": close_command}
