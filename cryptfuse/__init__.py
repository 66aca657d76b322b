"""cryptfuse: dm-crypt and cryptsetup, rebuilt in userspace.

The public API is listed in ``__all__``.  The exception tree is imported eagerly (it has
no dependencies); everything else is imported on first use, so ``import cryptfuse`` stays
cheap and never pulls in ``cryptography``, ``numpy``, ``trio`` or ``pyfuse3``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BusyError,
    CryptfuseError,
    DeviceError,
    FormatError,
    InsufficientMemoryError,
    KeyFileError,
    KeyslotError,
    OutOfRangeError,
    ReadOnlyError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)

if TYPE_CHECKING:
    from .formats import OpenOptions, Secret, open_volume
    from .sector import SectorCipher
    from .spec import CipherSpec, parse_cipher_spec
    from .volume import Volume

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # cipher specs and the sector engine
    "CipherSpec",
    "parse_cipher_spec",
    "SectorCipher",
    # opening containers
    "Volume",
    "OpenOptions",
    "Secret",
    "open_volume",
    # errors
    "CryptfuseError",
    "UsageError",
    "FormatError",
    "UnsupportedError",
    "WrongPassphraseError",
    "KeyFileError",
    "KeyslotError",
    "InsufficientMemoryError",
    "DeviceError",
    "BusyError",
    "ReadOnlyError",
    "OutOfRangeError",
]

# name -> submodule that defines it; resolved by __getattr__ (PEP 562) on first access.
_LAZY = {
    "CipherSpec": ".spec",
    "parse_cipher_spec": ".spec",
    "SectorCipher": ".sector",
    "Volume": ".volume",
    "OpenOptions": ".formats",
    "Secret": ".formats",
    "open_volume": ".formats",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
