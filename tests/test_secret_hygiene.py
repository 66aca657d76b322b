"""Secret hygiene: where the volume key may and may not be (issue 17, part 6).

Checked, each for real:

* ``hygiene.protect_process`` (every command calls it before reading a passphrase):
  the process is not dumpable, its (soft) core limit is 0; another process of the *same*
  user cannot read its ``/proc/PID/environ`` (the kernel's ptrace "read" check)
  while it can read an unprotected sibling's; a protected process killed by SIGSEGV
  leaves no core file even with its core limit raised again, while a shell does
  (the control);
* the C data path keeps the keys in one page that is locked (``VmLck``, the
  mapping's ``lo`` flag) and left out of core dumps (``dd``), and after
  ``close()`` plus the release of the workers no 16-byte piece of the key is left
  anywhere in the process's readable memory (found there before: the scan works);
* the real daemon (root + FUSE): a locked page (``VmLck`` > 0 after the fork), core
  limit 0, no core file after SIGSEGV with the limit raised by prlimit, and the volume
  key (raw, hex either case, base64, either XTS half) and the passphrase are in
  none of: its ``--debug`` log, its ``/proc/PID/cmdline`` and ``environ``, the
  command's stderr, including the one-line error and the ``--debug`` traceback of
  a refused second mount.
"""

from __future__ import annotations

import base64
import ctypes
import gc
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_mount import Cryptfuse, cf, daemon_pids, need, sh, stack  # noqa: F401 - fixtures

from cryptfuse import _fastpath
from cryptfuse.hygiene import PR_SET_DUMPABLE, is_dumpable, protect_process

NOBODY = 65534

#: The sanitizer runtimes (make test-sanitize/test-tsan) intercept mlock() and make it a
#: no-op that returns 0: nothing is locked then, and the tests do not look for it.
MLOCK_WORKS = not os.environ.get("CRYPTFUSE_SANITIZER")


