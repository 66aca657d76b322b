"""The decrypted view of a container's data area.

A :class:`Volume` maps byte ranges of the plaintext volume onto whole sectors
of the container: it reads and decrypts them, or encrypts and writes them,
with large ``pread``/``pwrite`` calls.  Partial sectors are read, modified and
written back under a range lock, so concurrent requests that touch the same
sector never lose an update.  Everything here is synchronous and thread-safe;
the FUSE layer runs it in worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from .errors import BusyError, DeviceError, OutOfRangeError, ReadOnlyError, UsageError
from .sector import Buffer, SectorCipher

try:  # the GIL-free READ/WRITE path (setup.py builds it where OpenSSL's headers are)
    from . import _fastpath
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None  # type: ignore[assignment]


def open_device(path: str, readonly: bool, *, lock: bool = True) -> int:
    """Open a container or header file and return its descriptor.

    With *lock*, take a ``flock`` that marks the container as in use: shared
    for read-only users, exclusive for writers, so that two writable mounts
    (or a mount and a metadata change) of one container cannot coexist.
    """
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DeviceError(f"Device {path} does not exist.") from None
    except IsADirectoryError:
        raise DeviceError(f"Device {path} is a directory, not a container.") from None
    except PermissionError:
        hint = "" if readonly else " (use --readonly to open it read-only)"
        raise DeviceError(f"Cannot open {path}: permission denied{hint}.") from None
    except OSError as exc:
        raise DeviceError(f"Cannot open {path}: {exc.strerror}.") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise DeviceError(f"{path} is neither a regular file nor a block device.")
        if lock:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"{path} is in use by another cryptfuse process.") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def pwrite_all(fd: int, data: Buffer, offset: int, what: str, *, durable: bool = False) -> None:
    """Write all of *data* at *offset*, looping over short writes; *what* names it in errors.

    *durable*: each write is on the disk before it returns (``RWF_DSYNC``): as a write
    followed by an fdatasync of that range alone, where an fsync would also write back
    every other dirty page of the file (a mounted container's, written meanwhile);
    where the kernel refuses the flag, a write and an fdatasync.
    """
    view = memoryview(data).cast("B")
    while view:
        try:
            written = _pwrite_dsync(fd, view, offset) if durable else os.pwrite(fd, view, offset)
        except InterruptedError:
            continue
        except OSError as exc:
            raise DeviceError(f"cannot write {what}: {exc.strerror}") from exc
        if written <= 0:
            raise DeviceError(f"cannot write {what}: the device refused the write")
        view = view[written:]
        offset += written


def _pwrite_dsync(fd: int, view: memoryview, offset: int) -> int:
    try:
        return os.pwritev(fd, [view], offset, os.RWF_DSYNC)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    written = os.pwrite(fd, view, offset)
    os.fdatasync(fd)
    return written


def pread_into(fd: int, out: memoryview, position: int) -> None:
    """Fill *out* from *fd* at *position*, looping over short reads.

    A short read is legal anywhere (a FUSE or network file system gives them); only
    the end of the file (a read of 0 bytes) is an error: the container ends early.
    """
    done, length = 0, len(out)
    while done < length:
        try:
            got = os.preadv(fd, [out[done:]], position + done)
        except InterruptedError:
            continue
        except OSError as exc:
            raise DeviceError(
                f"read of {length} bytes at {position} failed: {exc.strerror}"
            ) from exc
        if got == 0:
            raise DeviceError(f"container ends early: short read of {length} bytes at {position}")
        done += got


def device_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def device_block_size(fd: int) -> int:
    """The block cryptsetup aligns reencryption zones and checksum blocks to, besides
    the sectors (its ``device_block_size``): a file's file system block (``statvfs``;
    a page where that is larger than a page, as NFS's 1 MiB), a block device's logical
    sector size."""
    page = mmap.PAGESIZE
    if stat.S_ISREG(os.fstat(fd).st_mode):
        try:
            block = os.fstatvfs(fd).f_bsize
        except OSError:
            return page
        return block if 0 < block <= page else page
    try:
        raw = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    except OSError:
        return page
    return int.from_bytes(raw, sys.byteorder) or page


def optimal_sector_size(fd: int) -> int:
    """The encryption sector size LUKS2 format chooses for a device when none is asked
    for (cryptsetup 2.6.1's ``device_optimal_encryption_sector_size``): 4096 for a
    file; for a block device its logical sector size, or its physical one where that
    is larger, a multiple of the logical one and at most 4096 (a 512e disk: 4096; a
    loop device: 512). The caller falls back to 512 where the data area is not
    aligned to it."""
    logical = device_block_size(fd)
    if stat.S_ISREG(os.fstat(fd).st_mode):
        physical = 4096
    else:
        try:
            raw = fcntl.ioctl(fd, BLKPBSZGET, b"\0" * 4)
            physical = int.from_bytes(raw, sys.byteorder)
        except OSError:
            physical = 512
    if logical >= 4096:
        return 512 if logical % 4096 else 4096
    if logical >= physical or physical <= 512 or physical > 4096 or physical % logical:
        return logical
    return physical


#: the logical and physical sector sizes of a block device (linux/fs.h)
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: encrypted zeros are written from this many plaintext zeros at a time
_ZEROS_LEN = 1 << 20
_ZEROS = bytes(_ZEROS_LEN)
_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, position: int, length: int) -> bool:
    """Punch [position, position + length) out of the file, or discard it on a block
    device (which then reads as zeros); False where that is not supported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, position, length) == 0:
        return True
    err = ctypes.get_errno()
    # EINVAL: a block device's alignment rules; the caller writes encrypted zeros then
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise DeviceError(f"cannot punch {length} bytes at {position}: {os.strerror(err)}")


def _hole_block(fd: int) -> int:
    """The unit a hole or a device discard comes in: the file system's block, or the
    block device's (st_blksize: its page-sized buffer block, a multiple of the logical
    block size)."""
    return max(0, os.fstat(fd).st_blksize)


def container_holes(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The holes of the file in [start, end), as (start, end) byte ranges."""
    holes: list[tuple[int, int]] = []
    position = start
    while position < end:
        try:
            hole = os.lseek(fd, position, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.EINVAL):  # past the end, or no holes here
                break
            raise DeviceError(f"lseek of the container failed: {exc.strerror}") from exc
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise DeviceError(f"lseek of the container failed: {exc.strerror}") from exc
            data = end
        holes.append((hole, min(data, end)))
        position = data
    return holes


def _zeros_read_as_zeros(raw: memoryview, out: memoryview, ss: int) -> None:
    """Discards on: a sector whose ciphertext is all zeros -- a hole of the container,
    or the zeros a file system fills the rest of a partly written block with -- reads as
    zeros, not as the noise that decrypting zeros gives (dm-crypt's answer).  A real
    ciphertext sector is all zeros with probability 2^-(8 * ss), and its first byte
    alone rules out nearly every sector."""
    starts = bytes(raw[::ss])
    index = starts.find(0)
    while index >= 0:
        sector = raw[index * ss : (index + 1) * ss]
        if sector == _ZEROS[:ss]:
            out[index * ss : (index + 1) * ss] = _ZEROS[:ss]
        index = starts.find(0, index + 1)


class _RangeLock:
    """Excludes overlapping sector ranges; disjoint ranges proceed in parallel.

    With the C data path built, the ranges live in a ``_fastpath.RangeLock`` that
    the C whole-sector writes take too, so they never interleave with a
    read-modify-write here.
    """

    def __init__(self) -> None:
        self.native = _fastpath.RangeLock() if _fastpath is not None else None
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        if self.native is not None:
            self.native.acquire(start, end)
            try:
                yield
            finally:
                self.native.release(start, end)
            return
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append((start, end))
        try:
            yield
        finally:
            with self._cond:
                self._held.remove((start, end))
                self._cond.notify_all()


#: scratch buffers larger than this are not kept between calls
SCRATCH_KEEP = 4 << 20


class _Scratch(threading.local):
    """Per-thread I/O buffers, reused: fresh megabyte buffers cost page faults
    that were measured to exceed the decryption itself."""

    def __init__(self) -> None:
        self.buffers = [bytearray(), bytearray(), bytearray()]

    def get(self, index: int, size: int) -> memoryview:
        """A writable view of exactly *size* bytes of buffer *index*."""
        buf = self.buffers[index]
        if len(buf) < size:
            buf = bytearray(size)
            if size <= SCRATCH_KEEP:
                self.buffers[index] = buf
        return memoryview(buf)[:size]


_SCRATCH = _Scratch()


def fast_path_for(
    cipher: SectorCipher,
    *,
    fd: int,
    data_offset: int,
    size: int,
    readonly: bool,
    lock: _fastpath.RangeLock | None = None,
    direct: bool = False,
) -> _fastpath.FastVolume | None:
    """The ``_fastpath.FastVolume`` serving READ/WRITE of this geometry in C, or None.

    Only for what it implements bit for bit (AES-XTS and AES-CBC with a sector-number
    or ESSIV IV, see :meth:`SectorCipher.fast_parameters`), and for every cipher the
    libgcrypt engine serves (:attr:`SectorCipher.engine`, called from C); an XTS key
    that OpenSSL refuses (two equal halves) stays with the Python engine.  *fd* -1 gives one for
    in-memory use (``cryptfuse benchmark``).  With *direct*, large page-aligned
    transfers go through a second, O_DIRECT descriptor of the same file (which the
    ``FastVolume`` owns and closes), with read-ahead for sequential streams; see
    docs/daemon.md.
    """
    params = cipher.fast_parameters()
    engine = cipher.engine  # libgcrypt ciphers: the C path calls the engine (docs/ciphers.md)
    if (params is None and engine is None) or _fastpath is None:
        return None
    ivmodes = {
        "plain64": _fastpath.IV_PLAIN64,
        "plain": _fastpath.IV_PLAIN,
        "plain64be": _fastpath.IV_PLAIN64BE,
        "null": _fastpath.IV_NULL,
        "essiv": _fastpath.IV_ESSIV,
    }
    modes = {"xts": _fastpath.MODE_XTS, "cbc": _fastpath.MODE_CBC}
    direct_fd = open_direct(fd, readonly) if direct else -1
    try:
        if params is None:
            return _fastpath.FastVolume(
                fd=fd,
                data_offset=data_offset,
                size=size,
                sector_size=cipher.sector_size,
                readonly=readonly,
                mode=_fastpath.MODE_XTS,  # unused: the engine does the cipher work
                key=b"",
                iv_offset=cipher.iv_offset,
                iv_shift=cipher.iv_shift,
                ivmode=_fastpath.IV_NULL,
                lock=lock if lock is not None else _fastpath.RangeLock(),
                direct_fd=direct_fd,
                engine=engine,
            )
        return _fastpath.FastVolume(
            fd=fd,
            data_offset=data_offset,
            size=size,
            sector_size=cipher.sector_size,
            readonly=readonly,
            mode=modes[params.chainmode],
            key=params.key,
            iv_offset=cipher.iv_offset,
            iv_shift=cipher.iv_shift,
            ivmode=ivmodes[params.ivmode],
            lock=lock if lock is not None else _fastpath.RangeLock(),
            essiv_key=params.essiv_key,
            direct_fd=direct_fd,
        )
    except BaseException as exc:
        if direct_fd >= 0:
            os.close(direct_fd)
        if isinstance(exc, (ValueError, OverflowError)):
            return None
        raise


def open_direct(fd: int, readonly: bool) -> int:
    """*fd*'s file opened again with O_DIRECT, or -1 where that is not possible or safe.

    Only with 4 KiB pages, where the page cache's largest folio is 2 MiB (the C path's
    write granule, see docs/daemon.md on coherence with the page cache), and file
    system blocks of at most 4 KiB (larger ones may want larger O_DIRECT alignment).
    """
    if fd < 0 or os.sysconf("SC_PAGE_SIZE") != 4096:
        return -1
    try:
        if os.fstat(fd).st_blksize > 4096:
            return -1
        return os.open(
            f"/proc/self/fd/{fd}",
            (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC,
        )
    except (OSError, AttributeError):  # no /proc, or a file system without O_DIRECT
        return -1


def pwrite_direct(
    fd: int,
    data: Buffer,
    offset: int,
    what: str,
    *,
    direct: int | None = None,
    durable: bool = False,
) -> None:
    """:func:`pwrite_all`, through an O_DIRECT descriptor of *fd*'s file where *offset*
    and the length are 4 KiB multiples (else, or where O_DIRECT is refused, through *fd*).
    *direct*: that descriptor, already open (-1: there is none); by default one is
    opened for this write.  *durable*: as :func:`pwrite_all`'s.

    For large writes into ranges that are likely not cached (hot zones, wipes, the
    reencryption area), as cryptsetup writes them: on ext4 with large folios (kernel
    6.18 here) a buffered 16 MiB write into an uncached range that does not start on
    a folio boundary reads the blocks around it first, one by one (0.28 s here, 14 ms
    with O_DIRECT; docs/reencryption.md).  *data* is copied into page-aligned memory
    unless it is writable memory that is already page aligned (an ``mmap``).
    """
    view = memoryview(data).cast("B")
    length = len(view)
    if not length or offset % 4096 or length % 4096:
        pwrite_all(fd, view, offset, what, durable=durable)
        return
    own = direct is None
    if direct is None:
        direct = open_direct(fd, readonly=False)
    if direct < 0:
        pwrite_all(fd, view, offset, what, durable=durable)
        return
    try:
        try:
            aligned = not ctypes.addressof(ctypes.c_char.from_buffer(view)) % 4096
        except (TypeError, ValueError):  # read-only memory (bytes)
            aligned = False
        source = view
        if not aligned:
            copy = mmap.mmap(-1, length)
            copy[:] = view
            source = memoryview(copy)
        try:
            pwrite_all(direct, source, offset, what, durable=durable)
        except DeviceError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno != errno.EINVAL:
                raise
            pwrite_all(fd, view, offset, what, durable=durable)  # O_DIRECT refused here after all
    finally:
        if own:
            os.close(direct)


class Volume:
    """The plaintext of a container's data area as a fixed-size byte array.

    Owns *fd*. *data_offset* is the byte offset of the data area in the
    container, *size* its length in bytes (whole sectors of the cipher).
    """

    def __init__(
        self,
        fd: int,
        cipher: SectorCipher,
        data_offset: int,
        size: int,
        *,
        readonly: bool = False,
        description: str = "",
        direct: bool = True,
        fast: bool = True,
    ) -> None:
        sector_size = cipher.sector_size
        if data_offset < 0 or size < 0:
            raise UsageError("negative data offset or size")
        if size % sector_size:
            raise UsageError(
                f"volume size {size} is not a multiple of the {sector_size}-byte sector"
            )
        self.fd = fd
        self.cipher = cipher
        self.data_offset = data_offset
        self.size = size
        self.sector_size = sector_size
        self.readonly = readonly
        self.description = description
        self._lock = _RangeLock()
        self._closed = False
        #: more FastVolumes on this fd (an online reencryption's new key): drained by
        #: sync() and closed by close() with ``fast``
        self.fast_partners: list[_fastpath.FastVolume] = []
        #: discards on (--allow-discards or the LUKS2 flag): see :meth:`discard`
        self.discards = False
        #: what the opening found out, for ``cryptfuse status`` and ``resize``: the keyslot
        #: that opened it, whether the size follows the container (False: a LUKS2
        #: segment of fixed size) and the LUKS2 persistent flags
        self.key_slot: int | None = None
        self.dynamic_size = True
        self.persistent_flags: tuple[str, ...] = ()
        self._failed: str | None = None
        self.fast = (
            None
            if not fast
            else fast_path_for(
                cipher,
                fd=fd,
                data_offset=data_offset,
                size=size,
                readonly=readonly,
                lock=self._lock.native,
                direct=direct,
            )
        )

    def __repr__(self) -> str:
        return (
            f"<Volume {self.description or self.fd}: {self.size} bytes at {self.data_offset}, "
            f"{self.cipher.spec}, {self.sector_size}-byte sectors{', ro' if self.readonly else ''}>"
        )

    # -- raw sector I/O -----------------------------------------------------------

    def _read_sectors_into(self, first: int, out: memoryview) -> None:
        """Read and decrypt whole sectors starting at *first* into *out*."""
        if self.fast is not None and self.fast.lost(first, first + len(out) // self.sector_size):
            # what the container holds there is older than a write that was answered
            raise DeviceError(
                f"read of {len(out)} bytes at {self.data_offset + first * self.sector_size}: "
                "an answered write of these sectors never reached the container"
            )
        raw = _SCRATCH.get(0, len(out))
        pread_into(self.fd, raw, self.data_offset + first * self.sector_size)
        self.cipher.decrypt_into(raw, first, out)
        if self.discards:
            _zeros_read_as_zeros(raw, out, self.sector_size)

    def _write_sectors(self, first: int, plain: memoryview) -> None:
        """Encrypt whole sectors starting at *first* and write them to the container."""
        encrypted = _SCRATCH.get(1, len(plain))
        self.cipher.encrypt_into(plain, first, encrypted)
        position = self.data_offset + first * self.sector_size
        count = len(plain) // self.sector_size
        try:
            pwrite_all(self.fd, encrypted, position, f"{len(encrypted)} bytes at {position}")
        finally:
            if self.fast is not None:  # even after a failure: part of it may be on disk
                self.fast.invalidate(first, count)
        if self.fast is not None:
            self.fast.rewritten(first, first + count)

    # -- byte-granular API ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read up to *length* bytes at *offset* (short at the end, empty past it)."""
        if offset < 0 or length < 0:
            raise UsageError(f"invalid read of {length} bytes at {offset}")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        ss = self.sector_size
        first = offset // ss
        last = -(-end // ss)
        start = offset - first * ss
        with self._lock.hold(first, last):
            if end > self.size:  # shrunk (resize) while this read waited for the lock
                return self.read(offset, min(length, max(0, self.size - offset)))
            plain = _SCRATCH.get(2, (last - first) * ss)
            self._read_sectors_into(first, plain)
            return bytes(plain[start : start + end - offset])

    def write(self, offset: int, data: Buffer) -> int:
        """Write *data* at *offset*; returns the count written (short at the end)."""
        if self.readonly:
            raise ReadOnlyError("volume is read-only")
        view = memoryview(data).cast("B")
        if offset < 0:
            raise UsageError(f"invalid write at {offset}")
        if not len(view):
            return 0
        if offset >= self.size:
            raise OutOfRangeError(
                f"write of {len(view)} bytes at {offset} is beyond the end ({self.size})"
            )
        end = min(offset + len(view), self.size)
        count = end - offset
        ss = self.sector_size
        first = offset // ss
        last = -(-end // ss)
        head = offset - first * ss
        shrunk = False
        # Through the page cache: while the C path uses O_DIRECT, more than our sectors
        # (see FastVolume.write_lock_range).
        try:
            lo, hi = (first, last) if self.fast is None else self.fast.write_lock_range(first, last)
        except ValueError:  # a resize shrank the volume since the check above
            return self.write(offset, view)
        with self._lock.hold(lo, hi):
            if end > self.size:  # shrunk (resize) while this write waited for the lock
                shrunk = True
            elif head == 0 and end % ss == 0:
                self._write_sectors(first, view[:count])
                return count
            else:
                # Read-modify-write: only the partial boundary sectors need their old contents.
                buf = _SCRATCH.get(2, (last - first) * ss)
                if head:
                    self._read_sectors_into(first, buf[:ss])
                if end % ss and (last - 1 > first or not head):
                    self._read_sectors_into(last - 1, buf[-ss:])
                buf[head : head + count] = view[:count]
                self._write_sectors(first, buf)
        if shrunk:
            return self.write(offset, view)
        return count

    # -- the mounted volume's life: resize, discards, holes (docs/lifecycle.md) ------------

    def prepare_thread(self, max_request: int) -> None:
        """Grow this thread's scratch buffers now to what a request of *max_request*
        bytes needs (--lock-memory: no allocation on the data path later)."""
        for index in range(3):
            _SCRATCH.get(index, max_request + 2 * self.sector_size)

    def enable_discards(self) -> None:
        """Discards on: fallocate punches/zeroes (:meth:`discard`) and holes read as zeros."""
        self.discards = True
        for fast in self._fast_paths():
            fast.set_discards(True)

    def disable_discards(self) -> None:
        """Discards off again (``cryptfuse refresh``): fallocate is refused and holes read
        as dm-crypt reads them (decrypted zeros: noise)."""
        self.discards = False
        for fast in self._fast_paths():
            fast.set_discards(False)

    def container_size(self) -> int:
        """Bytes of the container now (a file may have grown since the volume opened)."""
        return device_size(self.fd)

    def resize(self, size: int) -> None:
        """Give the volume *size* bytes from now on, with no request in flight meanwhile."""
        if self.readonly:
            raise ReadOnlyError("the volume is read-only")
        ss = self.sector_size
        if size < 0 or size % ss:
            raise UsageError("Device size is not aligned to requested sector size.")
        room = self.container_size() - self.data_offset
        if size > room:
            raise DeviceError(
                f"the container is too small: {size // 512} sectors do not fit after the "
                f"data offset (room for {max(room, 0) // 512})"
            )
        top = max(size, self.size) // ss
        with self._lock.hold(0, top):  # waits for every read and write under way
            for fast in self._fast_paths():
                fast.set_size(size)
                fast.invalidate(0, top)
            self.size = size

    def discard(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros, returning what space it can.

        Whole sectors lying on whole allocation blocks of the container are punched
        out of it (``FALLOC_FL_PUNCH_HOLE``); partial sectors at the edges, and whole
        sectors sharing a block with data, are written as encrypted zeros, so that
        every hole of the container covers whole discarded sectors only.
        """
        if self.readonly:
            raise ReadOnlyError("the volume is read-only")
        end = min(offset + length, self.size)
        if offset < 0 or offset >= end:
            return
        ss = self.sector_size
        a, b = -(-offset // ss), end // ss
        if a >= b:
            self.write(offset, bytes(end - offset))
            return
        if offset < a * ss:
            self.write(offset, bytes(a * ss - offset))
        if end > b * ss:
            self.write(b * ss, bytes(end - b * ss))
        block = _hole_block(self.fd)
        p = q = a
        if block:
            aligned = [k for k in range(a, min(b, a + block // ss + 1)) if self._on_block(k, block)]
            if aligned:
                p = aligned[0]
                q = next(k for k in range(b, p - 1, -1) if self._on_block(k, block))
        try:
            lo, hi = (a, b) if self.fast is None else self.fast.write_lock_range(a, b)
        except ValueError:  # a resize shrank the volume meanwhile
            return self.discard(offset, length)
        with self._lock.hold(lo, hi):
            if q > p:
                position = self.data_offset + p * ss
                if not _punch_hole(self.fd, position, (q - p) * ss):
                    p = q = a  # the container's file system cannot: zeros everywhere
            for first, last in ((a, p), (q, b)):
                for k in range(first, last, _ZEROS_LEN // ss):
                    n = min(last - k, _ZEROS_LEN // ss)
                    self._write_sectors(k, memoryview(_ZEROS)[: n * ss])
            if self.fast is not None:
                self.fast.invalidate(a, b - a)

    def _on_block(self, sector: int, block: int) -> bool:
        return (self.data_offset + sector * self.sector_size) % block == 0

    def seek(self, offset: int, whence: int) -> int:
        """``lseek(SEEK_DATA/SEEK_HOLE)`` on the volume: with discards on, the container's
        holes (whole sectors); otherwise all data, the one hole at the end.  Raises
        ``OSError(ENXIO)`` at or after the end, as lseek does."""
        if offset < 0 or offset >= self.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if not self.discards:
            return offset if whence == os.SEEK_DATA else self.size
        ss = self.sector_size
        position = self.data_offset + offset
        try:
            found = os.lseek(self.fd, position, whence) - self.data_offset
        except OSError as exc:
            if exc.errno == errno.ENXIO and whence == os.SEEK_DATA:
                raise  # only holes from here to the container's end
            if exc.errno in (errno.EINVAL, errno.ENXIO):  # no hole support (block devices)
                return offset if whence == os.SEEK_DATA else self.size
            raise DeviceError(f"lseek of the container failed: {exc.strerror}") from exc
        if whence == os.SEEK_DATA:
            found = max(offset, found // ss * ss)
            if found >= self.size:
                raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
            return found
        return min(self.size, max(offset, -(-found // ss) * ss))

    @property
    def failed(self) -> str | None:
        """Why every sync fails from now on (see :meth:`sync`), or None."""
        return self._failed

    def fail(self, reason: str) -> None:
        """An answered write was lost (*reason*): every sync fails from now on."""
        if self._failed is None:
            self._failed = reason

    def _fast_paths(self) -> list[_fastpath.FastVolume]:
        """Every C data path on this fd: the partners first (closed before ``fast``)."""
        return [*self.fast_partners, *([self.fast] if self.fast is not None else [])]

    def sync(self) -> None:
        """Flush everything written so far to the container's disk.

        Errors stick: once a sync has failed because a write that was already
        answered (written behind by the C path, or in the container's page cache)
        never reached the container, every later sync fails too, until the volume
        is closed.  The kernel reports a failed writeback to one fsync and then
        forgets it (and the pages it could not write are clean again, their data
        gone); a second fsync returning 0 would tell the caller that the data it
        was told about is safe (PostgreSQL's "fsyncgate").  Remounting is the way
        out: the application re-reads what is really on the container.
        """
        if self._failed is not None:
            raise DeviceError(
                f"{self._failed}; written data may be lost (every sync fails until remounted)"
            )
        for fast in self._fast_paths():
            try:
                fast.drain()  # the C path's writes answered before their pwrite
            except OSError as exc:
                self._failed = f"a written-behind write to the container failed: {exc.strerror}"
                raise DeviceError(self._failed) from exc
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._failed = f"fsync of the container failed: {exc.strerror}"
            raise DeviceError(self._failed) from exc

    def close(self) -> None:
        """Flush (when writable) and close the container; idempotent."""
        if self._closed:
            return
        self._closed = True
        for fast in self._fast_paths():
            fast.close()  # no C read or write reaches the fd from here on (nor after the sync)
        try:
            if not self.readonly:
                self.sync()
        finally:
            os.close(self.fd)

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExtentMap:
    """One run of volume bytes mapped onto a file: *length* bytes from volume byte
    *start*, stored from byte *position* of *fd*, under *cipher* (None: plaintext)
    whose sector 0 is at *position*."""

    __slots__ = ("cipher", "fd", "length", "position", "start")

    def __init__(
        self, start: int, length: int, fd: int, position: int, cipher: SectorCipher | None
    ) -> None:
        self.start, self.length, self.fd, self.position, self.cipher = (
            start,
            length,
            fd,
            position,
            cipher,
        )


class SegmentedVolume(Volume):
    """A volume whose bytes lie in several extents under different keys or none:
    a LUKS2 container in reencryption (old-key, new-key and plaintext segments).

    Served by the Python engine only (no C data path); reads and writes split at
    extent boundaries, which are whole sectors of every cipher involved.  *fd* is
    owned (closed by :meth:`close`); *extra_fds* (a detached header read for a
    journal) too.
    """

    def __init__(
        self,
        fd: int,
        extents: list[ExtentMap],
        *,
        readonly: bool = False,
        description: str = "",
        extra_fds: tuple[int, ...] = (),
        owns_fd: bool = True,
        shared_lock: tuple[_RangeLock, int] | None = None,
        granule: int = 512,
        fast_volumes: tuple[_fastpath.FastVolume, ...] = (),
    ) -> None:
        size = sum(e.length for e in extents)
        # the read-modify-write unit: every sector size the volume has or will have
        granule = max([granule] + [e.cipher.sector_size for e in extents if e.cipher is not None])
        for e in extents:
            if e.start % granule or e.length % granule:
                raise UsageError("volume extents are not aligned to the largest sector size")
        self.extents = extents
        self._extra_fds = extra_fds
        self._owns_fd = owns_fd
        super().__init__(
            fd,
            _NullCipher(granule),  # type: ignore[arg-type]
            0,
            size,
            readonly=readonly,
            description=description,
            direct=False,
            fast=False,
        )
        # The range lock, in units of *unit* bytes: a volume served under a running
        # reencryption shares the lock of the volume it replaces (its C data path
        # takes it too), so a hot zone held here excludes every reader and writer.
        base, unit = shared_lock if shared_lock is not None else (self._lock, granule)
        if granule % unit:
            raise UsageError("shared range lock unit does not divide the sector size")
        self._base_lock, self._unit = base, unit
        self._lock = _ScaledLock(base, granule // unit)  # type: ignore[assignment]
        # The C data path of the volume it stands in for, and its partner under the new
        # key, serving what lies wholly in their windows (docs/reencryption.md): the
        # first gives the write-lock ranges, all are drained by sync() and told of
        # every write here.  Their sectors are this volume's (same size, same lock).
        if fast_volumes and granule != unit:
            raise UsageError("a C data path needs the lock's own sector size")
        self.fast_partners = list(fast_volumes[1:])
        self.fast = fast_volumes[0] if fast_volumes else None

    def enable_discards(self) -> None:
        raise UsageError("discards are not supported while a LUKS2 reencryption is under way")

    def resize(self, size: int) -> None:
        raise UsageError(
            "the volume cannot be resized while it is served through a LUKS2 "
            "reencryption's segments (remount it once the reencryption has finished)"
        )

    def hold(self, start: int, end: int) -> AbstractContextManager[None]:
        """Exclude every read and write of volume bytes [start, end) meanwhile."""
        return self._base_lock.hold(start // self._unit, -(-end // self._unit))

    def replace_extents(self, extents: list[ExtentMap]) -> None:
        """Serve from *extents* from now on (call while holding what changed)."""
        if sum(e.length for e in extents) != self.size:
            raise UsageError("new extents do not cover the volume")
        for e in extents:
            if e.start % self.sector_size or (e.cipher and self.sector_size % e.cipher.sector_size):
                raise UsageError("new extents are not aligned to the volume's sector size")
        self.extents = extents

    def _pieces(self, first: int, count: int) -> Iterator[tuple[ExtentMap, int, int, int]]:
        """(extent, offset in the extent, offset in the request, length) of a sector run."""
        lo = first * self.sector_size
        hi = lo + count
        for e in self.extents:  # one list per call: replace_extents swaps it whole
            a, b = max(lo, e.start), min(hi, e.start + e.length)
            if a < b:
                yield e, a - e.start, a - lo, b - a

    def _read_sectors_into(self, first: int, out: memoryview) -> None:
        for e, at, into, length in self._pieces(first, len(out)):
            raw = memoryview(bytearray(length))
            pread_into(e.fd, raw, e.position + at)
            if e.cipher is None:
                out[into : into + length] = raw
            else:
                e.cipher.decrypt_into(raw, at // e.cipher.sector_size, out[into : into + length])

    def _write_sectors(self, first: int, plain: memoryview) -> None:
        try:
            for e, at, into, length in self._pieces(first, len(plain)):
                piece = plain[into : into + length]
                data = (
                    piece
                    if e.cipher is None
                    else e.cipher.encrypt(piece, at // e.cipher.sector_size)
                )
                position = e.position + at
                pwrite_all(e.fd, data, position, f"{length} bytes at {position}")
        finally:  # even after a failure: part of it may be on disk
            for fast in self._fast_paths():  # read-ahead of these sectors is stale
                fast.invalidate(first, len(plain) // self.sector_size)

    # Discards and holes need one data area under one key: not here.

    def discard(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros: written as encrypted zeros
        through the extents (no hole is punched while the volume has several keys)."""
        if self.readonly:
            raise ReadOnlyError("the volume is read-only")
        end = min(offset + length, self.size)
        for at in range(max(offset, 0), end, _ZEROS_LEN):
            self.write(at, memoryview(_ZEROS)[: min(_ZEROS_LEN, end - at)])

    def seek(self, offset: int, whence: int) -> int:
        """All data (holes are not tracked across several keys), the one hole at the end."""
        if offset < 0 or offset >= self.size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return offset if whence == os.SEEK_DATA else self.size

    def close(self) -> None:
        if not self._owns_fd:  # the volume it stands in for syncs and closes the fd
            return
        try:
            super().close()
        finally:
            for fd in self._extra_fds:
                os.close(fd)
            self._extra_fds = ()


class _ScaledLock:
    """A view of a :class:`_RangeLock` whose units are *factor* of the lock's own."""

    def __init__(self, base: _RangeLock, factor: int) -> None:
        self.base, self.factor = base, factor
        self.native = base.native

    def hold(self, start: int, end: int) -> AbstractContextManager[None]:
        return self.base.hold(start * self.factor, end * self.factor)


class _NullCipher:
    """Stands for the cipher of a :class:`SegmentedVolume` (each extent has its own)."""

    def __init__(self, sector_size: int) -> None:
        self.sector_size = sector_size
        self.spec = "segmented"

    def fast_parameters(self) -> None:
        return None
