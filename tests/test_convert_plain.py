"""``cryptfuse convert --type luks2 --from-plain``: plain dm-crypt -> detached LUKS2 header.

Plain containers are written through cryptfuse's API with known plaintext;
after the conversion the container must be byte-identical, cryptfuse must read
the same plaintext through the new header, and cryptsetup 2.6.1 must accept the
new passphrase (``open --test-passphrase``) and dump the plain key
(``luksDump --dump-volume-key``).  Then ``cryptfuse reencrypt`` (or cryptsetup,
after ``cryptfuse reencrypt --init-only``) moves the container to
aes-xts-plain64 and the plaintext must survive while the old plain key no
longer decrypts it.  Refusals leave nothing behind; a conversion killed at any
write or fsync leaves no header or a complete one.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats.luks2 import read_luks2_header
from cryptfuse.formats.luks2_write import Luks2Writer
from cryptfuse.formats.manage import KdfOptions
from cryptfuse.formats.plain import plain_key
from cryptfuse.formats.plain_convert import plain_to_luks2

sys.path.insert(0, str(Path(__file__).parent))
from test_crash_safety import run_killed  # noqa: E402

CRYPTSETUP = shutil.which("cryptsetup")
needs_cryptsetup = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")
FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
FAST_KDF = KdfOptions(pbkdf="pbkdf2", force_iterations=1000)
MIB = 1 << 20
OLD = b"old plain passphrase"
NEW = b"new LUKS2 passphrase"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """A plain container: its cryptfuse options and the command-line options that say them."""

    options: OpenOptions
    argv: tuple[str, ...]
    keyfile: bytes | None = None  # raw key file contents (else the passphrase OLD)
    keyfile_offset: int = 0
    volume: int = 2 * MIB
    extra: dict[str, str] = field(default_factory=dict)

    def secret(self) -> Secret:
        if self.keyfile is None:
            return Secret(OLD)
        return Secret(self.keyfile[self.keyfile_offset :], from_keyfile=True)

    def key(self) -> bytes:
        o = self.options
        s = self.secret()
        return plain_key(
            o.cipher or "aes-cbc-essiv:sha256",
            o.key_size or 256,
            o.hash or "ripemd160",
            s.data,
            s.from_keyfile,
        )


def plain(
    cipher: str | None,
    bits: int | None,
    hash_: str | None,
    *,
    offset: int = 0,
    skip: int = 0,
    size: int | None = None,
    sector: int | None = None,
    keyfile: bytes | None = None,
    keyfile_offset: int = 0,
) -> Case:
    argv: list[str] = []
    for flag, value in (
        ("--cipher", cipher),
        ("--key-size", bits),
        ("--hash", hash_),
        ("--offset", offset or None),
        ("--skip", skip or None),
        ("--size", size),
        ("--sector-size", sector),
        ("--keyfile-offset", keyfile_offset or None),
    ):
        if value is not None:
            argv += [flag, str(value)]
    options = OpenOptions(
        type="plain",
        cipher=cipher,
        key_size=bits,
        hash=hash_,
        offset=offset,
        skip=skip,
        size=size,
        sector_size=sector,
    )
    return Case(options, tuple(argv), keyfile, keyfile_offset)


RAW_KEY = bytes(range(100)) + hashlib.sha256(b"raw key").digest() + b"tail"

CASES = [
    pytest.param(plain("aes-xts-plain64", 256, "sha256", offset=2048), id="xts-256-offset"),
    pytest.param(plain("aes-xts-plain64", 512, "sha512"), id="xts-512-sha512"),
    pytest.param(plain(None, None, None), id="defaults-essiv-ripemd160"),
    pytest.param(
        plain("aes-cbc-plain", 256, "ripemd160", offset=4096, size=4112),
        id="cbc-plain-offset-size-to-end",
    ),
    pytest.param(plain("aes-ecb", 128, "sha256", offset=2048), id="ecb-128"),
    pytest.param(
        plain("aes-xts-plain64", 512, "sha256", offset=2048, sector=4096),
        id="xts-sector-4096",
    ),
    pytest.param(
        plain("aes-cbc-essiv:sha256", 256, None, keyfile=RAW_KEY, keyfile_offset=100),
        id="essiv-keyfile-offset",
    ),
    pytest.param(plain("camellia-xts-plain64", 256, "sha256"), id="camellia-xts"),
]


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "cryptfuse", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )


def cs(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CRYPTSETUP is not None
    proc = subprocess.run([CRYPTSETUP, *args], capture_output=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def make_plain(tmp: Path, case: Case) -> tuple[Path, bytes, Path | None]:
    """The container (random ciphertext around the volume), its plaintext, its key file."""
    img = tmp / "plain.img"
    rng = random.Random(repr(case.argv))
    offset = case.options.offset * 512
    img.write_bytes(rng.randbytes(offset + case.volume + 8192))
    keyfile = None
    if case.keyfile is not None:
        keyfile = tmp / "plain.key"
        keyfile.write_bytes(case.keyfile)
    volume = open_volume(str(img), case.options, case.secret())
    try:
        data = rng.randbytes(volume.size)
        volume.write(0, data)
        volume.sync()
    finally:
        volume.close()
    return img, data, keyfile


def read_volume(img: Path, options: OpenOptions, secret: Secret) -> bytes:
    volume = open_volume(str(img), options, secret)
    try:
        return volume.read(0, volume.size)
    finally:
        volume.close()


def convert_cli(
    tmp: Path, case: Case, img: Path, header: Path, keyfile: Path | None
) -> subprocess.CompletedProcess[bytes]:
    newpass = tmp / "new.pass"
    newpass.write_bytes(NEW)
    key = ["--key-file", str(keyfile)] if keyfile is not None else []
    return cli(
        "convert", "--type", "luks2", "--from-plain", "--header", str(header), *case.argv,
        *key, "--new-keyfile", str(newpass), *FAST, str(img),
        stdin=OLD + b"\n",
    )  # fmt: skip


def dumped_key(img: Path, header: Path, keyfile: Path) -> bytes:
    out = cs(
        "luksDump", "--dump-volume-key", "-q", "--header", str(header),
        "--key-file", str(keyfile), str(img),
    ).stdout.decode()  # fmt: skip
    match = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", out)
    assert match, out
    return bytes.fromhex("".join(match.group(1).split()))


@needs_cryptsetup
@pytest.mark.parametrize("case", CASES)
def test_plain_to_luks2_then_reencrypt(tmp_path: Path, case: Case) -> None:
    img, data, keyfile = make_plain(tmp_path, case)
    before = img.read_bytes()
    header = tmp_path / "new.hdr"
    proc = convert_cli(tmp_path, case, img, header, keyfile)
    assert proc.returncode == 0, proc.stderr.decode()
    if case.options.cipher is None:  # relying on cryptsetup 2.6's plain defaults
        assert b"uses cryptsetup 2.6 defaults" in proc.stderr
    assert img.read_bytes() == before, "the container was written"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    luks = OpenOptions(header=str(header), readonly=True)
    assert read_volume(img, luks, Secret(NEW)) == data
    hdr_json = read_luks2_header(os.open(header, os.O_RDONLY), str(header)).json
    segment = hdr_json["segments"]["0"]
    assert segment["offset"] == str(case.options.offset * 512)
    assert segment["iv_tweak"] == str(case.options.skip)
    assert segment["size"] == (
        "dynamic" if case.options.size is None else str(case.options.size * 512)
    )
    assert segment["sector_size"] == (case.options.sector_size or 512)

    newpass = tmp_path / "new.pass"
    cs("open", "--test-passphrase", "--header", str(header), "--key-file", str(newpass), str(img))
    assert dumped_key(img, header, newpass) == case.key()

    proc = cli(
        "reencrypt", "--header", str(header), str(img), "--cipher", "aes-xts-plain64",
        "--key-size", "512", "-q", "--key-file", str(newpass), *FAST,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_volume(img, luks, Secret(NEW)) == data
    assert read_volume(img, case.options, case.secret()) != data
    new_key = dumped_key(img, header, newpass)
    assert new_key != case.key() and len(new_key) == 64
    assert "aes-xts-plain64" in cs("luksDump", str(header)).stdout.decode()


@needs_cryptsetup
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(plain(None, None, None, offset=2048), id="defaults-essiv"),
        pytest.param(
            plain("aes-cbc-plain", 256, "sha256", offset=2048, sector=4096),
            id="cbc-plain-sector-4096",
        ),
    ],
)
def test_cryptfuse_inits_cryptsetup_finishes(tmp_path: Path, case: Case) -> None:
    img, data, keyfile = make_plain(tmp_path, case)
    header = tmp_path / "new.hdr"
    assert convert_cli(tmp_path, case, img, header, keyfile).returncode == 0
    newpass = tmp_path / "new.pass"
    proc = cli(
        "reencrypt", "--header", str(header), str(img), "--cipher", "aes-xts-plain64",
        "--key-size", "512", "-q", "--key-file", str(newpass), "--init-only", *FAST,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    cs(
        "reencrypt", "--resume-only", "-q", "--force-offline-reencrypt", "--header", str(header),
        "--key-file", str(newpass), str(img),
    )  # fmt: skip
    assert read_volume(img, OpenOptions(header=str(header), readonly=True), Secret(NEW)) == data
    assert read_volume(img, case.options, case.secret()) != data
    assert (
        "requirements"
        not in read_luks2_header(os.open(header, os.O_RDONLY), str(header)).json["config"]
    )


@needs_cryptsetup
def test_why_skip_is_refused(tmp_path: Path) -> None:
    """A segment with iv_tweak (what --skip would become) opens right, in cryptfuse and
    (by its key) in cryptsetup, but cryptsetup 2.6.1's reencryption ignores the
    tweak: the data comes out corrupted.  Hence the refusal."""
    case = plain("aes-cbc-plain", 256, "sha256", offset=2048, skip=8)
    img, data, _ = make_plain(tmp_path, case)
    header = tmp_path / "new.hdr"
    no_skip = replace(case.options, skip=0)
    plain_to_luks2(str(img), str(header), no_skip, Secret(OLD), NEW, kdf=FAST_KDF)
    fd = os.open(header, os.O_RDWR)
    try:
        writer = Luks2Writer.from_header(fd, read_luks2_header(fd, str(header)))
        writer.obj["segments"]["0"]["iv_tweak"] = "8"
        writer.commit()
    finally:
        os.close(fd)
    luks = OpenOptions(header=str(header), readonly=True)
    assert read_volume(img, luks, Secret(NEW)) == data
    newpass = tmp_path / "new.pass"
    newpass.write_bytes(NEW)
    assert dumped_key(img, header, newpass) == case.key()
    cs(
        "reencrypt", "-q", "--force-offline-reencrypt", "--header", str(header),
        "--key-file", str(newpass), "--cipher", "aes-xts-plain64", "--key-size", "512",
        *FAST, str(img),
    )  # fmt: skip
    assert read_volume(img, luks, Secret(NEW)) != data


def test_new_passphrase_from_stdin(tmp_path: Path) -> None:
    """Piped: the plain passphrase is the first line, the new one the second."""
    case = plain("aes-xts-plain64", 256, "sha256")
    img, data, _ = make_plain(tmp_path, case)
    header = tmp_path / "new.hdr"
    proc = cli(
        "convert", "--type", "luks2", "--from-plain", "--header", str(header), *case.argv,
        *FAST, str(img), stdin=OLD + b"\n" + NEW + b"\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    assert read_volume(img, OpenOptions(header=str(header), readonly=True), Secret(NEW)) == data


# -- refusals -----------------------------------------------------------------------------


REFUSALS = [
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "-s", "512",
         "--sector-size", "4096", "--iv-large-sectors"],
        1, "cannot express --iv-large-sectors", id="iv-large-sectors",
    ),
    pytest.param(
        ["--type", "luks1", "--from-plain", "-c", "aes-xts-plain64"],
        1, "LUKS2 only", id="luks1",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "--offset", "8"],
        1, "below the data offset", id="offset-too-small",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes:2-cbc-plain64", "-s", "512"],
        1, "Unable to use cipher specification", id="multi-key",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-pcbc-plain64"],
        1, "pcbc", id="unsupported-chain-mode",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "-s", "128"],
        1, "key", id="xts-128",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "--offset", "999999"],
        4, "beyond the end", id="offset-beyond-end",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "--sector-size", "4096",
         "--offset", "3"],
        1, "not aligned", id="offset-unaligned",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-cbc-plain", "--skip", "8"],
        1, "would corrupt the data", id="skip",
    ),
    pytest.param(
        ["--type", "luks2", "--from-plain", "-c", "aes-cbc-plain", "--size", "4000"],
        1, "follow the volume", id="size-with-tail",
    ),
    pytest.param(
        ["--type", "luks2", "--cipher", "aes-ecb"],
        1, "only with --from-plain", id="plain-option-without-from-plain",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "message"), REFUSALS)
def test_refusals(tmp_path: Path, argv: list[str], code: int, message: str) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(random.Random(1).randbytes(4 * MIB))
    header = tmp_path / "new.hdr"
    proc = cli("convert", *argv, "--header", str(header), str(img), stdin=OLD + b"\n" + NEW)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.img"]
    assert img.read_bytes() == random.Random(1).randbytes(4 * MIB)


def test_refuses_existing_header_and_missing_header_option(tmp_path: Path) -> None:
    img = tmp_path / "plain.img"
    img.write_bytes(bytes(4 * MIB))
    header = tmp_path / "new.hdr"
    header.write_bytes(b"precious")
    base = ["convert", "--type", "luks2", "--from-plain", "-c", "aes-xts-plain64", "-q"]
    for argv in ([*base, "--header", str(header), str(img)], [*base, str(img)]):
        proc = cli(*argv, stdin=OLD + b"\n" + NEW)
        assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1, proc.stderr
    assert b"already exists" in cli(*base, "--header", str(header), str(img)).stderr
    assert header.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.hdr", "plain.img"]
    # The container itself as the "new header": it exists, so it is refused too.
    proc = cli(*base, "--header", str(img), str(img), stdin=OLD + b"\n" + NEW)
    assert proc.returncode == 1 and img.read_bytes() == bytes(4 * MIB)


# -- crash safety -------------------------------------------------------------------------


@pytest.mark.parametrize("torn", [False, True], ids=["killed", "torn"])
def test_crash_at_every_write(tmp_path: Path, torn: bool) -> None:
    case = plain("aes-cbc-plain", 256, "sha256", offset=2048)
    img, data, _ = make_plain(tmp_path, case)
    before = img.read_bytes()
    header = tmp_path / "new.hdr"

    def action() -> None:
        plain_to_luks2(str(img), str(header), case.options, Secret(OLD), NEW, kdf=FAST_KDF)

    events = run_killed(action, None, False)
    assert events.count("w") >= 3 and events.count("f") >= 4, events
    header.unlink()
    for temporary in tmp_path.glob(".new.hdr.*"):
        temporary.unlink()
    complete = 0
    for kill_at in range(1, len(events) + 1):
        assert run_killed(action, kill_at, torn) == "killed"
        assert img.read_bytes() == before
        if header.exists():  # only ever the complete header
            complete += 1
            luks = OpenOptions(header=str(header), readonly=True)
            assert read_volume(img, luks, Secret(NEW)) == data
            with pytest.raises(CryptfuseError):
                read_volume(img, luks, Secret(OLD))
            header.unlink()
        for temporary in tmp_path.glob(".new.hdr.*"):  # a leftover, never NEWHDR
            temporary.unlink()
    # Killed at the last event (the directory fsync) the header is in place.
    assert complete >= 1
    assert run_killed(action, None, False) == events
    assert read_volume(img, OpenOptions(header=str(header), readonly=True), Secret(NEW)) == data


@pytest.mark.parametrize(("offset", "room"), [(824, False), (832, True)])
def test_reencryption_room_warning(tmp_path: Path, offset: int, room: bool) -> None:
    """A small data offset bounds the keyslots area: warned when a reencryption's new
    512-bit keyslot and resilience area would not fit, and then reencrypt refuses."""
    case = plain("aes-cbc-plain", 256, "sha256", offset=offset)
    img, data, _ = make_plain(tmp_path, case)
    header = tmp_path / "new.hdr"
    proc = convert_cli(tmp_path, case, img, header, None)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (b"reencrypt will refuse" in proc.stderr) is not room
    proc = cli(
        "reencrypt", "--header", str(header), str(img), "--cipher", "aes-xts-plain64",
        "--key-size", "512", "-q", "--key-file", str(tmp_path / "new.pass"), *FAST,
    )  # fmt: skip
    assert (proc.returncode == 0) is room, proc.stderr.decode()
    assert read_volume(img, OpenOptions(header=str(header), readonly=True), Secret(NEW)) == data
