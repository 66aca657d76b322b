"""``-o`` with crypttab's names (mount(8), fstab), the man page, the completion, the
systemd examples: everything that needs no mount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cryptfuse.cli import build_parser, main
from cryptfuse.errors import UnsupportedError, UsageError
from cryptfuse.formats import TYPES
from cryptfuse.mount_options import apply, parse, split_options


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a,b=c", ["a", "b=c"], id="plain"),
        pytest.param(
            'fs-options="noatime,nodev",ro', ["fs-options=noatime,nodev", "ro"], id="quoted"
        ),
        pytest.param(r"fsname=a\,b,x", [r"fsname=a\,b", "x"], id="escaped-comma"),
        pytest.param(",,a,,", ["a"], id="empty"),
    ],
)
def test_split_options(text: str, expected: list[str]) -> None:
    assert split_options(text) == expected


def test_split_unbalanced_quote() -> None:
    with pytest.raises(UsageError, match="unbalanced"):
        split_options('fs-options="noatime')


def test_crypttab_names_map_to_options() -> None:
    parsed = parse(
        [
            "plain,cipher=aes-xts-plain64,size=512,hash=sha512,offset=8,skip=0x10",
            "sector-size=4096,keyfile-offset=3,keyfile-size=64,header=/h,key-slot=2",
            "read-only,discard,key-file=/k,mount-fs=/d,fs-type=xfs",
            'fs-options="noatime,nodev",allow_other,uid=5',
        ]
    )
    assert parsed.settings == {
        "type": "plain",
        "cipher": "aes-xts-plain64",
        "key_size": 512,  # crypttab's size= is the key size in bits
        "hash": "sha512",
        "offset": 8,
        "skip": 16,
        "sector_size": 4096,
        "keyfile_offset": 3,
        "keyfile_size": 64,
        "header": "/h",
        "key_slot": 2,
        "readonly": True,
        "allow_discards": True,
        "key_file": "/k",
        "mount_fs": "/d",
        "fs_type": "xfs",
        "fs_options": "noatime,nodev",
    }
    assert parsed.fuse == ["allow_other", "uid=5"]


def test_mount8_options_are_dropped() -> None:
    own = "rw,dev,suid,exec,defaults,auto,noauto,nofail,_netdev,user,users,nouser,owner,group"
    parsed = parse([own + ",x-systemd.automount,x-systemd.device-timeout=5,x-foo,comment=hi"])
    assert parsed.fuse == [] and parsed.settings == {}
    assert len(parsed.dropped) == 18
    # what FUSE itself takes passes: nodev, nosuid, noexec, ro, allow_other, fsname
    assert parse(["nodev,nosuid,noexec,ro,allow_other"]).fuse == [
        "nodev", "nosuid", "noexec", "ro", "allow_other",
    ]  # fmt: skip


@pytest.mark.parametrize("option", ["passphrase=x", "password=x", "key=00ff", "volume-key=aa"])
def test_secrets_refused(option: str) -> None:
    with pytest.raises(UsageError, match="never goes on the command line"):
        parse([f"luks,{option}"])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["size=abc"], "invalid number"),
        (["offset=-1"], "negative"),
        (["cipher"], "needs a value"),
        (["luks,plain"], "contradicts"),
        (["readonly,readonly"], None),  # the same twice is fine
    ],
)
def test_bad_values(options: list[str], match: str | None) -> None:
    if match is None:
        assert parse(options).settings == {"readonly": True}
        return
    with pytest.raises(UsageError, match=match):
        parse(options)


def test_apply_sets_the_namespace_and_checks_flags() -> None:
    parser = build_parser()
    defaults = parser.parse_args(["c", "m"])
    args = parser.parse_args(["c", "m", "-o", "plain,size=256,allow_other", "-o", "discard"])
    apply(args, parse(args.fuse_options), defaults, TYPES)
    assert (args.type, args.key_size, args.allow_discards) == ("plain", 256, True)
    assert args.fuse_options == ["allow_other"]
    # a flag and a different -o value contradict; the same value is fine
    args = parser.parse_args(["c", "m", "--key-size", "512", "-o", "size=256"])
    with pytest.raises(UsageError, match="contradicts --key-size 512"):
        apply(args, parse(args.fuse_options), defaults, TYPES)
    args = parser.parse_args(["c", "m", "--key-size", "256", "-o", "size=256"])
    apply(args, parse(args.fuse_options), defaults, TYPES)


@pytest.mark.parametrize("kind", ["tcrypt", "bitlk"])
def test_types_this_build_cannot_open(kind: str) -> None:
    parser = build_parser()
    args = parser.parse_args(["c", "m", "-o", kind])
    if kind in TYPES:  # supported in this build: mapped to --type
        apply(args, parse(args.fuse_options), parser.parse_args(["c", "m"]), TYPES)
        assert args.type == kind
        return
    with pytest.raises(UnsupportedError, match=f"cannot open {kind} containers"):
        apply(args, parse(args.fuse_options), parser.parse_args(["c", "m"]), TYPES)


def test_passphrase_in_o_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    container = tmp_path / "c.img"
    container.write_bytes(b"\0" * 4096)
    code = main([str(container), str(tmp_path), "-o", "plain,passphrase=hunter2"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "never goes on the command line" in err
    assert "hunter2" not in err
    assert container.read_bytes() == b"\0" * 4096


def test_mount_fs_checks_before_the_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    container = tmp_path / "c.img"
    container.write_bytes(b"\0" * 4096)
    (tmp_path / "m").mkdir()
    code = main([str(container), str(tmp_path / "m"), "--type", "plain",
                 "--mount-fs", str(tmp_path / "missing")])  # fmt: skip
    assert code == 1
    assert "not an existing directory" in capsys.readouterr().err
    code = main([str(container), str(tmp_path / "m"), "--mount-fs", str(tmp_path), "-f"])
    assert code == 1


def test_close_of_something_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["close", str(tmp_path)]) == 4
    assert "not an active cryptfuse mount" in capsys.readouterr().err


# -- the man page, the completion, packaging, systemd -----------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _normalized(page: str) -> str:
    return re.sub(r'^\.TH (\S+) "8" "[^"]*"', r'.TH \1 "8" DATE', page, flags=re.M)


def test_man_page_is_generated_from_the_parser() -> None:
    pytest.importorskip("argparse_manpage")
    result = subprocess.run(
        [sys.executable, str(ROOT / "man" / "generate.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    committed = (ROOT / "man" / "cryptfuse.8").read_text()
    assert _normalized(result.stdout) == _normalized(committed), (
        "man/cryptfuse.8 is stale: run `make man`"
    )
    for option in ("--mount-fs", "--fs-type", "--key-file", "--type"):
        assert option.replace("-", r"\-") in committed
    assert "cryptfuse close" in committed.replace(r"\fR", "").replace(r"\fB", "")


def test_wheel_installs_man_page_and_completion(tmp_path: Path) -> None:
    """`pip install` puts cryptfuse(8) and the completion under share/ (a wheel built
    without the C accelerators: CC=false makes them fail, and they are optional; from a
    copy of the sources, so the checkout's build/ and egg-info stay untouched)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    for name in ("cryptfuse", "man", "completion"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CC": "false"},
        timeout=300,
    )
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no setuptools/wheel reachable for the isolated build")
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("cryptfuse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/data/share/man/man8/cryptfuse.8") for n in names)
    assert any(n.endswith(".data/data/share/bash-completion/completions/cryptfuse") for n in names)


