#!/usr/bin/env python3
"""LUKS2 reencryption: ``cryptfuse reencrypt`` against ``cryptsetup reencrypt``.

Every round, for every resilience mode (checksum, journal, none): one LUKS2
container is made (``cryptsetup luksFormat``, PBKDF2 1000 iterations,
aes-xts-plain64 512-bit, 4096-byte sectors) on a real disk, its data area is
filled with random bytes and synced, and it is copied once per contender
(fully allocated, synced).  Then, with the page cache dropped before each
(when root), the copies are reencrypted to a new volume key, same cipher and
key size:

  cryptsetup reencrypt --force-offline-reencrypt -q --key-file F --resilience R
  python -m cryptfuse reencrypt -q --key-file F --resilience R [--hotzone-size S]

one after the other, in an order that rotates every round.  A run's time is
wall time from the start of the process to the end of an ``os.sync()`` after
it exits (both tools fsync; the sync catches anything they left behind); its
peak RSS and CPU time come from ``/usr/bin/time``.  The untouched original is kept:
after the runs, ``cryptsetup open --test-passphrase`` must accept every copy,
``luksDump`` must show no reencryption left, and 16 MiB at a few offsets of
every copy must decrypt (cryptfuse's Python API) to the original's plaintext.

The table gives each contender's median over the rounds and, as ratios, the
median (and range) of the per-round ratios cryptsetup/cryptfuse: this VM's
disk changes speed from minute to minute, a ratio of runs seconds apart is the
fair one.  ``--profile`` adds one cProfile'd cryptfuse run per mode (not
timed in the table) and says where its time goes.

  bench/reencrypt.py                      # 1 GiB, 3 rounds (~6 minutes)
  bench/reencrypt.py --size 256M --rounds 1 --profile
  bench/reencrypt.py --online [...]      # online under fio: bench/reencrypt_online.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pstats
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from run import REPO, BenchError, GiB, MiB, drop_caches, ratio, say, sh

MODES = ("checksum", "journal", "none")
HEADER = 16 * MiB  # cryptsetup's default LUKS2 header (metadata + keyslots areas)
SPOT = 16 * MiB  # bytes compared at each spot-check offset
TIME = "/usr/bin/time"  # GNU time: peak RSS and CPU of one command

# Hot zones each tool uses on this container (16 MiB header: the reencryption area is
# the keyslots area's largest gap, 16,228,352 bytes).  cryptsetup 2.6.1, seen with
# strace: checksum = the area's capacity (area / 32 B * 4 KiB = 2 GiB) up to 1 GiB,
# journal = the area, none = 20 MiB.  cryptfuse (luks2_reencrypt._hotzone_length): the
# same, but capped at 64 MiB unless --hotzone-size is given.
HOTZONE_CRYPTSETUP = {"checksum": "1 GiB", "journal": "15.5 MiB", "none": "20 MiB"}
HOTZONE_CRYPTFUSE = {"checksum": "64 MiB", "journal": "15.5 MiB", "none": "20 MiB"}


@dataclass
class Run:
    wall: float  # seconds, process start to the end of the os.sync() after it
    process: float  # seconds, process start to exit
    cpu: float  # user + system seconds of the process
    rss: int  # peak RSS, bytes


@dataclass
class Contender:
    name: str  # "cryptsetup", "cryptfuse", "cryptfuse --hotzone-size 1G"
    cmd: list[str]  # without the container
    hotzone: dict[str, str]
    modes: tuple[str, ...] = MODES


@dataclass
class Results:
    size: int
    rounds: int
    contenders: list[Contender]
    modes: tuple[str, ...]
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)  # (mode, name)
    profile: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> category
    notes: list[str] = field(default_factory=list)

    def add(self, mode: str, name: str, run: Run) -> None:
        self.runs.setdefault((mode, name), []).append(run)


# -- containers ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M)")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    if n <= 0 or n % MiB:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number of MiB")
    return n


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_container(path: str, key: str, size: int) -> None:
    """A LUKS2 container whose data area (*size* bytes) is random, written and synced."""
    with open(path, "wb") as f:
        f.truncate(HEADER + size)
    sh(
        [
            "cryptsetup",
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--sector-size",
            "4096",
            "--key-file",
            key,
            path,
        ],
        quiet=True,
    )
    dump = sh(["cryptsetup", "luksDump", path], quiet=True).stdout
    seg = dump[dump.index("Data segments:") :]
    offset = int(re.search(r"offset:\s*(\d+) \[bytes\]", seg).group(1))  # type: ignore[union-attr]
    if offset != HEADER or "aes-xts-plain64" not in seg:
        raise BenchError(f"unexpected layout: data offset {offset}, segment {seg[:200]!r}")
    # Random ciphertext: it decrypts to random plaintext; the content does not matter
    # for speed, only that every block is allocated and the copies are identical.
    fd = os.open(path, os.O_WRONLY)
    try:
        for at in range(0, size, 4 * MiB):
            chunk = os.urandom(min(4 * MiB, size - at))
            if os.pwrite(fd, chunk, HEADER + at) != len(chunk):
                raise BenchError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_container(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)  # sendfile/copy_file_range: a real copy on ext4
    fsync_path(dst)
    st = os.stat(dst)
    if st.st_blocks * 512 < st.st_size:
        raise BenchError(f"{dst} is sparse ({st.st_blocks * 512} of {st.st_size} bytes)")


# -- running and checking ----------------------------------------------------------------------


def timed(cmd: list[str], log: str) -> Run:
    """Run *cmd*; wall time includes an os.sync() after it.

    Peak RSS and CPU come from /usr/bin/time around it, not from our own wait4: a
    child forked from this (large) Python process inherits its RSS high-water mark
    across exec, /usr/bin/time's child starts small.
    """
    say("$ " + shlex.join(cmd))
    usage = log + ".time"
    with open(log, "w") as out:
        t0 = time.monotonic()
        proc = subprocess.run(
            [TIME, "-f", "%M %U %S", "-o", usage, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            check=False,
        )
        t1 = time.monotonic()
        os.sync()
        t2 = time.monotonic()
    if proc.returncode != 0:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"{shlex.join(cmd)} failed ({proc.returncode}): {' / '.join(tail)}")
    rss_kib, user, system = Path(usage).read_text().split()[-3:]
    return Run(t2 - t0, t1 - t0, float(user) + float(system), int(rss_kib) * 1024)


def spot_offsets(size: int) -> list[int]:
    span = min(SPOT, size)
    last = size - span
    picks = {0, last // 3 // 4096 * 4096, last // 2 // 4096 * 4096, last}
    return sorted(picks)


def plaintext(path: str, passphrase: bytes, offsets: list[int], span: int) -> list[bytes]:
    from cryptfuse.formats import OpenOptions, Secret, open_volume

    with open_volume(path, OpenOptions(readonly=True), Secret(passphrase, False)) as vol:
        return [vol.read(off, span) for off in offsets]


def verify(original: str, copies: list[str], key: str, size: int) -> None:
    """Every copy opens with the passphrase, is no longer in reencryption, and decrypts
    to the original's plaintext at a few offsets."""
    passphrase = Path(key).read_bytes()
    offsets = spot_offsets(size)
    span = min(SPOT, size)
    want = plaintext(original, passphrase, offsets, span)
    old_digest = _segment_key_digest(original)
    for path in copies:
        sh(["cryptsetup", "open", "--test-passphrase", "--key-file", key, path], quiet=True)
        dump = sh(["cryptsetup", "luksDump", path], quiet=True).stdout
        if "reencrypt" in dump:
            raise BenchError(f"{path}: still in reencryption after the run")
        if _segment_key_digest(path) == old_digest:
            raise BenchError(f"{path}: the volume key did not change")
        got = plaintext(path, passphrase, offsets, span)
        for off, a, b in zip(offsets, want, got, strict=True):
            if a != b:
                raise BenchError(f"{path}: plaintext at {off} differs from the original's")


