"""The daemon's lifecycle: mount, serve with trio, unmount, close the container.

:func:`run` takes an already unlocked :class:`~cryptfuse.volume.Volume` (the
CLI runs the KDF first, so a wrong passphrase is reported before anything is
mounted) and either serves it in the foreground or forks a daemon.  The
daemon mounts, tells the waiting parent through a pipe that the mount is ready
(or sends it the one-line error), detaches from the terminal and serves until
``fusermount3 -u``/``umount`` or SIGTERM/SIGINT/SIGHUP.  Whatever ends the main
loop, the same exit stack unmounts, syncs and closes the container.

Nothing here forks after trio started: trio and pyfuse3's session do not
survive a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyfuse3
import trio

from .channel import Channel, find_fuse_fds
from .errors import CryptfuseError, UsageError
from .fs import FSOptions, VolumeFS, VolumeLike
from .hygiene import protect_process
from .lifecycle import lock_memory, start_control
from .volume import Volume

log = logging.getLogger(__name__)

#: Signals that end the daemon cleanly (SIGHUP: the terminal of a foreground run went away).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Options every cryptfuse mount gets; the user's ``-o`` can override the ``key=`` ones.
#: default_permissions: the kernel checks mode/owner like on any file, so mode 0600
#: means what it says even with ``-o allow_other``.
BASE_OPTIONS = ("default_permissions", "subtype=cryptfuse")

#: umount2(2) flag: detach now, finish when the file system is no longer busy
MNT_DETACH = 2

#: Options libfuse handles itself or that would break the daemon's contract.
FORBIDDEN_OPTIONS = frozenset({"auto_unmount", "clone_fd"})


class ServedVolume(VolumeLike, Protocol):
    """What the daemon serves and finally closes: a :class:`~cryptfuse.volume.Volume`."""

    description: str

    def close(self) -> None: ...


class MountError(CryptfuseError):
    """Raised when FUSE cannot mount (module missing, option refused, permission)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class MountConfig:
    """Everything :func:`run` needs besides the volume."""

    mountpoint: str
    fs: FSOptions = field(default_factory=FSOptions)
    #: user ``-o`` options, already split on commas
    fuse_options: tuple[str, ...] = ()
    foreground: bool = False
    #: daemon mode: where stderr (and so the log) goes; None -> /dev/null
    log_file: str | None = None
    #: the mount's source (see :func:`fsname_for`); ``-o fsname=`` overrides it
    fsname: str = "cryptfuse"
    #: the container (and detached header) files: the control socket (online
    #: reencryption, see :mod:`cryptfuse.control`) is found by the container's inode
    container: str | None = None
    header: str | None = None
    #: what ``cryptfuse status`` reports besides the live values (cli_lifecycle.volume_info)
    info: dict[str, Any] = field(default_factory=dict)
    #: --lock-memory: mlockall in the daemon (cryptfuse.lifecycle.lock_memory)
    lock_memory: bool = False
    #: runs in the daemon once the kernel mount exists, before the control socket (no
    #: online reencryption yet) and before the mount is reported ready
    #: (``--persistent``: the header's flags; it reports its own failures)
    after_mount: Callable[[ServedVolume], None] | None = None


def fsname_for(container: str) -> str:
    """The mount's source as ``mount``/``findmnt``/``df`` show it: ``cryptfuse:/abs/path``.

    It says which container is mounted, and the prefix keeps util-linux from
    taking it for a relative path. libfuse splits options on commas, so commas
    (and the escaping backslash) in the path are escaped.
    """
    path = os.path.abspath(container)
    return "cryptfuse:" + path.replace("\\", "\\\\").replace(",", "\\,")


def build_fuse_options(user: Iterable[str], readonly: bool, fsname: str = "cryptfuse") -> set[str]:
    """The option set for :func:`pyfuse3.init`: ours, then the user's ``-o``.

    A user ``key=value`` replaces our option with the same key (e.g.
    ``-o fsname=/dev/mycontainer``); a read-only volume is mounted ``ro`` so
    the kernel refuses writes before they reach us.
    """
    options: dict[str, str] = {}
    ours = (*BASE_OPTIONS, f"fsname={fsname}", *(("ro",) if readonly else ()))
    for opt in (*ours, *user):
        opt = opt.strip()
        if not opt:
            continue
        key = opt.split("=", 1)[0]
        if key in FORBIDDEN_OPTIONS:
            raise MountError(f"FUSE option {key!r} is not supported by cryptfuse")
        if key == "rw" and readonly:
            raise MountError("-o rw contradicts --readonly")
        options[key] = opt
    return set(options.values())


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Collect what C code (libfuse, fusermount3) writes to fd 2 meanwhile.

    libfuse reports mount failures only as text on stderr; capturing it lets us
    give the user one line with the real reason instead of two.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        text: list[str] = []
        try:
            yield lambda: "".join(text)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))


