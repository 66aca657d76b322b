"""The command line: ``cryptfuse [options] CONTAINER MOUNTPOINT`` and subcommands.

Option names follow ``cryptsetup open`` with one deliberate exception: ``-o``
passes FUSE mount options (as with every FUSE daemon and ``mount -o``), so the
data offset is ``--offset`` only.  ``-h`` is ``--hash`` as in cryptsetup; help
is ``--help``.

This module is the only place for argparse, getpass, logging configuration and
exit codes.  Every :class:`~cryptfuse.errors.CryptfuseError` becomes one line
``cryptfuse: <message>`` on stderr and the exception's ``exit_code``; no
traceback unless ``--debug``.

Subcommands: ``cryptfuse NAME ...`` where NAME is a key of :data:`SUBCOMMANDS`.
Anything else is the mount command, so a container literally named like a
subcommand must be given as ``./NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import hashlib
import logging
import os
import shutil
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from . import __version__
from .cli_close import CLOSE_SUBCOMMANDS
from .cli_convert import CONVERT_SUBCOMMANDS
from .cli_foreign import (
    FOREIGN_SUBCOMMANDS,
    add_foreign_options,
    check_options,
    foreign_kind,
    key_files,
    open_foreign_volume,
)
from .cli_foreign import dump_command as foreign_dump_command
from .cli_input import (
    PROG,
    _nonneg_int,
    _Parser,
    _read_limited,
    plain_spec_warnings,
    read_key_file,
    read_passphrase_line,
)
from .cli_lifecycle import LIFECYCLE_SUBCOMMANDS, setup_volume, volume_info
from .cli_luks import LUKS_SUBCOMMANDS, _volume_key_option, dump_command
from .cli_reencrypt import REENCRYPT_SUBCOMMANDS
from .errors import (
    BusyError,
    CryptfuseError,
    FormatError,
    KeyFileError,
    UnsupportedError,
    UsageError,
)
from .formats import TYPES, OpenOptions, Secret, detect_type, open_volume
from .formats.plain import DEFAULT_CIPHER, DEFAULT_HASH, DEFAULT_KEY_SIZE, plain_key
from .hygiene import protect_process
from .mount_options import apply as apply_mount_options
from .mount_options import parse as parse_mount_options
from .spec import CipherSpec, parse_cipher_spec
from .volume import Volume, open_device

if TYPE_CHECKING:  # the mount's modules (pyfuse3, trio) load only when mounting
    from .formats.luks2_token import Attempt
    from .fs import FSOptions
    from .mount import ServedVolume

T = TypeVar("T")

log = logging.getLogger("cryptfuse")


#: cryptsetup's --perf-* options (dm-crypt's workqueue flags) -> their LUKS2 flag names
PERF_FLAGS = {
    "same_cpu_crypt": "same-cpu-crypt",
    "submit_from_crypt_cpus": "submit-from-crypt-cpus",
    "no_read_workqueue": "no-read-workqueue",
    "no_write_workqueue": "no-write-workqueue",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of the mount command."""
    subcommands = ", ".join(sorted(SUBCOMMANDS))
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [options] CONTAINER MOUNTPOINT\n       {PROG} COMMAND [options]",
        description=(
            "Open a LUKS1, LUKS2, plain dm-crypt, TrueCrypt/VeraCrypt, BitLocker or FileVault 2 "
            "container and mount a directory holding "
            "one file, the decrypted volume (like /dev/mapper/NAME), without device-mapper."
        ),
        epilog=(
            f"commands: {subcommands} (see '{PROG} COMMAND --help'); cryptsetup's "
            "action names work too (open, luksOpen, luksDump, luksAddKey, luksClose, ...). "
            "Option names are cryptsetup's, except that -o passes FUSE mount options "
            "(e.g. -o allow_other) and the data offset is --offset only. "
            "Sizes and offsets count 512-byte sectors. "
            "Unmount with: cryptfuse close MOUNTPOINT (or fusermount3 -u MOUNTPOINT)."
        ),
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("container", metavar="CONTAINER", help="container file or block device")
    p.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="empty directory to mount on (none with --test-passphrase)",
    )

    g = p.add_argument_group("container")
    g.add_argument(
        "--type",
        "-M",
        choices=TYPES,
        help=(
            "container type (default: LUKS, BitLocker or FileVault 2 if a header says so; "
            "plain and tcrypt must be asked for)"
        ),
    )
    g.add_argument("--header", metavar="FILE", help="detached LUKS header")
    g.add_argument(
        "--key-slot", "-S", type=_nonneg_int, metavar="N", help="try only this LUKS keyslot"
    )
    g.add_argument(
        "--key-file",
        "-d",
        action="append",
        metavar="FILE",
        help=(
            "read the passphrase (LUKS) or raw key (plain) from FILE; '-' reads stdin; "
            "tcrypt: a TrueCrypt key file (repeatable)"
        ),
    )
    _volume_key_option(
        g, "LUKS: open with the volume key in FILE (checked against the header) instead of "
        "a passphrase"
    )  # fmt: skip
    g.add_argument(
        "--test-passphrase",
        action="store_true",
        help=(
            "only check the passphrase, key file, volume key or token (LUKS, TCRYPT, BITLK, "
            "FVAULT2): nothing is mounted or written"
        ),
    )
    g.add_argument(
        "--unbound",
        action="store_true",
        help="with --test-passphrase: unbound LUKS2 keyslots count too (as with --key-slot)",
    )
    g.add_argument(
        "--token-id",
        type=_nonneg_int,
        metavar="N",
        help="LUKS2: try only token N (all its keyslots) before asking for a passphrase",
    )
    g.add_argument(
        "--token-type",
        metavar="TYPE",
        help="LUKS2: try only tokens of TYPE (luks2-keyring is the one cryptfuse can use)",
    )
    g.add_argument(
        "--token-only",
        action="store_true",
        help="LUKS2: open through a token (a luks2-keyring key) or fail; no passphrase",
    )
    g.add_argument(
        "--keyfile-offset",
        type=_nonneg_int,
        default=0,
        metavar="BYTES",
        help="skip BYTES at the start of the key file",
    )
    g.add_argument(
        "--keyfile-size",
        "-l",
        type=_nonneg_int,
        metavar="BYTES",
        help="read at most BYTES of the key file",
    )
    g.add_argument(
        "--readonly",
        "-r",
        action="store_true",
        help="open read-only (the volume file is read-only)",
    )
    g.add_argument(
        "--allow-discards",
        action="store_true",
        help=(
            "pass discards (fallocate PUNCH_HOLE/ZERO_RANGE, fstrim through a loop device) "
            "down as holes in the container; see the README on what they reveal"
        ),
    )
    g.add_argument(
        "--persistent",
        action="store_true",
        help=(
            "LUKS2: keep the flags given (--allow-discards, --perf-*) in the header, "
            "replacing those there (which this mount then ignores)"
        ),
    )
    for name in PERF_FLAGS:
        g.add_argument(
            f"--perf-{name}",
            action="store_true",
            help=f"dm-crypt's {name} flag: no effect here, kept in the header by --persistent",
        )
    g.add_argument(
        "--lock-memory",
        action="store_true",
        help="lock the daemon in memory (mlockall): for swap on the volume",
    )

    g = p.add_argument_group(
        "plain mode (cryptsetup 2.6 defaults: aes-cbc-essiv:sha256, 256 bits, ripemd160)"
    )
    g.add_argument("--cipher", "-c", metavar="SPEC", help="cipher spec, e.g. aes-xts-plain64")
    g.add_argument("--key-size", "-s", type=_nonneg_int, metavar="BITS", help="key size in bits")
    g.add_argument(
        "--hash", "-h", metavar="HASH", help="passphrase hash (e.g. sha256, sha512:32, plain)"
    )
    g.add_argument(
        "--offset",
        type=_nonneg_int,
        default=0,
        metavar="SECTORS",
        help="start of the data (no short form: -o is FUSE options)",
    )
    g.add_argument("--skip", "-p", type=_nonneg_int, default=0, metavar="SECTORS", help="IV offset")
    g.add_argument(
        "--size",
        "-b",
        type=_nonneg_int,
        metavar="SECTORS",
        help="volume size (default: the rest of the container)",
    )
    g.add_argument(
        "--sector-size",
        type=_nonneg_int,
        metavar="BYTES",
        help="encryption sector size (512..4096)",
    )
    g.add_argument(
        "--iv-large-sectors",
        action="store_true",
        help="IVs count --sector-size sectors, not 512-byte ones",
    )

    add_foreign_options(p)

    g = p.add_argument_group("mount")
    g.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help=(
            "FUSE mount options (allow_other, ro, fsname=...) and cryptfuse's own: "
            "uid=N, gid=N, umask=M, page_cache (see docs/daemon.md)"
        ),
    )
    g.add_argument(
        "--name", default="volume", help="name of the file in MOUNTPOINT (default: volume)"
    )
    g.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    g.add_argument("--log-file", metavar="FILE", help="daemon: append log messages to FILE")
    g.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    g.add_argument("--debug", action="store_true", help="log everything; tracebacks on errors")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g.add_argument("--help", action="help", help="show this help and exit")

    g = p.add_argument_group("filesystem (see docs/mount-fs.md; close with: cryptfuse close)")
    g.add_argument(
        "--mount-fs",
        metavar="DIR",
        help="also mount the filesystem inside the volume at DIR (root: loop device; "
        "others: fuse2fs for ext2/3/4)",
    )
    g.add_argument("--fs-type", metavar="TYPE", help="its type (default: what blkid finds)")
    g.add_argument("--fs-options", metavar="OPTS", help="its mount options (comma separated)")
    return p


