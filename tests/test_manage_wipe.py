"""`cryptfuse format --wipe` and the KDF benchmark that `--iter-time` drives."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cryptfuse.formats import OpenOptions, Secret, open_volume


def _cryptfuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cryptfuse", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_format_wipe_leaves_encrypted_zeros(tmp_path: Path, kind: str) -> None:
    image = tmp_path / "w.img"
    key = tmp_path / "key"
    key.write_bytes(b"wipe-me")
    image.write_bytes(b"\x5a" * (20 << 20))  # old content that must disappear
    run = _cryptfuse(
        "format", "--type", kind, "--wipe", "--pbkdf-force-iterations", "1000",
        *(["--pbkdf", "pbkdf2"] if kind == "luks2" else []),
        "--key-file", str(key), "-q", str(image),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with open_volume(str(image), OpenOptions(readonly=True), Secret(b"wipe-me")) as vol:
        assert vol.read(0, vol.size) == bytes(vol.size)
    assert b"\x5a" * 4096 not in image.read_bytes()[-vol.size :]


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup is not installed")
def test_benchmarked_argon2_opens_in_cryptsetup(tmp_path: Path) -> None:
    """No forced costs: the Argon2 parameters come from our benchmark (--iter-time)."""
    image = tmp_path / "a.img"
    key = tmp_path / "key"
    key.write_bytes(b"bench-me")
    run = _cryptfuse("format", "--size", "20M", "--iter-time", "200", "--pbkdf-memory", "65536",
                     "--key-file", str(key), "-q", str(image))  # fmt: skip
    assert run.returncode == 0, run.stderr
    dump = subprocess.run(["cryptsetup", "luksDump", str(image)], capture_output=True, text=True)
    assert "argon2id" in dump.stdout
    check = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", str(image), "--key-file", str(key)],
        capture_output=True,
    )
    assert check.returncode == 0
