"""The FUSE file system: one directory holding one regular file, the volume.

The file's contents are the decrypted data area of the container; reads and
writes go to :class:`cryptfuse.volume.Volume` (synchronous, thread-safe) in
worker threads, so the trio loop keeps serving other requests while a large
request is being encrypted.  This module is the only place where errors become
errno values: every call into the volume goes through
:meth:`VolumeFS._volume_call`, which logs the failure with its context and
raises :class:`pyfuse3.FUSEError` (the only exception allowed to leave an
operation; anything else would end pyfuse3's main loop).

Metadata (mode, owner, timestamps) lives in memory only: it starts from the
mounting user's uid/gid and the container's timestamps and is forgotten at
unmount, like the attributes of a device node that udev recreates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pyfuse3
import trio

from .errors import CryptfuseError, OutOfRangeError, ReadOnlyError
from .sector import Buffer

log = logging.getLogger(__name__)

#: volume calls of at most this many bytes are answered without a worker thread
INLINE_MAX = 128 * 1024

T = TypeVar("T")

ROOT_INODE: int = pyfuse3.ROOT_INODE
FILE_INODE: int = ROOT_INODE + 1

#: Kernel caches for names and attributes: nothing changes behind the kernel's back
#: (the size is fixed, the only writer of metadata is this process), so long timeouts
#: save a round trip per ``stat``.
ENTRY_TIMEOUT = 300.0

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_KNOWN = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
ATTR_TIMEOUT = 60.0


class VolumeLike(Protocol):
    """What the file system needs from :class:`cryptfuse.volume.Volume`."""

    size: int
    sector_size: int
    readonly: bool

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: Buffer) -> int: ...

    def sync(self) -> None: ...


@dataclass
class FSOptions:
    """Presentation of the volume in the mounted directory."""

    name: str = "volume"
    uid: int | None = None  # None: the mounting process' uid
    gid: int | None = None
    file_mode: int = 0o600
    dir_mode: int = 0o700
    #: True: every request bypasses the kernel page cache (see docs/daemon.md)
    direct_io: bool = True
    #: threads serving FUSE requests at once (cryptfuse.channel)
    threads: int = 4
    #: --lock-memory: each worker grows its buffers before serving (VolumeFS.prepare_thread)
    preallocate: bool = False


def errno_for(exc: BaseException) -> int:
    """The errno that a failed volume call reports to the kernel."""
    if isinstance(exc, OutOfRangeError):
        return errno.ENOSPC
    if isinstance(exc, ReadOnlyError):
        return errno.EROFS
    return errno.EIO


class VolumeFS(pyfuse3.Operations):
    """pyfuse3 operations exposing *volume* as the single file *options.name*."""

    def __init__(
        self,
        volume: VolumeLike,
        options: FSOptions | None = None,
        *,
        timestamp_ns: int | None = None,
    ) -> None:
        super().__init__()
        self.volume = volume
        self.options = options or FSOptions()
        name = self.options.name
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"invalid file name {name!r}")
        self.name = os.fsencode(name)
        self.limiter = trio.CapacityLimiter(max(1, self.options.threads))
        now = timestamp_ns if timestamp_ns is not None else time.time_ns()
        uid = self.options.uid if self.options.uid is not None else os.getuid()
        gid = self.options.gid if self.options.gid is not None else os.getgid()
        self._owner = {ROOT_INODE: [uid, gid], FILE_INODE: [uid, gid]}
        self._mode = {
            ROOT_INODE: stat.S_IFDIR | (self.options.dir_mode & 0o7777),
            FILE_INODE: stat.S_IFREG | (self.options.file_mode & 0o7777),
        }
        # [atime, mtime, ctime] in ns
        self._times = {ROOT_INODE: [now, now, now], FILE_INODE: [now, now, now]}
        # Set by every write, cleared just before a sync starts: a write that lands
        # during the sync sets it again, so flush/fsync never skip unsynced data.
        self._dirty = False
        #: the C data path (cryptfuse._fastpath.FastVolume) when the volume has one: its
        #: writes never pass through here, so its write count and time are polled
        self.fast = getattr(volume, "fast", None)
        self._synced_fast_writes = 0
        self._seen_fast_write_ns = 0
        self._sync_lock = trio.Lock()
        self._next_fh = 1
        #: requests served through Python (the C path counts its own), for ``status``
        self.counters = {"reads": 0, "writes": 0, "discards": 0, "discarded_bytes": 0}

    # -- the one place where volume errors become errno values -----------------

    @contextlib.contextmanager
    def _errno_mapping(self, what: str, offset: int, length: int) -> Iterator[None]:
        """Turn a failed volume call into :class:`pyfuse3.FUSEError`, logged with context."""
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except (OutOfRangeError, ReadOnlyError) as exc:
            # Expected outcomes of user requests, not faults of cryptfuse.
            log.debug("%s of %d bytes at %d: %s", what, length, offset, exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except (CryptfuseError, OSError) as exc:
            log.error("%s of %d bytes at %d failed: %s", what, length, offset, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            # A bug: keep the daemon serving, but leave the traceback in the log.
            # Messages never contain key material.
            log.exception("%s of %d bytes at %d failed unexpectedly", what, length, offset)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _volume_call(
        self, what: str, offset: int, length: int, func: Callable[..., T], *args: object
    ) -> T:
        """Run a blocking volume call from the trio loop; map its errors to errno.

        Requests up to :data:`INLINE_MAX` bytes run on the event loop itself: the
        hand-off to a worker thread was measured at ~230 us here, more than
        decrypting 4 KiB, while large requests still go to threads so the loop
        keeps serving others.
        """
        with self._errno_mapping(what, offset, length):
            if length <= INLINE_MAX:
                return func(*args)
            return await trio.to_thread.run_sync(func, *args, limiter=self.limiter)
        raise AssertionError("unreachable")  # pragma: no cover - for mypy

    # -- the data path, callable from any thread ------------------------------------

    def read_now(self, off: int, size: int) -> bytes:
        """Decrypt *size* bytes at *off* in the calling thread (errors as FUSEError)."""
        with self._errno_mapping("read", off, size):
            data = self.volume.read(off, size)
            self.counters["reads"] += 1
            return data
        raise AssertionError("unreachable")  # pragma: no cover - for mypy

    def prepare_thread(self, max_request: int) -> None:
        """Allocate the calling worker thread's buffers for requests up to *max_request*."""
        prepare = getattr(self.volume, "prepare_thread", None)
        if prepare is not None:
            prepare(max_request)

    def fallocate_now(self, off: int, length: int, mode: int) -> None:
        """``fallocate(2)`` on the volume: PUNCH_HOLE and ZERO_RANGE discard the range
        when discards are on (docs/lifecycle.md); EOPNOTSUPP otherwise and for
        allocation (mode 0), as dm-crypt without ``--allow-discards`` refuses them."""
        if not getattr(self.volume, "discards", False):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if mode & ~FALLOC_KNOWN or not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if self.volume.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if not mode & FALLOC_FL_KEEP_SIZE and off + length > self.volume.size:
            raise pyfuse3.FUSEError(errno.EFBIG)  # the volume cannot grow by itself
        discard: Callable[[int, int], None] = getattr(self.volume, "discard")  # noqa: B009
        try:
            with self._errno_mapping("discard", off, length):
                discard(off, length)
                self.counters["discards"] += 1
                self.counters["discarded_bytes"] += max(0, min(length, self.volume.size - off))
        finally:
            self._wrote()

    def lseek_now(self, off: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE``: the container's holes with discards on (ENOSYS
        without: the kernel then treats the whole file as data, as it does anyway)."""
        if not getattr(self.volume, "discards", False):
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        seek: Callable[[int, int], int] = getattr(self.volume, "seek")  # noqa: B009
        with self._errno_mapping("seek", off, 0):
            try:
                return int(seek(off, whence))
            except OSError as exc:  # ENXIO: at or past the end, or only holes after off
                if exc.errno == errno.ENXIO:
                    raise pyfuse3.FUSEError(errno.ENXIO) from None
                raise
        raise AssertionError("unreachable")  # pragma: no cover - for mypy

    def write_now(self, off: int, buf: Buffer, *, writeback: bool = False) -> int:
        """Encrypt *buf* to *off* in the calling thread (errors as FUSEError).

        *writeback*: the kernel writes back its page cache (``-o page_cache`` and
        mmap); the application's write was answered long ago, and the kernel reports
        a failure to one fsync only, so the volume is marked failed: every later sync
        fails too (docs/reliability.md).
        """
        length = len(memoryview(buf))
        if self.volume.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            with self._errno_mapping("write", off, length):
                try:
                    written = self.volume.write(off, buf)
                except (CryptfuseError, OSError) as exc:
                    fail = getattr(self.volume, "fail", None)
                    if writeback and fail is not None:
                        fail(f"a written-back write of {length} bytes at {off} failed: {exc}")
                    raise
                self.counters["writes"] += 1
                return written
        finally:
            self._wrote()
        raise AssertionError("unreachable")  # pragma: no cover - for mypy

    def _wrote(self) -> None:
        # Set once the write is over (also when it failed part-way: some of it may
        # have reached the container), never before: a sync that clears the flag
        # while a write is in flight must not make a later fsync skip that write.
        self._dirty = True
        self._times[FILE_INODE][1] = self._times[FILE_INODE][2] = time.time_ns()

    def _observe_fast_writes(self) -> None:
        """Give the file the mtime/ctime of writes served in C (they bypass _wrote).

        A maximum, so a later Python write's own time is never moved back; SETATTR
        calls it before applying explicit times so that those win.
        """
        if self.fast is None:
            return
        written_ns = self.fast.last_write_ns
        if written_ns > self._seen_fast_write_ns:
            self._seen_fast_write_ns = written_ns
            times = self._times[FILE_INODE]
            times[1] = max(times[1], written_ns)
            times[2] = max(times[2], written_ns)

    # -- attributes ---------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        if inode not in self._mode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = self._mode[inode]
        entry.st_uid, entry.st_gid = self._owner[inode]
        entry.st_rdev = 0
        # st_blksize is the preferred I/O size; a whole page (at least one sector)
        # keeps tools from issuing sub-sector writes that need read-modify-write.
        entry.st_blksize = max(4096, self.volume.sector_size)
        if inode == FILE_INODE:
            self._observe_fast_writes()
        entry.st_atime_ns, entry.st_mtime_ns, entry.st_ctime_ns = self._times[inode]
        if inode == FILE_INODE:
            entry.st_nlink = 1
            entry.st_size = self.volume.size
            entry.st_blocks = -(-self.volume.size // 512)  # fully allocated
        else:
            entry.st_nlink = 2
            entry.st_size = 0
            entry.st_blocks = 0
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Attributes of the directory or the volume file."""
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Resolve *name* in the directory: only the volume file exists."""
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == self.name:
            return self._attr(FILE_INODE)
        if name in (b".", b".."):
            return self._attr(ROOT_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """chmod/chown/utimens in memory; truncate only to the current size.

        The volume has the container's size: truncating it to any other size is
        refused with EPERM (``truncate(2)``'s "file system does not support
        resizing"), so ``cat image > volume`` fails instead of silently writing
        into a file that did not shrink; use ``dd conv=notrunc``.
        """
        if inode not in self._mode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        now = time.time_ns()
        if fields.update_size:
            if inode != FILE_INODE:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if self.volume.readonly:
                raise pyfuse3.FUSEError(errno.EROFS)
            if attr.st_size != self.volume.size:
                log.debug(
                    "refused truncate to %d (volume has %d bytes)", attr.st_size, self.volume.size
                )
                raise pyfuse3.FUSEError(errno.EPERM)
        owner = self._owner[inode]
        # The kernel checks these too (we always mount with default_permissions);
        # checking again keeps the rules right if that option is ever dropped.
        if fields.update_uid or fields.update_gid:
            if ctx.uid != 0:
                raise pyfuse3.FUSEError(errno.EPERM)
            if fields.update_uid:
                owner[0] = attr.st_uid
            if fields.update_gid:
                owner[1] = attr.st_gid
        if fields.update_mode:
            if ctx.uid not in (0, owner[0]):
                raise pyfuse3.FUSEError(errno.EPERM)
            # Only permission bits change; the file type is fixed.
            self._mode[inode] = stat.S_IFMT(self._mode[inode]) | (attr.st_mode & 0o7777)
        # Writes served in C so far are older than this change: fold their time in
        # first, so that the explicit times below win.
        self._observe_fast_writes()
        times = self._times[inode]
        if fields.update_atime:
            times[0] = attr.st_atime_ns
        if fields.update_mtime:
            times[1] = attr.st_mtime_ns
        times[2] = now
        return self._attr(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """A full file system of one file: size = the volume, nothing free."""
        st = pyfuse3.StatvfsData()
        block = self.volume.sector_size
        st.f_bsize = block
        st.f_frsize = block
        st.f_blocks = self.volume.size // block
        st.f_bfree = 0
        st.f_bavail = 0
        st.f_files = 2
        st.f_ffree = 0
        st.f_favail = 0
        st.f_namemax = 255
        return st

    # -- the directory ---------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Open the root directory (the only directory)."""
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT_INODE

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List ``.``, ``..`` and the volume file; *start_id* is the index to resume at."""
        entries = self.dir_entries()
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), index + 1):
                break

    def dir_entries(self) -> tuple[tuple[bytes, int], ...]:
        """The directory's (name, inode) entries, in readdir order."""
        # FUSE does not synthesize the dot entries; tools like `ls -a` and `find`
        # expect them.
        return ((b".", ROOT_INODE), (b"..", ROOT_INODE), (self.name, FILE_INODE))

    # -- the file --------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open the volume file; opening for writing fails on a read-only mount."""
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.volume.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        # keep_cache only matters without direct_io: the data never changes behind
        # the kernel's back, so a cached page stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, direct_io=self.options.direct_io, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Decrypt *size* bytes at *off* (short at the end, empty past it)."""
        return await self._volume_call("read", off, size, self.volume.read, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Encrypt *buf* to *off*; ENOSPC at/after the end, EROFS when read-only."""
        if self.volume.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            return await self._volume_call("write", off, len(buf), self.volume.write, off, buf)
        finally:
            self._wrote()

    async def _sync(self, what: str) -> None:
        # One sync at a time: FLUSH and FSYNC can overlap (the kernel serialises only
        # FSYNCs), and a second caller must not see "nothing new" and return while the
        # first one's fsync(2), which covers its writes, is still running.
        async with self._sync_lock:
            # A fast write counts before its reply (a written-behind one before its
            # pwrite, which Volume.sync waits for): one still in flight now is counted
            # later and makes the next sync happen.
            fast_writes = self.fast.writes if self.fast is not None else 0
            # A failed volume fails every sync, with or without new writes
            # (docs/reliability.md): never the shortcut then.
            failed = getattr(self.volume, "failed", None) is not None
            if not failed and not self._dirty and fast_writes == self._synced_fast_writes:
                return
            self._dirty = False
            self._synced_fast_writes = fast_writes
            try:
                await self._volume_call(what, 0, self.volume.size, self.volume.sync)
            except pyfuse3.FUSEError:
                self._dirty = True
                raise

    async def flush(self, fh: int) -> None:
        """On every close(): make what was written durable (close reports errors)."""
        await self._sync("flush")

    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync/fdatasync: flush the container to its disk."""
        await self._sync("fsync")

    async def release(self, fh: int) -> None:
        """Nothing to do per handle: no per-open state beyond the number."""

    # -- everything that would change the directory: refused ------------------------

    def refusal_errno(self) -> int:
        """The errno of every request that would change the directory."""
        return errno.EROFS if self.volume.readonly else errno.EPERM

    def _refuse(self) -> pyfuse3.FUSEError:
        return pyfuse3.FUSEError(self.refusal_errno())

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """No new files: the directory holds exactly the volume."""
        raise self._refuse()

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """No new files: the directory holds exactly the volume."""
        raise self._refuse()

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """No new directories."""
        raise self._refuse()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """The volume cannot be removed (unmount instead)."""
        raise self._refuse()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """There are no subdirectories."""
        raise self._refuse()

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """The name is fixed by ``--name``."""
        raise self._refuse()

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """No new entries."""
        raise self._refuse()

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """No new entries."""
        raise self._refuse()
