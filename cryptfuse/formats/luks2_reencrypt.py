"""LUKS2 reencryption: cryptsetup's crash-resilient on-disk protocol, in userspace.

A container in reencryption carries the mandatory requirement
``online-reencrypt-v2``, a keyslot of type ``reencrypt`` (mode, direction and
the resilience *area* in the keyslots area), and segments that say which part
of the data is under which key: the live segments in logical order, plus the
``backup-previous`` (old), ``backup-final`` (new) and, for data shifts,
``backup-moved-segment`` copies.  The data is converted one *hot zone* at a
time (see docs/reencryption.md for the whole protocol and its crash analysis):

1. the live segments are rewritten in memory with the hot zone as a segment
   flagged ``in-reencryption`` and bound to both digests;
2. the hot zone's old ciphertext is read and protected -- its checksums
   (``checksum``) or itself (``journal``) go into the area, then the header is
   committed (``datashift`` needs only the commit; ``none`` protects nothing);
3. the hot zone is decrypted with the old key, encrypted with the new one,
   written and (unless ``none``) made durable;
4. the segments with the hot zone done are committed.

A crash between 2 and 4 leaves a segment flagged ``in-reencryption``:
:func:`recover` (cryptsetup's ``repair`` and what activation runs) rewrites
it from the protection, and :func:`recovered_extents` works the same answer
out without writing, for read-only mounts.

Everything here is synchronous and works on the JSON metadata as a dict, the
way cryptsetup works on its json-c tree, so that the segment layouts written
at every step are the ones cryptsetup 2.6 writes and reads back.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import (
    CryptfuseError,
    DeviceError,
    FormatError,
    KeyslotError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..kdf import hash_size, hashlib_name
from ..sector import SECTOR_SIZES, SectorCipher
from ..spec import default_key_bits, parse_cipher_spec
from ..volume import device_block_size, device_size, open_direct, pwrite_all, pwrite_direct
from . import luks2_reencrypt_digest as rdigest
from .fs_probe import PROBE_HEAD, check_sector_size, probe_bytes, probe_fd

try:  # the C data path: its ciphers and block digests release the GIL
    from .. import _fastpath
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None  # type: ignore[assignment]
from .luks2 import (
    MAX_KEYSLOTS_SIZE,
    PRIORITY_HIGH,
    PRIORITY_NORMAL,
    REENCRYPT_REQUIREMENTS,
    Digest,
    LUKS2Header,
    Segment,
    read_luks2_header,
)
from .luks2_write import (
    FORMAT_EPOCH,
    KEYSLOT_CIPHER,
    KEYSLOT_KEY_BYTES,
    Luks2Writer,
    build_metadata,
    drop_empty_digests,
    luks2_layout,
)
from .luks_common import check_key_size, check_uuid, luks_cipher_spec, pread_exact
from .luks_write import KdfParams, check_data_offset, digest_iterations, sync, wipe_area
from .volume_key import new_volume_key

__all__ = [
    "REQUIREMENT",
    "Extent",
    "Reencryption",
    "ReencryptOptions",
    "in_reencryption",
    "initialize",
    "logical_extents",
    "only_finish_left",
    "open_reencryption",
    "recover",
    "resilience_area_type",
    "run",
    "switch_resilience",
]

log = logging.getLogger(__name__)

SECTOR = 512
REQUIREMENT = "online-reencrypt-v2"
#: cryptsetup's hard limit on one hot zone, and its default for resilience ``none``
MAX_HOTZONE = 1 << 30
NONE_HOTZONE = 20 << 20
#: our own cap on a hot zone without --hotzone-size (it is held in RAM twice; cryptsetup
#: takes up to 1 GiB for checksums); measured here, 64 MiB beat 256 MiB: the next zone
#: is read ahead while this one is converted
DEFAULT_HOTZONE = 64 << 20
#: resilience none: nothing is committed per zone, so this only bounds memory
DEFAULT_NONE_HOTZONE = 64 << 20
BACKUP_FLAGS = ("backup-previous", "backup-final", "backup-moved-segment")

#: progress(done_bytes, total_bytes)
ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------------------
# Segment JSON helpers (the shapes json_segment_create_* make)
# ---------------------------------------------------------------------------


def crypt_segment(
    offset: int,
    iv_tweak: int,
    size: int | None,
    encryption: str,
    sector_size: int,
    in_reencryption: bool = False,
) -> dict[str, Any]:
    """A ``crypt`` segment object; *size* None is ``dynamic``."""
    seg: dict[str, Any] = {
        "type": "crypt",
        "offset": str(offset),
        "size": "dynamic" if size is None else str(size),
        "iv_tweak": str(iv_tweak),
        "encryption": encryption,
        "sector_size": sector_size,
    }
    if in_reencryption:
        seg["flags"] = ["in-reencryption"]
    return seg


def linear_segment(offset: int, size: int | None, in_reencryption: bool = False) -> dict[str, Any]:
    """A ``linear`` (plaintext) segment object."""
    seg: dict[str, Any] = {
        "type": "linear",
        "offset": str(offset),
        "size": "dynamic" if size is None else str(size),
    }
    if in_reencryption:
        seg["flags"] = ["in-reencryption"]
    return seg


def _flags(seg: dict[str, Any]) -> list[str]:
    flags = seg.get("flags", [])
    return list(flags) if isinstance(flags, list) else []


def _is_backup(seg: dict[str, Any]) -> bool:
    return any(f.startswith("backup-") for f in _flags(seg))


def _seg_size(seg: dict[str, Any]) -> int | None:
    return None if seg["size"] == "dynamic" else int(seg["size"])


def _seg_offset(seg: dict[str, Any]) -> int:
    return int(seg["offset"])


def _live_segments(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-backup segments in id order (the device-mapper table, in order)."""
    segs = obj["segments"]
    return [segs[k] for k in sorted(segs, key=int) if not _is_backup(segs[k])]


def _segment_by_flag(obj: dict[str, Any], flag: str) -> tuple[int, dict[str, Any]] | None:
    for key in sorted(obj["segments"], key=int):
        if flag in _flags(obj["segments"][key]):
            return int(key), obj["segments"][key]
    return None


def _digest_of_segment(obj: dict[str, Any], segment: int) -> int | None:
    for key in sorted(obj["digests"], key=int):
        if str(segment) in obj["digests"][key]["segments"]:
            return int(key)
    return None


def _hot_index(segs: list[dict[str, Any]]) -> int | None:
    return next((i for i, s in enumerate(segs) if "in-reencryption" in _flags(s)), None)


def in_reencryption(obj: dict[str, Any]) -> bool:
    """True when the header carries a reencryption requirement."""
    reqs = obj.get("config", {}).get("requirements", {}).get("mandatory", [])
    return any(r == "online-reencrypt" or r.startswith("online-reencrypt-v") for r in reqs)


# ---------------------------------------------------------------------------
# The reencryption keyslot
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Protection:
    """How a hot zone is protected: ``none``, ``checksum``, ``journal`` or ``datashift``."""

    type: str
    hash: str | None = None
    block_size: int = 0
    hash_size: int = 0
    shift: int = 0


@dataclass
class Reencryption:
    """What the header says about a reencryption (cryptsetup's ``luks2_reencrypt``
    context, minus what only the device-mapper path needs)."""

    obj: dict[str, Any]
    keyslot: int
    mode: str  # reencrypt | encrypt | decrypt
    direction: str  # forward | backward
    area_type: str
    area_offset: int
    area_size: int
    protection: Protection
    #: protection of the step that reads the moved segment (datashift-checksum/-journal)
    moved_protection: Protection | None
    seg_old: dict[str, Any] | None
    seg_new: dict[str, Any] | None
    seg_moved: dict[str, Any] | None
    digest_old: int | None
    digest_new: int | None
    #: the data device's block (:func:`device_block_size`), part of the zone alignment
    device_block: int = SECTOR
    # the run's position (bytes relative to the new data offset)
    device_size: int = 0
    offset: int = 0
    length: int = 0
    progress: int = 0
    fixed_length: bool = False
    read: int = 0
    keys: dict[int, bytes] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Reencryption:
        """Parse the reencryption state of a validated header in reencryption."""
        slots = [int(k) for k, v in obj["keyslots"].items() if v.get("type") == "reencrypt"]
        if len(slots) != 1:
            raise FormatError(
                "LUKS2 reencryption requirement without exactly one reencrypt keyslot."
            )
        ks = obj["keyslots"][str(slots[0])]
        area = ks["area"]
        area_type = str(area.get("type"))
        mode, direction = str(ks.get("mode")), str(ks.get("direction"))
        if mode not in ("reencrypt", "encrypt", "decrypt") or direction not in (
            "forward",
            "backward",
        ):
            raise FormatError(
                f"LUKS2 reencrypt keyslot has invalid mode/direction {mode}/{direction}."
            )
        area_size_ = int(area["size"])

        def checksum() -> Protection:
            name = str(area.get("hash"))
            hashlib_name(name)
            block = int(area.get("sector_size", 0))
            if block < SECTOR or block & (block - 1):
                raise FormatError(f"LUKS2 reencrypt checksum block size {block} is invalid.")
            return Protection("checksum", name, block, hash_size(name))

        moved: Protection | None = None
        if area_type == "checksum":
            prot = checksum()
        elif area_type in ("journal", "none"):
            prot = Protection(area_type)
        elif area_type in ("datashift", "datashift-checksum", "datashift-journal"):
            prot = Protection("datashift", shift=int(area["shift_size"]))
            if area_type == "datashift-checksum":
                moved = checksum()
            elif area_type == "datashift-journal":
                moved = Protection("journal")
        else:
            raise UnsupportedError(f"LUKS2 reencryption resilience {area_type!r} is not supported.")
        old = _segment_by_flag(obj, "backup-previous")
        new = _segment_by_flag(obj, "backup-final")
        moved_seg = _segment_by_flag(obj, "backup-moved-segment")
        return cls(
            obj=obj,
            keyslot=slots[0],
            mode=mode,
            direction=direction,
            area_type=area_type,
            area_offset=int(area["offset"]),
            area_size=area_size_,
            protection=prot,
            moved_protection=moved,
            seg_old=old[1] if old else None,
            seg_new=new[1] if new else None,
            seg_moved=moved_seg[1] if moved_seg else None,
            digest_old=_digest_of_segment(obj, old[0]) if old else None,
            digest_new=_digest_of_segment(obj, new[0]) if new else None,
        )

    # -- geometry -------------------------------------------------------------------

    @property
    def shift(self) -> int:
        return self.protection.shift

    @property
    def data_offset_new(self) -> int:
        """Byte offset of the final data area (``LUKS2_get_data_offset`` in reencryption)."""
        if self.seg_new is not None:
            return _seg_offset(self.seg_new)
        return min(_seg_offset(s) for s in _live_segments(self.obj))

    @property
    def data_offset_old(self) -> int:
        if self.seg_old is not None:
            return _seg_offset(self.seg_old)
        return self.data_offset_new

    def cipher_of(self, seg: dict[str, Any] | None) -> str | None:
        return None if seg is None or seg["type"] != "crypt" else str(seg["encryption"])

    def sector_size_of(self, seg: dict[str, Any] | None) -> int:
        return int(seg["sector_size"]) if seg is not None and seg["type"] == "crypt" else SECTOR

    @property
    def alignment(self) -> int:
        if self.protection.type == "checksum":
            return self.protection.block_size
        return max(
            self.device_block, self.sector_size_of(self.seg_old), self.sector_size_of(self.seg_new)
        )

    def crashed(self) -> bool:
        return _hot_index(_live_segments(self.obj)) is not None

    def storage(self, new: bool, iv: int = 0) -> tuple[int, SectorCipher | None]:
        """(container offset, cipher) of the old or new data as a whole (cryptsetup's
        cw1/cw2 storage wrappers: IVs count from the data offset); with *iv*, the
        cipher's sector 0 has the IV of data byte *iv* instead."""
        seg = self.seg_new if new else self.seg_old
        base = self.data_offset_new if new else self.data_offset_old
        digest = self.digest_new if new else self.digest_old
        enc = self.cipher_of(seg)
        if enc is None:
            return base, None
        assert seg is not None and digest is not None
        spec = luks_cipher_spec(enc, "LUKS2 reencryption segment cipher")
        return base, SectorCipher(
            spec, self.keys[digest], self.sector_size_of(seg), iv_offset=iv // SECTOR
        )


