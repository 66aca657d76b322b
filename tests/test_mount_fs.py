"""``--mount-fs``, ``cryptfuse close`` and mount(8)/fstab, end to end as root.

Real containers (cryptsetup luksFormat, plain), real filesystems (ext4, vfat) over
loop devices, mount(8) through mount.fuse3.  After each test nothing of it may stay
mounted, attached or running; the ``leftovers`` fixture checks that and cleans up.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptfuse import mountfs

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
PASSPHRASE = b"mount-fs test passphrase"
PLAIN = ["--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-h", "sha256"]


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def sh(*args: object, check: bool = True, **kw: object) -> subprocess.CompletedProcess[bytes]:
    argv = [str(a) for a in args]
    result = subprocess.run(argv, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}: {result.stderr.decode()}")
    return result  # type: ignore[no-any-return]


def under(root: Path) -> list[str]:
    """Mounts and loop devices below *root* (what a test must not leave behind)."""
    prefix = str(root) + "/"
    found = [m.mountpoint for m in mountfs.mounts() if m.mountpoint.startswith(prefix)]
    for name in os.listdir("/sys/block"):
        with contextlib.suppress(OSError):
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            if backing.startswith(prefix):
                found.append(f"/dev/{name} -> {backing}")
    return found


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[Path]:
    """Yields tmp_path; afterwards fails if anything is still mounted or attached there
    (and tears it down, innermost first, so later tests are not disturbed)."""
    yield tmp_path
    left = under(tmp_path)
    for mount in reversed([m for m in left if not m.startswith("/dev/")]):
        sh("umount", "-l", mount, check=False)
    for loop in [m.split()[0] for m in left if m.startswith("/dev/")]:
        sh("losetup", "-d", loop, check=False)
    assert not left, f"left behind: {left}"


class CF:
    def __init__(self, env: dict[str, str], repo: Path) -> None:
        self.env, self.repo = env, repo

    def __call__(
        self, *args: object, input: bytes = PASSPHRASE + b"\n"
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "cryptfuse", *map(str, args)],
            input=input,
            capture_output=True,
            env=self.env,
            cwd=self.repo,
            timeout=120,
        )

    def ok(self, *args: object, input: bytes = PASSPHRASE + b"\n") -> None:
        result = self(*args, input=input)
        assert result.returncode == 0, result.stderr.decode()


@pytest.fixture
def cf(cli_env: dict[str, str], repo: Path) -> CF:
    return CF(cli_env, repo)


def container(tmp: Path, kind: str, size: int = 48 * MiB) -> tuple[Path, list[object]]:
    """A container and the options that open it (LUKS2 with a key file, or plain)."""
    path = tmp / f"{kind}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    if kind == "plain":
        return path, [*PLAIN]
    need("cryptsetup")
    key = tmp / "key"
    key.write_bytes(PASSPHRASE)
    sh(
        "cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, path,
    )  # fmt: skip
    return path, ["--key-file", key]


#: mkfs for each filesystem the tests use (-K: xfs would discard the whole volume first)
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "vfat": ["mkfs.vfat"], "xfs": ["mkfs.xfs", "-q", "-K"]}


def other_fs() -> str:
    """The second filesystem: vfat where the kernel has it, else xfs (whose smallest
    filesystem is 300 MiB; the container is sparse)."""
    with open("/proc/filesystems") as f:
        kernel = {line.split()[-1] for line in f if line.strip()}
    for fstype in ("vfat", "xfs"):
        if fstype in kernel and shutil.which(MKFS[fstype][0]):
            return fstype
    pytest.skip("neither vfat nor xfs (kernel support and mkfs tool) is available")


def mkfs(cf: CF, image: Path, opts: list[object], mnt: Path, fstype: str) -> None:
    """Make a filesystem in the volume (mount, mkfs, close)."""
    cf.ok(*opts, image, mnt)
    sh(*MKFS[fstype], mnt / "volume")
    cf.ok("close", mnt)


def files(root: Path) -> dict[str, str]:
    data = {"hello.txt": b"hello through --mount-fs\n", "random.bin": os.urandom(MiB + 17)}
    for name, content in data.items():
        (root / name).write_bytes(content)
    return {name: hashlib.sha256(content).hexdigest() for name, content in data.items()}


def daemons(mnt: Path, image: Path) -> list[int]:
    return mountfs.daemon_pids(str(image), str(mnt))


@pytest.mark.parametrize(
    ("kind", "fstype"),
    [
        pytest.param("luks2", "ext4", id="luks2-ext4"),
        pytest.param("plain", "other", id="plain-vfat/xfs"),
        pytest.param("plain", "ext4", id="plain-ext4"),
        pytest.param("luks2", "other", id="luks2-vfat/xfs"),
    ],
)
def test_mount_fs_roundtrip(cf: CF, leftovers: Path, kind: str, fstype: str) -> None:
    if fstype == "other":
        fstype = other_fs()
    need(MKFS[fstype][0], "blkid")
    tmp = leftovers
    image, opts = container(tmp, kind, 320 * MiB if fstype == "xfs" else 48 * MiB)
    mnt, fs = tmp / "mnt", tmp / "fs"
    mnt.mkdir()
    fs.mkdir()
    mkfs(cf, image, opts, mnt, fstype)

    cf.ok(*opts, image, mnt, "--mount-fs", fs)
    entry = mountfs.mount_at(str(fs))
    assert entry is not None and entry.fstype == fstype and entry.source.startswith("/dev/loop")
    loop = entry.source
    name = loop.removeprefix("/dev/")
    assert Path(f"/sys/block/{name}/loop/autoclear").read_text().strip() == "1"
    assert Path(f"/sys/block/{name}/loop/backing_file").read_text().strip() == str(mnt / "volume")
    expected = files(fs)
    pids = daemons(mnt, image)
    assert len(pids) == 1

    if (kind, fstype) == ("luks2", "ext4"):
        # a process in the filesystem: close names it, exits 5 and changes nothing
        holder = subprocess.Popen(["sleep", "60"], cwd=fs)
        try:
            result = cf("close", mnt)
            assert result.returncode == 5
            assert f"process {holder.pid} (sleep, cwd) in {fs}" in result.stderr.decode()
            assert mountfs.mount_at(str(fs)) == entry and not mountfs.gone(pids[0])
        finally:
            holder.kill()
            holder.wait()

    cf.ok("close", mnt)
    # close returned: everything is gone already, the daemon included
    assert under(tmp) == []
    assert all(mountfs.gone(p) for p in pids)

    # the type is detected again, read-only when the volume is; close by DIR works too
    cf.ok(*opts, "--readonly", image, mnt, "--mount-fs", fs)
    name = mountfs.mount_at(str(fs)).source.removeprefix("/dev/")  # type: ignore[union-attr]
    assert Path(f"/sys/block/{name}/ro").read_text().strip() == "1"
    for rel, digest in expected.items():
        assert hashlib.sha256((fs / rel).read_bytes()).hexdigest() == digest
    with pytest.raises(OSError):
        (fs / "new.txt").write_text("read-only")
    cf.ok("close", fs)
    assert under(tmp) == []


def test_mount_fs_failures_leave_nothing_mounted(cf: CF, leftovers: Path) -> None:
    need("mkfs.ext4", "blkid")
    tmp = leftovers
    image, opts = container(tmp, "plain", 16 * MiB)
    mnt, fs = tmp / "mnt", tmp / "fs"
    mnt.mkdir()
    fs.mkdir()

    # no filesystem in the volume yet: exit 32, the volume mount is undone
    result = cf(*opts, image, mnt, "--mount-fs", fs)
    assert result.returncode == 32
    assert "no filesystem found" in result.stderr.decode()
    assert len(result.stderr.decode().splitlines()) == 1
    assert under(tmp) == [] and daemons(mnt, image) == []

    mkfs(cf, image, opts, mnt, "ext4")
    # wrong filesystem options: mount fails, volume undone, loop device gone
    result = cf(*opts, image, mnt, "--mount-fs", fs, "--fs-options", "no_such_option")
    assert result.returncode == 32, result.stderr.decode()
    assert "cannot mount the ext4 filesystem" in result.stderr.decode()
    assert under(tmp) == [] and daemons(mnt, image) == []
    # a type that is not there
    result = cf(*opts, image, mnt, "--mount-fs", fs, "--fs-type", "vfat")
    assert result.returncode == 32
    assert under(tmp) == [] and daemons(mnt, image) == []

    # DIR busy (something mounted there): refused before anything is mounted
    sh("mount", "-t", "tmpfs", "tmpfs", fs)
    try:
        result = cf(*opts, image, mnt, "--mount-fs", fs)
        assert result.returncode == 5
        assert "already mounted" in result.stderr.decode()
        assert under(tmp) == [str(fs)]
    finally:
        sh("umount", fs)
    # the volume's mountpoint busy (not empty): nothing mounted either
    (mnt / "stray").write_text("x")
    result = cf(*opts, image, mnt, "--mount-fs", fs)
    assert result.returncode != 0 and "not empty" in result.stderr.decode()
    assert under(tmp) == []
    # close of something that is not a cryptfuse mount: exit 4
    result = cf("close", fs)
    assert result.returncode == 4 and "not an active cryptfuse mount" in result.stderr.decode()


def test_close_busy_and_deferred(cf: CF, leftovers: Path) -> None:
    """A loop device of the user's holds the volume: close exits 5 and changes nothing;
    after the loop device is detached close returns only once the daemon is gone;
    --deferred detaches and the daemon ends when the last user lets go."""
    need("losetup")
    tmp = leftovers
    image, opts = container(tmp, "plain", 8 * MiB)
    mnt = tmp / "mnt"
    mnt.mkdir()
    cf.ok(*opts, image, mnt)
    pids = daemons(mnt, image)
    assert len(pids) == 1
    loop = sh("losetup", "-f", "--show", mnt / "volume").stdout.decode().strip()
    try:
        with open(loop, "r+b") as dev:
            dev.write(b"written through the loop device")
        result = cf("close", mnt)
        assert result.returncode == 5
        assert f"loop device {loop}" in result.stderr.decode()
        assert os.path.ismount(mnt) and not mountfs.gone(pids[0])
        assert (mnt / "volume").read_bytes()[:31] == b"written through the loop device"

        # a process with its working directory in the mountpoint is named too
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)
        try:
            result = cf("close", mnt)
            assert result.returncode == 5
            assert f"process {holder.pid} (sleep, cwd)" in result.stderr.decode()
        finally:
            holder.kill()
            holder.wait()
    finally:
        sh("losetup", "-d", loop)
    cf.ok("close", mnt)
    assert all(mountfs.gone(p) for p in pids), "close returned before the daemon exited"
    assert not os.path.ismount(mnt)

    # --deferred while held: detached at once, the daemon lives until the loop goes
    cf.ok(*opts, image, mnt)
    pids = daemons(mnt, image)
    loop = sh("losetup", "-f", "--show", mnt / "volume").stdout.decode().strip()
    try:
        result = cf("close", "--deferred", mnt)
        assert result.returncode == 0, result.stderr.decode()
        assert "deferred" in result.stderr.decode()
        assert not os.path.ismount(mnt)
        assert not mountfs.gone(pids[0])
    finally:
        sh("losetup", "-d", loop)
    assert mountfs.wait_gone(pids) == []
    with open(image, "rb") as f:
        assert b"written through the loop device" not in f.read(MiB)


SBIN_LINK = Path("/usr/local/sbin/cryptfuse")


@pytest.fixture
def helper_path(tmp_path: Path, repo: Path) -> Iterator[dict[str, str]]:
    """`cryptfuse` where mount(8) finds it: libmount runs mount.fuse3 with a fixed PATH
    (/usr/local/sbin:...), so -- as `make install` does -- a link in /usr/local/sbin,
    here to a wrapper that runs this checkout.  Whatever was there is put back after;
    a lock keeps two test runs on the machine from swapping the link under each other."""
    need("mount.fuse3")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cryptfuse"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}} "
        f'exec {sys.executable} -m cryptfuse "$@"\n'
    )
    wrapper.chmod(0o755)
    SBIN_LINK.parent.mkdir(parents=True, exist_ok=True)
    with open("/run/lock/cryptfuse-test-sbin.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = tmp_path / "saved-sbin-link"
        had = os.path.lexists(SBIN_LINK)
        if had:
            os.rename(SBIN_LINK, saved)
        os.symlink(wrapper, SBIN_LINK)
        try:
            yield dict(os.environ)
        finally:
            os.unlink(SBIN_LINK)
            if had:
                os.rename(saved, SBIN_LINK)


def test_mount_t_fuse_cryptfuse_and_fstab(
    cf: CF, leftovers: Path, helper_path: dict[str, str]
) -> None:
    need("mkfs.ext4", "blkid")
    tmp = leftovers
    image, _ = container(tmp, "luks2", 24 * MiB)
    key = tmp / "key"
    mnt, fs = tmp / "mnt", tmp / "fs"
    mnt.mkdir()
    fs.mkdir()
    cf.ok("--key-file", key, image, mnt)
    sh("mkfs.ext4", "-q", "-F", mnt / "volume")
    cf.ok("close", mnt)

    # mount(8) -> mount.fuse3 -> cryptfuse, with mount(8)'s own options mixed in
    sh(
        "mount", "-t", "fuse.cryptfuse", image, mnt, "-o",
        f"luks,key-file={key},nofail,_netdev,x-systemd.device-timeout=5,noauto,defaults",
        env=helper_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    entry = mountfs.mount_at(str(mnt))
    assert entry is not None and entry.fstype == "fuse.cryptfuse"
    assert (mnt / "volume").stat().st_size == 24 * MiB - 16 * MiB
    pids = daemons(mnt, image)
    sh("umount", mnt)
    assert mountfs.wait_gone(pids) == []

    # an fstab line with the filesystem too; quoted fs-options keep their commas
    fstab = tmp / "fstab"
    fstab.write_text(
        f"# test fstab\n{image} {mnt} fuse.cryptfuse "
        f'luks,key-file={key},mount-fs={fs},fs-options="noatime,nodev",nofail 0 0\n'
    )
    sh("mount", "-a", "-T", fstab, env=helper_path, stdin=subprocess.DEVNULL)
    inner = mountfs.mount_at(str(fs))
    assert inner is not None and inner.fstype == "ext4"
    assert {"noatime", "nodev"} <= set(
        sh("findmnt", "-n", "-o", "OPTIONS", fs).stdout.decode().strip().split(",")
    )
    (fs / "via-fstab.txt").write_text("mounted from fstab\n")
    # umount of the volume is refused while its filesystem is mounted; close does it all
    assert sh("umount", mnt, check=False).returncode != 0
    cf.ok("close", mnt)
    assert under(tmp) == []

    # read-only by crypttab's name; a passphrase in -o is refused before anything happens
    sh(
        "mount", "-t", "fuse.cryptfuse", image, mnt, "-o",
        f"luks,key-file={key},read-only,mount-fs={fs}", env=helper_path,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert (fs / "via-fstab.txt").read_text() == "mounted from fstab\n"
    assert "ro" in sh("findmnt", "-n", "-o", "OPTIONS", fs).stdout.decode().split(",")
    cf.ok("close", fs)
    result = sh(
        "mount", "-t", "fuse.cryptfuse", image, mnt, "-o", "luks,passphrase=secret",
        env=helper_path, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "never goes on the command line" in result.stderr.decode()
    assert under(tmp) == []


def test_make_install_links_into_sbin(repo: Path, tmp_path: Path) -> None:
    """`make install DESTDIR=...`: the link mount.fuse3 finds, the man page, completion."""
    need("make")
    result = sh("make", "-s", "-C", repo, "install", f"DESTDIR={tmp_path}", check=False)
    assert result.returncode == 0, result.stderr.decode()
    link = tmp_path / "usr/local/sbin/cryptfuse"
    assert link.is_symlink() and os.readlink(link) == str(repo / ".venv/bin/cryptfuse")
    assert (tmp_path / "usr/local/share/man/man8/cryptfuse.8").is_file()
    assert (tmp_path / "usr/local/share/bash-completion/completions/cryptfuse").is_file()
