"""The corpus' plain dm-crypt images open with their recorded parameters."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cryptfuse.formats import OpenOptions, Secret, open_volume

GENERATED = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "generated"


def corpus_plaintext(n: int) -> bytes:
    """P(n) of the corpus README: sha256(b"cs-corpus-0") || sha256(b"cs-corpus-1") || ..."""
    blocks = (n + 31) // 32
    return b"".join(hashlib.sha256(b"cs-corpus-%d" % i).digest() for i in range(blocks))[:n]


CASES = [
    pytest.param(
        "plain-aes-cbc-essiv-sha256-k256-ripemd160.img",
        {},
        b"corpus-plain-1",
        False,
        0,
        id="2.6-defaults",
    ),
    pytest.param(
        "plain-aes-xts-plain64-k256-sha256-offset576.img",
        {"cipher": "aes-xts-plain64", "key_size": 256, "hash": "sha256", "offset": 576},
        b"corpus-plain-2",
        False,
        576 * 512,
        id="offset576",
    ),
    pytest.param(
        "plain-aes-xts-plain64-k512-sha512-ss4096.img",
        {"cipher": "aes-xts-plain64", "key_size": 512, "hash": "sha512", "sector_size": 4096},
        b"corpus-plain-3",
        False,
        0,
        id="sector4096",
    ),
    pytest.param(
        "plain-aes-xts-plain64-k512-keyfile-off10.img",
        {"cipher": "aes-xts-plain64", "key_size": 512},
        None,
        True,
        0,
        id="keyfile-offset10",
    ),
]


@pytest.mark.parametrize(("name", "options", "passphrase", "keyfile", "offset"), CASES)
def test_plain_corpus(
    tmp_path: Path,
    name: str,
    options: dict[str, object],
    passphrase: bytes | None,
    keyfile: bool,
    offset: int,
) -> None:
    source = GENERATED / name
    if not source.exists():
        pytest.skip(f"{source} missing")
    image = tmp_path / name
    shutil.copyfile(source, image)
    if keyfile:
        secret = Secret(
            (GENERATED / "plain-keyfile-off10.key").read_bytes()[10:], from_keyfile=True
        )
    else:
        assert passphrase is not None
        secret = Secret(passphrase)
    expected = corpus_plaintext(1 << 20)
    with open_volume(str(image), OpenOptions(type="plain", **options), secret) as vol:  # type: ignore[arg-type]
        assert vol.size == 1 << 20
        assert vol.read(0, vol.size) == expected
        # Rewriting the same plaintext reproduces cryptsetup's ciphertext bit for bit.
        vol.write(0, expected)
        vol.write(12345, expected[12345:99999])
    assert image.read_bytes() == source.read_bytes()
    if offset:
        assert image.read_bytes()[:offset] == b"\xaa" * offset
