"""TCRYPT: TrueCrypt and VeraCrypt volumes, as cryptsetup 2.6+ opens them.

TCRYPT has no plaintext magic: the 512-byte header is a 64-byte salt followed by
448 bytes encrypted with a key derived from the passphrase (and key files), so
opening is trial decryption over every (PRF, cipher chain) pair cryptsetup knows,
until the decrypted header starts with ``TRUE`` (or ``VERA`` when VeraCrypt modes
are on, the default).  Learned from cryptsetup's ``lib/tcrypt``:

* key material: the passphrase (at most 64 bytes; 128 for VeraCrypt) is added
  byte-wise to a pool built from the key files (a running CRC-32 of each file's
  first MiB, four bytes per input byte added into the pool); with key files the
  whole pool is the password;
* PRFs: PBKDF2 with RIPEMD-160 (2000 or 1000 rounds), SHA-512 and Whirlpool (1000),
  legacy SHA-1 (2000); VeraCrypt: SHA-512, Whirlpool, SHA-256, BLAKE2s-256,
  RIPEMD-160 and Streebog with 500 000 / 655 331 rounds or 15 000 + 1000 * PIM,
  the boot variants (200 000 / 327 661, 2048 * PIM) and Argon2id; 192 bytes of key;
* header ciphers: XTS (one 448-byte data unit, tweak 0) with cascades decrypted
  from the last cipher to the first, each cipher taking 32 bytes of key at its
  offset and 32 bytes of XTS tweak key further on; LRW and CBC for old volumes;
* header fields (big endian): version, required program version, CRC-32 of the
  key area, hidden and plain volume sizes, master-key offset, flags, sector size,
  CRC-32 of the first 188 bytes (version > 3), and 256 bytes of keys;
* the volume: one dm-crypt layer per cipher of the chain (``aes-twofish-serpent``
  = aes outermost), all with the same sector numbering.

Header and data go through the sector engine by name (``serpent-xts-plain64``,
``aes-lrw-benbi``, ``cast5-cbc-tcw``, ...): a chain is tried when the engine knows
its ciphers and mode, and reported as not tried otherwise.  The CBC cascades
(``cbci-tcrypt``) and Blowfish (``cbc-tcrypt``) have no dm-crypt mode; cryptsetup
cannot activate them and cryptfuse does not try them.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import (
    DeviceError,
    FormatError,
    InsufficientMemoryError,
    KeyFileError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from ..foreign_crypto import crc_table
from ..kdf import argon2, pbkdf2
from ..sector import Buffer, SectorCipher
from ..spec import parse_cipher_spec
from ..volume import Volume, device_size, open_device
from .luks_common import pread_exact

HDR_SIZE = 512
SALT_LEN = 64
ENC_LEN = 448
KEY_LEN = 192
POOL_TC = 64
POOL_VC = 128
KEYFILE_MAX = 1 << 20
HIDDEN_OFFSET = 65536
HIDDEN_OFFSET_OLD = -1536
HIDDEN_OFFSET_BACKUP = -65536
BACKUP_OFFSET = -131072
SYSTEM_OFFSET = 31744

NOT_DETECTED = "No device header detected with this passphrase."


@dataclass(frozen=True)
class Kdf:
    """One row of cryptsetup's TCRYPT KDF table."""

    name: str  # "pbkdf2" or "argon2id"
    hash: str | None
    iterations: int
    legacy: bool = False
    veracrypt: bool = False
    pim_const: int = 0
    pim_mult: int = 0
    memory_kib: int = 0
    parallel: int = 0

    @property
    def label(self) -> str:
        return self.hash or self.name


KDFS: tuple[Kdf, ...] = (
    Kdf("pbkdf2", "ripemd160", 2000),
    Kdf("pbkdf2", "ripemd160", 1000),
    Kdf("pbkdf2", "sha512", 1000),
    Kdf("pbkdf2", "whirlpool", 1000),
    Kdf("pbkdf2", "sha1", 2000, legacy=True),
    Kdf("pbkdf2", "sha512", 500000, veracrypt=True, pim_const=15000, pim_mult=1000),
    Kdf("pbkdf2", "whirlpool", 500000, veracrypt=True, pim_const=15000, pim_mult=1000),
    Kdf("pbkdf2", "sha256", 500000, veracrypt=True, pim_const=15000, pim_mult=1000),
    Kdf("pbkdf2", "sha256", 200000, veracrypt=True, pim_mult=2048),  # boot only
    Kdf("argon2id", None, 6, veracrypt=True, memory_kib=425984, parallel=1),
    Kdf("pbkdf2", "blake2s-256", 500000, veracrypt=True, pim_const=15000, pim_mult=1000),
    Kdf("pbkdf2", "blake2s-256", 200000, veracrypt=True, pim_mult=2048),  # boot only
    Kdf("pbkdf2", "ripemd160", 655331, veracrypt=True, pim_const=15000, pim_mult=1000),
    Kdf("pbkdf2", "ripemd160", 327661, veracrypt=True, pim_mult=2048),  # boot only
    Kdf("pbkdf2", "stribog512", 500000, veracrypt=True, pim_const=15000, pim_mult=1000),
)


