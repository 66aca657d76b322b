"""The FUSE operations, called in-process (no mount): attributes, I/O, errno mapping."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import trio

from cryptfuse.errors import DeviceError
from cryptfuse.fs import FILE_INODE, ROOT_INODE, FSOptions, VolumeFS
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec
from cryptfuse.volume import Volume

SIZE = 64 * 1024
DATA_OFFSET = 4096
KEY = bytes(range(64))


@dataclass
class Ctx:
    """Stand-in for pyfuse3.RequestContext (which cannot be built from Python)."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


def ctx(**kw: int) -> pyfuse3.RequestContext:
    return cast(pyfuse3.RequestContext, Ctx(**kw))


class CountingVolume(Volume):
    """A real Volume that counts sync() calls."""

    syncs = 0

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


def make_volume(path: Path, *, readonly: bool = False, sector_size: int = 512) -> CountingVolume:
    if not path.exists():
        path.write_bytes(os.urandom(DATA_OFFSET + SIZE + 512))
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), KEY, sector_size)
    return CountingVolume(fd, cipher, DATA_OFFSET, SIZE, readonly=readonly)


@pytest.fixture
def container(tmp_path: Path) -> Path:
    return tmp_path / "container.img"


@pytest.fixture
def volume(container: Path) -> Iterator[CountingVolume]:
    vol = make_volume(container)
    yield vol
    vol.close()


@pytest.fixture
def ops(volume: CountingVolume) -> VolumeFS:
    return VolumeFS(volume)


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


# -- attributes ------------------------------------------------------------------------


