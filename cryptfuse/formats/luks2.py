"""LUKS2: binary headers, JSON metadata, validation as cryptsetup does, unlocking.

A LUKS2 header is two copies of (4096-byte binary header + JSON area), the
primary at offset 0 and the secondary right after it (at ``hdr_size``), then
the keyslots area.  The binary header (big endian)::

    offset size  field
         0    6  magic: "LUKS\\xba\\xbe" (primary) / "SKUL\\xba\\xbe" (secondary)
         6    2  version (2)
         8    8  hdr_size: binary header + JSON area (16 KiB .. 4 MiB)
        16    8  seqid: incremented on every metadata update
        24   48  label
        72   32  checksum_alg ("sha256")
       104   64  salt (differs between the copies)
       168   40  uuid
       208   48  subsystem
       256    8  hdr_offset: where this copy lives
       264  184  padding
       448   64  checksum over the whole hdr_size bytes with this field zeroed
       512 3584  padding

Reading follows cryptsetup's ``LUKS2_disk_hdr_read``: a copy counts when its
binary header is sane, its checksum matches and its JSON passes the same
validation as ``LUKS2_hdr_validate``; with both valid the higher ``seqid``
wins; when the primary is unreadable the secondary is looked for at every
allowed offset.  Where cryptsetup would then *repair* the damaged copy,
cryptfuse only reads: it never writes a header.

Opening (unlocking the volume key) refuses, without writing anything, what
cryptfuse does not implement: mandatory requirements (reencryption, unknown
ones), more than one segment, non-``crypt`` or integrity segments, ``capi:``
and other unsupported ciphers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..af import af_sectors
from ..errors import (
    CryptfuseError,
    DeviceError,
    FormatError,
    KeyslotError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..kdf import argon2, digest_equal, hash_size, hashlib_name, pbkdf2
from ..sector import SECTOR_SIZES, SectorCipher
from ..spec import CipherSpec
from ..volume import ExtentMap, SegmentedVolume, Volume, device_size
from .luks_common import (
    Devices,
    check_key_size,
    data_area_size,
    luks_cipher_spec,
    open_devices,
    pread_exact,
    recover_af_key,
)

__all__ = [
    "HDR2_OFFSETS",
    "AntiForensic",
    "BinaryHeader",
    "Config",
    "Digest",
    "Kdf",
    "Keyslot",
    "KeyslotArea",
    "LUKS2Header",
    "LUKS2Metadata",
    "Segment",
    "Token",
    "has_luks2_header",
    "open_luks2",
    "read_luks2_header",
    "validate_metadata",
]

log = logging.getLogger(__name__)

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BIN_HEADER_SIZE = 4096
#: every allowed metadata (binary header + JSON area) size, which is also
#: every offset where a secondary header can live
HDR2_OFFSETS = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000)
MIN_HDR_SIZE = HDR2_OFFSETS[0]
MAX_HDR_SIZE = HDR2_OFFSETS[-1]
MAX_KEYSLOTS_SIZE = 128 * 1024 * 1024
NUM_KEYSLOTS = 32
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
PRIORITY_IGNORE, PRIORITY_NORMAL, PRIORITY_HIGH = 0, 1, 2

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
_CSUM_SIZE = 64
assert _BIN.size == 512


# ---------------------------------------------------------------------------
# Binary header
# ---------------------------------------------------------------------------


def _cstr(raw: bytes) -> str:
    """A NUL-terminated text field (cryptsetup forces the last byte to NUL)."""
    return raw[: len(raw) - 1].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class BinaryHeader:
    """One copy's 4096-byte binary header."""

    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int
    checksum: bytes

    @classmethod
    def parse(cls, data: bytes) -> BinaryHeader:
        """Decode the first 512 bytes of a binary header (no checks)."""
        (magic, version, hdr_size, seqid, label, alg, salt, uuid, subsystem, offset, _pad, csum) = (
            _BIN.unpack_from(data, 0)
        )
        return cls(
            magic,
            version,
            hdr_size,
            seqid,
            _cstr(label),
            _cstr(alg),
            salt,
            _cstr(uuid),
            _cstr(subsystem),
            offset,
            csum,
        )

    @property
    def is_secondary(self) -> bool:
        """True for the secondary copy's magic."""
        return self.magic == MAGIC_SECONDARY


class _CopyError(Exception):
    """Internal: why one header copy was not usable (``io`` for short reads)."""

    def __init__(self, reason: str, io: bool = False) -> None:
        super().__init__(reason)
        self.io = io


@dataclass
class _Copy:
    """A header copy as read: state is ok / obsolete (sane, bad JSON) / fail / io."""

    offset: int
    state: str
    reason: str = ""
    binary: BinaryHeader | None = None
    json_area: bytes = b""
    metadata: dict[str, Any] | None = None


def _read(fd: int, length: int, offset: int) -> bytes:
    try:
        return pread_exact(fd, length, offset, "LUKS2 header")
    except DeviceError as exc:
        raise _CopyError(str(exc), io=True) from None


def _read_binary_and_area(fd: int, offset: int, secondary: bool) -> tuple[BinaryHeader, bytes]:
    """cryptsetup's ``hdr_read_disk``: sanity checks, then the checksum."""
    raw = _read(fd, BIN_HEADER_SIZE, offset)
    hdr = BinaryHeader.parse(raw)
    want = MAGIC_SECONDARY if secondary else MAGIC_PRIMARY
    if hdr.magic != want:
        raise _CopyError("no LUKS2 magic")
    if hdr.version != 2:
        raise _CopyError(f"unsupported LUKS2 header version {hdr.version}")
    if hdr.hdr_offset != offset:
        raise _CopyError(f"header offset field {hdr.hdr_offset} differs from its position {offset}")
    if not MIN_HDR_SIZE <= hdr.hdr_size <= MAX_HDR_SIZE:
        raise _CopyError(f"bogus header size {hdr.hdr_size}")
    if secondary and offset != hdr.hdr_size:
        raise _CopyError(f"secondary header at {offset} declares size {hdr.hdr_size}")
    area = _read(fd, hdr.hdr_size - BIN_HEADER_SIZE, offset + BIN_HEADER_SIZE)
    try:
        digest = hashlib.new(hashlib_name(hdr.checksum_alg))
    except UnsupportedError:
        raise _CopyError(f"unknown checksum algorithm {hdr.checksum_alg!r}") from None
    digest.update(raw[:_CSUM_OFFSET])
    digest.update(bytes(_CSUM_SIZE))
    digest.update(raw[_CSUM_OFFSET + _CSUM_SIZE :])
    digest.update(area)
    value = digest.digest()
    if len(value) > _CSUM_SIZE or value != hdr.checksum[: len(value)]:
        raise _CopyError("checksum mismatch")
    return hdr, area


