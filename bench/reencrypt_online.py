#!/usr/bin/env python3
"""Online LUKS2 reencryption under a 4 KiB random-write load, against offline.

The issue's target: "an online reencryption under a 4 KiB random-write load that
still finishes within 2x its offline time while the load keeps at least half its
IOPS".  Every round, for every resilience mode, on a LUKS2 container made like
``bench/reencrypt.py``'s (1 GiB random data area, PBKDF2 1000 iterations,
aes-xts-plain64 512-bit, 4096-byte sectors) and two fully allocated, synced
copies of it:

  offline  ``python -m cryptfuse reencrypt -q --resilience R`` on copy A
           (page cache dropped; wall time to the end of an os.sync() after it);
  online   copy B mounted (``python -m cryptfuse B MNT --key-file F``), then
           before  fio 4 KiB randwrite on MNT/volume alone (psync, O_DIRECT, N
                   threads, --fio-runtime seconds): IOPS alone;
           during  the same fio started with a long runtime and an IOPS log
                   (250 ms windows, Unix timestamps); after 1 s the same
                   reencrypt command on B (the daemon does it, under the
                   mount); fio is stopped (SIGINT) 1 s after the command
                   returns.  Online time: the command's wall time plus an
                   os.sync(); IOPS during: fio's writes completed inside the
                   command's run (from the log), per second;
           after   fio alone again (the mount now serves through the Python
                   engine: the C data path is off for the rest of the mount).

The order offline/online alternates every round.  Ratios are per round (online
time / offline time: target <= 2; IOPS during / IOPS before: target >= 0.5;
IOPS after / IOPS before), given as median (range).

Checks: afterwards both copies pass ``cryptsetup open --test-passphrase``,
``luksDump`` shows no reencryption and a new volume-key digest; copy A decrypts
to the original's plaintext at four 16 MiB spots; every 4 KiB block of copy B
(whole volume, decrypted offline with cryptfuse's Python API) is either the
original's plaintext or fio's fixed write pattern (``buffer_pattern``,
``scramble_buffers=0``): a torn, lost or misencrypted block matches neither.

``--profile`` adds one more online run per mode with ``py-spy record`` on the
daemon (not timed in the table): samples per thread and the functions with
the most own samples.

  bench/reencrypt.py --online                     # 1 GiB, 3 rounds, checksum
  bench/reencrypt_online.py --modes checksum,journal,none --profile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from reencrypt import (
    MODES,
    Run,
    _human,
    _segment_key_digest,
    copy_container,
    drop_caches_if_root,
    make_container,
    parse_size,
    plaintext,
    spot_offsets,
    timed,
    versions,
)
from run import (
    BenchError,
    GiB,
    MiB,
    ensure_fio,
    find_pid,
    mounted,
    proc_alive,
    proc_cpu,
    ratio,
    say,
    sh,
)

BLOCK = 4096
PATTERN = bytes.fromhex("c0ffee42")  # every fio write: this, repeated
WINDOW_MS = 250  # fio IOPS log averaging window
LEAD = 1.0  # seconds of fio before the reencryption starts and after it ends


@dataclass
class OnlineRun:
    offline: float  # s, offline reencryption (wall + sync)
    online: float  # s, online reencryption command (wall + sync)
    iops_before: float  # fio alone, C data path
    iops_during: float  # fio writes completed during the online command, per second
    iops_after: float  # fio alone, after: Python engine
    lat_p99_ms: float  # fio write completion latency over the whole "during" fio run
    lat_max_ms: float
    daemon_cpu: float  # daemon CPU seconds during the online command (with fio's load)
    stalled: float  # share of fio threads' time without a completion for > 250 ms
    offline_cpu: float  # CPU seconds of the offline command

    @property
    def time_ratio(self) -> float:
        return self.online / self.offline

    @property
    def iops_ratio(self) -> float:
        return self.iops_during / self.iops_before

    @property
    def after_ratio(self) -> float:
        return self.iops_after / self.iops_before


@dataclass
class OnlineResults:
    size: int
    rounds: int
    modes: tuple[str, ...]
    jobs: int
    runtime: float
    runs: dict[str, list[OnlineRun]] = field(default_factory=dict)
    profile: dict[str, str] = field(default_factory=dict)  # mode -> Markdown
    notes: list[str] = field(default_factory=list)


# -- fio ------------------------------------------------------------------------------------


def fio_cmd(volume: str, jobs: int, runtime: float, size: int) -> list[str]:
    return [
        "fio",
        "--name=randwrite",
        f"--filename={volume}",
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
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
        f"--buffer_pattern=0x{PATTERN.hex()}",
        "--scramble_buffers=0",
        "--output-format=json",
    ]


def fio_json(text: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(text[text.index("{") :])
    return data


def fio_write(data: dict[str, object]) -> dict[str, object]:
    jobs = data["jobs"]
    assert isinstance(jobs, list)
    write: dict[str, object] = jobs[0]["write"]
    return write


def fio_alone(volume: str, jobs: int, runtime: float, size: int) -> float:
    proc = sh(fio_cmd(volume, jobs, runtime, size), timeout=runtime + 120, quiet=True)
    iops = fio_write(fio_json(proc.stdout))["iops"]
    assert isinstance(iops, float | int)
    return float(iops)


def iops_in(logs: list[str], t0: float, t1: float) -> float:
    """Writes per second completed between Unix times *t0* and *t1*, summed over
    fio's per-thread IOPS logs (one line per WINDOW_MS window: end time in ms, IOPS)."""
    total = 0.0
    for path in logs:
        values = []
        for line in Path(path).read_text().splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) < 2:
                continue
            end = int(cells[0]) / 1000
            if t0 + WINDOW_MS / 1000 <= end <= t1:  # windows wholly inside the run
                values.append(float(cells[1]))
        if not values:
            raise BenchError(f"{path}: no IOPS sample inside the reencryption ({t1 - t0:.1f} s)")
        total += statistics.fmean(values)
    return total