# ---------------------------------------------------------------------------
# Logical layout: which container bytes, under which key, for every volume byte
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """*length* volume bytes from *start*, stored at *position* of the file *fd*
    (None: the data device), encrypted with *cipher* whose sector 0 is at *position*
    (None: plaintext)."""

    start: int
    length: int
    position: int
    cipher: SectorCipher | None
    on_header: bool = False


def _segment_cipher(seg: dict[str, Any], key: bytes, extra_iv: int = 0) -> SectorCipher:
    spec = luks_cipher_spec(str(seg["encryption"]), "LUKS2 segment cipher")
    return SectorCipher(
        spec, key, int(seg["sector_size"]), iv_offset=int(seg["iv_tweak"]) + extra_iv
    )


def _device_size(rh: Reencryption, container_size: int, clean: bool) -> int:
    """cryptsetup's device size in reencryption: the container past the final data offset
    (plus the shift while a forward data shift has not started moving)."""
    data_offset = rh.data_offset_new
    if clean and rh.direction == "forward":
        data_offset += rh.shift
    if container_size < data_offset:
        raise FormatError("Device is too small for its LUKS2 reencryption metadata.")
    return container_size - data_offset


def logical_extents(
    rh: Reencryption, container_size: int, hot: list[Extent] | None = None
) -> list[Extent]:
    """The volume as device-mapper would map it: the live segments one after another.

    A segment flagged ``in-reencryption`` must come with *hot*, the extents that
    recovery works out for it (:func:`recovered_extents`).
    """
    segs = _live_segments(rh.obj)
    extents: list[Extent] = []
    start = 0
    for index, seg in enumerate(segs):
        size = _seg_size(seg)
        if size is None:
            # ``dynamic``: to the end of the device (whole sectors).  cryptsetup derives
            # the same from its device size, except in a crashed decryption with a data
            # shift, where its size (no shift subtracted) would run past the device.
            ss = rh.sector_size_of(seg)
            size = (container_size - _seg_offset(seg)) // ss * ss
        length = size
        if length <= 0:
            continue
        if "in-reencryption" in _flags(seg):
            if hot is None:
                raise FormatError("LUKS2 reencryption hot zone needs recovery.")
            extents.extend(
                Extent(start + e.start, e.length, e.position, e.cipher, e.on_header) for e in hot
            )
        elif seg["type"] == "linear":
            extents.append(Extent(start, length, _seg_offset(seg), None))
        elif seg["type"] == "crypt":
            digest = _digest_of_segment(rh.obj, _segment_id(rh.obj, seg))
            if digest is None or digest not in rh.keys:
                raise FormatError(f"LUKS2 segment {index} has no usable digest.")
            extents.append(
                Extent(start, length, _seg_offset(seg), _segment_cipher(seg, rh.keys[digest]))
            )
        else:
            raise UnsupportedError(f"LUKS2 segment type {seg['type']!r} is not supported.")
        start += length
    return extents


def _segment_id(obj: dict[str, Any], seg: dict[str, Any]) -> int:
    for key, value in obj["segments"].items():
        if value is seg:
            return int(key)
    raise FormatError("segment not in header")  # pragma: no cover - internal


# ---------------------------------------------------------------------------
# Run context (cryptsetup's reencrypt_context_init / reencrypt_offset / _length)
# ---------------------------------------------------------------------------


def _offset(rh: Reencryption) -> None:
    segs = _live_segments(rh.obj)
    hot = _hot_index(segs)
    if hot is not None:
        rh.offset = _seg_offset(segs[hot]) - rh.data_offset_new
        return
    if rh.direction == "forward":
        if rh.mode == "decrypt" and rh.seg_moved is not None:
            # reencrypt_offset_forward_moved: after the last crypt segment's start
            last = max((i for i, x in enumerate(segs) if x["type"] == "crypt"), default=-1)
            rh.offset = 0 if last <= 0 else _seg_offset(segs[last]) - rh.shift
            rh.offset = min(rh.offset, rh.device_size)
            return
        if len(segs) == 1:
            rh.offset = 0
        elif len(segs) == 2 and _seg_size(segs[0]):
            rh.offset = _seg_size(segs[0]) or 0
        else:
            raise FormatError("LUKS2 reencryption segments are inconsistent.")
        return
    if rh.mode == "encrypt" and rh.seg_moved is not None:
        linear = sum(_seg_size(s) or 0 for s in segs if s["type"] == "linear")
        if linear and len(segs) > 1:
            if linear < rh.shift:
                raise FormatError("LUKS2 reencryption segments are inconsistent.")
            rest = linear - rh.shift
            if rest and rest < rh.shift:
                rh.offset, rh.length = rh.shift, rest
            else:
                rh.offset = rest
        elif len(segs) == 1:
            rh.offset = 0
        else:
            raise FormatError("LUKS2 reencryption segments are inconsistent.")
        return
    if len(segs) == 1:
        rh.length = min(rh.length, rh.device_size)
        rh.offset = rh.device_size - rh.length
    elif len(segs) == 2:
        first = _seg_size(segs[0]) or 0
        rh.length = min(rh.length, first)
        rh.offset = first - rh.length
    else:
        raise FormatError("LUKS2 reencryption segments are inconsistent.")


