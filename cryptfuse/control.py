"""The daemon's control socket: commands that must run inside the mounting daemon.

A mounted container has exactly one writer, the daemon (it holds the container's
``flock``).  Work that changes the container while it is mounted -- today an online
reencryption -- is therefore asked of the daemon over a Unix socket, and the daemon
does it on its own descriptors, under the same range lock its FUSE I/O takes.

* The socket lives in a private directory of the user (``/run/cryptfuse`` for root,
  ``/run/user/UID/cryptfuse`` or ``$TMPDIR/cryptfuse-UID`` otherwise; mode 0700) and
  is named after the container's device and inode, so any path to the container
  finds it.  Only the daemon's own user (and root) may talk to it (``SO_PEERCRED``).
* Messages are JSON lines.  A request ``{"op": "reencrypt", ...}`` is answered with
  ``{"progress": [done, total]}`` lines and a last ``{"result": {...}}`` or
  ``{"error": text, "code": exit code}``.  The client may send ``{"op": "stop"}``;
  a client that goes away (killed, Ctrl-C) counts as a stop, so the reencryption
  ends at the next hot-zone boundary with the container consistent and resumable.
* The passphrase travels in the request (base64) from the command to the daemon,
  never on a command line, never logged.

Every daemon also listens on a second socket named after its mount (the FUSE
mount's device number, as ``/proc/self/mountinfo`` shows it), read-only mounts
included: ``cryptfuse status`` and ``cryptfuse resize`` name a MOUNTPOINT, and
their requests (``{"op": "status"}``, ``{"op": "resize", "size": sectors}``) are
answered by handlers the daemon registers in :attr:`Served.handlers`.

Synchronous, threads only: no trio here (the daemon's trio loop is busy serving FUSE).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BusyError, CryptfuseError, DeviceError, UsageError
from .formats import luks2_reencrypt as reenc
from .formats.luks2 import read_luks2_header
from .formats.luks_write import KdfParams
from .sector import SectorCipher
from .volume import ExtentMap, SegmentedVolume, Volume, fast_path_for, open_device

if TYPE_CHECKING:
    from . import _fastpath

__all__ = [
    "ControlServer",
    "MountEntry",
    "connect_mount",
    "control_path",
    "find_mount",
    "mount_socket_path",
    "mounts",
    "request",
]

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


def control_dir(create: bool = False) -> str:
    """The user's private directory of control sockets."""
    uid = os.getuid()
    if uid == 0:
        base = "/run/cryptfuse"
    elif os.path.isdir(f"/run/user/{uid}"):
        base = f"/run/user/{uid}/cryptfuse"
    else:
        base = os.path.join(tempfile.gettempdir(), f"cryptfuse-{uid}")
    if create:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            raise DeviceError(f"{base} is not a private directory of this user")
    return base


def control_path(container: str, create: bool = False) -> str:
    """The control socket of the daemon that mounts *container* (by device and inode)."""
    st = os.stat(container)
    return os.path.join(control_dir(create), f"{st.st_dev:x}-{st.st_ino:x}.sock")


def mount_socket_path(device: str, create: bool = False) -> str:
    """The control socket of the daemon serving the FUSE mount of *device* ("major:minor")."""
    return os.path.join(control_dir(create), f"mnt-{device.replace(':', '-')}.sock")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    device: str  # "major:minor" of the mounted file system
    mountpoint: str
    fstype: str
    source: str
    super_options: str

    @property
    def is_cryptfuse(self) -> bool:
        return self.fstype == "fuse.cryptfuse"

    @property
    def user_id(self) -> int | None:
        """The mounting user (FUSE's ``user_id=`` super option)."""
        for option in self.super_options.split(","):
            if option.startswith("user_id="):
                return int(option[8:])
        return None


