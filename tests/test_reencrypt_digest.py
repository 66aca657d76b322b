"""The LUKS2 reencryption metadata digest against cryptsetup 2.6.1.

Every header here is made at test time by the real cryptsetup (``reencrypt
--init-only`` in each mode and resilience, and runs interrupted by SIGINT and
SIGKILL) or copied from the shared corpus.  The volume keys come from
``cryptsetup luksDump --dump-volume-key``: in reencryption it prints only the
key of the backup-final segment (the *new* key) whatever ``-S`` says, so the
old key is dumped before the reencryption starts.  The stored digest must
verify, must stop verifying when any covered field changes, and a digest we
write must be accepted by cryptsetup itself.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cryptfuse.errors import FormatError, UsageError
from cryptfuse.formats import luks2_reencrypt_digest as rd
from cryptfuse.formats.luks2 import read_luks2_header

CRYPTSETUP = shutil.which("cryptsetup")
needs_cryptsetup = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")

PASS = b"reenc-pass"
FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
SMALL = ["--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1M"]
REENC = ["reencrypt", "-q", "--force-offline-reencrypt"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def cs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run cryptsetup (C locale, no terminal prompts)."""
    assert CRYPTSETUP is not None
    env = dict(os.environ, LC_ALL="C")
    result = subprocess.run(
        [CRYPTSETUP, *args], capture_output=True, text=True, env=env, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cryptsetup {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def dump_key(path: Path, keyfile: Path, header: Path | None = None) -> bytes | None:
    """The volume key ``luksDump --dump-volume-key`` prints, or None."""
    extra = ["--header", str(header)] if header else []
    out = cs("luksDump", "--dump-volume-key", "-q", *extra, str(path), "--key-file", str(keyfile),
             check=False).stdout  # fmt: skip
    match = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", out)
    return bytes.fromhex(re.sub(r"\s", "", match.group(1))) if match else None


def header_json(path: Path) -> dict[str, Any]:
    """The JSON of the header copy cryptsetup uses (validated by our reader)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        obj: dict[str, Any] = read_luks2_header(fd, str(path)).json
        return obj
    finally:
        os.close(fd)


def stored_digest_id(hdr: dict[str, Any]) -> str:
    ks = str(rd.reencrypt_keyslot(hdr))
    return next(str(k) for k, d in hdr["digests"].items() if ks in d["keyslots"])


def write_json(path: Path, hdr: dict[str, Any]) -> None:
    """Replace the JSON area of both header copies and fix their checksums.

    The seqid is kept, so both copies stay equal and current.
    """
    with open(path, "r+b") as f:
        primary = f.read(4096)
        hdr_size = int.from_bytes(primary[8:16], "big")
        text = json.dumps(hdr, separators=(",", ":")).encode()
        area = text + bytes(hdr_size - 4096 - len(text))
        for offset in (0, hdr_size):
            f.seek(offset)
            binary = bytearray(f.read(4096))
            alg = binary[72:104].rstrip(b"\0").decode()
            binary[448:512] = bytes(64)
            csum = hashlib.new(alg, bytes(binary) + area).digest()
            binary[448 : 448 + len(csum)] = csum
            f.seek(offset)
            f.write(bytes(binary) + area)


class Made:
    """One cryptsetup-made reencryption header and its volume keys."""

    def __init__(self, header: Path, keys: list[bytes], expect: dict[str, Any]) -> None:
        self.header = header
        self.keys = keys
        self.expect = expect
        self.json = header_json(header)


def _sized(path: Path, size: int) -> None:
    """``truncate -s``: a sparse file of *size* bytes."""
    with open(path, "ab") as f:
        f.truncate(size)


def _format(img: Path, keyfile: Path, *extra: str) -> None:
    cs("luksFormat", "--type", "luks2", *FAST, "-q", str(img), "--key-file", str(keyfile), *extra)


def make(tmp: Path, case: str) -> Made:
    """Build the reencryption state named *case* with cryptsetup."""
    keyfile = tmp / "pass"
    keyfile.write_bytes(PASS)
    img = tmp / "img"
    _sized(img, 16 << 20)
    key = ["--key-file", str(keyfile)]
    if case.startswith("reencrypt-"):
        _format(img, keyfile, *SMALL)
        old = dump_key(img, keyfile)
        opts = {
            "reencrypt-checksum": [],
            "reencrypt-checksum-sha512": ["--resilience-hash", "sha512"],
            "reencrypt-journal": ["--resilience", "journal"],
            "reencrypt-none": ["--resilience", "none"],
            "reencrypt-datashift": ["--reduce-device-size", "1M"],
            "reencrypt-hash-sha512": ["--hash", "sha512", *FAST],
        }[case]
        cs(*REENC, "--init-only", *key, *opts, str(img))
        new = dump_key(img, keyfile)
        assert old and new and old != new
        return Made(img, [old, new], {"mode": "reencrypt", "version": 2})
    if case == "encrypt-datashift":
        cs(*REENC, "--encrypt", "--init-only", *key, *FAST, *SMALL, "--reduce-device-size", "2M",
           str(img))  # fmt: skip
        new = dump_key(img, keyfile)
        assert new
        return Made(img, [new], {"mode": "encrypt", "version": 2, "moved": True})
    if case == "encrypt-detached":
        hdr = tmp / "hdr"
        cs(*REENC, "--encrypt", "--init-only", *key, *FAST, "--header", str(hdr), str(img))
        new = dump_key(hdr, keyfile)
        assert new
        return Made(hdr, [new], {"mode": "encrypt", "version": 2})
    if case.startswith("decrypt-datashift"):
        _sized(img, 40 << 20)
        _format(img, keyfile, "--luks2-metadata-size", "16k")
        old = dump_key(img, keyfile)
        hdr = tmp / "hdr"
        # (--resilience journal cannot work here: the journal lives in the
        # keyslots area, always smaller than the moved header)
        cs(*REENC, "--decrypt", "--init-only", *key, "--header", str(hdr), str(img))
        # the default segment (backup-final) is linear: there is no key to dump
        assert dump_key(hdr, keyfile) is None
        assert old
        return Made(hdr, [old], {"mode": "decrypt", "version": 3, "moved": True})
    if case == "decrypt-detached-none":
        hdr = tmp / "hdr"
        _format(img, keyfile, "--header", str(hdr))
        old = dump_key(hdr, keyfile)
        cs(*REENC, "--decrypt", "--init-only", *key, "--header", str(hdr), "--resilience", "none",
           str(img))  # fmt: skip
        assert old
        return Made(hdr, [old], {"mode": "decrypt", "version": 2})
    raise AssertionError(case)


CASES = [
    "reencrypt-checksum",
    "reencrypt-checksum-sha512",
    "reencrypt-journal",
    "reencrypt-none",
    "reencrypt-datashift",
    "reencrypt-hash-sha512",
    "encrypt-datashift",
    "encrypt-detached",
    "decrypt-datashift-checksum",
    "decrypt-detached-none",
]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    if CRYPTSETUP is None:
        pytest.skip("cryptsetup is not installed")
    return {case: make(tmp_path_factory.mktemp(case), case) for case in CASES}


# ---------------------------------------------------------------------------
# the stored digest verifies
# ---------------------------------------------------------------------------


@needs_cryptsetup
@pytest.mark.parametrize("case", CASES)
def test_cryptsetup_digest_verifies(made: dict[str, Made], case: str) -> None:
    m = made[case]
    hdr = m.json
    slot = hdr["keyslots"][str(rd.reencrypt_keyslot(hdr))]
    assert slot["mode"] == m.expect["mode"]
    assert rd.reencrypt_version(hdr) == m.expect["version"]
    assert rd.repair_version(hdr) == m.expect["version"]
    assert (rd.segment_by_flag(hdr, "backup-moved-segment") is not None) == m.expect.get(
        "moved", False
    )
    assert rd.verify_digest(hdr, m.keys)
    # the same with the keys given by digest id
    by_id = rd.keys_by_digest(hdr, m.keys)
    assert len(by_id) == len(m.keys)
    assert rd.verify_digest(hdr, by_id)
    # the layout: "v" + version, the key(s), then the metadata
    data = rd.verification_data(hdr, m.keys)
    assert data[:2] == b"v" + str(m.expect["version"]).encode()
    keys = b"".join(m.keys)
    assert data[2 : 2 + len(keys)] == keys
    assert data[2 + len(keys) :] == rd.serialize_reencrypt_keyslot(
        hdr
    ) + rd.serialize_backup_segments(hdr)


@needs_cryptsetup
@pytest.mark.parametrize("case", CASES)
def test_recomputed_entry_equals_stored(made: dict[str, Made], case: str) -> None:
    """With cryptsetup's salt, our entry is the stored one, field for field."""
    hdr = made[case].json
    digest_id = stored_digest_id(hdr)
    stored = hdr["digests"][digest_id]

    without = copy.deepcopy(hdr)
    del without["digests"][digest_id]
    new_id, entry = rd.create_digest_entry(
        without,
        made[case].keys,
        hash_name=stored["hash"],
        iterations=stored["iterations"],
        salt=base64.b64decode(stored["salt"]),
    )
    assert (new_id, entry) == (digest_id, stored)
    assert list(entry) == list(stored)  # same key order as cryptsetup writes
    rebuilt = rd.with_reencrypt_digest(
        without,
        made[case].keys,
        hash_name=stored["hash"],
        iterations=stored["iterations"],
        salt=base64.b64decode(stored["salt"]),
    )
    assert rebuilt == hdr


@needs_cryptsetup
def test_digest_parameters_cryptsetup_chooses(made: dict[str, Made]) -> None:
    """Reusing a keyslot's PBKDF (key change) means no benchmark: 1000 iterations;
    decryption benchmarks; ``--hash`` sets the digest hash."""

    def entry(case: str) -> dict[str, Any]:
        return made[case].json["digests"][stored_digest_id(made[case].json)]  # type: ignore[no-any-return]

    assert entry("reencrypt-checksum")["iterations"] == rd.MIN_ITERATIONS
    assert entry("reencrypt-checksum")["hash"] == "sha256"
    assert entry("encrypt-datashift")["iterations"] == rd.MIN_ITERATIONS
    assert entry("reencrypt-hash-sha512")["hash"] == "sha512"
    assert len(entry("reencrypt-hash-sha512")["digest"]) == 88  # 64 bytes in base64
    assert entry("decrypt-detached-none")["iterations"] > rd.MIN_ITERATIONS


# ---------------------------------------------------------------------------
# tampering
# ---------------------------------------------------------------------------


def _slot(h: dict[str, Any]) -> dict[str, Any]:
    return h["keyslots"][str(rd.reencrypt_keyslot(h))]  # type: ignore[no-any-return]


def _seg(h: dict[str, Any], flag: str) -> dict[str, Any]:
    found = rd.segment_by_flag(h, flag)
    assert found is not None
    return found[1]  # type: ignore[return-value]


def _set(where: Any, key: str, value: Any) -> None:
    if key not in where:
        pytest.skip(f"field {key!r} absent in this header")
    where[key] = value


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return base64.b64encode(raw).decode()


Edit = Callable[[dict[str, Any]], object]

TAMPER: dict[str, Edit] = {
    "mode": lambda h: _set(
        _slot(h), "mode", "encrypt" if _slot(h)["mode"] != "encrypt" else "decrypt"
    ),
    "direction": lambda h: _set(
        _slot(h), "direction", "backward" if _slot(h)["direction"] == "forward" else "forward"
    ),
    "area-type": lambda h: _set(
        _slot(h)["area"], "type", "none" if _slot(h)["area"]["type"] != "none" else "journal"
    ),
    "area-offset": lambda h: _set(
        _slot(h)["area"], "offset", str(int(_slot(h)["area"]["offset"]) + 4096)
    ),
    "area-size": lambda h: _set(
        _slot(h)["area"], "size", str(int(_slot(h)["area"]["size"]) - 4096)
    ),
    "area-hash": lambda h: _set(_slot(h)["area"], "hash", "sha1"),
    "area-sector-size": lambda h: _set(_slot(h)["area"], "sector_size", 512),
    "shift-size": lambda h: _set(
        _slot(h)["area"], "shift_size", str(int(_slot(h)["area"].get("shift_size", 0)) * 2)
    ),
    "previous-offset": lambda h: _set(
        _seg(h, "backup-previous"), "offset", str(int(_seg(h, "backup-previous")["offset"]) + 512)
    ),
    "previous-size": lambda h: _set(_seg(h, "backup-previous"), "size", "1048576"),
    "final-iv-tweak": lambda h: _set(_seg(h, "backup-final"), "iv_tweak", "8"),
    "final-encryption": lambda h: _set(
        _seg(h, "backup-final"), "encryption", "aes-cbc-essiv:sha256"
    ),
    "final-sector-size": lambda h: _set(_seg(h, "backup-final"), "sector_size", 1024),
    "final-offset": lambda h: _set(
        _seg(h, "backup-final"), "offset", str(int(_seg(h, "backup-final")["offset"]) + 4096)
    ),
    "moved-offset": lambda h: (
        _set(_seg(h, "backup-moved-segment"), "offset", "4096")
        if rd.segment_by_flag(h, "backup-moved-segment")
        else pytest.skip("no backup-moved-segment")
    ),
    "moved-removed": lambda h: (
        _seg(h, "backup-moved-segment").pop("flags")
        if rd.segment_by_flag(h, "backup-moved-segment")
        else pytest.skip("no backup-moved-segment")
    ),
    "requirement-version": lambda h: h["config"]["requirements"].__setitem__(
        "mandatory",
        ["online-reencrypt-v3" if rd.reencrypt_version(h) == 2 else "online-reencrypt-v2"],
    ),
    "legacy-requirement": lambda h: h["config"]["requirements"].__setitem__(
        "mandatory", ["online-reencrypt"]
    ),
    "digest-value": lambda h: h["digests"][stored_digest_id(h)].__setitem__(
        "digest", _flip_b64(h["digests"][stored_digest_id(h)]["digest"])
    ),
    "digest-unassigned": lambda h: h["digests"][stored_digest_id(h)].__setitem__("keyslots", []),
    "field-missing": lambda h: _slot(h).pop("direction"),
    "field-wrong-type": lambda h: _set(_slot(h)["area"], "offset", int(_slot(h)["area"]["offset"])),
}


@needs_cryptsetup
@pytest.mark.parametrize("field", list(TAMPER))
@pytest.mark.parametrize(
    "case",
    ["reencrypt-checksum", "encrypt-datashift", "decrypt-datashift-checksum", "reencrypt-journal"],
)
def test_tampered_metadata_is_refused(made: dict[str, Made], case: str, field: str) -> None:
    hdr = copy.deepcopy(made[case].json)
    keys = rd.keys_by_digest(hdr, made[case].keys)
    assert rd.verify_digest(hdr, keys)
    TAMPER[field](hdr)
    assert not rd.verify_digest(hdr, keys)


UNCOVERED: dict[str, Edit] = {
    "priority": lambda h: _slot(h).__setitem__("priority", 1),
    "key-size": lambda h: _slot(h).__setitem__("key_size", 2),
    "segment-flags-extra": lambda h: _seg(h, "backup-final")["flags"].append("x-extra"),
    "progress-segments": lambda h: h["segments"]["0"].__setitem__("size", "65536"),
    "luks2-keyslot": lambda h: h["keyslots"]["0"]["area"].__setitem__("offset", "36864"),
    "journal-hash-ignored": lambda h: _slot(h)["area"].__setitem__("hash", "sha1"),
}


@needs_cryptsetup
@pytest.mark.parametrize("field", list(UNCOVERED))
def test_uncovered_fields_do_not_matter(made: dict[str, Made], field: str) -> None:
    """Progress (the non-backup segments) is deliberately not covered, nor are
    fields a resilience type does not use (a journal area's hash)."""
    hdr = copy.deepcopy(made["reencrypt-journal"].json)
    UNCOVERED[field](hdr)
    assert rd.verify_digest(hdr, made["reencrypt-journal"].keys)


@needs_cryptsetup
def test_wrong_or_missing_keys(made: dict[str, Made]) -> None:
    m = made["reencrypt-checksum"]
    old, new = m.keys
    hdr = m.json
    ids = rd.keys_by_digest(hdr, m.keys)
    swapped = dict(zip(ids, reversed(list(ids.values())), strict=True))
    assert not rd.verify_digest(hdr, swapped)
    with pytest.raises(UsageError):
        rd.verify_digest(hdr, [new])  # the old key is missing
    with pytest.raises(UsageError):
        rd.verification_data(hdr, [bytes(64)])
    # order matters: old key first
    ks = rd.serialize_reencrypt_keyslot(hdr) + rd.serialize_backup_segments(hdr)
    assert rd.verification_data(hdr, m.keys) == b"v2" + old + new + ks


# ---------------------------------------------------------------------------
# exact encodings on a synthetic header
# ---------------------------------------------------------------------------


def _synthetic() -> dict[str, Any]:
    return {
        "keyslots": {
            "0": {"type": "luks2"},
            "5": {
                "type": "reencrypt",
                "mode": "encrypt",
                "direction": "backward",
                "key_size": 1,
                "priority": 0,
                "area": {"type": "datashift-checksum", "offset": "258", "size": "4096",
                         "hash": "sha256", "sector_size": 4096, "shift_size": "1048576"},
            },
        },
        "segments": {
            "0": {"type": "linear", "offset": "0", "size": "dynamic"},
            "1": {"type": "linear", "offset": "0", "size": "2097152", "flags": ["backup-previous"]},
            "2": {"type": "crypt", "offset": "1048576", "size": "dynamic", "iv_tweak": "0",
                  "encryption": "aes-xts-plain64", "sector_size": 512, "flags": ["backup-final"]},
            "3": {"type": "linear", "offset": "3145728", "size": "1048576",
                  "flags": ["backup-moved-segment"]},
        },
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["2"]}},
        "config": {"requirements": {"mandatory": ["online-reencrypt-v2"]}},
    }  # fmt: skip


