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
