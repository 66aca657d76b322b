"""The FUSE request channel: the wire encoders on their own, then Channel end to end.

The end-to-end tests need no mount: a ``SOCK_SEQPACKET`` socket pair stands in for
``/dev/fuse`` (one send is one request, one recv one reply, and closing the test's end
makes the workers' ``readv`` return 0 so they end).  Requests are built byte by byte
from ``include/uapi/linux/fuse.h``; the container is checked on disk against the
cipher's per-sector reference implementation.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from cryptfuse.channel import (
    ABORT_ERROR,
    ASYNC_DIO,
    ASYNC_READ,
    ATTR,
    ATTR_OUT,
    BIG_WRITES,
    DIRENT,
    ENTRY_OUT,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_CTIME,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FOPEN_DIRECT_IO,
    FSYNC_IN,
    IN_HEADER,
    INIT_IN,
    INIT_OUT,
    KERNEL_MINOR_VERSION,
    KSTATFS,
    MAX_PAGES,
    OPEN_IN,
    OPEN_OUT,
    OUT_HEADER,
    PARALLEL_DIROPS,
    READ_IN,
    SETATTR_IN,
    WANTED_FLAGS,
    WRITE_IN,
    WRITE_OUT,
    Channel,
    InitReply,
    ProtocolError,
    decode_setattr,
    encode_attr,
    encode_attr_out,
    encode_dirents,
    encode_entry,
    negotiate,
)
from cryptfuse.fs import VolumeFS
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec
from cryptfuse.volume import Volume, open_device

# opcodes, as numbered in fuse.h (spelled out here rather than imported: a wrong
# constant in the module must not make the test agree with it)
LOOKUP, FORGET, GETATTR, SETATTR, MKDIR = 1, 2, 3, 4, 9
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
UNKNOWN_OPCODE = 99

DT_DIR, DT_REG = 4, 8
MiB = 1 << 20

# fuse.h structures the module does not need to decode
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
FORGET_IN = struct.Struct("=Q")  # nlookup
MKDIR_IN = struct.Struct("=II")  # mode umask, then the name
FLUSH_IN = struct.Struct("=QIIQ")  # fh unused padding lock_owner
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
# fuse_setattr_in, field by field: valid padding fh size lock_owner atime mtime ctime
# atimensec mtimensec ctimensec mode unused4 uid gid unused5
SETATTR_FIELDS = struct.Struct("=II QQQ QQQ III I I II I")  # struct ignores the spaces

SIZE = MiB
SECTOR = 512
KEY = bytes(range(64))
SPEC = "aes-xts-plain64"
#: recv timeout: a missing reply fails the test instead of hanging the suite
REPLY_TIMEOUT = 5.0


def cipher() -> SectorCipher:
    return SectorCipher(parse_cipher_spec(SPEC), KEY, SECTOR)


@functools.cache
def plaintext() -> bytes:
    """The volume's initial contents: deterministic, with no period that could hide an offset
    mistake."""
    return hashlib.shake_256(b"cryptfuse channel test").digest(SIZE)


@functools.cache
def container_bytes() -> bytes:
    """The container of plaintext(), built with the per-sector reference cipher."""
    return cipher().reference_encrypt(plaintext(), 0)


# -- struct layouts against fuse.h ------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        pytest.param(IN_HEADER, 40, id="fuse_in_header"),
        pytest.param(OUT_HEADER, 16, id="fuse_out_header"),
        pytest.param(INIT_IN, 16, id="fuse_init_in-7.31"),
        pytest.param(INIT_OUT, 64, id="fuse_init_out"),
        pytest.param(ATTR, 88, id="fuse_attr"),
        pytest.param(ENTRY_OUT, 128 - 88, id="fuse_entry_out-head"),
        pytest.param(ATTR_OUT, 104 - 88, id="fuse_attr_out-head"),
        pytest.param(SETATTR_IN, 88, id="fuse_setattr_in"),
        pytest.param(OPEN_IN, 8, id="fuse_open_in"),
        pytest.param(OPEN_OUT, 16, id="fuse_open_out"),
        pytest.param(READ_IN, 40, id="fuse_read_in"),
        pytest.param(WRITE_IN, 40, id="fuse_write_in"),
        pytest.param(WRITE_OUT, 8, id="fuse_write_out"),
        pytest.param(FSYNC_IN, 16, id="fuse_fsync_in"),
        pytest.param(KSTATFS, 80, id="fuse_kstatfs"),
        pytest.param(DIRENT, 24, id="fuse_dirent-head"),
    ],
)
def test_struct_sizes_match_fuse_h(layout: struct.Struct, size: int) -> None:
    assert layout.size == size


def test_wanted_flags_are_the_fuse_h_bits() -> None:
    # FUSE_ASYNC_READ 1<<0, BIG_WRITES 1<<5, ASYNC_DIO 1<<15, PARALLEL_DIROPS 1<<18,
    # ABORT_ERROR 1<<21, MAX_PAGES 1<<22
    assert (ASYNC_READ, BIG_WRITES, ASYNC_DIO) == (0x1, 0x20, 0x8000)
    assert (PARALLEL_DIROPS, ABORT_ERROR, MAX_PAGES) == (0x40000, 0x200000, 0x400000)
    assert WANTED_FLAGS == 0x648021


# -- INIT ---------------------------------------------------------------------------------


def test_negotiate_masks_flags_and_caps_the_minor() -> None:
    reply = negotiate(INIT_IN.pack(7, 38, 131072, 0xFFFFFFFF))
    assert reply == InitReply(minor=KERNEL_MINOR_VERSION, max_readahead=131072, flags=WANTED_FLAGS)
    assert KERNEL_MINOR_VERSION == 31


def test_negotiate_keeps_an_older_minor_and_only_offered_flags() -> None:
    posix_locks, writeback_cache = 1 << 1, 1 << 16  # offered, not wanted
    offered = ASYNC_READ | posix_locks | writeback_cache | MAX_PAGES
    reply = negotiate(INIT_IN.pack(7, 26, 65536, offered))
    assert reply == InitReply(minor=26, max_readahead=65536, flags=ASYNC_READ | MAX_PAGES)


def test_negotiate_reads_a_longer_init_in() -> None:
    # 7.36+ kernels send a 64-byte fuse_init_in (flags2 and unused words after flags).
    body = INIT_IN.pack(7, 23, 4096, BIG_WRITES) + bytes(48)
    assert negotiate(memoryview(body)) == InitReply(23, 4096, BIG_WRITES)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(INIT_IN.pack(6, 31, 0, 0), id="major-6"),
        pytest.param(INIT_IN.pack(8, 0, 0, 0), id="major-8"),
        pytest.param(INIT_IN.pack(7, 22, 0, 0), id="minor-22"),
        pytest.param(INIT_IN.pack(7, 31, 0, 0)[:15], id="short-body"),
        pytest.param(b"", id="empty-body"),
    ],
)
def test_negotiate_refuses(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        negotiate(body)


def test_init_reply_layout() -> None:
    data = InitReply(minor=31, max_readahead=131072, flags=ASYNC_READ | MAX_PAGES).encode()
    assert len(data) == 64
    # offsets of fuse_init_out's fields
    assert struct.unpack_from("=IIII", data, 0) == (7, 31, 131072, ASYNC_READ | MAX_PAGES)
    assert struct.unpack_from("=HH", data, 16) == (16, 12)  # max_background congestion
    assert struct.unpack_from("=I", data, 20) == (MiB,)  # max_write
    assert struct.unpack_from("=I", data, 24) == (1,)  # time_gran
    assert struct.unpack_from("=HH", data, 28) == (256, 0)  # max_pages map_alignment
    assert data[32:] == bytes(32)  # unused


# -- READDIR ------------------------------------------------------------------------------

ENTRIES = [
    (b".", 1, stat.S_IFDIR | 0o700),
    (b"..", 1, stat.S_IFDIR | 0o755),
    (b"volume", 2, stat.S_IFREG | 0o600),
    (b"a-seventeen-chars", 2, stat.S_IFREG | 0o644),
]


def parse_dirents(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(ino, off, type, name) of each fuse_dirent; checks the zero padding to 8 bytes."""
    out = []
    pos = 0
    while pos < len(data):
        ino, off, namelen, kind = struct.unpack_from("=QQII", data, pos)
        name = data[pos + 24 : pos + 24 + namelen]
        end = pos + ((24 + namelen + 7) & ~7)
        assert data[pos + 24 + namelen : end] == bytes(end - pos - 24 - namelen)
        out.append((ino, off, kind, name))
        pos = end
    assert pos == len(data)
    return out


