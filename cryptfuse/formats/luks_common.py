"""Pieces LUKS1 and LUKS2 share: exact reads, keyslot material, data-area geometry.

Everything here only *reads* the container: opening a LUKS container must
leave every byte of its metadata untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..af import af_merge, af_sectors
from ..errors import DeviceError, FormatError, UnsupportedError, UsageError
from ..sector import SectorCipher
from ..spec import CipherSpec, parse_cipher_spec
from ..volume import device_size, open_device

__all__ = [
    "Devices",
    "check_key_size",
    "data_area_size",
    "luks_cipher_spec",
    "open_devices",
    "pread_exact",
    "recover_af_key",
]


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """Read exactly *length* bytes at *offset*; a short read is a :class:`DeviceError`.

    *what* names the structure for the message ("keyslot 3 material", ...).
    """
    chunks = []
    done = 0
    while done < length:
        try:
            chunk = os.pread(fd, length - done, offset + done)
        except OSError as exc:
            raise DeviceError(f"cannot read {what}: {exc.strerror}") from None
        if not chunk:
            raise DeviceError(
                f"device is too small: {what} ends at byte {offset + length}, "
                f"beyond the end of the device"
            )
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def luks_cipher_spec(text: str, where: str) -> CipherSpec:
    """Parse a cipher spec stored in a LUKS header.

    A malformed spec is a damaged header (:class:`FormatError`); a well-formed
    one naming something cryptfuse lacks stays an :class:`UnsupportedError`.
    """
    try:
        return parse_cipher_spec(text)
    except UnsupportedError as exc:
        raise UnsupportedError(f"{where}: {exc}") from None
    except UsageError as exc:
        raise FormatError(f"{where}: {exc}") from None


def check_key_size(spec: CipherSpec, key_bytes: int, where: str) -> None:
    """Refuse a stored key size the cipher cannot take (a damaged or foreign header)."""
    try:
        spec.check_key_size(key_bytes)
    except UsageError as exc:
        raise FormatError(f"{where}: {exc}") from None


def recover_af_key(
    fd: int,
    *,
    area_offset: int,
    key_len: int,
    stripes: int,
    af_hash: str,
    spec: CipherSpec,
    derived_key: bytes,
    what: str,
) -> bytes:
    """Decrypt a keyslot's AF-split material and merge it into a key.

    The material is ``af_sectors(key_len, stripes)`` 512-byte sectors at byte
    *area_offset*, encrypted with *spec* under *derived_key*, with IV sector 0
    at the start of the area (cryptsetup's keyslot storage convention, the same
    for LUKS1 and LUKS2).
    """
    length = af_sectors(key_len, stripes) * 512
    material = pread_exact(fd, length, area_offset, what)
    plain = SectorCipher(spec, derived_key, 512, iv_offset=0).decrypt(material, 0)
    return af_merge(plain, key_len, stripes, af_hash)


def data_area_size(total: int, offset: int, sector_size: int, fixed: int | None, path: str) -> int:
    """Bytes of the data area: *fixed*, or the rest of the device after *offset*
    rounded down to whole sectors.  Raises :class:`DeviceError` when it does not fit.
    """
    if offset >= total:
        raise DeviceError(
            f"Device {path} is too small: the data area starts at byte {offset} "
            f"but the device has only {total} bytes."
        )
    if fixed is not None:
        if fixed > total - offset:
            raise DeviceError(
                f"Device {path} is too small: the data segment needs {fixed} bytes "
                f"after offset {offset}, the device has {total - offset}."
            )
        return fixed
    size = (total - offset) // sector_size * sector_size
    if size == 0:
        raise DeviceError(
            f"Device {path} has no whole {sector_size}-byte sector after the data offset."
        )
    return size


@dataclass
class Devices:
    """Open descriptors of a LUKS container: data (owned by the caller once a
    Volume takes it) and header (the same descriptor unless detached)."""

    data_fd: int
    header_fd: int
    data_path: str
    header_path: str
    detached: bool

    @property
    def header_size(self) -> int:
        """Size in bytes of the device or file holding the header."""
        return device_size(self.header_fd)

    @property
    def data_size(self) -> int:
        """Size in bytes of the device or file holding the data area."""
        return device_size(self.data_fd)


@contextmanager
def open_devices(data_path: str, header_path: str | None, readonly: bool) -> Iterator[Devices]:
    """Open the data container (locked as :func:`open_device` does) and the header.

    The header file of a detached header is opened read-only and unlocked: it
    is never written, and it may be shared by several read-only users.  On
    leaving the block normally the *header* descriptor is closed (if separate)
    and the data descriptor is left open for the caller; on an exception both
    are closed.
    """
    detached = header_path is not None
    if detached:
        assert header_path is not None
        try:
            detached = not os.path.samefile(header_path, data_path)
        except OSError:
            detached = True  # a missing header file is reported by open_device below
    data_fd = open_device(data_path, readonly)
    header_fd = data_fd
    try:
        if detached:
            assert header_path is not None
            header_fd = open_device(header_path, True, lock=False)
        header_name = header_path if detached and header_path is not None else data_path
        yield Devices(data_fd, header_fd, data_path, header_name, detached)
    except BaseException:
        if header_fd != data_fd:
            os.close(header_fd)
        os.close(data_fd)
        raise
    if header_fd != data_fd:
        os.close(header_fd)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def check_uuid(text: str) -> str:
    """A LUKS UUID as given (``--uuid``), in libuuid's one form (``uuid_parse``: 36
    characters, hex and dashes; no braces, no ``urn:uuid:``, not without dashes),
    lower-cased as cryptsetup stores it."""
    if not _UUID.fullmatch(text):
        raise UsageError(f"Wrong LUKS UUID format provided: {text!r}.")
    return text.lower()
