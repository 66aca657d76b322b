"""Cryptographic primitives of the foreign formats (TCRYPT, BITLK, FVAULT2).

The formats in :mod:`cryptfuse.formats` may not import ``cryptography``; what their
metadata needs beyond PBKDF2/Argon2 (:mod:`cryptfuse.kdf`) and the sector engine
(:mod:`cryptfuse.sector`) lives here:

* AES-CCM decryption with a 12-byte nonce and a 16-byte tag (BitLocker's VMK, FVEK
  and metadata validation datum);
* BitLocker's SHA-256 key stretching (2**20 rounds over a 88-byte record);
* AES key unwrap (RFC 3394 / NIST SP 800-38F KW, FileVault 2's KEK and volume key);
* one AES-XTS data unit of any length (FileVault 2's 8 KiB metadata blocks);
* the byte table of a reflected CRC-32 (TrueCrypt's key-file pool, FileVault 2's
  CRC-32C).

Every decryption that authenticates returns None on a wrong key instead of raising:
callers try several keys.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from .errors import UnsupportedError

__all__ = [
    "BITLK_STRETCH_ROUNDS",
    "aes_ccm_decrypt",
    "aes_unwrap",
    "bitlk_stretch",
    "xts_decrypt_unit",
]

#: rounds of BitLocker's key stretching (cryptsetup's BITLK_KDF_ITERATION_COUNT)
BITLK_STRETCH_ROUNDS = 0x100000


def aes_ccm_decrypt(key: bytes, nonce: bytes, data: bytes, tag: bytes) -> bytes | None:
    """AES-CCM decryption of *data* (no associated data); None when the tag is wrong."""
    if len(key) not in (16, 24, 32) or len(tag) != 16 or not 7 <= len(nonce) <= 13:
        return None
    try:
        return AESCCM(key, tag_length=16).decrypt(nonce, data + tag, None)
    except (InvalidTag, ValueError):
        return None


def bitlk_stretch(initial: bytes, salt: bytes, rounds: int = BITLK_STRETCH_ROUNDS) -> bytes:
    """BitLocker's key stretching: *rounds* of ``last = sha256(last || initial || salt || count)``.

    *initial* is sha256(sha256(UTF-16LE password)) or sha256(recovery key); the
    record is 32 + 32 + 16 + 8 bytes with a little-endian 64-bit counter from 0.
    """
    if len(initial) != 32 or len(salt) != 16:
        raise ValueError("BitLocker stretching takes a 32-byte hash and a 16-byte salt")
    tail = initial + salt
    pack = struct.Struct("<Q").pack
    sha256 = hashlib.sha256
    last = bytes(32)
    for count in range(rounds):
        last = sha256(last + tail + pack(count)).digest()
    return last


def aes_unwrap(kek: bytes, wrapped: bytes) -> bytes | None:
    """RFC 3394 AES key unwrap; None when the integrity check value does not match."""
    if len(kek) not in (16, 24, 32) or len(wrapped) < 24 or len(wrapped) % 8:
        return None
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        return None


def xts_decrypt_unit(cipher: str, key: bytes, tweak: bytes, data: bytes) -> bytes:
    """Decrypt one AES-XTS data unit (whole blocks; *key* = both XTS keys, data key first).

    FileVault 2's 8 KiB metadata blocks are one unit each, with the block index as tweak.
    """
    if cipher != "aes":
        raise UnsupportedError(f"cipher {cipher!r} is not supported for metadata")
    if len(data) % 16 or not data:
        raise ValueError("an XTS unit is a positive number of 16-byte blocks")
    half = len(key) // 2
    if key[:half] == key[half:]:  # OpenSSL refuses such keys; they are corrupt metadata
        raise ValueError("XTS key halves are equal")
    ctx = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    return ctx.update(data) + ctx.finalize()


def crc_table(polynomial: int) -> list[int]:
    """The 256-entry table of the reflected CRC-32 with *polynomial* (reversed form:
    0xEDB88320 for CRC-32, 0x82F63B78 for CRC-32C)."""
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ polynomial if c & 1 else c >> 1
        table.append(c)
    return table
