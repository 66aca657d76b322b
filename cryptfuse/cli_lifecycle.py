"""``cryptfuse status`` and ``cryptfuse resize`` (cryptsetup's ``status`` and ``resize``),
and what the mount command records for them (see docs/lifecycle.md).

Both name a MOUNTPOINT and reach its daemon over the control socket of the mount
(:func:`cryptfuse.control.mount_socket_path`); they never read a passphrase.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import control
from .cli_input import PROG, _nonneg_int, _Parser
from .errors import CryptfuseError, DeviceError
from .volume import Volume

__all__ = ["LIFECYCLE_SUBCOMMANDS", "ask", "entry_of", "setup_volume", "volume_info"]

log = logging.getLogger(__name__)


def setup_volume(volume: Volume, allow_discards: bool, header_flags: bool = True) -> None:
    """Turn discards on when asked (``--allow-discards``) or when the LUKS2 header
    carries the persistent ``allow-discards`` flag, as cryptsetup honours it; not
    *header_flags* (``--persistent``): only what the command line asks for."""
    if allow_discards or (header_flags and "allow-discards" in volume.persistent_flags):
        volume.enable_discards()


def volume_info(
    volume: Volume, kind: str, container: str, header: str | None, readonly: bool
) -> dict[str, Any]:
    """The fixed part of ``cryptfuse status`` (``cryptsetup status``'s fields); no secret."""
    cipher = getattr(volume, "cipher", None)
    key_size = getattr(cipher, "key_size", None)
    info: dict[str, Any] = {
        "type": kind.upper(),
        "cipher": str(getattr(cipher, "spec", "")),
        "keysize": key_size * 8 if isinstance(key_size, int) else None,
        "device": os.path.abspath(container),
        "sector_size": volume.sector_size,
        "offset": volume.data_offset // 512,
        "keyslot": volume.key_slot,
        "flags": (["discards"] if volume.discards else []) + (["read-only"] if readonly else []),
    }
    iv_offset = getattr(cipher, "iv_offset", 0)
    if kind == "plain":
        info["skipped"] = iv_offset
    if header is not None:
        info["header"] = os.path.abspath(header)
    return info


# -- finding the daemon ---------------------------------------------------------------------


def entry_of(path: str) -> control.MountEntry:
    """The cryptfuse mount at *path* (or holding the file *path*), without touching it."""
    absolute = os.path.abspath(path)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    for candidate in (real, os.path.dirname(real)):
        entry = control.find_mount(candidate)
        if entry is not None and entry.is_cryptfuse:
            return entry
    raise DeviceError(f"{path} is not a cryptfuse mount.")


def ask(entry: control.MountEntry, message: dict[str, Any]) -> dict[str, Any]:
    sock = control.connect_mount(entry.device)
    if sock is None:
        raise DeviceError(
            f"the cryptfuse daemon of {entry.mountpoint} does not answer "
            "(read-only mounts of older versions, another user's mount, or a dead daemon)"
        )
    with sock:
        return control.request(sock, message)


# -- status ---------------------------------------------------------------------------------

_FIELDS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("type", "type", str),
    ("cipher", "cipher", str),
    ("keysize", "keysize", lambda v: f"{v} bits"),
    ("key_location", "key location", str),
    ("device", "device", str),
    ("header", "header", str),
    ("sector_size", "sector size", str),
    ("offset", "offset", lambda v: f"{v} sectors"),
    ("skipped", "skipped", lambda v: f"{v} sectors"),
    ("size", "size", lambda v: f"{v} sectors"),
    ("mode", "mode", str),
    ("flags", "flags", lambda v: " ".join(v)),
    ("keyslot", "keyslot", str),
    ("pid", "daemon", lambda v: f"pid {v}"),
    (
        "io",
        "I/O",
        lambda v: (
            f"{v['reads']} reads, {v['writes']} writes, "
            f"{v['discards']} discards ({v['discarded_bytes']} bytes)"
        ),
    ),
    ("reencryption", "reencryption", lambda v: "running" if v else "no"),
)


def format_status(status: dict[str, Any]) -> str:
    """``cryptsetup status``'s layout: a title line, then indented ``name: value`` lines."""
    lines = [f"{status['mountpoint']} is active."]
    for key, label, show in _FIELDS:
        value = status.get(key)
        if value is None or value == []:
            continue
        lines.append(f"  {label + ':':<13} {show(value)}")
    return "\n".join(lines)


def _one_line(entry: control.MountEntry) -> str:
    try:
        s = ask(entry, {"op": "status"})
    except CryptfuseError as exc:
        return f"{entry.mountpoint}  {entry.source}  ({exc})"
    flags = ",".join(s.get("flags", [])) or "-"
    return (
        f"{s['mountpoint']}  {s['type']}  {s['device']}  {s['cipher']}  "
        f"{s['size']} sectors  {s['mode']}  flags={flags}  pid={s['pid']}"
        + ("  reencrypting" if s.get("reencryption") else "")
    )


def status_command(argv: Sequence[str]) -> int:
    """``cryptfuse status [MOUNTPOINT] [--json]``."""
    p = _Parser(
        prog=f"{PROG} status",
        add_help=False,
        description=(
            "Show a mounted volume as 'cryptsetup status' does, plus its daemon's PID, "
            "I/O counters and reencryption state; without MOUNTPOINT, one line for every "
            "cryptfuse mount of this user."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    if args.mountpoint is not None:
        status = ask(entry_of(args.mountpoint), {"op": "status"})
        print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
        return 0
    uid = os.getuid()
    entries = [e for e in control.mounts() if e.is_cryptfuse and e.user_id in (uid, None)]
    if args.json:
        listed = []
        for e in entries:
            try:
                listed.append(ask(e, {"op": "status"}))
            except CryptfuseError as exc:
                listed.append({"mountpoint": e.mountpoint, "source": e.source, "error": str(exc)})
        print(json.dumps(listed, indent=2, sort_keys=True))
        return 0
    for e in entries:
        print(_one_line(e))
    return 0


# -- resize ---------------------------------------------------------------------------------


def resize_command(argv: Sequence[str]) -> int:
    """``cryptfuse resize MOUNTPOINT [--size SECTORS]``."""
    p = _Parser(
        prog=f"{PROG} resize",
        add_help=False,
        description=(
            "Resize a mounted volume (cryptsetup resize): to --size 512-byte sectors, or "
            "without it to the container's current size (grow the file or device first). "
            "The volume file takes the new size at once, with I/O going on."
        ),
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument(
        "--size", "-b", type=_nonneg_int, metavar="SECTORS", help="new size (0: the container's)"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="say what changed")
    p.add_argument("--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    entry = entry_of(args.mountpoint)
    result = ask(entry, {"op": "resize", "size": args.size})
    # The daemon dropped the kernel's cached attributes; this stat makes the kernel ask
    # again now, so even what reads the inode's cached size sees the new one.
    try:
        os.stat(str(result["file"]))
    except OSError as exc:
        log.warning("cannot stat %s after the resize: %s", result["file"], exc.strerror)
    if args.verbose:
        print(
            f"{entry.mountpoint}: {result['old_size']} -> {result['size']} sectors", file=sys.stderr
        )
    return 0


LIFECYCLE_SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "status": status_command,
    "resize": resize_command,
}
