"""Random containers against cryptsetup, with cryptsetup's own decryption as the oracle.

Every run draws fresh parameters (``seed N`` is printed; ``CRYPTFUSE_TEST_SEED=N``
replays it): cipher, chain and IV mode (all that cryptsetup 2.6.1's OpenSSL backend
does in userspace: AES in xts/cbc/ecb/ctr, Camellia in cbc; every IV generator but
dm-integrity's), key size, sector size, KDF and hash, header and keyslot-area sizes,
data offset, label, a keyslot cipher of its own, several keyslots.

cryptsetup cannot open a container here (no device-mapper), but its offline
reencryption encrypts and decrypts with its own userspace crypto, so it serves as an
independent cipher implementation:

* ``reencrypt --encrypt --header H`` turns random plaintext into a LUKS2 container:
  cryptfuse reads the plaintext back;
* cryptfuse writes at random places of a container that cryptsetup (``luksFormat``)
  or cryptfuse (``format``) made; every passphrase unlocks; ``reencrypt --decrypt``
  (after ``convert --type luks2`` for LUKS1) leaves exactly the written plaintext;
* ``cryptfuse dump`` prints what ``luksDump`` prints.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from seeding import seeded_rng
from test_interop_luks import run

from cryptfuse.cli import main
from cryptfuse.formats import OpenOptions, Secret, open_volume

MiB = 1 << 20
CASES = 6  # per run and test
pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="no cryptsetup")

IVS = ["plain", "plain64", "plain64be", "essiv:sha256", "benbi", "null", "eboiv"]


def random_cipher(rng: random.Random) -> tuple[str, int]:
    """A cipher spec and key size in bits that cryptsetup's userspace crypto runs.

    (aes-xts with 384 bits and eboiv with xts need the kernel; the rest of our
    ciphers -- Serpent, Twofish, ... -- are not in its OpenSSL backend.)"""
    alg = rng.choice(["aes", "aes", "camellia"])
    chain = "cbc" if alg == "camellia" else rng.choice(["xts", "cbc", "ecb", "ctr"])
    if chain == "ecb":
        return f"{alg}-ecb", rng.choice([128, 192, 256])
    if chain == "xts":
        return f"{alg}-xts-{rng.choice(IVS[:-1])}", rng.choice([256, 512])
    return f"{alg}-{chain}-{rng.choice(IVS)}", rng.choice([128, 192, 256])


def random_luks2_header_options(rng: random.Random) -> list[str]:
    """luksFormat/format options of a LUKS2 header: sector size, metadata and keyslots
    area sizes, label and subsystem, a keyslot cipher of its own (each maybe)."""
    options = []
    if rng.random() < 0.7:
        options += ["--sector-size", str(rng.choice([512, 1024, 2048, 4096]))]
    if rng.random() < 0.6:
        options += ["--luks2-metadata-size", rng.choice(["16k", "64k", "256k", "512k", "4m"])]
    if rng.random() < 0.4:
        options += ["--luks2-keyslots-size", rng.choice(["1m", "3m", "8m", "16m"])]
    if rng.random() < 0.3:
        options += ["--label", f"l{rng.randrange(1000)}", "--subsystem", "s"]
    if rng.random() < 0.4:
        areas = [("aes-xts-plain64", 512), ("aes-cbc-essiv:sha256", 256),
                 ("camellia-cbc-plain64", 128), ("aes-ctr-plain64", 192)]  # fmt: skip
        cipher, bits = rng.choice(areas)
        options += ["--keyslot-cipher", cipher, "--keyslot-key-size", str(bits)]
    return options


def random_pbkdf(rng: random.Random, luks: str) -> list[str]:
    hash_name = rng.choice(["sha1", "sha256", "sha512", "ripemd160", "whirlpool", "sha3-256"])
    kdf = "pbkdf2" if luks == "luks1" else rng.choice(["pbkdf2", "argon2i", "argon2id"])
    if kdf == "pbkdf2":
        return ["--pbkdf", "pbkdf2", "--hash", hash_name, "--pbkdf-force-iterations", "1000"]
    memory, threads = rng.choice([32, 64, 512]), rng.choice([1, 2, 4])
    return ["--pbkdf", kdf, "--pbkdf-force-iterations", "4",
            "--pbkdf-memory", str(memory), "--pbkdf-parallel", str(threads)]  # fmt: skip


@dataclass
class Case:
    tmp: Path
    rng: random.Random
    luks: str
    cipher: str
    key_bits: int
    passphrases: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.tmp / "data.img"

    def keyfile(self, i: int) -> str:
        path = self.tmp / f"key{i}"
        path.write_bytes(self.passphrases[i])
        return str(path)

    def __str__(self) -> str:
        return f"{self.luks} {self.cipher} {self.key_bits}"


def new_case(tmp: Path, rng: random.Random, luks: str) -> Case:
    for old in tmp.iterdir():
        old.unlink()
    cipher, key_bits = random_cipher(rng)
    count = rng.randrange(1, 4)
    passphrases = [os.urandom(rng.randrange(1, 24)).hex().encode() for _ in range(count)]
    return Case(tmp, rng, luks, cipher, key_bits, passphrases)


def write_randomly(case: Case, header: Path | None = None) -> bytes:
    """Every passphrase opens the same volume; random writes through the last one.
    Returns the volume's plaintext afterwards."""
    opts = OpenOptions(header=str(header) if header else None)
    contents = set()
    for passphrase in case.passphrases:
        with open_volume(str(case.data), opts, Secret(passphrase)) as vol:
            contents.add(vol.read(0, vol.size))
    assert len(contents) == 1, f"{case}: the passphrases unlock different keys"
    model = bytearray(contents.pop())
    with open_volume(str(case.data), opts, Secret(case.passphrases[-1])) as vol:
        for _ in range(case.rng.randrange(1, 6)):
            offset = case.rng.randrange(vol.size)
            chunk = os.urandom(case.rng.randrange(1, min(200_000, vol.size - offset) + 1))
            assert vol.write(offset, chunk) == len(chunk)
            model[offset : offset + len(chunk)] = chunk
        vol.sync()
    return bytes(model)


