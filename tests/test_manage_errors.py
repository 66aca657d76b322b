"""Bad input never modifies a container: one clear line, the right exit code, same bytes.

Unknown slot, wrong passphrase, full keyslots, unsupported cipher, read-only
file, non-LUKS file, a mounted (locked) container, unknown LUKS2
requirements, removing the last keyslot without --force, and format over an
existing LUKS header without --force.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfuse.cli import main
from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import manage
from cryptfuse.formats.luks2 import read_luks2_header
from cryptfuse.formats.luks2_write import Luks2Writer
from cryptfuse.formats.manage import FormatOptions, KdfOptions

PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
CHEAP = KdfOptions(pbkdf="pbkdf2", force_iterations=1000)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["luks1", "luks2"])
def template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp(request.param) / "t.img"
    opts = FormatOptions(type=request.param, kdf=CHEAP, size=3 << 20, keyslots_size=None)
    if request.param == "luks2":
        opts = FormatOptions(type="luks2", kdf=CHEAP, size=2 << 20, keyslots_size=240 * 4096)
    manage.format_container(str(img), b"good", opts, confirm=lambda _: True)
    return img


@pytest.fixture
def img(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "c.img"
    shutil.copyfile(template, path)
    return path


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, value in {"good": b"good", "bad": b"wrong", "new": b"new"}.items():
        (tmp_path / name).write_bytes(value)
        out[name] = str(tmp_path / name)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_wrong_passphrase(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(img)
    for argv in (
        ["add-key", *PBKDF2, str(img), keys["new"], "-d", keys["bad"]],
        ["change-key", *PBKDF2, str(img), keys["new"], "-d", keys["bad"]],
        ["remove-key", "-q", str(img), "-d", keys["bad"]],
        ["kill-slot", "--force", str(img), "0", "-d", keys["bad"]],
    ):
        code, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        # (kill-slot of the last slot first prints cryptsetup's warning)
        assert err.strip().splitlines()[-1] == "cryptfuse: No key available with this passphrase."
        assert digest(img) == before


def test_unknown_and_inactive_slots(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(img)
    code, err = run(capsys, "kill-slot", "-q", str(img), "40")
    assert code == 1 and "Key slot 40 is invalid" in err
    code, err = run(capsys, "kill-slot", "-q", str(img), "3")
    assert code == 1 and "Keyslot 3 is not active." in err
    code, err = run(
        capsys, "add-key", *PBKDF2, "-S", "0", str(img), keys["new"], "-d", keys["good"]
    )
    assert code == 1 and "Key slot 0 is full" in err
    code, err = run(
        capsys, "add-key", *PBKDF2, "-S", "99", str(img), keys["new"], "-d", keys["good"]
    )
    assert code == 1 and "invalid" in err
    assert digest(img) == before


def test_full_keyslots(img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    luks1 = img.read_bytes()[6:8] == b"\0\1"
    code = 0
    added = 0
    while code == 0 and added < 40:
        code, err = run(capsys, "add-key", *PBKDF2, str(img), keys["new"], "-d", keys["good"])
        added += code == 0
    if luks1:
        assert added == 7 and "All key slots full." in err
    else:  # the small keyslots area of the template holds three areas
        assert "No space for new keyslot" in err
    before = digest(img)
    code, err = run(capsys, "add-key", *PBKDF2, str(img), keys["new"], "-d", keys["good"])
    assert code == 1 and digest(img) == before
    if luks1:  # change-key cannot move to a free slot: refused rather than done unsafely
        code, err = run(capsys, "change-key", *PBKDF2, str(img), keys["bad"], "-d", keys["new"])
        assert code == 1 and "All key slots full" in err and digest(img) == before


def test_last_keyslot_needs_force(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(img)
    code, err = run(capsys, "remove-key", str(img), "-d", keys["good"])
    assert code == 1 and "NOT wiped" in err and digest(img) == before
    code, err = run(capsys, "kill-slot", str(img), "0", "-d", keys["good"])
    assert code == 1 and digest(img) == before
    code, err = run(capsys, "remove-key", "-q", str(img), "-d", keys["good"])
    assert code == 0 and "last keyslot" in err
    assert digest(img) != before


def test_non_luks_and_missing(
    tmp_path: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(os.urandom(1 << 20))
    before = digest(plain)
    for argv in (
        ["add-key", str(plain), keys["new"], "-d", keys["good"]],
        ["remove-key", "-q", str(plain), "-d", keys["good"]],
        ["kill-slot", "-q", str(plain), "0"],
        ["dump", str(plain)],
        ["uuid", str(plain)],
    ):
        code, err = run(capsys, *argv)
        assert code == 1 and "is not a valid LUKS device" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    assert digest(plain) == before
    assert main(["is-luks", str(plain)]) == 1
    code, err = run(capsys, "add-key", str(tmp_path / "missing"), keys["new"], "-d", keys["good"])
    assert code == 4 and "does not exist" in err


def test_is_luks(img: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind = "luks1" if img.read_bytes()[6:8] == b"\0\1" else "luks2"
    other = "luks2" if kind == "luks1" else "luks1"
    assert main(["is-luks", str(img)]) == 0
    assert main(["is-luks", "--type", kind, str(img)]) == 0
    assert main(["is-luks", "--type", other, str(img)]) == 1
    assert capsys.readouterr() == ("", "")
    # cryptsetup isLuks: a device that is not there is an error (4), not "no"
    code, err = run(capsys, "is-luks", str(img.parent / "missing"))
    assert code == 4 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_unsupported_cipher_and_options(
    tmp_path: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "f.img"
    target.write_bytes(bytes(4 << 20))
    before = digest(target)
    for argv, words in (
        (["--cipher", "cast6-xts-plain64"], "cast6"),
        (["--cipher", "serpent-xts-plain64", "--key-size", "1024"], "key size"),
        (["--cipher", "aes-xts-plain64", "--key-size", "128"], "key"),
        (["--hash", "nohash"], "nohash"),
        (["--type", "luks1", "--pbkdf", "argon2id"], "LUKS1"),
        (["--sector-size", "1000"], "sector size"),
        (["--uuid", "not-a-uuid"], "UUID"),
    ):
        code, err = run(capsys, "format", "-q", *PBKDF2[2:], *argv, "-d", keys["good"], str(target))
        assert code == 1, (argv, err)
        assert words.lower() in err.lower(), (argv, err)
        assert digest(target) == before


def test_numbers_out_of_range(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Numbers no C type of cryptsetup holds are refused as arguments (cryptsetup:
    "invalid numeric value"), not carried into an overflow, a huge buffer or a PBKDF2
    that never ends; a huge --keyfile-size reads the key file in pieces and finds it
    short. Found by a sweep of odd option values over every command (they had ended
    in internal errors: OverflowError, MemoryError). Format over a LUKS header in
    batch mode fails with one line: the superblock warning is not printed (cryptsetup
    prints it only when it asks)."""
    before = digest(img)
    huge = "99999999999999999999"
    for argv, words in (
        (["add-key", *PBKDF2, "-d", keys["good"], "--keyfile-size", huge, str(img), keys["new"]],
         "too large"),
        (["add-key", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", str(1 << 32),
          "-d", keys["good"], str(img), keys["new"]], "too large"),
        (["add-key", *PBKDF2, "-d", keys["good"], "--keyfile-size", str(1 << 62), str(img),
          keys["new"]], "too short"),
        (["format", "-q", *PBKDF2, "--luks2-keyslots-size", "1k", "-d", keys["new"], str(img)],
         "keyslots size"),
        (["format", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "0",
          "-d", keys["new"], str(img)], "too low"),
        (["format", "-q", *PBKDF2, "--luks2-metadata-size", huge + "k", "-d", keys["new"],
          str(img)], "too large"),
    ):  # fmt: skip
        code, err = run(capsys, *argv)
        assert code == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 and words in err, (argv, err)
        assert "internal error" not in err
        assert digest(img) == before


