#!/usr/bin/env python3
"""Open a dm-crypt plain container with cryptfuse's Python API and print one sector.

No FUSE, no root: the container is decrypted in this process.  The key comes from a key
file (raw key, as ``cryptsetup open --type plain --key-file``) or, without ``--key-file``,
from a passphrase typed at the terminal and hashed like cryptsetup does.  It is never
given on the command line.

Example with the shared test corpus (plaintext starts with sha256(b"cs-corpus-0")):

    .venv/bin/python examples/read_sector.py \\
        --cipher aes-xts-plain64 --key-size 512 \\
        --key-file ../shared/corpus/generated/plain-keyfile-off10.key --keyfile-offset 10 \\
        ../shared/corpus/generated/plain-aes-xts-plain64-k512-keyfile-off10.img 0
"""

from __future__ import annotations

import argparse
import getpass
import sys

import cryptfuse
from cryptfuse import OpenOptions, Secret, open_volume


def hexdump(data: bytes, base: int) -> str:
    rows = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{base + i:08x}  {chunk.hex(' ', 1):<47}  |{text}|")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("container")
    p.add_argument("sector", type=int, nargs="?", default=0, help="encryption sector index")
    p.add_argument("--cipher", "-c", help="default: aes-cbc-essiv:sha256 (cryptsetup 2.6)")
    p.add_argument("--key-size", "-s", type=int, help="bits (default 256)")
    p.add_argument("--hash", help="passphrase hash (default ripemd160)")
    p.add_argument("--key-file", "-d", help="raw key file")
    p.add_argument("--keyfile-offset", type=int, default=0)
    p.add_argument("--offset", type=int, default=0, help="data offset, 512-byte sectors")
    p.add_argument("--skip", "-p", type=int, default=0, help="IV offset, 512-byte sectors")
    p.add_argument("--sector-size", type=int, help="512..4096")
    args = p.parse_args()

    if args.key_file:
        with open(args.key_file, "rb") as f:
            f.seek(args.keyfile_offset)
            secret = Secret(f.read(), from_keyfile=True)
    else:
        secret = Secret(getpass.getpass("Enter passphrase: ").encode(), from_keyfile=False)

    options = OpenOptions(
        type="plain",
        readonly=True,  # opening never writes; read-only also allows a shared lock
        cipher=args.cipher,
        key_size=args.key_size,
        hash=args.hash,
        offset=args.offset,
        skip=args.skip,
        sector_size=args.sector_size,
    )
    try:
        with open_volume(args.container, options, secret) as volume:
            start = args.sector * volume.sector_size
            data = volume.read(start, volume.sector_size)
            print(volume)
    except cryptfuse.CryptfuseError as exc:
        print(f"read_sector: {exc}", file=sys.stderr)
        return exc.exit_code
    if not data:
        print(f"sector {args.sector} is past the end of the volume", file=sys.stderr)
        return 1
    print(hexdump(data, start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
