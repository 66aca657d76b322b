"""LUKS anti-forensic split/merge: known answers, a spec-literal oracle, round trips."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfuse.af import af_merge, af_sectors, af_split, diffuse
from cryptfuse.errors import UnsupportedError, UsageError


def spec_diffuse(data: bytes, name: str) -> bytes:
    """The LUKS1 spec's H, written out block by block (the oracle)."""
    size = hashlib.new(name).digest_size
    blocks = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(
        hashlib.new(name, i.to_bytes(4, "big") + block).digest()[: len(block)]
        for i, block in enumerate(blocks)
    )


def spec_merge(material: bytes, key_len: int, stripes: int, name: str) -> bytes:
    """The LUKS1 spec's AFmerge, byte by byte."""
    d = bytes(key_len)
    for k in range(stripes - 1):
        s = material[k * key_len : (k + 1) * key_len]
        d = spec_diffuse(bytes(a ^ b for a, b in zip(d, s, strict=True)), name)
    last = material[(stripes - 1) * key_len : stripes * key_len]
    return bytes(a ^ b for a, b in zip(d, last, strict=True))


@pytest.mark.parametrize(
    ("name", "length"),
    [
        pytest.param("sha1", 40, id="sha1-two-whole-blocks"),
        pytest.param("sha1", 45, id="sha1-partial-last-block"),
        pytest.param("sha256", 32, id="sha256-one-block"),
        pytest.param("sha256", 64, id="sha256-xts512-key"),
        pytest.param("sha256", 16, id="sha256-shorter-than-digest"),
        pytest.param("sha512", 100, id="sha512-partial"),
        pytest.param("ripemd160", 33, id="ripemd160-partial"),
    ],
)
def test_diffuse_matches_spec(name: str, length: int) -> None:
    data = bytes(range(length))
    assert diffuse(data, name) == spec_diffuse(data, name)


def test_diffuse_block_counter_is_big_endian_32_bit() -> None:
    data = bytes(64)
    out = diffuse(data, "sha256")
    assert out[:32] == hashlib.sha256(b"\0\0\0\0" + bytes(32)).digest()
    assert out[32:] == hashlib.sha256(b"\0\0\0\1" + bytes(32)).digest()


def test_diffuse_accepts_cryptsetup_spellings() -> None:
    data = b"x" * 50
    assert diffuse(data, "sha3-256") == spec_diffuse(data, "sha3_256")
    assert diffuse(data, "SHA256") == spec_diffuse(data, "sha256")


@pytest.mark.parametrize(
    ("hash_name", "key_len", "stripes"),
    [
        pytest.param(h, k, s, id=f"{h}-{k}B-{s}stripes")
        for h, k, s in itertools.product(["sha1", "sha256", "sha512"], [16, 32, 33, 64], [1, 2, 7])
    ],
)
def test_merge_matches_spec(hash_name: str, key_len: int, stripes: int) -> None:
    material = hashlib.shake_256(f"{hash_name}{key_len}{stripes}".encode()).digest(
        key_len * stripes
    )
    assert af_merge(material, key_len, stripes, hash_name) == spec_merge(
        material, key_len, stripes, hash_name
    )


def test_known_answer_two_stripes() -> None:
    # stripes=2: key = H(s0) xor s1, with H over one 32-byte sha256 block.
    s0, s1 = bytes(range(32)), bytes(range(32, 64))
    h = hashlib.sha256(b"\0\0\0\0" + s0).digest()
    assert af_merge(s0 + s1, 32, 2, "sha256") == bytes(a ^ b for a, b in zip(h, s1, strict=True))


def test_split_is_deterministic_with_given_randomness_and_merges_back() -> None:
    stream = itertools.count()

    def fake_random(n: int) -> bytes:
        return bytes(next(stream) % 256 for _ in range(n))

    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    material = af_split(key, 4000, "sha256", random_bytes=fake_random)
    assert len(material) == 16 * 4000
    assert material[:16] == bytes(range(16))
    assert af_merge(material, 16, 4000, "sha256") == key


@settings(max_examples=40, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=80),
    stripes=st.integers(1, 50),
    name=st.sampled_from(["sha1", "sha256", "sha512"]),
)
def test_split_merge_round_trip(key: bytes, stripes: int, name: str) -> None:
    material = af_split(key, stripes, name)
    assert af_merge(material, len(key), stripes, name) == key
    # Padding up to whole sectors (as stored on disk) is ignored.
    assert af_merge(material + bytes(511), len(key), stripes, name) == key


def test_full_size_merge_is_fast_enough() -> None:
    material = af_split(bytes(64), 4000, "sha512")
    assert af_merge(material, 64, 4000, "sha512") == bytes(64)


@pytest.mark.parametrize(
    ("key_len", "sectors"),
    [
        pytest.param(16, 125, id="aes128"),
        pytest.param(32, 250, id="aes256"),
        pytest.param(64, 500, id="xts512"),
        pytest.param(20, 157, id="rounds-up"),
    ],
)
def test_af_sectors(key_len: int, sectors: int) -> None:
    assert af_sectors(key_len, 4000) == sectors


def test_errors() -> None:
    with pytest.raises(UsageError):
        af_merge(bytes(31), 16, 2, "sha256")
    with pytest.raises(UsageError):
        af_merge(bytes(32), 0, 2, "sha256")
    with pytest.raises(UsageError):
        af_sectors(32, 0)
    with pytest.raises(UnsupportedError):
        af_merge(bytes(32), 16, 2, "whirlpool-not-a-hash")
