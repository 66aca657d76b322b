"""In-place LUKS1 <-> LUKS2 conversion (``cryptsetup convert``), crash-safe where possible.

The result is cryptsetup 2.6.1's (``LUKS2_luks1_to_luks2`` / ``LUKS2_luks2_to_luks1``):

* LUKS1 -> LUKS2: 16 KiB header copies, keyslot *i* keeps its number, KDF
  (pbkdf2, the header hash), salt and material; its area moves from the
  LUKS1 offset up by 28 KiB (``2 * 16 KiB - 4 KiB``: the LUKS1 keyslots start
  at 4 KiB, the LUKS2 ones at 32 KiB); the 20-byte master-key digest becomes
  a ``pbkdf2`` digest; ``keyslots_size`` is the data offset (detached: the
  header file size) minus 32 KiB, rounded down to 4 KiB; epoch 2.
* LUKS2 -> LUKS1: the reverse shift; free LUKS1 slots get the offsets of the
  first-fit gaps of the LUKS2 keyslots area (cryptsetup's placeholders).
  Only headers LUKS1 can express are converted (see :func:`_luks1_from_luks2`).

cryptsetup moves the whole keyslots area in one write and then writes the new
header: a crash in between loses every keyslot.  cryptfuse reaches the same
end state by small steps, each of which leaves one valid header whose
keyslots all hold their material:

1. copy the material of a keyslot that the new header would overwrite into a
   free keyslot of the *old* format (a duplicate, enabled last);
2. switch formats with one write that readers see atomically (the LUKS2
   secondary copy before the primary; for LUKS1, the version byte last);
3. move areas one at a time inside LUKS2 (copy to a free gap, make it durable,
   commit the header), hopping through a gap when the target overlaps the
   area itself;
4. wipe every copy of key material the final header does not reference.

When there is no free keyslot or gap for these steps (e.g. all eight LUKS1
slots in use), the conversion falls back to cryptsetup's order and says so
through ``warn``; docs/convert.md describes the window.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..af import af_sectors
from ..errors import CryptfuseError, FormatError, UnsupportedError, UsageError
from ..sector import SectorCipher
from ..volume import device_size
from .luks1 import (
    HEADER_SIZE,
    KEY_DISABLED,
    KEY_ENABLED,
    NUM_KEYSLOTS,
    SALT_SIZE,
    STRIPES,
    LUKS1Header,
    LUKS1Keyslot,
)
from .luks1_write import KEYSLOT_RECORD_OFFSET, serialize_luks1
from .luks2 import BIN_HEADER_SIZE, LUKS2Header, validate_metadata
from .luks2_write import Luks2Writer, serialize_copy, serialize_json
from .luks_common import luks_cipher_spec, pread_exact
from .luks_write import pwrite_all, sync, wipe_area
from .manage import Confirm, _locked, _luks_type, _read

__all__ = ["ConversionAborted", "convert"]

#: cryptsetup's fixed geometry of a converted header
LUKS2_HDR = 0x4000
LUKS1_KEYSLOTS = 4096
SHIFT = 2 * LUKS2_HDR - LUKS1_KEYSLOTS
ALIGN = 4096
#: cryptsetup writes the converted header with seqid 1 and increments it on write
CONVERTED_SEQID = 2
_RECORD = 48

#: ``warn(message)``: a non-fatal notice for the user
Warn = Callable[[str], None]


class ConversionAborted(CryptfuseError):
    """The user declined the confirmation (cryptsetup: -EPERM, exit 2)."""

    exit_code = 2


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def area_length(key_bytes: int) -> int:
    """Bytes of a LUKS2 keyslot area, and of a LUKS1 slot's spacing (4 KiB aligned)."""
    return _round_up(af_sectors(key_bytes, STRIPES) * 512, ALIGN)


def _overlaps(a: int, b: int, length: int) -> bool:
    return a < b + length and b < a + length


# -- planning area moves -------------------------------------------------------------------