def test_encode_dirents_known_bytes() -> None:
    data = encode_dirents(ENTRIES[:3], 0, 4096)
    assert data == (
        struct.pack("=QQII", 1, 1, 1, DT_DIR) + b"." + bytes(7)
        + struct.pack("=QQII", 1, 2, 2, DT_DIR) + b".." + bytes(6)
        + struct.pack("=QQII", 2, 3, 6, DT_REG) + b"volume" + bytes(2)
    )  # fmt: skip


def test_encode_dirents_offsets_types_and_padding() -> None:
    data = encode_dirents(ENTRIES, 0, 4096)
    assert len(data) == 32 + 32 + 32 + 48  # 24 + 17 = 41 -> 48
    assert parse_dirents(data) == [
        (1, 1, DT_DIR, b"."),
        (1, 2, DT_DIR, b".."),
        (2, 3, DT_REG, b"volume"),
        (2, 4, DT_REG, b"a-seventeen-chars"),
    ]


@pytest.mark.parametrize(
    ("start", "size", "names"),
    [
        pytest.param(0, 96, [b".", b"..", b"volume"], id="exactly-three"),
        pytest.param(0, 95, [b".", b".."], id="one-byte-short-of-three"),
        pytest.param(0, 31, [], id="not-even-one"),
        pytest.param(2, 4096, [b"volume", b"a-seventeen-chars"], id="resume-at-2"),
        pytest.param(3, 47, [], id="resume-at-3-too-small"),
        pytest.param(3, 48, [b"a-seventeen-chars"], id="resume-at-3"),
        pytest.param(4, 4096, [], id="resume-at-end"),
    ],
)
def test_encode_dirents_size_and_start(start: int, size: int, names: list[bytes]) -> None:
    parsed = parse_dirents(encode_dirents(ENTRIES, start, size))
    assert [name for _ino, _off, _kind, name in parsed] == names
    assert [off for _ino, off, _kind, _name in parsed] == list(
        range(start + 1, start + 1 + len(names))
    )


