"""``cryptfuse reencrypt`` and ``cryptfuse repair`` (cryptsetup's names and options).

The protocol is in :mod:`cryptfuse.formats.luks2_reencrypt`; this module reads
the options and the passphrase, shows progress on a terminal (tqdm) and turns
Ctrl-C into a clean stop at a hot-zone boundary.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from . import control
from .cli_input import PROG, _nonneg_int
from .cli_luks import (
    _existing_secret,
    _kdf_options,
    _key_options,
    _new_secret,
    _parser,
    _size,
    _volume_key_option,
)
from .errors import BusyError, UnsupportedError, UsageError
from .formats import LUKS_MAGIC, manage
from .formats import luks2_reencrypt as reenc
from .formats.luks2 import REENCRYPT_REQUIREMENTS, has_luks2_header, read_luks2_header
from .formats.luks_write import KdfParams
from .formats.manage import KdfOptions, resolve_kdf
from .spec import default_key_bits
from .volume import open_device

__all__ = ["REENCRYPT_SUBCOMMANDS"]


def _kdf_given(args: argparse.Namespace) -> bool:
    """Whether the new keyslot gets a KDF of the options rather than the replaced
    keyslot's: cryptsetup 2.6.1 (``set_keyslot_params``) looks at these four only;
    ``--pbkdf-memory`` or ``--pbkdf-parallel`` alone leave the old KDF."""
    return any(
        getattr(args, name) is not None
        for name in ("pbkdf", "hash", "iter_time", "pbkdf_force_iterations")
    )


def _old_kdf(container: str, header: str | None, slot: int | None) -> KdfParams | None:
    """The KDF of the keyslot being replaced: cryptsetup's reencrypt keeps it
    (no benchmark) unless PBKDF options are given."""
    path = header or container
    fd = open_device(path, True, lock=False)
    try:
        hdr = read_luks2_header(fd, path)
    finally:
        os.close(fd)
    slots = [s for s in hdr.metadata.keyslots.values() if s.type == "luks2"]
    chosen = next((s for s in slots if slot is None or s.index == slot), None)
    if chosen is None or chosen.kdf is None:
        return None
    k = chosen.kdf
    if k.type == "pbkdf2" and k.iterations:
        return KdfParams("pbkdf2", hash=k.hash or "sha256", iterations=k.iterations)
    if k.type in ("argon2i", "argon2id") and k.time and k.memory and k.cpus:
        return KdfParams(k.type, iterations=k.time, memory_kib=k.memory, parallel=k.cpus)
    return None


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) and SIGTERM ask for a stop at the next hot-zone boundary."""
    asked: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        asked.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _progress(enabled: bool) -> Iterator[reenc.ProgressFn | None]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="reencrypt"
    )
    seen = [0]

    def show(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.n = seen[0] = done
            bar.refresh()
            return
        bar.update(done - seen[0])
        seen[0] = done

    try:
        yield show
    finally:
        bar.close()


def reencrypt_command(argv: Sequence[str]) -> int:
    """``cryptfuse reencrypt CONTAINER`` (``cryptsetup reencrypt``, LUKS2)."""
    p = _parser(
        "reencrypt",
        "[options] CONTAINER",
        "Change the volume key (and cipher) of a LUKS2 container in place, or resume an "
        "interrupted reencryption, crash-safe at every instant.",
    )
    p.add_argument("container", metavar="CONTAINER")
    _key_options(p)
    _kdf_options(p)
    g = p.add_argument_group("reencryption")
    g.add_argument("--cipher", "-c", metavar="SPEC", help="new cipher (default: keep)")
    g.add_argument("--key-size", "-s", type=_nonneg_int, metavar="BITS", help="new key size")
    g.add_argument("--sector-size", type=_nonneg_int, metavar="BYTES", help="new sector size")
    g.add_argument(
        "--resilience", choices=("checksum", "journal", "none"), help="default: checksum"
    )
    g.add_argument("--resilience-hash", metavar="HASH", help="default: sha256")
    g.add_argument("--hotzone-size", type=_size, default=0, metavar="SIZE")
    g.add_argument("--init-only", action="store_true", help="write the metadata only")
    g.add_argument("--resume-only", action="store_true", help="only resume a started one")
    g.add_argument("--encrypt", action="store_true", help="a plaintext device becomes LUKS2")
    g.add_argument("--decrypt", action="store_true", help="LUKS2 becomes plaintext (--header)")
    g.add_argument(
        "--reduce-device-size",
        type=_size,
        metavar="SIZE",
        help="move the data SIZE towards the end (--encrypt: in place)",
    )
    g.add_argument("--offset", type=_nonneg_int, metavar="SECTORS", help="--encrypt: data offset")
    g.add_argument("--uuid", metavar="UUID", help="--encrypt: the new header's UUID")
    g.add_argument("--label", default="", help="--encrypt: the new header's label")
    g.add_argument("--subsystem", default="", help="--encrypt: the new header's subsystem")
    g.add_argument("--luks2-metadata-size", type=_size, metavar="BYTES", help="--encrypt")
    g.add_argument("--luks2-keyslots-size", type=_size, metavar="BYTES", help="--encrypt")
    _volume_key_option(
        g, "the new volume key, from FILE (--key-size bits of it) instead of a random one"
    )
    g.add_argument("--type", "-M", choices=("luks2",), default="luks2")
    g.add_argument(
        "--force-offline-reencrypt",
        action="store_true",
        help="offline only (a mounted container is refused as busy); as in cryptsetup, a "
        "larger --sector-size is then not checked against the file system",
    )
    args = p.parse_args(argv)
    if args.init_only and args.resume_only:
        raise UsageError("Options --init-only and --resume-only cannot be combined.")
    container, header = args.container, args.header
    if args.encrypt and args.decrypt:
        raise UsageError("Options --encrypt and --decrypt cannot be combined.")
    current = _luks2_json(header or container)
    started = current is not None and reenc.in_reencryption(current)
    if args.volume_key_file is not None and (started or args.resume_only or args.decrypt):
        raise UsageError("--volume-key-file gives the new volume key of a reencryption to start.")
    if started:
        assert current is not None
        _check_resume_options(args, reenc.Reencryption.from_json(current))
    sock = control.connect(container)
    if sock is not None:  # mounted by a cryptfuse daemon: it does the work (online)
        if args.encrypt or args.decrypt:
            raise BusyError(f"{container} is mounted; --encrypt/--decrypt work offline only.")
        if args.volume_key_file is not None:
            raise BusyError(f"{container} is mounted; --volume-key-file works offline only.")
        if args.force_offline_reencrypt:
            raise BusyError(
                f"{container} is mounted; --force-offline-reencrypt needs it unmounted "
                "(without the option the mount's daemon reencrypts it online)."
            )
        with sock:
            return _online(args, sock, started)
    if args.resume_only and not started:
        raise UsageError(f"Device {container} is not in LUKS2 reencryption.")
    if not started and args.encrypt:
        return _start_encrypt(args)
    if not started and args.decrypt:
        return _start_decrypt(args)
    if current is None:
        raise UsageError(f"Device {header or container} is not a valid LUKS2 device.")
    passphrase = _existing_secret(args, f"Enter passphrase for {container}: ")
    keys: dict[int, bytes] = {}  # the initialization's keys: no second KDF run to resume
    if not started:
        kdf_params, options = _new_reencryption(args)
        slot = reenc.initialize(
            container,
            header,
            passphrase,
            options,
            kdf_params,
            key_slot=args.key_slot,
            af_hash=options.digest_hash,
            keys_out=keys,
        )
        if args.verbose:
            print(f"Key slot {slot} created for the new volume key.", file=sys.stderr)
        if args.init_only:
            return 0
    elif args.resilience is not None:  # as cryptsetup: the resume switches to it
        changed = reenc.switch_resilience(
            container,
            header,
            passphrase,
            args.resilience,
            args.resilience_hash,
            key_slot=args.key_slot,
            keys=keys,
        )
        if changed and args.verbose:
            print(f"{PROG}: resilience switched to {args.resilience}.", file=sys.stderr)
    return _run_to_end(args, passphrase, keys)


def _check_resume_options(args: argparse.Namespace, rh: reenc.Reencryption) -> None:
    """cryptsetup 2.6.1's checks of the options given to a reencryption in progress
    (``reencrypt_verify_and_update_params``); a ``--resilience`` that passes them
    switches the reencryption to it (:func:`reenc.switch_resilience`)."""
    if args.encrypt and rh.mode != "encrypt":
        raise UsageError("Device is not in LUKS2 encryption. Conflicting option --encrypt.")
    if args.decrypt and rh.mode != "decrypt":
        raise UsageError("Device is not in LUKS2 decryption. Conflicting option --decrypt.")
    if args.resilience is not None:
        reenc.resilience_area_type(rh.area_type, args.resilience)


def _luks2_json(path: str) -> dict[str, Any] | None:
    """The LUKS2 metadata at *path*, or None when there is no LUKS header (or no file)."""
    if not os.path.exists(path):
        return None
    fd = open_device(path, True, lock=False)
    try:
        head = os.pread(fd, 8, 0)  # magic and version
        if head[:6] != LUKS_MAGIC and not has_luks2_header(fd):
            return None
        if head == LUKS_MAGIC + b"\x00\x01":
            # cryptsetup 2.6.1 reencrypts LUKS1 through device-mapper (its legacy code)
            raise UnsupportedError(
                f"{path} is LUKS1: reencryption works on LUKS2; convert it first "
                f"({PROG} convert --type luks2 {path})."
            )
        return read_luks2_header(fd, path).json
    finally:
        os.close(fd)


def _run_to_end(
    args: argparse.Namespace, passphrase: bytes, keys: dict[int, bytes] | None = None
) -> int:
    with _interruptible() as stop, _progress(not args.batch) as progress:
        result = reenc.run(
            args.container,
            args.header,
            passphrase,
            key_slot=args.key_slot,
            max_hotzone=args.hotzone_size,
            progress=progress,
            stop=stop,
            keys=keys,
        )
    return _report(result.finished, result.done, result.total, args.container)


def _start_encrypt(args: argparse.Namespace) -> int:
    """``--encrypt``: the plaintext device becomes LUKS2 (detached header or data shift)."""
    passphrase = _new_secret(
        args.key_file,
        args.keyfile_offset,
        args.keyfile_size,
        f"Enter passphrase for {args.container}: ",
    )
    reduce = args.reduce_device_size or 0
    if args.header is None and args.offset and reduce:
        # cryptsetup 2.6.1: the data offset is half the reduction; a smaller --offset
        # lowers the reduction to twice it, a larger one is refused
        if args.offset * 2 * 512 > reduce:
            raise UsageError(
                "Requested data offset must be less than or equal to half of "
                "--reduce-device-size parameter."
            )
        if args.offset * 2 * 512 < reduce:
            reduce = args.offset * 2 * 512
            print(
                f"Adjusting --reduce-device-size value to twice the --offset {args.offset * 2} "
                "(sectors)."
            )
    cipher = args.cipher or "aes-xts-plain64"
    key_bits = args.key_size or default_key_bits(cipher)
    kdf = resolve_kdf(_kdf(args), "luks2", key_bits // 8, args.hash or "sha256")
    options = reenc.EncryptOptions(
        cipher=cipher,
        key_size=key_bits,
        sector_size=args.sector_size or 512,
        resilience=args.resilience or "checksum",
        resilience_hash=args.resilience_hash or "sha256",
        offset=args.offset * 512 if args.offset is not None else None,
        reduce=reduce,
        hash=args.hash or "sha256",
        uuid=args.uuid,
        key_slot=args.key_slot or 0,
        label=args.label,
        subsystem=args.subsystem,
        metadata_size=args.luks2_metadata_size,
        keyslots_size=args.luks2_keyslots_size,
        keyslot_cipher=args.keyslot_cipher,
        keyslot_key_bits=args.keyslot_key_size,
        benchmark_digests=args.pbkdf_force_iterations is None,
        volume_key_file=args.volume_key_file,
        max_hotzone=args.hotzone_size or 0,
    )
    keys: dict[int, bytes] = {}
    reenc.initialize_encrypt(args.container, args.header, passphrase, options, kdf, keys_out=keys)
    if args.init_only:
        return 0
    return _run_to_end(args, passphrase, keys)


def _start_decrypt(args: argparse.Namespace) -> int:
    """``--decrypt --header FILE``: the LUKS2 container becomes plaintext."""
    if args.header is None:
        raise UsageError("LUKS2 decryption requires --header option.")
    passphrase = _existing_secret(args, f"Enter passphrase for {args.container}: ")
    keys: dict[int, bytes] = {}
    reenc.initialize_decrypt(
        args.container,
        args.header,
        passphrase,
        key_slot=args.key_slot,
        resilience=args.resilience or "checksum",
        resilience_hash=args.resilience_hash or "sha256",
        max_hotzone=args.hotzone_size,
        keys_out=keys,
    )
    if args.init_only:
        return 0
    return _run_to_end(args, passphrase, keys)


def _report(finished: bool, done: int, total: int, container: str) -> int:
    if finished:
        return 0
    pct = 100.0 * done / total if total else 0.0
    print(
        f"{PROG}: reencryption stopped at {pct:.1f}%; the container is consistent. "
        f"Resume with: {PROG} reencrypt --resume-only {container}",
        file=sys.stderr,
    )
    return 1


def _new_reencryption(args: argparse.Namespace) -> tuple[KdfParams, reenc.ReencryptOptions]:
    """The KDF of the new keyslot and the options of a reencryption to start."""
    if args.hotzone_size and args.hotzone_size % 512:
        raise UsageError("Hotzone size must be a multiple of 512 bytes.")
    given = _kdf_given(args)
    kdf_params = None if given else _old_kdf(args.container, args.header, args.key_slot)
    if kdf_params is None:
        kdf_params = resolve_kdf(_kdf(args), "luks2", 64, args.hash or "sha256")
    options = reenc.ReencryptOptions(
        cipher=args.cipher,
        key_size=args.key_size,
        sector_size=args.sector_size,
        resilience=args.resilience or "checksum",
        resilience_hash=args.resilience_hash or "sha256",
        shift=args.reduce_device_size or 0,
        digest_hash=(args.hash or "sha256") if given else None,
        benchmark_digests=given and args.pbkdf_force_iterations is None,
        volume_key_file=args.volume_key_file,
        check_filesystem=not args.force_offline_reencrypt,
        max_hotzone=args.hotzone_size or 0,
    )
    return kdf_params, options


def _online(args: argparse.Namespace, sock: socket.socket, started: bool) -> int:
    """Ask the daemon that mounts the container to do the reencryption (it is the
    container's only writer), relaying progress and Ctrl-C."""
    container = args.container
    if started and args.resilience is not None:
        raise UnsupportedError(
            f"{container} is mounted: its reencryption's resilience can be changed offline "
            "only (resume without --resilience, or unmount first)."
        )
    passphrase = _existing_secret(args, f"Enter passphrase for {container}: ")
    message: dict[str, object] = {
        "op": "reencrypt",
        "passphrase": base64.b64encode(passphrase).decode("ascii"),
        "key_slot": args.key_slot,
        "hotzone": args.hotzone_size,
        "resume_only": args.resume_only,
        "init_only": args.init_only,
    }
    if not started and not args.resume_only:
        kdf_params, options = _new_reencryption(args)
        message["init"] = {
            "options": dataclasses.asdict(options),
            "kdf": dataclasses.asdict(kdf_params),
            "af_hash": options.digest_hash,
        }
    if args.verbose:
        print(f"{PROG}: {container} is mounted: reencrypting online", file=sys.stderr)
    with _interruptible() as stop, _progress(not args.batch) as progress:
        result = control.request(sock, message, progress, stop)
    if result.get("initialized"):
        return 0
    if result["finished"] and (args.verbose or sys.stderr.isatty()):
        print(
            f"{PROG}: done; remount to serve it through the C data path again (until then "
            "the mount runs on the slower Python engine).",
            file=sys.stderr,
        )
    return _report(bool(result["finished"]), int(result["done"]), int(result["total"]), container)


def _kdf(args: argparse.Namespace) -> KdfOptions:
    from .cli_luks import _kdf as kdf_options

    return kdf_options(args)


def repair_command(argv: Sequence[str]) -> int:
    """``cryptfuse repair CONTAINER`` (``cryptsetup repair``): rewrite a damaged or
    outdated LUKS2 header copy from the good one, then recover an interrupted
    reencryption hot zone (the passphrase is asked only for a container in
    reencryption, as cryptsetup asks it)."""
    p = _parser(
        "repair",
        "[options] CONTAINER",
        "Repair a damaged LUKS2 header copy; recover an interrupted LUKS2 reencryption.",
    )
    p.add_argument("container", metavar="CONTAINER")
    _key_options(p)
    args = p.parse_args(argv)
    kind, repaired = manage.repair_header(args.container, args.header)
    for line in repaired:
        print(f"{PROG}: {line}", file=sys.stderr)
    if not repaired and args.verbose:
        print("No known problems detected for LUKS header.", file=sys.stderr)
    current = _luks2_json(args.header or args.container) if kind == "luks2" else None
    if current is not None:  # cryptsetup's repair fails on unknown requirements too
        config = current.get("config", {})
        mandatory = config.get("requirements", {}).get("mandatory", [])
        unknown = [r for r in mandatory if r not in REENCRYPT_REQUIREMENTS]
        if unknown:
            raise UnsupportedError(
                f"LUKS2 header requires unknown features ({', '.join(map(str, unknown))}); "
                "cannot check it for a reencryption to recover."
            )
    if current is None or not reenc.in_reencryption(current):
        return 0
    crashed = reenc.Reencryption.from_json(current).crashed()
    prompt = "reencryption recovery" if crashed else "verify reencryption metadata digest"
    passphrase = _existing_secret(args, f"Enter passphrase for {prompt}: ")
    done = reenc.recover(args.container, args.header, passphrase, args.key_slot)
    if args.verbose:
        print(
            f"{PROG}: "
            + (
                "hot zone recovered."
                if done
                else "reencryption metadata verified; no hot zone cut."
            ),
            file=sys.stderr,
        )
    return 0


#: registered in :data:`cryptfuse.cli.SUBCOMMANDS`
REENCRYPT_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "reencrypt": reencrypt_command,
    "repair": repair_command,
}
