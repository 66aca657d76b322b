"""Opening a LUKS2 container through its ``luks2-keyring`` tokens, against cryptsetup
2.6.1's ``open --test-passphrase`` (which keyslot a token opens, or why none does), on
containers whose keyslots, priorities and tokens cryptsetup made at test time, with
passphrases put in the kernel keyring here.

The tests join a new anonymous session keyring first, so their keys are seen by this
process and its children (cryptsetup, the daemon) and by nothing else; they skip where
the kernel keyring is not available (a seccomp filter, as in Docker's default profile).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from seeding import seeded_rng

from cryptfuse.cli import build_parser, main, open_by_token
from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.keyring import user_key

CRYPTSETUP = shutil.which("cryptsetup")
CHEAP_PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
ADD_KEY, KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}.get(platform.machine(), (0, 0))
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_INVALIDATE = 1, 21
KEY_SPEC_SESSION_KEYRING = -3

pytestmark = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")


@pytest.fixture(scope="module")
def session_keyring() -> None:
    if not ADD_KEY:
        pytest.skip(f"no keyring system call numbers for {platform.machine()} in this test")
    if _libc.syscall(KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        pytest.skip(f"kernel keyring unavailable: {os.strerror(ctypes.get_errno())}")


def put_key(description: str, payload: bytes) -> int:
    serial = _libc.syscall(
        ADD_KEY, b"user", description.encode(), payload, len(payload), KEY_SPEC_SESSION_KEYRING
    )
    if serial < 0:
        pytest.skip(f"cannot add a key to the kernel keyring: {os.strerror(ctypes.get_errno())}")
    return int(serial)


def drop_key(serial: int) -> None:
    _libc.syscall(KEYCTL, KEYCTL_INVALIDATE, ctypes.c_long(serial))


def cs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CRYPTSETUP or "", *args], capture_output=True, text=True, cwd=cwd,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def args_for(img: Path, *options: str) -> argparse.Namespace:
    return build_parser().parse_args([*options, str(img), "/nonexistent-mountpoint"])


def ours(img: Path, *options: str) -> tuple[int, int | None]:
    """(exit code, keyslot) of cryptfuse's token open with *options*."""
    try:
        volume = open_by_token(args_for(img, *options), None)
    except CryptfuseError as exc:
        return exc.exit_code, None
    if volume is None:
        return 0, None
    try:
        return 0, volume.key_slot
    finally:
        volume.close()


def theirs(img: Path, *options: str, token_only: bool = True) -> tuple[int, int | None]:
    """The same of ``cryptsetup open --test-passphrase [--token-only] -v``."""
    only = ["--token-only"] if token_only else []
    r = cs("open", "--test-passphrase", *only, "-v", *options, str(img), cwd=img.parent)
    slots = [int(line.split()[2]) for line in r.stdout.splitlines() if line.endswith("unlocked.")]
    return r.returncode, slots[0] if slots else None


def run_test_passphrase(img: Path, *options: str) -> tuple[int, int | None]:
    """The same of ``cryptfuse --test-passphrase -v`` (a subprocess: the keyring is
    inherited)."""
    r = subprocess.run(
        [sys.executable, "-m", "cryptfuse", "--test-passphrase", "-v", *options, str(img)],
        capture_output=True, text=True, cwd=img.parent, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )  # fmt: skip
    assert "Traceback" not in r.stderr
    slots = [int(line.split()[3]) for line in r.stderr.splitlines() if "unlocked" in line]
    return r.returncode, slots[0] if slots else None


def test_user_key_reads_the_keyring(session_keyring: None) -> None:
    name = f"cryptfuse-test:{uuid.uuid4()}"
    serial = put_key(name, b"payload\x00bytes")
    try:
        assert user_key(name) == b"payload\x00bytes"
    finally:
        drop_key(serial)
    with pytest.raises(OSError) as err:
        user_key(name)
    assert err.value.errno in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED)