def test_exact_layout() -> None:
    hdr = _synthetic()

    def u64(n: int) -> bytes:
        return n.to_bytes(8, "big")

    assert rd.serialize_reencrypt_keyslot(hdr) == (
        b"encrypt" + b"backward" + b"datashift-checksum" + u64(258) + u64(4096)
        + b"sha256" + (4096).to_bytes(4, "big") + u64(1048576)
    )  # fmt: skip
    assert rd.serialize_backup_segments(hdr) == (
        b"linear" + u64(0) + u64(2097152)
        + b"crypt" + u64(1048576) + b"dynamic" + u64(0) + b"aes-xts-plain64"
        + (512).to_bytes(4, "big")
        + b"linear" + u64(3145728) + u64(1048576)
    )  # fmt: skip
    key = bytes(range(32))
    data = rd.verification_data(hdr, {0: key})
    assert data.startswith(b"v2" + key + b"encrypt")
    assert rd.verification_data(hdr, {0: key}, version=3)[:2] == b"v3"
    assert rd.verification_data(hdr, {0: key}, version=10)[:2] == b"v:"  # 0x30 + 10


def test_serialisation_edge_cases() -> None:
    hdr = _synthetic()
    area = hdr["keyslots"]["5"]["area"]
    area["type"] = "journal"  # only the five common fields
    assert len(rd.serialize_reencrypt_keyslot(hdr)) == 7 + 8 + 7 + 8 + 8
    area["type"] = "datashift-journal"  # shift_size, no hash
    assert len(rd.serialize_reencrypt_keyslot(hdr)) == 7 + 8 + 17 + 8 + 8 + 8
    area["type"] = "x" * 65  # strings longer than 64 bytes are refused
    with pytest.raises(FormatError):
        rd.serialize_reencrypt_keyslot(hdr)
    area["type"] = "checksum"
    area["sector_size"] = True  # a JSON boolean is not an int
    with pytest.raises(FormatError):
        rd.serialize_reencrypt_keyslot(hdr)
    area["sector_size"] = 4096
    area["offset"] = "12x"  # strtoull fails: cryptsetup encodes 0
    assert rd.serialize_reencrypt_keyslot(hdr)[7 + 8 + 8 : 7 + 8 + 8 + 8] == bytes(8)
    hdr["segments"]["2"]["type"] = "hw-opal"
    with pytest.raises(FormatError):
        rd.serialize_backup_segments(hdr)
    del hdr["segments"]["1"]["flags"]
    with pytest.raises(FormatError):
        rd.serialize_backup_segments(hdr)


