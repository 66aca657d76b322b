"""The exception tree of cryptfuse.

Every error that a user can cause is a :class:`CryptfuseError`.  The CLI turns
each class into one line on stderr and an exit code (``exit_code``, following
cryptsetup's conventions); the FUSE layer turns them into an errno.  This module
imports nothing from the package.
"""

from __future__ import annotations


class CryptfuseError(Exception):
    """Base of every error cryptfuse raises on purpose.

    ``exit_code`` follows cryptsetup: 1 wrong parameters or format, 2 no key
    available with this passphrase, 3 out of memory, 4 wrong device, 5 busy.
    """

    exit_code = 1


class UsageError(CryptfuseError):
    """Raised when options are invalid or contradict each other."""


class FormatError(CryptfuseError):
    """Raised when a container or header is malformed, damaged or not of the
    expected type (bad magic, checksum mismatch, invalid keyslot geometry)."""


class UnsupportedError(CryptfuseError):
    """Raised when input is valid but uses something cryptfuse does not
    implement (a cipher, IV mode, hash, LUKS2 requirement or segment type)."""


class WrongPassphraseError(CryptfuseError):
    """Raised when no keyslot opens with the given passphrase or key file."""

    exit_code = 2

    def __init__(self, message: str = "No key available with this passphrase.") -> None:
        super().__init__(message)


class KeyslotError(CryptfuseError):
    """Raised when the requested keyslot is not active, full, or none is usable."""


class KeyFileError(CryptfuseError):
    """Raised when a key file cannot be read or is shorter than required."""


class InsufficientMemoryError(CryptfuseError):
    """Raised before a KDF (Argon2) whose memory cost exceeds what is available."""

    exit_code = 3


class DeviceError(CryptfuseError):
    """Raised when the container (or header file) cannot be opened, is too
    small for its header, or an I/O operation on it fails."""

    exit_code = 4


class BusyError(CryptfuseError):
    """Raised when the container is locked or mounted by another process."""

    exit_code = 5


class ReadOnlyError(CryptfuseError):
    """Raised when writing to a volume opened read-only (EROFS)."""


class OutOfRangeError(CryptfuseError):
    """Raised when a write starts at or beyond the end of the volume (ENOSPC)."""