def _mount(ops: VolumeFS, config: MountConfig, options: set[str]) -> int:
    """pyfuse3.init with a one-line error instead of libfuse's stderr chatter.

    Returns the session's ``/dev/fuse`` descriptor (libfuse's: do not close it).
    """
    log.debug("mounting %s with options %s", config.mountpoint, ",".join(sorted(options)))
    message = ""
    before = find_fuse_fds()
    with _captured_stderr() as captured:
        try:
            pyfuse3.init(ops, config.mountpoint, options)
        except (RuntimeError, OSError) as exc:
            message = str(exc)
    chatter = " ".join(line.strip() for line in captured().splitlines() if line.strip())
    if message:
        reason = chatter or message
        raise MountError(f"cannot mount {config.mountpoint}: {reason}")
    if chatter:
        log.warning("libfuse: %s", chatter)
    new = find_fuse_fds() - before
    if len(new) != 1:
        raise MountError(f"cannot find the FUSE session of {config.mountpoint}")
    return new.pop()


def _lazy_unmount(mountpoint: str) -> None:
    """Detach the mount like ``umount -l``: the kernel ends the FUSE connection once
    nothing uses the file system any more (at once when nothing does)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
            return
        log.debug("umount2(%s): %s", mountpoint, os.strerror(ctypes.get_errno()))
    result = subprocess.run(
        ["fusermount3", "-u", "-z", "--", mountpoint],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        log.error("cannot unmount %s: %s", mountpoint, result.stderr.strip())


async def _main_loop(config: MountConfig, pending: list[int], channel: Channel) -> None:
    """Serve until the kernel ends the connection (unmount); signals unmount lazily."""
    token = trio.lowlevel.current_trio_token()
    finished = trio.Event()

    def on_finished() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(finished.set)

    async def stop(signum: int) -> None:
        log.info("received signal %d, unmounting", signum)
        await trio.to_thread.run_sync(_lazy_unmount, config.mountpoint)

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            task_status.started()
            # A signal that came before trio took over the handlers still counts.
            if pending:
                await stop(pending[0])
            async for signum in signals:
                await stop(signum)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        channel.start(token, on_finished)
        await finished.wait()
        nursery.cancel_scope.cancel()


def _finish_channel(channel: Channel, mountpoint: str) -> None:
    """Close the channel once its workers ended (after an error: unmount first)."""
    if not channel.wait(0):
        _lazy_unmount(mountpoint)
        if not channel.wait(10):
            log.error("FUSE workers still busy; leaving their descriptor open")
            return
    channel.close()


def _close_volume(volume: ServedVolume) -> None:
    try:
        volume.close()
    except CryptfuseError as exc:
        log.error("closing the container failed: %s", exc)
        raise
    log.info("container flushed and closed")


def serve(
    volume: ServedVolume, config: MountConfig, on_mounted: Callable[[], None] | None = None
) -> None:
    """Mount *volume*, serve it until unmounted or signalled, then clean up.

    Takes ownership of *volume* (it is synced and closed on the way out, even
    when mounting fails).  *on_mounted* runs once the kernel mount exists.
    """
    readonly = volume.readonly
    options = build_fuse_options(config.fuse_options, readonly, config.fsname)
    config.fs.preallocate = config.fs.preallocate or config.lock_memory
    ops = VolumeFS(volume, config.fs)
    pending: list[int] = []
    with contextlib.ExitStack() as stack:
        # Registered first, so it runs last: the container closes after the unmount.
        stack.callback(_close_volume, volume)
        if config.lock_memory:
            lock_memory()
            fast = getattr(volume, "fast", None)
            if fast is not None:
                fast.start_threads()
        # Until trio owns the signal handlers, remember stop signals instead of dying
        # with the mount half set up (SIGTERM's default) or a KeyboardInterrupt.
        for signum in STOP_SIGNALS:
            stack.callback(
                signal.signal, signum, signal.signal(signum, lambda s, _f: pending.append(s))
            )
        session_fd = _mount(ops, config, options)
        # pyfuse3.close(unmount=True) is a no-op unmount when fusermount3 -u already
        # did it (libfuse sees the dead connection) and a lazy umount otherwise.
        stack.callback(pyfuse3.close, unmount=True)
        stack.callback(log.info, "unmounted %s", config.mountpoint)
        # The channel reads its own descriptor of the session: pyfuse3.close closes
        # libfuse's, and a worker must never read a number that was closed and reused.
        channel = Channel(os.dup(session_fd), ops, workers=config.fs.threads)
        stack.callback(_finish_channel, channel, config.mountpoint)
        if config.after_mount is not None:
            config.after_mount(volume)
        control = start_control(
            ops,
            channel,
            mountpoint=config.mountpoint,
            container=config.container,
            header=config.header,
            info=config.info,
            memory_locked=config.lock_memory,
            getter=_getter(ops),
            setter=_setter(ops),
        )
        if control is not None:
            # runs before the container closes: a reencryption stops at a hot-zone boundary
            stack.callback(control.close)
        log.info("mounted %s on %s", volume.description or "volume", config.mountpoint)
        if on_mounted is not None:
            on_mounted()
        trio.run(_main_loop, config, pending, channel)


def _getter(ops: VolumeFS) -> Callable[[], Volume]:
    def get_volume() -> Volume:
        volume = ops.volume
        if not isinstance(volume, Volume):  # pragma: no cover - the daemon serves Volumes
            raise CryptfuseError("this mount cannot be changed while mounted")
        return volume

    return get_volume


def _setter(ops: VolumeFS) -> Callable[[Volume], None]:
    def set_volume(volume: Volume) -> None:
        ops.volume = volume

    return set_volume


def _redirect_stdio(log_file: str | None) -> None:
    """Detach stdin/stdout/stderr from the terminal (stderr -> log file if any)."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    target = null
    if log_file is not None:
        target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(target, 2)
    for fd in {null, target}:
        os.close(fd)


