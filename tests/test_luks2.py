"""LUKS2 reader: containers built here byte by byte (independent of cryptsetup).

The builder writes what the LUKS2 on-disk format document describes: two
binary headers with sha256 checksums, the JSON area, AF-split keyslot
material encrypted with the keyslot cipher, and a data segment.  Each test
then bends one rule and checks the reader's verdict, and that no byte of the
file changed.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptfuse.af import af_sectors, af_split
from cryptfuse.errors import (
    CryptfuseError,
    DeviceError,
    FormatError,
    InsufficientMemoryError,
    KeyslotError,
    UnsupportedError,
    WrongPassphraseError,
)
from cryptfuse.formats import luks2
from cryptfuse.formats.luks2 import (
    has_luks2_header,
    open_luks2,
    read_luks2_header,
    validate_metadata,
)
from cryptfuse.kdf import pbkdf2
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec

HDR = 16384
PLAIN = hashlib.shake_256(b"luks2 test data").digest(64 * 1024)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def binary_header(
    json_area: bytes, hdr_size: int, seqid: int, offset: int, secondary: bool
) -> bytes:
    magic = b"SKUL\xba\xbe" if secondary else b"LUKS\xba\xbe"
    head = struct.pack(
        ">6sHQQ48s32s64s40s48sQ184s64s",
        magic,
        2,
        hdr_size,
        seqid,
        b"label",
        b"sha256",
        os.urandom(64),
        b"12345678-1234-1234-1234-123456789abc",
        b"",
        offset,
        bytes(184),
        bytes(64),
    ).ljust(4096, b"\0")
    csum = hashlib.sha256(head + json_area).digest()
    return head[:448] + csum.ljust(64, b"\0") + head[512:]


def write_headers(
    path: Path,
    meta: dict[str, Any],
    *,
    hdr_size: int = HDR,
    seqid: int = 1,
    copies: tuple[str, ...] = ("primary", "secondary"),
) -> None:
    """(Re)write header copies of *path* from *meta* (JSON area padded with NULs)."""
    text = json.dumps(meta, separators=(",", ":")).encode()
    area = text.ljust(hdr_size - 4096, b"\0")
    with open(path, "r+b") as f:
        if "primary" in copies:
            f.seek(0)
            f.write(binary_header(area, hdr_size, seqid, 0, False) + area)
        if "secondary" in copies:
            f.seek(hdr_size)
            f.write(binary_header(area, hdr_size, seqid, hdr_size, True) + area)


class Built:
    def __init__(
        self, path: Path, meta: dict[str, Any], vk: bytes, data_offset: int, header: Path | None
    ):
        self.path = path
        self.meta = meta
        self.vk = vk
        self.data_offset = data_offset
        self.header = header

    @property
    def header_file(self) -> Path:
        return self.header or self.path

    def rewrite(self, mutate: Callable[[dict[str, Any]], None], **kw: Any) -> None:
        meta = copy.deepcopy(self.meta)
        mutate(meta)
        write_headers(self.header_file, meta, **kw)


def build(
    path: Path,
    passphrases: list[bytes],
    *,
    cipher: str = "aes-xts-plain64",
    key_size: int = 64,
    sector_size: int = 512,
    iv_tweak: int = 0,
    kdf: dict[str, Any] | None = None,
    hdr_size: int = HDR,
    data: bytes = PLAIN,
    detached: bool = False,
    priorities: dict[int, int] | None = None,
) -> Built:
    """A LUKS2 container with one keyslot per passphrase (pbkdf2-sha256 by default)."""
    vk = os.urandom(key_size)
    stripes = 4000
    area_size = (af_sectors(key_size, stripes) * 512 + 4095) // 4096 * 4096
    keyslots_size = max(1, len(passphrases)) * area_size
    keyslots_size = (keyslots_size + 4095) // 4096 * 4096
    data_offset = 0 if detached else 2 * hdr_size + keyslots_size
    header_path = path.with_suffix(".hdr") if detached else None
    hdr_file = header_path or path
    digest_salt = os.urandom(32)
    meta: dict[str, Any] = {
        "keyslots": {},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(data_offset),
                "size": "dynamic",
                "iv_tweak": str(iv_tweak),
                "encryption": cipher,
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": [],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": 1000,
                "salt": b64(digest_salt),
                "digest": b64(pbkdf2("sha256", vk, digest_salt, 1000, 32)),
            }
        },
        "config": {"json_size": str(hdr_size - 4096), "keyslots_size": str(keyslots_size)},
    }
    total_hdr = 2 * hdr_size + keyslots_size
    with open(hdr_file, "wb") as f:
        f.truncate(total_hdr)
    for i, pw in enumerate(passphrases):
        salt = os.urandom(32)
        k = dict(kdf or {"type": "pbkdf2", "hash": "sha256", "iterations": 1000})
        k["salt"] = b64(salt)
        if k["type"] == "pbkdf2":
            derived = pbkdf2(k["hash"], pw, salt, k["iterations"], key_size)
        else:
            from cryptfuse.kdf import argon2

            derived = argon2(k["type"], pw, salt, k["time"], k["memory"], k["cpus"], key_size)
        material = af_split(vk, stripes, "sha256").ljust(af_sectors(key_size, stripes) * 512, b"\0")
        enc = SectorCipher(parse_cipher_spec(cipher), derived, 512).encrypt(material, 0)
        offset = 2 * hdr_size + i * area_size
        with open(hdr_file, "r+b") as f:
            f.seek(offset)
            f.write(enc)
        slot: dict[str, Any] = {
            "type": "luks2",
            "key_size": key_size,
            "af": {"type": "luks1", "stripes": stripes, "hash": "sha256"},
            "area": {
                "type": "raw",
                "offset": str(offset),
                "size": str(area_size),
                "encryption": cipher,
                "key_size": key_size,
            },
            "kdf": k,
        }
        if priorities and i in priorities:
            slot["priority"] = priorities[i]
        meta["keyslots"][str(i)] = slot
        meta["digests"]["0"]["keyslots"].append(str(i))
    write_headers(hdr_file, meta, hdr_size=hdr_size)
    ct = SectorCipher(parse_cipher_spec(cipher), vk, sector_size, iv_offset=iv_tweak).encrypt(
        data, 0
    )
    with open(path, "r+b" if not detached else "wb") as f:
        f.seek(data_offset)
        f.write(ct)
    return Built(path, meta, vk, data_offset, header_path)


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_of(fd_path: Path) -> luks2.LUKS2Header:
    fd = os.open(fd_path, os.O_RDONLY)
    try:
        return read_luks2_header(fd, str(fd_path))
    finally:
        os.close(fd)


def read_all(b: Built, pw: bytes, **kw: Any) -> bytes:
    with open_luks2(
        str(b.path), str(b.header) if b.header else None, pw, kw.pop("key_slot", None), True
    ) as vol:
        return vol.read(0, vol.size)


# -- opening -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cipher", "key_size", "sector_size", "iv_tweak"),
    [
        pytest.param("aes-xts-plain64", 64, 512, 0, id="xts512-512"),
        pytest.param("aes-xts-plain64", 32, 4096, 0, id="xts256-4096"),
        pytest.param("aes-xts-plain64", 64, 4096, 24, id="xts512-4096-tweak24"),
        pytest.param("aes-cbc-essiv:sha256", 32, 512, 7, id="cbc-essiv-tweak7"),
        pytest.param("aes-cbc-plain64", 16, 2048, 0, id="cbc-plain64-2048"),
    ],
)
def test_open_reads_plaintext(
    tmp_path: Path, cipher: str, key_size: int, sector_size: int, iv_tweak: int
) -> None:
    b = build(
        tmp_path / "c.img",
        [b"pw"],
        cipher=cipher,
        key_size=key_size,
        sector_size=sector_size,
        iv_tweak=iv_tweak,
    )
    before = digest_of(b.path)
    assert read_all(b, b"pw") == PLAIN
    assert digest_of(b.path) == before


def test_iv_of_4k_sector_is_its_512_byte_number(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"], sector_size=4096, iv_tweak=8)
    raw = (tmp_path / "c.img").read_bytes()[b.data_offset : b.data_offset + 8192]
    # second 4 KiB block: IV sector = 8 (tweak) + 8 (its first 512-byte sector)
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    d = Cipher(algorithms.AES(b.vk), modes.XTS((16).to_bytes(16, "little"))).decryptor()
    assert d.update(raw[4096:8192]) + d.finalize() == PLAIN[4096:8192]


def test_unlock_returns_volume_key_and_slot(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"a", b"b", b"c"])
    fd = os.open(b.path, os.O_RDONLY)
    try:
        hdr = read_luks2_header(fd, str(b.path))
        assert hdr.unlock(fd, b"c") == (2, b.vk)
        assert hdr.unlock(fd, b"a", 0) == (0, b.vk)
        with pytest.raises(WrongPassphraseError):
            hdr.unlock(fd, b"a", 1)
        with pytest.raises(WrongPassphraseError, match="No key available"):
            hdr.unlock(fd, b"nope")
        with pytest.raises(CryptfuseError, match="not active"):
            hdr.unlock(fd, b"a", 5)
    finally:
        os.close(fd)


def test_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = build(tmp_path / "c.img", [b"ignored", b"normal", b"high"], priorities={0: 0, 2: 2})
    hdr = header_of(b.path)
    order: list[int] = []
    real = luks2.LUKS2Header.try_keyslot

    def spy(
        self: luks2.LUKS2Header, fd: int, slot: luks2.Keyslot, *a: Any, **k: Any
    ) -> bytes | None:
        order.append(slot.index)
        return real(self, fd, slot, *a, **k)

    monkeypatch.setattr(luks2.LUKS2Header, "try_keyslot", spy)
    fd = os.open(b.path, os.O_RDONLY)
    try:
        with pytest.raises(WrongPassphraseError):
            hdr.unlock(fd, b"ignored")
        assert order == [2, 1]  # high first, priority-0 slot never tried
        assert hdr.unlock(fd, b"ignored", 0) == (0, b.vk)  # unless named
    finally:
        os.close(fd)


def test_unbound_keyslot_is_not_used(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"bound", b"unbound"])

    def unbind(meta: dict[str, Any]) -> None:
        meta["digests"]["0"]["keyslots"] = ["0"]
        meta["digests"]["1"] = dict(meta["digests"]["0"], keyslots=["1"], segments=[])

    b.rewrite(unbind)
    # the last keyslot tried is unbound: cryptsetup then says "No usable keyslot" (exit
    # 1), not "No key available" (docs/keyslots.md, "--test-passphrase")
    with pytest.raises(KeyslotError, match="No usable keyslot"):
        read_all(b, b"unbound")
    with pytest.raises(KeyslotError, match="No usable keyslot"):
        read_all(b, b"wrong")
    with pytest.raises(CryptfuseError, match="unbound"):
        read_all(b, b"unbound", key_slot=1)
    assert read_all(b, b"bound") == PLAIN
    # --test-passphrase --unbound: any keyslot against its own digest
    hdr = header_of(b.path)
    fd = os.open(b.path, os.O_RDONLY)
    try:
        slot, _ = hdr.unlock(fd, b"unbound", any_segment=True)
        assert slot == 1
    finally:
        os.close(fd)


def test_argon2id_keyslot(tmp_path: Path) -> None:
    b = build(
        tmp_path / "c.img", [b"pw"], kdf={"type": "argon2id", "time": 4, "memory": 32, "cpus": 1}
    )
    assert read_all(b, b"pw") == PLAIN


def test_argon2_memory_checked_before_running(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])

    def huge(meta: dict[str, Any]) -> None:
        meta["keyslots"]["0"]["kdf"] = {
            "type": "argon2i",
            "time": 4,
            "memory": 2**40,
            "cpus": 4,
            "salt": meta["keyslots"]["0"]["kdf"]["salt"],
        }

    b.rewrite(huge)
    with pytest.raises(InsufficientMemoryError):
        read_all(b, b"pw")


def test_legacy_argon2_kdf_is_unsupported_not_wrong_passphrase(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    b.rewrite(lambda m: m["keyslots"]["0"]["kdf"].update(type="argon2", time=4, memory=32, cpus=1))
    with pytest.raises(UnsupportedError, match="argon2"):
        read_all(b, b"pw")


def test_token_bound_keyslots_say_so(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    b.rewrite(lambda m: m["tokens"].update({"0": {"type": "systemd-tpm2", "keyslots": ["0"]}}))
    with pytest.raises(WrongPassphraseError, match="systemd-tpm2"):
        read_all(b, b"wrong")
    assert read_all(b, b"pw") == PLAIN


def test_detached_header(tmp_path: Path) -> None:
    b = build(tmp_path / "data.img", [b"pw"], detached=True)
    assert b.data_offset == 0
    assert read_all(b, b"pw") == PLAIN


def test_dynamic_size_rounds_down_to_sector_size(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"], sector_size=4096)
    with open(b.path, "ab") as f:
        f.write(b"x" * 1000)
    with open_luks2(str(b.path), None, b"pw", None, True) as vol:
        assert vol.size == len(PLAIN)


def test_fixed_segment_size(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    b.rewrite(lambda m: m["segments"]["0"].update(size="8192"))
    with open_luks2(str(b.path), None, b"pw", None, True) as vol:
        assert vol.size == 8192
    b.rewrite(lambda m: m["segments"]["0"].update(size=str(len(PLAIN) + 512)))
    with pytest.raises(DeviceError):
        read_all(b, b"pw")


def test_write_leaves_header_untouched(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"], sector_size=4096)
    head = (tmp_path / "c.img").read_bytes()[: b.data_offset]
    with open_luks2(str(b.path), None, b"pw", None, False) as vol:
        vol.write(100, b"hello")
        vol.sync()
    assert (tmp_path / "c.img").read_bytes()[: b.data_offset] == head
    assert read_all(b, b"pw")[100:105] == b"hello"


# -- refusals (nothing written) ------------------------------------------------------


REFUSALS: list[Any] = [
    pytest.param(
        lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt-v2"]}),
        FormatError,
        id="reencrypt-requirement-without-keyslot-is-invalid",
    ),
    pytest.param(
        lambda m: m["config"].update(requirements={"mandatory": ["offline-reencrypt"]}),
        UnsupportedError,
        id="offline-reencrypt",
    ),
    pytest.param(
        lambda m: m["config"].update(requirements={"mandatory": ["future-thing"]}),
        UnsupportedError,
        id="unknown-requirement",
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(encryption="capi:xts(aes)-plain64"),
        UnsupportedError,
        id="capi-cipher",
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(encryption="cast6-xts-plain64"),
        UnsupportedError,
        id="cast6",
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(
            integrity={
                "type": "hmac(sha256)",
                "journal_encryption": "none",
                "journal_integrity": "none",
            }
        ),
        UnsupportedError,
        id="integrity",
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(sector_size=1536), UnsupportedError, id="sector-1536"
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(sector_size=8192), UnsupportedError, id="sector-8192"
    ),
    pytest.param(
        lambda m: m["segments"]["0"].update(type="linear"), UnsupportedError, id="linear-segment"
    ),
    pytest.param(
        lambda m: (
            m["segments"]["0"].update(size="4096"),
            m["segments"].update(
                {
                    "1": dict(
                        m["segments"]["0"],
                        offset=str(int(m["segments"]["0"]["offset"]) + 4096),
                        size="dynamic",
                    )
                }
            ),
            m["digests"]["0"]["segments"].append("1"),
        ),
        UnsupportedError,
        id="two-segments",
    ),
    pytest.param(
        lambda m: m["keyslots"]["0"]["af"].update(stripes=400000),
        FormatError,
        id="stripes-beyond-area",
    ),
    pytest.param(
        lambda m: m["digests"]["0"].update(type="hmac"), UnsupportedError, id="digest-type"
    ),
    pytest.param(
        lambda m: m["keyslots"]["0"]["kdf"].update(hash="tiger"),
        UnsupportedError,
        id="kdf-hash",
    ),
]


@pytest.mark.parametrize(("mutate", "error"), REFUSALS)
def test_refused_without_writing(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], error: type
) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    b.rewrite(mutate)
    before = digest_of(b.path)
    with pytest.raises(error):
        read_all(b, b"pw")
    with pytest.raises(error):
        open_luks2(str(b.path), None, b"pw", None, False)
    assert digest_of(b.path) == before


# -- header copies -------------------------------------------------------------------


def test_higher_seqid_wins(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    b.rewrite(
        lambda m: m["config"].update(flags=["allow-discards"]), seqid=5, copies=("secondary",)
    )
    hdr = header_of(b.path)
    assert hdr.source == "secondary" and hdr.binary.seqid == 5
    assert hdr.metadata.config.flags == ("allow-discards",)
    b.rewrite(lambda m: None, seqid=9, copies=("primary",))
    hdr = header_of(b.path)
    assert hdr.source == "primary" and hdr.metadata.config.flags == ()


@pytest.mark.parametrize(
    "hdr_size", [pytest.param(s, id=f"{s // 1024}k") for s in (16384, 65536, 1 << 20)]
)
def test_secondary_found_when_primary_wiped(tmp_path: Path, hdr_size: int) -> None:
    b = build(tmp_path / "c.img", [b"pw"], hdr_size=hdr_size)
    with open(b.path, "r+b") as f:
        f.write(bytes(4096))
    before = digest_of(b.path)
    fd = os.open(b.path, os.O_RDONLY)
    try:
        assert has_luks2_header(fd)
    finally:
        os.close(fd)
    hdr = header_of(b.path)
    assert (hdr.source, hdr.damaged) == ("secondary", "primary")
    assert read_all(b, b"pw") == PLAIN
    assert digest_of(b.path) == before  # never "repaired"


def test_damaged_primary_with_foreign_signature_is_refused(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    with open(b.path, "r+b") as f:
        f.seek(512)
        f.write(b"LABELONE" + bytes(16) + b"LVM2 001")
    with pytest.raises(FormatError, match="ambiguous signatures"):
        header_of(b.path)


def test_checksum_mismatch_in_both_copies(tmp_path: Path) -> None:
    b = build(tmp_path / "c.img", [b"pw"])
    with open(b.path, "r+b") as f:
        for off in (4096, HDR + 4096):
            f.seek(off + 20)
            f.write(b"X")
    with pytest.raises(FormatError, match="checksum"):
        header_of(b.path)


def test_header_device_too_small(tmp_path: Path) -> None:
    b = build(tmp_path / "data.img", [b"pw"], detached=True)
    assert b.header is not None
    os.truncate(b.header, 2 * HDR + 4096)
    with pytest.raises(DeviceError, match="too small"):
        header_of(b.header)


def test_no_header_at_all(tmp_path: Path) -> None:
    p = tmp_path / "zero.img"
    p.write_bytes(bytes(1 << 20))
    with pytest.raises(FormatError):
        header_of(p)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert not has_luks2_header(fd)
    finally:
        os.close(fd)


# -- robustness: arbitrary JSON never escapes as anything but a CryptfuseError --------


def _valid_meta() -> dict[str, Any]:
    return {
        "keyslots": {
            "0": {
                "type": "luks2",
                "key_size": 32,
                "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "AAAA"},
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {
                    "type": "raw",
                    "encryption": "aes-xts-plain64",
                    "key_size": 32,
                    "offset": "32768",
                    "size": "258048",
                },
            }
        },
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": "1048576",
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": "aes-xts-plain64",
                "sector_size": 512,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": 1000,
                "salt": "AAAA",
                "digest": "AAAA",
            }
        },
        "config": {"json_size": "12288", "keyslots_size": "1015808"},
    }


def test_valid_meta_fixture_is_valid() -> None:
    validate_metadata(_valid_meta(), 12288)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=8)
    | st.sampled_from(["0", "dynamic", "18446744073709551616", "", "crypt", "luks2", "-1"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.lists(
        st.sampled_from(
            [
                "keyslots",
                "0",
                "kdf",
                "af",
                "area",
                "segments",
                "digests",
                "config",
                "tokens",
                "keyslots",
                "segments",
                "size",
                "offset",
                "type",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    value=json_values,
)
def test_mutated_metadata_only_raises_format_error(path: list[str], value: Any) -> None:
    meta = _valid_meta()
    node: Any = meta
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            break
        node = node[key]
    if isinstance(node, dict):
        node[path[-1]] = value
    try:
        validate_metadata(meta, 12288)
        luks2.LUKS2Metadata.from_dict(meta)
    except FormatError:
        pass


@pytest.mark.parametrize(
    "area",
    [
        pytest.param(b"[" * 200000 + b"\0", id="deep-nesting"),
        pytest.param(b'{"a":"\xff\xfe"}\0', id="not-utf8"),
        pytest.param(b"{}\0", id="empty-object"),
        pytest.param(b'{"keyslots":1}', id="no-nul"),
    ],
)
def test_json_area_garbage(area: bytes) -> None:
    with pytest.raises(FormatError):
        obj = luks2.parse_json_area(area.ljust(12288, b"\0") if area.endswith(b"\0") else area)
        validate_metadata(obj, 12288)
