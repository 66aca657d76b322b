"""dm-crypt plain mode: no header, the key comes from the passphrase or a key file.

Semantics are cryptsetup 2.6's ``open --type plain``: a passphrase is hashed
with :func:`cryptfuse.kdf.plain_hash` (default ripemd160); a key file (not
``-``) is the raw key and is never hashed; ``offset`` and ``skip`` count
512-byte sectors; ``size`` defaults to the rest of the device.
"""

from __future__ import annotations

import os

from ..errors import DeviceError, KeyFileError, UsageError
from ..kdf import plain_hash
from ..sector import SECTOR_SIZES, SectorCipher
from ..spec import parse_cipher_spec
from ..volume import Volume, device_size, open_device

#: cryptsetup 2.6's plain-mode defaults (2.7 changed them to aes-xts-plain64/sha256)
DEFAULT_CIPHER = "aes-cbc-essiv:sha256"
DEFAULT_KEY_SIZE = 256
DEFAULT_HASH = "ripemd160"


def plain_key(
    cipher: str, key_size_bits: int, hash_spec: str, secret: bytes, from_keyfile: bool
) -> bytes:
    """The volume key of a plain container; validates the cipher and key size."""
    spec = parse_cipher_spec(cipher)
    if key_size_bits <= 0 or key_size_bits % 8:
        raise UsageError(f"key size {key_size_bits} bits must be a positive multiple of 8")
    key_bytes = key_size_bits // 8
    spec.check_key_size(key_bytes)
    if from_keyfile:
        if len(secret) < key_bytes:
            raise KeyFileError(
                f"key file is too short: {len(secret)} bytes, the key needs {key_bytes}"
            )
        return secret[:key_bytes]
    return plain_hash(hash_spec, key_bytes, secret)


def open_plain(
    container: str,
    *,
    secret: bytes,
    from_keyfile: bool,
    cipher: str | None = None,
    key_size: int | None = None,
    hash_spec: str | None = None,
    offset: int = 0,
    skip: int = 0,
    size: int | None = None,
    sector_size: int | None = None,
    iv_large_sectors: bool = False,
    readonly: bool = False,
) -> Volume:
    """Open *container* as a plain dm-crypt device and return its :class:`Volume`."""
    cipher = cipher or DEFAULT_CIPHER
    sector_size = sector_size or 512
    if sector_size not in SECTOR_SIZES:
        raise UsageError(f"sector size {sector_size} is not one of 512, 1024, 2048, 4096")
    units = sector_size // 512
    for name, value in (("offset", offset), ("skip", skip), ("size", size or 0)):
        if value < 0:
            raise UsageError(f"--{name} {value} is negative")
        if value % units:
            raise UsageError(
                f"--{name} {value} is not aligned to the {sector_size}-byte sector size"
            )
    key = plain_key(
        cipher, key_size or DEFAULT_KEY_SIZE, hash_spec or DEFAULT_HASH, secret, from_keyfile
    )
    sector_cipher = SectorCipher(
        parse_cipher_spec(cipher),
        key,
        sector_size,
        iv_offset=skip,
        iv_large_sectors=iv_large_sectors,
    )
    fd = open_device(container, readonly)
    try:
        total = device_size(fd)
        data_offset = offset * 512
        if data_offset >= total:
            raise DeviceError(
                f"offset {offset} sectors is beyond the end of {container} ({total} bytes)"
            )
        available = (total - data_offset) // sector_size * sector_size
        if size is not None:
            if size == 0:
                raise UsageError("--size 0 gives an empty volume")
            if size * 512 > available:
                raise DeviceError(
                    f"--size {size} sectors does not fit in {container} after the offset "
                    f"({available // 512} sectors available)"
                )
            available = size * 512
        if available == 0:
            raise DeviceError(
                f"{container} has no whole {sector_size}-byte sector after the offset"
            )
        return Volume(
            fd,
            sector_cipher,
            data_offset,
            available,
            readonly=readonly,
            description=f"plain {container}",
        )
    except BaseException:
        os.close(fd)
        raise
