"""The LUKS2 reencryption metadata digest (requirement ``online-reencrypt-v2``/``-v3``).

cryptsetup 2.4.3 (CVE-2021-4122) binds the reencryption metadata to the volume
key(s): a header whose reencryption parameters were altered by someone without
the key must be refused, because the crash-recovery code would otherwise
decrypt and re-encrypt data in the wrong place.  The binding is an ordinary
LUKS2 ``pbkdf2`` digest assigned to the ``reencrypt`` keyslot, computed over
*verification data* (cryptsetup ``lib/luks2/luks2_reencrypt_digest.c``)::

    b"v" + bytes([0x30 + version])       version of the requirement flag:
                                          online-reencrypt-v2 -> b"v2", -v3 -> b"v3"
    old volume key                        digest of the backup-previous segment
    new volume key                        digest of the backup-final segment
                                          (each only when that segment has a
                                          digest; the new key only once when
                                          both digests are the same)
    reencrypt keyslot fields              see serialize_reencrypt_keyslot()
    backup-previous segment               see serialize_segment()
    backup-final segment
    backup-moved-segment                  only when present

The fields are concatenated with no separators or length prefixes: strings as
their bytes, "uint64 as decimal string" fields as 8-byte big-endian, JSON
integers as 4-byte big-endian, and a segment ``size`` of ``"dynamic"`` as the
seven ASCII bytes ``dynamic``.  Everything here is a pure function of the
header JSON (the ``json.loads`` of the JSON area) and the volume keys.

Volume keys are given either as a mapping from digest id to key (what
cryptsetup's ``vks`` list holds) or as a plain iterable of keys, which are
matched to the header's digests by checking each digest (see
:func:`keys_by_digest`).
"""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cryptfuse.errors import FormatError, UsageError
from cryptfuse.kdf import digest_equal, hash_size, pbkdf2

from .luks_write import digest_iterations

__all__ = [
    "DIGEST_SALT_SIZE",
    "MIN_ITERATIONS",
    "REQUIREMENT_VERSIONS",
    "VolumeKeys",
    "compute_digest",
    "create_digest_entry",
    "digest_by_keyslot",
    "digest_by_segment",
    "keys_by_digest",
    "reencrypt_keyslot",
    "reencrypt_version",
    "repair_version",
    "requirement_name",
    "segment_by_flag",
    "serialize_backup_segments",
    "serialize_reencrypt_keyslot",
    "serialize_segment",
    "verification_data",
    "verify_digest",
    "with_reencrypt_digest",
]

#: Known reencryption requirement flags (cryptsetup 2.6.1 to 2.8) and the
#: version each stands for.  ``online-reencrypt`` (version 1) is what
#: cryptsetup 2.2 to 2.4.2 wrote: it has no digest and must be repaired.
REQUIREMENT_VERSIONS: dict[str, int] = {
    "online-reencrypt-v2": 2,
    "online-reencrypt-v3": 3,
    "online-reencrypt": 1,
}

#: Salt length of every LUKS2 ``pbkdf2`` digest (``LUKS_SALTSIZE``).
DIGEST_SALT_SIZE = 32

#: cryptsetup's PBKDF2 minimum, written when it does not benchmark.
MIN_ITERATIONS = 1000

#: Longest string field cryptsetup serialises (``MAX_STR``).
_MAX_STR = 64

#: Digest lengths PBKDF2_digest_verify accepts: 20 (LUKS1 heritage) or the
#: hash size, at most 64 bytes.
_LUKS_DIGESTSIZE = 20
_MAX_DIGEST = 64

_KEYSLOTS_MAX = 32
_DIGESTS_MAX = 8

VolumeKeys = Mapping[int, bytes] | Iterable[bytes]


# ---------------------------------------------------------------------------
# header lookups, in cryptsetup's order
# ---------------------------------------------------------------------------