@dataclass
class _Space:
    """The keyslots area [lo, hi) in which areas of ``length`` bytes move."""

    lo: int
    hi: int
    length: int

    def gap(self, avoid: list[int]) -> int | None:
        """First-fit aligned offset whose area overlaps none of *avoid*."""
        for start in sorted({self.lo, *(_round_up(a + self.length, ALIGN) for a in avoid)}):
            if start < self.lo or start + self.length > self.hi:
                continue
            if not any(_overlaps(start, a, self.length) for a in avoid):
                return start
        return None


def plan_moves(
    current: dict[int, int], target: dict[int, int], space: _Space
) -> list[tuple[int, int]] | None:
    """Moves ``(slot, new offset)`` taking every area from *current* to *target*,
    each one into bytes no area references at that moment; None when stuck.

    A slot whose target overlaps its own area hops through a free gap; a slot
    whose target holds another area waits for it, and if every slot waits,
    one of the blockers is parked in a gap clear of all pending targets.
    """
    cur = dict(current)
    pending = {s for s in cur if cur[s] != target[s]}
    moves: list[tuple[int, int]] = []
    for _ in range(4 * len(cur) + 4):
        if not pending:
            return moves
        placed = False
        for s in sorted(pending, key=lambda k: -target[k]):
            if any(_overlaps(cur[o], target[s], space.length) for o in cur if o != s):
                continue
            if _overlaps(cur[s], target[s], space.length):
                hop = space.gap([*cur.values(), *(target[p] for p in pending)])
                if hop is None:
                    hop = space.gap([*cur.values(), target[s]])
                if hop is None:
                    continue
                moves.append((s, hop))
                cur[s] = hop
            moves.append((s, target[s]))
            cur[s] = target[s]
            pending.discard(s)
            placed = True
            break
        if placed:
            continue
        blockers = [
            b
            for b in sorted(cur)
            if any(_overlaps(cur[b], target[p], space.length) for p in pending if p != b)
        ]
        spot = space.gap([*cur.values(), *(target[p] for p in pending)])
        if not blockers or spot is None:
            return None
        moves.append((blockers[0], spot))
        cur[blockers[0]] = spot
    return None


# -- I/O steps ---------------------------------------------------------------------------------


def _copy(fd: int, src: int, dst: int, length: int, what: str) -> None:
    data = pread_exact(fd, length, src, what)
    pwrite_all(fd, data, dst, what)
    sync(fd)


def _record(index: int) -> int:
    return KEYSLOT_RECORD_OFFSET + index * _RECORD


def _write_params(fd: int, index: int, iterations: int, salt: bytes) -> None:
    """Iterations and salt of LUKS1 keyslot *index* (its ``active`` word untouched)."""
    pwrite_all(fd, struct.pack(">I32s", iterations, salt), _record(index) + 4, f"keyslot {index}")
    sync(fd)


def _write_active(fd: int, index: int, active: int) -> None:
    """The 4-byte state word: a torn write is never ``KEY_ENABLED``, so it reads as disabled."""
    pwrite_all(fd, active.to_bytes(4, "big"), _record(index), f"keyslot {index} state")
    sync(fd)


def _wipe_stale(fd: int, regions: set[int], keep: list[int], length: int) -> None:
    """Wipe copies of key material at *regions* the final header does not use."""
    for start in sorted(regions):
        if not any(_overlaps(start, k, length) for k in keep):
            wipe_area(fd, start, length, "stale keyslot material")


# -- LUKS1 -> LUKS2 ------------------------------------------------------------------------------


