"""``cryptfuse convert``: LUKS1 <-> LUKS2 in place (``cryptsetup convert``).

No passphrase is asked (cryptsetup asks none either: the keyslots are carried
over, not reopened).  The confirmation is cryptsetup's: asked on a terminal,
skipped with ``-q/--batch-mode``, and taken as yes when standard input is not
a terminal.  The work is in :mod:`cryptfuse.formats.convert`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from .cli_input import PROG
from .cli_luks import _confirm, _parser
from .formats.convert import convert

__all__ = ["CONVERT_SUBCOMMANDS", "convert_command"]


def convert_command(argv: Sequence[str]) -> int:
    """``cryptfuse convert --type luks1|luks2 CONTAINER``."""
    p = _parser(
        "convert",
        "--type luks1|luks2 [options] CONTAINER",
        "Convert a LUKS1 container to LUKS2 or back, in place.",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--type", "-M", metavar="TYPE", help="luks1 or luks2")
    args = p.parse_args(argv)

    def warn(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr)

    convert(
        args.container,
        args.type,
        header=args.header,
        confirm=_confirm(args, default=True),
        warn=warn,
    )
    if args.verbose:
        print(f"{args.container} converted to {args.type.upper()}.", file=sys.stderr)
    return 0


#: registered in :data:`cryptfuse.cli.SUBCOMMANDS`
CONVERT_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"convert": convert_command}
