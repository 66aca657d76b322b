"""Fuzz targets: the parsers of untrusted input, and the FUSE request loop.

Each target takes one input (bytes) and returns normally when cryptfuse behaved:

* the parsers (``luks1``, ``luks2`` -- a header region as on disk, ``luks2_json``
  -- a JSON area, ``cipher_spec``, ``plain`` -- plain-mode options) either accept
  the input or raise a :class:`CryptfuseError` whose message is one non-empty line.
  Any other exception (``KeyError``, ``struct.error``, ``OverflowError``,
  ``RecursionError`` ...) escapes: that is a crash.  ``luks2`` recomputes the
  primary header's checksum of an input that has the magic, so mutations reach the
  JSON parser instead of stopping at the checksum.
* ``channel``: one FUSE request (opcode, node id, body) goes through a real
  :class:`~cryptfuse.channel.Channel` serving a plain AES-XTS volume, C data path
  included, over a SOCK_SEQPACKET socket that plays the kernel.  Every request
  needing an answer must get exactly one well-formed answer (right ``unique``,
  length, errno <= 0, no payload with an error) within 10 s, and no request may
  end in the channel's "failed unexpectedly" log (an exception that escaped a
  handler).

``tests/fuzz_run.py`` runs them under atheris (coverage-guided); tests/test_fuzz.py
replays the seeds and every input that once crashed (``tests/fuzz_regressions/``).
Seeds come from the shared corpus (``seeds()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import lzma
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptfuse.errors import CryptfuseError
from cryptfuse.formats import OpenOptions, Secret, open_volume
from cryptfuse.formats.luks1 import LUKS1Header, read_luks1_header
from cryptfuse.formats.luks2 import (
    LUKS2Metadata,
    parse_json_area,
    read_luks2_header,
    validate_metadata,
)
from cryptfuse.sector import SectorCipher
from cryptfuse.spec import parse_cipher_spec

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent.parent / "shared" / "corpus"
REGRESSIONS = HERE / "fuzz_regressions"


def clean(action: Callable[[], object]) -> None:
    """Run *action*: a CryptfuseError must say what went wrong in one line."""
    try:
        action()
    except CryptfuseError as exc:
        message = str(exc)
        if not message.strip() or "\n" in message:
            raise AssertionError(f"unclear error message: {message!r}") from exc


@contextlib.contextmanager
def memfile(data: bytes) -> Iterator[tuple[int, str]]:
    """*data* as an open descriptor and a path naming it."""
    fd = os.memfd_create("cryptfuse-fuzz")
    try:
        os.write(fd, data)
        yield fd, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


# -- parsers --------------------------------------------------------------------------------


def luks1(data: bytes) -> None:
    clean(lambda: LUKS1Header.parse(data))
    with memfile(data) as (fd, path):
        clean(lambda: read_luks1_header(fd, path))


_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_PRIMARY = b"LUKS\xba\xbe"


def with_checksum(data: bytes) -> bytes:
    """*data* with its primary LUKS2 header's checksum made right (when it has one)."""
    if len(data) < 4096 or data[:6] != _PRIMARY:
        return data
    hdr_size = int.from_bytes(data[8:16], "big")
    if not 16384 <= hdr_size <= len(data):
        return data
    fields = list(_BIN.unpack_from(data))
    alg = fields[5].split(b"\0", 1)[0].decode("ascii", "replace")
    if alg not in ("sha256", "sha1", "sha512"):
        return data
    raw = bytearray(data[:hdr_size])
    raw[448:512] = bytes(64)
    digest = hashlib.new(alg, bytes(raw)).digest()
    raw[448 : 448 + len(digest)] = digest
    return bytes(raw) + data[hdr_size:]


def luks2(data: bytes) -> None:
    with memfile(with_checksum(data)) as (fd, path):
        clean(lambda: read_luks2_header(fd, path))


def luks2_json(data: bytes) -> None:
    area = data + bytes(max(1, 12288 - len(data)))

    def parse() -> None:
        obj = parse_json_area(area)
        validate_metadata(obj, len(area))
        LUKS2Metadata.from_dict(obj)

    clean(parse)


