"""Writing LUKS metadata: durable writes, wipes, KDF parameters, keyslot material.

Shared by :mod:`.luks1_write` and :mod:`.luks2_write`.  Every write goes
through :func:`pwrite_all` and every ordering point through :func:`sync`, so
the crash-safety tests can interpose on exactly two functions of :mod:`os`
(``pwrite`` and ``fsync``) and stop the process between any two of them.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..af import af_sectors, af_split
from ..errors import DeviceError, UsageError
from ..kdf import argon2, available_memory_kib, hash_size, pbkdf2
from ..sector import SectorCipher
from ..spec import CipherSpec
from ..volume import pwrite_all, pwrite_direct

__all__ = [
    "KdfParams",
    "Progress",
    "benchmark_kdf",
    "derive",
    "encrypt_keyslot_material",
    "pbkdf2_per_second",
    "pwrite_all",
    "sync",
    "wipe_area",
]

#: ``progress(what, fraction)``: fraction in [0, 1]; called for long steps only.
Progress = Callable[[str, float], None]

#: cryptsetup's lower bounds (LUKS_SLOT_ITERATIONS_MIN / LUKS_MKD_ITERATIONS_MIN)
PBKDF2_MIN_ITERATIONS = 1000
#: cryptsetup's Argon2 defaults: 1 GiB at most, 4 lanes at most, >= 4 passes
ARGON2_MAX_MEMORY_KIB = 1024 * 1024  # cryptsetup's default
ARGON2_LIMIT_MEMORY_KIB = 4 * 1024 * 1024  # the most cryptsetup accepts
ARGON2_MIN_MEMORY_KIB = 32
ARGON2_MIN_TIME = 4
ARGON2_MAX_PARALLEL = 4
#: the volume-key digest costs about this much (cryptsetup's LUKS_MKD_ITERATIONS_MS)
DIGEST_ITERATION_MS = 125


def sync(fd: int) -> None:
    """fsync *fd*: every ordering point of a metadata update goes through here."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DeviceError(f"fsync failed: {exc.strerror}") from None


def wipe_area(fd: int, offset: int, length: int, what: str) -> None:
    """Overwrite a keyslot area: zeros, then random bytes, each pass made durable
    (that range alone: not the rest of a mounted container's dirty pages).

    cryptsetup overwrites removed keyslots with a multi-pass pattern ending in
    random data; two passes give the same end state (the area is
    indistinguishable from unused random material) at a fraction of the cost
    on an image file, where repeated passes buy nothing.  Both go around the page
    cache where they can (:func:`~cryptfuse.volume.pwrite_direct`), as cryptsetup's do.
    """
    buf = mmap.mmap(-1, max(length, 1))  # zeros, page aligned
    try:
        with memoryview(buf)[:length] as view:
            pwrite_direct(fd, view, offset, what, durable=True)
            view[:] = os.urandom(length)
            pwrite_direct(fd, view, offset, what, durable=True)
    finally:
        buf.close()


@dataclass(frozen=True)
class KdfParams:
    """The cost of a keyslot KDF, exactly as stored in the header.

    ``type`` is ``pbkdf2`` (``hash``, ``iterations``) or ``argon2i``/``argon2id``
    (``iterations`` is the time cost, ``memory_kib``, ``parallel``).
    """

    type: str
    hash: str = "sha256"
    iterations: int = PBKDF2_MIN_ITERATIONS
    memory_kib: int = 0
    parallel: int = 1

    def describe(self) -> str:
        """One line for progress and verbose output."""
        if self.type == "pbkdf2":
            return f"pbkdf2-{self.hash}, {self.iterations} iterations"
        return (
            f"{self.type}, {self.iterations} iterations, {self.memory_kib} KiB, "
            f"{self.parallel} threads"
        )


def derive(params: KdfParams, passphrase: bytes, salt: bytes, length: int) -> bytes:
    """Run the keyslot KDF of *params*."""
    if params.type == "pbkdf2":
        return pbkdf2(params.hash, passphrase, salt, params.iterations, length)
    return argon2(
        params.type, passphrase, salt, params.iterations, params.memory_kib, params.parallel, length
    )


def pbkdf2_per_second(hash_name: str, key_length: int = 32) -> int:
    """PBKDF2 iterations per second with *hash_name* (cryptsetup measures >= 250 ms)."""
    iterations = 1000
    while True:
        start = time.perf_counter()
        pbkdf2(hash_name, b"foo", b"bar" * 11, iterations, key_length)
        elapsed = time.perf_counter() - start
        if elapsed >= 0.25 or iterations >= 1 << 30:
            return max(1, int(iterations / max(elapsed, 1e-6)))
        iterations *= 2 if elapsed < 0.05 else max(2, int(0.3 / max(elapsed, 1e-6)))


