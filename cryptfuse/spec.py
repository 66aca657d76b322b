"""dm-crypt cipher specifications.

The grammar, as dm-crypt's table and cryptsetup's ``--cipher`` accept it::

    spec      := cipher [ ":" keycount ] [ "-" chainmode [ "-" ivmode [ ":" ivopts ] ] ]
    cipher    := "aes" | "serpent" | "twofish" | "camellia" | "sm4" | "cast5"
               | "blowfish" | "des3_ede"
    keycount  := a power of two (the key is split in that many parts; the part
                 used for a sector is selected by the sector number)
    chainmode := "xts" | "cbc" | "ecb" | "ctr" | "lrw"
    ivmode    := "plain" | "plain64" | "plain64be" | "essiv" | "benbi" | "null"
               | "lmk" | "tcw" | "random" | "eboiv" | "elephant"
    ivopts    := the hash of ESSIV ("essiv:sha256")

A bare cipher (``aes``) and ``aes-plain`` mean ``aes-cbc-plain`` (cryptsetup's
legacy shorthand).  Every chain mode but ``ecb`` requires an IV mode, as the
kernel does ("IV mechanism required"); ``ecb`` with one (qemu writes
``ecb-plain64``) is accepted with dm-crypt's warning that the IV is ignored.
Beyond the cipher's own key, ``lrw`` takes a 16-byte tweak key, ``tcw`` an IV
seed (one block) and 16 bytes of whitening, and ``lmk`` with one key more than
``keycount`` (loop-AES v3) an IV seed; :meth:`CipherSpec.key_layout` splits a
key accordingly.  Names cryptfuse does not implement (pcbc, ``capi:`` forms,
cast6, ...) raise :class:`UnsupportedError` naming the part.

BitLocker's IVs (kernel 5.6+): ``eboiv`` encrypts the byte offset of the sector
with the data key; ``elephant`` is eboiv plus the Elephant diffuser, whose AES key
is the second half of the key (``aes-cbc-elephant`` takes 256, 384 or 512 bits).
Any block cipher takes ``eboiv`` with ``cbc`` (BitLocker's use), and with
``ctr`` as cryptsetup's userspace crypto does (the offset through the cipher's
ECB; dm-crypt itself refuses ``ctr`` there, its block size being 1); ``xts``
and ``lrw``, where dm-crypt runs the offset through the whole chain mode, are
refused as unsupported.  ``elephant`` is ``aes-cbc`` only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

from . import hashes
from .errors import UnsupportedError, UsageError

_log = logging.getLogger(__name__)

#: cipher name -> (block size in bytes, allowed key sizes in bytes for one key)
CIPHERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "aes": (16, (16, 24, 32)),
    # the kernel takes 0-32 byte Serpent keys (padded as the Serpent paper says)
    "serpent": (16, tuple(range(1, 33))),
    "twofish": (16, (16, 24, 32)),
    "camellia": (16, (16, 24, 32)),
    "sm4": (16, (16,)),
    "cast5": (8, tuple(range(5, 17))),
    "blowfish": (8, tuple(range(4, 57))),
    "des3_ede": (8, (24,)),
}
#: aliases accepted for cipher names (the kernel's and cryptsetup's spellings)
CIPHER_ALIASES = {"des3": "des3_ede", "3des": "des3_ede", "tripledes": "des3_ede"}

CHAIN_MODES = ("xts", "cbc", "ecb", "ctr", "lrw")
#: BitLocker's IV generators (encrypted byte offset; plus the Elephant diffuser)
BITLK_IV_MODES = ("eboiv", "elephant")
#: key sizes in bytes of the Elephant diffuser's AES key (the kernel's ecb(aes))
ELEPHANT_KEY_SIZES = (16, 24, 32)
IV_MODES = (
    "plain",
    "plain64",
    "plain64be",
    "essiv",
    "benbi",
    "null",
    "lmk",
    "tcw",
    "random",
    *BITLK_IV_MODES,
)
#: known dm-crypt names that cryptfuse refuses
UNSUPPORTED_IV_MODES: tuple[str, ...] = ()
UNSUPPORTED_CHAIN_MODES = ("pcbc", "cfb", "ofb", "cts", "gcm", "ccm", "adiantum")
#: ciphers the kernel has but no library cryptfuse uses (docs/ciphers.md)
UNSUPPORTED_CIPHERS = ("cast6", "anubis", "khazad", "tea", "xtea", "tnepres", "aria", "seed")
#: bytes of LRW's tweak key, after the cipher's key
LRW_TWEAK_KEY = 16
#: bytes of TCW's whitening, after the IV seed
TCW_WHITENING = 16

_SPEC_RE = re.compile(
    r"^(?P<cipher>[A-Za-z0-9_]+)(?::(?P<keycount>[0-9]+))?"
    r"(?:-(?P<chain>[A-Za-z0-9_]+)(?:-(?P<iv>[A-Za-z0-9_]+)(?::(?P<ivopts>[A-Za-z0-9_:-]+))?)?)?$"
)


@dataclass(frozen=True)
class CipherSpec:
    """A parsed dm-crypt cipher specification (see the module docstring)."""

    cipher: str
    keycount: int
    chainmode: str
    ivmode: str | None
    ivopts: str | None = None

    def __str__(self) -> str:
        text = self.cipher
        if self.keycount != 1:
            text += f":{self.keycount}"
        text += f"-{self.chainmode}"
        if self.ivmode is not None:
            text += f"-{self.ivmode}"
            if self.ivopts is not None:
                text += f":{self.ivopts}"
        return text

    @property
    def block_size(self) -> int:
        """The block size of the cipher in bytes."""
        return CIPHERS[self.cipher][0]

    @property
    def iv_size(self) -> int:
        """dm-crypt's IV size: the block size, at least 8 bytes (a 64-bit sector number)."""
        return max(self.block_size, 8)

    @property
    def mode(self) -> str:
        """The part after the cipher name, as LUKS1 stores it (``xts-plain64``)."""
        return str(self).split("-", 1)[1]

    def subkey_sizes(self) -> tuple[int, ...]:
        """Allowed sizes in bytes of one of the ``keycount`` subkeys."""
        sizes = CIPHERS[self.cipher][1]
        if self.ivmode == "elephant":  # data key || diffuser key, equal halves
            return tuple(2 * s for s in sizes if s in ELEPHANT_KEY_SIZES)
        if self.chainmode == "xts":
            return tuple(2 * s for s in sizes)
        if self.chainmode == "lrw":
            return tuple(s + LRW_TWEAK_KEY for s in sizes)
        return sizes

    def _extra_size(self) -> int:
        """Bytes after the subkeys that are not cipher keys (tcw's IV seed and whitening)."""
        return self.iv_size + TCW_WHITENING if self.ivmode == "tcw" else 0

    def key_layout(self, key_bytes: int) -> tuple[int, int] | None:
        """(subkey size, bytes of IV material after the subkeys), or None if invalid.

        dm-crypt's split (``crypt_ctr_cipher_old``): ``tcw`` ends in an IV seed and
        16 bytes of whitening; ``lmk`` with a key that ``keycount`` does not divide
        has ``keycount + 1`` equal parts, the last one the IV seed (loop-AES v3).
        """
        chain_ivmode = None if self.chainmode == "ecb" else self.ivmode
        extra = self._extra_size() if chain_ivmode else 0
        rest = key_bytes - extra
        if rest <= 0:
            return None
        if chain_ivmode == "lmk" and rest % self.keycount:
            if rest % (self.keycount + 1):
                return None
            part = rest // (self.keycount + 1)
            extra = part
        elif rest % self.keycount:
            return None
        else:
            part = rest // self.keycount
        if part not in self.subkey_sizes():
            return None
        return part, extra

    def check_key_size(self, key_bytes: int) -> None:
        """Raise :class:`UsageError` unless the whole key has a size this spec accepts."""
        if self.key_layout(key_bytes) is None:
            extra = self._extra_size() if self.chainmode != "ecb" else 0
            allowed = ", ".join(str((s * self.keycount + extra) * 8) for s in self.subkey_sizes())
            raise UsageError(
                f"key size {key_bytes * 8} bits is not valid for cipher {self} (allowed: {allowed})"
            )


