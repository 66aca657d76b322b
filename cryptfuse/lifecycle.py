"""A mounted volume's life, daemon side: ``status``, ``resize`` and ``refresh`` over the
control socket, and ``--lock-memory`` (see docs/lifecycle.md).

The commands (:mod:`cryptfuse.cli_lifecycle`) find the daemon by the mount's device
number (:func:`cryptfuse.control.mount_socket_path`); the handlers here answer with
plain JSON-able dictionaries.  Nothing secret ever goes into an answer: no key, no
passphrase, only what ``cryptsetup status`` prints and counters.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
from collections.abc import Callable
from typing import Any

from .channel import Channel
from .control import ControlServer, Served, find_mount
from .errors import BusyError, CryptfuseError, InsufficientMemoryError, UsageError
from .formats import manage
from .fs import FILE_INODE, VolumeFS
from .volume import SegmentedVolume, Volume

__all__ = ["lock_memory", "persist_flags", "start_control"]

log = logging.getLogger(__name__)

MCL_CURRENT, MCL_FUTURE = 1, 2
# glibc mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def lock_memory() -> None:
    """Lock the daemon's memory (``mlockall``) and keep what it frees.

    ``MCL_FUTURE`` locks every later mapping at once, so the pages the data path
    reuses never go to swap; malloc is told never to give memory back (no trim, no
    per-allocation ``mmap``), so that the steady state reuses locked pages instead of
    asking the kernel for new ones while it may be short of memory.  Called in the
    daemon itself: locks are not inherited across ``fork``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        raise InsufficientMemoryError(
            f"--lock-memory: mlockall failed: {os.strerror(err)} "
            "(needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK)"
        )
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:  # glibc only; other C libraries keep their defaults
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
        mallopt(M_MMAP_THRESHOLD, 1 << 30)
    log.info("memory locked (mlockall MCL_CURRENT|MCL_FUTURE)")


def _mount_device(mountpoint: str) -> str | None:
    # The parent directory is resolved, the mountpoint itself is not touched: a stat
    # of it would wait for this daemon, which does not serve yet.
    real = os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))
    entry = find_mount(real)
    if entry is None or not entry.is_cryptfuse:
        return None
    return entry.device