def _segment_key_digest(path: str) -> str:
    """The digest of the volume key (its salt and value in luksDump)."""
    dump = sh(["cryptsetup", "luksDump", path], quiet=True).stdout
    return dump[dump.index("Digests:") :]


# -- profile --------------------------------------------------------------------------------

CATEGORIES = (  # (label, substrings of "file:function" in cProfile's terms), first match wins
    ("read (pread)", ("posix.pread",)),
    ("copy into a bytearray (_pread)", ("luks2_reencrypt.py:_pread",)),
    ("write (pwrite)", ("posix.pwrite",)),
    ("fsync", ("posix.fsync", "posix.fdatasync", "posix.sync")),
    (
        "hashing (checksums)",
        (
            "_hashlib",
            "hashlib.py:",
            "luks2_reencrypt.py:_checksums",
            "luks2_reencrypt.py:<genexpr>",
        ),
    ),
    ("AES (OpenSSL update_into)", ("update_into",)),
    ("XTS tweaks (_xts.xor_tweaks)", ("xor_tweaks",)),
    ("sector.py (numpy, buffers)", ("sector.py:",)),
)
OTHER = "other (start-up, KDF, header commits)"


def categorize(stats: pstats.Stats) -> dict[str, float]:
    """Own time (tottime) of every function, summed by what it does."""
    out: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        total += tt
        where = f"{os.path.basename(filename)}:{func}"
        cat = next((label for label, subs in CATEGORIES if any(x in where for x in subs)), OTHER)
        out[cat] = out.get(cat, 0.0) + tt
    out["total"] = total
    return out


