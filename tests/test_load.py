"""Load: 64 processes at once on one mounted volume (docs/reliability.md, "Load").

fio runs 32 writers and 32 readers together, each an own process with its own
stretch of the volume:

* writers: 16 with 4 KiB O_DIRECT random writes, 8 with 512 B..128 KiB O_DIRECT
  random writes, 8 with buffered writes of 1000..9000 bytes at unaligned offsets
  (read-modify-writes); every block carries fio's crc32c header and is read back and
  checked while the job goes on (``verify_backlog``) and at its end;
* readers: 4 KiB O_DIRECT random reads of a stretch written (and checked) before,
  each block checked;

all 64 for ``SECONDS`` (fio's ``time_based``), so they all run together all along.

Checked: no fio error (no block came back wrong); the daemon's peak resident set
(``VmHWM``, and ``VmRSS`` sampled every 0.2 s) stays under 150 MiB; no request took
longer than ``MAX_LATENCY_S`` (fio's completion latency, per request, the largest of
all jobs: a liveness bound, far above what a request takes here, so that only a
stuck request fails it, not a slow machine); after an unmount and a remount, every
byte of the volume reads the same as before it (each writer checked all its blocks'
last versions at its end): nothing was lost.

Not in ``make test`` (about a minute): ``make test-load`` (and ``.ci/run``) runs it
with ``CRYPTFUSE_LOAD=1``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fio_helpers import io_bytes, job_file, need_fio, run_fio
from test_e2e_mount import PLAIN, Cryptfuse, Stack, stack  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.environ.get("CRYPTFUSE_LOAD"), reason="long: make test-load (CRYPTFUSE_LOAD=1)"
    ),
]

MiB = 1 << 20
READERS_AT = 128 * MiB  # readers' stretches: [128 MiB, 192 MiB)
VOLUME = 192 * MiB
SECONDS = 30
RSS_LIMIT = 150 * MiB
MAX_LATENCY_S = 10.0

GLOBAL = {
    "ioengine": "psync",
    "verify": "crc32c",
    "verify_fatal": 1,
    "verify_dump": 0,
    "verify_state_save": 0,
}
WRITERS: dict[str, dict[str, object]] = {
    "w-4k-direct": {"rw": "randwrite", "bs": "4k", "direct": 1, "numjobs": 16, "size": "4m"},
    "w-mixed-direct": {
        "rw": "randwrite",
        "bsrange": "512-128k",
        "direct": 1,
        "numjobs": 8,
        "size": "4m",
    },
    "w-unaligned-buffered": {
        "rw": "randwrite",
        "bsrange": "1000-9000",
        "bs_unaligned": 1,
        "direct": 0,
        "numjobs": 8,
        "size": "4m",
    },
}
READER = {"bs": "4k", "direct": 1, "numjobs": 32, "size": "2m"}


def writer_jobs() -> dict[str, dict[str, object]]:
    jobs, offset = {}, 0
    for name, options in WRITERS.items():
        size = int(str(options["size"]).rstrip("m")) * MiB
        jobs[name] = {
            **options,
            "offset": offset,
            "offset_increment": size,
            "verify_backlog": 32,
            "time_based": 1,
            "runtime": SECONDS,
            # Writers go over their stretch again and again: without the random map
            # fio keeps its verify history in a tree that drops a block when a later
            # one overlaps it; with it (a list), a block of another size written over
            # part of an older one fails the older one's check (fio's iolog.c).
            "norandommap": 1,
        }
        offset += int(str(options["numjobs"])) * size
    assert offset <= READERS_AT
    return jobs


class RssSampler(threading.Thread):
    """Samples the daemon's VmRSS every 0.2 s until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.stop = threading.Event()

    def status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} missing")

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.samples.append(self.status("VmRSS"))
            except OSError:
                return


def volume_digest(volume: Path) -> str:
    """sha256 of the whole volume, read after an fsync."""
    digest = hashlib.sha256()
    with open(volume, "rb+") as f:
        os.fsync(f.fileno())
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def max_latency_s(report: dict[str, Any]) -> float:
    """The longest completion latency of any request of any job (read or write)."""
    return max(j[d]["clat_ns"]["max"] for j in report["jobs"] for d in ("read", "write")) / 1e9


def percentile_ms(report: dict[str, Any], direction: str, pct: str) -> float:
    values = [j[direction]["clat_ns"].get("percentile", {}).get(pct, 0) for j in report["jobs"]]
    return max(values) / 1e6


def test_64_writers_and_readers(
    stack: Stack,  # noqa: F811 - the fixture of test_e2e_mount
    cli_env: dict[str, str],
    repo: Path,
    tmp_path: Path,
) -> None:
    need_fio()
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(VOLUME)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cf = Cryptfuse(stack, cli_env, repo)
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    assert len(pids) == 1
    options = {**GLOBAL, "filename": mnt / "volume"}
    readers = {"offset": READERS_AT, "offset_increment": READER["size"], **READER}

    # the readers' stretches, written and checked first
    fill = job_file(tmp_path / "fill.fio", options, {"fill": {**readers, "rw": "write"}})
    run_fio(fill)

    sampler = RssSampler(pids[0])
    sampler.start()
    load_jobs = {
        **writer_jobs(),
        "readers": {**readers, "rw": "randread", "time_based": 1, "runtime": SECONDS},
    }
    load = job_file(tmp_path / "load.fio", options, load_jobs)
    started = time.monotonic()
    report = run_fio(load, timeout=600)
    elapsed = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    peak = sampler.status("VmHWM")

    jobs = report["jobs"]
    assert len(jobs) == 64
    written = io_bytes(report, "write")
    latency = max_latency_s(report)
    runs = [j["job_runtime"] / 1000 for j in jobs]
    print(
        f"load: {elapsed:.1f} s (jobs ran {min(runs):.1f}..{max(runs):.1f} s), "
        f"{written / MiB:.0f} MiB written, "
        f"{io_bytes(report, 'read') / MiB:.0f} MiB read and checked; daemon VmHWM "
        f"{peak / MiB:.1f} MiB, VmRSS max sampled {max(sampler.samples, default=0) / MiB:.1f} "
        f"MiB; completion latency max {latency * 1000:.0f} ms, p99.9 write "
        f"{percentile_ms(report, 'write', '99.900000'):.0f} ms, "
        f"read {percentile_ms(report, 'read', '99.900000'):.0f} ms"
    )
    assert written > 0
    assert peak < RSS_LIMIT, f"daemon peak RSS {peak / MiB:.1f} MiB"
    assert latency < MAX_LATENCY_S, f"a request waited {latency:.1f} s"
    # fio checked every block's last version at the end of each writer; the same
    # bytes must come from the container after a remount
    before = volume_digest(mnt / "volume")
    cf.unmount(mnt, pids)
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    assert volume_digest(mnt / "volume") == before, "the volume changed across a remount"
    cf.unmount(mnt, pids)