def cipher_spec(data: bytes) -> None:
    text = data.decode("utf-8", "replace")

    def parse() -> None:
        spec = parse_cipher_spec(text)
        again = parse_cipher_spec(str(spec))
        if again != spec:
            raise AssertionError(f"{text!r} -> {spec} parses back as {again}")
        for size in (16, 32, 48, 64):
            try:
                spec.check_key_size(size)
            except CryptfuseError:
                continue
            cipher = SectorCipher(spec, bytes(range(1, size + 1)), 512)
            plain = bytes(1024)
            if spec.ivmode == "lmk" and spec.chainmode != "cbc":
                # as in dm-crypt, which accepts it: lmk post-processes the CBC chain,
                # and with any other mode what is written does not read back
                # (docs/ciphers.md)
                continue
            if cipher.decrypt(cipher.encrypt(plain, 7), 7) != plain:
                raise AssertionError(f"{spec} does not round-trip")
            break

    clean(parse)


PLAIN_CONTAINER = 64 * 1024


def plain(data: bytes) -> None:
    """``cipher|key bits|hash|offset|skip|size|sector size|iv_large_sectors|keyfile``
    (fields as the command line would pass them; missing or non-numeric numbers
    make the input uninteresting)."""
    parts = data.decode("utf-8", "replace").split("|")
    if len(parts) < 9:
        return
    try:
        bits, offset, skip = int(parts[1]), int(parts[3]), int(parts[4])
        size = int(parts[5]) if parts[5] else None
        sector = int(parts[6]) if parts[6] else None
        large, keyfile = bool(int(parts[7])), bool(int(parts[8]))
    except ValueError:
        return
    if max(abs(bits), abs(offset), abs(skip), abs(size or 0), abs(sector or 0)) > 1 << 70:
        return  # argparse would take them, but such inputs only test Python's bignums
    options = OpenOptions(
        type="plain",
        cipher=parts[0] or None,
        key_size=bits,
        hash=parts[2] or None,
        offset=offset,
        skip=skip,
        size=size,
        sector_size=sector,
        iv_large_sectors=large,
        readonly=True,
    )
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        f.truncate(PLAIN_CONTAINER)
        f.flush()

        def open_and_read() -> None:
            with open_volume(f.name, options, Secret(b"0123456789abcdef" * 8, keyfile)) as v:
                v.read(0, 4096)
                v.read(max(0, v.size - 100), 4096)

        clean(open_and_read)


# -- the FUSE request loop --------------------------------------------------------------------


class _Unexpected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


