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
import struct

# System call numbers (asm/unistd.h) of request_key and keyctl, by the kernel's machine
# name and this process's pointer size (a 32-bit userland on a 64-bit kernel uses the
# 32-bit table).
_SYSCALLS = {
    ("x86_64", 8): (249, 250),
    ("x86_64", 4): (287, 288),  # i386 (x32 is not supported)
    ("i386", 4): (287, 288),
    ("i486", 4): (287, 288),
    ("i586", 4): (287, 288),
    ("i686", 4): (287, 288),
    ("aarch64", 8): (218, 219),
    ("aarch64", 4): (310, 311),  # arm EABI
    ("armv7l", 4): (310, 311),
    ("armv8l", 4): (310, 311),
    ("riscv64", 8): (218, 219),
    ("loongarch64", 8): (218, 219),
    ("ppc64le", 8): (270, 271),
    ("ppc64", 8): (270, 271),
    ("s390x", 8): (279, 280),
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
    numbers = _SYSCALLS.get((platform.machine(), struct.calcsize("P")))
    if numbers is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    request_key, keyctl = numbers
    try:
        name = description.encode()
    except UnicodeEncodeError:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
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
        try:
            got = _libc.syscall(
                keyctl, KEYCTL_READ, ctypes.c_long(serial), buf, ctypes.c_long(size)
            )
            if got < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            if got <= size:
                return ctypes.string_at(buf, got)
        finally:
            ctypes.memset(buf, 0, len(buf))  # (the caller's bytes are its to keep)
        size = got  # the payload's size: read again with room for it
