"""LUKS container management: format, keyslots, dump, header backup, UUID.

The operations behind ``cryptfuse format``, ``add-key``, ``remove-key``,
``change-key``, ``kill-slot``, ``dump``, ``header-backup``, ``header-restore``,
``uuid`` and ``is-luks`` (cryptsetup's ``luksFormat``, ``luksAddKey``, ...).

Every change runs with the container locked exclusively (``flock``, the lock
a writable mount holds, so a mounted container is refused with
:class:`BusyError`), and every input is checked -- passphrase, keyslot
number, free space, cipher -- before the first byte is written.  Questions for
the user (confirmations) are callbacks, so this module stays free of terminal
I/O; the command line lives in :mod:`cryptfuse.cli_luks`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import (
    CryptfuseError,
    DeviceError,
    FormatError,
    KeyFileError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..kdf import available_memory_kib, hash_size
from ..sector import SECTOR_SIZES, SectorCipher
from ..spec import CipherSpec, parse_cipher_spec
from ..volume import Volume, device_size, open_device, optimal_sector_size
from . import LUKS_MAGIC, detect_type
from .luks1 import HEADER_SIZE as LUKS1_HEADER_SIZE
from .luks1 import NUM_KEYSLOTS as LUKS1_SLOTS
from .luks1 import LUKS1Header, read_luks1_header, repaired_luks1_header
from .luks1_write import (
    clear_keyslot,
    derive_keyslot_key,
    format_luks1,
    luks1_layout,
    set_keyslot,
    write_uuid,
)
from .luks2 import (
    BIN_HEADER_SIZE,
    PRIORITY_HIGH,
    PRIORITY_IGNORE,
    REENCRYPT_REQUIREMENTS,
    LUKS2Header,
    _is_backup,
    read_luks2_header,
    validate_metadata,
)
from .luks2 import NUM_KEYSLOTS as LUKS2_SLOTS
from .luks2_token import KEYRING, atoi, keyring_token_valid
from .luks2_write import (
    ALIGNMENT as LUKS2_ALIGNMENT,
)
from .luks2_write import (
    KEYSLOT_CIPHER,
    KEYSLOT_KEY_BYTES,
    Luks2Writer,
    build_metadata,
    luks2_layout,
    serialize_copy,
    serialize_json,
)
from .luks_common import check_uuid, luks_cipher_spec, pread_exact
from .luks_write import (
    ARGON2_LIMIT_MEMORY_KIB,
    ARGON2_MAX_MEMORY_KIB,
    ARGON2_MAX_PARALLEL,
    ARGON2_MIN_MEMORY_KIB,
    PBKDF2_MIN_ITERATIONS,
    KdfParams,
    Progress,
    benchmark_kdf,
    check_data_offset,
    digest_iterations,
    pwrite_all,
    sync,
    wipe_area,
)
from .volume_key import new_volume_key, volume_key_from_file, volume_key_length

log = logging.getLogger(__name__)

__all__ = [
    "Confirm",
    "FormatOptions",
    "KdfOptions",
    "add_key",
    "change_key",
    "dump",
    "dump_volume_key",
    "format_container",
    "get_uuid",
    "header_backup",
    "repair_header",
    "header_restore",
    "is_luks",
    "kill_slot",
    "remove_key",
    "resolve_kdf",
    "persistent_flags",
    "set_persistent_flags",
    "set_uuid",
]

#: ``confirm(message) -> bool``: ask the user (or decide for them in batch mode)
Confirm = Callable[[str], bool]

DEFAULT_CIPHER = "aes-xts-plain64"
DEFAULT_KEY_BITS = 512
DEFAULT_HASH = "sha256"
DEFAULT_ITER_TIME_MS = 2000


@dataclass(frozen=True)
class KdfOptions:
    """cryptsetup's PBKDF options; None means "the default for this LUKS version"."""

    pbkdf: str | None = None
    hash: str | None = None
    iter_time: int | None = None
    memory_kib: int | None = None
    parallel: int | None = None
    force_iterations: int | None = None
    #: ``--keyslot-cipher`` / ``--keyslot-key-size`` (bits): a new LUKS2 keyslot's area
    #: encryption (default: the data segment's cipher with the volume key's size)
    keyslot_cipher: str | None = None
    keyslot_key_bits: int | None = None


