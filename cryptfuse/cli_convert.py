"""``cryptfuse convert``: LUKS1 <-> LUKS2 in place (``cryptsetup convert``), and
plain dm-crypt -> LUKS2 with a new detached header (``--from-plain``).

LUKS1 <-> LUKS2: no passphrase is asked (cryptsetup asks none either: the
keyslots are carried over, not reopened).  The confirmation is cryptsetup's:
asked on a terminal, skipped with ``-q/--batch-mode``, and taken as yes when
standard input is not a terminal.  The work is in
:mod:`cryptfuse.formats.convert`.

``--from-plain``: the plain options and the secret are read exactly as the
mount command reads them with ``--type plain`` (same defaults, same warning);
the new passphrase is asked twice on a terminal, read from ``--new-keyfile``,
or taken from the next line of piped standard input.  The container is only
read; the work is in :mod:`cryptfuse.formats.plain_convert`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .cli_input import PROG, _count32, _nonneg_int, plain_secret, plain_spec_warnings
from .cli_luks import _confirm, _new_secret, _parser, _progress
from .errors import UsageError
from .formats import OpenOptions
from .formats.convert import convert
from .formats.manage import KdfOptions
from .formats.plain_convert import check_plain_to_luks2, plain_to_luks2, reencryption_room

__all__ = ["CONVERT_SUBCOMMANDS", "convert_command"]

#: the plain-mode options (argparse dest -> option name) that only --from-plain takes
_PLAIN_OPTIONS = {
    "cipher": "--cipher",
    "key_size": "--key-size",
    "hash": "--hash",
    "offset": "--offset",
    "skip": "--skip",
    "size": "--size",
    "sector_size": "--sector-size",
    "iv_large_sectors": "--iv-large-sectors",
    "key_file": "--key-file",
    "keyfile_offset": "--keyfile-offset",
    "keyfile_size": "--keyfile-size",
    "new_keyfile": "--new-keyfile",
    "new_keyfile_offset": "--new-keyfile-offset",
    "new_keyfile_size": "--new-keyfile-size",
    "pbkdf": "--pbkdf",
    "iter_time": "--iter-time",
    "pbkdf_memory": "--pbkdf-memory",
    "pbkdf_parallel": "--pbkdf-parallel",
    "pbkdf_force_iterations": "--pbkdf-force-iterations",
}


def _plain_options(p: argparse.ArgumentParser) -> None:
    """The mount command's plain-mode options (cli.build_parser), same names and defaults."""
    nonneg = _nonneg_int
    g = p.add_argument_group(
        "--from-plain: the plain container (cryptsetup 2.6 defaults: "
        "aes-cbc-essiv:sha256, 256 bits, ripemd160)"
    )
    g.add_argument("--from-plain", action="store_true", help="CONTAINER is plain dm-crypt")
    g.add_argument("--cipher", "-c", metavar="SPEC", help="cipher spec, e.g. aes-cbc-plain")
    g.add_argument("--key-size", "-s", type=nonneg, metavar="BITS", help="key size in bits")
    g.add_argument("--hash", "-h", metavar="HASH", help="passphrase hash (e.g. sha256, plain)")
    g.add_argument("--offset", type=nonneg, default=0, metavar="SECTORS", help="data start")
    g.add_argument("--skip", "-p", type=nonneg, default=0, metavar="SECTORS", help="IV offset")
    g.add_argument("--size", "-b", type=nonneg, metavar="SECTORS", help="volume size")
    g.add_argument("--sector-size", type=nonneg, metavar="BYTES", help="encryption sector size")
    g.add_argument("--iv-large-sectors", action="store_true", help="refused above 512 bytes")
    g.add_argument(
        "--key-file", "-d", metavar="FILE", help="raw plain key ('-': passphrase on stdin)"
    )
    g.add_argument("--keyfile-offset", type=nonneg, default=0, metavar="BYTES")
    g.add_argument("--keyfile-size", "-l", type=nonneg, metavar="BYTES")
    g = p.add_argument_group("--from-plain: the new keyslot (cryptsetup 2.6 LUKS2 defaults)")
    g.add_argument("--new-keyfile", metavar="FILE", help="the new passphrase, verbatim")
    g.add_argument("--new-keyfile-offset", type=nonneg, default=0, metavar="BYTES")
    g.add_argument("--new-keyfile-size", type=nonneg, metavar="BYTES")
    g.add_argument("--pbkdf", choices=("pbkdf2", "argon2i", "argon2id"), help="default argon2id")
    g.add_argument("--iter-time", "-i", type=nonneg, metavar="MS", help="default 2000")
    g.add_argument("--pbkdf-memory", type=nonneg, metavar="KiB")
    g.add_argument("--pbkdf-parallel", type=nonneg, metavar="N")
    g.add_argument("--pbkdf-force-iterations", type=_count32, metavar="N")