def parse_json_area(area: bytes) -> Any:
    """Parse a JSON area as cryptsetup does (``parse_json_len`` + ``validate_json_area``).

    The area must start with ``{``; the JSON text must be followed by a NUL
    byte and nothing but NUL bytes up to the end of the area.
    """
    if not area or area[:1] != b"{":
        raise FormatError("JSON area does not start with '{'")
    end = area.find(b"\0")
    if end < 0:
        raise FormatError("JSON area has no terminating NUL byte")
    try:
        # (surrogateescape: cryptsetup writes and reads any byte in a string, e.g. a
        # label from a Latin-1 terminal; each comes back as it was on a commit)
        text = area[:end].decode("utf-8", "surrogateescape")
        obj, consumed = json.JSONDecoder().raw_decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"JSON area does not parse: {exc}") from None
    if len(text[:consumed].encode("utf-8", "surrogateescape")) != end:
        raise FormatError("illegal data right after the JSON text in the JSON area")
    if area.count(0, end) != len(area) - end:
        raise FormatError("non-NUL bytes beyond the JSON text in the JSON area")
    return obj


def _read_copy(fd: int, offset: int, secondary: bool) -> _Copy:
    try:
        binary, area = _read_binary_and_area(fd, offset, secondary)
    except _CopyError as exc:
        return _Copy(offset, "io" if exc.io else "fail", str(exc))
    copy = _Copy(offset, "obsolete", binary=binary, json_area=area)
    try:
        obj = parse_json_area(area)
        validate_metadata(obj, binary.hdr_size - BIN_HEADER_SIZE)
    except FormatError as exc:
        copy.reason = str(exc)
        return copy
    copy.state = "ok"
    copy.metadata = obj
    return copy


# ---------------------------------------------------------------------------
# JSON validation (cryptsetup's LUKS2_hdr_validate, repair folded in)
# ---------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "int": _is_int,
}


def _contains(obj: Any, key: str, kind: str, where: str) -> Any:
    """cryptsetup's ``json_contains``: *obj* has *key* of JSON type *kind*."""
    if not isinstance(obj, dict) or key not in obj or not _TYPES[kind](obj[key]):
        raise FormatError(f"{where} is missing {key!r} ({kind})")
    return obj[key]


def _contains_string(obj: Any, key: str, where: str) -> str:
    """cryptsetup's ``json_contains_string``: a non-empty string."""
    value: str = _contains(obj, key, "string", where)
    if not value:
        raise FormatError(f"{where} has an empty {key!r}")
    return value


def _numbered(text: str, what: str) -> None:
    if not _DIGITS.fullmatch(text):
        raise FormatError(f"{what} {text!r} is not in numbered form")


def _uint64(text: str, what: str) -> int:
    """A decimal string (already numbered) that fits in 64 bits."""
    _numbered(text, what)
    value = int(text)
    if value > UINT64_MAX:
        raise FormatError(f"{what} {text} overflows 64 bits")
    return value


def _uint32(value: Any, what: str) -> int:
    if not _is_int(value) or not 0 <= value <= UINT32_MAX:
        raise FormatError(f"illegal {what} {value!r}")
    return int(value)


def _check_refs(array: list[Any], section: Any, what: str) -> None:
    """Every element is a string naming an object in *section*."""
    for item in array:
        if not isinstance(item, str):
            raise FormatError(f"illegal value type in {what} array")
        _contains(section, item, "object", f"{what} section")


def _is_backup(segment: Any) -> bool:
    flags = segment.get("flags") if isinstance(segment, dict) else None
    return isinstance(flags, list) and any(
        isinstance(f, str) and f.startswith("backup-") for f in flags
    )


def _segment_has_flag(segment: Any, flag: str) -> bool:
    flags = segment.get("flags") if isinstance(segment, dict) else None
    return isinstance(flags, list) and flag in flags


#: the reencryption requirements cryptfuse implements (:mod:`.luks2_reencrypt`): v3
#: marks a decryption that moves its first segment
REENCRYPT_REQUIREMENTS = ("online-reencrypt-v2", "online-reencrypt-v3")


def _reencrypt_candidate(flag: str) -> bool:
    """``online-reencrypt`` or ``online-reencrypt-vN`` (cryptsetup's candidate flags)."""
    return flag == "online-reencrypt" or re.fullmatch(r"online-reencrypt-v[0-9]+", flag) is not None


def _mandatory_requirements(obj: dict[str, Any]) -> list[str]:
    config = obj.get("config")
    reqs = config.get("requirements") if isinstance(config, dict) else None
    mandatory = reqs.get("mandatory") if isinstance(reqs, dict) else None
    if not isinstance(mandatory, list):
        return []
    return [m for m in mandatory if isinstance(m, str)]


def _validate_requirements(obj: dict[str, Any]) -> None:
    config = _contains(obj, "config", "object", "JSON area")
    if "requirements" in config:
        reqs = _contains(config, "requirements", "object", "config")
        if "mandatory" in reqs:
            mandatory = _contains(reqs, "mandatory", "array", "requirements")
            if not all(isinstance(m, str) for m in mandatory):
                raise FormatError("requirements.mandatory must hold strings only")
            if sum(_reencrypt_candidate(m) for m in mandatory) > 1:
                raise FormatError("multiple online reencryption requirement flags")


def _validate_tokens(obj: dict[str, Any]) -> None:
    tokens = _contains(obj, "tokens", "object", "JSON area")
    for key, token in tokens.items():
        _numbered(key, "token")
        if "keyslots" not in obj:
            raise FormatError("missing keyslots section")
        _contains_string(token, "type", f"token {key}")
        refs = _contains(token, "keyslots", "array", f"token {key}")
        _check_refs(refs, obj["keyslots"], "keyslots")


def _validate_digests(obj: dict[str, Any]) -> None:
    digests = _contains(obj, "digests", "object", "JSON area")
    if "keyslots" not in obj or "segments" not in obj:
        raise FormatError("missing keyslots or segments section")
    for key, digest in digests.items():
        _numbered(key, "digest")
        _contains_string(digest, "type", f"digest {key}")
        keyslots = _contains(digest, "keyslots", "array", f"digest {key}")
        segments = _contains(digest, "segments", "array", f"digest {key}")
        _check_refs(keyslots, obj["keyslots"], "keyslots")
        _check_refs(segments, obj["segments"], "segments")


