"""LUKS2 reencryption against cryptsetup 2.6.1, both ways, and under kills at every write.

* cryptsetup starts (``--init-only``, every resilience), cryptfuse finishes; cryptfuse
  starts and finishes, cryptsetup checks the result (its dumped volume key decrypts
  the data with an independent decryption);
* the corpus' interrupted and crashed images read right (read-only: recovered in
  memory, nothing written), recover when opened read-write, and finish both with
  cryptfuse and with cryptsetup after a cryptfuse repair;
* a cryptfuse reencryption is killed at every pwrite and fsync: after each kill
  the container opens with its passphrase and reads exactly the original data,
  read-only (without writing), and both cryptfuse and cryptsetup (``repair`` where a
  hot zone was cut, then ``--resume-only``) finish it to the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from seeding import seeded_rng
from test_crash_safety import run_killed
from test_interop_luks import independent_decrypt, run

from cryptfuse import volume
from cryptfuse.errors import CryptfuseError, KeyslotError, WrongPassphraseError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats import luks2_reencrypt as reenc
from cryptfuse.formats.luks2 import read_luks2_header
from cryptfuse.formats.luks_write import KdfParams

pytestmark = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="cryptsetup not installed"
)

MiB = 1 << 20
PASS = b"reencrypt-me"
FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
CORPUS_P = b"".join(hashlib.sha256(b"cs-corpus-%d" % i).digest() for i in range(2 * MiB // 32))


def read_all(img: Path, passphrase: bytes = PASS, readonly: bool = True) -> bytes:
    with open_volume(str(img), OpenOptions(readonly=readonly), Secret(passphrase, False)) as v:
        return v.read(0, v.size)


def header_json(img: Path) -> dict:
    fd = os.open(img, os.O_RDONLY)
    try:
        return read_luks2_header(fd, str(img)).json
    finally:
        os.close(fd)


def make(
    tmp: Path,
    data_mib: int = 2,
    sector_size: int = 4096,
    metadata: bool = False,
    cipher: tuple[str, ...] = (),
) -> tuple[Path, Path, bytes]:
    """A LUKS2 container made by cryptsetup (1 MiB data offset) holding random data
    (*cipher*: more luksFormat options, e.g. ``--cipher``, ``--key-size``)."""
    img, key = tmp / "c.img", tmp / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate((1 + data_mib) * MiB)
    run(
        "cryptsetup",
        "luksFormat",
        "--type",
        "luks2",
        "-q",
        *FAST_KDF,
        "--key-file",
        str(key),
        "--offset",
        "2048",
        "--luks2-keyslots-size",
        "960k",
        "--sector-size",
        str(sector_size),
        *cipher,
        str(img),
    )
    data = os.urandom(data_mib * MiB)
    with open_volume(str(img), OpenOptions(), Secret(PASS, False)) as v:
        v.write(0, data)
    return img, key, data


def cryptsetup_checks(img: Path, key: Path, data: bytes, header: Path | None = None) -> None:
    """cryptsetup sees a finished container whose dumped key decrypts *data*."""
    extra = ["--header", str(header)] if header is not None else []
    dump = run("cryptsetup", "luksDump", *extra, str(img))
    assert "online-reencrypt" not in dump and "reencrypt" not in dump.split("Tokens:")[0]
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), *extra, str(img))
    out = run(
        "cryptsetup", "luksDump", "--dump-volume-key", "-q", "--key-file", str(key), *extra,
        str(img),
    )  # fmt: skip
    hexkey = ""
    grab = False
    for line in out.splitlines():
        if line.startswith("MK dump:"):
            grab, line = True, line.split(":", 1)[1]
        elif grab and not line.startswith(("\t", " ")):
            break
        if grab:
            hexkey += line.replace(" ", "").replace("\t", "")
    seg = header_json(header or img)["segments"]["0"]
    raw = img.read_bytes()[int(seg["offset"]) : int(seg["offset"]) + len(data)]
    plain = independent_decrypt(raw, bytes.fromhex(hexkey), seg["encryption"], seg["sector_size"])
    assert plain == data


# -- cryptsetup starts, cryptfuse finishes ------------------------------------------------


@pytest.mark.parametrize(
    "resilience,change",
    [
        pytest.param("checksum", [], id="checksum-same-cipher"),
        pytest.param(
            "journal",
            ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--sector-size", "512"],
            id="journal-to-cbc-512",
        ),
        pytest.param("none", ["--key-size", "256"], id="none-xts256"),
        pytest.param("checksum", ["--sector-size", "512"], id="checksum-512"),
    ],
)
def test_cryptsetup_init_cryptfuse_finishes(
    tmp_path: Path, resilience: str, change: list[str]
) -> None:
    img, key, data = make(tmp_path)
    run(
        "cryptsetup",
        "reencrypt",
        "--init-only",
        "--force-offline-reencrypt",
        "-q",
        *FAST_KDF,
        "--key-file",
        str(key),
        "--resilience",
        resilience,
        *change,
        str(img),
    )
    assert read_all(img) == data  # readable in reencryption, before any step
    result = reenc.run(str(img), None, PASS, max_hotzone=256 * 1024)
    assert result.finished
    assert read_all(img) == data
    cryptsetup_checks(img, key, data)


# -- random parameters, either tool starting or finishing ----------------------------------

#: (cipher, key size in bits) that cryptsetup (OpenSSL backend) and the independent
#: decryption of test_interop_luks both have
RANDOM_CIPHERS = [
    ("aes-xts-plain64", 256),
    ("aes-xts-plain64", 512),
    ("aes-cbc-essiv:sha256", 256),
    ("aes-cbc-plain64", 128),
    ("aes-cbc-plain64", 256),
]


def _random_case(rng: random.Random) -> dict[str, Any]:
    src, dst = rng.choice(RANDOM_CIPHERS), rng.choice(RANDOM_CIPHERS)
    resilience = rng.choice(["checksum", "journal", "none"])
    options = [
        "--cipher", dst[0],
        "--key-size", str(dst[1]),
        "--sector-size", str(rng.choice([512, 1024, 2048, 4096])),
        "--resilience", resilience,
    ]  # fmt: skip
    key_bits = dst[1]
    if rng.random() < 0.3:  # cryptsetup's default: the old size for the same cipher
        del options[2:4]
        key_bits = src[1] if src[0] == dst[0] else (512 if "-xts-" in dst[0] else 256)
    if resilience == "checksum":
        options += ["--resilience-hash", rng.choice(["sha256", "sha1", "sha512"])]
    hotzone = rng.choice([None, "256k", "768k", "1m"])
    return {
        "format": ["--cipher", src[0], "--key-size", str(src[1])],
        "key_bits": key_bits,
        "source_sector": rng.choice([512, 4096]),
        "options": options,
        "hotzone": [] if hotzone is None else ["--hotzone-size", hotzone],
        "who": rng.choice(["cryptfuse", "cryptfuse-then-cryptsetup", "cryptsetup-then-cryptfuse"]),
        # a second keyslot: the reencryption then names the one it keeps (--key-slot)
        "slot": rng.choice([None, 0, 1]),
        # --reduce-device-size: the data moves on (datashift), the last 512 KiB go
        "shift": rng.random() < 0.25,
    }


def test_random_reencryptions_against_cryptsetup(tmp_path: Path) -> None:
    """Fresh containers with random ciphers, key and sector sizes, resilience modes and
    hot zones, reencrypted by cryptfuse alone or started by one tool and finished by the
    other; cryptsetup's dumped new key decrypts the data independently.  The seed is
    printed (and taken from ``CRYPTFUSE_TEST_SEED`` to replay a failure)."""
    rng = seeded_rng()
    for number in range(12):
        case = _random_case(rng)
        work = tmp_path / str(number)
        work.mkdir()
        img, key, data = make(work, sector_size=case["source_sector"], cipher=case["format"])
        if case["shift"]:
            case["options"] += ["--reduce-device-size", "512k"]
            data = data[: -512 * 1024]
        passphrase = PASS
        keyfile = ["--key-file", str(key)]
        if case["slot"] is not None:
            other = work / "pass1"
            other.write_bytes(b"second passphrase")
            run("cryptsetup", "luksAddKey", "-q", *FAST_KDF, *keyfile, str(img), str(other))
            if case["slot"] == 1:
                key, passphrase = other, b"second passphrase"
            keyfile = ["--key-file", str(key)]
        # --key-slot where a reencryption starts (cryptsetup 2.6.1 fails a --resume-only
        # given one: "wrong or missing parameters")
        slot = [] if case["slot"] is None else ["--key-slot", str(case["slot"])]
        if case["who"] == "cryptfuse":
            proc = cli(
                "reencrypt", str(img), "-q", *keyfile, *slot, *case["options"], *case["hotzone"]
            )  # fmt: skip
            assert proc.returncode == 0, (case, proc.stderr)
        elif case["who"] == "cryptfuse-then-cryptsetup":
            proc = cli(
                "reencrypt", str(img), "-q", "--init-only", *keyfile, *slot, *case["options"]
            )  # fmt: skip
            assert proc.returncode == 0, (case, proc.stderr)
            run(
                "cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt",
                "-q", *keyfile, *case["hotzone"], str(img),
            )  # fmt: skip
        else:
            run(
                "cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt",
                "-q", *FAST_KDF, *keyfile, *slot, *case["options"], str(img),
            )  # fmt: skip
            proc = cli("reencrypt", str(img), "-q", "--resume-only", *keyfile, *case["hotzone"])
            assert proc.returncode == 0, (case, proc.stderr)
        assert read_all(img, passphrase) == data, case  # (a shifted volume shrank)
        cryptsetup_checks(img, key, data)
        hdr = header_json(img)
        assert len(hdr["keyslots"]) == 1, case  # the new one: the others went at the end
        segment = hdr["segments"]["0"]
        assert segment["encryption"] == case["options"][1], case
        assert segment["sector_size"] == int(
            case["options"][case["options"].index("--sector-size") + 1]
        ), case
        assert [s["key_size"] * 8 for s in hdr["keyslots"].values()] == [case["key_bits"]], case


def test_random_encryptions_and_decryptions_against_cryptsetup(tmp_path: Path) -> None:
    """``--encrypt`` (in place with ``--reduce-device-size``, or to a detached header)
    and ``--decrypt`` (exporting the header, or of a detached one) with random ciphers,
    sector sizes, resilience and hot zones, through the command line, by cryptfuse
    alone or started by one tool and finished by the other.  Seed as above."""
    rng = seeded_rng()
    for number in range(8):
        work = tmp_path / str(number)
        work.mkdir()
        key = work / "pass"
        key.write_bytes(PASS)
        keyfile = ["--key-file", str(key)]
        cipher, bits = rng.choice(RANDOM_CIPHERS)
        sector = rng.choice([512, 1024, 2048, 4096])
        hotzone = rng.choice([[], ["--hotzone-size", "512k"], ["--hotzone-size", "1m"]])
        who = rng.choice(["cryptfuse", "cryptfuse-then-cryptsetup", "cryptsetup-then-cryptfuse"])
        layout = rng.choice(["encrypt-shift", "encrypt-detached", "decrypt-export", "decrypt"])
        case = (cipher, bits, sector, hotzone, who, layout)
        header: Path | None = None
        if layout.startswith("encrypt"):
            img, data = plain_image(work, rng.choice([3, 4, 6]), 0)
            options = [
                "--encrypt", "--type", "luks2", *FAST_KDF,
                "--cipher", cipher, "--key-size", str(bits), "--sector-size", str(sector),
            ]  # fmt: skip
            if layout == "encrypt-shift":
                options += ["--reduce-device-size", "2M"]
                data = data[: -2 * MiB]  # the last 2 MiB go: the device shrinks
            else:
                header = work / "new.hdr"
                options += ["--header", str(header)]
                options += ["--resilience", rng.choice(["checksum", "journal", "none"])]
        else:
            if layout == "decrypt":
                img, header, data = detached_luks(work, rng.choice([3, 4]))
                options = ["--decrypt", "--header", str(header)]
                options += ["--resilience", rng.choice(["checksum", "journal", "none"])]
            else:
                img, _, data = make(
                    work, sector_size=sector, cipher=("--cipher", cipher, "--key-size", str(bits))
                )
                header = work / "exported.hdr"
                options = ["--decrypt", "--header", str(header)]
        at = ["--header", str(header)] if header is not None else []
        if who == "cryptfuse":
            proc = cli("reencrypt", str(img), "-q", *keyfile, *options, *hotzone)
            assert proc.returncode == 0, (case, proc.stderr)
        elif who == "cryptfuse-then-cryptsetup":
            proc = cli("reencrypt", str(img), "-q", "--init-only", *keyfile, *options, *hotzone)
            assert proc.returncode == 0, (case, proc.stderr)
            run(
                "cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
                *keyfile, *at, *hotzone, str(img),
            )  # fmt: skip
        else:
            run(
                "cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "-q",
                *keyfile, *options, *hotzone, str(img),
            )  # fmt: skip
            proc = cli("reencrypt", str(img), "-q", "--resume-only", *keyfile, *at, *hotzone)
            assert proc.returncode == 0, (case, proc.stderr)
        if layout.startswith("decrypt"):
            assert img.read_bytes()[: len(data)] == data, case
        else:
            assert read_with(img, header)[: len(data)] == data, case
            cryptsetup_checks(img, key, data, header)
            segment = header_json(header or img)["segments"]["0"]
            assert (segment["encryption"], segment["sector_size"]) == (cipher, sector), case


# -- cryptfuse starts, cryptsetup checks -----------------------------------------------------


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    return subprocess.run(
        [sys.executable, "-m", "cryptfuse", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("resilience", ["checksum", "journal", "none"])
def test_cli_reencrypt_then_cryptsetup(tmp_path: Path, resilience: str) -> None:
    img, key, data = make(tmp_path)
    proc = cli(
        "reencrypt",
        str(img),
        "--key-file",
        str(key),
        "-q",
        "--resilience",
        resilience,
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "256",
        "--hotzone-size",
        "512k",
    )
    assert proc.returncode == 0, proc.stderr
    assert read_all(img) == data
    hdr = header_json(img)
    assert "requirements" not in hdr["config"]
    assert len(hdr["keyslots"]) == 1 and len(hdr["digests"]) == 1
    cryptsetup_checks(img, key, data)


def test_cli_refusals(tmp_path: Path) -> None:
    img, key, data = make(tmp_path)
    before = img.read_bytes()
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope")
    proc = cli("reencrypt", str(img), "--key-file", str(wrong), "-q")
    assert (
        proc.returncode == 2 and proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    )
    proc = cli("reencrypt", str(img), "--key-file", str(key), "-q", "--resume-only")
    assert proc.returncode == 1 and b"not in LUKS2 reencryption" in proc.stderr
    run("cryptsetup", "luksAddKey", "-q", *FAST_KDF, "--key-file", str(key), str(img), str(key))
    before = img.read_bytes()
    proc = cli("reencrypt", str(img), "--key-file", str(key), "-q")
    assert proc.returncode == 1 and b"--key-slot" in proc.stderr
    assert img.read_bytes() == before
    # with --key-slot N only that slot survives, as with cryptsetup
    proc = cli(
        "reencrypt", str(img), "--key-file", str(key), "-q", "-S", "1", "--hotzone-size", "1M"
    )
    assert proc.returncode == 0, proc.stderr
    assert list(header_json(img)["keyslots"]) == ["0"] or len(header_json(img)["keyslots"]) == 1
    assert read_all(img) == data


@pytest.mark.parametrize("finisher", ["cryptfuse", "cryptsetup-after-a-cryptfuse-step"])
@pytest.mark.parametrize("starter", ["cryptsetup", "cryptfuse"])
def test_key_change_with_data_shift(tmp_path: Path, starter: str, finisher: str) -> None:
    """``reencrypt --reduce-device-size`` of a LUKS2 container (a key change moving the
    data towards the end, backward, ``datashift``), started by either tool, finished
    by cryptfuse (or one hot zone by cryptfuse, the rest by cryptsetup); the volume
    loses its last MiB and keeps the rest."""
    img, key, data = make(tmp_path, data_mib=4)
    if starter == "cryptsetup":
        run(
            "cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "-q",
            *FAST_KDF, "--key-file", str(key), "--reduce-device-size", "1M", str(img),
        )  # fmt: skip
    else:
        proc = cli(
            "reencrypt", str(img), "--init-only", "-q", *FAST_KDF, "--key-file", str(key),
            "--reduce-device-size", "1M",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    kept = data[: 3 * MiB]
    assert read_all(img)[: 3 * MiB] == kept  # in reencryption: readable already
    if finisher == "cryptfuse":
        assert reenc.run(str(img), None, PASS).finished
    else:
        calls = iter([False, True])
        assert not reenc.run(str(img), None, PASS, stop=lambda: next(calls)).finished
        resume_with_cryptsetup(img, key, None)
    assert read_all(img) == kept
    assert int(header_json(img)["segments"]["0"]["offset"]) == 2 * MiB
    cryptsetup_checks(img, key, kept)


def test_luks1_refused_with_the_way_out(tmp_path: Path) -> None:
    """cryptsetup 2.6.1 reencrypts LUKS1 through device-mapper only (here it fails and
    leaves the device unreadable); cryptfuse says to convert first, and writes nothing."""
    img, key = tmp_path / "l1.img", tmp_path / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    run("cryptsetup", "luksFormat", "--type", "luks1", "-q", *FAST_KDF, "--key-file", str(key),
        str(img))  # fmt: skip
    before = img.read_bytes()
    proc = cli("reencrypt", str(img), "-q", "--key-file", str(key))
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "convert --type luks2" in lines[0], lines
    assert img.read_bytes() == before


def test_busy_while_mounted_lock(tmp_path: Path) -> None:
    img, key, _ = make(tmp_path)
    with open_volume(str(img), OpenOptions(), Secret(PASS, False)):
        proc = cli("reencrypt", str(img), "--key-file", str(key), "-q", "--force-offline-reencrypt")
        assert proc.returncode == 5, proc.stderr


def test_stop_and_resume(tmp_path: Path) -> None:
    img, key, data = make(tmp_path)
    reenc.initialize(
        str(img), None, PASS, reenc.ReencryptOptions(resilience="journal"), KdfParams("pbkdf2")
    )
    calls = []
    result = reenc.run(
        str(img),
        None,
        PASS,
        max_hotzone=256 * 1024,
        stop=lambda: calls.append(1) or len(calls) >= 3,
    )
    assert not result.finished and 0 < result.done < result.total
    assert read_all(img) == data
    resume_with_cryptsetup(img, key, None)
    assert read_all(img) == data


# -- the corpus ------------------------------------------------------------------------------

CORPUS_IMAGES = [
    "luks2-reencrypt-interrupted-sigint-checksum.img",
    "luks2-encrypt-datashift-interrupted-consistent.img",
    "luks2-encrypt-datashift-crash.img",
    "luks2-reencrypt-crash-checksum-hotzone-old.img",
    "luks2-reencrypt-crash-checksum-hotzone-new.img",
    "luks2-reencrypt-crash-journal.img",
]


@pytest.mark.parametrize("name", CORPUS_IMAGES)
def test_corpus_in_reencryption(tmp_path: Path, corpus: Path, name: str) -> None:
    src = corpus / "generated" / name
    img = tmp_path / name
    shutil.copy(src, img)
    pw = b"corpus-luks2-A"
    assert read_all(img, pw)[: len(CORPUS_P)] == CORPUS_P
    assert img.read_bytes() == src.read_bytes()  # read-only never writes, even to recover
    # a wrong passphrase: cryptsetup's error (the last keyslot's result, which is the
    # "unusable" reencrypt keyslot where that is last: docs/keyslots.md)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"wrong")
    code = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(wrong), str(img)],
        capture_output=True, cwd=tmp_path,
    ).returncode  # fmt: skip
    assert code in (1, 2)
    with pytest.raises(KeyslotError if code == 1 else WrongPassphraseError):
        read_all(img, b"wrong")
    # read-write: recovered on open, then finished by cryptfuse
    assert read_all(img, pw, readonly=False)[: len(CORPUS_P)] == CORPUS_P
    slot = 0 if "reencrypt-" in name else None
    assert reenc.run(str(img), None, pw, key_slot=slot).finished
    assert read_all(img, pw)[: len(CORPUS_P)] == CORPUS_P
    passfile = tmp_path / "pw"
    passfile.write_bytes(pw)
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(passfile), str(img))
    # cryptfuse repairs, cryptsetup finishes
    other = tmp_path / "other.img"
    shutil.copy(src, other)
    proc = cli("repair", "-q", "--key-file", str(passfile), str(other))
    assert proc.returncode == 0, proc.stderr
    run(
        "cryptsetup",
        "reencrypt",
        "--resume-only",
        "--force-offline-reencrypt",
        "-q",
        "--key-file",
        str(passfile),
        str(other),
    )
    assert read_all(other, pw)[: len(CORPUS_P)] == CORPUS_P


def test_tampered_metadata_refused(tmp_path: Path, corpus: Path) -> None:
    """The reencryption digest binds direction and mode: a flipped direction is refused."""
    img = tmp_path / "t.img"
    shutil.copy(corpus / "generated" / "luks2-reencrypt-interrupted-sigint-checksum.img", img)
    from cryptfuse.formats.luks2_write import Luks2Writer

    fd = os.open(img, os.O_RDWR)
    try:
        hdr = read_luks2_header(fd, str(img))
        w = Luks2Writer.from_header(fd, hdr, reencryption=True)
        slot = next(k for k, s in w.obj["keyslots"].items() if s["type"] == "reencrypt")
        w.obj["keyslots"][slot]["direction"] = "backward"
        w.commit()
    finally:
        os.close(fd)
    with pytest.raises(CryptfuseError, match="digest"):
        read_all(img, b"corpus-luks2-A")


# -- kill at every write and fsync ---------------------------------------------------------


@pytest.mark.parametrize("resilience", ["checksum", "journal", "datashift"])
def test_killed_at_every_write(tmp_path: Path, resilience: str) -> None:
    base, key, data = make(tmp_path, data_mib=1)
    if resilience == "datashift":  # --reduce-device-size: the last 256 KiB go
        options = reenc.ReencryptOptions(shift=256 * 1024, key_size=256, sector_size=512)
        data = data[: -256 * 1024]
    else:
        options = reenc.ReencryptOptions(resilience=resilience, key_size=256, sector_size=512)

    def volume(img: Path) -> bytes:  # (a shifted volume shrinks only at its end)
        return read_all(img)[: len(data)]

    def action(img: Path) -> None:
        reenc.initialize(str(img), None, PASS, options, KdfParams("pbkdf2"))
        assert reenc.run(str(img), None, PASS, max_hotzone=256 * 1024).finished

    work = tmp_path / "w.img"
    shutil.copy(base, work)
    events = run_killed(lambda: action(work), None, False)
    assert volume(work) == data
    assert len(events) > 20
    for n in range(1, len(events) + 1):
        shutil.copy(base, work)
        assert run_killed(lambda: action(work), n, torn=n % 2 == 0) == "killed"
        snapshot = work.read_bytes()
        assert volume(work) == data, f"killed at event {n}"
        assert work.read_bytes() == snapshot  # read-only: nothing written
        if not reenc.in_reencryption(header_json(work)):
            continue  # killed before the reencryption started or after it ended
        if n % 3 == 0:  # cryptsetup finishes it (repair first where a hot zone was cut)
            resume_with_cryptsetup(work, key, None)
        else:
            assert reenc.run(str(work), None, PASS).finished
        assert volume(work) == data, f"resumed after event {n}"


# -- encryption and decryption ------------------------------------------------------------

KDF = KdfParams("pbkdf2")


def plain_image(tmp: Path, data_mib: int, tail_mib: int) -> tuple[Path, bytes]:
    img = tmp / "p.img"
    data = os.urandom(data_mib * MiB)
    img.write_bytes(data + bytes(tail_mib * MiB))
    return img, data


def detached_luks(tmp: Path, data_mib: int) -> tuple[Path, Path, bytes]:
    """A LUKS2 container with a detached header and data offset 0 (cryptsetup-made)."""
    img, hdr, key = tmp / "d.img", tmp / "d.hdr", tmp / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(data_mib * MiB)
    with open(hdr, "wb") as f:
        f.truncate(4 * MiB)
    run(
        "cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--key-file", str(key),
        "--header", str(hdr), str(img),
    )  # fmt: skip
    data = os.urandom(data_mib * MiB)
    with open_volume(str(img), OpenOptions(header=str(hdr)), Secret(PASS, False)) as v:
        v.write(0, data)
    return img, hdr, data


def read_with(img: Path, header: Path | None) -> bytes:
    opts = OpenOptions(readonly=True, header=str(header) if header else None)
    with open_volume(str(img), opts, Secret(PASS, False)) as v:
        return v.read(0, v.size)


def resume_with_cryptsetup(img: Path, key: Path, header: Path | None) -> None:
    extra = ["--header", str(header)] if header else []
    hdr_json = header_json(header or img)
    first = hdr_json["segments"].get("0", {})
    shifted_key_change = any(
        s["type"] == "reencrypt" and s["mode"] == "reencrypt" and s["area"]["type"] == "datashift"
        for s in hdr_json["keyslots"].values()
    )
    if shifted_key_change and "in-reencryption" in first.get("flags", []):
        # cryptsetup 2.6.1 recovers the last hot zone (offset 0) of a key change with a
        # data shift from a "moved segment" such a change has not got: it reads the
        # header as data (docs/reencryption.md; reproduced with its own run). cryptfuse
        # recovers it; cryptsetup goes on from there.
        assert reenc.recover(str(img), str(header) if header else None, PASS)
    elif any("in-reencryption" in s.get("flags", []) for s in hdr_json["segments"].values()):
        run("cryptsetup", "repair", "-q", "--key-file", str(key), *extra, str(img))
    now = header_json(header or img)
    if not reenc.in_reencryption(now):
        return
    segs = [
        s
        for s in now["segments"].values()
        if not any(f.startswith("backup-") for f in s.get("flags", []))
    ]
    moved_only = (
        now["keyslots"]
        and any(
            s.get("mode") == "decrypt" and s["area"]["type"].startswith("datashift")
            for s in now["keyslots"].values()
            if s["type"] == "reencrypt"
        )
        and [s["type"] for s in segs] == ["crypt", "linear"]
        and segs[0]["offset"] == "0"
    )
    if reenc.only_finish_left(now) or moved_only:
        # cryptsetup 2.6.1 cannot go on from these two states (docs/reencryption.md): its
        # resume would reencrypt finished data again, or overlap its own segments
        assert reenc.run(str(img), str(header) if header else None, PASS).finished
        return
    run(
        "cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(key), *extra, str(img),
    )  # fmt: skip


@pytest.mark.parametrize("finisher", ["cryptfuse", "cryptsetup"])
def test_encrypt_in_place_with_data_shift(tmp_path: Path, finisher: str) -> None:
    img, data = plain_image(tmp_path, 6, 2)
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    options = reenc.EncryptOptions(reduce=2 * MiB, sector_size=4096, key_size=256)
    reenc.initialize_encrypt(str(img), None, PASS, options, KDF)
    assert read_all(img)[: len(data)] == data  # in reencryption: readable already
    if finisher == "cryptfuse":
        assert reenc.run(str(img), None, PASS, max_hotzone=0).finished
    else:
        resume_with_cryptsetup(img, key, None)
    assert read_all(img)[: len(data)] == data
    assert img.read_bytes()[-MiB:].count(0) < MiB // 100  # the moved plaintext was wiped
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(img))


@pytest.mark.parametrize("finisher", ["cryptfuse", "cryptsetup"])
def test_encrypt_with_detached_header(tmp_path: Path, finisher: str) -> None:
    img, data = plain_image(tmp_path, 6, 0)
    hdr, key = tmp_path / "p.hdr", tmp_path / "pass"
    key.write_bytes(PASS)
    reenc.initialize_encrypt(str(img), str(hdr), PASS, reenc.EncryptOptions(), KDF)
    if finisher == "cryptfuse":
        assert reenc.run(str(img), str(hdr), PASS, max_hotzone=MiB).finished
    else:
        resume_with_cryptsetup(img, key, hdr)
    assert read_with(img, hdr) == data
    assert data[:MiB] not in img.read_bytes()  # the device holds ciphertext only


@pytest.mark.parametrize("finisher", ["cryptfuse", "cryptsetup"])
@pytest.mark.parametrize("starter", ["cryptfuse", "cryptsetup"])
def test_decrypt_exporting_the_header(tmp_path: Path, starter: str, finisher: str) -> None:
    img, key, data = make(tmp_path, data_mib=6)
    hdr = tmp_path / "new.hdr"
    if starter == "cryptfuse":
        reenc.initialize_decrypt(str(img), str(hdr), PASS, max_hotzone=MiB)
    else:
        run(
            "cryptsetup", "reencrypt", "--decrypt", "--init-only", "--force-offline-reencrypt",
            "-q", "--key-file", str(key), "--header", str(hdr), "--hotzone-size", "1M", str(img),
        )  # fmt: skip
    assert header_json(hdr)["config"]["requirements"]["mandatory"] == ["online-reencrypt-v3"]
    assert read_with(img, hdr) == data
    if finisher == "cryptfuse":
        assert reenc.run(str(img), str(hdr), PASS).finished
    else:
        resume_with_cryptsetup(img, key, hdr)
    assert img.read_bytes()[: len(data)] == data


@pytest.mark.parametrize("finisher", ["cryptfuse", "cryptsetup"])
def test_decrypt_detached(tmp_path: Path, finisher: str) -> None:
    img, hdr, data = detached_luks(tmp_path, 6)
    reenc.initialize_decrypt(str(img), str(hdr), PASS, resilience="journal")
    if finisher == "cryptfuse":
        assert reenc.run(str(img), str(hdr), PASS, max_hotzone=MiB).finished
    else:
        resume_with_cryptsetup(img, tmp_path / "pass", hdr)
    assert img.read_bytes() == data


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_zones_read_and_converted_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """Offline, hot zones are read (one thread) and converted (another) ahead of the
    one being written: every zone read once, in order, on the read thread, and
    converted once, in the same order, on the convert thread."""
    if direction == "forward":  # a key change goes forward
        img, key, data = make(tmp_path, data_mib=3)
        hdr = None
        reenc.initialize(
            str(img), None, PASS, reenc.ReencryptOptions(resilience="checksum"),
            KdfParams("pbkdf2", iterations=1000),
        )  # fmt: skip
    else:  # decrypting with a detached header goes backward
        img, hdr, data = detached_luks(tmp_path, 3)
        reenc.initialize_decrypt(str(img), str(hdr), PASS, resilience="journal")
    reads: list[tuple[str, int, int]] = []
    real = reenc._Devices.read_zone

    def spy(self: reenc._Devices, view: memoryview, position: int) -> None:
        reads.append((threading.current_thread().name, position, len(view)))
        real(self, view, position)

    monkeypatch.setattr(reenc._Devices, "read_zone", spy)
    converted: list[tuple[str, int]] = []
    real_convert = reenc._convert

    def convert_spy(*args: Any, **kwargs: Any) -> object:
        converted.append((threading.current_thread().name, args[6]))  # the offset
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(reenc, "_convert", convert_spy)
    zone = 256 * 1024
    assert reenc.run(str(img), str(hdr) if hdr else None, PASS, max_hotzone=zone).finished
    base = MiB if hdr is None else 0
    starts = [p - base for _, p, _ in reads]
    step = zone if direction == "forward" else -zone
    first = 0 if direction == "forward" else len(data) - zone
    assert starts == list(range(first, first + step * (len(data) // zone), step))
    assert all(n == zone for _, _, n in reads)
    assert [t for t, _, _ in reads] == ["reencrypt-read"] * len(reads)
    assert [o for _, o in converted] == starts
    assert {t for t, _ in converted} == {"reencrypt-convert"}
    if hdr is None:
        assert read_all(img) == data
        cryptsetup_checks(img, key, data)
    else:
        assert img.read_bytes() == data


@pytest.mark.parametrize("resilience", ["checksum", "journal", "none"])
def test_read_error_ahead_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resilience: str
) -> None:
    """A read that fails on the read thread, zones ahead of the one being written: the
    run fails there with that error (after the zones before it), both stage threads
    end, and the container opens and resumes to its content (cryptfuse, then the
    rest by cryptsetup)."""
    img, key, data = make(tmp_path, data_mib=3)
    reenc.initialize(
        str(img), None, PASS, reenc.ReencryptOptions(resilience=resilience), KdfParams("pbkdf2")
    )
    real = reenc._Devices.read_zone
    reads: list[int] = []

    def failing(self: reenc._Devices, view: memoryview, position: int) -> None:
        reads.append(position)
        if len(reads) == 5:
            raise reenc.DeviceError("cannot read reencryption hot zone: Input/output error")
        real(self, view, position)

    monkeypatch.setattr(reenc._Devices, "read_zone", failing)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(reenc.DeviceError, match="Input/output error"):
        reenc.run(str(img), None, PASS, max_hotzone=256 * 1024)
    assert not {t.name for t in threading.enumerate()} - before  # no stage left running
    obj = header_json(img)
    assert reenc.in_reencryption(obj)
    assert read_all(img) == data
    monkeypatch.setattr(reenc._Devices, "read_zone", real)
    resume_with_cryptsetup(img, key, None)
    assert read_all(img) == data


@pytest.mark.parametrize("resilience", ["checksum", "journal", "none"])
def test_durable_by_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resilience: str) -> None:
    """Every write a commit depends on is made durable by itself (RWF_DSYNC) rather
    than by an fsync of the whole container, whose dirty pages a mount may have
    filled: the header copies, the checksums or journal, each hot zone. ``none``'s
    zones are written without, and synced before its commit."""
    img, key, data = make(tmp_path, data_mib=3)
    reenc.initialize(
        str(img), None, PASS, reenc.ReencryptOptions(resilience=resilience), KdfParams("pbkdf2")
    )
    ops: list[tuple[str, int, bool]] = []  # ("w", offset, durable) or ("sync", -1, True)
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def pwrite(fd: int, data: Any, offset: int) -> int:
        ops.append(("w", offset, False))
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        ops.append(("w", offset, bool(flags & os.RWF_DSYNC)))
        return real_pwritev(fd, buffers, offset, flags)

    def syncing(real: Any) -> Any:
        def sync(fd: int) -> None:
            ops.append(("sync", -1, True))
            real(fd)

        return sync

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fsync", syncing(real_fsync))
    monkeypatch.setattr(os, "fdatasync", syncing(real_fdatasync))
    assert reenc.run(str(img), None, PASS, max_hotzone=256 * 1024).finished
    monkeypatch.undo()
    assert read_all(img) == data
    cryptsetup_checks(img, key, data)
    writes = [(offset, durable) for kind, offset, durable in ops if kind == "w"]
    zones = [d for offset, d in writes if offset >= MiB]
    assert len(zones) == len(data) // (256 * 1024)
    assert all(durable for offset, durable in writes if offset < MiB)  # header device
    if resilience == "none":
        assert not any(zones)
        last_zone = max(i for i, (kind, offset, _) in enumerate(ops) if offset >= MiB)
        # the data synced after the last zone and before the header that says it is done
        assert ops[last_zone + 1][0] == "sync"
        assert ops[last_zone + 2][1] < MiB
    else:
        assert all(zones)
        fd = os.open(img, os.O_RDONLY)
        direct = volume.open_direct(fd, readonly=True)
        os.close(fd)
        if direct >= 0:  # zones read with O_DIRECT: no whole-file sync at all
            os.close(direct)
            assert not [op for op in ops if op[0] == "sync"]


def test_cli_encrypt_then_decrypt(tmp_path: Path) -> None:
    img, data = plain_image(tmp_path, 4, 2)
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    common = ["--key-file", str(key), "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    proc = cli("reencrypt", "--encrypt", "--reduce-device-size", "2M", str(img), *common)
    assert proc.returncode == 0, proc.stderr
    assert read_all(img)[: len(data)] == data
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(img))
    hdr = tmp_path / "exported.hdr"
    proc = cli(
        "reencrypt", "--decrypt", "--header", str(hdr), str(img), "--key-file", str(key), "-q"
    )
    assert proc.returncode == 0, proc.stderr
    assert img.read_bytes()[: len(data)] == data
    proc = cli("reencrypt", "--encrypt", str(img), *common)
    assert proc.returncode == 1 and b"--reduce-device-size" in proc.stderr


@pytest.mark.parametrize("tool", ["cryptfuse", "cryptsetup"])
def test_decrypt_with_several_keyslots_needs_no_key_slot(tmp_path: Path, tool: str) -> None:
    """Unlike a key change, a decryption makes no new keyslots: cryptsetup 2.6.1 takes
    any passphrase without --key-slot (both ways of decrypting), and so does cryptfuse."""
    img, key, data = make(tmp_path, data_mib=3)
    second = tmp_path / "second"
    second.write_bytes(b"another passphrase")
    run("cryptsetup", "luksAddKey", "-q", *FAST_KDF, "--key-file", str(key), str(img), str(second))
    hdr = tmp_path / "exported.hdr"
    args = ["reencrypt", "--decrypt", "--header", str(hdr), "--key-file", str(second), "-q"]
    if tool == "cryptfuse":
        proc = cli(*args, str(img))
        assert proc.returncode == 0, proc.stderr
    else:
        run("cryptsetup", *args, "--force-offline-reencrypt", str(img))
    assert img.read_bytes()[: len(data)] == data


def _is_luks2(path: Path) -> bool:
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        read_luks2_header(fd, str(path))
        return True
    except CryptfuseError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "scenario", ["encrypt-shift", "encrypt-detached", "decrypt-shift", "decrypt-detached"]
)
def test_encrypt_decrypt_killed_at_every_write(tmp_path: Path, scenario: str) -> None:
    """Kill at every write and fsync of the whole operation (initialization included):
    the data is always there, in the one place the on-disk state says, and the
    operation can be completed -- by cryptfuse, or every third time by cryptsetup."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    shift = 512 * 1024
    hdr: Path | None = None
    if scenario == "encrypt-shift":
        base, data = plain_image(tmp_path, 2, 1)
    elif scenario == "encrypt-detached":
        base, data = plain_image(tmp_path, 2, 0)
        hdr = tmp_path / "w.hdr"
    elif scenario == "decrypt-shift":
        base, key, data = make(tmp_path, data_mib=2)
        hdr = tmp_path / "w.hdr"
    else:
        base, base_hdr, data = detached_luks(tmp_path, 2)
        hdr = tmp_path / "w.hdr"
    work = tmp_path / "w.img"

    def reset() -> None:
        shutil.copy(base, work)
        if scenario == "decrypt-detached":
            shutil.copy(base_hdr, tmp_path / "w.hdr")
        elif hdr is not None and hdr.exists():
            hdr.unlink()

    def action() -> None:
        h = str(hdr) if hdr else None
        if scenario.startswith("encrypt"):
            opts = reenc.EncryptOptions(reduce=2 * shift if hdr is None else 0, key_size=256)
            reenc.initialize_encrypt(str(work), h, PASS, opts, KDF)
        else:
            assert h is not None
            reenc.initialize_decrypt(str(work), h, PASS, max_hotzone=shift)
        assert reenc.run(str(work), h, PASS, max_hotzone=shift).finished

    def plaintext_now() -> bytes:
        return work.read_bytes()[: len(data)]

    def check_and_finish(n: int) -> None:
        h = str(hdr) if hdr else None
        meta = hdr if hdr is not None and _is_luks2(hdr) else work
        if _is_luks2(meta) and (
            reenc.in_reencryption(header_json(meta)) or header_json(meta)["keyslots"]
        ):
            if (
                meta == work
                or scenario.startswith("decrypt")
                or reenc.in_reencryption(header_json(meta))
            ):
                assert read_with(work, hdr if meta != work else None)[: len(data)] == data, n
            if reenc.in_reencryption(header_json(meta)):
                if n % 3 == 0:
                    resume_with_cryptsetup(work, key, hdr if meta != work else None)
                else:
                    assert reenc.run(str(work), h if meta != work else None, PASS).finished
            elif scenario.startswith("decrypt"):  # an initialization that did not commit
                action_from_here()
            return  # an encryption: finished
        if scenario.startswith("decrypt"):  # finished: the device is plaintext
            assert plaintext_now() == data, n
            return
        # encryption that never reached its header commit: plaintext, except inside the
        # documented window where the first chunk lives in the copy at the end
        raw = work.read_bytes()
        if raw[: len(data)] != data:
            assert scenario == "encrypt-shift", n
            moved_at = len(raw) - shift
            assert raw[moved_at : moved_at + shift] == data[:shift], n
            assert raw[shift : len(data)] == data[shift:], n
            with open(work, "r+b") as f:  # the manual recovery docs/reencryption.md gives
                f.write(raw[moved_at : moved_at + shift])
        action_from_here()

    def action_from_here() -> None:
        if scenario == "decrypt-shift" and hdr is not None and hdr.exists() and not _is_luks2(hdr):
            hdr.unlink()  # an export cut short: the device still has its header
        if scenario == "encrypt-detached" and hdr is not None and hdr.exists():
            hdr.unlink()
        action()

    def final_check() -> None:
        if scenario.startswith("decrypt"):
            assert plaintext_now() == data
        else:
            assert read_with(work, hdr)[: len(data)] == data

    reset()
    events = run_killed(action, None, False)
    final_check()
    assert len(events) > 10
    for n in range(1, len(events) + 1):
        reset()
        assert run_killed(action, n, torn=n % 2 == 0) == "killed"
        check_and_finish(n)
        final_check()