def usable_log_file(name: str) -> str:
    """*name* made absolute, once it opens for appending (made if missing): one it
    cannot be is the user's error, refused before anything is mounted."""
    path = os.path.abspath(name) if name else ""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise UsageError(f"Cannot open log file {name!r}: {exc.strerror}.") from None
    return path


def _daemon_child(volume: ServedVolume, config: MountConfig, ready_fd: int) -> int:
    """The forked daemon: mount, report readiness on *ready_fd*, serve. Returns the exit code."""
    reported = False

    def report(line: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            with contextlib.suppress(OSError):
                os.write(ready_fd, line.encode() + b"\n")
            os.close(ready_fd)

    def on_mounted() -> None:
        if config.log_file is not None:
            # Open before answering, so an unwritable log file is the user's error.
            os.close(os.open(config.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chdir("/")  # do not keep the caller's directory busy
        _redirect_stdio(config.log_file)
        report("ready")

    def fail(code: int, message: str) -> int:
        # Before readiness the parent prints the error (our stderr is still the
        # user's terminal: logging it too would print it twice); after, only the
        # log can tell.
        if reported:
            log.error("%s", message)
        else:
            report(f"error {code} {message}")
        return code

    try:
        serve(volume, config, on_mounted)
    except CryptfuseError as exc:
        return fail(exc.exit_code, str(exc))
    except OSError as exc:
        return fail(1, str(exc.strerror or exc))
    except BaseException as exc:  # noqa: BLE001 - the daemon must always answer its parent
        if reported:
            log.exception("daemon failed")
        return fail(1, f"unexpected {type(exc).__name__}: {exc}")
    return 0


def run(volume: ServedVolume, config: MountConfig) -> int:
    """Serve *volume* on ``config.mountpoint``; returns the exit code.

    Foreground: blocks until unmounted.  Otherwise forks: the child becomes
    the daemon, the parent returns 0 once the mount is ready, or raises
    :class:`MountError` with the daemon's one-line error.  Takes ownership of
    *volume* either way.
    """
    protect_process()  # the daemon keeps the volume key: no core dump, no same-user ptrace
    # The daemon changes to / before it opens the log file for good.
    config.mountpoint = os.path.abspath(config.mountpoint)
    if config.log_file is not None:
        config.log_file = usable_log_file(config.log_file)
    if config.foreground:
        serve(volume, config)
        return 0
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_fd)
            os.setsid()  # no controlling terminal, no SIGHUP/SIGINT from it
            code = _daemon_child(volume, config, write_fd)
        finally:
            # Never return into the caller's stack (it belongs to the parent's CLI).
            logging.shutdown()
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        try:
            raw = pipe.read()
        except KeyboardInterrupt:
            # The daemon has its own session, so Ctrl-C reached only us: stop it too
            # (it unmounts at once if it got that far) rather than leave a mount
            # behind a command that reported failure.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            raise
    answer = raw.decode(errors="replace").strip()
    if answer == "ready":
        log.debug("daemon %d serves %s", pid, config.mountpoint)
        return 0
    if answer.startswith("error "):
        _, code_text, message = (answer.split(" ", 2) + [""])[:3]
        exit_code = int(code_text) if code_text.isdigit() else 1
        raise MountError(message or "mount failed", exit_code)
    # The child died before answering (killed, crashed in C code).
    with contextlib.suppress(ChildProcessError):
        _, status = os.waitpid(pid, 0)
        raise MountError(f"the daemon died before the mount was ready (status {status:#x})")
    raise MountError("the daemon died before the mount was ready")
