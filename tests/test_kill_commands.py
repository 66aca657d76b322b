"""``kill -9`` of the real ``cryptfuse`` process during format, add-key, change-key, convert.

tests/test_crash_safety.py, tests/test_convert.py and tests/test_reencrypt*.py stop
those operations *in-process* at every ``os.pwrite``/``os.fsync`` (and tear every
write); reencryption is also SIGKILLed for real, offline and online.  What they
cannot see is a write made some other way (a buffered file object, ``mmap``, a
library) or a process killed between two system calls of one step.  Here the real
command is SIGKILLed: half the time at a uniformly random moment of an
uninterrupted run's duration, half the time in its writing phase (a random delay
after the container's mtime first changes, within that phase's measured length).

The rule after every kill:

* add-key (A opens, adds C), change-key (B -> C), convert (LUKS1 <-> LUKS2): the
  untouched passphrase A opens, B (or, for change-key, B or C) opens, and the
  plaintext of the volume is unchanged;  cryptsetup agrees (``open
  --test-passphrase`` with A, on a copy: it repairs LUKS2 header copies);
* format (over an existing container, new passphrase F): opening with F either
  works, and then cryptsetup opens it with F too, or fails with a clear
  :class:`CryptfuseError`: never anything else.

``make test`` kills each operation once (``KILL_COMMAND_ROUNDS``); ``make
test-kill`` six times each.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_crash_safety import opens

from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import OpenOptions, Secret, manage, open_volume
from cryptfuse.formats.manage import FormatOptions, KdfOptions

A, B, C, F = b"keep-this-one", b"old-passphrase", b"new-passphrase", b"formatted"
KDF = KdfOptions(pbkdf="pbkdf2", force_iterations=1000)
KDF_ARGS = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
MiB = 1 << 20


def plaintext(img: Path, passphrase: bytes) -> bytes:
    with open_volume(str(img), OpenOptions(readonly=True), Secret(passphrase)) as v:
        return v.read(0, v.size)


def cryptsetup_opens(img: Path, passphrase: bytes, work: Path) -> bool:
    copy = work / "oracle.img"
    shutil.copyfile(img, copy)
    key = work / "oracle.key"
    key.write_bytes(passphrase)
    result = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key), str(copy)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LUKS1 and LUKS2 containers: A in slot 0, B in slot 1, random plaintext."""
    out = {}
    for luks in ("luks1", "luks2"):
        img = tmp_path_factory.mktemp(luks) / "base.img"
        if luks == "luks1":
            opts = FormatOptions(type=luks, kdf=KDF, size=3 * MiB)
        else:  # the default layout (data at 16 MiB), 512-byte sectors: convertible
            opts = FormatOptions(type=luks, kdf=KDF, size=20 * MiB, sector_size=512)
        manage.format_container(str(img), A, opts, confirm=lambda _: True)
        manage.add_key(str(img), A, B, kdf=KDF)
        with open_volume(str(img), OpenOptions(), Secret(A)) as v:
            v.write(0, os.urandom(v.size))
            v.sync()
        out[luks] = img
    return out


CASES = {
    "format": ("luks2", ["format", "-q", "--type", "luks2", *KDF_ARGS, "--key-file", "F", "IMG"]),
    "add-key": ("luks2", ["add-key", *KDF_ARGS, "--key-file", "A", "IMG", "C"]),
    "change-key": ("luks1", ["change-key", *KDF_ARGS, "--key-file", "B", "IMG", "C"]),
    "convert-to-luks1": ("luks2", ["convert", "-q", "--type", "luks1", "IMG"]),
    "convert-to-luks2": ("luks1", ["convert", "-q", "--type", "luks2", "IMG"]),
}


def stamp(img: Path) -> tuple[int, int, int]:
    st = os.stat(img)
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size


def run(
    argv: list[str], env: dict[str, str], img: Path, kill_after: float | None, in_writes: bool
) -> tuple[bool, float, float]:
    """Run the command; kill it *kill_after* seconds after its start (or, with
    *in_writes*, after its first change to *img*).  Returns (killed, seconds to the
    first change, seconds from it to the end) -- the last two of a whole run."""
    before = stamp(img)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryptfuse", *argv], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    changed = None
    while proc.poll() is None:
        now = time.monotonic()
        if changed is None and stamp(img) != before:
            changed = now
        if kill_after is not None:
            base = changed if in_writes else start
            if base is not None and now >= base + kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True, 0.0, 0.0
        time.sleep(0.0002)
    end = time.monotonic()
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    first = (changed or end) - start
    return False, first, end - (changed or end)


def completed(op: str, img: Path, work: Path) -> None:
    """The end state of a run that was not killed."""
    if op == "format":
        assert opens(img, F) and not opens(img, A) and cryptsetup_opens(img, F, work)
    elif op == "add-key":
        assert opens(img, C)
    elif op == "change-key":
        assert opens(img, C) and not opens(img, B)
    else:
        version = 1 if op == "convert-to-luks1" else 2
        assert img.read_bytes()[6:8] == version.to_bytes(2, "big")


def check(op: str, img: Path, before: bytes, work: Path) -> None:
    if op == "format":
        try:
            data = plaintext(img, F)
        except CryptfuseError as exc:
            assert str(exc) and "\n" not in str(exc), repr(exc)
            return
        assert len(data) > 0
        assert cryptsetup_opens(img, F, work), "cryptfuse opens it with F, cryptsetup does not"
        return
    assert opens(img, A), f"{op}: the untouched passphrase no longer opens"
    if op == "change-key":
        assert opens(img, B) or opens(img, C), "change-key lost both passphrases"
    else:
        assert opens(img, B)
    assert plaintext(img, A) == before, f"{op}: the volume's content changed"
    assert cryptsetup_opens(img, A, work), "cryptsetup no longer opens it with A"


@pytest.mark.parametrize("op", list(CASES))
def test_killed_command(
    op: str, bases: dict[str, Path], tmp_path: Path, cli_env: dict[str, str]
) -> None:
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup not installed")
    luks, template = CASES[op]
    img = tmp_path / "c.img"
    files = {"IMG": img}
    for name, secret in (("A", A), ("B", B), ("C", C), ("F", F)):
        files[name] = tmp_path / name
        files[name].write_bytes(secret)
    argv = [str(files.get(a, a)) for a in template]
    before = plaintext(bases[luks], A)
    shutil.copyfile(bases[luks], img)
    _, first, writing = run(argv, cli_env, img, None, False)  # the whole run, timed
    check(op, img, before, tmp_path)
    completed(op, img, tmp_path)
    rounds = int(os.environ.get("KILL_COMMAND_ROUNDS", "1"))
    rng = random.Random(os.environ.get("KILL_SEED", op))
    killed = 0
    for n in range(rounds):
        shutil.copyfile(bases[luks], img)
        in_writes = n % 2 == 0
        delay = rng.uniform(0, writing) if in_writes else rng.uniform(0, first + writing)
        was_killed = run(argv, cli_env, img, delay, in_writes)[0]
        check(op, img, before, tmp_path)
        if not was_killed:
            completed(op, img, tmp_path)
        killed += was_killed
    print(f"{op}: {killed}/{rounds} runs killed (first write after {first:.2f} s, "
          f"writing for {writing * 1000:.0f} ms)")  # fmt: skip
