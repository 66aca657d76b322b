"""``cryptfuse benchmark``: KDF and cipher speeds of this machine, like ``cryptsetup benchmark``.

Everything runs in memory with cryptfuse's own engine (:class:`SectorCipher`)
and KDFs, on one core, so the figures are what the daemon can reach at most.
Ciphers that the C data path serves (AES-XTS/CBC, sector-number or ESSIV IV) get a
second line with its speed: that is what the daemon uses for them.  Ciphers libgcrypt
serves get a second line with libgcrypt's own speed in that mode (one call over the
whole batch with one IV: the library's best case, the yardstick of docs/ciphers.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import CryptfuseError
from .kdf import argon2, pbkdf2
from .sector import GCRYPT_CIPHERS, SectorCipher
from .spec import parse_cipher_spec
from .volume import fast_path_for

#: (cipher spec, key bits) pairs, in cryptsetup benchmark's order
DEFAULT_CIPHERS: tuple[tuple[str, int], ...] = (
    ("aes-cbc-essiv:sha256", 128),
    ("aes-cbc-essiv:sha256", 256),
    ("serpent-cbc-essiv:sha256", 128),
    ("twofish-cbc-essiv:sha256", 128),
    ("aes-xts-plain64", 256),
    ("serpent-xts-plain64", 256),
    ("twofish-xts-plain64", 256),
    ("aes-xts-plain64", 512),
    ("serpent-xts-plain64", 512),
    ("twofish-xts-plain64", 512),
    ("camellia-xts-plain64", 256),
    ("camellia-xts-plain64", 512),
    ("sm4-xts-plain64", 256),
    ("cast5-cbc-plain64", 128),
    ("blowfish-cbc-plain64", 256),
    ("aes-lrw-benbi", 384),
    ("aes-cbc-plain64", 256),
)
DEFAULT_HASHES = ("sha1", "sha256", "sha512", "ripemd160", "whirlpool", "stribog512")
#: the C data path handles FUSE requests, at most 1 MiB
MAX_FAST_BATCH = 1 << 20


@dataclass(frozen=True)
class CipherResult:
    """Throughput of one cipher spec, in bytes per second."""

    spec: str
    key_bits: int
    sector_size: int
    batch: int
    encrypt: float
    decrypt: float


def _rate(work: Callable[[], object], nbytes: int, seconds: float) -> float:
    """Bytes per second of *work*, best of repeated runs for about *seconds*."""
    work()  # warm up allocations and OpenSSL contexts
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return nbytes / best


def _measure(
    spec_text: str,
    key_bits: int,
    sector_size: int,
    batch: int,
    seconds: float,
    encrypt: Callable[[bytes, int], object],
    decrypt: Callable[[bytes, int], object],
) -> CipherResult:
    data = os.urandom(batch)
    sector = 1 << 20
    return CipherResult(
        spec_text,
        key_bits,
        sector_size,
        batch,
        _rate(lambda: encrypt(data, sector), batch, seconds),
        _rate(lambda: decrypt(data, sector), batch, seconds),
    )


def cipher_speed(
    spec_text: str,
    key_bits: int,
    sector_size: int = 512,
    batch: int = 1 << 20,
    seconds: float = 0.5,
) -> CipherResult:
    """Measure in-memory encryption and decryption of *batch*-byte runs of sectors."""
    cipher = SectorCipher(parse_cipher_spec(spec_text), os.urandom(key_bits // 8), sector_size)
    return _measure(
        spec_text, key_bits, sector_size, batch, seconds, cipher.encrypt, cipher.decrypt
    )


def fast_path_speed(
    spec_text: str,
    key_bits: int,
    sector_size: int = 512,
    batch: int = 1 << 20,
    seconds: float = 0.5,
) -> CipherResult | None:
    """The same for the C data path, on one core; None where it does not serve the spec."""
    cipher = SectorCipher(parse_cipher_spec(spec_text), os.urandom(key_bits // 8), sector_size)
    fast = fast_path_for(cipher, fd=-1, data_offset=0, size=batch, readonly=True)
    if fast is None:
        return None
    worker = fast.worker()
    return _measure(
        spec_text, key_bits, sector_size, batch, seconds, worker.encrypt, worker.decrypt
    )


def library_speed(
    spec_text: str,
    key_bits: int,
    sector_size: int = 512,
    batch: int = 1 << 20,
    seconds: float = 0.5,
) -> CipherResult | None:
    """libgcrypt's own speed in the spec's chain mode (None where libgcrypt does not serve it).

    One call over the whole batch with a single IV: no per-sector work at all.
    """
    spec = parse_cipher_spec(spec_text)
    key = os.urandom(key_bits // 8)
    cipher = SectorCipher(spec, key, sector_size)
    if cipher.engine is None or spec.chainmode not in ("xts", "cbc", "ecb", "ctr"):
        return None
    from . import _gcrypt  # present: the engine above comes from it

    if spec.keycount != 1 or spec.ivmode in ("lmk", "tcw"):
        return None
    iv = bytes(spec.block_size)
    name = GCRYPT_CIPHERS[spec.cipher]

    def make(encrypt: bool) -> Callable[[bytes, int], object]:
        out = bytearray(batch)

        def work(data: bytes, _sector: int) -> object:
            _gcrypt.library_crypt(name, spec.chainmode, key, iv, data, out, encrypt)
            return out

        return work

    return _measure(spec_text, key_bits, sector_size, batch, seconds, make(True), make(False))


def pbkdf2_speed(hash_name: str, seconds: float = 0.3) -> float:
    """PBKDF2 iterations per second for a 256-bit key."""
    iterations = 10000
    while True:
        start = time.perf_counter()
        pbkdf2(hash_name, b"benchmark", b"\0" * 32, iterations, 32)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or iterations > 1 << 26:
            return iterations / elapsed
        iterations *= 4


def argon2_speed(kind: str, memory_kib: int = 65536, parallel: int = 1) -> float:
    """Seconds for one Argon2 pass (time cost 4) with *memory_kib* KiB."""
    start = time.perf_counter()
    argon2(kind, b"benchmark", b"\0" * 32, 4, memory_kib, parallel, 32)
    return time.perf_counter() - start


def run(
    ciphers: tuple[tuple[str, int], ...] = DEFAULT_CIPHERS,
    sector_size: int = 512,
    batch: int = 1 << 20,
    seconds: float = 0.5,
    kdf: bool = True,
) -> Iterator[str]:
    """Yield the report line by line, as ``cryptsetup benchmark`` lays it out."""
    yield "# Tests are approximate using memory only (no storage IO), one core."
    if kdf:
        for name in DEFAULT_HASHES:
            try:
                rate = pbkdf2_speed(name)
            except CryptfuseError as exc:
                yield f"PBKDF2-{name:<9}  N/A ({exc})"
                continue
            yield f"PBKDF2-{name:<9} {rate:12,.0f} iterations per second for 256-bit key"
        for kind in ("argon2i", "argon2id"):
            seconds_taken = argon2_speed(kind)
            yield f"{kind:<16} 4 iterations, 65536 KiB, 1 thread: {seconds_taken:.3f} s"
    yield (
        "#     Algorithm |       Key |      Encryption |      Decryption   "
        f"({sector_size}-byte sectors, {batch // 1024} KiB batches)"
    )
    for spec_text, key_bits in ciphers:
        try:
            result = cipher_speed(spec_text, key_bits, sector_size, batch, seconds)
        except CryptfuseError as exc:
            yield f"{spec_text:>22} {key_bits:4d}b   N/A ({exc})"
            continue
        yield (
            f"{spec_text:>22} {key_bits:4d}b {result.encrypt / 1e6:10.1f} MB/s "
            f"{result.decrypt / 1e6:10.1f} MB/s"
        )
        library = library_speed(spec_text, key_bits, sector_size, batch, seconds)
        if library is not None:
            yield (
                f"{'(libgcrypt own mode)':>22} {key_bits:4d}b {library.encrypt / 1e6:10.1f} MB/s "
                f"{library.decrypt / 1e6:10.1f} MB/s   (cryptfuse: "
                f"{result.encrypt / library.encrypt:.0%} / {result.decrypt / library.decrypt:.0%})"
            )
        if batch <= MAX_FAST_BATCH:
            fast = fast_path_speed(spec_text, key_bits, sector_size, batch, seconds)
            if fast is not None:
                yield (
                    f"{'(C data path)':>22} {key_bits:4d}b {fast.encrypt / 1e6:10.1f} MB/s "
                    f"{fast.decrypt / 1e6:10.1f} MB/s"
                )
