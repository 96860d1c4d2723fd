"""Byte-exact response bodies of the reference server's read routes (spec §1.3, §1.5, §1.6, §2, §5).

Pure functions: no I/O, no clock. Inputs are plain values so that any store can call them:

- an *op* is the op dict as received (key order irrelevant), or the bytes `op_json` made of it
  earlier (a store may keep those and skip re-rendering; they are embedded verbatim);
- a *row* is a tuple `(did, op, cid, created_at, nullified, seq)` (`OpRow`; `seq` may be left
  off where it is not used); `created_at` is integer ms since the epoch;
- `chain.OpEntry` lists are accepted where a DID's whole history is rendered.

Ops keep their stored form: a legacy `create` stays raw in /log, /log/last, /log/audit and
exports, and is normalised only for /data and the DID document. Every object inside an op is
rendered in the jsonb + V8 key order of §1.9; wrapper objects use the fixed orders below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Union

import orjson

from .chain import OpEntry
from .didkey import CONTEXT_BY_CURVE, parse_rotation_key
from .encoding import normalize_op
from .jsonfmt import format_ms, op_order
from .shape import TOMBSTONE

Op = Union[dict, bytes]  # an op dict, or its §1.9 JSON bytes from `op_json`

DID_CONTEXT = "https://www.w3.org/ns/did/v1"
MULTIKEY_CONTEXT = "https://w3id.org/security/multikey/v1"
SEQUENCED_OP = "sequenced_op"
_DID_KEY_PREFIX = "did:key:"

_dumps = orjson.dumps
_Fragment = orjson.Fragment


class OpRow(NamedTuple):
    """One stored op of a DID, as the list renderers read it (any tuple in this order works)."""

    did: str
    op: Op
    cid: str
    created_at: int  # ms since the epoch
    nullified: bool = False
    seq: int | None = None


def _op_value(op: Op) -> Any:
    """What to embed for an op inside a wrapper object: its ordered dict or a JSON fragment."""
    if type(op) is bytes:
        return _Fragment(op)
    return op_order(op)


def op_json(op: Op) -> bytes:
    """The op as the reference serves it (/log/last body, and the unit of every other list)."""
    if type(op) is bytes:
        return op
    return _dumps(op_order(op))


# ----------------------------------------------------------------------------- /log, /log/last
def log_json(ops: Iterable[Op]) -> bytes:
    """`/:did/log`: a JSON array of the given ops (pass the non-nullified ones, oldest first)."""
    return _dumps([_op_value(op) for op in ops])


def log_json_from_entries(entries: Iterable[OpEntry]) -> bytes:
    """`/:did/log` from a DID's `OpEntry` list (all of them): nullified ones are left out."""
    return _dumps([op_order(e.op) for e in entries if not e.nullified])


def latest_entry(entries: Sequence[OpEntry]) -> OpEntry | None:
    """The op /log/last, /data and the document read: the newest non-nullified entry."""
    for e in reversed(entries):
        if not e.nullified:
            return e
    return None


def log_last_json(op: Op) -> bytes:
    """`/:did/log/last`: the latest non-nullified op, a tombstone included."""
    return op_json(op)


# ----------------------------------------------------------------------------- /log/audit
def audit_entry_json(did: str, op: Op, cid: str, created_at: int, nullified: bool) -> bytes:
    """One audit entry: `{"did","operation","cid","nullified","createdAt"}`."""
    return _dumps(
        {
            "did": did,
            "operation": _op_value(op),
            "cid": cid,
            "nullified": nullified,
            "createdAt": format_ms(created_at),
        }
    )


def audit_json(rows: Iterable[Sequence[Any]]) -> bytes:
    """`/:did/log/audit`: rows `(did, op, cid, created_at, nullified, …)`, all of them, oldest first."""
    return _dumps(
        [
            {
                "did": r[0],
                "operation": _op_value(r[1]),
                "cid": r[2],
                "nullified": r[4],
                "createdAt": format_ms(r[3]),
            }
            for r in rows
        ]
    )


def audit_json_from_entries(did: str, entries: Iterable[OpEntry]) -> bytes:
    """`/:did/log/audit` from a DID's `OpEntry` list (every entry, nullified ones included)."""
    return _dumps(
        [
            {
                "did": did,
                "operation": op_order(e.op),
                "cid": e.cid,
                "nullified": e.nullified,
                "createdAt": format_ms(e.created_at),
            }
            for e in entries
        ]
    )


# ----------------------------------------------------------------------------- /data and the document
def is_tombstone(op: dict[str, Any]) -> bool:
    """True for a `plc_tombstone`: /data and the document answer 404 `DID not available`."""
    return op.get("type") == TOMBSTONE


