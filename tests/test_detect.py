"""Format detection, including a LUKS2 container that only has its secondary header."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from cryptfuse.formats import OpenOptions, Secret, detect_type, open_volume

needs_cryptsetup = pytest.mark.skipif(
    shutil.which("cryptsetup") is None, reason="cryptsetup (cryptsetup-bin) is not installed"
)


def _luks(tmp_path: Path, kind: str) -> Path:
    image = tmp_path / f"{kind}.img"
    image.write_bytes(bytes(20 << 20))
    key = tmp_path / "key"
    key.write_bytes(b"detect-me")
    subprocess.run(
        ["cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(image)],
        check=True, capture_output=True,
    )  # fmt: skip
    return image


@needs_cryptsetup
@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_detects_luks_versions(tmp_path: Path, kind: str) -> None:
    assert detect_type(str(_luks(tmp_path, kind))) == kind


def test_plain_data_is_not_luks(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    path.write_bytes(b"\x17" * 65536)
    assert detect_type(str(path)) is None


@needs_cryptsetup
def test_wiped_primary_luks2_opens_from_secondary_without_writing(tmp_path: Path) -> None:
    image = _luks(tmp_path, "luks2")
    with open(image, "r+b") as f:
        f.write(bytes(4096))  # the primary binary header
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    assert detect_type(str(image)) == "luks2"
    with open_volume(str(image), OpenOptions(readonly=True), Secret(b"detect-me")) as vol:
        assert vol.size == (20 << 20) - (16 << 20)
    # cryptsetup would rewrite the primary copy here; we never touch the header.
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
