"""The filesystem on the volume (``--mount-fs``) and the way back (``cryptfuse close``).

``cryptfuse CONTAINER MOUNTPOINT --mount-fs DIR`` mounts the volume, then the filesystem
inside it at DIR:

* as root through a loop device: ``mount -t TYPE -o loop[,ro]``, so mount(8) sets the
  loop device up with ``LO_FLAGS_AUTOCLEAR`` (it goes away with the last unmount) and
  read-only when the volume is;
* as an ordinary user through ``fuse2fs`` (Debian package ``fuse2fs``), which serves
  ext2/3/4 from the volume file itself; other types need root.

The type comes from ``blkid`` (a low-level probe of the volume), or ``--fs-type``.  What
was set up is recorded in the user's control directory (:func:`control.control_dir`) as
``fs-MAJOR-MINOR.json``, named after the volume mount's device number, so that
``close`` undoes exactly what ``--mount-fs`` made and refuses anything else that holds
the volume (a loop device or process of the user's own) with exit code 5, like
``cryptsetup close`` on a busy device.

Close, in order: the filesystem (``umount``/``fusermount3 -u``; fuse2fs must exit), the
loop device (autoclear: waited for), a flush of the volume, the volume mount, and the
daemon (waited for: it syncs and closes the container before it exits; a zombie counts
as gone, since init on some machines does not reap orphans).

Finding things uses only what the kernel shows: ``/proc/self/mountinfo``,
``/sys/block/loop*/loop/backing_file``, ``/proc/PID/{fd,cwd,root,maps}``.  The daemon
is the process holding both ``/dev/fuse`` and the container open.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .control import MountEntry, control_dir, mounts
from .errors import BusyError, CryptfuseError, DeviceError, UsageError

__all__ = [
    "FsMount",
    "MountFsError",
    "check_target",
    "close",
    "mount_filesystem",
    "undo_volume",
]

log = logging.getLogger(__name__)

#: mount(8)'s exit code for "mount failure": the volume was mounted, its filesystem not
MOUNT_FAILURE = 32

#: umount2(2) flag: detach now, finish when no longer busy (``umount -l``)
MNT_DETACH = 2

#: Filesystem types fuse2fs serves (for ordinary users).
FUSE2FS_TYPES = ("ext2", "ext3", "ext4")

#: How long to wait for a mount helper to come up or for a process to exit.
TIMEOUT = 60.0


class MountFsError(CryptfuseError):
    """Raised when the filesystem inside the volume cannot be mounted (after the volume
    mount was undone) -- exit code 32, mount(8)'s "mount failure"."""

    exit_code = MOUNT_FAILURE


@dataclass
class FsMount:
    """What ``--mount-fs`` set up on one volume mount."""

    mountpoint: str  # the volume's mount (the cryptfuse FUSE mount)
    volume: str  # the volume file in it
    target: str  # where the filesystem is mounted
    fstype: str
    method: str  # "loop" (root) or "fuse2fs"
    loop: str | None = None
    helper_pid: int | None = None


# -- what the kernel shows ------------------------------------------------------------------


def mount_at(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is *path* (absolute, resolved)."""
    found = None
    for entry in mounts():
        if entry.mountpoint == path:
            found = entry
    return found


def is_cryptfuse(entry: MountEntry | None) -> bool:
    return entry is not None and entry.fstype == "fuse.cryptfuse"


def container_of(entry: MountEntry) -> str | None:
    """The container path from the mount's source ``cryptfuse:/abs/path`` (see
    :func:`mount.fsname_for`); None when ``-o fsname=`` replaced it."""
    if not entry.source.startswith("cryptfuse:/"):
        return None
    return entry.source[len("cryptfuse:") :].replace("\\,", ",").replace("\\\\", "\\")


def loop_devices(backing: str) -> list[str]:
    """The loop devices whose backing file is *backing*."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            if not name.startswith("loop"):
                continue
            try:
                with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
                    path = f.read().rstrip("\n")
            except OSError:
                continue  # not attached
            if path.removesuffix(" (deleted)") == backing:
                found.append(f"/dev/{name}")
    return found


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _links(pid: int) -> Iterator[tuple[str, str]]:
    """(what, target) for the process's cwd, root and open files (own processes, or
    all as root; others are silently invisible, as with fuser)."""
    for what in ("cwd", "root"):
        with contextlib.suppress(OSError):
            yield what, os.readlink(f"/proc/{pid}/{what}")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        with contextlib.suppress(OSError):
            yield f"fd {fd}", os.readlink(f"/proc/{pid}/fd/{fd}")