def digest_iterations(hash_name: str, key_length: int, benchmark: bool = True) -> int:
    """PBKDF2 iterations of a digest over a *key_length*-byte key (a volume key, or
    the reencryption metadata): what runs ~125 ms here, at least 1000; 1000 without
    *benchmark* (cryptsetup skips it when the KDF cost is forced or a keyslot's KDF
    is reused).  cryptsetup benchmarks PBKDF2 with an output as long as the key, so
    a longer key gets proportionally fewer iterations (its blocks cost each one)."""
    if not benchmark:
        return PBKDF2_MIN_ITERATIONS
    block = hash_size(hash_name)
    blocks = max(1, -(-key_length // block))
    per_second = pbkdf2_per_second(hash_name, block) // blocks
    return max(PBKDF2_MIN_ITERATIONS, per_second * DIGEST_ITERATION_MS // 1000)


def check_data_offset(offset: int | None) -> None:
    """An explicit ``--offset`` (here in bytes) must be a multiple of 4096 bytes, as
    cryptsetup's ``crypt_set_data_offset`` demands."""
    if offset is not None and offset % 4096:
        raise UsageError("Data offset is not multiple of 4096 bytes.")


def benchmark_kdf(
    kind: str,
    hash_name: str,
    iter_time_ms: int,
    key_length: int,
    *,
    max_memory_kib: int | None = None,
    parallel: int | None = None,
    progress: Progress | None = None,
) -> KdfParams:
    """Choose KDF costs that take about *iter_time_ms* here, as cryptsetup does.

    PBKDF2: iterations per second times the time, at least 1000.  Argon2:
    ``parallel`` = min(4, CPUs); memory grows first (up to *max_memory_kib*,
    default 1 GiB, never more than half the memory available), then the time
    cost, from a minimum of 4 passes and 32 KiB.
    """
    if iter_time_ms < 1:
        raise UsageError("--iter-time must be at least 1 ms")
    if kind == "pbkdf2":
        if progress:
            progress("Benchmarking PBKDF2", 0.0)
        per_sec = pbkdf2_per_second(hash_name, key_length)
        if progress:
            progress("Benchmarking PBKDF2", 1.0)
        return KdfParams(
            "pbkdf2", hash_name, max(PBKDF2_MIN_ITERATIONS, per_sec * iter_time_ms // 1000)
        )
    if kind not in ("argon2i", "argon2id"):
        raise UsageError(f"Unknown PBKDF type {kind}.")
    lanes = parallel if parallel is not None else min(ARGON2_MAX_PARALLEL, os.cpu_count() or 1)
    cap = max_memory_kib if max_memory_kib is not None else ARGON2_MAX_MEMORY_KIB
    # a requested maximum below 32 KiB is kept, as cryptsetup keeps it (Argon2 itself
    # needs 8 KiB per thread)
    cap = max(8 * lanes, min(cap, max(ARGON2_MIN_MEMORY_KIB, available_memory_kib() // 2)))
    target = iter_time_ms / 1000.0
    t_cost, memory = ARGON2_MIN_TIME, min(cap, max(ARGON2_MIN_MEMORY_KIB, 8 * lanes))
    for step in range(20):
        if progress:
            progress(f"Benchmarking {kind}", min(1.0, step / 10))
        start = time.perf_counter()
        argon2(kind, b"foo", b"0123456789abcdef", t_cost, memory, lanes, key_length)
        elapsed = max(time.perf_counter() - start, 1e-4)
        ratio = target / elapsed
        if 0.95 <= ratio <= 1.1:
            break
        if ratio > 1.0 and memory < cap:
            # Memory first: it is what makes guessing expensive on GPUs.
            memory = min(cap, int(memory * min(ratio, 16)))
        elif ratio > 1.0:
            new_t = int(t_cost * ratio)
            if new_t <= t_cost:
                break
            t_cost = new_t
        else:
            if memory > ARGON2_MIN_MEMORY_KIB and t_cost <= ARGON2_MIN_TIME:
                memory = max(min(cap, ARGON2_MIN_MEMORY_KIB), 8 * lanes, int(memory * ratio))
            elif t_cost > ARGON2_MIN_TIME:
                t_cost = max(ARGON2_MIN_TIME, int(t_cost * ratio))
            else:
                break
    if progress:
        progress(f"Benchmarking {kind}", 1.0)
    return KdfParams(kind, hash_name, t_cost, memory, lanes)


def encrypt_keyslot_material(
    volume_key: bytes,
    stripes: int,
    af_hash: str,
    area_spec: CipherSpec,
    derived_key: bytes,
) -> bytes:
    """AF-split *volume_key*, pad to whole 512-byte sectors and encrypt it
    with *derived_key* (IV sector 0 at the start of the area, as cryptsetup)."""
    split = af_split(volume_key, stripes, af_hash)
    padded = split + bytes(af_sectors(len(volume_key), stripes) * 512 - len(split))
    return bytes(SectorCipher(area_spec, derived_key, 512, iv_offset=0).encrypt(padded, 0))