def _unescape(field_text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field_text):
        if field_text[i] == "\\" and field_text[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """The mounts this process sees, in mount order (later ones cover earlier ones)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                dash = fields.index("-", 6)
            except ValueError:
                continue
            entries.append(
                MountEntry(
                    device=fields[2],
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[dash + 1],
                    source=_unescape(fields[dash + 2]) if len(fields) > dash + 2 else "",
                    super_options=fields[dash + 3] if len(fields) > dash + 3 else "",
                )
            )
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    """The mount visible at *mountpoint* (an absolute, normalised path), if any."""
    found = None
    for entry in mounts():
        if entry.mountpoint == mountpoint:
            found = entry
    return found


def _connect(path: str) -> socket.socket | None:
    """A connection to the socket at *path*, or None when nothing listens there."""
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def connect_mount(device: str) -> socket.socket | None:
    """A connection to the daemon serving the mount of *device*, or None."""
    return _connect(mount_socket_path(device))


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _lines(conn: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


# -- the client (cryptfuse reencrypt on a mounted container) -----------------------------------


def connect(container: str) -> socket.socket | None:
    """A connection to the daemon mounting *container*, or None when none is listening."""
    try:
        path = control_path(container)
    except OSError:
        return None
    return _connect(path)


def request(
    sock: socket.socket,
    message: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Send *message*, relay progress, forward a stop once *stop* says so; return the
    result, or raise the daemon's error as a :class:`CryptfuseError` with its exit code."""
    _send(sock, message)
    sock.settimeout(0.5)
    stop_sent = False
    buf = b""
    while True:
        if stop is not None and not stop_sent and stop():
            _send(sock, {"op": "stop"})
            stop_sent = True
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise DeviceError("the cryptfuse daemon closed the connection (did it die?)")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            answer = json.loads(line)
            if "progress" in answer and progress is not None:
                progress(int(answer["progress"][0]), int(answer["progress"][1]))
            elif "result" in answer:
                return dict(answer["result"])
            elif "error" in answer:
                error = CryptfuseError(str(answer["error"]))
                error.exit_code = int(answer.get("code", 1))
                raise error


# -- the server (in the daemon) -----------------------------------------------------------------


@dataclass
class Served:
    """What the daemon serves, as the control server may see and replace it."""

    container: str
    header: str | None
    get: Callable[[], Volume]
    set: Callable[[Volume], None]
    #: other requests the daemon answers: op -> handler(request) -> result
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)