def document_data(did: str, op: dict[str, Any]) -> dict[str, Any] | None:
    """`/:did/data` as a dict in the reference's order; None for a tombstone (answer 404).

    A legacy `create` is normalised first; the inner maps follow §1.9.
    """
    if op.get("type") == TOMBSTONE:
        return None
    n = normalize_op(op)
    return {
        "did": did,
        "verificationMethods": op_order(n["verificationMethods"]),
        "rotationKeys": n["rotationKeys"],
        "alsoKnownAs": n["alsoKnownAs"],
        "services": op_order(n["services"]),
    }


def data_json(did: str, op: dict[str, Any]) -> bytes | None:
    """`/:did/data` body; None for a tombstone (answer 404 `DID not available: <did>`)."""
    data = document_data(did, op)
    return None if data is None else _dumps(data)


def key_context(did_key: str) -> str | None:
    """The @context a verification key adds: ecdsa-2019 for P-256, secp256k1-2019 for k256, else None."""
    pk = parse_rotation_key(did_key)
    return None if pk is None else CONTEXT_BY_CURVE[pk.curve]


def did_document(data: dict[str, Any]) -> dict[str, Any]:
    """The DID document (§2) built from `document_data`'s output (maps already in §1.9 order)."""
    did = data["did"]
    context = [DID_CONTEXT, MULTIKEY_CONTEXT]
    methods = []
    for name, key in data["verificationMethods"].items():
        ctx = key_context(key)
        if ctx is not None and ctx not in context:
            context.append(ctx)
        methods.append(
            {
                "id": f"{did}#{name}",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": key[8:] if key.startswith(_DID_KEY_PREFIX) else key,
            }
        )
    services = [
        {"id": "#" + name, "type": s["type"], "serviceEndpoint": s["endpoint"]}
        for name, s in data["services"].items()
    ]
    return {
        "@context": context,
        "id": did,
        "alsoKnownAs": data["alsoKnownAs"],
        "verificationMethod": methods,
        "service": services,
    }


def did_document_json(did: str, op: dict[str, Any]) -> bytes | None:
    """`/:did` body (application/did+ld+json); None for a tombstone (answer 404)."""
    data = document_data(did, op)
    return None if data is None else _dumps(did_document(data))


# ----------------------------------------------------------------------------- export and stream
def export_line_legacy(did: str, op: Op, cid: str, created_at: int, nullified: bool) -> bytes:
    """Legacy `/export` line: `{"did","cid","createdAt","operation","nullified"}`."""
    return _dumps(
        {
            "did": did,
            "cid": cid,
            "createdAt": format_ms(created_at),
            "operation": _op_value(op),
            "nullified": nullified,
        }
    )


def export_line_sequenced(did: str, op: Op, cid: str, created_at: int, seq: int) -> bytes:
    """Sequenced `/export` line: `{"did","cid","seq","createdAt","operation","type":"sequenced_op"}`."""
    return _dumps(
        {
            "did": did,
            "cid": cid,
            "seq": seq,
            "createdAt": format_ms(created_at),
            "operation": _op_value(op),
            "type": SEQUENCED_OP,
        }
    )


def export_lines(rows: Iterable[Sequence[Any]], *, sequenced: bool) -> list[bytes]:
    """Export lines for rows `(did, op, cid, created_at, nullified, seq)` in the chosen format."""
    if sequenced:
        return [export_line_sequenced(r[0], r[1], r[2], r[3], r[5]) for r in rows]
    return [export_line_legacy(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def export_body(lines: Iterable[bytes]) -> bytes:
    """The `/export` body: lines joined with `\\n`, no trailing newline, empty for no rows."""
    return b"\n".join(lines)


def stream_message(did: str, op: Op, cid: str, created_at: int, seq: int) -> bytes:
    """One `/export/stream` text frame: `{"seq","type","did","operation","cid","createdAt"}`."""
    return _dumps(
        {
            "seq": seq,
            "type": SEQUENCED_OP,
            "did": did,
            "operation": _op_value(op),
            "cid": cid,
            "createdAt": format_ms(created_at),
        }
    )


# ----------------------------------------------------------------------------- errors
def error_body(message: str) -> bytes:
    """The JSON error body `{"message":"…"}`."""
    return _dumps({"message": message})


def not_registered(did: str) -> str:
    """404 text for a DID with no ops."""
    return f"DID not registered: {did}"


def not_available(did: str) -> str:
    """404 text for /:did and /:did/data of a tombstoned DID."""
    return f"DID not available: {did}"


def rows_from_entries(did: str, entries: Iterable[OpEntry], seqs: Sequence[int] | None = None) -> list[OpRow]:
    """`OpRow`s for a DID's `OpEntry` list (optionally with their seqs, same order)."""
    entries = list(entries)
    if seqs is None:
        return [OpRow(did, e.op, e.cid, e.created_at, e.nullified) for e in entries]
    return [OpRow(did, e.op, e.cid, e.created_at, e.nullified, s) for e, s in zip(entries, seqs, strict=True)]
