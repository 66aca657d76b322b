"""Writing LUKS2 headers: serialisation, format layout, keyslot creation and removal.

Every metadata change is a *commit*: the whole JSON object is serialised the
way cryptsetup's json-c does (compact, NUL-padded to ``json_size``), and both
header copies are written with ``seqid + 1``, primary first, each followed by
an fsync (cryptsetup's ``LUKS2_disk_hdr_write`` order).  Each copy carries its
own checksum over binary header and JSON area, so a torn copy is simply
invalid and the reader falls back to the other one:

* crash before the primary is complete: primary invalid, secondary has the
  old metadata -> old state;
* crash between the copies: primary valid with the higher seqid -> new state.

Keyslot material is only ever written into areas that no header copy refers
to (a free gap of the keyslots area), and made durable before the commit that
refers to it.  A removed keyslot's area is overwritten *before* the commit that
frees it, as the issue requires; a crash in between leaves the slot referenced
but useless, every other keyslot intact.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from ..af import af_sectors
from ..errors import CryptfuseError, DeviceError, FormatError, UsageError
from ..kdf import hash_size, pbkdf2
from ..spec import CipherSpec
from .luks2 import (
    BIN_HEADER_SIZE,
    HDR2_OFFSETS,
    MAGIC_PRIMARY,
    MAGIC_SECONDARY,
    MAX_KEYSLOTS_SIZE,
    NUM_KEYSLOTS,
    REENCRYPT_REQUIREMENTS,
    BinaryHeader,
    LUKS2Header,
    validate_metadata,
)
from .luks_common import check_uuid, pread_exact
from .luks_write import KdfParams, derive, encrypt_keyslot_material, pwrite_all, sync, wipe_area

_log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METADATA_SIZE",
    "Luks2Layout",
    "Luks2Writer",
    "build_metadata",
    "luks2_layout",
    "serialize_copy",
]

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
DEFAULT_METADATA_SIZE = 0x4000
#: cryptsetup's default data offset (and so keyslots area) for LUKS2: 16 MiB
DEFAULT_DATA_OFFSET = 16 * 1024 * 1024
ALIGNMENT = 1024 * 1024
KEYSLOT_ALIGN = 4096
STRIPES = 4000
SALT_SIZE = 32
#: cryptsetup's DEFAULT_LUKS2_KEYSLOT_CIPHER and _KEYBITS (in bytes): a keyslot's area
#: encryption where the segment's cipher cannot serve
KEYSLOT_CIPHER = "aes-xts-plain64"
KEYSLOT_KEY_BYTES = 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text_field(text: str, size: int, name: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) >= size:
        raise UsageError(f"{name} {text!r} is too long (at most {size - 1} bytes)")
    return raw.ljust(size, b"\0")


def serialize_json(obj: dict[str, Any], json_size: int) -> bytes:
    """The JSON area: compact json-c style text, then NULs up to *json_size*."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogateescape"
    )
    if len(text) >= json_size:
        raise CryptfuseError(
            f"LUKS2 metadata ({len(text)} bytes of JSON) does not fit in the "
            f"{json_size}-byte JSON area."
        )
    return text + bytes(json_size - len(text))


def serialize_copy(
    *,
    secondary: bool,
    hdr_size: int,
    seqid: int,
    label: str,
    subsystem: str,
    salt: bytes,
    uuid: str,
    json_area: bytes,
) -> bytes:
    """One header copy (binary header + JSON area, *hdr_size* bytes) with its checksum."""
    binary = bytearray(BIN_HEADER_SIZE)
    _BIN.pack_into(
        binary,
        0,
        MAGIC_SECONDARY if secondary else MAGIC_PRIMARY,
        2,
        hdr_size,
        seqid,
        _text_field(label, 48, "label"),
        _text_field("sha256", 32, "checksum algorithm"),
        salt,
        _text_field(uuid, 40, "UUID"),
        _text_field(subsystem, 48, "subsystem"),
        hdr_size if secondary else 0,
        bytes(184),
        bytes(64),
    )
    assert len(json_area) == hdr_size - BIN_HEADER_SIZE
    digest = hashlib.sha256(binary)
    digest.update(json_area)
    binary[_CSUM_OFFSET : _CSUM_OFFSET + 32] = digest.digest()
    return bytes(binary) + json_area


@dataclass(frozen=True)
class Luks2Layout:
    """Byte sizes: one metadata copy, the keyslots area, the data offset."""

    metadata_size: int
    keyslots_size: int
    data_offset: int


