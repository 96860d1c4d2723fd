"""Identifier syntax for identity resolution (pure: no I/O).

Handles (atproto.com/specs/handle): ASCII; normalised to lowercase; at most 253 characters;
at least two labels separated by `.`; each label 1-63 characters of `a-z0-9-`, not starting or
ending with `-`; the last label (the TLD) does not start with a digit. A handle under one of
the TLDs the spec reserves (`DISALLOWED_TLDS`) is syntactically a handle but must never be
resolved, so `check_handle` refuses it too (`reserved=True` on the error).

did:web (atproto.com/specs/did): atproto allows only host-level did:web: `did:web:<host>`
with an optional percent-encoded port (`did:web:localhost%3A8080`), no path (`:` segments).
"""

from __future__ import annotations

import re

from plc.core.didsyntax import is_valid_did

MAX_HANDLE_LENGTH = 253
MAX_LABEL_LENGTH = 63
INVALID_HANDLE = "handle.invalid"
DISALLOWED_TLDS = frozenset(
    {"local", "arpa", "invalid", "localhost", "internal", "example", "onion", "alt"}
)

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


class InvalidHandle(ValueError):
    """A string that is not a resolvable handle; the message says why."""

    def __init__(self, message: str, *, reserved: bool = False) -> None:
        super().__init__(message)
        self.reserved = reserved


def normalize_handle(text: str) -> str:
    """A handle's normal form: lowercase (ASCII case only)."""
    return text.lower() if text.isascii() else text


def handle_syntax_problem(handle: str) -> str | None:
    """Why ``handle`` (already normalised) breaks the handle syntax; None if it does not."""
    if not handle:
        return "handle is empty"
    if not handle.isascii():
        return "handle must be ASCII"
    if len(handle) > MAX_HANDLE_LENGTH:
        return f"handle is longer than {MAX_HANDLE_LENGTH} characters"
    labels = handle.split(".")
    if len(labels) < 2:
        return "handle must have at least two labels"
    for label in labels:
        if not label:
            return "handle has an empty label"
        if len(label) > MAX_LABEL_LENGTH:
            return f"handle label longer than {MAX_LABEL_LENGTH} characters"
        if not _LABEL.fullmatch(label):
            return f"handle label {label!r} is not letters, digits and inner hyphens"
    if labels[-1][0].isdigit():
        return "handle TLD must not start with a digit"
    return None


def is_valid_handle(text: object) -> bool:
    """True if ``text`` is a syntactically valid handle (any case; reserved TLDs included)."""
    return type(text) is str and handle_syntax_problem(normalize_handle(text)) is None


def is_disallowed_tld(handle: str) -> bool:
    """True if the (normalised) handle ends in a TLD the spec reserves from resolution."""
    return handle.rsplit(".", 1)[-1] in DISALLOWED_TLDS


def check_handle(text: str) -> str:
    """The normalised handle; raises InvalidHandle if it is malformed or under a reserved TLD."""
    handle = normalize_handle(text)
    problem = handle_syntax_problem(handle)
    if problem is not None:
        raise InvalidHandle(f"Invalid handle: {problem}")
    if is_disallowed_tld(handle):
        raise InvalidHandle(
            f"Invalid handle: the .{handle.rsplit('.', 1)[-1]} TLD is reserved and never resolved",
            reserved=True,
        )
    return handle


def is_did(text: str) -> bool:
    """True for a syntactically valid DID (the generic atproto syntax)."""
    return is_valid_did(text)


def did_web_host(did: str) -> str | None:
    """The ``host`` or ``host:port`` a host-level did:web names (lowercased); None for anything
    else (a path, a bad host, a bad port, another method)."""
    if not did.startswith("did:web:") or not is_valid_did(did):
        return None
    ident = did[len("did:web:"):]
    if ":" in ident:
        return None  # a path: atproto allows host-level did:web only
    decoded = re.sub(r"%3[aA]", ":", ident)
    if "%" in decoded:
        return None
    host, sep, port = decoded.partition(":")
    host = host.lower()
    if sep:
        if not _PORT.fullmatch(port) or not 0 < int(port) <= 65535:
            return None
    if len(host) > MAX_HANDLE_LENGTH or not all(_HOST_LABEL.fullmatch(x) for x in host.split(".")):
        return None
    return f"{host}:{int(port)}" if sep else host
