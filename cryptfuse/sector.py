"""The sector cipher engine: dm-crypt's IV generators and batched en/decryption.

A :class:`SectorCipher` encrypts or decrypts a run of whole sectors in one call,
given the number of the first one.  Sector numbering follows
``drivers/md/dm-crypt.c``:

* ``cc_sector`` = 512-byte sector number within the data area + ``iv_offset``;
* the IV sector is ``cc_sector``, shifted right by ``log2(sector_size / 512)``
  when ``iv_large_sectors`` is set (dm-crypt's flag; LUKS2 never sets it);
* with ``keycount`` > 1 the key is split into equal parts and a sector uses part
  ``cc_sector & (keycount - 1)``.

The fast path works on whole batches without a Python loop per sector: the IVs
(and ESSIV/XTS tweak encryptions) of every sector are computed in one pass, XTS
is one ECB pass over the buffer between two XORs with the tweak stream (its
GF(2^128) doublings done with numpy), CBC decryption is one ECB pass plus one
XOR, and CBC encryption runs block position by block position across all
sectors at once.  :meth:`SectorCipher.reference_encrypt` and
:meth:`SectorCipher.reference_decrypt` keep the simple per-sector path as the
test oracle.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import hashes
from .errors import UnsupportedError, UsageError
from .spec import CipherSpec

try:  # the C tweak chain (setup.py builds it when a compiler is there)
    from . import _xts as _xts_accel
except ImportError:  # pragma: no cover - depends on the build
    _xts_accel = None

try:  # libgcrypt's ciphers (setup.py builds it where libgcrypt20-dev is present)
    from . import _gcrypt
except ImportError:  # pragma: no cover - depends on the build
    _gcrypt = None  # type: ignore[assignment]

Buffer = bytes | bytearray | memoryview
if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U8 = npt.NDArray[np.uint8]
    U64 = npt.NDArray[np.uint64]
# numpy (the Python engine's arrays) is imported by the functions that use it: a
# process that only uses the C data path (reencrypt, the daemon with C ciphers) never
# pays for it (~0.1 s of start-up and OpenBLAS's threads; docs/reencryption.md)

SECTOR_SIZES = (512, 1024, 2048, 4096)

_ALGORITHMS: dict[str, Callable[[bytes], Any]] = {
    "aes": algorithms.AES,
    "camellia": decrepit.Camellia,
    "sm4": algorithms.SM4,
    "cast5": decrepit.CAST5,
    "blowfish": decrepit.Blowfish,
    "des3_ede": decrepit.TripleDES,
}
_MASK64 = (1 << 64) - 1

#: cipher -> libgcrypt's name (each of these ids takes every key size the cipher has)
GCRYPT_CIPHERS = {
    "aes": "AES256",
    "serpent": "SERPENT256",
    "twofish": "TWOFISH",
    "camellia": "CAMELLIA256",
    "sm4": "SM4",
    "cast5": "CAST5",
    "blowfish": "BLOWFISH",
    "des3_ede": "3DES",
}
#: chain and IV modes -> the numbers of cryptfuse._gcrypt.Engine
_GCRYPT_CHAINS = {"ecb": 0, "cbc": 1, "xts": 2, "ctr": 3, "lrw": 4}
_GCRYPT_IVS = {
    "null": 0,
    "plain": 1,
    "plain64": 2,
    "plain64be": 3,
    "essiv": 4,
    "benbi": 5,
    "lmk": 6,
    "tcw": 7,
    "eboiv": 9,
}
_GCRYPT_NO_IV = 8
#: what the OpenSSL/numpy engine below serves (AES stays there: OpenSSL is fastest)
_OPENSSL_CHAINS = ("xts", "cbc", "ecb")
_OPENSSL_IVS = ("plain", "plain64", "plain64be", "essiv", "benbi", "null", "eboiv", "elephant")


def _algorithm(name: str, key: bytes) -> Any:
    try:
        return _ALGORITHMS[name](key)
    except ValueError as exc:
        raise UsageError(f"invalid key of {len(key) * 8} bits for cipher {name}") from exc


class _Ecb:
    """One block cipher key in ECB mode, with one pair of contexts per thread.

    ECB keeps no state between blocks, so a context serves any number of calls
    (never finalized); creating one per call cost more than encrypting 4 KiB.
    Contexts are not safe to share between threads, hence one set per thread.
    """

    def __init__(self, cipher: str, key: bytes) -> None:
        try:
            self.cipher = Cipher(_algorithm(cipher, key), modes.ECB())
        except ValueError as exc:  # e.g. a 512-bit AES key: XTS only (found by fuzzing)
            raise UsageError(f"invalid key of {len(key) * 8} bits for cipher {cipher}") from exc
        self._local = threading.local()

    def _contexts(self) -> tuple[Any, Any]:
        try:
            return self._local.contexts  # type: ignore[no-any-return]
        except AttributeError:
            contexts = (self.cipher.encryptor(), self.cipher.decryptor())
            self._local.contexts = contexts
            return contexts

    def encrypt(self, data: Buffer) -> bytes:
        """*data* (whole blocks) encrypted."""
        return self._contexts()[0].update(data)  # type: ignore[no-any-return]

    def decrypt(self, data: Buffer) -> bytes:
        """*data* (whole blocks) decrypted."""
        return self._contexts()[1].update(data)  # type: ignore[no-any-return]

    def encrypt_into(self, src: Buffer | U8, dst: U8 | Buffer) -> None:
        """Encrypt *src* into the start of *dst*, which has ``PAD`` spare bytes."""
        # numpy arrays export the buffer protocol, which is all OpenSSL's binding needs.
        self._contexts()[0].update_into(src, dst)

    def decrypt_into(self, src: Buffer | U8, dst: U8 | Buffer) -> None:
        """Decrypt *src* into the start of *dst*, which has ``PAD`` spare bytes."""
        self._contexts()[1].update_into(src, dst)


# OpenSSL's update wants room for one more block than it writes; separate
# source and destination buffers (never aliased) carry that slack.
PAD = 16


#: batches up to this size take the small-request path where it exists
SMALL_BATCH = 16 * 1024

#: 16-byte IV blocks of the sector-number IV modes, for the small-request path
_IV_PACK: dict[str, Callable[[int], bytes]] = {
    "plain64": struct.Struct("<Q8x").pack,
    "plain": struct.Struct("<Q8x").pack,  # the value is masked to 32 bits first
    "plain64be": struct.Struct(">8xQ").pack,
    "null": lambda _sector: bytes(16),
}

#: the engine works through a batch this many bytes at a time
CHUNK = 1 << 20


class _Scratch(threading.local):
    """Per-thread scratch buffers, reused so the hot path neither allocates nor page-faults."""

    def __init__(self) -> None:
        self.buffers: list[U8 | None] = [None, None]

    def get(self, index: int, size: int) -> U8:
        """Scratch buffer *index* with at least *size* + ``PAD`` bytes."""
        import numpy as np

        buf = self.buffers[index]
        if buf is None or buf.size < size + PAD:
            buf = self.buffers[index] = np.empty(max(size, CHUNK) + PAD, dtype=np.uint8)
        return buf


_SCRATCH = _Scratch()


def _padded(n: int, width: int) -> tuple[U8, U8]:
    """A fresh (n, width) uint8 array and the flat padded buffer behind it."""
    import numpy as np

    flat = np.empty(n * width + PAD, dtype=np.uint8)
    return flat[: n * width].reshape(n, width), flat


class _SubKey:
    """Everything derived from one of the ``keycount`` parts of the key."""

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        #: the Elephant diffuser's AES key (second half of the key); None otherwise
        self.elephant: _Ecb | None = None
        if spec.ivmode == "elephant":
            half = len(key) // 2
            self.elephant = _Ecb("aes", key[half:])
            key = key[:half]
        self.key = key
        if spec.chainmode == "xts":
            half = len(key) // 2
            self.data = _Ecb(spec.cipher, key[:half])
            self.tweak: _Ecb | None = _Ecb(spec.cipher, key[half:])
        else:
            self.data = _Ecb(spec.cipher, key)
            self.tweak = None
        self.essiv: _Ecb | None = None
        #: ESSIV's key, hash(key); empty for other IV modes
        self.essiv_salt = b""
        if spec.ivmode == "essiv" and spec.chainmode != "ecb":  # (ecb ignores the IV mode)
            assert spec.ivopts is not None
            # The kernel's essiv template keys each cipher instance with
            # hash(its own key); for keycount 1 that is hash(whole key).
            salt = self.essiv_salt = hashes.digest(spec.ivopts, key)
            try:
                self.essiv = _Ecb(spec.cipher, salt)
            except UsageError as exc:
                raise UsageError(
                    f"essiv:{spec.ivopts} gives a {len(salt) * 8}-bit key, "
                    f"which {spec.cipher} does not accept"
                ) from exc


def _mul_alpha_pow(t: U64, m: int) -> U64:
    """Multiply XTS tweaks (last axis: little-endian lo, hi words) by x**m in GF(2^128).

    Valid for 1 <= m <= 57: the bits shifted out (< 2**m) times x^7+x^2+x+1
    then still fit in the low word.
    """
    import numpy as np

    lo = t[..., 0]
    hi = t[..., 1]
    m64 = np.uint64(m)
    back = np.uint64(64 - m)
    over = hi >> back
    out = np.empty_like(t)
    out[..., 1] = (hi << m64) | (lo >> back)
    out[..., 0] = (
        (lo << m64)
        ^ over
        ^ (over << np.uint64(1))
        ^ (over << np.uint64(2))
        ^ (over << np.uint64(7))
    )
    return out


def _ecb_rows(transform: Callable[[U8, U8], None], rows: U8) -> U8:
    """Apply an ECB transform to a (n, block) array, returning a new array."""
    out, flat = _padded(rows.shape[0], rows.shape[1])
    transform(rows.reshape(-1), flat)
    return out


def _xts_tweak_stream(first: U64, blocks: int) -> U64:
    """All tweaks of a batch: shape (sectors, blocks, 2), block j = first * x**j.

    Within a group of 32 blocks every tweak is ``t * x**b`` (b < 32) of the
    group's first one, computed for all b at once by broadcasting; groups (4 KiB
    sectors have 8) are chained with one multiplication by x**32 each.
    """
    import numpy as np

    n = first.shape[0]
    width = min(blocks, 32)
    groups = blocks // width
    base = np.empty((n, groups, 1, 2), dtype=np.uint64)
    base[:, 0, 0] = first
    for g in range(1, groups):
        base[:, g, 0] = _mul_alpha_pow(base[:, g - 1, 0], 32)
    lo = base[..., 0]
    hi = base[..., 1]
    shift = np.arange(width, dtype=np.uint64)
    back = np.uint64(63) - shift  # (x >> 1) >> (63 - b) is x >> (64 - b), also for b = 0
    one = np.uint64(1)
    stream = np.empty((n, groups, width, 2), dtype=np.uint64)
    out_lo = stream[..., 0]
    out_hi = stream[..., 1]
    np.left_shift(hi, shift, out=out_hi)
    out_hi |= (lo >> one) >> back
    over = (hi >> one) >> back  # the bits shifted out of the top ...
    np.left_shift(lo, shift, out=out_lo)
    # ... come back reduced by x^128 = x^7 + x^2 + x + 1.
    out_lo ^= over
    over <<= one
    out_lo ^= over
    over <<= one
    out_lo ^= over
    over <<= np.uint64(5)
    out_lo ^= over
    return stream.reshape(n, blocks, 2)


@dataclass(frozen=True, repr=False)
class FastParameters:
    """The keys and modes of a :class:`SectorCipher` that the C data path can serve."""

    chainmode: str  # "xts" or "cbc"
    key: bytes
    ivmode: str  # "plain64", "plain", "plain64be", "null" or "essiv"
    essiv_key: bytes = b""  # hash(key) for "essiv"

    def __repr__(self) -> str:  # never the keys
        return f"FastParameters({self.chainmode!r}, ivmode={self.ivmode!r})"


class SectorCipher:
    """Encrypts and decrypts whole sectors with dm-crypt semantics.

    *key* is the whole volume key (all ``keycount`` parts); *iv_offset* is in
    512-byte sectors.  Validation happens here, never on the data path.
    """

    def __init__(
        self,
        spec: CipherSpec,
        key: bytes,
        sector_size: int = 512,
        iv_offset: int = 0,
        iv_large_sectors: bool = False,
    ) -> None:
        if sector_size not in SECTOR_SIZES:
            raise UsageError(f"sector size {sector_size} is not one of 512, 1024, 2048, 4096")
        if iv_offset < 0:
            raise UsageError(f"IV offset {iv_offset} is negative")
        spec.check_key_size(len(key))
        if spec.chainmode != "ecb" and spec.ivmode == "random":
            # dm-crypt takes "random" only over dm-integrity, whose per-sector metadata
            # keeps the IV; without it nothing written could be read back.
            raise UnsupportedError(
                "iv mode 'random' needs per-sector integrity metadata (dm-integrity), "
                "which cryptfuse does not implement"
            )
        if spec.chainmode != "ecb" and spec.ivmode in ("lmk", "tcw") and sector_size != 512:
            raise UsageError(f"iv mode {spec.ivmode!r} works on 512-byte sectors only")
        self.spec = spec
        self.sector_size = sector_size
        self.iv_offset = iv_offset
        self.iv_large_sectors = iv_large_sectors
        self._spb = sector_size // 512  # 512-byte units per encryption sector
        self._shift = self._spb.bit_length() - 1 if iv_large_sectors else 0
        self._bs = spec.block_size
        part = len(key) // spec.keycount
        # The common case (one key, XTS, an IV that is just the sector number) has a
        # numpy-free path for small requests.
        self._small_xts = (
            _xts_accel is not None
            and spec.chainmode == "xts"
            and spec.keycount == 1
            and spec.ivmode in _IV_PACK
        )
        #: the libgcrypt engine serving these sectors, or None (the OpenSSL engine below)
        self.engine: Any = _gcrypt_engine(spec, bytes(key), sector_size, iv_offset, self._shift)
        self._key_len = len(key)
        if self.engine is not None:
            self._small_xts = False
            self._subkeys: list[_SubKey] = []
            # kept for the reference path only (tests), where OpenSSL has the cipher
            self._engine_subkeys = [
                bytes(key[i * part : (i + 1) * part]) for i in range(spec.keycount)
            ]
            return
        self._subkeys = [
            _SubKey(spec, bytes(key[i * part : (i + 1) * part])) for i in range(spec.keycount)
        ]

    @property
    def key_size(self) -> int:
        """Bytes of the whole key (not secret: ``cryptfuse status`` shows it)."""
        return len(self._key_material())

    def _key_material(self) -> bytes:
        if self._subkeys:
            return b"".join(sub.key for sub in self._subkeys)
        return b"".join(self._engine_subkeys)

    def key_digest_matches(self, digest: bytes) -> bool:
        """True when *digest* is the SHA-256 of this key (compared in constant time):
        ``cryptfuse refresh`` checks the key it derived without sending the key."""
        return hmac.compare_digest(hashlib.sha256(self._key_material()).digest(), digest)

    def same_as(self, other: SectorCipher) -> bool:
        """True when *other* turns the same plaintext into the same sectors: the same
        spec, key (compared in constant time), sector size and IV geometry."""
        return (
            str(self.spec) == str(other.spec)
            and self.sector_size == other.sector_size
            and self.iv_offset == other.iv_offset
            and self.iv_shift == other.iv_shift
            and hmac.compare_digest(self._key_material(), other._key_material())
        )

    def fast_parameters(self) -> FastParameters | None:
        """What :mod:`cryptfuse._fastpath` needs to serve these sectors in C, or None.

        It serves AES in XTS or CBC mode, one key (keycount 1), with a sector-number
        IV (``plain64``, ``plain``, ``plain64be``, ``null``) or ESSIV, one OpenSSL call
        per sector; everything else only this engine serves.
        """
        spec = self.spec
        if (
            self.engine is not None
            or spec.cipher != "aes"
            or spec.chainmode not in ("xts", "cbc")
            or spec.keycount != 1
        ):
            return None
        sub = self._subkeys[0]
        if spec.ivmode in _IV_PACK:
            assert spec.ivmode is not None
            return FastParameters(spec.chainmode, sub.key, spec.ivmode)
        if spec.ivmode == "essiv":
            return FastParameters(spec.chainmode, sub.key, "essiv", sub.essiv_salt)
        return None

    @property
    def iv_shift(self) -> int:
        """How far a 512-byte sector number is shifted right to give the IV sector."""
        return self._shift

    # -- sector numbers and IVs -------------------------------------------------

    def _cc_sectors(self, first_sector: int, count: int) -> U64:
        import numpy as np

        base = (first_sector * self._spb + self.iv_offset) & _MASK64
        steps = np.arange(count, dtype=np.uint64) * np.uint64(self._spb)
        return steps + np.uint64(base)  # wraps modulo 2**64, like the kernel's u64

    def _ivs(self, sub: _SubKey, cc: U64) -> U8:
        """The IV block of every sector, shape (n, block_size)."""
        import numpy as np

        bs = self._bs
        n = cc.shape[0]
        iv_sector = cc >> np.uint64(self._shift) if self._shift else cc
        ivs = np.zeros((n, bs), dtype=np.uint8)
        mode = self.spec.ivmode
        if mode == "null":
            return ivs
        if mode == "plain":
            ivs[:, :4] = (
                (iv_sector & np.uint64(0xFFFFFFFF)).astype("<u4").view(np.uint8).reshape(n, 4)
            )
        elif mode in ("plain64", "essiv"):
            ivs[:, :8] = iv_sector.astype("<u8").view(np.uint8).reshape(n, 8)
            if mode == "essiv":
                assert sub.essiv is not None
                return _ecb_rows(sub.essiv.encrypt_into, ivs)
        elif mode == "plain64be":
            ivs[:, bs - 8 :] = iv_sector.astype(">u8").view(np.uint8).reshape(n, 8)
        elif mode in ("eboiv", "elephant"):
            return _ecb_rows(sub.data.encrypt_into, _eboiv_plain(iv_sector, self.sector_size, bs))
        elif mode == "benbi":
            # Count of cipher blocks (starting at 1) in big endian: 512 >> shift == bs.
            benbi_shift = 9 - (bs.bit_length() - 1)
            value = (iv_sector << np.uint64(benbi_shift)) + np.uint64(1)
            ivs[:, bs - 8 :] = value.astype(">u8").view(np.uint8).reshape(n, 8)
        else:  # pragma: no cover - spec.parse_cipher_spec rejects everything else
            raise UsageError(f"iv mode {mode!r}")
        return ivs

    # -- public API -------------------------------------------------------------

    def encrypt(self, data: Buffer, first_sector: int) -> bytearray:
        """Encrypt whole sectors; *first_sector* counts ``sector_size`` units."""
        out = bytearray(len(memoryview(data).cast("B")))
        self.encrypt_into(data, first_sector, out)
        return out

    def decrypt(self, data: Buffer, first_sector: int) -> bytearray:
        """Decrypt whole sectors; *first_sector* counts ``sector_size`` units."""
        out = bytearray(len(memoryview(data).cast("B")))
        self.decrypt_into(data, first_sector, out)
        return out

    def encrypt_into(self, data: Buffer, first_sector: int, out: Buffer) -> None:
        """Encrypt *data* into the caller's writable buffer *out* (same length; may not overlap)."""
        self._run(data, first_sector, out, encrypt=True)

    def decrypt_into(self, data: Buffer, first_sector: int, out: Buffer) -> None:
        """Decrypt *data* into the caller's writable buffer *out* (same length; may not overlap)."""
        self._run(data, first_sector, out, encrypt=False)

    def _run(self, data: Buffer, first_sector: int, out: Buffer, *, encrypt: bool) -> None:
        import numpy as np

        view = memoryview(data).cast("B")
        length = len(view)
        if length % self.sector_size:
            raise UsageError(f"{length} bytes are not whole {self.sector_size}-byte sectors")
        if first_sector < 0:
            raise UsageError(f"sector {first_sector} is negative")
        out_view = memoryview(out).cast("B")
        if len(out_view) != length:
            raise UsageError(f"output buffer of {len(out_view)} bytes for {length} bytes of input")
        ss = self.sector_size
        if self.engine is not None:
            self.engine.crypt(view, out_view, first_sector, encrypt)
            return
        if self._small_xts and length <= SMALL_BATCH:
            self._xts_small(view, first_sector, out_view, encrypt)
            return
        target = np.frombuffer(out_view, dtype=np.uint8)
        source = np.frombuffer(view, dtype=np.uint8)
        # Chunks bound the scratch memory and keep it in cache.
        for start in range(0, length, CHUNK):
            stop = min(start + CHUNK, length)
            n = (stop - start) // ss
            src = source[start:stop].reshape(n, ss)
            dst = target[start:stop].reshape(n, ss)
            cc = self._cc_sectors(first_sector + start // ss, n)
            if len(self._subkeys) == 1:
                self._process(self._subkeys[0], src, dst, cc, encrypt)
                continue
            key_index = cc & np.uint64(len(self._subkeys) - 1)
            for k, sub in enumerate(self._subkeys):
                rows = np.nonzero(key_index == np.uint64(k))[0]
                if rows.size:
                    part = np.empty((rows.size, ss), dtype=np.uint8)
                    self._process(sub, src[rows], part, cc[rows], encrypt)
                    dst[rows] = part

    def _xts_small(
        self, src: memoryview, first_sector: int, dst: memoryview, encrypt: bool
    ) -> None:
        """XTS for a few sectors without numpy: its per-call set-up would dominate."""
        assert _xts_accel is not None
        sub = self._subkeys[0]
        assert sub.tweak is not None
        n = len(src) // self.sector_size
        base = first_sector * self._spb + self.iv_offset
        pack = _IV_PACK[self.spec.ivmode or "null"]
        mask = 0xFFFFFFFF if self.spec.ivmode == "plain" else _MASK64
        ivs = b"".join(
            pack(((base + i * self._spb) & _MASK64) >> self._shift & mask) for i in range(n)
        )
        tweaks = sub.tweak.encrypt(ivs)
        whitened = bytearray(len(src))
        _xts_accel.xor_tweaks(whitened, src, tweaks, self.sector_size)
        transformed = sub.data.encrypt(whitened) if encrypt else sub.data.decrypt(whitened)
        _xts_accel.xor_tweaks(dst, transformed, tweaks, self.sector_size)

    def _process(self, sub: _SubKey, src: U8, dst: U8, cc: U64, encrypt: bool) -> None:
        """Transform the (n, sector_size) array *src* into *dst* (same shape, contiguous)."""
        import numpy as np

        mode = self.spec.chainmode
        size = src.size
        transform = sub.data.encrypt_into if encrypt else sub.data.decrypt_into
        if mode == "ecb":
            result = _SCRATCH.get(1, size)
            transform(src, result)
            dst.reshape(-1)[:] = result[:size]
            return
        ivs = self._ivs(sub, cc)
        if sub.elephant is not None:  # cbc only (spec.py)
            iv_sector = cc >> np.uint64(self._shift) if self._shift else cc
            sector_keys = _elephant_sector_keys(sub.elephant, iv_sector, self.sector_size)
            if encrypt:
                diffused = elephant_diffuse(src, sector_keys)
                self._cbc_encrypt(sub, diffused, dst, ivs)
            else:
                self._cbc_decrypt(sub, src, dst, ivs)
                dst[:] = elephant_undiffuse(dst, sector_keys)
            return
        if mode == "xts":
            assert sub.tweak is not None
            tweaks = _ecb_rows(sub.tweak.encrypt_into, ivs)
            whitened = _SCRATCH.get(0, size)[:size]
            result = _SCRATCH.get(1, size)
            if _xts_accel is not None:
                _xts_accel.xor_tweaks(whitened, src, tweaks, self.sector_size)
                transform(whitened, result)
                _xts_accel.xor_tweaks(dst, result[:size], tweaks, self.sector_size)
                return
            stream = _xts_tweak_stream(
                tweaks.view(np.uint64).reshape(-1, 2), self.sector_size // 16
            )
            np.bitwise_xor(
                src.view(np.uint64).reshape(stream.shape),
                stream,
                out=whitened.view(np.uint64).reshape(stream.shape),
            )
            transform(whitened, result)
            np.bitwise_xor(
                result[:size].view(np.uint64).reshape(stream.shape),
                stream,
                out=dst.view(np.uint64).reshape(stream.shape),
            )
        elif encrypt:
            self._cbc_encrypt(sub, src, dst, ivs)
        else:
            self._cbc_decrypt(sub, src, dst, ivs)

    def _cbc_decrypt(self, sub: _SubKey, src: U8, dst: U8, ivs: U8) -> None:
        """CBC decryption of (n, sector_size) *src*: one ECB pass plus one XOR."""
        import numpy as np

        n = src.shape[0]
        size = src.size
        result = _SCRATCH.get(1, size)
        sub.data.decrypt_into(src, result)
        bs = self._bs
        plain = dst.reshape(n, -1, bs)
        decrypted = result[:size].reshape(n, -1, bs)
        cipher_blocks = src.reshape(n, -1, bs)
        np.bitwise_xor(decrypted[:, 1:], cipher_blocks[:, :-1], out=plain[:, 1:])
        np.bitwise_xor(decrypted[:, 0], ivs, out=plain[:, 0])

    def _cbc_encrypt(self, sub: _SubKey, src: U8, dst: U8, ivs: U8) -> None:
        """CBC is serial within a sector: run block position j of every sector at once."""
        import numpy as np

        bs = self._bs
        n = src.shape[0]
        blocks_in = src.reshape(n, -1, bs)
        blocks_out = dst.reshape(n, -1, bs)
        column = np.empty((n, bs), dtype=np.uint8)
        encrypted, encrypted_flat = _padded(n, bs)
        chain: U8 = ivs
        for j in range(blocks_in.shape[1]):
            np.bitwise_xor(blocks_in[:, j], chain, out=column)
            sub.data.encrypt_into(column.reshape(-1), encrypted_flat)
            blocks_out[:, j] = encrypted
            chain = blocks_out[:, j]

    # -- the simple per-sector path (the test oracle) ----------------------------

    def reference_encrypt(self, data: Buffer, first_sector: int) -> bytes:
        """Encrypt sector by sector with textbook modes; slow, for tests."""
        return self._reference(bytes(data), first_sector, encrypt=True)

    def reference_decrypt(self, data: Buffer, first_sector: int) -> bytes:
        """Decrypt sector by sector with textbook modes; slow, for tests."""
        return self._reference(bytes(data), first_sector, encrypt=False)

    def _reference_iv(self, sub: _SubKey, cc: int) -> bytes:
        bs = self._bs
        sector = cc >> self._shift
        mode = self.spec.ivmode
        if mode == "null":
            return bytes(bs)
        if mode == "plain":
            return (sector & 0xFFFFFFFF).to_bytes(4, "little").ljust(bs, b"\0")
        if mode == "plain64":
            return sector.to_bytes(8, "little").ljust(bs, b"\0")
        if mode == "plain64be":
            return sector.to_bytes(8, "big").rjust(bs, b"\0")
        if mode == "benbi":
            value = ((sector << (9 - (bs.bit_length() - 1))) + 1) & _MASK64
            return value.to_bytes(8, "big").rjust(bs, b"\0")
        if mode in ("eboiv", "elephant"):
            offset = (sector * self.sector_size) & _MASK64
            block = Cipher(_algorithm(self.spec.cipher, sub.key), modes.ECB()).encryptor()
            return block.update(offset.to_bytes(8, "little").ljust(bs, b"\0"))
        assert mode == "essiv" and self.spec.ivopts is not None
        salt = hashes.digest(self.spec.ivopts, sub.key)
        enc = Cipher(_algorithm(self.spec.cipher, salt), modes.ECB()).encryptor()
        return enc.update(sector.to_bytes(8, "little").ljust(bs, b"\0"))

    def _reference_subkeys(self) -> list[_SubKey]:
        """The OpenSSL subkeys, also where libgcrypt serves the data: an independent oracle."""
        if self._subkeys:
            return self._subkeys
        if not _openssl_serves(self.spec, self._key_len):
            raise UnsupportedError(f"no reference implementation of {self.spec} (libgcrypt only)")
        return [_SubKey(self.spec, key) for key in self._engine_subkeys]

    def _reference(self, data: bytes, first_sector: int, *, encrypt: bool) -> bytes:
        ss = self.sector_size
        subkeys = self._reference_subkeys()
        out = bytearray()
        for i in range(len(data) // ss):
            cc = ((first_sector + i) * self._spb + self.iv_offset) & _MASK64
            sub = subkeys[cc & (len(subkeys) - 1)]
            chunk = data[i * ss : (i + 1) * ss]
            mode = self.spec.chainmode
            cipher: Cipher[Any]
            if mode == "ecb":
                cipher = Cipher(_algorithm(self.spec.cipher, sub.key), modes.ECB())
            elif mode == "cbc" and sub.elephant is not None:
                iv = self._reference_iv(sub, cc)
                cbc = Cipher(_algorithm(self.spec.cipher, sub.key), modes.CBC(iv))
                out += _reference_elephant(cbc, sub.elephant, cc >> self._shift, chunk, encrypt)
                continue
            elif mode == "cbc":
                iv = self._reference_iv(sub, cc)
                cipher = Cipher(_algorithm(self.spec.cipher, sub.key), modes.CBC(iv))
            else:
                iv = self._reference_iv(sub, cc)
                if (
                    self.spec.cipher == "aes"
                    and sub.key[: len(sub.key) // 2] != sub.key[len(sub.key) // 2 :]
                ):
                    cipher = Cipher(algorithms.AES(sub.key), modes.XTS(iv))
                else:
                    out += _reference_xts(self.spec.cipher, sub.key, iv, chunk, encrypt)
                    continue
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out += ctx.update(chunk) + ctx.finalize()
        return bytes(out)


def _reference_xts(cipher: str, key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    """Textbook XTS (IEEE 1619) with integer arithmetic, for ciphers OpenSSL has no XTS for."""
    half = len(key) // 2
    block = Cipher(_algorithm(cipher, key[:half]), modes.ECB())
    tweak_cipher = Cipher(_algorithm(cipher, key[half:]), modes.ECB()).encryptor()
    t = int.from_bytes(tweak_cipher.update(iv), "little")
    out = bytearray()
    for j in range(0, len(data), 16):
        mask = t.to_bytes(16, "little")
        x = bytes(a ^ b for a, b in zip(data[j : j + 16], mask, strict=True))
        ctx = block.encryptor() if encrypt else block.decryptor()
        y = ctx.update(x)
        out += bytes(a ^ b for a, b in zip(y, mask, strict=True))
        t <<= 1
        if t >> 128:
            t = (t & ((1 << 128) - 1)) ^ 0x87
    return bytes(out)


# -- BitLocker: eboiv and the Elephant diffuser ------------------------------------
#
# Kernel dm-crypt (5.6+, drivers/md/dm-crypt.c): eboiv's IV is the encryption,
# with the data key, of the sector's byte offset (iv_sector * sector_size, little
# endian, zero padded to a block).  Elephant (BitLocker's Vista/7 mode) adds the
# "sector key" Ks = E(e(s)) || E(e(s) with byte 15 = 0x80) under the diffuser's own
# AES key, XORed over every 32 bytes of the plaintext, then diffusers A and B over
# the sector as little-endian 32-bit words, before CBC encryption.  Diffuser A runs
# 5 cycles of  d[i] -= d[i-2] ^ rotl(d[i-5], (9, 0, 13, 0)[i % 4])  for i from the
# last word down to 0 (indices modulo the word count), diffuser B 3 cycles of
# d[i] -= d[i+2] ^ rotl(d[i+5], (0, 10, 0, 25)[i % 4]); decryption undoes B, then A
# (adding, from word 0 up), then the XOR.

_ROT_A = (9, 0, 13, 0)
_ROT_B = (0, 10, 0, 25)
_CYCLES_A = 5
_CYCLES_B = 3


def _eboiv_plain(iv_sector: U64, sector_size: int, bs: int) -> U8:
    """The blocks eboiv encrypts: each sector's byte offset, little endian, zero padded."""
    import numpy as np

    n = iv_sector.shape[0]
    blocks = np.zeros((n, bs), dtype=np.uint8)
    offsets = iv_sector * np.uint64(sector_size)  # wraps modulo 2**64 like the kernel's u64
    blocks[:, :8] = offsets.astype("<u8").view(np.uint8).reshape(n, 8)
    return blocks


def _elephant_sector_keys(key: _Ecb, iv_sector: U64, sector_size: int) -> U8:
    """The 32-byte Elephant sector key of every sector, shape (n, 32)."""
    import numpy as np

    first = _eboiv_plain(iv_sector, sector_size, 16)
    second = first.copy()
    second[:, 15] = 0x80
    keys = np.empty((iv_sector.shape[0], 32), dtype=np.uint8)
    keys[:, :16] = _ecb_rows(key.encrypt_into, first)
    keys[:, 16:] = _ecb_rows(key.encrypt_into, second)
    return keys


def _rotl(x: npt.NDArray[np.uint32], r: int) -> npt.NDArray[np.uint32]:
    import numpy as np

    if r == 0:
        return x
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def elephant_diffuse(plain: U8, sector_keys: U8) -> U8:
    """Elephant's encryption side: XOR the sector key, diffuser A, diffuser B.

    *plain* is (n, sector_size); returns a new array.  The sequential word loops
    run over all sectors at once (one column of the transposed array per word).
    """
    import numpy as np

    n, size = plain.shape
    mixed = plain.reshape(n, -1, 32) ^ sector_keys[:, None, :]
    words = np.ascontiguousarray(mixed.reshape(n, size).view("<u4").astype(np.uint32).T)
    w = words.shape[0]
    for _ in range(_CYCLES_A):
        for i in range(w - 1, -1, -1):
            words[i] -= words[(i - 2) % w] ^ _rotl(words[(i - 5) % w], _ROT_A[i % 4])
    for _ in range(_CYCLES_B):
        for i in range(w - 1, -1, -1):
            words[i] -= words[(i + 2) % w] ^ _rotl(words[(i + 5) % w], _ROT_B[i % 4])
    return np.ascontiguousarray(words.T).astype("<u4").view(np.uint8).reshape(n, size)


def elephant_undiffuse(diffused: U8, sector_keys: U8) -> U8:
    """Elephant's decryption side: undo diffuser B, then A, then XOR the sector key."""
    import numpy as np

    n, size = diffused.shape
    words = np.ascontiguousarray(diffused.view("<u4").astype(np.uint32).T)
    w = words.shape[0]
    for _ in range(_CYCLES_B):
        for i in range(w):
            words[i] += words[(i + 2) % w] ^ _rotl(words[(i + 5) % w], _ROT_B[i % 4])
    for _ in range(_CYCLES_A):
        for i in range(w):
            words[i] += words[(i - 2) % w] ^ _rotl(words[(i - 5) % w], _ROT_A[i % 4])
    plain = np.ascontiguousarray(words.T).astype("<u4").view(np.uint8).reshape(n, -1, 32)
    return (plain ^ sector_keys[:, None, :]).reshape(n, size)


def _reference_elephant(
    cbc: Cipher[Any], elephant: _Ecb, iv_sector: int, data: bytes, encrypt: bool
) -> bytes:
    """One sector of aes-cbc-elephant, written as the kernel's index-walking loops."""
    size = len(data)
    offset = ((iv_sector * size) & _MASK64).to_bytes(8, "little")
    ks = elephant.encrypt(offset.ljust(16, b"\0")) + elephant.encrypt(
        offset.ljust(15, b"\0") + b"\x80"
    )
    n = size // 4
    mask = 0xFFFFFFFF

    def rot(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask if r else x

    def xor_key(buf: bytes) -> bytes:
        return bytes(b ^ ks[i % 32] for i, b in enumerate(buf))

    if encrypt:
        d = list(struct.unpack(f"<{n}I", xor_key(data)))
        for _ in range(_CYCLES_A):
            i1, i2, i3 = n - 1, n - 3, n - 6
            while i1 >= 0:
                d[i1] = (d[i1] - (d[i2] ^ rot(d[i3], _ROT_A[i1 % 4]))) & mask
                i1, i2, i3 = i1 - 1, (i2 - 1) % n, (i3 - 1) % n
        for _ in range(_CYCLES_B):
            i1, i2, i3 = n - 1, 1, 4
            while i1 >= 0:
                d[i1] = (d[i1] - (d[i2] ^ rot(d[i3], _ROT_B[i1 % 4]))) & mask
                i1, i2, i3 = i1 - 1, (i2 - 1) % n, (i3 - 1) % n
        enc = cbc.encryptor()
        return enc.update(struct.pack(f"<{n}I", *d)) + enc.finalize()
    dec = cbc.decryptor()
    d = list(struct.unpack(f"<{n}I", dec.update(data) + dec.finalize()))
    for _ in range(_CYCLES_B):
        i1, i2, i3 = 0, 2, 5
        while i1 < n:
            d[i1] = (d[i1] + (d[i2] ^ rot(d[i3], _ROT_B[i1 % 4]))) & mask
            i1, i2, i3 = i1 + 1, (i2 + 1) % n, (i3 + 1) % n
    for _ in range(_CYCLES_A):
        i1, i2, i3 = 0, n - 2, n - 5
        while i1 < n:
            d[i1] = (d[i1] + (d[i2] ^ rot(d[i3], _ROT_A[i1 % 4]))) & mask
            i1, i2, i3 = i1 + 1, (i2 + 1) % n, (i3 + 1) % n
    return xor_key(struct.pack(f"<{n}I", *d))


def _openssl_serves(spec: CipherSpec, key_len: int) -> bool:
    """Whether the OpenSSL/numpy engine implements *spec* with that key."""
    if spec.cipher not in _ALGORITHMS or spec.chainmode not in _OPENSSL_CHAINS:
        return False
    if spec.chainmode != "ecb" and spec.ivmode not in _OPENSSL_IVS:
        return False
    return spec.key_layout(key_len) == (key_len // spec.keycount, 0)


def _gcrypt_engine(
    spec: CipherSpec, key: bytes, sector_size: int, iv_offset: int, iv_shift: int
) -> Any:
    """A ``cryptfuse._gcrypt.Engine`` for *spec*, or None where OpenSSL serves it.

    AES in the modes OpenSSL has stays there (and on the C data path); every other
    cipher goes to libgcrypt when it takes the key (its AVX2 code is the fastest
    here), else back to OpenSSL (CAST5 keys under 128 bits, DES keys it calls weak).
    """
    openssl = _openssl_serves(spec, len(key))
    if spec.cipher == "aes" and openssl:
        return None
    if spec.chainmode != "ecb" and spec.ivmode not in _GCRYPT_IVS:
        if openssl:
            return None
        # BitLocker's Elephant diffuser (an AES key of its own)
        raise UnsupportedError(f"cipher {spec}: iv mode {spec.ivmode!r} is supported with AES only")
    layout = spec.key_layout(len(key))
    assert layout is not None  # check_key_size passed
    part, extra_len = layout
    data_len = {"xts": part // 2, "lrw": part - 16}.get(spec.chainmode, part)
    name = GCRYPT_CIPHERS.get(spec.cipher)
    why = ""
    if _gcrypt is None or name is None:
        why = "libgcrypt (cryptfuse._gcrypt) is not built"
        name = ""
    else:
        info = _gcrypt.cipher_info(name, data_len)
        if info is None or not info[1]:
            why = f"libgcrypt has no {spec.cipher} with a {data_len * 8}-bit key"
    if why:
        if openssl:
            return None
        raise UnsupportedError(f"cipher {spec} with a {len(key) * 8}-bit key: {why}")
    subkeys = [key[i * part : (i + 1) * part] for i in range(spec.keycount)]
    extra = key[spec.keycount * part :]
    assert len(extra) == extra_len
    keys = [sub[:data_len] for sub in subkeys]
    tweak_keys = [sub[data_len:] for sub in subkeys] if spec.chainmode in ("xts", "lrw") else []
    essiv_keys: list[bytes] = []
    if spec.chainmode == "ecb":
        ivmode = _GCRYPT_NO_IV
    else:
        assert spec.ivmode is not None
        ivmode = _GCRYPT_IVS[spec.ivmode]
        if spec.ivmode == "essiv":
            assert spec.ivopts is not None
            # the kernel's essiv template: the same cipher keyed with hash(its own key)
            essiv_keys = [hashes.digest(spec.ivopts, sub) for sub in subkeys]
            info = _gcrypt.cipher_info(name, len(essiv_keys[0]))
            if info is None or not info[1]:
                raise UsageError(
                    f"essiv:{spec.ivopts} gives a {len(essiv_keys[0]) * 8}-bit key, "
                    f"which {spec.cipher} does not accept"
                )
    try:
        return _gcrypt.Engine(
            name,
            _GCRYPT_CHAINS[spec.chainmode],
            ivmode,
            keys,
            tweak_keys,
            essiv_keys,
            sector_size,
            iv_offset & _MASK64,
            iv_shift,
            extra,
        )
    except ValueError as exc:
        if openssl:
            return None
        raise UsageError(f"cipher {spec}: {exc}") from exc
