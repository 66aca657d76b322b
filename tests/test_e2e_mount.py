"""End to end: the daemon mounts a container, the kernel loop-mounts ext4 in it.

Needs root, /dev/fuse, losetup, mkfs.ext4, fsck.ext4 (and cryptsetup for LUKS).
Every mount, loop device and daemon is torn down in the right order (ext4,
loop, FUSE, daemon) by the ``stack`` fixture even when a test fails.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
PLAIN = ["--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-h", "sha256"]
PASSPHRASE = b"correct horse battery staple"
MARKER = b"cryptfuse-e2e-plaintext-marker-" * 64


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def sh(
    *args: object, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(a) for a in args], input=input, capture_output=True, check=check, timeout=120
    )


def daemon_pids(mountpoint: Path) -> list[int]:
    """The cryptfuse processes serving *mountpoint* (found by their command line)."""
    pids = []
    needle = os.fsencode(str(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"cryptfuse" in b" ".join(argv) and needle in argv:
            pids.append(int(entry))
    return pids


def wait_gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            return True
        time.sleep(0.05)
    return False


class Stack:
    """Cleanup actions run last-in first-out; failures there never hide the test's."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.actions.append((what, action))

    def pop(self, what: str) -> None:
        """Run the cleanup named *what* now (the normal, checked teardown path)."""
        for i in range(len(self.actions) - 1, -1, -1):
            if self.actions[i][0] == what:
                _, action = self.actions.pop(i)
                action()
                return
        raise KeyError(what)

    def close(self) -> None:
        while self.actions:
            _, action = self.actions.pop()
            try:
                action()
            except Exception as exc:  # keep cleaning up
                print(f"cleanup failed: {exc}", file=sys.stderr)


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


class Cryptfuse:
    """Runs the CLI and registers the cleanups of what it mounts."""

    def __init__(self, stack: Stack, env: dict[str, str], repo: Path) -> None:
        self.stack = stack
        self.env = env
        self.repo = repo

    def run(self, *args: object, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "cryptfuse", *map(str, args)],
            input=input,
            capture_output=True,
            env=self.env,
            cwd=self.repo,
            timeout=120,
        )

    def mount(
        self, *args: object, mountpoint: Path, input: bytes = PASSPHRASE + b"\n"
    ) -> list[int]:
        """Mount in daemon mode; returns the daemon's pid(s)."""
        self.stack.push(f"fuse {mountpoint}", lambda: self._force_unmount(mountpoint))
        result = self.run(*args, mountpoint, input=input)
        assert result.returncode == 0, result.stderr.decode()
        # The command returns only once the mount is ready.
        assert os.path.ismount(mountpoint)
        pids = daemon_pids(mountpoint)
        assert pids, "no daemon process found"
        return pids

    @staticmethod
    def _force_unmount(mountpoint: Path) -> None:
        pids = daemon_pids(mountpoint)
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_gone(pids)

    def unmount(self, mountpoint: Path, pids: list[int]) -> None:
        """The user's way out: fusermount3 -u, then the daemon must exit by itself."""
        self.stack.actions = [a for a in self.stack.actions if a[0] != f"fuse {mountpoint}"]
        try:
            sh("fusermount3", "-u", mountpoint)
            assert wait_gone(pids), "daemon still running after fusermount3 -u"
        finally:
            self._force_unmount(mountpoint)
        assert not os.path.ismount(mountpoint)


@pytest.fixture
def cf(stack: Stack, cli_env: dict[str, str], repo: Path) -> Cryptfuse:
    return Cryptfuse(stack, cli_env, repo)


def losetup(stack: Stack, path: Path, *options: str) -> str:
    loop = sh("losetup", "-f", "--show", *options, path).stdout.decode().strip()

    def detach() -> None:
        sh("losetup", "-d", loop, check=False)

    stack.push(f"loop {loop}", detach)
    return loop


def mount_fs(stack: Stack, source: str | Path, target: Path, *options: str) -> None:
    target.mkdir(exist_ok=True)
    sh("mount", *options, source, target)

    def umount() -> None:
        sh("umount", target, check=False)

    stack.push(f"mount {target}", umount)


