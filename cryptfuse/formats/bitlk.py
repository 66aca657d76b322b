"""BITLK: BitLocker and BitLocker To Go volumes, as cryptsetup 2.6+ opens them.

Layout (learned from cryptsetup's ``lib/bitlk``; all integers little endian):

* sector 0: boot code ``EB 58 90`` (version 2; ``EB 52 90`` is version 1, refused),
  signature ``-FVE-FS-`` at byte 3 (To Go: ``MSWIN4.1``), sector size at byte 11;
  at byte 160 (To Go: 424) the encryption-type GUID and the offsets of the three
  copies of the FVE metadata;
* each FVE metadata copy (64 KiB area): a 64-byte block header (signature, size in
  16-byte units, version 2, current/next state, volume size, the three offsets,
  the moved volume header's offset), a 48-byte metadata header (metadata size,
  volume GUID, encryption method, creation time), then entries; right after the
  block (``size * 16``) a validation record whose CRC-32 covers the block and
  whose AES-CCM datum holds its SHA-256 under the VMK;
* entries (size, type, value, version; nested for VMKs): VMKs protected by a
  password (UTF-16LE, SHA-256 twice, then 2**20 SHA-256 rounds with the salt),
  a 48-digit recovery password, a startup key (``.BEK`` file) or a clear key; each
  VMK is AES-CCM wrapped under its protector, the FVEK under the VMK.

The decrypted volume is the device with the three metadata areas and the original
place of the volume header reading as zeros, and the first ``volume_header_size``
bytes served from the encrypted copy of the NTFS header (IV sectors are always the
device's own sector numbers).  Writes to the zero areas are dropped, as dm-zero
does.  Nothing here writes to the container while opening it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import (
    DeviceError,
    FormatError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..foreign_crypto import aes_ccm_decrypt, bitlk_stretch
from ..kdf import digest_equal
from ..sector import Buffer, SectorCipher
from ..spec import parse_cipher_spec
from ..volume import ExtentMap, SegmentedVolume, device_size, open_device, pwrite_all
from .luks_common import pread_exact

SIGNATURE = b"-FVE-FS-"
SIGNATURE_TOGO = b"MSWIN4.1"
BOOTCODE_V1 = b"\xeb\x52\x90"
BOOTCODE_V2 = b"\xeb\x58\x90"
FVE_AREA_SIZE = 64 * 1024
STATE_NORMAL = 0x0004
GUID_NORMAL = bytes.fromhex("3bd66749292ed84a8399f6a339e3d001")
GUID_EOW = bytes.fromhex("3b4da89280dd0e4d9e4eb1e3284eaed8")

_BLOCK = struct.Struct("<8sHHHHQII3QQ")  # FVE metadata block header, 64 bytes
_HEADER = struct.Struct("<IIII16sIHHQ")  # FVE metadata header, 48 bytes
_VALIDATION = struct.Struct("<HHIHHHH72s")  # validation record, 88 bytes
_ENTRY = struct.Struct("<HHHH")

ENTRY_PROPERTY, ENTRY_VMK, ENTRY_FVEK = 0x0000, 0x0002, 0x0003
ENTRY_STARTUP_KEY, ENTRY_DESCRIPTION = 0x0006, 0x0007
ENTRY_VOLUME_HEADER, ENTRY_VOLUME_GUID = 0x000F, 0x0019
VALUE_KEY, VALUE_STRING, VALUE_STRETCH_KEY, VALUE_USE_KEY = 0x0001, 0x0002, 0x0003, 0x0004
VALUE_ENCRYPTED_KEY, VALUE_TPM_KEY, VALUE_EXTERNAL_KEY = 0x0005, 0x0006, 0x0009
VALUE_RECOVERY_TIME, VALUE_GUID, VALUE_HINT = 0x0015, 0x0017, 0x0018

PROTECTIONS = {
    0x0000: "clear key",
    0x0100: "TPM",
    0x0200: "startup key",
    0x0500: "TPM and PIN",
    0x0800: "recovery passphrase",
    0x1000: "smart card",
    0x2000: "passphrase",
}
SUPPORTED_PROTECTIONS = ("passphrase", "recovery passphrase", "startup key", "clear key")

#: encryption method -> (cipher spec, volume key bits)
METHODS = {
    0x8000: ("aes-cbc-elephant", 256),
    0x8001: ("aes-cbc-elephant", 512),
    0x8002: ("aes-cbc-eboiv", 128),
    0x8003: ("aes-cbc-eboiv", 256),
    0x8004: ("aes-xts-plain64", 256),
    0x8005: ("aes-xts-plain64", 512),
}

_KEY_DATA_HEADER = 12  # size, version, type... before the key in decrypted key data
_EPOCH_AS_FILETIME = 116444736000000000


def _guid(raw: bytes) -> str:
    """Microsoft's mixed-endian GUID as text (what cryptsetup prints)."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


