"""dm-crypt cipher specifications.

The grammar, as dm-crypt's table and cryptsetup's ``--cipher`` accept it::

    spec      := cipher [ ":" keycount ] [ "-" chainmode [ "-" ivmode [ ":" ivopts ] ] ]
    cipher    := "aes" | "camellia" | "sm4" | "cast5" | "blowfish" | "des3_ede" | ...
    keycount  := a power of two (the key is split in that many parts; the part
                 used for a sector is selected by the sector number)
    chainmode := "xts" | "cbc" | "ecb"
    ivmode    := "plain" | "plain64" | "plain64be" | "essiv" | "benbi" | "null"
                 | "eboiv" | "elephant"
    ivopts    := the hash of ESSIV ("essiv:sha256")

A bare cipher (``aes``) and ``aes-plain`` mean ``aes-cbc-plain`` (cryptsetup's
legacy shorthand).  ``ecb`` takes no IV; every other chain mode requires one,
as the kernel does ("IV mechanism required").  Names cryptfuse does not
implement (lmk, tcw, random, lrw, ``capi:`` forms, ...) raise
:class:`UnsupportedError` naming the part that is unsupported.

BitLocker's IVs (kernel 5.6+): ``eboiv`` encrypts the byte offset of the sector
with the data key; ``elephant`` is eboiv plus the Elephant diffuser, whose AES key
is the second half of the key (``aes-cbc-elephant`` takes 256, 384 or 512 bits).
The kernel derives the eboiv IV through the chain mode itself; cryptfuse accepts
both with ``cbc`` only (BitLocker's use) and refuses other chain modes as
unsupported.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import UnsupportedError, UsageError

#: cipher name -> (block size in bytes, allowed key sizes in bytes for one key)
CIPHERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "aes": (16, (16, 24, 32)),
    "camellia": (16, (16, 24, 32)),
    "sm4": (16, (16,)),
    "cast5": (8, tuple(range(5, 17))),
    "blowfish": (8, tuple(range(4, 57))),
    "des3_ede": (8, (24,)),
}
#: aliases accepted for cipher names (the kernel's and cryptsetup's spellings)
CIPHER_ALIASES = {"des3": "des3_ede", "3des": "des3_ede", "tripledes": "des3_ede"}

CHAIN_MODES = ("xts", "cbc", "ecb")
#: BitLocker's IV generators (encrypted byte offset; plus the Elephant diffuser)
BITLK_IV_MODES = ("eboiv", "elephant")
#: key sizes in bytes of the Elephant diffuser's AES key (the kernel's ecb(aes))
ELEPHANT_KEY_SIZES = (16, 24, 32)
IV_MODES = ("plain", "plain64", "plain64be", "essiv", "benbi", "null", *BITLK_IV_MODES)
#: known dm-crypt names that cryptfuse refuses, with why
UNSUPPORTED_IV_MODES = ("lmk", "tcw", "random")
UNSUPPORTED_CHAIN_MODES = ("lrw", "ctr", "pcbc", "cfb", "ofb", "gcm", "ccm", "adiantum")

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
        return sizes

    def check_key_size(self, key_bytes: int) -> None:
        """Raise :class:`UsageError` unless the whole key has a size this spec accepts."""
        if key_bytes <= 0 or key_bytes % self.keycount:
            raise UsageError(f"key size {key_bytes * 8} bits is not valid for cipher {self}")
        if key_bytes // self.keycount not in self.subkey_sizes():
            allowed = ", ".join(str(s * 8 * self.keycount) for s in self.subkey_sizes())
            raise UsageError(
                f"key size {key_bytes * 8} bits is not valid for cipher {self} (allowed: {allowed})"
            )


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
        raise UnsupportedError(f"cipher {cipher!r} is not supported")
    if keycount < 1 or keycount & (keycount - 1):
        raise UsageError(f"key count {keycount} in {text!r} is not a power of two")
    if chain in UNSUPPORTED_CHAIN_MODES:
        raise UnsupportedError(f"chain mode {chain!r} is not supported")
    if chain not in CHAIN_MODES:
        raise UsageError(f"unknown chain mode {chain!r} in {text!r}")
    if chain == "xts" and CIPHERS[cipher][0] != 16:
        raise UsageError(f"xts needs a 128-bit block cipher, not {cipher!r}")
    if chain == "ecb":
        if iv is not None:
            raise UsageError(f"ecb takes no IV mode ({text!r})")
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
        hashlib_name(ivopts)  # refuse an unknown ESSIV hash at parse time
    elif ivopts is not None:
        raise UsageError(f"iv mode {iv!r} takes no options ({text!r})")
    if iv == "benbi" and CIPHERS[cipher][0] > 512 // 8:
        raise UsageError("benbi needs a block size of at most 64 bytes")
    return CipherSpec(cipher, keycount, chain, iv, ivopts)


def _check_bitlk_iv(iv: str, chain: str, keycount: int) -> None:
    """eboiv/elephant as dm-crypt takes them, limited to what cryptfuse implements."""
    if chain != "cbc":
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