def default_key_bits(cipher: str) -> int:
    """The key size cryptsetup 2.6.1 gives a LUKS cipher when ``--key-size`` is not
    given (``get_adjusted_key_size`` with its 256-bit default): 512 bits for a mode
    starting ``xts-`` (two keys), 256 for any other."""
    mode = cipher.partition("-")[2]
    return 512 if mode.startswith("xts-") else 256


def parse_cipher_spec(text: str) -> CipherSpec:
    """Parse a dm-crypt cipher spec into a :class:`CipherSpec`.

    Raises :class:`UsageError` for text that is not a cipher spec at all and
    :class:`UnsupportedError` for well-formed specs naming something cryptfuse
    does not implement.
    """
    if text.startswith("capi:"):
        raise UnsupportedError(f"kernel crypto API cipher spec {text!r} (capi:) is not supported")
    match = _SPEC_RE.match(text)
    if match is None:
        raise UsageError(f"invalid cipher specification {text!r}")
    cipher = match["cipher"].lower()
    cipher = CIPHER_ALIASES.get(cipher, cipher)
    keycount = int(match["keycount"]) if match["keycount"] is not None else 1
    chain = match["chain"].lower() if match["chain"] else None
    iv = match["iv"].lower() if match["iv"] else None
    ivopts = match["ivopts"]

    # cryptsetup's legacy shorthands: "aes" and "aes-plain" are "aes-cbc-plain".
    if chain is None or (chain == "plain" and iv is None):
        chain, iv = "cbc", "plain"

    if cipher not in CIPHERS:
        if cipher in UNSUPPORTED_CIPHERS:
            raise UnsupportedError(
                f"cipher {cipher!r} is not supported (no library cryptfuse uses has it)"
            )
        raise UnsupportedError(f"cipher {cipher!r} is not supported")
    if keycount < 1 or keycount & (keycount - 1):
        raise UsageError(f"key count {keycount} in {text!r} is not a power of two")
    if chain in UNSUPPORTED_CHAIN_MODES:
        raise UnsupportedError(f"chain mode {chain!r} is not supported")
    if chain not in CHAIN_MODES:
        raise UsageError(f"unknown chain mode {chain!r} in {text!r}")
    if chain in ("xts", "lrw") and CIPHERS[cipher][0] != 16:
        raise UsageError(f"{chain} needs a 128-bit block cipher, not {cipher!r}")
    if chain == "ecb":
        if iv is not None:
            # dm-crypt: "Selected cipher does not support IVs", and the IV mode is dropped
            _log.warning("cipher %s: ecb takes no IV, iv mode %r is ignored", text, iv)
            return CipherSpec(cipher, keycount, chain, iv, ivopts)
    elif iv is None:
        raise UsageError(f"chain mode {chain!r} needs an IV mode ({text!r})")
    elif iv in UNSUPPORTED_IV_MODES:
        raise UnsupportedError(f"iv mode {iv!r} is not supported")
    elif iv not in IV_MODES:
        raise UsageError(f"unknown iv mode {iv!r} in {text!r}")

    if iv in BITLK_IV_MODES:
        _check_bitlk_iv(iv, chain, keycount)
    if iv == "essiv":
        if not ivopts:
            raise UsageError(f"essiv needs a hash ({text!r}: use essiv:sha256)")
        ivopts = ivopts.lower()
        hashes.check(ivopts)  # refuse an unknown ESSIV hash at parse time
    elif ivopts is not None:
        raise UsageError(f"iv mode {iv!r} takes no options ({text!r})")
    if iv == "benbi" and CIPHERS[cipher][0] > 512 // 8:
        raise UsageError("benbi needs a block size of at most 64 bytes")
    return CipherSpec(cipher, keycount, chain, iv, ivopts)


