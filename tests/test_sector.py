"""The sector engine against known answers and against its per-sector oracle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfuse.errors import UsageError
from cryptfuse.sector import SectorCipher, elephant_diffuse, elephant_undiffuse
from cryptfuse.spec import parse_cipher_spec

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "vectors"


def _iv_vectors() -> list[Any]:
    path = VECTORS / "dmcrypt_iv_vectors.json"
    if not path.exists():
        return [
            pytest.param(None, None, 0, False, "", marks=pytest.mark.skip(reason=f"{path} missing"))
        ]
    params = []
    for case in json.loads(path.read_text()):
        for sector_size, large, digest in case["out"]:
            spec = f"{case['cipher']}-{case['mode']}-{case['iv']}"
            marks: list[Any] = []
            params.append(
                pytest.param(
                    spec,
                    case,
                    sector_size,
                    large,
                    digest,
                    id=f"{spec}-{sector_size}{'-large' if large else ''}",
                    marks=marks,
                )
            )
    return params


@pytest.mark.parametrize(("spec", "case", "sector_size", "large", "digest"), _iv_vectors())
def test_cryptsetup_iv_vectors(
    spec: str, case: dict[str, Any], sector_size: int, large: bool, digest: str
) -> None:
    """cryptsetup's tests/crypto-vectors.c cipher_iv_test_vectors."""
    data = bytes(case["length"])
    assert hashlib.sha256(data).hexdigest() == case["in_sha256"]
    cipher = SectorCipher(
        parse_cipher_spec(spec), bytes.fromhex(case["key"]), sector_size, case["iv_offset"], large
    )
    encrypted = cipher.encrypt(data, 0)
    assert hashlib.sha256(encrypted).hexdigest() == digest
    assert cipher.reference_encrypt(data, 0) == encrypted
    assert cipher.decrypt(encrypted, 0) == data


# IEEE P1619-2007 Annex B, vectors 1-3 (32-byte data units; later blocks of a
# sector do not influence earlier ones, so the first 32 bytes of a sector match).
XTS_VECTORS = [
    ("00" * 32, 0, "00" * 32, "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    (
        "11" * 16 + "22" * 16,
        0x3333333333,
        "44" * 32,
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    ),
    (
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0" + "22" * 16,
        0x3333333333,
        "44" * 32,
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    ),
]


@pytest.mark.parametrize(("key", "unit", "plain", "expected"), XTS_VECTORS, ids=["v1", "v2", "v3"])
def test_ieee1619_xts(key: str, unit: int, plain: str, expected: str) -> None:
    cipher = SectorCipher(
        parse_cipher_spec("aes-xts-plain64"), bytes.fromhex(key), 512, iv_offset=unit
    )
    sector = bytes.fromhex(plain).ljust(512, b"\0")
    assert cipher.encrypt(sector, 0)[:32].hex() == expected
    assert cipher.decrypt(cipher.encrypt(sector, 0), 0) == sector


def test_xts_matches_openssl_xts_over_many_sectors() -> None:
    key = bytes(range(64))
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), key, 4096, iv_offset=5)
    data = bytes(range(256)) * 16 * 40
    out = cipher.encrypt(data, 1000)
    for i in range(40):
        tweak = (8 * (1000 + i) + 5).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        assert out[i * 4096 : (i + 1) * 4096] == enc.update(data[i * 4096 : (i + 1) * 4096])