@dataclass(frozen=True)
class Alg:
    """One cipher of a chain: key offset and (XTS) tweak-key or (CBC) IV offset."""

    name: str
    key_size: int
    iv_size: int
    key_offset: int
    iv_offset: int
    key_extra_size: int = 0


@dataclass(frozen=True)
class Chain:
    """One row of cryptsetup's TCRYPT cipher table."""

    long_name: str
    mode: str
    key_size: int
    algs: tuple[Alg, ...]
    legacy: bool = False


def _xts(names: str) -> Chain:
    parts = names.split("-")
    n = len(parts)
    algs = tuple(Alg(p, 64, 16, 32 * i, 32 * (n + i)) for i, p in enumerate(parts))
    return Chain(names, "xts-plain64", 64 * n, algs)


def _lrw(names: str) -> Chain:
    parts = names.split("-")
    algs = tuple(Alg(p, 48, 16, 32 * (i + 1), 0) for i, p in enumerate(parts))
    return Chain(names, "lrw-benbi", 48 * len(parts), algs)


#: the ciphers and cascades of TrueCrypt (XTS and, before 5.0, LRW)
_TRUECRYPT = (
    "aes",
    "serpent",
    "twofish",
    "twofish-aes",
    "serpent-twofish-aes",
    "aes-serpent",
    "aes-twofish-serpent",
    "serpent-twofish",
)
#: the ones VeraCrypt added (XTS only)
_VERACRYPT = (
    "camellia",
    "kuznyechik",
    "kuznyechik-camellia",
    "twofish-kuznyechik",
    "serpent-camellia",
    "aes-kuznyechik",
    "camellia-serpent-kuznyechik",
)

CHAINS: tuple[Chain, ...] = (
    *(_xts(n) for n in _TRUECRYPT + _VERACRYPT),
    *(_lrw(n) for n in _TRUECRYPT),
    Chain("aes", "cbc-tcw", 64, (Alg("aes", 32, 16, 32, 0, 32),), legacy=True),
    Chain("serpent", "cbc-tcw", 64, (Alg("serpent", 32, 16, 32, 0, 32),), legacy=True),
    Chain("twofish", "cbc-tcw", 64, (Alg("twofish", 32, 16, 32, 0, 32),), legacy=True),
    Chain("cast5", "cbc-tcw", 40, (Alg("cast5", 16, 8, 32, 0, 24),), legacy=True),
    Chain("des3_ede", "cbc-tcw", 48, (Alg("des3_ede", 24, 8, 32, 0, 24),), legacy=True),
)


@dataclass(frozen=True)
class TcryptOptions:
    """cryptsetup's TCRYPT open/dump options."""

    veracrypt: bool = True  # try VeraCrypt modes (cryptsetup 2.6 default)
    pim: int = 0
    hidden: bool = False
    system: bool = False
    backup: bool = False
    hash: str | None = None  # -h: only PRFs whose name contains this
    cipher: str | None = None  # -c: only chains whose name contains this
    keyfiles: tuple[str, ...] = ()


@dataclass(repr=False)
class TcryptHeader:
    """A decrypted TCRYPT header and how it was found."""

    magic: str  # "TRUE" or "VERA"
    version: int
    version_tc: int
    hidden_volume_size: int
    volume_size: int
    mk_offset: int
    mk_size: int
    flags: int
    sector_size: int
    keys: bytes
    kdf: Kdf
    chain: Chain

    def __repr__(self) -> str:
        return f"<TCRYPT {self.magic} v{self.version} {self.chain.long_name}-{self.chain.mode}>"

    @property
    def volume_key(self) -> bytes:
        """The key of every cipher of the chain, concatenated (what tcryptDump prints)."""
        return b"".join(_cipher_key(self.chain, alg, self.keys) for alg in self.chain.algs)


