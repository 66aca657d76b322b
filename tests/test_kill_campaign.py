"""Kill campaign: ``kill -9`` of the daemon at random moments under ext4 workloads.

One LUKS2 container (cryptsetup-made), ext4 on a loop device over the mounted
volume.  Each iteration runs one workload of ``tests/kill_workload.py`` (many small
files each fsync'd with their directory plus atomic replaces; large sequential
writes fsync'd every 4 MiB; ``rm -rf`` of earlier trees with a syncfs after each)
and SIGKILLs the daemon at a random moment of it.  Then: the dead stack is torn
down (ext4 unmounted, the loop device detached, the FUSE mount lazily unmounted:
the connection died with the daemon, everything answers ENOTCONN/EIO), a new daemon
mounts the container, ext4 is mounted (journal replay) and every promise the
workload logged is checked:

* every fsync that returned -- before the kill was sent, and also after it (the
  daemon may still have answered it) -- is intact: the file exists and its first
  ``len`` bytes hash as logged (exactly that size for small files);
* a file being replaced holds its old or its new content, never a mix;
* a file being removed is either gone or intact; one removed and synced is gone;
* every file on the volume reads without error;

and after unmounting, ``e2fsck -fn`` reports a clean file system.  The model carries
over: files of earlier iterations are checked again every time.

``make test`` runs two iterations (``KILL_ITERATIONS``); ``make
test-kill`` runs the campaign (50).  The seed is printed; ``KILL_SEED`` repeats a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_e2e_mount import (  # noqa: F401 - fixtures
    Cryptfuse,
    Stack,
    cf,
    daemon_pids,
    losetup,
    mount_fs,
    need,
    sh,
    stack,
)

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
PASS = b"kill-campaign"
WORKLOAD = Path(__file__).with_name("kill_workload.py")
KINDS = ("small", "big", "rm")


@dataclass
class Expect:
    """What a file may look like after a crash."""

    #: allowed (length, sha256) of the file's first *length* bytes
    contents: set[tuple[int, str]] = field(default_factory=set)
    may_be_absent: bool = False
    must_be_absent: bool = False
    #: the promise came from an fsync that returned before the kill was sent
    before_kill: bool = True


def apply_log(model: dict[str, Expect], log: Path, killed_at: float) -> int:
    """Fold the workload's promises into *model*; returns how many fsyncs returned
    before the kill."""
    before = 0
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        name, op = rec["name"], rec["op"]
        early = rec["t"] < killed_at
        if op == "durable":
            model[name] = Expect({(rec["len"], rec["sha"])}, before_kill=early)
            before += early
        elif op == "replacing":
            model.setdefault(name, Expect()).contents.add((rec["len"], rec["sha"]))
        elif op == "removing":
            model.setdefault(name, Expect()).may_be_absent = True
        elif op == "removed":
            model[name] = Expect(may_be_absent=True, must_be_absent=True, before_kill=early)
            before += early
    log.unlink()
    return before


def check_and_settle(root: Path, model: dict[str, Expect], iteration: int) -> None:
    """Check *root* against *model*, then make the model what is there now (and remove
    the files no promise covers: half-written, never fsync'd)."""
    for name, expect in sorted(model.items()):
        path = root / name
        when = "before" if expect.before_kill else "after"
        where = (
            f"iteration {iteration}: {name} (promised by an fsync that returned {when} the kill)"
        )
        if not path.exists():
            assert expect.may_be_absent, f"{where}: lost"
            del model[name]
            continue
        assert not expect.must_be_absent, f"{where}: removed and synced, but back"
        data = path.read_bytes()
        exact = not name.startswith("big-")
        ok = [
            (n, h)
            for n, h in expect.contents
            if (len(data) == n if exact else len(data) >= n)
            and hashlib.sha256(data[:n]).hexdigest() == h
        ]
        assert ok, f"{where}: content differs (size {len(data)})"
        model[name] = Expect({ok[0]})
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name == "lost+found" or name.startswith("lost+found/") or not path.is_file():
            continue
        path.read_bytes()  # every file reads back without an I/O error
        if name not in model:
            path.unlink()
    sh("sync", "-f", root)


def wait_dead(pids: list[int], timeout: float = 15.0) -> bool:
    """Until every process of *pids* is gone or a zombie: dead, its descriptors closed
    (the FUSE connection with them).  The daemon's parent exited long ago, and whoever
    reaps orphans here (PID 1 of a container) may take a second or two."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            try:
                states.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                states.append("gone")
        if all(state in ("gone", "Z", "X") for state in states):
            return True
        time.sleep(0.01)
    return False


def mounted(path: Path) -> bool:
    """Whether *path* is a mount point (by the mount table: works for dead FUSE mounts)."""
    target = os.fsencode(str(path)).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def lazy_unmount_all(*paths: Path) -> None:
    """Safety net for a failed test: whatever is still mounted there goes (lazily)."""
    for path in paths:
        while mounted(path):
            if subprocess.run(["umount", "-l", str(path)], check=False).returncode:
                break


@dataclass
class Rig:
    cf: Cryptfuse
    stack: Stack
    img: Path
    key: Path
    mnt: Path
    ext: Path
    pids: list[int] = field(default_factory=list)
    loop: str = ""

    def up(self, mkfs: bool = False) -> None:
        """Daemon, loop device, ext4 (a mount replays the journal)."""
        self.pids = self.cf.mount("--key-file", self.key, self.img, mountpoint=self.mnt, input=b"")
        self.loop = losetup(self.stack, self.mnt / "volume")
        if mkfs:
            sh("mkfs.ext4", "-q", "-F", "-b", "4096", self.loop)
        mount_fs(self.stack, self.loop, self.ext)

    def down_clean(self) -> None:
        """Unmount ext4, fsck it, leave the loop device and the daemon up."""
        self.stack.pop(f"mount {self.ext}")
        fsck = sh("e2fsck", "-fn", self.loop, check=False)
        assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()

    def down_dead(self) -> None:
        """After the kill: ext4, the loop device and the FUSE mount over a dead daemon.

        A dead FUSE mount answers ENOTCONN, so os.path.ismount() says False: the
        mount table is what tells."""
        self.stack.pop(f"mount {self.ext}")  # plain umount: ext4 reports the I/O errors
        if mounted(self.ext):
            sh("umount", "-l", self.ext)
        self.stack.pop(f"loop {self.loop}")
        sh("fusermount3", "-u", "-z", self.mnt)
        self.stack.pop(f"fuse {self.mnt}")  # nothing left but the bookkeeping
        assert not mounted(self.mnt) and not mounted(self.ext)


def run_iteration(
    rig: Rig, model: dict[str, Expect], i: int, rng: random.Random
) -> dict[str, object]:
    kind = KINDS[i % len(KINDS)]
    log = rig.ext.parent / f"promises-{i}.jsonl"
    work = subprocess.Popen(
        [sys.executable, str(WORKLOAD), kind, str(rig.ext), str(log),
         str(rng.randrange(1 << 30)), str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert work.stdout is not None
    assert work.stdout.readline() == b"started\n", work.stderr.read() if work.stderr else b""
    time.sleep(rng.uniform(0.05, 1.0))
    running = work.poll() is None
    killed_at = time.monotonic()
    for pid in rig.pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_dead(rig.pids)
    try:
        work.wait(60)
    except subprocess.TimeoutExpired:  # pragma: no cover - would be a kernel hang
        work.kill()
        work.wait()
        raise AssertionError(f"iteration {i}: the workload hung after the kill") from None
    rig.down_dead()
    before = apply_log(model, log, killed_at) if log.exists() else 0
    rig.up()
    check_and_settle(rig.ext, model, i)
    rig.down_clean()
    mount_fs(rig.stack, rig.loop, rig.ext)
    return {"kind": kind, "mid_workload": running, "fsyncs_before_kill": before}


def test_kill_campaign(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    need("cryptsetup", "losetup", "mkfs.ext4", "e2fsck")
    # under make test-sanitize (everything 3-5 times slower) one kill shows the C code
    # survives it; the campaign is make test-kill's
    default = "1" if os.environ.get("CRYPTFUSE_SANITIZER") else "2"
    iterations = int(os.environ.get("KILL_ITERATIONS", default))
    seed = int(os.environ.get("KILL_SEED", str(random.randrange(1 << 30))))
    print(f"kill campaign: {iterations} iterations, KILL_SEED={seed}")
    rng = random.Random(seed)
    img, key = tmp_path / "c.img", tmp_path / "pass"
    key.write_bytes(PASS)
    with open(img, "wb") as f:
        f.truncate(65 * MiB)
    sh(
        "cryptsetup", "luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, "--offset", "2048",
        "--luks2-keyslots-size", "960k", img,
    )  # fmt: skip
    (tmp_path / "mnt").mkdir()
    stack.push("safety net", lambda: lazy_unmount_all(tmp_path / "ext", tmp_path / "mnt"))
    rig = Rig(cf, stack, img, key, tmp_path / "mnt", tmp_path / "ext")
    rig.up(mkfs=True)
    model: dict[str, Expect] = {}
    results = []
    start = time.monotonic()
    for i in range(iterations):
        results.append(run_iteration(rig, model, i, rng))
    mid = sum(bool(r["mid_workload"]) for r in results)
    promised = sum(int(str(r["fsyncs_before_kill"])) for r in results)
    print(
        f"kill campaign: {iterations} kills ({mid} in the middle of a workload), "
        f"{promised} fsyncs returned before a kill, all intact; "
        f"{len(model)} files on the volume at the end; {time.monotonic() - start:.0f} s"
    )
    assert mid >= iterations // 2, "most kills should land while the workload runs"
    rig.down_clean()
    with contextlib.suppress(KeyError):
        stack.pop(f"loop {rig.loop}")
    cf.unmount(rig.mnt, rig.pids)