# -- secrets ------------------------------------------------------------------------


def get_secret(args: argparse.Namespace, plain_key_bytes: int | None) -> Secret:
    """The passphrase or key file, from wherever the options say."""
    if args.key_file is not None:
        size = args.keyfile_size
        if plain_key_bytes is not None and args.key_file != "-" and size is None:
            # Plain mode uses a key file as the raw key: read just the key, so
            # `-d /dev/urandom` (swap) works and a short file is reported as such.
            data = _read_prefix(args.key_file, args.keyfile_offset, plain_key_bytes)
        else:
            data = read_key_file(args.key_file, args.keyfile_offset, size)
        return Secret(data, from_keyfile=args.key_file != "-")
    if sys.stdin.isatty():
        prompt = f"Enter passphrase for {args.container}: "
        try:
            text = getpass.getpass(prompt)
        except EOFError:
            raise KeyFileError("no passphrase entered") from None
        data = text.encode()
        data = data[args.keyfile_offset :]
        if args.keyfile_size is not None:
            data = data[: args.keyfile_size]
        return Secret(data, from_keyfile=False)
    return Secret(
        read_passphrase_line(sys.stdin.buffer, args.keyfile_offset, args.keyfile_size),
        from_keyfile=False,
    )


def _read_prefix(path: str, offset: int, size: int) -> bytes:
    """Up to *size* bytes after *offset* (plain.py reports a key that is too short)."""
    try:
        with open(path, "rb") as f:
            return _read_limited(f, offset, size, size, f"key file {path}")
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None


