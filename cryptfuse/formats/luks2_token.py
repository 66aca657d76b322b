"""Opening a LUKS2 container through its tokens, as cryptsetup 2.6.1's ``open`` does
before it asks for a passphrase (``LUKS2_token_unlock_key``, lib/luks2/luks2_token.c).

Only cryptsetup's built-in ``luks2-keyring`` token can be used here: its passphrase is
the kernel keyring's ``user`` key named by its ``key_description``.  Other types
(systemd-cryptenroll's ``systemd-tpm2``, ``systemd-fido2``, ...) need cryptsetup's
external plugins and are passed over, as cryptsetup passes over a token without a
handler.

The order is cryptsetup's.  Without a token id, the tokens are tried in JSON order,
first with their *preferred* keyslots only, then with their preferred and normal ones
(keyslots of priority *ignore* never).  With a token id, that token alone, with all of
its keyslots.  A token's keyslots are tried in the token's order, and only those bound
to the data segment count.  This module only lists what to try; the caller runs the
KDFs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..keyring import user_key
from .luks2 import PRIORITY_HIGH, PRIORITY_IGNORE, PRIORITY_NORMAL, LUKS2Header

KEYRING = "luks2-keyring"


@dataclass(frozen=True)
class Attempt:
    """One keyslot to try with one token's passphrase."""

    token: int
    key_slot: int
    passphrase: bytes

    def __repr__(self) -> str:  # never show the passphrase
        return f"Attempt(token={self.token}, key_slot={self.key_slot})"


@dataclass
class Outcome:
    """What the attempts came to, for the message when none opened: ``usable`` when a
    token could be tried (its key then missing from the keyring, or the wrong one)."""

    usable: bool = False


def keyring_token_valid(token: Any) -> bool:
    """cryptsetup's ``keyring_validate``: exactly ``type``, ``keyslots`` and a
    non-empty ``key_description``."""
    return (
        isinstance(token, dict)
        and len(token) == 3
        and isinstance(token.get("keyslots"), list)
        and isinstance(token.get("key_description"), str)
        and bool(token["key_description"])
    )


def atoi(text: Any) -> int:
    """C's ``atoi`` of a JSON string (cryptsetup reads token and keyslot ids so)."""
    m = re.match(r"\s*([+-]?\d+)", text) if isinstance(text, str) else None
    return int(m.group(1)) if m else 0


def token_attempts(
    header: LUKS2Header,
    token_id: int | None = None,
    token_type: str | None = None,
    outcome: Outcome | None = None,
    any_segment: bool = False,
) -> Iterator[Attempt]:
    """The keyslots to try, in cryptsetup's order, each with its token's passphrase
    (read from the kernel keyring when the token's turn comes).  A (passphrase,
    keyslot) pair already tried is not repeated: it cannot open the second time.
    With *any_segment* (``--test-passphrase`` with ``--key-slot`` or ``--unbound``)
    unbound keyslots count too."""
    tokens = header.json.get("tokens", {})
    _, _, bound = header.data_segment()
    slots = header.metadata.keyslots
    if token_id is not None:
        passes = [(token_id, PRIORITY_IGNORE)] if str(token_id) in tokens else []
    else:
        ids = [atoi(t) for t in tokens]
        passes = [(t, PRIORITY_HIGH) for t in ids] + [(t, PRIORITY_NORMAL) for t in ids]
    tried: set[tuple[bytes, int]] = set()
    for tid, minimum in passes:
        token = tokens.get(str(tid))
        if not isinstance(token, dict) or (token_type and token.get("type") != token_type):
            continue
        if token.get("type") != KEYRING or not keyring_token_valid(token):
            continue  # no handler here (an external plugin's type), or not a valid one
        order = [atoi(k) for k in token["keyslots"]]
        usable = [
            n
            for n in order
            if n in slots and slots[n].priority >= minimum and (any_segment or n in bound.keyslots)
        ]
        if not usable:
            continue  # cryptsetup: unusable for the segment with that priority
        if outcome is not None:
            outcome.usable = True  # (cryptsetup: EPERM from here on, a missing key too)
        try:
            passphrase = user_key(token["key_description"])
        except OSError:
            continue  # no such key (or no keyring): the next token
        for n in usable:
            if (passphrase, n) not in tried:
                tried.add((passphrase, n))
                yield Attempt(tid, n, passphrase)