def _validate_crypt_segment(key: str, seg: dict[str, Any], size: int, digests: Any) -> None:
    where = f"segment {key}"
    iv_tweak = _contains_string(seg, "iv_tweak", where)
    _contains_string(seg, "encryption", where)
    sector_size = _contains(seg, "sector_size", "int", where)
    if "integrity" in seg:
        integrity = _contains(seg, "integrity", "object", where)
        for name in ("type", "journal_encryption", "journal_integrity"):
            _contains_string(integrity, name, f"{where} integrity")
    sector_size = _uint32(sector_size, f"{where} sector_size")
    if sector_size == 0 or sector_size % 512:
        raise FormatError(f"{where}: illegal sector size {sector_size}")
    try:
        _uint64(iv_tweak, f"{where} iv_tweak")
    except FormatError:
        raise FormatError(f"{where}: illegal iv_tweak value {iv_tweak!r}") from None
    if size % sector_size:
        raise FormatError(f"{where}: size is not aligned to the sector size {sector_size}")
    if not any(
        isinstance(d, dict) and isinstance(d.get("segments"), list) and key in d["segments"]
        for d in digests.values()
    ):
        raise FormatError(f"crypt {where} is not assigned to a key digest")


def _segment_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """cryptsetup's ``json_segment_cmp`` (same type; crypt: same sector size and cipher)."""
    if a.get("type") != b.get("type") or not isinstance(a.get("type"), str):
        return False
    if a["type"] == "crypt":
        return a.get("sector_size") == b.get("sector_size") and a.get("encryption") == b.get(
            "encryption"
        )
    return True


def _validate_segments(obj: dict[str, Any]) -> None:
    segments = _contains(obj, "segments", "object", "JSON area")
    count = len(segments)
    if count < 1:
        raise FormatError("empty segments section")
    if "digests" not in obj:
        raise FormatError("missing digests section")
    digests = obj["digests"]
    first_backup = -1
    for key, seg in segments.items():
        _numbered(key, "segment")
        where = f"segment {key}"
        seg_type = _contains_string(seg, "type", where)
        offset_text = _contains_string(seg, "offset", where)
        size_text = _contains_string(seg, "size", where)
        offset = _uint64(offset_text, f"{where} offset")
        if size_text != "dynamic":
            size = _uint64(size_text, f"{where} size")
            if size == 0:
                raise FormatError(f"{where}: illegal size 0")
        else:
            size = 0
        if offset % 512 or size % 512:
            raise FormatError(f"{where}: offset and size must be aligned to 512 bytes")
        if "flags" in seg:
            flags = _contains(seg, "flags", "array", where)
            if not all(isinstance(f, str) for f in flags):
                raise FormatError(f"{where}: flags must be strings")
        index = int(key)
        if _is_backup(seg):
            if first_backup < 0 or index < first_backup:
                first_backup = index
        elif first_backup >= 0 and index >= first_backup:
            raise FormatError(f"regular segment {index} is behind backup segment {first_backup}")
        if seg_type == "crypt":
            _validate_crypt_segment(key, seg, size, digests)
        if seg_type.startswith("hw-opal"):
            if not size:
                raise FormatError(f"{where}: {seg_type} does not support dynamic size")
            _contains(seg, "opal_segment_number", "int", where)
            _contains(seg, "opal_key_size", "int", where)
            opal_size = _uint64(
                _contains_string(seg, "opal_segment_size", where), f"{where} opal_segment_size"
            )
            if opal_size == 0 or size > opal_size:
                raise FormatError(f"{where}: illegal OPAL segment size")
            if seg_type == "hw-opal-crypt":
                _validate_crypt_segment(key, seg, size, digests)
    if first_backup == 0:
        raise FormatError("no regular segment")
    if first_backup >= count:
        raise FormatError(f"gap between the last regular segment and backup segment {first_backup}")
    if first_backup < 0:
        first_backup = count
    intervals: list[tuple[int, int | None]] = []
    for i in range(first_backup):
        seg = segments.get(str(i))
        if seg is None:
            raise FormatError(f"gap at key {i} in the segments object")
        size_text = seg["size"]
        intervals.append((int(seg["offset"]), None if size_text == "dynamic" else int(size_text)))
    for i, (off_i, len_i) in enumerate(intervals):
        if len_i is None and i != len(intervals) - 1:
            raise FormatError("only the last regular segment may have dynamic size")
        for j, (off_j, len_j) in enumerate(intervals):
            if i == j:
                continue
            if len_j is not None and off_j > UINT64_MAX - len_j:
                raise FormatError("segment offset + size overflows")
            if off_i >= off_j and (len_j is None or off_i < off_j + len_j):
                raise FormatError(f"segments {i} and {j} overlap")
    for i in range(first_backup, count):
        if str(i) not in segments:
            raise FormatError(f"gap at key {i} in the segments object")
    # reencryption: regular segments must match the backup segments
    if any(_reencrypt_candidate(m) for m in _mandatory_requirements(obj)):
        backups = [segments[str(i)] for i in range(first_backup, count)]
        final = next((s for s in backups if _segment_has_flag(s, "backup-final")), None)
        previous = next(
            (
                s
                for s in backups
                if not _segment_has_flag(s, "backup-final")
                and _segment_has_flag(s, "backup-previous")
            ),
            None,
        )
        if final is None or previous is None:
            raise FormatError("reencryption backup segment is missing")
        for i in range(first_backup):
            seg = segments[str(i)]
            if _segment_has_flag(seg, "in-reencryption"):
                if not _segment_equal(seg, final):
                    raise FormatError(
                        "segment in reencryption does not match the backup-final segment"
                    )
            elif not _segment_equal(seg, final) and not _segment_equal(seg, previous):
                raise FormatError("segment matches neither backup segment")


def _validate_keyslots(obj: dict[str, Any]) -> None:
    keyslots = _contains(obj, "keyslots", "object", "JSON area")
    for key, slot in keyslots.items():
        _numbered(key, "keyslot")
        _contains_string(slot, "type", f"keyslot {key}")
        _uint32(_contains(slot, "key_size", "int", f"keyslot {key}"), f"keyslot {key} key_size")


def _metadata_size(obj: dict[str, Any]) -> int:
    return int(obj["config"]["json_size"]) + BIN_HEADER_SIZE


def _hdr_and_areas_size(obj: dict[str, Any]) -> int:
    return 2 * _metadata_size(obj) + int(obj["config"]["keyslots_size"])


def _validate_config(obj: dict[str, Any]) -> None:
    config = _contains(obj, "config", "object", "JSON area")
    json_size = _uint64(_contains_string(config, "json_size", "config"), "config json_size")
    keyslots_size = _uint64(
        _contains_string(config, "keyslots_size", "config"), "config keyslots_size"
    )
    metadata_size = json_size + BIN_HEADER_SIZE
    if metadata_size not in HDR2_OFFSETS:
        raise FormatError(f"unsupported LUKS2 header size {metadata_size}")
    if keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
        raise FormatError(f"unsupported LUKS2 keyslots size {keyslots_size}")
    # the keyslots area must fit between the two headers and the first data
    # segment (a detached header has data offset 0 and is not checked)
    offsets = [int(s["offset"]) for s in obj["segments"].values() if not _is_backup(s)]
    first = 0 if not offsets or 0 in offsets else min(offsets)
    if first and (first < keyslots_size or first - keyslots_size < 2 * metadata_size):
        raise FormatError(
            f"keyslots_size {keyslots_size} is too large for data offset {first} "
            f"(keyslots start at {2 * metadata_size})"
        )
    if "flags" in config:
        flags = _contains(config, "flags", "array", "config")
        if not all(isinstance(f, str) for f in flags):
            raise FormatError("config flags must be strings")


