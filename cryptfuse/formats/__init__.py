"""Container formats: detection, and opening a container as a :class:`Volume`.

Nothing in this package writes to a container when opening it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import DeviceError, FormatError, UsageError
from ..volume import Volume
from .bitlk import has_bitlk_signature, open_bitlk
from .fvault2 import has_fvault2_signature, open_fvault2
from .luks1 import open_luks1
from .luks2 import has_luks2_header, open_luks2
from .plain import open_plain
from .tcrypt import TcryptOptions, open_tcrypt

__all__ = [
    "FOREIGN_TYPES",
    "OpenOptions",
    "Secret",
    "TcryptOptions",
    "detect_foreign",
    "detect_type",
    "open_volume",
    "TYPES",
]

#: TrueCrypt/VeraCrypt, BitLocker, FileVault 2 (docs/foreign.md)
FOREIGN_TYPES = ("tcrypt", "bitlk", "fvault2")
TYPES = ("luks", "luks1", "luks2", "plain", *FOREIGN_TYPES)
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS2_SECONDARY_MAGIC = b"SKUL\xba\xbe"


@dataclass(frozen=True)
class OpenOptions:
    """How to open a container; plain-mode fields default to cryptsetup 2.6's."""

    type: str | None = None
    readonly: bool = False
    header: str | None = None
    key_slot: int | None = None
    allow_discards: bool = False
    cipher: str | None = None
    key_size: int | None = None
    hash: str | None = None
    offset: int = 0
    skip: int = 0
    size: int | None = None
    sector_size: int | None = None
    iv_large_sectors: bool = False
    tcrypt: TcryptOptions | None = None  # --type tcrypt: PIM, hidden, key files, ...
    #: LUKS: open with the volume key in this file (checked), not a keyslot
    volume_key_file: str | None = None


@dataclass(frozen=True)
class Secret:
    """A passphrase or key file contents (offset and size already applied).

    ``from_keyfile`` is true for ``--key-file FILE`` (not ``-``): plain mode then
    uses the bytes as the raw key instead of hashing them.
    """

    data: bytes
    from_keyfile: bool = False

    def __repr__(self) -> str:  # never show the secret in logs or tracebacks
        return f"Secret(<{len(self.data)} bytes>, from_keyfile={self.from_keyfile})"


def detect_type(path: str) -> str | None:
    """Return ``"luks1"`` or ``"luks2"`` from the header magic and version, else None.

    A LUKS2 container whose primary header was wiped is still LUKS2 when a valid
    secondary copy sits at one of the allowed offsets (cryptsetup finds it too).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8 or head[:6] != LUKS_MAGIC:
                return "luks2" if has_luks2_header(f.fileno()) else None
    except FileNotFoundError:
        raise DeviceError(f"Device {path} does not exist.") from None
    except OSError as exc:
        raise DeviceError(f"Cannot read {path}: {exc.strerror}.") from None
    version = int.from_bytes(head[6:8], "big")
    if version == 1:
        return "luks1"
    if version == 2:
        return "luks2"
    raise FormatError(f"{path} has a LUKS header of unknown version {version}")


def detect_foreign(path: str) -> str | None:
    """``"bitlk"`` or ``"fvault2"`` from their signatures, else None (TCRYPT has none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError(f"Device {path} does not exist.") from None
    except OSError as exc:
        raise DeviceError(f"Cannot read {path}: {exc.strerror}.") from None
    try:
        if has_bitlk_signature(fd):
            return "bitlk"
        if has_fvault2_signature(fd):
            return "fvault2"
        return None
    finally:
        os.close(fd)


def _open_foreign(container: str, options: OpenOptions, secret: Secret | None) -> Volume:
    if options.header is not None:
        raise UsageError(f"--header is not supported for --type {options.type}")
    data = secret.data if secret is not None else None
    if options.type == "bitlk":
        return open_bitlk(container, data, options.readonly)
    if data is None:
        raise UsageError(f"--type {options.type} needs a passphrase")
    if options.type == "fvault2":
        return open_fvault2(container, data, options.readonly)
    return open_tcrypt(container, data, options.tcrypt or TcryptOptions(), options.readonly)


def open_volume(container: str, options: OpenOptions, secret: Secret | None) -> Volume:
    """Open *container* as *options* say, unlocking it with *secret*.

    *secret* None is only meaningful for BITLK (a clear-key protector).
    """
    kind = options.type
    if kind is not None and kind not in TYPES:
        raise UsageError(f"unknown device type {kind!r} (use one of {', '.join(TYPES)})")
    if options.volume_key_file is not None and kind not in (None, "luks", "luks1", "luks2"):
        raise UsageError("--volume-key-file is for LUKS containers.")
    if kind in FOREIGN_TYPES:
        return _open_foreign(container, options, secret)
    if secret is None:
        if options.volume_key_file is None:
            raise UsageError("a passphrase or key file is needed")
        secret = Secret(b"")
    if kind == "plain":
        if options.header is not None:
            raise UsageError("--header is meaningless for plain mode")
        return open_plain(
            container,
            secret=secret.data,
            from_keyfile=secret.from_keyfile,
            cipher=options.cipher,
            key_size=options.key_size,
            hash_spec=options.hash,
            offset=options.offset,
            skip=options.skip,
            size=options.size,
            sector_size=options.sector_size,
            iv_large_sectors=options.iv_large_sectors,
            readonly=options.readonly,
        )
    header = options.header or container
    if not os.path.exists(container):
        raise DeviceError(f"Device {container} does not exist.")
    found = detect_type(header)
    if found is None:
        where = f"header file {header}" if options.header else container
        raise FormatError(
            f"{where} is not a LUKS device (no LUKS header); "
            "use --type plain to open a plain dm-crypt container"
        )
    if kind in ("luks1", "luks2") and found != kind:
        raise FormatError(f"{header} is {found.upper()}, not {kind.upper()}")
    vk = options.volume_key_file
    if found == "luks1":
        return open_luks1(
            container, options.header, secret.data, options.key_slot, options.readonly, vk
        )
    return open_luks2(
        container, options.header, secret.data, options.key_slot, options.readonly, vk
    )