def test_first_matching_flag_and_digest_win() -> None:
    hdr = _synthetic()
    hdr["segments"]["4"] = dict(hdr["segments"]["1"], offset="512")
    assert rd.segment_by_flag(hdr, "backup-previous") == (1, hdr["segments"]["1"])
    hdr["digests"]["1"] = {"type": "pbkdf2", "keyslots": ["5"], "segments": ["2"]}
    assert rd.digest_by_segment(hdr, 2) == 0
    assert rd.digest_by_keyslot(hdr, 5) == 1


def test_version_flags() -> None:
    hdr = _synthetic()
    assert rd.reencrypt_version(hdr) == 2
    hdr["config"]["requirements"]["mandatory"] = ["online-reencrypt-v9", "online-reencrypt-v3"]
    assert rd.reencrypt_version(hdr) == 3  # unknown flags are skipped, as in 2.6.1
    hdr["config"]["requirements"]["mandatory"] = ["online-reencrypt"]
    assert rd.reencrypt_version(hdr) == 1
    assert not rd.verify_digest(hdr, {0: bytes(32)})  # legacy: needs cryptsetup repair
    hdr["config"]["requirements"]["mandatory"] = ["offline-reencrypt"]
    with pytest.raises(FormatError):
        rd.reencrypt_version(hdr)
    assert rd.requirement_name(2) == "online-reencrypt-v2"
    assert rd.requirement_name(1) == "online-reencrypt"