def _validate_areas(obj: dict[str, Any]) -> None:
    keyslots = obj["keyslots"]
    metadata_size = _metadata_size(obj)
    end = _hdr_and_areas_size(obj)
    intervals = []
    for key, slot in keyslots.items():
        where = f"keyslot {key}"
        area = _contains(slot, "area", "object", where)
        _contains_string(area, "type", f"{where} area")
        offset = _uint64(_contains_string(area, "offset", f"{where} area"), f"{where} area offset")
        length = _uint64(_contains_string(area, "size", f"{where} area"), f"{where} area size")
        intervals.append((key, offset, length))
    for key, offset, length in intervals:
        if offset < 2 * metadata_size:
            raise FormatError(f"keyslot {key} area at {offset} lies inside the LUKS2 header")
        if length == 0:
            raise FormatError(f"keyslot {key} area has length 0")
        if offset > UINT64_MAX - length:
            raise FormatError(f"keyslot {key} area offset + size overflows")
        if offset + length > end:
            raise FormatError(
                f"keyslot {key} area [{offset}, {offset + length}) overflows the keyslots area "
                f"(ends at {end})"
            )
        for other, o_off, o_len in intervals:
            if other == key:
                continue
            if o_off > UINT64_MAX - o_len:
                raise FormatError(f"keyslot {other} area offset + size overflows")
            if o_off <= offset < o_off + o_len:
                raise FormatError(f"keyslot areas {key} and {other} overlap")


def _compact_length(obj: Any) -> int:
    """Length of json-c's plain, no-slash-escape serialisation (what cryptsetup writes)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogateescape"))


def _validate_json_size(obj: dict[str, Any], area_size: int) -> None:
    json_size = int(obj["config"]["json_size"])
    if json_size != area_size:
        raise FormatError(
            f"config json_size {json_size} does not match the binary header's {area_size}"
        )
    if _compact_length(obj) > json_size:
        raise FormatError("JSON does not fit in the designated area")


def _validate_luks2_keyslot(key: str, slot: dict[str, Any]) -> None:
    """The ``luks2`` keyslot handler's checks.  Unknown extra KDF parameters are
    tolerated: cryptsetup strips them in memory (``luks2_keyslot_repair``) and
    validates again, which is the same verdict."""
    where = f"keyslot {key}"
    kdf = _contains(slot, "kdf", "object", where)
    af = _contains(slot, "af", "object", where)
    area = _contains(slot, "area", "object", where)
    kdf_type = _contains(kdf, "type", "string", f"{where} kdf")
    if kdf_type == "pbkdf2":
        _contains(kdf, "hash", "string", f"{where} kdf")
        _contains(kdf, "iterations", "int", f"{where} kdf")
        _contains(kdf, "salt", "string", f"{where} kdf")
    elif kdf_type in ("argon2i", "argon2id"):
        for name in ("time", "memory", "cpus"):
            _contains(kdf, name, "int", f"{where} kdf")
        _contains(kdf, "salt", "string", f"{where} kdf")
    if af.get("type") != "luks1":
        raise FormatError(f"{where}: unknown anti-forensic type {af.get('type')!r}")
    _contains(af, "hash", "string", f"{where} af")
    _contains(af, "stripes", "int", f"{where} af")
    if area.get("type") != "raw":
        raise FormatError(f"{where}: unknown area type {area.get('type')!r}")
    _contains(area, "encryption", "string", f"{where} area")
    _contains(area, "key_size", "int", f"{where} area")
    _contains(area, "offset", "string", f"{where} area")
    _contains(area, "size", "string", f"{where} area")


def _validate_keyslot_implementations(obj: dict[str, Any]) -> None:
    reencrypt = 0
    for key, slot in obj["keyslots"].items():
        kind = slot["type"]
        if kind == "luks2":
            _validate_luks2_keyslot(key, slot)
            owners = sum(
                1
                for d in obj["digests"].values()
                if isinstance(d.get("keyslots"), list) and key in d["keyslots"]
            )
            if owners != 1:
                raise FormatError(f"keyslot {key} is assigned to {owners} digests, not exactly 1")
        elif kind == "reencrypt":
            # Its own parameters are not checked here: a reencrypt keyslot only
            # comes with a reencryption requirement, which opening refuses.
            reencrypt += 1
    online = any(_reencrypt_candidate(m) for m in _mandatory_requirements(obj))
    if online and reencrypt == 0:
        raise FormatError("missing reencryption keyslot")
    if reencrypt and not online:
        raise FormatError("reencryption keyslot without a reencryption requirement")
    if reencrypt > 1:
        raise FormatError("too many reencryption keyslots")


def validate_metadata(obj: Any, json_area_size: int) -> None:
    """Validate LUKS2 JSON metadata as cryptsetup's ``LUKS2_hdr_validate`` does.

    *json_area_size* is the copy's ``hdr_size - 4096``.  Raises
    :class:`FormatError` naming the first problem.
    """
    if not isinstance(obj, dict):
        raise FormatError("JSON metadata is not an object")
    _validate_requirements(obj)
    _validate_tokens(obj)
    _validate_digests(obj)
    _validate_segments(obj)
    _validate_keyslots(obj)
    _validate_config(obj)
    _validate_areas(obj)
    _validate_json_size(obj, json_area_size)
    _validate_keyslot_implementations(obj)


# ---------------------------------------------------------------------------
# Typed metadata
# ---------------------------------------------------------------------------


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64") from None


def _opt_int(value: Any) -> int | None:
    return int(value) if _is_int(value) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Kdf:
    """A keyslot's key derivation: ``pbkdf2`` (hash, iterations) or
    ``argon2i``/``argon2id`` (time, memory in KiB, cpus); other types are kept
    as read and refused when used."""

    type: str
    salt: bytes = b""
    hash: str | None = None
    iterations: int | None = None
    time: int | None = None
    memory: int | None = None
    cpus: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Kdf:
        """Build from a validated ``kdf`` object."""
        salt = _b64(d["salt"], f"{where} salt") if "salt" in d else b""
        return cls(
            type=str(d.get("type")),
            salt=salt,
            hash=_opt_str(d.get("hash")),
            iterations=_opt_int(d.get("iterations")),
            time=_opt_int(d.get("time")),
            memory=_opt_int(d.get("memory")),
            cpus=_opt_int(d.get("cpus")),
        )


@dataclass(frozen=True)
class AntiForensic:
    """The ``af`` object: type ``luks1`` with ``stripes`` and ``hash``."""

    type: str
    stripes: int | None
    hash: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AntiForensic:
        """Build from a validated ``af`` object."""
        return cls(str(d.get("type")), _opt_int(d.get("stripes")), _opt_str(d.get("hash")))


@dataclass(frozen=True)
class KeyslotArea:
    """The ``area`` object: type ``raw``, byte ``offset`` and ``size`` in the
    header device, and the ``encryption``/``key_size`` of the key material."""

    type: str
    offset: int
    size: int
    encryption: str | None
    key_size: int | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyslotArea:
        """Build from a validated ``area`` object (offset and size are decimal strings)."""
        return cls(
            str(d["type"]),
            int(d["offset"]),
            int(d["size"]),
            _opt_str(d.get("encryption")),
            _opt_int(d.get("key_size")),
        )


@dataclass(frozen=True)
class Keyslot:
    """A LUKS2 keyslot; ``kdf``/``af`` are None for types other than ``luks2``."""

    index: int
    type: str
    key_size: int  # bytes of the volume key it stores
    priority: int
    area: KeyslotArea
    kdf: Kdf | None
    af: AntiForensic | None

    @classmethod
    def from_dict(cls, index: int, d: dict[str, Any]) -> Keyslot:
        """Build from a validated keyslot object."""
        luks2 = d["type"] == "luks2"
        priority = d.get("priority", PRIORITY_NORMAL)
        return cls(
            index=index,
            type=d["type"],
            key_size=int(d["key_size"]),
            priority=int(priority) if _is_int(priority) else PRIORITY_NORMAL,
            area=KeyslotArea.from_dict(d["area"]),
            kdf=Kdf.from_dict(d["kdf"], f"keyslot {index} kdf") if luks2 else None,
            af=AntiForensic.from_dict(d["af"]) if luks2 else None,
        )


@dataclass(frozen=True)
class Digest:
    """A volume-key digest binding keyslots to segments (type ``pbkdf2``)."""

    index: int
    type: str
    keyslots: tuple[int, ...]
    segments: tuple[int, ...]
    hash: str | None
    iterations: int | None
    salt: bytes
    digest: bytes

    @classmethod
    def from_dict(cls, index: int, d: dict[str, Any]) -> Digest:
        """Build from a validated digest object."""
        pbkdf = d["type"] == "pbkdf2"
        return cls(
            index=index,
            type=d["type"],
            keyslots=tuple(int(k) for k in d["keyslots"]),
            segments=tuple(int(s) for s in d["segments"]),
            hash=_opt_str(d.get("hash")),
            iterations=_opt_int(d.get("iterations")),
            salt=_b64(d.get("salt"), f"digest {index} salt") if pbkdf else b"",
            digest=_b64(d.get("digest"), f"digest {index} digest") if pbkdf else b"",
        )


@dataclass(frozen=True)
class Segment:
    """A data segment: byte ``offset`` in the data device, ``size`` (None =
    ``dynamic``), and for ``crypt``: cipher, sector size, IV tweak (512-byte units)."""

    index: int
    type: str
    offset: int
    size: int | None
    iv_tweak: int | None = None
    encryption: str | None = None
    sector_size: int | None = None
    integrity: bool = False
    flags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, index: int, d: dict[str, Any]) -> Segment:
        """Build from a validated segment object."""
        size = d["size"]
        tweak = d.get("iv_tweak")
        return cls(
            index=index,
            type=d["type"],
            offset=int(d["offset"]),
            size=None if size == "dynamic" else int(size),
            iv_tweak=int(tweak) if isinstance(tweak, str) and _DIGITS.fullmatch(tweak) else None,
            encryption=_opt_str(d.get("encryption")),
            sector_size=_opt_int(d.get("sector_size")),
            integrity="integrity" in d,
            flags=tuple(d.get("flags", ())),
        )


@dataclass(frozen=True)
class Token:
    """A token (cryptfuse does not run tokens; kept to explain token-bound keyslots)."""

    index: int
    type: str
    keyslots: tuple[int, ...]

    @classmethod
    def from_dict(cls, index: int, d: dict[str, Any]) -> Token:
        """Build from a validated token object."""
        return cls(index, d["type"], tuple(int(k) for k in d["keyslots"]))


@dataclass(frozen=True)
class Config:
    """The ``config`` object: sizes, persistent flags and mandatory requirements."""

    json_size: int
    keyslots_size: int
    flags: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a validated config object."""
        reqs = d.get("requirements", {})
        return cls(
            json_size=int(d["json_size"]),
            keyslots_size=int(d["keyslots_size"]),
            flags=tuple(d.get("flags", ())),
            requirements=tuple(reqs.get("mandatory", ())),
        )


