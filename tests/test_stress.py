"""fsx-style stress: concurrent unaligned random I/O from several processes on a real mount.

The volume is cut into regions at random byte boundaries (most of them not
sector aligned, many shorter than a sector) and the regions are dealt round
robin to the worker processes.  Each worker writes random data of random
length (1 byte .. 200 KiB) only inside its own regions, so two workers never
write the same byte but constantly write the same *sectors* (a region
boundary sits inside a sector): every lost read-modify-write update shows up.
Workers read random ranges anywhere and check the bytes of their own regions
against their model while the others keep writing; at the end the parent
reads the whole volume through a fresh descriptor and compares it with the
union of the models, then again after a remount (the data really reached the
container).

Containers: plain aes-xts-plain64 with a key file (512-byte sectors) and a
LUKS2 one made by cryptsetup with 4096-byte sectors and a cheap PBKDF2.  A run
takes a few seconds; the seed is in every failure message (``STRESS_SEED=N``
replays the layout and the operations' choices, not the interleaving).

The channel's open replies carry ``FOPEN_PARALLEL_DIRECT_WRITES``, so concurrent
writes reach the daemon in parallel: whole-sector writes served by the C data
path (cryptfuse._fastpath) and partial-sector read-modify-writes in Python meet
in the same sectors, and only the shared range lock of
:class:`cryptfuse.volume.Volume` keeps their updates; a lost one shows up here.
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse]

KiB = 1 << 10
MiB = 1 << 20
WORKERS = 4
DURATION = 2.0  # seconds of random I/O per worker
MAX_IO = 200 * KiB
VOLUME = 2 * MiB  # small, so that the workers keep meeting in the same sectors
ALIGN = 4 * KiB  # whole sectors for both containers' sector sizes


@dataclass(frozen=True)
class Layout:
    """Regions ``[starts[i], starts[i+1])`` of the volume; region *i* belongs to ``i % WORKERS``."""

    starts: list[int]
    size: int

    @classmethod
    def random(cls, rng: random.Random, size: int) -> Layout:
        starts = [0]
        while starts[-1] < size:
            # Mostly sub-sector and few-sector regions (the boundaries are what we
            # test), with some long ones so that writes of up to 200 KiB happen.
            kind = rng.random()
            if kind < 0.4:
                length = rng.randint(1, 511)
            elif kind < 0.8:
                length = rng.randint(512, 16 * KiB)
            else:
                length = rng.randint(16 * KiB, 2 * MAX_IO)
            starts.append(min(size, starts[-1] + length))
        return cls(starts, size)

    def regions(self, worker: int) -> list[tuple[int, int]]:
        return [
            (self.starts[i], self.starts[i + 1])
            for i in range(worker, len(self.starts) - 1, WORKERS)
        ]

    def owned_in(
        self, regions: list[tuple[int, int]], lo: int, hi: int
    ) -> Iterator[tuple[int, int]]:
        """The parts of *regions* (sorted, disjoint) that overlap ``[lo, hi)``."""
        i = bisect.bisect_right(regions, (lo, self.size + 1)) - 1
        i = max(i, 0)
        while i < len(regions) and regions[i][0] < hi:
            s, e = regions[i]
            if e > lo:
                yield max(s, lo), min(e, hi)
            i += 1


def _worker(
    path: str,
    layout: Layout,
    worker: int,
    initial: bytes,
    seed: int,
    deadline: float,
    conn: multiprocessing.connection.Connection,
) -> None:
    """One fsx process: random writes into its regions, random checked reads anywhere."""
    rng = random.Random(seed * 1000 + worker)
    regions = layout.regions(worker)
    model = bytearray(initial)
    ops = {"write": 0, "read": 0, "fsync": 0, "bytes": 0}
    fd = os.open(path, os.O_RDWR)
    try:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            r = rng.random()
            if r < 0.5:
                s, e = regions[rng.randrange(len(regions))]
                lo, hi = -(-s // ALIGN), e // ALIGN  # the whole 4 KiB blocks of the region
                if hi > lo and rng.random() < 0.4:
                    # whole sectors (of either container): the C data path's writes
                    count = rng.randint(1, min(MAX_IO // ALIGN, hi - lo))
                    off = rng.randint(lo, hi - count) * ALIGN
                    length = count * ALIGN
                else:
                    length = rng.randint(1, min(MAX_IO, e - s))
                    off = rng.randint(s, e - length)
                data = rng.randbytes(length)
                written = os.pwrite(fd, data, off)
                if written != length:
                    raise AssertionError(f"op {n}: short write {written}/{length} at {off}")
                model[off : off + length] = data
                ops["write"] += 1
                ops["bytes"] += length
            elif r < 0.98:
                length = rng.randint(1, MAX_IO)
                off = rng.randint(0, layout.size - 1)
                got = os.pread(fd, length, off)
                want_len = min(length, layout.size - off)
                if len(got) != want_len:
                    raise AssertionError(f"op {n}: read {len(got)}/{want_len} bytes at {off}")
                for s, e in layout.owned_in(regions, off, off + len(got)):
                    if got[s - off : e - off] != model[s:e]:
                        bad = next(i for i in range(s, e) if got[i - off] != model[i])
                        raise AssertionError(
                            f"op {n}: read of {length} at {off}: byte {bad} (own region "
                            f"[{s}, {e})) is {got[bad - off]:#04x}, model says {model[bad]:#04x}"
                        )
                ops["read"] += 1
            else:
                os.fsync(fd)
                ops["fsync"] += 1
        os.fsync(fd)
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", f"worker {worker}: {type(exc).__name__}: {exc}", ops))
        return
    finally:
        os.close(fd)
    conn.send(("ok", [(s, bytes(model[s:e])) for s, e in regions], ops))


def run_stress(volume: Path, seed: int) -> tuple[bytearray, dict[str, int]]:
    """Run the workers against *volume*; returns the expected content and op counts."""
    size = os.stat(volume).st_size
    rng = random.Random(seed)
    layout = Layout.random(rng, size)
    initial = rng.randbytes(size)
    fd = os.open(volume, os.O_WRONLY)
    try:
        assert os.pwrite(fd, initial, 0) == size
        os.fsync(fd)
    finally:
        os.close(fd)

    # fork: the workers need nothing but the layout and the initial bytes, and
    # the test module need not be importable by a fresh interpreter.
    ctx = multiprocessing.get_context("fork")
    deadline = time.monotonic() + DURATION
    procs = []
    pipes = []
    for w in range(WORKERS):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker, args=(str(volume), layout, w, initial, seed, deadline, child)
        )
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    expected = bytearray(initial)
    totals = {"write": 0, "read": 0, "fsync": 0, "bytes": 0}
    errors = []
    try:
        for w, (p, conn) in enumerate(zip(procs, pipes, strict=True)):
            if not conn.poll(DURATION + 60):
                errors.append(f"worker {w}: no answer")
                continue
            try:
                status, payload, ops = conn.recv()
            except EOFError:
                errors.append(f"worker {w}: died (exit code {p.exitcode})")
                continue
            for k in totals:
                totals[k] += ops[k]
            if status != "ok":
                errors.append(payload)
                continue
            for start, data in payload:
                expected[start : start + len(data)] = data
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, f"seed {seed}: " + "; ".join(errors)
    assert totals["write"] > 0 and totals["read"] > 0, totals
    return expected, totals


def check_content(volume: Path, expected: bytearray, seed: int, when: str) -> None:
    with open(volume, "rb", buffering=0) as f:
        got = f.read()
    if got != expected:
        bad = next(i for i in range(len(expected)) if got[i : i + 1] != expected[i : i + 1])
        raise AssertionError(
            f"seed {seed}, {when}: volume differs from the model first at byte {bad} "
            f"(sector {bad // 512} of 512 B): {got[bad : bad + 16].hex()} != "
            f"{expected[bad : bad + 16].hex()}"
        )


# -- mounting ----------------------------------------------------------------------------


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Mount:
    """The CLI as a subprocess (it daemonizes once the mount is ready)."""

    def __init__(self, env: dict[str, str], args: list[str], mountpoint: Path) -> None:
        self.env = env
        self.args = args
        self.mountpoint = mountpoint

    def __enter__(self) -> Path:
        self.mountpoint.mkdir(exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "cryptfuse", *self.args, str(self.mountpoint)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            if _mounted(self.mountpoint):
                self.__exit__()
            pytest.fail(f"cryptfuse mount failed ({proc.returncode}): {proc.stderr.strip()}")
        return self.mountpoint / "volume"

    def __exit__(self, *exc: object) -> None:
        # The daemon syncs and closes the container after the unmount; wait for the
        # container lock to be free (the next mount of it would be refused otherwise).
        deadline = time.monotonic() + 30
        while _mounted(self.mountpoint):
            if (
                subprocess.run(
                    ["fusermount3", "-u", str(self.mountpoint)], capture_output=True
                ).returncode
                == 0
            ):
                break
            if time.monotonic() > deadline:
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True
                )
                break
            time.sleep(0.1)
        container = self.args[-1]
        while time.monotonic() < deadline and _container_in_use(container):
            time.sleep(0.05)


def _container_in_use(container: str) -> bool:
    """Whether a live process (the daemon still closing) has *container* open."""
    target = os.path.realpath(container)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("STRESS_SEED", "0")) or random.randrange(1, 1 << 31)
    print(f"STRESS_SEED={value}")
    return value


def _plain(tmp_path: Path) -> list[str]:
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(VOLUME)
    key = tmp_path / "plain.key"
    key.write_bytes(os.urandom(64))
    return [
        "--type",
        "plain",
        "-c",
        "aes-xts-plain64",
        "-s",
        "512",
        "--key-file",
        str(key),
        str(container),
    ]


def _luks2(tmp_path: Path) -> list[str]:
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    container = tmp_path / "luks2.img"
    with open(container, "wb") as f:
        f.truncate(16 * MiB + VOLUME)  # 16 MiB: LUKS2's default header + keyslot area
    key = tmp_path / "luks2.pass"
    key.write_bytes(b"stress test passphrase")
    proc = subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "-c",
            "aes-xts-plain64",
            "-s",
            "512",
            "--sector-size",
            "4096",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hash",
            "sha256",
            "--key-file",
            str(key),
            str(container),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        pytest.skip(f"cryptsetup luksFormat failed here: {proc.stderr.strip()}")
    return ["--key-file", str(key), str(container)]


@pytest.mark.parametrize(
    ("make", "fuse_opts"),
    [
        pytest.param(_plain, [], id="plain-xts-512"),
        pytest.param(_plain, ["-o", "page_cache"], id="plain-xts-512-page-cache"),
        pytest.param(_luks2, [], id="luks2-xts-4096"),
    ],
)
def test_concurrent_unaligned_io(
    tmp_path: Path, cli_env: dict[str, str], seed: int, make: object, fuse_opts: list[str]
) -> None:
    args = make(tmp_path)  # type: ignore[operator]
    mountpoint = tmp_path / "mnt"
    args = [*fuse_opts, *args]
    with Mount(cli_env, args, mountpoint) as volume:
        expected, totals = run_stress(volume, seed)
        check_content(volume, expected, seed, "after the run")
    print(f"ops: {totals}")
    with Mount(cli_env, args, mountpoint) as volume:
        check_content(volume, expected, seed, "after a remount")