# -- key material ---------------------------------------------------------------------


_CRC = crc_table(0xEDB88320)


def _pool_keyfile(pool: bytearray, data: bytes, length: int) -> None:
    """Mix a key file into the pool: a running CRC-32 (no final inversion), four
    bytes of it added per input byte."""
    crc = 0xFFFFFFFF
    j = 0
    table = _CRC
    for b in data[:KEYFILE_MAX]:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        pool[j] = (pool[j] + (crc >> 24)) & 0xFF
        pool[j + 1] = (pool[j + 1] + (crc >> 16)) & 0xFF
        pool[j + 2] = (pool[j + 2] + (crc >> 8)) & 0xFF
        pool[j + 3] = (pool[j + 3] + crc) & 0xFF
        j = (j + 4) % length


def read_keyfiles(paths: Sequence[str]) -> list[bytes]:
    """The first MiB of each TrueCrypt key file."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                out.append(f.read(KEYFILE_MAX))
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist") from None
        except OSError as exc:
            raise KeyFileError(f"Error reading keyfile {path}: {exc.strerror}") from None
    return out


def password_pool(passphrase: bytes, keyfiles: Sequence[bytes], veracrypt: bool) -> bytes:
    """The PBKDF input: the passphrase added into the key-file pool."""
    if veracrypt and len(passphrase) > POOL_TC:
        limit = POOL_VC
    else:
        limit = POOL_TC
    if len(passphrase) > limit:
        raise UsageError(f"Maximum TCRYPT passphrase length ({limit}) exceeded.")
    pool = bytearray(POOL_VC)
    for data in keyfiles:
        _pool_keyfile(pool, data, limit)
    for i, b in enumerate(passphrase):
        pool[i] = (pool[i] + b) & 0xFF
    size = limit if keyfiles else len(passphrase)
    return bytes(pool[:size])


def _derive(kdf: Kdf, password: bytes, salt: bytes, pim: int, veracrypt: bool) -> bytes:
    iterations, memory = kdf.iterations, kdf.memory_kib
    if veracrypt and pim:
        if kdf.name == "argon2id":
            if pim <= 31:
                iterations, memory = (pim - 1) // 3 + 3, 1024 * (64 + (pim - 1) * 32)
            else:
                iterations, memory = pim - 18, 1024 * 1024
        else:
            iterations = kdf.pim_const + kdf.pim_mult * pim
    if kdf.name == "argon2id":
        return argon2("argon2id", password, salt, iterations, memory, kdf.parallel, KEY_LEN)
    assert kdf.hash is not None
    return pbkdf2(kdf.hash, password, salt, iterations, KEY_LEN)


# -- header decryption -----------------------------------------------------------------


def _cipher_key(chain: Chain, alg: Alg, key: bytes) -> bytes:
    """The key of one cipher as dm-crypt takes it (TCRYPT_copy_key)."""
    if chain.mode.startswith("xts"):
        half = alg.key_size // 2
        return (
            key[alg.key_offset : alg.key_offset + half] + key[alg.iv_offset : alg.iv_offset + half]
        )
    if chain.mode.startswith("lrw"):
        ks2 = alg.key_size - 16
        return key[alg.key_offset : alg.key_offset + ks2] + key[:16]
    return (
        key[alg.key_offset : alg.key_offset + alg.key_size]
        + key[alg.iv_offset : alg.iv_offset + alg.key_extra_size]
    )


def _engine(spec: str, key: bytes) -> SectorCipher:
    """The sector engine for *spec* (512-byte sectors, IV sector 0 = the header)."""
    return SectorCipher(parse_cipher_spec(spec), key, 512)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _whiten(buf: bytes, key: bytes) -> bytes:
    """TCRYPT's CBC header whitening: the 8 key bytes from offset 8, repeated."""
    whitening = key[8:16]
    return bytes(b ^ whitening[i % 8] for i, b in enumerate(buf))


def _cbc_decrypt(alg: Alg, key: bytes, buf: bytes) -> bytes:
    """CBC over the header with the IV from the key area, through the engine's ECB."""
    ecb = _engine(f"{alg.name}-ecb", key[alg.key_offset : alg.key_offset + alg.key_size])
    plain = ecb.decrypt(_padded(buf), 0)[: len(buf)]
    bs = alg.iv_size
    chain = key[alg.iv_offset : alg.iv_offset + bs] + buf[:-bs]
    return bytes(a ^ b for a, b in zip(plain, chain, strict=True))


