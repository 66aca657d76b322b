"""A mounted volume's life: online resize, discards, status, random-key swap.

Real mounts through the daemon (root, /dev/fuse, losetup, ext4, cryptsetup for
LUKS2), torn down by the ``stack`` fixture of test_e2e_mount in the right order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_e2e_mount import PASSPHRASE, Cryptfuse, Stack, daemon_pids, losetup, mount_fs, need, sh
from test_luks2 import build

from cryptfuse.cli_lifecycle import ask, entry_of
from cryptfuse.errors import CryptfuseError

pytestmark = [pytest.mark.root, pytest.mark.fuse]

MiB = 1 << 20
PLAIN = ["--type", "plain", "-c", "aes-xts-plain64", "-s", "512", "-h", "sha256"]


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cf(stack: Stack, cli_env: dict[str, str], repo: Path) -> Cryptfuse:
    return Cryptfuse(stack, cli_env, repo)


def luks2(path: Path, size: int, *options: str) -> None:
    """A LUKS2 container made by cryptsetup, cheap KDF, 2 MiB header area."""
    need("cryptsetup")
    with open(path, "wb") as f:
        f.truncate(size)
    sh(
        "cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k",
        "--luks2-keyslots-size", "1m", "--offset", "4096", *options, "--key-file", "-", path,
        input=PASSPHRASE,
    )  # fmt: skip


def status(cf: Cryptfuse, mnt: Path) -> dict[str, object]:
    result = cf.run("status", "--json", mnt)
    assert result.returncode == 0, result.stderr.decode()
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def du_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def digest_tree(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()
    }


# -- resize ---------------------------------------------------------------------------------


def test_online_grow_luks2_ext4_over_losetup(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    """Grow the container, resize the mounted volume, losetup -c, resize2fs, fill, verify."""
    need("losetup", "mkfs.ext4", "resize2fs", "fsck.ext4", "blockdev")
    container = tmp_path / "c.img"
    luks2(container, 18 * MiB)
    mnt, ext = tmp_path / "mnt", tmp_path / "ext"
    mnt.mkdir()
    pids = cf.mount(container, mountpoint=mnt)
    volume = mnt / "volume"
    assert volume.stat().st_size == 16 * MiB
    loop = losetup(stack, volume)
    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
    mount_fs(stack, loop, ext)
    (ext / "before.bin").write_bytes(os.urandom(8 * MiB))
    os.sync()

    # I/O in flight during the resize: a writer fsyncs through ext4, loop and FUSE
    stop, failures = threading.Event(), []

    def busy() -> None:
        try:
            with open(ext / "busy.bin", "wb") as f:
                n = 0
                while not stop.is_set() or n < 16:
                    f.seek(n % 32 * 65536)
                    f.write(os.urandom(65536))
                    os.fsync(f.fileno())
                    n += 1
        except OSError as exc:
            failures.append(exc)

    writer = threading.Thread(target=busy)
    writer.start()
    try:
        with open(container, "r+b") as f:  # the container grows by 16 MiB under the mount
            f.truncate(34 * MiB)
        result = cf.run("resize", mnt)
    finally:
        stop.set()
        writer.join()
    assert result.returncode == 0, result.stderr.decode()
    assert not failures, failures
    assert volume.stat().st_size == 32 * MiB
    assert status(cf, mnt)["size"] == 32 * MiB // 512
    sh("losetup", "-c", loop)
    assert int(sh("blockdev", "--getsize64", loop).stdout) == 32 * MiB
    grow = sh("resize2fs", loop, check=False)
    if grow.returncode != 0:  # online resize2fs needs CAP_SYS_RESOURCE: ext4 only goes
        stack.pop(f"mount {ext}")
        sh("fsck.ext4", "-f", "-y", loop)
        sh("resize2fs", loop)
        mount_fs(stack, loop, ext)
    (ext / "after.bin").write_bytes(os.urandom(14 * MiB))  # more than the old size held
    expected = digest_tree(ext)
    stack.pop(f"mount {ext}")
    stack.pop(f"loop {loop}")
    cf.unmount(mnt, pids)

    pids = cf.mount(container, mountpoint=mnt)
    assert volume.stat().st_size == 32 * MiB
    fsck = sh("fsck.ext4", "-n", "-f", volume, check=False)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    mount_fs(stack, volume, ext, "-o", "loop,ro")
    assert digest_tree(ext) == expected
    stack.pop(f"mount {ext}")
    cf.unmount(mnt, pids)
    sh("cryptsetup", "open", "--test-passphrase", "--key-file", "-", container, input=PASSPHRASE)


def test_shrink_plain_with_size_and_refusals(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    container = tmp_path / "plain.img"
    with open(container, "wb") as f:
        f.truncate(8 * MiB)
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(*PLAIN, "--key-file", key, container, mountpoint=mnt)
    volume = mnt / "volume"
    data = os.urandom(8 * MiB)
    with open(volume, "r+b") as f:
        f.write(data)

    result = cf.run("resize", "--size", "5000", mnt)  # 2.44 MiB
    assert result.returncode == 0, result.stderr.decode()
    assert volume.stat().st_size == 5000 * 512
    with open(volume, "rb") as f:
        assert f.read() == data[: 5000 * 512]  # short at the new end
        f.seek(5000 * 512)
        assert f.read(4096) == b""
    fd = os.open(volume, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as raised:  # no writing past the new end
            os.pwrite(fd, b"x" * 512, 5000 * 512)
        assert raised.value.errno == 28  # ENOSPC
    finally:
        os.close(fd)

    # past the container, and below zero: refused, nothing changes
    for bad in (["--size", str(8 * MiB // 512 + 1)], ["--size", "-1"]):
        result = cf.run("resize", *bad, mnt)
        assert result.returncode != 0
        assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
        assert volume.stat().st_size == 5000 * 512
    # back to the whole container (no --size): the old data reappears untouched
    assert cf.run("resize", mnt).returncode == 0
    assert volume.read_bytes() == data
    # not a cryptfuse mount
    result = cf.run("resize", tmp_path)
    assert result.returncode == 4 and b"not a cryptfuse mount" in result.stderr
    cf.unmount(mnt, pids)

    # read-only mount: refused
    pids = cf.mount(*PLAIN, "--key-file", key, "--readonly", container, mountpoint=mnt)
    result = cf.run("resize", "--size", "100", mnt)
    assert result.returncode != 0 and b"read-only" in result.stderr
    assert volume.stat().st_size == 8 * MiB
    assert status(cf, mnt)["mode"] == "readonly"
    cf.unmount(mnt, pids)


def test_static_luks2_segment_and_persistent_discards_flag(
    cf: Cryptfuse, stack: Stack, tmp_path: Path
) -> None:
    """A LUKS2 segment of fixed size cannot be resized (cryptsetup's refusal); the
    header's persistent ``allow-discards`` flag turns discards on without the option."""
    built = build(tmp_path / "c.img", [PASSPHRASE], data=bytes(8 * MiB))

    def static_and_discards(meta: dict[str, Any]) -> None:
        meta["segments"]["0"]["size"] = str(4 * MiB)
        meta["config"]["flags"] = ["allow-discards"]

    built.rewrite(static_and_discards)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(built.path, mountpoint=mnt)
    result = cf.run("resize", mnt)
    assert result.returncode != 0 and b"static size" in result.stderr
    assert (mnt / "volume").stat().st_size == 4 * MiB
    assert status(cf, mnt)["flags"] == ["discards"]
    cf.unmount(mnt, pids)


def json_flags(container: Path) -> list[str] | None:
    """``config.flags`` as cryptsetup reads the header (None: no such key)."""
    dump = sh("cryptsetup", "luksDump", "--dump-json-metadata", container).stdout
    flags: list[str] | None = json.loads(dump)["config"].get("flags")
    return flags


def test_persistent_flags_as_cryptsetup_keeps_them(
    cf: Cryptfuse, stack: Stack, tmp_path: Path
) -> None:
    """``--persistent`` (cryptsetup's ``open --persistent``): once mounted, the header's
    flags become exactly those given (in cryptsetup's order; the ``--perf-*`` ones and
    their crypttab words too), and this mount ignores the old ones; later mounts honour
    the new ones.  LUKS1 mounts and says why nothing was kept; --test-passphrase
    refuses the option.  cryptsetup reads every header written."""
    container, mnt = tmp_path / "c.img", tmp_path / "mnt"
    luks2(container, 12 * MiB)
    mnt.mkdir()
    assert json_flags(container) is None

    def mounted(*options: object) -> list[str]:
        """Mount with *options*, return the status flags, unmount."""
        pids = cf.mount(*options, container, mountpoint=mnt)
        flags = status(cf, mnt)["flags"]
        cf.unmount(mnt, pids)
        assert isinstance(flags, list)
        return flags

    assert mounted("--persistent", "--allow-discards") == ["discards"]
    assert json_flags(container) == ["allow-discards"]
    assert re.search(
        r"Flags:\s+allow-discards \n", sh("cryptsetup", "luksDump", container).stdout.decode()
    )
    assert mounted() == ["discards"]  # the header's flag
    # the header's flag ignored by this mount; the new ones written in cryptsetup's order
    assert mounted("--persistent", "--perf-no_write_workqueue", "-o", "same-cpu-crypt") == []
    assert json_flags(container) == ["same-cpu-crypt", "no-write-workqueue"]
    assert mounted() == []
    assert mounted("--persistent", "--readonly", "--allow-discards", "--perf-same_cpu_crypt",
                   "--perf-submit_from_crypt_cpus", "--perf-no_read_workqueue",
                   "--perf-no_write_workqueue") == ["discards", "read-only"]  # fmt: skip
    assert json_flags(container) == [
        "allow-discards", "same-cpu-crypt", "submit-from-crypt-cpus", "no-read-workqueue",
        "no-write-workqueue",
    ]  # fmt: skip
    assert mounted("--persistent") == []
    assert json_flags(container) == []  # cryptsetup too leaves an empty array
    assert "(no flags)" in sh("cryptsetup", "luksDump", container).stdout.decode()
    sh("cryptsetup", "open", "--test-passphrase", "--key-file", "-", container, input=PASSPHRASE)
    result = cf.run("--persistent", "--test-passphrase", container, input=PASSPHRASE)
    assert result.returncode == 1
    assert (
        result.stderr == b"cryptfuse: Option --persistent is not allowed with --test-passphrase.\n"
    )

    luks1 = tmp_path / "l1.img"
    with open(luks1, "wb") as f:
        f.truncate(12 * MiB)
    sh("cryptsetup", "luksFormat", "-q", "--type", "luks1", "--pbkdf-force-iterations", "1000",
       "--key-file", "-", luks1, input=PASSPHRASE)  # fmt: skip
    before = luks1.read_bytes()
    stack.push(f"fuse {mnt}", lambda: cf._force_unmount(mnt))
    result = cf.run("--persistent", "--allow-discards", luks1, mnt, input=PASSPHRASE)
    assert result.returncode == 0, result.stderr  # as cryptsetup: activated, exit 0
    assert result.stderr.decode().splitlines() == [
        "cryptfuse: This operation is supported only for LUKS2 device.",
        "cryptfuse: Device activated but cannot make flags persistent.",
    ]
    assert status(cf, mnt)["flags"] == ["discards"]
    cf.unmount(mnt, daemon_pids(mnt))
    assert luks1.read_bytes() == before


def punch(path: Path) -> bool:
    """Whether ``fallocate --punch-hole`` of *path*'s first MiB is taken (discards on)."""
    result = subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(MiB), path], check=False)
    return result.returncode == 0