@dataclass(frozen=True)
class LUKS2Metadata:
    """The JSON metadata as typed objects, keyed by their numeric ids."""

    keyslots: dict[int, Keyslot]
    digests: dict[int, Digest]
    segments: dict[int, Segment]
    tokens: dict[int, Token]
    config: Config

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> LUKS2Metadata:
        """Build from metadata that passed :func:`validate_metadata`."""
        return cls(
            keyslots={int(k): Keyslot.from_dict(int(k), v) for k, v in obj["keyslots"].items()},
            digests={int(k): Digest.from_dict(int(k), v) for k, v in obj["digests"].items()},
            segments={int(k): Segment.from_dict(int(k), v) for k, v in obj["segments"].items()},
            tokens={int(k): Token.from_dict(int(k), v) for k, v in obj["tokens"].items()},
            config=Config.from_dict(obj["config"]),
        )


# ---------------------------------------------------------------------------
# The header as a whole
# ---------------------------------------------------------------------------

#: (offset, signature, what): foreign signatures cryptsetup's blkid probe would
#: report in the first sectors; only consulted when a header copy is damaged.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0x218, b"LVM2 001", "LVM2 physical volume"),
    (0x418, b"LVM2 001", "LVM2 physical volume"),
    (0x618, b"LVM2 001", "LVM2 physical volume"),
    (0x18, b"LVM2 001", "LVM2 physical volume"),
    (0x438, b"\x53\xef", "ext2/3/4 filesystem"),
    (0x0, b"XFSB", "XFS filesystem"),
    (0x10040, b"_BHRfS_M", "btrfs filesystem"),
    (0x200, b"EFI PART", "GPT partition table"),
    (0x8001, b"CD001", "ISO 9660 filesystem"),
)


def _foreign_signature(fd: int) -> str | None:
    """Name a well-known foreign signature near the start of the device, if any.

    cryptsetup refuses to auto-recover a LUKS2 header when blkid sees another
    signature ("Device contains ambiguous signatures"); cryptfuse does not
    recover, but it refuses in the same situation rather than trusting a
    header that may have been overwritten on purpose.
    """
    for offset, magic, what in _SIGNATURES:
        try:
            found = pread_exact(fd, len(magic), offset, "signature")
        except DeviceError:
            continue
        if found == magic:
            return what
    return None