def _own_description(fd: int) -> int:
    """*fd*'s file opened again, read-write (*fd* itself where that is not possible).

    An online reencryption writes through its own open file description: a durable
    write (``RWF_DSYNC``), like an fsync, reports the writeback errors of the whole
    file that its description has not seen yet, and then that description no longer
    sees them. Through the mount's, an error in writing back what the mount wrote
    would fail the reencryption's write instead, and the mount's next fsync would
    return success (``Volume.sync`` makes such errors stick only for what it sees).
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return fd


@contextlib.contextmanager
def _synced_meanwhile(volume: Volume) -> Iterator[None]:
    """Sync *volume* in a thread while the body runs; its error, if any, after the body.

    For the init of an online reencryption: its commits sync their own ranges only,
    and what the mount wrote and nobody synced yet (up to the whole volume: 0.8 s of
    writeback here after a 4 KiB random-write load) is written back meanwhile, before
    the first hot zone's flush, which would otherwise wait for all of it.
    """
    failed: list[CryptfuseError] = []

    def sync() -> None:
        try:
            volume.sync()
        except CryptfuseError as exc:
            failed.append(exc)

    thread = threading.Thread(target=sync, name="reencrypt-sync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]


class _LiveAdapter:
    """:class:`reenc.Live` over a :class:`SegmentedVolume` (extents -> file extents),
    with the C data path of the old key and its partner of the new key (*pair*) when
    they serve the parts of the volume under one key each."""

    def __init__(
        self,
        volume: SegmentedVolume,
        data_fd: int,
        header_fd: int,
        pair: _FastPair | None = None,
    ) -> None:
        self.volume, self.data_fd, self.header_fd = volume, data_fd, header_fd
        self.pair = pair

    def hold(self, start: int, end: int) -> contextlib.AbstractContextManager[None]:
        if self.pair is not None:
            # The step writes the zone through the page cache: lock the stretches a
            # concurrent O_DIRECT transfer must not share (FastVolume.write_lock_range).
            ss = self.volume.sector_size
            lo, hi = self.pair.old.write_lock_range(start // ss, -(-end // ss))
            start, end = lo * ss, hi * ss
        return self.volume.hold(start, end)

    def flush(self) -> None:
        self.volume.sync()

    def update(self, extents: list[reenc.Extent]) -> None:
        """Called while the zone that changed is held: serve from *extents* now."""
        self.volume.replace_extents(_maps(extents, self.data_fd, self.header_fd))
        if self.pair is not None:
            self.pair.route(extents, self.volume.sector_size)


@dataclass
class _FastPair:
    """The C data path during an online key change: *old* (the mount's FastVolume) serves
    the sectors still under the old key, *new* (its partner) those converted, each
    through its window; what straddles them, or the hot zone, goes to Python."""

    old: _fastpath.FastVolume
    new: _fastpath.FastVolume
    old_cipher: SectorCipher
    new_cipher: SectorCipher
    data_offset: int

    def _key_of(self, e: reenc.Extent) -> str | None:
        if e.cipher is None or e.on_header or e.position != self.data_offset + e.start:
            return None  # plaintext, or stored elsewhere (a journal): Python's
        if e.cipher.same_as(self.old_cipher):
            return "old"
        return "new" if e.cipher.same_as(self.new_cipher) else None

    def route(self, extents: list[reenc.Extent], sector_size: int) -> None:
        windows: dict[str | None, list[tuple[int, int]]] = {}
        for e in extents:
            windows.setdefault(self._key_of(e), []).append((e.start, e.start + e.length))
        for fast, key in ((self.old, "old"), (self.new, "new")):
            runs = sorted(windows.get(key, []))
            lo, hi = (runs[0][0], runs[-1][1]) if runs else (0, 0)
            if sum(b - a for a, b in runs) != hi - lo:
                lo = hi = 0  # not one stretch: Python serves it all
            fast.set_window(lo // sector_size, hi // sector_size)
            fast.invalidate(0, 1 << 62)  # read ahead before the move: dropped, all of it

    def serves(self, obj: dict[str, Any], keys: dict[int, bytes]) -> bool:
        """True when the reencryption in header *obj* is the one this pair serves."""
        rh = reenc.Reencryption.from_json(obj)
        rh.keys = keys
        try:
            old, new = rh.storage(new=False)[1], rh.storage(new=True)[1]
        except KeyError:
            return False
        return (
            old is not None
            and new is not None
            and old.same_as(self.old_cipher)
            and new.same_as(self.new_cipher)
            and not rh.shift
            and rh.mode == "reencrypt"
        )

    def stop(self) -> None:
        """Serve nothing in C from now on (safe at any time: a request re-checks its
        window once it holds its range)."""
        self.old.set_window(0, 0)
        self.new.set_window(0, 0)


def _maps(extents: list[reenc.Extent], data_fd: int, header_fd: int) -> list[ExtentMap]:
    return [
        ExtentMap(e.start, e.length, header_fd if e.on_header else data_fd, e.position, e.cipher)
        for e in extents
    ]


class ControlServer:
    """Listens on the control sockets of a mounted container; one thread per client.

    *by_container*: the socket named after the container (online reencryption; only
    for writable mounts); *mount_device*: the one named after the FUSE mount.
    """

    def __init__(
        self, served: Served, *, by_container: bool = True, mount_device: str | None = None
    ) -> None:
        self.served = served
        self.by_container = by_container
        paths = [control_path(served.container, create=True)] if by_container else []
        if mount_device is not None:
            paths.append(mount_socket_path(mount_device, create=True))
        self.paths: list[str] = []
        self.socks: list[socket.socket] = []
        self._closing = threading.Event()
        self._work = threading.Lock()  # one reencryption at a time
        #: the C data path of both keys of this mount's online key change, if any
        self._pair: _FastPair | None = None
        self._threads: list[threading.Thread] = []
        try:
            for path in paths:
                self.socks.append(self._listen(path))
                self.paths.append(path)
        except BaseException:
            self.close()
            raise
        for sock in self.socks:
            threading.Thread(target=self._accept, args=(sock,), name="control", daemon=True).start()

    @property
    def path(self) -> str:
        """The first socket's path."""
        return self.paths[0]

    @property
    def reencrypting(self) -> bool:
        """True while an online reencryption runs."""
        return self._work.locked()

    @contextlib.contextmanager
    def exclusive(self, busy: str) -> Iterator[None]:
        """Hold off an online reencryption meanwhile (one that runs: BusyError *busy*)."""
        if not self._work.acquire(blocking=False):
            raise BusyError(busy)
        try:
            yield
        finally:
            self._work.release()

    def _listen(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # left by a daemon that died
            else:
                raise BusyError(f"another cryptfuse daemon serves {self.served.container}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(4)
        return sock

    def close(self) -> None:
        """Stop at the next hot-zone boundary, wait for the work, remove the sockets."""
        self._closing.set()
        for sock, path in zip(self.socks, self.paths, strict=True):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for t in list(self._threads):
            t.join()

    def _accept(self, sock: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._client, args=(conn,), name="control-client")
            self._threads.append(t)
            t.start()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            pid, uid, _ = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            if uid not in (0, os.getuid()):
                log.warning("control: refused a client of uid %d (pid %d)", uid, pid)
                return
            lines = _lines(conn)
            op: object = None
            try:
                req = next(lines)
                op = req.get("op")
                if op == "reencrypt" and self.by_container:
                    result = self._reencrypt(conn, lines, req)
                elif isinstance(op, str) and op in self.served.handlers:
                    result = self.served.handlers[op](req)
                else:
                    raise UsageError(f"unknown control request {op!r}")
                _send(conn, {"result": result})
            except CryptfuseError as exc:
                log.error("control request %r: %s", op, exc)
                with contextlib.suppress(OSError):
                    _send(conn, {"error": str(exc), "code": exc.exit_code})
            except (StopIteration, OSError, ValueError) as exc:
                log.warning("control client went away: %s", exc)
            except Exception as exc:  # noqa: BLE001 - never take the daemon down
                log.exception("control request %r failed", op)
                with contextlib.suppress(OSError):
                    _send(conn, {"error": f"internal error: {exc}", "code": 1})

    def _reencrypt(
        self, conn: socket.socket, lines: Iterator[dict[str, Any]], req: dict[str, Any]
    ) -> dict[str, Any]:
        if not self._work.acquire(blocking=False):
            raise BusyError("a reencryption of this container is already running")
        try:
            return self._reencrypt_locked(conn, lines, req)
        finally:
            self._work.release()

    def _reencrypt_locked(
        self, conn: socket.socket, lines: Iterator[dict[str, Any]], req: dict[str, Any]
    ) -> dict[str, Any]:
        volume = self.served.get()
        if volume.readonly:
            raise UsageError("the container is mounted read-only; remount it read-write")
        if volume.failed is not None:
            raise DeviceError(f"{volume.failed}; remount before reencrypting")
        passphrase = base64.b64decode(req["passphrase"])
        key_slot = req.get("key_slot")
        header_path = self.served.header
        data_fd = _own_description(volume.fd)
        header_fd = data_fd
        try:
            if header_path is not None:
                header_fd = open_device(header_path, False, lock=False)
            devices = reenc.Devices(data_fd, header_fd, header_path or self.served.container)
            header = read_luks2_header(header_fd, devices.path)
            keys: dict[int, bytes] = {}  # unlocked once, not once per step of the way
            if not reenc.in_reencryption(header.json):
                if req.get("resume_only"):
                    raise UsageError(f"Device {devices.path} is not in LUKS2 reencryption.")
                init = req["init"]
                options = reenc.ReencryptOptions(**init["options"])
                with _synced_meanwhile(volume):
                    slot = reenc.initialize_on(
                        devices,
                        passphrase,
                        options,
                        KdfParams(**init["kdf"]),
                        key_slot=key_slot,
                        af_hash=init["af_hash"],
                        keys_out=keys,
                    )
                log.info("reencryption initialized online (new keyslot %d)", slot)
                if req.get("init_only"):
                    return {"finished": False, "initialized": True, "slot": slot}
            live = self._live(volume, devices, passphrase, key_slot, keys)
            stop = threading.Event()

            def watch() -> None:  # a stop request, or the client going away
                with contextlib.suppress(OSError, ValueError):
                    for message in lines:
                        if message.get("op") == "stop":
                            break
                stop.set()

            watcher = threading.Thread(target=watch, name="control-watch", daemon=True)
            watcher.start()

            def progress(done: int, total: int) -> None:
                with contextlib.suppress(OSError):
                    _send(conn, {"progress": [done, total]})

            try:
                result = reenc.run_on(
                    devices,
                    passphrase,
                    key_slot=key_slot,
                    max_hotzone=int(req.get("hotzone", 0)),
                    progress=progress,
                    stop=lambda: stop.is_set() or self._closing.is_set(),
                    live=live,
                    keys=keys,
                )
            finally:
                # The watcher reads the socket: end its reading and wait for it before
                # the socket is closed (never a recv on a closed, reused descriptor);
                # the answer still goes out on the write side.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)
                watcher.join()
            log.info(
                "online reencryption %s at %d of %d bytes",
                "finished" if result.finished else "stopped",
                result.done,
                result.total,
            )
            if result.finished and live.pair is None:
                log.warning(
                    "the mount serves through the Python engine until it is remounted "
                    "(the C data path is not rebuilt under a running mount)"
                )
            return {"finished": result.finished, "done": result.done, "total": result.total}
        finally:
            if header_fd != data_fd:
                os.close(header_fd)
            if data_fd != volume.fd:
                os.close(data_fd)

    def _live(
        self,
        volume: Volume,
        devices: reenc.Devices,
        passphrase: bytes,
        key_slot: int | None,
        keys: dict[int, bytes],
    ) -> _LiveAdapter:
        """Serve the volume from the reencryption's extents, under a lock shared with
        what served it before (its C data path is switched off: it knows one key)."""
        header = read_luks2_header(devices.header_fd, devices.path)
        extents, size, crashed = reenc.open_reencryption(
            header,
            devices.data_fd,
            devices.header_fd,
            passphrase,
            key_slot,
            os.lseek(devices.data_fd, 0, os.SEEK_END),
            keys,
        )
        if crashed:
            raise UsageError("an interrupted hot zone must be recovered first: remount")
        if size != volume.size:
            raise UsageError(
                f"the volume would change size ({volume.size} -> {size} bytes) during "
                "this reencryption; unmount and run it offline"
            )
        # served through the mount's own descriptors (the engine's are closed after it)
        header_fd = volume.fd if devices.header_fd == devices.data_fd else devices.header_fd
        maps = _maps(extents, volume.fd, header_fd)
        if isinstance(volume, SegmentedVolume):
            pair = self._pair
            if pair is not None and pair.serves(header.json, keys):
                # the same reencryption again (stopped, now resumed): same windows
                volume.replace_extents(maps)
                pair.route(extents, volume.sector_size)
                return _LiveAdapter(volume, volume.fd, header_fd, pair)
            # another reencryption in this mount: its C data path, if any, stops
            if pair is not None:
                pair.stop()
            self._pair = None
            volume.replace_extents(maps)
            return _LiveAdapter(volume, volume.fd, header_fd)
        granule = max(
            [512]
            + [
                int(seg["sector_size"])
                for seg in header.json["segments"].values()
                if seg.get("type") == "crypt"
            ]
        )
        pair = self._fast_pair(volume, header.json, keys, extents)
        live = SegmentedVolume(
            volume.fd,
            maps,
            granule=granule,
            description=f"{volume.description} (in reencryption)",
            owns_fd=False,
            shared_lock=(volume._lock, volume.sector_size),  # noqa: SLF001 - the same volume
            fast_volumes=(pair.old, pair.new) if pair is not None else (),
        )
        live.discards = volume.discards  # (zeros written, no holes: SegmentedVolume.discard)
        self.served.set(live)
        if pair is not None:
            self._pair = pair
            pair.route(extents, volume.sector_size)
            log.info("serving through the reencryption's segments, in C under both keys")
            return _LiveAdapter(live, volume.fd, header_fd, pair)
        if volume.fast is not None:
            # Requests already in C finish with the old key (no hot zone exists yet);
            # from now on every READ/WRITE is declined to Python, which serves `live`.
            volume.fast.drain()
            volume.fast.close()
        log.info("serving through the reencryption's segments from now on")
        return _LiveAdapter(live, volume.fd, header_fd)

    @staticmethod
    def _fast_pair(
        volume: Volume,
        obj: dict[str, Any],
        keys: dict[int, bytes],
        extents: list[reenc.Extent],
    ) -> _FastPair | None:
        """The mount's C data path and a partner under the new key, when a key change
        keeps the geometry (same data offset and sector size, no data shift) and both
        ciphers are ones the C path serves; None otherwise (Python serves it all)."""
        old = volume.fast
        if old is None:
            return None
        rh = reenc.Reencryption.from_json(obj)
        rh.keys = keys
        if rh.mode != "reencrypt" or rh.shift or rh.data_offset_new != volume.data_offset:
            return None
        try:
            _, new_cipher = rh.storage(new=True)
        except KeyError:
            return None
        if new_cipher is None or new_cipher.sector_size != volume.sector_size:
            return None
        if new_cipher.same_as(volume.cipher):
            return None
        # Only from a volume all under the old key (the usual start): the C path
        # served all of it until now.
        if any(e.cipher is None or not e.cipher.same_as(volume.cipher) for e in extents):
            return None
        new = fast_path_for(
            new_cipher,
            fd=volume.fd,
            data_offset=volume.data_offset,
            size=volume.size,
            readonly=False,
            lock=volume._lock.native,  # noqa: SLF001 - the same volume
            direct=True,
        )
        if new is None:
            return None
        new.set_window(0, 0)  # nothing is under the new key yet
        if volume.discards:
            new.set_discards(True)
        old.set_partner(new)
        volume.fast_partners.append(new)  # drained and closed with the mount's volume
        return _FastPair(old, new, volume.cipher, new_cipher, volume.data_offset)
