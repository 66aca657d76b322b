"""Hash functions by their cryptsetup/kernel names: digests and PBKDF2.

cryptsetup hands hash names to its crypto backend (libgcrypt by default) and, for
ESSIV, to the kernel.  :mod:`hashlib` (OpenSSL) computes the common ones fastest;
the rest -- Whirlpool, Streebog, BLAKE2 with a non-default length, and the
kernel's truncated Whirlpools ``wp256``/``wp384`` -- come from libgcrypt through
the C extension :mod:`cryptfuse._gcrypt` (docs/ciphers.md).  Names neither
provides raise :class:`UnsupportedError`.

Only the standard library and that extension are used, so the lowest layer
(:mod:`cryptfuse.spec`, :mod:`cryptfuse.af`) can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UnsupportedError, UsageError

try:  # libgcrypt's hashes (setup.py builds the extension where libgcrypt20-dev is present)
    from . import _gcrypt
except ImportError:  # pragma: no cover - depends on the build
    _gcrypt = None  # type: ignore[assignment]

__all__ = ["check", "digest", "digest_size", "hasher", "pbkdf2"]


@dataclass(frozen=True)
class _Hash:
    hashlib: str | None  # hashlib's name, when OpenSSL computes it
    gcrypt: str | None  # libgcrypt's name
    length: int | None = None  # truncate the digest (the kernel's wp256/wp384)


_HASHES: dict[str, _Hash] = {
    "md5": _Hash("md5", "MD5"),
    "sha1": _Hash("sha1", "SHA1"),
    "sha224": _Hash("sha224", "SHA224"),
    "sha256": _Hash("sha256", "SHA256"),
    "sha384": _Hash("sha384", "SHA384"),
    "sha512": _Hash("sha512", "SHA512"),
    "ripemd160": _Hash("ripemd160", "RIPEMD160"),
    "sha3-224": _Hash("sha3_224", "SHA3-224"),
    "sha3-256": _Hash("sha3_256", "SHA3-256"),
    "sha3-384": _Hash("sha3_384", "SHA3-384"),
    "sha3-512": _Hash("sha3_512", "SHA3-512"),
    "sm3": _Hash("sm3", "SM3"),
    "blake2b-512": _Hash("blake2b", "BLAKE2B_512"),
    "blake2b-384": _Hash(None, "BLAKE2B_384"),
    "blake2b-256": _Hash(None, "BLAKE2B_256"),
    "blake2b-160": _Hash(None, "BLAKE2B_160"),
    "blake2s-256": _Hash("blake2s", "BLAKE2S_256"),
    "blake2s-224": _Hash(None, "BLAKE2S_224"),
    "blake2s-160": _Hash(None, "BLAKE2S_160"),
    "blake2s-128": _Hash(None, "BLAKE2S_128"),
    "whirlpool": _Hash(None, "WHIRLPOOL"),
    "stribog256": _Hash(None, "STRIBOG256"),
    "stribog512": _Hash(None, "STRIBOG512"),
    # the kernel's Whirlpool family (ESSIV hashes in dm-crypt tables: essiv:wp256)
    "wp512": _Hash(None, "WHIRLPOOL"),
    "wp384": _Hash(None, "WHIRLPOOL", 48),
    "wp256": _Hash(None, "WHIRLPOOL", 32),
}
#: other spellings: cryptsetup's, the kernel's, hashlib's
_ALIASES = {
    "rmd160": "ripemd160",
    "streebog256": "stribog256",
    "streebog512": "stribog512",
    "sha3_224": "sha3-224",
    "sha3_256": "sha3-256",
    "sha3_384": "sha3-384",
    "sha3_512": "sha3-512",
    "blake2b": "blake2b-512",
    "blake2s": "blake2s-256",
}


def _lookup(name: str) -> _Hash:
    key = name.lower()
    key = _ALIASES.get(key, key)
    entry = _HASHES.get(key)
    if entry is not None:
        if entry.hashlib is not None and entry.hashlib in hashlib.algorithms_available:
            return _Hash(entry.hashlib, None, entry.length)
        if entry.gcrypt is not None and _gcrypt is not None:
            return _Hash(None, entry.gcrypt, entry.length)
        raise UnsupportedError(
            f"hash {name!r} is not available (it needs libgcrypt: cryptfuse._gcrypt is not built)"
        )
    raise UnsupportedError(f"hash {name!r} is not supported")


def check(name: str) -> None:
    """Raise :class:`UnsupportedError` unless hash *name* can be computed here."""
    _lookup(name)


def hasher(name: str) -> Callable[[bytes], bytes]:
    """A function returning the digest of its argument; the name is resolved once."""
    entry = _lookup(name)
    length = entry.length
    if entry.hashlib is not None:
        algorithm = entry.hashlib
        ctor = (
            getattr(hashlib, algorithm, None)
            if algorithm in hashlib.algorithms_guaranteed
            else None
        )
        if ctor is not None and length is None:
            return lambda data: ctor(data).digest()
        return lambda data: hashlib.new(algorithm, data).digest()[:length]
    assert entry.gcrypt is not None and _gcrypt is not None
    gname = entry.gcrypt
    gdigest = _gcrypt.digest
    if length is None:
        return lambda data: gdigest(gname, data)
    return lambda data: gdigest(gname, data)[:length]


def digest(name: str, data: bytes | bytearray | memoryview) -> bytes:
    """The digest of *data* with hash *name*."""
    return hasher(name)(bytes(data))


def digest_size(name: str) -> int:
    """The digest size in bytes of hash *name*."""
    entry = _lookup(name)
    if entry.length is not None:
        return entry.length
    if entry.hashlib is not None:
        return hashlib.new(entry.hashlib).digest_size
    assert entry.gcrypt is not None and _gcrypt is not None
    return int(_gcrypt.digest_size(entry.gcrypt))


def pbkdf2(name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC with hash *name* (RFC 8018)."""
    if iterations < 1:
        raise UsageError(f"PBKDF2 iteration count {iterations} is invalid")
    entry = _lookup(name)
    if entry.length is not None:
        raise UnsupportedError(f"hash {name!r} is not supported for PBKDF2")
    if entry.hashlib is not None:
        return hashlib.pbkdf2_hmac(entry.hashlib, password, salt, iterations, length)
    assert entry.gcrypt is not None and _gcrypt is not None
    return bytes(_gcrypt.pbkdf2(entry.gcrypt, password, salt, iterations, length))
