"""The command line of the foreign formats: TCRYPT, BITLK and FVAULT2.

``cryptfuse CONTAINER MOUNTPOINT --type tcrypt|bitlk|fvault2`` with cryptsetup's
``open`` options (``--veracrypt``, ``--disable-veracrypt``, ``--veracrypt-pim``,
``--veracrypt-query-pim``, ``--tcrypt-hidden``, ``--tcrypt-system``,
``--tcrypt-backup``; for TCRYPT ``--key-file`` is repeatable and names TrueCrypt key
files, the passphrase comes from the terminal or standard input), and ``cryptfuse
dump`` for them (``tcryptDump``, ``bitlkDump``, ``fvault2Dump``).  BITLK and FVAULT2
are recognised by their signatures; TCRYPT must be asked for.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence

from .cli_input import PROG, _nonneg_int, _Parser, read_key_file, read_passphrase_line
from .errors import DeviceError, KeyFileError, UsageError, WrongPassphraseError
from .formats import (
    FOREIGN_TYPES,
    OpenOptions,
    Secret,
    TcryptOptions,
    bitlk,
    detect_foreign,
    detect_type,
    fvault2,
    open_volume,
    tcrypt,
)
from .volume import Volume, device_size, open_device

__all__ = ["FOREIGN_SUBCOMMANDS", "add_foreign_options", "foreign_kind", "open_foreign_volume"]


def add_foreign_options(p: argparse.ArgumentParser) -> None:
    """The TCRYPT options of ``cryptsetup open``."""
    g = p.add_argument_group("TrueCrypt/VeraCrypt (--type tcrypt)")
    g.add_argument(
        "--veracrypt",
        action="store_true",
        help="accepted for compatibility: VeraCrypt headers are tried by default",
    )
    g.add_argument("--disable-veracrypt", action="store_true", help="try TrueCrypt headers only")
    g.add_argument("--veracrypt-pim", type=_nonneg_int, metavar="PIM", help="VeraCrypt PIM")
    g.add_argument("--veracrypt-query-pim", action="store_true", help="ask for the VeraCrypt PIM")
    g.add_argument("--tcrypt-hidden", action="store_true", help="open the hidden volume")
    g.add_argument(
        "--tcrypt-system", action="store_true", help="system encryption (header at 31744)"
    )
    g.add_argument("--tcrypt-backup", action="store_true", help="use the backup header")


def key_files(args: argparse.Namespace) -> list[str]:
    """``--key-file`` values (the option is repeatable for TCRYPT)."""
    value = args.key_file
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def check_options(args: argparse.Namespace, kind: str | None) -> None:
    """Refuse TCRYPT options without ``--type tcrypt`` and repeated key files elsewhere."""
    tcrypt_flags = [
        name
        for name in (
            "veracrypt",
            "disable_veracrypt",
            "veracrypt_query_pim",
            "tcrypt_hidden",
            "tcrypt_system",
            "tcrypt_backup",
        )
        if getattr(args, name, False)
    ]
    if getattr(args, "veracrypt_pim", None) is not None:
        tcrypt_flags.append("veracrypt_pim")
    if tcrypt_flags and kind != "tcrypt":
        names = ", ".join("--" + n.replace("_", "-") for n in tcrypt_flags)
        raise UsageError(f"{names} can only be used with --type tcrypt")
    if kind == "tcrypt":
        if args.veracrypt_pim is not None and args.disable_veracrypt:
            raise UsageError("--veracrypt-pim cannot be used with --disable-veracrypt")
        if "-" in key_files(args):
            raise UsageError("TrueCrypt key files cannot be read from standard input")
    elif len(key_files(args)) > 1:
        raise UsageError("--key-file can be given more than once only with --type tcrypt")


def foreign_kind(kind: str | None, container: str) -> str | None:
    """The foreign type to open: *kind* when given, else BITLK/FVAULT2 when the
    container has no LUKS header but one of their signatures."""
    if kind is not None:
        return kind if kind in FOREIGN_TYPES else None
    if detect_type(container) is not None:
        return None
    return detect_foreign(container)


def _passphrase(container: str, *, allow_empty: bool) -> bytes:
    if sys.stdin.isatty():
        try:
            return getpass.getpass(f"Enter passphrase for {container}: ").encode()
        except EOFError:
            raise KeyFileError("no passphrase entered") from None
    try:
        return read_passphrase_line(sys.stdin.buffer, 0, None)
    except KeyFileError:
        if allow_empty:
            return b""
        raise


def _pim(args: argparse.Namespace) -> int:
    if args.veracrypt_pim is not None:
        return int(args.veracrypt_pim)
    if not args.veracrypt_query_pim:
        return 0
    if sys.stdin.isatty():
        text = getpass.getpass("Enter VeraCrypt PIM: ")
    else:
        text = read_passphrase_line(sys.stdin.buffer, 0, None).decode("ascii", "replace")
    if not text.isdigit():
        raise UsageError("Invalid PIM value: parse error.")
    pim = int(text)
    if pim == 0:
        raise UsageError("Invalid PIM value: 0.")
    if pim > 0xFFFFFFFF:
        raise UsageError("Invalid PIM value: outside of range.")
    return pim


def tcrypt_options(args: argparse.Namespace) -> TcryptOptions:
    """TcryptOptions from the parsed options (asks for the PIM if told to)."""
    return TcryptOptions(
        veracrypt=not args.disable_veracrypt,
        pim=_pim(args) if not args.disable_veracrypt else 0,
        hidden=args.tcrypt_hidden,
        system=args.tcrypt_system,
        backup=args.tcrypt_backup,
        hash=getattr(args, "hash", None),
        cipher=getattr(args, "cipher", None),
        keyfiles=tuple(key_files(args)),
    )


def _secret_bytes(args: argparse.Namespace, kind: str) -> bytes:
    """The passphrase (or BITLK/FVAULT2 key file) bytes for *kind*."""
    files = key_files(args)
    if kind != "tcrypt" and files:
        size = getattr(args, "keyfile_size", None)
        return read_key_file(files[0], getattr(args, "keyfile_offset", 0), size)
    return _passphrase(args.container, allow_empty=kind == "tcrypt" and bool(files))


def _bitlk_clear_key_only(container: str) -> bool:
    fd = open_device(container, True, lock=False)
    try:
        meta = bitlk.read_bitlk_metadata(fd, container)
    finally:
        os.close(fd)
    return any(v.protection == "clear key" for v in meta.vmks)


def open_foreign_volume(args: argparse.Namespace, kind: str) -> Volume:
    """Open a TCRYPT/BITLK/FVAULT2 container for the mount command."""
    check_options(args, kind)
    options = OpenOptions(
        type=kind,
        readonly=args.readonly,
        header=args.header,
        tcrypt=tcrypt_options(args) if kind == "tcrypt" else None,
    )
    if kind == "bitlk" and _bitlk_clear_key_only(args.container):
        try:  # cryptsetup tries a clear-key protector before asking
            return open_volume(args.container, options, None)
        except WrongPassphraseError:
            pass
    return open_volume(args.container, options, Secret(_secret_bytes(args, kind)))


# -- dump ------------------------------------------------------------------------------


def _hex_rows(key: bytes) -> str:
    rows = [" ".join(f"{b:02x}" for b in key[i : i + 16]) for i in range(0, len(key), 16)]
    return "MK dump:\t" + " \n\t\t".join(rows) + " "


def foreign_dump(args: argparse.Namespace, kind: str) -> str:
    """The text of ``cryptfuse dump --type KIND [--dump-volume-key]``."""
    path = args.container
    check_options(args, kind)
    fd = open_device(path, True, lock=False)
    try:
        if kind == "bitlk":
            meta = bitlk.read_bitlk_metadata(fd, path)
            if not args.dump_volume_key:
                return bitlk.dump(meta, path)
            key: bytes | None = None
            if any(v.protection == "clear key" for v in meta.vmks):
                try:
                    key = bitlk.bitlk_volume_key(meta, None)
                except WrongPassphraseError:
                    key = None
            if key is None:
                key = bitlk.bitlk_volume_key(meta, _secret_bytes(args, kind))
            cipher, mode = meta.cipher.split("-", 1)
            return "\n".join(
                [
                    f"BITLK header information for {path}",
                    f"Cipher name:   \t{cipher}",
                    f"Cipher mode:   \t{mode}",
                    f"UUID:          \t{meta.guid}",
                    f"MK bits:       \t{len(key) * 8}",
                    _hex_rows(key),
                ]
            )
        if kind == "fvault2":
            fmeta = fvault2.read_fvault2_metadata(fd, path)
            if not args.dump_volume_key:
                return fvault2.dump(fmeta, path)
            key = fvault2.fvault2_volume_key(fmeta, _secret_bytes(args, kind))
            hexkey = " ".join(f"{b:02x}" for b in key)
            return fvault2.dump(fmeta, path) + f"\nVolume key:       \t{hexkey} "
        # TCRYPT: the header is encrypted, so every dump needs the passphrase
        options = tcrypt_options(args)
        keyfiles = tcrypt.read_keyfiles(options.keyfiles)
        passphrase = _secret_bytes(args, kind)
        header = tcrypt.read_tcrypt_header(fd, path, passphrase, keyfiles, options)
        if args.dump_volume_key:
            return tcrypt.dump_volume_key(header, options, path, device_size(fd))
        return tcrypt.dump(header, path)
    finally:
        os.close(fd)


def dump_parser() -> argparse.ArgumentParser:
    """``cryptfuse dump --type tcrypt|bitlk|fvault2`` (the LUKS dump has its own)."""
    p = _Parser(
        prog=f"{PROG} dump",
        add_help=False,
        usage=f"{PROG} dump --type tcrypt|bitlk|fvault2 [options] CONTAINER",
        description="Show a TrueCrypt/VeraCrypt, BitLocker or FileVault 2 header.",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--type", "-M", choices=FOREIGN_TYPES)
    p.add_argument("--dump-volume-key", "--dump-master-key", action="store_true")
    p.add_argument("--key-file", "-d", action="append", metavar="FILE")
    p.add_argument("--keyfile-offset", type=_nonneg_int, default=0, metavar="BYTES")
    p.add_argument("--keyfile-size", "-l", type=_nonneg_int, metavar="BYTES")
    p.add_argument("--hash", "-h", metavar="HASH", help="TCRYPT: try only this PRF")
    p.add_argument("--cipher", "-c", metavar="CHAIN", help="TCRYPT: try only this chain")
    p.add_argument("--batch-mode", "-q", dest="batch", action="store_true")
    add_foreign_options(p)
    p.add_argument("--help", action="help", help="show this help and exit")
    return p


def wants_foreign_dump(argv: Sequence[str]) -> str | None:
    """The foreign type a ``dump`` command line is about, or None for LUKS."""
    args, _ = dump_parser().parse_known_args(argv)
    if args.type is not None:
        return str(args.type)
    if not os.path.exists(args.container):
        return None
    return foreign_kind(None, args.container)


def dump_command(argv: Sequence[str], luks_dump: Callable[[Sequence[str]], int]) -> int:
    """``cryptfuse dump``: the foreign formats here, LUKS in *luks_dump*."""
    if "--help" in argv:
        return luks_dump(argv)
    try:
        kind = wants_foreign_dump(argv)
    except UsageError:
        kind = None
    except DeviceError:
        kind = None
    if kind is None:
        return luks_dump(argv)
    args = dump_parser().parse_args(argv)
    if args.dump_volume_key and not args.batch:
        answer = (
            input(
                "Header dump with volume key is sensitive information\n"
                "that allows access to encrypted partition without a passphrase.\n"
                "This dump should be stored encrypted in a safe place.\n"
                "Are you sure? (Type 'yes' in capital letters): "
            )
            if sys.stdin.isatty()
            else "YES"
        )
        if answer != "YES":
            raise UsageError("Operation aborted (use -q to skip the confirmation).")
    print(foreign_dump(args, kind))
    return 0


def detect_command(argv: Sequence[str]) -> int:
    """``cryptfuse detect CONTAINER``: print luks1, luks2, bitlk or fvault2; exit 1 if none."""
    p = _Parser(
        prog=f"{PROG} detect",
        add_help=False,
        description="Print the container type found by its signature (TCRYPT has none).",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    found = detect_type(args.container) or detect_foreign(args.container)
    if found is None:
        return 1
    print(found)
    return 0


#: registered in :data:`cryptfuse.cli.SUBCOMMANDS`
FOREIGN_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"detect": detect_command}
