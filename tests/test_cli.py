"""The command line: every user error is one stderr line, a non-zero exit code, no
traceback, and leaves the container byte-for-byte unchanged."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryptfuse import cli, cli_input
from cryptfuse.errors import KeyFileError

MiB = 1 << 20
PLAIN = ["--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-h", "sha256"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


@pytest.fixture
def run(cli_env: dict[str, str], repo: Path) -> Iterator[Callable[..., Result]]:
    """Run ``python -m cryptfuse``; unmounts anything a test mounted by mistake."""
    mounted: list[Path] = []

    def _run(
        *args: object, input: bytes = b"", preexec_fn: Callable[[], None] | None = None
    ) -> Result:
        argv = [str(a) for a in args]
        if len(argv) >= 2:
            mounted.append(Path(argv[-1]))
        proc = subprocess.run(
            [sys.executable, "-m", "cryptfuse", *argv],
            input=input,
            capture_output=True,
            env=cli_env,
            cwd=repo,
            timeout=60,
            preexec_fn=preexec_fn,
        )
        return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    yield _run
    for path in mounted:
        if os.path.ismount(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def plain_img(tmp_path: Path) -> Path:
    path = tmp_path / "plain.img"
    path.write_bytes(os.urandom(MiB))
    return path


def assert_one_line_error(result: Result, code: int | None = None, contains: str = "") -> None:
    assert result.code != 0, result
    if code is not None:
        assert result.code == code, result
    assert "Traceback" not in result.stderr
    assert len(result.lines) == 1, result.stderr
    assert result.lines[0].startswith("cryptfuse: "), result.stderr
    assert contains.lower() in result.lines[0].lower(), result.stderr


def _drop_dac_capabilities() -> None:
    """Make root subject to file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# -- errors before anything is opened ----------------------------------------------------------


def test_nonexistent_container(run: Callable[..., Result], tmp_path: Path, mnt: Path) -> None:
    result = run(*PLAIN, tmp_path / "missing.img", mnt, input=b"pw\n")
    assert_one_line_error(result, 4, "does not exist")


def test_unreadable_container(run: Callable[..., Result], plain_img: Path, mnt: Path) -> None:
    before = sha256(plain_img)
    plain_img.chmod(0)
    try:
        result = run(
            *PLAIN,
            plain_img,
            mnt,
            input=b"pw\n",
            preexec_fn=_drop_dac_capabilities if os.geteuid() == 0 else None,
        )
    finally:
        plain_img.chmod(0o600)
    assert_one_line_error(result, 4, "permission denied")
    assert sha256(plain_img) == before


def test_container_is_a_directory(run: Callable[..., Result], tmp_path: Path, mnt: Path) -> None:
    result = run(*PLAIN, tmp_path, mnt, input=b"pw\n")
    assert_one_line_error(result, 4, "directory")


def test_missing_mountpoint(run: Callable[..., Result], plain_img: Path, tmp_path: Path) -> None:
    before = sha256(plain_img)
    result = run(*PLAIN, plain_img, tmp_path / "nowhere", input=b"pw\n")
    assert_one_line_error(result, 1, "does not exist")
    assert sha256(plain_img) == before


def test_mountpoint_not_a_directory(
    run: Callable[..., Result], plain_img: Path, tmp_path: Path
) -> None:
    result = run(*PLAIN, plain_img, plain_img, input=b"pw\n")
    assert_one_line_error(result, 1, "not a directory")


def test_nonempty_mountpoint(run: Callable[..., Result], plain_img: Path, mnt: Path) -> None:
    before = sha256(plain_img)
    (mnt / "file").write_text("x")
    result = run(*PLAIN, plain_img, mnt, input=b"pw\n")
    assert_one_line_error(result, 1, "not empty")
    assert sha256(plain_img) == before


