"""``-o`` for mount(8) and fstab: crypttab's option names, mount(8)'s own options, FUSE's.

``mount -t fuse.cryptfuse CONTAINER MOUNTPOINT -o OPTIONS`` (and the matching fstab line)
reaches cryptfuse through ``mount.fuse3`` as ``cryptfuse CONTAINER MOUNTPOINT -o OPTIONS``.
Everything cryptfuse needs must then travel inside ``-o``, so it takes its own options
there, with crypttab(5)'s names and meanings where crypttab has one:

===================  =================================  =================================
``-o`` option        command-line equivalent            meaning
===================  =================================  =================================
``plain``            ``--type plain``                   plain dm-crypt
``luks``             ``--type luks``                    LUKS1 or LUKS2 (the header says)
``tcrypt``           ``--type tcrypt``                  TrueCrypt/VeraCrypt
``bitlk``            ``--type bitlk``                   BitLocker
``cipher=SPEC``      ``--cipher SPEC``
``size=BITS``        ``--key-size BITS``                crypttab: the *key* size in bits
``hash=HASH``        ``--hash HASH``
``offset=SECTORS``   ``--offset SECTORS``
``skip=SECTORS``     ``--skip SECTORS``
``sector-size=B``    ``--sector-size B``
``keyfile-offset=``  ``--keyfile-offset``
``keyfile-size=``    ``--keyfile-size``
``header=FILE``      ``--header FILE``
``key-slot=N``       ``--key-slot N``
``readonly``         ``--readonly``                     also ``read-only`` (and ``ro``)
``discard``          ``--allow-discards``
``same-cpu-crypt``   ``--perf-same_cpu_crypt``          and ``submit-from-crypt-cpus``,
                                                        ``no-read-workqueue``,
                                                        ``no-write-workqueue``: dm-crypt's
                                                        workqueue flags, no effect here
``key-file=FILE``    ``--key-file FILE``                fstab has no key-file column
``mount-fs=DIR``     ``--mount-fs DIR``
``fs-type=T``        ``--fs-type T``
``fs-options=OPTS``  ``--fs-options OPTS``             quote to keep commas:
                                                        ``fs-options="noatime,nodev"``
===================  =================================  =================================

What mount(8) and ``mount.fuse3`` add or forward (``rw``, ``dev``, ``suid``, ``exec``,
``defaults``, ``auto``, ``noauto``, ``nofail``, ``_netdev``, ``user``, ``users``,
``nouser``, ``owner``, ``group``, ``comment=``, ``x-*`` such as ``x-systemd.*``) is
accepted and dropped; everything else goes to FUSE as before (``allow_other``,
``nodev``, ``uid=``, ...).  A passphrase or key never comes through ``-o``: it would be
visible in ``ps``, ``/proc/*/cmdline`` and ``/etc/fstab``; such options are refused.

Pure: no I/O, no argparse; :func:`apply` sets the parsed values on the mount command's
namespace, refusing contradictions with options given as flags.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedError, UsageError

__all__ = ["MountOptions", "apply", "parse", "split_options"]

#: crypttab's type words -> ``--type``
TYPE_WORDS = {"plain": "plain", "luks": "luks", "tcrypt": "tcrypt", "bitlk": "bitlk"}

#: ``key=value`` options -> (namespace attribute, value kind)
VALUE_OPTIONS: dict[str, tuple[str, str]] = {
    "cipher": ("cipher", "str"),
    "size": ("key_size", "int"),
    "hash": ("hash", "str"),
    "offset": ("offset", "int"),
    "skip": ("skip", "int"),
    "sector-size": ("sector_size", "int"),
    "keyfile-offset": ("keyfile_offset", "int"),
    "keyfile-size": ("keyfile_size", "int"),
    "header": ("header", "str"),
    "key-slot": ("key_slot", "int"),
    "key-file": ("key_file", "str"),
    "mount-fs": ("mount_fs", "str"),
    "fs-type": ("fs_type", "str"),
    "fs-options": ("fs_options", "str"),
}

#: flag options -> namespace attribute set to True
FLAG_OPTIONS = {
    "readonly": "readonly",
    "read-only": "readonly",
    "discard": "allow_discards",
    "same-cpu-crypt": "perf_same_cpu_crypt",
    "submit-from-crypt-cpus": "perf_submit_from_crypt_cpus",
    "no-read-workqueue": "perf_no_read_workqueue",
    "no-write-workqueue": "perf_no_write_workqueue",
}

#: What mount(8)/mount.fuse3 add or forward and FUSE has no use for (or refuses).
MOUNT8_OPTIONS = frozenset(
    {"rw", "dev", "suid", "exec", "defaults", "auto", "noauto", "nofail", "_netdev"}
    | {"user", "users", "nouser", "owner", "group"}
)
MOUNT8_PREFIXES = ("x-", "comment=")

#: Options that would carry a secret on a command line or in /etc/fstab.
SECRET_OPTIONS = frozenset(
    {"passphrase", "password", "passwd", "pass", "key", "volume-key", "master-key", "keyfile"}
)


@dataclass
class MountOptions:
    """The result of :func:`parse`: our settings, and what goes on to FUSE."""

    #: namespace attribute -> value (``type`` for the type words)
    settings: dict[str, object] = field(default_factory=dict)
    #: where each setting came from, for messages (attribute -> ``-o`` text)
    sources: dict[str, str] = field(default_factory=dict)
    #: the options left for FUSE (and the ``-o`` options cryptfuse itself reads)
    fuse: list[str] = field(default_factory=list)
    #: mount(8)'s options that were dropped
    dropped: list[str] = field(default_factory=list)


def split_options(text: str) -> list[str]:
    """Split one ``-o`` argument on commas outside double quotes; quotes are removed.

    ``mount.fuse3`` keeps fstab's quotes (``fs-options="noatime,nodev"``), so a value
    can hold commas.  An unbalanced quote is an error.
    """
    options: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:  # libfuse's escape (fsname=a\,b): kept for libfuse to undo
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            options.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if quoted:
        raise UsageError(f"-o {text}: unbalanced double quote")
    options.append("".join(current).strip())
    return [o for o in options if o]


def _number(option: str, value: str) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        raise UsageError(f"-o {option}: invalid number") from None
    if number < 0:
        raise UsageError(f"-o {option}: negative number")
    return number


def parse(groups: Iterable[str]) -> MountOptions:
    """Parse every ``-o`` argument (each comma separated) into a :class:`MountOptions`."""
    result = MountOptions()

    def put(attr: str, value: object, option: str) -> None:
        if attr in result.settings and result.settings[attr] != value:
            raise UsageError(f"-o {option} contradicts -o {result.sources[attr]}")
        result.settings[attr] = value
        result.sources[attr] = option

    for group in groups:
        for option in split_options(group):
            key, eq, value = option.partition("=")
            if key in SECRET_OPTIONS:
                raise UsageError(
                    f"-o {key}=...: a passphrase or key never goes on the command line or into "
                    "fstab (ps and /proc show it); use key-file=FILE or answer the prompt"
                )
            if key in TYPE_WORDS and not eq:
                put("type", TYPE_WORDS[key], option)
            elif key in FLAG_OPTIONS and not eq:
                put(FLAG_OPTIONS[key], True, option)
            elif key in VALUE_OPTIONS:
                attr, kind = VALUE_OPTIONS[key]
                if not eq or not value:
                    raise UsageError(f"-o {key} needs a value ({key}=...)")
                put(attr, _number(option, value) if kind == "int" else value, option)
            elif option in MOUNT8_OPTIONS or option.startswith(MOUNT8_PREFIXES):
                result.dropped.append(option)
            else:
                result.fuse.append(option)
    return result


def apply(args: Any, parsed: MountOptions, defaults: Any, types: Iterable[str]) -> None:
    """Set *parsed*'s settings on the namespace *args* and leave it the FUSE options.

    *defaults* is the namespace of an empty command line: a flag given explicitly
    (its value differs from the default) and a different ``-o`` value contradict.
    *types* are the container types this build opens; another type word is refused
    here with a clear message instead of failing later as "no LUKS header".
    """
    kind = parsed.settings.get("type")
    if isinstance(kind, str) and kind not in tuple(types):
        raise UnsupportedError(
            f"-o {kind}: this cryptfuse cannot open {kind} containers "
            f"(supported: {', '.join(types)})"
        )
    for attr, value in parsed.settings.items():
        given = getattr(args, attr)
        if given != getattr(defaults, attr) and given != value:
            flag = "--" + attr.replace("_", "-")
            raise UsageError(f"-o {parsed.sources[attr]} contradicts {flag} {given}")
        setattr(args, attr, value)
    args.fuse_options = [",".join(parsed.fuse)] if parsed.fuse else []
