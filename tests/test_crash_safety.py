"""Fault injection: a keyslot change killed at every write or fsync, or torn mid-write.

Each operation runs in a forked child whose ``os.pwrite``/``os.fsync`` are
wrapped: at event N the child dies (``os._exit``), optionally after writing
only the first half of that write (a torn write: what a power cut can leave).
The parent then reopens the container every time and checks that

* the passphrase of the untouched keyslot still opens it,
* the old or the new passphrase of the changed keyslot opens it,
* the data area is byte-identical, and the header still parses.

The number of events is counted by an uninterrupted run, so every point of
every operation is covered (LUKS1 and LUKS2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import manage
from cryptfuse.formats.luks1 import read_luks1_header
from cryptfuse.formats.luks2 import read_luks2_header
from cryptfuse.formats.manage import FormatOptions, KdfOptions

PBKDF2 = KdfOptions(pbkdf="pbkdf2", force_iterations=1000)
ARGON = KdfOptions(pbkdf="argon2id", force_iterations=4, memory_kib=32, parallel=1)
A, B, C = b"keep-this-one", b"old-passphrase", b"new-passphrase"
KILLED = 77


def opens(img: Path, passphrase: bytes) -> bool:
    fd = os.open(img, os.O_RDONLY)
    try:
        if os.pread(fd, 8, 0)[6:8] == b"\0\1":
            hdr1 = read_luks1_header(fd, str(img))
            try:
                hdr1.unlock(fd, passphrase)
            except CryptfuseError:
                return False
            return True
        hdr2 = read_luks2_header(fd, str(img))
        try:
            hdr2.unlock(fd, passphrase)
        except CryptfuseError:
            return False
        return True
    finally:
        os.close(fd)


def run_killed(action: Callable[[], object], kill_at: int | None, torn: bool) -> str:
    """Run *action* in a child; return its events ("w" pwrite or pwritev, "f" fsync,
    in order) when not killed, or "killed"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        events: list[str] = []
        real_pwrite, real_pwritev, real_fsync = os.pwrite, os.pwritev, os.fsync

        def event(kind: str) -> bool:
            events.append(kind)
            return kill_at is not None and len(events) == kill_at

        def write(fd: int, data: bytes | memoryview, offset: int, flags: int | None) -> int:
            if event("w"):
                if torn and len(data) > 1:
                    # the first half (whole pages of it, from the caller's own buffer:
                    # an O_DIRECT descriptor takes nothing else); none if refused
                    half = len(data) // 2
                    half -= half % 4096 if half >= 4096 else 0
                    with contextlib.suppress(OSError):
                        real_pwrite(fd, memoryview(data).cast("B")[:half], offset)
                os._exit(KILLED)
            if flags is None:
                return real_pwrite(fd, data, offset)
            return real_pwritev(fd, [data], offset, flags)

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            return write(fd, data, offset, None)

        def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            # one buffer here (pwrite_all's durable writes: RWF_DSYNC, the write and its
            # sync in one call): one event, torn as pwrite's
            (data,) = buffers
            return write(fd, data, offset, flags)

        def fsync(fd: int) -> None:
            if event("f"):
                os._exit(KILLED)
            real_fsync(fd)

        os.pwrite, os.fsync, os.pwritev = pwrite, fsync, pwritev  # type: ignore[assignment]
        try:
            action()
        except BaseException:
            os._exit(1)
        os.write(write_end, "".join(events).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    out = os.read(read_end, 10000)
    os.close(read_end)
    code = os.waitstatus_to_exitcode(status)
    if code == KILLED:
        return "killed"
    assert code == 0, f"operation failed in the child (exit {code})"
    return out.decode()


@pytest.fixture(scope="module", params=["luks1", "luks2"])
def base(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    luks = request.param
    img = tmp_path_factory.mktemp(luks) / "base.img"
    kdf = PBKDF2 if luks == "luks1" else ARGON
    # Small containers keep the ~100 copies per test cheap; LUKS2 gets a
    # keyslots area with room for three areas, its data at 1 MiB.
    if luks == "luks1":
        opts = FormatOptions(type="luks1", kdf=kdf, size=3 << 20)
    else:
        opts = FormatOptions(type="luks2", kdf=kdf, size=2 << 20, keyslots_size=240 * 4096)
    manage.format_container(str(img), A, opts, confirm=lambda _: True)
    manage.add_key(str(img), A, B, kdf=kdf)
    with open(img, "r+b") as f:  # recognisable data area contents
        f.seek(data_offset(luks))
        f.write(os.urandom(1 << 20))
    return luks, img


def data_offset(luks: str) -> int:
    return 2 << 20 if luks == "luks1" else 1 << 20


def data_area(img: Path, luks: str) -> bytes:
    return img.read_bytes()[data_offset(luks) :]


OPERATIONS = ["add-key", "change-key", "change-key-slot", "remove-key", "kill-slot", "uuid"]


def make_action(op: str, img: str, kdf: KdfOptions) -> Callable[[], object]:
    if op == "add-key":
        return lambda: manage.add_key(img, A, C, kdf=kdf)
    if op == "change-key":
        return lambda: manage.change_key(img, B, C, kdf=kdf)
    if op == "change-key-slot":  # keeps B's slot number
        return lambda: manage.change_key(img, B, C, kdf=kdf, key_slot=1)
    if op == "remove-key":
        return lambda: manage.remove_key(img, B, confirm_last=lambda _: False)
    if op == "kill-slot":
        return lambda: manage.kill_slot(img, 1, passphrase=None, confirm_last=lambda _: False)
    return lambda: manage.set_uuid(img, None)


@pytest.mark.parametrize("op", OPERATIONS)
def test_crash_at_every_write(base: tuple[str, Path], op: str, tmp_path: Path) -> None:
    luks, source = base
    kdf = PBKDF2 if luks == "luks1" else ARGON
    img = tmp_path / "c.img"
    shutil.copyfile(source, img)
    data_before = data_area(source, luks)
    events = run_killed(make_action(op, str(img), kdf), None, False)
    assert "w" in events and "f" in events
    # the completed operation's end state
    assert opens(img, A)
    expect_b = op in ("add-key", "uuid")
    expect_c = op in ("add-key", "change-key", "change-key-slot")
    assert opens(img, B) == expect_b and opens(img, C) == expect_c
    checked = 0
    for kill_at, kind in enumerate(events, 1):
        # A torn fsync is the same as a kill before it: tear writes only.
        for torn in (False, True) if kind == "w" else (False,):
            shutil.copyfile(source, img)
            assert run_killed(make_action(op, str(img), kdf), kill_at, torn) == "killed"
            assert opens(img, A), f"{op}: untouched keyslot lost (event {kill_at}, torn={torn})"
            if op.startswith("change-key"):
                assert opens(img, B) or opens(img, C), (
                    f"change-key lost both passphrases at event {kill_at}"
                )
            if op == "add-key":
                assert opens(img, B)
            assert data_area(img, luks) == data_before
            checked += 1
    assert checked == len(events) + events.count("w")