def test_format_refuses_existing_luks(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(img)
    code, err = run(capsys, "format", *PBKDF2, "-d", keys["new"], str(img))
    assert code == 1 and "already contains a LUKS header" in err
    assert digest(img) == before
    kind = "luks1" if img.read_bytes()[6:8] == b"\0\1" else "luks2"
    small = ["--luks2-keyslots-size", "960K"] if kind == "luks2" else []
    argv = ["format", *PBKDF2, "--type", kind, *small, "--force", "-d", keys["new"], str(img)]
    assert main(argv) == 0
    assert main(["dump", str(img)]) == 0


def test_locked_container_is_busy(
    img: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A writable mount holds LOCK_EX on the container: metadata changes are refused."""
    before = digest(img)
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, err = run(capsys, "add-key", *PBKDF2, str(img), keys["new"], "-d", keys["good"])
        assert code == 5 and "in use" in err
        code, err = run(capsys, "uuid", "--uuid", "12345678-1234-1234-1234-123456789abc", str(img))
        assert code == 5
        assert main(["dump", str(img)]) == 0  # reading works on a mounted container, as luksDump
    finally:
        os.close(fd)
    assert digest(img) == before


def test_unknown_luks2_requirement_refused(
    tmp_path: Path, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "r.img"
    opts = FormatOptions(type="luks2", kdf=CHEAP, size=2 << 20, keyslots_size=240 * 4096)
    manage.format_container(str(img), b"good", opts, confirm=lambda _: True)
    fd = os.open(img, os.O_RDWR)
    try:
        hdr = read_luks2_header(fd, str(img))
        writer = Luks2Writer(
            fd,
            json.loads(json.dumps(hdr.json)),
            hdr_size=hdr.binary.hdr_size,
            seqid=hdr.binary.seqid,
            label="",
            subsystem="",
            uuid=hdr.uuid,
            salts=(os.urandom(64), os.urandom(64)),
        )
        writer.obj["config"]["requirements"] = {"mandatory": ["future-feature"]}
        writer.commit()
    finally:
        os.close(fd)
    before = digest(img)
    for argv in (
        ["add-key", *PBKDF2, str(img), keys["new"], "-d", keys["good"]],
        ["kill-slot", "-q", str(img), "0"],
        ["uuid", "--uuid", "12345678-1234-1234-1234-123456789abc", str(img)],
    ):
        code, err = run(capsys, *argv)
        assert code == 1 and "future-feature" in err, (argv, err)
    assert digest(img) == before


def test_persistent_flags_refused_as_cryptsetup_refuses(
    img: Path, tmp_path: Path, keys: dict[str, str]
) -> None:
    """``--persistent``'s header write (manage.set_persistent_flags) refuses LUKS1 and a
    LUKS2 header in reencryption (made by cryptsetup) with cryptsetup's messages, and
    writes nothing."""
    luks2 = img.read_bytes()[6:8] == b"\0\2"
    if not luks2:
        before = digest(img)
        with pytest.raises(CryptfuseError, match=r"^This operation is supported only for LUKS2"):
            manage.set_persistent_flags(str(img), ["allow-discards"])
        assert digest(img) == before
        return
    if shutil.which("cryptsetup") is None:
        pytest.skip("no cryptsetup")
    subprocess.run(
        ["cryptsetup", "reencrypt", "--init-only", "-q", *PBKDF2, "-d", keys["good"], str(img)],
        check=True,
        capture_output=True,
    )
    before = digest(img)
    with pytest.raises(CryptfuseError) as caught:
        manage.set_persistent_flags(str(img), ["allow-discards"])
    assert str(caught.value) == (
        "Operation incompatible with device marked for LUKS2 reencryption. Aborting."
    )
    assert digest(img) == before


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can read (tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cryptfuse-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_read_only_container(template: Path, shared_dir: Path) -> None:
    """Root ignores file modes, so the command runs as 'nobody' in a child."""
    img = shared_dir / "ro.img"
    shutil.copyfile(template, img)
    img.chmod(0o444)
    key, new = shared_dir / "k", shared_dir / "n"
    key.write_bytes(b"good")
    new.write_bytes(b"new")
    key.chmod(0o444)
    new.chmod(0o444)
    before = digest(img)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            sys.stderr = open(write_end, "w")  # noqa: SIM115 - the child exits below
            code = main(["add-key", *PBKDF2, str(img), str(new), "-d", str(key)])
        except BaseException:
            code = 99
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    err = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 4, err
    assert "permission denied" in err and len(err.strip().splitlines()) == 1
    assert digest(img) == before
