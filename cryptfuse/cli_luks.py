"""The LUKS management subcommands: ``cryptfuse format``, ``add-key``, ``dump``, ...

Options and prompts are cryptsetup's (``luksFormat``, ``luksAddKey``,
``luksRemoveKey``, ``luksChangeKey``, ``luksKillSlot``, ``luksDump``,
``luksHeaderBackup``, ``luksHeaderRestore``, ``luksUUID``, ``isLuks``).
Secrets are read like the mount command reads them (:mod:`cryptfuse.cli`'s
helpers): a terminal prompt without echo, ``--key-file FILE`` or ``-`` taken
verbatim, or one line of piped standard input with its newline stripped.
The work itself is in :mod:`cryptfuse.formats.manage`.

:mod:`cryptfuse.cli` imports this module to register the subcommands, so the
helpers of ``cli`` are imported inside the functions (a module-level import
would be circular).
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from collections.abc import Callable, Sequence

from .cli_input import PROG, _count32, _nonneg_int, _Parser, read_key_file, read_passphrase_line
from .errors import KeyFileError, UsageError
from .formats import manage
from .formats.manage import FormatOptions, KdfOptions
from .spec import default_key_bits

__all__ = ["LUKS_SUBCOMMANDS"]


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    power = " KMGT".index(match.group(2).upper() or " ")
    value = int(match.group(1)) * (1 << (10 * power))
    if value >= 1 << 63:
        raise argparse.ArgumentTypeError(f"{text} is too large")
    return value


def _parser(name: str, usage: str, description: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = _Parser(
        prog=f"{PROG} {name}",
        usage=f"{PROG} {name} {usage}",
        description=description,
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--header", metavar="FILE", help="detached LUKS header file")
    p.add_argument(
        "--batch-mode", "-q", dest="batch", action="store_true", help="do not ask for confirmation"
    )
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("--verbose", "-v", action="store_true", help="say more")
    p.add_argument("--help", action="help", help="show this help and exit")
    return p


def _key_options(p: argparse.ArgumentParser, slot: bool = True) -> None:
    nonneg = _nonneg_int
    p.add_argument(
        "--key-file",
        "-d",
        metavar="FILE",
        help="read the passphrase from FILE ('-' = stdin), verbatim",
    )
    p.add_argument("--keyfile-offset", type=nonneg, default=0, metavar="BYTES")
    p.add_argument("--keyfile-size", "-l", type=nonneg, metavar="BYTES")
    if slot:
        p.add_argument("--key-slot", "-S", type=nonneg, metavar="N", help="keyslot number")


def _kdf_options(p: argparse.ArgumentParser) -> None:
    nonneg = _nonneg_int
    g = p.add_argument_group("key derivation (cryptsetup 2.6 defaults)")
    g.add_argument(
        "--pbkdf", choices=("pbkdf2", "argon2i", "argon2id"), help="LUKS2: argon2id; LUKS1: pbkdf2"
    )
    g.add_argument(
        "--hash", "-h", metavar="HASH", help="hash for PBKDF2 and the AF split (default sha256)"
    )
    g.add_argument(
        "--iter-time", "-i", type=nonneg, metavar="MS", help="KDF time to aim at (default 2000)"
    )
    g.add_argument(
        "--pbkdf-memory",
        type=nonneg,
        metavar="KiB",
        help="Argon2 memory (maximum when benchmarked)",
    )
    g.add_argument(
        "--pbkdf-parallel", type=nonneg, metavar="N", help="Argon2 threads (default min(4, CPUs))"
    )
    g.add_argument(
        "--pbkdf-force-iterations", type=_count32, metavar="N", help="fixed cost, no benchmark"
    )
    g.add_argument("--keyslot-cipher", metavar="SPEC", help="LUKS2: the new keyslot's area cipher")
    g.add_argument("--keyslot-key-size", type=nonneg, metavar="BITS", help="with --keyslot-cipher")
    g.add_argument("--new-keyfile-offset", type=nonneg, default=0, metavar="BYTES")
    g.add_argument("--new-keyfile-size", type=nonneg, metavar="BYTES")


def _kdf(args: argparse.Namespace) -> KdfOptions:
    return KdfOptions(
        pbkdf=args.pbkdf,
        hash=args.hash,
        iter_time=args.iter_time,
        memory_kib=args.pbkdf_memory,
        parallel=args.pbkdf_parallel,
        force_iterations=args.pbkdf_force_iterations,
        keyslot_cipher=args.keyslot_cipher,
        keyslot_key_bits=args.keyslot_key_size,
    )


def _prompt(text: str) -> bytes:
    try:
        return getpass.getpass(text).encode()
    except EOFError:
        raise KeyFileError("no passphrase entered") from None


def _existing_secret(args: argparse.Namespace, prompt: str) -> bytes:
    """The passphrase of an existing keyslot: --key-file, terminal, or a piped line."""
    if args.key_file is not None:
        data: bytes = read_key_file(args.key_file, args.keyfile_offset, args.keyfile_size)
        return data
    if sys.stdin.isatty():
        text = _prompt(prompt)[args.keyfile_offset :]
        return text if args.keyfile_size is None else text[: args.keyfile_size]
    line: bytes = read_passphrase_line(sys.stdin.buffer, args.keyfile_offset, args.keyfile_size)
    return line


def _new_secret(key_file: str | None, offset: int, size: int | None, prompt: str) -> bytes:
    """A new passphrase: a key file, twice on a terminal, or a piped line."""
    if key_file is not None:
        data: bytes = read_key_file(key_file, offset, size)
        return data
    if sys.stdin.isatty():
        first = _prompt(prompt)
        if _prompt("Verify passphrase: ") != first:
            raise UsageError("Passphrases do not match.")
        first = first[offset:]
        return first if size is None else first[:size]
    line: bytes = read_passphrase_line(sys.stdin.buffer, offset, size)
    return line


def _ask_yes(message: str) -> bool:
    print(message, file=sys.stderr)
    try:
        answer = input("Are you sure? (Type 'yes' in capital letters): ")
    except EOFError:
        return False
    return answer.strip() == "YES"


def _confirm(args: argparse.Namespace, *, default: bool = False) -> manage.Confirm:
    """Batch mode: yes.  Terminal: ask for YES.  Otherwise *default*."""

    def confirm(message: str) -> bool:
        if args.batch or getattr(args, "force", False):
            # (cryptsetup's batch mode says nothing; the last keyslot's loss is told)
            if message.startswith(manage.LAST_SLOT_WARNING[:20]):
                print(f"{PROG}: {message}", file=sys.stderr)
            return True
        if sys.stdin.isatty():
            return _ask_yes(message)
        return default

    return confirm


def _progress() -> Callable[[str, float], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(what: str, fraction: float) -> None:
        end = "\n" if fraction >= 1.0 else ""
        print(f"\r\033[K{what}… {fraction * 100:3.0f}%", end=end, file=sys.stderr, flush=True)

    return show


def _volume_key_option(p: argparse._ActionsContainer, what: str) -> None:
    """cryptsetup's ``--volume-key-file`` (alias ``--master-key-file``); *what* it does
    in this command."""
    p.add_argument("--volume-key-file", "--master-key-file", metavar="FILE", help=what)


# -- commands ---------------------------------------------------------------------------------


def format_command(argv: Sequence[str]) -> int:
    """``cryptfuse format CONTAINER [KEY_FILE]`` (``cryptsetup luksFormat``)."""
    nonneg = _nonneg_int
    p = _parser("format", "[options] CONTAINER [KEY_FILE]", "Create a LUKS1 or LUKS2 container.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument(
        "new_key_file", nargs="?", metavar="KEY_FILE", help="passphrase file (like --key-file)"
    )
    _key_options(p)
    _kdf_options(p)
    g = p.add_argument_group("format")
    g.add_argument("--type", "-M", default="luks2", choices=("luks", "luks1", "luks2"))
    g.add_argument("--cipher", "-c", default=manage.DEFAULT_CIPHER, metavar="SPEC")
    g.add_argument(
        "--key-size",
        "-s",
        type=nonneg,
        metavar="BITS",
        help="default: 512 for an xts- mode, else 256 (cryptsetup's)",
    )
    g.add_argument("--sector-size", type=nonneg, metavar="BYTES")
    g.add_argument("--label", default="", help="LUKS2 label")
    g.add_argument("--subsystem", default="", help="LUKS2 subsystem")
    g.add_argument("--uuid", help="use this UUID")
    g.add_argument(
        "--offset", type=nonneg, metavar="SECTORS", help="data offset in 512-byte sectors"
    )
    g.add_argument(
        "--align-payload",
        type=nonneg,
        metavar="SECTORS",
        help="round the data offset up to a multiple of SECTORS (512-byte) instead of 1 MiB; "
        "with --header, the data offset",
    )
    _volume_key_option(p, "use the volume key in FILE (--key-size bits of it), not a random one")
    g.add_argument("--luks2-metadata-size", type=_size, metavar="BYTES")
    g.add_argument("--luks2-keyslots-size", type=_size, metavar="BYTES")
    g.add_argument(
        "--size",
        type=_size,
        metavar="BYTES",
        help="create CONTAINER with this size (K/M/G suffixes)",
    )
    g.add_argument(
        "--force", action="store_true", help="overwrite an existing LUKS header without asking"
    )
    g.add_argument("--wipe", action="store_true", help="write encrypted zeros over the data area")
    args = p.parse_args(argv)
    opts = FormatOptions(
        type=args.type,
        cipher=args.cipher,
        key_size=args.key_size or default_key_bits(args.cipher),
        hash=args.hash or manage.DEFAULT_HASH,
        sector_size=args.sector_size,
        kdf=_kdf(args),
        label=args.label,
        subsystem=args.subsystem,
        uuid=args.uuid,
        header=args.header,
        offset=args.offset,
        align_payload=args.align_payload,
        volume_key_file=args.volume_key_file,
        metadata_size=args.luks2_metadata_size,
        keyslots_size=args.luks2_keyslots_size,
        key_slot=args.key_slot,
        size=args.size,
        wipe=args.wipe,
    )
    key_file = args.new_key_file if args.new_key_file is not None else args.key_file
    passphrase = _new_secret(
        key_file, args.keyfile_offset, args.keyfile_size, f"Enter passphrase for {args.container}: "
    )
    uuid = manage.format_container(
        args.container,
        passphrase,
        opts,
        confirm=_confirm(args),
        confirm_format=_confirm(args, default=True),
        progress=_progress(),
    )
    if args.verbose:
        print(f"Formatted {args.container} ({opts.type}), UUID {uuid}.", file=sys.stderr)
    return 0


def add_key_command(argv: Sequence[str]) -> int:
    """``cryptfuse add-key CONTAINER [NEW_KEY_FILE]`` (``cryptsetup luksAddKey``)."""
    p = _parser(
        "add-key", "[options] CONTAINER [NEW_KEY_FILE]", "Add a passphrase in a new keyslot."
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("new_key_file", nargs="?", metavar="NEW_KEY_FILE")
    _key_options(p)
    p.add_argument(
        "--new-keyfile", metavar="FILE", help="the new passphrase's file (as NEW_KEY_FILE)"
    )
    p.add_argument(
        "--new-key-slot",
        type=_nonneg_int,
        metavar="N",
        help="the new keyslot (--key-slot then names the one that unlocks)",
    )
    _volume_key_option(p, "unlock with the volume key in FILE instead of a passphrase")
    p.add_argument(
        "--unbound",
        action="store_true",
        help="LUKS2: a keyslot bound to no segment, for a key of its own (--key-size bits; "
        "random, or --volume-key-file)",
    )
    p.add_argument("--key-size", "-s", type=_nonneg_int, metavar="BITS", help="with --unbound")
    _kdf_options(p)
    args = p.parse_args(argv)
    if args.unbound and not args.key_size:
        raise UsageError("Key size is required with --unbound option.")
    # cryptsetup 2.6: --key-slot is the new keyslot, unless --new-key-slot names it
    new_slot, unlocking = args.key_slot, None
    if args.new_key_slot is not None:
        new_slot, unlocking = args.new_key_slot, args.key_slot
    existing = b""
    if args.volume_key_file is None and not args.unbound:
        existing = _existing_secret(args, "Enter any existing passphrase: ")
    new = _new_secret(
        args.new_key_file if args.new_key_file is not None else args.new_keyfile,
        args.new_keyfile_offset,
        args.new_keyfile_size,
        "Enter new passphrase for key slot: ",
    )
    slot = manage.add_key(
        args.container,
        existing,
        new,
        header=args.header,
        key_slot=new_slot,
        existing_slot=unlocking,
        kdf=_kdf(args),
        progress=_progress(),
        volume_key_file=args.volume_key_file,
        unbound_bits=args.key_size if args.unbound else None,
    )
    if args.verbose:
        print(f"Key slot {slot} created.", file=sys.stderr)
    return 0


def remove_key_command(argv: Sequence[str]) -> int:
    """``cryptfuse remove-key CONTAINER`` (``cryptsetup luksRemoveKey``)."""
    p = _parser(
        "remove-key", "[options] CONTAINER [KEY_FILE]", "Remove the keyslot a passphrase opens."
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("positional_key_file", nargs="?", metavar="KEY_FILE")
    _key_options(p, slot=False)
    p.add_argument("--force", action="store_true", help="allow removing the last keyslot")
    args = p.parse_args(argv)
    if args.positional_key_file is not None:
        args.key_file = args.positional_key_file
    secret = _existing_secret(args, "Enter passphrase to be deleted: ")
    slot = manage.remove_key(
        args.container, secret, header=args.header, confirm_last=_confirm(args)
    )
    if args.verbose:
        print(f"Key slot {slot} removed.", file=sys.stderr)
    return 0


def change_key_command(argv: Sequence[str]) -> int:
    """``cryptfuse change-key CONTAINER [NEW_KEY_FILE]`` (``cryptsetup luksChangeKey``)."""
    p = _parser("change-key", "[options] CONTAINER [NEW_KEY_FILE]", "Change a passphrase.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("new_key_file", nargs="?", metavar="NEW_KEY_FILE")
    _key_options(p)
    _kdf_options(p)
    args = p.parse_args(argv)
    old = _existing_secret(args, "Enter passphrase to be changed: ")
    new = _new_secret(
        args.new_key_file, args.new_keyfile_offset, args.new_keyfile_size, "Enter new passphrase: "
    )
    slot = manage.change_key(
        args.container,
        old,
        new,
        header=args.header,
        key_slot=args.key_slot,
        kdf=_kdf(args),
        progress=_progress(),
    )
    if args.verbose:
        print(f"Key slot {slot} holds the new passphrase.", file=sys.stderr)
    return 0


def convert_key_command(argv: Sequence[str]) -> int:
    """``cryptfuse convert-key CONTAINER`` (``cryptsetup luksConvertKey``, LUKS2)."""
    p = _parser(
        "convert-key",
        "[options] CONTAINER",
        "Store a LUKS2 keyslot again with new KDF parameters (--pbkdf, --iter-time, ...).",
    )
    p.add_argument("container", metavar="CONTAINER")
    _key_options(p)
    _kdf_options(p)
    args = p.parse_args(argv)
    passphrase = _existing_secret(args, "Enter passphrase for keyslot to be converted: ")
    slot = manage.convert_key(
        args.container,
        passphrase,
        header=args.header,
        key_slot=args.key_slot,
        kdf=_kdf(args),
        progress=_progress(),
    )
    if args.verbose:
        print(f"Key slot {slot} converted.", file=sys.stderr)
    return 0


def kill_slot_command(argv: Sequence[str]) -> int:
    """``cryptfuse kill-slot CONTAINER SLOT`` (``cryptsetup luksKillSlot``)."""
    p = _parser("kill-slot", "[options] CONTAINER SLOT", "Wipe a keyslot.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("slot", type=_nonneg_int, metavar="SLOT")
    _key_options(p, slot=False)
    p.add_argument("--force", action="store_true", help="allow removing the last keyslot")
    args = p.parse_args(argv)
    passphrase = None
    if not args.batch or args.key_file is not None:
        passphrase = _existing_secret(args, "Enter any remaining passphrase: ")
    manage.kill_slot(
        args.container,
        args.slot,
        header=args.header,
        passphrase=passphrase,
        confirm_last=_confirm(args),
    )
    return 0


def config_command(argv: Sequence[str]) -> int:
    """``cryptfuse config CONTAINER`` (``cryptsetup config``, LUKS2)."""
    p = _parser(
        "config",
        "[options] CONTAINER",
        "Set a LUKS2 keyslot's priority, or the label and subsystem.",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--priority", metavar="ignore|normal|prefer", help="with --key-slot")
    p.add_argument("--key-slot", "-S", type=_nonneg_int, metavar="N")
    p.add_argument("--label", help="the new label (none when only --subsystem is given)")
    p.add_argument("--subsystem", help="the new subsystem (none when only --label is given)")
    args = p.parse_args(argv)
    manage.configure(
        args.container,
        header=args.header,
        priority=args.priority,
        key_slot=args.key_slot,
        label=args.label,
        subsystem=args.subsystem,
    )
    return 0


def token_command(argv: Sequence[str]) -> int:
    """``cryptfuse token add|remove|import|export|unassign CONTAINER`` (``cryptsetup
    token``, LUKS2)."""
    p = _parser(
        "token",
        "add|remove|import|export|unassign [options] CONTAINER",
        "Add, remove, import, export or unassign a LUKS2 token (JSON metadata, e.g. "
        "systemd-cryptenroll's; add makes cryptsetup's luks2-keyring token).",
    )
    p.add_argument("action", choices=("add", "remove", "import", "export", "unassign"))
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--token-id", type=_nonneg_int, metavar="N")
    p.add_argument("--json-file", metavar="FILE", help="import from / export to FILE (default: "
                   "standard input / output)")  # fmt: skip
    p.add_argument("--key-slot", "-S", type=_nonneg_int, metavar="N",
                   help="add, import: assign to (add: default every keyslot); "
                   "unassign: from")  # fmt: skip
    p.add_argument("--key-description", metavar="TEXT",
                   help="add: the kernel keyring key's description (e.g. user:name)")  # fmt: skip
    p.add_argument("--unbound", action="store_true", help="add: assign to no keyslot")
    p.add_argument("--token-replace", action="store_true",
                   help="add, import: replace --token-id")  # fmt: skip
    args = p.parse_args(argv)
    # (cryptsetup 2.6.1's verify_token, in its order)
    if args.action == "add" and args.key_description is None:
        raise UsageError("--key-description parameter is mandatory for token add action.")
    if args.action in ("remove", "export") and args.token_id is None:
        raise UsageError("Action requires specific token. Use --token-id parameter.")
    if args.unbound:
        if args.action != "add":
            raise UsageError("Option --unbound is valid only with token add action.")
        if args.key_slot is not None:
            raise UsageError("Options --key-slot and --unbound cannot be combined.")
    if args.action == "unassign":
        if args.key_slot is None:
            raise UsageError("Action requires specific keyslot. Use --key-slot parameter.")
        if args.token_id is None:
            raise UsageError("Action requires specific token. Use --token-id parameter.")
    if args.action == "import":
        try:
            if args.json_file is None:
                text = sys.stdin.read()
            else:
                with open(args.json_file, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"Failed to read JSON token: {exc}.") from None
    if args.action in ("import", "add"):
        where = {"header": args.header, "token_id": args.token_id, "key_slot": args.key_slot}
        if args.action == "import":
            token_id = manage.token_import(
                args.container, text, replace=args.token_replace, **where
            )
        else:
            token_id = manage.token_add(
                args.container, args.key_description, unbound=args.unbound,
                replace=args.token_replace, **where,
            )  # fmt: skip
        if args.verbose:
            print(f"Token {token_id} created.", file=sys.stderr)
    elif args.action == "export":
        text = manage.token_export(args.container, args.token_id, header=args.header)
        if args.json_file is None:
            sys.stdout.write(text)
        else:
            try:
                fd = os.open(args.json_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                raise KeyFileError(f"Cannot write {args.json_file}: {exc.strerror}.") from None
    elif args.action == "unassign":
        manage.token_unassign(args.container, args.token_id, args.key_slot, header=args.header)
    else:
        manage.token_remove(args.container, args.token_id, header=args.header)
        if args.verbose:
            print(f"Token {args.token_id} removed.", file=sys.stderr)
    return 0


def erase_command(argv: Sequence[str]) -> int:
    """``cryptfuse erase CONTAINER`` (``cryptsetup erase``/``luksErase``)."""
    p = _parser(
        "erase",
        "[options] CONTAINER",
        "Wipe every keyslot: the container becomes permanently inaccessible.",
    )
    p.add_argument("container", metavar="CONTAINER")
    args = p.parse_args(argv)
    slots = manage.erase(args.container, header=args.header, confirm=_confirm(args))
    if args.verbose:
        print(f"Keyslots wiped: {', '.join(map(str, slots)) or 'none'}.", file=sys.stderr)
    return 0


def dump_command(argv: Sequence[str]) -> int:
    """``cryptfuse dump CONTAINER`` (``cryptsetup luksDump``)."""
    p = _parser("dump", "[options] CONTAINER", "Show the LUKS header.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument(
        "--json",
        "--dump-json-metadata",
        action="store_true",
        help="LUKS2: print the JSON metadata (as cryptsetup does: no final newline)",
    )
    p.add_argument(
        "--dump-volume-key",
        "--dump-master-key",
        action="store_true",
        help="print the volume key (needs a passphrase and a confirmation)",
    )
    _key_options(p)
    _volume_key_option(p, "with --dump-volume-key: write the key to this new file instead")
    p.add_argument(
        "--unbound", action="store_true", help="LUKS2: print the key of unbound keyslot --key-slot"
    )
    args = p.parse_args(argv)
    if args.unbound:
        if args.key_slot is None:
            raise UsageError("Keyslot specification is required.")
        secret = _existing_secret(args, f"Enter passphrase for {args.container}: ")
        print(manage.dump_unbound_key(args.container, secret, args.key_slot, header=args.header))
        return 0
    if args.volume_key_file is not None and not args.dump_volume_key:
        raise UsageError("--volume-key-file is only used with --dump-volume-key here.")
    if args.dump_volume_key:
        if not args.batch and not _ask_yes(
            "Header dump with volume key is sensitive information\n"
            "which allows access to encrypted partition without a passphrase.\n"
            "This dump should be always stored encrypted in a safe place."
        ):
            raise UsageError("Operation aborted (use -q to skip the confirmation).")
        secret = _existing_secret(args, f"Enter passphrase for {args.container}: ")
        print(
            manage.dump_volume_key(
                args.container,
                secret,
                header=args.header,
                key_slot=args.key_slot,
                key_file=args.volume_key_file,
            )
        )
        return 0
    text = manage.dump(args.container, header=args.header, as_json=args.json)
    sys.stdout.write(text if args.json else text + "\n")
    return 0


def header_backup_command(argv: Sequence[str]) -> int:
    """``cryptfuse header-backup CONTAINER --header-backup-file FILE``."""
    p = _parser(
        "header-backup",
        "CONTAINER --header-backup-file FILE",
        "Save the header and keyslots to a file.",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--header-backup-file", metavar="FILE")
    args = p.parse_args(argv)
    target = args.header_backup_file or args.file
    if not target:
        raise UsageError("Option --header-backup-file is required.")
    manage.header_backup(args.container, target, header=args.header)
    return 0


def header_restore_command(argv: Sequence[str]) -> int:
    """``cryptfuse header-restore CONTAINER --header-backup-file FILE``."""
    p = _parser("header-restore", "CONTAINER --header-backup-file FILE", "Restore a header backup.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--header-backup-file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="restore even if the UUID differs")
    args = p.parse_args(argv)
    source = args.header_backup_file or args.file
    if not source:
        raise UsageError("Option --header-backup-file is required.")
    manage.header_restore(args.container, source, header=args.header, confirm=_confirm(args))
    return 0


def uuid_command(argv: Sequence[str]) -> int:
    """``cryptfuse uuid CONTAINER [--uuid NEW]`` (``cryptsetup luksUUID``)."""
    p = _parser("uuid", "[--uuid NEW] CONTAINER", "Print or set the UUID.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--uuid", help="set this UUID")
    args = p.parse_args(argv)
    if args.uuid is None:
        print(manage.get_uuid(args.container, args.header))
    else:
        manage.set_uuid(args.container, args.uuid, args.header)
    return 0


def is_luks_command(argv: Sequence[str]) -> int:
    """``cryptfuse is-luks CONTAINER`` (``cryptsetup isLuks``): exit 0 or 1, silently
    (a missing or unreadable device: an error, exit 4)."""
    p = _parser("is-luks", "[--type luks1|luks2] CONTAINER", "Exit 0 if CONTAINER is LUKS.")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--type", "-M", choices=("luks", "luks1", "luks2"))
    args = p.parse_args(argv)
    found = manage.is_luks(args.container, args.type)
    if args.verbose:
        print(f"{args.container}: {'LUKS' if found else 'not LUKS'}", file=sys.stderr)
    return 0 if found else 1


#: registered in :data:`cryptfuse.cli.SUBCOMMANDS`
LUKS_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "format": format_command,
    "add-key": add_key_command,
    "remove-key": remove_key_command,
    "change-key": change_key_command,
    "kill-slot": kill_slot_command,
    "convert-key": convert_key_command,
    "erase": erase_command,
    "config": config_command,
    "token": token_command,
    "dump": dump_command,
    "header-backup": header_backup_command,
    "header-restore": header_restore_command,
    "uuid": uuid_command,
    "is-luks": is_luks_command,
}