def profile_run(res: Results, mode: str, work: Path, key: str, size: int) -> None:
    src = str(work / "profile-src.img")
    dst = str(work / "profile.img")
    make_container(src, key, size)
    copy_container(src, dst)
    drop_caches_if_root()
    prof = str(work / f"cryptfuse-{mode}.prof")
    cmd = [sys.executable, "-m", "cProfile", "-o", prof, "-m", "cryptfuse", "reencrypt", "-q"]
    cmd += ["--key-file", key, "--resilience", mode, dst]
    run = timed(cmd, str(work / f"profile-{mode}.log"))
    cats = categorize(pstats.Stats(prof))
    cats["wall (under cProfile, + sync)"] = run.wall
    res.profile[mode] = cats
    for p in (src, dst):
        os.unlink(p)


# -- the benchmark ---------------------------------------------------------------------------


def drop_caches_if_root() -> None:
    if os.geteuid() == 0:
        drop_caches()
    else:
        os.sync()


def contenders(key: str, big: int, also: list[str]) -> list[Contender]:
    args = ["reencrypt", "-q", "--key-file", key]
    cf = [sys.executable, "-m", "cryptfuse", *args]
    out = [
        Contender(
            "cryptsetup",
            ["cryptsetup", "reencrypt", "--force-offline-reencrypt", "-q", "--key-file", key],
            HOTZONE_CRYPTSETUP,
        ),
        Contender("cryptfuse", cf, HOTZONE_CRYPTFUSE),
    ]
    if big:
        label = f"{big // GiB}G" if big % GiB == 0 else f"{big // MiB}M"
        # journal: the hot zone is bounded by the area (15.5 MiB) whatever is asked
        zone = {m: _human(min(big, GiB)) for m in ("checksum", "none")}
        out.append(
            Contender(
                f"cryptfuse --hotzone-size {label}",
                [*cf, "--hotzone-size", label],
                zone,
                ("checksum", "none"),
            )
        )
    for spec in also:
        name, _, command = spec.partition("=")
        if not name or not command:
            raise BenchError(f"--also {spec!r}: NAME=COMMAND")
        out.append(Contender(name, [*shlex.split(command), *args], HOTZONE_CRYPTFUSE))
    return out