@dataclass(frozen=True)
class LUKS2Header:
    """A LUKS2 header as cryptsetup would load it (never repaired on disk)."""

    binary: BinaryHeader
    metadata: LUKS2Metadata
    json: dict[str, Any] = field(repr=False)
    #: "primary" or "secondary": the copy the metadata came from
    source: str
    #: the copy that is damaged or outdated (cryptsetup would rewrite it), or None
    damaged: str | None = None

    @property
    def uuid(self) -> str:
        """The header UUID."""
        return self.binary.uuid

    @property
    def hdr_and_areas_size(self) -> int:
        """Bytes of both header copies plus the keyslots area."""
        return _hdr_and_areas_size(self.json)

    # -- what opening needs ---------------------------------------------------------

    def check_requirements(self) -> None:
        """Refuse mandatory requirements: a reencryption in progress (for everything
        but mounting and ``reencrypt``, which handle it), unknown ones."""
        reqs = self.metadata.config.requirements
        if not reqs:
            return
        reencrypt = [r for r in reqs if r == "offline-reencrypt" or _reencrypt_candidate(r)]
        if reencrypt and set(reqs) <= set(REENCRYPT_REQUIREMENTS):
            # (mounting and reencrypt handle these; everything else refuses, as cryptsetup)
            raise UnsupportedError(
                "Operation incompatible with device marked for LUKS2 reencryption. Aborting. "
                "Finish the reencryption first: cryptfuse reencrypt --resume-only."
            )
        if reencrypt:
            raise UnsupportedError(
                f"LUKS2 reencryption requirement {', '.join(reencrypt)} is not supported "
                "(cryptfuse knows online-reencrypt-v2 and -v3); refusing to use this device."
            )
        raise UnsupportedError(
            f"LUKS2 header requires unknown features ({', '.join(reqs)}); refusing to open it."
        )

    def data_segment(self) -> tuple[Segment, CipherSpec, Digest]:
        """The single ``crypt`` segment, its cipher and the digest bound to it.

        Raises :class:`UnsupportedError` for anything cryptfuse cannot map as one
        dm-crypt target.
        """
        self.check_requirements()
        segments = self.metadata.segments
        if len(segments) != 1 or 0 not in segments:
            raise UnsupportedError(
                f"LUKS2 header has {len(segments)} segments; "
                "cryptfuse opens only a single crypt segment."
            )
        seg = segments[0]
        if seg.type != "crypt":
            raise UnsupportedError(f"LUKS2 segment type {seg.type!r} is not supported.")
        if seg.integrity:
            raise UnsupportedError(
                "LUKS2 segments with integrity protection (dm-integrity) are not supported."
            )
        if "in-reencryption" in seg.flags:
            raise UnsupportedError("LUKS2 segment is flagged in-reencryption; refusing to open it.")
        assert (
            seg.encryption is not None and seg.sector_size is not None and seg.iv_tweak is not None
        )
        spec = luks_cipher_spec(seg.encryption, "LUKS2 segment cipher")
        if seg.sector_size not in SECTOR_SIZES:
            raise UnsupportedError(
                f"LUKS2 segment sector size {seg.sector_size} is not supported "
                "(512..4096, power of 2)."
            )
        bound = [d for _, d in sorted(self.metadata.digests.items()) if 0 in d.segments]
        if not bound:  # pragma: no cover - validation requires it
            raise FormatError("LUKS2 data segment has no digest")
        return seg, spec, bound[0]

    def _token_types(self, slot: int) -> list[str]:
        return [t.type for t in self.metadata.tokens.values() if slot in t.keyslots]

    def _check_keyslot(self, slot: Keyslot, volume_spec: CipherSpec | None) -> CipherSpec:
        """Everything that can be refused before running the KDF; returns the area cipher."""
        where = f"LUKS2 keyslot {slot.index}"
        assert slot.kdf is not None and slot.af is not None
        if slot.af.stripes is None or slot.af.stripes < 1 or slot.af.hash is None:
            raise FormatError(f"{where} has invalid anti-forensic parameters.")
        hash_size(slot.af.hash)  # refuses a hash neither hashlib nor libgcrypt has
        if slot.area.encryption is None or slot.area.key_size is None or slot.area.key_size < 1:
            raise FormatError(f"{where} has an invalid area.")
        area_spec = luks_cipher_spec(slot.area.encryption, f"{where} cipher")
        check_key_size(area_spec, slot.area.key_size, where)
        if slot.key_size < 1:
            raise FormatError(f"{where} has key size 0.")
        if volume_spec is not None:
            check_key_size(volume_spec, slot.key_size, f"{where} (volume key for {volume_spec})")
        if af_sectors(slot.key_size, slot.af.stripes) * 512 > slot.area.size:
            raise FormatError(f"{where}: key material does not fit in its area.")
        kdf = slot.kdf
        if kdf.type == "pbkdf2":
            if kdf.hash is None or kdf.iterations is None or kdf.iterations < 1:
                raise FormatError(f"{where} has invalid PBKDF2 parameters.")
            hash_size(kdf.hash)
        elif kdf.type in ("argon2i", "argon2id"):
            if kdf.time is None or kdf.memory is None or kdf.cpus is None:
                raise FormatError(f"{where} has invalid Argon2 parameters.")
        else:
            raise UnsupportedError(f"{where} uses unsupported KDF {kdf.type!r}.")
        return area_spec

    def try_keyslot(
        self,
        fd: int,
        slot: Keyslot,
        passphrase: bytes,
        digest: Digest,
        volume_spec: CipherSpec | None = None,
    ) -> bytes | None:
        """Return the volume key if *passphrase* opens *slot* (checked against *digest*)."""
        area_spec = self._check_keyslot(slot, volume_spec)
        kdf = slot.kdf
        assert kdf is not None and slot.af is not None and slot.area.key_size is not None
        if kdf.type == "pbkdf2":
            assert kdf.hash is not None and kdf.iterations is not None
            derived = pbkdf2(kdf.hash, passphrase, kdf.salt, kdf.iterations, slot.area.key_size)
        else:
            assert kdf.time is not None and kdf.memory is not None and kdf.cpus is not None
            try:
                derived = argon2(
                    kdf.type,
                    passphrase,
                    kdf.salt,
                    kdf.time,
                    kdf.memory,
                    kdf.cpus,
                    slot.area.key_size,
                )
            except UsageError as exc:
                raise FormatError(f"LUKS2 keyslot {slot.index}: {exc}") from None
        assert slot.af.stripes is not None and slot.af.hash is not None
        key = recover_af_key(
            fd,
            area_offset=slot.area.offset,
            key_len=slot.key_size,
            stripes=slot.af.stripes,
            af_hash=slot.af.hash,
            spec=area_spec,
            derived_key=derived,
            what=f"LUKS2 keyslot {slot.index} key material",
        )
        return key if self.verify_volume_key(key, digest) else None

    @staticmethod
    def verify_volume_key(key: bytes, digest: Digest) -> bool:
        """True when *key* matches *digest* (PBKDF2 of any length, constant-time compare)."""
        if digest.type != "pbkdf2":
            raise UnsupportedError(f"LUKS2 digest type {digest.type!r} is not supported.")
        if (
            digest.hash is None
            or digest.iterations is None
            or digest.iterations < 1
            or not digest.digest
        ):
            raise FormatError(f"LUKS2 digest {digest.index} has invalid parameters.")
        candidate = pbkdf2(digest.hash, key, digest.salt, digest.iterations, len(digest.digest))
        return digest_equal(candidate, digest.digest)

    def _digest_of(self, slot: int) -> Digest | None:
        return next(
            (d for _, d in sorted(self.metadata.digests.items()) if slot in d.keyslots), None
        )

    def unlock(
        self, fd: int, passphrase: bytes, key_slot: int | None = None, *, any_segment: bool = False
    ) -> tuple[int, bytes]:
        """Find the keyslot that *passphrase* opens; return ``(slot, volume key)``.

        Without *key_slot*, keyslots bound to the data segment are tried by
        priority (high, then normal; priority 0 only when named), each in JSON
        order (cryptsetup's: which slot opens matters where a passphrase is in two).  With
        *any_segment* (cryptsetup's ``--test-passphrase``), the data segment is
        not consulted: every ``luks2`` keyslot counts, checked against its own
        digest, so unlocking also works where opening is refused.
        Raises :class:`WrongPassphraseError` when none opens, and
        :class:`UnsupportedError` when keyslots that could not be tried remain.
        """
        volume_spec: CipherSpec | None = None
        if any_segment:

            def digest_for(index: int) -> Digest | None:
                return self._digest_of(index)
        else:
            _, volume_spec, bound = self.data_segment()

            def digest_for(index: int) -> Digest | None:
                return bound if index in bound.keyslots else None

        slots = self.metadata.keyslots
        if key_slot is not None:
            if not 0 <= key_slot < NUM_KEYSLOTS:
                raise UsageError(
                    f"Key slot {key_slot} is invalid (LUKS2 has slots 0-{NUM_KEYSLOTS - 1})."
                )
            slot = slots.get(key_slot)
            if slot is None:
                raise KeyslotError(f"Keyslot {key_slot} is not active.")
            if slot.type != "luks2":
                raise UnsupportedError(
                    f"Keyslot {key_slot} has type {slot.type!r}; it cannot unlock the volume."
                )
            if digest_for(key_slot) is None:
                raise KeyslotError(
                    f"Keyslot {key_slot} is not assigned to the data segment (unbound keyslot); "
                    "it cannot unlock the volume."
                )
            candidates = [slot]
        else:
            usable = [  # in JSON order, as cryptsetup tries them
                s for i, s in slots.items() if s.type == "luks2" and digest_for(i) is not None
            ]
            candidates = [s for s in usable if s.priority == PRIORITY_HIGH]
            candidates += [s for s in usable if s.priority == PRIORITY_NORMAL]
            if not candidates:
                raise KeyslotError("No usable keyslot is available.")
        skipped: list[CryptfuseError] = []
        for slot in candidates:
            digest = digest_for(slot.index)
            assert digest is not None
            try:
                key = self.try_keyslot(fd, slot, passphrase, digest, volume_spec)
            except (UnsupportedError, FormatError) as exc:
                if key_slot is not None:
                    raise
                # cryptsetup stops at such a keyslot; trying the others first is
                # kinder, and the reason is reported if none opens.  Memory
                # errors (InsufficientMemoryError) are not caught: never a wrong passphrase.
                skipped.append(exc)
                continue
            if key is not None:
                return slot.index, key
        if skipped:
            kind = (
                FormatError
                if all(isinstance(e, FormatError) for e in skipped)
                else UnsupportedError
            )
            raise kind(
                "No key available with this passphrase; some keyslots could not be tried: "
                + " ".join(str(e) for e in skipped)
            )
        if key_slot is None and not self.wrong_passphrase_last(digest_for):
            raise KeyslotError("No usable keyslot is available.")
        tokens = {t for s in candidates for t in self._token_types(s.index)}
        if (
            tokens
            and "luks2-keyring" not in tokens
            and all(self._token_types(s.index) for s in candidates)
        ):
            raise WrongPassphraseError(
                "No key available with this passphrase. (Every keyslot is bound to a token "
                f"of type {', '.join(sorted(tokens))}; cryptfuse runs luks2-keyring tokens "
                "only, from the kernel keyring.)"
            )
        raise WrongPassphraseError()

    def wrong_passphrase_last(self, digest_for: Callable[[int], Digest | None]) -> bool:
        """Which error cryptsetup 2.6.1 reports once no keyslot opened: each priority's
        pass (preferred, then normal) keeps the result of the *last* keyslot of exactly
        that priority in JSON order (a wrong passphrase, or "unusable" for one not bound
        to the segment, or of another type), and a wrong passphrase in the first pass
        wins over "unusable" in the second (``LUKS2_keyslot_open``).  True: "No key
        available with this passphrase" (exit 2); False: "No usable keyslot" (exit 1)."""

        def last(priority: int) -> bool:
            wrong = False
            for i, s in self.metadata.keyslots.items():
                if s.priority == priority:
                    wrong = s.type == "luks2" and digest_for(i) is not None
            return wrong

        return last(PRIORITY_HIGH) or last(PRIORITY_NORMAL)


