"""DID syntax checks: the generic atproto DID syntax and the did:plc identifier form.

atproto DID syntax (atproto.com/specs/did): ASCII only; `did:` + a method of one or more
lowercase letters + `:` + an identifier of letters, digits and `._:%-`; a `%` must start a
two-hex-digit escape; the DID must not end in `:` or `%`; at most 2048 characters.

A did:plc is `did:plc:` + 24 characters of lowercase base32 (`a-z2-7`) — the first 24
characters of the base32 SHA-256 of the genesis op (spec §3.5) — 32 characters in all.

Note: the reference server does not check DID syntax on any route (spec §1.1); these checks
are for tools and input validation where we choose to apply them.
"""

from __future__ import annotations

import re

MAX_DID_LENGTH = 2048

_DID = re.compile(r"did:[a-z]+:(?:[a-zA-Z0-9._:-]|%[0-9A-Fa-f]{2})*(?:[a-zA-Z0-9._-]|%[0-9A-Fa-f]{2})")
_PLC = re.compile(r"did:plc:[a-z2-7]{24}")


def is_valid_did(s: object) -> bool:
    """True if `s` is a syntactically valid DID under the atproto rules."""
    return type(s) is str and len(s) <= MAX_DID_LENGTH and s.isascii() and _DID.fullmatch(s) is not None


def is_valid_plc_did(s: object) -> bool:
    """True if `s` is a well-formed did:plc identifier (`did:plc:` + 24 base32-lower chars)."""
    return type(s) is str and _PLC.fullmatch(s) is not None


__all__ = ["MAX_DID_LENGTH", "is_valid_did", "is_valid_plc_did"]