def chain_supported(chain: Chain) -> list[str]:
    """What the sector engine lacks for *chain* (empty when it can be tried)."""
    if chain.mode.startswith("cbc") and chain.mode != "cbc-tcw":
        return [chain.mode]  # cbci-tcrypt and blowfish_le: no kernel mode either
    missing = []
    for alg in chain.algs:
        try:
            parse_cipher_spec(f"{alg.name}-{chain.mode}")
        except UnsupportedError as exc:
            missing.append(str(exc).removesuffix(" is not supported"))
    return missing


def _decrypt_header(chain: Chain, key: bytes, encrypted: bytes) -> bytes:
    """The 448 bytes decrypted with *chain*, last cipher first.

    XTS: one 448-byte data unit with tweak 0, which is the first 448 bytes of a
    512-byte sector 0; LRW: block index 1 on, i.e. benbi's sector 0; CBC: the IV
    from the key area, after removing the whitening.
    """
    buf = encrypted
    for alg in reversed(chain.algs):
        if chain.mode.startswith("cbc"):
            buf = _cbc_decrypt(alg, key, _whiten(buf, key))
        else:
            engine = _engine(f"{alg.name}-{chain.mode}", _cipher_key(chain, alg, key))
            buf = bytes(engine.decrypt(_padded(buf), 0)[: len(buf)])
    return buf


def _parse(plain: bytes, kdf: Kdf, chain: Chain) -> TcryptHeader:
    (magic, version, version_tc, keys_crc) = struct.unpack_from(">4sHHI", plain)
    (hidden, volume, mk_offset, mk_size, flags, sector_size) = struct.unpack_from(
        ">QQQQII", plain, 28
    )
    header_crc = struct.unpack_from(">I", plain, 188)[0]
    keys = plain[192:448]
    if version > 3 and zlib.crc32(plain[:188]) != header_crc:
        raise FormatError("TCRYPT header CRC32 mismatch.")
    if zlib.crc32(keys) != keys_crc:
        raise FormatError("TCRYPT keys CRC32 mismatch.")
    return TcryptHeader(
        magic=magic.decode("ascii"),
        version=version,
        version_tc=version_tc,
        hidden_volume_size=hidden,
        volume_size=volume,
        mk_offset=mk_offset or 512,
        mk_size=mk_size,
        flags=flags,
        sector_size=sector_size or 512,
        keys=keys,
        kdf=kdf,
        chain=chain,
    )


def header_offset(options: TcryptOptions) -> list[int]:
    """Where the header is tried (negative: from the end of the device)."""
    if options.system:
        return [SYSTEM_OFFSET]
    if options.hidden:
        if options.backup:
            return [HIDDEN_OFFSET_BACKUP]
        return [HIDDEN_OFFSET, HIDDEN_OFFSET_OLD]
    if options.backup:
        return [BACKUP_OFFSET]
    return [0]


def _try_header(
    raw: bytes, password: bytes, options: TcryptOptions, skipped: set[str]
) -> TcryptHeader | None:
    salt, encrypted = raw[:SALT_LEN], raw[SALT_LEN:HDR_SIZE]
    for kdf in KDFS:
        if options.hash and (kdf.hash or kdf.name).find(options.hash) < 0:
            continue
        if kdf.veracrypt and not options.veracrypt:
            continue
        if options.veracrypt and options.pim and not kdf.veracrypt:
            continue
        try:
            key = _derive(kdf, password, salt, options.pim, options.veracrypt)
        except (UnsupportedError, InsufficientMemoryError) as exc:
            skipped.add(kdf.label if isinstance(exc, UnsupportedError) else f"{kdf.label} ({exc})")
            continue
        for chain in CHAINS:
            if options.cipher and chain.long_name.find(options.cipher) < 0:
                continue
            missing = chain_supported(chain)
            if missing:
                skipped.update(missing)
                continue
            try:
                plain = _decrypt_header(chain, key, encrypted)
            except UsageError:  # e.g. an XTS key with equal halves: not this chain
                continue
            if plain[:4] == b"TRUE" or (options.veracrypt and plain[:4] == b"VERA"):
                return _parse(plain, kdf, chain)
    return None


