"""fio's verification through the mounted volume: an oracle that is not ours.

Every job writes blocks with fio's crc32c verification header and reads them back
while it goes on (``verify_backlog``) and at its end; fio fails the job on any block
that comes back different or from elsewhere.  The jobs run at the same time on
disjoint stretches of one volume: sequential and random, several processes each,
O_DIRECT and buffered, 512-byte, 4 KiB and 1 MiB blocks and sizes that are no
multiple of a sector (1000..9000 bytes at offsets that are multiples of 1000, so
nearly every request is a read-modify-write of partial sectors), on the default
(``direct_io``) mount and with ``-o page_cache``.  Then the data written before an
unmount is checked again after a remount with ``--verify_only``, and, as a check of
the oracle itself, ``--verify_only`` of a stretch that was never written must fail.

Not in ``make test`` (about a minute): ``make test-fio`` runs it (``.ci/run`` too),
which sets ``CRYPTFUSE_FIO=1``.  See docs/reliability.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fio_helpers import io_bytes, job_file, need_fio, run_fio
from test_e2e_mount import PLAIN, Cryptfuse, Stack, stack  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.environ.get("CRYPTFUSE_FIO"), reason="long: make test-fio (CRYPTFUSE_FIO=1)"
    ),
]

MiB = 1 << 20
VOLUME = 160 * MiB

#: job name -> options; each job's processes write [offset, offset + numjobs * size)
JOBS: dict[str, dict[str, object]] = {
    "seq-direct-1m": {"rw": "write", "bs": "1m", "direct": 1, "numjobs": 2, "size": "16m"},
    # (a size that is a multiple of bs: fio writes a whole last block past the size,
    # 4 MiB with 4000-byte blocks ending 1696 bytes into the next job's stretch)
    "seq-buffered-4000": {"rw": "write", "bs": 4000, "direct": 0, "numjobs": 2, "size": 4000000},
    "rand-direct-4k": {"rw": "randwrite", "bs": "4k", "direct": 1, "numjobs": 4, "size": "4m"},
    "rand-direct-512": {"rw": "randwrite", "bs": 512, "direct": 1, "numjobs": 2, "size": "1m"},
    "rand-buffered-4k": {"rw": "randwrite", "bs": "4k", "direct": 0, "numjobs": 2, "size": "4m"},
    "rand-direct-unaligned": {
        "rw": "randwrite",
        "bsrange": "1000-9000",
        "bs_unaligned": 1,
        "direct": 1,
        "numjobs": 2,
        "size": "4m",
    },
    "rand-buffered-unaligned": {
        "rw": "randwrite",
        "bsrange": "1000-9000",
        "bs_unaligned": 1,
        "direct": 0,
        "numjobs": 2,
        "size": "4m",
    },
    "rand-direct-mixed": {
        "rw": "randwrite",
        "bsrange": "512-256k",
        "direct": 1,
        "numjobs": 2,
        "size": "16m",
    },
}


def _size(value: object) -> int:
    text = str(value)
    return int(text[:-1]) * MiB if text.endswith("m") else int(text)


def placed_jobs(jobs: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """*jobs* with offsets: one stretch per process, none shared (a stretch holds
    whole 1 MiB units, so no two processes write the same sector either)."""
    out = {}
    offset = 0
    for name, options in jobs.items():
        stretch = -(-_size(options["size"]) // MiB) * MiB
        out[name] = {**options, "offset": offset, "offset_increment": stretch}
        offset += int(str(options["numjobs"])) * stretch
    assert offset <= VOLUME
    return out


GLOBAL = {
    "ioengine": "psync",
    "verify": "crc32c",
    "verify_backlog": 64,
    "verify_fatal": 1,
    "verify_dump": 0,
    "verify_state_save": 0,
    "group_reporting": 0,
}


@pytest.fixture
def container(tmp_path: Path) -> Path:
    path = tmp_path / "plain.img"
    with open(path, "wb") as f:
        f.truncate(VOLUME)
    return path


@pytest.fixture
def cf(stack: Stack, cli_env: dict[str, str], repo: Path) -> Cryptfuse:  # noqa: F811
    return Cryptfuse(stack, cli_env, repo)


@pytest.mark.parametrize("fuse_opts", [[], ["-o", "page_cache"]], ids=["direct_io", "page_cache"])
def test_fio_verify_through_the_volume(
    cf: Cryptfuse, container: Path, tmp_path: Path, fuse_opts: list[str]
) -> None:
    need_fio()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(*fuse_opts, *PLAIN, container, mountpoint=mnt)
    jobs = placed_jobs(JOBS)
    jobfile = job_file(tmp_path / "verify.fio", {**GLOBAL, "filename": mnt / "volume"}, jobs)
    report = run_fio(jobfile)
    written = io_bytes(report, "write")
    expected = sum(int(str(o["numjobs"])) * _size(o["size"]) for o in JOBS.values())
    # fio wrote every byte of every stretch once and read it all back
    assert written >= expected * 0.95, (written, expected)
    assert io_bytes(report, "read") >= written
    cf.unmount(mnt, pids)


def test_fio_verify_only_after_a_remount(cf: Cryptfuse, container: Path, tmp_path: Path) -> None:
    need_fio()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    jobs = placed_jobs(
        {
            name: JOBS[name]
            for name in ("rand-direct-4k", "rand-direct-unaligned", "rand-direct-mixed")
        }
    )
    options = {**GLOBAL, "filename": mnt / "volume"}
    write = job_file(tmp_path / "write.fio", {**options, "do_verify": 0}, jobs)
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    report = run_fio(write)
    assert io_bytes(report, "read") == 0
    cf.unmount(mnt, pids)

    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    # do_verify=1 again: with the writing job's do_verify=0, fio --verify_only
    # "verifies" nothing and succeeds (found by the control below)
    verify = job_file(tmp_path / "verify.fio", options, jobs)
    report = run_fio(verify, "--verify_only")
    expected = sum(int(str(o["numjobs"])) * _size(o["size"]) for o in jobs.values())
    assert io_bytes(report, "read") >= expected * 0.95, (io_bytes(report, "read"), expected)
    # the oracle itself: the same blocks looked for where nothing was written
    elsewhere = {
        name: {**o, "offset": int(str(o["offset"])) + 100 * MiB} for name, o in jobs.items()
    }
    control = job_file(tmp_path / "control.fio", options, elsewhere)
    report = run_fio(control, "--verify_only", check=False)
    assert report["returncode"] != 0 or any(j["error"] for j in report["jobs"]), (
        "fio verified blocks that were never written: the oracle checks nothing"
    )
    cf.unmount(mnt, pids)