def test_created_entry_round_trip() -> None:
    hdr = _synthetic()
    key = os.urandom(32)
    salt = os.urandom(32)
    hdr["digests"]["0"].update(
        hash="sha256", iterations=1000, salt=base64.b64encode(salt).decode(),
        digest=base64.b64encode(hashlib.pbkdf2_hmac("sha256", key, salt, 1000)).decode(),
    )  # fmt: skip
    pristine = copy.deepcopy(hdr)
    out = rd.with_reencrypt_digest(hdr, {0: key}, hash_name="sha512", iterations=1000)
    assert rd.verify_digest(out, {0: key})
    assert rd.verify_digest(out, [key, os.urandom(32)])
    entry = out["digests"]["1"]
    assert entry["keyslots"] == ["5"] and entry["segments"] == [] and entry["hash"] == "sha512"
    # refreshing alternates ids: the new one is made while the old one exists
    again = rd.with_reencrypt_digest(out, {0: key})
    assert list(again["digests"]) == ["0", "2"]
    assert rd.verify_digest(again, {0: key})
    assert hdr == pristine  # the input is not changed


# ---------------------------------------------------------------------------
# cryptsetup accepts our digests and refuses tampering
# ---------------------------------------------------------------------------


@needs_cryptsetup
def test_cryptsetup_accepts_our_digest(tmp_path: Path) -> None:
    m = make(tmp_path, "reencrypt-checksum")
    keyfile = tmp_path / "pass"
    pristine = tmp_path / "pristine"
    shutil.copy(m.header, pristine)
    resume = [*REENC, "--resume-only", "--key-file", str(keyfile)]

    # direction changed behind cryptsetup's back: refused
    tampered = copy.deepcopy(m.json)
    _slot(tampered)["direction"] = "backward"
    write_json(m.header, tampered)
    result = cs(*resume, str(m.header), check=False)
    assert result.returncode != 0
    assert "Reencryption metadata is invalid" in result.stderr

    # the same change with a digest we computed (new salt, sha512, new id): accepted
    fixed = rd.with_reencrypt_digest(tampered, m.keys, hash_name="sha512", iterations=1234)
    assert stored_digest_id(fixed) != stored_digest_id(m.json)
    write_json(m.header, fixed)
    cs(*resume, str(m.header))
    assert "requirements" not in header_json(m.header)["config"]  # finished

    # unchanged metadata, our digest: accepted too, and the result decrypts the same
    hdr = rd.with_reencrypt_digest(header_json(pristine), m.keys)
    write_json(pristine, hdr)
    cs(*resume, str(pristine))
    assert dump_key(pristine, keyfile) == m.keys[1]