def cryptsetup_decrypts(case: Case, header: Path | None = None) -> bytes:
    """The container decrypted in place by cryptsetup: its plaintext data area."""
    if case.luks == "luks1":
        run("cryptsetup", "convert", "-q", "--type", "luks2", str(case.data))
    if header is None:
        header = case.tmp / "exported-header"  # cryptsetup 2.6 decrypts only this way
    run("cryptsetup", "reencrypt", "--decrypt", "--header", str(header), "-q",
        "--force-offline-reencrypt", "-d", case.keyfile(0), str(case.data))  # fmt: skip
    dump = run("cryptsetup", "luksDump", str(header))
    offset = int(dump.split("offset:")[1].split()[0])  # the data segment's
    return case.data.read_bytes()[offset:]


def assert_dump_matches(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["dump", str(case.data)]) == 0
    ours = capsys.readouterr().out
    assert ours.rstrip("\n") == run("cryptsetup", "luksDump", str(case.data)).rstrip("\n")


def test_cryptsetup_encrypts_cryptfuse_reads_and_writes(tmp_path: Path) -> None:
    rng = seeded_rng()
    for _ in range(CASES):
        case = new_case(tmp_path, rng, "luks2")
        case.passphrases = case.passphrases[:1]  # reencrypt --encrypt makes one keyslot
        sector = rng.choice([512, 1024, 2048, 4096])
        tail = rng.choice([0, 512, 1536]) if sector == 512 else 0  # off the 4096 grid
        plain = os.urandom(rng.randrange(1, 3) * MiB + rng.randrange(64) * 4096 + tail)
        case.data.write_bytes(plain)
        header = tmp_path / "header"
        run("cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "-q",
            "--header", str(header), "--force-offline-reencrypt", "-d", case.keyfile(0),
            "--cipher", case.cipher, "--key-size", str(case.key_bits),
            "--sector-size", str(sector), *random_pbkdf(rng, "luks2"),
            str(case.data))  # fmt: skip
        with open_volume(str(case.data), OpenOptions(header=str(header)), Secret(
            case.passphrases[0]
        )) as vol:  # fmt: skip
            assert vol.read(0, len(plain)) == plain, f"{case} sector {sector}"
            # cryptsetup writes a last hot zone off the 4096 grid up to it: the file, and
            # with it the volume, grows (docs/reencryption.md, "Where we differ")
            assert vol.size == case.data.stat().st_size
        model = write_randomly(case, header)
        assert cryptsetup_decrypts(case, header)[: len(model)] == model, f"{case}"


