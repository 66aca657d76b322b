"""Plain-mode option semantics and refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cryptfuse.errors import DeviceError, KeyFileError, UnsupportedError, UsageError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats.plain import plain_key
from cryptfuse.kdf import plain_hash
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "plain.img"
    path.write_bytes(bytes(64 * 1024))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_keyfile_is_raw_key_and_passphrase_is_hashed() -> None:
    assert plain_key("aes-xts-plain64", 512, "sha256", b"k" * 80, True) == b"k" * 64
    assert plain_key("aes-xts-plain64", 256, "sha256", b"pw", False) == plain_hash(
        "sha256", 32, b"pw"
    )


def test_size_skip_and_offset(image: Path) -> None:
    options = OpenOptions(
        type="plain",
        cipher="aes-xts-plain64",
        key_size=256,
        hash="sha256",
        offset=8,
        skip=3,
        size=16,
    )
    with open_volume(str(image), options, Secret(b"pw")) as vol:
        assert vol.size == 16 * 512 and vol.data_offset == 4096
        vol.write(0, b"hello" * 100)
    key = plain_hash("sha256", 32, b"pw")
    oracle = SectorCipher(parse_cipher_spec("aes-xts-plain64"), key, 512, iv_offset=3)
    raw = image.read_bytes()
    assert oracle.reference_decrypt(raw[4096:4608], 0)[:500] == b"hello" * 100
    assert raw[:4096] == bytes(4096) and raw[4096 + 16 * 512 :] == bytes(len(raw) - 4096 - 16 * 512)


@pytest.mark.parametrize(
    ("options", "secret", "error", "text"),
    [
        pytest.param(
            dict(cipher="aes-xts-plain64", key_size=128),
            Secret(b"p"),
            UsageError,
            "key size",
            id="key-size",
        ),
        pytest.param(dict(key_size=250), Secret(b"p"), UsageError, "multiple of 8", id="odd-bits"),
        pytest.param(
            dict(cipher="aes-pcbc-plain64"), Secret(b"p"), UnsupportedError, "pcbc", id="pcbc"
        ),
        pytest.param(dict(cipher="nonsense-"), Secret(b"p"), UsageError, "cipher", id="bad-spec"),
        pytest.param(
            dict(cipher="aes-xts-plain64", key_size=512),
            Secret(b"short", True),
            KeyFileError,
            "too short",
            id="short-keyfile",
        ),
        pytest.param(
            dict(offset=128), Secret(b"p"), DeviceError, "beyond the end", id="offset-past-end"
        ),
        pytest.param(dict(size=1000), Secret(b"p"), DeviceError, "does not fit", id="size-too-big"),
        pytest.param(
            dict(sector_size=4096, offset=1), Secret(b"p"), UsageError, "aligned", id="misaligned"
        ),
        pytest.param(
            dict(sector_size=3000), Secret(b"p"), UsageError, "sector size", id="sector-size"
        ),
        pytest.param(
            dict(hash="tiger"), Secret(b"p"), UnsupportedError, "tiger", id="hash"
        ),
    ],
)
def test_refusals_leave_container_untouched(
    image: Path, options: dict[str, object], secret: Secret, error: type[Exception], text: str
) -> None:
    before = _digest(image)
    with pytest.raises(error, match=text):
        open_volume(str(image), OpenOptions(type="plain", **options), secret)  # type: ignore[arg-type]
    assert _digest(image) == before


def test_non_luks_without_type_plain_is_refused(image: Path) -> None:
    from cryptfuse.errors import FormatError

    with pytest.raises(FormatError, match="--type plain"):
        open_volume(str(image), OpenOptions(), Secret(b"p"))
