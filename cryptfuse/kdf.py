"""Key derivation: PBKDF2, Argon2, plain-mode passphrase hashing, digest checks.

Hash names are cryptsetup's (``sha256``, ``sha3-256``, ``ripemd160``, ``blake2b-512``,
``whirlpool``, ``stribog512``); :mod:`cryptfuse.hashes` computes them (hashlib, or
libgcrypt for what OpenSSL lacks).  :func:`hashlib_name` maps the hashlib ones.
The Argon2 functions check
the memory they are about to allocate against what the machine has *before*
running, so that an out-of-memory condition is never mistaken for a wrong
passphrase.
"""

from __future__ import annotations

import hmac
import os

from cryptography.hazmat.primitives.kdf.argon2 import Argon2i, Argon2id

from . import hashes
from .errors import InsufficientMemoryError, UnsupportedError, UsageError
from .spec import hashlib_name

__all__ = [
    "argon2",
    "available_memory_kib",
    "digest_equal",
    "hash_size",
    "hashlib_name",
    "pbkdf2",
    "plain_hash",
]


def hash_size(name: str) -> int:
    """Digest size in bytes of cryptsetup hash *name*."""
    return hashes.digest_size(name)


def digest_equal(a: bytes, b: bytes) -> bool:
    """Compare two digests in constant time."""
    return hmac.compare_digest(a, b)


def pbkdf2(hash_name: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC with cryptsetup hash *hash_name*."""
    return hashes.pbkdf2(hash_name, password, salt, iterations, length)


def available_memory_kib() -> int:
    """Memory this process may allocate, in KiB (MemAvailable, capped by cgroup limits)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1])
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 1024
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            available = min(available, int(limit) // 1024)
    except (OSError, ValueError):
        pass
    return available


def argon2(
    kind: str,
    password: bytes,
    salt: bytes,
    time_cost: int,
    memory_kib: int,
    parallelism: int,
    length: int,
    *,
    secret: bytes | None = None,
    ad: bytes | None = None,
) -> bytes:
    """Argon2i or Argon2id (version 0x13) as LUKS2 uses it (no *secret*, no *ad*).

    Raises :class:`InsufficientMemoryError` when *memory_kib* exceeds the memory
    available, before allocating anything.
    """
    classes: dict[str, type[Argon2i] | type[Argon2id]] = {"argon2i": Argon2i, "argon2id": Argon2id}
    if kind not in classes:
        raise UnsupportedError(f"KDF {kind!r} is not supported")
    if time_cost < 1 or parallelism < 1 or memory_kib < 8 * parallelism:
        raise UsageError(
            f"invalid {kind} parameters (time {time_cost}, memory {memory_kib} KiB, "
            f"parallel {parallelism})"
        )
    available = available_memory_kib()
    if memory_kib > available:
        raise InsufficientMemoryError(
            f"{kind} needs {memory_kib} KiB of memory but only {available} KiB are available"
        )
    kdf = classes[kind](
        salt=salt,
        length=length,
        iterations=time_cost,
        lanes=parallelism,
        memory_cost=memory_kib,
        secret=secret,
        ad=ad,
    )
    try:
        return kdf.derive(password)
    except MemoryError as exc:
        raise InsufficientMemoryError(f"{kind}: out of memory ({memory_kib} KiB)") from exc


def plain_hash(hash_spec: str, key_size: int, passphrase: bytes) -> bytes:
    """Derive a plain-mode key as cryptsetup's ``crypt_plain_hash`` does.

    *hash_spec* is ``hash`` or ``hash:len`` (only *len* bytes are hashed, the
    rest of the key is zero); ``plain`` uses the passphrase itself, truncated or
    zero-padded to the key size.  A key longer than the digest is filled by
    rounds that prefix the passphrase with one more ``A`` each time (the
    hashalot convention cryptsetup kept).
    """
    name, sep, length_text = hash_spec.partition(":")
    if sep:
        if not length_text.isdigit() or int(length_text) == 0:
            raise UsageError(f"invalid hash specification {hash_spec!r}")
        hashed = int(length_text)
        if hashed > key_size:
            raise UsageError(f"hash length {hashed} exceeds the key size {key_size}")
    else:
        hashed = key_size

    if name == "plain":
        if not sep:
            # cryptsetup passes no hash at all: copy, zero-padded or truncated.
            return passphrase[:key_size].ljust(key_size, b"\0")
        if len(passphrase) < hashed:
            raise UsageError(f"passphrase is shorter than {hashed} bytes")
        return passphrase[:hashed].ljust(key_size, b"\0")

    digest_of = hashes.hasher(name)
    key = bytearray()
    round_ = 0
    while len(key) < hashed:
        digest = digest_of(b"A" * round_ + passphrase)
        key += digest[: hashed - len(key)]
        round_ += 1
    return bytes(key).ljust(key_size, b"\0")