def _human(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def one_round(res: Results, rnd: int, work: Path, key: str) -> None:
    for mode in res.modes:
        src = str(work / "original.img")
        say(f"round {rnd + 1}/{res.rounds}, {mode}: container of {_human(res.size)}")
        make_container(src, key, res.size)
        todo = [c for c in res.contenders if mode in c.modes]
        paths = {c.name: str(work / f"copy{i}.img") for i, c in enumerate(todo)}
        for c in todo:
            copy_container(src, paths[c.name])
        shift = rnd % len(todo)
        order = todo[shift:] + todo[:shift]
        for c in order:
            drop_caches_if_root()
            cmd = [*c.cmd, "--resilience", mode, paths[c.name]]
            run = timed(cmd, str(work / f"{c.name.split()[0]}-{mode}-{rnd}.log"))
            say(
                f"  {c.name}: {run.wall:.2f} s ({run.process:.2f} s + sync), "
                f"CPU {run.cpu:.2f} s, peak RSS {run.rss / MiB:.0f} MiB"
            )
            res.add(mode, c.name, run)
        verify(src, list(paths.values()), key, res.size)
        say("  verified: passphrase opens, no reencryption left, plaintext unchanged")
        for p in [src, *paths.values()]:
            os.unlink(p)


def per_gib(seconds: float, size: int) -> float:
    return seconds / (size / GiB)


def report(res: Results, argv: list[str], started: datetime.datetime, elapsed: float) -> str:
    base = res.contenders[0].name
    lines = [
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')} · run time {elapsed / 60:.1f} min · "
        f"command: `{shlex.join(['bench/reencrypt.py', *argv])}`",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        f"{_human(res.size)} data area, {res.rounds} round(s); seconds per GiB are medians, "
        "wall time including a final sync; the ratio is cryptsetup's time over cryptfuse's, "
        "median (range) of the per-round ratios: > 1 means cryptfuse is faster. RSS: peak "
        "(median over rounds); CPU: user+system.",
        "",
        "| resilience | tool | hot zone | s/GiB | cryptsetup / this | peak RSS (MiB) | CPU s/GiB |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for mode in res.modes:
        ref = res.runs.get((mode, base), [])
        for c in res.contenders:
            runs = res.runs.get((mode, c.name))
            if not runs:
                continue
            wall = statistics.median(r.wall for r in runs)
            rss = statistics.median(r.rss for r in runs)
            cpu = statistics.median(r.cpu for r in runs)
            rs = [a.wall / b.wall for a, b in zip(ref, runs, strict=False)]
            rel = "–" if c.name == base else ratio(rs)
            lines.append(
                f"| {mode} | {c.name} | {c.hotzone.get(mode, '?')} | "
                f"{per_gib(wall, res.size):.2f} | {rel} | {rss / MiB:.0f} | "
                f"{per_gib(cpu, res.size):.2f} |"
            )
    if res.profile:
        cats = [k for k in next(iter(res.profile.values())) if k != "total"]
        lines += [
            "",
            "cryptfuse under cProfile (one extra run per mode, own time per category, s/GiB):",
            "",
            "| category | " + " | ".join(res.profile) + " |",
            "|---|" + "--:|" * len(res.profile),
        ]
        for cat in sorted(cats, key=lambda k: -max(p.get(k, 0.0) for p in res.profile.values())):
            cells = [f"{per_gib(p.get(cat, 0.0), res.size):.2f}" for p in res.profile.values()]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        cells = [f"{per_gib(p['total'], res.size):.2f}" for p in res.profile.values()]
        lines.append("| total profiled | " + " | ".join(cells) + " |")
    if res.notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in res.notes)]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    git = first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first(["git", "-C", str(REPO), "status", "--porcelain", "cryptfuse"])
    return {
        "cryptfuse": f"git {git}" + (" (cryptfuse/ modified)" if dirty not in ("?", "") else ""),
        "cryptsetup": first(["cryptsetup", "--version"]),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "cpus": str(os.cpu_count()),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size", type=parse_size, default=GiB, help="data area size (1G)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument(
        "--modes", default=",".join(MODES), help="resilience modes, comma-separated (all)"
    )
    p.add_argument(
        "--big-hotzone",
        type=lambda s: 0 if s == "0" else parse_size(s),
        default=GiB,
        help="also run cryptfuse with this --hotzone-size for checksum and none (1G; 0: no)",
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another contender: COMMAND stands for `python -m cryptfuse` (a modified "
        "cryptfuse, e.g. a prototype); repeatable",
    )
    p.add_argument("--profile", action="store_true", help="one cProfile'd cryptfuse run per mode")
    p.add_argument("--workdir", default="/var/tmp", help="where the containers go (/var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--output", help="also write the Markdown report here")
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: some of {', '.join(MODES)}")
    args.modes = modes
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    return args


@contextlib.contextmanager
def scratch(workdir: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cryptfuse-reencrypt-", dir=workdir))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--online" in argv:  # the online benchmark: bench/reencrypt_online.py
        import reencrypt_online

        return reencrypt_online.main(argv)
    args = parse_args(argv)
    for tool in ("cryptsetup", TIME):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install cryptsetup-bin time)", file=sys.stderr)
            return 2
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    with scratch(args.workdir, args.keep) as work:
        key = str(work / "passphrase")
        with open(key, "w") as f:
            f.write(os.urandom(24).hex())
        res = Results(
            args.size, args.rounds, contenders(key, args.big_hotzone, args.also), args.modes
        )
        if os.geteuid() != 0:
            res.notes.append("not root: page cache not dropped between runs (os.sync only)")
        try:
            for rnd in range(args.rounds):
                one_round(res, rnd, work, key)
            if args.profile:
                for mode in args.modes:
                    profile_run(res, mode, work, key, args.size)
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
