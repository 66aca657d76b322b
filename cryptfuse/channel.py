"""The FUSE channel: kernel requests served by a pool of threads.

pyfuse3 mounts the file system (libfuse: ``fusermount3``, option checks) but its
main loop answers one request at a time on the trio thread, with a few dozen
microseconds of Python scheduling around each; that loop was measured to top out
at ~13,000 requests/s here for a file system that does nothing, and it leaves
the disk idle while the one request it serves waits for a cache miss.  This
module reads requests from the session's ``/dev/fuse`` descriptor itself:

* :class:`Channel` runs *workers* threads, each blocking in ``read(2)`` on the
  descriptor (the kernel hands every request to exactly one reader).
* READ and WRITE are answered in the worker that read them.  Where the volume
  has a C data path (``Volume.fast``: AES-XTS or AES-CBC with a sector-number or
  ESSIV IV, i.e. cryptsetup's defaults), the worker reads ``/dev/fuse`` through
  it and READs and whole-sector WRITEs never reach Python: no interpreter time
  and no GIL per request, so the workers really run in parallel.  Requests it declines (partial
  sectors, the end of the volume, failures to retry here with logging) come back
  and go, like everything on volumes without it, through
  :meth:`VolumeFS.read_now`/:meth:`VolumeFS.write_now`.
* Every other request runs the :class:`~cryptfuse.fs.VolumeFS` operation (the
  one place of the file system's rules and of the errno mapping) on the trio
  loop, and its result is encoded here.

The wire format is the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.31
negotiated; native byte order).  Functions named ``encode_*``/``decode_*`` are
pure and tested on their own.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import pyfuse3
import trio

from .fs import VolumeFS

log = logging.getLogger(__name__)

T = TypeVar("T")

# -- protocol constants (include/uapi/linux/fuse.h) ------------------------------------------

KERNEL_VERSION = 7
#: the minor version we speak: every structure below has its 7.31 layout
KERNEL_MINOR_VERSION = 31
#: oldest kernel protocol with the 64-byte fuse_init_out and 40-byte read/write_in
MIN_KERNEL_MINOR = 23

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 5, 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, NOTIFY_REPLY, BATCH_FORGET = 34, 35, 36, 38, 41, 42
FALLOCATE, RENAME2, LSEEK, TMPFILE = 43, 45, 46, 51

#: fuse_notify_code: the kernel drops its cached attributes of an inode
NOTIFY_INVAL_INODE = 2

#: requests that would add, remove or rename directory entries: all refused
DIRECTORY_CHANGES = frozenset({SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK})
DIRECTORY_CHANGES |= {CREATE, RENAME2, TMPFILE}
#: requests the kernel expects no answer to
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})

# INIT flags we ask for when the kernel offers them
ASYNC_READ = 1 << 0  # several READs of one file at once (page-cache readahead)
BIG_WRITES = 1 << 5  # writes larger than a page
ASYNC_DIO = 1 << 15  # one large O_DIRECT request becomes several FUSE requests in flight
PARALLEL_DIROPS = 1 << 18
ABORT_ERROR = 1 << 21  # ECONNABORTED instead of ENOTCONN after an abort
MAX_PAGES = 1 << 22  # honour max_pages: 1 MiB requests
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | PARALLEL_DIROPS | ABORT_ERROR | MAX_PAGES

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6  # the kernel does not serialise O_DIRECT writes

# fuse_setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 1 << 4, 1 << 5, 1 << 7, 1 << 8
FATTR_CTIME = 1 << 10

FSYNC_FDATASYNC = 1
WRITE_CACHE = 1 << 0  # write_flags: a delayed write of the kernel's page cache (writeback)

#: largest READ/WRITE payload we accept (also FUSE's max_pages * page size)
MAX_WRITE = 1 << 20
PAGE = 4096
#: a request buffer holds the largest WRITE plus its headers (the kernel wants a page extra)
REQUEST_BUFFER = MAX_WRITE + PAGE

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("=IIIIHHIIHHII6I")
# Times are u64 in fuse.h but carry a signed time_t (libfuse converts them so): "q"
# keeps times before 1970 in both directions.
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")
ENTRY_OUT = struct.Struct("=QQQQII")  # + ATTR
ATTR_OUT = struct.Struct("=QII")  # + ATTR
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")
FH_IN = struct.Struct("=Q")  # the leading fh of release/flush/releasedir
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len
KSTATFS = struct.Struct("=QQQQQIIII6I")
DIRENT = struct.Struct("=QQII")  # ino off namelen type, then the name padded to 8

REQUEST_HEADERS = IN_HEADER.size + WRITE_IN.size

#: the fixed part of each request's body we decode: a shorter body is a ProtocolError
#: (the kernel never sends one; fuzzing did, and struct.error escaped as "unexpected")
MIN_BODY = {
    READ: READ_IN.size,
    WRITE: WRITE_IN.size,
    OPEN: OPEN_IN.size,
    READDIR: READ_IN.size,
    RELEASE: FH_IN.size,
    FLUSH: FH_IN.size,
    FSYNC: FSYNC_IN.size,
}


class ProtocolError(Exception):
    """A request the kernel should never send (too short, unknown layout)."""


# -- pure encoders and decoders ---------------------------------------------------------------


def _seconds(timeout: float) -> tuple[int, int]:
    whole = int(timeout)
    return whole, int(round((timeout - whole) * 1e9))


def encode_attr(attr: pyfuse3.EntryAttributes) -> bytes:
    """fuse_attr of *attr*."""
    a_s, a_ns = divmod(attr.st_atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(attr.st_mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(attr.st_ctime_ns, 1_000_000_000)
    return ATTR.pack(
        attr.st_ino,
        attr.st_size,
        attr.st_blocks,
        a_s,
        m_s,
        c_s,
        a_ns,
        m_ns,
        c_ns,
        attr.st_mode,
        attr.st_nlink,
        attr.st_uid,
        attr.st_gid,
        attr.st_rdev,
        attr.st_blksize,
        0,
    )


def encode_entry(attr: pyfuse3.EntryAttributes) -> bytes:
    """fuse_entry_out (LOOKUP) of *attr*."""
    entry_s, entry_ns = _seconds(attr.entry_timeout)
    attr_s, attr_ns = _seconds(attr.attr_timeout)
    head = ENTRY_OUT.pack(attr.st_ino, attr.generation, entry_s, attr_s, entry_ns, attr_ns)
    return head + encode_attr(attr)


def encode_attr_out(attr: pyfuse3.EntryAttributes) -> bytes:
    """fuse_attr_out (GETATTR, SETATTR) of *attr*."""
    attr_s, attr_ns = _seconds(attr.attr_timeout)
    return ATTR_OUT.pack(attr_s, attr_ns, 0) + encode_attr(attr)


def encode_dirents(entries: Sequence[tuple[bytes, int, int]], start: int, size: int) -> bytes:
    """READDIR answer: *entries* ``(name, inode, mode)`` from index *start*, at most *size* bytes.

    Each entry's ``off`` is the index to resume after it, as the kernel passes it
    back in the next READDIR.
    """
    out = bytearray()
    for index in range(start, len(entries)):
        name, inode, mode = entries[index]
        record = DIRENT.pack(inode, index + 1, len(name), stat.S_IFMT(mode) >> 12) + name
        record += b"\0" * (-len(record) % 8)
        if len(out) + len(record) > size:
            break
        out += record
    return bytes(out)


def encode_statfs(st: pyfuse3.StatvfsData) -> bytes:
    """fuse_kstatfs of *st*."""
    return KSTATFS.pack(
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
        st.f_bsize,
        st.f_namemax,
        st.f_frsize,
        0,
        *([0] * 6),
    )


@dataclass(frozen=True)
class InitReply:
    """What we answer to FUSE_INIT, given what the kernel offered."""

    minor: int
    max_readahead: int
    flags: int

    def encode(self) -> bytes:
        """fuse_init_out."""
        return INIT_OUT.pack(
            KERNEL_VERSION,
            self.minor,
            self.max_readahead,
            self.flags,
            16,  # max_background: READs in flight from readahead and async O_DIRECT
            12,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran: nanosecond timestamps
            MAX_WRITE // PAGE,  # max_pages
            0,
            0,
            0,
            *([0] * 6),
        )


def negotiate(body: bytes | memoryview) -> InitReply:
    """The answer to a FUSE_INIT request body; ProtocolError for a kernel we cannot serve."""
    if len(body) < INIT_IN.size:
        raise ProtocolError("INIT request too short")
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
    if major != KERNEL_VERSION or minor < MIN_KERNEL_MINOR:
        raise ProtocolError(
            f"kernel FUSE protocol {major}.{minor} is not supported "
            f"(need {KERNEL_VERSION}.{MIN_KERNEL_MINOR} or later)"
        )
    return InitReply(min(minor, KERNEL_MINOR_VERSION), max_readahead, flags & WANTED_FLAGS)


@dataclass
class Context:
    """The caller of a request, as :class:`VolumeFS` reads a ``pyfuse3.RequestContext``."""

    uid: int
    gid: int
    pid: int
    umask: int = 0


@dataclass
class SetattrFields:
    """Which attributes a SETATTR changes, as ``pyfuse3.SetattrFields`` names them."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def decode_setattr(
    body: bytes | memoryview, now_ns: int
) -> tuple[pyfuse3.EntryAttributes, SetattrFields]:
    """The attributes and fields of a fuse_setattr_in (``*_NOW`` become *now_ns*)."""
    if len(body) < SETATTR_IN.size:
        raise ProtocolError("SETATTR request too short")
    (valid, _pad, _fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _cns, mode,
     _u4, uid, gid, _u5) = SETATTR_IN.unpack_from(body)  # fmt: skip
    attr = pyfuse3.EntryAttributes()
    fields = SetattrFields(
        update_atime=bool(valid & (FATTR_ATIME | FATTR_ATIME_NOW)),
        update_mtime=bool(valid & (FATTR_MTIME | FATTR_MTIME_NOW)),
        update_ctime=bool(valid & FATTR_CTIME),
        update_mode=bool(valid & FATTR_MODE),
        update_uid=bool(valid & FATTR_UID),
        update_gid=bool(valid & FATTR_GID),
        update_size=bool(valid & FATTR_SIZE),
    )
    attr.st_mode = mode
    attr.st_uid = uid
    attr.st_gid = gid
    # EntryAttributes keeps st_size in a C long: a size beyond int64 raised
    # OverflowError out of the handler (found by fuzzing; the kernel never sends one).
    if fields.update_size and size > (1 << 63) - 1:
        raise ProtocolError(f"SETATTR size {size} out of range")
    attr.st_size = size if fields.update_size else 0
    attr.st_atime_ns = now_ns if valid & FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec
    attr.st_mtime_ns = now_ns if valid & FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec
    return attr, fields