@pytest.mark.parametrize(
    ("name", "needle"),
    [("", "''"), ("missing/log", "no such file"), (".", "is a directory")],
)
def test_unusable_log_file(
    run: Callable[..., Result], plain_img: Path, mnt: Path, name: str, needle: str
) -> None:
    """A --log-file that cannot be opened is refused before anything is opened or
    mounted (found by a sweep of odd option values: it had been opened only once
    mounted, and the failed mount then took 10 s to tear down, saying two lines)."""
    before = sha256(plain_img)
    result = run(*PLAIN, "--log-file", name, plain_img, mnt, input=b"pw\n")
    assert_one_line_error(result, 1, "cannot open log file")
    assert needle in result.stderr.lower()
    assert not os.path.ismount(mnt)
    assert sha256(plain_img) == before


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        pytest.param(["-c", "aes-foo-plain64"], "foo", id="unknown-chain-mode"),
        pytest.param(["-c", "not a spec!"], "cipher", id="garbage"),
        pytest.param(["-c", "aes-pcbc-plain64"], "pcbc", id="unsupported-chain-mode"),
    ],
)
def test_bad_cipher_spec(
    run: Callable[..., Result], plain_img: Path, mnt: Path, options: list[str], needle: str
) -> None:
    before = sha256(plain_img)
    result = run(
        "--type", "plain", *options, "-s", "256", "-h", "sha256", plain_img, mnt, input=b"pw\n"
    )
    assert_one_line_error(result, 1, needle)
    assert sha256(plain_img) == before


@pytest.mark.parametrize("bits", ["128", "100", "0"])
def test_bad_key_size(run: Callable[..., Result], plain_img: Path, mnt: Path, bits: str) -> None:
    before = sha256(plain_img)
    result = run(
        "--type",
        "plain",
        "-c",
        "aes-xts-plain64",
        "-s",
        bits,
        "-h",
        "sha256",
        plain_img,
        mnt,
        input=b"pw\n",
    )
    assert_one_line_error(result, 1, "key size")
    assert sha256(plain_img) == before


