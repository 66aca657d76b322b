"""Which file system a volume holds, and its block size, as cryptsetup asks before it
raises the encryption sector size (``tools_superblock_block_size``: libblkid's
superblock probe and its ``BLOCK_SIZE``).  A file system whose blocks are smaller
than the new sector size cannot be mounted from the device dm-crypt then makes
(its logical sector size is the encryption sector size).

The probe is ``blkid -p`` (util-linux), on a descriptor: the device itself for a
plaintext one, or a memory file holding the decrypted head of an encrypted volume,
so no plaintext reaches a disk.  Without ``blkid`` nothing is found, as in a
cryptsetup built without blkid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import UsageError

#: the decrypted head of a volume that is probed: every superblock libblkid reports a
#: block size for sits in it (ext* at 1 KiB, btrfs and reiserfs at 64 KiB, XFS, FAT
#: and NTFS at 0, ISO 9660 and UDF within the first 64 KiB sectors)
PROBE_HEAD = 1 << 20


@dataclass(frozen=True)
class Superblock:
    type: str
    block_size: int


def probe_fd(fd: int) -> Superblock | None:
    """The file system (with a block size) that ``blkid -p`` finds on *fd*, or None."""
    blkid = shutil.which("blkid") or next(
        (p for p in ("/usr/sbin/blkid", "/sbin/blkid") if os.path.exists(p)), None
    )
    if blkid is None:
        return None
    try:
        done = subprocess.run(
            [blkid, "-p", "-u", "filesystem", "-o", "export", f"/dev/fd/{fd}"],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # 2: nothing found; 8: ambivalent (several signatures)
        return None
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    try:
        block = int(values.get("BLOCK_SIZE", "0"))
    except ValueError:
        return None
    if not block or "TYPE" not in values:
        return None
    return Superblock(values["TYPE"], block)


def probe_bytes(head: bytes | bytearray, size: int) -> Superblock | None:
    """:func:`probe_fd` of a volume of *size* bytes that begins with *head* (the rest
    reads as zeros), through a memory file."""
    fd = os.memfd_create("cryptfuse-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, head, 0)
        return probe_fd(fd)
    finally:
        os.close(fd)


def check_sector_size(found: Superblock | None, sector_size: int, device: str) -> None:
    """Refuse *sector_size* above the block size of the file system *found* on
    *device* (cryptsetup 2.6.1's message)."""
    if found is not None and sector_size > found.block_size:
        raise UsageError(
            f"Requested --sector-size {sector_size} is incompatible with {found.type} "
            f"superblock (block size: {found.block_size} bytes) detected on device {device}."
        )
