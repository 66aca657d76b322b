"""cryptsetup's ``--volume-key-file``: a LUKS volume key given as a file, not unlocked.

For people who have the volume key and not (or no longer) a passphrase: one kept with
``luksDump --dump-volume-key --volume-key-file``, or recovered from a memory image.
``open`` and the mount use it instead of a keyslot, ``add-key`` makes a new keyslot
with it, ``format`` writes it instead of a random one.  The key is checked against
the header's digest before anything uses it, as cryptsetup checks it.
"""

from __future__ import annotations

import os

from ..errors import FormatError, KeyFileError, WrongPassphraseError
from .luks1 import LUKS1Header
from .luks2 import LUKS2Header


def read_volume_key(path: str, length: int) -> bytes:
    """The first *length* bytes of *path* (cryptsetup reads no more, and refuses fewer)."""
    try:
        with open(path, "rb") as f:
            data = f.read(length)
    except OSError as exc:
        raise KeyFileError(f"Cannot read volume key file {path}: {exc.strerror}.") from None
    if len(data) < length:
        raise KeyFileError(f"Cannot read {length} bytes from keyfile {path}.")
    return data


def new_volume_key(path: str | None, length: int) -> bytes:
    """A new volume key of *length* bytes: random, or read from *path*."""
    return os.urandom(length) if path is None else read_volume_key(path, length)


def volume_key_length(hdr: LUKS1Header | LUKS2Header) -> int:
    """Bytes of the data segment's volume key: LUKS1's header field; for LUKS2 the
    key size of a keyslot bound to the segment's digest (the digest has none)."""
    if isinstance(hdr, LUKS1Header):
        return hdr.key_bytes
    _, _, bound = hdr.data_segment()
    for index in bound.keyslots:
        slot = hdr.metadata.keyslots.get(index)
        if slot is not None and slot.key_size:
            return int(slot.key_size)
    raise FormatError(
        "Cannot determine volume key size for LUKS without keyslots, please use --key-size option."
    )


def check_volume_key(hdr: LUKS1Header | LUKS2Header, key: bytes) -> None:
    """Refuse *key* unless the header's digest of the data segment's key matches it."""
    if isinstance(hdr, LUKS1Header):
        matches = len(key) == hdr.key_bytes and hdr.verify_volume_key(key)
    else:
        _, _, bound = hdr.data_segment()
        matches = LUKS2Header.verify_volume_key(key, bound)
    if not matches:
        raise WrongPassphraseError("Volume key does not match the volume.")


def volume_key_from_file(hdr: LUKS1Header | LUKS2Header, path: str) -> bytes:
    """The volume key in *path*, checked against *hdr*."""
    key = read_volume_key(path, volume_key_length(hdr))
    check_volume_key(hdr, key)
    return key
