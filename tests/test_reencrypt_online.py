"""Online reencryption: ``cryptfuse reencrypt`` on a container a cryptfuse daemon mounts.

The daemon does the work (it is the container's only writer) while it keeps serving
the volume.  Checked here, through the kernel (root + FUSE):

* a writer with a byte model (random offsets and lengths, each write fsync'd) runs
  during the whole reencryption: the volume equals the model during and after it,
  offline afterwards, and cryptsetup's dumped new key decrypts it;
* ext4 on a loop device over the volume stays usable while it is reencrypted, and
  ``e2fsck -fn`` is clean afterwards;
* SIGKILL of the daemon in the middle: the container still opens (a read-write mount
  recovers the hot zone), every fsync'd write is there, and ``--resume-only`` on the
  new mount finishes online; SIGKILL of the command: the daemon stops at a hot-zone
  boundary and keeps serving, and a second command resumes.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from seeding import seeded_rng
from test_e2e_mount import (  # noqa: F401 - fixtures
    Cryptfuse,
    Stack,
    cf,
    daemon_pids,
    losetup,
    mount_fs,
    need,
    sh,
    stack,
    wait_gone,
)
from test_reencrypt import RANDOM_CIPHERS, cryptsetup_checks, header_json

from cryptfuse.formats import OpenOptions, Secret, manage, open_volume
from cryptfuse.formats import luks2_reencrypt as reenc
from cryptfuse.formats.manage import FormatOptions, KdfOptions

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
PASS = b"online-reencryption"


def make(
    tmp: Path, mib: int, sector_size: int = 4096, cipher: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    need("cryptsetup")
    img, key = tmp / "c.img", tmp / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate((1 + mib) * MiB)
    sh(
        "cryptsetup", "luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, "--offset", "2048",
        "--luks2-keyslots-size", "960k", "--sector-size", sector_size, *cipher, img,
    )  # fmt: skip
    return img, key


def reencrypt(cf: Cryptfuse, img: Path, key: Path, *extra: object) -> subprocess.Popen[bytes]:  # noqa: F811 - fixtures
    return subprocess.Popen(
        [sys.executable, "-m", "cryptfuse", "reencrypt", str(img), "--key-file", str(key),
         "-q", *map(str, extra)],
        env=cf.env, cwd=cf.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


class Writer(threading.Thread):
    """Random writes through the mount, each fsync'd, against a byte model."""

    def __init__(
        self, path: Path, model: bytearray, seed: int, span: tuple[int, int] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.path, self.model, self.rng = path, model, random.Random(seed)
        #: the volume bytes it writes (all by default)
        self.span = span or (0, len(model))
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None
        #: the write under way (offset, data): after a crash, neither acknowledged nor lost
        self.pending: tuple[int, bytes] | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                while not self.stop.is_set():
                    length = self.rng.choice([1, 100, 512, 4096, 4096, 65536, 300_000])
                    offset = self.rng.randrange(self.span[0], self.span[1] - length)
                    if self.rng.random() < 0.5:
                        offset = max(self.span[0], offset - offset % 4096)
                    data = self.rng.randbytes(length)
                    self.pending = (offset, data)
                    os.pwrite(fd, data, offset)
                    os.fsync(fd)
                    self.model[offset : offset + length] = data
                    self.pending = None
                    self.count += 1
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def fill(volume: Path, size: int) -> bytearray:
    model = bytearray(os.urandom(size))
    with open(volume, "r+b") as f:
        f.write(model)
        f.flush()
        os.fsync(f.fileno())
    return model


def matches(found: bytes, model: bytearray, pending: tuple[int, bytes] | None) -> bool:
    """*found* is the model, except that the bytes of a write that was under way at a
    crash may each be old or new (it was never acknowledged by an fsync)."""
    if pending is None:
        return found == model
    offset, data = pending
    end = offset + len(data)
    if found[:offset] != model[:offset] or found[end:] != model[end:]:
        return False
    return all(
        f in (m, d) for f, m, d in zip(found[offset:end], model[offset:end], data, strict=True)
    )


def mounted(
    cf: Cryptfuse,  # noqa: F811 - the fixture's value, passed on
    tmp_path: Path,
    mib: int,
    sector_size: int = 4096,
    cipher: tuple[str, ...] = (),
) -> tuple[Path, Path, Path, list[int], bytearray]:
    """A cryptsetup-made container of *mib* MiB, mounted, filled with random data:
    (container, key file, mountpoint, daemon pids, the volume's byte model)."""
    img, key = make(tmp_path, mib, sector_size, cipher)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount("--key-file", key, img, mountpoint=mnt, input=b"")
    return img, key, mnt, pids, fill(mnt / "volume", mib * MiB)


def offline(img: Path) -> bytes:
    with open_volume(str(img), OpenOptions(readonly=True), Secret(PASS, False)) as v:
        return v.read(0, v.size)


def test_online_under_a_writer(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    img, key, mnt, pids, model = mounted(cf, tmp_path, 24)
    volume = mnt / "volume"
    writer = Writer(volume, model, 1)
    writer.start()
    proc = reencrypt(cf, img, key, "--hotzone-size", "1M", "--cipher", "aes-xts-plain64",
                     "--key-size", "256", "--sector-size", "512")  # fmt: skip
    out, err = proc.communicate(timeout=300)
    writer.finish()
    assert proc.returncode == 0, err.decode()
    assert writer.count > 10
    assert volume.read_bytes() == model
    cf.unmount(mnt, pids)
    assert offline(img) == model
    hdr = header_json(img)
    assert "requirements" not in hdr["config"] and hdr["segments"]["0"]["sector_size"] == 512
    cryptsetup_checks(img, key, bytes(model))


def test_online_random_key_changes(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    """Random old and new ciphers, key and sector sizes, resilience and hot zones, each
    reencrypted online under the writer; the seed is printed (``CRYPTFUSE_TEST_SEED``
    replays it)."""
    rng = seeded_rng()
    for number in range(3):
        work = tmp_path / str(number)
        work.mkdir()
        (old, old_bits), (new, new_bits) = rng.choice(RANDOM_CIPHERS), rng.choice(RANDOM_CIPHERS)
        sector = rng.choice([512, 4096])
        new_sector = rng.choice([sector, sector, 512, 1024, 4096])
        options = [
            "--cipher", new, "--key-size", new_bits, "--sector-size", new_sector,
            "--resilience", rng.choice(["checksum", "journal", "none"]),
            "--hotzone-size", rng.choice(["512k", "1M", "3M"]),
        ]  # fmt: skip
        case = (old, old_bits, sector, options)
        img, key, mnt, pids, model = mounted(
            cf, work, 8, sector, ("--cipher", old, "--key-size", str(old_bits))
        )
        writer = Writer(mnt / "volume", model, number)
        writer.start()
        proc = reencrypt(cf, img, key, *options)
        out, err = proc.communicate(timeout=300)
        writer.finish()
        assert proc.returncode == 0, (case, err.decode())
        assert (mnt / "volume").read_bytes() == model, case
        cf.unmount(mnt, pids)
        assert offline(img) == model, case
        segment = header_json(img)["segments"]["0"]
        assert (segment["encryption"], segment["sector_size"]) == (new, new_sector), case
        cryptsetup_checks(img, key, bytes(model))


class DirectIO(threading.Thread):
    """O_DIRECT transfers of 256 KiB to 1 MiB at page-aligned offsets of *span* (what the
    C data path writes behind and reads ahead): writes (each fsync'd, into *model*)
    or reads checked against *model* (a span nobody writes)."""

    def __init__(
        self, path: Path, model: bytearray, span: tuple[int, int], write: bool, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.path, self.model, self.span, self.write = path, model, span, write
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        buf = mmap.mmap(-1, MiB)
        fd = os.open(self.path, (os.O_RDWR if self.write else os.O_RDONLY) | os.O_DIRECT)
        try:
            at = self.span[0]
            while not self.stop.is_set():
                length = self.rng.choice([256 * 1024, 512 * 1024, MiB])
                if self.write:
                    at = (
                        self.span[0]
                        + self.rng.randrange(0, (self.span[1] - self.span[0] - length) // 4096)
                        * 4096
                    )
                    data = self.rng.randbytes(length)
                    buf[:length] = data
                    assert os.pwritev(fd, [memoryview(buf)[:length]], at) == length
                    os.fsync(fd)
                    self.model[at : at + length] = data
                else:  # sequential, round and round
                    if at + length > self.span[1]:
                        at = self.span[0]
                    assert os.preadv(fd, [memoryview(buf)[:length]], at) == length
                    assert buf[:length] == self.model[at : at + length], f"read at {at}"
                    at += length
                self.count += 1
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            os.close(fd)
            buf.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("cipher", ["aes-xts-plain64", "serpent-xts-plain64"])
def test_online_key_change_served_in_c(cf: Cryptfuse, tmp_path: Path, cipher: str) -> None:  # noqa: F811 - fixtures
    """A key change that keeps the geometry is served by the C data path all along: the
    old key's where the data is still old, the new key's where it is converted (each
    request re-checks under its range lock), and the new key's alone afterwards.  With
    AES (OpenSSL) and with Serpent (the libgcrypt engine; cryptsetup here cannot
    format or check it, so cryptfuse formats it and the last check is ours)."""
    size = 48 * MiB
    if cipher.startswith("aes"):
        img, key = make(tmp_path, 48)
    else:
        img, key = tmp_path / "c.img", tmp_path / "pass"
        key.write_bytes(PASS)
        opts = FormatOptions(
            cipher=cipher,
            key_size=512,
            sector_size=4096,
            kdf=KdfOptions(pbkdf="pbkdf2", force_iterations=1000),
            offset=2048,
            size=49 * MiB,
        )
        manage.format_container(str(img), PASS, opts, confirm=lambda _: True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    pids = cf.mount("-v", "--log-file", log, "--key-file", key, img, mountpoint=mnt, input=b"")
    volume = mnt / "volume"
    model = fill(volume, size)
    quarter = size // 4
    threads = [
        Writer(volume, model, 4, span=(0, quarter)),
        DirectIO(volume, model, (quarter, 3 * quarter), True, 5),
        DirectIO(volume, model, (3 * quarter, size), False, 6),  # nobody writes there
    ]
    for t in threads:
        t.start()
    proc = reencrypt(cf, img, key, "--hotzone-size", "512k", "--resilience", "checksum")
    _, err = proc.communicate(timeout=300)
    for t in threads:
        t.finish()
    assert proc.returncode == 0, err.decode()
    assert all(t.count > 2 for t in threads), [t.count for t in threads]
    buf = mmap.mmap(-1, MiB)
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECT)
    try:
        for at in range(0, size, MiB):  # after: through the new key's C path
            assert os.preadv(fd, [buf], at) == MiB
            assert buf[:] == model[at : at + MiB], at
    finally:
        os.close(fd)
    assert volume.read_bytes() == model
    cf.unmount(mnt, pids)
    text = log.read_text()
    assert "in C under both keys" in text, text
    served = re.search(r"of them, (\d+) served under an online reencryption's new key", text)
    assert served is not None and int(served.group(1)) >= size // MiB, text
    assert offline(img) == model
    if cipher.startswith("aes"):
        cryptsetup_checks(img, key, bytes(model))
    else:
        hdr = header_json(img)
        assert "requirements" not in hdr["config"] and list(hdr["keyslots"]) == ["1"]
        assert hdr["segments"]["0"]["encryption"] == cipher


def test_online_ext4_stays_usable(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    need("losetup", "mkfs.ext4", "e2fsck")
    img, key = make(tmp_path, 48)
    mnt, ext = tmp_path / "mnt", tmp_path / "ext"
    mnt.mkdir()
    pids = cf.mount("--key-file", key, img, mountpoint=mnt, input=b"")
    loop = losetup(stack, mnt / "volume")
    sh("mkfs.ext4", "-q", "-F", loop)
    mount_fs(stack, loop, ext)
    files: dict[str, bytes] = {}
    proc = reencrypt(cf, img, key, "--hotzone-size", "512k", "--resilience", "journal")
    i = 0
    while proc.poll() is None or i < 20:
        data = os.urandom(random.randrange(1, 600_000))
        name = f"f{i % 40}"  # rewritten in turn: the file system never fills up
        (ext / name).write_bytes(data)
        files[name] = data
        if i % 5 == 0:
            os.sync()
        i += 1
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    for name, data in files.items():
        assert (ext / name).read_bytes() == data, name
    stack.pop(f"mount {ext}")
    stack.pop(f"loop {loop}")
    cf.unmount(mnt, pids)
    assert "requirements" not in header_json(img)["config"]
    result = sh("e2fsck", "-fn", plaintext_copy(img), check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def plaintext_copy(img: Path) -> str:
    """The plaintext of *img* as a file e2fsck can read (offline, read-only)."""
    plain = img.with_name("plain.img")
    plain.write_bytes(offline(img))
    return str(plain)


def wait_in_progress(img: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the command has converted a few hot zones (the header says so)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hdr = header_json(img)
        first = hdr["segments"]["0"]["size"]
        if reenc.in_reencryption(hdr) and first != "dynamic" and int(first) > 2 * MiB:
            return
        assert proc.poll() is None, "the reencryption finished too early for this test"
        time.sleep(0.02)
    raise AssertionError("no progress")


@pytest.mark.parametrize("resilience", ["checksum", "journal"])
def test_online_daemon_killed(cf: Cryptfuse, tmp_path: Path, resilience: str) -> None:  # noqa: F811 - fixtures
    img, key, mnt, pids, model = mounted(cf, tmp_path, 64)
    volume = mnt / "volume"
    writer = Writer(volume, model, 2)
    writer.start()
    proc = reencrypt(cf, img, key, "--hotzone-size", "256k", "--resilience", resilience)
    wait_in_progress(img, proc)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_gone(pids)
    writer.stop.set()
    writer.join(30)  # its last write failed (ENOTCONN): not in the model, not fsync'd
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    assert reenc.in_reencryption(header_json(img))
    # read-only: the interrupted hot zone is worked out in memory
    assert matches(offline(img), model, writer.pending)
    pids = cf.mount("--key-file", key, img, mountpoint=mnt, input=b"")  # recovers
    found = volume.read_bytes()
    assert matches(found, model, writer.pending)
    model[:] = found
    proc = reencrypt(cf, img, key, "--resume-only")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert volume.read_bytes() == model
    cf.unmount(mnt, pids)
    cryptsetup_checks(img, key, bytes(model))


def test_online_command_killed(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    img, key, mnt, pids, model = mounted(cf, tmp_path, 64)
    volume = mnt / "volume"
    proc = reencrypt(cf, img, key, "--hotzone-size", "256k")
    wait_in_progress(img, proc)
    proc.kill()
    proc.communicate(timeout=60)
    time.sleep(1)  # the daemon notices and stops at the next boundary
    assert reenc.in_reencryption(header_json(img))
    assert volume.read_bytes() == model
    with open(volume, "r+b") as f:  # still writable, in the old and the new part
        for offset in (0, 32 * MiB, 64 * MiB - 4096):
            f.seek(offset)
            f.write(b"x" * 4096)
            model[offset : offset + 4096] = b"x" * 4096
    proc = reencrypt(cf, img, key, "--resume-only")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert volume.read_bytes() == model
    cf.unmount(mnt, pids)
    assert offline(img) == model


def test_online_refusals(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    """On a mounted container ``--force-offline-reencrypt`` is refused as busy (the
    daemon holds it), and a larger ``--sector-size`` over a file system with smaller
    blocks is refused as cryptsetup refuses it on an active device; neither touches
    the container, and the mount goes on serving."""
    need("mkfs.ext4")
    img, key, mnt, pids, _ = mounted(cf, tmp_path, 16, sector_size=512)
    volume = mnt / "volume"
    sh("mkfs.ext4", "-q", "-F", "-b", "1024", volume)
    with open(volume, "rb+") as f:
        os.fsync(f.fileno())
    contents = volume.read_bytes()
    before = img.read_bytes()
    proc = reencrypt(cf, img, key, "--force-offline-reencrypt")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err.decode()
    assert "--force-offline-reencrypt needs it unmounted" in err.decode()
    proc = reencrypt(cf, img, key, "--sector-size", "4096")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err.decode()
    assert err.decode().splitlines() == [
        "cryptfuse: Requested --sector-size 4096 is incompatible with ext4 superblock "
        f"(block size: 1024 bytes) detected on device {img}."
    ]
    assert img.read_bytes() == before
    assert not reenc.in_reencryption(header_json(img))
    assert volume.read_bytes() == contents
    cf.unmount(mnt, pids)