def write_files(root: Path) -> dict[str, str]:
    files = {
        "hello.txt": b"hello, world\n",
        "marker.bin": MARKER,
        "random.bin": os.urandom(3 * MiB + 123),
    }
    (root / "sub").mkdir()
    files["sub/odd.bin"] = os.urandom(4097)
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.sync()
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def check_files(root: Path, expected: dict[str, str]) -> None:
    for name, digest in expected.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def roundtrip(
    cf: Cryptfuse, stack: Stack, tmp_path: Path, container: Path, options: list[str], input: bytes
) -> None:
    """mount, losetup, mkfs.ext4, write, tear down, remount, fsck, mount -o loop, check."""
    need("losetup", "mkfs.ext4", "fsck.ext4")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ext = tmp_path / "ext"
    pids = cf.mount(*options, container, mountpoint=mnt, input=input)
    source = sh("findmnt", "-n", "-o", "SOURCE", mnt).stdout.decode().strip()
    assert source == f"cryptfuse:{container}"
    volume = mnt / "volume"
    entries = os.listdir(mnt)
    assert entries == ["volume"]
    st = volume.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()

    loop = losetup(stack, volume)
    sh("mkfs.ext4", "-q", "-F", loop)
    mount_fs(stack, loop, ext)
    expected = write_files(ext)
    stack.pop(f"mount {ext}")
    stack.pop(f"loop {loop}")
    cf.unmount(mnt, pids)
    assert MARKER[:64] not in container.read_bytes(), "plaintext reached the container"

    pids = cf.mount(*options, container, mountpoint=mnt, input=input)
    fsck = sh("fsck.ext4", "-n", "-f", volume, check=False)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    mount_fs(stack, volume, ext, "-o", "loop")
    check_files(ext, expected)
    (ext / "second.txt").write_text("written through mount -o loop\n")
    stack.pop(f"mount {ext}")  # umount also detaches the automatic loop device
    cf.unmount(mnt, pids)

    pids = cf.mount(*options, "--readonly", container, mountpoint=mnt, input=input)
    mount_fs(stack, volume, ext, "-o", "loop,ro")
    check_files(ext, expected)
    assert (ext / "second.txt").read_text() == "written through mount -o loop\n"
    stack.pop(f"mount {ext}")
    cf.unmount(mnt, pids)


