"""Known-answer tests of the KDFs and of plain-mode passphrase hashing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cryptfuse import kdf
from cryptfuse.errors import InsufficientMemoryError, UnsupportedError, UsageError

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "vectors"


def _plain_vectors() -> list[Any]:
    path = VECTORS / "plain_hash_vectors.json"
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} missing"))]
    cases = json.loads(path.read_text())["vectors"]
    return [pytest.param(c, id=f"{i}-{c['hash']}-{c['key_bits']}") for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", _plain_vectors())
def test_plain_hash_vectors(case: dict[str, Any]) -> None:
    """cryptsetup's tests/password-hash-test, as recorded in the corpus."""
    passphrase = case["passphrase"].encode()
    if case["keyfile_size_limit"] is not None:
        passphrase = passphrase[: case["keyfile_size_limit"]]
    key_size = case["key_bits"] // 8
    if case["must_fail"]:
        with pytest.raises(UsageError):
            kdf.plain_hash(case["hash"], key_size, passphrase)
        return
    assert kdf.plain_hash(case["hash"], key_size, passphrase).hex() == case["expected_key_hex"]


def test_plain_hash_long_key_uses_A_rounds() -> None:
    import hashlib

    key = kdf.plain_hash("sha1", 64, b"pw")
    expected = b"".join(hashlib.sha1(b"A" * i + b"pw").digest() for i in range(4))[:64]
    assert key == expected


@pytest.mark.parametrize(
    ("iterations", "expected"),
    [
        (1, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
        (2, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
        (4096, "4b007901b765489abead49d926f721d065a429c1"),
    ],
)
def test_pbkdf2_rfc6070(iterations: int, expected: str) -> None:
    assert kdf.pbkdf2("sha1", b"password", b"salt", iterations, 20).hex() == expected


def test_pbkdf2_rejects_unknown_hash() -> None:
    with pytest.raises(UnsupportedError, match="tiger"):
        kdf.pbkdf2("tiger", b"p", b"s", 1, 32)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("argon2i", "c814d9d1dc7f37aa13f0d77f2494bda1c8de6b016dd388d29952a4c4672b6ce8"),
        ("argon2id", "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"),
    ],
)
def test_argon2_rfc9106(kind: str, expected: str) -> None:
    tag = kdf.argon2(
        kind, b"\x01" * 32, b"\x02" * 16, 3, 32, 4, 32, secret=b"\x03" * 8, ad=b"\x04" * 12
    )
    assert tag.hex() == expected


def test_argon2_memory_checked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdf, "available_memory_kib", lambda: 1024)
    with pytest.raises(InsufficientMemoryError, match="KiB"):
        kdf.argon2("argon2id", b"pw", b"s" * 16, 1, 4096, 1, 32)


def test_digest_equal() -> None:
    assert kdf.digest_equal(b"abc", b"abc")
    assert not kdf.digest_equal(b"abc", b"abd")