SPECS = [
    ("aes-xts-plain64", 64),
    ("aes-xts-plain64", 32),
    ("aes-xts-essiv:sha256", 32),
    ("aes-cbc-essiv:sha256", 32),
    ("aes-cbc-plain64", 16),
    ("aes-cbc-plain", 24),
    ("aes-cbc-plain64be", 32),
    ("aes-cbc-benbi", 32),
    ("aes-cbc-null", 16),
    ("aes-ecb", 32),
    ("aes:4-cbc-plain64", 64),
    ("aes:2-xts-plain64", 128),
    ("aes:2-cbc-essiv:sha256", 64),
    ("camellia-xts-plain64", 64),
    ("camellia-cbc-essiv:sha256", 32),
    ("sm4-xts-plain64", 32),
    ("blowfish-cbc-plain", 32),
    ("cast5-cbc-plain64", 16),
    ("des3_ede-cbc-plain64", 24),
    ("blowfish-cbc-benbi", 16),
    ("aes-cbc-eboiv", 32),
    ("aes-cbc-elephant", 32),
    ("aes-cbc-elephant", 64),
]


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(SPECS),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    iv_offset=st.one_of(
        st.integers(0, 4096), st.integers(2**32 - 16, 2**32 + 16), st.just(2**64 - 3)
    ),
    large=st.booleans(),
    first=st.integers(0, 2**40),
    count=st.integers(1, 5),
    seed=st.binary(min_size=8, max_size=8),
)
def test_batch_equals_reference(
    case: tuple[str, int],
    sector_size: int,
    iv_offset: int,
    large: bool,
    first: int,
    count: int,
    seed: bytes,
) -> None:
    text, key_bytes = case
    key = hashlib.shake_256(seed + b"key").digest(key_bytes)
    data = hashlib.shake_256(seed).digest(sector_size * count)
    cipher = SectorCipher(parse_cipher_spec(text), key, sector_size, iv_offset, large)
    encrypted = cipher.encrypt(data, first)
    assert encrypted == cipher.reference_encrypt(data, first)
    assert cipher.decrypt(encrypted, first) == data
    assert cipher.reference_decrypt(encrypted, first) == data
    if count > 1:  # a batch is the concatenation of its sectors
        assert cipher.encrypt(data[sector_size:], first + 1) == encrypted[sector_size:]


def test_bad_construction() -> None:
    spec = parse_cipher_spec("aes-xts-plain64")
    with pytest.raises(UsageError, match="sector size"):
        SectorCipher(spec, bytes(64), 8192)
    with pytest.raises(UsageError, match="key size"):
        SectorCipher(spec, bytes(20))
    with pytest.raises(UsageError, match="whole"):
        SectorCipher(spec, bytes(64)).encrypt(bytes(100), 0)
    with pytest.raises(UsageError, match="essiv"):
        SectorCipher(parse_cipher_spec("des3_ede-cbc-essiv:sha256"), bytes(24))


def test_elephant_diffusers_invert_and_spread() -> None:
    """Diffuser A+B undo each other; one flipped plaintext bit changes most of the
    sector before CBC (the point of Elephant)."""
    rng = np.random.default_rng(16)
    plain = rng.integers(0, 256, (3, 512), dtype=np.uint8)
    keys = rng.integers(0, 256, (3, 32), dtype=np.uint8)
    diffused = elephant_diffuse(plain, keys)
    assert np.array_equal(elephant_undiffuse(diffused, keys), plain)
    flipped = plain.copy()
    flipped[0, 300] ^= 1
    changed = np.count_nonzero(elephant_diffuse(flipped, keys)[0] != diffused[0])
    assert changed > 256


def test_empty_batch() -> None:
    assert SectorCipher(parse_cipher_spec("aes-xts-plain64"), bytes(64)).encrypt(b"", 0) == b""


@pytest.mark.parametrize("sectors", [1, 3, 33])
@pytest.mark.parametrize("spec", ["aes-xts-plain64", "aes-xts-plain", "aes-xts-plain64be"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_xts_numpy_path_equals_c_path(
    monkeypatch: pytest.MonkeyPatch, sector_size: int, spec: str, sectors: int
) -> None:
    """The numpy path, the C path and the small-request path give the same bytes."""
    from cryptfuse import sector

    if sector._xts_accel is None:
        pytest.skip("the C accelerator is not built")
    key = hashlib.sha512(b"k").digest()
    data = hashlib.shake_256(b"d").digest(sector_size * sectors)
    first = 2**32 // (sector_size // 512) - 1  # the 32-bit "plain" IV wraps inside the batch
    fast = SectorCipher(parse_cipher_spec(spec), key, sector_size, iv_offset=5).encrypt(data, first)
    monkeypatch.setattr(sector, "_xts_accel", None)
    cipher = SectorCipher(parse_cipher_spec(spec), key, sector_size, iv_offset=5)
    assert cipher.encrypt(data, first) == fast
    assert cipher.decrypt(fast, first) == data
    assert cipher.reference_encrypt(data, first) == fast
