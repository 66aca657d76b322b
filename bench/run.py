#!/usr/bin/env python3
"""cryptfuse against qemu-storage-daemon and the raw container file, in one run.

Creates (in a scratch directory on a real disk) a LUKS1 aes-xts-plain64 512-bit
container, a LUKS2 one with 4096-byte sectors and a LUKS1 serpent-xts-plain64 512-bit
one (made by ``cryptfuse format``: cryptsetup's OpenSSL backend has no Serpent; qemu
reads Serpent with nettle), then measures on

  (a) the file exposed by cryptfuse,
  (b) the FUSE export of qemu-storage-daemon (LUKS block driver) of the same container,
  (c) the raw container file (its data area: same offset and size),

sequential read/write MB/s (1 MiB requests, O_DIRECT and buffered; reads with a
cold cache, writes include the final fsync), 4 KiB random read/write IOPS with
fio (one thread, and four threads), and the sequential tests through
``losetup`` + ext4 on top of (a), (b) and (c).  It reports the peak RSS
(VmHWM) and CPU time of the daemons, then mounts a sparse 1 TiB LUKS2
container and reports cryptfuse's peak RSS after random I/O spread over it.

The disk and the CPU of a virtual machine change speed from one minute to the
next, so both daemons stay mounted, each on its own copy of the container, every
test runs on (c), (a) and (b) back to back, and the whole series is repeated
``--rounds`` times.  The table gives each target's median, and as ratios the
median of the per-round ratios, with their range: a ratio compares figures taken
seconds apart.

The result is a Markdown table on stdout (and in ``--output``); progress goes
to stderr.  Needs root (drop_caches, losetup, mount), /dev/fuse, cryptsetup,
qemu-storage-daemon, mkfs.ext4 and fio (installed with apt-get when missing).
Everything it mounts, attaches or starts is undone in ``finally`` blocks, also
on errors, Ctrl-C and the ``--time-limit`` watchdog.

  bench/run.py --quick        # small sizes, one round, ~2 minutes: for development
  bench/run.py                # the full run (3 rounds, ~11 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import mmap
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


class TimeLimit(BaseException):
    """The --time-limit watchdog fired (BaseException: not swallowed by per-test handlers)."""


# -- small helpers ---------------------------------------------------------------------

_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sh(
    cmd: list[str], *, timeout: float = 120, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run *cmd*; on failure raise BenchError with its stderr."""
    if not quiet:
        say("$ " + shlex.join(cmd))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} timed out after {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BenchError(f"{shlex.join(cmd)} failed ({proc.returncode}): {' / '.join(detail[-3:])}")
    return proc


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(path: str) -> bool:
    """Whether *path* (a directory or, for qemu's FUSE export, a file) is a mount point."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4].replace("\\040", " ") == path:
                return True
    return False


def proc_alive(pid: int) -> bool:
    """Running (zombies count as gone: our daemons are reparented, nobody reaps them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def proc_status(pid: int, key: str) -> int:
    """A kB value of /proc/PID/status (VmHWM, VmRSS) in bytes; 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KiB
    except FileNotFoundError:
        pass
    return 0


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of *pid* (all threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def find_pid(needle: str, argv0_contains: str) -> int:
    """The pid of a live process with *needle* in its argv and *argv0_contains* in argv[:3]."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if needle in argv and any(argv0_contains in a for a in argv[:3]) and proc_alive(int(entry)):
            return int(entry)
    raise BenchError(f"no running process {argv0_contains} with {needle}")


# -- measurements ------------------------------------------------------------------------


@dataclass
class Result:
    value: float | None = None  # MB/s or IOPS
    note: str = ""  # why there is no value
    daemon_cpu: float | None = None  # CPU seconds of the daemon during the test
    seconds: float | None = None


def seq_write(path: str, offset: int, size: int, *, direct: bool, create: bool = False) -> float:
    """Write *size* bytes in 1 MiB pwrite calls, then fsync; MB/s including the fsync."""
    flags = (
        os.O_WRONLY | (os.O_DIRECT if direct else 0) | (os.O_CREAT | os.O_TRUNC if create else 0)
    )
    buf = mmap.mmap(-1, CHUNK)  # page aligned, as O_DIRECT wants
    buf.write(os.urandom(CHUNK))
    fd = os.open(path, flags, 0o600)
    try:
        start = time.perf_counter()
        done = 0
        while done < size:
            n = min(CHUNK, size - done)
            written = os.pwrite(fd, memoryview(buf)[:n], offset + done)
            if written <= 0:
                raise BenchError(f"short write at {offset + done} on {path}")
            done += written
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        buf.close()
    return size / elapsed / 1e6


def seq_read(path: str, offset: int, size: int, *, direct: bool) -> float:
    """Read *size* bytes in 1 MiB preadv calls after dropping the caches; MB/s."""
    drop_caches()
    buf = mmap.mmap(-1, CHUNK)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if not direct:
            # Tell the kernel what is coming: the same hint `dd`/`cp` users get from
            # readahead heuristics anyway; it does not change the request sizes.
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_SEQUENTIAL)
        start = time.perf_counter()
        done = 0
        view = memoryview(buf)
        while done < size:
            n = os.preadv(fd, [view[: min(CHUNK, size - done)]], offset + done)
            if n <= 0:
                raise BenchError(f"short read at {offset + done} on {path}")
            done += n
        elapsed = time.perf_counter() - start
        view.release()
    finally:
        os.close(fd)
        buf.close()
    return size / elapsed / 1e6


def fio_random(
    path: str, offset: int, size: int, *, write: bool, jobs: int, runtime: float
) -> float:
    """4 KiB random O_DIRECT reads or writes for *runtime* seconds with *jobs* threads; IOPS."""
    if not write:
        drop_caches()
    cmd = [
        "fio",
        "--name=rand",
        f"--filename={path}",
        f"--rw={'randwrite' if write else 'randread'}",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
        f"--offset={offset}",
        f"--size={size}",
        f"--runtime={runtime:g}",
        "--time_based",
        f"--numjobs={jobs}",
        "--thread",
        "--group_reporting",
        "--norandommap",
        "--randrepeat=0",
        "--allow_file_create=0",
        "--fallocate=none",
        "--output-format=json",
    ]
    if write:
        cmd.append("--end_fsync=1")
    proc = sh(cmd, timeout=runtime + 120, quiet=True)
    text = proc.stdout
    data = json.loads(text[text.index("{") :])
    job = data["jobs"][0]
    return float(job["write" if write else "read"]["iops"])


# -- the things under test ----------------------------------------------------------------


@dataclass
class Container:
    label: str  # e.g. "LUKS1 aes-xts-plain64 512-bit, 512 B sectors"
    short: str  # "luks1"
    path: str
    key: str
    data_offset: int
    volume_size: int
    sector_size: int
    luks_version: int
    cipher: str = "aes-xts-plain64"


@dataclass
class Target:
    name: str  # "cryptfuse", "qsd", "raw"
    path: str  # the file to do I/O on
    offset: int  # where the volume starts in that file
    size: int  # the volume size
    pid: int | None = None  # the daemon serving it


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, stack: contextlib.ExitStack) -> None:
        self.args = args
        self.work = work
        self.stack = stack
        self.quick: bool = args.quick
        self.seq_size = 128 * MiB if self.quick else GiB
        self.ext4_file = 64 * MiB if self.quick else 512 * MiB
        self.container_size = 200 * MiB if self.quick else 1126 * MiB  # ~1.1 GiB
        self.runtime = args.runtime if args.runtime else (3.0 if self.quick else 5.0)
        self.rounds: int = args.rounds if args.rounds else (1 if self.quick else 3)
        # (container, workload, target) -> one Result per round, then their median
        self.samples: dict[tuple[str, str, str], list[Result]] = {}
        self.results: dict[tuple[str, str, str], Result] = {}
        self.rss: dict[
            tuple[str, str], tuple[int, int]
        ] = {}  # (container, daemon) -> (VmHWM, VmRSS)
        self.notes: list[str] = []
        self.big: dict[str, Any] = {}
        self.cryptfuse_cmd = self._cryptfuse_cmd()
        self.versions: dict[str, str] = {}

    # -- set-up ------------------------------------------------------------------------

    def _cryptfuse_cmd(self) -> list[str]:
        if self.args.cryptfuse:
            return shlex.split(self.args.cryptfuse)
        exe = REPO / ".venv" / "bin" / "cryptfuse"
        if exe.exists():
            return [str(exe)]
        found = shutil.which("cryptfuse")
        if found:
            return [found]
        raise BenchError("cryptfuse not found: run `make setup` or pass --cryptfuse CMD")

    def make_container(
        self, version: int, size: int, name: str, cipher: str = "aes-xts-plain64"
    ) -> Container:
        path = str(self.work / f"{name}.img")
        key = str(self.work / "passphrase")
        if not os.path.exists(key):
            # qemu's secret objects want UTF-8 text: a base64 passphrase without newline.
            with open(key, "w") as f:
                f.write(__import__("base64").b64encode(os.urandom(24)).decode())
        with open(path, "wb") as f:
            f.truncate(size)
        cmd = [
            "cryptsetup",
            "luksFormat",
            "-q",
            "--type",
            f"luks{version}",
            "-c",
            "aes-xts-plain64",
            "-s",
            "512",
            "--hash",
            "sha256",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key,
        ]
        if version == 2:
            cmd += ["--pbkdf", "pbkdf2", "--sector-size", "4096"]
        if cipher != "aes-xts-plain64":
            # cryptsetup here (OpenSSL backend, no AF_ALG) cannot encrypt a Serpent keyslot
            cmd = [*self.cryptfuse_cmd, "format", "--type", f"luks{version}", "--cipher", cipher,
                   "--key-size", "512", "--hash", "sha256", "--pbkdf-force-iterations", "1000",
                   "--key-file", key]  # fmt: skip
        else:
            cmd[cmd.index("aes-xts-plain64")] = cipher
        sh([*cmd, path])
        dump = sh(["cryptsetup", "luksDump", path], quiet=True).stdout
        if version == 1:
            data_offset = int(re.search(r"Payload offset:\s*(\d+)", dump).group(1)) * 512  # type: ignore[union-attr]
            sector = 512
        else:
            seg = dump[dump.index("Data segments:") :]
            data_offset = int(re.search(r"offset:\s*(\d+) \[bytes\]", seg).group(1))  # type: ignore[union-attr]
            sector = int(re.search(r"sector:\s*(\d+) \[bytes\]", seg).group(1))  # type: ignore[union-attr]
        label = f"LUKS{version} {cipher} 512-bit, {sector} B sectors"
        return Container(
            label, name, path, key, data_offset, size - data_offset, sector, version, cipher
        )

    # -- daemons -------------------------------------------------------------------------

    def _volume_key_file(self, c: Container) -> str:
        out = str(self.work / f"{c.short}.vk")
        if not os.path.exists(out):
            sh(
                [
                    "cryptsetup",
                    "luksDump",
                    "-q",
                    "--dump-volume-key",
                    "--volume-key-file",
                    out,
                    "--key-file",
                    c.key,
                    c.path,
                ],
                quiet=True,
            )
        return out

    @contextlib.contextmanager
    def cryptfuse(self, c: Container, mnt: str) -> Iterator[Target]:
        os.makedirs(mnt, exist_ok=True)
        log = str(self.work / f"cryptfuse-{os.path.basename(mnt)}.log")
        if self.args.via_plain:
            # Same data path, header parsing skipped: for when LUKS opening is not there yet.
            vk = self._volume_key_file(c)
            opts = [
                "--type",
                "plain",
                "-c",
                c.cipher,
                "-s",
                "512",
                "--key-file",
                vk,
                "--offset",
                str(c.data_offset // 512),
                "--sector-size",
                str(c.sector_size),
            ]
        else:
            opts = ["--key-file", c.key]
        extra = shlex.split(self.args.cryptfuse_args or "")
        pid: int | None = None
        try:
            sh([*self.cryptfuse_cmd, *opts, *extra, "--log-file", log, c.path, mnt], timeout=180)
            wait_for(lambda: mounted(mnt), 10, f"cryptfuse mount on {mnt}")
            pid = find_pid(mnt, "cryptfuse")
            vol = os.path.join(mnt, "volume")
            yield Target("cryptfuse", vol, 0, os.stat(vol).st_size, pid)
        finally:
            if pid is not None:
                self._note_rss(c, "cryptfuse", pid)
            self._unmount_cryptfuse(mnt, pid)

    def _note_rss(self, c: Container, daemon: str, pid: int) -> None:
        """Keep the largest VmHWM (and VmRSS) of *daemon* over all its mounts of *c*."""
        hwm, rss = proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS")
        old = self.rss.get((c.short, daemon), (0, 0))
        self.rss[(c.short, daemon)] = (max(old[0], hwm), max(old[1], rss))

    def _unmount_cryptfuse(self, mnt: str, pid: int | None) -> None:
        for _attempt in range(20):
            if not mounted(mnt):
                break
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)  # EBUSY: a loop device that is still being detached
        else:
            say(f"warning: lazy unmount of {mnt}")
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        if pid is not None:
            try:
                # The daemon syncs and closes the container after the unmount.
                wait_for(lambda: not proc_alive(pid), 60, f"cryptfuse daemon {pid} to exit")
            except BenchError:
                say(f"warning: cryptfuse daemon {pid} still running; SIGTERM")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(BenchError):
                    wait_for(lambda: not proc_alive(pid), 10, f"cryptfuse daemon {pid} to exit")
        if mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)

    @contextlib.contextmanager
    def qsd(self, c: Container, mntfile: str) -> Iterator[Target]:
        """qemu-storage-daemon's FUSE export of the container (the mountpoint is a file)."""
        for p in (c.path, c.key, mntfile):
            if "," in p:
                raise BenchError(f"qemu option syntax: no commas in paths please ({p})")
        Path(mntfile).touch()
        pidfile = str(self.work / "qsd.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        cmd = [
            "qemu-storage-daemon",
            "--object",
            f"secret,id=sec0,file={c.key}",
            "--blockdev",
            f"driver=file,node-name=file0,filename={c.path}",
            "--blockdev",
            "driver=luks,node-name=luks0,file=file0,key-secret=sec0",
            "--export",
            f"type=fuse,id=exp0,node-name=luks0,mountpoint={mntfile},writable=on",
            "--daemonize",
            "--pidfile",
            pidfile,
        ]
        pid: int | None = None
        try:
            sh(cmd, timeout=120)
            wait_for(
                lambda: os.path.exists(pidfile) and mounted(mntfile),
                10,
                "qemu-storage-daemon export",
            )
            with open(pidfile) as f:
                pid = int(f.read().strip())
            yield Target("qsd", mntfile, 0, os.stat(mntfile).st_size, pid)
        finally:
            if pid is None and os.path.exists(pidfile):
                with contextlib.suppress(ValueError, OSError), open(pidfile) as f:
                    pid = int(f.read().strip())
            if pid is not None:
                self._note_rss(c, "qsd", pid)
                # SIGTERM: qsd flushes, removes its export (unmounts) and exits;
                # `fusermount3 -u` alone would leave the process running.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                try:
                    wait_for(lambda: not proc_alive(pid), 30, f"qemu-storage-daemon {pid} to exit")
                except BenchError:
                    say(f"warning: qemu-storage-daemon {pid} ignores SIGTERM; SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if mounted(mntfile):
                subprocess.run(["fusermount3", "-u", "-z", mntfile], capture_output=True)

    @contextlib.contextmanager
    def ext4(self, t: Target, c: Container, mnt: str) -> Iterator[str]:
        """A loop device over *t*'s volume, ext4 on it, mounted on *mnt*; yields the test file."""
        os.makedirs(mnt, exist_ok=True)
        loop: str | None = None
        try:
            loop = sh(
                [
                    "losetup",
                    "-f",
                    "--show",
                    "--offset",
                    str(t.offset),
                    "--sizelimit",
                    str(t.size),
                    t.path,
                ],
                quiet=True,
            ).stdout.strip()
            # No lazy init: ext4lazyinit would write inode tables during the measurement.
            sh(
                ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop],
                timeout=300,
                quiet=True,
            )
            sh(["mount", loop, mnt], quiet=True)
            yield os.path.join(mnt, "file")
        finally:
            if mounted(mnt):
                if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", mnt], capture_output=True)
            if loop:
                subprocess.run(["losetup", "-d", loop], capture_output=True)
                # Detaching is asynchronous: the FUSE file stays open (EBUSY for the
                # unmount) until the loop device lets go of it.
                with contextlib.suppress(BenchError):
                    wait_for(lambda: not _loop_backing(loop), 10, f"{loop} to detach")

    # -- the tests ---------------------------------------------------------------------------

    def record(self, c: Container, workload: str, t: Target, fn: Callable[[], float]) -> None:
        """Run one measurement; its Result joins the samples of (container, workload, target)."""
        samples = self.samples.setdefault((c.short, workload, t.name), [])
        cpu0 = proc_cpu(t.pid) if t.pid else None
        start = time.monotonic()
        try:
            value = fn()
        except Exception as exc:  # one failed measurement must not lose the others
            say(f"  {t.name:9} {workload}: FAILED: {exc}")
            samples.append(Result(note=f"failed: {exc}"))
            return
        res = Result(value=value, seconds=time.monotonic() - start)
        if t.pid:
            res.daemon_cpu = proc_cpu(t.pid) - cpu0  # type: ignore[operator]
        samples.append(res)
        unit = "IOPS" if "IOPS" in workload else "MB/s"
        cpu = f", daemon CPU {res.daemon_cpu:.1f}s" if res.daemon_cpu is not None else ""
        say(f"  {t.name:9} {workload}: {value:,.0f} {unit} ({res.seconds:.1f}s{cpu})")

    def tests(self, c: Container) -> list[Callable[[Target], None]]:
        """The tests, in order; each one measures one workload (ext4: two) on a target."""
        size = min(self.seq_size, c.volume_size)
        if size < self.seq_size:
            self.notes.append(f"{c.short}: sequential tests used {size // MiB} MiB (volume size)")
        mib = f"{size // MiB} MiB" if size < GiB else f"{size / GiB:g} GiB"
        tests: list[Callable[[Target], None]] = []
        for direct in (True, False):
            kind = "O_DIRECT" if direct else "buffered"

            def write(t: Target, direct: bool = direct, kind: str = kind) -> None:
                self.record(
                    c,
                    f"seq write {mib}, {kind}, +fsync (MB/s)",
                    t,
                    lambda: seq_write(t.path, t.offset, size, direct=direct),
                )

            def read(t: Target, direct: bool = direct, kind: str = kind) -> None:
                self.record(
                    c,
                    f"seq read {mib}, {kind}, cold (MB/s)",
                    t,
                    lambda: seq_read(t.path, t.offset, size, direct=direct),
                )

            tests += [write, read]
        if self.have_fio:
            for jobs in (1, 4):
                for is_write in (False, True):

                    def rand(t: Target, jobs: int = jobs, is_write: bool = is_write) -> None:
                        what = "write" if is_write else "read"
                        threads = "1 thread" if jobs == 1 else f"{jobs} threads"
                        self.record(
                            c,
                            f"4 KiB rand {what}, {threads} (IOPS)",
                            t,
                            functools.partial(
                                fio_random,
                                t.path,
                                t.offset,
                                t.size,
                                write=is_write,
                                jobs=jobs,
                                runtime=self.runtime,
                            ),
                        )

                    tests.append(rand)
        if not self.args.no_ext4:
            tests.append(lambda t: self.run_ext4_tests(c, t))
        return tests

    def run_ext4_tests(self, c: Container, t: Target) -> None:
        mnt = str(self.work / "ext4")
        size = self.ext4_file
        mib = f"{size // MiB} MiB"
        wname = f"ext4 on loop: write {mib} file +fsync (MB/s)"
        rname = f"ext4 on loop: read {mib} file, cold (MB/s)"
        try:
            with self.ext4(t, c, mnt) as path:
                self.record(
                    c, wname, t, lambda: seq_write(path, 0, size, direct=False, create=True)
                )
                self.record(c, rname, t, lambda: seq_read(path, 0, size, direct=False))
        except BenchError as exc:
            say(f"  {t.name:9} ext4: FAILED: {exc}")
            for name in (wname, rname):
                samples = self.samples.setdefault((c.short, name, t.name), [])
                samples.append(Result(note=f"failed: {exc}"))

    def _copies(self, c: Container, copies: dict[str, Container]) -> None:
        """Into *copies*: one copy of the container per daemon, so both can stay mounted.

        The data area is first filled with random bytes (which decrypt to noise), so no
        target reads holes; the copies are then byte for byte the same container.
        """
        seq_write(c.path, c.data_offset, c.volume_size, direct=True)
        for name in ("cryptfuse", "qsd"):
            path = str(self.work / f"{c.short}-{name}.img")
            copies[name] = dataclasses.replace(c, path=path)
            shutil.copyfile(c.path, path)
        # Written back before any test: dirty pages of a copy would make the first
        # O_DIRECT write of the daemon on it flush them (the review saw round 1's
        # O_DIRECT writes at 0.25-0.55x the raw file's, against 0.97-1.52x without copies).
        os.sync()

    def _mount(self, stack: contextlib.ExitStack, c: Container, name: str) -> Target | None:
        """Mount daemon *name* on *c* for the rest of *stack*; None (and a note) if it cannot."""
        ctx = (
            self.cryptfuse(c, str(self.work / "mnt"))
            if name == "cryptfuse"
            else self.qsd(c, str(self.work / "qsd-export"))
        )
        try:
            return stack.enter_context(ctx)
        except BenchError as exc:
            msg = str(exc)
            if "LUKS version 2 is not supported" in msg:
                version = self.versions.get("qsd", "")
                msg = f"qemu-storage-daemon {version}: LUKS version 2 is not supported"
            say(f"  {name}: not measured: {msg}")
            self.notes.append(f"{c.short} / {name}: not measured: {msg}")
            self.results[(c.short, "*", name)] = Result(note=msg)
            return None

    def run_container(self, c: Container) -> None:
        """Every test on (c), (a) and (b) back to back, the whole series ``rounds`` times.

        Both daemons stay mounted for all rounds, each on its own copy of the container:
        a daemon is measured warm, as its users run it (here a freshly started
        qemu-storage-daemon read 183-228 MB/s, the same process 244-375 MB/s after one
        more read or a write), and seconds apart from the others.
        """
        tests = self.tests(c)
        copies: dict[str, Container] = {}
        try:
            try:
                self._copies(c, copies)
            except OSError as exc:
                raise BenchError(f"copies of {c.path}: {exc}") from exc
            with contextlib.ExitStack() as stack:
                targets = {"raw": Target("raw", c.path, c.data_offset, c.volume_size)}
                for name in ("cryptfuse", "qsd"):
                    t = self._mount(stack, copies[name], name)
                    if t is not None:
                        targets[name] = t
                order = list(targets.values())
                for n in range(self.rounds):
                    say(f"== {c.label}: round {n + 1} of {self.rounds}")
                    for test in tests:
                        for t in order:
                            test(t)
                    # who goes first changes every round: no target always follows
                    # the same one (e.g. writes right after another target's 2 GiB)
                    order = order[1:] + order[:1]
        finally:
            for copy in copies.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(copy.path)

    def summarise(self) -> None:
        """The median of each (container, workload, target)'s samples, into self.results."""
        for key, samples in self.samples.items():
            values = [r.value for r in samples if r.value is not None]
            if not values:
                self.results[key] = Result(note=samples[-1].note if samples else "")
                continue
            cpus = [r.daemon_cpu for r in samples if r.daemon_cpu is not None]
            self.results[key] = Result(
                value=statistics.median(values),
                daemon_cpu=statistics.median(cpus) if cpus else None,
                seconds=sum(r.seconds or 0 for r in samples),
            )

    def ratios(self, container: str, workload: str, a: str, b: str) -> list[float]:
        """Per-round ratios of target *a* to target *b* (rounds where both have a figure)."""
        sa = self.samples.get((container, workload, a), [])
        sb = self.samples.get((container, workload, b), [])
        return [
            x.value / y.value
            for x, y in zip(sa, sb, strict=False)  # an aborted run: fewer of one
            if x.value is not None and y.value is not None and y.value > 0
        ]

    # -- the 1 TiB container ----------------------------------------------------------------------

    def run_big(self) -> None:
        say("== sparse 1 TiB LUKS2 container: cryptfuse peak RSS")
        c = self.make_container(2, 1 << 40, "big")
        runtime = self.runtime
        try:
            with self.cryptfuse(c, str(self.work / "mnt-big")) as t:
                assert t.pid is not None
                after: dict[str, int] = {"mounted": proc_status(t.pid, "VmHWM")}
                for bs, write in (("4k", False), ("4k", True), ("1m", False), ("1m", True)):
                    rw = "randwrite" if write else "randread"
                    cmd = [
                        "fio",
                        "--name=big",
                        f"--filename={t.path}",
                        f"--rw={rw}",
                        f"--bs={bs}",
                        "--direct=1",
                        "--ioengine=psync",
                        f"--size={t.size}",
                        f"--runtime={runtime:g}",
                        "--time_based",
                        "--numjobs=4",
                        "--thread",
                        "--group_reporting",
                        "--norandommap",
                        "--randrepeat=0",
                        "--allow_file_create=0",
                        "--fallocate=none",
                        "--output-format=json",
                    ]
                    if self.have_fio:
                        sh(cmd, timeout=runtime + 120, quiet=True)
                    else:  # a few MiB-sized pokes across the volume without fio
                        _poke(t.path, t.size, 1 << 20 if bs == "1m" else 4096, write)
                    after[f"{bs} {rw}"] = proc_status(t.pid, "VmHWM")
                    say(f"  after {bs} {rw}: VmHWM {after[f'{bs} {rw}'] / MiB:.1f} MiB")
                self.big = {"volume_size": t.size, "vmhwm_steps": after}
        except BenchError as exc:
            say(f"  1 TiB: not measured: {exc}")
            self.big = {"error": str(exc)}
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(c.path)  # 1 TiB apparent size: do not leave it behind
        hwm = self.rss.get(("big", "cryptfuse"))
        if hwm:
            self.big["vmhwm"] = hwm[0]

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> None:
        self.versions = tool_versions(self.cryptfuse_cmd)
        self.have_fio = ensure_fio()
        if not self.have_fio:
            self.notes.append("fio missing and not installable: random IOPS not measured")
        containers = []
        if not self.args.only or "luks1" in self.args.only:
            containers.append((1, "luks1", "aes-xts-plain64"))
        if not self.args.only or "luks2" in self.args.only:
            containers.append((2, "luks2", "aes-xts-plain64"))
        if not self.args.only or "serpent" in self.args.only:
            containers.append((1, "serpent", "serpent-xts-plain64"))
        self.containers: list[Container] = []
        for version, name, cipher in containers:
            say(f"== creating {name} container ({self.container_size / MiB:.0f} MiB)")
            c = self.make_container(version, self.container_size, name, cipher)
            self.containers.append(c)
            self.run_container(c)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(c.path)
        if not self.args.no_big:
            self.run_big()