def _check_bitlk_iv(iv: str, chain: str, keycount: int) -> None:
    """eboiv/elephant as dm-crypt takes them, limited to what cryptfuse implements."""
    if chain not in ("cbc", "ctr") or (iv == "elephant" and chain != "cbc"):
        raise UnsupportedError(f"iv mode {iv!r} with chain mode {chain!r} is not supported")
    if iv == "elephant" and keycount != 1:
        raise UnsupportedError("iv mode 'elephant' with a key count is not supported")


# cryptsetup / gcrypt / kernel spellings -> hashlib names
_HASH_ALIASES = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
    "rmd160": "ripemd160",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
    "sha3_224": "sha3_224",
    "sha3_256": "sha3_256",
    "sha3_384": "sha3_384",
    "sha3_512": "sha3_512",
    "blake2b-512": "blake2b",
    "blake2s-256": "blake2s",
    "sm3": "sm3",
    "md5": "md5",
}


def hashlib_name(name: str) -> str:
    """Return the :mod:`hashlib` name of cryptsetup hash *name*.

    Raises :class:`UnsupportedError` when this Python cannot compute it
    (whirlpool and stribog, for example, are not in OpenSSL 3's default provider).
    """
    mapped = _HASH_ALIASES.get(name.lower())
    if mapped is None or mapped not in hashlib.algorithms_available:
        raise UnsupportedError(f"hash {name!r} is not supported")
    return mapped