def vm_locked_kib(pid: int | str = "self") -> int:
    match = re.search(r"^VmLck:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


def mappings(pid: int | str = "self") -> Iterator[tuple[int, int, str, set[str]]]:
    """(start, end, permissions, VmFlags) of every mapping, from smaps."""
    current: list[object] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ", line)
        if head:
            current = [int(head.group(1), 16), int(head.group(2), 16), head.group(3)]
        elif line.startswith("VmFlags:") and current is not None:
            start, end, perms = current
            assert isinstance(start, int) and isinstance(end, int) and isinstance(perms, str)
            yield start, end, perms, set(line.split()[1:])
            current = None


def address_of(buf: bytearray) -> tuple[int, int]:
    """[start, end) of *buf*'s storage."""
    start = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return start, start + len(buf)


def find_in_memory(needles: list[bytearray]) -> list[list[tuple[int, set[str]]]]:
    """Every place in this process's readable memory holding one of *needles*, except
    the needles' own buffers: for each needle, [(address, the mapping's VmFlags)].

    Reads through /proc/self/mem into one reused buffer (whose own range is not
    reported either), so the scan itself leaves no copies behind.  Huge mappings
    (sanitizer shadows) are skipped: reading them would fault in gigabytes.
    """
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    own = [address_of(n) for n in needles] + [address_of(chunk)]
    overlap = max(len(n) for n in needles) - 1
    found: list[list[tuple[int, set[str]]]] = [[] for _ in needles]
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for start, end, perms, flags in list(mappings()):
            if not perms.startswith("r") or end - start > 256 << 20 or "io" in flags:
                continue
            pos = start
            while pos < end:
                try:
                    mem.seek(pos)
                    got = mem.readinto(view[: min(len(chunk), end - pos)])
                except OSError:
                    break
                if not got:
                    break
                for i, needle in enumerate(needles):
                    at = chunk.find(needle, 0, got)
                    while at >= 0:
                        where = pos + at
                        if not any(lo <= where < hi for lo, hi in own):
                            found[i].append((where, flags))
                        at = chunk.find(needle, at + 1, got)
                pos += got - overlap if got > overlap and pos + got < end else got
    view.release()
    return found


# -- protect_process ---------------------------------------------------------------------


def set_dumpable(value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(value), 0, 0, 0) == 0


def _in_child(protect: bool, body_fd: int) -> None:
    """Forked: become the target, report ready on *body_fd*, then wait to be killed."""
    if protect:
        protect_process()
    else:
        # setuid() in our parent made it (and so us) undumpable: an ordinary
        # process of that user is dumpable
        set_dumpable(1)
    os.write(body_fd, b"r")
    while True:
        time.sleep(60)


def _same_user_reads_environ(protect: bool) -> bool:
    """Fork a target (protected or not) and, as the same non-root user in a sibling
    position (its parent), try to read the target's /proc/PID/environ."""
    result_r, result_w = os.pipe()
    prober = os.fork()
    if prober == 0:  # the probing user
        code = 2
        try:
            os.close(result_r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            ready_r, ready_w = os.pipe()
            target = os.fork()
            if target == 0:
                os.close(ready_r)
                _in_child(protect, ready_w)
            os.close(ready_w)
            assert os.read(ready_r, 1) == b"r"
            try:
                with open(f"/proc/{target}/environ", "rb") as f:
                    f.read()
                code = 0
            except PermissionError:
                code = 1
            os.kill(target, signal.SIGKILL)
            os.waitpid(target, 0)
        finally:
            os.write(result_w, bytes([code]))
            os._exit(0)
    os.close(result_w)
    answer = os.read(result_r, 1)
    os.close(result_r)
    os.waitpid(prober, 0)
    assert answer in (b"\0", b"\1"), "the probe failed"
    return answer == b"\0"


def test_protect_process_refuses_same_user_inspection() -> None:
    if not _same_user_reads_environ(protect=False):
        pytest.skip("this kernel refuses same-user /proc access even to dumpable processes")
    assert not _same_user_reads_environ(protect=True)


def test_protect_process_flags_in_a_child() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            set_dumpable(1)  # an in-process CLI test may have protected pytest already
            before = is_dumpable()
            protect_process()
            protect_process()  # idempotent
            ok = before and not is_dumpable() and resource.getrlimit(resource.RLIMIT_CORE)[0] == 0
        finally:
            os.write(write_end, b"y" if ok else b"n")
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"y"


def core_files(where: Path, pid: int) -> list[Path]:
    return [p for p in (where / "core", where / f"core.{pid}") if p.exists()]


def relative_core_pattern() -> None:
    """Skip unless the kernel writes cores as ``core``/``core.PID`` in the cwd."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern not in ("core", "core.%p"):
        pytest.skip(f"core_pattern is {pattern!r}: cannot look for the core file")


def cores_are_written(tmp_path: Path) -> None:
    """Skip unless a shell killed by SIGSEGV leaves a core file in its cwd (the
    control: then a missing core file means something)."""
    if os.environ.get("CRYPTFUSE_SANITIZER"):
        # the preloaded runtime (inherited by every child) reports SIGSEGV itself
        pytest.skip("a sanitizer runtime turns SIGSEGV into a report, not a core file")
    relative_core_pattern()
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != resource.RLIM_INFINITY:
        pytest.skip("the hard core-size limit is not unlimited here")
    control = subprocess.run(
        ["sh", "-c", "ulimit -c unlimited; kill -SEGV $$"], cwd=tmp_path, check=False
    )
    assert control.returncode == -signal.SIGSEGV
    if not list(tmp_path.glob("core*")):
        pytest.skip("the kernel writes no core file for an ordinary process here")
    for core in tmp_path.glob("core*"):
        core.unlink()


def test_protected_process_leaves_no_core_file_whatever_the_limit(tmp_path: Path) -> None:
    """protect_process sets two locks; with the soft core limit raised again (any
    process may, up to the hard limit), the dumpable flag alone still holds."""
    cores_are_written(tmp_path)
    script = (
        "import os, resource, signal\n"
        "from cryptfuse.hygiene import protect_process\n"
        "protect_process()\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=False)
    assert proc.returncode == -signal.SIGSEGV
    assert not list(tmp_path.glob("core*"))


# -- the C data path's key page ----------------------------------------------------------


def random_key(n: int) -> bytearray:
    """A key read straight into its buffer: no other copy is ever made in Python."""
    key = bytearray(n)
    fd = os.open("/dev/urandom", os.O_RDONLY)
    try:
        assert os.readv(fd, [key]) == n
    finally:
        os.close(fd)
    return key


def test_fast_path_keys_locked_and_wiped() -> None:
    key, essiv = random_key(64), random_key(32)
    # 16-byte pieces (AES round key 0 is the key itself: an expanded schedule holds
    # them too), copied without Python temporaries
    pieces = [bytearray(memoryview(key)[i : i + 16]) for i in range(0, 64, 16)]
    pieces += [bytearray(memoryview(essiv)[i : i + 16]) for i in range(0, 32, 16)]
    gc.collect()  # FastVolumes other tests left for the collector: freed (unlocked) now
    locked_before = vm_locked_kib()
    fast = _fastpath.FastVolume(
        fd=-1, data_offset=0, size=1 << 20, sector_size=512, readonly=True,
        mode=_fastpath.MODE_XTS, key=key, iv_offset=0, iv_shift=0,
        ivmode=_fastpath.IV_PLAIN64, lock=_fastpath.RangeLock(),
    )  # fmt: skip
    cbc = _fastpath.FastVolume(
        fd=-1, data_offset=0, size=1 << 20, sector_size=512, readonly=True,
        mode=_fastpath.MODE_CBC, key=essiv, iv_offset=0, iv_shift=0,
        ivmode=_fastpath.IV_ESSIV, lock=_fastpath.RangeLock(), essiv_key=essiv,
    )  # fmt: skip
    key[:] = bytes(64)
    essiv[:] = bytes(32)
    assert fast.key_locked and cbc.key_locked
    assert vm_locked_kib() >= locked_before + 8 or not MLOCK_WORKS
    worker = fast.worker()  # OpenSSL contexts: the expanded keys, on OpenSSL's heap
    assert worker.encrypt(bytes(512), 0) != bytes(512)
    cbc_worker = cbc.worker()
    cbc_worker.encrypt(bytes(512), 0)
    for piece, hits in zip(pieces, find_in_memory(pieces), strict=True):
        # the scan finds them, and one place is the locked, not-dumped key page
        wanted = {"lo", "dd"} if MLOCK_WORKS else {"dd"}
        assert any(wanted <= flags for _, flags in hits), piece.hex()
    fast.close()
    cbc.close()
    late = fast.worker()  # made after close(): no keys to make contexts from
    with pytest.raises(RuntimeError):
        late.encrypt(bytes(512), 0)
    del worker, cbc_worker, late, fast, cbc
    gc.collect()
    for piece, hits in zip(pieces, find_in_memory(pieces), strict=True):
        assert not hits, f"key piece {piece.hex()} still at {[hex(a) for a, _ in hits]}"
    assert vm_locked_kib() == locked_before


# -- the real daemon -----------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.fuse
def test_daemon_hides_the_volume_key(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixture
    need("cryptsetup")
    volume_key = os.urandom(64)
    passphrase = b"hygiene-passphrase-" + os.urandom(8).hex().encode()
    key_file, pass_file = tmp_path / "vk", tmp_path / "pass"
    key_file.write_bytes(volume_key)
    pass_file.write_bytes(passphrase)
    img = tmp_path / "c.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)  # the data area starts at 16 MiB
    sh(
        "cryptsetup", "luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", pass_file,
        "--volume-key-file", key_file, "--key-size", "512", img,
    )  # fmt: skip
    key_file.unlink()
    forms = {
        "raw": volume_key,
        "hex": volume_key.hex().encode(),
        "HEX": volume_key.hex().upper().encode(),
        "base64": base64.b64encode(volume_key),
        "half1-hex": volume_key[:32].hex().encode(),
        "half2-hex": volume_key[32:].hex().encode(),
        "half1": volume_key[:32],
        "half2": volume_key[32:],
        "passphrase": passphrase,
    }

    def leaks(blob: bytes) -> list[str]:
        return [name for name, form in forms.items() if form in blob or form.lower() in blob]

    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    # cf.mount's steps, keeping the command's stderr (its log before the fork)
    cf.stack.push(f"fuse {mnt}", lambda: cf._force_unmount(mnt))
    first = cf.run("--debug", "--log-file", log, img, mnt, input=passphrase + b"\n")
    assert first.returncode == 0, first.stderr.decode()
    assert b"DEBUG" in first.stderr
    pids = daemon_pids(mnt)
    assert len(pids) == 1
    pid = pids[0]
    volume = mnt / "volume"
    with open(volume, "r+b") as f:  # the C path (aligned) and the Python path (unaligned)
        f.write(os.urandom(1 << 20))
        f.seek(12345)
        f.write(b"unaligned")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.read(1 << 20)
    with pytest.raises(OSError):  # an error the daemon logs
        os.truncate(volume, 1)
    # a refused second mount, with --debug (traceback on stderr)
    other = tmp_path / "other"
    other.mkdir()
    second = cf.run("--debug", "--key-file", pass_file, img, other)
    assert second.returncode != 0

    status = Path(f"/proc/{pid}/status").read_text()
    locked = re.search(r"^VmLck:\s+(\d+)", status, re.M)
    assert locked is not None and (int(locked.group(1)) >= 4 or not MLOCK_WORKS)
    core = [ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if "core" in ln]
    assert core and core[0].split()[4] == "0", core  # the soft limit
    assert not leaks(Path(f"/proc/{pid}/cmdline").read_bytes())
    assert not leaks(Path(f"/proc/{pid}/environ").read_bytes())
    assert not leaks(second.stdout + second.stderr), second.stderr.decode()
    cf.unmount(mnt, pids)
    text = log.read_bytes()
    assert b"DEBUG" in text
    assert not leaks(text)
    assert not leaks(first.stderr)


@pytest.mark.root
@pytest.mark.fuse
def test_daemon_leaves_no_core_file(cf: Cryptfuse, tmp_path: Path) -> None:  # noqa: F811 - fixture
    """The real daemon is undumpable: with its core limit raised from outside (prlimit)
    and killed by SIGSEGV, it leaves no core file in its working directory (``/``).
    Root passes every ptrace check, so this is how a root test can see the flag."""
    cores_are_written(tmp_path)
    container, mnt = tmp_path / "plain.img", tmp_path / "mnt"
    with open(container, "wb") as f:
        f.truncate(1 << 20)
    mnt.mkdir()
    pids = cf.mount(
        "--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-h", "sha256", container,
        mountpoint=mnt, input=b"core\n",
    )  # fmt: skip
    assert len(pids) == 1
    pid = pids[0]
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
    cores = [Path("/core"), Path(f"/core.{pid}")]
    assert not any(c.exists() for c in cores), "a core file is already in /"
    hard = resource.prlimit(pid, resource.RLIMIT_CORE)[1]
    resource.prlimit(pid, resource.RLIMIT_CORE, (hard, hard))
    os.kill(pid, signal.SIGSEGV)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and Path(f"/proc/{pid}/cwd").exists():
        time.sleep(0.05)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)  # a dead mount
    left = [c for c in cores if c.exists()]
    for c in left:
        c.unlink()
    assert not left, "the daemon dumped core"