def test_random_token_opens_like_cryptsetup(session_keyring: None, tmp_path: Path) -> None:
    """Random keyslots (priorities prefer/normal/ignore, one unbound at times), random
    luks2-keyring tokens (keyslot lists in random order; keys in the keyring right,
    wrong or missing), a token of a plugin's type, and random ``--token-id`` /
    ``--token-type``: cryptfuse opens the keyslot cryptsetup opens, or fails with its
    exit code; so does ``--test-passphrase`` with ``--key-slot``, ``--unbound`` and a
    key file to fall back on. Replay with CRYPTFUSE_TEST_SEED."""
    rng = seeded_rng()
    tag = uuid.uuid4().hex[:8]
    serials: list[int] = []
    try:
        for case in range(8):
            img = tmp_path / f"c{case}.img"
            with open(img, "wb") as f:
                f.truncate(20 << 20)
            n = rng.randrange(2, 5)
            secrets = [f"pass-{case}-{i}".encode() for i in range(n)]
            keys = []
            for i, secret in enumerate(secrets):
                keys.append(tmp_path / f"k{case}-{i}")
                keys[-1].write_bytes(secret)
            assert not cs("luksFormat", "-q", "--type", "luks2", *CHEAP_PBKDF2, str(img),
                          str(keys[0]), cwd=tmp_path).returncode  # fmt: skip
            for i in range(1, n):
                extra = ["--unbound", "--key-size", "256"] if rng.random() < 0.15 else []
                assert not cs("luksAddKey", "-q", *CHEAP_PBKDF2, *extra, "-d", str(keys[0]),
                              str(img), str(keys[i]), cwd=tmp_path).returncode  # fmt: skip
            for i in range(n):
                priority = rng.choice(["normal", "normal", "prefer", "ignore"])
                cs("config", "--priority", priority, "--key-slot", str(i), str(img), cwd=tmp_path)
            descriptions = []
            for t in range(rng.randrange(1, 4)):
                description = f"cryptfuse-test:{tag}:{case}:{t}"
                descriptions.append(description)
                slots = rng.sample(range(n), rng.randrange(0, n + 1))  # in a random order
                token = tmp_path / "t.json"
                token.write_text(json.dumps({
                    "type": "luks2-keyring", "keyslots": [str(x) for x in slots],
                    "key_description": description}))  # fmt: skip
                assert not cs("token", "import", "--json-file", str(token), str(img),
                              cwd=tmp_path).returncode  # fmt: skip
                which = rng.random()
                if which < 0.6:
                    serials.append(put_key(description, rng.choice(secrets)))
                elif which < 0.8:
                    serials.append(put_key(description, b"wrong"))
            if rng.random() < 0.5:
                plugin = tmp_path / "plugin.json"
                plugin.write_text('{"type":"systemd-tpm2","keyslots":["0"]}')
                cs("token", "import", "--json-file", str(plugin), str(img), cwd=tmp_path)
            variants = [[], ["--token-type", "luks2-keyring"], ["--token-type", "systemd-tpm2"],
                        ["--token-id", str(rng.randrange(4))]]  # fmt: skip
            for options in variants:
                code, slot = theirs(img, *options)
                mine = ours(img, "--token-only", *options)
                assert mine == (code, slot), (case, options)
            # --test-passphrase itself: --key-slot and --unbound let unbound keyslots
            # count, a key file is the fallback when no token opens
            key = str(rng.choice(keys))
            for options in [["--token-only", "--unbound"],
                            ["--token-only", "-S", str(rng.randrange(n))],
                            ["-d", key], ["-d", key, "-S", str(rng.randrange(n))],
                            ["-d", key, "--unbound", *rng.choice(variants)]]:  # fmt: skip
                expected = theirs(img, *options, token_only=False)
                assert run_test_passphrase(img, *options) == expected, (case, options)
    finally:
        for serial in serials:
            drop_key(serial)