# -- SETATTR ------------------------------------------------------------------------------


def setattr_body(
    valid: int,
    *,
    size: int = 0,
    atime: int = 0,
    mtime: int = 0,
    atimensec: int = 0,
    mtimensec: int = 0,
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
    fh: int = 0,
) -> bytes:
    return SETATTR_FIELDS.pack(
        valid, 0, fh, size, 0, atime, mtime, 0, atimensec, mtimensec, 0, mode, 0, uid, gid, 0
    )


NOW_NS = 1_700_000_000_555_666_777


def test_decode_setattr_mode_owner_size() -> None:
    body = setattr_body(
        FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE,
        size=8192,
        mode=stat.S_IFREG | 0o640,
        uid=1000,
        gid=100,
        atime=3,
        mtime=4,
    )
    attr, fields = decode_setattr(body, NOW_NS)
    assert (fields.update_mode, fields.update_uid, fields.update_gid, fields.update_size) == (
        True,
        True,
        True,
        True,
    )
    assert (fields.update_atime, fields.update_mtime, fields.update_ctime) == (False, False, False)
    assert (attr.st_mode, attr.st_uid, attr.st_gid, attr.st_size) == (
        stat.S_IFREG | 0o640,
        1000,
        100,
        8192,
    )


def test_decode_setattr_now_becomes_now_ns() -> None:
    # The kernel sets FATTR_ATIME and FATTR_ATIME_NOW together for utimensat(UTIME_NOW).
    valid = FATTR_ATIME | FATTR_ATIME_NOW | FATTR_MTIME | FATTR_MTIME_NOW
    attr, fields = decode_setattr(setattr_body(valid, atime=5, mtime=6, atimensec=7), NOW_NS)
    assert (fields.update_atime, fields.update_mtime) == (True, True)
    assert (fields.update_mode, fields.update_size, fields.update_ctime) == (False, False, False)
    assert attr.st_atime_ns == attr.st_mtime_ns == NOW_NS


