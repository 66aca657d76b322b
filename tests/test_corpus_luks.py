"""The shared corpus (../shared/corpus, see its README): every LUKS image.

Images are decompressed or copied into a temporary directory; each test
checks that opening (or refusing) leaves every byte of the file unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cryptfuse.errors import CryptfuseError, DeviceError, FormatError, UnsupportedError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats.luks1 import open_luks1, read_luks1_header
from cryptfuse.formats.luks2 import open_luks2, read_luks2_header

MiB = 1 << 20


def P(n: int) -> bytes:
    """The generated images' plaintext: sha256(b"cs-corpus-0") || sha256(b"cs-corpus-1") || ..."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"cs-corpus-%d" % i).digest()
        i += 1
    return bytes(out[:n])


@pytest.fixture(scope="module")
def unpacked(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All upstream archives and images, decompressed once per module."""
    out = tmp_path_factory.mktemp("corpus")
    up = corpus / "upstream"
    for name in (
        "compatimage",
        "compatv10image",
        "compatimage2",
        "luks2_keyslot_unassigned",
        "luks2_invalid_cipher",
        "luks2_valid_hdr",
        "blkid-luks2-pv",
    ):
        with lzma.open(up / f"{name}.img.xz") as src, open(out / f"{name}.img", "wb") as dst:
            shutil.copyfileobj(src, dst)
    for name in (
        "evil_hdr-keyslot_overlap",
        "evil_hdr-luks_hdr_damage",
        "evil_hdr-payload_overwrite",
        "evil_hdr-small_luks_device",
        "evil_hdr-stripes_payload_dmg",
        "valid_header_file",
    ):
        with lzma.open(up / f"{name}.xz") as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    for name in ("luks1-images", "luks2_mda_images", "luks2_header_requirements"):
        untar(up / f"{name}.tar.xz", out)
    for f in (corpus / "generated").iterdir():
        shutil.copyfile(f, out / f.name)
        os.chmod(out / f.name, 0o644)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Assert that no byte of *paths* changes inside the block (even when it raises)."""
    before = [sha256_file(p) for p in paths]
    try:
        yield
    finally:
        assert [sha256_file(p) for p in paths] == before, "container bytes changed"


def payload(
    path: Path,
    passphrase: bytes,
    *,
    header: Path | None = None,
    key_slot: int | None = None,
    readonly: bool = True,
) -> bytes:
    files = [path] + ([header] if header else [])
    with unchanged(*files):
        vol = open_volume(
            str(path),
            OpenOptions(
                readonly=readonly, header=str(header) if header else None, key_slot=key_slot
            ),
            Secret(passphrase),
        )
        with vol:
            data = vol.read(0, vol.size)
            if vol.fast is not None:
                # The C data path decrypts cryptsetup's sectors to the same known plaintext.
                worker = vol.fast.worker()
                chunk = 1 << 20
                for start in range(0, vol.size, chunk):
                    raw = os.pread(vol.fd, min(chunk, vol.size - start), vol.data_offset + start)
                    assert worker.decrypt(raw, start // vol.sector_size) == data[start:][:chunk]
            return data


# -- known plaintext --------------------------------------------------------------------

UPSTREAM = [
    pytest.param(
        "compatimage.img",
        b"compatkey",
        None,
        "sha256",
        "7428e8f2436882a07eb32765086f5c899474c08b5576f556b573d2aabdf923e8",
        id="compatimage-luks1",
    ),
    pytest.param(
        "compatv10image.img",
        b"compatkey",
        None,
        "sha1",
        "51b48c2471a7593ceaf14dc5e66bca86ed05f6cc",
        id="compatv10image-unaligned",
    ),
    pytest.param(
        "compatimage2.img",
        b"compatkey",
        0,
        "sha256",
        "38ef2d1b8c387efb50680e1d3f234f170d2b7b6c6d9eb856b4f426543a6c4ef2",
        id="compatimage2-pbkdf2",
    ),
    pytest.param(
        "compatimage2.img",
        b"0123456789abcdef",
        1,
        "sha256",
        "38ef2d1b8c387efb50680e1d3f234f170d2b7b6c6d9eb856b4f426543a6c4ef2",
        id="compatimage2-argon2id",
    ),
    pytest.param(
        "luks2_keyslot_unassigned.img",
        b"compatkey",
        None,
        "sha256",
        "c88849aa899d97a7a825879468622d8fe4c4e7a97807fec4b5eb9841a40f0e7d",
        id="keyslot-unassigned",
    ),
] + [
    pytest.param(
        f"test_image_{n}",
        b"Qx3qn46vq0v",
        None,
        "sha256",
        "e187fdce3c4309544505fe845b34166151b52be209572f4936ec590e67ab22f8",
        id=f"mda-{n}k",
    )
    for n in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
]


@pytest.mark.parametrize(("name", "passphrase", "key_slot", "algorithm", "expected"), UPSTREAM)
def test_upstream_known_plaintext(
    unpacked: Path,
    name: str,
    passphrase: bytes,
    key_slot: int | None,
    algorithm: str,
    expected: str,
) -> None:
    data = payload(unpacked / name, passphrase, key_slot=key_slot)
    assert hashlib.new(algorithm, data).hexdigest() == expected


def test_compatimage2_volume_key(unpacked: Path) -> None:
    img = unpacked / "compatimage2.img"
    fd = os.open(img, os.O_RDONLY)
    try:
        hdr = read_luks2_header(fd, str(img))
        for pw in (b"compatkey", b"0123456789abcdef"):
            assert hdr.unlock(fd, pw)[1].hex() == "d47ee2cdc40f39be9a3e8d72a149cc4d"
    finally:
        os.close(fd)


def test_keyslot_unassigned_size_is_whole_sectors(unpacked: Path) -> None:
    img = unpacked / "luks2_keyslot_unassigned.img"
    assert img.stat().st_size % 512 != 0
    with open_luks2(str(img), None, b"compatkey", None, True) as vol:
        assert vol.size == 38861312
    fd = os.open(img, os.O_RDONLY)
    try:
        hdr = read_luks2_header(fd, str(img))
        unbound = [
            i
            for i, s in hdr.metadata.keyslots.items()
            if i not in hdr.metadata.digests[0].keyslots or not hdr.metadata.digests[0].segments
        ]
        assert unbound, "the image has an unbound keyslot"
    finally:
        os.close(fd)


LUKS1_IMAGES = [
    pytest.param("luks1_aes-cbc-essiv-sha256-sha1.img", None, id="aes-cbc-essiv-sha1"),
    pytest.param("luks1_aes-xts-plain64-sha1.img", None, id="aes-xts-sha1"),
    pytest.param("luks1_aes-xts-plain64-sha256.img", None, id="aes-xts-sha256"),
    # the libgcrypt ones (serpent, twofish, lrw, whirlpool): tests/test_ciphers_gcrypt.py
]


@pytest.mark.parametrize(("name", "error"), LUKS1_IMAGES)
def test_luks1_images_keyfile(unpacked: Path, name: str, error: type | None) -> None:
    keyfile = (unpacked / "luks1-images" / "keyfile1").read_bytes()
    img = unpacked / "luks1-images" / name
    if error is not None:
        with unchanged(img), pytest.raises(error):
            open_luks1(str(img), None, keyfile, None, True)
        return
    data = payload(img, keyfile)
    # FAT12 boot sector: volume serial number DEAD-BABE (little endian) at 39
    assert data[510:512] == b"\x55\xaa"
    assert data[39:43] == bytes.fromhex("bebaadde")
    assert data[54:59] == b"FAT12"


GENERATED = [
    pytest.param(
        "luks2-aes-xts512-4k-2slots.img", b"corpus-luks2-A", None, 2 * MiB, id="luks2-4k-pbkdf2"
    ),
    pytest.param(
        "luks2-aes-xts512-4k-2slots.img", b"corpus-luks2-B", None, 2 * MiB, id="luks2-4k-argon2id"
    ),
    pytest.param(
        "luks2-detached-cbc-essiv-sha512.data",
        b"corpus-luks2-C",
        "luks2-detached-cbc-essiv-sha512.hdr",
        1 * MiB,
        id="luks2-detached-sha512-digest",
    ),
    pytest.param(
        "luks1-aes-xts256-sha1-converted.img",
        b"corpus-luks1-D",
        None,
        1 * MiB,
        id="luks1-converted-slot0",
    ),
    pytest.param(
        "luks1-aes-xts256-sha1-converted.img",
        b"corpus-luks1-E",
        None,
        1 * MiB,
        id="luks1-converted-slot3",
    ),
]


@pytest.mark.parametrize(("name", "passphrase", "header", "size"), GENERATED)
def test_generated_known_plaintext(
    unpacked: Path, name: str, passphrase: bytes, header: str | None, size: int
) -> None:
    hdr = unpacked / header if header else None
    data = payload(unpacked / name, passphrase, header=hdr)
    assert data == P(size)


def test_detached_filler_untouched_by_writes(unpacked: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "d.data"
    hdr_file = tmp_path / "d.hdr"
    shutil.copyfile(unpacked / "luks2-detached-cbc-essiv-sha512.data", data_file)
    shutil.copyfile(unpacked / "luks2-detached-cbc-essiv-sha512.hdr", hdr_file)
    with unchanged(hdr_file):
        with open_luks2(str(data_file), str(hdr_file), b"corpus-luks2-C", None, False) as vol:
            vol.write(0, b"\x01" * 700)
            vol.write(vol.size - 10, b"\x02" * 10)
    raw = data_file.read_bytes()
    assert raw[:294912] == b"\xaa" * 294912
    expect = bytearray(P(MiB))
    expect[0:700] = b"\x01" * 700
    expect[-10:] = b"\x02" * 10
    assert payload(data_file, b"corpus-luks2-C", header=hdr_file) == bytes(expect)


# -- refusals ---------------------------------------------------------------------------

EVIL = [
    pytest.param(
        "evil_hdr-keyslot_overlap", FormatError, "LUKS keyslot 1 is invalid", id="keyslot-overlap"
    ),
    pytest.param(
        "evil_hdr-luks_hdr_damage", FormatError, "LUKS keyslot 2 is invalid", id="hdr-damage"
    ),
    pytest.param(
        "evil_hdr-payload_overwrite",
        FormatError,
        "LUKS keyslot 3 is invalid",
        id="payload-overwrite",
    ),
    pytest.param(
        "evil_hdr-stripes_payload_dmg", FormatError, "LUKS keyslot 5 is invalid", id="stripes"
    ),
    pytest.param("evil_hdr-small_luks_device", DeviceError, "too small", id="small-device"),
]


@pytest.mark.parametrize(("name", "error", "message"), EVIL)
def test_evil_luks1_headers(unpacked: Path, name: str, error: type, message: str) -> None:
    img = unpacked / name
    with unchanged(img), pytest.raises(error, match=message):
        open_volume(str(img), OpenOptions(), Secret(b"anything"))


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed")
@pytest.mark.parametrize(("name", "error", "message"), EVIL)
def test_evil_luks1_headers_repaired_as_cryptsetup(
    unpacked: Path, tmp_path: Path, name: str, error: type, message: str
) -> None:
    """``repair_header`` against ``cryptsetup repair`` on copies of each evil header:
    both repair (byte-identical results, which then open) or both give up (nothing
    written)."""
    from cryptfuse.formats import manage

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copyfile(unpacked / name, ours)
    shutil.copyfile(unpacked / name, theirs)
    code = subprocess.run(
        ["cryptsetup", "repair", "-q", str(theirs)], capture_output=True
    ).returncode
    before = ours.read_bytes()
    try:
        kind, done = manage.repair_header(str(ours))
    except CryptfuseError:
        assert code != 0, name
        assert ours.read_bytes() == before
        return
    assert code == 0 and kind == "luks1" and done, name
    assert ours.read_bytes() == theirs.read_bytes()
    fd = os.open(ours, os.O_RDONLY)
    try:
        read_luks1_header(fd, str(ours))
    finally:
        os.close(fd)


def test_valid_header_file_loads_but_has_no_keyslot(unpacked: Path) -> None:
    img = unpacked / "valid_header_file"
    fd = os.open(img, os.O_RDONLY)
    try:
        hdr = read_luks1_header(fd, str(img))
    finally:
        os.close(fd)
    assert (hdr.cipher_name, hdr.cipher_mode, hdr.hash_spec) == (
        "aes",
        "cbc-essiv:sha256",
        "sha512",
    )
    assert not any(s.enabled for s in hdr.keyslots)
    with unchanged(img), pytest.raises(CryptfuseError, match="No usable keyslot"):
        open_luks1(str(img), None, b"x", None, True)


def test_luks2_valid_hdr_parses(unpacked: Path) -> None:
    img = unpacked / "luks2_valid_hdr.img"
    fd = os.open(img, os.O_RDONLY)
    try:
        with unchanged(img):
            hdr = read_luks2_header(fd, str(img))
            assert len(hdr.metadata.keyslots) == 8
            assert {s.kdf.type for s in hdr.metadata.keyslots.values() if s.kdf} == {"argon2"}
            # the legacy "argon2" KDF is refused as unsupported, never as a wrong passphrase
            with pytest.raises(UnsupportedError, match="argon2"):
                hdr.unlock(fd, b"whatever")
    finally:
        os.close(fd)


def test_invalid_cipher_keyslot_opens_but_activation_refused(unpacked: Path) -> None:
    img = unpacked / "luks2_invalid_cipher.img"
    fd = os.open(img, os.O_RDONLY)
    try:
        with unchanged(img):
            hdr = read_luks2_header(fd, str(img))
            slot, _ = hdr.unlock(fd, b"93R4P4pIqAH8", any_segment=True)
            assert slot == 0
    finally:
        os.close(fd)
    with unchanged(img), pytest.raises(UnsupportedError, match="capi"):
        open_volume(str(img), OpenOptions(), Secret(b"93R4P4pIqAH8"))


def test_header_requirements(unpacked: Path) -> None:
    req = unpacked / "luks2_header_requirements"
    free = unpacked / "luks2_header_requirements_free"
    for img in (req, free):
        fd = os.open(img, os.O_RDONLY)
        try:
            with unchanged(img):
                hdr = read_luks2_header(fd, str(img))
                assert hdr.unlock(fd, b"blablabl", any_segment=True)[0] == 0
        finally:
            os.close(fd)
    with unchanged(req), pytest.raises(UnsupportedError, match="req0"):
        open_volume(str(req), OpenOptions(), Secret(b"blablabl"))
    # _free: unlocks, but its file ends at the data offset: nothing to map (cryptsetup: zero size)
    with unchanged(free), pytest.raises(DeviceError, match="too small"):
        open_volume(str(free), OpenOptions(), Secret(b"blablabl"))


REENCRYPT = [
    "luks2-reencrypt-interrupted-sigint-checksum.img",
    "luks2-encrypt-datashift-interrupted-consistent.img",
    "luks2-encrypt-datashift-crash.img",
    "luks2-reencrypt-crash-checksum-hotzone-old.img",
    "luks2-reencrypt-crash-checksum-hotzone-new.img",
    "luks2-reencrypt-crash-journal.img",
]


@pytest.mark.parametrize("name", [pytest.param(n, id=n.removesuffix(".img")) for n in REENCRYPT])
@pytest.mark.parametrize("readonly", [pytest.param(True, id="ro"), pytest.param(False, id="rw")])
def test_reencryption_images_open(
    unpacked: Path, tmp_path: Path, name: str, readonly: bool
) -> None:
    """Containers in reencryption open with their logical content: read-only without a
    single write (an interrupted hot zone is worked out in memory), read-write after
    recovering it (on a copy).  tests/test_reencrypt.py finishes them."""
    img = unpacked / name
    if not readonly:
        img = tmp_path / name
        shutil.copy(unpacked / name, img)
    with contextlib.ExitStack() as stack:
        if readonly:
            stack.enter_context(unchanged(img))
        with open_volume(str(img), OpenOptions(readonly=readonly), Secret(b"corpus-luks2-A")) as v:
            assert v.read(0, 2 * MiB) == P(2 * MiB)
        fd = os.open(img, os.O_RDONLY)
        try:  # the header itself loads (cryptsetup: --test-passphrase works)
            hdr = read_luks2_header(fd, str(img))
            hdr.unlock(fd, b"corpus-luks2-A", any_segment=True)
        finally:
            os.close(fd)


def test_blkid_ambiguous_signature(unpacked: Path) -> None:
    img = unpacked / "blkid-luks2-pv.img"
    fd = os.open(img, os.O_RDONLY)
    try:
        with unchanged(img), pytest.raises(FormatError, match="ambiguous signatures"):
            read_luks2_header(fd, str(img))
    finally:
        os.close(fd)


def untar(archive: Path, dest: Path) -> None:
    """Extract a .tar.xz (the xz binary is several times faster than lzma here)."""
    if shutil.which("tar") and shutil.which("xz"):
        subprocess.run(["tar", "xJf", str(archive), "-C", str(dest)], check=True)
    else:  # pragma: no cover - depends on the machine
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")


@functools.cache
def generated_headers() -> Path | None:
    """The 85 generated LUKS2 headers, extracted once per session (1.3 GiB of mostly zeros)."""
    from conftest import CORPUS  # the same path the ``corpus`` fixture uses

    archive = CORPUS / "malformed" / "luks2-generated-headers.tar.xz"
    if not archive.is_file():
        return None
    dest = Path(tempfile.mkdtemp(prefix="cryptfuse-luks2-generated-"))
    atexit.register(shutil.rmtree, dest, True)
    untar(archive, dest)
    return dest / "luks2-generated-headers"


def _expected() -> list[tuple[str, str]]:
    """(image, verdict) from EXPECTED.txt; collected before any fixture runs."""
    where = generated_headers()
    if where is None:
        return [("missing", "R")]
    lines = (where / "EXPECTED.txt").read_text().splitlines()
    return [(line.split("|")[0], line.split("|")[1]) for line in lines if line.strip()]


@pytest.mark.parametrize(
    ("name", "verdict"), [pytest.param(n, v, id=f"{v}-{n}") for n, v in _expected()]
)
def test_generated_luks2_headers(name: str, verdict: str) -> None:
    if name == "missing":
        pytest.skip("malformed corpus archive not present")
    where = generated_headers()
    assert where is not None
    img = where / name
    fd = os.open(img, os.O_RDONLY)
    try:
        with unchanged(img):
            if verdict == "F":
                with pytest.raises(FormatError):
                    read_luks2_header(fd, str(img))
            else:  # R: loads (maybe from the intact copy); T: token-only changes load too
                hdr = read_luks2_header(fd, str(img))
                assert hdr.metadata.segments
    finally:
        os.close(fd)


def test_expected_list_has_85_verdicts() -> None:
    if generated_headers() is None:
        pytest.skip("malformed corpus archive not present")
    assert len(_expected()) == 85


def _dump_without_salts(img: Path) -> str:
    out = subprocess.run(["cryptsetup", "luksDump", str(img)], capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return "\n".join(
        x for x in lines if "Salt" not in x and not x.strip(" \t0123456789abcdef") == ""
    )


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed")
def test_repair_of_every_luks2_corpus_header_as_cryptsetup(
    unpacked: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cryptfuse repair`` and ``cryptsetup repair`` on copies of every generated and
    upstream LUKS2 header (metadata sizes, requirements, malformed): both succeed or
    both fail, and a repaired copy dumps the same but for salts."""
    from cryptfuse.cli import main

    where = generated_headers()
    images = sorted(where.glob("*.img")) if where is not None else []
    images += [
        unpacked / n
        for n in os.listdir(unpacked)
        if n.startswith(("test_image_", "luks2_header_req"))
    ]
    assert len(images) > 20
    for src in images:
        ours, theirs = tmp_path / "ours", tmp_path / "theirs"
        shutil.copyfile(src, ours)
        shutil.copyfile(src, theirs)
        theirs_ok = (
            subprocess.run(
                ["cryptsetup", "repair", "-q", str(theirs)], capture_output=True
            ).returncode
            == 0
        )
        ours_ok = main(["repair", "-q", str(ours)]) == 0
        capsys.readouterr()
        assert ours_ok == theirs_ok, src.name
        if ours_ok:
            assert _dump_without_salts(ours) == _dump_without_salts(theirs), src.name