def has_luks2_header(fd: int) -> bool:
    """True when a LUKS2 binary header (primary, or a secondary at any allowed
    offset) with a valid checksum is present: cryptsetup recognises a device
    whose primary header was wiped by its secondary copy."""
    for offset, secondary in [(0, False)] + [(o, True) for o in HDR2_OFFSETS]:
        try:
            _read_binary_and_area(fd, offset, secondary)
        except _CopyError:
            continue
        return True
    return False


def read_luks2_header(fd: int, path: str, *, repairing: bool = False) -> LUKS2Header:
    """Read both header copies on *fd* (named *path*) and return the one
    cryptsetup would use.  Never writes; raises :class:`FormatError` when no
    copy is valid and :class:`DeviceError` when the device is too small.  With a
    damaged copy, a foreign signature makes the header ambiguous (refused), and a
    warning says so, except when *repairing* (``repair``, which rewrites the copy:
    cryptsetup's does not probe either)."""
    first = _read_copy(fd, 0, secondary=False)
    if first.state in ("fail", "io"):
        second = _Copy(0, "fail", "no secondary header at any allowed offset")
        for offset in HDR2_OFFSETS:
            candidate = _read_copy(fd, offset, secondary=True)
            if candidate.state in ("ok", "obsolete"):
                second = candidate
                break
    else:
        assert first.binary is not None
        second = _read_copy(fd, first.binary.hdr_size, secondary=True)

    if first.state == "ok" and second.state == "ok":
        assert first.binary is not None and second.binary is not None
        if first.binary.seqid > second.binary.seqid:
            second.state = "obsolete"
            second.reason = "older seqid"
        elif first.binary.seqid < second.binary.seqid:
            first.state = "obsolete"
            first.reason = "older seqid"

    if first.state == "ok":
        chosen, source, other = first, "primary", second
    elif second.state == "ok":
        chosen, source, other = second, "secondary", first
    else:
        detail = (
            f"primary: {first.reason or first.state}; secondary: {second.reason or second.state}"
        )
        if first.state == "io" and second.state == "io":
            raise DeviceError(f"Cannot read a LUKS2 header from {path} ({detail}).")
        raise FormatError(f"Device {path} is not a valid LUKS2 device ({detail}).")
    assert chosen.metadata is not None and chosen.binary is not None

    needed = _hdr_and_areas_size(chosen.metadata)
    if device_size(fd) < needed:
        raise DeviceError(f"Device {path} is too small. Need at least {needed} bytes.")

    damaged = None
    if other.state != "ok":
        damaged = "secondary" if source == "primary" else "primary"
        foreign = None if repairing else _foreign_signature(fd)
        if foreign is not None:
            raise FormatError(
                f"Device {path} contains ambiguous signatures ({foreign} and a damaged LUKS2 "
                'header), cannot auto-recover LUKS2. Please run "cryptfuse repair" for recovery.'
            )
        (log.info if repairing else log.warning)(
            "%s: the %s LUKS2 header is damaged or outdated (%s); using the %s copy. "
            "cryptfuse repairs headers only when asked: run 'cryptfuse repair' to fix it.",
            path,
            damaged,
            other.reason or other.state,
            source,
        )
    metadata = LUKS2Metadata.from_dict(chosen.metadata)
    return LUKS2Header(chosen.binary, metadata, chosen.metadata, source, damaged)