def _plain_container_and_mountpoint(tmp_path: Path) -> tuple[Path, Path]:
    """An empty 4 MiB container (plain mode needs no header) and an empty mountpoint."""
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(4 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return container, mnt


def test_plain_ext4_roundtrip(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(64 * MiB)
    roundtrip(cf, stack, tmp_path, container, PLAIN, PASSPHRASE + b"\n")


def luks_format(kind: str, container: Path, *extra: object) -> None:
    """A LUKS container with a cheap KDF (the suite stays fast)."""
    pytest.importorskip(f"cryptfuse.formats.{kind}")
    need("cryptsetup")
    sh(
        "cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", "-", *extra, container,
        input=PASSPHRASE,
    )  # fmt: skip


def data_offset(container: Path) -> int:
    """Bytes before the data area (LUKS1 payloadOffset / LUKS2 segment 0 offset)."""
    dump = sh("cryptsetup", "luksDump", container).stdout.decode()
    for line in dump.splitlines():
        words = line.split()
        if line.startswith("Payload offset:"):
            return int(words[-1]) * 512
        if words[:1] == ["offset:"]:
            return int(words[1])
    raise AssertionError("no data offset in luksDump")


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_luks_ext4_roundtrip(cf: Cryptfuse, stack: Stack, tmp_path: Path, kind: str) -> None:
    container = tmp_path / f"{kind}.img"
    with open(container, "wb") as f:
        f.truncate(64 * MiB)
    luks_format(kind, container)
    header = data_offset(container)
    header_before = hashlib.sha256(container.read_bytes()[:header]).hexdigest()
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    roundtrip(cf, stack, tmp_path, container, ["--key-file", str(key)], b"")
    assert hashlib.sha256(container.read_bytes()[:header]).hexdigest() == header_before


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_luks_detached_header_and_key_slot(cf: Cryptfuse, tmp_path: Path, kind: str) -> None:
    data, hdr = tmp_path / "data.img", tmp_path / "header.img"
    with open(data, "wb") as f:
        f.truncate(8 * MiB)
    with open(hdr, "wb") as f:
        f.truncate(4 * MiB if kind == "luks2" else 2 * MiB)
    luks_format(kind, data, "--header", hdr, "--offset", "0")
    header_before = hashlib.sha256(hdr.read_bytes()).hexdigest()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount("--header", hdr, "-S", "0", data, mountpoint=mnt)
    assert (mnt / "volume").stat().st_size == 8 * MiB
    with open(mnt / "volume", "r+b") as f:
        f.seek(5 * MiB + 3)
        f.write(MARKER)
    cf.unmount(mnt, pids)
    assert MARKER[:64] not in data.read_bytes()
    result = cf.run("--header", hdr, "-S", "1", data, mnt, input=PASSPHRASE + b"\n")
    assert result.returncode != 0 and len(result.stderr.decode().splitlines()) == 1
    pids = cf.mount("--header", hdr, "-r", data, mountpoint=mnt)
    with open(mnt / "volume", "rb") as f:
        f.seek(5 * MiB + 3)
        assert f.read(len(MARKER)) == MARKER
    cf.unmount(mnt, pids)
    assert hashlib.sha256(hdr.read_bytes()).hexdigest() == header_before


def test_sigterm_ends_the_daemon_cleanly(cf: Cryptfuse, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    log = tmp_path / "daemon.log"
    pids = cf.mount(*PLAIN, "-v", "--log-file", log, container, mountpoint=mnt)
    with open(mnt / "volume", "r+b") as f:
        f.write(MARKER)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pids), "daemon still running after SIGTERM"
    assert not os.path.ismount(mnt)
    text = log.read_text()
    assert "received signal 15" in text and "container flushed and closed" in text, text
    assert PASSPHRASE.decode() not in text
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    with open(mnt / "volume", "rb") as f:
        assert f.read(len(MARKER)) == MARKER
    cf.unmount(mnt, pids)


def test_foreground_sigint(cli_env: dict[str, str], repo: Path, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryptfuse", "-f", *PLAIN, str(container), str(mnt)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env,
        cwd=repo,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(PASSPHRASE + b"\n")
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        assert os.listdir(mnt) == ["volume"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert not os.path.ismount(mnt)
        assert b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_read_only_mount_refuses_writes(cf: Cryptfuse, tmp_path: Path) -> None:
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(4 * MiB)
    before = hashlib.sha256(container.read_bytes()).hexdigest()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(*PLAIN, "-r", container, mountpoint=mnt)
    with pytest.raises(OSError) as exc:
        open(mnt / "volume", "r+b")
    assert exc.value.errno == errno.EROFS
    with open(mnt / "volume", "rb") as f:
        assert len(f.read(MiB)) == MiB
    cf.unmount(mnt, pids)
    assert hashlib.sha256(container.read_bytes()).hexdigest() == before


def test_io_errors_and_limits_through_the_kernel(cf: Cryptfuse, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    volume = mnt / "volume"
    assert volume.stat().st_size == 4 * MiB
    fd = os.open(volume, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"abc", 4 * MiB - 1) == 1
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"abc", 4 * MiB)
        assert exc.value.errno == errno.ENOSPC
        assert os.pread(fd, 10, 4 * MiB) == b""
        os.pwrite(fd, b"odd", 12345)
        os.fsync(fd)
        assert os.pread(fd, 3, 12345) == b"odd"
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, 0)
        assert exc.value.errno == errno.EPERM
        os.ftruncate(fd, 4 * MiB)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (mnt / "new").write_bytes(b"x")
    st = os.statvfs(mnt)
    assert st.f_frsize * st.f_blocks == 4 * MiB
    cf.unmount(mnt, pids)


def test_mount_failure_is_one_line(cf: Cryptfuse, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    result = cf.run(*PLAIN, "-o", "no_such_fuse_option", container, mnt, input=PASSPHRASE + b"\n")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, lines
    assert len(lines) == 1 and lines[0].startswith("cryptfuse: cannot mount"), lines
    assert "no_such_fuse_option" in lines[0]
    assert not os.path.ismount(mnt)
    assert not daemon_pids(mnt)


def test_mmap_needs_page_cache(cf: Cryptfuse, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    with open(mnt / "volume", "r+b") as f:
        # direct_io (the default) has no page cache to share.
        with pytest.raises(OSError):
            mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_SHARED)
    cf.unmount(mnt, pids)

    pids = cf.mount(
        *PLAIN, "-o", "page_cache,uid=1234,gid=4321,umask=027", container, mountpoint=mnt
    )
    st = (mnt / "volume").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 4321, 0o640)
    with open(mnt / "volume", "r+b") as f:
        with mmap.mmap(f.fileno(), 8192, flags=mmap.MAP_SHARED) as m:
            m[100:110] = b"0123456789"
            m.flush()
    cf.unmount(mnt, pids)
    pids = cf.mount(*PLAIN, "-o", "ro", container, mountpoint=mnt)
    with open(mnt / "volume", "rb") as f:
        f.seek(100)
        assert f.read(10) == b"0123456789"
    with pytest.raises(OSError) as exc:
        open(mnt / "volume", "r+b")
    assert exc.value.errno == errno.EROFS
    cf.unmount(mnt, pids)


def test_second_writable_mount_is_busy(cf: Cryptfuse, tmp_path: Path) -> None:
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(4 * MiB)
    mnt, other = tmp_path / "mnt", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()
    pids = cf.mount(*PLAIN, container, mountpoint=mnt)
    result = cf.run(*PLAIN, container, other, input=PASSPHRASE + b"\n")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 5 and len(lines) == 1 and "in use" in lines[0], lines
    assert not os.path.ismount(other)
    cf.unmount(mnt, pids)


def corpus_plaintext(n: int) -> bytes:
    """P(n) of the corpus README: sha256(b"cs-corpus-0") || sha256(b"cs-corpus-1") || ..."""
    blocks = -(-n // 32)
    return b"".join(hashlib.sha256(b"cs-corpus-%d" % i).digest() for i in range(blocks))[:n]


CORPUS_CASES = [
    pytest.param(
        "plain-aes-cbc-essiv-sha256-k256-ripemd160.img",
        ["--type", "plain", "-c", "aes-cbc-essiv:sha256", "-s", "256", "-h", "ripemd160"],
        b"corpus-plain-1\n",
        1 * MiB,
        id="plain-cbc-essiv-ripemd160",
    ),
    pytest.param(
        "plain-aes-xts-plain64-k256-sha256-offset576.img",
        [
            "--type",
            "plain",
            "-c",
            "aes-xts-plain64",
            "-s",
            "256",
            "-h",
            "sha256",
            "--offset",
            "576",
        ],
        b"corpus-plain-2\n",
        1 * MiB,
        id="plain-xts-offset576",
    ),
    pytest.param(
        "plain-aes-xts-plain64-k512-keyfile-off10.img",
        [
            "--type",
            "plain",
            "-c",
            "aes-xts-plain64",
            "-s",
            "512",
            "--keyfile-offset",
            "10",
            "-d",
            "{corpus}/generated/plain-keyfile-off10.key",
        ],
        b"",
        1 * MiB,
        id="plain-keyfile-offset",
    ),  # fmt: skip
    pytest.param(
        "luks2-aes-xts512-4k-2slots.img", [], b"corpus-luks2-B\n", 2 * MiB, id="luks2-argon2id-slot"
    ),
    pytest.param(
        "luks1-aes-xts256-sha1-converted.img",
        ["-S", "3"],
        b"corpus-luks1-E\n",
        1 * MiB,
        id="luks1-slot3",
    ),
]


@pytest.mark.parametrize(("image", "options", "passphrase", "size"), CORPUS_CASES)
def test_corpus_images_through_the_mount(
    cf: Cryptfuse,
    corpus: Path,
    tmp_path: Path,
    image: str,
    options: list[str],
    passphrase: bytes,
    size: int,
) -> None:
    """Known-plaintext corpus images read back through the mounted file, read-only."""
    container = tmp_path / image
    shutil.copyfile(corpus / "generated" / image, container)
    before = hashlib.sha256(container.read_bytes()).hexdigest()
    options = [o.format(corpus=corpus) for o in options]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(*options, "-r", container, mountpoint=mnt, input=passphrase)
    assert (mnt / "volume").read_bytes()[:size] == corpus_plaintext(size)
    cf.unmount(mnt, pids)
    assert hashlib.sha256(container.read_bytes()).hexdigest() == before


def test_fuse_options_pass_through(cf: Cryptfuse, tmp_path: Path) -> None:
    container, mnt = _plain_container_and_mountpoint(tmp_path)
    pids = cf.mount(*PLAIN, "-o", "allow_other", "--name", "disk.raw", container, mountpoint=mnt)
    options = sh("findmnt", "-n", "-o", "OPTIONS", mnt).stdout.decode()
    assert "allow_other" in options and "default_permissions" in options
    assert os.listdir(mnt) == ["disk.raw"]
    cf.unmount(mnt, pids)


@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_mount_with_the_volume_key(cf: Cryptfuse, tmp_path: Path, kind: str) -> None:
    """``--volume-key-file`` (cryptsetup's, e.g. a key kept with ``luksDump
    --dump-volume-key --volume-key-file``): the mount opens with the key instead of a
    passphrase, writes land under it, and a key that is not the volume's is refused
    in one line before anything is mounted."""
    container = tmp_path / f"{kind}.img"
    with open(container, "wb") as f:
        f.truncate(24 * MiB)
    luks_format(kind, container)
    vk = tmp_path / "volume.key"
    sh("cryptsetup", "luksDump", "-q", "--dump-volume-key", "--volume-key-file", vk,
       "--key-file", "-", container, input=PASSPHRASE)  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount("--volume-key-file", vk, container, mountpoint=mnt)
    with open(mnt / "volume", "r+b") as f:
        f.seek(3 * MiB + 5)
        f.write(MARKER)
    cf.unmount(mnt, pids)
    key = tmp_path / "key"
    key.write_bytes(PASSPHRASE)
    pids = cf.mount("-r", "--key-file", key, container, mountpoint=mnt)
    with open(mnt / "volume", "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(len(MARKER)) == MARKER
    cf.unmount(mnt, pids)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(vk.stat().st_size))
    result = cf.run("--volume-key-file", wrong, container, mnt)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        "cryptfuse: Volume key does not match the volume."
    ]
    assert not os.path.ismount(mnt)