def _complete(queries: list[list[str]], cwd: Path) -> list[list[str]]:
    """COMPREPLY for each command line (the cursor on its last word), in one bash so the
    completion's cache of `cryptfuse --help` is shared."""
    lines = [
        f'cryptfuse() {{ {sys.executable} -m cryptfuse "$@"; }}',
        f"source {ROOT / 'completion' / 'cryptfuse'}",
    ]
    for words in queries:
        quoted = " ".join(f"'{w}'" for w in words)
        lines += [
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=()",
            '_cryptfuse; echo "${COMPREPLY[*]}"',
        ]
    result = subprocess.run(
        ["bash", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    return [line.split() for line in result.stdout.splitlines()]


def test_bash_completion(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash not installed")
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    cases = [
        (["cryptfuse", "clo"], ["close"]),
        (["cryptfuse", "--mount-"], ["--mount-fs"]),
        (["cryptfuse", "close", "--"], ["--deferred", "--help"]),
        (["cryptfuse", "--type", ""], sorted(TYPES)),
        (["cryptfuse", "--type", "plain", "di"], ["dir", "disk.img"]),
        # the second argument is the mountpoint: directories only
        (["cryptfuse", "disk.img", ""], ["dir"]),
        (["cryptfuse", "disk.img", "dir", "--mount-fs", ""], ["dir"]),
    ]
    got = _complete([words for words, _ in cases] + [["cryptfuse", "format", "--pb"]], tmp_path)
    assert [sorted(g) for g in got[:-1]] == [expected for _, expected in cases]
    assert "--pbkdf" in got[-1]


def test_systemd_examples_verify(tmp_path: Path) -> None:
    """examples/: the units pass `systemd-analyze verify` (with ExecStart pointing at this
    checkout's cryptfuse instead of /usr/local/sbin, which may not be installed here)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    units = sorted((ROOT / "examples").glob("*.service")) + sorted(
        (ROOT / "examples").glob("*.mount")
    )
    assert units, "no systemd example units in examples/"
    exe = shutil.which("cryptfuse") or str(Path(sys.executable).parent / "cryptfuse")
    for unit in units:
        text = unit.read_text().replace("/usr/local/sbin/cryptfuse", exe)
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(tmp_path) in line or "cryptfuse" in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
