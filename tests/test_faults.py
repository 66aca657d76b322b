"""I/O faults in the container underneath the daemon (docs/reliability.md).

The daemon runs with ``tests/faults/faultshim.c`` preloaded (``faultinject.Faults``):
EIO on reads and writes at chosen container offsets, short reads and writes, failing
fsyncs, a container that answers nothing but errors (a disk that went away).  ENOSPC
is real: a sparse container on a small tmpfs.  A container whose file system is
lazily unmounted is real too.  What must hold, every time:

* a failed read gives the reader EIO, never wrong bytes; the rest of the volume reads;
* a failed write is reported to the writer, or, when it was written behind, by the
  next fsync and by every fsync after it (never a 0 once the data is lost);
* an fsync that returned 0 means every answered write is on the container;
* the daemon survives every fault; ext4 on top sees the errors.

The containers are plain aes-xts-plain64 (no header: volume offset = container
offset).  Each test takes one to three seconds.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultinject import Faults, build_shim
from test_e2e_mount import (  # noqa: F401 - fixtures
    PLAIN,
    Cryptfuse,
    Stack,
    losetup,
    mount_fs,
    need,
    sh,
    stack,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse]

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_shim(tmp_path_factory.mktemp("faultshim"))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build the fault injector: {exc}")


class Mounted:
    """A plain container mounted with the fault injector under the daemon."""

    def __init__(self, cf: Cryptfuse, faults: Faults, container: Path, mnt: Path) -> None:
        self.cf, self.faults, self.container, self.mnt = cf, faults, container, mnt
        self.pids: list[int] = []
        self.mount_options: list[str] = []

    def mount(self) -> Path:
        mnt = self.mnt
        mnt.mkdir(exist_ok=True)
        log = mnt.parent / "daemon.log"
        self.pids = self.cf.mount(
            *self.mount_options, *PLAIN, "--log-file", log, self.container, mountpoint=mnt
        )
        return mnt / "volume"

    def unmount(self) -> None:
        self.cf.unmount(self.mnt, self.pids)

    def alive(self) -> bool:
        return all(os.path.exists(f"/proc/{pid}") for pid in self.pids)

    def log(self) -> str:
        path = self.mnt.parent / "daemon.log"
        return path.read_text() if path.exists() else ""


def make_container(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def setup(
    shim: Path,
    stack: Stack,  # noqa: F811 - the fixture of test_e2e_mount
    cli_env: dict[str, str],
    repo: Path,
    tmp_path: Path,
) -> Iterator[tuple[Mounted, Faults]]:
    container = make_container(tmp_path / "plain.img", 8 * MiB)
    faults = Faults(shim, tmp_path, container)
    cf = Cryptfuse(stack, faults.env(cli_env), repo)
    yield Mounted(cf, faults, container, tmp_path / "mnt"), faults


def fill(volume: Path, size: int) -> bytes:
    """Write random bytes over the start of the volume and fsync them; returns them."""
    data = os.urandom(size)
    fd = os.open(volume, os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            assert os.pwrite(fd, data[off : off + MiB], off) == min(MiB, size - off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


def aligned(data: bytes) -> mmap.mmap:
    """*data* in a page-aligned buffer."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def errno_of(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


def check_write_errors(m: Mounted, faults: Faults, volume: Path, data: bytes) -> None:
    """Writes that fail reach their writers; nothing answered is lost."""
    hits = len(faults.hits())
    bad = (5 * MiB, 5 * MiB + 64 * KiB)
    faults.set(f"write EIO {bad[0]} {bad[1]}")
    fd = os.open(volume, os.O_RDWR)
    try:
        # whole pages (C path), a partial sector (Python read-modify-write), sectors:
        # each fails with EIO in the writer, nothing was answered
        for off, size in [
            (bad[0], 4 * KiB),
            (bad[0] + 1000, 100),
            (bad[0] + 512, 512),
            (bad[0] - 4 * KiB, 8 * KiB),
            (bad[0], 64 * KiB),
        ]:
            assert errno_of(os.pwrite, fd, b"\xee" * size, off) == errno.EIO, (off, size)
        # nothing answered was lost: fsync is 0, and the rest of the volume is writable
        os.pwrite(fd, b"fine" * 1024, MiB)
        os.fsync(fd)
        assert os.pread(fd, 4096, MiB) == b"fine" * 1024
        assert os.pread(fd, 4096, 7 * MiB) == data[7 * MiB : 7 * MiB + 4096]
    finally:
        os.close(fd)
    assert sum(op == "write" for op, *_ in faults.hits()[hits:]) >= 5
    assert m.alive()
    faults.clear()