# ---------------------------------------------------------------------------
# interrupted runs
# ---------------------------------------------------------------------------


def _interrupt(tmp: Path, sig: int, resilience: str, seed: int) -> tuple[Path, list[bytes]]:
    keyfile = tmp / "pass"
    keyfile.write_bytes(PASS)
    base = tmp / "base"
    _sized(base, 8 << 20)
    _format(base, keyfile, *SMALL)
    old = dump_key(base, keyfile)
    assert old
    rng = random.Random(seed)
    img = tmp / "img"
    assert CRYPTSETUP is not None
    for _ in range(60):
        shutil.copy(base, img)
        proc = subprocess.Popen(
            [CRYPTSETUP, *REENC, "--key-file", str(keyfile), "--hotzone-size", "64k",
             "--resilience", resilience, str(img)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.005, 0.3))
        proc.send_signal(sig)
        proc.wait(timeout=60)
        try:
            hdr = header_json(img)
        except Exception:  # noqa: BLE001 - a torn write: try again
            continue
        regular = [s for s in hdr["segments"].values() if not s.get("flags") or
                   s["flags"] == ["in-reencryption"]]  # fmt: skip
        # resilience none writes no progress to the header between hotzones:
        # any state after the init counts
        progressed = len(regular) >= 2 or resilience == "none"
        if "requirements" in hdr["config"] and progressed:
            new = dump_key(img, keyfile)
            assert new and new != old
            return img, [old, new]
    pytest.skip("could not interrupt cryptsetup reencrypt mid-way in 60 tries")


