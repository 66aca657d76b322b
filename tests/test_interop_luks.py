"""Interop with the real tools, generated at test time.

* ``cryptsetup luksFormat``/``luksAddKey`` make containers over a matrix of
  formats, ciphers, KDFs, sector sizes and detached headers (cheap KDF
  settings); the volume key we unlock must equal ``luksDump
  --dump-volume-key``, for every active keyslot.
* Data we write through the :class:`Volume` is checked by an independent
  decryption (the dumped key and ``cryptography``'s AES-XTS/CBC, one sector
  at a time) and, for LUKS1, by ``qemu-img convert``; data ``qemu-io`` writes
  into a LUKS1 container reads back through the Volume.
* The header bytes never change.

(``cryptsetup open`` cannot run here: there is no device-mapper.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cryptfuse.errors import WrongPassphraseError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats.luks1 import read_luks1_header
from cryptfuse.formats.luks2 import read_luks2_header

MiB = 1 << 20
PASSPHRASES = {0: b"first passphrase", 1: b"second", 5: b"slot five \xc3\xa9"}

needs_cryptsetup = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="cryptsetup not installed"
)
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img/qemu-io not installed",
)
pytestmark = needs_cryptsetup

CIPHERS = [
    ("aes-xts-plain64", 256),
    ("aes-xts-plain64", 512),
    ("aes-cbc-essiv:sha256", 256),
    ("aes-cbc-plain64", 256),
]
KDFS = ["pbkdf2-sha1", "pbkdf2-sha256", "pbkdf2-sha512", "argon2i", "argon2id"]


@dataclass
class Container:
    kind: str
    data: Path
    header: Path | None
    cipher: str
    key_bits: int
    sector_size: int
    keyfiles: dict[int, Path]

    @property
    def header_file(self) -> Path:
        return self.header or self.data


def run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def kdf_options(kind: str, kdf: str) -> list[str]:
    if kdf.startswith("pbkdf2"):
        opts = ["--hash", kdf.split("-")[1], "--pbkdf-force-iterations", "1000"]
        return opts if kind == "luks1" else ["--pbkdf", "pbkdf2", *opts]
    return [
        "--pbkdf",
        kdf,
        "--pbkdf-force-iterations",
        "4",
        "--pbkdf-memory",
        "32",
        "--pbkdf-parallel",
        "1",
    ]


def make(
    tmp: Path,
    kind: str,
    cipher: str,
    key_bits: int,
    kdf: str,
    sector_size: int = 512,
    detached: bool = False,
    slots: tuple[int, ...] = (0, 1, 5),
) -> Container:
    data = tmp / "data.img"
    header = tmp / "header.img" if detached else None
    with open(data, "wb") as f:
        f.truncate(1 * MiB if detached else 3 * MiB)
    keyfiles = {}
    for slot in slots:
        keyfiles[slot] = tmp / f"key{slot}"
        keyfiles[slot].write_bytes(PASSPHRASES[slot])
    cmd = [
        "cryptsetup",
        "luksFormat",
        "-q",
        "--type",
        kind,
        "--cipher",
        cipher,
        "--key-size",
        str(key_bits),
        "--key-file",
        str(keyfiles[slots[0]]),
        "--key-slot",
        str(slots[0]),
        *kdf_options(kind, kdf),
    ]
    if kind == "luks2":
        cmd += ["--sector-size", str(sector_size)]
    if header is not None:
        with open(header, "wb") as f:  # cryptsetup does not grow an existing header file
            f.truncate(2 * MiB)
        cmd += ["--header", str(header)]
        if kind == "luks2":
            cmd += ["--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m"]
    else:
        cmd += ["--offset", "4096"]  # 2 MiB of header + keyslots, 1 MiB of data
    run(*cmd, str(data))
    for slot in slots[1:]:
        # the second keyslot of a LUKS2 container uses another KDF than the first
        other = "argon2id" if kind == "luks2" and kdf.startswith("pbkdf2") else "pbkdf2-sha256"
        add = [
            "cryptsetup",
            "luksAddKey",
            "-q",
            "--key-file",
            str(keyfiles[slots[0]]),
            "--key-slot",
            str(slot),
            *kdf_options(kind, other if slot == 1 else kdf),
        ]
        if header is not None:
            add += ["--header", str(header)]
        run(*add, str(data), str(keyfiles[slot]))
    return Container(kind, data, header, cipher, key_bits, sector_size, keyfiles)


def dumped_volume_key(c: Container, slot: int) -> bytes:
    cmd = ["cryptsetup", "luksDump", "--dump-volume-key", "-q", "--key-file", str(c.keyfiles[slot])]
    if c.header is not None:
        cmd += ["--header", str(c.header)]
    out = run(*cmd, str(c.data))
    hexdigits = ""
    grab = False
    for line in out.splitlines():
        if line.startswith("MK dump:"):
            grab = True
            line = line.split(":", 1)[1]
        elif grab and not line.startswith(("\t", " ")):
            break
        if grab:
            hexdigits += line.replace(" ", "").replace("\t", "")
    assert hexdigits, out
    return bytes.fromhex(hexdigits)


def unlock(c: Container, passphrase: bytes, key_slot: int | None = None) -> tuple[int, bytes, int]:
    """(slot, volume key, data offset in bytes) through our header readers."""
    fd = os.open(c.header_file, os.O_RDONLY)
    try:
        if c.kind == "luks1":
            h1 = read_luks1_header(fd, str(c.header_file))
            slot, key = h1.unlock(fd, passphrase, key_slot)
            return slot, key, h1.payload_offset * 512
        h2 = read_luks2_header(fd, str(c.header_file))
        slot, key = h2.unlock(fd, passphrase, key_slot)
        return slot, key, h2.metadata.segments[0].offset
    finally:
        os.close(fd)


def independent_decrypt(raw: bytes, key: bytes, cipher: str, sector_size: int) -> bytes:
    """dm-crypt semantics spelled out with ``cryptography``, one sector at a time."""
    out = bytearray()
    for i in range(len(raw) // sector_size):
        block = raw[i * sector_size : (i + 1) * sector_size]
        iv_sector = i * (sector_size // 512)  # LUKS2: no iv_large_sectors
        counter = iv_sector.to_bytes(16, "little")
        if cipher == "aes-xts-plain64":
            mode: modes.Mode = modes.XTS(counter)
        elif cipher == "aes-cbc-plain64":
            mode = modes.CBC(counter)
        elif cipher == "aes-cbc-essiv:sha256":
            essiv = Cipher(algorithms.AES(hashlib.sha256(key).digest()), modes.ECB()).encryptor()
            mode = modes.CBC(essiv.update(counter) + essiv.finalize())
        else:  # pragma: no cover
            raise AssertionError(cipher)
        d = Cipher(algorithms.AES(key), mode).decryptor()
        out += d.update(block) + d.finalize()
    return bytes(out)


def header_digest(c: Container, data_offset: int) -> str:
    if c.header is not None:
        return hashlib.sha256(c.header.read_bytes()).hexdigest()
    return hashlib.sha256(c.data.read_bytes()[:data_offset]).hexdigest()


WRITES = [
    (0, b"\x11" * 512),
    (1000, b"unaligned write spanning sectors " * 40),
    (4096 * 3 + 7, b"\x7f" * 9000),
]


def check_container(c: Container) -> None:
    """VK equality for every keyslot, then writes checked independently, header untouched."""
    vk = dumped_volume_key(c, min(c.keyfiles))
    data_offset = 0
    for slot, keyfile in c.keyfiles.items():
        got_slot, key, data_offset = unlock(c, keyfile.read_bytes())
        assert (got_slot, key) == (slot, vk)
        assert unlock(c, keyfile.read_bytes(), slot)[:2] == (slot, vk)
    with pytest.raises(WrongPassphraseError):
        unlock(c, b"not a passphrase")
    assert len(vk) * 8 == c.key_bits

    before = header_digest(c, data_offset)
    opts = OpenOptions(header=str(c.header) if c.header else None)
    with open_volume(str(c.data), opts, Secret(PASSPHRASES[max(c.keyfiles)])) as vol:
        assert vol.sector_size == c.sector_size
        model = bytearray(vol.read(0, vol.size))
        raw = c.data.read_bytes()[data_offset : data_offset + vol.size]
        assert independent_decrypt(raw, vk, c.cipher, c.sector_size) == model
        for offset, chunk in WRITES:
            assert vol.write(offset, chunk) == len(chunk)
            model[offset : offset + len(chunk)] = chunk
        vol.sync()
        size = vol.size
    raw = c.data.read_bytes()[data_offset : data_offset + size]
    assert independent_decrypt(raw, vk, c.cipher, c.sector_size) == model
    assert header_digest(c, data_offset) == before


LUKS1_MATRIX = [
    pytest.param(cipher, bits, h, id=f"luks1-{cipher}-{bits}-{h}")
    for cipher, bits in CIPHERS
    for h in ("sha1", "sha256", "sha512")
]


@pytest.mark.parametrize(("cipher", "key_bits", "hash_name"), LUKS1_MATRIX)
def test_luks1_matrix(tmp_path: Path, cipher: str, key_bits: int, hash_name: str) -> None:
    c = make(tmp_path, "luks1", cipher, key_bits, f"pbkdf2-{hash_name}")
    check_container(c)


LUKS2_MATRIX = [
    pytest.param(cipher, bits, kdf, ss, id=f"luks2-{cipher}-{bits}-{kdf}-{ss}")
    for cipher, bits in CIPHERS
    for kdf in KDFS
    for ss in (512, 4096)
]


@pytest.mark.parametrize(("cipher", "key_bits", "kdf", "sector_size"), LUKS2_MATRIX)
def test_luks2_matrix(
    tmp_path: Path, cipher: str, key_bits: int, kdf: str, sector_size: int
) -> None:
    c = make(tmp_path, "luks2", cipher, key_bits, kdf, sector_size)
    check_container(c)


DETACHED = [
    pytest.param("luks1", "aes-xts-plain64", 512, "pbkdf2-sha256", 512, id="luks1-xts512"),
    pytest.param("luks1", "aes-cbc-essiv:sha256", 256, "pbkdf2-sha1", 512, id="luks1-cbc-essiv"),
    pytest.param("luks2", "aes-xts-plain64", 256, "argon2id", 4096, id="luks2-xts256-4k"),
    pytest.param("luks2", "aes-cbc-plain64", 256, "pbkdf2-sha512", 512, id="luks2-cbc-plain64"),
]


@pytest.mark.parametrize(("kind", "cipher", "key_bits", "kdf", "sector_size"), DETACHED)
def test_detached_header(
    tmp_path: Path, kind: str, cipher: str, key_bits: int, kdf: str, sector_size: int
) -> None:
    c = make(tmp_path, kind, cipher, key_bits, kdf, sector_size, detached=True)
    assert c.data.read_bytes()[:6] != b"LUKS\xba\xbe"
    check_container(c)


# -- qemu (LUKS1 only: qemu's luks driver does not do LUKS2) ---------------------------


def qemu_image_opts(c: Container, slot: int) -> list[str]:
    secret = PASSPHRASES[slot].decode()
    return [
        "--object",
        f"secret,id=sec0,data={secret}",
        "--image-opts",
        f"driver=luks,key-secret=sec0,file.filename={c.data}",
    ]


QEMU = [
    pytest.param("aes-xts-plain64", 512, "sha256", id="xts512-sha256"),
    pytest.param("aes-xts-plain64", 256, "sha1", id="xts256-sha1"),
    pytest.param("aes-cbc-essiv:sha256", 256, "sha512", id="cbc-essiv-sha512"),
    pytest.param("aes-cbc-plain64", 256, "sha256", id="cbc-plain64-sha256"),
]


@needs_qemu
@pytest.mark.parametrize(("cipher", "key_bits", "hash_name"), QEMU)
def test_qemu_writes_read_back_through_volume(
    tmp_path: Path, cipher: str, key_bits: int, hash_name: str
) -> None:
    c = make(tmp_path, "luks1", cipher, key_bits, f"pbkdf2-{hash_name}", slots=(0, 1))
    run(
        "qemu-io",
        *qemu_image_opts(c, 1),
        "-c",
        "write -P 0xa5 4096 65536",
        "-c",
        "write -P 0x3c 100352 1024",
    )
    with open_volume(str(c.data), OpenOptions(readonly=True), Secret(PASSPHRASES[0])) as vol:
        assert vol.read(4096, 65536) == b"\xa5" * 65536
        assert vol.read(100352, 1024) == b"\x3c" * 1024


@needs_qemu
@pytest.mark.parametrize(("cipher", "key_bits", "hash_name"), QEMU)
def test_volume_writes_read_back_through_qemu(
    tmp_path: Path, cipher: str, key_bits: int, hash_name: str
) -> None:
    c = make(tmp_path, "luks1", cipher, key_bits, f"pbkdf2-{hash_name}", slots=(0, 5))
    payload = hashlib.shake_256(cipher.encode()).digest(300000)
    with open_volume(str(c.data), OpenOptions(), Secret(PASSPHRASES[5])) as vol:
        vol.write(12345, payload)
        vol.sync()
        mine = vol.read(0, vol.size)
    out = tmp_path / "plain.raw"
    run("qemu-img", "convert", *qemu_image_opts(c, 0), "-O", "raw", str(out))
    theirs = out.read_bytes()
    assert theirs == mine
    assert theirs[12345 : 12345 + len(payload)] == payload