def _loop_backing(loop: str) -> bool:
    return os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop/backing_file")


def _poke(path: str, size: int, bs: int, write: bool) -> None:
    import random

    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(64):
            off = random.randrange(0, size - bs) // 4096 * 4096
            if write:
                os.pwrite(fd, os.urandom(bs), off)
            else:
                os.pread(fd, bs, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_fio() -> bool:
    if shutil.which("fio"):
        return True
    if shutil.which("apt-get"):
        say("fio missing: apt-get install fio")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        ok = (
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "fio"],
                capture_output=True,
                env=env,
                timeout=300,
            ).returncode
            == 0
        )
        if not ok:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "fio"],
                capture_output=True,
                env=env,
                timeout=300,
            )
    return shutil.which("fio") is not None


def tool_versions(cryptfuse_cmd: list[str]) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cryptfuse": first_line([*cryptfuse_cmd, "--version"]) + (f" (git {git})" if git else ""),
        "qsd": first_line(["qemu-storage-daemon", "--version"]).replace(
            "qemu-storage-daemon version ", ""
        ),
        "cryptsetup": first_line(["cryptsetup", "--version"]),
        "fio": first_line(["fio", "--version"]),
        "kernel": platform.release(),
        "cpu": f"{cpu}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
    }


# -- the report -----------------------------------------------------------------------------------