@needs_cryptsetup
@pytest.mark.parametrize(
    ("sig", "resilience"),
    [
        pytest.param(signal.SIGINT, "checksum", id="sigint-checksum"),
        pytest.param(signal.SIGKILL, "checksum", id="sigkill-checksum"),
        pytest.param(signal.SIGKILL, "journal", id="sigkill-journal"),
        pytest.param(signal.SIGKILL, "none", id="sigkill-none"),
    ],
)
def test_interrupted_run_still_verifies(tmp_path: Path, sig: int, resilience: str) -> None:
    img, keys = _interrupt(tmp_path, sig, resilience, seed=hash(resilience) & 0xFFFF)
    hdr = header_json(img)
    assert rd.verify_digest(hdr, keys)
    tampered = copy.deepcopy(hdr)
    _seg(tampered, "backup-previous")["iv_tweak"] = "1"
    assert not rd.verify_digest(tampered, keys)


# ---------------------------------------------------------------------------
# the shared corpus (cryptsetup 2.6.1)
# ---------------------------------------------------------------------------

CORPUS_IMAGES = [
    "luks2-reencrypt-interrupted-sigint-checksum.img",
    "luks2-reencrypt-crash-checksum-hotzone-old.img",
    "luks2-reencrypt-crash-checksum-hotzone-new.img",
    "luks2-reencrypt-crash-journal.img",
    "luks2-encrypt-datashift-interrupted-consistent.img",
    "luks2-encrypt-datashift-crash.img",
]