class ChannelRig:
    """A Channel over a plain AES-XTS volume, and the kernel's end of its socket."""

    OPCODES = (1, 2, 3, 4, 14, 15, 16, 17, 18, 20, 25, 26, 27, 28, 29, 30, 34, 36, 38, 42, 9, 99)

    def __init__(self) -> None:
        import trio

        from cryptfuse.channel import INIT, INIT_IN, WANTED_FLAGS, Channel
        from cryptfuse.fs import VolumeFS

        self.tmp = tempfile.TemporaryDirectory()
        container = Path(self.tmp.name) / "c.img"
        with open(container, "wb") as f:
            f.truncate(1 << 20)
        options = OpenOptions(type="plain", cipher="aes-xts-plain64", key_size=512, hash="sha256")
        self.volume = open_volume(str(container), options, Secret(b"fuzz"))
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (self.ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.ours.settimeout(10)
        self.unexpected = _Unexpected()
        logging.getLogger("cryptfuse").addHandler(self.unexpected)
        self.channel = Channel(theirs.detach(), VolumeFS(self.volume), workers=2)
        self.unique = 0
        started = threading.Event()

        async def main() -> None:
            token = trio.lowlevel.current_trio_token()
            finished = trio.Event()
            self.channel.start(token, lambda: token.run_sync_soon(finished.set))
            started.set()
            await finished.wait()

        self.thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self.thread.start()
        started.wait()
        self.request(INIT, 0, INIT_IN.pack(7, 31, 131072, WANTED_FLAGS))

    def request(self, opcode: int, nodeid: int, body: bytes) -> None:
        """Send one request; check its answer (if it gets one) and the log."""
        from cryptfuse.channel import IN_HEADER, NO_REPLY, OUT_HEADER

        self.unique += 1
        header = IN_HEADER.pack(
            IN_HEADER.size + len(body),
            opcode,
            self.unique,
            nodeid,
            os.getuid(),
            os.getgid(),
            os.getpid(),
            0,
            0,
        )
        self.ours.send(header + body)
        if opcode not in NO_REPLY:
            try:
                reply = self.ours.recv((1 << 20) + 4096)
            except TimeoutError:
                raise AssertionError(f"no answer to opcode {opcode} within 10 s") from None
            if len(reply) < OUT_HEADER.size:
                raise AssertionError(f"short answer {reply!r}")
            length, error, unique = OUT_HEADER.unpack_from(reply)
            if length != len(reply) or unique != self.unique or error > 0:
                raise AssertionError(f"malformed answer {(length, error, unique)} to {opcode}")
            if error and length != OUT_HEADER.size:
                raise AssertionError("an error answer with a payload")
        if self.unexpected.records:
            records, self.unexpected.records = self.unexpected.records, []
            raise AssertionError("an exception escaped a handler:\n" + "\n".join(records))

    def close(self) -> None:
        self.ours.close()
        self.channel.wait(10)
        self.thread.join(10)
        self.channel.close()
        self.volume.close()
        logging.getLogger("cryptfuse").removeHandler(self.unexpected)
        self.tmp.cleanup()


_rig: ChannelRig | None = None


def channel(data: bytes) -> None:
    """``opcode index (1 byte) | node id (1 byte: 0-3, else the next 8 bytes) | body``."""
    global _rig
    if len(data) < 2:
        return
    if _rig is None:
        _rig = ChannelRig()
    opcode = ChannelRig.OPCODES[data[0] % len(ChannelRig.OPCODES)]
    if data[1] < 4:
        nodeid, body = data[1], data[2:]
    else:
        nodeid, body = int.from_bytes(data[2:10].ljust(8, b"\0"), "little"), data[10:]
    _rig.request(opcode, nodeid, body[: (1 << 20) + 80])


def close_channel() -> None:
    global _rig
    if _rig is not None:
        _rig.close()
        _rig = None


TARGETS: dict[str, Callable[[bytes], None]] = {
    "luks1": luks1,
    "luks2": luks2,
    "luks2_json": luks2_json,
    "cipher_spec": cipher_spec,
    "plain": plain,
    "channel": channel,
}
ALL = list(TARGETS)


def every(data: bytes) -> None:
    """All targets in one: the first byte chooses (the short run of ``make test``)."""
    if data:
        TARGETS[ALL[data[0] % len(ALL)]](data[1:])


TARGETS["all"] = every

#: libFuzzer's -max_len per target (a LUKS2 input is two header copies)
MAX_LEN = {"luks2": 1 << 17, "luks2_json": 1 << 16, "channel": 1 << 16, "all": 1 << 17}


# -- seeds ------------------------------------------------------------------------------------


def _head(path: Path, n: int) -> bytes:
    if path.suffix == ".xz":
        with lzma.open(path) as f:
            return f.read(n)
    with open(path, "rb") as f:
        return f.read(n)


def _luks2_region(data: bytes) -> bytes:
    hdr_size = int.from_bytes(data[8:16], "big") if data[:6] == _PRIMARY else 16384
    return data[: 2 * max(16384, min(hdr_size, 1 << 16))]


SPECS = [
    "aes-xts-plain64",
    "aes-cbc-essiv:sha256",
    "aes-cbc-plain",
    "aes-cbc-plain64be",
    "aes-ecb",
    "aes",
    "aes-plain",
    "aes-cbc-null",
    "aes-xts-essiv:sha256",
    "aes:64-cbc-lmk",
    "aes-cbc-lmk",
    "aes-cbc-tcw",
    "aes-lrw-benbi",
    "aes-cbc-eboiv",
    "serpent-xts-plain64",
    "twofish-cbc-essiv:sha256",
    "cipher_null-ecb",
    "capi:xts(aes)-plain64",
    "aes-xts-random",
    "des3_ede-cbc-essiv:sha256",
    "camellia-xts-plain64",
    "cast5-cbc-plain",
    "aes-cbc-essiv:wp256",
]

PLAIN_SEEDS = [
    "aes-cbc-essiv:sha256|256|ripemd160|0|0||512|0|0",
    "aes-xts-plain64|256|sha256|576|0||512|0|0",
    "aes-xts-plain64|512|plain|0|0||4096|1|1",
    "aes-xts-plain64|512|sha512|8|8|64|4096|0|0",
    "aes-cbc-plain|128|sha1:20|1|2|3|512|0|0",
    "twofish-cbc-plain|256|sha256|0|0||1024|0|0",
]


def seeds(target: str) -> Iterator[bytes]:
    """Seed inputs for *target*: corpus files where the target reads files, else
    hand-written ones (each a valid input)."""
    if target == "all":
        for index, name in enumerate(ALL):
            for data in seeds(name):
                yield bytes([index]) + data
        return
    generated = sorted((CORPUS / "generated").glob("*.img")) if CORPUS.is_dir() else []
    upstream = CORPUS / "upstream"
    if target == "luks1":
        for path in [
            *generated,
            upstream / "compatimage.img.xz",
            upstream / "compatv10image.img.xz",
        ]:
            if path.exists() and _head(path, 6) == b"LUKS\xba\xbe" and _head(path, 8)[7] == 1:
                yield _head(path, 4096)
    elif target in ("luks2", "luks2_json"):
        paths = [
            *generated,
            upstream / "compatimage2.img.xz",
            upstream / "luks2_valid_hdr.img.xz",
            upstream / "luks2_invalid_cipher.img.xz",
            upstream / "valid_header_file.xz",
        ]
        for path in paths:
            if not path.exists():
                continue
            head = _head(path, 1 << 17)
            if head[:6] != _PRIMARY or head[7] != 2:
                continue
            region = _luks2_region(head)
            if target == "luks2":
                yield region
            else:
                hdr_size = int.from_bytes(region[8:16], "big")
                yield region[4096:hdr_size].rstrip(b"\0")
        if target == "luks2_json":
            yield json.dumps(
                {
                    "keyslots": {},
                    "tokens": {},
                    "segments": {},
                    "digests": {},
                    "config": {"json_size": "12288", "keyslots_size": "0"},
                }
            ).encode()
    elif target == "cipher_spec":
        for spec in SPECS:
            yield spec.encode()
    elif target == "plain":
        for line in PLAIN_SEEDS:
            yield line.encode()
    elif target == "channel":
        from cryptfuse.channel import (
            FSYNC_IN,
            INIT_IN,
            OPEN_IN,
            READ_IN,
            SETATTR_IN,
            WANTED_FLAGS,
            WRITE_IN,
        )

        def op(code: int) -> int:
            return ChannelRig.OPCODES.index(code)

        yield bytes([op(26), 0]) + INIT_IN.pack(7, 31, 131072, WANTED_FLAGS)
        yield bytes([op(1), 1]) + b"volume\0"
        yield bytes([op(3), 2]) + bytes(16)
        yield bytes([op(14), 2]) + OPEN_IN.pack(os.O_RDWR, 0)
        yield bytes([op(15), 2]) + READ_IN.pack(0, 4096, 8192, 0, 0, 0, 0)
        yield bytes([op(15), 2]) + READ_IN.pack(0, 100, 1000, 0, 0, 0, 0)
        yield bytes([op(16), 2]) + WRITE_IN.pack(0, 8192, 4096, 0, 0, 0, 0) + bytes(4096)
        yield bytes([op(16), 2]) + WRITE_IN.pack(0, 10, 7, 0, 0, 0, 0) + b"partial"
        yield bytes([op(4), 2]) + SETATTR_IN.pack(
            8, 0, 0, 1 << 20, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0
        )
        yield bytes([op(20), 2]) + FSYNC_IN.pack(0, 1, 0)
        yield bytes([op(28), 1]) + READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)
        yield bytes([op(17), 1])
        yield bytes([op(2), 2]) + struct.pack("=Q", 1)


def regressions(target: str) -> Iterator[tuple[str, bytes]]:
    """(name, input) of every input that once crashed *target*."""
    if target == "all":
        for index, name in enumerate(ALL):
            for file, data in regressions(name):
                yield f"{name}-{file}", bytes([index]) + data
        return
    where = REGRESSIONS / target
    if where.is_dir():
        for path in sorted(where.iterdir()):
            yield path.name, path.read_bytes()
