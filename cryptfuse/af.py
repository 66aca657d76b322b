"""LUKS anti-forensic information splitting (AF split / AF merge).

LUKS never stores a key directly in a keyslot: it stores ``stripes`` blocks
whose combination yields the key, so that destroying any single block (a
bad sector remapped by the drive, a partial wipe) destroys the key.  The LUKS1
on-disk specification defines, for a key of ``n`` bytes and ``stripes`` blocks
``s_0 .. s_{stripes-1}`` of ``n`` bytes each::

    d_0     = 0^n
    d_{k+1} = H(d_k XOR s_k)                 for k = 0 .. stripes-2
    key     = d_{stripes-1} XOR s_{stripes-1}

where ``H`` is the *diffusion* function: the buffer is cut into blocks of the
hash's digest size, block ``i`` is replaced by ``hash(be32(i) || block_i)``,
and a final partial block is replaced by the first bytes of its hash.  LUKS2
keyslots with ``"af": {"type": "luks1"}`` use exactly the same construction.

Only the standard library and :mod:`cryptfuse.hashes` are used here, so the module
sits in the lowest layer with :mod:`cryptfuse.spec`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from . import hashes
from .errors import UsageError

__all__ = ["af_merge", "af_split", "af_sectors", "diffuse"]

def _hash_constructor(hash_name: str) -> Callable[[bytes], bytes]:
    """Return a function hashing bytes with cryptsetup hash *hash_name*.

    :mod:`cryptfuse.hashes` resolves the name once per merge, not per block
    (hashlib for the common hashes, libgcrypt for Whirlpool, Streebog, ...).
    """
    return hashes.hasher(hash_name)


def diffuse(data: bytes, hash_name: str) -> bytes:
    """The LUKS diffusion function ``H`` over *data* (any length).

    Each digest-sized block ``i`` becomes ``hash(be32(i) || block)``; the last,
    possibly partial, block is hashed the same way and its digest truncated to
    the block's length.
    """
    new = _hash_constructor(hash_name)
    return _diffuse(data, new)


def _diffuse(data: bytes, new: Callable[[bytes], bytes]) -> bytes:
    digest_size = len(new(b""))
    out = bytearray()
    for i, start in enumerate(range(0, len(data), digest_size)):
        block = data[start : start + digest_size]
        out += new(i.to_bytes(4, "big") + block)[: len(block)]
    return bytes(out)


def _check(key_len: int, stripes: int) -> None:
    if key_len <= 0:
        raise UsageError(f"AF key length {key_len} must be positive")
    if stripes <= 0:
        raise UsageError(f"AF stripe count {stripes} must be positive")


def af_sectors(key_len: int, stripes: int) -> int:
    """Number of 512-byte sectors that ``stripes`` blocks of *key_len* bytes occupy.

    This is cryptsetup's ``AF_split_sectors``: the keyslot material is always
    stored (and encrypted) as whole 512-byte sectors.
    """
    _check(key_len, stripes)
    return (key_len * stripes + 511) // 512


def af_merge(
    material: bytes | bytearray | memoryview, key_len: int, stripes: int, hash_name: str
) -> bytes:
    """Recover a *key_len*-byte key from its AF-split *material*.

    *material* must hold at least ``key_len * stripes`` bytes (the decrypted
    keyslot area, possibly padded to whole sectors); the excess is ignored.
    """
    _check(key_len, stripes)
    view = memoryview(material).cast("B")
    if len(view) < key_len * stripes:
        raise UsageError(
            f"AF material of {len(view)} bytes is shorter than {stripes} stripes of {key_len} bytes"
        )
    new = _hash_constructor(hash_name)
    # Python ints XOR a whole block at once, far faster than a byte loop.
    d = 0
    for k in range(stripes - 1):
        block = int.from_bytes(view[k * key_len : (k + 1) * key_len], "big")
        d = int.from_bytes(_diffuse((d ^ block).to_bytes(key_len, "big"), new), "big")
    last = int.from_bytes(view[(stripes - 1) * key_len : stripes * key_len], "big")
    return (d ^ last).to_bytes(key_len, "big")


def af_split(
    key: bytes,
    stripes: int,
    hash_name: str,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Split *key* into ``stripes`` blocks (``len(key) * stripes`` bytes).

    The first ``stripes - 1`` blocks are random; the last one makes
    :func:`af_merge` return *key*.  *random_bytes* exists for known-answer
    tests; keyslot creation must keep the default (``os.urandom``).
    The caller pads the result to :func:`af_sectors` sectors before encrypting.
    """
    key_len = len(key)
    _check(key_len, stripes)
    new = _hash_constructor(hash_name)
    out = bytearray()
    d = 0
    for _ in range(stripes - 1):
        block = random_bytes(key_len)
        if len(block) != key_len:
            raise UsageError("random source returned a short block")
        out += block
        d = int.from_bytes(
            _diffuse((d ^ int.from_bytes(block, "big")).to_bytes(key_len, "big"), new), "big"
        )
    out += (d ^ int.from_bytes(key, "big")).to_bytes(key_len, "big")
    return bytes(out)