def fmt(r: Result | None) -> str:
    if r is None:
        return "–"
    if r.value is None:
        return "n/a"
    return f"{r.value:,.0f}"


def ratio(rs: list[float]) -> str:
    """The median of per-round ratios, with their range when there are several."""
    if not rs:
        return "–"
    med = statistics.median(rs)
    return f"{med:.2f}×" if len(rs) == 1 else f"{med:.2f}× ({min(rs):.2f}–{max(rs):.2f})"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _mib(rss: tuple[int, int] | None) -> str:
    return f"{rss[0] / MiB:.1f}" if rss else "n/a"


def report(bench: Bench, argv: list[str], started: datetime.datetime, elapsed: float) -> str:
    """The Markdown report: header, the table, daemon CPU, the issue's targets, notes."""
    command = shlex.join(["bench/run.py", *argv])
    lines = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')} · run time {elapsed / 60:.1f} min · "
        f"command: `{command}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in bench.versions.items()),
        "",
        f"Figures are medians of {bench.rounds} round(s), each running every test on (c), (a) "
        "and (b) back to back; ratios are the median (and range) of the per-round ratios. "
        f"Random tests: {bench.runtime:g} s each.",
        "",
        _row("container", "workload", "(a) cryptfuse", "(b) qemu-storage-daemon")
        + " (c) raw file | (a)/(b) | (a)/(c) |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    targets = ("cryptfuse", "qsd", "raw")
    for c in bench.containers:
        label = f"{c.short.upper()} {c.sector_size} B"
        workloads = dict.fromkeys(
            wl for cont, wl, _t in bench.results if cont == c.short and wl != "*"
        )
        for wl in workloads:
            a, b, r = (
                bench.results.get((c.short, wl, t)) or bench.results.get((c.short, "*", t))
                for t in targets
            )
            ab = ratio(bench.ratios(c.short, wl, "cryptfuse", "qsd"))
            ar = ratio(bench.ratios(c.short, wl, "cryptfuse", "raw"))
            lines.append(_row(label, wl, fmt(a), fmt(b), fmt(r), ab, ar))
        cf = bench.rss.get((c.short, "cryptfuse"))
        q = bench.rss.get((c.short, "qsd"))
        rss_ratio = f"{cf[0] / q[0]:.2f}×" if cf and q and q[0] else "–"
        lines.append(
            _row(label, "daemon peak RSS, VmHWM (MiB)", _mib(cf), _mib(q), "–", rss_ratio, "–")
        )
    if bench.big:
        label = "LUKS2 4096 B, 1 TiB sparse"
        if "vmhwm" in bench.big:
            steps = ", ".join(
                f"{k} {v / MiB:.0f}" for k, v in bench.big.get("vmhwm_steps", {}).items()
            )
            wl = f"cryptfuse peak RSS after random 4 KiB/1 MiB I/O, 4 threads (MiB; {steps})"
            lines.append(_row(label, wl, f"{bench.big['vmhwm'] / MiB:.1f}", "n/a", "–", "–", "–"))
        else:
            lines.append(_row(label, "cryptfuse peak RSS", f"n/a ({bench.big.get('error')})"))

    # CPU cost: what each daemon burns per GiB moved in the sequential tests.
    cpu_lines = []
    for (cont, wl, t), res in bench.results.items():
        if wl.startswith("seq") and t != "raw" and res.daemon_cpu is not None and res.value:
            per_gib = res.daemon_cpu / (bench.seq_size / GiB)
            cpu_lines.append(_row(cont.upper(), wl.split(" (")[0], t, f"{per_gib:.2f}"))
    if cpu_lines:
        lines += [
            "",
            "Daemon CPU seconds per GiB moved (user+system, all threads):",
            "",
            _row("container", "workload", "daemon", "CPU s/GiB"),
            "|---|---|---|--:|",
            *cpu_lines,
        ]

    lines += ["", "Targets (issue 4):", ""]
    for cont, wl, t in bench.results:
        need = 1.5 if wl.startswith("4 KiB rand") else 3.0 if wl.startswith("seq") else None
        rs = bench.ratios(cont, wl, "cryptfuse", "qsd")
        if t != "cryptfuse" or need is None or not rs:
            continue
        x = statistics.median(rs)
        verdict = "met" if x >= need else "MISSED"
        rounds = f", met in {sum(r >= need for r in rs)} of {len(rs)} rounds" if len(rs) > 1 else ""
        lines.append(f"- {cont.upper()} {wl}: {x:.2f}× qsd (target ≥ {need}×): {verdict}{rounds}")
    big = bench.big.get("vmhwm")
    if big:
        verdict = "met" if big <= 150 * MiB else "MISSED"
        lines.append(
            f"- 1 TiB container peak RSS {big / MiB:.1f} MiB (target ≤ 150 MiB): {verdict}"
        )
    if bench.notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in bench.notes)]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark cryptfuse against qemu-storage-daemon and the raw container "
        "(needs root).",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes and 3 s random tests (development)"
    )
    p.add_argument(
        "--runtime", type=float, help="seconds per random-I/O test (default 5, --quick 3)"
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        help="repeat every test this many times and report medians (default 3, --quick 1)",
    )
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the scratch directory goes; must be a real disk, not tmpfs (default /var/tmp)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=("luks1", "luks2", "serpent"),
        help="only this container type (serpent: LUKS1 serpent-xts-plain64 512-bit)",
    )
    p.add_argument("--no-ext4", action="store_true", help="skip the losetup + ext4 tests")
    p.add_argument("--no-big", action="store_true", help="skip the sparse 1 TiB container")
    p.add_argument(
        "--via-plain",
        action="store_true",
        help="open the LUKS containers in cryptfuse as plain dm-crypt with the dumped volume key "
        "(same data path; for when cryptfuse cannot open LUKS yet)",
    )
    p.add_argument(
        "--cryptfuse", metavar="CMD", help="cryptfuse command (default: .venv/bin/cryptfuse)"
    )
    p.add_argument(
        "--cryptfuse-args",
        metavar="ARGS",
        help="extra options for the cryptfuse mounts, e.g. '--debug'",
    )
    p.add_argument("--output", metavar="FILE", help="also write the Markdown report to FILE")
    p.add_argument("--json", metavar="FILE", help="write all measurements as JSON to FILE")
    p.add_argument(
        "--time-limit",
        type=float,
        default=1800,
        help="abort (and clean up) after this many seconds (default 1800)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench/run.py: needs root (drop_caches, losetup, mount, mkfs); run it with sudo",
            file=sys.stderr,
        )
        return 2
    missing = [
        t
        for t in ("cryptsetup", "qemu-storage-daemon", "fusermount3", "losetup", "mkfs.ext4")
        if shutil.which(t) is None
    ]
    if missing or not os.path.exists("/dev/fuse"):
        print(
            f"bench/run.py: missing: {', '.join(missing) or '/dev/fuse'} (try `make setup`)",
            file=sys.stderr,
        )
        return 2

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeLimit(f"time limit of {args.time_limit:.0f}s reached")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.time_limit))
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cryptfuse-bench-", dir=args.workdir))
    say(f"scratch directory {work}")
    rc = 0
    bench: Bench | None = None
    with contextlib.ExitStack() as stack:
        try:
            bench = Bench(args, work, stack)
            bench.run()
        except (BenchError, TimeLimit, KeyboardInterrupt) as exc:
            say(f"aborted: {type(exc).__name__}: {exc}")
            rc = 1
        finally:
            signal.alarm(0)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                say(f"kept {work}")
    if bench is None or not hasattr(bench, "containers"):
        return rc or 1
    bench.summarise()
    text = report(bench, argv, started, time.monotonic() - t0)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": started.isoformat(),
                    "argv": argv,
                    "versions": bench.versions,
                    "rounds": bench.rounds,
                    "results": [
                        {
                            "container": k[0],
                            "workload": k[1],
                            "target": k[2],
                            **vars(v),
                            "samples": [vars(r) for r in bench.samples.get(k, [])],
                        }
                        for k, v in bench.results.items()
                    ],
                    "rss": {
                        f"{k[0]}/{k[1]}": {"vmhwm": v[0], "vmrss": v[1]}
                        for k, v in bench.rss.items()
                    },
                    "big": bench.big,
                    "notes": bench.notes,
                },
                indent=1,
            )
        )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