def persist_flags(volume: Volume, header: str, flags: list[str]) -> list[str]:
    """``--persistent`` in the daemon: the LUKS2 header's flags replaced by *flags*
    (:func:`~cryptfuse.formats.manage.set_persistent_flags`) while the container's
    lock is held exclusively (a read-only mount holds it shared: taken exclusively
    without waiting, then shared again).  Returns what to report: nothing, or
    cryptsetup's two lines when nothing could be kept."""
    try:
        if volume.readonly:
            try:
                fcntl.flock(volume.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _shared_again(volume.fd)  # (a conversion drops the old lock first)
                raise BusyError(f"{header} is in use by another process.") from None
        try:
            manage.set_persistent_flags(header, flags)
        finally:
            if volume.readonly:
                _shared_again(volume.fd)
    except (CryptfuseError, OSError) as exc:
        return [str(exc), "Device activated but cannot make flags persistent."]
    return []


def _shared_again(fd: int) -> None:
    """The read-only mount's shared lock back (flock(2): converting a lock is not
    atomic, so another process may have taken it exclusively meanwhile: then said)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("the container's lock was taken by another process: it may change")


def start_control(
    ops: VolumeFS,
    channel: Channel,
    *,
    mountpoint: str,
    container: str | None,
    header: str | None,
    info: dict[str, Any],
    memory_locked: bool,
    getter: Callable[[], Volume],
    setter: Callable[[Volume], None],
) -> ControlServer | None:
    """Listen for ``status``/``resize`` (and, writable, online reencryption)."""
    device = _mount_device(mountpoint)
    readonly = ops.volume.readonly
    by_container = container is not None and not readonly
    if device is None and not by_container:
        log.warning("cannot find the mount of %s: no status or resize for it", mountpoint)
        return None
    holder: list[ControlServer] = []

    def status(request: dict[str, Any]) -> dict[str, Any]:
        volume = ops.volume
        fast = ops.fast
        counters = dict(ops.counters)
        if fast is not None:
            counters["reads"] += fast.reads
            counters["writes"] += fast.writes
        answer = dict(info)
        # (discards as they are now: refresh turns them on and off)
        flags = ["discards"] * bool(getattr(volume, "discards", False))
        flags += [f for f in answer.get("flags", []) if f != "discards"]
        answer.update(
            mountpoint=mountpoint,
            file=os.path.join(mountpoint, ops.options.name),
            size=volume.size // 512,
            mode="readonly" if volume.readonly else "read/write",
            flags=flags,
            pid=os.getpid(),
            key_location="daemon memory, locked" if memory_locked else "daemon memory",
            io=counters,
            c_data_path=fast is not None and not getattr(fast, "closed", False),
            reencryption=bool(holder and holder[0].reencrypting),
        )
        return answer

    def resize(request: dict[str, Any]) -> dict[str, Any]:
        volume = ops.volume
        if volume.readonly:
            raise UsageError(f"{mountpoint} is mounted read-only: it cannot be resized")
        if isinstance(volume, SegmentedVolume) or not isinstance(volume, Volume):
            raise UsageError(f"{mountpoint} is in reencryption: resize it once that is done")
        if not volume.dynamic_size:
            raise UsageError("Can not resize LUKS2 device with static size.")
        sectors = request.get("size")
        if sectors is not None and (not isinstance(sectors, int) or sectors < 0):
            raise UsageError(f"invalid size {sectors!r}")
        if sectors:  # as cryptsetup: no --size (or 0) means the container's size
            new_size = sectors * 512
        else:
            room = volume.container_size() - volume.data_offset
            new_size = max(room, 0) // volume.sector_size * volume.sector_size
        old = volume.size
        volume.resize(new_size)
        channel.invalidate_attributes(FILE_INODE)
        log.info("resized %s from %d to %d sectors", mountpoint, old // 512, new_size // 512)
        return {"size": new_size // 512, "old_size": old // 512, "file": status({})["file"]}

    def refresh(request: dict[str, Any]) -> dict[str, Any]:
        """``cryptfuse refresh`` (cryptsetup's): the key the command unlocked (or, plain,
        derived) must be this volume's (its SHA-256 compared, as cryptsetup compares the
        keys: "Mismatching parameters"); then discards on or off, and with ``persist``
        the LUKS2 header's flags replaced, as at a ``--persistent`` mount."""
        luks2 = info.get("type") == "LUKS2"
        busy = f"{mountpoint} is busy with an online reencryption or another refresh"
        with holder[0].exclusive(busy):
            volume = ops.volume
            if (
                isinstance(volume, SegmentedVolume)
                or not isinstance(volume, Volume)
                or volume.fast_partners
            ):
                raise UsageError(
                    f"{mountpoint} is served through a LUKS2 reencryption's keys: "
                    "remount it before a refresh"
                )
            digest = request.get("key_digest")
            try:
                expected = bytes.fromhex(digest) if isinstance(digest, str) else b""
            except ValueError:
                expected = b""
            cipher = getattr(volume, "cipher", None)
            if not expected or cipher is None or not cipher.key_digest_matches(expected):
                raise CryptfuseError(f"Mismatching parameters on device {mountpoint}.")
            persist = request.get("persist")
            if persist is not None and (
                not isinstance(persist, list) or not all(isinstance(f, str) for f in persist)
            ):
                raise UsageError(f"invalid flags {persist!r}")
            path = header or container or ""
            # as at a mount: the header's flags count, unless they are being replaced
            kept = manage.persistent_flags(path) if persist is None and luks2 else ()
            if request.get("discards") is True or "allow-discards" in kept:
                volume.enable_discards()
            else:
                volume.disable_discards()
            messages = [] if persist is None else persist_flags(volume, path, persist)
            log.info("refreshed %s: discards %s", mountpoint, "on" if volume.discards else "off")
            return {"flags": status({})["flags"], "messages": messages}

    served = Served(
        container or "",
        header,
        getter,
        setter,
        handlers={"status": status, "resize": resize, "refresh": refresh},
    )
    try:
        server = ControlServer(served, by_container=by_container, mount_device=device)
    except (CryptfuseError, OSError):
        if not by_container:  # a read-only mount works without its control socket
            log.warning("no control socket for %s: status and resize unavailable", mountpoint)
            return None
        raise
    holder.append(server)
    return server
