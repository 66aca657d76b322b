"""Writing LUKS1 headers: format layout, keyslot creation and removal.

The layout is cryptsetup's (``LUKS_generate_phdr``): the 592-byte header,
then eight keyslot areas, each starting on a 4096-byte boundary (8 sectors)
and as long as the AF material rounded up to that boundary; the payload starts
at the next multiple of the alignment (1 MiB by default) unless ``--offset``
fixes it.

Crash safety rests on the order of small writes: a keyslot's material is
written and made durable while the slot is still marked disabled; its
parameters (iterations, salt) follow, still disabled; only then is the 4-byte
``active`` word flipped to ``0x00AC71F3``.  A torn write of that word can only
produce a value other than the magic, which every LUKS implementation treats as
disabled.  Removal flips the word to ``0x0000DEAD`` only after the material has
been overwritten, so a crash in between leaves an enabled slot whose passphrase
no longer opens anything, and all other slots untouched.
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import replace

from ..af import af_sectors
from ..errors import CryptfuseError, UnsupportedError, UsageError
from ..kdf import hash_size, pbkdf2
from .luks1 import (
    HEADER_SIZE,
    KEY_DISABLED,
    KEY_ENABLED,
    MAGIC,
    NUM_KEYSLOTS,
    SALT_SIZE,
    STRIPES,
    LUKS1Header,
    LUKS1Keyslot,
)
from .luks_common import check_uuid
from .luks_write import KdfParams, derive, encrypt_keyslot_material, pwrite_all, sync, wipe_area

__all__ = [
    "KEYSLOT_RECORD_OFFSET",
    "Luks1Layout",
    "clear_keyslot",
    "format_luks1",
    "luks1_layout",
    "serialize_luks1",
    "set_keyslot",
    "write_uuid",
]

_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_KEYSLOT = struct.Struct(">II32sII")
#: byte offset of keyslot 0's 48-byte record in the header
KEYSLOT_RECORD_OFFSET = _PHDR.size
_UUID_OFFSET = 168
#: keyslot areas start on 4 KiB boundaries (cryptsetup's LUKS_ALIGN_KEYSLOTS)
KEYSLOT_ALIGN_SECTORS = 8
#: default payload alignment: 1 MiB (DEFAULT_DISK_ALIGNMENT)
DEFAULT_ALIGN_SECTORS = 2048


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _field(text: str, size: int, name: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size:
        raise UsageError(f"LUKS1 {name} {text!r} is too long (at most {size - 1} characters)")
    return raw.ljust(size, b"\0")


def serialize_luks1(h: LUKS1Header) -> bytes:
    """The 592 bytes of *h* (the inverse of :meth:`LUKS1Header.parse`)."""
    out = bytearray(
        _PHDR.pack(
            MAGIC,
            1,
            _field(h.cipher_name, 32, "cipher name"),
            _field(h.cipher_mode, 32, "cipher mode"),
            _field(h.hash_spec, 32, "hash"),
            h.payload_offset,
            h.key_bytes,
            h.mk_digest,
            h.mk_digest_salt,
            h.mk_digest_iterations,
            _field(h.uuid, 40, "UUID"),
        )
    )
    for slot in h.keyslots:
        out += _KEYSLOT.pack(
            slot.active, slot.iterations, slot.salt, slot.key_material_offset, slot.stripes
        )
    assert len(out) == HEADER_SIZE
    return bytes(out)


class Luks1Layout:
    """Keyslot material offsets and the payload offset, in 512-byte sectors."""

    def __init__(
        self, slot_offsets: tuple[int, ...], payload_offset: int, end_of_keyslots: int
    ) -> None:
        self.slot_offsets = slot_offsets
        self.payload_offset = payload_offset
        self.end_of_keyslots = end_of_keyslots


def luks1_layout(
    key_bytes: int, *, offset: int | None, detached: bool, align: int | None = None
) -> Luks1Layout:
    """cryptsetup's LUKS1 layout for a *key_bytes* key.

    *offset* (sectors) fixes the payload; otherwise it is the end of the keyslots
    rounded up to *align* sectors (default 1 MiB), or 0 for a detached header.  A
    payload offset inside the header area is refused, detached or not: cryptsetup's
    keyslot checks would refuse the header (the keyslots must end before the data).
    """
    per_slot = _round_up(af_sectors(key_bytes, STRIPES), KEYSLOT_ALIGN_SECTORS)
    first = _round_up(_round_up(HEADER_SIZE, 512) // 512, KEYSLOT_ALIGN_SECTORS)
    slots = tuple(first + i * per_slot for i in range(NUM_KEYSLOTS))
    end = first + NUM_KEYSLOTS * per_slot
    if offset:
        if offset < end:
            raise UsageError(
                "Data offset for LUKS header must be either 0 or higher than header size."
            )
        payload = offset
    elif detached:
        payload = 0
    else:
        payload = _round_up(end, align or DEFAULT_ALIGN_SECTORS)
    return Luks1Layout(slots, payload, end)


def format_luks1(
    fd: int,
    *,
    cipher_name: str,
    cipher_mode: str,
    hash_spec: str,
    volume_key: bytes,
    layout: Luks1Layout,
    mk_iterations: int,
    uuid: str | None,
) -> LUKS1Header:
    """Write a fresh LUKS1 header with every keyslot disabled; return it.

    The header area (up to the end of the keyslots) is zeroed first, as
    cryptsetup does, so no earlier keyslot material survives a re-format.
    """
    if hash_size(hash_spec) < 20:
        raise UnsupportedError(f"Requested LUKS hash {hash_spec} is not supported.")
    salt = os.urandom(SALT_SIZE)
    digest = pbkdf2(hash_spec, volume_key, salt, mk_iterations, 20)
    text_uuid = check_uuid(uuid) if uuid else str(uuidlib.uuid4())
    header = LUKS1Header(
        version=1,
        cipher_name=cipher_name,
        cipher_mode=cipher_mode,
        hash_spec=hash_spec,
        payload_offset=layout.payload_offset,
        key_bytes=len(volume_key),
        mk_digest=digest,
        mk_digest_salt=salt,
        mk_digest_iterations=mk_iterations,
        uuid=text_uuid,
        keyslots=tuple(
            LUKS1Keyslot(i, KEY_DISABLED, 0, bytes(SALT_SIZE), off, STRIPES)
            for i, off in enumerate(layout.slot_offsets)
        ),
    )
    raw = serialize_luks1(header)
    # The magic goes last, so a crash leaves no half-written LUKS header.
    pwrite_all(fd, bytes(layout.end_of_keyslots * 512), 0, "LUKS1 header area")
    pwrite_all(fd, raw[6:], 6, "LUKS1 header")
    sync(fd)
    pwrite_all(fd, raw[:6], 0, "LUKS1 header")
    sync(fd)
    return header


def _record_offset(index: int) -> int:
    return KEYSLOT_RECORD_OFFSET + index * _KEYSLOT.size


def derive_keyslot_key(
    header: LUKS1Header, passphrase: bytes, params: KdfParams
) -> tuple[bytes, bytes]:
    """A fresh salt and the key PBKDF2 derives from *passphrase* with it."""
    if params.type != "pbkdf2":
        raise UsageError("LUKS1 keyslots use PBKDF2 only (--pbkdf pbkdf2).")
    salt = os.urandom(SALT_SIZE)
    return salt, derive(replace(params, hash=header.hash_spec), passphrase, salt, header.key_bytes)


def set_keyslot(
    fd: int,
    header: LUKS1Header,
    index: int,
    volume_key: bytes,
    passphrase: bytes,
    params: KdfParams,
    *,
    salted_key: tuple[bytes, bytes] | None = None,
) -> LUKS1Header:
    """Store *volume_key* under *passphrase* in the disabled keyslot *index*
    (*salted_key*: a salt and derived key from :func:`derive_keyslot_key`, to
    reuse one derivation).

    Order: material (durable) -> parameters with the slot still disabled
    (durable) -> the ``active`` word (durable).
    """
    if params.type != "pbkdf2":
        raise UsageError("LUKS1 keyslots use PBKDF2 only (--pbkdf pbkdf2).")
    if not 0 <= index < NUM_KEYSLOTS:
        raise UsageError(f"Key slot {index} is invalid.")
    old = header.keyslots[index]
    if old.enabled:
        raise CryptfuseError(f"Key slot {index} is full, please select another one.")
    spec = header.cipher_spec
    salt, derived = salted_key or derive_keyslot_key(header, passphrase, params)
    material = encrypt_keyslot_material(volume_key, STRIPES, header.hash_spec, spec, derived)
    pwrite_all(fd, material, old.key_material_offset * 512, f"keyslot {index} key material")
    sync(fd)
    new = replace(old, iterations=params.iterations, salt=salt, active=KEY_DISABLED)
    record = _KEYSLOT.pack(
        new.active, new.iterations, new.salt, new.key_material_offset, new.stripes
    )
    pwrite_all(fd, record[4:], _record_offset(index) + 4, f"keyslot {index} parameters")
    sync(fd)
    pwrite_all(fd, KEY_ENABLED.to_bytes(4, "big"), _record_offset(index), f"keyslot {index} state")
    sync(fd)
    slots = list(header.keyslots)
    slots[index] = replace(new, active=KEY_ENABLED)
    return replace(header, keyslots=tuple(slots))


def clear_keyslot(fd: int, header: LUKS1Header, index: int) -> LUKS1Header:
    """Overwrite keyslot *index*'s material, then mark it disabled (salt and
    iterations zeroed, as cryptsetup leaves a removed slot)."""
    slot = header.keyslots[index]
    length = header.keyslot_sectors * 512
    wipe_area(fd, slot.key_material_offset * 512, length, f"keyslot {index} key material")
    pwrite_all(fd, KEY_DISABLED.to_bytes(4, "big"), _record_offset(index), f"keyslot {index} state")
    sync(fd)
    cleared = replace(slot, active=KEY_DISABLED, iterations=0, salt=bytes(SALT_SIZE))
    record = _KEYSLOT.pack(cleared.active, 0, cleared.salt, slot.key_material_offset, slot.stripes)
    pwrite_all(fd, record[4:], _record_offset(index) + 4, f"keyslot {index} parameters")
    sync(fd)
    slots = list(header.keyslots)
    slots[index] = cleared
    return replace(header, keyslots=tuple(slots))


def write_uuid(fd: int, header: LUKS1Header, new_uuid: str) -> LUKS1Header:
    """Replace the UUID field (40 bytes; the keyslots do not depend on it)."""
    text = check_uuid(new_uuid)
    pwrite_all(fd, _field(text, 40, "UUID"), _UUID_OFFSET, "LUKS1 UUID")
    sync(fd)
    return replace(header, uuid=text)