def _given(args: argparse.Namespace) -> list[str]:
    defaults = {"offset": 0, "skip": 0, "keyfile_offset": 0, "new_keyfile_offset": 0}
    return [
        option
        for dest, option in _PLAIN_OPTIONS.items()
        if getattr(args, dest) not in (None, False, defaults.get(dest))
    ]


def _from_plain(args: argparse.Namespace) -> int:
    if args.type != "luks2":
        raise UsageError(
            "--from-plain converts to LUKS2 only (LUKS1 cannot express --skip or a sector "
            "size): use --type luks2."
        )
    if args.header is None:
        raise UsageError(
            "--from-plain needs --header NEWHDR, the new detached LUKS2 header file "
            "(the container itself is not written)."
        )
    options = OpenOptions(
        type="plain",
        readonly=True,
        cipher=args.cipher,
        key_size=args.key_size,
        hash=args.hash,
        offset=args.offset,
        skip=args.skip,
        size=args.size,
        sector_size=args.sector_size,
        iv_large_sectors=args.iv_large_sectors,
    )
    # Every refusal before a passphrase prompt.
    plan = check_plain_to_luks2(args.container, args.header, options)
    for line in plain_spec_warnings(args):
        print(f"{PROG}: {line}", file=sys.stderr)
    if not reencryption_room(plan):
        print(
            f"{PROG}: WARNING: the data starts at --offset {args.offset}, so the keyslots area "
            f"({plan.keyslots_size} bytes, below it) has no room for a reencryption's new "
            "keyslot and resilience area: the header will open, but reencrypt will refuse.",
            file=sys.stderr,
        )
    secret = plain_secret(args, plan.key_bits // 8)
    new = _new_secret(
        args.new_keyfile,
        args.new_keyfile_offset,
        args.new_keyfile_size,
        f"Enter new passphrase for {args.header}: ",
    )
    kdf = KdfOptions(
        pbkdf=args.pbkdf,
        iter_time=args.iter_time,
        memory_kib=args.pbkdf_memory,
        parallel=args.pbkdf_parallel,
        force_iterations=args.pbkdf_force_iterations,
    )
    uuid = plain_to_luks2(
        args.container, args.header, options, secret, new, kdf=kdf, progress=_progress()
    )
    if args.verbose:
        print(
            f"{args.header}: LUKS2 header (UUID {uuid}) for the plain container "
            f"{args.container} ({plan.spec}, {plan.key_bits} bits, same volume key).",
            file=sys.stderr,
        )
    return 0


def convert_command(argv: Sequence[str]) -> int:
    """``cryptfuse convert --type luks1|luks2 CONTAINER``, or
    ``cryptfuse convert --type luks2 --from-plain --header NEWHDR [plain options] CONTAINER``."""
    p = _parser(
        "convert",
        "--type luks1|luks2 [options] CONTAINER\n"
        f"       {PROG} convert --type luks2 --from-plain --header NEWHDR "
        "[plain options] CONTAINER",
        "Convert a LUKS1 container to LUKS2 or back, in place; or write a new detached "
        "LUKS2 header for a plain dm-crypt container, with the same volume key "
        "(then 'cryptfuse reencrypt --header NEWHDR' changes key and cipher).",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--type", "-M", metavar="TYPE", help="luks1 or luks2")
    _plain_options(p)
    args = p.parse_args(argv)
    if args.from_plain:
        return _from_plain(args)
    given = _given(args)
    if given:
        raise UsageError(f"{', '.join(given)}: only with --from-plain.")

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