def open_luks2(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    key_slot: int | None,
    readonly: bool,
    volume_key_file: str | None = None,
) -> Volume:
    """Open a LUKS2 container and return its data segment as a :class:`Volume`.

    *header_path* names a detached header (None: the header is at the start of
    *data_path*); the segment offset is relative to *data_path* either way.
    *volume_key_file*: the volume key, read from that file and checked against the
    digest, instead of a keyslot that *passphrase* opens.
    Nothing is ever written to either file here.
    """
    if volume_key_file is not None and _in_reencryption(header_path or data_path):
        raise UnsupportedError(
            "A container in reencryption has two volume keys: open it with a passphrase."
        )
    if not readonly and _interrupted_reencryption(header_path or data_path):
        # As cryptsetup does on activation: finish the interrupted hot zone first.
        from .luks2_reencrypt import recover

        log.warning("%s: recovering an interrupted LUKS2 reencryption hot zone", data_path)
        recover(data_path, header_path, passphrase, key_slot)
    with open_devices(data_path, header_path, readonly) as dev:
        header = read_luks2_header(dev.header_fd, dev.header_path)
        if any(_reencrypt_candidate(r) for r in header.metadata.config.requirements):
            return _open_in_reencryption(header, dev, passphrase, key_slot, readonly)
        segment, spec, _ = header.data_segment()
        if volume_key_file is not None:
            from .volume_key import volume_key_from_file

            slot, key = None, volume_key_from_file(header, volume_key_file)
        else:
            slot, key = header.unlock(dev.header_fd, passphrase, key_slot)
        assert segment.sector_size is not None and segment.iv_tweak is not None
        size = data_area_size(
            dev.data_size, segment.offset, segment.sector_size, segment.size, data_path
        )
        # LUKS2 never sets iv_large_sectors: a 4 KiB sector's IV is its first
        # 512-byte sector number, and iv_tweak counts 512-byte sectors too.
        cipher = SectorCipher(spec, key, segment.sector_size, iv_offset=segment.iv_tweak)
        volume = Volume(
            dev.data_fd,
            cipher,
            segment.offset,
            size,
            readonly=readonly,
            description=f"LUKS2 {data_path}",
        )
        volume.key_slot = slot
        volume.dynamic_size = segment.size is None
        volume.persistent_flags = tuple(header.metadata.config.flags)
        return volume


def _peek(path: str) -> LUKS2Header | None:
    """*path*'s LUKS2 header, read without locking (only a hint: whoever acts on it
    locks and rereads), or None where there is none (the open that follows says why)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return read_luks2_header(fd, path)
    except CryptfuseError:
        return None
    finally:
        os.close(fd)


def _in_reencryption(path: str) -> bool:
    """True when *path* holds a LUKS2 header that requires a reencryption."""
    header = _peek(path)
    return header is not None and any(
        _reencrypt_candidate(r) for r in header.metadata.config.requirements
    )


def _interrupted_reencryption(path: str) -> bool:
    """True when *path* holds a LUKS2 header with a hot zone flagged in-reencryption."""
    header = _peek(path)
    return header is not None and any(
        _segment_has_flag(s, "in-reencryption") for s in header.json["segments"].values()
    )


def _open_in_reencryption(
    header: LUKS2Header, dev: Devices, passphrase: bytes, key_slot: int | None, readonly: bool
) -> Volume:
    """A container in reencryption as a :class:`SegmentedVolume` (old-key, new-key and
    plaintext segments); an interrupted hot zone (only possible read-only here) is
    served from its recovered state, worked out without writing."""
    from .luks2_reencrypt import open_reencryption

    unknown = [r for r in header.metadata.config.requirements if r not in REENCRYPT_REQUIREMENTS]
    if unknown:
        header.check_requirements()
    extents, _, crashed = open_reencryption(
        header, dev.data_fd, dev.header_fd, passphrase, key_slot, dev.data_size
    )
    extra: tuple[int, ...] = ()
    header_fd = dev.data_fd
    if any(e.on_header for e in extents) and dev.header_fd != dev.data_fd:
        header_fd = os.dup(dev.header_fd)
        extra = (header_fd,)
    maps = [
        ExtentMap(
            e.start, e.length, header_fd if e.on_header else dev.data_fd, e.position, e.cipher
        )
        for e in extents
    ]
    if crashed:
        log.warning(
            "%s: a reencryption hot zone was interrupted; serving its recovered state "
            "read-only (a read-write mount or 'cryptfuse repair' writes the recovery)",
            dev.data_path,
        )
    return SegmentedVolume(
        dev.data_fd,
        maps,
        readonly=readonly,
        description=f"LUKS2 {dev.data_path} (in reencryption)",
        extra_fds=extra,
    )
