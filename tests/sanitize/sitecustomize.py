"""Import hook for ``make test-sanitize`` / ``make test-tsan`` (docs/sanitizers.md).

``tests/sanitize/run`` puts this directory first on ``PYTHONPATH``, so every Python
process of the run (pytest, the ``python -m cryptfuse`` processes the tests start and
the daemons they fork) imports this module at startup.  With
``CRYPTFUSE_SANITIZED_DIR`` and ``CRYPTFUSE_SANITIZED_MODULES`` set, the listed
extension modules (e.g. ``_fastpath,_xts``) are loaded from the sanitizer build in
that directory instead of the in-place build next to the sources, which
``PYTHONPATH=<checkout>`` and the editable install would otherwise find first.  A
listed module missing from the sanitizer build is an ImportError, never a silent
fallback.  Each load is recorded in ``$CRYPTFUSE_SANITIZER_LOGS/loads`` (pid, module,
file), so the run can show which processes used the sanitized code.

The sanitizer runtime has to be loaded before the (uninstrumented) interpreter, with
``LD_PRELOAD``, but only into Python processes: preloaded into ``qemu-img`` (whose
coroutines switch stacks) ASan hangs it, and other tools the tests run are none of
our business.  So the runner passes the runtime in ``CRYPTFUSE_SANITIZER_PRELOAD``,
and here a Python process without it re-executes itself with ``LD_PRELOAD`` set
(the runtime first, then any library that was preloaded already, such as the fault
injector of ``tests/test_faults.py``), and one with it removes the runtime from
``LD_PRELOAD`` in its environment, which its children inherit.

Without those variables this does nothing; any other ``sitecustomize`` further down
``sys.path`` (Debian's, for one) still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

_DIR = os.environ.get("CRYPTFUSE_SANITIZED_DIR", "")
_MODULES = {
    f"cryptfuse.{name.strip()}"
    for name in os.environ.get("CRYPTFUSE_SANITIZED_MODULES", "").split(",")
    if name.strip()
}
_LOGS = os.environ.get("CRYPTFUSE_SANITIZER_LOGS", "")


def sanitized_path(fullname: str) -> str:
    """Where the sanitizer build of the extension *fullname* lives."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return os.path.join(_DIR, *fullname.split(".")) + suffix


class SanitizedExtensions(importlib.abc.MetaPathFinder):
    """Finds the listed ``cryptfuse`` extension modules in the sanitizer build only."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MODULES:
            return None
        file = sanitized_path(fullname)
        if not os.path.isfile(file):
            raise ImportError(f"sanitizer build of {fullname} missing: {file}", name=fullname)
        if _LOGS:
            with open(os.path.join(_LOGS, "loads"), "a") as log:
                log.write(f"{os.getpid()} {fullname} {file}\n")
        loader = importlib.machinery.ExtensionFileLoader(fullname, file)
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def _preload() -> None:
    """Have the sanitizer runtime in this process, and keep it out of the children's env."""
    runtimes = [lib for lib in os.environ.get("CRYPTFUSE_SANITIZER_PRELOAD", "").split(":") if lib]
    if not runtimes:
        return
    with open("/proc/self/maps") as f:
        maps = f.read()
    # Other preloaded libraries (the fault injector of tests/test_faults.py) stay, after
    # the runtime, which must come first.
    real = {os.path.realpath(lib) for lib in runtimes}
    others = [
        lib
        for lib in os.environ.get("LD_PRELOAD", "").split(":")
        if lib and os.path.realpath(lib) not in real
    ]
    if not all(os.path.realpath(lib) in maps for lib in runtimes):
        env = dict(os.environ, LD_PRELOAD=":".join(runtimes + others))
        os.execve(sys.executable, sys.orig_argv, env)
    if others:
        os.environ["LD_PRELOAD"] = ":".join(others)
    else:
        os.environ.pop("LD_PRELOAD", None)
    ubsan = [lib for lib in runtimes if os.path.basename(lib).startswith("libubsan")]
    if ubsan and _LOGS:
        # With ASan loaded too, libubsan's start-up call to __sanitizer_set_report_path
        # binds to libasan's copy (the first definition), and UBSan's own reports go to
        # stderr, which is /dev/null in a daemon.  dlsym on libubsan's handle reaches its
        # own copy; a forked child reopens the file under its own pid.
        import ctypes

        path = os.path.join(_LOGS, "ubsan").encode()
        ctypes.CDLL(ubsan[0]).__sanitizer_set_report_path(path)


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if _DIR and _MODULES:
    _preload()
    sys.meta_path.insert(0, SanitizedExtensions())
_chain()
