"""Types of the C data path (cryptfuse/_fastpath.c)."""

from typing_extensions import Buffer

MAX_IO: int
IV_PLAIN64: int
IV_PLAIN: int
IV_PLAIN64BE: int
IV_NULL: int
IV_ESSIV: int
MODE_XTS: int
MODE_CBC: int

class RangeLock:
    """Excludes overlapping sector ranges; disjoint ranges proceed in parallel."""

    held: int
    def acquire(self, start: int, end: int, /) -> None: ...
    def release(self, start: int, end: int, /) -> None: ...

class Worker:
    """One serving thread's cipher contexts and I/O buffer."""

    def serve(self, fuse_fd: int, buffer: bytearray, /) -> int: ...
    def encrypt(self, data: Buffer, first_sector: int, parallel: bool = False, /) -> bytes: ...
    def decrypt(self, data: Buffer, first_sector: int, parallel: bool = False, /) -> bytes: ...
    def crypt_into(self, src: Buffer, first_sector: int, dst: Buffer, encrypt: bool, /) -> None: ...

class FastVolume:
    """An AES-XTS/CBC volume's geometry and key for the GIL-free READ/WRITE path.

    *fd* -1 makes one for in-memory use only (``Worker.encrypt``/``decrypt``).
    *direct_fd*, when not -1, is the same file opened with O_DIRECT: large page-aligned
    transfers use it (with read-ahead); the FastVolume owns it and closes it.
    """

    writes: int
    reads: int
    declined: int
    reply_errors: int
    split: int
    prefetched: int
    direct: int
    behind: int
    partnered: int
    direct_active: bool
    key_locked: bool
    last_write_ns: int
    def __init__(
        self,
        *,
        fd: int,
        data_offset: int,
        size: int,
        sector_size: int,
        readonly: bool,
        mode: int,
        key: bytes,
        iv_offset: int,
        iv_shift: int,
        ivmode: int,
        lock: RangeLock,
        essiv_key: bytes = b"",
        direct_fd: int = -1,
        engine: object = None,  # a cryptfuse._gcrypt.Engine: it does the cipher work
    ) -> None: ...
    def worker(self) -> Worker: ...
    def invalidate(self, first_sector: int, count: int) -> None: ...
    def set_size(self, size: int) -> None: ...
    def set_discards(self, on: bool) -> None: ...
    def start_threads(self) -> None: ...
    def drain(self) -> None: ...
    def lost(self, first: int, last: int) -> bool: ...
    def rewritten(self, first: int, last: int) -> None: ...
    def write_lock_range(self, first: int, last: int) -> tuple[int, int]: ...
    def set_window(self, lo: int, hi: int, /) -> None:
        """Serve sectors [lo, hi) only, decline the rest (hold what changes meanwhile)."""
    def set_partner(self, other: FastVolume, /) -> None:
        """Requests declined here are tried on *other* (same fd, geometry, lock); once."""
    def close(self) -> None: ...

def block_digests(data: Buffer, block_size: int, hash_name: str) -> bytes:
    """The digest of every *block_size* block of *data*, concatenated (GIL released)."""