def _utf16(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-16-le").rstrip("\0")
    except UnicodeDecodeError:
        raise FormatError(f"invalid string in the BITLK {what}") from None


@dataclass(repr=False)
class BitlkVMK:
    """A volume master key entry: its protector and wrapped key material."""

    guid: str
    protection: str
    name: str | None = None
    salt: bytes = bytes(16)
    nonce: bytes = b""
    tag: bytes = b""
    #: key entries in order: for a clear key the clear key, then the wrapped VMK
    keys: list[bytes] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"BitlkVMK({self.guid}, {self.protection})"


@dataclass(repr=False)
class BitlkMetadata:
    """What :func:`read_bitlk_metadata` found (the first valid FVE metadata copy)."""

    togo: bool
    sector_size: int
    type: str  # "normal", "encrypt-on-write" or "unknown"
    state_normal: bool
    current_state: int
    next_state: int
    version: int
    volume_size: int
    guid: str
    creation_time: int  # seconds since 1970
    description: str | None
    cipher: str
    key_bits: int
    metadata_offsets: tuple[int, int, int]
    volume_header_offset: int
    volume_header_size: int
    fve_sha256: bytes
    validation_nonce: bytes
    validation_tag: bytes
    validation_datum: bytes
    vmks: list[BitlkVMK]
    fvek_nonce: bytes
    fvek_tag: bytes
    fvek_wrapped: bytes

    def __repr__(self) -> str:
        return f"<BITLK {self.guid} {self.cipher} {self.key_bits} bits>"


def _entries(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(start, size, type, value) of each entry of data[start:end]; stops at size 0."""
    while end - start >= 6:
        size, kind, value = struct.unpack_from("<HHH", data, start)
        if size == 0:
            return
        if size > end - start:
            raise FormatError("BITLK metadata entry runs past its container")
        yield start, size, kind, value
        start += size


def _parse_vmk(data: bytes, start: int, end: int, vmk: BitlkVMK) -> None:
    supported = vmk.protection in SUPPORTED_PROTECTIONS
    for at, size, kind, value in _entries(data, start, end):
        if kind != ENTRY_PROPERTY and supported:
            raise FormatError(f"unexpected metadata entry type {kind} in a supported VMK")
        if value == VALUE_STRETCH_KEY:
            if end - at < 8 + 16 + 4:
                raise FormatError("BITLK stretch key entry is too short")
            vmk.salt = data[at + 12 : at + 28]
        elif value == VALUE_ENCRYPTED_KEY:
            if size < 8 + 12 + 16:
                raise FormatError("BITLK encrypted key entry is too short")
            vmk.nonce = data[at + 8 : at + 20]
            vmk.tag = data[at + 20 : at + 36]
            vmk.keys.append(data[at + 36 : at + size])
        elif value == VALUE_KEY:
            if size < 12:
                raise FormatError("BITLK key entry is too short")
            vmk.keys.append(data[at + 12 : at + size])
        elif value in (VALUE_RECOVERY_TIME, VALUE_HINT):
            pass
        elif value == VALUE_STRING:
            text = _utf16(data[at + 8 : at + size], "VMK name")
            if vmk.name is None:
                vmk.name = text
            elif supported:
                raise FormatError(f"unexpected string ({text!r}) in a supported VMK")
        elif value == VALUE_USE_KEY and vmk.protection == "startup key":
            pass
        elif value == VALUE_TPM_KEY and vmk.protection == "TPM":
            pass
        elif supported:
            raise FormatError(f"unexpected metadata entry value {value} in a supported VMK")


def _read_copy(fd: int, offset: int) -> tuple[bytes, bytes] | None:
    """(FVE block, validation record) of the copy at *offset*, or None if it is not valid."""
    try:
        head = pread_exact(fd, _BLOCK.size + _HEADER.size, offset, "BITLK FVE metadata")
    except DeviceError:
        return None
    signature, size16, version = struct.unpack_from("<8sHH", head)
    size = size16 << 4
    if signature != SIGNATURE or version != 2 or size > FVE_AREA_SIZE:
        return None
    try:
        validation = pread_exact(fd, _VALIDATION.size, offset + size, "BITLK validation")
        block = pread_exact(fd, size, offset, "BITLK FVE metadata")
    except DeviceError:
        return None
    vsize, vversion, crc = struct.unpack_from("<HHI", validation)
    if vsize < 8 or vversion > 2 or zlib.crc32(block) != crc:
        return None
    if len(block) < _BLOCK.size + _HEADER.size:
        return None
    return block, validation


def read_bitlk_metadata(fd: int, path: str) -> BitlkMetadata:
    """Parse the BITLK signature and the first valid FVE metadata copy of *fd*.

    Raises :class:`FormatError` when *path* is not BITLK or its metadata is damaged,
    :class:`UnsupportedError` for version 1 or an unknown encryption method.
    """
    sig = pread_exact(fd, 13, 0, "BITLK signature")
    signature = sig[3:11]
    if signature == SIGNATURE:
        togo, sb_offset = False, 160
    elif signature == SIGNATURE_TOGO:
        togo, sb_offset = True, 424
    else:
        raise FormatError(f"{path} is not a BITLK device (no BitLocker signature)")
    if sig[:3] == BOOTCODE_V1:
        raise UnsupportedError("BITLK version 1 is currently not supported.")
    if sig[:3] != BOOTCODE_V2:
        raise FormatError("Invalid or unknown boot signature for BITLK device.")
    sector_size = struct.unpack_from("<H", sig, 11)[0] or 512
    if sector_size not in (512, 4096):
        raise FormatError(f"Unsupported sector size {sector_size}.")
    try:
        sb = pread_exact(fd, 40, sb_offset, "BITLK header")
    except DeviceError:
        raise FormatError(f"Failed to read BITLK header from {path}.") from None
    type_guid = sb[:16]
    kind = (
        "normal"
        if type_guid == GUID_NORMAL
        else "encrypt-on-write"
        if type_guid == GUID_EOW
        else "unknown"
    )
    offsets = struct.unpack_from("<3Q", sb, 16)
    found = None
    for index, offset in enumerate(offsets):
        copy = _read_copy(fd, offset)
        if copy is not None:
            found = index, copy
            break
    if found is None:
        raise FormatError(f"Failed to read and validate BITLK FVE metadata from {path}.")
    index, (block, validation) = found
    (_, size16, version, cur, nxt, volume_size, _, _, o0, o1, o2, vh_offset) = _BLOCK.unpack_from(
        block
    )
    copy_offsets = (o0, o1, o2)
    if offsets[index] != copy_offsets[index]:
        raise FormatError(f"Failed to validate the location of BITLK FVE metadata from {path}.")
    (vsize, _, _, nested_size, role, vtype, _, nested) = _VALIDATION.unpack(validation)
    if vsize < _VALIDATION.size or nested_size != 80 or role != 0 or vtype != 5:
        raise FormatError(f"Failed to parse BITLK FVE validation metadata from {path}.")
    (md_size, _, _, _, guid_raw, _, method, _, ctime) = _HEADER.unpack_from(block, _BLOCK.size)
    if method not in METHODS:
        raise UnsupportedError("Unknown or unsupported encryption type.")
    cipher, key_bits = METHODS[method]
    if md_size < _HEADER.size + 4 or md_size > FVE_AREA_SIZE:
        raise FormatError("BITLK metadata size is invalid")
    entries_end = _BLOCK.size + md_size
    if entries_end > len(block):
        raise FormatError(f"Failed to check BITLK metadata entries previously read from {path}.")
    start = _BLOCK.size + _HEADER.size
    vmks: list[BitlkVMK] = []
    fvek: tuple[bytes, bytes, bytes] | None = None
    description = None
    vh_offset_entry, vh_size = 0, 0
    have_vh = False
    for at, size, entry_type, _value in _entries(block, start, entries_end):
        if entry_type == ENTRY_VMK:
            if size < 8 + 28:
                raise FormatError("BITLK VMK entry is too short")
            guid = _guid(block[at + 8 : at + 24])
            protection_code = struct.unpack_from("<H", block, at + 34)[0]
            vmk = BitlkVMK(guid, PROTECTIONS.get(protection_code, "unknown"))
            _parse_vmk(block, at + 36, at + size, vmk)
            vmks.append(vmk)
        elif entry_type == ENTRY_FVEK and fvek is None:
            if size < 8 + 12 + 16:
                raise FormatError("BITLK FVEK entry is too short")
            fvek = block[at + 8 : at + 20], block[at + 20 : at + 36], block[at + 36 : at + size]
        elif entry_type == ENTRY_VOLUME_HEADER:
            if entries_end - at < 8 + 16:
                raise FormatError("BITLK volume header entry is too short")
            vh_offset_entry, vh_size = struct.unpack_from("<QQ", block, at + 8)
            have_vh = True
        elif entry_type == ENTRY_DESCRIPTION and description is None:
            description = _utf16(block[at + 8 : at + size], "description")
    if fvek is None:
        raise FormatError(f"{path}: BITLK metadata has no FVEK entry")
    del vh_offset  # the block header's copy; cryptsetup uses the entry's
    creation = max(0, (ctime - _EPOCH_AS_FILETIME) // 10_000_000)
    return BitlkMetadata(
        togo=togo,
        sector_size=sector_size,
        type=kind,
        state_normal=cur == STATE_NORMAL and nxt == STATE_NORMAL,
        current_state=cur,
        next_state=nxt,
        version=version,
        volume_size=volume_size,
        guid=_guid(guid_raw),
        creation_time=creation,
        description=description,
        cipher=cipher,
        key_bits=key_bits,
        metadata_offsets=copy_offsets,
        volume_header_offset=vh_offset_entry if have_vh else 0,
        volume_header_size=vh_size if have_vh else 0,
        fve_sha256=hashlib.sha256(block).digest(),
        validation_nonce=nested[:12],
        validation_tag=nested[12:28],
        validation_datum=nested[28:72],
        vmks=vmks,
        fvek_nonce=fvek[0],
        fvek_tag=fvek[1],
        fvek_wrapped=fvek[2],
    )


def has_bitlk_signature(fd: int) -> bool:
    """True when sector 0 carries a BitLocker or BitLocker To Go signature."""
    try:
        head = os.pread(fd, 11, 0)
    except OSError:
        return False
    return len(head) == 11 and head[3:11] in (SIGNATURE, SIGNATURE_TOGO)


# -- unlocking ----------------------------------------------------------------------


def recovery_key(secret: bytes) -> bytes | None:
    """The 16-byte key of a 48-digit recovery password, or None if *secret* is not one."""
    if len(secret) == 56 and secret.endswith(b"\n"):
        secret = secret[:-1]
    if len(secret) != 55:
        return None
    parts = secret.split(b"-")
    if len(parts) != 8 or any(len(p) != 6 or not p.isdigit() for p in parts):
        return None
    key = b""
    for part in parts:
        number = int(part)
        if number % 11:
            return None
        key += struct.pack("<H", (number // 11) & 0xFFFF)
    return key


def _password_hash(secret: bytes) -> bytes | None:
    """sha256(sha256(UTF-16LE password)); None when *secret* is not UTF-8 (cryptsetup
    then skips the protector)."""
    try:
        text = secret.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return hashlib.sha256(hashlib.sha256(text.encode("utf-16-le")).digest()).digest()


def _startup_key(secret: bytes, vmk: BitlkVMK, volume_guid: str) -> bytes | None:
    """The external key in a .BEK file meant for *vmk*, or None."""
    if len(secret) < 48 + 6:
        return None
    size, version = struct.unpack_from("<II", secret)
    if _guid(secret[16:32]) != vmk.guid:
        return None
    if version != 1:
        raise UnsupportedError(f"Unsupported BEK metadata version {version}")
    if size != len(secret):
        raise FormatError(f"Unexpected BEK metadata size {size} does not match BEK file length")
    entry_size, entry_type, entry_value = struct.unpack_from("<HHH", secret, 48)
    if entry_size < 8:
        return None
    if entry_type != ENTRY_STARTUP_KEY or entry_value != VALUE_EXTERNAL_KEY:
        raise FormatError("Unexpected metadata entry found when parsing startup key.")
    for at, esize, kind, value in _entries(secret, 48 + 8 + 24, len(secret)):
        if kind not in (ENTRY_PROPERTY, ENTRY_VOLUME_GUID):
            raise FormatError(f"unexpected metadata entry type {kind} in the external key")
        if value == VALUE_KEY:
            if esize < 12:
                raise FormatError("BEK key entry is too short")
            return secret[at + 12 : at + esize]
        if value == VALUE_STRING:
            continue
        if value == VALUE_GUID:
            if _guid(secret[at + 8 : at + 24]) != volume_guid:
                raise FormatError("BEK file GUID does not match GUID of the volume.")
            continue
        raise FormatError(f"unexpected metadata entry value {value} in the external key")
    raise FormatError("BEK file holds no key")


def _unwrap(key: bytes, wrapped: bytes, nonce: bytes, tag: bytes) -> bytes | None:
    """AES-CCM unwrap of BitLocker key data; the key after its 12-byte header, or None."""
    plain = aes_ccm_decrypt(key, nonce, wrapped, tag)
    if plain is None or len(plain) < _KEY_DATA_HEADER:
        return None
    if struct.unpack_from("<H", plain)[0] != len(wrapped):
        return None
    return plain


def _vmk_key(meta: BitlkMetadata, vmk: BitlkVMK, secret: bytes | None) -> bytes | None:
    """The key protecting *vmk* derived from *secret*, or None if it does not apply."""
    if vmk.protection == "clear key":
        if len(vmk.keys) < 2:
            return None
        return vmk.keys[0]
    if secret is None:
        return None
    if vmk.protection == "passphrase":
        initial = _password_hash(secret)
        return None if initial is None else bitlk_stretch(initial, vmk.salt)
    if vmk.protection == "recovery passphrase":
        rkey = recovery_key(secret)
        if rkey is None:
            return None
        return bitlk_stretch(hashlib.sha256(rkey).digest(), vmk.salt)
    if vmk.protection == "startup key":
        return _startup_key(secret, vmk, meta.guid)
    return None


def bitlk_volume_key(meta: BitlkMetadata, secret: bytes | None) -> bytes:
    """The FVEK, unlocked with *secret* (password, recovery password or .BEK file
    contents) or, with *secret* None, a clear-key protector.

    Raises :class:`WrongPassphraseError` when no protector opens,
    :class:`UnsupportedError` when only unsupported ones (TPM, smart card) exist.
    """
    supported = [v for v in meta.vmks if v.protection in SUPPORTED_PROTECTIONS]
    if not supported:
        raise UnsupportedError(
            "BITLK volume has no supported protector (only "
            + ", ".join(sorted({v.protection for v in meta.vmks}))
            + ")"
        )
    for vmk in supported:
        if secret is None and vmk.protection != "clear key":
            continue
        protector = _vmk_key(meta, vmk, secret)
        if protector is None:
            continue
        wrapped = vmk.keys[-1] if vmk.keys else b""
        plain = _unwrap(protector, wrapped, vmk.nonce, vmk.tag)
        if plain is None:
            continue
        vmk_key = plain[_KEY_DATA_HEADER:]
        datum = aes_ccm_decrypt(
            vmk_key, meta.validation_nonce, meta.validation_datum, meta.validation_tag
        )
        if datum is None or len(datum) < 44:
            raise FormatError("BITLK metadata validation cannot be decrypted with the VMK")
        _size, role, vtype, _flags, hash_type = struct.unpack_from("<HHHHH", datum)
        if role != 0 or vtype != 1 or hash_type != 0x2005:
            raise UnsupportedError("BITLK metadata validation of an unknown kind")
        if not digest_equal(datum[12:44], meta.fve_sha256):
            raise FormatError("BITLK FVE metadata fails its MAC validation (tampered?)")
        fvek = _unwrap(vmk_key, meta.fvek_wrapped, meta.fvek_nonce, meta.fvek_tag)
        if fvek is None:
            raise FormatError("BITLK FVEK cannot be decrypted with the VMK")
        key = fvek[_KEY_DATA_HEADER:]
        if meta.cipher == "aes-cbc-elephant" and meta.key_bits == 256:
            # 16-byte CBC key, 16 unused, 16-byte diffuser key, 16 unused
            key = key[:16] + key[32:48]
        if len(key) * 8 != meta.key_bits:
            raise FormatError(
                f"BITLK FVEK has {len(key) * 8} bits, the encryption method needs {meta.key_bits}"
            )
        return key
    raise WrongPassphraseError()


# -- the volume -----------------------------------------------------------------------


class BitlkVolume(SegmentedVolume):
    """A BITLK device: encrypted extents plus zero extents (``fd`` -1) whose writes
    are dropped, as dm-zero does."""

    def enable_discards(self) -> None:
        raise UsageError("discards are not supported on BITLK volumes")

    def resize(self, size: int) -> None:
        raise UsageError("BITLK volumes cannot be resized")

    def _read_sectors_into(self, first: int, out: memoryview) -> None:
        for e, at, into, length in self._pieces(first, len(out)):
            if e.fd < 0:
                out[into : into + length] = bytes(length)
                continue
            position = e.position + at
            raw = pread_exact(e.fd, length, position, f"{length} bytes at {position}")
            assert e.cipher is not None
            e.cipher.decrypt_into(raw, at // e.cipher.sector_size, out[into : into + length])

    def _write_sectors(self, first: int, plain: memoryview) -> None:
        for e, at, into, length in self._pieces(first, len(plain)):
            if e.fd < 0:
                continue
            assert e.cipher is not None
            data: Buffer = e.cipher.encrypt(plain[into : into + length], at // e.cipher.sector_size)
            position = e.position + at
            pwrite_all(e.fd, data, position, f"{length} bytes at {position}")


def layout(meta: BitlkMetadata, total: int) -> list[tuple[int, int, int | None]]:
    """The device map as (volume start, length, device position or None for zeros).

    The volume is the device (*total* bytes, whole sectors): [0, header size) comes
    from the encrypted volume header copy, the metadata areas and that copy's own
    place read as zeros, everything else maps onto itself.
    """
    ss = meta.sector_size
    total -= total % ss
    zeros = [(o, FVE_AREA_SIZE) for o in meta.metadata_offsets]
    zeros.append((meta.volume_header_offset, meta.volume_header_size))
    hsize = meta.volume_header_size
    for start, length in [*zeros, (meta.volume_header_offset, hsize)]:
        if start % ss or length % ss:
            raise FormatError("BITLK metadata areas are not aligned to the sector size")
    if hsize and meta.volume_header_offset + hsize > total:
        raise FormatError("BITLK volume header copy lies beyond the end of the device")
    spans = sorted((s, min(s + n, total)) for s, n in zeros if n and s < total)
    for s, _end in spans:
        if s < hsize:
            raise FormatError("BITLK metadata overlaps the volume header area")
    pieces: list[tuple[int, int, int | None]] = []
    if hsize:
        pieces.append((0, hsize, meta.volume_header_offset))
    cursor = hsize
    for s, e in spans:
        if s > cursor:
            pieces.append((cursor, s - cursor, cursor))
        if e > cursor:
            pieces.append((max(s, cursor), e - max(s, cursor), None))
            cursor = e
    if cursor < total:
        pieces.append((cursor, total - cursor, cursor))
    return pieces


def open_bitlk(container: str, secret: bytes | None, readonly: bool) -> BitlkVolume:
    """Open a BitLocker device, unlocking it with *secret* (see :func:`bitlk_volume_key`)."""
    fd = open_device(container, readonly)
    try:
        meta = read_bitlk_metadata(fd, container)
        check_activation(meta)
        key = bitlk_volume_key(meta, secret)
        return volume_from_key(fd, meta, key, readonly, container)
    except BaseException:
        os.close(fd)
        raise


def check_activation(meta: BitlkMetadata) -> None:
    """Refuse what cryptsetup refuses to activate (unusual states, encrypt-on-write)."""
    if not meta.state_normal:
        raise UnsupportedError(
            "This BITLK device is in an unsupported state and cannot be activated."
        )
    if meta.type != "normal":
        raise UnsupportedError(f"BITLK devices with type '{meta.type}' cannot be activated.")


def volume_from_key(
    fd: int, meta: BitlkMetadata, key: bytes, readonly: bool, container: str
) -> BitlkVolume:
    """The decrypted device of *meta* with FVEK *key*; takes ownership of *fd*."""
    spec = parse_cipher_spec(meta.cipher)
    ss = meta.sector_size
    total = device_size(fd)
    if total < ss:
        raise DeviceError(f"{container} is too small for a BITLK volume")
    extents = []
    for start, length, position in layout(meta, total):
        if position is None:
            extents.append(ExtentMap(start, length, -1, 0, None))
            continue
        cipher = SectorCipher(spec, key, ss, iv_offset=position // 512, iv_large_sectors=ss != 512)
        extents.append(ExtentMap(start, length, fd, position, cipher))
    try:
        return BitlkVolume(
            fd,
            extents,
            readonly=readonly,
            description=f"BITLK {container}",
            granule=ss,
        )
    except UsageError as exc:
        raise FormatError(f"BITLK layout of {container} is invalid: {exc}") from None


def dump(meta: BitlkMetadata, path: str) -> str:
    """``cryptsetup bitlkDump``'s text for *meta*."""
    created = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(meta.creation_time))
    cipher, mode = meta.cipher.split("-", 1)
    lines = [
        f"Info for BITLK{' To Go' if meta.togo else ''} device {path}.",
        f"Version:      \t{meta.version}",
        f"GUID:         \t{meta.guid}",
        f"Sector size:  \t{meta.sector_size} [bytes]",
        f"Volume size:  \t{meta.volume_size} [bytes]",
        f"Created:      \t{created}",
        f"Description:  \t{meta.description}",
        f"Cipher name:  \t{cipher}",
        f"Cipher mode:  \t{mode}",
        f"Cipher key:   \t{meta.key_bits} bits",
        "",
        "Keyslots:",
    ]
    for i, vmk in enumerate(meta.vmks):
        lines.append(f" {i}: VMK")
        if vmk.name is not None:
            lines.append(f"\tName:       \t{vmk.name}")
        lines.append(f"\tGUID:       \t{vmk.guid}")
        lines.append(f"\tProtection: \tVMK protected with {vmk.protection}")
        lines.append(f"\tSalt:       \t{vmk.salt.hex()}")
        for k in vmk.keys:
            lines.append(f"\tKey data size:\t{len(k)} [bytes]")
    lines.append(f" {len(meta.vmks)}: FVEK")
    lines.append(f"\tKey data size:\t{len(meta.fvek_wrapped)} [bytes]")
    lines += ["", "Metadata segments:"]
    for i, offset in enumerate(meta.metadata_offsets):
        lines += [
            f" {i}: FVE metadata area",
            f"\tOffset: \t{offset} [bytes]",
            f"\tSize:   \t{FVE_AREA_SIZE} [bytes]",
        ]
    lines += [
        " 3: Volume header",
        f"\tOffset: \t{meta.volume_header_offset} [bytes]",
        f"\tSize:   \t{meta.volume_header_size} [bytes]",
        f"\tCipher: \t{meta.cipher}",
    ]
    return "\n".join(lines)
