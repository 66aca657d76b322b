"""The design card's third use: an ordinary user (no sudo) formats a container, mounts
it, gets a filesystem through fuse2fs, writes, closes, remounts -- all as that user.

Run as root, the test creates the user ``cryptfuse-test`` (removed again if it made it),
opens ``/dev/fuse`` to others for the test's duration when it is 0600 (mode restored
after), and runs every cryptfuse command through ``setpriv`` as that user.  The user
must be able to run Python with cryptfuse's packages: when this interpreter or the
checkout is not readable by others (a virtualenv under /root), the system ``python3``
(same minor version) runs a copy of the package and its dependencies in a temporary
directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.fuse]

USER = "cryptfuse-test"
MiB = 1 << 20


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def user() -> Iterator[pwd.struct_passwd]:
    need("setpriv", "useradd", "userdel", "fuse2fs", "fusermount3", "mkfs.ext4")
    created = False
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
            capture_output=True,
        )
        created = True
        entry = pwd.getpwnam(USER)
    try:
        yield entry
    finally:
        shutil.rmtree(f"{tempfile.gettempdir()}/cryptfuse-{entry.pw_uid}", ignore_errors=True)
        if created:
            subprocess.run(["userdel", USER], check=False, capture_output=True)


@pytest.fixture(scope="module")
def fuse_for_others() -> Iterator[None]:
    """/dev/fuse usable by ordinary users (Debian's default 0666) while the test runs."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def _dependencies(name: str, seen: set[str]) -> None:
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        _dependencies(re.split(r"[<>=!~ ;\[(]", req, maxsplit=1)[0], seen)


def _runtime_copy(repo: Path, into: Path) -> str:
    """cryptfuse and its runtime dependencies copied where every user can read them."""
    into.mkdir()
    shutil.copytree(repo / "cryptfuse", into / "cryptfuse")
    names: set[str] = set()
    _dependencies("cryptfuse", names)
    site = Path(sysconfig.get_paths()["purelib"])
    tops: set[str] = set()
    for name in names - {"cryptfuse"}:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            top = f.parts[0]
            if not top.endswith((".dist-info", ".pth")) and top != "..":
                tops.add(top)
    for top in tops:
        src = site / top
        if src.is_dir():
            shutil.copytree(src, into / top, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, into / top)
    return str(into)


@pytest.fixture(scope="module")
def runner(
    user: pwd.struct_passwd,
    fuse_for_others: None,
    repo: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[str], list[str], Path]]:
    """(argv prefix running a command as the user, the same running cryptfuse, a
    directory the user owns)."""
    home = Path(tempfile.mkdtemp(prefix="cryptfuse-unpriv-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.chown(home, user.pw_uid, user.pw_gid)
    prefix = [
        "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--",
        "env", "-i", f"HOME={home}", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LC_ALL=C.UTF-8",
    ]  # fmt: skip
    probe = "import cryptfuse.cli, pyfuse3, trio, numpy, cryptography"
    site = sysconfig.get_paths()["purelib"]
    candidates = [sys.executable, "/usr/bin/python3"]
    choice = None
    for python in candidates:
        env = [f"PYTHONPATH={repo}:{site}"]
        if (
            subprocess.run([*prefix, *env, python, "-c", probe], capture_output=True).returncode
            == 0
        ):
            choice = [*env, python]
            break
    if choice is None:
        copy = _runtime_copy(repo, home / "python")
        subprocess.run(["chmod", "-R", "a+rX", copy], check=True)
        for python in candidates:
            env = [f"PYTHONPATH={copy}"]
            result = subprocess.run([*prefix, *env, python, "-c", probe], capture_output=True)
            if result.returncode == 0:
                choice = [*env, python]
                break
    try:
        if choice is None:
            pytest.skip("no Python with cryptfuse's packages is usable by an ordinary user")
        yield prefix, [*prefix, *choice, "-m", "cryptfuse"], home
    finally:
        subprocess.run(["umount", "-l", *_mounts_below(home)], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def _mounts_below(root: Path) -> list[str]:
    prefix = f" {root}/"
    with open("/proc/self/mountinfo") as f:
        return sorted((line.split()[4] for line in f if prefix in line), key=len, reverse=True)


def test_ordinary_user_formats_mounts_and_uses_a_filesystem(
    runner: tuple[list[str], list[str], Path], user: pwd.struct_passwd
) -> None:
    as_user, cryptfuse, home = runner

    def run(*argv: object, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([*map(str, argv)], capture_output=True, timeout=120)
        if ok:
            assert result.returncode == 0, f"{argv}: {result.stderr.decode()}"
        return result

    image, key, mnt, fs = home / "c.img", home / "key", home / "mnt", home / "fs"
    run(*as_user, "sh", "-c", f"umask 077; printf 'unprivileged secret' > {key}")
    run(*as_user, "truncate", "-s", "40M", image)
    run(*as_user, "mkdir", mnt, fs)
    run(*cryptfuse, "format", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--key-file", key, image)  # fmt: skip
    run(*cryptfuse, "--key-file", key, image, mnt)
    # fuse2fs lets the user write only where the filesystem says the user may:
    # root_owner makes the root directory the user's
    run(*as_user, "mkfs.ext4", "-q", "-F", "-E",
        f"root_owner={user.pw_uid}:{user.pw_gid}", mnt / "volume")  # fmt: skip
    run(*cryptfuse, "close", mnt)

    run(*cryptfuse, "--key-file", key, image, mnt, "--mount-fs", fs)
    with open("/proc/self/mountinfo") as f:
        lines = [line for line in f if f" {fs} " in line]
    assert lines and " - fuse." in lines[-1], lines  # fuse2fs, not a loop device
    payload = os.urandom(MiB + 5)
    digest = hashlib.sha256(payload).hexdigest()
    staged = home / "payload"
    staged.write_bytes(payload)
    os.chmod(staged, 0o644)
    run(*as_user, "sh", "-c", f"mkdir {fs}/work && cp {staged} {fs}/work/data && sync")
    run(*cryptfuse, "close", mnt)
    assert _mounts_below(home) == []

    run(*cryptfuse, "--key-file", key, image, mnt, "--mount-fs", fs)
    copied = run(*as_user, "sha256sum", fs / "work" / "data").stdout.decode().split()[0]
    assert copied == digest
    run(*cryptfuse, "close", fs)
    assert _mounts_below(home) == []
    assert payload[:64] not in image.read_bytes()