def _section(hdr_json: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = hdr_json.get(name)
    if not isinstance(section, Mapping):
        raise FormatError(f"LUKS2 header has no {name!r} object")
    return section


def reencrypt_version(hdr_json: Mapping[str, Any]) -> int:
    """The reencryption requirement version (``LUKS2_config_get_reencrypt_version``).

    The first entry of ``config.requirements.mandatory`` that starts with
    ``online-reencrypt`` and is a known flag decides: 1, 2 or 3.  Raises
    :class:`FormatError` when there is none (the header is not in reencryption,
    or only carries a newer flag this code, like cryptsetup 2.6.1, does not know).
    """
    config = hdr_json.get("config")
    reqs = config.get("requirements") if isinstance(config, Mapping) else None
    mandatory = reqs.get("mandatory") if isinstance(reqs, Mapping) else None
    if isinstance(mandatory, list):
        for flag in mandatory:
            if isinstance(flag, str) and flag.startswith("online-reencrypt"):
                version = REQUIREMENT_VERSIONS.get(flag)
                if version is not None:
                    return version
    raise FormatError("LUKS2 header has no known online-reencrypt requirement")


def requirement_name(version: int) -> str:
    """The mandatory requirement flag for *version* (1 is the legacy name)."""
    if version == 1:
        return "online-reencrypt"
    if not 2 <= version <= 207:
        raise UsageError(f"reencryption requirement version {version} is out of range")
    return f"online-reencrypt-v{version}"


def reencrypt_keyslot(hdr_json: Mapping[str, Any]) -> int:
    """Id of the ``reencrypt`` keyslot: the lowest-numbered one (``LUKS2_find_keyslot``)."""
    keyslots = _section(hdr_json, "keyslots")
    for i in range(_KEYSLOTS_MAX):
        slot = keyslots.get(str(i))
        if isinstance(slot, Mapping) and slot.get("type") == "reencrypt":
            return i
    raise FormatError("LUKS2 header has no reencrypt keyslot")


def segment_by_flag(hdr_json: Mapping[str, Any], flag: str) -> tuple[int, Mapping[str, Any]] | None:
    """The first segment, in JSON order, whose ``flags`` contain *flag*."""
    for key, segment in _section(hdr_json, "segments").items():
        if not isinstance(segment, Mapping):
            continue
        flags = segment.get("flags")
        if isinstance(flags, list) and flag in flags:
            return _int_key(key), segment
    return None


def _int_key(key: str) -> int:
    # cryptsetup uses atoi() on the object key.
    digits = ""
    for ch in key.lstrip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def _first_digest_listing(hdr_json: Mapping[str, Any], field: str, ident: int) -> int | None:
    for key, digest in _section(hdr_json, "digests").items():
        if not isinstance(digest, Mapping):
            continue
        listed = digest.get(field)
        if isinstance(listed, list) and str(ident) in listed:
            return _int_key(key)
    return None


def digest_by_segment(hdr_json: Mapping[str, Any], segment: int) -> int | None:
    """The first digest (JSON order) listing *segment*, or None (``LUKS2_digest_by_segment``)."""
    return _first_digest_listing(hdr_json, "segments", segment)


def digest_by_keyslot(hdr_json: Mapping[str, Any], keyslot: int) -> int | None:
    """The first digest (JSON order) listing *keyslot*, or None (``LUKS2_digest_by_keyslot``)."""
    return _first_digest_listing(hdr_json, "keyslots", keyslot)


def _key_digests(hdr_json: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(old, new) digest ids: those of the backup-previous and backup-final segments."""
    ids = []
    for flag in ("backup-previous", "backup-final"):
        found = segment_by_flag(hdr_json, flag)
        ids.append(digest_by_segment(hdr_json, found[0]) if found else None)
    return ids[0], ids[1]


def repair_version(hdr_json: Mapping[str, Any]) -> int:
    """The version cryptsetup (2.5+) gives a reencryption it creates or repairs.

    3 for decryption that moves the data (mode ``decrypt``, a ``datashift-*``
    resilience and a backup-moved-segment), else 2.
    """
    slot = _section(hdr_json, "keyslots")[str(reencrypt_keyslot(hdr_json))]
    area = slot.get("area")
    area_type = area.get("type") if isinstance(area, Mapping) else None
    if (
        slot.get("mode") == "decrypt"
        and isinstance(area_type, str)
        and area_type.startswith("datashift-")
        and segment_by_flag(hdr_json, "backup-moved-segment") is not None
    ):
        return 3
    return 2


# ---------------------------------------------------------------------------
# field encodings (cryptsetup's sr())
# ---------------------------------------------------------------------------


def _strtoull(text: str) -> int:
    """``crypt_jobj_get_uint64``: strtoull(base 10) or 0 when it fails."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if not s or not s.isascii() or not s.isdigit():
        return 0  # no digits, or trailing garbage: *endptr != 0
    value = int(s)
    if value > 0xFFFFFFFFFFFFFFFF:
        return 0  # ERANGE
    return (-value) & 0xFFFFFFFFFFFFFFFF if negative else value


def _field(obj: Any, key: str, kind: str) -> bytes:
    """One serialised field; raises FormatError where cryptsetup's sr() returns 0."""
    if not isinstance(obj, Mapping) or key not in obj:
        raise FormatError(f"reencryption metadata lacks {key!r}")
    value = obj[key]
    if kind == "str":
        if not isinstance(value, str):
            raise FormatError(f"reencryption metadata field {key!r} is not a string")
        raw = value.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]  # strlen()
        if not raw or len(raw) > _MAX_STR:
            raise FormatError(f"reencryption metadata field {key!r} has a bad length")
        return raw
    if kind in ("u64", "x64"):
        if not isinstance(value, str):
            raise FormatError(f"reencryption metadata field {key!r} is not a string")
        if kind == "x64" and value == "dynamic":
            return b"dynamic"
        return _strtoull(value).to_bytes(8, "big")
    if kind == "u32":
        if not isinstance(value, int) or isinstance(value, bool):
            raise FormatError(f"reencryption metadata field {key!r} is not an integer")
        clamped = max(-(2**63), min(2**63 - 1, value))  # json_object_get_int64
        return (clamped & 0xFFFFFFFF).to_bytes(4, "big")
    raise AssertionError(kind)


def _fields(spec: Iterable[tuple[Any, str, str]]) -> bytes:
    return b"".join(_field(obj, key, kind) for obj, key, kind in spec)


def serialize_segment(segment: Mapping[str, Any]) -> bytes:
    """A ``crypt`` or ``linear`` segment as cryptsetup serialises it.

    linear: type, offset (u64 BE), size (u64 BE or ``dynamic``);
    crypt: the same, then iv_tweak (u64 BE), encryption, sector_size (u32 BE).
    Flags are not covered.
    """
    kind = segment.get("type")
    if kind == "crypt":
        return _fields(
            [
                (segment, "type", "str"),
                (segment, "offset", "u64"),
                (segment, "size", "x64"),
                (segment, "iv_tweak", "u64"),
                (segment, "encryption", "str"),
                (segment, "sector_size", "u32"),
            ]
        )
    if kind == "linear":
        return _fields(
            [(segment, "type", "str"), (segment, "offset", "u64"), (segment, "size", "x64")]
        )
    raise FormatError(f"reencryption backup segment has type {kind!r}")


def serialize_backup_segments(hdr_json: Mapping[str, Any]) -> bytes:
    """backup-previous, backup-final (both required), then backup-moved-segment if any."""
    out = b""
    for flag, required in (
        ("backup-previous", True),
        ("backup-final", True),
        ("backup-moved-segment", False),
    ):
        found = segment_by_flag(hdr_json, flag)
        if found is None:
            if required:
                raise FormatError(f"reencryption segment {flag!r} is missing")
            continue
        out += serialize_segment(found[1])
    return out


def serialize_reencrypt_keyslot(hdr_json: Mapping[str, Any]) -> bytes:
    """The reencrypt keyslot fields, chosen by its ``area.type``.

    Always mode, direction, area.type, area.offset (u64), area.size (u64); then
    ``checksum``: hash, sector_size (u32); ``datashift``/``datashift-journal``:
    shift_size (u64); ``datashift-checksum``: hash, sector_size, shift_size;
    ``none``/``journal`` (and any other type): nothing more.
    """
    slot = _section(hdr_json, "keyslots")[str(reencrypt_keyslot(hdr_json))]
    area = slot.get("area")
    area_type = area.get("type") if isinstance(area, Mapping) else None
    if not isinstance(area_type, str):
        raise FormatError("reencrypt keyslot has no area type")
    spec: list[tuple[Any, str, str]] = [
        (slot, "mode", "str"),
        (slot, "direction", "str"),
        (area, "type", "str"),
        (area, "offset", "u64"),
        (area, "size", "u64"),
    ]
    if area_type in ("checksum", "datashift-checksum"):
        spec += [(area, "hash", "str"), (area, "sector_size", "u32")]
    if area_type in ("datashift", "datashift-journal", "datashift-checksum"):
        spec.append((area, "shift_size", "u64"))
    return _fields(spec)


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------


def _pbkdf2_params(hdr_json: Mapping[str, Any], digest_id: int) -> tuple[str, int, bytes, bytes]:
    """(hash, iterations, salt, digest) of a ``pbkdf2`` digest, checked like
    cryptsetup's ``PBKDF2_digest_verify``; FormatError when unusable."""
    digest = _section(hdr_json, "digests").get(str(digest_id))
    if not isinstance(digest, Mapping) or digest.get("type") != "pbkdf2":
        raise FormatError(f"LUKS2 digest {digest_id} is missing or not of type pbkdf2")
    hash_name, iterations = digest.get("hash"), digest.get("iterations")
    if not isinstance(hash_name, str) or not isinstance(iterations, int) or iterations < 1:
        raise FormatError(f"LUKS2 digest {digest_id} has invalid parameters")
    try:
        salt = base64.b64decode(str(digest.get("salt")), validate=True)
        value = base64.b64decode(str(digest.get("digest")), validate=True)
    except ValueError:
        raise FormatError(f"LUKS2 digest {digest_id} is not valid base64") from None
    if len(salt) != DIGEST_SALT_SIZE:
        raise FormatError(f"LUKS2 digest {digest_id} salt is not {DIGEST_SALT_SIZE} bytes")
    size = hash_size(hash_name)
    if not _LUKS_DIGESTSIZE <= len(value) <= _MAX_DIGEST or len(value) not in (
        _LUKS_DIGESTSIZE,
        size,
    ):
        raise FormatError(f"LUKS2 digest {digest_id} has a bad length")
    return hash_name, iterations, salt, value


def _check(hdr_json: Mapping[str, Any], digest_id: int, secret: bytes) -> bool:
    hash_name, iterations, salt, value = _pbkdf2_params(hdr_json, digest_id)
    return digest_equal(pbkdf2(hash_name, secret, salt, iterations, len(value)), value)


def keys_by_digest(hdr_json: Mapping[str, Any], volume_keys: VolumeKeys) -> dict[int, bytes]:
    """Volume keys by the id of the digest each one matches.

    A mapping is taken as it is (digest id -> key, as cryptsetup's ``vks``);
    keys given as an iterable are checked against the old and new key digests
    (one PBKDF2 run per key and digest) and the ones that match none dropped.
    """
    if isinstance(volume_keys, Mapping):
        return {int(k): bytes(v) for k, v in volume_keys.items()}
    keys = [bytes(k) for k in volume_keys]
    found: dict[int, bytes] = {}
    for digest_id in dict.fromkeys(d for d in _key_digests(hdr_json) if d is not None):
        for key in keys:
            if _check(hdr_json, digest_id, key):
                found[digest_id] = key
                break
    return found


# ---------------------------------------------------------------------------
# verification data and digest
# ---------------------------------------------------------------------------


def verification_data(
    hdr_json: Mapping[str, Any], volume_keys: VolumeKeys, version: int | None = None
) -> bytes:
    """The byte string cryptsetup's reencryption digest is computed over.

    *version* defaults to the header's requirement version
    (:func:`reencrypt_version`).  Raises :class:`UsageError` when a volume key
    the header needs is not in *volume_keys*, :class:`FormatError` when the
    metadata cannot be serialised (cryptsetup then refuses the header).
    """
    if version is None:
        version = reencrypt_version(hdr_json)
    if not 0 <= version <= 207:  # 0x30 + version must fit one byte
        raise UsageError(f"reencryption requirement version {version} is out of range")
    keys = keys_by_digest(hdr_json, volume_keys)
    old, new = _key_digests(hdr_json)
    wanted = [old] if old is not None else []
    if new is not None and new != old:
        wanted.append(new)
    if not wanted:
        raise FormatError("no reencryption backup segment has a volume key digest")
    parts = [b"v", bytes([0x30 + version])]
    for digest_id in wanted:
        if digest_id not in keys:
            raise UsageError(f"the volume key of LUKS2 digest {digest_id} is required")
        parts.append(keys[digest_id])
    parts.append(serialize_reencrypt_keyslot(hdr_json))
    parts.append(serialize_backup_segments(hdr_json))
    return b"".join(parts)


def compute_digest(
    hdr_json: Mapping[str, Any],
    volume_keys: VolumeKeys,
    *,
    hash_name: str,
    salt: bytes,
    iterations: int,
    length: int | None = None,
    version: int | None = None,
) -> bytes:
    """PBKDF2-*hash_name*(verification data, *salt*, *iterations*), *length*
    bytes (default: the hash size, as cryptsetup writes it)."""
    data = verification_data(hdr_json, volume_keys, version)
    return pbkdf2(hash_name, data, salt, iterations, length or hash_size(hash_name))


def verify_digest(hdr_json: Mapping[str, Any], volume_keys: VolumeKeys) -> bool:
    """True when the header's reencryption digest matches its metadata and keys.

    cryptsetup 2.6.1 ``LUKS2_reencrypt_digest_verify``: the digest is the first
    one (JSON order) listing the reencrypt keyslot; the version comes from the
    requirement flag.  False (refuse) when the digest is missing or unusable,
    the metadata cannot be serialised, or the values differ; also for the
    legacy ``online-reencrypt`` (v1) flag, which cryptsetup 2.4.3+ never
    trusts without ``cryptsetup repair``.  Raises :class:`UsageError` when a
    needed volume key is missing, :class:`UnsupportedError` for an unknown hash.
    """
    try:
        version = reencrypt_version(hdr_json)
        if version < 2:
            return False
        digest_id = digest_by_keyslot(hdr_json, reencrypt_keyslot(hdr_json))
        if digest_id is None:
            return False
        hash_name, iterations, salt, value = _pbkdf2_params(hdr_json, digest_id)
        data = verification_data(hdr_json, volume_keys, version)
    except FormatError:
        return False
    return digest_equal(pbkdf2(hash_name, data, salt, iterations, len(value)), value)


def _free_digest_id(digests: Mapping[str, Any]) -> int:
    for i in range(_DIGESTS_MAX):
        if str(i) not in digests:
            return i
    raise FormatError("no free LUKS2 digest id")


def create_digest_entry(
    hdr_json: Mapping[str, Any],
    volume_keys: VolumeKeys,
    *,
    hash_name: str = "sha256",
    iterations: int | None = MIN_ITERATIONS,
    salt: bytes | None = None,
    version: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """A new ``digests`` entry for the reencryption metadata, as cryptsetup writes it.

    Returns ``(id, entry)``: the lowest digest id not in use and
    ``{"type": "pbkdf2", "keyslots": [<reencrypt keyslot>], "segments": [],
    "hash", "iterations", "salt", "digest"}`` (salt 32 random bytes unless
    given, digest the full hash size, both base64).  cryptsetup takes the hash
    of its PBKDF setting (sha256 by default) and writes 1000 iterations when
    the PBKDF is not benchmarked (``reencrypt`` reusing a keyslot's PBKDF, or
    ``--pbkdf-force-iterations``), else what PBKDF2 does in 125 ms (*iterations*
    None: benchmarked here, for an output as long as the digested data, as
    cryptsetup does).  *version* defaults to the header's requirement version.
    """
    if iterations is None:
        data = verification_data(hdr_json, volume_keys, version)
        iterations = digest_iterations(hash_name, len(data))
    if salt is None:
        salt = os.urandom(DIGEST_SALT_SIZE)
    if len(salt) != DIGEST_SALT_SIZE:
        raise UsageError(f"a LUKS2 digest salt is {DIGEST_SALT_SIZE} bytes")
    value = compute_digest(
        hdr_json,
        volume_keys,
        hash_name=hash_name,
        salt=salt,
        iterations=iterations,
        version=version,
    )
    entry: dict[str, Any] = {
        "type": "pbkdf2",
        "keyslots": [str(reencrypt_keyslot(hdr_json))],
        "segments": [],
        "hash": hash_name,
        "iterations": iterations,
        "salt": base64.b64encode(salt).decode("ascii"),
        "digest": base64.b64encode(value).decode("ascii"),
    }
    return str(_free_digest_id(_section(hdr_json, "digests"))), entry


def with_reencrypt_digest(
    hdr_json: Mapping[str, Any],
    volume_keys: VolumeKeys,
    *,
    hash_name: str = "sha256",
    iterations: int | None = MIN_ITERATIONS,
    salt: bytes | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """A copy of *hdr_json* with a fresh reencryption digest, as cryptsetup installs it.

    ``LUKS2_keyslot_reencrypt_digest_create`` and the header write that follows:
    the new digest goes at the lowest free id (chosen while the previous one
    still exists, so ids alternate between updates), the reencrypt keyslot is
    removed from every other digest, and digests left with neither keyslots nor
    segments are erased.  The requirement flag is not changed.
    """
    out: dict[str, Any] = copy.deepcopy(dict(hdr_json))
    digest_id, entry = create_digest_entry(
        out, volume_keys, hash_name=hash_name, iterations=iterations, salt=salt, version=version
    )
    slot = entry["keyslots"][0]
    digests: dict[str, Any] = out["digests"]
    for other in digests.values():
        if isinstance(other, dict) and isinstance(other.get("keyslots"), list):
            other["keyslots"] = [k for k in other["keyslots"] if k != slot]
    digests[digest_id] = entry
    for key in [
        k
        for k, d in digests.items()
        if isinstance(d, dict)
        and isinstance(d.get("segments"), list)
        and not d["segments"]
        and isinstance(d.get("keyslots"), list)
        and not d["keyslots"]
    ]:
        del digests[key]
    return out
