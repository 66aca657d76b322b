"""Test fixture: I/O faults injected under the daemon by an ``LD_PRELOAD`` shim.

``tests/faults/faultshim.c`` wraps ``pread``/``pwrite``/``preadv``/``pwritev`` (and
their 64/v2 forms), ``fsync`` and ``fdatasync``; it is built once per test session
with ``gcc`` and preloaded into the daemon only (the environment of the mount
command).  A :class:`Faults` object writes its control file: which file to hurt, and
rules such as ``read EIO 4096 8192`` (reads of the container meeting that byte range
fail with EIO) or ``write short 0 1048576 3`` (the next three writes there transfer
only half).  The shim logs every fault it injects, so a test can check that the fault
it meant really happened.  See docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "faults" / "faultshim.c"


def build_shim(directory: Path) -> Path:
    """Compile the shim into *directory*; returns the library's path."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not installed")
    out = directory / "faultshim.so"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Werror",
            "-o",
            str(out),
            str(SOURCE),
            "-ldl",
            "-lpthread",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


class Faults:
    """The shim's control file for one *target* file, and its log."""

    def __init__(self, shim: Path, directory: Path, target: Path) -> None:
        self.shim = shim
        self.control = directory / "faults.ctl"
        self.log = directory / "faults.log"
        self.target = target
        self.set()

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """*base* with the shim preloaded (after whatever is preloaded already)."""
        env = dict(base)
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        env["LD_PRELOAD"] = ":".join([*preload, str(self.shim)])
        env["CRYPTFUSE_FAULTS"] = str(self.control)
        return env

    def set(self, *rules: str) -> None:
        """Replace the rules (atomically: the shim re-reads the file when it changes)."""
        text = f"target {self.target}\nlog {self.log}\n" + "".join(f"{r}\n" for r in rules)
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.control)

    def clear(self) -> None:
        """No more faults."""
        self.set()

    def hits(self) -> list[tuple[str, int, int, int]]:
        """The faults injected so far: (op, errno or 0 for short, offset, length)."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            op, err, off, length = line.split()
            out.append((op, int(err), int(off), int(length)))
        return out