@pytest.mark.trio
async def test_file_attributes(ops: VolumeFS) -> None:
    attr = await ops.getattr(FILE_INODE, ctx())
    assert stat.S_ISREG(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o600
    assert attr.st_size == SIZE
    assert (attr.st_uid, attr.st_gid) == (os.getuid(), os.getgid())
    assert attr.st_nlink == 1
    assert attr.st_blocks * 512 >= SIZE


@pytest.mark.trio
async def test_root_attributes(ops: VolumeFS) -> None:
    attr = await ops.getattr(ROOT_INODE, ctx())
    assert stat.S_ISDIR(attr.st_mode)
    assert stat.S_IMODE(attr.st_mode) == 0o700


@pytest.mark.trio
async def test_options_change_name_owner_and_mode(volume: CountingVolume) -> None:
    ops = VolumeFS(volume, FSOptions(name="disk.img", uid=1234, gid=5678, file_mode=0o640))
    attr = await ops.lookup(ROOT_INODE, b"disk.img", ctx())
    assert attr.st_ino == FILE_INODE
    assert (attr.st_uid, attr.st_gid, stat.S_IMODE(attr.st_mode)) == (1234, 5678, 0o640)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(ROOT_INODE, b"volume", ctx())
    assert fuse_errno(exc) == errno.ENOENT


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_invalid_names_are_refused(volume: CountingVolume, name: str) -> None:
    with pytest.raises(ValueError):
        VolumeFS(volume, FSOptions(name=name))


@pytest.mark.trio
async def test_lookup(ops: VolumeFS) -> None:
    assert (await ops.lookup(ROOT_INODE, b"volume", ctx())).st_ino == FILE_INODE
    for name, code in ((b"other", errno.ENOENT),):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(ROOT_INODE, name, ctx())
        assert fuse_errno(exc) == code
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.lookup(FILE_INODE, b"x", ctx())
    assert fuse_errno(exc) == errno.ENOTDIR


@pytest.mark.trio
async def test_readdir(ops: VolumeFS, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, int, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        seen.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(ROOT_INODE, ctx())
    await ops.readdir(fh, 0, cast(pyfuse3.ReaddirToken, None))
    assert seen == [(b".", ROOT_INODE, 1), (b"..", ROOT_INODE, 2), (b"volume", FILE_INODE, 3)]
    seen.clear()
    await ops.readdir(fh, 2, cast(pyfuse3.ReaddirToken, None))
    assert seen == [(b"volume", FILE_INODE, 3)]
    seen.clear()
    await ops.readdir(fh, 3, cast(pyfuse3.ReaddirToken, None))
    assert seen == []
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.opendir(FILE_INODE, ctx())
    assert fuse_errno(exc) == errno.ENOTDIR


@pytest.mark.trio
async def test_statfs(ops: VolumeFS) -> None:
    st = await ops.statfs(ctx())
    assert st.f_frsize * st.f_blocks == SIZE
    assert st.f_bfree == st.f_bavail == 0
    assert st.f_namemax == 255


# -- I/O ------------------------------------------------------------------------------------


@pytest.mark.trio
async def test_read_write_odd_offsets_match_a_bytearray(
    ops: VolumeFS, volume: CountingVolume, container: Path
) -> None:
    model = bytearray(await ops.read(0, 0, SIZE))
    assert len(model) == SIZE
    fi = await ops.open(FILE_INODE, os.O_RDWR, ctx())
    for offset, length in (
        (0, 1),
        (1, 510),
        (511, 2),
        (1000, 5000),
        (SIZE - 3, 3),
        (4095, 4098),
        (7, 0),
    ):
        data = os.urandom(length)
        assert await ops.write(fi.fh, offset, data) == length
        model[offset : offset + length] = data
        assert await ops.read(fi.fh, offset, length) == data
    await ops.fsync(fi.fh, False)
    assert await ops.read(fi.fh, 0, SIZE) == model
    # An independent Volume over the same container sees the same plaintext.
    other = make_volume(container, readonly=True)
    try:
        assert other.read(0, SIZE) == model
    finally:
        other.close()


@pytest.mark.trio
async def test_read_at_and_past_the_end(ops: VolumeFS) -> None:
    assert len(await ops.read(0, SIZE - 10, 100)) == 10
    assert await ops.read(0, SIZE, 100) == b""
    assert await ops.read(0, SIZE + 4096, 100) == b""


@pytest.mark.trio
async def test_write_past_the_end_is_enospc(ops: VolumeFS) -> None:
    assert await ops.write(0, SIZE - 5, b"x" * 20) == 5  # short write at the end
    for offset in (SIZE, SIZE + 1, SIZE * 2):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.write(0, offset, b"x")
        assert fuse_errno(exc) == errno.ENOSPC


@pytest.mark.trio
async def test_concurrent_writes_to_one_sector_keep_every_byte(ops: VolumeFS) -> None:
    async def put(i: int) -> None:
        await ops.write(0, 1024 + i, bytes([i]))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(put, i)
    assert await ops.read(0, 1024, 200) == bytes(range(200))


@pytest.mark.trio
async def test_flush_and_fsync_sync_only_when_dirty(ops: VolumeFS, volume: CountingVolume) -> None:
    await ops.flush(1)
    assert volume.syncs == 0
    await ops.write(1, 0, b"abc")
    await ops.flush(1)
    assert volume.syncs == 1
    await ops.fsync(1, True)
    assert volume.syncs == 1
    await ops.write(1, 0, b"abc")
    await ops.fsync(1, False)
    assert volume.syncs == 2


# -- read-only ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_read_only_volume(container: Path) -> None:
    make_volume(container).close()
    vol = make_volume(container, readonly=True)
    try:
        ops = VolumeFS(vol)
        fi = await ops.open(FILE_INODE, os.O_RDONLY, ctx())
        assert len(await ops.read(fi.fh, 0, 4096)) == 4096
        for flags in (os.O_WRONLY, os.O_RDWR):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.open(FILE_INODE, flags, ctx())
            assert fuse_errno(exc) == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.write(fi.fh, 0, b"x")
        assert fuse_errno(exc) == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.create(ROOT_INODE, b"new", 0o600, os.O_RDWR, ctx())
        assert fuse_errno(exc) == errno.EROFS
    finally:
        vol.close()


# -- setattr -------------------------------------------------------------------------------


class Fields:
    """Duck-typed SetattrFields: only the flags setattr reads."""

    def __init__(self, **flags: bool) -> None:
        for name in (
            "update_atime",
            "update_mtime",
            "update_ctime",
            "update_mode",
            "update_uid",
            "update_gid",
            "update_size",
        ):
            setattr(self, name, flags.get(name, False))


def fields(**flags: bool) -> pyfuse3.SetattrFields:
    return cast(pyfuse3.SetattrFields, Fields(**flags))


@pytest.mark.trio
async def test_truncate_only_to_the_same_size(ops: VolumeFS) -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = SIZE
    result = await ops.setattr(FILE_INODE, attr, fields(update_size=True), None, ctx())
    assert result.st_size == SIZE
    for size in (0, SIZE - 512, SIZE + 512):
        attr.st_size = size
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.setattr(FILE_INODE, attr, fields(update_size=True), None, ctx())
        assert fuse_errno(exc) == errno.EPERM


@pytest.mark.trio
async def test_chmod_by_owner_and_chown_by_root_only(ops: VolumeFS) -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o644
    result = await ops.setattr(FILE_INODE, attr, fields(update_mode=True), None, ctx())
    assert result.st_mode == stat.S_IFREG | 0o644
    # The file type never changes, whatever chmod sends.
    attr.st_mode = stat.S_IFDIR | 0o600
    result = await ops.setattr(FILE_INODE, attr, fields(update_mode=True), None, ctx())
    assert result.st_mode == stat.S_IFREG | 0o600
    stranger = ctx(uid=os.getuid() + 4242)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setattr(FILE_INODE, attr, fields(update_mode=True), None, stranger)
    assert fuse_errno(exc) == errno.EPERM
    attr.st_uid = 4242
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await ops.setattr(FILE_INODE, attr, fields(update_uid=True), None, ctx(uid=1000))
    assert fuse_errno(exc) == errno.EPERM
    result = await ops.setattr(FILE_INODE, attr, fields(update_uid=True), None, ctx(uid=0))
    assert result.st_uid == 4242


@pytest.mark.trio
async def test_utimens(ops: VolumeFS) -> None:
    attr = pyfuse3.EntryAttributes()
    attr.st_atime_ns = 1_000_000_000
    attr.st_mtime_ns = 2_000_000_000
    result = await ops.setattr(
        FILE_INODE, attr, fields(update_atime=True, update_mtime=True), None, ctx()
    )
    assert (result.st_atime_ns, result.st_mtime_ns) == (1_000_000_000, 2_000_000_000)


@pytest.mark.trio
async def test_directory_changes_are_refused(ops: VolumeFS) -> None:
    for call in (
        ops.create(ROOT_INODE, b"x", 0o600, os.O_RDWR, ctx()),
        ops.mkdir(ROOT_INODE, b"x", 0o700, ctx()),
        ops.unlink(ROOT_INODE, b"volume", ctx()),
        ops.rename(ROOT_INODE, b"volume", ROOT_INODE, b"y", 0, ctx()),
    ):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await call
        assert fuse_errno(exc) == errno.EPERM


# -- error mapping ------------------------------------------------------------------------------


class BrokenVolume:
    """A volume whose I/O fails the way a dying disk or a bug would."""

    size = SIZE
    sector_size = 512
    readonly = False

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def read(self, offset: int, length: int) -> bytes:
        raise self.exc

    def write(self, offset: int, data: bytes) -> int:
        raise self.exc

    def sync(self) -> None:
        raise self.exc


@pytest.mark.trio
@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(
            DeviceError("read of 4096 bytes at 8192 failed: Input/output error"), id="device-error"
        ),
        pytest.param(OSError(errno.EIO, "Input/output error"), id="oserror"),
        pytest.param(ValueError("a bug"), id="bug"),
    ],
)
async def test_failures_become_eio_and_are_logged_with_context(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    ops = VolumeFS(cast(Volume, BrokenVolume(exc)))
    caplog.set_level(logging.DEBUG, logger="cryptfuse.fs")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.read(0, 12345, 678)
    assert fuse_errno(info) == errno.EIO
    assert "678 bytes at 12345" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.write(0, 512, b"x" * 3)
    assert fuse_errno(info) == errno.EIO
    assert "3 bytes at 512" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.flush(0)
    assert fuse_errno(info) == errno.EIO
    # A failed sync stays pending: the next fsync tries again.
    with pytest.raises(pyfuse3.FUSEError):
        await ops.fsync(0, False)


@pytest.mark.trio
async def test_a_failed_volume_fails_every_sync_even_without_writes(
    ops: VolumeFS, volume: CountingVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsyncgate: the container's fsync fails once (the kernel forgets it then); every
    later flush/fsync of the volume fails too, with or without new writes."""
    fi = await ops.open(FILE_INODE, os.O_RDWR, ctx())
    await ops.write(fi.fh, 0, b"data")
    real_fsync = os.fsync
    calls = []

    def fsync_once_failing(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_once_failing)
    for call in (ops.fsync(fi.fh, False), ops.flush(fi.fh), ops.fsync(fi.fh, True)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert fuse_errno(info) == errno.EIO
    assert volume.failed is not None and "fsync of the container failed" in volume.failed
    assert len(calls) == 1  # the later syncs fail without asking the kernel again
    with pytest.raises(DeviceError, match="every sync fails until remounted"):
        volume.close()


def test_fail_marks_the_volume_failed(volume: CountingVolume) -> None:
    assert volume.failed is None
    volume.sync()
    volume.fail("a written-back write was lost")
    volume.fail("a second reason does not replace the first")
    with pytest.raises(DeviceError, match="a written-back write was lost"):
        volume.sync()
    assert volume.failed == "a written-back write was lost"
    with pytest.raises(DeviceError):
        volume.close()  # its final sync too
