"""The dm-crypt cipher spec grammar."""

from __future__ import annotations

import pytest

from cryptfuse.errors import UnsupportedError, UsageError
from cryptfuse.spec import CipherSpec, hashlib_name, parse_cipher_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("aes-xts-plain64", CipherSpec("aes", 1, "xts", "plain64"), id="xts-plain64"),
        pytest.param(
            "aes-cbc-essiv:sha256", CipherSpec("aes", 1, "cbc", "essiv", "sha256"), id="essiv"
        ),
        pytest.param("aes", CipherSpec("aes", 1, "cbc", "plain"), id="bare-cipher"),
        pytest.param("aes-plain", CipherSpec("aes", 1, "cbc", "plain"), id="legacy-plain"),
        pytest.param("aes-ecb", CipherSpec("aes", 1, "ecb", None), id="ecb"),
        pytest.param("aes:64-cbc-plain64", CipherSpec("aes", 64, "cbc", "plain64"), id="keycount"),
        pytest.param("AES-XTS-PLAIN64BE", CipherSpec("aes", 1, "xts", "plain64be"), id="case"),
        pytest.param(
            "camellia-xts-benbi", CipherSpec("camellia", 1, "xts", "benbi"), id="camellia"
        ),
        pytest.param("sm4-xts-null", CipherSpec("sm4", 1, "xts", "null"), id="sm4"),
        pytest.param("des3-cbc-plain", CipherSpec("des3_ede", 1, "cbc", "plain"), id="des3-alias"),
    ],
)
def test_parse(text: str, expected: CipherSpec) -> None:
    assert parse_cipher_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    ["aes-xts-plain64", "aes-cbc-essiv:sha256", "aes:4-cbc-plain", "aes-ecb", "blowfish-cbc-benbi"],
)
def test_canonical_text_round_trips(text: str) -> None:
    assert str(parse_cipher_spec(text)) == text
    assert parse_cipher_spec(str(parse_cipher_spec(text))) == parse_cipher_spec(text)


def test_luks1_mode_part() -> None:
    assert parse_cipher_spec("aes-cbc-essiv:sha256").mode == "cbc-essiv:sha256"


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("aes-xts-eboiv", "eboiv"),
        ("aes-xts-elephant", "elephant"),
        ("aes-pcbc-plain64", "pcbc"),
        ("capi:xts(aes)-plain64", "capi"),
        ("cast6-xts-plain64", "cast6"),
        ("aes-cbc-essiv:tiger", "tiger"),
    ],
)
def test_unsupported_names_the_part(text: str, word: str) -> None:
    with pytest.raises(UnsupportedError, match=word):
        parse_cipher_spec(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "aes-",
        "aes-xts",
        "aes-cbc",
        "aes:3-cbc-plain",
        "blowfish-lrw-benbi",
        "aes-cbc-essiv",
        "aes-cbc-plain64:sha256",
        "blowfish-xts-plain64",
        "aes-foo-plain",
        "aes-cbc-bogus",
        "a b",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(UsageError):
        parse_cipher_spec(text)


@pytest.mark.parametrize(
    ("text", "good", "bad"),
    [
        ("aes-xts-plain64", [32, 48, 64], [16, 24, 40]),
        ("aes-cbc-essiv:sha256", [16, 24, 32], [8, 64]),
        ("aes:4-cbc-plain64", [64, 96, 128], [16, 32]),
        ("des3_ede-cbc-plain", [24], [16, 32]),
        ("sm4-xts-plain64", [32], [16, 64]),
    ],
)
def test_key_sizes(text: str, good: list[int], bad: list[int]) -> None:
    spec = parse_cipher_spec(text)
    for size in good:
        spec.check_key_size(size)
    for size in bad:
        with pytest.raises(UsageError, match="key size"):
            spec.check_key_size(size)


def test_hash_names() -> None:
    assert hashlib_name("sha3-256") == "sha3_256"
    assert hashlib_name("SHA256") == "sha256"
    with pytest.raises(UnsupportedError, match="stribog"):
        hashlib_name("stribog512")
