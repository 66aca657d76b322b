"""Process-level secret hygiene: no core dumps, no inspection by the same user.

The daemon holds the volume key for as long as the volume is mounted.  Two things
could copy it out without any bug in cryptfuse:

* a core dump (a crash, ``kill -SEGV``, ``gcore``): ``RLIMIT_CORE`` 0 stops the
  dumps the kernel writes to a file, and a non-dumpable process is skipped for
  pipe handlers too unless ``fs.suid_dumpable`` is 2 (then only root may read it);
* another process of the same user: ``ptrace`` and ``/proc/PID/mem``, ``environ``,
  ``maps`` check "dumpable"; with ``PR_SET_DUMPABLE`` 0 only a process with
  ``CAP_SYS_PTRACE`` (root) gets in.

Both are inherited by ``fork`` (the daemon is forked by the command that unlocked
the key), so every command calls :func:`protect_process` before it reads a
passphrase.  ``execve`` would make a process dumpable again; cryptfuse runs no
program that sees the key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

#: prctl(2) options
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg2: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    result = int(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed")
    return result


def protect_process() -> None:
    """Make this process (and the children it forks) undumpable, core size limit 0.

    Idempotent.  Raises :class:`OSError` only when the kernel refuses both, which
    Linux never does for an unprivileged process lowering its own limits.
    """
    _prctl(PR_SET_DUMPABLE, 0)
    # The soft limit only: lowering the hard one cannot be undone without
    # CAP_SYS_RESOURCE, which would also bind a test suite calling the CLI in-process;
    # the dumpable flag is the lock that matters.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def is_dumpable() -> bool:
    """Whether this process may be dumped or inspected by its own user."""
    return _prctl(PR_GET_DUMPABLE) != 0