def stalled(logs: list[str], t0: float, t1: float) -> float:
    """The share of fio's thread-time between *t0* and *t1* spent in stalls: fio writes
    a log line only when a window saw a completion, so a gap of more than one window
    between two lines is time in which that thread completed no write (it waited,
    e.g. for a hot zone held by the reencryption)."""
    lost = 0.0
    for path in logs:
        times = [
            int(line.split(",")[0]) / 1000
            for line in Path(path).read_text().splitlines()
            if line.count(",") >= 1
        ]
        inside = [t for t in times if t0 <= t <= t1]
        for a, b in zip([t0, *inside], [*inside, t1], strict=True):
            lost += max(0.0, b - a - WINDOW_MS / 1000)
    return lost / (len(logs) * (t1 - t0)) if logs and t1 > t0 else 0.0


# -- the mount ------------------------------------------------------------------------------


@contextlib.contextmanager
def mount(container: str, mnt: str, key: str, log: str) -> Iterator[int]:
    """cryptfuse's daemon serving *container* on *mnt*; yields its pid; always unmounted."""
    os.makedirs(mnt, exist_ok=True)
    pid: int | None = None
    try:
        sh(
            [sys.executable, "-m", "cryptfuse", "--key-file", key, "--log-file", log,
             container, mnt],
            timeout=180,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not mounted(mnt):
            if time.monotonic() > deadline:
                raise BenchError(f"no cryptfuse mount on {mnt}")
            time.sleep(0.05)
        pid = find_pid(mnt, "cryptfuse")
        yield pid
    finally:
        unmount(mnt, pid)


def unmount(mnt: str, pid: int | None) -> None:
    for _attempt in range(40):
        if not mounted(mnt):
            break
        if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
            break
        time.sleep(0.25)
    else:
        say(f"warning: lazy unmount of {mnt}")
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if pid is None:
        return
    deadline = time.monotonic() + 60  # the daemon syncs and closes the container
    while proc_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc_alive(pid):
        say(f"warning: cryptfuse daemon {pid} still running; SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proc_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- one online measurement -------------------------------------------------------------------


@dataclass
class During:
    seconds: float
    iops: float
    lat_p99_ms: float
    lat_max_ms: float
    daemon_cpu: float
    stalled: float  # share of fio threads' time without a completion for > 250 ms


def online_reencrypt(
    work: Path, tag: str, container: str, key: str, mode: str, volume: str, pid: int,
    jobs: int, size: int, spy: str | None = None,
) -> During:  # fmt: skip
    """fio on *volume* from LEAD s before the online reencryption to LEAD s after it."""
    prefix = str(work / f"fio-{tag}")
    for old in glob.glob(prefix + "_iops.*.log"):
        os.unlink(old)
    cmd = fio_cmd(volume, jobs, 3600, size)
    cmd += [
        f"--write_iops_log={prefix}",
        f"--log_avg_msec={WINDOW_MS}",
        "--log_unix_epoch=1",
        "--per_job_logs=1",
    ]
    out = work / f"fio-{tag}.json"
    spy_proc: subprocess.Popen[str] | None = None
    with open(out, "w") as f:
        fio = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
    try:
        time.sleep(LEAD)
        if fio.poll() is not None:
            raise BenchError(f"fio exited early ({fio.returncode}): {shlex.join(cmd)}")
        if spy:
            spy_proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r",
                 "100", "--threads", "--idle", "--nonblocking", "-f", "raw", "-o", spy],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
        cpu0 = proc_cpu(pid)
        t0 = time.time()
        rcmd = [sys.executable, "-m", "cryptfuse", "reencrypt", "-q", "--key-file", key]
        run = timed([*rcmd, "--resilience", mode, container], str(work / f"online-{tag}.log"))
        t1 = t0 + run.wall
        cpu = proc_cpu(pid) - cpu0
        if spy_proc is not None:
            stop(spy_proc)
        time.sleep(LEAD)
        if fio.poll() is not None:
            raise BenchError(f"fio exited during the reencryption ({fio.returncode})")
    finally:
        if spy_proc is not None:
            stop(spy_proc)
        stop(fio)
    logs = sorted(glob.glob(prefix + "_iops.*.log"))
    if len(logs) != jobs:
        raise BenchError(f"expected {jobs} fio IOPS logs, found {logs}")
    iops = iops_in(logs, t0, t1)
    write = fio_write(fio_json(out.read_text()))
    clat = write["clat_ns"]
    assert isinstance(clat, dict)
    p99 = float(clat.get("percentile", {}).get("99.000000", 0)) / 1e6
    return During(run.wall, iops, p99, float(clat["max"]) / 1e6, cpu, stalled(logs, t0, t1))


# -- checks -------------------------------------------------------------------------------------


def check_done(path: str, key: str, old_digest: str) -> None:
    sh(["cryptsetup", "open", "--test-passphrase", "--key-file", key, path], quiet=True)
    if "reencrypt" in sh(["cryptsetup", "luksDump", path], quiet=True).stdout:
        raise BenchError(f"{path}: still in reencryption after the run")
    if _segment_key_digest(path) == old_digest:
        raise BenchError(f"{path}: the volume key did not change")


def check_blocks(original: str, result: str, passphrase: bytes, size: int) -> int:
    """Every 4 KiB block of *result* is the original's or fio's pattern; returns how many
    are the pattern."""
    import numpy as np

    from cryptfuse.formats import OpenOptions, Secret, open_volume

    pattern = np.frombuffer(PATTERN * (BLOCK // len(PATTERN)), dtype=np.uint8)
    written = 0
    opts = OpenOptions(readonly=True)
    with (
        open_volume(original, opts, Secret(passphrase, False)) as a,
        open_volume(result, opts, Secret(passphrase, False)) as b,
    ):
        if a.size != size or b.size != size:
            raise BenchError(f"volume sizes {a.size}, {b.size}, expected {size}")
        step = 16 * MiB
        for off in range(0, size, step):
            n = min(step, size - off)
            want = np.frombuffer(a.read(off, n), dtype=np.uint8).reshape(-1, BLOCK)
            got = np.frombuffer(b.read(off, n), dtype=np.uint8).reshape(-1, BLOCK)
            same = (got == want).all(axis=1)
            pat = (got == pattern).all(axis=1)
            bad = np.flatnonzero(~(same | pat))
            if bad.size:
                at = off + int(bad[0]) * BLOCK
                raise BenchError(
                    f"{result}: {bad.size} block(s) from {at} are neither the original "
                    "plaintext nor fio's pattern"
                )
            written += int((pat & ~same).sum())
    return written


# -- py-spy summary -----------------------------------------------------------------------------


def spy_summary(raw: str, top: int = 14) -> str:
    """Samples per thread group and the leaf functions with the most samples.

    Recorded with ``--idle``: a thread waiting (in the range lock, in a read of
    /dev/fuse, in fsync) is sampled too, where it waits.
    """
    groups: dict[str, int] = {}
    leaves: dict[tuple[str, str], int] = {}
    total = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        # "thread (3682): fuse-3" -> "fuse-*"; one reencrypt-cipher thread per zone
        group = re.sub(r"-\d+$", "-*", re.sub(r"^thread \(\w+\):? ?", "", thread)) or "?"
        groups[group] = groups.get(group, 0) + n
        leaves[(group, _short(frames[-1]))] = leaves.get((group, _short(frames[-1])), 0) + n
        total += n
    if not total:
        return "py-spy recorded no samples"
    lines = [
        f"{total} samples at 100 Hz, waiting threads included (`--idle`)",
        "",
        "| threads | samples | where (own samples, top) |",
        "|---|--:|---|",
    ]
    for group, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        mine = sorted(((f, k) for (g, f), k in leaves.items() if g == group), key=lambda x: -x[1])
        where = "; ".join(f"{f} {k}" for f, k in mine[:4])
        lines.append(f"| {group} | {n} | {where} |")
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py:12)'."""
    func, _, where = frame.partition(" (")
    return f"{func} ({os.path.basename(where.rstrip(')'))})" if where else func


# -- rounds -------------------------------------------------------------------------------------


def offline_reencrypt(work: Path, key: str, mode: str, path: str) -> Run:
    drop_caches_if_root()
    cmd = [sys.executable, "-m", "cryptfuse", "reencrypt", "-q", "--key-file", key]
    run = timed([*cmd, "--resilience", mode, path], str(work / "offline.log"))
    say(f"  offline: {run.wall:.2f} s, CPU {run.cpu:.2f} s")
    return run


def online_round(
    res: OnlineResults, work: Path, key: str, mode: str, tag: str, path: str
) -> tuple[float, During, float]:
    """IOPS alone, the online reencryption under fio, IOPS alone afterwards."""
    mnt = str(work / "mnt")
    with mount(path, mnt, key, str(work / f"daemon-{tag}.log")) as pid:
        vol = os.path.join(mnt, "volume")
        before = fio_alone(vol, res.jobs, res.runtime, res.size)
        say(f"  fio alone before: {before:.0f} IOPS")
        drop_caches_if_root()
        during = online_reencrypt(work, tag, path, key, mode, vol, pid, res.jobs, res.size)
        say(
            f"  online: {during.seconds:.2f} s, fio {during.iops:.0f} IOPS during, "
            f"p99 {during.lat_p99_ms:.1f} ms, max {during.lat_max_ms:.0f} ms, "
            f"daemon CPU {during.daemon_cpu:.2f} s, fio threads stalled "
            f"{during.stalled:.0%} of the time"
        )
        after = fio_alone(vol, res.jobs, res.runtime, res.size)
        say(f"  fio alone after: {after:.0f} IOPS")
    return before, during, after


def one_round(res: OnlineResults, rnd: int, work: Path, key: str) -> None:
    passphrase = Path(key).read_bytes()
    for mode in res.modes:
        src, off, on = (str(work / n) for n in ("original.img", "offline.img", "online.img"))
        say(f"round {rnd + 1}/{res.rounds}, {mode}: container of {_human(res.size)}")
        make_container(src, key, res.size)
        copy_container(src, off)
        copy_container(src, on)
        old_digest = _segment_key_digest(src)
        tag = f"{mode}-{rnd}"
        if rnd % 2 == 0:  # the order alternates every round
            offline = offline_reencrypt(work, key, mode, off)
            before, during, after = online_round(res, work, key, mode, tag, on)
        else:
            before, during, after = online_round(res, work, key, mode, tag, on)
            offline = offline_reencrypt(work, key, mode, off)
        check_done(off, key, old_digest)
        check_done(on, key, old_digest)
        offsets, span = spot_offsets(res.size), min(16 * MiB, res.size)
        if plaintext(src, passphrase, offsets, span) != plaintext(off, passphrase, offsets, span):
            raise BenchError(f"{off}: plaintext differs from the original's")
        written = check_blocks(src, on, passphrase, res.size)
        say(
            f"  verified: both reencrypted (new key, no reencryption left); offline copy = "
            f"original; online copy: every block original or fio's ({written} written)"
        )
        res.runs.setdefault(mode, []).append(
            OnlineRun(
                offline.wall, during.seconds, before, during.iops, after,
                during.lat_p99_ms, during.lat_max_ms, during.daemon_cpu, during.stalled,
                offline.cpu,
            )
        )  # fmt: skip
        for p in (src, off, on):
            os.unlink(p)


def profile_round(res: OnlineResults, mode: str, work: Path, key: str) -> None:
    on = str(work / "profile.img")
    make_container(on, key, res.size)
    mnt = str(work / "mnt")
    raw = str(work / f"py-spy-{mode}.txt")
    with mount(on, mnt, key, str(work / f"daemon-profile-{mode}.log")) as pid:
        vol = os.path.join(mnt, "volume")
        drop_caches_if_root()
        d = online_reencrypt(work, f"profile-{mode}", on, key, mode, vol, pid, res.jobs,
                             res.size, spy=raw)  # fmt: skip
        say(f"  profiled online ({mode}): {d.seconds:.2f} s, {d.iops:.0f} IOPS during")
    res.profile[mode] = (
        f"py-spy on the daemon, {mode} (online {d.seconds:.1f} s under py-spy, "
        f"fio {d.iops:.0f} IOPS during; fio threads stalled (no write done for > 250 ms) "
        f"{d.stalled:.0%} of the time):\n\n" + spy_summary(raw)
    )
    os.unlink(on)


# -- report -------------------------------------------------------------------------------------


def report(res: OnlineResults, argv: list[str], started: datetime.datetime, elapsed: float) -> str:
    lines = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')} · run time {elapsed / 60:.1f} min · "
        f"command: `{shlex.join(['bench/reencrypt_online.py', *argv])}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"{_human(res.size)} data area, {res.rounds} round(s); load: fio 4 KiB randwrite, "
        f"psync, O_DIRECT, {res.jobs} thread(s) on the mounted volume. Seconds and IOPS are "
        "medians; ratios are the median (range) of the per-round ratios. Targets: online / "
        "offline <= 2, IOPS during / before >= 0.5.",
        "",
        "| resilience | offline s | online s | online / offline | IOPS before | IOPS during "
        "| during / before | IOPS after | after / before | write p99 / max during (ms) "
        "| fio threads stalled | daemon CPU s during |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mode in res.modes:
        runs = res.runs.get(mode)
        if not runs:
            continue

        def med(xs: list[float]) -> float:
            return statistics.median(xs)

        lines.append(
            f"| {mode} | {med([r.offline for r in runs]):.2f} | "
            f"{med([r.online for r in runs]):.2f} | {ratio([r.time_ratio for r in runs])} | "
            f"{med([r.iops_before for r in runs]):.0f} | "
            f"{med([r.iops_during for r in runs]):.0f} | "
            f"{ratio([r.iops_ratio for r in runs])} | "
            f"{med([r.iops_after for r in runs]):.0f} | "
            f"{ratio([r.after_ratio for r in runs])} | "
            f"{med([r.lat_p99_ms for r in runs]):.1f} / {med([r.lat_max_ms for r in runs]):.0f} | "
            f"{med([r.stalled for r in runs]):.0%} | {med([r.daemon_cpu for r in runs]):.2f} |"
        )
    lines += ["", "Targets, per round:", ""]
    for mode in res.modes:
        runs = res.runs.get(mode, [])
        t = sum(r.time_ratio <= 2 for r in runs)
        i = sum(r.iops_ratio >= 0.5 for r in runs)
        lines.append(
            f"- {mode}: time within 2× offline in {t}/{len(runs)} rounds; "
            f"IOPS at least half in {i}/{len(runs)} rounds"
        )
    for text in res.profile.values():
        lines += ["", text]
    if res.notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in res.notes)]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--online", action="store_true", help=argparse.SUPPRESS)  # reencrypt.py's
    p.add_argument("--size", type=parse_size, default=GiB, help="data area size (1G)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--modes", default="checksum", help="resilience modes, comma-separated")
    p.add_argument("--jobs", type=int, default=4, help="fio threads (4)")
    p.add_argument("--fio-runtime", type=float, default=10, help="fio alone, seconds (10)")
    p.add_argument("--profile", action="store_true", help="one py-spy'd online run per mode")
    p.add_argument("--workdir", default="/var/tmp", help="where the containers go (/var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--output", help="also write the Markdown report here")
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: some of {', '.join(MODES)}")
    args.modes = modes
    if args.rounds < 1 or args.jobs < 1:
        p.error("--rounds, --jobs: at least 1")
    return args


@contextlib.contextmanager
def scratch(workdir: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cryptfuse-online-", dir=workdir))
    try:
        yield path
    finally:
        mnt = str(path / "mnt")
        if mounted(mnt):  # a failure between mount() and its finally: never leave one
            unmount(mnt, None)
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    for tool in ("cryptsetup", "/usr/bin/time", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    if not ensure_fio():
        print("fio not found (apt-get install fio)", file=sys.stderr)
        return 2
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        print("--profile: py-spy not in the venv (pip install py-spy)", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    res = OnlineResults(args.size, args.rounds, args.modes, args.jobs, args.fio_runtime)
    with scratch(args.workdir, args.keep) as work:
        key = str(work / "passphrase")
        with open(key, "w") as f:
            f.write(os.urandom(24).hex())
        try:
            for rnd in range(args.rounds):
                one_round(res, rnd, work, key)
            if args.profile:
                for mode in args.modes:
                    profile_round(res, mode, work, key)
        except BenchError as exc:
            say(f"FAILED: {exc}")
            res.notes.append(f"stopped early: {exc}")
            print(report(res, argv, started, time.monotonic() - t0))
            return 1
    text = report(res, argv, started, time.monotonic() - t0)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