#: cryptsetup warns below this keyslots area size (4 MiB minus two 16 KiB headers)
SMALL_KEYSLOTS_SIZE = 0x400000 - 2 * 0x4000


def luks2_layout(
    *,
    metadata_size: int | None,
    keyslots_size: int | None,
    offset: int | None,
    detached: bool,
    alignment: int | None = None,
) -> Luks2Layout:
    """:func:`_layout`, with cryptsetup's warning when few keyslots fit."""
    layout = _layout(metadata_size, keyslots_size, offset, detached, alignment)
    if layout.keyslots_size < SMALL_KEYSLOTS_SIZE:
        _log.warning(
            "WARNING: keyslots area (%d bytes) is very small, available LUKS2 keyslot "
            "count is very limited.",
            layout.keyslots_size,
        )
    return layout


def _layout(
    metadata_size: int | None,
    keyslots_size: int | None,
    offset: int | None,
    detached: bool,
    alignment: int | None = None,
) -> Luks2Layout:
    """cryptsetup's LUKS2 layout (``LUKS2_generate_hdr``), all sizes in bytes.

    Defaults: 16 KiB metadata, data at 16 MiB, the keyslots area filling the
    space between the two copies and the data.  An explicit *offset* bounds the
    keyslots area (an explicit keyslots size that does not fit before it shrinks to
    fit, as cryptsetup's does: the caller may warn); explicit keyslots without an
    offset put the data at the next 1 MiB boundary.  *alignment* (``--align-payload``)
    replaces that 1 MiB, and rounds the default 16 MiB up to a multiple of it.
    """
    md = metadata_size if metadata_size is not None else DEFAULT_METADATA_SIZE
    if md not in HDR2_OFFSETS:
        raise UsageError(
            f"Unsupported LUKS2 metadata size {md} (one of {', '.join(map(str, HDR2_OFFSETS))})."
        )
    if keyslots_size is not None and (
        keyslots_size % KEYSLOT_ALIGN or not 0 < keyslots_size <= MAX_KEYSLOTS_SIZE
    ):
        raise UsageError(
            f"Unsupported LUKS2 keyslots size {keyslots_size} "
            "(4096-byte multiple, at most 128 MiB)."
        )
    if offset is not None and offset % 512:
        raise UsageError("The data offset must be a multiple of 512 bytes.")
    if detached and not offset:
        ks = keyslots_size if keyslots_size is not None else DEFAULT_DATA_OFFSET - 2 * md
        return Luks2Layout(md, ks, 0)
    if offset is not None:  # (a detached header's too: cryptsetup bounds its keyslots so)
        room = offset - 2 * md
        fits = min(MAX_KEYSLOTS_SIZE, room // KEYSLOT_ALIGN * KEYSLOT_ALIGN)
        ks = min(keyslots_size, fits) if keyslots_size is not None else fits
        if ks <= 0:
            raise UsageError(
                f"Requested data offset {offset} is too small for the LUKS2 metadata and keyslots."
            )
        return Luks2Layout(md, ks, offset)
    align = alignment or ALIGNMENT
    if keyslots_size is not None:
        data = -(-(2 * md + keyslots_size) // align) * align
        return Luks2Layout(md, keyslots_size, data)
    data = -(-DEFAULT_DATA_OFFSET // align) * align
    return Luks2Layout(md, DEFAULT_DATA_OFFSET - 2 * md, data)


def drop_empty_digests(obj: dict[str, Any]) -> None:
    """Remove the digests bound to no keyslot and no segment, as cryptsetup does."""
    for key in [k for k, d in obj["digests"].items() if not d["keyslots"] and not d["segments"]]:
        del obj["digests"][key]


def area_size(key_bytes: int) -> int:
    """Bytes of a keyslot area for a *key_bytes* key (AF material, 4 KiB aligned)."""
    return -(-af_sectors(key_bytes, STRIPES) * 512 // KEYSLOT_ALIGN) * KEYSLOT_ALIGN


def build_metadata(
    *,
    layout: Luks2Layout,
    encryption: str,
    sector_size: int,
    volume_key: bytes,
    digest_hash: str,
    digest_iterations: int,
) -> dict[str, Any]:
    """The JSON of a freshly formatted LUKS2 header, without keyslots (yet).

    Key order follows cryptsetup's output, so a dump reads the same.
    """
    salt = os.urandom(SALT_SIZE)
    digest = pbkdf2(digest_hash, volume_key, salt, digest_iterations, hash_size(digest_hash))
    return {
        "keyslots": {},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(layout.data_offset),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": encryption,
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": [],
                "segments": ["0"],
                "hash": digest_hash,
                "iterations": digest_iterations,
                "salt": _b64(salt),
                "digest": _b64(digest),
            }
        },
        "config": {
            "json_size": str(layout.metadata_size - BIN_HEADER_SIZE),
            "keyslots_size": str(layout.keyslots_size),
        },
    }


def _kdf_json(params: KdfParams, salt: bytes) -> dict[str, Any]:
    if params.type == "pbkdf2":
        return {
            "type": "pbkdf2",
            "hash": params.hash,
            "iterations": params.iterations,
            "salt": _b64(salt),
        }
    return {
        "type": params.type,
        "time": params.iterations,
        "memory": params.memory_kib,
        "cpus": params.parallel,
        "salt": _b64(salt),
    }


#: the epoch (seqid) of a header fresh from cryptsetup 2.6.1's luksFormat: it writes
#: the header, then again with the keyslot, then with the keyslot bound to the digest.
#: cryptfuse writes it once, with this seqid, so that dumps of the two agree
FORMAT_EPOCH = 3


class Luks2Writer:
    """The metadata of one LUKS2 header device, and the commits that change it.

    Build it from the header the reader chose (:meth:`from_header`) or for a
    new container (:meth:`new`); ``obj`` is the JSON as a dict, changed by the
    methods below and written by :meth:`commit`.
    """

    def __init__(
        self,
        fd: int,
        obj: dict[str, Any],
        *,
        hdr_size: int,
        seqid: int,
        label: str,
        subsystem: str,
        uuid: str,
        salts: tuple[bytes, bytes],
    ) -> None:
        self.fd = fd
        self.obj = obj
        self.hdr_size = hdr_size
        self.seqid = seqid
        self.label = label
        self.subsystem = subsystem
        self.uuid = uuid
        self.salts = salts
        #: make each write durable by itself (``pwrite_all(durable=True)``) instead of
        #: fsyncing the header device after it: on a mounted container (an online
        #: reencryption) an fsync also writes back everything the mount wrote meanwhile.
        #: Only for callers whose own data writes are made durable before a commit.
        self.sync_ranges = False

    @classmethod
    def from_header(
        cls, fd: int, header: LUKS2Header, *, reencryption: bool = False
    ) -> Luks2Writer:
        """Continue from *header* (as read): keep each copy's salt, seqid of the newer copy.

        Headers with requirements are refused (never rewrite what we do not
        understand), except, with *reencryption*, the reencryption requirement
        for :mod:`.luks2_reencrypt`, which implements that protocol.
        """
        if not reencryption:
            header.check_requirements()
        elif any(r not in REENCRYPT_REQUIREMENTS for r in header.metadata.config.requirements):
            header.check_requirements()
        hdr_size = header.binary.hdr_size
        salts = []
        seqid = header.binary.seqid
        for offset in (0, hdr_size):
            try:
                raw = BinaryHeader.parse(pread_exact(fd, 512, offset, "LUKS2 binary header"))
            except DeviceError:
                salts.append(os.urandom(64))
                continue
            good = raw.magic in (MAGIC_PRIMARY, MAGIC_SECONDARY) and raw.hdr_offset == offset
            salts.append(raw.salt if good else os.urandom(64))
            if good:
                seqid = max(seqid, raw.seqid)
        return cls(
            fd,
            copy.deepcopy(header.json),
            hdr_size=hdr_size,
            seqid=seqid,
            label=header.binary.label,
            subsystem=header.binary.subsystem,
            uuid=header.binary.uuid,
            salts=(salts[0], salts[1]),
        )

    @classmethod
    def new(
        cls,
        fd: int,
        obj: dict[str, Any],
        layout: Luks2Layout,
        *,
        label: str,
        subsystem: str,
        uuid: str | None,
        epoch: int = FORMAT_EPOCH,
    ) -> Luks2Writer:
        """A writer for a container being formatted: its first commit writes seqid
        *epoch* (cryptsetup's luksFormat leaves 3, see :data:`FORMAT_EPOCH`)."""
        text_uuid = check_uuid(uuid) if uuid else str(uuidlib.uuid4())
        return cls(
            fd,
            obj,
            hdr_size=layout.metadata_size,
            seqid=epoch - 1,
            label=label,
            subsystem=subsystem,
            uuid=text_uuid,
            salts=(os.urandom(64), os.urandom(64)),
        )

    # -- geometry ---------------------------------------------------------------------

    @property
    def keyslots_size(self) -> int:
        return int(self.obj["config"]["keyslots_size"])

    def free_keyslot(self) -> int | None:
        """The lowest unused keyslot number, or None."""
        used = {int(k) for k in self.obj["keyslots"]}
        return next((i for i in range(NUM_KEYSLOTS) if i not in used), None)

    def find_area(self, length: int, exclude: tuple[int, int] | None = None) -> int | None:
        """First-fit offset of *length* free bytes in the keyslots area (cryptsetup's
        ``LUKS2_find_area_gap``); *exclude* is an extra (offset, length) to avoid."""
        start = 2 * self.hdr_size
        end = start + self.keyslots_size
        used = sorted(
            [
                (int(s["area"]["offset"]), int(s["area"]["size"]))
                for s in self.obj["keyslots"].values()
            ]
            + ([exclude] if exclude else [])
        )
        position = start
        for offset, size in used:
            if offset - position >= length:
                break
            position = max(position, -(-(offset + size) // KEYSLOT_ALIGN) * KEYSLOT_ALIGN)
        return position if position + length <= end else None

    def digest_for_segment(self) -> str:
        """Id of the digest bound to segment 0 (the one a new keyslot must join)."""
        for key, digest in sorted(self.obj["digests"].items(), key=lambda kv: int(kv[0])):
            if "0" in digest["segments"]:
                return str(key)
        raise FormatError("LUKS2 data segment has no digest")

    # -- changes ----------------------------------------------------------------------

    def write_keyslot(
        self,
        index: int,
        volume_key: bytes,
        passphrase: bytes,
        params: KdfParams,
        area_spec: CipherSpec,
        *,
        af_hash: str,
        replace_area: bool = False,
        digest: str | None = None,
        area_key_bytes: int | None = None,
    ) -> tuple[int, int] | None:
        """Write a keyslot's material to a free area (durably) and put it in ``obj``.

        Returns the (offset, length) of the area it replaces when *replace_area*
        (the caller wipes it after the commit), else None.  Nothing the
        current header references is touched.  The keyslot joins *digest*
        (default: the data segment's).  The area is encrypted with
        *area_spec* under a key of *area_key_bytes* (default: the volume key's
        length, as cryptsetup does when the area uses the segment cipher).
        """
        key_bytes = len(volume_key)
        length = area_size(key_bytes)
        key = str(index)
        old = self.obj["keyslots"].get(key)
        old_area = (
            (int(old["area"]["offset"]), int(old["area"]["size"])) if old is not None else None
        )
        if old is not None and not replace_area:
            raise CryptfuseError(f"Key slot {index} is full, please select another one.")
        offset = self.find_area(length)
        if offset is None:
            raise CryptfuseError("No space for new keyslot.")
        salt = os.urandom(SALT_SIZE)
        if area_key_bytes is None:
            area_key_bytes = key_bytes
        slot: dict[str, Any] = {
            "type": "luks2",
            "key_size": key_bytes,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": af_hash},
            "area": {
                "type": "raw",
                "offset": str(offset),
                "size": str(length),
                "encryption": str(area_spec),
                "key_size": area_key_bytes,
            },
            "kdf": _kdf_json(params, salt),
        }
        if old is not None and "priority" in old:
            slot["priority"] = old["priority"]
        # JSON order is cryptsetup's (json-c keeps insertion order): a keyslot and its
        # digest binding go at the end, a replaced one too (cryptsetup destroys it and
        # stores it anew).  cryptsetup tries keyslots in this order when unlocking.
        target = digest if digest is not None else self.digest_for_segment()

        def add(obj: dict[str, Any]) -> None:
            obj["keyslots"].pop(key, None)
            obj["keyslots"][key] = slot
            bound = obj["digests"][target]
            bound["keyslots"] = [k for k in bound["keyslots"] if k != key] + [key]

        # the metadata must still fit before any key material is written (cryptsetup's
        # LUKS2_check_json_size): a refusal leaves the device untouched
        trial = copy.deepcopy(self.obj)
        add(trial)
        try:
            serialize_json(trial, self.hdr_size - BIN_HEADER_SIZE)
        except CryptfuseError:
            raise CryptfuseError("Not enough space in header json area for new keyslot.") from None
        derived = derive(params, passphrase, salt, area_key_bytes)
        material = encrypt_keyslot_material(volume_key, STRIPES, af_hash, area_spec, derived)
        self._write_durably(material, offset, f"keyslot {index} key material")
        add(self.obj)  # in place: callers hold ``obj``
        return old_area

    def add_digest(self, volume_key: bytes, hash_name: str, iterations: int) -> str:
        """A PBKDF2 digest of *volume_key*, bound to nothing yet, under the first free
        id (cryptsetup's ``LUKS2_digest_create``); returns the id."""
        digests = self.obj["digests"]
        key = str(next(i for i in range(len(digests) + 1) if str(i) not in digests))
        salt = os.urandom(SALT_SIZE)
        digest = pbkdf2(hash_name, volume_key, salt, iterations, hash_size(hash_name))
        digests[key] = {
            "type": "pbkdf2",
            "keyslots": [],
            "segments": [],
            "hash": hash_name,
            "iterations": iterations,
            "salt": _b64(salt),
            "digest": _b64(digest),
        }
        return key

    def wipe_keyslot(self, index: int) -> None:
        """Overwrite keyslot *index*'s area (durably) and drop it from ``obj``
        and from every digest and token; the caller commits."""
        key = str(index)
        slot = self.obj["keyslots"].get(key)
        if slot is None:
            raise CryptfuseError(f"Keyslot {index} is not active.")
        wipe_area(
            self.fd, int(slot["area"]["offset"]), int(slot["area"]["size"]), f"keyslot {index} area"
        )
        del self.obj["keyslots"][key]
        self._unbind_keyslot(key)
        drop_empty_digests(self.obj)  # an unbound keyslot's digest goes with it (cryptsetup)

    def _unbind_keyslot(self, key: str) -> None:
        """Drop keyslot *key* from every digest and token of ``obj``."""
        for section in ("digests", "tokens"):
            for item in self.obj[section].values():
                if key in item.get("keyslots", []):
                    item["keyslots"] = [k for k in item["keyslots"] if k != key]

    def renumber_keyslot(self, src: int, dst: int) -> tuple[int, int]:
        """Keyslot *src* becomes keyslot *dst* in ``obj``, in place of *dst*'s own,
        whose area is returned (offset, length) for the caller to wipe once this is
        committed.  Both must be bound to the same digest; *dst* keeps its digest,
        token and priority bindings, *src*'s number goes."""
        keyslots = self.obj["keyslots"]
        old = keyslots[str(dst)]
        for digest in self.obj["digests"].values():
            if (str(src) in digest["keyslots"]) != (str(dst) in digest["keyslots"]):
                raise CryptfuseError(f"Keyslots {src} and {dst} belong to different digests.")
        replacement = keyslots.pop(str(src))
        if "priority" in old:
            replacement["priority"] = old["priority"]
        else:
            replacement.pop("priority", None)
        del keyslots[str(dst)]  # re-added at the end, as cryptsetup's swap does
        keyslots[str(dst)] = replacement
        self._unbind_keyslot(str(src))
        return int(old["area"]["offset"]), int(old["area"]["size"])

    def commit(self) -> None:
        """Validate ``obj`` and write both copies with the next seqid (primary
        first, each made durable before the next: fsync, or ``sync_ranges``)."""
        json_size = self.hdr_size - BIN_HEADER_SIZE
        validate_metadata(self.obj, json_size)  # never write what our reader would refuse
        area = serialize_json(self.obj, json_size)
        seqid = self.seqid + 1
        for secondary in (False, True):
            data = serialize_copy(
                secondary=secondary,
                hdr_size=self.hdr_size,
                seqid=seqid,
                label=self.label,
                subsystem=self.subsystem,
                salt=self.salts[secondary],
                uuid=self.uuid,
                json_area=area,
            )
            self._write_durably(data, self.hdr_size if secondary else 0, "LUKS2 header")
        self.seqid = seqid

    def _write_durably(self, data: bytes, offset: int, what: str) -> None:
        """Write *data* at *offset* and make it durable: that range alone with
        ``sync_ranges``, else an fsync of the header device."""
        pwrite_all(self.fd, data, offset, what, durable=self.sync_ranges)
        if not self.sync_ranges:
            sync(self.fd)