def test_decode_setattr_only_mtime_now() -> None:
    body = setattr_body(FATTR_ATIME | FATTR_MTIME | FATTR_MTIME_NOW, atime=10, atimensec=20)
    attr, fields = decode_setattr(body, NOW_NS)
    assert (fields.update_atime, fields.update_mtime) == (True, True)
    assert attr.st_atime_ns == 10_000_000_020
    assert attr.st_mtime_ns == NOW_NS


def test_decode_setattr_explicit_times() -> None:
    body = setattr_body(
        FATTR_ATIME | FATTR_MTIME | FATTR_CTIME,
        atime=1_600_000_000,
        atimensec=123,
        mtime=1_500_000_000,
        mtimensec=999_999_999,
    )
    attr, fields = decode_setattr(memoryview(body), NOW_NS)
    assert (fields.update_atime, fields.update_mtime, fields.update_ctime) == (True, True, True)
    assert attr.st_atime_ns == 1_600_000_000_000_000_123
    assert attr.st_mtime_ns == 1_500_000_000_999_999_999


def test_decode_setattr_nothing_valid() -> None:
    _attr, fields = decode_setattr(setattr_body(0, size=5, mode=0o777), NOW_NS)
    assert not any(vars(fields).values())


def test_decode_setattr_too_short() -> None:
    with pytest.raises(ProtocolError):
        decode_setattr(setattr_body(FATTR_SIZE)[:-1], NOW_NS)


def test_pre_1970_times_round_trip() -> None:
    minus_one = (1 << 64) - 1  # -1 s as the kernel sends it
    attr, _fields = decode_setattr(
        setattr_body(FATTR_MTIME, mtime=minus_one, mtimensec=500), NOW_NS
    )
    assert attr.st_mtime_ns == -1_000_000_000 + 500
    # As the kernel reads it: u64 seconds (two's complement) at offset 32, u32 ns at 52.
    encoded = encode_attr(attr)
    assert struct.unpack_from("=Q", encoded, 32) == (minus_one,)
    assert struct.unpack_from("=I", encoded, 52) == (500,)


# -- attributes ---------------------------------------------------------------------------


def sample_attr() -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 2
    attr.generation = 7
    attr.entry_timeout = 1.5
    attr.attr_timeout = 60.25
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_nlink = 1
    attr.st_uid = 1000
    attr.st_gid = 1001
    attr.st_rdev = 0
    attr.st_size = 3 * MiB
    attr.st_blocks = 6144
    attr.st_blksize = 4096
    attr.st_atime_ns = 1_700_000_000_123_456_789
    attr.st_mtime_ns = 1_600_000_000_000_000_001
    attr.st_ctime_ns = 1_500_000_000_999_999_999
    return attr


SAMPLE_FUSE_ATTR = (
    2,  # ino
    3 * MiB,  # size
    6144,  # blocks
    1_700_000_000,  # atime
    1_600_000_000,  # mtime
    1_500_000_000,  # ctime
    123_456_789,  # atimensec
    1,  # mtimensec
    999_999_999,  # ctimensec
    stat.S_IFREG | 0o600,  # mode
    1,  # nlink
    1000,  # uid
    1001,  # gid
    0,  # rdev
    4096,  # blksize
    0,  # flags / padding
)


def test_encode_entry_decodes_back() -> None:
    data = encode_entry(sample_attr())
    assert len(data) == ENTRY_OUT.size + ATTR.size == 128
    # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
    assert ENTRY_OUT.unpack_from(data) == (2, 7, 1, 60, 500_000_000, 250_000_000)
    assert ATTR.unpack_from(data, ENTRY_OUT.size) == SAMPLE_FUSE_ATTR