def test_cryptsetup_formats_cryptfuse_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = seeded_rng()
    for _ in range(CASES):
        luks = rng.choice(["luks1", "luks2"])
        case = new_case(tmp_path, rng, luks)
        options = ["--cipher", case.cipher, "--key-size", str(case.key_bits)]
        if luks == "luks2":
            options += random_luks2_header_options(rng)
        if rng.random() < 0.4:  # in 512-byte sectors, past LUKS2's largest default header
            options += ["--offset", str(rng.choice([32768, 40960, 65536]))]
        sectors = options[options.index("--sector-size") + 1] if "--sector-size" in options else ""
        tail = rng.choice([0, 512, 3072]) if sectors in ("", "512") else 0  # off the 4096 grid
        with open(case.data, "wb") as f:
            f.truncate(40 * MiB + rng.randrange(1, 3) * MiB + tail)
        slots = rng.sample(range(8 if luks == "luks1" else 32), len(case.passphrases))
        run("cryptsetup", "luksFormat", "--type", luks, "-q", "-d", case.keyfile(0),
            "--key-slot", str(slots[0]), *random_pbkdf(rng, luks), *options,
            str(case.data))  # fmt: skip
        for i, slot in enumerate(slots[1:], 1):
            run("cryptsetup", "luksAddKey", "-q", "-d", case.keyfile(0), "--key-slot",
                str(slot), *random_pbkdf(rng, luks), str(case.data), case.keyfile(i))  # fmt: skip
        model = write_randomly(case)
        if luks == "luks2":
            assert_dump_matches(case, capsys)
        assert cryptsetup_decrypts(case)[: len(model)] == model, f"{case} {options}"


def test_cryptfuse_formats_cryptsetup_decrypts(tmp_path: Path) -> None:
    rng = seeded_rng()
    for _ in range(CASES):
        luks = rng.choice(["luks1", "luks2"])
        case = new_case(tmp_path, rng, luks)
        case.passphrases = case.passphrases[:1]
        options = ["--cipher", case.cipher, "--key-size", str(case.key_bits),
                   "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]  # fmt: skip
        sector = 512
        if luks == "luks2":
            sector = rng.choice([512, 1024, 2048, 4096])
            options += ["--sector-size", str(sector)]
        else:
            options += ["--hash", rng.choice(["sha1", "sha256", "sha512", "ripemd160"])]
        size = 20 * MiB + (rng.choice([0, 512, 3072]) if sector == 512 else 0)
        assert main(["format", "--type", luks, "-q", "--size", str(size), "-d", case.keyfile(0),
                     *options, str(case.data)]) == 0, f"{case}"  # fmt: skip
        subprocess.run(["cryptsetup", "open", "--test-passphrase", "-d", case.keyfile(0),
                        str(case.data)], check=True)  # fmt: skip
        model = write_randomly(case)
        assert cryptsetup_decrypts(case)[: len(model)] == model, f"{case} {options}"
