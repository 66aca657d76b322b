"""LUKS1: the 592-byte big-endian header, keyslot validation, unlocking.

On-disk layout (LUKS1 on-disk format specification, all integers big endian)::

    offset size  field
         0    6  magic "LUKS\\xba\\xbe"
         6    2  version (1)
         8   32  cipher-name   (NUL-terminated, e.g. "aes")
        40   32  cipher-mode   (e.g. "xts-plain64", "cbc-essiv:sha256")
        72   32  hash-spec     (PBKDF2 / AF hash, e.g. "sha256")
       104    4  payload-offset (512-byte sectors)
       108    4  key-bytes
       112   20  mk-digest     (PBKDF2 of the master key, 20 bytes)
       132   32  mk-digest-salt
       164    4  mk-digest-iter
       168   40  uuid
       208  8x48 keyslots: active (0x00AC71F3 / 0x0000DEAD), iterations,
                 salt[32], key-material-offset (sectors), stripes

Validation follows cryptsetup's ``LUKS_check_keyslots`` and
``LUKS_check_device_size`` (every keyslot, active or not, must have 4000
stripes, start after the header, end before the payload unless the header is
detached, and not overlap its neighbour; the header device must hold the
last keyslot), so that a header cryptsetup refuses is refused here too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..af import af_sectors
from ..errors import (
    DeviceError,
    FormatError,
    KeyslotError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..kdf import digest_equal, hash_size, pbkdf2
from ..sector import SectorCipher
from ..spec import CipherSpec
from ..volume import Volume, device_size
from .luks_common import (
    check_key_size,
    data_area_size,
    luks_cipher_spec,
    open_devices,
    pread_exact,
    recover_af_key,
)

__all__ = [
    "HEADER_SIZE",
    "KEY_DISABLED",
    "KEY_ENABLED",
    "LUKS1Header",
    "LUKS1Keyslot",
    "open_luks1",
    "read_luks1_header",
]

MAGIC = b"LUKS\xba\xbe"
HEADER_SIZE = 592
NUM_KEYSLOTS = 8
KEY_ENABLED = 0x00AC71F3
KEY_DISABLED = 0x0000DEAD
STRIPES = 4000
DIGEST_SIZE = 20
SALT_SIZE = 32
#: Bounds the keyslot geometry of a corrupt header (not a spec limit); the
#: largest real key is 64 bytes (AES-256-XTS, 512 bits).
MAX_KEY_BYTES = 256

_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_KEYSLOT = struct.Struct(">II32sII")
assert _PHDR.size + NUM_KEYSLOTS * _KEYSLOT.size == HEADER_SIZE


def _text(raw: bytes, field: str) -> str:
    """A NUL-terminated ASCII header field (cryptsetup terminates the last byte too)."""
    value = raw[: len(raw) - 1].split(b"\0", 1)[0]
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"LUKS header field {field} is not ASCII text") from None


@dataclass(frozen=True)
class LUKS1Keyslot:
    """One of the eight LUKS1 keyslots, as stored."""

    index: int
    active: int
    iterations: int
    salt: bytes
    key_material_offset: int  # 512-byte sectors
    stripes: int

    @property
    def enabled(self) -> bool:
        """True for an active keyslot (any value but ``KEY_ENABLED`` counts as
        inactive, as cryptsetup's ``LUKS_keyslot_info`` treats invalid states)."""
        return self.active == KEY_ENABLED


@dataclass(frozen=True)
class LUKS1Header:
    """A parsed LUKS1 header (see the module docstring for the layout)."""

    version: int
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int  # 512-byte sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    keyslots: tuple[LUKS1Keyslot, ...]

    @classmethod
    def parse(cls, data: bytes) -> LUKS1Header:
        """Decode the first 592 bytes of *data*; checks magic and version only.

        Call :meth:`validate` for cryptsetup's keyslot geometry checks.
        """
        if len(data) < HEADER_SIZE:
            raise FormatError(f"LUKS1 header needs {HEADER_SIZE} bytes, got {len(data)}")
        (
            magic,
            version,
            name,
            mode,
            hash_spec,
            payload,
            key_bytes,
            digest,
            digest_salt,
            digest_iter,
            uuid,
        ) = _PHDR.unpack_from(data, 0)
        if magic != MAGIC:
            raise FormatError("Device is not a valid LUKS device (bad magic).")
        if version != 1:
            raise FormatError(f"Unsupported LUKS version {version}.")
        slots = []
        for i in range(NUM_KEYSLOTS):
            active, iterations, salt, offset, stripes = _KEYSLOT.unpack_from(
                data, _PHDR.size + i * _KEYSLOT.size
            )
            slots.append(LUKS1Keyslot(i, active, iterations, salt, offset, stripes))
        return cls(
            version=version,
            cipher_name=_text(name, "cipher-name"),
            cipher_mode=_text(mode, "cipher-mode"),
            hash_spec=_text(hash_spec, "hash-spec"),
            payload_offset=payload,
            key_bytes=key_bytes,
            mk_digest=digest,
            mk_digest_salt=digest_salt,
            mk_digest_iterations=digest_iter,
            uuid=_text(uuid, "uuid"),
            keyslots=tuple(slots),
        )

    # -- validation ----------------------------------------------------------------

    @property
    def keyslot_sectors(self) -> int:
        """Sectors of AF material per keyslot (cryptsetup's ``AF_split_sectors``)."""
        return af_sectors(self.key_bytes, STRIPES)

    def validate(self) -> None:
        """Apply cryptsetup's ``LUKS_check_keyslots``; raise :class:`FormatError`
        ("LUKS keyslot N is invalid.") on the first offending keyslot."""
        if not 0 < self.key_bytes <= MAX_KEY_BYTES:
            raise FormatError(f"LUKS header has an invalid key size of {self.key_bytes} bytes.")
        secs = self.keyslot_sectors
        for slot in self.keyslots:
            if slot.stripes != STRIPES:
                raise FormatError(
                    f"LUKS keyslot {slot.index} is invalid "
                    f"(stripes {slot.stripes}, must be {STRIPES})."
                )
            if slot.key_material_offset * 512 < HEADER_SIZE:
                raise FormatError(
                    f"LUKS keyslot {slot.index} is invalid (key material at sector "
                    f"{slot.key_material_offset} overlaps the header)."
                )
            # A detached header may have payload offset 0: nothing to collide with.
            if self.payload_offset == 0:
                continue
            if self.payload_offset < slot.key_material_offset + secs:
                raise FormatError(
                    f"LUKS keyslot {slot.index} is invalid (key material at sector "
                    f"{slot.key_material_offset} runs into the payload at sector "
                    f"{self.payload_offset})."
                )
        # Neighbours in on-disk order must not overlap; Python's stable sort
        # names the same slot as cryptsetup's for equal offsets.
        ordered = sorted(self.keyslots, key=lambda s: s.key_material_offset)
        for prev, nxt in zip(ordered, ordered[1:], strict=False):
            if nxt.key_material_offset < prev.key_material_offset + secs:
                raise FormatError(
                    f"LUKS keyslot {prev.index} is invalid "
                    f"(its key material overlaps keyslot {nxt.index})."
                )

    @property
    def required_header_bytes(self) -> int:
        """Bytes the header device needs: up to the end of the last keyslot."""
        last = max(slot.key_material_offset for slot in self.keyslots)
        return (last + self.keyslot_sectors) * 512

    # -- unlocking -----------------------------------------------------------------

    @property
    def cipher_spec(self) -> CipherSpec:
        """The cipher of the payload and keyslots (LUKS1 uses one for both)."""
        spec = luks_cipher_spec(f"{self.cipher_name}-{self.cipher_mode}", "LUKS1 header cipher")
        check_key_size(spec, self.key_bytes, "LUKS1 header")
        return spec

    def check_supported(self) -> CipherSpec:
        """Raise :class:`UnsupportedError` unless cipher and hash can be used; return the spec."""
        spec = self.cipher_spec
        try:
            digest_bytes = hash_size(self.hash_spec)
        except UnsupportedError:
            raise UnsupportedError(
                f"Requested LUKS hash {self.hash_spec} is not supported."
            ) from None
        if digest_bytes < DIGEST_SIZE:
            # cryptsetup: the master-key digest is 20 bytes of PBKDF2 with this hash.
            raise UnsupportedError(f"Requested LUKS hash {self.hash_spec} is not supported.")
        return spec

    def verify_volume_key(self, key: bytes) -> bool:
        """True when *key* matches the stored master-key digest (constant time)."""
        if self.mk_digest_iterations < 1:
            raise FormatError("LUKS header has a master-key digest iteration count of 0.")
        candidate = pbkdf2(
            self.hash_spec, key, self.mk_digest_salt, self.mk_digest_iterations, DIGEST_SIZE
        )
        return digest_equal(candidate, self.mk_digest)

    def try_keyslot(self, fd: int, index: int, passphrase: bytes) -> bytes | None:
        """Return the master key if *passphrase* opens keyslot *index*, else None."""
        spec = self.check_supported()
        slot = self.keyslots[index]
        if slot.iterations < 1:
            raise FormatError(f"LUKS keyslot {index} is invalid (iteration count 0).")
        derived = pbkdf2(self.hash_spec, passphrase, slot.salt, slot.iterations, self.key_bytes)
        key = recover_af_key(
            fd,
            area_offset=slot.key_material_offset * 512,
            key_len=self.key_bytes,
            stripes=slot.stripes,
            af_hash=self.hash_spec,
            spec=spec,
            derived_key=derived,
            what=f"LUKS keyslot {index} key material",
        )
        return key if self.verify_volume_key(key) else None

    def unlock(self, fd: int, passphrase: bytes, key_slot: int | None = None) -> tuple[int, bytes]:
        """Find the keyslot *passphrase* opens; return ``(slot, master key)``.

        Tries every active keyslot in order, or only *key_slot*.  Raises
        :class:`WrongPassphraseError` when none opens.
        """
        self.check_supported()  # an unsupported cipher is not a wrong passphrase
        if key_slot is not None:
            if not 0 <= key_slot < NUM_KEYSLOTS:
                raise UsageError(
                    f"Key slot {key_slot} is invalid (LUKS1 has slots 0-{NUM_KEYSLOTS - 1})."
                )
            if not self.keyslots[key_slot].enabled:
                raise KeyslotError(f"Keyslot {key_slot} is not active.")
            candidates = [key_slot]
        else:
            candidates = [s.index for s in self.keyslots if s.enabled]
            if not candidates:
                raise KeyslotError("No usable keyslot is available (no LUKS keyslot is active).")
        for index in candidates:
            key = self.try_keyslot(fd, index, passphrase)
            if key is not None:
                return index, key
        raise WrongPassphraseError()


#: cryptsetup aligns LUKS1 keyslots to 4 KiB (LUKS_ALIGN_KEYSLOTS), in sectors
_KEYSLOT_ALIGN = 4096 // 512
#: a DOS partition table signature, which a partitioning tool may have left in keyslot 6
_MSDOS_SIGNATURE = (0x1FE, b"\x55\xaa")


def repaired_luks1_header(data: bytes) -> tuple[bytes, list[str]] | None:
    """cryptsetup's LUKS1 ``repair`` (``_keyslot_repair``) of the 592 header bytes
    *data*: None when there is nothing to repair, else the repaired bytes and what
    was done, one line each.

    A repair is tried when a keyslot's geometry is invalid, the cipher mode is
    ``ecb-*`` or the hash name is not lower case.  Only *inactive* keyslots are
    changed: any whose key material offset or stripes differ from the standard
    layout for the key size (or keyslot 6 holding a DOS partition signature) gets
    that layout back, is disabled and its salt and iterations wiped.  ``ecb-*``
    becomes ``ecb``, the hash is lower-cased.  Raises :class:`FormatError` when
    cryptsetup also gives up (a non-standard key size or keyslot alignment, or an
    active keyslot still invalid afterwards)."""
    header = LUKS1Header.parse(data)
    try:
        header.validate()
        geometry_ok = True
    except FormatError:
        geometry_ok = False
    ecb = header.cipher_mode.startswith("ecb-")
    upper = header.hash_spec != header.hash_spec.lower()
    if geometry_ok and not ecb and not upper:
        return None
    if header.key_bytes not in (16, 32, 64):
        raise FormatError("Non standard key size, manual repair required.")
    if header.keyslots[0].key_material_offset < _KEYSLOT_ALIGN:
        raise FormatError("Non standard keyslots alignment, manual repair required.")
    out = bytearray(data[:HEADER_SIZE])
    done: list[str] = []
    if ecb:
        done.append(f"Cipher mode repaired ({header.cipher_mode} -> ecb).")
        out[40:72] = b"ecb".ljust(32, b"\0")
    if upper:
        lower = header.hash_spec.lower()
        done.append(f"Cipher hash repaired to lowercase ({lower}).")
        out[72:104] = lower.encode().ljust(32, b"\0")
        try:
            supported = hash_size(lower) >= DIGEST_SIZE
        except UnsupportedError:
            supported = False
        if not supported:
            raise FormatError(f"Requested LUKS hash {lower} is not supported.")
    mode = "ecb" if ecb else header.cipher_mode
    check_key_size(
        luks_cipher_spec(f"{header.cipher_name}-{mode}", "LUKS1 header cipher"),
        header.key_bytes,
        "LUKS1 header",
    )
    blocks, sector = af_sectors(header.key_bytes, STRIPES), _KEYSLOT_ALIGN
    for slot in header.keyslots:
        standard = sector
        sector = -(-(sector + blocks) // _KEYSLOT_ALIGN) * _KEYSLOT_ALIGN
        if slot.enabled:
            continue
        bad = False
        if slot.key_material_offset != standard:
            done.append(
                f"Keyslot {slot.index}: offset repaired ({slot.key_material_offset} -> {standard})."
            )
            bad = True
        if slot.stripes != STRIPES:
            done.append(f"Keyslot {slot.index}: stripes repaired ({slot.stripes} -> {STRIPES}).")
            bad = True
        at, signature = _MSDOS_SIGNATURE
        if slot.index == 6 and data[at : at + 2] == signature:
            done.append(f"Keyslot {slot.index}: bogus partition signature.")
            bad = True
        if bad:
            done.append(f"Keyslot {slot.index}: salt wiped.")
            _KEYSLOT.pack_into(
                out,
                _PHDR.size + slot.index * _KEYSLOT.size,
                KEY_DISABLED,
                0,
                bytes(SALT_SIZE),
                standard,
                STRIPES,
            )
    try:
        LUKS1Header.parse(bytes(out)).validate()
    except FormatError as exc:
        raise FormatError(f"Repair failed: {exc}") from None
    return bytes(out), done


def read_luks1_header(fd: int, path: str) -> LUKS1Header:
    """Read, parse and validate the LUKS1 header on descriptor *fd* (named *path*).

    Includes cryptsetup's device-size check: the header device must hold
    every keyslot.
    """
    data = pread_exact(fd, HEADER_SIZE, 0, f"LUKS1 header of {path}")
    header = LUKS1Header.parse(data)
    header.validate()
    if device_size(fd) < header.required_header_bytes:
        raise DeviceError(
            f"Device {path} is too small. "
            f"(LUKS1 requires at least {header.required_header_bytes} bytes.)"
        )
    return header


def open_luks1(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    key_slot: int | None,
    readonly: bool,
    volume_key_file: str | None = None,
) -> Volume:
    """Open a LUKS1 container and return its data area as a :class:`Volume`.

    *header_path* names a detached header (None: the header is at the start of
    *data_path*); the payload offset is then relative to *data_path*.
    *volume_key_file*: the volume key, read from that file and checked against the
    digest, instead of a keyslot that *passphrase* opens.  Nothing is ever written
    to either file here.
    """
    with open_devices(data_path, header_path, readonly) as dev:
        header = read_luks1_header(dev.header_fd, dev.header_path)
        spec = header.check_supported()
        if volume_key_file is not None:
            from .volume_key import volume_key_from_file

            slot, key = None, volume_key_from_file(header, volume_key_file)
        else:
            slot, key = header.unlock(dev.header_fd, passphrase, key_slot)
        offset = header.payload_offset * 512
        size = data_area_size(dev.data_size, offset, 512, None, data_path)
        cipher = SectorCipher(spec, key, 512, iv_offset=0)
        volume = Volume(
            dev.data_fd,
            cipher,
            offset,
            size,
            readonly=readonly,
            description=f"LUKS1 {data_path}",
        )
        volume.key_slot = slot
        return volume