def test_short_key_file(
    run: Callable[..., Result], plain_img: Path, mnt: Path, tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_bytes(os.urandom(40))
    before = sha256(plain_img)
    result = run("--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-d", key, plain_img, mnt)
    assert_one_line_error(result, 1, "too short")
    result = run(
        "--type",
        "plain",
        "-c",
        "aes-xts-plain64",
        "-s",
        "256",
        "-d",
        key,
        "--keyfile-offset",
        "20",
        plain_img,
        mnt,
    )
    assert_one_line_error(result, 1, "too short")
    assert sha256(plain_img) == before


def test_missing_key_file(
    run: Callable[..., Result], plain_img: Path, mnt: Path, tmp_path: Path
) -> None:
    result = run(*PLAIN, "-d", tmp_path / "nokey", plain_img, mnt)
    assert_one_line_error(result, 1, "does not exist")


def test_offset_beyond_the_end(run: Callable[..., Result], plain_img: Path, mnt: Path) -> None:
    before = sha256(plain_img)
    result = run(*PLAIN, "--offset", str(2 * MiB // 512), plain_img, mnt, input=b"pw\n")
    assert_one_line_error(result, 4, "beyond the end")
    assert sha256(plain_img) == before


def test_size_beyond_the_end(run: Callable[..., Result], plain_img: Path, mnt: Path) -> None:
    result = run(*PLAIN, "--size", str(4 * MiB // 512), plain_img, mnt, input=b"pw\n")
    assert_one_line_error(result, None, "does not fit")


def test_not_luks_without_type_plain(
    run: Callable[..., Result], plain_img: Path, mnt: Path
) -> None:
    before = sha256(plain_img)
    result = run(plain_img, mnt, input=b"pw\n")
    assert_one_line_error(result, 1, "--type plain")
    assert "no LUKS header" in result.stderr
    assert sha256(plain_img) == before


def test_usage_errors_are_one_line(run: Callable[..., Result], plain_img: Path, mnt: Path) -> None:
    assert_one_line_error(run("--no-such-option", plain_img, mnt), 1, "unrecognized")
    assert_one_line_error(run(plain_img), 1, "MOUNTPOINT")
    assert_one_line_error(run("--type", "loopaes", plain_img, mnt), 1, "invalid choice")
    assert_one_line_error(run("--type", "bitlk", plain_img, mnt), 1, "not a BITLK device")
    assert_one_line_error(run(*PLAIN, "--name", "a/b", plain_img, mnt), 1, "--name")


def test_help_and_version(run: Callable[..., Result]) -> None:
    result = run("--help")
    assert result.code == 0
    assert "-o OPT" in result.stdout and "--offset" in result.stdout
    assert "--hash" in result.stdout
    result = run("--version")
    assert result.code == 0 and result.stdout.startswith("cryptfuse ")


def test_subcommand_dispatch(run: Callable[..., Result]) -> None:
    result = run("benchmark", "--help")
    assert result.code == 0
    assert "benchmark" in result.stdout


def test_cryptsetup_action_names(run: Callable[..., Result], tmp_path: Path, mnt: Path) -> None:
    """cryptsetup's action names and aliases run our commands with the same arguments
    (``open``/``*Open``: the mount command, with the ``--type`` the name implies)."""
    assert all(
        command is None or command in cli.SUBCOMMANDS
        for command, _ in cli.CRYPTSETUP_ACTIONS.values()
    )
    if shutil.which("cryptsetup") is None:
        pytest.skip("no cryptsetup")
    c, key, new = tmp_path / "c.img", tmp_path / "key", tmp_path / "new"
    key.write_bytes(b"pass")
    new.write_bytes(b"other")
    c.write_bytes(bytes(20 * MiB))
    cheap = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    subprocess.run(["cryptsetup", "luksFormat", "-q", *cheap, c, key], check=True)
    assert run("luksDump", c).stdout == run("dump", c).stdout != ""
    assert run("-v", "--debug", "luksDump", c).stdout == run("dump", c).stdout  # options first
    assert run("luksUUID", c).stdout == run("uuid", c).stdout != ""
    assert run("isLuks", c).code == 0 and run("isLuks", tmp_path / "key").code == 1
    opened = run("luksOpen", "--test-passphrase", "-v", "-d", key, c)
    assert (opened.code, opened.stderr) == (0, "cryptfuse: Key slot 0 unlocked.\n")
    assert run("open", "--test-passphrase", "-d", new, c).code == 2
    assert_one_line_error(run("plainOpen", "--test-passphrase", "-d", key, c), 1, "LUKS, TCRYPT")
    # the name's type wins over --type, as in cryptsetup
    assert run("luksOpen", "--type", "plain", "--test-passphrase", "-d", key, c).code == 0
    assert_one_line_error(
        run("-d", key, "luksOpen", "--test-passphrase", tmp_path / "key"), 1, "no LUKS header"
    )
    assert_one_line_error(run("loopaesOpen", c, mnt), 1, "loop-AES")
    assert cli.cryptsetup_action(["-d", "k", "create", "m", "c", "-h", "sha256"]) == [
        "-d", "k", "c", "m", "-h", "sha256", "--type", "plain",
    ]  # fmt: skip
    assert run("luksAddKey", *cheap, "-d", key, c, new).code == 0
    assert run("luksOpen", "--test-passphrase", "-d", new, c).code == 0
    closed = run("luksClose", mnt)
    assert (closed.code, closed.stderr) == (run("close", mnt).code, run("close", mnt).stderr)
    assert closed.code != 0
    bitlk, dumped = run("bitlkDump", c), run("dump", "--type", "bitlk", c)
    assert bitlk.code == dumped.code != 0 and bitlk.stderr == dumped.stderr
    assert "BITLK" in bitlk.stderr


def test_plain_defaults_warning_before_error(
    run: Callable[..., Result], plain_img: Path, tmp_path: Path
) -> None:
    result = run("--type", "plain", plain_img, tmp_path / "nowhere", input=b"pw\n")
    # The missing mountpoint is found before the warnings about defaults are printed.
    assert_one_line_error(result, 1, "does not exist")


# -- LUKS: wrong passphrase ---------------------------------------------------------------------


def luks_format(path: Path, kind: str, passphrase: bytes, size: int = 20 * MiB) -> None:
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "-q",
            "--type",
            kind,
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            str(path),
        ],
        input=passphrase,
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_wrong_passphrase(run: Callable[..., Result], tmp_path: Path, mnt: Path, kind: str) -> None:
    pytest.importorskip(f"cryptfuse.formats.{kind}")
    img = tmp_path / f"{kind}.img"
    luks_format(img, kind, b"right")
    before = sha256(img)
    result = run(img, mnt, input=b"wrong\n")
    assert_one_line_error(result, 2, "No key available with this passphrase.")
    assert sha256(img) == before
    key = tmp_path / "key"
    key.write_bytes(b"right\n")  # key files are not newline-stripped: wrong too
    result = run("-d", key, img, mnt)
    assert_one_line_error(result, 2, "No key available")
    assert sha256(img) == before


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_luks_type_mismatch(
    run: Callable[..., Result], tmp_path: Path, mnt: Path, kind: str
) -> None:
    img = tmp_path / "c.img"
    luks_format(img, kind, b"pw")
    other = "luks2" if kind == "luks1" else "luks1"
    result = run("--type", other, img, mnt, input=b"pw\n")
    assert_one_line_error(result, 1, f"not {other.upper()}")


# -- in-process: secrets and FUSE availability ---------------------------------------------------


def test_piped_passphrase_is_one_line_without_newline() -> None:
    assert cli_input.read_passphrase_line(io.BytesIO(b"secret\nmore\n"), 0, None) == b"secret"
    assert cli_input.read_passphrase_line(io.BytesIO(b"secret"), 0, None) == b"secret"
    assert cli_input.read_passphrase_line(io.BytesIO(b"\n"), 0, None) == b""
    assert cli_input.read_passphrase_line(io.BytesIO(b"secret\n"), 0, 3) == b"sec"
    with pytest.raises(KeyFileError):
        cli_input.read_passphrase_line(io.BytesIO(b""), 0, None)


def test_key_file_keeps_newlines(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"0123456789\n")
    assert cli_input.read_key_file(str(key), 0, None) == b"0123456789\n"
    assert cli_input.read_key_file(str(key), 2, 3) == b"234"
    with pytest.raises(KeyFileError, match="too short"):
        cli_input.read_key_file(str(key), 5, 10)
    assert cli_input.read_key_file("-", 1, None, stdin=io.BytesIO(b"ab\n")) == b"b\n"


def test_oversized_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    with open(key, "wb") as f:
        f.truncate(cli_input.KEYFILE_SIZE_MAX + 1)
    with pytest.raises(KeyFileError, match="maximum"):
        cli_input.read_key_file(str(key), 0, None)
    assert len(cli_input.read_key_file(str(key), 0, 64)) == 64


def test_fuse_unavailable(
    monkeypatch: pytest.MonkeyPatch, plain_img: Path, mnt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real_open = os.open

    def fake_open(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        if os.fspath(path) == "/dev/fuse":
            raise FileNotFoundError(2, "No such file or directory", "/dev/fuse")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    before = sha256(plain_img)
    code = cli.main([*PLAIN, str(plain_img), str(mnt)])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith("cryptfuse: FUSE is not available: /dev/fuse does not exist")
    assert sha256(plain_img) == before


def test_weak_spec_warnings() -> None:
    from cryptfuse.spec import parse_cipher_spec

    assert cli.weak_spec_warning(parse_cipher_spec("aes-ecb"), False)
    assert cli.weak_spec_warning(parse_cipher_spec("aes-cbc-plain"), False)
    assert cli.weak_spec_warning(parse_cipher_spec("aes-cbc-plain"), True) is None
    assert cli.weak_spec_warning(parse_cipher_spec("aes-xts-plain64"), False) is None
