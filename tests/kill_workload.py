"""A file system workload for the kill campaign (tests/test_kill_campaign.py).

Run as ``python kill_workload.py KIND ROOT LOG SEED TAG``; it works in ROOT (an ext4
mount over a cryptfuse volume) until it is killed or an I/O error stops it (the
daemon underneath was killed).  Every promise it can make is appended to LOG as one
JSON line, written only *after* the fsync that makes it true returned, with the
CLOCK_MONOTONIC time at which it returned (``t``):

* ``{"op": "durable", "name": N, "len": L, "sha": H}``: the first L bytes of file N
  hash to H (N may be longer: a sequential write goes on);
* ``{"op": "replacing", "name": N, "len": L, "sha": H}`` (logged *before* the
  rename): from now on N holds either its old content or this new one;
* ``{"op": "removing", "name": N}`` (before the unlink): N may vanish from now on;
* ``{"op": "removed", "name": N}`` (after the directory's fsync): N is gone.

KIND is ``small`` (many small files, each fsync'd with its directory, and now and
then an atomic replace: write a temporary file, fsync, rename, fsync the
directory), ``big`` (sequential 1 MiB writes, fsync every 4 MiB) or ``rm``
(``rm -rf`` of the trees of earlier iterations, one at a time, each followed by a
syncfs; then it rewrites and fsyncs a small file until it is stopped).  It writes
``started`` to stdout when its first write is under way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, op: str, name: str, **fields: object) -> None:
        record = {"op": op, "name": name, "t": time.monotonic(), **fields}
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def room(root: Path, need: int) -> bool:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize > need + 8 * MiB


def started() -> None:
    print("started", flush=True)


def small(root: Path, log: Log, rng: random.Random, tag: str) -> None:
    top = root / f"small-{tag}"
    top.mkdir()
    fsync_path(root)
    started()
    made: list[str] = []
    for j in range(1_000_000):
        data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 20_000, 65_536]))
        if not room(root, len(data)):
            time.sleep(0.01)
            continue
        if made and j % 5 == 4:  # an atomic replace of an earlier file
            name = rng.choice(made)
            tmp = top / f"tmp{j}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            log("replacing", name, len=len(data), sha=hashlib.sha256(data).hexdigest())
            os.rename(tmp, root / name)
            fsync_path(top)
            log("durable", name, len=len(data), sha=hashlib.sha256(data).hexdigest())
            continue
        name = f"small-{tag}/f{j}"
        with open(root / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(top)
        log("durable", name, len=len(data), sha=hashlib.sha256(data).hexdigest())
        made.append(name)


def big(root: Path, log: Log, rng: random.Random, tag: str) -> None:
    started_once = False
    for k in range(1_000_000):
        name = f"big-{tag}-{k}"
        digest = hashlib.sha256()
        with open(root / name, "wb") as f:
            if not started_once:
                started()
                started_once = True
            fsync_path(root)
            for chunk in range(16):
                if not room(root, MiB):
                    break
                data = rng.randbytes(MiB)
                f.write(data)
                digest.update(data)
                if chunk % 4 == 3:
                    f.flush()
                    os.fsync(f.fileno())
                    log("durable", name, len=(chunk + 1) * MiB, sha=digest.hexdigest())
        if not room(root, MiB):
            time.sleep(0.05)


def rm(root: Path, log: Log, rng: random.Random, tag: str) -> None:
    trees = sorted(p for p in root.iterdir() if p.name != "lost+found")
    rng.shuffle(trees)
    started()
    for tree in trees:
        names = [str(p.relative_to(root)) for p in [tree, *tree.rglob("*")] if p.is_file()]
        for name in names:
            log("removing", name)
        subprocess.run(["rm", "-rf", "--", str(tree)], check=True)
        subprocess.run(["sync", "-f", str(root)], check=True)
        for name in names:
            log("removed", name)
    # nothing left to remove: keep the file system busy (and notice the kill)
    heartbeat = root / f"heartbeat-{tag}"
    for n in range(1_000_000):
        with open(heartbeat, "wb") as f:
            f.write(str(n).encode())
            f.flush()
            os.fsync(f.fileno())
        time.sleep(0.01)


def main() -> None:
    kind, root, log_path, seed, tag = sys.argv[1:6]
    work = {"small": small, "big": big, "rm": rm}[kind]
    try:
        work(Path(root), Log(log_path), random.Random(int(seed)), tag)
    except (OSError, subprocess.CalledProcessError) as exc:
        # the daemon underneath died: EIO, ENOTCONN, EROFS ... end quietly
        print(f"stopped: {exc}", flush=True)


if __name__ == "__main__":
    main()
