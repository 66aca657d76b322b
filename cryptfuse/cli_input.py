"""Command-line input shared by every subcommand: parsing errors, numbers, secrets.

Passphrases and key files are read here with cryptsetup's semantics; nothing in
this module prints or exits.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from typing import BinaryIO, NoReturn

from .errors import KeyFileError, UsageError
from .formats import Secret
from .formats.plain import DEFAULT_CIPHER, DEFAULT_HASH, DEFAULT_KEY_SIZE

__all__ = [
    "KEYFILE_SIZE_MAX",
    "PROG",
    "plain_secret",
    "plain_spec_warnings",
    "read_key_file",
    "read_passphrase_line",
]

PROG = "cryptfuse"

#: cryptsetup's default limit for key files read whole (DEFAULT_KEYFILE_SIZE_MAXKB)
KEYFILE_SIZE_MAX = 8192 * 1024


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 1 (cryptsetup's)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        # cryptsetup refuses the pair for every action, before anything else
        if (
            getattr(parsed, "pbkdf_force_iterations", None) is not None
            and getattr(parsed, "iter_time", None) is not None
        ):
            raise UsageError(
                "PBKDF forced iterations cannot be combined with iteration time option."
            )
        return parsed, rest


def _nonneg_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    if value >= 1 << 63:  # (cryptsetup: "invalid numeric value")
        raise argparse.ArgumentTypeError(f"{text} is too large")
    return value


def _count32(text: str) -> int:
    """A count cryptsetup keeps in 32 bits (``--pbkdf-force-iterations``)."""
    value = _nonneg_int(text)
    if value >= 1 << 32:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {(1 << 32) - 1})")
    return value


def _read_limited(stream: BinaryIO, offset: int, size: int | None, limit: int, what: str) -> bytes:
    """Read *size* bytes (or all, up to *limit*) after skipping *offset* bytes."""
    remaining = offset
    while remaining:
        skipped = stream.read(min(remaining, 1 << 20))
        if not skipped:
            break
        remaining -= len(skipped)
    wanted = size if size is not None else limit + 1
    chunks: list[bytes] = []
    have = 0
    while have < wanted:
        chunk = stream.read(min(wanted - have, 1 << 20))  # (a huge --keyfile-size: no huge buffer)
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    data = b"".join(chunks)
    if size is None and len(data) > limit:
        raise KeyFileError(
            f"{what} exceeds the maximum key file size ({limit} bytes); use --keyfile-size"
        )
    return data


def read_key_file(
    path: str, offset: int, size: int | None, *, stdin: BinaryIO | None = None
) -> bytes:
    """Key file bytes with cryptsetup's semantics: no newline stripping.

    A regular file shorter than ``offset + size`` is an error; ``-`` (stdin)
    gives what is there.
    """
    if path == "-":
        return _read_limited(
            stdin or sys.stdin.buffer, offset, size, KEYFILE_SIZE_MAX, "standard input"
        )
    try:
        with open(path, "rb") as f:
            data = _read_limited(f, offset, size, KEYFILE_SIZE_MAX, f"key file {path}")
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if size is not None and len(data) < size:
        raise KeyFileError(
            f"key file {path} is too short: --keyfile-offset {offset} + --keyfile-size {size} "
            f"needs {offset + size} bytes"
        )
    if not data:
        raise KeyFileError(f"key file {path} is empty after --keyfile-offset {offset}")
    return data


def read_passphrase_line(stream: BinaryIO, offset: int, size: int | None) -> bytes:
    """A piped passphrase: one line, trailing newline stripped (cryptsetup)."""
    line = stream.readline(KEYFILE_SIZE_MAX + 1)
    if not line:
        raise KeyFileError("no passphrase on standard input")
    if line.endswith(b"\n"):
        line = line[:-1]
    line = line[offset:]
    return line if size is None else line[:size]


# -- plain mode: the secret and the defaults warning (the mount command's semantics) ---------


def plain_secret(args: argparse.Namespace, plain_key_bytes: int) -> Secret:
    """A plain container's secret as ``cryptfuse --type plain`` reads it: ``--key-file
    FILE`` is the raw key (only the key's bytes are read, so ``-d /dev/urandom``
    works), ``-`` and a piped line are passphrases, a terminal prompts once."""
    if args.key_file is not None:
        if args.key_file != "-" and args.keyfile_size is None:
            path = args.key_file
            try:
                with open(path, "rb") as f:
                    data = _read_limited(
                        f, args.keyfile_offset, plain_key_bytes, plain_key_bytes, f"key file {path}"
                    )
            except FileNotFoundError:
                raise KeyFileError(f"key file {path} does not exist") from None
            except OSError as exc:
                raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        else:
            data = read_key_file(args.key_file, args.keyfile_offset, args.keyfile_size)
        return Secret(data, from_keyfile=args.key_file != "-")
    if sys.stdin.isatty():
        try:
            text = getpass.getpass(f"Enter passphrase for {args.container}: ").encode()
        except EOFError:
            raise KeyFileError("no passphrase entered") from None
        text = text[args.keyfile_offset :]
        return Secret(text if args.keyfile_size is None else text[: args.keyfile_size])
    return Secret(read_passphrase_line(sys.stdin.buffer, args.keyfile_offset, args.keyfile_size))


def plain_spec_warnings(args: argparse.Namespace) -> list[str]:
    """Warnings for plain mode relying on defaults that cryptsetup 2.7 changed."""
    hashed = args.key_file is None or args.key_file == "-"
    missing = [
        name
        for name, value, needed in (
            ("--cipher", args.cipher, True),
            ("--key-size", args.key_size, True),
            ("--hash", args.hash, hashed),
        )
        if needed and value is None
    ]
    if not missing:
        return []
    return [
        f"plain mode without {', '.join(missing)} uses cryptsetup 2.6 defaults "
        f"({DEFAULT_CIPHER}, {DEFAULT_KEY_SIZE} bits, {DEFAULT_HASH}); cryptsetup 2.7 changed them "
        "to aes-xts-plain64 and sha256: give the options explicitly"
    ]