# -- SIGKILL at random moments of real runs, both ways ---------------------------------------


def _duration(cmd: list[str], env: dict[str, str] | None, base: Path, img: Path) -> float:
    """How long an uninterrupted run takes here (kill times are drawn within it, so
    slow machines and sanitizer builds still catch runs in the middle)."""
    shutil.copy(base, img)
    start = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    return time.monotonic() - start


def _killed_run(cmd: list[str], env: dict[str, str] | None, delay: float) -> bool:
    """Start *cmd*, SIGKILL it after *delay* seconds; True when it was still running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        proc.wait(delay)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


@pytest.mark.parametrize("resilience", ["checksum", "journal"])
def test_cryptsetup_killed_cryptfuse_resumes(tmp_path: Path, resilience: str) -> None:
    rng = random.Random(resilience)
    base, key, data = make(tmp_path, data_mib=32)
    img = tmp_path / "k.img"
    cmd = ["cryptsetup", "reencrypt", "--force-offline-reencrypt", "-q", "--key-file", str(key),
           "--resilience", resilience, "--hotzone-size", "256k", *FAST_KDF, str(img)]  # fmt: skip
    whole = _duration(cmd, None, base, img)
    caught = 0
    for _ in range(20):  # until three runs were caught in the middle
        if caught >= 3:
            break
        shutil.copy(base, img)
        killed = _killed_run(cmd, None, rng.uniform(0.1, 0.9) * whole)
        if killed and reenc.in_reencryption(header_json(img)):
            caught += 1
            assert read_all(img) == data  # read-only, whatever the hot zone's state
            proc = cli("reencrypt", "--resume-only", str(img), "--key-file", str(key), "-q")
            assert proc.returncode == 0, proc.stderr
        assert read_all(img) == data
        run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(img))
    assert caught, "no run was caught in the middle: make the container larger"


@pytest.mark.parametrize("resilience", ["checksum", "journal"])
def test_cryptfuse_killed_cryptsetup_resumes(tmp_path: Path, resilience: str) -> None:
    rng = random.Random(resilience + "x")
    base, key, data = make(tmp_path, data_mib=32)
    img = tmp_path / "k.img"
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "cryptfuse", "reencrypt", str(img), "--key-file", str(key),
           "-q", "--resilience", resilience, "--hotzone-size", "256k", *FAST_KDF]  # fmt: skip
    whole = _duration(cmd, env, base, img)
    caught = 0
    for _ in range(20):  # until three runs were caught in the middle
        if caught >= 3:
            break
        shutil.copy(base, img)
        killed = _killed_run(cmd, env, rng.uniform(0.1, 0.9) * whole)
        if killed and reenc.in_reencryption(header_json(img)):
            caught += 1
            resume_with_cryptsetup(img, key, None)
        assert read_all(img) == data
    assert caught, "no run was caught in the middle: make the container larger"


# -- every metadata layout cryptsetup 2.6.1 writes: parsed, rewritten, still cryptsetup's ----


def _cryptsetup_json(img: Path, header: Path | None = None) -> dict:
    import json

    extra = ["--header", str(header)] if header else []
    return json.loads(run("cryptsetup", "luksDump", "--dump-json-metadata", *extra, str(img)))


def _layouts(tmp: Path) -> list[tuple[str, Path, Path | None]]:
    out: list[tuple[str, Path, Path | None]] = []
    for res in ("checksum", "journal", "none"):
        d = tmp / res
        d.mkdir()
        img, key, _ = make(d, data_mib=2)
        run("cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "-q",
            "--key-file", str(key), "--resilience", res, *FAST_KDF, str(img))  # fmt: skip
        out.append((f"reencrypt-{res}", img, None))
    d = tmp / "encrypt"
    d.mkdir()
    img, _ = plain_image(d, 2, 1)
    (d / "pass").write_bytes(PASS)
    key = d / "pass"
    run("cryptsetup", "reencrypt", "--encrypt", "--init-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(key), "--reduce-device-size", "1M", *FAST_KDF, str(img))  # fmt: skip
    out.append(("encrypt-datashift", img, None))
    d = tmp / "decrypt"
    d.mkdir()
    img, key, _ = make(d, data_mib=2)
    run("cryptsetup", "reencrypt", "--decrypt", "--init-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(key), "--header", str(d / "new.hdr"), str(img))  # fmt: skip
    out.append(("decrypt-datashift", img, d / "new.hdr"))
    return out


def test_cryptsetup_layouts_round_trip(tmp_path: Path) -> None:
    """Each layout parses (our validation = LUKS2_hdr_validate), opens with its content,
    and comes back byte-for-byte the same JSON after our writer commits it, which
    cryptsetup then resumes to the end."""
    from cryptfuse.formats.luks2_write import Luks2Writer

    for name, img, hdr in _layouts(tmp_path):
        before = _cryptsetup_json(img, hdr)
        meta = hdr or img
        fd = os.open(meta, os.O_RDWR)
        try:
            header = read_luks2_header(fd, str(meta))
            assert header.json == before, name
            rh = reenc.Reencryption.from_json(header.json)
            assert rh.mode in ("reencrypt", "encrypt", "decrypt"), name
            writer = Luks2Writer.from_header(fd, header, reencryption=True)
            writer.commit()
        finally:
            os.close(fd)
        assert _cryptsetup_json(img, hdr) == before, name
        key = img.parent / "pass"
        resume_with_cryptsetup(img, key, hdr)
        assert not reenc.in_reencryption(_cryptsetup_json(img, hdr)), name


def test_segment_with_iv_tweak_refused(tmp_path: Path) -> None:
    """IVs that do not start at 0 (a plain container given a header) are refused,
    container untouched: cryptsetup 2.6.1 would reencrypt them with wrong IVs."""
    from cryptfuse.errors import UnsupportedError
    from cryptfuse.formats.luks2_write import Luks2Writer

    img, key, _ = make(tmp_path)
    fd = os.open(img, os.O_RDWR)
    try:
        w = Luks2Writer.from_header(fd, read_luks2_header(fd, str(img)))
        w.obj["segments"]["0"]["iv_tweak"] = "8"
        w.commit()
    finally:
        os.close(fd)
    before = img.read_bytes()
    with pytest.raises(UnsupportedError, match="IVs start"):
        reenc.initialize(str(img), None, PASS, reenc.ReencryptOptions(), KDF)
    with pytest.raises(UnsupportedError, match="IVs start"):
        reenc.initialize_decrypt(str(img), str(tmp_path / "x.hdr"), PASS)
    assert img.read_bytes() == before and not (tmp_path / "x.hdr").exists()


# -- --init-only against cryptsetup's, same random options --------------------------------


def _init_dump(path: Path, data: Path | None = None) -> str:
    """luksDump of *path* (a header; *data* its device) without what differs between
    two runs: UUIDs, salts, digests, file names, Argon2 memory (benchmarked); a
    benchmarked PBKDF2 count reads BENCH (1000: not benchmarked)."""
    target = [str(data)] if data is not None else []
    args = ["--header", str(path), *target] if data is not None else [str(path)]
    out = []
    for line in run("cryptsetup", "luksDump", *args).splitlines():
        key = line.strip().split(":")[0]
        if key == "Iterations" and line.split(":")[1].strip() != "1000":
            line = "Iterations: BENCH"
        elif key in ("Salt", "Digest", "UUID", "Memory"):
            line = key + ": X"
        elif key and all(c in "0123456789abcdef " for c in line.strip()):
            line = "X"  # continuation of a hex field
        out.append(line.replace(str(path.parent), "DIR"))
    return "\n".join(out)


def _random_init(rng: random.Random, work: Path, key: Path) -> tuple[str, list[str], list[str]]:
    """A random reencryption start: (kind, luksFormat options or [], reencrypt options)."""
    kind = rng.choice(["reencrypt", "reencrypt", "encrypt", "decrypt"])
    fmt: list[str] = []
    cipher, bits = rng.choice(RANDOM_CIPHERS)
    if kind != "encrypt":
        fmt = ["--cipher", cipher, "--key-size", str(bits), *FAST_KDF]
        fmt += rng.choice([[], ["--hash", "sha1"], ["--hash", "sha512"]])
        fmt += ["--sector-size", str(rng.choice([512, 1024, 4096]))]
    new_cipher, new_bits = rng.choice(RANDOM_CIPHERS)
    opts: list[str] = []
    if kind != "decrypt" and rng.random() < 0.7:
        opts += ["--cipher", new_cipher, "--key-size", str(new_bits)]
    if kind != "decrypt" and rng.random() < 0.4:
        opts += ["--sector-size", str(rng.choice([512, 2048, 4096]))]
    if rng.random() < 0.6:
        opts += ["--resilience", rng.choice(["checksum", "journal", "none"])]
    if rng.random() < 0.3:
        opts += ["--resilience-hash", rng.choice(["sha1", "sha512"])]
    if kind != "decrypt":
        # the KDF of the new keyslot, and with it the digests' hash and cost
        opts += rng.choice(
            [[], ["--hash", "sha512", "--iter-time", "10"],
             ["--pbkdf", "pbkdf2", "--iter-time", "10"], ["--pbkdf-memory", "64"],
             FAST_KDF, [*FAST_KDF, "--hash", "sha1"]]
        )  # fmt: skip
    if kind == "encrypt":
        opts = ["--encrypt", "--type", "luks2", *opts]
        if "--pbkdf" not in opts and "--iter-time" not in opts:
            opts += FAST_KDF
        opts += rng.choice([[], ["--label", "L", "--subsystem", "S"]])
        opts += rng.choice([[], ["--luks2-metadata-size", "64k"], ["--luks2-keyslots-size", "1m"]])
        opts += rng.choice(
            [[], ["--keyslot-cipher", "aes-cbc-plain64", "--keyslot-key-size", "256"]]
        )
        opts += rng.choice([["--reduce-device-size", rng.choice(["4m", "8m"])], ["--header", "H"]])
        if "--reduce-device-size" in opts and rng.random() < 0.3:
            # half the reduction, or less (which lowers it), or more (refused)
            opts += ["--offset", rng.choice(["2048", "4096", "8192"])]
    elif kind == "decrypt":
        opts = ["--decrypt", "--header", "H", *opts]
    elif rng.random() < 0.25:
        opts += ["--reduce-device-size", rng.choice(["512k", "1m"])]
    return kind, fmt, opts


def test_random_init_like_cryptsetup(tmp_path: Path) -> None:
    """``reencrypt --init-only`` (key change, ``--encrypt``, ``--decrypt``) with the
    same random options on twin devices, one through cryptfuse and one through
    cryptsetup: both start or both refuse, and luksDump shows the same metadata
    (segments, the reencrypt keyslot's area and checksum block, the new keyslot's
    KDF and AF hash, the digests' hash and whether their cost was benchmarked);
    then each tool finishes the other's.  Seed as above."""
    rng = seeded_rng()
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    for number in range(8):
        work = tmp_path / str(number)
        work.mkdir()
        kind, fmt, opts = _random_init(rng, work, key)
        # sizes off the 4096 grid too: both refuse one off a sector size's grid
        size = rng.choice([20, 24]) * MiB + rng.choice([0, 0, 512, 3072, 25 * 512])
        devices = {who: work / f"{who}.img" for who in ("cryptfuse", "cryptsetup")}
        seed_img = work / "seed.img"
        seed_img.write_bytes(os.urandom(size))
        if kind != "encrypt":
            formatted = subprocess.run(
                ["cryptsetup", "luksFormat", "--type", "luks2", "-q", "--key-file", str(key),
                 *fmt, str(seed_img)], capture_output=True, text=True,
            )  # fmt: skip
            if "not aligned to requested sector size" in formatted.stderr:
                continue  # a size off that sector size's grid
            assert formatted.returncode == 0, formatted.stderr
            for bound in rng.choice([[], [["0"]], [["0"], []]]):  # tokens follow the keyslot
                token = work / "token.json"
                token.write_text(json.dumps({"type": "t", "keyslots": bound}))
                run("cryptsetup", "token", "import", "--json-file", str(token), str(seed_img))
        for path in devices.values():
            shutil.copyfile(seed_img, path)
        before = seed_img.read_bytes() if kind == "encrypt" else read_with(seed_img, None)
        headers = {who: work / f"{who}.hdr" for who in devices} if "H" in opts else {}
        codes, errors = {}, {}
        for who, img in devices.items():
            args = [headers[who] if a == "H" else a for a in opts]
            args = [str(a) for a in args] + ["-q", "--key-file", str(key), str(img)]
            if who == "cryptfuse":
                proc = cli("reencrypt", "--init-only", *args)
                codes[who], errors[who] = proc.returncode, proc.stderr
            else:
                done = subprocess.run(
                    ["cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", *args],
                    capture_output=True,
                    cwd=work,  # where a refused --encrypt leaves its LUKS2-temp-*.new
                )
                codes[who], errors[who] = done.returncode, done.stderr
        case = f"{kind} {fmt} {opts}"
        assert (codes["cryptfuse"] == 0) == (codes["cryptsetup"] == 0), (case, errors)
        if codes["cryptfuse"]:
            continue

        dumps = [
            (_init_dump(headers[w], devices[w]) if headers else _init_dump(devices[w])).replace(
                w, "WHO"
            )
            for w in devices
        ]
        assert dumps[0] == dumps[1], case
        # cryptfuse neither starts nor finishes with a file of another size; cryptsetup
        # grows one off the 4096 grid to it (docs/reencryption.md, "Where we differ")
        assert devices["cryptfuse"].stat().st_size == size, case
        started = devices["cryptsetup"].stat().st_size
        # each finishes the other's start
        for who, img in devices.items():
            at = ["--header", str(headers[who])] if headers else []
            if who == "cryptsetup":
                proc = cli(
                    "reencrypt", "--resume-only", "-q", "--key-file", str(key), *at, str(img)
                )
                assert proc.returncode == 0, (case, proc.stderr)
            else:
                run("cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
                    "--key-file", str(key), *at, str(img))  # fmt: skip
        assert devices["cryptsetup"].stat().st_size == started, case
        if kind == "decrypt":
            plain = [devices[w].read_bytes()[: size - 16 * MiB] for w in devices]
            assert plain[0] == plain[1], case
        else:
            views = [read_with(devices[w], headers.get(w)) for w in devices]
            usable = min(len(v) for v in views)
            if kind == "encrypt" and "--reduce-device-size" in opts:
                # the volume's last half-reduction is given up (the moved chunk's copy)
                usable -= int(opts[opts.index("--reduce-device-size") + 1][:-1]) * MiB // 2
            assert views[0][:usable] == views[1][:usable] == before[:usable], case


def test_start_takes_the_first_free_digest_id_like_cryptsetup(tmp_path: Path) -> None:
    """With a gap among the digest ids (two unbound keyslots added, the first killed:
    digests 0 and 2), the new keyslot's digest takes the free id 1 and the reencrypt
    keyslot's digest 3, as in cryptsetup (``LUKS2_digest_create``); cryptfuse had given
    the new keyslot the highest id + 1. Both starts dump the same and each tool
    finishes the other's."""
    keys = []
    for i in range(3):
        keys.append(tmp_path / f"k{i}")
        keys[-1].write_bytes(PASS + b"%d" % i if i else PASS)  # read_with opens with PASS
    seed_img = tmp_path / "seed.img"
    seed_img.write_bytes(os.urandom(20 * MiB))
    cs = ["cryptsetup", "-q", *FAST_KDF]
    run(*cs[:1], "luksFormat", *cs[1:], "--type", "luks2", "--key-file", str(keys[0]),
        str(seed_img))  # fmt: skip
    for k in keys[1:]:
        run(*cs[:1], "luksAddKey", *cs[1:], "--unbound", "--key-size", "256", str(seed_img),
            str(k))  # fmt: skip
    run("cryptsetup", "luksKillSlot", "-q", str(seed_img), "1")
    assert sorted(_cryptsetup_json(seed_img)["digests"]) == ["0", "2"]
    before = read_with(seed_img, None)
    devices = {who: tmp_path / f"{who}.img" for who in ("cryptfuse", "cryptsetup")}
    for path in devices.values():
        shutil.copyfile(seed_img, path)
    opts = ["-q", *FAST_KDF, "--key-file", str(keys[0]), "--key-slot", "0"]
    proc = cli("reencrypt", "--init-only", *opts, str(devices["cryptfuse"]))
    assert proc.returncode == 0, proc.stderr
    run("cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", *opts,
        str(devices["cryptsetup"]))  # fmt: skip
    dumps = [_init_dump(path).replace(who, "WHO") for who, path in devices.items()]
    assert dumps[0] == dumps[1]
    digests = _cryptsetup_json(devices["cryptfuse"])["digests"]
    assert digests["1"]["keyslots"] == ["1"] and digests["1"]["segments"] == ["2"]
    assert digests["3"]["keyslots"] == ["3"]  # the reencrypt keyslot's
    proc = cli("reencrypt", "--resume-only", "-q", "--key-file", str(keys[0]),
               str(devices["cryptsetup"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run("cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(keys[0]), str(devices["cryptfuse"]))  # fmt: skip
    for path in devices.values():
        assert read_with(path, None) == before
        assert sorted(_cryptsetup_json(path)["digests"]) == ["1", "2"]


@pytest.mark.parametrize("offset", ["2048", "8192", "16384"], ids=["lower", "half", "higher"])
def test_encrypt_offset_and_reduction_like_cryptsetup(tmp_path: Path, offset: str) -> None:
    """``--encrypt --reduce-device-size 8m --offset N`` as cryptsetup 2.6.1 takes it:
    the data offset is half the reduction, so a smaller --offset lowers the reduction
    to twice it (saying so on stdout), an equal one changes nothing and a larger one
    is refused. cryptfuse had ignored --offset there."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    plain = os.urandom(24 * MiB)
    results, dumps = [], []
    for who in ("cryptfuse", "cryptsetup"):
        img = tmp_path / f"{who}.img"
        img.write_bytes(plain)
        args = ["--encrypt", "--init-only", "-q", *FAST_KDF, "--reduce-device-size", "8m",
                "--offset", offset, "--key-file", str(key), str(img)]  # fmt: skip
        if who == "cryptfuse":
            done = cli("reencrypt", *args)
        else:
            done = subprocess.run(["cryptsetup", "reencrypt", "--force-offline-reencrypt", *args],
                                  capture_output=True, cwd=tmp_path)  # fmt: skip
        notes = [n for n in done.stdout.decode().splitlines() if n.startswith("Adjusting")]
        results.append((done.returncode == 0, notes))
        if done.returncode == 0:
            dumps.append(_init_dump(img).replace(who, "WHO"))
        else:
            assert img.read_bytes() == plain
    assert results[0] == results[1]
    assert results[0][0] == (offset != "16384")
    assert bool(results[0][1]) == (offset == "2048")
    assert dumps[:1] == dumps[1:]
    if dumps:
        assert f"offset: {int(offset) * 512} [bytes]" in dumps[0]


@pytest.mark.parametrize(
    "kind",
    [[], ["--resilience", "journal"], ["--resilience", "none"], ["--reduce-device-size", "1m"],
     ["--decrypt", "--header", "H"], ["--encrypt", "--header", "H"],
     ["--encrypt", "--reduce-device-size", "2m"]],
    ids=["checksum", "journal", "none", "datashift", "decrypt", "encrypt", "encrypt-datashift"],
)  # fmt: skip
def test_misaligned_hotzone_is_refused_before_anything_is_written(
    tmp_path: Path, kind: list[str]
) -> None:
    """``--hotzone-size`` off the zone alignment (here the file system's 4096-byte
    block) is refused at a start with cryptsetup's message, the device untouched and
    no header file made; cryptsetup 2.6.1 marks its header first (or exports it) and
    leaves it so. Found by a sweep of odd option values. An aligned size starts."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    img = tmp_path / "c.img"
    img.write_bytes(os.urandom(20 * MiB))
    if "--encrypt" not in kind:
        run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--sector-size",
            "512", "--key-file", str(key), str(img))  # fmt: skip
    before = img.read_bytes()
    hdr = tmp_path / "h.hdr"
    args = [str(hdr) if a == "H" else a for a in kind]
    proc = cli("reencrypt", "-q", *FAST_KDF, "--key-file", str(key), *args, "--hotzone-size",
               "6k", str(img))  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.decode().strip() == (
        "cryptfuse: Hotzone size must be multiple of calculated zone alignment (4096 bytes)."
    )
    assert img.read_bytes() == before and not hdr.exists()
    proc = cli("reencrypt", "-q", *FAST_KDF, "--key-file", str(key), *args, "--hotzone-size",
               "8k", "--init-only", str(img))  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def _ext4_1k(path: Path, size: int) -> bytes:
    """An ext4 image with 1 KiB blocks, *size* bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-b", "1024", str(path))
    return path.read_bytes()


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 not installed")
def test_larger_sector_size_over_smaller_file_system_blocks_is_refused(tmp_path: Path) -> None:
    """``reencrypt --sector-size`` above the block size of the file system in the
    volume is refused before anything is written (cryptsetup 2.6.1 checks the active
    device's superblock: dm-crypt's larger sectors would make such a file system
    unmountable); ``--force-offline-reencrypt`` skips the check, as in cryptsetup, and
    a sector size the blocks allow passes it. ``--encrypt --sector-size`` checks the
    plaintext device, refused or not as by cryptsetup."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    size = 20 * MiB
    fs = _ext4_1k(tmp_path / "fs.img", size - 16 * MiB)
    img = tmp_path / "c.img"
    with open(img, "wb") as f:
        f.truncate(size)
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--sector-size", "512",
        "--key-file", str(key), str(img))  # fmt: skip
    with open_volume(str(img), OpenOptions(), Secret(PASS, False)) as v:
        v.write(0, fs)
    before = img.read_bytes()
    proc = cli("reencrypt", "-q", *FAST_KDF, "--key-file", str(key), "--sector-size", "4096",
               str(img))  # fmt: skip
    assert proc.returncode == 1  # (cryptsetup: -EINVAL)
    assert proc.stderr.decode().strip().splitlines() == [
        f"cryptfuse: Requested --sector-size 4096 is incompatible with ext4 superblock "
        f"(block size: 1024 bytes) detected on device {img}."
    ]
    assert img.read_bytes() == before
    for allowed in (
        ["--sector-size", "1024"],
        ["--sector-size", "4096", "--force-offline-reencrypt"],
    ):
        copy = tmp_path / "copy.img"
        copy.write_bytes(before)
        proc = cli("reencrypt", "-q", *FAST_KDF, "--key-file", str(key), *allowed, str(copy))
        assert proc.returncode == 0, (allowed, proc.stderr)
        assert read_with(copy, None)[: len(fs)] == fs
    # --encrypt: the plaintext device itself, compared with cryptsetup
    for sector in ("1024", "4096"):
        codes = []
        for who in ("cryptfuse", "cryptsetup"):
            dev, hdr = tmp_path / f"{who}{sector}.img", tmp_path / f"{who}{sector}.hdr"
            dev.write_bytes(fs)
            args = ["--encrypt", "--type", "luks2", "-q", *FAST_KDF, "--sector-size", sector,
                    "--header", str(hdr), "--key-file", str(key), str(dev)]  # fmt: skip
            if who == "cryptfuse":
                codes.append(cli("reencrypt", *args).returncode)
            else:
                codes.append(subprocess.run(
                    ["cryptsetup", "reencrypt", "--force-offline-reencrypt", *args],
                    capture_output=True, cwd=tmp_path,
                ).returncode)  # fmt: skip
            if codes[-1]:
                assert dev.read_bytes() == fs, who
        assert (codes[0] == 0) == (codes[1] == 0) == (sector == "1024"), (sector, codes)


@pytest.mark.parametrize("tail", [3072, 4096 + 512])
def test_decrypt_of_data_off_the_block_grid_like_cryptsetup(tmp_path: Path, tail: int) -> None:
    """A decryption that exports the header, of a data area that is smaller than the
    moved chunk and off the 4096 grid: cryptsetup moves all of it as the first chunk,
    and so does cryptfuse (it had cut the chunk to the grid and left the tail a segment
    of its own); each finishes the other's start to the same plaintext, and neither
    file changes size under cryptfuse."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    seed_img = tmp_path / "seed.img"
    seed_img.write_bytes(os.urandom(24 * MiB + tail))
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--key-file", str(key),
        str(seed_img))  # fmt: skip
    plain = read_with(seed_img, None)
    assert len(plain) == 8 * MiB + tail
    imgs = {who: tmp_path / f"{who}.img" for who in ("cryptfuse", "cryptsetup")}
    hdrs = {who: tmp_path / f"{who}.hdr" for who in imgs}
    for who, img in imgs.items():
        shutil.copyfile(seed_img, img)
        args = ["--decrypt", "--header", str(hdrs[who]), "-q", "--key-file", str(key), str(img)]
        if who == "cryptfuse":
            proc = cli("reencrypt", "--init-only", *args)
            assert proc.returncode == 0, proc.stderr
        else:
            run("cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", *args)
    dumps = [_init_dump(hdrs[w], imgs[w]).replace(w, "WHO") for w in imgs]
    assert dumps[0] == dumps[1]
    assert f"length: {8 * MiB + tail} [bytes]" in dumps[0]  # one chunk: all the data
    assert imgs["cryptfuse"].stat().st_size == 24 * MiB + tail
    proc = cli("reencrypt", "--resume-only", "-q", "--key-file", str(key), "--header",
               str(hdrs["cryptsetup"]), str(imgs["cryptsetup"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    at = ["--header", str(hdrs["cryptfuse"]), str(imgs["cryptfuse"])]
    run("cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(key), *at)  # fmt: skip
    assert imgs["cryptsetup"].stat().st_size == 24 * MiB + tail
    for img in imgs.values():
        assert img.read_bytes()[: len(plain)] == plain


@pytest.mark.parametrize("room", ["none-for-the-keyslot", "keyslot-only"])
def test_start_that_outgrows_the_json_area_leaves_the_header(tmp_path: Path, room: str) -> None:
    """A start whose metadata does not fit the JSON area is refused and leaves the
    header as it was: refused before any key material is written when even the new
    keyslot does not fit, rolled back (keyslot removed, its area wiped) when only the
    reencryption metadata does not (as cryptsetup destroys the keyslot it made)."""
    from cryptfuse.formats.luks2_write import Luks2Writer, serialize_json

    img, key, data = make(tmp_path, data_mib=2)
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--key-file", str(key),
        "--luks2-metadata-size", "16k", "--offset", "4096", str(img))  # fmt: skip
    data = os.urandom(MiB)
    with open_volume(str(img), OpenOptions(), Secret(PASS, False)) as v:
        v.write(0, data)
    # how much a start adds, measured on a copy
    probe = tmp_path / "probe.img"
    shutil.copyfile(img, probe)
    size_before = len(json.dumps(header_json(img), separators=(",", ":")))
    reenc.initialize(str(probe), None, PASS, reenc.ReencryptOptions(), KDF)
    grown = len(json.dumps(header_json(probe), separators=(",", ":"))) - size_before
    room_left = 200 if room == "none-for-the-keyslot" else grown - 200
    fd = os.open(img, os.O_RDWR)
    try:
        w = Luks2Writer.from_header(fd, read_luks2_header(fd, str(img)))
        json_size = w.hdr_size - 4096
        w.obj["tokens"]["0"] = {"type": "pad", "keyslots": [], "p": ""}
        pad = json_size - 1 - len(json.dumps(w.obj, separators=(",", ":"))) - room_left
        w.obj["tokens"]["0"]["p"] = "x" * pad
        serialize_json(w.obj, json_size)
        w.commit()
    finally:
        os.close(fd)
    before_json, before = header_json(img), img.read_bytes()
    with pytest.raises(CryptfuseError):
        reenc.initialize(str(img), None, PASS, reenc.ReencryptOptions(), KDF)
    assert header_json(img) == before_json
    if room == "none-for-the-keyslot":
        assert img.read_bytes() == before  # nothing written at all
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(img))
    assert read_all(img)[: len(data)] != b"" and not reenc.in_reencryption(header_json(img))


def _started(tmp: Path, state: str) -> tuple[Path, Path, Path | None]:
    """A small device in a reencryption cryptsetup started (*state*)."""
    img, key, hdr = tmp / "c.img", tmp / "pass", None
    key.write_bytes(PASS)
    keyfile = ["--key-file", str(key)]
    start = ["cryptsetup", "reencrypt", "--init-only", "--force-offline-reencrypt", "-q", *keyfile]
    if state == "encrypt":
        img.write_bytes(os.urandom(12 * MiB))
        run(*start, "--encrypt", *FAST_KDF, "--reduce-device-size", "4m", str(img))
        return img, key, None
    with open(img, "wb") as f:
        f.truncate(20 * MiB)
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, *keyfile, str(img))
    if state == "decrypt":
        hdr = tmp / "c.hdr"
        run(*start, "--decrypt", "--header", str(hdr), str(img))
    else:
        run(*start, *(["--reduce-device-size", "1m"] if state == "shift" else []), str(img))
    return img, key, hdr


@pytest.mark.parametrize("state", ["reencrypt", "shift", "encrypt", "decrypt"])
def test_resume_options_checked_as_cryptsetup(tmp_path: Path, state: str) -> None:
    """Options given to a reencryption in progress: ``--encrypt``/``--decrypt`` that
    do not match its mode, and a ``--resilience`` that cannot apply (a datashift in
    progress; ``none`` for a decryption moving the data), are refused by both tools,
    the rest resume in both."""
    img, key, hdr = _started(tmp_path, state)
    for options in (["--encrypt"], ["--decrypt"], *(["--resilience", r] for r in
                    ("checksum", "journal", "none"))):  # fmt: skip
        results = []
        for tool in ("cryptfuse", "cryptsetup"):
            work = tmp_path / f"{tool}-{'-'.join(options)}"
            work.mkdir()
            copy, header = work / "c.img", (work / "c.hdr" if hdr else None)
            shutil.copyfile(img, copy)
            if hdr and header:
                shutil.copyfile(hdr, header)
            args = [*options, "-q", "--key-file", str(key), "--resume-only"]
            args += ["--header", str(header)] if header else []
            if tool == "cryptfuse":
                proc = cli("reencrypt", *args, str(copy))
                assert proc.stderr.count(b"\n") <= 1 and b"Traceback" not in proc.stderr
                results.append(proc.returncode == 0)
            else:
                done = subprocess.run(
                    ["cryptsetup", "reencrypt", "--force-offline-reencrypt", *args, str(copy)],
                    capture_output=True,
                )
                results.append(done.returncode == 0)
        assert results[0] == results[1], (state, options, results)


@pytest.mark.parametrize(
    "state,resilience,hash_name",
    [
        ("reencrypt", "journal", None),
        ("reencrypt", "none", None),
        ("reencrypt", "checksum", "sha1"),
        ("decrypt", "journal", None),
        ("decrypt", "checksum", "sha512"),
    ],
)
def test_resilience_switched_on_resume(
    tmp_path: Path, state: str, resilience: str, hash_name: str | None
) -> None:
    """``--resume-only --resilience R`` switches a reencryption in progress to R, as
    cryptsetup does: the reencrypt keyslot's area and digest are rewritten, cryptsetup
    accepts the result (its digest check) and finishes it to the right data, and so
    does cryptfuse's own command line."""
    img, key, hdr = _started(tmp_path, state)
    plain = read_with(img, hdr)
    at = ["--header", str(hdr)] if hdr else []
    copy = tmp_path / "copy.img"
    shutil.copyfile(img, copy)
    copy_hdr = None
    if hdr:
        copy_hdr = tmp_path / "copy.hdr"
        shutil.copyfile(hdr, copy_hdr)
    assert reenc.switch_resilience(str(img), str(hdr) if hdr else None, PASS, resilience, hash_name)
    area = next(
        s["area"] for s in header_json(hdr or img)["keyslots"].values() if s["type"] == "reencrypt"
    )
    assert area["type"] == (f"datashift-{resilience}" if state == "decrypt" else resilience)
    if resilience == "checksum":
        assert area["hash"] == hash_name and area["sector_size"] % 4096 == 0
    dump = run("cryptsetup", "luksDump", *at, str(img))
    assert f"Resilience: {area['type']}" in dump
    run("cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
        "--key-file", str(key), *at, str(img))  # fmt: skip
    copy_at = ["--header", str(copy_hdr)] if copy_hdr else []
    proc = cli("reencrypt", "--resume-only", "-q", "--key-file", str(key), "--resilience",
               resilience, *copy_at, str(copy))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for done in (img, copy):
        if state == "decrypt":
            assert done.read_bytes()[: len(plain)] == plain
        else:
            assert read_all(done) == plain


def test_shift_into_a_detached_headers_keyslots_area_refused(tmp_path: Path) -> None:
    """A key change with ``--reduce-device-size`` under a detached header whose
    keyslots area reaches past the new data offset has no valid LUKS2 form: refused
    before writing (cryptsetup 2.6.1 starts it and then fails every hot-zone commit)."""
    img, hdr, key = tmp_path / "c.img", tmp_path / "c.hdr", tmp_path / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    run("cryptsetup", "luksFormat", "--type", "luks2", "-q", *FAST_KDF, "--key-file", str(key),
        "--header", str(hdr), str(img))  # fmt: skip
    before = hdr.read_bytes(), img.read_bytes()
    proc = cli("reencrypt", "-q", "--key-file", str(key), "--header", str(hdr),
               "--reduce-device-size", "1m", str(img))  # fmt: skip
    assert proc.returncode != 0 and b"keyslots area" in proc.stderr
    assert (hdr.read_bytes(), img.read_bytes()) == before


def test_volume_key_file_is_the_new_key(tmp_path: Path) -> None:
    """``--volume-key-file`` gives a new reencryption's new volume key, as cryptsetup
    2.6.1 takes it: for a key change and for ``--encrypt``, the finished container's
    key (``luksDump --dump-volume-key``) is the file's, for cryptfuse and cryptsetup
    alike; a short file is refused before anything is written, and so is the option
    where there is no new key (a resume, a decryption)."""
    key = tmp_path / "pass"
    key.write_bytes(PASS)
    new_key = tmp_path / "new.key"
    new_key.write_bytes(os.urandom(32))
    opts = ["--volume-key-file", str(new_key), "--key-size", "256", "-q", "--key-file", str(key)]

    def dumped_key(img: Path, *at: str) -> bytes:
        out = tmp_path / f"{img.name}.dumped"
        run("cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", str(out),
            "--key-file", str(key), *at, str(img))  # fmt: skip
        return out.read_bytes()

    img, _, data = make(tmp_path, data_mib=2)
    theirs = tmp_path / "theirs.img"
    shutil.copyfile(img, theirs)
    assert cli("reencrypt", "--cipher", "aes-cbc-essiv:sha256", *opts, str(img)).returncode == 0
    run("cryptsetup", "reencrypt", "--force-offline-reencrypt", "--cipher",
        "aes-cbc-essiv:sha256", *opts, str(theirs))  # fmt: skip
    assert dumped_key(img) == dumped_key(theirs) == new_key.read_bytes()
    assert read_with(img, None)[: len(data)] == data

    plain = tmp_path / "plain.img"
    plain.write_bytes(os.urandom(2 * MiB))
    before = plain.read_bytes()
    hdr = tmp_path / "plain.hdr"
    proc = cli("reencrypt", "--encrypt", "--header", str(hdr), *FAST_KDF, *opts, str(plain))
    assert proc.returncode == 0, proc.stderr
    assert dumped_key(plain, "--header", str(hdr)) == new_key.read_bytes()
    assert read_with(plain, hdr) == before

    short = tmp_path / "short.key"
    short.write_bytes(new_key.read_bytes()[:31])
    unchanged = img.read_bytes()
    proc = cli("reencrypt", "--volume-key-file", str(short), "--key-size", "256", "-q",
               "--key-file", str(key), str(img))  # fmt: skip
    assert proc.returncode == 1 and b"Cannot read 32 bytes" in proc.stderr
    assert img.read_bytes() == unchanged
    exported = tmp_path / "exported.hdr"
    proc = cli("reencrypt", "--decrypt", "--header", str(exported), *opts, str(img))
    assert proc.returncode == 1 and b"new volume key of a reencryption to start" in proc.stderr
    assert img.read_bytes() == unchanged and not exported.exists()
