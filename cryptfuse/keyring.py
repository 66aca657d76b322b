"""The kernel keyring's ``user`` keys (keyrings(7)), for LUKS2 ``luks2-keyring`` tokens.

cryptsetup's token finds its passphrase with ``request_key("user", description)``
(searching the thread, process and session keyrings) and ``keyctl_read``; this does
the same through the raw system calls, so no libkeyutils is needed.  Standard library
only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# System call numbers (asm/unistd.h): request_key and keyctl.
_SYSCALLS = {
    "x86_64": (249, 250),
    "aarch64": (218, 219),
    "riscv64": (218, 219),
    "ppc64le": (270, 271),
    "s390x": (279, 280),
    "i686": (287, 288),
    "armv7l": (310, 311),
}
KEYCTL_READ = 11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def user_key(description: str) -> bytes:
    """The payload of the ``user`` key *description* that this process can find.

    Raises :class:`OSError`: ``ENOKEY`` (none such), ``EKEYEXPIRED``/``EKEYREVOKED``,
    ``EACCES``, or ``ENOSYS``/``EPERM`` where keyrings are not available (a seccomp
    filter, an old kernel, another architecture).
    """
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    request_key, keyctl = numbers
    name = description.encode()
    while True:
        serial = _libc.syscall(request_key, b"user", name, None, 0)
        if serial >= 0 or ctypes.get_errno() != errno.EINTR:
            break
    if serial < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    size = 0
    while True:
        buf = ctypes.create_string_buffer(max(size, 1))
        got = _libc.syscall(keyctl, KEYCTL_READ, ctypes.c_long(serial), buf, ctypes.c_long(size))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        if got <= size:
            data = buf.raw[:got]
            ctypes.memset(buf, 0, len(buf))
            return data
        size = got  # the payload's size: read again with room for it