def test_token_open_falls_back_to_the_passphrase(
    session_keyring: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --token-only a token that opens nothing leaves the passphrase to open
    (cryptsetup's fallback); with a key file given, a token is still tried first."""
    img = tmp_path / "c.img"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    key, other = tmp_path / "k", tmp_path / "k2"
    key.write_bytes(b"first")
    other.write_bytes(b"second")
    assert not cs("luksFormat", "-q", "--type", "luks2", *CHEAP_PBKDF2, str(img), str(key),
                  cwd=tmp_path).returncode  # fmt: skip
    assert not cs("luksAddKey", "-q", *CHEAP_PBKDF2, "-d", str(key), str(img), str(other),
                  cwd=tmp_path).returncode  # fmt: skip
    description = f"cryptfuse-test:{uuid.uuid4()}"
    assert not cs("token", "add", "--key-description", description, "--key-slot", "1",
                  str(img), cwd=tmp_path).returncode  # fmt: skip
    assert open_by_token(args_for(img), None) is None  # no key in the keyring yet
    assert ours(img, "--token-only") == theirs(img) == (2, None)
    serial = put_key(description, b"second")
    try:
        volume = open_by_token(args_for(img, "-d", str(key)), None)
        assert volume is not None and volume.key_slot == 1
        volume.close()
    finally:
        drop_key(serial)
    empty = tmp_path / "mnt"
    empty.mkdir()
    for options in (["--token-only", "--type", "luks1"], ["--token-id", "0", "--type", "plain"]):
        assert main([*options, str(img), str(empty)]) == 1
        assert "are for LUKS2 containers" in capsys.readouterr().err


@pytest.mark.fuse
def test_mount_through_a_token(
    session_keyring: None, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """``cryptfuse CONTAINER MOUNTPOINT`` with no key file and nothing on stdin mounts
    through a luks2-keyring token whose key is in the (inherited) session keyring, and
    what is written there opens with the passphrase afterwards; ``--token-only``
    without the key fails in one line and leaves nothing mounted."""
    img, key = tmp_path / "c.img", tmp_path / "k"
    with open(img, "wb") as f:
        f.truncate(20 << 20)
    key.write_bytes(b"passphrase")
    assert not cs("luksFormat", "-q", "--type", "luks2", *CHEAP_PBKDF2, str(img), str(key),
                  cwd=tmp_path).returncode  # fmt: skip
    description = f"cryptfuse-test:{uuid.uuid4()}"
    assert not cs("token", "add", "--key-description", description, str(img),
                  cwd=tmp_path).returncode  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def cryptfuse(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cryptfuse", *argv], capture_output=True, text=True,
            stdin=subprocess.DEVNULL, env=cli_env, cwd=tmp_path, timeout=120,
        )  # fmt: skip

    r = cryptfuse("--token-only", str(img), str(mnt))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert not os.path.ismount(mnt)
    serial = put_key(description, b"passphrase")
    try:
        r = cryptfuse("-v", str(img), str(mnt))
        assert r.returncode == 0, r.stderr
        assert "unlocked by token 0" in r.stderr
    finally:
        drop_key(serial)
    try:
        payload = os.urandom(100_000)
        with open(mnt / "volume", "r+b") as vf:
            vf.seek(12345)
            vf.write(payload)
            os.fsync(vf.fileno())
    finally:
        assert cryptfuse("close", str(mnt)).returncode == 0
    with open_volume(str(img), OpenOptions(readonly=True), Secret(b"passphrase")) as volume:
        assert volume.read(12345, len(payload)) == payload


def test_test_passphrase_like_cryptsetup(tmp_path: Path) -> None:
    """``--test-passphrase`` against ``cryptsetup open --test-passphrase``, both exit
    code and the keyslot ``-v`` names: LUKS2 with an unbound keyslot and an *ignore*
    one (cryptsetup's last-keyslot error rule), ``--key-slot``/``--unbound``, volume
    key files, LUKS1, a lost primary header, and a container in reencryption (exit
    codes only: cryptsetup names a keyslot there, cryptfuse does not). Nothing is
    written."""

    def key(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    k0, k1, k2 = (key(f"k{i}", f"pass {i}".encode()) for i in range(3))
    wrong = key("w", b"x")
    img, luks1, reenc = tmp_path / "c.img", tmp_path / "l1.img", tmp_path / "r.img"
    for path in (img, luks1, reenc):
        with open(path, "wb") as f:
            f.truncate(20 << 20)
    assert not cs("luksFormat", "-q", "--type", "luks2", *CHEAP_PBKDF2, str(img), k0,
                  cwd=tmp_path).returncode  # fmt: skip
    assert not cs("luksAddKey", "-q", *CHEAP_PBKDF2, "--unbound", "--key-size", "256", "-d",
                  k0, str(img), k1, cwd=tmp_path).returncode  # fmt: skip
    assert not cs("luksAddKey", "-q", *CHEAP_PBKDF2, "-d", k0, str(img), k2,
                  cwd=tmp_path).returncode  # fmt: skip
    vk, bad_vk = str(tmp_path / "vk"), key("badvk", os.urandom(64))
    assert not cs("luksDump", "-q", "--dump-volume-key", "--volume-key-file", vk, "-d", k0,
                  str(img), cwd=tmp_path).returncode  # fmt: skip
    assert not cs("luksFormat", "-q", "--type", "luks1", *CHEAP_PBKDF2, str(luks1), k0,
                  cwd=tmp_path).returncode  # fmt: skip
    shutil.copyfile(img, reenc)
    assert not cs("reencrypt", "-q", "--init-only", *CHEAP_PBKDF2, "-d", k0, "-S", "0",
                  str(reenc), cwd=tmp_path).returncode  # fmt: skip
    cases = [
        (img, ["-d", k0]), (img, ["-d", k1]), (img, ["-d", k2]), (img, ["-d", wrong]),
        (img, ["-d", k1, "-S", "1"]), (img, ["-d", k2, "-S", "1"]), (img, ["-d", k1, "--unbound"]),
        (img, ["-d", k2, "-S", "7"]), (img, ["-d", k2, "-S", "40"]),
        (img, ["--volume-key-file", vk]), (img, ["--volume-key-file", bad_vk]),
        (luks1, ["-d", k0]), (luks1, ["-d", wrong]), (luks1, ["-d", k0, "-S", "3"]),
        (reenc, ["-d", k0]), (reenc, ["-d", wrong]),
    ]  # fmt: skip
    ignored = tmp_path / "ignore.img"
    shutil.copyfile(img, ignored)
    assert not cs("config", "--priority", "ignore", "-S", "2", str(ignored),
                  cwd=tmp_path).returncode  # fmt: skip
    cases += [(ignored, ["-d", k2]), (ignored, ["-d", wrong]), (ignored, ["-d", k2, "-S", "2"])]
    damaged = tmp_path / "damaged.img"  # the primary header lost: the secondary copy
    shutil.copyfile(img, damaged)
    with open(damaged, "r+b") as f:
        f.write(bytes(4096))
    cases += [(damaged, ["-d", k0]), (damaged, ["-d", wrong])]
    codes = set()
    for path, options in cases:
        before = path.read_bytes()
        theirs_copy = tmp_path / "theirs.img"  # (cryptsetup repairs a damaged copy)
        shutil.copyfile(path, theirs_copy)
        expected = theirs(theirs_copy, *options, token_only=False)
        got = run_test_passphrase(path, *options)
        codes.add(expected[0])
        if path == reenc:
            assert got[0] == expected[0], options
        else:
            assert got == expected, (path.name, options)
        assert path.read_bytes() == before
    assert codes == {0, 1, 2}  # successes, wrong passphrases and unusable keyslots
