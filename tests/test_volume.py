"""Volume read/write against a bytearray model, and the container against the oracle."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptfuse import volume
from cryptfuse.errors import BusyError, DeviceError, OutOfRangeError, ReadOnlyError
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec
from cryptfuse.volume import Volume, open_device

SPECS = [
    ("aes-xts-plain64", 64),
    ("aes-cbc-essiv:sha256", 32),
    ("aes-cbc-plain", 16),
    ("aes:2-cbc-plain64", 64),
    ("camellia-xts-plain64", 32),
    ("aes-ecb", 16),
    ("blowfish-cbc-plain64", 16),
]


def _make(
    path: Path,
    spec: str,
    key: bytes,
    sector_size: int,
    offset: int,
    sectors: int,
    iv_offset: int = 0,
) -> Volume:
    path.write_bytes(os.urandom(offset + sectors * sector_size + 1000))
    cipher = SectorCipher(parse_cipher_spec(spec), key, sector_size, iv_offset)
    return Volume(open_device(str(path), False, lock=False), cipher, offset, sectors * sector_size)


ops = st.lists(
    st.tuples(
        st.booleans(), st.integers(0, 9000), st.integers(0, 3000), st.binary(min_size=1, max_size=1)
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    case=st.sampled_from(SPECS),
    sector_size=st.sampled_from([512, 1024, 4096]),
    offset=st.integers(0, 3).map(lambda k: k * 512 + (7 if k == 3 else 0)),
    iv_offset=st.integers(0, 100),
    operations=ops,
)
def test_volume_behaves_like_bytearray(
    tmp_path: Path,
    case: tuple[str, int],
    sector_size: int,
    offset: int,
    iv_offset: int,
    operations: list[tuple[bool, int, int, bytes]],
) -> None:
    spec, key_len = case
    key = hashlib.sha512(repr((spec, offset)).encode()).digest()[:key_len]
    path = tmp_path / "c.img"
    sectors = 9000 // sector_size + 1
    vol = _make(path, spec, key, sector_size, offset, sectors, iv_offset)
    model = bytearray(vol.read(0, vol.size))
    assert len(model) == vol.size
    with vol:
        for is_write, pos, length, fill in operations:
            if is_write:
                data = (fill * length) if length else b""
                if pos >= vol.size and data:
                    with pytest.raises(OutOfRangeError):
                        vol.write(pos, data)
                    continue
                written = vol.write(pos, data)
                assert written == min(len(data), max(0, vol.size - pos))
                model[pos : pos + written] = data[:written]
            else:
                assert vol.read(pos, length) == bytes(model[pos : pos + length])
        assert vol.read(0, vol.size) == bytes(model)
    # The container holds exactly the independent per-sector encryption of the model.
    raw = path.read_bytes()
    oracle = SectorCipher(parse_cipher_spec(spec), key, sector_size, iv_offset)
    assert raw[offset : offset + len(model)] == oracle.reference_encrypt(bytes(model), 0)


def test_readonly_and_bounds(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    path.write_bytes(bytes(8192))
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), os.urandom(64))
    vol = Volume(open_device(str(path), True), cipher, 0, 8192, readonly=True)
    with vol:
        with pytest.raises(ReadOnlyError):
            vol.write(0, b"x")
        assert vol.read(8192, 10) == b""
        assert len(vol.read(8000, 1000)) == 192
    assert path.read_bytes() == bytes(8192)


def test_short_container_is_a_device_error(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    path.write_bytes(bytes(1024))
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), os.urandom(64))
    with Volume(open_device(str(path), True), cipher, 0, 4096, readonly=True) as vol:
        with pytest.raises(DeviceError, match="short read"):
            vol.read(0, 4096)


def test_writable_opens_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "c.img"
    path.write_bytes(bytes(4096))
    fd = open_device(str(path), False)
    try:
        with pytest.raises(BusyError):
            open_device(str(path), False)
        with pytest.raises(BusyError):
            open_device(str(path), True)
    finally:
        os.close(fd)
    os.close(open_device(str(path), False))


def test_missing_device(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        open_device(str(tmp_path / "nope"), True)


def test_concurrent_partial_writes_lose_nothing(tmp_path: Path) -> None:
    """Threads write interleaved 3-byte pieces of the same sectors; all must land."""
    vol = _make(tmp_path / "c.img", "aes-xts-plain64", os.urandom(64), 512, 0, 8)
    threads = 6
    rounds = 120

    def worker(t: int) -> None:
        for r in range(rounds):
            pos = (r * threads + t) * 5
            vol.write(pos, bytes([t + 1]) * 3)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    data = vol.read(0, vol.size)
    for r in range(rounds):
        for t in range(threads):
            pos = (r * threads + t) * 5
            assert data[pos : pos + 3] == bytes([t + 1]) * 3
    vol.close()


@pytest.mark.parametrize("refused", [False, True])
def test_durable_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: bool) -> None:
    """pwrite_all(durable=True) writes with RWF_DSYNC (that range made durable, not the
    file's other dirty pages); where the kernel refuses the flag, a write then an
    fdatasync."""
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    calls: list[str] = []
    real_pwritev, real_pwrite, real_fdatasync = os.pwritev, os.pwrite, os.fdatasync

    def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(f"pwritev {flags == os.RWF_DSYNC}")
        if refused:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_pwritev(fd, buffers, offset, flags)

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        calls.append("pwrite")
        return real_pwrite(fd, data, offset)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    fd = os.open(path, os.O_RDWR)
    try:
        volume.pwrite_all(fd, b"x" * 4096, 4096, "test", durable=True)
    finally:
        os.close(fd)
    monkeypatch.undo()
    assert path.read_bytes() == bytes(4096) + b"x" * 4096
    assert calls == (["pwritev True", "pwrite", "fdatasync"] if refused else ["pwritev True"])