def test_encode_attr_out_decodes_back() -> None:
    data = encode_attr_out(sample_attr())
    assert len(data) == ATTR_OUT.size + ATTR.size == 104
    assert ATTR_OUT.unpack_from(data) == (60, 250_000_000, 0)
    assert ATTR.unpack_from(data, ATTR_OUT.size) == SAMPLE_FUSE_ATTR


# -- Channel end to end -----------------------------------------------------------------------


class CountingVolume(Volume):
    """A real Volume that counts sync() calls."""

    syncs = 0

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


def open_volume(path: Path, *, readonly: bool) -> CountingVolume:
    fd = open_device(str(path), readonly)
    return CountingVolume(fd, cipher(), 0, SIZE, readonly=readonly)


@pytest.fixture
def container(tmp_path: Path) -> Path:
    path = tmp_path / "container.img"
    path.write_bytes(container_bytes())
    return path


@pytest.fixture
def volume(container: Path) -> Iterator[CountingVolume]:
    vol = open_volume(container, readonly=False)
    yield vol
    vol.close()


@pytest.fixture
def ro_volume(container: Path) -> Iterator[CountingVolume]:
    vol = open_volume(container, readonly=True)
    yield vol
    vol.close()


class Reply:
    """One answer: the error field (0 or a negative errno) and the payload."""

    def __init__(self, error: int, payload: bytes) -> None:
        self.error = error
        self.payload = payload


class Client:
    """The kernel's side of the channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0
        self.uid = os.getuid()
        self.gid = os.getgid()

    def send(self, opcode: int, nodeid: int, body: bytes = b"") -> int:
        """Send one request; returns its unique."""
        self.unique += 1
        header = IN_HEADER.pack(
            IN_HEADER.size + len(body),
            opcode,
            self.unique,
            nodeid,
            self.uid,
            self.gid,
            os.getpid(),
            0,
            0,
        )
        self.sock.send(header + body)
        return self.unique

    def receive(self) -> tuple[int, Reply]:
        """The next reply: (unique, reply); checks the header's length."""
        data = self.sock.recv(MiB + 4096)
        assert len(data) >= OUT_HEADER.size, data
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert length == len(data)
        assert error <= 0
        if error:
            assert length == OUT_HEADER.size  # an error carries no payload
        return unique, Reply(error, data[OUT_HEADER.size :])

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> Reply:
        unique = self.send(opcode, nodeid, body)
        got, reply = self.receive()
        assert got == unique
        return reply

    def nothing_pending(self) -> bool:
        """No reply is waiting (every request so far has had exactly its one answer)."""
        readable, _w, _x = select.select([self.sock], [], [], 0)
        return not readable

    # -- requests ------------------------------------------------------------------------

    def init(self) -> Reply:
        return self.call(INIT, 0, INIT_IN.pack(7, 31, 131072, WANTED_FLAGS | (1 << 16)))

    def open(self, flags: int = os.O_RDWR) -> tuple[Reply, int, int]:
        reply = self.call(OPEN, 2, OPEN_IN.pack(flags, 0))
        if reply.error:
            return reply, 0, 0
        fh, open_flags, _pad = OPEN_OUT.unpack(reply.payload)
        return reply, fh, open_flags

    def read(self, fh: int, offset: int, size: int) -> Reply:
        return self.call(READ, 2, READ_IN.pack(fh, offset, size, 0, 0, os.O_RDWR, 0))

    def write(self, fh: int, offset: int, data: bytes) -> Reply:
        body = WRITE_IN.pack(fh, offset, len(data), 0, 0, os.O_RDWR, 0) + data
        return self.call(WRITE, 2, body)

    def written(self, reply: Reply) -> int:
        assert reply.error == 0
        size, _pad = WRITE_OUT.unpack(reply.payload)
        return int(size)