@dataclass
class _ToLuks2:
    """Everything a LUKS1 -> LUKS2 conversion writes, worked out before any write."""

    header: LUKS1Header
    keyslots_size: int
    required: int  # header device bytes the result needs
    luks1_size: int
    length: int  # area bytes
    encryption: str
    active: list[int] = field(default_factory=list)

    def target(self, index: int) -> int:
        return self.header.keyslots[index].key_material_offset * 512 + SHIFT

    def metadata(self, where: dict[int, int]) -> dict[str, Any]:
        """cryptsetup's JSON (same key order), keyslot areas at *where*."""
        h = self.header
        keyslots = {
            str(i): {
                "type": "luks2",
                "key_size": h.key_bytes,
                "kdf": {
                    "type": "pbkdf2",
                    "hash": h.hash_spec,
                    "iterations": h.keyslots[i].iterations,
                    "salt": _b64(h.keyslots[i].salt),
                },
                "af": {"type": "luks1", "hash": h.hash_spec, "stripes": STRIPES},
                "area": {
                    "type": "raw",
                    "encryption": self.encryption,
                    "key_size": h.key_bytes,
                    "offset": str(where[i]),
                    "size": str(self.length),
                },
            }
            for i in self.active
        }
        return {
            "keyslots": keyslots,
            "tokens": {},
            "segments": {
                "0": {
                    "type": "crypt",
                    "offset": str(h.payload_offset * 512),
                    "iv_tweak": "0",
                    "size": "dynamic",
                    "encryption": self.encryption,
                    "sector_size": 512,
                }
            },
            "digests": {
                "0": {
                    "type": "pbkdf2",
                    "keyslots": [str(i) for i in self.active],
                    "segments": ["0"],
                    "hash": h.hash_spec,
                    "salt": _b64(h.mk_digest_salt),
                    "digest": _b64(h.mk_digest),
                    "iterations": h.mk_digest_iterations,
                }
            },
            "config": {
                "json_size": str(LUKS2_HDR - BIN_HEADER_SIZE),
                "keyslots_size": str(self.keyslots_size),
            },
        }


def _prepare_to_luks2(fd: int, hdr: LUKS1Header) -> _ToLuks2:
    """cryptsetup's checks for LUKS1 -> LUKS2, in its order, before anything is written."""
    luks1_size = _round_up(hdr.required_header_bytes, ALIGN)
    first = min(s.key_material_offset for s in hdr.keyslots)
    if first != LUKS1_KEYSLOTS // 512:
        raise UnsupportedError(
            f"Unsupported keyslots material offset: {first} (cryptsetup converts only "
            f"LUKS1 headers whose keyslots start at sector {LUKS1_KEYSLOTS // 512})."
        )
    name, mode = hdr.cipher_name, hdr.cipher_mode
    encryption = f"{name}-{mode}" if mode else name
    try:
        SectorCipher(luks_cipher_spec(encryption, "LUKS1 cipher"), bytes(hdr.key_bytes))
    except CryptfuseError:
        raise UnsupportedError(
            f"Unable to use cipher specification {name}-{mode} for LUKS2."
        ) from None
    try:
        meta = pread_exact(fd, 8, luks1_size, "LUKSMETA signature")
    except CryptfuseError:
        meta = b""
    if meta == b"LUKSMETA":
        raise UnsupportedError("Unable to convert header with LUKSMETA additional metadata.")
    max_size = hdr.payload_offset * 512 or device_size(fd)
    required = luks1_size + SHIFT
    # cryptsetup grows a short detached header file (fallocate); with the
    # payload in the same file, the too-large keyslots area fails validation below.
    max_size = max(max_size, required)
    plan = _ToLuks2(
        header=hdr,
        keyslots_size=(max_size - 2 * LUKS2_HDR) // ALIGN * ALIGN,
        required=required,
        luks1_size=luks1_size,
        length=area_length(hdr.key_bytes),
        encryption=encryption,
        active=[s.index for s in hdr.keyslots if s.enabled],
    )
    final = plan.metadata({i: plan.target(i) for i in plan.active})
    try:
        validate_metadata(final, LUKS2_HDR - BIN_HEADER_SIZE)
    except CryptfuseError as exc:
        raise FormatError(f"Cannot convert to LUKS2 format - invalid metadata ({exc}).") from None
    if luks1_size - LUKS1_KEYSLOTS > plan.keyslots_size:
        raise FormatError("Unable to move keyslot area. LUKS2 keyslots area too small.")
    return plan


