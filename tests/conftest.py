"""Shared fixtures and markers.

Markers (skipped with the reason when the machine cannot run them):

* ``root`` -- needs uid 0 (losetup, mount, mkfs on loop devices).
* ``fuse`` -- needs a usable ``/dev/fuse`` and ``fusermount3``.

Fixtures: ``repo`` (the checkout), ``corpus`` (``../shared/corpus`` next to the
checkout; skips when absent), ``cli_env`` (environment for ``python -m
cryptfuse`` subprocesses that imports this checkout).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


def fuse_unavailable_reason() -> str | None:
    """Why FUSE mounts cannot work here, or None when they can."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse unusable: {exc.strerror}"
    os.close(fd)
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root (loop devices, mount)")
    config.addinivalue_line("markers", "fuse: needs /dev/fuse and fusermount3")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    not_root = None if os.geteuid() == 0 else "needs root"
    no_fuse = fuse_unavailable_reason()
    for item in items:
        if not_root and item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason=not_root))
        if no_fuse and item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.skip(reason=no_fuse))


@pytest.fixture(scope="session")
def repo() -> Path:
    """The root of the checkout under test."""
    return REPO


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared interoperability corpus (read-only: copy files before use)."""
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running ``python -m cryptfuse`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    env["LC_ALL"] = "C.UTF-8"
    return env


@pytest.fixture(scope="session", autouse=True)
def sanitized_build() -> None:
    """Under ``make test-sanitize``/``make test-tsan``: the sanitized build is what runs.

    ``tests/sanitize/run`` sets ``CRYPTFUSE_SANITIZER`` (``asan`` or ``tsan``); then
    every listed extension module must come from ``CRYPTFUSE_SANITIZED_DIR`` and the
    sanitizer runtime must be loaded in this process (LD_PRELOAD), else the run would
    silently test the ordinary build.  Does nothing otherwise.
    """
    mode = os.environ.get("CRYPTFUSE_SANITIZER")
    if not mode:
        return
    import importlib

    where = Path(os.environ["CRYPTFUSE_SANITIZED_DIR"]).resolve()
    names = [n for n in os.environ["CRYPTFUSE_SANITIZED_MODULES"].split(",") if n]
    assert names, "CRYPTFUSE_SANITIZED_MODULES is empty"
    for name in names:
        module = importlib.import_module(f"cryptfuse.{name}")
        loaded = Path(module.__file__ or "").resolve()
        assert loaded.parent.parent == where, f"cryptfuse.{name} came from {loaded}, not {where}"
    runtime = {"asan": "libasan.so", "tsan": "libtsan.so"}[mode]
    maps = Path("/proc/self/maps").read_text()
    assert runtime in maps, f"{runtime} is not loaded in the test process (LD_PRELOAD?)"