def users(path: str, exclude: set[int]) -> list[str]:
    """Who holds *path* or anything below it: processes (open files, cwd, root, mapped
    files) and mounts stacked below it; one description each."""
    inside = path.rstrip("/") + "/"
    found = []
    for pid in _pids():
        if pid in exclude or pid == os.getpid():
            continue
        hit = next(
            (what for what, target in _links(pid) if target == path or target.startswith(inside)),
            None,
        )
        if hit is None:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                    maps = f.read()
                if f" {inside}" in maps or f" {path}\n" in maps:
                    hit = "mapped file"
        if hit is not None:
            found.append(f"process {pid} ({_comm(pid)}, {hit})")
    found += [f"mount at {m.mountpoint}" for m in mounts() if m.mountpoint.startswith(inside)]
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie that nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = TIMEOUT) -> list[int]:
    """Wait until every pid has exited; returns the ones still running at the timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        left = [p for p in pids if not gone(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def daemon_pids(container: str | None, mountpoint: str) -> list[int]:
    """The cryptfuse daemon(s) serving *mountpoint*: processes holding ``/dev/fuse`` and
    the container open (by device and inode); by command line when the container is
    unknown or several daemons serve it read-only."""
    want = None
    if container is not None:
        with contextlib.suppress(OSError):
            st = os.stat(container)
            want = (st.st_dev, st.st_ino)
    fuse_holders: list[int] = []
    matches: list[int] = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        has_fuse = has_container = False
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(link) == "/dev/fuse":
                    has_fuse = True
                elif want is not None:
                    st = os.stat(link)
                    has_container = has_container or (st.st_dev, st.st_ino) == want
        if has_fuse:
            fuse_holders.append(pid)
            if has_container:
                matches.append(pid)
    if len(matches) == 1:
        return matches
    by_cmdline = [p for p in (matches or fuse_holders) if _cmdline_names(p, mountpoint)]
    return by_cmdline or matches


def _cmdline_names(pid: int, mountpoint: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    for arg in argv:
        text = os.fsdecode(arg)
        if text and os.path.normpath(os.path.join(cwd, text)) == mountpoint:
            return True
    return False


# -- mounting and unmounting ------------------------------------------------------------------

#: Searched after PATH: mount(8) runs mount.fuse3 (and so cryptfuse) with a short PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool(name: str) -> str | None:
    """Where the program *name* is, on PATH or in the system's directories."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [tool(argv[0]) or argv[0], *argv[1:]]
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def unmount(path: str, lazy: bool = False) -> None:
    """Unmount *path*; :class:`BusyError` when it is in use (nothing changed then)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            raise BusyError(f"{path} is busy")
        raise DeviceError(f"cannot unmount {path}: {os.strerror(err)}")
    result = _run(["fusermount3", "-u", *(["-z"] if lazy else []), "--", path])
    if result.returncode != 0:
        message = _one_line(result.stderr) or f"fusermount3 -u failed ({result.returncode})"
        if "busy" in message.lower():
            raise BusyError(f"{path} is busy")
        raise DeviceError(f"cannot unmount {path}: {message}")


def _record_path(mountpoint: str) -> str:
    dev = os.stat(mountpoint).st_dev
    return os.path.join(control_dir(), f"fs-{os.major(dev)}-{os.minor(dev)}.json")


def save_record(record: FsMount) -> None:
    path = _record_path(record.mountpoint)
    control_dir(create=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)


def load_record(mountpoint: str) -> FsMount | None:
    """The record of *mountpoint* when it still describes what is mounted."""
    try:
        path = _record_path(mountpoint)
        with open(path, encoding="utf-8") as f:
            record = FsMount(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if record.mountpoint != mountpoint:
        return None  # left by an earlier mount with the same device number
    return record


def _remove(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _fs_alive(record: FsMount) -> bool:
    """Whether the filesystem of *record* is still mounted at its target."""
    entry = mount_at(record.target)
    if entry is None:
        return False
    if record.method == "loop":
        return entry.source == record.loop
    return entry.fstype.startswith("fuse") and entry.source == record.volume


def check_target(target: str, mountpoint: str, fs_type: str | None) -> str:
    """Checks before the passphrase: DIR is an existing directory that nothing is mounted
    on, and this user can mount the filesystem at all.  Returns DIR resolved."""
    path = os.path.realpath(target)
    if not os.path.isdir(path):
        raise UsageError(f"--mount-fs {target}: not an existing directory")
    if path == os.path.realpath(mountpoint):
        raise UsageError("--mount-fs needs a directory other than the volume's mountpoint")
    if os.path.ismount(path):
        raise BusyError(f"--mount-fs {target}: something is already mounted there")
    if os.geteuid() != 0:
        if fs_type is not None and fs_type not in FUSE2FS_TYPES:
            raise MountFsError(
                f"--fs-type {fs_type} needs root (a loop device); as an ordinary user "
                f"cryptfuse mounts {', '.join(FUSE2FS_TYPES)} through fuse2fs"
            )
        if tool("fuse2fs") is None:
            raise MountFsError(
                "--mount-fs as an ordinary user needs fuse2fs (Debian package fuse2fs)"
            )
    return path


def detect_fstype(volume: str) -> str:
    """The filesystem type on *volume* as ``blkid`` probes it (never guessed)."""
    if tool("blkid") is None:
        raise MountFsError("blkid is not installed (Debian package util-linux); give --fs-type")
    result = _run(["blkid", "-p", "-u", "filesystem", "-o", "value", "-s", "TYPE", volume])
    fstype = result.stdout.strip()
    if result.returncode == 2 or (result.returncode == 0 and not fstype):
        raise MountFsError(
            f"no filesystem found on {volume} (blkid); make one first (e.g. mkfs.ext4) "
            "or give --fs-type"
        )
    if result.returncode != 0:
        raise MountFsError(f"blkid {volume}: {_one_line(result.stderr) or 'failed'}")
    return fstype


def mount_filesystem(
    mountpoint: str,
    volume: str,
    target: str,
    fs_type: str | None,
    fs_options: str | None,
    readonly: bool,
) -> FsMount:
    """Mount the filesystem in *volume* at *target*; on failure nothing of it stays."""
    fstype = fs_type or detect_fstype(volume)
    options = [o for o in (fs_options or "").split(",") if o]
    if readonly and "ro" not in options:
        options.insert(0, "ro")
    if os.geteuid() == 0:
        record = _mount_loop(mountpoint, volume, target, fstype, options)
    else:
        record = _mount_fuse2fs(mountpoint, volume, target, fstype, options)
    try:
        save_record(record)
    except BaseException:
        _undo_fs(record, lazy=False)
        raise
    return record


def _mount_loop(
    mountpoint: str, volume: str, target: str, fstype: str, options: list[str]
) -> FsMount:
    # mount(8) -o loop: an autoclear loop device, read-only with "ro"; it detaches the
    # loop device itself when the mount fails.
    result = _run(["mount", "-t", fstype, "-o", ",".join(["loop", *options]), volume, target])
    if result.returncode != 0:
        reason = _one_line(result.stderr) or f"mount exited with {result.returncode}"
        raise MountFsError(f"cannot mount the {fstype} filesystem at {target}: {reason}")
    entry = mount_at(target)
    record = FsMount(mountpoint, volume, target, fstype, "loop", entry.source if entry else None)
    if record.loop is None or record.loop not in loop_devices(volume):
        unmount(target)  # not what was asked for (cannot happen with -o loop): undo it
        raise MountFsError(f"mount at {target} did not use a loop device over {volume}")
    return record


def _mount_fuse2fs(
    mountpoint: str, volume: str, target: str, fstype: str, options: list[str]
) -> FsMount:
    if fstype not in FUSE2FS_TYPES:
        raise MountFsError(
            f"the volume holds {fstype}: as an ordinary user cryptfuse mounts only "
            f"{', '.join(FUSE2FS_TYPES)} (through fuse2fs); {fstype} needs root"
        )
    if tool("fuse2fs") is None:
        raise MountFsError("--mount-fs as an ordinary user needs fuse2fs (Debian package fuse2fs)")
    argv = [
        tool("fuse2fs") or "fuse2fs",
        volume,
        target,
        "-f",
        *(["-o", ",".join(options)] if options else []),
    ]
    before = os.stat(target).st_dev
    with tempfile.TemporaryFile() as errors:
        # -f: the pid we start is the one serving, so close can wait for it to exit.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors, start_new_session=True
        )
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if os.stat(target).st_dev != before:
                    break
            time.sleep(0.02)
        mounted = proc.poll() is None and os.stat(target).st_dev != before

        def text() -> str:
            errors.seek(0)
            return errors.read().decode(errors="replace")

        if not mounted:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reason = _one_line(text()) or f"fuse2fs exited with {proc.returncode}"
            raise MountFsError(f"cannot mount the {fstype} filesystem at {target}: {reason}")
        for line in text().splitlines():
            if line.strip():
                log.info("fuse2fs: %s", line.strip())
    return FsMount(mountpoint, volume, target, fstype, "fuse2fs", helper_pid=proc.pid)


def _undo_fs(record: FsMount, lazy: bool) -> None:
    """Unmount the filesystem; wait for its loop device or fuse2fs to go away."""
    if _fs_alive(record):
        unmount(record.target, lazy)
    if lazy:
        return
    if record.method == "loop":
        deadline = time.monotonic() + TIMEOUT
        while record.loop in loop_devices(record.volume):
            if time.monotonic() > deadline:
                raise BusyError(f"loop device {record.loop} did not detach from {record.volume}")
            time.sleep(0.02)
    elif record.helper_pid is not None and wait_gone([record.helper_pid]):
        raise BusyError(f"fuse2fs (pid {record.helper_pid}) did not exit after the unmount")


def _flush(volume: str) -> None:
    """fsync the volume: the daemon writes everything through to the container's disk."""
    try:
        fd = os.open(volume, os.O_RDONLY | os.O_CLOEXEC)
    except PermissionError:
        return  # another user's mount without allow_other: the daemon syncs on exit
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DeviceError(f"flushing {volume} failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def undo_volume(mountpoint: str, container: str | None) -> None:
    """Unmount the volume and wait for its daemon to exit (the container is closed then)."""
    pids = daemon_pids(container, mountpoint)
    unmount(mountpoint)
    left = wait_gone(pids)
    if left:
        raise DeviceError(
            f"the volume is unmounted but its daemon (pid {left[0]}) has not exited yet"
        )


# -- close -----------------------------------------------------------------------------------


def _volume_file(mountpoint: str) -> str | None:
    with contextlib.suppress(OSError):
        names = os.listdir(mountpoint)
        if len(names) == 1:
            return os.path.join(mountpoint, names[0])
    return None


def find(path: str) -> tuple[MountEntry, FsMount | None]:
    """The cryptfuse mount that *path* names (its mountpoint or its ``--mount-fs`` DIR)."""
    real = os.path.realpath(path)
    entry = mount_at(real)
    if is_cryptfuse(entry):
        assert entry is not None
        return entry, load_record(real)
    for candidate in mounts():
        if is_cryptfuse(candidate):
            record = load_record(candidate.mountpoint)
            if record is not None and record.target == real:
                return candidate, record
    raise DeviceError(f"{path} is not an active cryptfuse mount (nor its --mount-fs directory)")


def close(path: str, deferred: bool = False) -> str | None:
    """``cryptfuse close``; returns a note for the user (deferred) or None.

    Raises :class:`BusyError` (exit 5) naming what holds the volume, having changed
    nothing; with *deferred*, detaches instead and lets the last user end it.
    """
    entry, record = find(path)
    mountpoint = entry.mountpoint
    container = container_of(entry)
    try:  # found before the unmount, which changes what the mountpoint's stat says
        record_file: str | None = _record_path(mountpoint)
    except OSError:
        record_file = None
    volume = record.volume if record is not None else _volume_file(mountpoint)
    if record is not None and not _fs_alive(record):
        log.info("the filesystem at %s was unmounted already", record.target)
        record = None
    ours: set[int] = set()
    holders: list[str] = []
    if record is not None:
        if record.helper_pid is not None:
            ours.add(record.helper_pid)
        holders += [f"{who} in {record.target}" for who in users(record.target, set())]
        if record.loop is not None:
            holders += [f"{who} on {record.loop}" for who in users(record.loop, set())]
    if volume is not None:
        own_loop = record.loop if record is not None else None
        holders += [f"loop device {loop}" for loop in loop_devices(volume) if loop != own_loop]
    holders += users(mountpoint, ours)
    if holders:
        if not deferred:
            raise BusyError(f"{mountpoint} is still in use by: {'; '.join(holders)}")
        if record is not None:
            unmount(record.target, lazy=True)
        unmount(mountpoint, lazy=True)
        _remove(record_file)
        return (
            f"deferred: {mountpoint} is detached and closes when the last user lets go "
            f"({'; '.join(holders)})"
        )
    if record is not None:
        _undo_fs(record, lazy=False)
    _remove(record_file)  # also a stale one, whose filesystem was unmounted by hand
    if volume is not None:
        _flush(volume)
    try:
        undo_volume(mountpoint, container)
    except BusyError as exc:
        what = users(mountpoint, set())
        done = "its filesystem was unmounted; " if record is not None else ""
        raise BusyError(
            f"{exc}: {done}the volume is still held by {'; '.join(what) or 'an unknown user'}"
        ) from None
    return None