def read_tcrypt_header(
    fd: int, path: str, passphrase: bytes, keyfiles: Sequence[bytes], options: TcryptOptions
) -> TcryptHeader:
    """Find and decrypt the TCRYPT header of *fd* with the passphrase and key files.

    Raises :class:`WrongPassphraseError` ("No device header detected with this
    passphrase.") when no PRF and chain gives a header, naming what was not tried
    because this build lacks it.
    """
    if options.pim < 0 or options.pim > 0xFFFFFFFF:
        raise UsageError("Invalid PIM value: outside of range.")
    password = password_pool(passphrase, keyfiles, options.veracrypt)
    total = device_size(fd)
    skipped: set[str] = set()
    for offset in header_offset(options):
        where = offset if offset >= 0 else total + offset
        if where < 0 or where + HDR_SIZE > total:
            continue
        raw = pread_exact(fd, HDR_SIZE, where, "TCRYPT header")
        header = _try_header(raw, password, options, skipped)
        if header is not None:
            return header
    if total < HDR_SIZE:
        raise DeviceError(f"{path} is too small for a TCRYPT header")
    message = NOT_DETECTED
    if skipped:
        message += " (not tried, unsupported here: " + ", ".join(sorted(skipped)) + ")"
    raise WrongPassphraseError(message)


# -- geometry and the volume ----------------------------------------------------------------


def geometry(header: TcryptHeader, options: TcryptOptions, total: int) -> tuple[int, int, int]:
    """(data offset, IV offset, size) in bytes/512-byte sectors as cryptsetup maps it.

    The data and IV offsets count 512-byte sectors; the size is in bytes.
    """
    mode = header.chain.mode
    if options.system:
        offset = header.mk_offset // 512
    elif mode.startswith("xts"):
        if header.version < 3:
            offset = 1
        elif options.hidden:
            if header.version > 3:
                offset = header.mk_offset // 512
            else:
                offset = (total - header.hidden_volume_size + HIDDEN_OFFSET_OLD) // 512
        else:
            offset = header.mk_offset // 512
    elif options.hidden:
        offset = (total - header.hidden_volume_size + HIDDEN_OFFSET_OLD) // 512
    else:
        offset = header.mk_offset // 512
    if mode.startswith("xts"):
        iv_offset = offset
    elif mode.startswith("lrw"):
        iv_offset = 0
    else:
        iv_offset = header.mk_offset // 512
    if options.hidden:
        size = header.hidden_volume_size
    else:
        size = header.volume_size
    # cryptsetup >= 2.7 maps the encrypted area of a system volume (2.6 to the end);
    # old headers (version 1/2) record no size: like dm's size 0, the rest of the device
    if size == 0:
        size = max(0, total - offset * 512)
    return offset, iv_offset, size - size % 512


class CascadeCipher:
    """The sector ciphers of a TCRYPT chain, stacked as cryptsetup's dm-crypt
    devices are: *layers* outermost first.  For ``aes-twofish-serpent`` the device
    holds serpent(twofish(aes(plain))): a read removes serpent's layer first."""

    def __init__(self, layers: Sequence[SectorCipher], name: str) -> None:
        self.layers = list(layers)
        self.sector_size = self.layers[0].sector_size
        self.spec = name
        self.iv_offset = self.layers[0].iv_offset
        self.iv_shift = self.layers[0].iv_shift
        self.engine = None  # no single engine serves a cascade (nor the C data path)

    def fast_parameters(self) -> None:
        return None

    def encrypt(self, data: Buffer, first_sector: int) -> bytearray:
        out = self.layers[0].encrypt(data, first_sector)
        for layer in self.layers[1:]:
            out = layer.encrypt(out, first_sector)
        return out

    def decrypt(self, data: Buffer, first_sector: int) -> bytearray:
        out = self.layers[-1].decrypt(data, first_sector)
        for layer in reversed(self.layers[:-1]):
            out = layer.decrypt(out, first_sector)
        return out

    def encrypt_into(self, data: Buffer, first_sector: int, out: Buffer) -> None:
        memoryview(out).cast("B")[:] = self.encrypt(data, first_sector)

    def decrypt_into(self, data: Buffer, first_sector: int, out: Buffer) -> None:
        memoryview(out).cast("B")[:] = self.decrypt(data, first_sector)