def _commit2(fd: int, obj: dict[str, Any], uuid: str, salts: tuple[bytes, bytes]) -> None:
    """Both LUKS2 copies with seqid 2, secondary first.

    Equal seqids make the primary win, so until the primary is complete the
    previous state (or, on the first commit, the LUKS1 header, which still
    owns byte 0) is what readers see; a torn primary fails its checksum and
    the complete secondary is used.  The primary's first sector goes first so
    that no torn write leaves an old LUKS1 sector 0 with a new sector 1.
    """
    json_size = LUKS2_HDR - BIN_HEADER_SIZE
    validate_metadata(obj, json_size)
    area = serialize_json(obj, json_size)
    copies = [
        serialize_copy(
            secondary=secondary,
            hdr_size=LUKS2_HDR,
            seqid=CONVERTED_SEQID,
            label="",
            subsystem="",
            salt=salts[secondary],
            uuid=uuid,
            json_area=area,
        )
        for secondary in (False, True)
    ]
    pwrite_all(fd, copies[1], LUKS2_HDR, "LUKS2 secondary header")
    sync(fd)
    pwrite_all(fd, copies[0][:512], 0, "LUKS2 primary header")
    sync(fd)
    pwrite_all(fd, copies[0][512:], 512, "LUKS2 primary header")
    sync(fd)


def _to_luks2(fd: int, plan: _ToLuks2, warn: Warn) -> None:
    hdr = plan.header
    length = plan.length
    if device_size(fd) < plan.required:
        os.ftruncate(fd, plan.required)
    where = {i: hdr.keyslots[i].key_material_offset * 512 for i in plan.active}
    target = {i: plan.target(i) for i in plan.active}
    space = _Space(2 * LUKS2_HDR, 2 * LUKS2_HDR + plan.keyslots_size, length)
    # Keyslots under the new header copies get a duplicate in a free LUKS1 slot first.
    duplicates: dict[int, int] = {}
    used = list(where.values())
    for i in plan.active:
        if where[i] >= 2 * LUKS2_HDR:
            continue
        for j, slot in enumerate(hdr.keyslots):
            spot = slot.key_material_offset * 512
            if (
                not slot.enabled
                and j not in duplicates.values()
                and spot >= space.lo
                and spot + length <= min(space.hi, plan.luks1_size)
                and not any(_overlaps(spot, u, length) for u in used)
            ):
                duplicates[i] = j
                used.append(spot)
                break
    start = dict(where)
    for i, j in duplicates.items():
        start[i] = hdr.keyslots[j].key_material_offset * 512
    low = [i for i in plan.active if where[i] < space.lo]
    moves = plan_moves(start, target, space) if len(duplicates) == len(low) else None
    uuid = hdr.uuid
    salts = (os.urandom(64), os.urandom(64))
    if moves is None:
        warn(
            "No free keyslot or keyslot-area gap to convert step by step: converting in "
            "cryptsetup's order (a crash before the new header is written loses the keyslots)."
        )
        _shift(fd, LUKS1_KEYSLOTS, 2 * LUKS2_HDR, plan.luks1_size - LUKS1_KEYSLOTS)
        _commit2(fd, plan.metadata(target), uuid, salts)
        return
    for i, j in duplicates.items():
        orig = hdr.keyslots[i]
        _copy(fd, where[i], start[i], length, f"keyslot {i} material")
        _write_params(fd, j, orig.iterations, orig.salt)
        _write_active(fd, j, KEY_ENABLED)
    cur = dict(start)
    _commit2(fd, plan.metadata(cur), uuid, salts)
    stale = set(start.values())
    for index, dst in moves:
        _copy(fd, cur[index], dst, length, f"keyslot {index} material")
        stale.add(cur[index])
        cur[index] = dst
        _commit2(fd, plan.metadata(cur), uuid, salts)
    _wipe_stale(fd, stale - {where[i] for i in duplicates}, list(cur.values()), length)