def test_read_and_write_errors_reach_the_caller(setup: tuple[Mounted, Faults]) -> None:
    """Reads: EIO, never wrong bytes; then writes: EIO to the writer (one mount)."""
    m, faults = setup
    volume = m.mount()
    data = fill(volume, 8 * MiB)
    bad = (3 * MiB + 8 * KiB, 3 * MiB + 12 * KiB)  # one page of the container
    faults.set(f"read EIO {bad[0]} {bad[1]}")
    fd = os.open(volume, os.O_RDONLY)
    try:
        # small, sub-sector, sector and large reads over the bad page: EIO
        for off, size in [
            (bad[0], 4 * KiB),
            (bad[0] + 100, 17),
            (bad[0] - 512, 1024),
            (3 * MiB, MiB),
        ]:
            assert errno_of(os.pread, fd, size, off) == errno.EIO, (off, size)
        # a read the kernel splits into 1 MiB requests: the good first part, then a
        # short count (the POSIX way to report an error after some bytes)
        got = os.pread(fd, 2 * MiB, 2 * MiB + 4 * KiB)
        assert got == data[2 * MiB + 4 * KiB : 2 * MiB + 4 * KiB + len(got)]
        assert 2 * MiB + 4 * KiB + len(got) <= bad[0]
        # a sequential 1 MiB stream (read-ahead) over the whole volume: every read that
        # meets the bad page fails, every other one gives the right bytes
        for off in range(0, 8 * MiB, MiB):
            if off < bad[1] and bad[0] < off + MiB:
                assert errno_of(os.pread, fd, MiB, off) == errno.EIO
            else:
                assert os.pread(fd, MiB, off) == data[off : off + MiB], off
        # right next to it
        assert os.pread(fd, 8 * KiB, bad[0] - 8 * KiB) == data[bad[0] - 8 * KiB : bad[0]]
        assert os.pread(fd, 8 * KiB, bad[1]) == data[bad[1] : bad[1] + 8 * KiB]
        assert any(op == "read" for op, *_ in faults.hits())
        faults.clear()  # the disk recovered: the same reads succeed
        assert os.pread(fd, MiB, 3 * MiB) == data[3 * MiB : 4 * MiB]
    finally:
        os.close(fd)
    assert m.alive()
    assert "failed" in m.log()
    check_write_errors(m, faults, volume, data)
    m.unmount()