def test_refresh_like_cryptsetup(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    """``cryptfuse refresh MOUNTPOINT`` (cryptsetup's refresh): the passphrase again
    (wrong: exit 2, nothing changed), then discards on or off as given, the header's
    persistent flag counting unless --persistent replaces the header's flags; plain
    compares the key it derives with the mount's (cryptsetup: "Mismatching parameters");
    a read-only mount stays read-only."""
    container, mnt = tmp_path / "c.img", tmp_path / "mnt"
    luks2(container, 12 * MiB)
    mnt.mkdir()
    pids = cf.mount(container, mountpoint=mnt)
    volume = mnt / "volume"
    assert status(cf, mnt)["flags"] == [] and not punch(volume)

    def refresh(*options: str, secret: bytes = PASSPHRASE) -> subprocess.CompletedProcess[bytes]:
        return cf.run("refresh", mnt, *options, input=secret)

    assert refresh("--allow-discards").returncode == 0
    assert status(cf, mnt)["flags"] == ["discards"] and punch(volume)
    wrong = refresh(secret=b"wrong")
    assert wrong.returncode == 2 and b"No key available" in wrong.stderr
    assert status(cf, mnt)["flags"] == ["discards"]
    assert refresh().returncode == 0
    assert status(cf, mnt)["flags"] == [] and not punch(volume)
    done = refresh("--allow-discards", "--persistent", "--perf-no_read_workqueue", "-v")
    assert done.returncode == 0 and done.stderr == b"cryptfuse: Key slot 0 unlocked.\n"
    assert status(cf, mnt)["flags"] == ["discards"]
    cf.unmount(mnt, pids)
    assert json_flags(container) == ["allow-discards", "no-read-workqueue"]
    pids = cf.mount("--readonly", container, mountpoint=mnt)
    assert status(cf, mnt)["flags"] == ["discards", "read-only"]
    assert refresh().returncode == 0  # the header's flag still counts
    assert status(cf, mnt)["flags"] == ["discards", "read-only"]
    assert refresh("--persistent").returncode == 0
    assert status(cf, mnt)["flags"] == ["read-only"] and status(cf, mnt)["mode"] == "readonly"
    cf.unmount(mnt, pids)
    assert json_flags(container) == []

    # the key must be the mount's: another container at the same path (same passphrase)
    # is refused, as cryptsetup refuses a key the mapping does not have; so is a request
    # on the socket that proves no key
    pids = cf.mount(container, mountpoint=mnt)
    other = tmp_path / "other.img"
    luks2(other, 12 * MiB)
    os.replace(other, container)
    replaced = refresh("--allow-discards", "--persistent")
    assert replaced.returncode == 1
    assert replaced.stderr.decode() == f"cryptfuse: Mismatching parameters on device {mnt}.\n"
    assert json_flags(container) is None
    with pytest.raises(CryptfuseError, match="Mismatching parameters"):
        ask(entry_of(str(mnt)), {"op": "refresh", "discards": True})
    assert status(cf, mnt)["flags"] == []
    cf.unmount(mnt, pids)

    plain = tmp_path / "p.img"
    plain.write_bytes(bytes(8 * MiB))
    pids = cf.mount(*PLAIN, plain, mountpoint=mnt)
    mismatch = refresh("--allow-discards")  # ripemd160, not the mount's sha256
    assert mismatch.returncode == 1
    assert mismatch.stderr.decode() == f"cryptfuse: Mismatching parameters on device {mnt}.\n"
    assert status(cf, mnt)["flags"] == []
    assert refresh("-h", "sha256", "--allow-discards").returncode == 0
    assert status(cf, mnt)["flags"] == ["discards"]
    cf.unmount(mnt, pids)
    gone = cf.run("refresh", mnt)
    assert gone.returncode != 0 and gone.stderr.decode().count("\n") == 1


# -- discards -------------------------------------------------------------------------------


@pytest.mark.parametrize("discards", [True, False], ids=["discards", "no-discards"])
def test_fstrim_through_ext4_over_losetup(
    cf: Cryptfuse, stack: Stack, tmp_path: Path, discards: bool
) -> None:
    need("losetup", "mkfs.ext4", "fstrim", "fsck.ext4")
    container = tmp_path / "c.img"
    luks2(container, 66 * MiB)
    options = ["--allow-discards"] if discards else []
    mnt, ext = tmp_path / "mnt", tmp_path / "ext"
    mnt.mkdir()
    pids = cf.mount(*options, container, mountpoint=mnt)
    loop = losetup(stack, mnt / "volume")
    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
    mount_fs(stack, loop, ext)
    keep = os.urandom(3 * MiB)
    (ext / "keep.bin").write_bytes(keep)
    (ext / "gone.bin").write_bytes(os.urandom(40 * MiB))
    os.sync()
    full = du_bytes(container)
    (ext / "gone.bin").unlink()
    os.sync()
    trim = sh("fstrim", "-v", ext, check=False)
    os.sync()
    after = du_bytes(container)
    if discards:
        assert trim.returncode == 0, trim.stderr.decode()
        assert after < full - 32 * MiB, (full, after)
    else:
        assert after == full, (full, after)
    stack.pop(f"mount {ext}")
    stack.pop(f"loop {loop}")
    cf.unmount(mnt, pids)
    if not discards:
        return  # nothing changed: no need to check the file system again

    pids = cf.mount(*options, container, mountpoint=mnt)
    fsck = sh("fsck.ext4", "-n", "-f", mnt / "volume", check=False)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    mount_fs(stack, mnt / "volume", ext, "-o", "loop,ro")
    assert (ext / "keep.bin").read_bytes() == keep
    stack.pop(f"mount {ext}")
    cf.unmount(mnt, pids)
    sh("cryptsetup", "open", "--test-passphrase", "--key-file", "-", container, input=PASSPHRASE)


def _read_all(path: Path) -> bytes:
    out = bytearray()
    with open(path, "rb") as f:  # 1 MiB requests: the C data path serves them
        while chunk := f.read(MiB):
            out += chunk
    return bytes(out)


def test_punch_and_zero_ranges_against_a_model(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    """Random PUNCH_HOLE/ZERO_RANGE ranges (unaligned edges too) vs a bytearray model;
    holes read as zeros through Python and C paths and show in SEEK_HOLE/SEEK_DATA."""
    need("fallocate")
    container = tmp_path / "c.img"
    size = 8 * MiB
    luks2(container, 2 * MiB + size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # Without discards: the container's holes read as dm-crypt does (noise) and
    # PUNCH_HOLE is refused with EOPNOTSUPP.
    pids = cf.mount(container, mountpoint=mnt)
    volume = mnt / "volume"
    with open(volume, "rb") as f:
        assert f.read(4096) != bytes(4096)
    refused = sh("fallocate", "-p", "-o", "0", "-l", "4096", volume, check=False)
    assert refused.returncode != 0 and b"supported" in refused.stderr  # EOPNOTSUPP
    model = bytearray(os.urandom(size))
    with open(volume, "r+b") as f:
        f.write(model)
    cf.unmount(mnt, pids)

    pids = cf.mount("--allow-discards", container, mountpoint=mnt)
    assert _read_all(volume) == model
    rng = random.Random(1313)
    allocated = du_bytes(container)
    for i in range(12):
        offset = rng.randrange(size)
        length = rng.choice([rng.randrange(1, 5000), rng.randrange(1, 2 * MiB)])
        if rng.random() < 0.5:  # sector and block aligned now and then
            offset &= ~4095
            length = (length | 4095) + 1
        mode = ["-p"] if i % 3 else ["-z", "-n"]  # PUNCH_HOLE, ZERO_RANGE (both KEEP_SIZE)
        sh("fallocate", *mode, "-o", offset, "-l", length, volume)
        end = min(offset + length, size)
        model[offset:end] = bytes(end - offset)
    data = _read_all(volume)
    assert data == model
    with open(volume, "rb") as f:  # small, unaligned reads: the Python path
        for _ in range(200):
            at, n = rng.randrange(size), rng.randrange(1, 3000)
            f.seek(at)
            assert f.read(n) == bytes(model[at : at + n])
    assert du_bytes(container) < allocated

    # SEEK_HOLE/SEEK_DATA: every reported hole reads as zeros; data follows it
    fd = os.open(volume, os.O_RDONLY)
    try:
        holes, position = [], 0
        while position < size:
            hole = os.lseek(fd, position, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data_at = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data_at = size
            holes.append((hole, data_at))
            position = data_at
    finally:
        os.close(fd)
    assert holes, "no hole reported after punching"
    for a, b in holes:
        assert a % 512 == 0 and b > a
        assert model[a:b] == bytes(b - a)
    # One sector written into a punched block: the file system allocates the whole block
    # and fills the rest with zeros, which must still read as zeros (C path: 1 MiB reads)
    a, b = next((a, b) for a, b in holes if b - a >= 8192 and a % 4096 == 0)
    fd = os.open(volume, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xab" * 512, a + 1024)
    finally:
        os.close(fd)
    model[a + 1024 : a + 1536] = b"\xab" * 512
    assert _read_all(volume) == model
    assert status(cf, mnt)["io"]["discards"] == 12  # type: ignore[index]
    cf.unmount(mnt, pids)
    sh("cryptsetup", "open", "--test-passphrase", "--key-file", "-", container, input=PASSPHRASE)
    pids = cf.mount("--readonly", container, mountpoint=mnt)  # without discards: the same
    for a, b in holes:  # ... except in the holes (noise there, as dm-crypt)
        with open(volume, "rb") as f:
            f.seek(a)
            if b - a >= 4096:
                assert f.read(4096) != bytes(4096)
    cf.unmount(mnt, pids)


# -- status ---------------------------------------------------------------------------------


def test_status_matches_luksdump_and_options(cf: Cryptfuse, stack: Stack, tmp_path: Path) -> None:
    container = tmp_path / "c.img"
    luks2(
        container, 10 * MiB, "--cipher", "aes-xts-plain64", "--key-size", "256",
        "--sector-size", "4096", "--key-slot", "3",
    )  # fmt: skip
    dump = sh("cryptsetup", "luksDump", container).stdout.decode()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount("--allow-discards", container, mountpoint=mnt)
    s = status(cf, mnt)
    assert s["type"] == "LUKS2"
    assert re.search(rf"cipher:\s+{s['cipher']}\n", dump)
    assert s["keysize"] == 256
    assert re.search(r"Key:\s+256 bits", dump)
    offset = int(re.search(r"offset:\s+(\d+) \[bytes\]", dump).group(1))  # type: ignore[union-attr]
    assert s["offset"] == offset // 512
    assert s["sector_size"] == 4096
    assert s["size"] == (10 * MiB - offset) // 512
    assert s["keyslot"] == 3
    assert s["device"] == str(container)
    assert s["mode"] == "read/write" and s["flags"] == ["discards"]
    assert s["pid"] in pids and s["reencryption"] is False
    text = cf.run("status", mnt).stdout.decode()
    assert f"{mnt} is active." in text and "keyslot:      3" in text
    listing = cf.run("status").stdout.decode().splitlines()
    assert any(line.startswith(f"{mnt}  LUKS2  {container}") for line in listing)
    cf.unmount(mnt, pids)
    # nothing secret: no passphrase, no key bytes in any form
    key = sh(
        "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", "-",
        container, input=PASSPHRASE,
    ).stdout.decode()  # fmt: skip
    hexkey = "".join(re.findall(r"\b[0-9a-f]{2}\b", key.split("dump:")[-1]))
    whole = json.dumps(s) + text
    assert len(hexkey) == 64 and PASSPHRASE.decode() not in whole
    assert hexkey[:16] not in whole.replace(" ", "")
    assert not any(line.startswith(f"{mnt} ") for line in cf.run("status").stdout.decode())
    result = cf.run("status", mnt)
    assert result.returncode == 4 and b"not a cryptfuse mount" in result.stderr


# -- ephemeral random-key volumes -----------------------------------------------------------


HOG = textwrap.dedent(
    """
    import hashlib, os, sys, time
    size, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
    pages, page = [], os.urandom(4096)
    for i in range(size // 4096):
        pages.append(bytearray(page[:8] + i.to_bytes(8, "little") + page[16:]))
        if time.monotonic() > deadline:
            sys.exit("hog: out of time while allocating")
    for i, p in enumerate(pages):  # everything comes back from swap intact
        if int.from_bytes(p[8:16], "little") != i:
            sys.exit(f"hog: page {i} corrupted")
    status = open("/proc/self/status").read()
    print([line for line in status.splitlines() if line.startswith("VmSwap")][0])
    """
)


def _memory_cgroup(tmp_path: Path) -> tuple[Path, Path] | None:
    """A fresh memory cgroup and its limit file (cgroup v1 below ours; v2 below the
    root, whose subtree_control has the memory controller), or None."""
    name = f"cryptfuse-test-{os.getpid()}-{tmp_path.name}"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / name
            limit = "memory.limit_in_bytes"
            break
    else:
        root = Path("/sys/fs/cgroup")
        if "memory" not in (root / "cgroup.subtree_control").read_text(errors="replace").split():
            return None
        group, limit = root / name, "memory.max"
    try:
        group.mkdir()
    except OSError:
        return None
    if not (group / limit).exists():
        group.rmdir()
        return None
    return group, group / limit


def test_swap_on_random_key_volume_under_memory_pressure(
    cf: Cryptfuse, stack: Stack, tmp_path: Path
) -> None:
    """A memory-limited process swaps 48 MiB through loop + cryptfuse (--lock-memory,
    random key) and gets every page back; bounded: the hog has 60 s."""
    need("losetup", "mkswap", "swapon", "swapoff")
    found = _memory_cgroup(tmp_path)
    if found is None:
        pytest.skip("cannot create a memory cgroup with a limit here")
    group, limit = found
    stack.push("cgroup", lambda: group.rmdir())
    container = tmp_path / "swap.img"
    with open(container, "wb") as f:
        f.truncate(96 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pids = cf.mount(
        *PLAIN, "--key-file", "/dev/urandom", "--lock-memory", container, mountpoint=mnt
    )
    vm_lck = [
        line
        for line in Path(f"/proc/{pids[0]}/status").read_text().splitlines()
        if line.startswith("VmLck")
    ]
    if not os.environ.get("CRYPTFUSE_SANITIZER"):  # ASan/TSan make mlockall a no-op
        assert vm_lck and int(vm_lck[0].split()[1]) > 0, "the daemon's memory is not locked"
    s = status(cf, mnt)  # exactly the key size was read from /dev/urandom
    assert s["keysize"] == 512 and s["key_location"] == "daemon memory, locked"
    loop = losetup(stack, mnt / "volume")
    sh("mkswap", loop)
    on = sh("swapon", loop, check=False)
    if on.returncode != 0:
        pytest.skip(f"swapon refused here: {on.stderr.decode().strip()}")
    stack.push("swap", lambda: sh("swapoff", loop, check=False) and None)
    limit.write_text(str(24 * MiB))
    # A plain interpreter (-I, no preload): under make test-sanitize the hog would get the
    # sanitizer runtime, whose shadow memory alone exceeds the limit.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    hog = subprocess.Popen(
        [sys.executable, "-I", "-c", HOG, str(48 * MiB), "60"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
    )
    start = time.monotonic()
    try:
        out, err = hog.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        hog.kill()
        hog.communicate()
        pytest.fail("the hog did not finish in 90 s: swap through cryptfuse hangs")
    assert hog.returncode == 0, err.decode()
    swapped_kib = int(out.decode().split()[1])
    assert swapped_kib > 8 * 1024, out.decode()  # it really went through our swap
    assert time.monotonic() - start < 90
    stack.pop("swap")
    stack.pop(f"loop {loop}")
    cf.unmount(mnt, pids)
