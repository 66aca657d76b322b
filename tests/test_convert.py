"""``cryptfuse convert`` against cryptsetup 2.6.1: same bytes, same refusals, crash safety.

Containers are made by cryptsetup at test time; every conversion is checked
both ways (cryptsetup opens what we converted, we open what it converted),
and where cryptsetup's output is deterministic (JSON, epoch, LUKS1 header,
keyslot areas, data) our result is compared byte for byte.  Fault injection
kills a conversion at every write and fsync (and tears every write in half)
and checks that every passphrase still opens, with our reader and cryptsetup's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cryptfuse.cli import main
from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import convert as conv
from cryptfuse.formats.luks1 import read_luks1_header
from cryptfuse.formats.luks2 import read_luks2_header

sys.path.insert(0, str(Path(__file__).parent))
from test_crash_safety import run_killed  # noqa: E402

CRYPTSETUP = shutil.which("cryptsetup")
pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")
FAST = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
PASS = [b"pass-zero", b"pass-one", b"pass-two", b"pass-three"]
MIB = 1 << 20


def cs(*args: str, ok: bool = True, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    assert CRYPTSETUP is not None
    proc = subprocess.run([CRYPTSETUP, *args], input=stdin, capture_output=True, check=False)
    if ok:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def keyfile(tmp: Path, secret: bytes) -> str:
    path = tmp / f"key-{hashlib.sha1(secret).hexdigest()[:8]}"
    path.write_bytes(secret)
    return str(path)


def make(
    tmp: Path,
    name: str,
    luks: str,
    slots: list[int],
    *,
    size: int = 4 * MIB,
    extra: tuple[str, ...] = (),
    header: Path | None = None,
) -> Path:
    """A cryptsetup container with passphrase PASS[n] in keyslot slots[n], random data."""
    img = tmp / name
    with open(img, "wb") as f:
        f.truncate(size)
    hdr_args: list[str] = []
    if header is not None:
        with open(header, "wb") as f:
            f.truncate(4 * MIB)
        hdr_args = ["--header", str(header)]
    cs(
        "luksFormat", "-q", "--type", luks, *FAST, *extra, *hdr_args,
        "-S", str(slots[0]), str(img), keyfile(tmp, PASS[0]),
    )  # fmt: skip
    add_hash = ["-h", extra[extra.index("-h") + 1]] if "-h" in extra else []
    for n, slot in enumerate(slots[1:], 1):
        cs(
            "luksAddKey", "-q", *FAST, *add_hash, *hdr_args, "-S", str(slot),
            "-d", keyfile(tmp, PASS[0]), str(img), keyfile(tmp, PASS[n]),
        )  # fmt: skip
    offset = data_offset(img if header is None else header)
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size - offset))
    return img


def data_offset(hdr_path: Path) -> int:
    fd = os.open(hdr_path, os.O_RDONLY)
    try:
        if os.pread(fd, 8, 0)[7] == 1:
            return read_luks1_header(fd, str(hdr_path)).payload_offset * 512
        return read_luks2_header(fd, str(hdr_path)).metadata.segments[0].offset
    finally:
        os.close(fd)


def volume_key_ours(img: Path, secret: bytes, header: Path | None = None) -> bytes | None:
    fd = os.open(header or img, os.O_RDONLY)
    try:
        version = os.pread(fd, 8, 0)[7]
        hdr = read_luks1_header(fd, str(img)) if version == 1 else read_luks2_header(fd, str(img))
        try:
            return hdr.unlock(fd, secret)[1]
        except CryptfuseError:
            return None
    finally:
        os.close(fd)


def cs_opens(img: Path, secret: bytes, header: Path | None = None, tmp: Path | None = None) -> bool:
    """cryptsetup --test-passphrase on a copy (it may repair a damaged LUKS2 header)."""
    target, hdr = img, header
    if tmp is not None:
        target = tmp / "cs-copy.img"
        shutil.copyfile(img, target)
    args = ["open", "--test-passphrase", "--disable-locks", "-d", "-", str(target)]
    if hdr is not None:
        args[1:1] = ["--header", str(hdr)]
    return cs(*args, ok=False, stdin=secret).returncode == 0


def dump_json(img: Path, header: Path | None = None) -> object:
    args = ["luksDump", "--dump-json-metadata", str(img)]
    if header is not None:
        args += ["--header", str(header)]
    return json.loads(cs(*args).stdout)


def run_cli(*argv: str) -> int:
    return main(["convert", *argv])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def areas(hdr_path: Path) -> dict[int, bytes]:
    """Active keyslot number -> its area bytes."""
    data = hdr_path.read_bytes()
    fd = os.open(hdr_path, os.O_RDONLY)
    try:
        if data[7] == 1:
            h1 = read_luks1_header(fd, str(hdr_path))
            n = conv.area_length(h1.key_bytes)
            return {
                s.index: data[s.key_material_offset * 512 : s.key_material_offset * 512 + n]
                for s in h1.keyslots
                if s.enabled
            }
        h2 = read_luks2_header(fd, str(hdr_path))
        return {
            i: data[s.area.offset : s.area.offset + s.area.size]
            for i, s in h2.metadata.keyslots.items()
        }
    finally:
        os.close(fd)


# -- LUKS1 -> LUKS2 ------------------------------------------------------------------------------

HASHES = ["sha1", "sha256", "sha512", "ripemd160", "whirlpool"]
#: whirlpool: converted (no KDF runs), but cryptfuse cannot open it; cryptsetup checks it
OURS = HASHES[:-1]


@pytest.mark.parametrize("hash_name", HASHES)
@pytest.mark.parametrize(
    ("cipher", "bits", "slots"),
    [
        pytest.param("aes-xts-plain64", 512, [0, 3, 7], id="xts512-slots037"),
        pytest.param("aes-cbc-essiv:sha256", 256, [0, 1], id="cbc256-slots01"),
    ],
)
def test_luks1_to_luks2_like_cryptsetup(
    tmp_path: Path, hash_name: str, cipher: str, bits: int, slots: list[int]
) -> None:
    src = make(
        tmp_path, "src.img", "luks1", slots, extra=("-h", hash_name, "-c", cipher, "-s", str(bits))
    )
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, ref)
    key = volume_key_ours(src, PASS[0]) if hash_name in OURS else None
    cs("convert", "-q", "--type", "luks2", str(ref))
    assert run_cli("-q", "--type", "luks2", str(ours)) == 0
    assert dump_json(ours) == dump_json(ref)
    a, b = ours.read_bytes(), ref.read_bytes()
    # the binary headers differ only in their random salts and checksums
    for base in (0, 0x4000):
        assert a[base : base + 0x68] == b[base : base + 0x68]  # magic..seqid, label, csum alg
        assert a[base + 0xA8 : base + 0x1C0] == b[base + 0xA8 : base + 0x1C0]  # uuid..
        assert a[base + 0x1000 : base + 0x4000] == b[base + 0x1000 : base + 0x4000]  # JSON
    assert areas(ours) == areas(ref)
    offset = data_offset(ref)
    assert a[offset:] == b[offset:] == src.read_bytes()[offset:]
    assert "Epoch:         \t2" in cs("luksDump", str(ours)).stdout.decode()
    for n in range(len(slots)):
        if hash_name in OURS:
            assert volume_key_ours(ours, PASS[n]) == key
            assert volume_key_ours(ref, PASS[n]) == key
        assert cs_opens(ours, PASS[n])


def test_luks1_all_slots_full_falls_back_to_cryptsetup_order(tmp_path: Path) -> None:
    src = make(tmp_path, "src.img", "luks1", [0, 1, 2, 3], size=4 * MIB)
    for slot in range(4, 8):
        cs(
            "luksAddKey", "-q", *FAST, "-S", str(slot), "-d", keyfile(tmp_path, PASS[0]),
            str(src), keyfile(tmp_path, PASS[0]),
        )  # fmt: skip
    ref = tmp_path / "ref.img"
    shutil.copyfile(src, ref)
    cs("convert", "-q", "--type", "luks2", str(ref))
    warnings: list[str] = []
    conv.convert(str(src), "luks2", confirm=lambda _: True, warn=warnings.append)
    assert warnings and "cryptsetup's order" in warnings[0]
    assert dump_json(src) == dump_json(ref)
    assert areas(src) == areas(ref)
    assert cs_opens(src, PASS[3])


# -- LUKS2 -> LUKS1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_name", HASHES)
def test_luks2_to_luks1_like_cryptsetup(tmp_path: Path, hash_name: str) -> None:
    src = make(
        tmp_path,
        "src.img",
        "luks2",
        [0, 2, 5],
        size=20 * MIB,
        extra=("-h", hash_name, "--sector-size", "512"),
    )
    ours, ref = tmp_path / "ours.img", tmp_path / "ref.img"
    shutil.copyfile(src, ours)
    shutil.copyfile(src, ref)
    key = volume_key_ours(src, PASS[0]) if hash_name in OURS else None
    cs("convert", "-q", "--type", "luks1", str(ref))
    assert run_cli("-q", "--type", "luks1", str(ours)) == 0
    a, b = ours.read_bytes(), ref.read_bytes()
    assert a[:4096] == b[:4096]  # the LUKS1 header, byte for byte
    assert areas(ours) == areas(ref)
    assert a[16 * MIB :] == b[16 * MIB :]
    assert cs("luksDump", str(ours)).stdout == cs("luksDump", str(ref)).stdout.replace(
        b"ref.img", b"ours.img"
    )
    for n in range(3):
        if hash_name in OURS:
            assert volume_key_ours(ours, PASS[n]) == key
        assert cs_opens(ours, PASS[n])


def test_round_trips_with_cryptsetup(tmp_path: Path) -> None:
    """Ours to LUKS2, cryptsetup back to LUKS1, ours to LUKS2 again, cryptsetup back."""
    src = make(tmp_path, "src.img", "luks1", [1, 4])
    original = src.read_bytes()
    key = volume_key_ours(src, PASS[0])
    for _ in range(2):
        assert run_cli("-q", "--type", "luks2", str(src)) == 0
        cs("convert", "-q", "--type", "luks1", str(src))
    assert src.read_bytes()[:4096] == original[:4096]
    assert areas(src) == {1: areas_of(original, 1), 4: areas_of(original, 4)}
    cs("convert", "-q", "--type", "luks2", str(src))
    assert run_cli("-q", "--type", "luks1", str(src)) == 0
    assert src.read_bytes()[:4096] == original[:4096]
    assert volume_key_ours(src, PASS[1]) == key


def areas_of(image: bytes, slot: int) -> bytes:
    n = conv.area_length(64)
    start = 4096 + slot * n
    return image[start : start + n]


def test_detached_header_both_ways(tmp_path: Path) -> None:
    hdr = tmp_path / "hdr.img"
    src = make(tmp_path, "src.img", "luks1", [0, 2], header=hdr)
    data = src.read_bytes()
    ref_hdr = tmp_path / "ref-hdr.img"
    shutil.copyfile(hdr, ref_hdr)
    cs("convert", "-q", "--type", "luks2", "--header", str(ref_hdr), str(src))
    assert src.read_bytes() == data
    assert run_cli("-q", "--type", "luks2", "--header", str(hdr), str(src)) == 0
    assert src.read_bytes() == data
    assert dump_json(src, hdr) == dump_json(src, ref_hdr)
    assert cs_opens(src, PASS[1], hdr)
    assert run_cli("-q", "--type", "luks1", "--header", str(hdr), str(src)) == 0
    cs("convert", "-q", "--type", "luks1", "--header", str(ref_hdr), str(src))
    assert hdr.read_bytes()[:4096] == ref_hdr.read_bytes()[:4096]
    assert src.read_bytes() == data
    assert cs_opens(src, PASS[0], hdr)


# -- refusals --------------------------------------------------------------------------------------


def _luks2(tmp: Path, *extra: str, size: int = 20 * MIB, slots: tuple[int, ...] = (0,)) -> Path:
    return make(tmp, "r.img", "luks2", list(slots), size=size, extra=extra)


REFUSALS = {
    "argon2": (("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32",
                "--sector-size", "512"), "keyslot 0 is not LUKS1 compatible"),
    "sector-4096": (("--sector-size", "4096",), "sector size is not 512 bytes"),
    "slot-over-7": (("--sector-size", "512", "-S", "9"), "slot 9 (over maximum slots)"),
    "keyslot-cipher": (("--sector-size", "512", "--keyslot-cipher", "aes-cbc-essiv:sha256",
                        "--keyslot-key-size", "256"), "keyslot 0 is not LUKS1 compatible"),
    "no-placeholder-room": (("--sector-size", "512", "--luks2-keyslots-size", "1M"),
                            "placeholder"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_luks2_refusals_leave_container_untouched(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, message = REFUSALS[case]
    if case == "argon2":
        img = make(tmp_path, "r.img", "luks2", [0], size=20 * MIB, extra=extra)
    else:
        img = make(tmp_path, "r.img", "luks2", [9 if case == "slot-over-7" else 0],
                   size=20 * MIB, extra=extra)  # fmt: skip
    ref = tmp_path / "ref.img"
    shutil.copyfile(img, ref)
    before = digest(img)
    assert cs("convert", "-q", "--type", "luks1", str(ref), ok=False).returncode == 1
    assert run_cli("-q", "--type", "luks1", str(img)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert digest(img) == before


def test_token_and_unbound_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _luks2(tmp_path, "--sector-size", "512")
    cs("token", "import", str(img), stdin=b'{"type":"x","keyslots":["0"]}')
    before = digest(img)
    assert run_cli("-q", "--type", "luks1", str(img)) == 1
    assert "contains 1 token(s)" in capsys.readouterr().err
    assert digest(img) == before
    img2 = make(tmp_path, "u.img", "luks2", [0], size=20 * MIB, extra=("--sector-size", "512"))
    cs("luksAddKey", "--unbound", "-s", "512", *FAST, "-d", keyfile(tmp_path, PASS[0]), str(img2),
       keyfile(tmp_path, PASS[1]))  # fmt: skip
    before = digest(img2)
    assert run_cli("-q", "--type", "luks1", str(img2)) == 1
    assert "digests are not LUKS1 compatible" in capsys.readouterr().err
    assert digest(img2) == before


def test_usage_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, "a.img", "luks1", [0])
    before = digest(img)
    assert run_cli("-q", "--type", "luks1", str(img)) == 1
    assert "Device is already LUKS1 type." in capsys.readouterr().err
    assert run_cli("-q", str(img)) == 1
    assert "only luks1 and luks2 are supported" in capsys.readouterr().err
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MIB))
    assert run_cli("-q", "--type", "luks2", str(plain)) == 1
    assert "not a valid LUKS device" in capsys.readouterr().err
    assert digest(img) == before


def test_locked_container_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = make(tmp_path, "a.img", "luks1", [0])
    before = digest(img)
    with open(img, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)  # what a mount holds
        assert run_cli("-q", "--type", "luks2", str(img)) == 5
    assert "in use" in capsys.readouterr().err
    assert digest(img) == before


def test_declined_confirmation(tmp_path: Path) -> None:
    img = make(tmp_path, "a.img", "luks1", [0])
    before = digest(img)
    asked: list[str] = []

    def no(message: str) -> bool:
        asked.append(message)
        return False

    with pytest.raises(conv.ConversionAborted) as info:
        conv.convert(str(img), "luks2", confirm=no)
    assert info.value.exit_code == 2
    assert asked == [f"This operation will convert {img} to LUKS2 format."]
    assert digest(img) == before


# -- the step-by-step plan ----------------------------------------------------------------------


def test_plan_moves_never_writes_over_a_referenced_area() -> None:
    n = 258048
    space = conv._Space(32768, 32768 + 8 * n + 28672, n)
    start = {0: 4096 + 2 * n, 1: 4096 + n}  # slot 0's duplicate sits in LUKS1 slot 2's place
    target = {0: 32768, 1: 32768 + n}
    moves = conv.plan_moves(start, target, space)
    assert moves is not None
    cur = dict(start)
    for slot, dst in moves:
        assert all(not conv._overlaps(dst, cur[o], n) for o in cur)
        cur[slot] = dst
    assert cur == target
    full = {i: 4096 + i * n for i in range(8)}
    assert conv.plan_moves(full, {i: v + 28672 for i, v in full.items()}, space) is None


# -- fault injection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("luks", "to", "slots"),
    [
        pytest.param("luks1", "luks2", [0, 1], id="luks1-to-luks2"),
        pytest.param("luks2", "luks1", [0, 1], id="luks2-to-luks1"),
    ],
)
def test_crash_at_every_write(tmp_path: Path, luks: str, to: str, slots: list[int]) -> None:
    extra = ("--sector-size", "512") if luks == "luks2" else ()
    src = make(tmp_path, "src.img", luks, slots, size=20 * MIB if luks == "luks2" else 3 * MIB,
               extra=extra)  # fmt: skip
    key = volume_key_ours(src, PASS[0])
    offset = data_offset(src)
    data = src.read_bytes()[offset:]
    img = tmp_path / "c.img"
    shutil.copyfile(src, img)

    def action() -> None:
        conv.convert(str(img), to, confirm=lambda _: True)

    events = run_killed(action, None, False)
    assert "w" in events
    checked = 0
    for kill_at, kind in enumerate(events, 1):
        for torn in (False, True) if kind == "w" else (False,):
            shutil.copyfile(src, img)
            assert run_killed(action, kill_at, torn) == "killed"
            where = f"event {kill_at}/{len(events)} ({kind}, torn={torn})"
            for n in range(len(slots)):
                assert volume_key_ours(img, PASS[n]) == key, f"{where}: passphrase {n} lost"
                assert cs_opens(img, PASS[n], tmp=tmp_path), f"{where}: cryptsetup lost {n}"
            assert img.read_bytes()[offset:] == data
            checked += 1
    assert checked == len(events) + events.count("w")


def test_luks2_eight_keyslots_fall_back_to_cryptsetup_order(tmp_path: Path) -> None:
    """Keyslot 0 must leave the LUKS2 header region but no LUKS1 slot is free."""
    src = make(tmp_path, "src.img", "luks2", [0], size=20 * MIB, extra=("--sector-size", "512"))
    for slot in range(1, 8):
        cs(
            "luksAddKey", "-q", *FAST, "-S", str(slot), "-d", keyfile(tmp_path, PASS[0]),
            str(src), keyfile(tmp_path, PASS[0]),
        )  # fmt: skip
    ref = tmp_path / "ref.img"
    shutil.copyfile(src, ref)
    cs("convert", "-q", "--type", "luks1", str(ref))
    warnings: list[str] = []
    conv.convert(str(src), "luks1", confirm=lambda _: True, warn=warnings.append)
    assert warnings and "cryptsetup's order" in warnings[0]
    assert src.read_bytes()[: 2 * MIB] == ref.read_bytes()[: 2 * MIB]
    assert cs_opens(src, PASS[0])