def _shift(fd: int, src: int, dst: int, length: int) -> None:
    """Move *length* bytes from *src* to *dst* (overlapping), in chunks that never
    overwrite bytes not yet copied; cryptsetup's single move, made durable."""
    step = max(ALIGN, abs(dst - src))
    if dst > src:
        pos = length
        while pos > 0:
            n = min(step, pos)
            pos -= n
            pwrite_all(fd, pread_exact(fd, n, src + pos, "keyslots area"), dst + pos, "keyslots")
    else:
        pos = 0
        while pos < length:
            n = min(step, length - pos)
            pwrite_all(fd, pread_exact(fd, n, src + pos, "keyslots area"), dst + pos, "keyslots")
            pos += n
    sync(fd)


# -- LUKS2 -> LUKS1 ------------------------------------------------------------------------------

_WRAPPED = ("paes",)


def _refuse1(reason: str) -> UnsupportedError:
    return UnsupportedError(f"Cannot convert to LUKS1 format - {reason}.")


def _find_area_gap(areas: list[tuple[int, int]], length: int, lo: int, hi: int) -> int | None:
    """cryptsetup's ``LUKS2_find_area_gap``: first fit after the lowest areas."""
    offset = lo
    for start, size in sorted(areas):
        if offset < start and offset + length <= start:
            break
        offset = start + size
    return offset if offset + length <= hi else None


@dataclass
class _ToLuks1:
    header: LUKS1Header  # the final one
    length: int
    areas: dict[int, int]  # LUKS2 keyslot -> area offset (bytes)
    hdr_size: int
    keyslots_size: int

    def final(self, index: int) -> int:
        return self.header.keyslots[index].key_material_offset * 512