# -- checks before asking for a passphrase ---------------------------------------------


def check_container(path: str, readonly: bool) -> None:
    """The container exists, is a file or block device, can be opened and is not in use."""
    os.close(open_device(path, readonly))  # raises DeviceError/BusyError with the reason


def check_mountpoint(path: str) -> None:
    """The mountpoint is an existing, empty directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot use mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint {path} is not a directory")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise UsageError(f"cannot read mountpoint {path}: {exc.strerror}") from None
    if entries:
        raise UsageError(f"mountpoint {path} is not empty")


def check_fuse() -> None:
    """/dev/fuse can be opened (and fusermount3 exists for unprivileged users)."""
    from .mount import MountError

    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(
            "FUSE is not available: /dev/fuse does not exist (modprobe fuse, or install fuse3)"
        ) from None
    except OSError as exc:
        raise MountError(f"FUSE is not available: cannot open /dev/fuse: {exc.strerror}") from None
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("FUSE is not available: fusermount3 is not installed (apt install fuse3)")


def weak_spec_warning(spec: CipherSpec, readonly: bool) -> str | None:
    """A security warning for ECB or the 32-bit ``plain`` IV on a writable mount."""
    if readonly:
        return None
    if spec.chainmode == "ecb":
        return (
            f"WARNING: cipher {spec} uses ECB, which leaks patterns of the data; "
            "prefer aes-xts-plain64"
        )
    if spec.ivmode == "plain":
        return (
            f"WARNING: cipher {spec} uses the 32-bit 'plain' IV, which repeats every 2 TiB; "
            "prefer plain64"
        )
    return None


def open_by_token(
    args: argparse.Namespace,
    kind: str | None,
    opener: Callable[[Attempt], T] | None = None,
    any_segment: bool = False,
) -> T | Volume | None:
    """The LUKS2 container opened through a ``luks2-keyring`` token (the kernel keyring
    key it names holds a keyslot's passphrase), as cryptsetup 2.6.1's ``open`` tries
    before it asks (docs/keyslots.md, "Tokens"); None where none opens, unless
    ``--token-only``.  A container in reencryption is not opened so.  *opener* (by
    default: open the volume) tries one attempt, raising WrongPassphraseError."""
    from .errors import WrongPassphraseError
    from .formats.luks2 import read_luks2_header
    from .formats.luks2_token import Outcome, token_attempts

    where = args.header or args.container
    if detect_type(where) != "luks2":
        return None
    fd = open_device(where, True, lock=False)  # (a look only: the open locks and rereads)
    try:
        header = read_luks2_header(fd, where)
    finally:
        os.close(fd)
    outcome = Outcome()
    if not header.metadata.config.requirements:
        for attempt in token_attempts(header, args.token_id, args.token_type, outcome, any_segment):
            try:
                if opener is not None:
                    opened: T | Volume = opener(attempt)
                else:
                    options = dataclasses.replace(
                        _open_options(args, kind), key_slot=attempt.key_slot
                    )
                    opened = open_volume(args.container, options, Secret(attempt.passphrase))
            except WrongPassphraseError:
                continue
            log.info("Key slot %d unlocked by token %d.", attempt.key_slot, attempt.token)
            return opened
    if not args.token_only:
        return None
    if header.metadata.config.requirements:
        raise UsageError("Tokens are not used for a container with requirements (reencryption).")
    # (cryptsetup's messages: tools_token_error_msg)
    which = (
        f"Token {args.token_id}"
        if args.token_id is not None
        else f"Token (type {args.token_type})"
        if args.token_type
        else "The tokens"
    )
    if outcome.usable:
        raise WrongPassphraseError(
            f"{which} cannot unlock assigned keyslot(s) (wrong keyslot passphrase, or no such "
            "key in the kernel keyring)."
        )
    kind_text = f" (type {args.token_type})" if args.token_type else ""
    raise CryptfuseError(f"No usable token{kind_text} is available.")


def _test_passphrase(args: argparse.Namespace, kind: str | None, foreign: str | None) -> int:
    """``--test-passphrase`` (cryptsetup's ``open --test-passphrase``): unlock and say
    so (``-v``: the keyslot), open nothing, write nothing."""
    if foreign is not None:
        args.readonly = True
        open_foreign_volume(args, foreign).close()
        return 0
    # (cryptsetup: --key-slot or --unbound let an unbound keyslot count)
    _unlock_again(args, kind, args.key_slot is not None or args.unbound)
    return 0


def _unlock_again(args: argparse.Namespace, kind: str | None, any_segment: bool) -> bytes | None:
    """A LUKS container's volume key, as ``open`` would unlock it (a volume key file, the
    tokens, then the passphrase or key file; ``-v``: the keyslot), reading the header
    without a lock (a mounted container too) and writing nothing.  *any_segment*: an
    unbound keyslot counts.  None for a container in reencryption (two keys)."""
    from .formats import manage

    if args.volume_key_file is not None:
        return manage.unlock_again(
            args.container, b"", header=args.header, volume_key_file=args.volume_key_file
        )[1]

    def by_token(attempt: Attempt) -> tuple[int | None, bytes | None]:
        return manage.unlock_again(
            args.container,
            attempt.passphrase,
            attempt.key_slot,
            header=args.header,
            any_segment=any_segment,
        )

    found = open_by_token(args, kind, by_token, any_segment)  # (logs a token's keyslot)
    if isinstance(found, tuple):
        return found[1]
    secret = get_secret(args, None)
    slot, key = manage.unlock_again(
        args.container, secret.data, args.key_slot, header=args.header, any_segment=any_segment
    )
    del secret
    if slot is not None:
        log.info("Key slot %d unlocked.", slot)
    return key


def _open_options(args: argparse.Namespace, kind: str | None) -> OpenOptions:
    return OpenOptions(
        type=kind,
        readonly=args.readonly,
        header=args.header,
        key_slot=args.key_slot,
        allow_discards=args.allow_discards,
        cipher=args.cipher,
        key_size=args.key_size,
        hash=args.hash,
        offset=args.offset,
        skip=args.skip,
        size=args.size,
        sector_size=args.sector_size,
        iv_large_sectors=args.iv_large_sectors,
        volume_key_file=args.volume_key_file,
    )


def _fs_options(args: argparse.Namespace) -> tuple[FSOptions, tuple[str, ...]]:
    """Split -o into our file options (uid, gid, umask) and the ones for libfuse."""
    from .fs import FSOptions

    fs = FSOptions(name=args.name)
    if not args.name or "/" in args.name or args.name in (".", ".."):
        raise UsageError(f"--name {args.name!r} is not a valid file name")
    passed: list[str] = []
    for opt in (o.strip() for group in args.fuse_options for o in group.split(",")):
        key, _, value = opt.partition("=")
        try:
            if key == "uid":
                fs.uid = int(value)
            elif key == "gid":
                fs.gid = int(value)
            elif key == "umask":
                mask = int(value, 8)
                fs.file_mode, fs.dir_mode = 0o666 & ~mask, 0o777 & ~mask
            elif key == "ro":
                args.readonly = True
            elif key == "page_cache":
                # Escape hatch for shared mmap, which FUSE refuses on direct_io files.
                fs.direct_io = False
            elif opt:
                passed.append(opt)
        except ValueError:
            raise UsageError(f"-o {opt}: invalid number") from None
    return fs, tuple(passed)


def configure_logging(verbose: bool, debug: bool, log_file: str | None) -> None:
    """Log to stderr (the daemon's stderr is the log file or /dev/null)."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    fmt = (
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
        if log_file or debug
        else f"{PROG}: %(message)s"
    )
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pyfuse3 logs every request at DEBUG; that is what --debug is for, but -v is not.
    logging.getLogger("pyfuse3").setLevel(level if debug else max(level, logging.WARNING))


@contextlib.contextmanager
def unlock_progress(container: str, enabled: bool) -> Iterator[None]:
    """Show "Unlocking C… Ns" on the terminal while a LUKS KDF runs, then erase it.

    The KDFs have no progress callback; elapsed seconds at least show that a slow
    Argon2 is working. The ticker thread is joined before returning: the daemon
    forks later, and no thread may be running then.
    """
    if not enabled:
        yield
        return
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not stop.wait(1.0):
            elapsed = time.monotonic() - start
            print(f"\rUnlocking {container}… {elapsed:.0f}s", end="", file=sys.stderr, flush=True)

    print(f"Unlocking {container}…", end="", file=sys.stderr, flush=True)
    ticker = threading.Thread(target=tick, name="unlock-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def mount_command(argv: Sequence[str]) -> int:
    """``cryptfuse [options] CONTAINER MOUNTPOINT``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mountpoint is None and not args.test_passphrase:
        parser.error("the following arguments are required: MOUNTPOINT")
    if args.unbound:  # (cryptsetup's verify_open, in its order)
        if args.type is not None and not args.type.startswith("luks"):
            raise UsageError("Option --unbound is allowed only for open of luks device.")
        if not args.test_passphrase:
            raise UsageError("Option --unbound cannot be used without --test-passphrase.")
    if args.persistent and args.test_passphrase:
        raise UsageError("Option --persistent is not allowed with --test-passphrase.")
    if args.test_passphrase:
        args.readonly = True  # (nothing is written: a read-only container can be tested)
    configure_logging(args.verbose, args.debug, args.log_file)
    # crypttab's names inside -o (mount -t fuse.cryptfuse, fstab): see mount_options.py
    defaults = parser.parse_args([args.container])
    apply_mount_options(args, parse_mount_options(args.fuse_options), defaults, TYPES)
    fs_options, fuse_options = _fs_options(args)
    kind: str | None = args.type

    # Everything that can be checked without the secret is checked first, so a
    # typo does not cost a passphrase prompt and a KDF run.
    check_container(args.container, args.readonly)
    if args.header is not None:
        check_container(args.header, True)
    if args.test_passphrase:
        if kind == "plain":
            raise UsageError("--test-passphrase is for LUKS, TCRYPT, BITLK and FVAULT2 containers.")
        if args.mount_fs is not None:
            raise UsageError("--mount-fs cannot be combined with --test-passphrase.")
    else:
        check_mountpoint(args.mountpoint)
        if args.log_file is not None:
            from .mount import usable_log_file

            args.log_file = usable_log_file(args.log_file)
        check_fuse()
    foreign = foreign_kind(kind, args.header or args.container)
    check_options(args, foreign)
    if args.volume_key_file is not None and (foreign is not None or kind == "plain"):
        raise UsageError("--volume-key-file is for LUKS containers.")
    token_options = args.token_id is not None or args.token_type or args.token_only
    if token_options and (foreign is not None or kind in ("plain", "luks1")):
        raise UsageError("--token-id, --token-type and --token-only are for LUKS2 containers.")
    if foreign is None:  # repeatable for TCRYPT only (-o key-file= gives a string)
        files = key_files(args)
        args.key_file = files[0] if files else None
    if args.mount_fs is not None:
        from .mountfs import check_target

        if args.foreground:
            raise UsageError("--mount-fs cannot be combined with --foreground")
        args.mount_fs = check_target(args.mount_fs, args.mountpoint, args.fs_type)
    plain_key_bytes: int | None = None
    if foreign is not None:
        pass
    elif kind == "plain":
        spec = parse_cipher_spec(args.cipher or DEFAULT_CIPHER)
        bits = args.key_size if args.key_size is not None else DEFAULT_KEY_SIZE
        if bits % 8:
            raise UsageError(f"key size {bits} bits is not a multiple of 8")
        spec.check_key_size(bits // 8)
        plain_key_bytes = bits // 8
        for line in plain_spec_warnings(args):
            print(f"{PROG}: {line}", file=sys.stderr)
    else:
        where = args.header or args.container
        found = detect_type(where)
        if found is None:
            raise FormatError(
                f"{where} has no LUKS header (nor a BitLocker or FileVault 2 one); use --type "
                "plain or --type tcrypt for a plain dm-crypt or TrueCrypt/VeraCrypt container"
            )
        if token_options and found != "luks2":
            raise UsageError("--token-id, --token-type and --token-only are for LUKS2 containers.")
        if kind in ("luks1", "luks2") and found != kind:
            raise FormatError(f"{where} is {found.upper()}, not {kind.upper()}")
        ignored = [
            f"--{n.replace('_', '-')}"
            for n in ("cipher", "key_size", "hash", "skip", "size", "sector_size")
            if getattr(args, n) not in (None, 0, False)
        ]
        if args.offset or args.iv_large_sectors:
            ignored += ["--offset"] * bool(args.offset) + [
                "--iv-large-sectors"
            ] * args.iv_large_sectors
        if ignored:
            log.warning("%s ignored: the LUKS header defines the encryption", ", ".join(ignored))

    with unlock_progress(args.container, sys.stderr.isatty() and kind != "plain" and not foreign):
        if args.test_passphrase:
            return _test_passphrase(args, kind, foreign)
        if foreign is not None:
            volume = open_foreign_volume(args, foreign)
        elif args.volume_key_file is not None:
            volume = open_volume(args.container, _open_options(args, kind), None)
        else:
            # cryptsetup's open tries the tokens first, a key file given or not
            found_token = None if kind == "plain" else open_by_token(args, kind)
            if found_token is not None:
                volume = found_token
            else:
                secret = get_secret(args, plain_key_bytes)
                volume = open_volume(args.container, _open_options(args, kind), secret)
                del secret
    try:
        setup_volume(volume, args.allow_discards, header_flags=not args.persistent)
        volume_spec = getattr(getattr(volume, "cipher", None), "spec", None)
        if isinstance(volume_spec, CipherSpec):
            warning = weak_spec_warning(volume_spec, volume.readonly)
            if warning:
                print(f"{PROG}: {warning}", file=sys.stderr)
        log.info("opened %r", volume)
        from .mount import MountConfig, fsname_for

        config = MountConfig(
            mountpoint=args.mountpoint,
            fs=fs_options,
            fuse_options=fuse_options,
            foreground=args.foreground,
            log_file=args.log_file,
            fsname=fsname_for(args.container),
            container=os.path.abspath(args.container),
            header=os.path.abspath(args.header) if args.header else None,
            info=volume_info(
                volume,
                kind
                if kind == "plain"
                else foreign or detect_type(args.header or args.container) or "luks",
                args.container,
                args.header,
                volume.readonly,
            ),
            lock_memory=args.lock_memory,
            after_mount=_persist_flags(args) if args.persistent and not foreign else None,
        )
    except BaseException:
        volume.close()
        raise
    from .mount import run

    readonly = volume.readonly
    code = run(volume, config)  # owns the volume from here on
    if code != 0 or args.mount_fs is None:
        return code
    return mount_filesystem(args, config.mountpoint, readonly)


def _persist_flags(args: argparse.Namespace) -> Callable[[ServedVolume], None] | None:
    """``--persistent`` (LUKS): what the daemon does once mounted, as cryptsetup's open
    does once activated: the header's flags become those given here.  A failure is
    reported and the mount stays (cryptsetup's exit code is 0 then too).  Plain
    ignores the option, as cryptsetup does."""
    if args.type == "plain":
        return None
    flags = _requested_flags(args)
    header = args.header or args.container

    def persist(volume: ServedVolume) -> None:
        from .lifecycle import persist_flags

        if isinstance(volume, Volume):
            for line in persist_flags(volume, header, flags):
                log.error("%s", line)

    return persist


def _requested_flags(args: argparse.Namespace) -> list[str]:
    """The LUKS2 names of the activation flags on the command line (cryptsetup's
    ``set_activation_flags``), for ``--persistent``."""
    flags = [flag for name, flag in PERF_FLAGS.items() if getattr(args, f"perf_{name}")]
    return flags + ["allow-discards"] * args.allow_discards


def refresh_command(argv: Sequence[str]) -> int:
    """``cryptfuse refresh MOUNTPOINT``: cryptsetup's ``refresh`` of a mounted volume."""
    p = _Parser(
        prog=f"{PROG} refresh",
        add_help=False,
        description=(
            "Change the flags of a mounted LUKS or plain volume, as 'cryptsetup refresh' "
            "does: discards on or off (--allow-discards, or the LUKS2 header's persistent "
            "flag), and with --persistent the header's flags replaced by those given. The "
            "passphrase (key file, token or volume key file; plain: the key) is asked for and "
            "checked again, as cryptsetup does. A read-only mount stays read-only."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--key-file", "-d", metavar="FILE", help="passphrase (LUKS) or raw key (plain) file"
    )
    p.add_argument("--keyfile-offset", type=_nonneg_int, default=0, metavar="BYTES")
    p.add_argument("--keyfile-size", "-l", type=_nonneg_int, metavar="BYTES")
    p.add_argument("--key-slot", "-S", type=_nonneg_int, metavar="N", help="LUKS keyslot")
    _volume_key_option(p, "LUKS: the volume key in FILE instead of a passphrase")
    p.add_argument("--token-id", type=_nonneg_int, metavar="N", help="LUKS2: only token N")
    p.add_argument("--token-type", metavar="TYPE", help="LUKS2: only tokens of TYPE")
    p.add_argument("--token-only", action="store_true", help="LUKS2: a token or fail")
    p.add_argument(
        "--hash", "-h", metavar="HASH", help=f"plain: the passphrase hash (default {DEFAULT_HASH})"
    )
    p.add_argument("--allow-discards", action="store_true", help="discards on (else off)")
    p.add_argument(
        "--persistent", action="store_true", help="LUKS2: keep the flags given in the header"
    )
    for name in PERF_FLAGS:
        p.add_argument(f"--perf-{name}", action="store_true", help="kept by --persistent")
    p.add_argument("--header", metavar="FILE", help="LUKS: this header (default: the mount's)")
    p.add_argument("--type", "-M", help="ignored: the mount's type counts (as in cryptsetup)")
    p.add_argument("--batch-mode", "-q", action="store_true", help="accepted; nothing is asked")
    p.add_argument("--verbose", "-v", action="store_true", help="name the keyslot")
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    configure_logging(args.verbose, args.debug, None)
    from .cli_lifecycle import ask, entry_of

    entry = entry_of(args.mountpoint)
    state = ask(entry, {"op": "status"})
    kind = str(state.get("type", ""))
    if kind not in ("LUKS1", "LUKS2", "PLAIN"):
        raise UnsupportedError(f"Refresh is not supported for device type {kind}")
    if state.get("reencryption"):  # (the daemon refuses it too; no passphrase asked for)
        raise BusyError(f"{entry.mountpoint} is in reencryption: refresh it once that is done")
    # the mount command's options, as if it opened the mounted container again
    again = build_parser().parse_args([str(state["device"])])
    for name in ("key_file", "keyfile_offset", "keyfile_size", "key_slot", "volume_key_file"):
        setattr(again, name, getattr(args, name))
    for name in ("token_id", "token_type", "token_only", "hash"):
        setattr(again, name, getattr(args, name))
    again.header = args.header or state.get("header")
    request: dict[str, object] = {"op": "refresh", "discards": args.allow_discards}
    if kind == "PLAIN":  # (cryptsetup compares the key it derives with the mapping's)
        bits = int(state["keysize"])
        secret = get_secret(again, bits // 8)
        key = plain_key(
            str(state["cipher"]), bits, args.hash or DEFAULT_HASH, secret.data,
            secret.from_keyfile,
        )  # fmt: skip
        del secret
        request["key_digest"] = hashlib.sha256(key).hexdigest()
    else:
        with unlock_progress(again.container, sys.stderr.isatty()):
            unlocked = _unlock_again(again, kind.lower(), False)
        # (None: a reencryption started meanwhile, which the daemon refuses)
        request["key_digest"] = hashlib.sha256(unlocked or b"").hexdigest()
        del unlocked
        if args.persistent:
            request["persist"] = _requested_flags(args)
    answer = ask(entry, request)
    for line in answer.get("messages", []):
        print(f"{PROG}: {line}", file=sys.stderr)
    return 0


def mount_filesystem(args: argparse.Namespace, mountpoint: str, readonly: bool) -> int:
    """``--mount-fs``: the filesystem after the volume; when it fails, the volume is
    unmounted again and the daemon gone before the error (exit 32) is reported."""
    from .mountfs import mount_filesystem as mount_fs
    from .mountfs import undo_volume

    container = os.path.abspath(args.container)
    volume = os.path.join(mountpoint, args.name)
    try:
        mount_fs(mountpoint, volume, args.mount_fs, args.fs_type, args.fs_options, readonly)
    except BaseException:
        try:
            undo_volume(mountpoint, container)
        except CryptfuseError as exc:
            print(f"{PROG}: undoing the volume mount: {exc}", file=sys.stderr)
        raise
    return 0


# -- subcommands ------------------------------------------------------------------------


def benchmark_command(argv: Sequence[str]) -> int:
    """``cryptfuse benchmark``: cipher and KDF speeds, like ``cryptsetup benchmark``."""
    from . import benchmark

    p = _Parser(
        prog=f"{PROG} benchmark",
        add_help=False,
        description="Measure cipher and KDF speeds in memory.",
    )
    p.add_argument("--cipher", "-c", metavar="SPEC", help="only this cipher spec")
    p.add_argument("--key-size", "-s", type=_nonneg_int, default=256, metavar="BITS")
    p.add_argument("--sector-size", type=_nonneg_int, default=512, metavar="BYTES")
    p.add_argument("--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    ciphers = ((args.cipher, args.key_size),) if args.cipher else benchmark.DEFAULT_CIPHERS
    for line in benchmark.run(
        ciphers=ciphers, sector_size=args.sector_size, kdf=args.cipher is None
    ):
        print(line, flush=True)
    return 0


#: ``cryptfuse NAME ...`` dispatches here; later issues add format, add-key, dump, ...
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "benchmark": benchmark_command,
    **LUKS_SUBCOMMANDS,
    **REENCRYPT_SUBCOMMANDS,
    **CONVERT_SUBCOMMANDS,
    **CLOSE_SUBCOMMANDS,
    **LIFECYCLE_SUBCOMMANDS,
    **FOREIGN_SUBCOMMANDS,
    "dump": lambda argv: foreign_dump_command(argv, dump_command),
    "refresh": refresh_command,
}


#: cryptsetup 2.6.1's action names and aliases -> (our command, None for the mount
#: command; the ``--type`` the name implies).  Its own names (``status``, ``resize``,
#: ``reencrypt``, ``config``, ...) are ours already.
CRYPTSETUP_ACTIONS: dict[str, tuple[str | None, str | None]] = {
    "open": (None, None),
    "create": (None, "plain"),
    "luksOpen": (None, "luks"),
    "plainOpen": (None, "plain"),
    "tcryptOpen": (None, "tcrypt"),
    "bitlkOpen": (None, "bitlk"),
    "fvault2Open": (None, "fvault2"),
    **dict.fromkeys(
        ["remove", "luksClose", "plainClose", "tcryptClose", "bitlkClose", "fvault2Close"],
        ("close", None),
    ),
    "luksFormat": ("format", None),
    "luksAddKey": ("add-key", None),
    "luksRemoveKey": ("remove-key", None),
    "luksChangeKey": ("change-key", None),
    "luksConvertKey": ("convert-key", None),
    "luksKillSlot": ("kill-slot", None),
    "luksUUID": ("uuid", None),
    "isLuks": ("is-luks", None),
    "luksDump": ("dump", None),
    "tcryptDump": ("dump", "tcrypt"),
    "bitlkDump": ("dump", "bitlk"),
    "fvault2Dump": ("dump", "fvault2"),
    "luksHeaderBackup": ("header-backup", None),
    "luksHeaderRestore": ("header-restore", None),
    "luksErase": ("erase", None),
    "luksConfig": ("config", None),
}


#: cryptsetup 2.6.1's options that take a value (``cryptsetup_arg_list.h``) and ours:
#: before the command name (``cryptsetup -d KEY -v luksOpen ...``) the word after one
#: is its value, not the command
VALUED_OPTIONS = frozenset(
    "--active-name --align-payload --block-size --cipher --device-size --hash --header "
    "--header-backup-file --hotzone-size --integrity --iter-time --json-file "
    "--key-description --key-file --key-size --key-slot --keyfile-offset --keyfile-size "
    "--keyslot-cipher --keyslot-key-size --label --luks2-keyslots-size "
    "--luks2-metadata-size --master-key-file --new-key-slot --new-keyfile "
    "--new-keyfile-offset --new-keyfile-size --new-token-id --offset --pbkdf "
    "--pbkdf-force-iterations --pbkdf-memory --pbkdf-parallel --priority "
    "--progress-frequency --reduce-device-size --resilience --resilience-hash "
    "--sector-size --size --skip --subsystem --timeout --token-id --token-type --tries "
    "--type --uuid --veracrypt-pim --volume-key-file -B -I -M -S -T -b -c -d -h -i -l -o "
    "-p -s -t --log-file --name --mount-fs --fs-type --fs-options".split()
)


def _positionals(argv: Sequence[str]) -> list[int]:
    """The indexes of *argv*'s words that are neither options nor their values."""
    found: list[int] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return found + list(range(i + 1, len(argv)))
        if word.startswith("-") and word != "-":
            i += 2 if word in VALUED_OPTIONS else 1
            continue
        found.append(i)
        i += 1
    return found


def cryptsetup_action(argv: list[str]) -> list[str]:
    """*argv* with its command name first (options may come before it, as cryptsetup
    takes them), a cryptsetup action name (``luksDump C``, ``open C M``) replaced by
    our command, and the ``--type`` that name implies added last: cryptsetup ignores a
    ``--type`` given with such a name."""
    words = _positionals(argv)
    if not words:
        return argv
    first = words[0]
    name = argv[first]
    if name in ("loopaesOpen", "loopaesClose"):
        raise UnsupportedError(
            "loop-AES containers are not supported (cryptfuse opens LUKS1, LUKS2, plain, "
            "TCRYPT, BITLK and FVAULT2)."
        )
    if name in SUBCOMMANDS:
        return [name, *argv[:first], *argv[first + 1 :]]
    if name not in CRYPTSETUP_ACTIONS:
        return argv  # the mount command: CONTAINER MOUNTPOINT
    command, kind = CRYPTSETUP_ACTIONS[name]
    rest = [*argv[:first], *argv[first + 1 :]]
    if name == "create":  # (``create NAME DEVICE``: cryptsetup swaps them too)
        where = [i - (i > first) for i in words[1:3]]
        if len(where) == 2:
            rest[where[0]], rest[where[1]] = rest[where[1]], rest[where[0]]
    cut = rest.index("--") if "--" in rest else len(rest)
    implied = ["--type", kind] if kind is not None else []
    head = [command] if command is not None else []
    return head + rest[:cut] + implied + rest[cut:]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code.

    Never raises, except ``SystemExit(0)`` from ``--help`` and ``--version``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    # numpy (the Python engine, e.g. a keyslot's decryption) never calls BLAS here, but
    # OpenBLAS starts a thread per CPU at import that spins for a while: 0.12 CPU s of a
    # 0.9 s reencryption of 1 GiB (bench/reencrypt.py's CPU column)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # a LUKS2 label or token may hold any byte (cryptsetup writes them as given): print
    # them as they are, as luksDump does, not fail on them
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    try:
        # before any passphrase is read: no core dump, no same-user ptrace (hygiene.py)
        protect_process()
        argv = cryptsetup_action(argv)
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return mount_command(argv)
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        return 1
    except CryptfuseError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: still one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} (--debug shows a traceback)",
            file=sys.stderr,
        )
        return 1