def _corpus_keys(img: Path, passphrase: bytes) -> list[bytes]:
    """Every volume key a luks2 keyslot opens with *passphrase* (our reader)."""
    fd = os.open(img, os.O_RDONLY)
    try:
        header = read_luks2_header(fd, str(img))
        keys = []
        for index, slot in sorted(header.metadata.keyslots.items()):
            digest = next(
                (d for d in header.metadata.digests.values() if index in d.keyslots), None
            )
            if slot.type == "luks2" and digest is not None:
                key = header.try_keyslot(fd, slot, passphrase, digest)
                if key is not None and key not in keys:
                    keys.append(key)
        return keys
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", CORPUS_IMAGES)
def test_corpus_images(corpus: Path, tmp_path: Path, name: str) -> None:
    src = corpus / "generated" / name
    if not src.exists():
        pytest.skip(f"{name} not in the corpus")
    img = tmp_path / name
    shutil.copy(src, img)
    os.chmod(img, 0o600)
    keys = _corpus_keys(img, b"corpus-luks2-A")
    hdr = header_json(img)
    assert rd.reencrypt_version(hdr) == 2
    assert rd.verify_digest(hdr, keys)
    if CRYPTSETUP is not None and "reencrypt" in name:
        # luksDump prints the new key only; the old one is the 2-slot image's key
        keyfile = tmp_path / "pass"
        keyfile.write_bytes(b"corpus-luks2-A")
        assert dump_key(img, keyfile) in keys
        original = corpus / "generated" / "luks2-aes-xts512-4k-2slots.img"
        if original.exists():
            shutil.copy(original, tmp_path / "orig.img")
            assert dump_key(tmp_path / "orig.img", keyfile) in keys
    for field in ("direction", "mode"):
        tampered = copy.deepcopy(hdr)
        _slot(tampered)[field] = "decrypt" if field == "mode" else "forward-x"
        assert not rd.verify_digest(tampered, keys)