def serve(
    volume: Volume, client: Callable[[Client], None], *, workers: int = 2, fast: bool = True
) -> None:
    """Run *client* in a thread against a Channel serving *volume* (C data path: *fast*)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        # Room for 1 MiB requests and replies where net.core.[rw]mem_max allows it
        # (one SOCK_SEQPACKET message must fit the buffers; /dev/fuse has no such limit).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    ours.settimeout(REPLY_TIMEOUT)
    channel = Channel(theirs.detach(), VolumeFS(volume), workers=workers, fast=fast)

    async def main() -> None:
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        channel.start(token, lambda: token.run_sync_soon(finished.set))
        try:
            await trio.to_thread.run_sync(client, Client(ours))
        finally:
            ours.close()  # the workers' readv returns 0: they end
            with trio.fail_after(REPLY_TIMEOUT):
                await finished.wait()

    try:
        trio.run(main)
        assert channel.wait(0)  # on_finished ran after the last worker ended
    finally:
        if channel.wait(REPLY_TIMEOUT):  # never close a descriptor a worker still reads
            channel.close()


def test_init_lookup_getattr_statfs(volume: CountingVolume) -> None:
    def client(c: Client) -> None:
        reply = c.init()
        assert reply.error == 0
        assert len(reply.payload) == 64
        major, minor, readahead, flags = struct.unpack_from("=IIII", reply.payload)
        assert (major, minor, readahead, flags) == (7, 31, 131072, WANTED_FLAGS)
        assert struct.unpack_from("=I", reply.payload, 20) == (MiB,)

        reply = c.call(LOOKUP, 1, b"volume\0")
        assert reply.error == 0
        assert len(reply.payload) == 128
        nodeid, generation, entry_s, attr_s, _ens, _ans = ENTRY_OUT.unpack_from(reply.payload)
        assert (nodeid, generation, entry_s, attr_s) == (2, 0, 300, 60)
        ino, size, blocks, *_times, mode, nlink, uid, gid, _rdev, blksize, _flags = (
            ATTR.unpack_from(reply.payload, ENTRY_OUT.size)
        )
        assert (ino, size, blocks) == (2, SIZE, SIZE // 512)
        assert (mode, nlink, uid, gid, blksize) == (
            stat.S_IFREG | 0o600,
            1,
            os.getuid(),
            os.getgid(),
            4096,
        )

        assert c.call(LOOKUP, 1, b"missing\0").error == -errno.ENOENT
        assert c.call(LOOKUP, 2, b"volume\0").error == -errno.ENOTDIR

        reply = c.call(GETATTR, 1, GETATTR_IN.pack(0, 0, 0))
        assert reply.error == 0
        assert len(reply.payload) == 104
        assert ATTR_OUT.unpack_from(reply.payload) == (60, 0, 0)
        root = ATTR.unpack_from(reply.payload, ATTR_OUT.size)
        assert (root[0], root[1], root[9], root[10]) == (1, 0, stat.S_IFDIR | 0o700, 2)

        reply = c.call(GETATTR, 2, GETATTR_IN.pack(0, 0, 0))
        assert reply.error == 0
        assert ATTR.unpack_from(reply.payload, ATTR_OUT.size)[:2] == (2, SIZE)
        assert c.call(GETATTR, 3, GETATTR_IN.pack(0, 0, 0)).error == -errno.ENOENT

        reply = c.call(STATFS, 1)
        assert reply.error == 0
        assert len(reply.payload) == 80
        blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, *_ = KSTATFS.unpack(
            reply.payload
        )
        assert (blocks, bfree, bavail, files, ffree) == (SIZE // 512, 0, 0, 2, 0)
        assert (bsize, namelen, frsize) == (512, 255, 512)
        assert c.nothing_pending()

    serve(volume, client)


def test_write_then_read_through_the_channel(volume: CountingVolume, container: Path) -> None:
    model = bytearray(plaintext())
    offset, data = 1000, hashlib.shake_256(b"written").digest(3000)  # sectors 1..7, partial ends

    def client(c: Client) -> None:
        assert c.init().error == 0
        reply, fh, open_flags = c.open()
        assert reply.error == 0
        assert open_flags & FOPEN_DIRECT_IO

        assert c.written(c.write(fh, offset, data)) == len(data)
        model[offset : offset + len(data)] = data
        reply = c.read(fh, 900, 3200)  # spans the write and some untouched bytes
        assert reply.error == 0
        assert reply.payload == model[900:4100]
        assert reply.payload[100:3100] == data

        # untouched plaintext decrypts to the known contents
        assert c.read(fh, 5 * 4096 + 3, 777).payload == plaintext()[5 * 4096 + 3 :][:777]
        # short at the end, empty past it
        assert c.read(fh, SIZE - 10, 4096).payload == plaintext()[-10:]
        reply = c.read(fh, SIZE, 4096)
        assert (reply.error, reply.payload) == (0, b"")
        assert c.read(fh, SIZE + 8192, 4096).payload == b""
        # writes at or past the end
        assert c.write(fh, SIZE, b"x").error == -errno.ENOSPC
        assert c.write(fh, SIZE + 512, bytes(512)).error == -errno.ENOSPC
        assert c.written(c.write(fh, SIZE - 2, b"abcd")) == 2  # short at the end
        model[SIZE - 2 :] = b"ab"
        assert c.call(RELEASE, 2, RELEASE_IN.pack(fh, os.O_RDWR, 0, 0)).error == 0
        assert c.nothing_pending()

    serve(volume, client)

    raw = container.read_bytes()
    ref = cipher()
    # The touched sectors hold the reference encryption of the expected plaintext ...
    assert raw[512:4096] == ref.reference_encrypt(bytes(model[512:4096]), 1)
    assert raw[SIZE - 512 :] == ref.reference_encrypt(bytes(model[SIZE - 512 :]), SIZE // 512 - 1)
    # ... and their neighbours were not rewritten.
    original = container_bytes()
    assert raw[:512] == original[:512]
    assert raw[4096 : SIZE - 512] == original[4096 : SIZE - 512]


def test_concurrent_reads_are_answered_by_unique(volume: CountingVolume) -> None:
    ranges = [(i * 70_001 % (SIZE - 9000), 512 + i * 1000) for i in range(8)]

    def client(c: Client) -> None:
        assert c.init().error == 0
        _reply, fh, _flags = c.open(os.O_RDONLY)
        sent = {
            c.send(READ, 2, READ_IN.pack(fh, off, size, 0, 0, 0, 0)): (off, size)
            for off, size in ranges
        }
        for _ in ranges:
            unique, reply = c.receive()
            off, size = sent.pop(unique)
            assert reply.error == 0
            assert reply.payload == plaintext()[off : off + size]
        assert sent == {}

    serve(volume, client)


def test_readdir(volume: CountingVolume) -> None:
    def client(c: Client) -> None:
        assert c.init().error == 0
        reply = c.call(OPENDIR, 1, OPEN_IN.pack(os.O_RDONLY, 0))
        assert reply.error == 0
        fh, _flags, _pad = OPEN_OUT.unpack(reply.payload)

        reply = c.call(READDIR, 1, READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert reply.error == 0
        assert parse_dirents(reply.payload) == [
            (1, 1, DT_DIR, b"."),
            (1, 2, DT_DIR, b".."),
            (2, 3, DT_REG, b"volume"),
        ]
        # the kernel resumes at the last entry's off
        reply = c.call(READDIR, 1, READ_IN.pack(fh, 2, 4096, 0, 0, 0, 0))
        assert parse_dirents(reply.payload) == [(2, 3, DT_REG, b"volume")]
        reply = c.call(READDIR, 1, READ_IN.pack(fh, 3, 4096, 0, 0, 0, 0))
        assert (reply.error, reply.payload) == (0, b"")
        assert c.call(RELEASEDIR, 1, RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0)).error == 0
        assert c.call(OPENDIR, 2, OPEN_IN.pack(os.O_RDONLY, 0)).error == -errno.ENOTDIR

    serve(volume, client)


def test_setattr_and_refusals(volume: CountingVolume) -> None:
    def client(c: Client) -> None:
        assert c.init().error == 0
        # truncate to another size: EPERM; to the same size: accepted
        assert c.call(SETATTR, 2, setattr_body(FATTR_SIZE, size=SIZE // 2)).error == -errno.EPERM
        assert c.call(SETATTR, 2, setattr_body(FATTR_SIZE, size=SIZE)).error == 0

        # chmod and utimens go through decode_setattr and come back in the attr_out
        body = setattr_body(
            FATTR_MODE | FATTR_MTIME,
            mode=stat.S_IFREG | 0o640,
            mtime=1_234_567_890,
            mtimensec=42,
        )
        reply = c.call(SETATTR, 2, body)
        assert reply.error == 0
        attr = ATTR.unpack_from(reply.payload, ATTR_OUT.size)
        assert attr[9] == stat.S_IFREG | 0o640
        assert (attr[4], attr[7]) == (1_234_567_890, 42)  # mtime, mtimensec
        # and the file keeps them
        attr = ATTR.unpack_from(c.call(GETATTR, 2).payload, ATTR_OUT.size)
        assert (attr[9], attr[4], attr[7]) == (stat.S_IFREG | 0o640, 1_234_567_890, 42)

        # chown by a non-root caller
        if c.uid != 0:
            assert c.call(SETATTR, 2, setattr_body(FATTR_UID, uid=0)).error == -errno.EPERM

        assert c.call(MKDIR, 1, MKDIR_IN.pack(0o755, 0o022) + b"dir\0").error == -errno.EPERM
        assert c.call(UNKNOWN_OPCODE, 1, b"whatever").error == -errno.ENOSYS
        # a kernel too old for the 64-byte fuse_init_out
        assert c.call(INIT, 0, INIT_IN.pack(7, 22, 0, 0)).error == -errno.EPROTO
        assert c.nothing_pending()

    serve(volume, client)


def test_forget_gets_no_reply(volume: CountingVolume) -> None:
    def client(c: Client) -> None:
        assert c.init().error == 0
        assert c.call(LOOKUP, 1, b"volume\0").error == 0
        forget = c.send(FORGET, 2, FORGET_IN.pack(1))
        # The next answer is the next request's; one for FORGET would come first.
        reply = c.call(GETATTR, 2)
        assert reply.error == 0
        assert c.unique == forget + 1
        assert c.nothing_pending()

    serve(volume, client)


def test_flush_and_fsync_sync_the_volume(volume: CountingVolume, container: Path) -> None:
    def client(c: Client) -> None:
        assert c.init().error == 0
        _reply, fh, _flags = c.open()
        assert c.written(c.write(fh, 4096, b"first")) == 5
        assert volume.syncs == 0
        assert c.call(FLUSH, 2, FLUSH_IN.pack(fh, 0, 0, 0)).error == 0
        assert volume.syncs == 1
        assert c.written(c.write(fh, 8191, b"second")) == 6
        assert c.call(FSYNC, 2, FSYNC_IN.pack(fh, 1, 0)).error == 0  # fdatasync
        assert volume.syncs == 2
        # nothing written since: nothing to sync
        assert c.call(FSYNC, 2, FSYNC_IN.pack(fh, 0, 0)).error == 0
        assert volume.syncs == 2

    serve(volume, client)
    model = bytearray(plaintext())
    model[4096:4101] = b"first"
    model[8191:8197] = b"second"
    raw = container.read_bytes()
    assert raw[4096:8704] == cipher().reference_encrypt(bytes(model[4096:8704]), 8)


def test_read_only_volume(ro_volume: CountingVolume, container: Path) -> None:
    def client(c: Client) -> None:
        assert c.init().error == 0
        reply, _fh, _flags = c.open(os.O_RDWR)
        assert reply.error == -errno.EROFS
        reply, fh, _flags = c.open(os.O_RDONLY)
        assert reply.error == 0
        assert c.read(fh, 100, 200).payload == plaintext()[100:300]
        assert c.write(fh, 0, b"nope").error == -errno.EROFS
        assert c.call(SETATTR, 2, setattr_body(FATTR_SIZE, size=SIZE)).error == -errno.EROFS
        assert c.call(MKDIR, 1, MKDIR_IN.pack(0o755, 0) + b"dir\0").error == -errno.EROFS
        assert c.call(FLUSH, 2, FLUSH_IN.pack(fh, 0, 0, 0)).error == 0
        assert ro_volume.syncs == 0

    serve(ro_volume, client)
    assert container.read_bytes() == container_bytes()