def resolve_kdf(
    opts: KdfOptions,
    luks_type: str,
    key_bytes: int,
    hash_name: str,
    progress: Progress | None = None,
) -> KdfParams:
    """The keyslot KDF costs: forced ones as given, otherwise benchmarked."""
    kind = opts.pbkdf or ("pbkdf2" if luks_type == "luks1" else "argon2id")
    if kind not in ("pbkdf2", "argon2i", "argon2id"):
        raise UsageError(f"Unknown PBKDF type {kind}.")
    if luks_type == "luks1" and kind != "pbkdf2":
        raise UsageError(f"PBKDF {kind} cannot be used with LUKS1 (pbkdf2 only).")
    hash_size(hash_name)  # an unknown hash is refused before anything else
    # As cryptsetup 2.6.1: --pbkdf-memory and --pbkdf-parallel are ignored for pbkdf2, 0
    # means the default; threads are capped at 4 and at the CPUs online (no error); the
    # memory must be at most 4 GiB (and at least 32 KiB when forced).
    memory_kib = opts.memory_kib or None
    parallel = min(opts.parallel or ARGON2_MAX_PARALLEL, ARGON2_MAX_PARALLEL, os.cpu_count() or 1)
    if kind != "pbkdf2" and memory_kib is not None and memory_kib > ARGON2_LIMIT_MEMORY_KIB:
        raise UsageError(
            "Requested maximum PBKDF memory cost is too high "
            f"(maximum is {ARGON2_LIMIT_MEMORY_KIB} kilobytes)."
        )
    if opts.force_iterations is not None:
        if kind == "pbkdf2":
            if opts.force_iterations < PBKDF2_MIN_ITERATIONS:
                raise UsageError(
                    "Forced iteration count is too low for pbkdf2 "
                    f"(minimum is {PBKDF2_MIN_ITERATIONS})."
                )
            return KdfParams("pbkdf2", hash_name, opts.force_iterations)
        if opts.force_iterations < 4:
            raise UsageError(f"Forced iteration count is too low for {kind} (minimum is 4).")
        memory = memory_kib if memory_kib is not None else ARGON2_MAX_MEMORY_KIB
        if memory < ARGON2_MIN_MEMORY_KIB:
            raise UsageError(
                f"Forced memory cost is too low for {kind} "
                f"(minimum is {ARGON2_MIN_MEMORY_KIB} kilobytes)."
            )
        memory = min(memory, max(ARGON2_MIN_MEMORY_KIB, available_memory_kib() // 2))
        return KdfParams(kind, hash_name, opts.force_iterations, memory, parallel)
    iter_time = opts.iter_time if opts.iter_time is not None else DEFAULT_ITER_TIME_MS
    return benchmark_kdf(
        kind,
        hash_name,
        iter_time,
        key_bytes,
        max_memory_kib=memory_kib,
        parallel=parallel,
        progress=progress,
    )


# -- opening for a change ------------------------------------------------------------------


@dataclass
class _Handle:
    """Locked descriptors: the data container and the header (the same unless detached)."""

    data_fd: int
    header_fd: int
    data_path: str
    header_path: str


@contextmanager
def _locked(path: str, header: str | None, *, write: bool) -> Iterator[_Handle]:
    """Open the container (and a detached header) for a metadata change, locked
    exclusively; or, for reading, unlocked (``luksDump`` works on a mounted device)."""
    detached = header is not None and not (
        os.path.exists(header) and os.path.exists(path) and os.path.samefile(header, path)
    )
    fds: list[int] = []
    try:
        data_fd = open_device(path, not write, lock=write)
        fds.append(data_fd)
        header_fd = data_fd
        if detached:
            assert header is not None
            header_fd = open_device(header, not write, lock=write)
            fds.append(header_fd)
        yield _Handle(data_fd, header_fd, path, header if detached and header else path)
    finally:
        for fd in fds:
            os.close(fd)


def _luks_type(fd: int, path: str) -> str:
    head = os.pread(fd, 8, 0)
    if len(head) < 8 or head[:6] != b"LUKS\xba\xbe":
        raise FormatError(f"Device {path} is not a valid LUKS device.")
    version = int.from_bytes(head[6:8], "big")
    if version not in (1, 2):
        raise FormatError(f"Device {path} has an unsupported LUKS version {version}.")
    return f"luks{version}"


def _read(h: _Handle) -> LUKS1Header | LUKS2Header:
    kind = _luks_type(h.header_fd, h.header_path)
    if kind == "luks1":
        return read_luks1_header(h.header_fd, h.header_path)
    return read_luks2_header(h.header_fd, h.header_path)


def _unlock(
    h: _Handle, hdr: LUKS1Header | LUKS2Header, passphrase: bytes, key_slot: int | None = None
) -> tuple[int, bytes]:
    if isinstance(hdr, LUKS1Header):
        return hdr.unlock(h.header_fd, passphrase, key_slot)
    return hdr.unlock(h.header_fd, passphrase, key_slot)


def _active_slots(hdr: LUKS1Header | LUKS2Header) -> list[int]:
    if isinstance(hdr, LUKS1Header):
        return [s.index for s in hdr.keyslots if s.enabled]
    return sorted(hdr.metadata.keyslots)


def _check_slot_number(hdr: LUKS1Header | LUKS2Header, slot: int) -> None:
    limit = LUKS1_SLOTS if isinstance(hdr, LUKS1Header) else LUKS2_SLOTS
    if not 0 <= slot < limit:
        raise UsageError(f"Key slot {slot} is invalid (slots are 0-{limit - 1}).")


# -- format ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatOptions:
    """``cryptfuse format`` options (cryptsetup 2.6 defaults); sizes as documented per field."""

    type: str = "luks2"
    cipher: str = DEFAULT_CIPHER
    key_size: int = DEFAULT_KEY_BITS  # bits
    hash: str = DEFAULT_HASH
    sector_size: int | None = None  # bytes; None: the optimal one when aligned (LUKS2), 512
    kdf: KdfOptions = KdfOptions()
    label: str = ""
    subsystem: str = ""
    uuid: str | None = None
    header: str | None = None  # detached header file
    offset: int | None = None  # data offset, 512-byte sectors (0: the default, as None)
    #: ``--volume-key-file``: the volume key is read from this file (not random)
    volume_key_file: str | None = None
    #: ``--align-payload``, 512-byte sectors: the data offset is rounded up to a multiple
    #: of it instead of 1 MiB (with a detached header it is the data offset itself)
    align_payload: int | None = None
    metadata_size: int | None = None  # LUKS2, bytes
    keyslots_size: int | None = None  # LUKS2, bytes
    key_slot: int | None = None
    size: int | None = None  # bytes: create the container with this size if it is missing
    wipe: bool = False


def _check_uuid(text: str | None) -> str | None:
    return None if text is None else check_uuid(text)


def _prepare_file(path: str, size: int | None, what: str) -> None:
    """Create *path* with *size* bytes when it is missing (and *size* is given)."""
    if os.path.exists(path):
        if (
            size is not None
            and not stat.S_ISBLK(os.stat(path).st_mode)
            and os.path.getsize(path) != size
        ):
            raise UsageError(f"--size is for creating a new container; {path} exists already.")
        return
    if size is None:
        raise DeviceError(f"Device {path} does not exist (use --size BYTES to create it).")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DeviceError(f"Cannot create {what} {path}: {exc.strerror}.") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _has_luks(fd: int) -> bool:
    try:
        return pread_exact(fd, 6, 0, "magic") in (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
    except DeviceError:
        return False


def format_container(
    path: str,
    passphrase: bytes,
    opts: FormatOptions,
    *,
    confirm: Confirm,
    confirm_format: Confirm | None = None,
    progress: Progress | None = None,
) -> str:
    """Format *path* as LUKS1/LUKS2 with one keyslot for *passphrase*; return the UUID.

    *confirm* is asked before an existing LUKS header is overwritten,
    *confirm_format* before anything else is (cryptsetup asks both unless in
    batch mode); refusing raises :class:`CryptfuseError`.
    """
    if opts.type not in ("luks1", "luks2", "luks"):
        raise UsageError(f"Unknown LUKS type {opts.type!r} (luks1 or luks2).")
    luks_type = "luks1" if opts.type == "luks1" else "luks2"
    if opts.offset and opts.align_payload:
        raise UsageError("Options --align-payload and --offset cannot be combined.")
    check_data_offset(opts.offset * 512 if opts.offset else None)
    spec = parse_cipher_spec(opts.cipher)
    if opts.key_size % 8:
        raise UsageError("Key size must be a multiple of 8 bits.")
    key_bytes = opts.key_size // 8
    spec.check_key_size(key_bytes)
    SectorCipher(
        spec, bytes(key_bytes)
    )  # an unimplemented cipher is refused now, not after writing
    hash_size(opts.hash)
    area_spec, area_key = _keyslot_encryption(opts.kdf, spec, luks2=luks_type == "luks2")
    new_uuid = _check_uuid(opts.uuid)
    if opts.label and luks_type == "luks1" or opts.subsystem and luks_type == "luks1":
        raise UsageError("Label and subsystem are only supported for LUKS2.")
    if opts.sector_size is not None:
        if opts.sector_size not in SECTOR_SIZES:
            raise UsageError(f"Unsupported encryption sector size {opts.sector_size}.")
        if luks_type == "luks1" and opts.sector_size != 512:
            raise UsageError("Unsupported encryption sector size (LUKS1 supports 512 only).")
    if opts.key_slot is not None and not 0 <= opts.key_slot < (
        LUKS1_SLOTS if luks_type == "luks1" else LUKS2_SLOTS
    ):
        raise UsageError(f"Key slot {opts.key_slot} is invalid.")
    volume_key = new_volume_key(opts.volume_key_file, key_bytes)  # before anything is written
    detached = opts.header is not None
    # cryptsetup: an offset of 0 is no offset; --align-payload under a detached header
    # is the data offset, elsewhere the alignment the offset is rounded up to
    offset = opts.offset or (opts.align_payload if detached else None) or None
    align = None if detached else opts.align_payload or None

    _prepare_file(path, opts.size, "container")
    if detached:
        assert opts.header is not None
        if not os.path.exists(opts.header):
            _prepare_file(opts.header, 0, "header file")

    with _locked(path, opts.header, write=True) as h:
        if _has_luks(h.header_fd):
            if not confirm(
                f"WARNING: Device {h.header_path} already contains a 'crypto_LUKS' "
                "superblock signature."
            ):
                raise CryptfuseError(
                    f"Device {h.header_path} already contains a LUKS header; not overwritten "
                    "(use --force or -q, or answer YES)."
                )
        elif confirm_format is not None and not confirm_format(
            f"This will overwrite data on {h.header_path} irrevocably."
        ):
            raise CryptfuseError("Operation aborted.")
        kdf = resolve_kdf(opts.kdf, luks_type, key_bytes, opts.hash, progress)
        data_size = device_size(h.data_fd)
        if luks_type == "luks1":
            layout1 = luks1_layout(key_bytes, offset=offset, detached=detached, align=align)
            data_offset = layout1.payload_offset * 512
            if not detached and data_size <= data_offset:
                raise DeviceError(
                    f"Device {path} is too small. "
                    f"(LUKS1 requires at least {data_offset + 512} bytes.)"
                )
            if detached and device_size(h.header_fd) < layout1.end_of_keyslots * 512:
                os.ftruncate(h.header_fd, layout1.end_of_keyslots * 512)
            # LUKS1 stores "aes" and "xts-plain64" apart.
            name, _, mode = str(spec).partition("-")
            header1 = format_luks1(
                h.header_fd,
                cipher_name=name,
                cipher_mode=mode,
                hash_spec=opts.hash,
                volume_key=volume_key,
                layout=layout1,
                mk_iterations=digest_iterations(
                    opts.hash, len(volume_key), benchmark=opts.kdf.force_iterations is None
                ),
                uuid=new_uuid,
            )
            slot = opts.key_slot if opts.key_slot is not None else 0
            header1 = set_keyslot(h.header_fd, header1, slot, volume_key, passphrase, kdf)
            sector_size = 512
            result_uuid = header1.uuid
        else:
            layout2 = luks2_layout(
                metadata_size=opts.metadata_size,
                keyslots_size=opts.keyslots_size,
                offset=offset * 512 if offset is not None else None,
                detached=detached,
                alignment=align * 512 if align is not None else None,
            )
            if opts.keyslots_size is not None and layout2.keyslots_size != opts.keyslots_size:
                log.warning(
                    "WARNING: LUKS2 keyslots area size changed to %d bytes.",
                    layout2.keyslots_size,
                )
            data_offset = layout2.data_offset
            if not detached and data_size <= data_offset:
                raise DeviceError(
                    f"Device {path} is too small. "
                    f"(LUKS2 requires at least {data_offset + 4096} bytes.)"
                )
            if data_size < data_offset:
                raise DeviceError(f"Device {path} is smaller than the data offset {data_offset}.")
            if opts.sector_size is not None:
                sector_size = opts.sector_size
            else:
                # the device's optimal sector size (4096 for a file), unless cryptsetup
                # 2.6.1's autodetection falls back to 512: an explicit data offset (in
                # 512-byte sectors: MISALIGNED(cd->data_offset, sector_size), so 4096
                # bytes only where it is a multiple of 2 MiB), or the device size less
                # the required alignment (--align-payload, else 1 MiB; under a detached
                # header --align-payload or nothing), off that size.  A data area that
                # then does not fit the size is refused below, as by cryptsetup.
                optimal = optimal_sector_size(h.data_fd)
                if detached:
                    required = (opts.align_payload or 0) * 512
                else:
                    required = align * 512 if align else LUKS2_ALIGNMENT
                sector_size = optimal
                if offset is not None and offset % optimal:
                    sector_size = 512
                elif (data_size - required) % optimal or data_size <= data_offset:
                    sector_size = 512
            if data_offset % sector_size or (data_size - data_offset) % sector_size:
                raise UsageError(
                    "Device size and data offset must be aligned to the "
                    f"{sector_size}-byte sector size."
                )
            metadata_end = 2 * layout2.metadata_size + layout2.keyslots_size
            obj = build_metadata(
                layout=layout2,
                encryption=str(spec),
                sector_size=sector_size,
                volume_key=volume_key,
                digest_hash=opts.hash,
                digest_iterations=digest_iterations(
                    opts.hash, len(volume_key), benchmark=opts.kdf.force_iterations is None
                ),
            )
            writer = Luks2Writer.new(
                h.header_fd, obj, layout2, label=opts.label, subsystem=opts.subsystem, uuid=new_uuid
            )
            if detached and device_size(h.header_fd) < metadata_end:
                os.ftruncate(h.header_fd, metadata_end)
            # Zero the whole metadata area first: no stale header copy or keyslot survives.
            pwrite_all(h.header_fd, bytes(metadata_end), 0, "LUKS2 metadata area")
            sync(h.header_fd)
            slot = opts.key_slot if opts.key_slot is not None else 0
            writer.write_keyslot(
                slot,
                volume_key,
                passphrase,
                kdf,
                area_spec,
                af_hash=opts.hash,
                area_key_bytes=area_key,
            )
            writer.commit()
            result_uuid = writer.uuid
        if opts.wipe:
            _wipe_data(h.data_fd, spec, volume_key, sector_size, data_offset, progress)
    return result_uuid


def _wipe_data(
    fd: int, spec: CipherSpec, key: bytes, sector_size: int, offset: int, progress: Progress | None
) -> None:
    """Write encrypted zeros over the whole data area (``--wipe``)."""
    size = (device_size(fd) - offset) // sector_size * sector_size
    volume = Volume(os.dup(fd), SectorCipher(spec, key, sector_size), offset, size)
    chunk = 4 * 1024 * 1024
    zeros = bytes(chunk)
    try:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            volume.write(done, zeros[:n])
            done += n
            if progress:
                progress("Wiping data area", done / size)
    finally:
        volume.close()


# -- keyslots --------------------------------------------------------------------------------


def _keyslot_encryption(
    kdf: KdfOptions, default: CipherSpec, luks2: bool
) -> tuple[CipherSpec, int | None]:
    """The cipher of a new keyslot's area and its key size in bytes (None: the volume
    key's): *default* unless ``--keyslot-cipher`` and ``--keyslot-key-size`` say
    otherwise (both or neither, LUKS2 only, as cryptsetup demands)."""
    if (kdf.keyslot_cipher is None) != (kdf.keyslot_key_bits is None):
        raise UsageError("Options --keyslot-cipher and --keyslot-key-size must be used together.")
    if kdf.keyslot_cipher is None or kdf.keyslot_key_bits is None:
        return default, None
    if not luks2:
        raise UsageError("Keyslot encryption parameters can be set only for LUKS2 device.")
    if kdf.keyslot_key_bits <= 0 or kdf.keyslot_key_bits % 8:
        raise UsageError("Key size must be a multiple of 8 bits")
    spec = luks_cipher_spec(kdf.keyslot_cipher, "keyslot cipher")
    if spec.cipher == "cipher_null":
        raise UsageError(f"Cipher {kdf.keyslot_cipher} cannot encrypt a keyslot.")
    try:
        spec.check_key_size(kdf.keyslot_key_bits // 8)
    except UsageError as exc:
        raise UsageError(
            f"Cannot use {kdf.keyslot_cipher} cipher for keyslot encryption ({exc})."
        ) from None
    return spec, kdf.keyslot_key_bits // 8


def _luks2_area_spec(hdr: LUKS2Header, kdf: KdfOptions) -> tuple[CipherSpec, int | None]:
    _, spec, _ = hdr.data_segment()
    return _keyslot_encryption(kdf, spec, luks2=True)


def _area_and_digest(
    hdr: LUKS2Header, slot: int, area: tuple[CipherSpec, int | None]
) -> tuple[tuple[CipherSpec, int | None], str | None]:
    """For a keyslot stored again (change-key, convert-key): its digest when that is not
    the data segment's (an unbound keyslot), whose area is then encrypted under a key
    as long as the volume key, as a new unbound keyslot's is."""
    _, _, bound = hdr.data_segment()
    if slot in bound.keyslots:
        return area, None
    digest = next(k for k, d in hdr.json["digests"].items() if str(slot) in d["keyslots"])
    return _unbound_area(hdr, area), digest


def _unbound_area(
    hdr: LUKS2Header, area: tuple[CipherSpec, int | None]
) -> tuple[CipherSpec, int | None]:
    """An unbound keyslot's area encryption: as given (``--keyslot-cipher``), else the
    segment cipher under a key as long as the volume key, else (no keyslot left to
    tell that length) LUKS2's default keyslot encryption, as cryptsetup falls back."""
    if area[1] is not None:
        return area
    try:
        return area[0], volume_key_length(hdr)
    except FormatError:
        return luks_cipher_spec(KEYSLOT_CIPHER, "keyslot"), KEYSLOT_KEY_BYTES


def _store_keyslot(
    writer: Luks2Writer,
    slot: int,
    volume_key: bytes,
    passphrase: bytes,
    params: KdfParams,
    kdf: KdfOptions,
    area: tuple[CipherSpec, int | None],
    *,
    replace_area: bool = False,
    digest: str | None = None,
) -> tuple[int, int] | None:
    """:meth:`Luks2Writer.write_keyslot` with add-key's and change-key's choices: the
    AF hash of ``--hash`` and the area encryption *area* (:func:`_luks2_area_spec`);
    *digest*: the digest it joins (default: the data segment's)."""
    return writer.write_keyslot(
        slot,
        volume_key,
        passphrase,
        params,
        area[0],
        af_hash=kdf.hash or DEFAULT_HASH,
        replace_area=replace_area,
        digest=digest,
        area_key_bytes=area[1],
    )


def add_key(
    path: str,
    existing: bytes,
    new: bytes,
    *,
    header: str | None = None,
    key_slot: int | None = None,
    kdf: KdfOptions = KdfOptions(),
    existing_slot: int | None = None,
    progress: Progress | None = None,
    volume_key_file: str | None = None,
    unbound_bits: int | None = None,
) -> int:
    """Add a keyslot for *new*, unlocking with *existing* (or, with *volume_key_file*,
    with the volume key in that file, checked against the digest); return its number.

    *unbound_bits* (``--unbound --key-size``, LUKS2): a keyslot bound to no segment,
    storing a key of its own (random, or from *volume_key_file*) under a new digest;
    *existing* is not needed."""
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        if unbound_bits is not None:
            return _add_unbound(h, hdr, new, key_slot, kdf, progress, volume_key_file, unbound_bits)
        slot = _new_slot(hdr, key_slot)
        if isinstance(hdr, LUKS2Header):
            writer = Luks2Writer.from_header(h.header_fd, hdr)
            area = _luks2_area_spec(hdr, kdf)
            volume_key = _volume_key(h, hdr, existing, existing_slot, volume_key_file)
            if writer.find_area(_area_len(len(volume_key))) is None:
                raise CryptfuseError("No space for new keyslot.")
            params = resolve_kdf(kdf, "luks2", len(volume_key), kdf.hash or DEFAULT_HASH, progress)
            _store_keyslot(writer, slot, volume_key, new, params, kdf, area)
            writer.commit()
        else:
            _keyslot_encryption(kdf, hdr.cipher_spec, luks2=False)
            volume_key = _volume_key(h, hdr, existing, existing_slot, volume_key_file)
            params = resolve_kdf(kdf, "luks1", len(volume_key), hdr.hash_spec, progress)
            set_keyslot(h.header_fd, hdr, slot, volume_key, new, params)
    return slot


def _add_unbound(
    h: _Handle,
    hdr: LUKS1Header | LUKS2Header,
    passphrase: bytes,
    key_slot: int | None,
    kdf: KdfOptions,
    progress: Progress | None,
    key_file: str | None,
    bits: int,
) -> int:
    """cryptsetup's ``luksAddKey --unbound``: one commit with a new digest and a keyslot
    bound to it and to no segment; the area is encrypted as an ordinary keyslot's
    (the segment cipher, under a key as long as the volume key)."""
    hdr = _luks2_only(h, hdr)
    if not bits or bits % 8:
        raise UsageError("Key size is required with --unbound option.")
    slot = _new_slot(hdr, key_slot)
    key = new_volume_key(key_file, bits // 8)
    writer = Luks2Writer.from_header(h.header_fd, hdr)
    spec, area_bytes = _unbound_area(hdr, _luks2_area_spec(hdr, kdf))
    digest_hash = kdf.hash or DEFAULT_HASH
    params = resolve_kdf(kdf, "luks2", len(key), digest_hash, progress)
    cost = digest_iterations(digest_hash, len(key), benchmark=kdf.force_iterations is None)
    digest = writer.add_digest(key, digest_hash, cost)
    writer.write_keyslot(
        slot, key, passphrase, params, spec, af_hash=digest_hash, digest=digest,
        area_key_bytes=area_bytes,
    )  # fmt: skip
    writer.commit()
    return slot


def dump_unbound_key(
    path: str, passphrase: bytes, key_slot: int, *, header: str | None = None
) -> str:
    """``luksDump --unbound -S N``: an unbound keyslot's key, as cryptsetup prints it."""
    with _locked(path, header, write=False) as h:
        hdr = _luks2_only(h, _read(h))
        slot = hdr.metadata.keyslots.get(key_slot)
        if slot is None or any(str(key_slot) in d["keyslots"] and d["segments"]
                               for d in hdr.json["digests"].values()):  # fmt: skip
            raise CryptfuseError(f"Keyslot {key_slot} is not an unbound keyslot.")
        _, key = hdr.unlock(h.header_fd, passphrase, key_slot, any_segment=True)
        lines = [
            f"LUKS header information for {h.header_path}",
            f"UUID:    \t{hdr.uuid}",
            f"Keyslot: \t{key_slot}",
            f"Key bits:\t{len(key) * 8}",
        ]
        return "\n".join(lines + _hex_lines(key, "\t\t", "Unbound Key:\t"))


def _volume_key(
    h: _Handle,
    hdr: LUKS1Header | LUKS2Header,
    passphrase: bytes,
    key_slot: int | None,
    volume_key_file: str | None,
) -> bytes:
    """The volume key: from the keyslot *passphrase* opens, or from *volume_key_file*."""
    if volume_key_file is not None:
        return volume_key_from_file(hdr, volume_key_file)
    return _unlock(h, hdr, passphrase, key_slot)[1]


def unlock_again(
    path: str,
    passphrase: bytes,
    key_slot: int | None = None,
    *,
    header: str | None = None,
    volume_key_file: str | None = None,
    any_segment: bool = False,
) -> tuple[int | None, bytes | None]:
    """``cryptsetup open --test-passphrase`` of a LUKS container (and ``cryptfuse
    refresh``'s check): *passphrase* must open a keyslot bound to the data segment
    (*key_slot* only, if given; with *any_segment*, cryptsetup's ``--key-slot``/
    ``--unbound`` there, an unbound one too), or *volume_key_file* hold the volume key,
    reading and writing nothing else (no lock: a mounted container can be tested).
    Returns the keyslot (None for a volume key file) and the volume key (None for a
    container in reencryption, whose keys of both digests must open and whose metadata
    digest must verify, as cryptsetup checks).  Raises :class:`WrongPassphraseError`
    when none opens."""
    with _locked(path, header, write=False) as h:
        kind = detect_type(h.header_path)  # (a primary header lost: the secondary copy)
        if kind is None:
            raise FormatError(f"Device {h.header_path} is not a valid LUKS device.")
        hdr: LUKS1Header | LUKS2Header = (
            read_luks1_header(h.header_fd, h.header_path)
            if kind == "luks1"
            else read_luks2_header(h.header_fd, h.header_path)
        )
        if volume_key_file is not None:
            return None, volume_key_from_file(hdr, volume_key_file)
        if isinstance(hdr, LUKS2Header) and any(
            r in REENCRYPT_REQUIREMENTS for r in hdr.metadata.config.requirements
        ):
            from .luks2_reencrypt import Reencryption, unlock

            state = Reencryption.from_json(copy.deepcopy(hdr.json))
            unlock(hdr, h.header_fd, state, passphrase, key_slot)
            return None, None
        if isinstance(hdr, LUKS2Header):
            return hdr.unlock(h.header_fd, passphrase, key_slot, any_segment=any_segment)
        return _unlock(h, hdr, passphrase, key_slot)


def _area_len(key_bytes: int) -> int:
    from .luks2_write import area_size

    return area_size(key_bytes)


def _new_slot(hdr: LUKS1Header | LUKS2Header, key_slot: int | None) -> int:
    """The number of a keyslot to add: *key_slot* (a valid, unused number), else the
    first free one."""
    if key_slot is None:
        return _free_slot(hdr)
    _check_slot_number(hdr, key_slot)
    if key_slot in _active_slots(hdr):
        raise CryptfuseError(f"Key slot {key_slot} is full, please select another one.")
    return key_slot


def _free_slot(hdr: LUKS1Header | LUKS2Header) -> int:
    active = set(_active_slots(hdr))
    limit = LUKS1_SLOTS if isinstance(hdr, LUKS1Header) else LUKS2_SLOTS
    for i in range(limit):
        if i not in active:
            return i
    raise CryptfuseError("All key slots full.")


def _destroy(h: _Handle, hdr: LUKS1Header | LUKS2Header, slot: int) -> None:
    if isinstance(hdr, LUKS1Header):
        clear_keyslot(h.header_fd, hdr, slot)
        return
    writer = Luks2Writer.from_header(h.header_fd, hdr)
    writer.wipe_keyslot(slot)
    writer.commit()


LAST_SLOT_WARNING = "This is the last keyslot. Device will become unusable after purging this key."
ABORT_LAST = (
    "Operation aborted, the keyslot was NOT wiped (removing the last keyslot needs --force or -q)."
)


def _usable_slots(hdr: LUKS1Header | LUKS2Header) -> list[int]:
    """Keyslots that can open the data segment (LUKS2: bound to it, not priority 0)."""
    if isinstance(hdr, LUKS1Header):
        return _active_slots(hdr)
    try:
        _, _, digest = hdr.data_segment()
    except (UnsupportedError, FormatError):
        return sorted(hdr.metadata.keyslots)
    return [
        i
        for i, s in sorted(hdr.metadata.keyslots.items())
        if s.type == "luks2" and i in digest.keyslots and s.priority != PRIORITY_IGNORE
    ]


def remove_key(
    path: str, passphrase: bytes, *, header: str | None = None, confirm_last: Confirm
) -> int:
    """Remove the keyslot *passphrase* opens (``luksRemoveKey``); return its number.

    Removing the last usable keyslot needs ``confirm_last(LAST_SLOT_WARNING)``.
    """
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        if isinstance(hdr, LUKS2Header):
            Luks2Writer.from_header(h.header_fd, hdr)  # refuses unknown requirements before the KDF
        slot, _ = _unlock(h, hdr, passphrase)
        if _usable_slots(hdr) == [slot] and not confirm_last(LAST_SLOT_WARNING):
            raise CryptfuseError(ABORT_LAST)
        _destroy(h, hdr, slot)
    return slot


def kill_slot(
    path: str,
    slot: int,
    *,
    header: str | None = None,
    passphrase: bytes | None,
    confirm_last: Confirm,
) -> None:
    """Wipe keyslot *slot* (``luksKillSlot``).

    With *passphrase* (cryptsetup asks unless in batch mode), it must open
    another keyslot, or this one when it is the last: proof that access
    remains (or that the user knows what is being destroyed).
    """
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        _check_slot_number(hdr, slot)
        if isinstance(hdr, LUKS2Header):
            Luks2Writer.from_header(h.header_fd, hdr)
        active = _active_slots(hdr)
        if slot not in active:
            raise CryptfuseError(f"Keyslot {slot} is not active.")
        last = _usable_slots(hdr) == [slot] or active == [slot]
        if last and not confirm_last(LAST_SLOT_WARNING):
            raise CryptfuseError(ABORT_LAST)
        if passphrase is not None:
            if last:
                _unlock(h, hdr, passphrase, slot)
            else:
                others = [i for i in _usable_slots(hdr) if i != slot]
                if not _opens_any(h, hdr, passphrase, others):
                    raise WrongPassphraseError()
        _destroy(h, hdr, slot)


#: ``config --priority``: LUKS2 keyslot priorities (normal is the field's absence)
PRIORITIES = {"ignore": 0, "normal": 1, "prefer": 2}


def configure(
    path: str,
    *,
    header: str | None = None,
    priority: str | None = None,
    key_slot: int | None = None,
    label: str | None = None,
    subsystem: str | None = None,
) -> None:
    """``cryptsetup config`` (LUKS2): a keyslot's priority (one commit), then the label
    and subsystem (another; both are set, a missing one to none, as cryptsetup does)."""
    if priority is None and label is None and subsystem is None:
        raise UsageError("Option --priority, --label or --subsystem is missing.")
    if priority is not None and priority not in PRIORITIES:
        raise UsageError("Option --priority can be only ignore/normal/prefer.")
    if priority is not None and key_slot is None:
        raise UsageError("Keyslot specification is required.")
    with _locked(path, header, write=True) as h:
        writer = Luks2Writer.from_header(h.header_fd, _luks2_only(h, _read(h)))
        if priority is not None:
            slot = writer.obj["keyslots"].get(str(key_slot))
            if slot is None:
                raise CryptfuseError(f"Keyslot {key_slot} is not active.")
            slot.pop("priority", None)
            if priority != "normal":
                slot["priority"] = PRIORITIES[priority]
            writer.commit()
        if label is not None or subsystem is not None:
            writer.label, writer.subsystem = label or "", subsystem or ""
            writer.commit()


#: The activation flags a LUKS2 header can keep (``config.flags``), in cryptsetup
#: 2.6.1's order (``persistent_flags[]``), which is the order it writes them in
PERSISTENT_FLAGS = (
    "allow-discards",
    "same-cpu-crypt",
    "submit-from-crypt-cpus",
    "no-journal",
    "no-read-workqueue",
    "no-write-workqueue",
)


def persistent_flags(path: str) -> tuple[str, ...]:
    """The LUKS2 header's ``config.flags`` at *path*, read now without locking (for the
    daemon that holds the lock: ``cryptfuse refresh``)."""
    fd = open_device(path, True, lock=False)
    try:
        return read_luks2_header(fd, path).metadata.config.flags
    finally:
        os.close(fd)


def set_persistent_flags(path: str, flags: Iterable[str]) -> None:
    """``cryptsetup open --persistent``: ``config.flags`` becomes *flags* (those of
    :data:`PERSISTENT_FLAGS`, in its order; none gives an empty array), one commit.

    For the daemon of a mounted container, which holds the container's lock
    exclusively meanwhile: *path* (the header) is opened without locking, and the
    commit makes only its own ranges durable (an fsync would write back what the mount
    wrote too).  Refused as cryptsetup refuses it (``_onlyLUKS2``,
    ``LUKS2_unmet_requirements``), with its messages: LUKS1, requirements."""
    fd = open_device(path, False, lock=False)
    try:
        if _luks_type(fd, path) != "luks2":
            raise FormatError("This operation is supported only for LUKS2 device.")
        header = read_luks2_header(fd, path)
        reqs = header.metadata.config.requirements
        online = [r for r in reqs if r == "online-reencrypt" or r.startswith("online-reencrypt-v")]
        if set(reqs) - set(online) - {"offline-reencrypt"}:
            raise UnsupportedError("Unmet LUKS2 requirements detected.")
        if "offline-reencrypt" in reqs:
            raise UnsupportedError(
                "Operation incompatible with device marked for legacy reencryption. Aborting."
            )
        if online:
            raise UnsupportedError(
                "Operation incompatible with device marked for LUKS2 reencryption. Aborting."
            )
        writer = Luks2Writer.from_header(fd, header)
        writer.sync_ranges = True
        wanted = set(flags)
        writer.obj["config"]["flags"] = [f for f in PERSISTENT_FLAGS if f in wanted]
        writer.commit()
    finally:
        os.close(fd)


#: LUKS2 has token ids 0..31 (cryptsetup's LUKS2_TOKENS_MAX)
TOKENS_MAX = 32


def _luks2_only(h: _Handle, hdr: LUKS1Header | LUKS2Header) -> LUKS2Header:
    """*hdr*, refused as cryptsetup refuses a LUKS2-only command on LUKS1."""
    if not isinstance(hdr, LUKS2Header):
        raise FormatError(f"Device {h.header_path} is not a valid LUKS2 device.")
    return hdr


def _check_token_id(token_id: int | None) -> None:
    if token_id is not None and not 0 <= token_id < TOKENS_MAX:
        raise UsageError(f"Token {token_id} is invalid.")


def _token_valid(token: Any) -> bool:
    """A token as cryptsetup 2.6.1 takes it: a ``type`` and a ``keyslots`` array; the
    ``luks2-`` types are its own, of which only ``luks2-keyring`` exists: exactly
    ``type``, ``keyslots`` and a non-empty ``key_description``."""
    kind = token.get("type") if isinstance(token, dict) else None
    if not isinstance(kind, str) or not kind or not isinstance(token.get("keyslots"), list):
        return False
    if kind.startswith("luks2-"):
        return kind == KEYRING and keyring_token_valid(token)
    return True


def _token_id_for(tokens: dict[str, Any], token_id: int | None, replace: bool, full: str) -> int:
    """*token_id*, or the first free one (none: *full*, cryptsetup's message for its
    failed creation); one in use only with *replace*."""
    if token_id is None:
        free = next((i for i in range(TOKENS_MAX) if str(i) not in tokens), None)
        if free is None:
            raise CryptfuseError(full)
        return free
    if str(token_id) in tokens and not replace:
        raise CryptfuseError(f"Token {token_id} in use.")
    return token_id


def _fits(writer: Luks2Writer, obj: dict[str, Any]) -> bool:
    """Whether *obj* can be committed: valid, and its JSON within the area (the checks
    the commit makes before it writes)."""
    json_size = writer.hdr_size - BIN_HEADER_SIZE
    try:
        validate_metadata(obj, json_size)
        serialize_json(obj, json_size)
    except CryptfuseError:
        return False
    return True


def _commit_token(
    writer: Luks2Writer, token_id: int, token: dict[str, Any], assign: list[str] | None, failed: str
) -> None:
    """Commit *token* as *token_id*, then, unless *assign* is None, a second commit with
    those keyslots assigned (made even when the list is empty, as cryptsetup's).  A token
    the JSON area has no room for is refused with *failed*, cryptsetup's message; one
    whose assignment would not fit, with cryptsetup's assignment message, but before
    anything is written (cryptsetup writes the token, fails to assign it and removes
    it again)."""
    tokens = writer.obj["tokens"]
    tokens[str(token_id)] = token  # a new id last, a replaced one in its place (json-c)
    if not _fits(writer, writer.obj):
        raise FormatError(failed)
    if assign is not None:
        trial = copy.deepcopy(writer.obj)
        trial["tokens"][str(token_id)]["keyslots"].extend(assign)
        if not _fits(writer, trial):
            slot = assign[0] if len(assign) == 1 else "-1"
            raise CryptfuseError(f"Failed to assign token {token_id} to keyslot {slot}.")
    writer.commit()
    if assign is not None:
        token["keyslots"].extend(assign)
        writer.commit()


def _parse_token(text: str, failed: str) -> dict[str, Any]:
    """The first JSON object of *text*, as json-c parses it (control characters taken in
    strings, what follows ignored), and valid as a token (:func:`_token_valid`); a text
    that is not UTF-8 (a lone surrogate) is refused too."""
    try:
        token, _ = json.JSONDecoder(strict=False).raw_decode(text.lstrip())
        json.dumps(token, ensure_ascii=False).encode("utf-8", "surrogateescape")
    except (ValueError, UnicodeError):
        raise FormatError(failed) from None
    if not _token_valid(token):
        raise FormatError(failed)
    assert isinstance(token, dict)
    return token


def token_import(
    path: str,
    text: str,
    *,
    header: str | None = None,
    token_id: int | None = None,
    key_slot: int | None = None,
    replace: bool = False,
) -> int:
    """``cryptsetup token import``: the token in *text* (JSON; what follows the first
    object is ignored, as json-c's parser ignores it) under *token_id* or the first
    free id, in one commit; with *key_slot*, assigned to that keyslot in a second.
    Validated as cryptsetup validates it (a ``type``, ``keyslots`` naming keyslots;
    the ``luks2-`` types are cryptsetup's own: only ``luks2-keyring``, with its
    ``key_description``), after the checks of the id and keyslot, in cryptsetup's
    order.  Returns the token id."""
    failed = "Failed to import token from file."
    _check_token_id(token_id)
    with _locked(path, header, write=True) as h:
        writer = Luks2Writer.from_header(h.header_fd, _luks2_only(h, _read(h)))
        token_id = _token_id_for(writer.obj["tokens"], token_id, replace, failed)
        if key_slot is not None and str(key_slot) not in writer.obj["keyslots"]:
            raise CryptfuseError(f"Keyslot {key_slot} is not active.")
        token = _parse_token(text, failed)
        if not all(isinstance(k, str) and k in writer.obj["keyslots"] for k in token["keyslots"]):
            raise FormatError(failed)
        assign = None
        if key_slot is not None:  # a second commit even when the token names it already
            assign = [] if str(key_slot) in token["keyslots"] else [str(key_slot)]
        _commit_token(writer, token_id, token, assign, failed)
    return token_id


def token_add(
    path: str,
    key_description: str,
    *,
    header: str | None = None,
    token_id: int | None = None,
    key_slot: int | None = None,
    unbound: bool = False,
    replace: bool = False,
) -> int:
    """``cryptsetup token add``: a ``luks2-keyring`` token naming the kernel keyring key
    *key_description*, under *token_id* or the first free id, in one commit; then,
    unless *unbound*, assigned in a second commit to *key_slot*, or to every keyslot
    (as cryptsetup's ``CRYPT_ANY_SLOT``).  Returns the token id."""
    _check_token_id(token_id)
    failed = f"Failed to add luks2-keyring token {-1 if token_id is None else token_id}."
    with _locked(path, header, write=True) as h:
        writer = Luks2Writer.from_header(h.header_fd, _luks2_only(h, _read(h)))
        token_id = _token_id_for(writer.obj["tokens"], token_id, replace, failed)
        keyslots = writer.obj["keyslots"]
        if key_slot is not None and str(key_slot) not in keyslots:
            raise CryptfuseError(f"Keyslot {key_slot} is not active.")
        # cryptsetup builds the JSON with a format string into 4096 bytes: a description
        # is not escaped, and one too long for the buffer is refused
        text = f'{{ "type": "luks2-keyring", "keyslots":[],"key_description":"{key_description}"}}'
        if len(text.encode("utf-8", "surrogateescape")) >= 4096:
            raise FormatError(failed)
        token = _parse_token(text, failed)
        assign = None if unbound else [str(key_slot)] if key_slot is not None else list(keyslots)
        _commit_token(writer, token_id, token, assign, failed)
    return token_id


def token_unassign(path: str, token_id: int, key_slot: int, *, header: str | None = None) -> None:
    """``cryptsetup token unassign``: *key_slot* off the token's keyslots, one commit."""
    if not 0 <= token_id < TOKENS_MAX or not 0 <= key_slot < LUKS2_SLOTS:
        raise CryptfuseError(f"Failed to unassign token {token_id} from keyslot {key_slot}.")
    with _locked(path, header, write=True) as h:
        writer = Luks2Writer.from_header(h.header_fd, _luks2_only(h, _read(h)))
        token = writer.obj["tokens"].get(str(token_id))
        slots = token.get("keyslots", []) if isinstance(token, dict) else []
        if not any(atoi(k) == key_slot for k in slots):
            raise CryptfuseError(f"Token {token_id} is not assigned to keyslot {key_slot}.")
        if str(key_slot) in slots:  # the first one of that name (json-c: LUKS2_array_remove)
            slots.remove(str(key_slot))
        writer.commit()


def token_export(path: str, token_id: int, *, header: str | None = None) -> str:
    """``cryptsetup token export``: the token's JSON, compact, as cryptsetup prints it."""
    _check_token_id(token_id)
    with _locked(path, header, write=False) as h:
        token = _luks2_only(h, _read(h)).json["tokens"].get(str(token_id))
    if token is None:
        raise CryptfuseError(f"Failed to get token {token_id} for export.")
    return json.dumps(token, separators=(",", ":"), ensure_ascii=False)


def token_remove(path: str, token_id: int, *, header: str | None = None) -> None:
    """``cryptsetup token remove``: one commit."""
    _check_token_id(token_id)
    with _locked(path, header, write=True) as h:
        writer = Luks2Writer.from_header(h.header_fd, _luks2_only(h, _read(h)))
        if writer.obj["tokens"].pop(str(token_id), None) is None:
            raise CryptfuseError(f"Token {token_id} is not in use.")
        writer.commit()


ERASE_WARNING = (
    "WARNING!\n========\nThis operation will erase all keyslots on device {path}.\n"
    "Device will become unusable after this operation."
)


def erase(path: str, *, header: str | None = None, confirm: Confirm) -> list[int]:
    """Wipe every keyslot (``cryptsetup erase``/``luksErase``); return their numbers.

    Each keyslot's area is overwritten and the keyslot removed in turn, one commit
    each for LUKS2 (tokens and digests lose it too), as cryptsetup does; the digests,
    segments and tokens stay, so the header still reads but nothing opens it.
    """
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        # (the writer refuses requirements, a reencryption's, before the question)
        writer = Luks2Writer.from_header(h.header_fd, hdr) if isinstance(hdr, LUKS2Header) else None
        if not confirm(ERASE_WARNING.format(path=h.header_path)):
            raise CryptfuseError("Operation aborted, no keyslot was wiped.")
        slots = _active_slots(hdr)
        for slot in slots:
            if writer is not None:
                writer.wipe_keyslot(slot)
                writer.commit()
            else:
                assert isinstance(hdr, LUKS1Header)
                hdr = clear_keyslot(h.header_fd, hdr, slot)
    return slots


def _opens_any(
    h: _Handle, hdr: LUKS1Header | LUKS2Header, passphrase: bytes, slots: list[int]
) -> bool:
    for i in slots:
        try:
            _unlock(h, hdr, passphrase, i)
        except WrongPassphraseError:
            continue
        return True
    return False


def convert_key(
    path: str,
    passphrase: bytes,
    *,
    header: str | None = None,
    key_slot: int | None = None,
    kdf: KdfOptions = KdfOptions(),
    progress: Progress | None = None,
) -> int:
    """``cryptsetup luksConvertKey`` (LUKS2): the keyslot *passphrase* opens is stored
    again with new KDF (or keyslot cipher) parameters, under the same number, as
    :func:`change_key` stores a new passphrase (cryptsetup's is that same change with
    the same passphrase); return its number."""
    if detect_type(header or path) != "luks2":
        raise FormatError(f"Device {header or path} is not a valid LUKS2 device.")
    return change_key(
        path, passphrase, passphrase, header=header, key_slot=key_slot, kdf=kdf, progress=progress
    )


def change_key(
    path: str,
    old: bytes,
    new: bytes,
    *,
    header: str | None = None,
    key_slot: int | None = None,
    kdf: KdfOptions = KdfOptions(),
    progress: Progress | None = None,
) -> int:
    """Replace the passphrase of the keyslot *old* opens (``luksChangeKey``); return the new slot.

    LUKS1: the new keyslot goes to a free slot number (then the old slot is
    wiped), as cryptsetup does; with *key_slot* it then moves back to the old
    number (stored there again, the free slot wiped), where cryptsetup
    overwrites the slot in place.  LUKS2 keeps the number, as cryptsetup 2.6.1
    does (it stores the new keyslot under a free number, then swaps the two):
    the new material goes to a free area under a free number and is committed
    with the old one still there, then takes the old number in a second
    commit, and only then is the old area wiped.  Either way the new material
    is durable and committed before the old one is destroyed.
    """
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        if key_slot is not None:
            _check_slot_number(hdr, key_slot)
        if isinstance(hdr, LUKS2Header):
            writer = Luks2Writer.from_header(h.header_fd, hdr)
            area = _luks2_area_spec(hdr, kdf)
            # cryptsetup opens any keyslot here, an unbound one too (which stays so)
            old_slot, volume_key = hdr.unlock(h.header_fd, old, key_slot, any_segment=True)
            area, digest = _area_and_digest(hdr, old_slot, area)
            params = resolve_kdf(kdf, "luks2", len(volume_key), kdf.hash or DEFAULT_HASH, progress)
            free = writer.free_keyslot()
            if writer.find_area(_area_len(len(volume_key))) is None:
                raise CryptfuseError("No space for new keyslot (the keyslots area is full).")
            if free is not None:
                _store_keyslot(writer, free, volume_key, new, params, kdf, area, digest=digest)
                writer.commit()  # both passphrases open it
                freed = writer.renumber_keyslot(free, old_slot)
                writer.commit()  # the new one only, under the old number
                wipe_area(h.header_fd, freed[0], freed[1], f"old area of keyslot {old_slot}")
                return old_slot
            old_area = _store_keyslot(
                writer,
                old_slot,
                volume_key,
                new,
                params,
                kdf,
                area,
                replace_area=True,
                digest=digest,
            )
            writer.commit()
            assert old_area is not None
            wipe_area(h.header_fd, old_area[0], old_area[1], f"old area of keyslot {old_slot}")
            return old_slot
        _keyslot_encryption(kdf, hdr.cipher_spec, luks2=False)
        old_slot, volume_key = hdr.unlock(h.header_fd, old, key_slot)
        params = resolve_kdf(kdf, "luks1", len(volume_key), hdr.hash_spec, progress)
        free_slots = [i for i in range(LUKS1_SLOTS) if i not in _active_slots(hdr)]
        if not free_slots:
            # cryptsetup would overwrite the slot in place; a crash then loses
            # both passphrases, so cryptfuse refuses instead.
            raise CryptfuseError(
                "All key slots full: LUKS1 cannot change a key in place safely; "
                "remove another keyslot first."
            )
        salted_key = derive_keyslot_key(hdr, new, params)  # one PBKDF2 run for both stores
        hdr = set_keyslot(
            h.header_fd, hdr, free_slots[0], volume_key, new, params, salted_key=salted_key
        )
        hdr = clear_keyslot(h.header_fd, hdr, old_slot)
        if key_slot is None:
            return free_slots[0]
        # --key-slot N keeps N, as cryptsetup does (it overwrites N in place): the new
        # passphrase, safe in the free slot, is stored again under N, then the free
        # slot is cleared.  At every instant one complete slot holds a passphrase.
        hdr = set_keyslot(
            h.header_fd, hdr, old_slot, volume_key, new, params, salted_key=salted_key
        )
        clear_keyslot(h.header_fd, hdr, free_slots[0])
        return old_slot


# -- UUID, is-luks -------------------------------------------------------------------------------


def get_uuid(path: str, header: str | None = None) -> str:
    """The container's UUID (``luksUUID``)."""
    with _locked(path, header, write=False) as h:
        return _read(h).uuid


def set_uuid(path: str, new_uuid: str | None, header: str | None = None) -> str:
    """Set the UUID (a random one when *new_uuid* is None); return it."""
    text = _check_uuid(new_uuid) or str(uuidlib.uuid4())
    with _locked(path, header, write=True) as h:
        hdr = _read(h)
        if isinstance(hdr, LUKS1Header):
            write_uuid(h.header_fd, hdr, text)
        else:
            writer = Luks2Writer.from_header(h.header_fd, hdr)
            writer.uuid = text
            writer.commit()
    return text


def is_luks(path: str, luks_type: str | None = None) -> bool:
    """True when *path* holds a LUKS header (of *luks_type*, if given).  A device
    that is missing or cannot be read raises :class:`DeviceError` (cryptsetup's
    isLuks exits 4 there, not 1)."""
    try:
        found = detect_type(path)
    except DeviceError:
        raise
    except CryptfuseError:
        return False
    if found is None:
        return False
    return luks_type in (None, "luks") or found == luks_type


# -- dump ----------------------------------------------------------------------------------------


def _hex_lines(data: bytes, indent: str, first: str, per_line: int = 16) -> list[str]:
    chunks = [
        " ".join(f"{b:02x}" for b in data[i : i + per_line]) + " "
        for i in range(0, len(data), per_line)
    ]
    return [first + chunks[0]] + [indent + c for c in chunks[1:]] if chunks else [first]


def _dump_luks1(hdr: LUKS1Header, path: str) -> str:
    lines = [
        f"LUKS header information for {path}",
        "",
        "Version:       \t1",
        f"Cipher name:   \t{hdr.cipher_name}",
        f"Cipher mode:   \t{hdr.cipher_mode}",
        f"Hash spec:     \t{hdr.hash_spec}",
        f"Payload offset:\t{hdr.payload_offset}",
        f"MK bits:       \t{hdr.key_bytes * 8}",
    ]
    lines += _hex_lines(hdr.mk_digest, "               \t", "MK digest:     \t", 20)
    lines += _hex_lines(hdr.mk_digest_salt, "               \t", "MK salt:       \t")
    lines += [f"MK iterations: \t{hdr.mk_digest_iterations}", f"UUID:          \t{hdr.uuid}", ""]
    for slot in hdr.keyslots:
        if not slot.enabled:
            lines.append(f"Key Slot {slot.index}: DISABLED")
            continue
        lines += [f"Key Slot {slot.index}: ENABLED", f"\tIterations:         \t{slot.iterations}"]
        lines += _hex_lines(slot.salt, "\t                      \t", "\tSalt:               \t")
        lines += [
            f"\tKey material offset:\t{slot.key_material_offset}",
            f"\tAF stripes:            \t{slot.stripes}",
        ]
    return "\n".join(lines)


def _dump_luks2(hdr: LUKS2Header, path: str) -> str:
    b = hdr.binary
    cfg = hdr.metadata.config
    lines = [
        "LUKS header information",
        "Version:       \t2",
        f"Epoch:         \t{b.seqid}",
        f"Metadata area: \t{cfg.json_size + 4096} [bytes]",
        f"Keyslots area: \t{cfg.keyslots_size} [bytes]",
        f"UUID:          \t{b.uuid}",
        f"Label:         \t{b.label or '(no label)'}",
        f"Subsystem:     \t{b.subsystem or '(no subsystem)'}",
        # each flag and requirement followed by a space, as cryptsetup prints them
        f"Flags:       \t{''.join(f + ' ' for f in cfg.flags) or '(no flags)'}",
    ]
    if cfg.requirements:
        lines.append(f"Requirements:\t{''.join(r + ' ' for r in cfg.requirements)}")
    lines += ["", "Data segments:"]
    for i, seg in sorted(hdr.metadata.segments.items()):
        lines.append(f"  {i}: {seg.type}")
        lines.append(f"\toffset: {seg.offset} [bytes]")
        lines.append(f"\tlength: {'(whole device)' if seg.size is None else f'{seg.size} [bytes]'}")
        if seg.type == "crypt":
            lines.append(f"\tcipher: {seg.encryption}")
            lines.append(f"\tsector: {seg.sector_size} [bytes]")
        if seg.flags:
            lines.append(f"\tflags : {', '.join(seg.flags)}")
        lines.append("")
    lines.append("Keyslots:")
    # "(unbound)": a keyslot whose digest no segment but a backup uses
    # (cryptsetup's LUKS2_keyslot_for_segment(CRYPT_ONE_SEGMENT); backups do not count)
    live = {int(i) for i, seg in hdr.json["segments"].items() if not _is_backup(seg)}
    bound = {k for d in hdr.metadata.digests.values() if live & set(d.segments) for k in d.keyslots}
    for i, slot in sorted(hdr.metadata.keyslots.items()):
        lines.append(f"  {i}: {slot.type}{'' if i in bound else ' (unbound)'}")
        lines.append(f"\tKey:        {slot.key_size * 8} bits")
        prio = {PRIORITY_IGNORE: "ignored", PRIORITY_HIGH: "preferred"}.get(slot.priority, "normal")
        lines.append(f"\tPriority:   {prio}")
        if slot.type == "reencrypt":
            lines += _dump_reencrypt_keyslot(hdr.json["keyslots"][str(i)])
        if slot.kdf is not None and slot.af is not None:
            lines.append(f"\tCipher:     {slot.area.encryption}")
            lines.append(f"\tCipher key: {(slot.area.key_size or 0) * 8} bits")
            lines.append(f"\tPBKDF:      {slot.kdf.type}")
            if slot.kdf.type == "pbkdf2":
                lines.append(f"\tHash:       {slot.kdf.hash}")
                lines.append(f"\tIterations: {slot.kdf.iterations}")
            else:
                lines.append(f"\tTime cost:  {slot.kdf.time}")
                lines.append(f"\tMemory:     {slot.kdf.memory}")
                lines.append(f"\tThreads:    {slot.kdf.cpus}")
            lines += _hex_lines(slot.kdf.salt, "\t            ", "\tSalt:       ")
            lines.append(f"\tAF stripes: {slot.af.stripes}")
            lines.append(f"\tAF hash:    {slot.af.hash}")
        lines.append(f"\tArea offset:{slot.area.offset} [bytes]")
        lines.append(f"\tArea length:{slot.area.size} [bytes]")
        digest = next((d for _, d in sorted(hdr.metadata.digests.items()) if i in d.keyslots), None)
        if digest is not None:
            lines.append(f"\tDigest ID:  {digest.index}")
    lines.append("Tokens:")
    for i, token in sorted(hdr.metadata.tokens.items()):
        lines.append(f"  {i}: {token.type}")
        description = hdr.json["tokens"][str(i)].get("key_description")
        if token.type == "luks2-keyring" and description is not None:
            lines.append(f"\tKey description: {description}")
        lines += [f"\tKeyslot:    {k}" for k in token.keyslots]
    lines.append("Digests:")
    for i, d in sorted(hdr.metadata.digests.items()):
        lines.append(f"  {i}: {d.type}")
        if d.type == "pbkdf2":
            lines.append(f"\tHash:       {d.hash}")
            lines.append(f"\tIterations: {d.iterations}")
            lines += _hex_lines(d.salt, "\t            ", "\tSalt:       ")
            lines += _hex_lines(d.digest, "\t            ", "\tDigest:     ")
    return "\n".join(lines)


def _dump_reencrypt_keyslot(obj: dict[str, Any]) -> list[str]:
    """A reencrypt keyslot's own lines (cryptsetup's ``reenc_keyslot_dump``)."""
    area = obj["area"]
    lines = [
        f"\tMode:       {obj['mode']}",
        f"\tDirection:  {obj['direction']}",
        f"\tResilience: {area['type']}",
    ]
    if area["type"] == "checksum":
        lines.append(f"\tHash:       {area['hash']}")
        lines.append(f"\tHash data:  {area['sector_size']} [bytes]")
    elif area["type"] == "datashift":
        lines.append(f"\tShift size: {area['shift_size']}[bytes]")  # (no space: cryptsetup's)
    return lines


def dump(path: str, *, header: str | None = None, as_json: bool = False) -> str:
    """``luksDump`` text (or, with *as_json*, the LUKS2 JSON metadata)."""
    with _locked(path, header, write=False) as h:
        hdr = _read(h)
        if as_json:
            if not isinstance(hdr, LUKS2Header):
                raise UsageError("--json is only available for LUKS2 containers.")
            return json_c_pretty(hdr.json)
        if isinstance(hdr, LUKS1Header):
            return _dump_luks1(hdr, h.header_path)
        return _dump_luks2(hdr, h.header_path)


def json_c_pretty(value: Any, level: int = 0) -> str:
    """*value* as cryptsetup's ``luksDump --dump-json-metadata`` prints it: json-c's
    pretty form (two spaces a level, no space after a colon, an empty array or object
    still on two lines, ``/`` not escaped), without a final newline."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}:{json_c_pretty(v, level + 1)}"
                 for k, v in value.items()]  # fmt: skip
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(value, list):
        items = [inner + json_c_pretty(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def dump_volume_key(
    path: str,
    passphrase: bytes,
    *,
    header: str | None = None,
    key_slot: int | None = None,
    key_file: str | None = None,
) -> str:
    """``luksDump --dump-volume-key``: header summary and volume key, as cryptsetup prints
    them; with *key_file* (``--volume-key-file``) the key goes to that new file (mode
    0400; an existing file is refused, as cryptsetup refuses it) instead."""
    with _locked(path, header, write=False) as h:
        hdr = _read(h)
        if isinstance(hdr, LUKS1Header):
            _, key = hdr.unlock(h.header_fd, passphrase, key_slot)
            name, mode, offset = hdr.cipher_name, hdr.cipher_mode, hdr.payload_offset
        else:
            _, key = hdr.unlock(h.header_fd, passphrase, key_slot)
            seg, spec, _ = hdr.data_segment()
            name, _, mode = str(spec).partition("-")
            offset = seg.offset // 512
        lines = [
            f"LUKS header information for {h.header_path}",
            f"Cipher name:   \t{name}",
            f"Cipher mode:   \t{mode}",
            f"Payload offset:\t{offset}",
            f"UUID:          \t{hdr.uuid}",
            f"MK bits:       \t{len(key) * 8}",
        ]
        if key_file is not None:
            _write_new_key_file(key_file, key)
            lines.append(f"Key stored to file {key_file}.")
        else:
            lines += _hex_lines(key, "\t\t", "MK dump:\t")
        return "\n".join(lines)


def _write_new_key_file(path: str, key: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    except OSError:
        raise KeyFileError(f"Cannot open keyfile {path} for write.") from None
    try:
        pwrite_all(fd, key, 0, f"volume key file {path}", durable=True)
    finally:
        os.close(fd)


# -- header backup / restore ----------------------------------------------------------------


def _backup_size(hdr: LUKS1Header | LUKS2Header) -> int:
    if isinstance(hdr, LUKS1Header):
        return hdr.required_header_bytes
    return hdr.hdr_and_areas_size


def repair_header(path: str, header: str | None = None) -> tuple[str, list[str]]:
    """The header part of ``cryptsetup repair``.  Returns the LUKS type and what
    was repaired, one line each (none: nothing needed it).

    LUKS2: the recovery of a damaged or outdated header copy, which cryptsetup
    runs whenever it loads a header and cryptfuse only here.  The bad copy is
    rewritten from the good one as cryptsetup does it: the good copy's JSON area
    byte for byte, its seqid (the epoch does not change), a fresh salt.  The good
    copy is never touched, so a crash at any instant leaves it.  A foreign
    signature beside the damaged copy does not stop it (cryptsetup's repair does
    not probe either).

    LUKS1: cryptsetup's keyslot repair (:func:`repaired_luks1_header`), written
    over the 592 header bytes in one write, as cryptsetup writes it.
    """
    with _locked(path, header, write=True) as h:
        head = os.pread(h.header_fd, 8, 0)
        if head == LUKS_MAGIC + b"\x00\x01":
            data = pread_exact(h.header_fd, LUKS1_HEADER_SIZE, 0, "LUKS1 header")
            fixed = repaired_luks1_header(data)
            if fixed is not None:
                pwrite_all(h.header_fd, fixed[0], 0, "LUKS1 header")
                sync(h.header_fd)
            read_luks1_header(h.header_fd, h.header_path)  # the device holds every keyslot
            return "luks1", [] if fixed is None else fixed[1]
        hdr = read_luks2_header(h.header_fd, h.header_path, repairing=True)
        if hdr.damaged is None:
            return "luks2", []
        b = hdr.binary
        good = 0 if hdr.source == "primary" else b.hdr_size
        area = pread_exact(
            h.header_fd, b.hdr_size - BIN_HEADER_SIZE, good + BIN_HEADER_SIZE, "LUKS2 JSON area"
        )
        secondary = hdr.damaged == "secondary"
        data = serialize_copy(
            secondary=secondary,
            hdr_size=b.hdr_size,
            seqid=b.seqid,
            label=b.label,
            subsystem=b.subsystem,
            salt=os.urandom(len(b.salt)),
            uuid=b.uuid,
            json_area=area,
        )
        pwrite_all(h.header_fd, data, b.hdr_size if secondary else 0, "LUKS2 header copy")
        sync(h.header_fd)
        return "luks2", [
            f"The {hdr.damaged} LUKS2 header copy was damaged or outdated; "
            "rewritten from the other copy."
        ]


def header_backup(path: str, backup_file: str, *, header: str | None = None) -> None:
    """Copy the header and keyslot areas to a new file (mode 0400, like cryptsetup)."""
    with _locked(path, header, write=False) as h:
        hdr = _read(h)
        size = _backup_size(hdr)
        data = pread_exact(h.header_fd, size, 0, "LUKS header and keyslots")
    if isinstance(hdr, LUKS1Header):
        data = _luks1_backup_image(hdr, data)
    try:
        fd = os.open(backup_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    except FileExistsError:
        raise UsageError(f"Requested header backup file {backup_file} already exists.") from None
    except OSError as exc:
        raise DeviceError(
            f"Cannot create header backup file {backup_file}: {exc.strerror}."
        ) from None
    try:
        pwrite_all(fd, data, 0, f"header backup {backup_file}")
        sync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(backup_file)
        raise
    os.close(fd)


def _luks1_backup_image(hdr: LUKS1Header, data: bytes) -> bytes:
    """cryptsetup's LUKS1 backup file: the header and keyslots, the gap between its
    header struct (1024 bytes: the 592 of the format and its padding) and the first
    keyslot zeroed (no old signatures) where that keyslot is at 4 KiB, padded with
    zeros to a multiple of 4 KiB (``LUKS_hdr_backup``)."""
    image = bytearray(data)
    if hdr.keyslots[0].key_material_offset * 512 == 4096:
        image[1024:4096] = bytes(4096 - 1024)
    image += bytes(-len(image) % 4096)
    return bytes(image)


def _read_backup(backup_file: str) -> tuple[bytes, LUKS1Header | LUKS2Header]:
    try:
        fd = os.open(backup_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(
            f"Cannot read header backup file {backup_file}: {exc.strerror}."
        ) from None
    try:
        kind = _luks_type(fd, backup_file)
        hdr: LUKS1Header | LUKS2Header
        hdr = (
            read_luks1_header(fd, backup_file)
            if kind == "luks1"
            else read_luks2_header(fd, backup_file)
        )
        data = pread_exact(fd, _backup_size(hdr), 0, "header backup")
    finally:
        os.close(fd)
    return data, hdr


def _data_offset(hdr: LUKS1Header | LUKS2Header) -> int:
    if isinstance(hdr, LUKS1Header):
        return hdr.payload_offset * 512
    return min((s.offset for s in hdr.metadata.segments.values()), default=0)


def header_restore(
    path: str, backup_file: str, *, header: str | None = None, confirm: Confirm
) -> None:
    """Write a header backup back (``luksHeaderRestore``), with cryptsetup 2.6.1's
    checks against the header of the *same* LUKS version on the device: LUKS1, the
    same payload offset and key size; LUKS2 (unless the device is marked for an
    offline reencryption), the same data offset and the same size of binary headers
    and keyslot areas.  A LUKS2 backup with requirements other than an online
    reencryption is refused.  A device without such a header (none, a damaged one,
    the other version) is overwritten only if *confirm* agrees, as is one with a
    different UUID or with unknown requirements.  Not atomic (neither is
    cryptsetup's): after a crash, run it again -- the backup file is the source of
    truth.
    """
    data, backup = _read_backup(backup_file)
    version = "LUKS2" if isinstance(backup, LUKS2Header) else "LUKS"
    if isinstance(backup, LUKS2Header) and any(
        r not in REENCRYPT_REQUIREMENTS for r in backup.metadata.config.requirements
    ):
        raise CryptfuseError(f"Forbidden LUKS2 requirements detected in backup {backup_file}.")
    with _locked(path, header, write=True) as h:
        current: LUKS1Header | LUKS2Header | None = None
        if _has_luks(h.header_fd):
            try:
                current = _read(h)
            except CryptfuseError:
                current = None  # damaged: as no header
            if isinstance(current, LUKS2Header) != isinstance(backup, LUKS2Header):
                current = None  # the other version: as no header (cryptsetup)
        warnings = []
        if isinstance(current, LUKS1Header) and isinstance(backup, LUKS1Header):
            if (
                current.payload_offset != backup.payload_offset
                or current.key_bytes != backup.key_bytes
            ):
                raise CryptfuseError(
                    "Data offset or key size differs on device and backup, restore failed."
                )
        elif isinstance(current, LUKS2Header) and isinstance(backup, LUKS2Header):
            reqs = current.metadata.config.requirements
            if "offline-reencrypt" in reqs:
                warnings.append(
                    "WARNING: Unfinished offline reencryption detected on the device! "
                    "Replacing header with backup may corrupt data."
                )
            else:
                if _data_offset(current) != _data_offset(backup):
                    raise CryptfuseError("Data offset differ on device and backup, restore failed.")
                if current.hdr_and_areas_size != backup.hdr_and_areas_size:
                    raise CryptfuseError(
                        "Binary header with keyslot areas size differ on device and backup, "
                        "restore failed."
                    )
            if any(r not in REENCRYPT_REQUIREMENTS and r != "offline-reencrypt" for r in reqs):
                warnings.append(
                    "WARNING: unknown LUKS2 requirements detected in real device header! "
                    "Replacing header with backup may corrupt the data on that device!"
                )
        if current is None:
            if not confirm(
                f"Device {h.header_path} does not contain {version} header. "
                "Replacing header can destroy data on that device."
            ):
                raise CryptfuseError("Operation aborted.")
        elif current.uuid != backup.uuid or warnings:
            different = current.uuid != backup.uuid
            question = " ".join(
                [
                    f"Device {h.header_path} already contains {version} header. "
                    "Replacing header will destroy existing keyslots.",
                    *(["WARNING: real device header has different UUID than backup!"] * different),
                    *warnings,
                ]
            )
            if not confirm(question):
                raise CryptfuseError(
                    "Operation aborted (the UUIDs differ; use --force)."
                    if different
                    else "Operation aborted."
                )
        if device_size(h.header_fd) < len(data) and h.header_fd == h.data_fd:
            raise DeviceError(
                f"Device {path} is too small for the header backup ({len(data)} bytes)."
            )
        pwrite_all(h.header_fd, data, 0, "LUKS header")
        sync(h.header_fd)
