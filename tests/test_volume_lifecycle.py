"""Volume.discard, Volume.seek, Volume.resize and the file system's fallocate/lseek rules,
in process (no mount): a bytearray model, the container's holes, resizes under I/O."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pyfuse3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptfuse.errors import DeviceError, ReadOnlyError, UsageError
from cryptfuse.fs import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    VolumeFS,
)
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec
from cryptfuse.volume import Volume, container_holes

KEY = bytes(range(64))
SIZE = 256 * 1024


def make(
    path: Path, *, offset: int = 0, sector_size: int = 512, size: int = SIZE, ro: bool = False
) -> Volume:
    """A plain AES-XTS volume over a sparse file (so it starts as one hole)."""
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(offset + size)
    fd = os.open(path, os.O_RDONLY if ro else os.O_RDWR)
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), KEY, sector_size)
    return Volume(fd, cipher, offset, size, readonly=ro)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "discard"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 40_000),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=ops,
    offset=st.sampled_from([0, 512, 4096, 1536]),
    sector_size=st.sampled_from([512, 4096]),
)
def test_discard_and_write_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, bytes]],
    offset: int, sector_size: int,
) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("v") / "c.img"
    with make(path, offset=offset, sector_size=sector_size) as v:
        v.enable_discards()
        assert v.read(0, SIZE) == bytes(SIZE)  # a sparse container reads as zeros
        model = bytearray(os.urandom(SIZE))
        v.write(0, model)
        for kind, at, length, pattern in ops:
            end = min(at + length, SIZE)
            if kind == "write":
                data = (pattern * (length // len(pattern) + 1))[: end - at]
                v.write(at, data)
                model[at:end] = data
            else:
                v.discard(at, length)
                model[at:end] = bytes(end - at)
        assert v.read(0, SIZE) == model
        # every hole of the container covers whole sectors that read as zeros
        for a, b in container_holes(v.fd, offset, offset + SIZE):
            first = -(-(a - offset) // sector_size) * sector_size
            last = (b - offset) // sector_size * sector_size
            assert model[first:last] == bytes(max(0, last - first))
        # SEEK_DATA/SEEK_HOLE report holes only where the model has zeros
        position = 0
        while position < SIZE:
            hole = v.seek(position, os.SEEK_HOLE)
            assert hole % sector_size == 0 or hole == SIZE
            if hole >= SIZE:
                break
            try:
                data_at = v.seek(hole, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                data_at = SIZE
            assert data_at > hole and model[hole:data_at] == bytes(data_at - hole)
            position = data_at


def test_discard_punches_aligned_blocks_and_zeroes_the_rest(tmp_path: Path) -> None:
    with make(tmp_path / "c.img") as v:
        v.enable_discards()
        v.write(0, os.urandom(SIZE))
        v.sync()
        allocated = os.stat(tmp_path / "c.img").st_blocks
        v.discard(1000, 100_000)  # unaligned at both ends
        v.sync()
        assert os.stat(tmp_path / "c.img").st_blocks < allocated
        holes = container_holes(v.fd, 0, SIZE)
        assert holes == [(4096, 96 * 1024)]  # whole 4 KiB blocks only
        assert v.read(1000, 100_000) == bytes(100_000)
        assert v.read(0, 1000) != bytes(1000)


def test_without_discards_holes_read_like_dm_crypt(tmp_path: Path) -> None:
    with make(tmp_path / "c.img") as v:
        noise = v.read(0, 4096)
        assert noise != bytes(4096)  # zeros decrypted: what dm-crypt returns for a hole
        cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), KEY, 512)
        assert noise == bytes(cipher.decrypt(bytes(4096), 0))
        assert v.seek(0, os.SEEK_HOLE) == SIZE and v.seek(100, os.SEEK_DATA) == 100
        with pytest.raises(OSError):
            v.seek(SIZE, os.SEEK_DATA)


def test_resize_bounds(tmp_path: Path) -> None:
    with make(tmp_path / "c.img", offset=4096) as v:
        with pytest.raises(DeviceError):
            v.resize(SIZE + 512)  # past the container
        with pytest.raises(UsageError):
            v.resize(1000)  # not whole sectors
        with pytest.raises(UsageError):
            v.resize(-512)
        v.resize(0)
        assert v.read(0, 10) == b""
        with open(tmp_path / "c.img", "r+b") as f:
            f.truncate(4096 + 2 * SIZE)
        v.resize(2 * SIZE)
        assert len(v.read(0, 3 * SIZE)) == 2 * SIZE
    with make(tmp_path / "c.img", offset=4096, ro=True) as v, pytest.raises(ReadOnlyError):
        v.resize(SIZE)


def test_resize_while_io_is_in_flight(tmp_path: Path) -> None:
    """Grow and shrink 30 times while threads write and read the first 64 KiB: no request
    fails, none is lost (the range lock waits for them)."""
    with open(tmp_path / "c.img", "wb") as f:
        f.truncate(2 * SIZE)
    with make(tmp_path / "c.img") as v:
        stop = threading.Event()
        errors: list[BaseException] = []
        last: dict[int, bytes] = {}
        done = [0] * 4

        def worker(index: int) -> None:
            try:
                while not stop.is_set():
                    data = bytes([index]) * 3000 + done[index].to_bytes(4, "little")
                    at = index * 16384 + 7
                    assert v.write(at, data) == len(data)
                    assert v.read(at, len(data)) == data
                    last[index] = data
                    done[index] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        resizes = 0
        try:  # at least 30 resizes, and until every worker got 50 requests between them
            while (resizes < 30 or min(done) < 50) and not errors and resizes < 100_000:
                v.resize(2 * SIZE if resizes % 2 == 0 else SIZE // 2)
                resizes += 1
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        for index, data in last.items():
            assert v.read(index * 16384 + 7, len(data)) == data


def test_fs_fallocate_and_lseek_rules(tmp_path: Path) -> None:
    with make(tmp_path / "c.img") as v:
        fs = VolumeFS(v)
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        for mode in (punch, FALLOC_FL_ZERO_RANGE, 0):
            with pytest.raises(pyfuse3.FUSEError) as raised:
                fs.fallocate_now(0, 4096, mode)
            assert raised.value.errno == errno.EOPNOTSUPP  # no discards: refused
        with pytest.raises(pyfuse3.FUSEError) as raised:
            fs.lseek_now(0, os.SEEK_HOLE)
        assert raised.value.errno == errno.ENOSYS  # the kernel's generic answer then
        v.enable_discards()
        v.write(0, b"\xff" * 8192)
        with pytest.raises(pyfuse3.FUSEError) as raised:
            fs.fallocate_now(0, 4096, 0)  # allocation: nothing to do for a volume
        assert raised.value.errno == errno.EOPNOTSUPP
        with pytest.raises(pyfuse3.FUSEError) as raised:
            fs.fallocate_now(SIZE - 512, 4096, FALLOC_FL_ZERO_RANGE)  # would grow the file
        assert raised.value.errno == errno.EFBIG
        fs.fallocate_now(512, 1024, punch)
        fs.fallocate_now(SIZE - 512, 4096, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        assert v.read(0, 2048) == b"\xff" * 512 + bytes(1024) + b"\xff" * 512
        assert fs.counters["discards"] == 2 and fs.counters["discarded_bytes"] == 1024 + 512
        assert fs.lseek_now(0, os.SEEK_DATA) == 0
        with pytest.raises(pyfuse3.FUSEError) as raised:
            fs.lseek_now(SIZE, os.SEEK_DATA)
        assert raised.value.errno == errno.ENXIO
    with make(tmp_path / "c.img", ro=True) as v:
        v.enable_discards()
        with pytest.raises(pyfuse3.FUSEError) as raised:
            VolumeFS(v).fallocate_now(0, 512, punch)
        assert raised.value.errno == errno.EROFS


@pytest.mark.root
def test_discard_on_a_block_device_container(tmp_path: Path) -> None:
    """A block device takes the discard (fallocate PUNCH_HOLE zeroes it): here a loop
    device, which in turn punches its backing file."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup not installed")
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, check=True, text=True
    ).stdout.strip()
    try:
        fd = os.open(loop, os.O_RDWR)
        cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), KEY, 512)
        with Volume(fd, cipher, 0, SIZE) as v:
            v.enable_discards()
            v.write(0, os.urandom(SIZE))
            v.sync()
            before = os.stat(backing).st_blocks
            v.discard(4096 + 512, 128 * 1024)
            v.sync()
            assert v.read(4096 + 512, 128 * 1024) == bytes(128 * 1024)
            assert v.read(0, 4096 + 512) != bytes(4096 + 512)
            assert os.stat(backing).st_blocks < before  # the discard reached the disk
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