def _hotzone_length(rh: Reencryption, max_hotzone: int) -> int:
    prot = rh.protection
    if prot.type == "datashift":
        return prot.shift
    if prot.type == "none":
        length = max_hotzone or DEFAULT_NONE_HOTZONE
    elif prot.type == "checksum":
        length = (rh.area_size // prot.hash_size) * prot.block_size
    else:
        length = rh.area_size
    length = min(length, MAX_HOTZONE, DEFAULT_HOTZONE if not max_hotzone else MAX_HOTZONE)
    if max_hotzone:
        length = min(length, max_hotzone)
    return length - length % rh.alignment


def _all_done(rh: Reencryption) -> bool:
    """Every live segment is already in its final form (only the finishing commit is
    missing).  cryptsetup 2.6 has no such check: killed between its last hot zone and
    its finishing commit, its resume starts again from offset 0 and reencrypts new data
    as if it were old (seen here; docs/reencryption.md)."""
    obj = rh.obj
    segs = _live_segments(obj)
    if _hot_index(segs) is not None or not segs:
        return False
    if rh.mode == "encrypt":
        return all(s["type"] == "crypt" for s in segs)
    if rh.mode == "decrypt":
        return all(s["type"] == "linear" for s in segs)
    ids = [_segment_id(obj, s) for s in segs]
    return rh.digest_new != rh.digest_old and all(
        _digest_of_segment(obj, i) == rh.digest_new
        and str(i) not in obj["digests"].get(str(rh.digest_old), {}).get("segments", [])
        for i in ids
    )


def only_finish_left(obj: dict[str, Any]) -> bool:
    """True when a header in reencryption has every segment in its final form and
    only the finishing commit is missing (see :func:`_all_done`)."""
    return in_reencryption(obj) and _all_done(Reencryption.from_json(obj))


def check_hotzone(max_hotzone: int, alignment: int) -> None:
    """Refuse a ``--hotzone-size`` off the zone alignment (the data device's block and
    the sector sizes): at a start, before anything is written (cryptsetup 2.6.1 finds
    out only once its header is marked, and leaves it so)."""
    if max_hotzone % alignment:
        raise UsageError(
            f"Hotzone size must be multiple of calculated zone alignment ({alignment} bytes)."
        )


def _context(
    rh: Reencryption, data_fd: int, container_size: int, max_hotzone: int, crashed: bool
) -> None:
    """Position the run: device size, hot zone length, offset, progress."""
    rh.device_block = device_block_size(data_fd)
    check_hotzone(max_hotzone, rh.alignment)
    rh.device_size = _device_size(rh, container_size, not crashed)
    if crashed:
        segs = _live_segments(rh.obj)
        if all(_seg_size(s) is not None for s in segs):
            rh.fixed_length = True
            rh.device_size = sum(_seg_size(s) or 0 for s in segs)
    rh.length = _hotzone_length(rh, max_hotzone)
    if not crashed and _all_done(rh):
        rh.offset = rh.progress = rh.device_size
        rh.length = 0
        return
    if rh.length < SECTOR:
        raise FormatError("Invalid reencryption length.")
    _offset(rh)
    if rh.mode == "decrypt" and rh.seg_moved is not None and rh.offset == 0 and not crashed:
        # Only the moved first segment is left.  cryptsetup 2.6.1 keeps the shift as
        # the length here, overlaps its own segments and cannot resume (seen here).
        rh.length = _seg_size(rh.seg_moved) or 0
    if rh.offset > rh.device_size:
        raise FormatError("LUKS2 reencryption offset is beyond the device.")
    rh.length = min(rh.length, rh.device_size - rh.offset)
    if rh.direction == "backward":
        rh.progress = rh.device_size - rh.offset - rh.length
    elif rh.seg_moved is not None:  # decryption moving its first segment: done last
        moved = _seg_size(rh.seg_moved) or 0
        if rh.offset == _seg_offset(rh.seg_moved):
            rh.progress = rh.device_size - moved
        else:
            rh.progress = rh.offset - moved
    else:
        rh.progress = rh.offset
    if crashed:
        segs = _live_segments(rh.obj)
        hot = _hot_index(segs)
        assert hot is not None
        rh.length = _seg_size(segs[hot]) or 0


# ---------------------------------------------------------------------------
# Hot and post segments (cryptsetup's reencrypt_make_{hot,post}_segments_*)
# ---------------------------------------------------------------------------


def _new_segment(
    rh: Reencryption, offset: int, iv: int, size: int | None, hot: bool = False
) -> dict[str, Any]:
    base = rh.data_offset_new
    if rh.mode == "decrypt":
        return linear_segment(base + offset, size, hot)
    assert rh.seg_new is not None
    return crypt_segment(
        base + offset,
        iv // SECTOR,
        size,
        str(rh.seg_new["encryption"]),
        rh.sector_size_of(rh.seg_new),
        hot,
    )


def _old_segment(rh: Reencryption, base: int, offset: int, size: int | None) -> dict[str, Any]:
    if rh.mode == "encrypt":
        return linear_segment(base + offset, size)
    assert rh.seg_old is not None
    return crypt_segment(
        base + offset,
        offset // SECTOR,
        size,
        str(rh.seg_old["encryption"]),
        rh.sector_size_of(rh.seg_old),
    )


def _hot_segments(rh: Reencryption) -> list[dict[str, Any]]:
    base = rh.data_offset_new
    segs = _live_segments(rh.obj)
    if rh.mode == "encrypt" and rh.direction == "backward" and rh.seg_moved is not None:
        return _hot_segments_encrypt_shift(rh, segs)
    if rh.mode == "decrypt" and rh.direction == "forward" and rh.seg_moved is not None:
        return _hot_segments_decrypt_shift(rh, segs)
    out: list[dict[str, Any]] = []
    end = rh.offset + rh.length
    if rh.direction == "forward":
        if rh.offset:
            out.append(_new_segment(rh, 0, 0, rh.offset))
        out.append(_new_segment(rh, rh.offset, rh.offset, rh.length, hot=True))
        if end < rh.device_size:
            rest = rh.device_size - end if rh.fixed_length else None
            out.append(_old_segment(rh, base + rh.shift, end, rest))
        return out
    if rh.offset:
        first = copy.deepcopy(segs[0])
        first["size"] = str(rh.offset)
        out.append(first)
    out.append(_new_segment(rh, rh.offset, rh.offset, rh.length, hot=True))
    if end < rh.device_size:
        rest = rh.device_size - end if rh.fixed_length else None
        out.append(_new_segment(rh, end, end, rest))
    return out


def _hot_segments_encrypt_shift(
    rh: Reencryption, segs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    last_linear = max((i for i, s in enumerate(segs) if s["type"] == "linear"), default=None)
    first_crypt = next((i for i, s in enumerate(segs) if s["type"] == "crypt"), None)
    if last_linear is None:
        if rh.offset:
            raise FormatError("LUKS2 reencryption segments are inconsistent.")
        return []
    hot = _new_segment(rh, rh.offset, rh.offset, rh.length, hot=True)
    out = [copy.deepcopy(s) for s in segs[:last_linear]]
    size = _seg_size(segs[last_linear]) or 0
    if size > rh.length:
        shrunk = copy.deepcopy(segs[last_linear])
        shrunk["size"] = str(size - rh.length)
        out.append(shrunk)
    out.append(hot)
    if first_crypt is not None:
        out.append(copy.deepcopy(segs[first_crypt]))
    return out


def _hot_segments_decrypt_shift(
    rh: Reencryption, segs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """[moved ciphertext at 0 | plaintext done | hot zone | ciphertext after the shift]."""
    out: list[dict[str, Any]] = []
    end = rh.offset + rh.length
    if rh.offset:
        out.append(copy.deepcopy(segs[0]))
        if rh.progress:
            out.append(_new_segment(rh, _seg_size(segs[0]) or 0, 0, rh.progress))
    out.append(_new_segment(rh, rh.offset, rh.offset, rh.length, hot=True))
    if not rh.offset and len(segs) > 1:
        out.append(copy.deepcopy(segs[1]))
    elif end < rh.device_size:
        rest = rh.device_size - end if rh.fixed_length else None
        out.append(_old_segment(rh, rh.data_offset_new + rh.shift, end, rest))
    return out


def _post_segments(rh: Reencryption, hot_segs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    hot = _hot_index(hot_segs)
    if hot is None:
        if rh.mode == "encrypt" and rh.seg_moved is not None and not hot_segs:
            return []
        raise FormatError("LUKS2 reencryption has no hot zone.")
    if rh.mode == "encrypt" and rh.direction == "backward" and rh.seg_moved is not None:
        out = [copy.deepcopy(s) for s in hot_segs[:hot]]
        if hot + 1 < len(hot_segs):
            new = copy.deepcopy(hot_segs[hot + 1])
            new["offset"] = str(rh.offset + rh.data_offset_new)
            new["iv_tweak"] = str(rh.offset // SECTOR)
            size = (_seg_size(new) or 0) + rh.length
        else:
            new = copy.deepcopy(hot_segs[hot])
            new.pop("flags", None)
            size = rh.length
        new["size"] = str(size) if hot > 0 else "dynamic"
        out.append(new)
        return out
    if rh.mode == "decrypt" and rh.direction == "forward" and rh.seg_moved is not None:
        if hot == 0:  # the moved first segment, decrypted last: all plaintext now
            return [_new_segment(rh, 0, 0, None)]
        after = hot_segs[hot + 1] if hot + 1 < len(hot_segs) else None
        done = rh.length + rh.progress
        moved = _seg_size(rh.seg_moved) or 0
        out = [copy.deepcopy(hot_segs[0]), _new_segment(rh, moved, 0, done if after else None)]
        if after is not None:
            out.append(copy.deepcopy(after))
        return out
    if rh.direction == "forward":
        done = rh.offset + rh.length
        after = hot_segs[hot + 1] if hot + 1 < len(hot_segs) else None
        out = [_new_segment(rh, 0, 0, done if after is not None else None)]
        if after is not None:
            old = copy.deepcopy(after)
            if rh.fixed_length:
                old["size"] = str(rh.device_size - done)
            out.append(old)
        return out
    out = [copy.deepcopy(hot_segs[hot - 1])] if hot > 0 else []
    rest = rh.device_size - rh.offset if rh.fixed_length and rh.offset else None
    out.append(_new_segment(rh, rh.offset, rh.offset, rest))
    return out


def _assign(rh: Reencryption, segs: list[dict[str, Any]], hot: bool) -> None:
    """Make *segs* the live segments, re-add the backups, bind digests
    (cryptsetup's ``reencrypt_assign_segments``)."""
    obj = rh.obj
    for digest in obj["digests"].values():
        digest["segments"] = []
    table: dict[str, Any] = {str(i): s for i, s in enumerate(segs)}
    obj["segments"] = table

    def bind(segment: int, digest: int | None) -> None:
        if digest is None:
            return
        ids = obj["digests"][str(digest)]["segments"]
        if str(segment) not in ids:
            ids.append(str(segment))

    def add_backup(seg: dict[str, Any] | None, digest: int | None) -> None:
        if seg is None:
            return
        index = len(table)
        table[str(index)] = seg
        if seg["type"] == "crypt":
            bind(index, digest)

    if rh.mode in ("encrypt", "decrypt"):
        add_backup(rh.seg_old, rh.digest_old)
        add_backup(rh.seg_new, rh.digest_new)
        add_backup(rh.seg_moved, rh.digest_old)
        key = rh.digest_new if rh.mode == "encrypt" else rh.digest_old
        for i, seg in enumerate(segs):
            if seg["type"] == "crypt":
                bind(i, key)
        return
    forward = rh.direction == "forward"
    rseg = _hot_index(segs)
    if rseg is not None:
        bind(rseg, rh.digest_new)
        bind(rseg, rh.digest_old)
    count = len(segs)
    if hot:
        assert rseg is not None
        if rseg > 0:
            bind(0, rh.digest_new if forward else rh.digest_old)
        if count > rseg + 1:
            bind(rseg + 1, rh.digest_old if forward else rh.digest_new)
    else:
        bind(0, rh.digest_new if forward or count == 1 else rh.digest_old)
        if count > 1:
            bind(1, rh.digest_old if forward else rh.digest_new)
    add_backup(rh.seg_old, rh.digest_old)
    add_backup(rh.seg_new, rh.digest_new)


def _update(rh: Reencryption) -> None:
    """Advance to the next hot zone (cryptsetup's ``reencrypt_context_update``)."""
    if rh.direction == "backward":
        if rh.protection.type == "datashift" and rh.mode == "encrypt":
            if rh.offset:
                rh.offset -= rh.shift
            if rh.offset and rh.offset < rh.shift:
                rh.length = rh.offset
                rh.offset = rh.shift
            if not rh.offset:
                rh.length = rh.shift
        else:
            rh.length = min(rh.length, rh.offset)
            rh.offset -= rh.length
    else:
        rh.offset += rh.read
        if rh.offset == rh.device_size and rh.seg_moved is not None and rh.mode == "decrypt":
            rh.offset, rh.length = 0, _seg_size(rh.seg_moved) or 0  # the moved segment last
        else:
            rh.length = min(rh.length, rh.device_size - rh.offset)
    if rh.offset > rh.device_size:
        raise FormatError("Calculated reencryption offset is beyond the device size.")
    rh.progress += rh.read


# ---------------------------------------------------------------------------
# Hot zone I/O
# ---------------------------------------------------------------------------


def _pread(fd: int, length: int, position: int, what: str) -> bytearray:
    data = bytearray(pread_exact(fd, length, position, what))
    return data


def _read_into(fd: int, view: memoryview, position: int, what: str) -> None:
    """Fill *view* from *position* (the hot zone is read once, into a reused buffer)."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], position + done)
        except InterruptedError:
            continue
        except OSError as exc:
            raise DeviceError(f"cannot read {what}: {exc.strerror}") from exc
        if got <= 0:
            raise DeviceError(f"cannot read {what}: the device ends at {position + done}")
        done += got


def _encrypt(cipher: SectorCipher | None, plain: bytearray, offset: int) -> bytearray:
    if cipher is None:
        return plain
    return cipher.encrypt(plain, offset // cipher.sector_size)


#: bytes per call of the C data path (its limit)
_CHUNK = 1 << 20


class _Crypter:
    """Decrypts and encrypts hot zones: with the C data path where the cipher allows
    (1 MiB calls with the GIL released, the zone split between two threads with a worker
    each: measured 2.7 GB/s for one, where the worker's own helper thread gave 2.2),
    else with the Python engine.  Workers are cached by what they compute, never by
    object identity."""

    THREADS = 2

    def __init__(self) -> None:
        self._workers: dict[tuple[object, ...], list[Any]] = {}

    def _pool(self, cipher: SectorCipher) -> list[Any]:
        params = cipher.fast_parameters()
        if params is None:
            return []
        key = (
            params.chainmode,
            params.ivmode,
            bytes(params.key),
            params.essiv_key,
            cipher.sector_size,
            cipher.iv_offset,
        )
        if key not in self._workers:
            from ..volume import fast_path_for

            fast = fast_path_for(cipher, fd=-1, data_offset=0, size=_CHUNK, readonly=True)
            self._workers[key] = (
                [fast.worker() for _ in range(self.THREADS)] if fast is not None else []
            )
        return self._workers[key]

    def run(
        self,
        cipher: SectorCipher | None,
        src: memoryview,
        dst: memoryview,
        offset: int,
        *,
        encrypt: bool,
    ) -> memoryview:
        """*src* (data-relative *offset*) through *cipher* into *dst*; returns where the
        result is (*src* itself for plaintext storage)."""
        if cipher is None:
            return src
        ss = cipher.sector_size
        first = offset // ss
        pool = self._pool(cipher)
        if not pool:
            if src.obj is dst.obj:  # in place: the Python engine reads as it writes
                src = memoryview(bytes(src))
            if encrypt:
                cipher.encrypt_into(src, first, dst)
            else:
                cipher.decrypt_into(src, first, dst)
            return dst
        sectors = len(src) // ss
        # two halves, one per worker, straight into dst (no copy through the worker)
        half = (sectors + 1) // 2 * ss if len(pool) > 1 and len(src) >= 2 * _CHUNK else len(src)
        if half == len(src):
            pool[0].crypt_into(src, first, dst, encrypt)
            return dst
        errors: list[BaseException] = []

        def second() -> None:
            try:
                pool[1].crypt_into(src[half:], first + half // ss, dst[half:], encrypt)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        helper = threading.Thread(target=second, name="reencrypt-cipher-2")
        helper.start()
        try:
            pool[0].crypt_into(src[:half], first, dst[:half], encrypt)
        finally:
            helper.join()
        if errors:
            raise errors[0]
        return dst


def _checksums(prot: Protection, data: bytes | bytearray | memoryview) -> bytes:
    """The hash of every ``block_size`` block, in order (in C without the GIL where the
    data path is built and OpenSSL has the hash)."""
    name = hashlib_name(prot.hash or "")
    if _fastpath is not None:
        with contextlib.suppress(ValueError):
            return bytes(_fastpath.block_digests(data, prot.block_size, name))
    # hashlib.sha256 & co. are several times cheaper per call than hashlib.new(name)
    ctor = getattr(hashlib, name, None) if name in hashlib.algorithms_guaranteed else None
    bs = prot.block_size
    view = memoryview(data)
    if ctor is not None:
        return b"".join(ctor(view[i : i + bs]).digest() for i in range(0, len(view), bs))
    return b"".join(hashlib.new(name, view[i : i + bs]).digest() for i in range(0, len(view), bs))


def _big_buffer(length: int) -> mmap.mmap:
    """Anonymous memory for a hot zone, in transparent huge pages where the kernel has
    them (madvise mode): a 256 MiB zone then costs 128 page faults instead of 65,536."""
    buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


@dataclass(frozen=True)
class _Zone:
    """Where a hot zone's data is read: container *position*, *length* bytes, and its
    data-relative *offset* (the IVs)."""

    position: int
    length: int
    offset: int


def _zones_ahead(rh: Reencryption) -> Iterator[_Zone] | None:
    """Every hot zone from the current one on, in order, when each can be read before
    the ones before it are written: no data shift (the source then never moves), no
    moved segment, the old and new data at the same offset (the zones' sources are
    then disjoint from the earlier zones' destinations); None otherwise."""
    if (
        rh.shift
        or rh.seg_moved is not None
        or rh.protection.type == "datashift"
        or rh.data_offset_old != rh.data_offset_new
    ):
        return None

    def zones() -> Iterator[_Zone]:
        probe = copy.copy(rh)  # _update changes only the scalar position fields
        while probe.progress < probe.device_size and probe.length > 0:
            yield _Zone(rh.data_offset_old + probe.offset, probe.length, probe.offset)
            probe.read = probe.length
            _update(probe)

    return zones()


@dataclass
class _Prepared:
    """A hot zone read and converted ahead: *raw* as read, *out* under the new key,
    *sums* its checksums (checksum resilience)."""

    zone: _Zone
    raw: memoryview
    out: memoryview
    sums: bytes | None
    raw_slot: int
    out_slot: int


def _convert(
    crypter: _Crypter,
    prot: Protection,
    old_cipher: SectorCipher | None,
    new_cipher: SectorCipher | None,
    raw: memoryview,
    out: memoryview,
    offset: int,
    then: Callable[[bytes | None], None] | None = None,
) -> bytes | None:
    """*raw* (data-relative *offset*) from the old key to the new one into *out* (the C
    workers, in a thread), meanwhile hashing *raw* (``checksum`` resilience) and then
    calling *then* with the checksums; returns them."""
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            plain = crypter.run(old_cipher, raw, out, offset, encrypt=False)
            result = crypter.run(new_cipher, plain, out, offset, encrypt=True)
            if result.obj is not out.obj:  # plaintext on both sides: a copy
                out[:] = result
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=convert, name="reencrypt-cipher")
    worker.start()
    try:
        sums = _checksums(prot, raw) if prot.type == "checksum" else None
        if then is not None:
            then(sums)
    finally:
        worker.join()
    if errors:
        raise errors[0]
    return sums


class _Pipeline:
    """Offline hot zones in three stages: zone k+2 is read (one thread), k+1 is
    converted to the new key and hashed (another, with the C workers), while the
    caller protects, writes and commits zone k.  Only where no zone reads what an
    earlier one writes (:func:`_zones_ahead`); nothing here writes to a device, so
    stopping it at any point leaves the container as the caller last left it.

    Buffers are reused in turn: two raw zones (three with a journal, whose raw zone
    is written to the area in the caller's stage) and two converted ones.
    """

    def __init__(self, dev: _Devices, rh: Reencryption, zones: Iterator[_Zone]) -> None:
        self.dev = dev
        self.prot = rh.protection
        self.old_cipher = rh.storage(new=False)[1]
        self.new_cipher = rh.storage(new=True)[1]
        self.raw: list[mmap.mmap | None] = [None] * (3 if self.prot.type == "journal" else 2)
        self.out: list[mmap.mmap | None] = [None, None]
        self.raw_free: queue.Queue[int] = queue.Queue()
        self.out_free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.raw)):
            self.raw_free.put(i)
        for i in range(len(self.out)):
            self.out_free.put(i)
        self.read_q: queue.Queue[tuple[_Zone, int] | BaseException | None] = queue.Queue()
        self.done_q: queue.Queue[_Prepared | BaseException | None] = queue.Queue()
        self.stopping = False
        dev.direct()  # opened once, here, not by two threads at a time
        self.threads = [
            threading.Thread(target=self._reader, args=(zones,), name="reencrypt-read"),
            threading.Thread(target=self._converter, name="reencrypt-convert"),
        ]
        for t in self.threads:
            t.start()

    @staticmethod
    def _view(buffers: list[mmap.mmap | None], slot: int, length: int) -> memoryview:
        buf = buffers[slot]
        if buf is None or len(buf) < length:
            buf = buffers[slot] = _big_buffer(length)
        return memoryview(buf)[:length]

    def _reader(self, zones: Iterator[_Zone]) -> None:
        try:
            for zone in zones:
                slot = self.raw_free.get()
                if self.stopping or slot < 0:
                    return
                self.dev.read_zone(self._view(self.raw, slot, zone.length), zone.position)
                self.read_q.put((zone, slot))
            self.read_q.put(None)
        except BaseException as exc:  # handed to the caller, in order
            self.read_q.put(exc)

    def _converter(self) -> None:
        try:
            while True:
                item = self.read_q.get()
                if item is None or isinstance(item, BaseException):
                    self.done_q.put(item)  # the end, or the reader's error
                    return
                if self.stopping:
                    return
                zone, raw_slot = item
                out_slot = self.out_free.get()
                if self.stopping or out_slot < 0:
                    return
                raw = self._view(self.raw, raw_slot, zone.length)
                out = self._view(self.out, out_slot, zone.length)
                crypter = self.dev.crypter
                sums = _convert(
                    crypter, self.prot, self.old_cipher, self.new_cipher, raw, out, zone.offset
                )
                if self.prot.type != "journal":
                    self.raw_free.put(raw_slot)  # the caller needs only sums and out
                self.done_q.put(_Prepared(zone, raw, out, sums, raw_slot, out_slot))
        except BaseException as exc:  # handed to the caller, in order
            self.done_q.put(exc)

    def take(self) -> _Prepared | None:
        """The next zone, converted (None: there is none); errors of the stages are
        raised here, in the caller's thread."""
        item = self.done_q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, prepared: _Prepared) -> None:
        """The caller has written *prepared*: its buffers go back to the stages."""
        self.out_free.put(prepared.out_slot)
        if self.prot.type == "journal":
            self.raw_free.put(prepared.raw_slot)

    def close(self) -> None:
        """Stop both stages (at the end of their current zone) and wait for them."""
        self.stopping = True
        self.raw_free.put(-1)
        self.out_free.put(-1)
        self.read_q.put(None)
        for t in self.threads:
            t.join()


@dataclass
class _Devices:
    data_fd: int
    header_fd: int
    writer: Luks2Writer
    crypter: _Crypter = field(default_factory=_Crypter)
    #: where a zone is read (0) and converted (1) when no pipeline does it
    buffers: list[mmap.mmap | None] = field(default_factory=lambda: [None, None])

    #: the data device again with O_DIRECT (-1: none): hot zones are read and written
    #: straight from and to the buffers, as cryptsetup does (buffered reads of a cold
    #: 1 GiB ran at a third of the disk's speed here; buffered writes cost a copy into
    #: the page cache and its write-back); the kernel writes back and drops cached pages
    #: of the range first
    direct_fd: int = -2

    def direct(self) -> int:
        if self.direct_fd == -2:
            mode = fcntl.fcntl(self.data_fd, fcntl.F_GETFL) & os.O_ACCMODE
            self.direct_fd = open_direct(self.data_fd, readonly=mode == os.O_RDONLY)
        return self.direct_fd

    def write_zone(self, view: memoryview, position: int, *, durable: bool) -> None:
        """Write a converted hot zone at *position* (O_DIRECT where all is aligned)."""
        pwrite_direct(
            self.data_fd, view, position, "hot zone", direct=self.direct(), durable=durable
        )

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        self.direct_fd = -1

    def zone(self, position: int, length: int) -> memoryview:
        """The hot zone at *position*, read now."""
        view = self.buffer(0, length)
        self.read_zone(view, position)
        return view

    def read_zone(self, view: memoryview, position: int) -> None:
        """Read a hot zone into *view*, as it is on the disk.

        With O_DIRECT (where everything is 4 KiB aligned) the kernel first writes back
        the range's dirty pages (a mount's writes), and the protecting commit makes them
        durable: its header write is a buffered ``RWF_DSYNC`` write, the file system's
        fsync of that range, which on ext4, XFS and btrfs flushes the disk's whole
        write cache.  So the checksums stored are those of what a crash leaves there.
        Through the page cache, the whole file is synced first for the same reason.
        """
        fd = self.direct()
        if fd >= 0 and not position % 4096 and not len(view) % 4096:
            try:
                _read_into(fd, view, position, "reencryption hot zone")
                return
            except DeviceError:
                pass  # a file system that refuses O_DIRECT here: read through the cache
        sync(self.data_fd)
        _read_into(self.data_fd, view, position, "reencryption hot zone")

    def buffer(self, index: int, length: int) -> memoryview:
        """A reused buffer of *length* bytes (see ``buffers``)."""
        buf = self.buffers[index]
        if buf is None or len(buf) < length:
            buf = self.buffers[index] = _big_buffer(length)
        return memoryview(buf)[:length]


def _commit(dev: _Devices, rh: Reencryption) -> None:
    dev.writer.obj = rh.obj
    dev.writer.commit()


def _commit_none(dev: _Devices, rh: Reencryption) -> None:
    """Resilience ``none``'s commit: the zones it says are done reach the disk first."""
    sync(dev.data_fd)
    _commit(dev, rh)


def _step(dev: _Devices, rh: Reencryption, prepared: _Prepared | None = None) -> None:
    """Reencrypt one hot zone, committing the metadata as cryptsetup's ``reencrypt_step``;
    with *prepared*, the zone was read, converted and hashed ahead (:class:`_Pipeline`)."""
    hot_segs = _hot_segments(rh)
    post = _post_segments(rh, hot_segs)
    prot = rh.protection
    old_base, old_cipher = rh.storage(new=False)
    new_base, new_cipher = rh.storage(new=True)
    if not rh.offset and prot.type == "datashift" and rh.seg_moved is not None:
        old_base = _seg_offset(rh.seg_moved)
        if rh.moved_protection is not None:
            prot = rh.moved_protection
    _assign(rh, hot_segs, hot=True)

    def protect(raw: memoryview, sums: bytes | None) -> None:
        # metadata commit point: the hot zone is protected before a byte of it changes
        if prot.type == "checksum":
            assert sums is not None
            pwrite_direct(
                dev.header_fd, sums, rh.area_offset, "reencryption checksums", durable=True
            )
            _commit(dev, rh)
        elif prot.type == "journal":
            pwrite_direct(dev.header_fd, raw, rh.area_offset, "reencryption journal", durable=True)
            _commit(dev, rh)
        elif prot.type == "datashift":
            _commit(dev, rh)

    if prepared is not None:
        rh.read = prepared.zone.length
        protect(prepared.raw, prepared.sums)
        converted = prepared.out
    else:
        raw = dev.zone(old_base + rh.offset, rh.length)
        rh.read = len(raw)
        # The new ciphertext is computed meanwhile (into memory only, raw stays
        # untouched): the cipher runs in the C data path's threads while this thread
        # hashes or journals and commits.
        converted = dev.buffer(1, rh.length)
        _convert(
            dev.crypter,
            prot,
            old_cipher,
            new_cipher,
            raw,
            converted,
            rh.offset,
            then=lambda sums: protect(raw, sums),
        )
    # durable before the commit that follows (``none``: before its one commit, _steps)
    dev.write_zone(converted, new_base + rh.offset, durable=prot.type != "none")
    # metadata commit safe point: the caller commits, together with the finish after
    # the last hot zone (so no header ever says "all done, not finished")
    _assign(rh, post, hot=False)


def _finish(dev: _Devices, rh: Reencryption) -> None:
    """End the reencryption in one commit: old keyslots, backup segments, the
    requirement and the reencrypt keyslot go together.

    cryptsetup destroys the old keyslots one commit each first; a crash there leaves a
    header that needs the old key to open but has lost it.  Here everything the header
    stops referring to is overwritten *after* the commit: the old keyslots' areas and
    the resilience area (old ciphertext).  As cryptsetup does, the moved
    first segment of an encryption (plaintext) and the tail a forward data shift left
    behind are overwritten (after the commit: until then they are what recovers the
    last hot zone); neither is part of the finished volume's data.
    """
    obj = rh.obj
    moved = rh.seg_moved if rh.mode == "encrypt" else None
    stale: list[tuple[int, int]] = []
    if rh.digest_old is not None and rh.digest_old != rh.digest_new:
        for slot in list(obj["digests"].get(str(rh.digest_old), {}).get("keyslots", [])):
            area = obj["keyslots"][slot]["area"]
            stale.append((int(area["offset"]), int(area["size"])))
            del obj["keyslots"][slot]
    for key in [k for k, seg in obj["segments"].items() if _is_backup(seg)]:
        del obj["segments"][key]
    for digest in obj["digests"].values():
        digest["segments"] = [x for x in digest["segments"] if x in obj["segments"]]
    reqs = obj["config"].get("requirements", {})
    mandatory = [r for r in reqs.get("mandatory", []) if not r.startswith("online-reencrypt")]
    if mandatory:
        reqs["mandatory"] = mandatory
    else:
        obj["config"].pop("requirements", None)
    # LUKS2_set_keyslots_size: the keyslots area reaches the (new) data offset
    base = 2 * dev.writer.hdr_size
    if rh.data_offset_new >= base:
        size = min(rh.data_offset_new - base, MAX_KEYSLOTS_SIZE)
        obj["config"]["keyslots_size"] = str(size - size % 4096)
    stale.append((rh.area_offset, rh.area_size))
    del obj["keyslots"][str(rh.keyslot)]
    for item in [*obj["digests"].values(), *obj.get("tokens", {}).values()]:
        if isinstance(item.get("keyslots"), list):  # (cryptsetup's keyslot wipe does so)
            item["keyslots"] = [k for k in item["keyslots"] if k in obj["keyslots"]]
    drop_empty_digests(obj)
    _commit(dev, rh)
    for offset, length in stale:
        wipe_area(dev.header_fd, offset, length, "unused keyslot area")
    if moved is not None:
        _wipe_random(dev.data_fd, _seg_offset(moved), _seg_size(moved) or 0)
    if rh.protection.type == "datashift" and rh.direction == "forward":
        end = device_size(dev.data_fd)
        _wipe_random(dev.data_fd, end - rh.shift, rh.shift)


def _wipe_random(fd: int, offset: int, length: int) -> None:
    chunk = 1 << 20
    for at in range(offset, offset + length, chunk):
        pwrite_all(fd, os.urandom(min(chunk, offset + length - at)), at, "wipe")
    sync(fd)


# ---------------------------------------------------------------------------
# Recovery of an interrupted hot zone
# ---------------------------------------------------------------------------


def _hot_protection(rh: Reencryption) -> Protection:
    if rh.offset == 0 and rh.moved_protection is not None:
        return rh.moved_protection
    return rh.protection


def recovered_extents(rh: Reencryption, data_fd: int, header_fd: int) -> list[Extent]:
    """Where the plaintext of the interrupted hot zone is, without writing anything.

    ``checksum``: blocks whose current bytes still hash to the recorded old
    ciphertext are old data, the others are already new; ``journal``: the old
    ciphertext is in the area; ``datashift``: the old data is untouched at its
    old place.  Offsets of the returned extents are relative to the hot zone.
    """
    prot = _hot_protection(rh)
    new_base, _ = rh.storage(new=True)
    hot_iv = rh.offset
    length = rh.length

    def old_at(iv: int) -> SectorCipher | None:
        return rh.storage(new=False, iv=iv)[1]

    if prot.type == "checksum":
        bs = prot.block_size
        count = length // bs
        stored = pread_exact(
            header_fd, count * prot.hash_size, rh.area_offset, "reencryption checksums"
        )
        current = pread_exact(data_fd, length, new_base + rh.offset, "reencryption hot zone")
        name = hashlib_name(prot.hash or "")
        states = [
            secrets.compare_digest(
                hashlib.new(name, current[i * bs : (i + 1) * bs]).digest(),
                stored[i * prot.hash_size : (i + 1) * prot.hash_size],
            )
            for i in range(count)
        ]
        extents: list[Extent] = []
        i = 0
        while i < count:  # runs of blocks still old (checksum matches) or already new
            j = i
            while j < count and states[j] == states[i]:
                j += 1
            at = hot_iv + i * bs
            cipher = old_at(at) if states[i] else rh.storage(new=True, iv=at)[1]
            # with checksums the old data was read where the new data goes (no shift)
            extents.append(Extent(i * bs, (j - i) * bs, new_base + rh.offset + i * bs, cipher))
            i = j
        return extents
    if prot.type == "journal":
        if length > rh.area_size:
            raise FormatError("Invalid journal size.")
        return [Extent(0, length, rh.area_offset, old_at(hot_iv), on_header=True)]
    if prot.type == "datashift":
        if rh.offset == 0 and rh.seg_moved is not None:
            return [Extent(0, length, _seg_offset(rh.seg_moved), old_at(0))]
        shift = rh.shift if rh.direction == "forward" else -rh.shift
        position = rh.data_offset_new + rh.offset + shift
        return [Extent(0, length, position, old_at(hot_iv))]
    raise FormatError("A reencryption without resilience cannot be recovered.")


def read_extents(
    extents: list[Extent], data_fd: int, header_fd: int, start: int, length: int
) -> bytes:
    """Plaintext of volume bytes [start, start+length), whole extents' sectors decrypted."""
    out = bytearray()
    for e in extents:
        lo, hi = max(start, e.start), min(start + length, e.start + e.length)
        if lo >= hi:
            continue
        ss = e.cipher.sector_size if e.cipher is not None else SECTOR
        first = (lo - e.start) // ss * ss
        last = -(-(hi - e.start) // ss) * ss
        raw = _pread(
            header_fd if e.on_header else data_fd, last - first, e.position + first, "volume"
        )
        plain = raw if e.cipher is None else e.cipher.decrypt(raw, first // ss)
        out += plain[lo - e.start - first : hi - e.start - first]
    return bytes(out)


def _recover_hot(dev: _Devices, rh: Reencryption) -> None:
    """Rewrite the interrupted hot zone with the new key (cryptsetup's
    ``reencrypt_recover_segment``); running it twice is harmless."""
    hot = recovered_extents(rh, dev.data_fd, dev.header_fd)
    plain = bytearray(read_extents(hot, dev.data_fd, dev.header_fd, 0, rh.length))
    new_base, new_cipher = rh.storage(new=True)
    pwrite_all(
        dev.data_fd,
        _encrypt(new_cipher, plain, rh.offset),
        new_base + rh.offset,
        "recovered hot zone",
    )
    sync(dev.data_fd)
    rh.read = rh.length


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def _unlock_digest(
    header: LUKS2Header, fd: int, digest: int, passphrase: bytes, key_slot: int | None
) -> bytes | None:
    d = header.metadata.digests[digest]
    slots = [header.metadata.keyslots[k] for k in d.keyslots if k in header.metadata.keyslots]
    slots = [s for s in slots if s.type == "luks2"]
    if key_slot is not None and any(s.index == key_slot for s in slots):
        slots = [s for s in slots if s.index == key_slot]
    else:
        slots = [s for s in slots if s.priority == PRIORITY_HIGH] + [
            s for s in slots if s.priority == PRIORITY_NORMAL
        ]
    for slot in slots:
        key = header.try_keyslot(fd, slot, passphrase, d)
        if key is not None:
            return key
    return None


def _bound_to(digest: Digest) -> Callable[[int], Digest | None]:
    """*digest* for the keyslots it names, None for the others."""
    return lambda index: digest if index in digest.keyslots else None


def unlock(
    header: LUKS2Header,
    fd: int,
    rh: Reencryption,
    passphrase: bytes,
    key_slot: int | None,
    known: dict[int, bytes] | None = None,
) -> None:
    """Unlock the volume key of every digest the reencryption needs into ``rh.keys``
    and check the reencryption metadata digest with them.  Keys in *known* (the
    initialization's, in the same process) are checked against their digests instead
    of running the keyslots' KDFs again."""
    needed = [d for d in (rh.digest_old, rh.digest_new) if d is not None]
    if key_slot is not None and key_slot not in header.metadata.keyslots:
        raise KeyslotError(f"Keyslot {key_slot} is not active.")
    for digest in dict.fromkeys(needed):
        key = (known or {}).get(digest)
        if key is None or not header.verify_volume_key(key, header.metadata.digests[digest]):
            key = _unlock_digest(header, fd, digest, passphrase, key_slot)
        if key is None:
            if key_slot is None and not header.wrong_passphrase_last(
                _bound_to(header.metadata.digests[digest])
            ):
                # (cryptsetup's LUKS2_keyslot_open_by_digest: the last keyslot's result)
                raise KeyslotError("No usable keyslot is available.")
            raise WrongPassphraseError()
        rh.keys[digest] = key
    if not rdigest.verify_digest(rh.obj, rh.keys):
        raise FormatError(
            "Reencryption metadata is invalid (its digest does not match); "
            "a header from an older cryptsetup needs 'cryptsetup repair'."
        )


# ---------------------------------------------------------------------------
# Public operations
# ---------------------------------------------------------------------------


def _writer(header_fd: int, header: LUKS2Header) -> Luks2Writer:
    """The reencryption's header writer: its commits make the header's range durable,
    not the whole device (``sync_ranges``): every data write a commit depends on is
    made durable first (the hot zone, the checksums or journal; ``none``'s zones by
    an fdatasync before its commit), and a mounted container's other dirty pages are
    not the reencryption's to write back."""
    writer = Luks2Writer.from_header(header_fd, header, reencryption=True)
    writer.sync_ranges = True
    return writer


@contextmanager
def _opened(data_path: str, header_path: str | None) -> Iterator[_Devices]:
    from .manage import _locked  # the flock every metadata change takes

    with _locked(data_path, header_path, write=True) as h:
        header = read_luks2_header(h.header_fd, h.header_path)
        yield _Devices(h.data_fd, h.header_fd, _writer(h.header_fd, header))


def _load(
    dev: _Devices, passphrase: bytes, key_slot: int | None, path: str
) -> tuple[LUKS2Header, Reencryption]:
    header = read_luks2_header(dev.header_fd, path)
    if not in_reencryption(header.json):
        raise UsageError(f"Device {path} is not in LUKS2 reencryption.")
    _check_version(header.json)
    rh = Reencryption.from_json(copy.deepcopy(header.json))
    unlock(header, dev.header_fd, rh, passphrase, key_slot)
    return header, rh


def _check_version(obj: dict[str, Any]) -> None:
    reqs = obj["config"].get("requirements", {}).get("mandatory", [])
    if not any(r in REENCRYPT_REQUIREMENTS for r in reqs):
        raise UnsupportedError(
            f"LUKS2 reencryption metadata of an old cryptsetup ({', '.join(reqs)}); "
            "run 'cryptsetup repair' first."
        )


def recover(
    data_path: str, header_path: str | None, passphrase: bytes, key_slot: int | None = None
) -> bool:
    """Repair an interrupted hot zone (cryptsetup ``repair``); False when none was interrupted."""
    with _opened(data_path, header_path) as dev:
        _, rh = _load(dev, passphrase, key_slot, header_path or data_path)
        if not rh.crashed():
            return False
        _recover_locked(dev, rh)
        return True


def resilience_area_type(current: str, resilience: str) -> str:
    """The reencrypt keyslot area type ``--resilience`` gives an operation whose area
    type is *current* (any ``datashift-*``: a decryption that moves the data), with
    cryptsetup 2.6.1's refusals: nothing applies to a plain data shift, and a
    decryption moving the data takes ``checksum`` or ``journal`` only."""
    if resilience not in ("checksum", "journal", "none"):
        raise UsageError(f"Unsupported resilience mode {resilience}.")
    if current == "datashift":
        raise UsageError(
            "Device is in reencryption using datashift resilience. "
            "Requested --resilience option cannot be applied."
        )
    if not current.startswith("datashift-"):
        return resilience
    if resilience == "none":
        raise UsageError(
            "Requested --resilience option cannot be applied to current reencryption operation."
        )
    return f"datashift-{resilience}"


def _area_capacity(area_size: int, hash_name: str | None, block: int) -> int:
    """Bytes of hot zone a resilience area holds: a *hash_name* hash per *block*
    (checksum), else the area itself (journal)."""
    return area_size // hash_size(hash_name) * block if hash_name else area_size


def switch_resilience(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    resilience: str,
    resilience_hash: str | None = None,
    *,
    key_slot: int | None = None,
    keys: dict[int, bytes] | None = None,
) -> bool:
    """Change the resilience of a reencryption in progress, as ``cryptsetup reencrypt
    --resume-only --resilience R`` does (``LUKS2_keyslot_reencrypt_update``): the
    reencrypt keyslot's area (same place) takes the new type (``datashift-`` kept for
    a decryption that moves the data), a checksum hash (``resilience_hash``, else the
    current one, else sha256) and block, and a new reencryption digest (sha256,
    benchmarked), all in one commit, between hot zones (an interrupted one is
    recovered first, with the old resilience).  False when nothing changes.
    With *keys*, the volume keys are handed back for the run that follows."""
    path = header_path or data_path
    with _opened(data_path, header_path) as dev:
        _, rh = _load(dev, passphrase, key_slot, path)
        current = str(rh.obj["keyslots"][str(rh.keyslot)]["area"]["type"])
        new_type = resilience_area_type(current, resilience)  # refused before any write
        if rh.crashed():
            _recover_locked(dev, rh)
            _, rh = _load(dev, passphrase, key_slot, path)
        if keys is not None:
            keys.update(rh.keys)
        area = rh.obj["keyslots"][str(rh.keyslot)]["area"]
        new_area: dict[str, Any] = {
            "offset": area["offset"],
            "size": area["size"],
            "type": new_type,
        }
        block = 0
        if resilience == "checksum":
            hash_name = resilience_hash or str(area.get("hash") or "sha256")
            hashlib_name(hash_name)
            block = max(
                device_block_size(dev.data_fd),
                rh.sector_size_of(rh.seg_old),
                rh.sector_size_of(rh.seg_new),
            )
            new_area["hash"] = hash_name
            new_area["sector_size"] = block
        if "shift_size" in area:
            new_area["shift_size"] = area["shift_size"]
        if new_area == area:
            return False
        if rh.seg_moved is not None and current.startswith("datashift-"):
            capacity = _area_capacity(int(area["size"]), new_area.get("hash"), block)
            moved = _seg_size(rh.seg_moved) or 0
            if moved > capacity:
                raise UsageError(
                    f"Can not update resilience type. New type only provides {capacity} "
                    f"bytes, required space is: {moved} bytes."
                )
        obj = copy.deepcopy(rh.obj)
        obj["keyslots"][str(rh.keyslot)]["area"] = new_area
        dev.writer.obj = rdigest.with_reencrypt_digest(obj, rh.keys, iterations=None)
        dev.writer.commit()
        return True


def _recover_locked(dev: _Devices, rh: Reencryption) -> None:
    _context(rh, dev.data_fd, device_size(dev.data_fd), 0, crashed=True)
    _recover_hot(dev, rh)
    segs = _live_segments(rh.obj)
    post = _post_segments(rh, segs)
    _assign(rh, post, hot=False)
    _update(rh)
    if rh.progress >= rh.device_size:
        _finish(dev, rh)
    else:
        _commit(dev, rh)
    log.info("reencryption hot zone recovered")


@dataclass(frozen=True)
class RunResult:
    finished: bool
    done: int
    total: int


class Live(Protocol):
    """A mounted volume being reencrypted under it (the daemon's ``SegmentedVolume``).

    ``hold`` excludes every read and write of volume bytes [start, end) while a hot
    zone is converted and committed; ``update`` installs the extents of the new state
    before the hold is released; ``flush`` writes what the mount wrote so far to the
    disk (the volume's own sync, whose errors the mount's next fsync reports too).
    """

    def hold(self, start: int, end: int) -> AbstractContextManager[None]: ...

    def flush(self) -> None: ...

    def update(self, extents: list[Extent]) -> None: ...


@dataclass
class Devices:
    """Descriptors a reencryption works on: the data device and the header device
    (the same unless detached), both already locked by the caller."""

    data_fd: int
    header_fd: int
    path: str

    def writer(self) -> Luks2Writer:
        return _writer(self.header_fd, read_luks2_header(self.header_fd, self.path))


def run(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    *,
    key_slot: int | None = None,
    max_hotzone: int = 0,
    progress: ProgressFn | None = None,
    stop: Callable[[], bool] | None = None,
    keys: dict[int, bytes] | None = None,
) -> RunResult:
    """Resume (or run after :func:`initialize`) the reencryption to its end.

    An interrupted hot zone is recovered first.  *stop* is polled between hot
    zones (Ctrl-C): the container is left consistent and resumable.
    """
    with _opened(data_path, header_path) as dev:
        return run_on(
            Devices(dev.data_fd, dev.header_fd, header_path or data_path),
            passphrase,
            key_slot=key_slot,
            max_hotzone=max_hotzone,
            progress=progress,
            stop=stop,
            keys=keys,
        )


def run_on(
    devices: Devices,
    passphrase: bytes,
    *,
    key_slot: int | None = None,
    max_hotzone: int = 0,
    progress: ProgressFn | None = None,
    stop: Callable[[], bool] | None = None,
    live: Live | None = None,
    keys: dict[int, bytes] | None = None,
) -> RunResult:
    """:func:`run` on descriptors the caller holds; with *live*, under a mounted volume."""
    dev = _Devices(devices.data_fd, devices.header_fd, devices.writer())
    try:
        return _run_on(dev, devices, passphrase, key_slot, max_hotzone, progress, stop, live, keys)
    finally:
        dev.close()


def _run_on(
    dev: _Devices,
    devices: Devices,
    passphrase: bytes,
    key_slot: int | None,
    max_hotzone: int,
    progress: ProgressFn | None,
    stop: Callable[[], bool] | None,
    live: Live | None,
    keys: dict[int, bytes] | None,
) -> RunResult:
    header = read_luks2_header(devices.header_fd, devices.path)
    if not in_reencryption(header.json):
        raise UsageError(f"Device {devices.path} is not in LUKS2 reencryption.")
    _check_version(header.json)
    rh = Reencryption.from_json(copy.deepcopy(header.json))
    unlock(header, devices.header_fd, rh, passphrase, key_slot, keys)
    if rh.crashed():
        if live is not None:  # pragma: no cover - the daemon recovers before it mounts
            raise FormatError("an interrupted hot zone must be recovered before mounting")
        _recover_locked(dev, rh)
        header = read_luks2_header(devices.header_fd, devices.path)
        if not in_reencryption(header.json):
            return RunResult(True, rh.device_size, rh.device_size)
        keys = rh.keys
        rh = Reencryption.from_json(copy.deepcopy(header.json))
        rh.keys = keys
    if live is not None and (rh.mode != "reencrypt" or rh.shift):
        raise UnsupportedError(
            f"Online {rh.mode} with {rh.area_type} resilience is not supported; "
            "unmount and run it offline."
        )
    container = device_size(dev.data_fd)
    _context(rh, dev.data_fd, container, max_hotzone, crashed=False)
    # online the mount writes too; a zone larger than the default (--hotzone-size)
    # is done one at a time: the stages would keep four of them in memory
    zones = _zones_ahead(rh) if live is None and rh.length <= DEFAULT_HOTZONE else None
    pipeline = _Pipeline(dev, rh, zones) if zones is not None else None
    try:
        return _steps(dev, rh, container, progress, stop, live, pipeline)
    finally:
        if pipeline is not None:
            pipeline.close()


def _steps(
    dev: _Devices,
    rh: Reencryption,
    container: int,
    progress: ProgressFn | None,
    stop: Callable[[], bool] | None,
    live: Live | None,
    pipeline: _Pipeline | None,
) -> RunResult:
    """Hot zone after hot zone to the end, or to a *stop* between two of them.

    Without resilience (``none``) the header is committed only at the end or at a
    stop, as cryptsetup does; when a step fails (a read or write error, an
    interruption), the zones done before it are committed before the error goes on,
    where cryptsetup leaves a header that describes none of them.
    """
    # ``none``: the header after the last whole zone, while there is one to commit
    done: list[dict[str, Any]] = []
    try:
        stopped = False
        while rh.progress < rh.device_size:
            if live is not None:
                # What the mount wrote meanwhile goes to the disk now, while it keeps
                # serving, not inside the hold: the zone's O_DIRECT read would write back
                # its part while the zone's readers and writers wait.
                live.flush()
            prepared = None
            if pipeline is not None:
                prepared = pipeline.take()
                here = _Zone(rh.data_offset_old + rh.offset, rh.length, rh.offset)
                if prepared is None or prepared.zone != here:  # pragma: no cover - a safety net
                    pipeline.close()  # it follows the same _update: never seen
                    pipeline = prepared = None
            hold = live.hold(rh.offset, rh.offset + rh.length) if live else contextlib.nullcontext()
            with hold:
                _step(dev, rh, prepared)
                if pipeline is not None and prepared is not None:
                    pipeline.release(prepared)
                _update(rh)
                last = rh.progress >= rh.device_size
                if live is not None:
                    extents = logical_extents(rh, container)
                if last:
                    done.clear()  # from here on the header is committed as it goes
                    if rh.protection.type == "none":
                        _commit_none(dev, rh)
                    _finish(dev, rh)
                elif rh.protection.type != "none":
                    _commit(dev, rh)
                else:
                    done[:] = [copy.deepcopy(rh.obj)]
                if live is not None:
                    live.update(extents)
            if progress is not None:
                progress(rh.progress, rh.device_size)
            if last:
                return RunResult(True, rh.progress, rh.device_size)
            if stop is not None and stop():
                stopped = True
                break
            if rh.length == 0:  # pragma: no cover - a safety net against a stuck context
                break
        done.clear()
        if rh.protection.type == "none":
            _commit_none(dev, rh)
        if not stopped and rh.progress >= rh.device_size:  # already done: only the finish was due
            _finish(dev, rh)
            return RunResult(True, rh.progress, rh.device_size)
        return RunResult(False, rh.progress, rh.device_size)
    except BaseException:
        if rh.protection.type == "none" and done:
            with contextlib.suppress(CryptfuseError, OSError):
                rh.obj = done[0]
                _commit_none(dev, rh)
        raise


@dataclass(frozen=True)
class ReencryptOptions:
    """``cryptsetup reencrypt`` options of a new (key-changing) reencryption."""

    cipher: str | None = None
    key_size: int | None = None  # bits
    sector_size: int | None = None
    resilience: str = "checksum"
    resilience_hash: str = "sha256"
    direction: str = "forward"
    #: bytes the data moves towards the end (``--reduce-device-size``): resilience
    #: ``datashift``, direction backward, the volume that much smaller
    shift: int = 0
    #: hash of the new volume key's digest and of the reencryption digest: that of
    #: the KDF options given (``--hash``, default sha256); None when the unlocking
    #: keyslot's KDF is reused (cryptsetup: its PBKDF2 hash, sha256 for Argon2)
    digest_hash: str | None = None
    #: those digests' PBKDF2 cost benchmarked (~125 ms) rather than 1000 iterations:
    #: cryptsetup benchmarks unless a keyslot's KDF is reused or the cost is forced
    benchmark_digests: bool = False
    #: ``--volume-key-file``: the new volume key is read from this file, not random
    volume_key_file: str | None = None
    #: a larger sector size is refused over a file system with smaller blocks
    #: (cryptsetup checks the active device; ``--force-offline-reencrypt`` skips it)
    check_filesystem: bool = True
    #: ``--hotzone-size`` of the run that follows: checked against the alignment first
    max_hotzone: int = 0


def initialize(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    options: ReencryptOptions,
    kdf: KdfParams,
    *,
    key_slot: int | None = None,
    af_hash: str | None = None,
    keys_out: dict[int, bytes] | None = None,
) -> int:
    """Start a reencryption to a new volume key (cryptsetup ``reencrypt --init-only``).

    Two commits, each leaving a container that opens: a new keyslot (same
    passphrase, new key) bound to a new digest but to no segment; then the
    backup segments, the reencrypt keyslot, its metadata digest and the
    requirement, all at once.  Returns the new keyslot.
    """
    with _opened(data_path, header_path) as dev:
        return initialize_on(
            Devices(dev.data_fd, dev.header_fd, header_path or data_path),
            passphrase,
            options,
            kdf,
            key_slot=key_slot,
            af_hash=af_hash,
            keys_out=keys_out,
        )


def initialize_on(
    devices: Devices,
    passphrase: bytes,
    options: ReencryptOptions,
    kdf: KdfParams,
    *,
    key_slot: int | None = None,
    af_hash: str | None = None,
    keys_out: dict[int, bytes] | None = None,
) -> int:
    """:func:`initialize` on descriptors the caller holds (the daemon: online).  With
    *keys_out*, the old and new volume keys by digest (for :func:`run` in the same
    process, which then need not run the keyslots' KDFs again)."""
    header = read_luks2_header(devices.header_fd, devices.path)
    if in_reencryption(header.json):
        raise UsageError("LUKS2 reencryption already initialized. Use --resume-only to continue.")
    header.check_requirements()
    seg, spec, bound = header.data_segment()
    _no_iv_tweak(seg)
    usable = [k for k in bound.keyslots if header.metadata.keyslots[k].type == "luks2"]
    if key_slot is None and len(usable) > 1:
        raise UsageError(
            "Key file can be used only with --key-slot or with exactly one key slot active."
        )
    slot, old_key = header.unlock(devices.header_fd, passphrase, key_slot)
    if options.resilience not in ("checksum", "journal", "none"):
        raise UsageError(f"Unsupported resilience mode {options.resilience}.")
    if options.direction not in ("forward", "backward"):
        raise UsageError(f"Unsupported reencryption direction {options.direction}.")
    shift = options.shift
    resilience, direction = options.resilience, options.direction
    if shift:  # cryptsetup: the data moves towards the end, from the end backwards
        resilience, direction = "datashift", "backward"
    cipher = options.cipher or str(seg.encryption)
    new_spec = parse_cipher_spec(cipher)
    # cryptsetup 2.6.1: the old key's size, unless a key size or another cipher is given
    # (then its default for that cipher's mode)
    key_bytes = len(old_key)
    if options.key_size:
        key_bytes = options.key_size // 8
    elif cipher != str(seg.encryption):
        key_bytes = default_key_bits(cipher) // 8
    check_key_size(new_spec, key_bytes, f"cipher {cipher}")
    new_ss = options.sector_size or int(seg.sector_size or SECTOR)
    if new_ss not in SECTOR_SIZES:
        raise UsageError("Unsupported encryption sector size.")
    old_ss = int(seg.sector_size or SECTOR)
    data_offset = seg.offset
    size = device_size(devices.data_fd) - data_offset
    if size <= 0:
        raise UsageError(f"Device {devices.path} has no data area to reencrypt.")
    check = max(old_ss, new_ss)
    data_size = seg.size if seg.size is not None else size
    if data_size % check:
        raise UsageError(f"Data device is not aligned to encryption sector size ({check} bytes).")
    if shift and (shift < 0 or shift % max(check, 4096) or seg.size is not None):
        raise UsageError(
            "Device size must be reduced by a multiple of 4096 bytes and of the sector size."
        )
    if shift and shift >= data_size:
        raise UsageError(f"Device {devices.path} is too small to be reduced by {shift} bytes.")
    area_end = 2 * header.binary.hdr_size + int(header.json["config"]["keyslots_size"])
    if shift and data_offset + shift < area_end:
        # (a detached header: LUKS2 keeps data clear of the keyslots area; cryptsetup
        # 2.6.1 starts this and then cannot commit a single hot zone)
        raise UsageError(
            f"The data would move to offset {data_offset + shift}, inside the header's "
            f"keyslots area (up to {area_end}): no LUKS2 header can describe that."
        )
    if resilience == "checksum":
        hashlib_name(options.resilience_hash)
    check_hotzone(options.max_hotzone, max(device_block_size(devices.data_fd), check))
    if new_ss > old_ss and options.check_filesystem:
        head = _pread(devices.data_fd, min(PROBE_HEAD, data_size), data_offset, "volume")
        plain = _segment_cipher(header.json["segments"]["0"], old_key).decrypt(bytes(head), 0)
        check_sector_size(probe_bytes(plain, data_size), new_ss, devices.path)
    writer = devices.writer()
    obj = writer.obj
    new_key = new_volume_key(options.volume_key_file, key_bytes)
    # 1. the new keyslot, bound to a new digest and no segment
    new_slot = writer.free_keyslot()
    if new_slot is None:
        raise CryptfuseError("All key slots full.")
    before = copy.deepcopy(obj)  # what a failed start goes back to
    digest_hash = options.digest_hash
    if digest_hash is None:
        old_kdf = header.metadata.keyslots[slot].kdf
        digest_hash = "sha256"
        if old_kdf is not None and old_kdf.type == "pbkdf2" and old_kdf.hash:
            digest_hash = str(old_kdf.hash)
    hashlib_name(digest_hash)
    if af_hash is None:  # cryptsetup: both are the hash of the KDF setting
        af_hash = digest_hash
    digest_cost = digest_iterations(digest_hash, key_bytes, options.benchmark_digests)
    new_digest = writer.add_digest(new_key, digest_hash, digest_cost)  # first free id
    # The new keyslot's area is encrypted as the unlocking keyslot's: same cipher and
    # same key size, whatever the new volume key's size (cryptsetup's set_keyslot_params;
    # cipher_null gives way to LUKS2's default keyslot encryption).
    old_area = obj["keyslots"][str(slot)]["area"]
    area_cipher, area_key_bytes = str(old_area["encryption"]), int(old_area["key_size"])
    if area_cipher.startswith("cipher_null"):
        area_cipher, area_key_bytes = KEYSLOT_CIPHER, KEYSLOT_KEY_BYTES
    writer.write_keyslot(
        new_slot,
        new_key,
        passphrase,
        kdf,
        luks_cipher_spec(area_cipher, "keyslot"),
        af_hash=af_hash,
        digest=new_digest,
        area_key_bytes=area_key_bytes,
    )
    writer.commit()
    new_area = obj["keyslots"][str(new_slot)]["area"]
    try:
        # tokens of the unlocking keyslot get the new one too, one commit each (cryptsetup's
        # assign_tokens): at the end the old keyslot leaves them
        for token_id in sorted(obj.get("tokens", {}), key=int):
            bound_to = obj["tokens"][token_id].get("keyslots")
            if (
                isinstance(bound_to, list)
                and str(slot) in bound_to
                and str(new_slot) not in bound_to
            ):
                bound_to.append(str(new_slot))
                writer.commit()
        # 2. everything else in one commit
        old_digest = bound.index
        segs = obj["segments"]
        old_seg = copy.deepcopy(segs["0"])
        old_seg["flags"] = ["backup-previous"]
        new_seg = crypt_segment(data_offset + shift, 0, None, str(new_spec), new_ss)
        new_seg["flags"] = ["backup-final"]
        segs["1"] = old_seg
        segs["2"] = new_seg
        obj["digests"][str(old_digest)]["segments"] = ["0", "1"]
        obj["digests"][new_digest]["segments"] = ["2"]
        _reencrypt_keyslot(
            writer,
            mode="reencrypt",
            direction=direction,
            resilience=resilience,
            hash_name=options.resilience_hash,
            block=max(device_block_size(devices.data_fd), check),
            shift=shift,
        )
        _require(obj, REQUIREMENT)
        writer.obj = rdigest.with_reencrypt_digest(
            obj,
            {old_digest: old_key, int(new_digest): new_key},
            hash_name=digest_hash,
            iterations=None if options.benchmark_digests else rdigest.MIN_ITERATIONS,
        )
        writer.commit()
    except CryptfuseError:
        # as cryptsetup destroys the keyslot it made when the start fails (the metadata
        # outgrew the JSON area, ...): the header back to what it was, the area wiped
        writer.obj = before
        writer.commit()
        wipe_area(devices.header_fd, int(new_area["offset"]), int(new_area["size"]), "keyslot")
        raise
    if keys_out is not None:
        keys_out.update({old_digest: old_key, int(new_digest): new_key})
    return new_slot


def _max_gap(writer: Luks2Writer) -> tuple[int, int] | None:
    """The largest free stretch of the keyslots area (``LUKS2_find_area_max_gap``)."""
    start = 2 * writer.hdr_size
    end = start + writer.keyslots_size
    used = sorted(
        (int(s["area"]["offset"]), int(s["area"]["size"])) for s in writer.obj["keyslots"].values()
    )
    best: tuple[int, int] | None = None
    position = start
    for offset, size in used + [(end, 0)]:
        if offset > position and (best is None or offset - position > best[1]):
            best = (position, offset - position)
        position = max(position, offset + size)
    return best


def _reencrypt_keyslot(
    writer: Luks2Writer,
    *,
    mode: str,
    direction: str,
    resilience: str,
    hash_name: str,
    block: int,
    shift: int = 0,
) -> int:
    """Add the ``reencrypt`` keyslot (cryptsetup's ``reenc_keyslot_alloc``) to the
    writer's metadata; returns its number.  Plain ``datashift`` needs no storage (a
    4 KiB first-fit area), the others the largest free gap of the keyslots area."""
    obj = writer.obj
    slot = writer.free_keyslot()
    if slot is None:
        raise CryptfuseError("All key slots full.")
    if resilience == "datashift":
        offset = writer.find_area(4096)
        gap = None if offset is None else (offset, 4096)
    else:
        gap = _max_gap(writer)
    if gap is None:
        raise CryptfuseError("No space for the reencryption keyslot area.")
    area: dict[str, Any] = {"offset": str(gap[0]), "size": str(gap[1]), "type": resilience}
    if resilience in ("checksum", "datashift-checksum"):
        hashlib_name(hash_name)
        area["hash"] = hash_name
        area["sector_size"] = block
    if resilience.startswith("datashift"):
        area["shift_size"] = str(shift)
    obj["keyslots"][str(slot)] = {
        "area": area,
        "type": "reencrypt",
        "key_size": 1,
        "mode": mode,
        "direction": direction,
        "priority": 0,
    }  # at the end of the JSON object, as cryptsetup adds it
    return slot


def _require(obj: dict[str, Any], requirement: str) -> None:
    reqs = obj["config"].setdefault("requirements", {})
    reqs["mandatory"] = [*reqs.get("mandatory", []), requirement]


def _flagged(seg: dict[str, Any], flag: str) -> dict[str, Any]:
    out = copy.deepcopy(seg)
    out["flags"] = [*out.get("flags", []), flag]
    return out


@dataclass(frozen=True)
class EncryptOptions:
    """``cryptsetup reencrypt --encrypt`` (a plaintext device becomes LUKS2)."""

    cipher: str = "aes-xts-plain64"
    key_size: int = 512  # bits
    sector_size: int = 512
    resilience: str = "checksum"
    resilience_hash: str = "sha256"
    #: bytes; the data offset in the device with a detached header (default 0)
    offset: int | None = None
    #: bytes (``--reduce-device-size``): header in the device, data moved by half of it
    reduce: int = 0
    hash: str = "sha256"
    uuid: str | None = None
    key_slot: int = 0
    #: luksFormat's header options (cryptsetup formats the new header with them)
    label: str = ""
    subsystem: str = ""
    metadata_size: int | None = None
    keyslots_size: int | None = None
    keyslot_cipher: str | None = None
    keyslot_key_bits: int | None = None
    #: the digests' PBKDF2 cost benchmarked (no --pbkdf-force-iterations), as
    #: :attr:`ReencryptOptions.benchmark_digests`
    benchmark_digests: bool = False
    #: ``--volume-key-file``: the new volume key is read from this file, not random
    volume_key_file: str | None = None
    #: ``--hotzone-size`` of the run that follows: checked against the alignment first
    max_hotzone: int = 0


def initialize_encrypt(
    data_path: str,
    header_path: str | None,
    passphrase: bytes,
    options: EncryptOptions,
    kdf: KdfParams,
    *,
    keys_out: dict[int, bytes] | None = None,
) -> int:
    """Start encrypting a plaintext device in place (``--init-only`` of ``--encrypt``).

    With a detached header (*header_path*, no reduction) the header file is written
    in one commit and the device is untouched until the run.  With
    ``options.reduce`` (header in the device) the first ``reduce/2`` bytes are first
    copied to the device's last ``reduce/2`` bytes (which the user gives up), made
    durable, and then the header is written over the start of the device: between
    those two, as with cryptsetup, the device is neither plaintext nor LUKS2 (its
    first chunk is intact in the copy at the end).  Returns the new keyslot.
    """
    check_data_offset(options.offset)
    if options.uuid is not None:
        check_uuid(options.uuid)  # before any file is made
    if options.max_hotzone and os.path.exists(data_path):
        with open(data_path, "rb") as data:
            block = device_block_size(data.fileno())
        check_hotzone(options.max_hotzone, max(block, options.sector_size))
    spec = parse_cipher_spec(options.cipher)
    if options.key_size % 8:
        raise UsageError("Key size must be a multiple of 8 bits.")
    key_bytes = options.key_size // 8
    spec.check_key_size(key_bytes)
    SectorCipher(spec, bytes(key_bytes))  # an unimplemented cipher is refused before writing
    ss = options.sector_size
    if ss not in SECTOR_SIZES:
        raise UsageError("Unsupported encryption sector size.")
    if options.resilience not in ("checksum", "journal", "none"):
        raise UsageError(f"Unsupported resilience mode {options.resilience}.")
    detached = header_path is not None
    if not detached and not options.reduce:
        raise UsageError(
            "Encryption without detached header (--header) is not possible without data "
            "device size reduction (--reduce-device-size)."
        )
    if detached and options.reduce:
        raise UnsupportedError("--reduce-device-size with a detached --header is not supported.")
    if options.reduce % (2 * SECTOR):
        raise UsageError("--reduce-device-size must be a multiple of 1024 bytes.")
    from .manage import KdfOptions, _has_luks, _keyslot_encryption, _locked

    area_spec, area_key_bytes = _keyslot_encryption(
        KdfOptions(
            keyslot_cipher=options.keyslot_cipher, keyslot_key_bits=options.keyslot_key_bits
        ),
        spec,
        luks2=True,
    )

    if detached:
        assert header_path is not None
        if not os.path.exists(header_path):
            fd = os.open(header_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
    with _locked(data_path, header_path, write=True) as h:
        if _has_luks(h.data_fd) or (detached and _has_luks(h.header_fd)):
            raise UsageError(
                f"Device {h.header_path if detached else data_path} already contains a LUKS "
                "header; refusing to encrypt it again."
            )
        if ss > SECTOR:  # (cryptsetup: when --sector-size is given)
            check_sector_size(probe_fd(h.data_fd), ss, data_path)
        total = device_size(h.data_fd)
        if detached:
            layout = luks2_layout(
                metadata_size=options.metadata_size,
                keyslots_size=options.keyslots_size,
                offset=options.offset,
                detached=True,
            )
            data_offset = layout.data_offset
            shift = 0
            data_size = total - data_offset
        else:
            shift = options.reduce // 2
            layout = luks2_layout(
                metadata_size=options.metadata_size,
                keyslots_size=options.keyslots_size,
                offset=shift,
                detached=False,
            )
            data_offset = shift
            data_size = total - options.reduce
        if data_size <= 0:
            raise UsageError(f"Device {data_path} is too small.")
        if data_size % max(ss, SECTOR):
            raise UsageError(f"Data device is not aligned to encryption sector size ({ss} bytes).")
        volume_key = new_volume_key(options.volume_key_file, key_bytes)
        obj = build_metadata(
            layout=layout,
            encryption=str(spec),
            sector_size=ss,
            volume_key=volume_key,
            digest_hash=options.hash,
            digest_iterations=digest_iterations(options.hash, key_bytes, options.benchmark_digests),
        )
        final = _flagged(crypt_segment(data_offset, 0, None, str(spec), ss), "backup-final")
        if shift:
            moved_at = total - data_offset
            first = min(shift, data_size)
            live = [linear_segment(moved_at, first)]
            if data_size > shift:
                live.append(linear_segment(shift, data_size - shift))
            segs = [
                *live,
                _flagged(live[0], "backup-moved-segment"),
                _flagged(linear_segment(0, data_size), "backup-previous"),
                final,
            ]
        else:
            live = [linear_segment(data_offset, None)]
            segs = [*live, _flagged(linear_segment(data_offset, None), "backup-previous"), final]
        obj["segments"] = {str(i): seg for i, seg in enumerate(segs)}
        obj["digests"]["0"]["segments"] = [str(len(segs) - 1)]
        writer = Luks2Writer.new(  # cryptsetup formats (epoch 3), then starts (4)
            h.header_fd,
            obj,
            layout,
            label=options.label,
            subsystem=options.subsystem,
            uuid=options.uuid,
            epoch=FORMAT_EPOCH + 1,
        )
        resilience = "datashift" if shift else options.resilience
        rslot_hint = options.key_slot
        if not 0 <= rslot_hint < 32:
            raise UsageError(f"Key slot {rslot_hint} is invalid.")
        metadata_end = 2 * layout.metadata_size + layout.keyslots_size
        if shift:
            # 1. the first chunk goes where the device gives up space, durably
            chunk = pread_exact(h.data_fd, first, 0, "first data chunk")
            pwrite_all(h.data_fd, chunk, moved_at, "moved first data chunk")
            sync(h.data_fd)
        elif device_size(h.header_fd) < metadata_end:
            os.ftruncate(h.header_fd, metadata_end)
        # 2. a clean metadata area (on the device: the moved chunk's old place)
        pwrite_all(h.header_fd, bytes(metadata_end), 0, "LUKS2 metadata area")
        sync(h.header_fd)
        writer.write_keyslot(
            rslot_hint,
            volume_key,
            passphrase,
            kdf,
            area_spec,
            af_hash=options.hash,
            digest="0",
            area_key_bytes=area_key_bytes,
        )
        _reencrypt_keyslot(
            writer,
            mode="encrypt",
            direction="backward" if shift else "forward",
            resilience=resilience,
            hash_name=options.resilience_hash,
            block=max(device_block_size(h.data_fd), ss),
            shift=shift,
        )
        _require(writer.obj, REQUIREMENT)
        writer.obj = rdigest.with_reencrypt_digest(
            writer.obj,
            {0: volume_key},
            hash_name=options.hash,
            iterations=None if options.benchmark_digests else rdigest.MIN_ITERATIONS,
        )
        # 3. one commit: from here the device is LUKS2 in reencryption
        writer.commit()
        if keys_out is not None:
            keys_out[0] = volume_key
        return rslot_hint


def _check_decrypt_hotzone(data_fd: int, seg: Segment, max_hotzone: int) -> None:
    """:func:`check_hotzone` for a decryption of *seg*, before anything is written."""
    check_hotzone(max_hotzone, max(device_block_size(data_fd), int(seg.sector_size or SECTOR)))


def initialize_decrypt(
    data_path: str,
    header_path: str,
    passphrase: bytes,
    *,
    key_slot: int | None = None,
    resilience: str = "checksum",
    resilience_hash: str = "sha256",
    max_hotzone: int = 0,
    keys_out: dict[int, bytes] | None = None,
) -> None:
    """Start decrypting a LUKS2 container in place (``--decrypt --header FILE``).

    *header_path* an existing detached header (data offset 0): decrypted backward
    in place with *resilience*.  Otherwise (cryptsetup 2.6's ``online-reencrypt-v3``)
    the header in the device is exported to the new file *header_path* first (made
    durable), the device's header signatures are wiped (the container then opens
    with ``--header``), the first data chunk (ciphertext) is copied to the start of
    the device, and one commit of the exported header starts the decryption, which
    moves the data back by the old data offset and decrypts that chunk last.
    """
    from .manage import _locked

    if os.path.exists(header_path) and not os.path.samefile(header_path, data_path):
        with _locked(data_path, header_path, write=True) as h:
            header = read_luks2_header(h.header_fd, header_path)
            if in_reencryption(header.json):
                raise UsageError(
                    "LUKS2 reencryption already initialized. Use --resume-only to continue."
                )
            seg, _, bound = header.data_segment()
            _no_iv_tweak(seg)
            _check_decrypt_hotzone(h.data_fd, seg, max_hotzone)
            if seg.offset:
                # an exported header whose decryption did not start yet (interrupted
                # initialization, or a detached header with a data offset): move the
                # data back by the offset, as after the export
                _, old_key = header.unlock(h.header_fd, passphrase, key_slot)
                if keys_out is not None:
                    keys_out[bound.index] = old_key
                _decrypt_shift_init(
                    h.data_fd,
                    h.header_fd,
                    header_path,
                    header,
                    old_key,
                    max_hotzone,
                    resilience_hash,
                    wipe=header.binary.hdr_size,
                    resilience=resilience,
                )
                return
            _, old_key = header.unlock(h.header_fd, passphrase, key_slot)
            if keys_out is not None:
                keys_out[bound.index] = old_key
            writer = Luks2Writer.from_header(h.header_fd, header)
            obj = writer.obj
            obj["segments"]["1"] = _flagged(obj["segments"]["0"], "backup-previous")
            obj["segments"]["2"] = _flagged(linear_segment(0, None), "backup-final")
            obj["digests"][str(bound.index)]["segments"] = ["0", "1"]
            if resilience not in ("checksum", "journal", "none"):
                raise UsageError(f"Unsupported resilience mode {resilience}.")
            _reencrypt_keyslot(
                writer,
                mode="decrypt",
                direction="backward",
                resilience=resilience,
                hash_name=resilience_hash,
                block=max(device_block_size(h.data_fd), int(seg.sector_size or SECTOR)),
            )
            _require(obj, REQUIREMENT)
            writer.obj = rdigest.with_reencrypt_digest(  # (cryptsetup: sha256, benchmarked)
                obj, {bound.index: old_key}, iterations=None
            )
            writer.commit()
        return
    if os.path.exists(header_path):
        raise UsageError("LUKS2 decryption requires a detached header (--header FILE).")
    with _locked(data_path, None, write=True) as h:
        header = read_luks2_header(h.data_fd, data_path)
        if in_reencryption(header.json):
            raise UsageError(
                "LUKS2 reencryption already initialized. Use --resume-only to continue."
            )
        seg, _, bound = header.data_segment()
        _no_iv_tweak(seg)
        _check_decrypt_hotzone(h.data_fd, seg, max_hotzone)
        _, old_key = header.unlock(h.data_fd, passphrase, key_slot)
        if keys_out is not None:
            keys_out[bound.index] = old_key
        if seg.offset <= 0 or device_size(h.data_fd) <= seg.offset:
            raise UsageError(f"Device {data_path} has no header area to move the data into.")
        resilience_area_type("datashift-checksum", resilience)  # refused before writing
        # 1. export the header (and keyslots) to the new file, durably
        size = header.hdr_and_areas_size
        fd = os.open(header_path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            pwrite_all(fd, pread_exact(h.data_fd, size, 0, "LUKS2 header"), 0, "header file")
            sync(fd)
            exported = read_luks2_header(fd, header_path)
            _decrypt_shift_init(
                h.data_fd,
                fd,
                header_path,
                exported,
                old_key,
                max_hotzone,
                resilience_hash,
                wipe=header.binary.hdr_size,
                resilience=resilience,
            )
        finally:
            os.close(fd)


def _decrypt_shift_init(
    data_fd: int,
    header_fd: int,
    header_path: str,
    header: LUKS2Header,
    old_key: bytes,
    max_hotzone: int,
    resilience_hash: str,
    *,
    wipe: int,
    resilience: str = "checksum",
) -> None:
    """The decryption that moves the data back by the data offset (``online-reencrypt-v3``),
    from a detached (exported) header: wipe the device's own header signatures (at 0 and
    *wipe*), copy the first chunk of ciphertext to the start, then one commit."""
    area_type = resilience_area_type("datashift-checksum", resilience)
    seg, _, bound = header.data_segment()
    shift = seg.offset
    data_size = device_size(data_fd) - shift
    if data_size <= 0:
        raise UsageError("The device has no data after the data offset.")
    moved = max_hotzone or min(shift, NONE_HOTZONE)
    moved = min(moved, shift, data_size)
    ss = int(seg.sector_size or SECTOR)
    block = max(device_block_size(data_fd), ss)
    if moved < data_size:  # all of a data area off the block grid moves as it is (cryptsetup)
        moved -= moved % block
    if moved <= 0:
        raise UsageError("Moved segment size is too small.")
    writer = Luks2Writer.from_header(header_fd, header)
    obj = writer.obj
    enc = str(obj["segments"]["0"]["encryption"])
    live = [crypt_segment(0, 0, moved, enc, ss)]
    if data_size > moved:
        live.append(crypt_segment(shift + moved, moved // SECTOR, None, enc, ss))
    segs = [
        *live,
        _flagged(live[0], "backup-moved-segment"),
        _flagged(crypt_segment(shift, 0, None, enc, ss), "backup-previous"),
        _flagged(linear_segment(0, None), "backup-final"),
    ]
    obj["segments"] = {str(i): x for i, x in enumerate(segs)}
    obj["digests"][str(bound.index)]["segments"] = [
        str(i) for i, x in enumerate(segs) if x["type"] == "crypt"
    ]
    rslot = _reencrypt_keyslot(
        writer,
        mode="decrypt",
        direction="forward",
        resilience=area_type,
        hash_name=resilience_hash,
        block=block,
        shift=shift,
    )
    area = obj["keyslots"][str(rslot)]["area"]
    capacity = _area_capacity(int(area["size"]), area.get("hash"), block)
    if moved > capacity:
        raise UsageError(
            f"Moved segment too large. Requested size {moved}, available space for: {capacity}."
        )
    _require(obj, "online-reencrypt-v3")
    writer.obj = rdigest.with_reencrypt_digest(  # (cryptsetup: sha256, benchmarked)
        obj, {bound.index: old_key}, iterations=None
    )
    # 2. the device stops being LUKS (the exported header opens it meanwhile)
    for offset in (0, wipe):  # again after an interrupted initialization: harmless
        pwrite_all(data_fd, bytes(BIN_HEADER), offset, "header signature wipe")
    sync(data_fd)
    # 3. the first chunk of ciphertext to the start, then the one commit
    chunk = pread_exact(data_fd, moved, shift, "first data chunk")
    pwrite_all(data_fd, chunk, 0, "moved first data chunk")
    sync(data_fd)
    writer.commit()


BIN_HEADER = 4096


def _no_iv_tweak(seg: Any) -> None:
    """cryptsetup 2.6.1 builds every reencryption segment from IV offset 0 (its own
    ``TODO: + old iv_tweak``), so a segment whose IVs start elsewhere (a plain container
    with ``--skip`` given a header) would be reencrypted with wrong IVs: refused."""
    if seg.iv_tweak:
        raise UnsupportedError(
            f"The data segment's IVs start at sector {seg.iv_tweak}, not 0; neither cryptsetup "
            "2.6 nor cryptfuse can reencrypt such a segment correctly."
        )


def open_reencryption(
    header: LUKS2Header,
    data_fd: int,
    header_fd: int,
    passphrase: bytes,
    key_slot: int | None,
    container_size: int,
    keys: dict[int, bytes] | None = None,
) -> tuple[list[Extent], int, bool]:
    """The extents of a container in reencryption, without writing anything.

    Returns (extents, volume size, crashed); an interrupted hot zone is served
    from its recovered state, worked out in memory.
    """
    _check_version(header.json)
    rh = Reencryption.from_json(copy.deepcopy(header.json))
    unlock(header, header_fd, rh, passphrase, key_slot, keys)
    if keys is not None:  # handed back: the caller's next step need not unlock again
        keys.update(rh.keys)
    crashed = rh.crashed()
    hot: list[Extent] | None = None
    if crashed:
        _context(rh, data_fd, container_size, 0, crashed=True)
        hot = recovered_extents(rh, data_fd, header_fd)
    extents = logical_extents(rh, container_size, hot)
    size = sum(e.length for e in extents)
    return extents, size, crashed