def _luks1_from_luks2(hdr: LUKS2Header) -> _ToLuks1:
    """cryptsetup's LUKS2 -> LUKS1 checks, in its order, and the LUKS1 header it writes."""
    hdr.check_requirements()
    obj = hdr.json
    digest = obj["digests"].get("0")
    segment = obj["segments"].get("0")
    if digest is None or segment is None:
        raise _refuse1("no digest or segment 0")
    if segment.get("sector_size") != 512:
        raise _refuse1("default segment encryption sector size is not 512 bytes")
    if digest.get("type") != "pbkdf2" or len(obj["digests"]) != 1:
        raise _refuse1("key slot digests are not LUKS1 compatible")
    hash_name = digest.get("hash")
    encryption = str(segment.get("encryption", ""))
    name, _, mode = encryption.partition("-")
    if name.lower().startswith(_WRAPPED):
        raise _refuse1(f"device uses wrapped key cipher {name}")
    if len(obj["segments"]) != 1:
        raise _refuse1("device uses more segments")
    if obj["tokens"]:
        raise _refuse1(f"LUKS2 header contains {len(obj['tokens'])} token(s)")
    if "integrity" in segment:
        # cryptsetup 2.6.1 does not check; LUKS1 cannot express it.
        raise _refuse1("device uses integrity protection")
    bound = [int(k) for k in digest.get("keyslots", [])]
    if not bound:
        raise _refuse1("no keyslot is bound to the volume key digest")
    key_size = int(obj["keyslots"][str(bound[0])]["key_size"])
    length = area_length(key_size)
    for index in sorted(int(k) for k in obj["keyslots"]):
        if index >= NUM_KEYSLOTS:
            raise _refuse1(f"slot {index} (over maximum slots) is still active")
        if not _slot_compatible(obj["keyslots"][str(index)], key_size, hash_name, encryption):
            raise _refuse1(f"keyslot {index} is not LUKS1 compatible")
    hdr_size = hdr.binary.hdr_size
    hi = 2 * hdr_size + hdr.metadata.config.keyslots_size
    areas = {int(k): int(v["area"]["offset"]) for k, v in obj["keyslots"].items()}
    taken = [(a, int(obj["keyslots"][str(k)]["area"]["size"])) for k, a in areas.items()]
    slots = []
    last_active = None
    for i in range(NUM_KEYSLOTS):
        ks = obj["keyslots"].get(str(i))
        if ks is None:
            gap = _find_area_gap(taken, length, 2 * hdr_size, hi)
            if gap is None:
                raise _refuse1(f"no room in the keyslots area for a LUKS1 placeholder of slot {i}")
            taken.append((gap, length))
            slots.append(
                LUKS1Keyslot(i, KEY_DISABLED, 0, bytes(SALT_SIZE), (gap - SHIFT) // 512, STRIPES)
            )
            continue
        last_active = ks
        salt = base64.b64decode(ks["kdf"]["salt"])
        slots.append(
            LUKS1Keyslot(
                i,
                KEY_ENABLED,
                int(ks["kdf"]["iterations"]),
                salt if len(salt) == SALT_SIZE else bytes(SALT_SIZE),
                (areas[i] - SHIFT) // 512,
                STRIPES,
            )
        )
    assert last_active is not None
    mk = base64.b64decode(digest["digest"])
    mk_salt = base64.b64decode(digest["salt"])
    if len(mk) < 20 or len(mk_salt) != SALT_SIZE:
        raise _refuse1("the volume key digest does not fit LUKS1")
    ks_name, _, ks_mode = str(last_active["area"]["encryption"]).partition("-")
    header = LUKS1Header(
        version=1,
        cipher_name=ks_name,
        cipher_mode=ks_mode,
        hash_spec=str(last_active["kdf"]["hash"]),
        payload_offset=int(segment["offset"]) // 512,
        key_bytes=key_size,
        mk_digest=mk[:20],
        mk_digest_salt=mk_salt,
        mk_digest_iterations=int(digest["iterations"]),
        uuid=hdr.uuid,
        keyslots=tuple(slots),
    )
    try:
        header.validate()
    except CryptfuseError as exc:
        raise _refuse1(f"the LUKS1 header would be invalid ({exc})") from None
    return _ToLuks1(header, length, areas, hdr_size, hdr.metadata.config.keyslots_size)


def _slot_compatible(ks: dict[str, Any], key_size: int, hash_name: Any, encryption: str) -> bool:
    """cryptsetup's ``keyslot_LUKS1_compatible``."""
    kdf, af, area = ks.get("kdf", {}), ks.get("af", {}), ks.get("area", {})
    return (
        ks.get("type") == "luks2"
        and kdf.get("type") == "pbkdf2"
        and kdf.get("hash") == hash_name
        and af.get("stripes") == STRIPES
        and af.get("hash") == hash_name
        and area.get("encryption") == encryption
        and area.get("key_size") == key_size
        and int(area.get("size", -1)) == area_length(key_size)
    )


def _to_luks1(fd: int, hdr: LUKS2Header, plan: _ToLuks1, warn: Warn) -> None:
    final1 = plan.header
    length = plan.length
    lo = 2 * plan.hdr_size
    space = _Space(lo, lo + plan.keyslots_size, length)
    active = sorted(plan.areas)
    finals = {i: plan.final(i) for i in active}
    # Keyslots whose LUKS1 place overlaps the LUKS2 header copies wait in a free
    # LUKS1 slot's (final) place until the LUKS1 header is written.
    low = [i for i in active if finals[i] < lo]
    free = [
        s.index
        for s in final1.keyslots
        if not s.enabled and plan.final(s.index) >= lo and plan.final(s.index) + length <= space.hi
    ]
    duplicates = dict(zip(low, free, strict=False))
    target = {i: finals[i] for i in active if i not in low}
    target.update({i: plan.final(j) for i, j in duplicates.items()})
    moves = plan_moves(plan.areas, target, space) if len(duplicates) == len(low) else None
    if moves is None:
        warn(
            "No free keyslot or keyslot-area gap to convert step by step: converting in "
            "cryptsetup's order (a crash before the new header is written loses the keyslots)."
        )
        # cryptsetup moves from 32 KiB whatever the metadata size: offsets shift by 28 KiB.
        _shift(fd, 2 * LUKS2_HDR, LUKS1_KEYSLOTS, plan.keyslots_size)
        raw = serialize_luks1(final1)
        pwrite_all(fd, raw + bytes(LUKS1_KEYSLOTS - HEADER_SIZE), 0, "LUKS1 header")
        sync(fd)
        return
    writer = Luks2Writer.from_header(fd, hdr)
    cur = dict(plan.areas)
    stale = set(cur.values())
    for slot, dst in moves:
        _copy(fd, cur[slot], dst, length, f"keyslot {slot} material")
        cur[slot] = dst
        stale.add(dst)
        writer.obj["keyslots"][str(slot)]["area"]["offset"] = str(dst)
        writer.commit()
    # The switch: everything but the version goes first (the LUKS2 primary then
    # fails its checksum and readers use the secondary); the version byte (2 -> 1,
    # the magic is the same) is one byte, never torn.
    slots = list(final1.keyslots)
    for i, j in duplicates.items():
        slots[j] = replace(slots[i], index=j, key_material_offset=slots[j].key_material_offset)
        slots[i] = replace(slots[i], active=KEY_DISABLED, iterations=0, salt=bytes(SALT_SIZE))
    raw = serialize_luks1(replace(final1, keyslots=tuple(slots)))
    pwrite_all(fd, raw[8:] + bytes(LUKS1_KEYSLOTS - HEADER_SIZE), 8, "LUKS1 header")
    sync(fd)
    pwrite_all(fd, raw[7:8], 7, "LUKS1 version")
    sync(fd)
    for i, j in duplicates.items():
        good = final1.keyslots[i]
        _copy(fd, plan.final(j), finals[i], length, f"keyslot {i} material")
        _write_params(fd, i, good.iterations, good.salt)
        _write_active(fd, i, KEY_ENABLED)
        _write_active(fd, j, KEY_DISABLED)
        _write_params(fd, j, 0, bytes(SALT_SIZE))
    keep = list(finals.values())
    _wipe_stale(fd, stale | {plan.final(j) for j in duplicates.values()}, keep, length)
    # No valid LUKS2 copy may survive inside a LUKS1 header area.
    secondary = plan.hdr_size
    if not any(_overlaps(secondary, k, length) for k in keep):
        pwrite_all(fd, bytes(BIN_HEADER_SIZE), secondary, "old LUKS2 secondary header")
        sync(fd)


# -- the operation -----------------------------------------------------------------------------


def convert(
    path: str,
    to_type: str | None,
    *,
    header: str | None = None,
    confirm: Confirm,
    warn: Warn | None = None,
) -> None:
    """Convert the LUKS container *path* (or its detached *header*) to *to_type*
    (``luks1``/``luks2``) in place, as ``cryptsetup convert --type`` does.

    No passphrase is needed: keyslots, volume-key digest, UUID, cipher and data
    offset are carried over.  Every refusal happens before the first write;
    *confirm* is asked after the checks.
    """
    if to_type not in ("luks1", "luks2"):
        raise UsageError("Invalid LUKS type, only luks1 and luks2 are supported.")
    notice: Warn = warn if warn is not None else (lambda _: None)
    with _locked(path, header, write=True) as h:
        kind = _luks_type(h.header_fd, h.header_path)
        if kind == to_type:
            raise UsageError(f"Device is already {to_type.upper()} type.")
        hdr = _read(h)
        if isinstance(hdr, LUKS1Header):
            plan2 = _prepare_to_luks2(h.header_fd, hdr)
        else:
            plan1 = _luks1_from_luks2(hdr)
        if not confirm(f"This operation will convert {h.header_path} to {to_type.upper()} format."):
            raise ConversionAborted("Operation aborted, device was NOT converted.")
        if isinstance(hdr, LUKS1Header):
            _to_luks2(h.header_fd, plan2, notice)
        else:
            _to_luks1(h.header_fd, hdr, plan1, notice)
