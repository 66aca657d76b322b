"""Plain dm-crypt -> LUKS2: a new detached header for an existing plain container.

``cryptfuse convert --type luks2 --from-plain --header NEWHDR CONTAINER``
describes the plain mapping (cipher, key, ``--offset``, ``--skip``,
``--size``, ``--sector-size``) as a LUKS2 header with the *same* volume key,
so that ``cryptfuse reencrypt --header NEWHDR`` (or cryptsetup's) can then
move the container to a new key and cipher.  The mapping is identical:

* segment 0: ``offset`` = ``--offset`` * 512 in the container, ``iv_tweak``
  0, the plain cipher spec, ``sector_size`` = ``--sector-size``; ``size``
  = ``--size`` * 512 when given, else ``dynamic`` (the rest of the
  container, rounded down to whole sectors: what plain mode maps);
* a ``pbkdf2`` digest of the key and one keyslot holding it under a new
  passphrase.

The keyslot area always uses cryptsetup's default keyslot cipher,
``aes-xts-plain64`` with a 512-bit key (what cryptsetup falls back to when
the segment cipher is unfit for keyslots): the old plain cipher may be ECB,
a 128-bit key XTS cannot take, or a cipher cryptsetup's userspace crypto
lacks, and ``reencrypt`` gives its new keyslot the old keyslot's area cipher.

LUKS2 never sets dm-crypt's ``iv_large_sectors``: its IV is the 512-byte
sector number even with 4096-byte sectors -- exactly plain mode *without*
``--iv-large-sectors``.  With it (and sectors over 512 bytes) the mapping
cannot be expressed and is refused.

``--skip`` (dm-crypt's IV offset) would be the segment's ``iv_tweak``, which
dm-crypt activation honours; but cryptsetup 2.6's reencryption rebuilds the
segments from IV offset 0 (``crypt_get_iv_offset`` is 0 for LUKS2) and
cryptfuse's reencryption reproduces its segments, so reencrypting such a
header decrypts with the wrong IVs and corrupts the data (shown by
``tests/test_convert_plain.py``).  Since reencryption is the point of the
conversion, ``--skip`` other than 0 is refused.  So is a ``--size`` that
leaves part of the container after the volume: LUKS2 stores a fixed segment
size, but both reencryptions run to the end of the device (cryptsetup's
``--device-size`` stops earlier, yet still ends with a ``dynamic`` segment)
and would rewrite what follows.  A ``--size`` reaching the end is kept as the
fixed segment size.

The container is never written.  The header is built in a temporary file next
to NEWHDR, made durable, checked (digest and mapping read back through the
LUKS2 reader), then linked to NEWHDR (never replacing an existing file) and
the directory synced: a crash leaves no NEWHDR or a complete one (and at worst
the temporary file, named ``.NEWHDR.*.tmp``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass

from ..errors import CryptfuseError, DeviceError, UnsupportedError, UsageError
from ..sector import SECTOR_SIZES, SectorCipher
from ..spec import CipherSpec, parse_cipher_spec
from ..volume import Volume, device_size
from . import OpenOptions, Secret
from .luks2 import read_luks2_header
from .luks2_write import (
    DEFAULT_DATA_OFFSET,
    DEFAULT_METADATA_SIZE,
    KEYSLOT_ALIGN,
    KEYSLOT_CIPHER,
    KEYSLOT_KEY_BYTES,
    Luks2Writer,
    area_size,
    build_metadata,
    luks2_layout,
)
from .luks_common import data_area_size, pread_exact
from .luks_write import Progress, digest_iterations, sync
from .manage import KdfOptions, resolve_kdf
from .plain import DEFAULT_CIPHER, DEFAULT_HASH, DEFAULT_KEY_SIZE, open_plain, plain_key

__all__ = [
    "KEYSLOT_CIPHER",
    "PlainPlan",
    "check_plain_to_luks2",
    "keyslots_size",
    "plain_to_luks2",
    "reencryption_room",
]

#: the largest new key ``reencrypt`` is expected to make (aes-xts-plain64, 512 bits)
REENCRYPT_KEY_BYTES = 64
#: digest, keyslot PBKDF2 and AF hash (cryptsetup's LUKS2 default)
LUKS2_HASH = "sha256"
#: how much of the start and of the end of the volume the self-check compares
_CHECK_BYTES = 64 * 1024


@dataclass(frozen=True)
class PlainPlan:
    """What the new header will say, from the plain options alone (no secret)."""

    spec: CipherSpec
    key_bits: int
    hash: str
    sector_size: int
    keyslots_size: int


def check_plain_to_luks2(container: str, new_header: str, options: OpenOptions) -> PlainPlan:
    """Every refusal that needs no secret, before anything is asked or written.

    Raises :class:`UsageError` for bad options, :class:`UnsupportedError` for a
    mapping LUKS2 cannot express, :class:`CryptfuseError` when *new_header*
    exists, :class:`DeviceError` when *container* cannot be opened.
    """
    spec = parse_cipher_spec(options.cipher or DEFAULT_CIPHER)
    bits = options.key_size if options.key_size is not None else DEFAULT_KEY_SIZE
    if bits <= 0 or bits % 8:
        raise UsageError(f"key size {bits} bits must be a positive multiple of 8")
    spec.check_key_size(bits // 8)
    SectorCipher(spec, bytes(bits // 8))  # an unimplemented cipher is refused now
    sector_size = options.sector_size or 512
    if sector_size not in SECTOR_SIZES:
        raise UsageError(f"sector size {sector_size} is not one of 512, 1024, 2048, 4096")
    if options.iv_large_sectors and sector_size > 512:
        raise UnsupportedError(
            f"LUKS2 cannot express --iv-large-sectors with {sector_size}-byte sectors "
            "(its IVs always count 512-byte sectors); the container cannot be converted."
        )
    if options.skip:
        # dm-crypt activation honours a segment's iv_tweak, but cryptsetup 2.6's
        # reencryption builds its segments from iv_tweak 0 ("TODO: + old iv_tweak"
        # in luks2_reencrypt.c), and cryptfuse's reproduces them: the data would be
        # decrypted with the wrong IVs and rewritten corrupted.
        raise UnsupportedError(
            f"--skip {options.skip}: LUKS2 can store it (segment iv_tweak), but reencryption "
            "(cryptsetup 2.6 and cryptfuse) ignores it and would corrupt the data; not converted."
        )
    if spec.keycount != 1:
        raise UnsupportedError(
            f"Unable to use cipher specification {spec} for LUKS2 "
            "(multi-key cipher specs are not converted)."
        )
    if options.header is not None:
        raise UsageError("--header is the new header file here, not an option of the plain mode")
    if os.path.lexists(new_header):
        raise CryptfuseError(
            f"Header file {new_header} already exists; it is not overwritten "
            "(give the name of a new file)."
        )
    directory = os.path.dirname(os.path.abspath(new_header))
    if not os.path.isdir(directory):
        raise DeviceError(f"Cannot create header file {new_header}: no directory {directory}.")
    # The geometry checks of plain mode (offset, skip, size, alignment) with a dummy key.
    volume = open_plain(
        container,
        secret=bytes(bits // 8),
        from_keyfile=True,
        cipher=str(spec),
        key_size=bits,
        offset=options.offset,
        skip=options.skip,
        size=options.size,
        sector_size=sector_size,
        iv_large_sectors=options.iv_large_sectors,
        readonly=True,
    )
    try:
        rest = (device_size(volume.fd) - volume.data_offset) // sector_size * sector_size
    finally:
        volume.close()
    if volume.size < rest:
        # cryptsetup 2.6 (without --device-size) and cryptfuse reencrypt up to the
        # end of the device, and both end with a "dynamic" segment.
        raise UnsupportedError(
            f"--size {options.size}: {rest - volume.size} bytes of {container} follow the "
            "volume; LUKS2 can store a fixed size, but reencryption rewrites the container "
            "up to its end (and makes the size dynamic); not converted."
        )
    return PlainPlan(
        spec,
        bits,
        options.hash or DEFAULT_HASH,
        sector_size,
        keyslots_size(options.offset, bits // 8),
    )


def keyslots_size(offset: int, key_bytes: int) -> int:
    """The keyslots area for data at *offset* 512-byte sectors and a *key_bytes* key.

    cryptsetup validates even a detached header's keyslots area against the
    first data segment: unless the data starts at 0, the two header copies
    and the keyslots area must fit below it (``hdr_validate_config``).  So the
    area is cryptsetup's default (16 MiB minus the copies) or what fits below
    the data; a container whose data starts too early for one keyslot cannot
    get a LUKS2 header.
    """
    default = DEFAULT_DATA_OFFSET - 2 * DEFAULT_METADATA_SIZE
    if offset == 0:
        return default
    room = (offset * 512 - 2 * DEFAULT_METADATA_SIZE) // KEYSLOT_ALIGN * KEYSLOT_ALIGN
    needed = area_size(key_bytes)
    if room < needed:
        raise UnsupportedError(
            f"LUKS2 cannot describe data at --offset {offset}: cryptsetup requires the "
            f"header copies and keyslots area ({2 * DEFAULT_METADATA_SIZE + needed} bytes at "
            "least) to fit below the data offset, even in a detached header."
        )
    return min(default, room)


def reencryption_room(plan: PlainPlan) -> bool:
    """Whether the keyslots area also holds what a reencryption adds: a keyslot
    for a new key of up to 512 bits and a resilience area (at least 4 KiB)."""
    needed = area_size(plan.key_bits // 8) + area_size(REENCRYPT_KEY_BYTES) + KEYSLOT_ALIGN
    return plan.keyslots_size >= needed


def plain_to_luks2(
    container: str,
    new_header: str,
    options: OpenOptions,
    secret: Secret,
    new_passphrase: bytes,
    *,
    kdf: KdfOptions | None = None,
    progress: Progress | None = None,
) -> str:
    """Write *new_header*: a detached LUKS2 header for the plain container
    *container* opened with *options* and *secret*, whose keyslot 0 holds the
    plain volume key under *new_passphrase*.  Returns the header's UUID.

    *container* is only read.  Nothing is left at *new_header* unless the
    whole header was written and made durable.
    """
    kdf = kdf if kdf is not None else KdfOptions()
    plan = check_plain_to_luks2(container, new_header, options)
    key = plain_key(str(plan.spec), plan.key_bits, plan.hash, secret.data, secret.from_keyfile)
    params = resolve_kdf(kdf, "luks2", KEYSLOT_KEY_BYTES, LUKS2_HASH, progress)
    plain = open_plain(
        container,
        secret=key,
        from_keyfile=True,
        cipher=str(plan.spec),
        key_size=plan.key_bits,
        offset=options.offset,
        skip=options.skip,
        size=options.size,
        sector_size=plan.sector_size,
        iv_large_sectors=options.iv_large_sectors,
        readonly=True,
    )
    try:
        layout = luks2_layout(
            metadata_size=None,
            keyslots_size=plan.keyslots_size,
            offset=options.offset * 512,
            detached=True,
        )
        obj = build_metadata(
            layout=layout,
            encryption=str(plan.spec),
            sector_size=plan.sector_size,
            volume_key=key,
            digest_hash=LUKS2_HASH,
            digest_iterations=digest_iterations(
                LUKS2_HASH, len(key), benchmark=kdf.force_iterations is None
            ),
        )
        segment = obj["segments"]["0"]
        segment["iv_tweak"] = str(options.skip)
        if options.size is not None:
            segment["size"] = str(options.size * 512)
        directory = os.path.dirname(os.path.abspath(new_header))
        fd, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(new_header)}.", suffix=".tmp", dir=directory
        )
        try:
            os.ftruncate(fd, 2 * layout.metadata_size + layout.keyslots_size)
            writer = Luks2Writer.new(fd, obj, layout, label="", subsystem="", uuid=None)
            writer.write_keyslot(
                0,
                key,
                new_passphrase,
                params,
                parse_cipher_spec(KEYSLOT_CIPHER),
                af_hash=LUKS2_HASH,
                area_key_bytes=KEYSLOT_KEY_BYTES,
            )
            writer.commit()
            _check_same_mapping(fd, temporary, plain, key)
            _link_no_replace(temporary, new_header)
        finally:
            os.close(fd)
            if os.path.lexists(temporary):
                os.unlink(temporary)
        _sync_directory(directory)
        return writer.uuid
    finally:
        plain.close()


def _check_same_mapping(fd: int, path: str, plain: Volume, key: bytes) -> None:
    """Read the new header back as cryptfuse opens it: the digest accepts *key*
    and the start and end of the volume decrypt as in plain mode."""
    header = read_luks2_header(fd, path)
    segment, spec, digest = header.data_segment()
    assert segment.sector_size is not None and segment.iv_tweak is not None
    if not header.verify_volume_key(key, digest):
        raise CryptfuseError("internal error: the new header's digest rejects the plain key")
    cipher = SectorCipher(spec, key, segment.sector_size, iv_offset=segment.iv_tweak)
    size = data_area_size(
        device_size(plain.fd), segment.offset, segment.sector_size, segment.size, path
    )
    if size != plain.size:
        raise CryptfuseError(
            f"internal error: the new header maps {size} bytes, plain mode {plain.size}"
        )
    length = min(_CHECK_BYTES, size)
    for start in sorted({0, size - length}):
        ciphertext = pread_exact(plain.fd, length, segment.offset + start, "container data")
        mine = cipher.decrypt(ciphertext, start // segment.sector_size)
        if bytes(mine) != plain.read(start, length):
            raise CryptfuseError(
                f"internal error: the new header decrypts byte {start} differently from plain mode"
            )


def _link_no_replace(source: str, target: str) -> None:
    """Give *source* the name *target*, atomically, failing if *target* exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise CryptfuseError(
            f"Header file {target} appeared meanwhile; it is not overwritten."
        ) from None
    except OSError as exc:
        # File systems without hard links: a rename (after a last look) is still atomic.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise DeviceError(f"Cannot create header file {target}: {exc.strerror}.") from None
        if os.path.lexists(target):
            raise CryptfuseError(
                f"Header file {target} appeared meanwhile; it is not overwritten."
            ) from None
        os.rename(source, target)


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync(fd)
    finally:
        os.close(fd)
