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
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash_safety import run_killed
from test_interop_luks import independent_decrypt, run

from cryptfuse.errors import CryptfuseError, WrongPassphraseError
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
    tmp: Path, data_mib: int = 2, sector_size: int = 4096, metadata: bool = False
) -> tuple[Path, Path, bytes]:
    """A LUKS2 container made by cryptsetup (1 MiB data offset) holding random data."""
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
        str(img),
    )
    data = os.urandom(data_mib * MiB)
    with open_volume(str(img), OpenOptions(), Secret(PASS, False)) as v:
        v.write(0, data)
    return img, key, data


def cryptsetup_checks(img: Path, key: Path, data: bytes) -> None:
    """cryptsetup sees a finished container whose dumped key decrypts *data*."""
    dump = run("cryptsetup", "luksDump", str(img))
    assert "online-reencrypt" not in dump and "reencrypt" not in dump.split("Tokens:")[0]
    run("cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(img))
    out = run("cryptsetup", "luksDump", "--dump-volume-key", "-q", "--key-file", str(key), str(img))
    hexkey = ""
    grab = False
    for line in out.splitlines():
        if line.startswith("MK dump:"):
            grab, line = True, line.split(":", 1)[1]
        elif grab and not line.startswith(("\t", " ")):
            break
        if grab:
            hexkey += line.replace(" ", "").replace("\t", "")
    seg = header_json(img)["segments"]["0"]
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
    run(
        "cryptsetup",
        "reencrypt",
        "--resume-only",
        "--force-offline-reencrypt",
        "-q",
        "--key-file",
        str(key),
        str(img),
    )
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
    with pytest.raises(WrongPassphraseError):
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
    reenc.recover(str(other), None, pw)
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


@pytest.mark.parametrize("resilience", ["checksum", "journal"])
def test_killed_at_every_write(tmp_path: Path, resilience: str) -> None:
    base, key, data = make(tmp_path, data_mib=1)
    options = reenc.ReencryptOptions(resilience=resilience, key_size=256, sector_size=512)

    def action(img: Path) -> None:
        reenc.initialize(str(img), None, PASS, options, KdfParams("pbkdf2"))
        assert reenc.run(str(img), None, PASS, max_hotzone=256 * 1024).finished

    work = tmp_path / "w.img"
    shutil.copy(base, work)
    events = run_killed(lambda: action(work), None, False)
    assert read_all(work) == data
    assert len(events) > 20
    for n in range(1, len(events) + 1):
        shutil.copy(base, work)
        assert run_killed(lambda: action(work), n, torn=n % 2 == 0) == "killed"
        snapshot = work.read_bytes()
        assert read_all(work) == data, f"killed at event {n}"
        assert work.read_bytes() == snapshot  # read-only: nothing written
        if not reenc.in_reencryption(header_json(work)):
            continue  # killed before the reencryption started or after it ended
        if n % 3 == 0:  # cryptsetup finishes it (repair first where a hot zone was cut)
            if any(
                "in-reencryption" in s.get("flags", [])
                for s in header_json(work)["segments"].values()
            ):
                run("cryptsetup", "repair", "-q", "--key-file", str(key), str(work))
            if reenc.in_reencryption(header_json(work)):  # repair of the last hot zone finishes
                run(
                    "cryptsetup",
                    "reencrypt",
                    "--resume-only",
                    "--force-offline-reencrypt",
                    "-q",
                    "--key-file",
                    str(key),
                    str(work),
                )
        else:
            assert reenc.run(str(work), None, PASS).finished
        assert read_all(work) == data, f"resumed after event {n}"
