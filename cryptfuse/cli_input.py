"""Command-line input shared by every subcommand: parsing errors, numbers, secrets.

Passphrases and key files are read here with cryptsetup's semantics; nothing in
this module prints or exits.
"""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO, NoReturn

from .errors import KeyFileError, UsageError

__all__ = [
    "KEYFILE_SIZE_MAX",
    "PROG",
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


def _nonneg_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
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
        chunk = stream.read(wanted - have)
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
