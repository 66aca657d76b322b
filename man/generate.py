#!/usr/bin/env python3
"""Print cryptfuse(8): argparse-manpage over the parser behind ``cryptfuse --help``
(``cryptfuse.cli.build_parser``) plus ``cryptfuse.8.include`` (commands, fstab, exit
status).  ``make man`` writes it to man/cryptfuse.8; tests/test_manpage.py checks that
the committed page is what this prints."""

from __future__ import annotations

import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage

import cryptfuse
from cryptfuse.cli import build_parser

HERE = Path(__file__).resolve().parent


def render() -> str:
    page = Manpage(
        build_parser(),
        _data={
            "prog": "cryptfuse",
            "project_name": "cryptfuse",
            "version": cryptfuse.__version__,
            "description": "dm-crypt and cryptsetup in userspace: mount plain, LUKS1 and "
            "LUKS2 containers with FUSE",
            "manual_section": "8",
            "manual_title": "System Administration",
            "include": str(HERE / "cryptfuse.8.include"),
        },
    )
    return str(page)


if __name__ == "__main__":
    sys.stdout.write(render())
