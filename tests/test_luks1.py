"""LUKS1 reader: headers built here from the LUKS1 on-disk specification."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from cryptfuse.af import af_sectors, af_split
from cryptfuse.errors import (
    CryptfuseError,
    DeviceError,
    FormatError,
    UnsupportedError,
    UsageError,
    WrongPassphraseError,
)
from cryptfuse.formats.luks1 import (
    KEY_DISABLED,
    KEY_ENABLED,
    LUKS1Header,
    open_luks1,
    read_luks1_header,
)
from cryptfuse.kdf import pbkdf2
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec

PLAIN = hashlib.shake_256(b"luks1 test data").digest(32 * 1024)


def build(
    path: Path,
    passphrases: dict[int, bytes],
    *,
    name: str = "aes",
    mode: str = "xts-plain64",
    hash_spec: str = "sha256",
    key_bytes: int = 64,
    align: int = 8,  # keyslot alignment in sectors (cryptsetup uses 4 KiB = 8)
    payload: int | None = None,
    detached: bool = False,
    slot_fields: dict[int, dict[str, int]] | None = None,
) -> tuple[bytes, int, Path | None]:
    """Write a LUKS1 container; returns (master key, payload offset sectors, header path)."""
    mk = os.urandom(key_bytes)
    spec = parse_cipher_spec(f"{name}-{mode}")
    secs = af_sectors(key_bytes, 4000)
    stride = (secs + align - 1) // align * align
    first = max(align, 2) if align > 1 else 2
    offsets = [first + i * stride for i in range(8)]
    end = offsets[-1] + secs
    if payload is None:
        payload = 0 if detached else (end + align - 1) // align * align
    mk_salt = os.urandom(32)
    digest = pbkdf2(hash_spec, mk, mk_salt, 1000, 20)
    head = struct.pack(
        ">6sH32s32s32sII20s32sI40s",
        b"LUKS\xba\xbe",
        1,
        name.encode(),
        mode.encode(),
        hash_spec.encode(),
        payload,
        key_bytes,
        digest,
        mk_salt,
        1000,
        b"0f1e2d3c-0000-4000-8000-123456789abc",
    )
    slots = b""
    materials = {}
    for i in range(8):
        salt = os.urandom(32)
        fields: dict[str, Any] = {
            "active": KEY_DISABLED,
            "iterations": 0,
            "offset": offsets[i],
            "stripes": 4000,
        }
        if i in passphrases:
            fields.update(active=KEY_ENABLED, iterations=1000)
            derived = pbkdf2(hash_spec, passphrases[i], salt, 1000, key_bytes)
            material = af_split(mk, 4000, hash_spec).ljust(secs * 512, b"\0")
            materials[offsets[i]] = SectorCipher(spec, derived, 512).encrypt(material, 0)
        fields.update((slot_fields or {}).get(i, {}))
        slots += struct.pack(
            ">II32sII",
            fields["active"],
            fields["iterations"],
            salt,
            fields["offset"],
            fields["stripes"],
        )
    header_path = path.with_suffix(".hdr") if detached else None
    hdr_file = header_path or path
    with open(hdr_file, "wb") as f:
        f.write(head + slots)
        for off, enc in materials.items():
            f.seek(off * 512)
            f.write(enc)
        f.truncate(end * 512 if detached else payload * 512)
    ct = SectorCipher(spec, mk, 512).encrypt(PLAIN, 0)
    with open(path, "r+b" if not detached else "wb") as f:
        f.seek(payload * 512)
        f.write(ct)
    return mk, payload, header_path


def read_all(
    path: Path, pw: bytes, header: Path | None = None, key_slot: int | None = None
) -> bytes:
    with open_luks1(str(path), str(header) if header else None, pw, key_slot, True) as vol:
        return vol.read(0, vol.size)


def header_at(path: Path) -> LUKS1Header:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_luks1_header(fd, str(path))
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("mode", "hash_spec", "key_bytes"),
    [
        pytest.param("xts-plain64", "sha256", 64, id="xts512-sha256"),
        pytest.param("xts-plain64", "sha1", 32, id="xts256-sha1"),
        pytest.param("cbc-essiv:sha256", "sha512", 32, id="cbc-essiv-sha512"),
        pytest.param("cbc-plain", "ripemd160", 16, id="cbc-plain-ripemd160"),
        pytest.param("ecb", "sha256", 32, id="ecb"),
    ],
)
def test_open(tmp_path: Path, mode: str, hash_spec: str, key_bytes: int) -> None:
    img = tmp_path / "c.img"
    build(img, {0: b"pw", 5: b"other"}, mode=mode, hash_spec=hash_spec, key_bytes=key_bytes)
    before = img.read_bytes()
    assert read_all(img, b"pw") == PLAIN
    assert read_all(img, b"other") == PLAIN
    assert img.read_bytes() == before


def test_unlock_slot_selection(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    mk, _, _ = build(img, {1: b"a", 3: b"b"})
    hdr = header_at(img)
    fd = os.open(img, os.O_RDONLY)
    try:
        assert hdr.unlock(fd, b"b") == (3, mk)
        assert hdr.unlock(fd, b"a", 1) == (1, mk)
        with pytest.raises(WrongPassphraseError, match="No key available"):
            hdr.unlock(fd, b"a", 3)
        with pytest.raises(CryptfuseError, match="not active"):
            hdr.unlock(fd, b"a", 0)
        with pytest.raises(UsageError):
            hdr.unlock(fd, b"a", 8)
    finally:
        os.close(fd)


def test_no_active_keyslot(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    build(img, {})
    with pytest.raises(CryptfuseError, match="No usable keyslot"):
        read_all(img, b"pw")


def test_unaligned_v10_layout(tmp_path: Path) -> None:
    # cryptsetup 1.0 placed keyslots without 4 KiB alignment (first at sector 2).
    img = tmp_path / "c.img"
    _, payload, _ = build(
        img, {0: b"pw"}, align=1, key_bytes=16, mode="cbc-plain", hash_spec="sha1"
    )
    assert payload % 8 != 0
    assert read_all(img, b"pw") == PLAIN


def test_detached_header(tmp_path: Path) -> None:
    img = tmp_path / "data.img"
    _, payload, hdr = build(img, {0: b"pw"}, detached=True)
    assert payload == 0 and hdr is not None
    assert read_all(img, b"pw", header=hdr) == PLAIN


def test_write_leaves_header_untouched(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    _, payload, _ = build(img, {0: b"pw"})
    head = img.read_bytes()[: payload * 512]
    with open_luks1(str(img), None, b"pw", None, False) as vol:
        vol.write(1000, b"x" * 3000)
    assert img.read_bytes()[: payload * 512] == head
    assert read_all(img, b"pw")[1000:4000] == b"x" * 3000


@pytest.mark.parametrize(
    ("fields", "slot"),
    [
        pytest.param({5: {"stripes": 3999}}, 5, id="stripes"),
        pytest.param({2: {"offset": 1}}, 2, id="inside-header"),
        pytest.param({3: {"offset": 2000}}, 3, id="into-payload"),
        pytest.param({7: {"offset": 8}}, 0, id="overlap"),
    ],
)
def test_invalid_keyslot(tmp_path: Path, fields: dict[int, dict[str, int]], slot: int) -> None:
    img = tmp_path / "c.img"
    build(img, {0: b"pw"}, slot_fields=fields)
    before = img.read_bytes()
    with pytest.raises(FormatError, match=f"LUKS keyslot {slot} is invalid"):
        read_all(img, b"pw")
    assert img.read_bytes() == before


def test_device_too_small_for_keyslots(tmp_path: Path) -> None:
    img = tmp_path / "data.img"
    _, _, hdr = build(img, {0: b"pw"}, detached=True)
    assert hdr is not None
    os.truncate(hdr, 600 * 512)
    with pytest.raises(DeviceError, match="too small"):
        read_all(img, b"pw", header=hdr)


def test_payload_beyond_device(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    _, payload, _ = build(img, {0: b"pw"})
    os.truncate(img, payload * 512)
    with pytest.raises(DeviceError):
        read_all(img, b"pw")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"name": "cast6"}, UnsupportedError, id="cast6"),
        pytest.param({"mode": "pcbc-plain64"}, UnsupportedError, id="pcbc"),
        pytest.param({"mode": "xts-bogus"}, FormatError, id="bad-iv"),
        pytest.param({"key_bytes": 24, "mode": "xts-plain64"}, FormatError, id="bad-key-size"),
    ],
)
def test_unsupported_or_bad_cipher(tmp_path: Path, kwargs: dict[str, Any], error: type) -> None:
    img = tmp_path / "c.img"
    # build with a supported cipher, then rewrite the header fields
    key_bytes = kwargs.get("key_bytes", 64)
    build(
        img,
        {0: b"pw"},
        key_bytes=key_bytes,
        mode="cbc-plain64" if key_bytes == 24 else "xts-plain64",
    )
    with open(img, "r+b") as f:
        f.seek(8)
        f.write(kwargs.get("name", "aes").encode().ljust(32, b"\0"))
        f.write(kwargs.get("mode", "xts-plain64").encode().ljust(32, b"\0"))
    with pytest.raises(error):
        read_all(img, b"pw")


def test_unsupported_hash(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    build(img, {0: b"pw"})
    with open(img, "r+b") as f:
        f.seek(72)
        f.write(b"tiger".ljust(32, b"\0"))
    with pytest.raises(UnsupportedError, match="tiger"):
        read_all(img, b"pw")


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        pytest.param(0, b"LUKS\xba\xbf", "not a valid LUKS", id="magic"),
        pytest.param(6, b"\0\2", "version 2", id="version"),
        pytest.param(108, b"\0\0\0\0", "key size", id="zero-key-bytes"),
    ],
)
def test_damaged_header(tmp_path: Path, offset: int, data: bytes, message: str) -> None:
    img = tmp_path / "c.img"
    build(img, {0: b"pw"})
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(data)
    with pytest.raises(FormatError, match=message):
        read_all(img, b"pw")


def test_short_file(tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    img.write_bytes(b"LUKS\xba\xbe\0\1" + bytes(100))
    with pytest.raises(DeviceError):
        read_all(img, b"pw")