def test_lost_written_behind_write_fails_every_fsync(setup: tuple[Mounted, Faults]) -> None:
    """PostgreSQL's fsyncgate: the second fsync must not return 0 after a lost write."""
    m, faults = setup
    volume = m.mount()
    data = fill(volume, 8 * MiB)
    faults.set(f"write EIO {4 * MiB} {5 * MiB}")
    fd = os.open(volume, os.O_RDWR)
    try:
        # 1 MiB, whole sectors: answered before its pwrite (write-behind), so the writer
        # cannot hear of the failure; fsync must
        # (from a page-aligned buffer: the kernel cuts an unaligned one's request at a
        # page boundary, and a piece that is not whole sectors is written at once)
        assert os.pwrite(fd, aligned(b"\x5a" * MiB), 4 * MiB) == MiB
        for attempt in range(3):
            assert errno_of(os.fsync, fd) == errno.EIO, f"fsync #{attempt + 1} returned 0"
        # the sectors hold what was there before the answered write: reading them, or
        # merging a partial write into them, fails instead of giving those old bytes
        assert errno_of(os.pread, fd, MiB, 4 * MiB) == errno.EIO
        assert errno_of(os.pread, fd, 100, 4 * MiB + 1000) == errno.EIO
        assert errno_of(os.pread, fd, 8 * KiB, 4 * MiB - 4 * KiB) == errno.EIO
        assert errno_of(os.pwrite, fd, b"rmw", 4 * MiB + 511) == errno.EIO
        assert os.pread(fd, 4 * KiB, 4 * MiB - 4 * KiB) == data[4 * MiB - 4 * KiB : 4 * MiB]
        # the disk recovered; rewriting part of the range makes that part readable, the
        # rest still fails, and so does every fsync: not all answered data is there
        faults.clear()
        new = os.urandom(256 * KiB)
        assert os.pwrite(fd, aligned(new), 4 * MiB) == len(new)  # written behind
        # a partial sector in the lost part: its other bytes are unknown, so it fails
        assert errno_of(os.pwrite, fd, b"small", 4 * MiB + 256 * KiB + 3) == errno.EIO
        assert os.pwrite(fd, b"s" * 512, 5 * MiB - 512) == 512  # C, whole sector
        assert os.pread(fd, len(new), 4 * MiB) == new
        assert os.pread(fd, 512, 5 * MiB - 512) == b"s" * 512
        assert errno_of(os.pread, fd, 4096, 4 * MiB + 512 * KiB) == errno.EIO
        os.pwrite(fd, b"later" * 100, 100)
        assert errno_of(os.fsync, fd) == errno.EIO
        assert errno_of(os.fdatasync, fd) == errno.EIO
    finally:
        assert errno_of(os.close, fd) == errno.EIO  # close's FLUSH reports it too
    assert any(op == "write" for op, *_ in faults.hits())
    # another opener's fsync hears of it as well
    fd = os.open(volume, os.O_RDWR)
    try:
        assert errno_of(os.fsync, fd) == errno.EIO
        # the daemon still serves the rest of the volume
        assert os.pread(fd, MiB, 6 * MiB) == data[6 * MiB : 7 * MiB]
    finally:
        errno_of(os.close, fd)
    assert m.alive()
    assert "every sync fails until remounted" in m.log()
    m.unmount()
    # after a remount the volume is usable again: the rewrites are there, the lost
    # write is not
    volume = m.mount()
    with open(volume, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(MiB) == new + data[4 * MiB + len(new) : 5 * MiB - 512] + b"s" * 512
    fd = os.open(volume, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x5a" * MiB, 4 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.unmount()


def test_failed_container_fsync_sticks(setup: tuple[Mounted, Faults]) -> None:
    m, faults = setup
    volume = m.mount()
    fill(volume, MiB)
    faults.set("fsync EIO 1")  # one failed fsync of the container, then it "works"
    fd = os.open(volume, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, 0)  # through the container's page cache
        assert errno_of(os.fsync, fd) == errno.EIO
        # the kernel has forgotten the error (and the pages); we have not
        assert errno_of(os.fsync, fd) == errno.EIO
        assert errno_of(os.fsync, fd) == errno.EIO
    finally:
        errno_of(os.close, fd)
    assert [op for op, *_ in faults.hits()] == ["fsync"]
    m.unmount()


def test_failed_writeback_of_an_mmap_sticks(setup: tuple[Mounted, Faults]) -> None:
    """``-o page_cache``: the kernel writes an mmap's dirty pages back later; the
    application hears of a failure from one fsync (the kernel's), and of the lost data
    from every one after it (ours)."""
    m, faults = setup
    m.mount_options = ["-o", "page_cache"]
    volume = m.mount()
    faults.set(f"write EIO {MiB} {2 * MiB}")
    with open(volume, "r+b") as f:
        with mmap.mmap(f.fileno(), 4 * MiB, flags=mmap.MAP_SHARED) as mapping:
            mapping[MiB : MiB + 8192] = b"m" * 8192
            mapping[3 * MiB : 3 * MiB + 10] = b"0123456789"
            assert errno_of(mapping.flush) == errno.EIO
        for attempt in range(3):
            assert errno_of(os.fsync, f.fileno()) == errno.EIO, f"fsync #{attempt + 1}"
        faults.clear()
        assert errno_of(os.fsync, f.fileno()) == errno.EIO
        try:
            f.close()
        except OSError:
            pass
    assert any(op == "write" for op, *_ in faults.hits())
    assert "written-back write" in m.log()
    assert m.alive()
    m.unmount()


def test_short_reads_and_writes_change_nothing(setup: tuple[Mounted, Faults]) -> None:
    m, faults = setup
    volume = m.mount()
    model = bytearray(fill(volume, 8 * MiB))
    faults.set(f"any short 0 {8 * MiB}")  # every transfer of the container comes up short
    fd = os.open(volume, os.O_RDWR)
    try:
        for off, size in [
            (0, MiB),
            (MiB + 777, 1000),
            (2 * MiB, 4096),
            (3 * MiB + 512, 512),
            (4 * MiB, 256 * KiB),
            (5 * MiB - 100, 300 * KiB),
        ]:
            chunk = os.urandom(size)
            assert os.pwrite(fd, chunk, off) == size
            model[off : off + size] = chunk
        os.fsync(fd)
        for off in range(0, 8 * MiB, MiB):
            assert os.pread(fd, MiB, off) == model[off : off + MiB], off
        assert os.pread(fd, 1000, MiB + 777) == model[MiB + 777 : MiB + 1777]
    finally:
        os.close(fd)
    shorts = [h for h in faults.hits() if h[1] == 0]
    assert {op for op, *_ in shorts} == {"read", "write"}
    faults.clear()
    m.unmount()
    volume = m.mount()
    assert volume.read_bytes() == model
    m.unmount()


def test_disk_gone_daemon_survives(setup: tuple[Mounted, Faults]) -> None:
    """Every container call fails (a removed disk: ENXIO); the daemon keeps answering."""
    m, faults = setup
    volume = m.mount()
    fill(volume, MiB)
    faults.set(f"any ENXIO 0 {1 << 62}", "fsync ENXIO")
    fd = os.open(volume, os.O_RDWR)
    try:
        for size in (512, 4096, MiB):
            assert errno_of(os.pread, fd, size, 0) == errno.EIO
            assert errno_of(os.pwrite, fd, b"\0" * size, 0) == errno.EIO
        assert errno_of(os.fsync, fd) == errno.EIO
        assert volume.stat().st_size == 8 * MiB  # metadata still answered
        assert m.alive()
    finally:
        errno_of(os.close, fd)
    # the unmount does not hang on the dead container: the daemon logs and exits
    m.unmount()


def test_enospc_on_a_full_container_file_system(
    shim: Path,
    stack: Stack,  # noqa: F811 - the fixture of test_e2e_mount
    cli_env: dict[str, str],
    repo: Path,
    tmp_path: Path,
) -> None:
    """A sparse 24 MiB container on a 4 MiB tmpfs: writes run out of space."""
    small = tmp_path / "small"
    small.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small)
    stack.push(f"mount {small}", lambda: sh("umount", "-l", small, check=False) and None)
    container = make_container(small / "sparse.img", 24 * MiB)
    cf = Cryptfuse(stack, cli_env, repo)
    m = Mounted(cf, Faults(shim, tmp_path, container), container, tmp_path / "mnt")
    volume = m.mount()
    answered: dict[int, bytes] = {}
    fd = os.open(volume, os.O_RDWR)
    failed_writes = 0
    try:
        for off in range(0, 12 * MiB, 512 * KiB):  # written behind (>= 128 KiB)
            chunk = os.urandom(512 * KiB)
            try:
                os.pwrite(fd, aligned(chunk), off)
                answered[off] = chunk
            except OSError as exc:
                assert exc.errno in (errno.EIO, errno.ENOSPC)
                failed_writes += 1
        first = errno_of(os.fsync, fd)
        second = errno_of(os.fsync, fd)
    finally:
        errno_of(os.close, fd)
    assert m.alive()
    m.unmount()
    volume = m.mount()
    with open(volume, "rb") as f:
        lost = [
            off for off, chunk in answered.items() if (f.seek(off), f.read(len(chunk)))[1] != chunk
        ]
    m.unmount()
    # 12 MiB of answers do not fit into 4 MiB: some answered write was lost (written
    # behind), and then no fsync may return 0
    assert lost, "every answered write reached the container? the tmpfs is larger than meant"
    assert first == errno.EIO and second == errno.EIO, (first, second, failed_writes)


def test_lazily_unmounted_container_file_system(
    shim: Path,
    stack: Stack,  # noqa: F811 - the fixture of test_e2e_mount
    cli_env: dict[str, str],
    repo: Path,
    tmp_path: Path,
) -> None:
    """The container's file system is detached under the daemon (umount -l).

    Linux keeps a lazily unmounted file system alive while a descriptor of it is open:
    the daemon, which holds the container open, goes on serving and syncing it.
    """
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", fsdir)
    stack.push(f"mount {fsdir}", lambda: sh("umount", "-l", fsdir, check=False) and None)
    container = make_container(fsdir / "plain.img", 8 * MiB)
    m = Mounted(
        Cryptfuse(stack, cli_env, repo),
        Faults(shim, tmp_path, container),
        container,
        tmp_path / "mnt",
    )
    volume = m.mount()
    data = fill(volume, 8 * MiB)
    sh("umount", "-l", fsdir)
    assert not os.path.exists(container)
    fd = os.open(volume, os.O_RDWR)
    try:
        assert os.pread(fd, MiB, 2 * MiB) == data[2 * MiB : 3 * MiB]
        os.pwrite(fd, b"after" * 1000, 12345)
        os.fsync(fd)
        assert os.pread(fd, 5000, 12345) == b"after" * 1000
    finally:
        os.close(fd)
    assert m.alive()
    m.unmount()


def test_ext4_on_top_sees_the_errors(
    setup: tuple[Mounted, Faults],
    stack: Stack,  # noqa: F811 - the fixture of test_e2e_mount
    tmp_path: Path,
) -> None:
    need("losetup", "mkfs.ext4")
    m, faults = setup
    volume = m.mount()
    loop = losetup(stack, volume)
    sh("mkfs.ext4", "-q", "-F", loop)
    ext = tmp_path / "ext"
    mount_fs(stack, loop, ext, "-o", "errors=remount-ro")
    kept = os.urandom(300 * KiB)
    (ext / "kept.bin").write_bytes(kept)
    fd = os.open(ext / "kept.bin", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.sync()
    # reads of the container fail: a read of the file's data (O_DIRECT: past ext4's
    # cache and the loop device, to the daemon) fails, it does not return other bytes
    faults.set(f"read EIO 0 {1 << 62}")
    fd = os.open(ext / "kept.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(kept) + 4096)
        assert errno_of(os.preadv, fd, [buf], 0) == errno.EIO
    finally:
        os.close(fd)
    assert any(op == "read" for op, *_ in faults.hits())
    # from now on no write reaches the container
    faults.set(f"write EIO 0 {1 << 62}")
    failures = 0
    for i in range(4):
        try:
            fd = os.open(ext / f"new{i}.bin", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, os.urandom(200 * KiB))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            assert exc.errno in (errno.EIO, errno.EROFS), exc
            print(f"ext4: new{i}.bin: {exc}")
            failures += 1
    options = sh("findmnt", "-n", "-o", "OPTIONS", ext).stdout.decode().strip()
    print(f"ext4: {failures} of 4 fsync'd files failed; mount options now {options}")
    assert failures > 0, "ext4 reported no error although nothing reached the container"
    assert any(op == "write" for op, *_ in faults.hits())
    faults.clear()
    stack.pop(f"mount {ext}")
    stack.pop(f"loop {loop}")
    assert m.alive()
    m.unmount()
    # what was fsync'd before the fault is there (the journal replays at mount)
    volume = m.mount()
    mount_fs(stack, volume, ext, "-o", "loop")
    assert (ext / "kept.bin").read_bytes() == kept
    stack.pop(f"mount {ext}")
    fsck = sh("e2fsck", "-fn", volume, check=False)
    print(f"ext4: e2fsck -fn after the replay: {fsck.returncode}")
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    m.unmount()