def _name(body: bytes | memoryview) -> bytes:
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


# -- the channel ---------------------------------------------------------------------------


class _Reply(Exception):
    """Raised by a handler to answer with an errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class Channel:
    """Serves the FUSE requests arriving on *fd* with *workers* threads.

    *fd* belongs to the channel (it closes it in :meth:`close`); *ops* is the file
    system; :meth:`start` names the trio loop where non-data operations run.  Workers
    end when the kernel ends the connection (unmount); :meth:`wait` returns then.
    """

    def __init__(self, fd: int, ops: VolumeFS, *, workers: int = 8, fast: bool = True) -> None:
        self.fd = fd
        self.ops = ops
        #: serve READ/WRITE in C (cryptfuse._fastpath) where the volume allows it
        self.fast = ops.fast if fast else None
        self.token: trio.lowlevel.TrioToken | None = None
        self.workers = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._finished = threading.Event()
        self._alive = 0
        self._alive_lock = threading.Lock()
        self._on_finished: Callable[[], None] | None = None
        self._handlers: dict[int, Callable[[int, int, int, memoryview], bytes | None]] = {
            LOOKUP: self._lookup,
            GETATTR: self._getattr,
            SETATTR: self._setattr,
            OPEN: self._open,
            STATFS: self._statfs,
            RELEASE: self._release,
            FSYNC: self._fsync,
            FLUSH: self._flush,
            INIT: self._init,
            OPENDIR: self._opendir,
            READDIR: self._readdir,
            RELEASEDIR: self._empty,
            FSYNCDIR: self._empty,
            ACCESS: self._empty,
            DESTROY: self._empty,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def start(
        self, trio_token: trio.lowlevel.TrioToken, on_finished: Callable[[], None] | None = None
    ) -> None:
        """Start the workers, which run non-data operations on the loop of *trio_token*.

        *on_finished* runs (in a worker) once the last worker ended.
        """
        self.token = trio_token
        self._on_finished = on_finished
        self._alive = self.workers
        for index in range(self.workers):
            thread = threading.Thread(target=self._worker, name=f"fuse-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every worker ended; False on timeout."""
        return self._finished.wait(timeout)

    def close(self) -> None:
        """Close the descriptor (after :meth:`wait`: a worker may still be reading it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _worker(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - a worker must never die silently
            log.exception("FUSE worker %s failed", threading.current_thread().name)
        finally:
            with self._alive_lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._log_fast_path()
                self._finished.set()
                if self._on_finished is not None:
                    self._on_finished()

    def _log_fast_path(self) -> None:
        fast = self.fast
        if fast is None:
            return
        log.info(
            "C data path: %d reads (%d from read-ahead) and %d writes (%d written behind) "
            "served (%d shared with the helper, %d container transfers with O_DIRECT), "
            "%d requests handed to Python",
            fast.reads,
            fast.prefetched,
            fast.writes,
            fast.behind,
            fast.split,
            fast.direct,
            fast.declined,
        )
        if fast.partnered:
            log.info("of them, %d served under an online reencryption's new key", fast.partnered)
        if fast.reply_errors:
            log.warning("the kernel refused %d replies of the C data path", fast.reply_errors)

    def _serve(self) -> None:
        buf = bytearray(REQUEST_BUFFER)
        view = memoryview(buf)
        fd = self.fd
        if self.ops.options.preallocate:
            self.ops.prepare_thread(MAX_WRITE)
        # The C worker answers READ and WRITE itself and returns with any other
        # request (or one it declines) in buf, as readv() would have.
        fast = self.fast.worker() if self.fast is not None else None
        while True:
            try:
                length = fast.serve(fd, buf) if fast is not None else os.readv(fd, [buf])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # interrupted, or a request the kernel took back
                if exc.errno == errno.ENODEV:
                    return  # unmounted: the kernel ended the connection
                if exc.errno == errno.ECONNABORTED:
                    # /sys/fs/fuse/connections/N/abort (we ask for FUSE_ABORT_ERROR)
                    log.warning("the FUSE connection was aborted")
                    return
                raise
            if length == 0:
                return  # end of file: only a test's socket does that
            if length < IN_HEADER.size:
                log.error("short FUSE request of %d bytes ignored", length)
                continue
            _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
            body = view[IN_HEADER.size : length]
            try:
                if len(body) < MIN_BODY.get(opcode, 0):
                    raise ProtocolError(
                        f"a body of {len(body)} bytes, the request needs {MIN_BODY[opcode]}"
                    )
                if opcode == READ:
                    self._read(unique, body)
                    continue
                if opcode == WRITE:
                    self._write(unique, body)
                    continue
                if opcode == FALLOCATE:  # discards: in this thread, like a WRITE
                    _fh, off, size, mode, _pad = FALLOCATE_IN.unpack_from(body)
                    self.ops.fallocate_now(off, size, mode)
                    self._send(unique, 0)
                    continue
                if opcode == LSEEK:
                    _fh, off, whence, _pad = LSEEK_IN.unpack_from(body)
                    self._send(unique, 0, LSEEK_OUT.pack(self.ops.lseek_now(off, whence)))
                    continue
                if opcode in NO_REPLY:
                    continue
                handler = self._handlers.get(opcode)
                if handler is None:
                    if opcode in DIRECTORY_CHANGES:
                        raise _Reply(self.ops.refusal_errno())
                    raise _Reply(errno.ENOSYS)
                payload = handler(nodeid, uid, gid, body)
                self._send(unique, 0, payload or b"")
            except _Reply as reply:
                self._send(unique, reply.errno)
            except pyfuse3.FUSEError as exc:
                self._send(unique, exc.errno)
            except ProtocolError as exc:
                log.error("FUSE request %d (opcode %d): %s", unique, opcode, exc)
                self._send(unique, errno.EPROTO if opcode == INIT else errno.EINVAL)
            except Exception:
                log.exception("FUSE request %d (opcode %d) failed unexpectedly", unique, opcode)
                self._send(unique, errno.EIO)

    def _send(self, unique: int, err: int, payload: bytes | memoryview = b"") -> None:
        header = OUT_HEADER.pack(OUT_HEADER.size + (0 if err else len(payload)), -err, unique)
        try:
            if err or not payload:
                os.write(self.fd, header)
            else:
                os.writev(self.fd, [header, payload])
        except OSError as exc:
            # ENOENT: the request was interrupted and already answered for us;
            # ENODEV: the file system is gone.  Neither concerns the other requests.
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED):
                log.error("cannot answer FUSE request %d: %s", unique, exc.strerror)

    def invalidate_attributes(self, inode: int) -> None:
        """Make the kernel drop its cached attributes of *inode* (FUSE_NOTIFY_INVAL_INODE),
        so that the next ``stat`` or a loop device's size check asks us: how a resize
        reaches the kernel's idea of the file's size."""
        payload = NOTIFY_INVAL_INODE_OUT.pack(inode, -1, 0)  # off -1: attributes only
        header = OUT_HEADER.pack(OUT_HEADER.size + len(payload), NOTIFY_INVAL_INODE, 0)
        try:
            os.write(self.fd, header + payload)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel has not looked it up yet
                raise

    def _call(self, afn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run the VolumeFS coroutine *afn* on the trio loop and return its result."""
        try:
            return trio.from_thread.run(afn, *args, trio_token=self.token)
        except trio.RunFinishedError:
            raise _Reply(errno.ENOTCONN) from None

    # -- the data path ---------------------------------------------------------------------

    def _read(self, unique: int, body: memoryview) -> None:
        _fh, offset, size, *_ = READ_IN.unpack_from(body)
        if size > MAX_WRITE:  # more than we told the kernel it may ask (max_pages)
            raise ProtocolError(f"READ of {size} bytes")
        try:
            data = self.ops.read_now(offset, size)
        except pyfuse3.FUSEError as exc:
            self._send(unique, exc.errno)
            return
        self._send(unique, 0, data)

    def _write(self, unique: int, body: memoryview) -> None:
        _fh, offset, size, write_flags, *_ = WRITE_IN.unpack_from(body)
        data = body[WRITE_IN.size : WRITE_IN.size + size]
        if len(data) != size:
            raise ProtocolError(f"WRITE of {size} bytes carries {len(data)}")
        try:
            written = self.ops.write_now(offset, data, writeback=bool(write_flags & WRITE_CACHE))
        except pyfuse3.FUSEError as exc:
            self._send(unique, exc.errno)
            return
        self._send(unique, 0, WRITE_OUT.pack(written, 0))

    # -- everything else, through VolumeFS on the trio loop --------------------------------

    def _init(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        reply = negotiate(body)
        log.debug(
            "FUSE protocol 7.%d, flags %#x, max_readahead %d",
            reply.minor,
            reply.flags,
            reply.max_readahead,
        )
        return reply.encode()

    def _lookup(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        attr = self._call(self.ops.lookup, nodeid, _name(body), Context(uid, gid, 0))
        return encode_entry(attr)

    def _getattr(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        return encode_attr_out(self._call(self.ops.getattr, nodeid, Context(uid, gid, 0)))

    def _setattr(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        attr, fields = decode_setattr(body, time.time_ns())
        ctx = cast(pyfuse3.RequestContext, Context(uid, gid, 0))
        result = self._call(
            self.ops.setattr, nodeid, attr, cast(pyfuse3.SetattrFields, fields), None, ctx
        )
        return encode_attr_out(result)

    def _open(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        (flags, _open_flags) = OPEN_IN.unpack_from(body)
        info = self._call(self.ops.open, nodeid, flags, Context(uid, gid, 0))
        open_flags = 0
        if info.direct_io:
            open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
        if info.keep_cache:
            open_flags |= FOPEN_KEEP_CACHE
        return OPEN_OUT.pack(info.fh, open_flags, 0)

    def _opendir(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        fh = self._call(self.ops.opendir, nodeid, Context(uid, gid, 0))
        return OPEN_OUT.pack(fh, 0, 0)

    def _readdir(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        _fh, offset, size, *_ = READ_IN.unpack_from(body)
        if size > MAX_WRITE:
            raise ProtocolError(f"READDIR of {size} bytes")
        entries = [
            (name, inode, self.ops._attr(inode).st_mode) for name, inode in self.ops.dir_entries()
        ]
        return encode_dirents(entries, offset, size)

    def _statfs(self, nodeid: int, uid: int, gid: int, body: memoryview) -> bytes:
        return encode_statfs(self._call(self.ops.statfs, Context(uid, gid, 0)))

    def _release(self, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        (fh,) = FH_IN.unpack_from(body)
        self._call(self.ops.release, fh)

    def _flush(self, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        (fh,) = FH_IN.unpack_from(body)
        self._call(self.ops.flush, fh)

    def _fsync(self, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        fh, fsync_flags, _pad = FSYNC_IN.unpack_from(body)
        self._call(self.ops.fsync, fh, bool(fsync_flags & FSYNC_FDATASYNC))

    def _empty(self, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        return None


def find_fuse_fds() -> set[int]:
    """This process' descriptors open on ``/dev/fuse``."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "/dev/fuse":
                found.add(int(entry))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
    return found