def data_cipher(header: TcryptHeader, iv_offset: int) -> SectorCipher | CascadeCipher:
    """The sector cipher (or cascade) of the volume, IVs counted from *iv_offset*."""
    chain = header.chain
    if chain.mode.startswith("cbc") and "tcw" not in chain.mode:
        raise UnsupportedError(
            f"Kernel does not support activation for this TCRYPT legacy mode ({chain.mode})."
        )
    layers = []
    for alg in chain.algs:
        spec = parse_cipher_spec(f"{alg.name}-{chain.mode}")
        layers.append(SectorCipher(spec, _cipher_key(chain, alg, header.keys), 512, iv_offset))
    if len(layers) == 1:
        return layers[0]
    return CascadeCipher(layers, f"{chain.long_name}-{chain.mode}")


def volume_from_header(
    fd: int, header: TcryptHeader, options: TcryptOptions, readonly: bool, container: str
) -> Volume:
    """The decrypted volume of *header*; takes ownership of *fd*."""
    if header.sector_size % 512:
        raise UnsupportedError(f"Activation is not supported for {header.sector_size} sector size.")
    total = device_size(fd)
    offset, iv_offset, size = geometry(header, options, total)
    if size <= 0 or offset * 512 + size > total:
        raise DeviceError(
            f"{container}: the TCRYPT volume ({size} bytes at sector {offset}) does not fit "
            f"in the device ({total} bytes)"
        )
    cipher = data_cipher(header, iv_offset)
    return Volume(
        fd,
        cipher,  # type: ignore[arg-type]  # a CascadeCipher serves the same calls
        offset * 512,
        size,
        readonly=readonly,
        description=f"TCRYPT {container}",
    )


def open_tcrypt(
    container: str, passphrase: bytes, options: TcryptOptions, readonly: bool
) -> Volume:
    """Open a TrueCrypt/VeraCrypt volume with its passphrase and key files."""
    keyfiles = read_keyfiles(options.keyfiles)
    fd = open_device(container, readonly)
    try:
        header = read_tcrypt_header(fd, container, passphrase, keyfiles, options)
        return volume_from_header(fd, header, options, readonly, container)
    except BaseException:
        os.close(fd)
        raise


def dump(header: TcryptHeader, path: str) -> str:
    """``cryptsetup tcryptDump``'s text."""
    lines = [
        f"{'TCRYPT' if header.magic == 'TRUE' else 'VERACRYPT'} header information for {path}",
        f"Version:       \t{header.version}",
        f"Driver req.:\t{header.version_tc >> 8:x}.{header.version_tc & 0xFF:x}",
        f"Flags:       \t0x{header.flags:x}",
        f"Sector size:\t{header.sector_size} [bytes]",
        f"MK offset:\t{header.mk_offset} [bytes]",
    ]
    if header.volume_size:
        lines.append(f"Volume size:\t{header.volume_size} [bytes]")
    if header.hidden_volume_size:
        lines.append(f"Hidden size:\t{header.hidden_volume_size} [bytes]")
    if header.kdf.name == "argon2id":
        lines.append("PBKDF:\t\tArgon2id")
    else:
        lines += ["PBKDF:\t\tPBKDF2", f"PBKDF2 hash:\t{header.kdf.hash}"]
    lines += [
        f"Cipher chain:\t{header.chain.long_name}",
        f"Cipher mode:\t{header.chain.mode}",
        f"MK bits:       \t{len(header.volume_key) * 8}",
    ]
    return "\n".join(lines)


def dump_volume_key(header: TcryptHeader, options: TcryptOptions, path: str, total: int) -> str:
    """``cryptsetup tcryptDump --dump-volume-key``'s text."""
    key = header.volume_key
    offset = geometry(header, options, total)[0]
    rows = [" ".join(f"{b:02x}" for b in key[i : i + 16]) for i in range(0, len(key), 16)]
    return "\n".join(
        [
            f"TCRYPT header information for {path}",
            f"Cipher chain:  \t{header.chain.long_name}",
            f"Cipher mode:   \t{header.chain.mode}",
            f"Payload offset:\t{offset}",
            f"MK bits:       \t{len(key) * 8}",
            "MK dump:\t" + " \n\t\t".join(rows) + " ",
        ]
    )


__all__ = [
    "CHAINS",
    "KDFS",
    "CascadeCipher",
    "TcryptHeader",
    "TcryptOptions",
    "dump",
    "dump_volume_key",
    "open_tcrypt",
    "read_tcrypt_header",
    "volume_from_header",
]
