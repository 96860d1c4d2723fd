"""Test data builders: real keys, real signatures, audit-log loading and independent references.

Everything here is deliberately written without the code under test where that matters:
`ref_dag_cbor` is a separate ~40-line DAG-CBOR encoder (spec §3.2), `schema_json` prints an op
the way the reference echoes it in error messages, `parse_iso_ms` reads audit-log timestamps.
Signing uses the core's `SigningKey` (deterministic RFC 6979, low S).
"""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from plc.core.didkey import K256, P256
from plc.core.signatures import SigningKey

HOUR = 3_600_000
DAY = 24 * HOUR
WEEK = 7 * DAY
WINDOW = 72 * HOUR  # the recovery window, 259 200 000 ms
NOW = 1_750_000_000_000  # a fixed "server clock" for submit-mode tests (2025-06-15)

OP_SCHEMA_ORDER = ("type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services", "prev", "sig")
TOMBSTONE_SCHEMA_ORDER = ("type", "prev", "sig")


# ----------------------------------------------------------------------------- keys
@lru_cache(maxsize=None)
def key(name: str, curve: str = K256) -> SigningKey:
    """A deterministic test key named `name` on `curve`."""
    return SigningKey.from_seed(curve, f"{curve}:{name}".encode())


def k256(name: str) -> SigningKey:
    return key(name, K256)


def p256(name: str) -> SigningKey:
    return key(name, P256)


# ----------------------------------------------------------------------------- ops
def unsigned_op(
    rotation: list[SigningKey] | list[str],
    *,
    prev: str | None = None,
    aka: list[str] | None = None,
    services: dict[str, Any] | None = None,
    vms: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A `plc_operation` without `sig`. `rotation` holds SigningKeys or did:key strings."""
    rot = [k.did_key if isinstance(k, SigningKey) else k for k in rotation]
    return {
        "type": "plc_operation",
        "rotationKeys": rot,
        "verificationMethods": vms if vms is not None else {"atproto": rot[0] if rot else k256("vm").did_key},
        "alsoKnownAs": aka if aka is not None else ["at://alice.test"],
        "services": services
        if services is not None
        else {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": "https://pds.example.com"}},
        "prev": prev,
    }


def ref_unsigned_bytes(op: dict[str, Any]) -> bytes:
    return ref_dag_cbor({k: v for k, v in op.items() if k != "sig"})


def sign(op: dict[str, Any], signer: SigningKey) -> dict[str, Any]:
    """A copy of `op` with a real signature by `signer` over its unsigned DAG-CBOR."""
    body = {k: v for k, v in op.items() if k != "sig"}
    return {**body, "sig": signer.sign(ref_unsigned_bytes(body))}


def sign_raw(op: dict[str, Any], signer: SigningKey, *, high_s: bool = False) -> bytes:
    """The raw 64-byte compact signature of `op` by `signer` (optionally with high S)."""
    return signer.sign_raw(ref_unsigned_bytes(op), high_s=high_s)


def ref_cid(op: dict[str, Any]) -> str:
    """CIDv1 dag-cbor sha2-256, base32 lower with `b` prefix, computed independently."""
    import base64

    raw = b"\x01\x71\x12\x20" + hashlib.sha256(ref_dag_cbor(op)).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def ref_did(op: dict[str, Any]) -> str:
    import base64

    return "did:plc:" + base64.b32encode(hashlib.sha256(ref_dag_cbor(op)).digest()).decode().lower()[:24]


def genesis(
    signer: SigningKey, rotation: list[SigningKey] | list[str] | None = None, **fields: Any
) -> tuple[str, dict]:
    """(did, signed genesis op). `rotation` defaults to [signer]."""
    op = sign(unsigned_op(rotation if rotation is not None else [signer], **fields), signer)
    return ref_did(op), op


def update(prev: str, signer: SigningKey, rotation: list[SigningKey] | list[str], **fields: Any) -> dict:
    return sign(unsigned_op(rotation, prev=prev, **fields), signer)


def tombstone(prev: str, signer: SigningKey) -> dict:
    return sign({"type": "plc_tombstone", "prev": prev}, signer)


# ----------------------------------------------------------------------------- reference texts
def schema_json(op: dict[str, Any]) -> str:
    """The op as the reference's `JSON.stringify` of its zod-parsed form prints it: top-level keys
    in schema order, nested objects as given, compact, raw UTF-8."""
    order = TOMBSTONE_SCHEMA_ORDER if op.get("type") == "plc_tombstone" else OP_SCHEMA_ORDER
    ordered = {k: op[k] for k in order if k in op}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def client_json(body: Any) -> str:
    """`JSON.stringify` of a parsed body whose keys are all non-numeric: the client's own order."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def bad_sig_message(op: dict[str, Any]) -> str:
    return "Invalid signature on op: " + schema_json(op)


def js_len(s: str) -> int:
    """UTF-16 code units (JavaScript's String.length)."""
    return len(s.encode("utf-16-le")) // 2


# ----------------------------------------------------------------------------- independent DAG-CBOR
def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", n)
    if n < 0x100000000:
        return bytes([major << 5 | 26]) + struct.pack(">I", n)
    return bytes([major << 5 | 27]) + struct.pack(">Q", n)


def ref_dag_cbor(v: Any) -> bytes:
    """Canonical DAG-CBOR of JSON-like data (maps, lists, text, ints, bools, null), written
    from the spec (§3.2) independently of the core: map keys by encoded length, then bytes."""
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return _head(0, v) if v >= 0 else _head(1, -1 - v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return _head(3, len(b)) + b
    if isinstance(v, bytes):
        return _head(2, len(v)) + v
    if isinstance(v, list):
        return _head(4, len(v)) + b"".join(ref_dag_cbor(x) for x in v)
    if isinstance(v, dict):
        items = sorted(((k.encode("utf-8"), x) for k, x in v.items()), key=lambda kv: (len(kv[0]), kv[0]))
        return _head(5, len(items)) + b"".join(_head(3, len(k)) + k + ref_dag_cbor(x) for k, x in items)
    raise TypeError(f"not encodable: {type(v).__name__}")


# ----------------------------------------------------------------------------- audit logs
def parse_iso_ms(text: str) -> int:
    """ms since the epoch of an audit-log `createdAt` (`YYYY-MM-DDTHH:MM:SS.mmmZ`)."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def load_audit_log(path: Path) -> tuple[str, list[tuple[dict, int, str]], list[bool]]:
    """(did, [(operation, createdAt ms, cid)], stored nullified flags) of an audit-log file."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    dids = {e["did"] for e in entries}
    assert len(dids) == 1, f"{path.name}: more than one DID"
    items = [(e["operation"], parse_iso_ms(e["createdAt"]), e["cid"]) for e in entries]
    return dids.pop(), items, [e["nullified"] for e in entries]
