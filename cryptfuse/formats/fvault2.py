"""FVAULT2: Apple Core Storage volumes encrypted with FileVault 2 (password protector).

What cryptsetup 2.6+ supports (learned from its ``lib/fvault2``), little endian
unless noted:

* the physical volume header (512 bytes at 0): CRC-32C (seed 0xffffffff) of bytes
  8..511, version 1, magic ``CS`` (big endian) at 88, block size at 96, the disk
  label's block at 104, a 16-byte AES key at 176 and the physical volume UUID at
  304.  Key || UUID is the AES-128-XTS key of the encrypted metadata;
* the disk label (one 8 KiB metadata block, CRC-checked) points to the volume groups
  descriptor, which gives the first block and the count of encrypted metadata
  blocks; each 8 KiB block is one XTS data unit whose tweak is its index;
* decrypted blocks of type 0x0019 (an XML plist with the base64
  ``PassphraseWrappedKEKStruct`` and ``KEKWrappedVolumeKeyStruct``), 0x001A (the
  logical volume's size and family UUID) and 0x0305 (its first block);
* unlocking: PBKDF2-SHA256(password, salt, iterations, 16) unwraps (RFC 3394) the
  KEK, the KEK unwraps the 16-byte volume key; the XTS key is that key followed by
  the first 16 bytes of SHA-256(key || family UUID);
* the logical volume is aes-xts-plain64 with 512-byte sectors, IV 0 at its start.

Metadata offsets beyond 1 GiB are refused as cryptsetup does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
import uuid
from dataclasses import dataclass

from ..errors import DeviceError, FormatError, UsageError, WrongPassphraseError
from ..foreign_crypto import aes_unwrap, crc_table, xts_decrypt_unit
from ..kdf import pbkdf2
from ..sector import SectorCipher
from ..spec import parse_cipher_spec
from ..volume import Volume, device_size, open_device
from .luks_common import pread_exact

HEADER_SIZE = 512
BLOCK_SIZE = 8192
MAX_OFFSET = 1 << 30
CORE_STORAGE_MAGIC = 0x4353
PWK_SIZE = 284
KWVK_SIZE = 256
CIPHER = "aes-xts-plain64"


_CRC32C = crc_table(0x82F63B78)


def crc32c(seed: int, data: bytes) -> int:
    """CRC-32C (Castagnoli) as Core Storage uses it: no final inversion."""
    crc = seed
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _crc_ok(block: bytes) -> bool:
    value, seed = struct.unpack_from("<II", block)
    return bool(seed == 0xFFFFFFFF and crc32c(seed, block[8:]) == value)


@dataclass(repr=False)
class Fvault2Metadata:
    """What :func:`read_fvault2_metadata` found."""

    block_size: int
    physical_uuid: str
    family_uuid: str
    logical_offset: int
    logical_size: int
    pbkdf2_iterations: int
    pbkdf2_salt: bytes
    wrapped_kek: bytes
    wrapped_vk: bytes

    def __repr__(self) -> str:
        return f"<FVAULT2 {self.family_uuid} at {self.logical_offset}>"


def has_fvault2_signature(fd: int) -> bool:
    """True when the first 512 bytes are a valid Core Storage physical volume header."""
    try:
        head = os.pread(fd, HEADER_SIZE, 0)
    except OSError:
        return False
    return (
        len(head) == HEADER_SIZE
        and struct.unpack_from(">H", head, 88)[0] == CORE_STORAGE_MAGIC
        and _crc_ok(head)
    )


def _xml_value(xml: str, key: str, kind: str) -> str:
    match = re.search(rf"<key>{re.escape(key)}</key><{kind}[^>]*>([^<]+)</{kind}>", xml)
    if match is None:
        raise FormatError(f"FVAULT2 metadata lacks {key}")
    return match[1]


def _xml(block: bytes, off_at: int) -> str:
    xml_off, xml_size = struct.unpack_from("<II", block, off_at)
    if xml_off >= BLOCK_SIZE or xml_size > BLOCK_SIZE - xml_off:
        raise FormatError("FVAULT2 XML metadata lies outside its block")
    raw = block[xml_off : xml_off + xml_size].split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace")


def _b64(text: str, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"FVAULT2 {what} is not valid base64") from None
    if len(data) != size:
        raise FormatError(f"FVAULT2 {what} has {len(data)} bytes, not {size}")
    return data


def _offset(blocks: int, block_size: int) -> int:
    off = blocks * block_size
    if off > MAX_OFFSET:
        raise FormatError("FVAULT2 metadata offset is beyond 1 GiB (device offset overflow)")
    return off


def read_fvault2_metadata(fd: int, path: str) -> Fvault2Metadata:
    """Parse the Core Storage headers and the encrypted metadata of *fd*.

    Raises :class:`FormatError` for anything that is not a FileVault 2 volume
    cryptsetup could open.
    """
    try:
        head = pread_exact(fd, HEADER_SIZE, 0, "FVAULT2 volume header")
    except DeviceError:
        raise FormatError(f"{path} is too small for a FVAULT2 volume header") from None
    if not _crc_ok(head) or struct.unpack_from(">H", head, 88)[0] != CORE_STORAGE_MAGIC:
        raise FormatError(f"{path} is not a FVAULT2 device (no Core Storage header)")
    version = struct.unpack_from("<H", head, 8)[0]
    if version != 1:
        raise FormatError(f"Unsupported FVAULT2 version {version}.")
    if struct.unpack_from("<I", head, 168)[0] != 16:
        raise FormatError("FVAULT2 metadata key is not a 128-bit AES key")
    block_size = struct.unpack_from("<I", head, 96)[0]
    disklabel = struct.unpack_from("<Q", head, 104)[0]
    physical_uuid_raw = head[304:320]
    md_key = head[176:192] + physical_uuid_raw
    if block_size == 0:
        raise FormatError("FVAULT2 block size is 0")

    label_off = _offset(disklabel, block_size)
    try:
        label = pread_exact(fd, BLOCK_SIZE, label_off, "FVAULT2 disk label")
    except DeviceError:
        raise FormatError(f"{path}: FVAULT2 disk label lies beyond the end") from None
    if not _crc_ok(label):
        raise FormatError(f"{path}: FVAULT2 disk label checksum mismatch")
    groups_off = label_off + struct.unpack_from("<I", label, 220)[0]
    if groups_off > MAX_OFFSET:
        raise FormatError("FVAULT2 volume groups descriptor is beyond 1 GiB")
    try:
        groups = pread_exact(fd, 40, groups_off, "FVAULT2 volume groups descriptor")
    except DeviceError:
        raise FormatError(f"{path}: FVAULT2 volume groups descriptor is missing") from None
    blocks_n, first = struct.unpack_from("<Q16xQ", groups, 8)
    start = _offset(first, block_size)

    keys: tuple[int, bytes, bytes, bytes] | None = None
    lv: tuple[int, str] | None = None
    lv_block: int | None = None
    for i in range(blocks_n):
        off = start + i * BLOCK_SIZE
        if off > MAX_OFFSET:
            raise FormatError("FVAULT2 encrypted metadata runs beyond 1 GiB")
        try:
            encrypted = pread_exact(fd, BLOCK_SIZE, off, "FVAULT2 encrypted metadata")
        except DeviceError:
            raise FormatError(f"{path}: FVAULT2 encrypted metadata is truncated") from None
        if not any(encrypted):
            break
        try:
            block = xts_decrypt_unit("aes", md_key, struct.pack("<Q8x", i), encrypted)
        except ValueError:
            raise FormatError(f"{path}: FVAULT2 metadata key is invalid") from None
        if not _crc_ok(block):
            raise FormatError(f"{path}: FVAULT2 encrypted metadata block {i} checksum mismatch")
        block_type = struct.unpack_from("<H", block, 10)[0]
        if block_type == 0x0019:
            xml = _xml(block, 112)
            pwk = _b64(_xml_value(xml, "PassphraseWrappedKEKStruct", "data"), PWK_SIZE, "KEK")
            kwvk = _b64(
                _xml_value(xml, "KEKWrappedVolumeKeyStruct", "data"), KWVK_SIZE, "volume key"
            )
            iterations = struct.unpack_from("<I", pwk, 168)[0]
            keys = iterations, pwk[8:24], pwk[32:56], kwvk[8:32]
        elif block_type == 0x001A:
            xml = _xml(block, 128)
            size_text = _xml_value(xml, "com.apple.corestorage.lv.size", "integer").strip()
            hex_match = re.match(r"(?:0[xX])?([0-9a-fA-F]+)", size_text)
            size = int(hex_match[1], 16) if hex_match else 0
            if size == 0 or size >= (1 << 64) - 1:
                raise FormatError("FVAULT2 logical volume size is invalid")
            family = _xml_value(xml, "com.apple.corestorage.lv.familyUUID", "string")
            try:
                family_uuid = str(uuid.UUID(family.strip()))
            except ValueError:
                raise FormatError(f"FVAULT2 family UUID {family!r} is invalid") from None
            lv = size, family_uuid
        elif block_type == 0x0305:
            lv_block = struct.unpack_from("<I", block, 104)[0]
    if keys is None or lv is None or lv_block is None:
        raise FormatError(f"{path}: necessary FVAULT2 metadata blocks not found")
    iterations, salt, wrapped_kek, wrapped_vk = keys
    if iterations == 0:
        raise FormatError("FVAULT2 PBKDF2 iteration count is 0")
    return Fvault2Metadata(
        block_size=block_size,
        physical_uuid=str(uuid.UUID(bytes=physical_uuid_raw)),
        family_uuid=lv[1],
        logical_offset=lv_block * block_size,
        logical_size=lv[0],
        pbkdf2_iterations=iterations,
        pbkdf2_salt=salt,
        wrapped_kek=wrapped_kek,
        wrapped_vk=wrapped_vk,
    )


def fvault2_volume_key(meta: Fvault2Metadata, passphrase: bytes) -> bytes:
    """The 256-bit AES-XTS volume key; :class:`WrongPassphraseError` if it does not unwrap."""
    derived = pbkdf2("sha256", passphrase, meta.pbkdf2_salt, meta.pbkdf2_iterations, 16)
    kek = aes_unwrap(derived, meta.wrapped_kek)
    if kek is None:
        raise WrongPassphraseError()
    key = aes_unwrap(kek, meta.wrapped_vk)
    if key is None:
        raise FormatError("FVAULT2 volume key does not unwrap with the KEK (damaged metadata)")
    tweak_key = hashlib.sha256(key + uuid.UUID(meta.family_uuid).bytes).digest()[:16]
    return key + tweak_key


def volume_from_key(
    fd: int, meta: Fvault2Metadata, key: bytes, readonly: bool, container: str
) -> Volume:
    """The logical volume of *meta* decrypted with *key*; takes ownership of *fd*."""
    total = device_size(fd)
    size = meta.logical_size - meta.logical_size % 512
    if meta.logical_offset + size > total or size == 0:
        raise DeviceError(
            f"{container}: the FVAULT2 logical volume ({size} bytes at "
            f"{meta.logical_offset}) does not fit in the device ({total} bytes)"
        )
    try:
        cipher = SectorCipher(parse_cipher_spec(CIPHER), key, 512)
    except UsageError as exc:
        raise FormatError(f"FVAULT2 volume key is invalid: {exc}") from None
    return Volume(
        fd, cipher, meta.logical_offset, size, readonly=readonly, description=f"FVAULT2 {container}"
    )


def open_fvault2(container: str, passphrase: bytes, readonly: bool) -> Volume:
    """Open a FileVault 2 volume with its password."""
    fd = open_device(container, readonly)
    try:
        meta = read_fvault2_metadata(fd, container)
        key = fvault2_volume_key(meta, passphrase)
        return volume_from_key(fd, meta, key, readonly, container)
    except BaseException:
        os.close(fd)
        raise


def dump(meta: Fvault2Metadata, path: str) -> str:
    """``cryptsetup fvault2Dump``'s text for *meta*."""
    cipher, mode = CIPHER.split("-", 1)
    salt = " ".join(f"{b:02x}" for b in meta.pbkdf2_salt)
    return "\n".join(
        [
            f"Header information for FVAULT2 device {path}.",
            f"Physical volume UUID: \t{meta.physical_uuid}",
            f"Family UUID:          \t{meta.family_uuid}",
            f"Logical volume offset:\t{meta.logical_offset} [bytes]",
            f"Logical volume size:  \t{meta.logical_size} [bytes]",
            f"Cipher:               \t{cipher}",
            f"Cipher mode:          \t{mode}",
            f"PBKDF2 iterations:    \t{meta.pbkdf2_iterations}",
            f"PBKDF2 salt:          \t{salt} ",
        ]
    )
