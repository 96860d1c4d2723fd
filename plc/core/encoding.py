"""DAG-CBOR encoding, op CIDs, DID derivation and legacy `create` normalisation (spec §2, §3).

DAG-CBOR comes from libipld (canonical: map keys by encoded length, then bytewise).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import libipld

CID_PREFIX = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32 bytes


def dag_cbor(obj: Any) -> bytes:
    return libipld.encode_dag_cbor(obj)


def unsigned_cbor(op: dict[str, Any]) -> bytes:
    """DAG-CBOR of the op with its `sig` key removed: the bytes that are signed."""
    return libipld.encode_dag_cbor({k: v for k, v in op.items() if k != "sig"})


def unsigned_from_signed(signed: bytes, op: dict[str, Any]) -> bytes:
    """The unsigned bytes cut out of the signed encoding, without re-encoding.

    In canonical DAG-CBOR map keys sort by encoded length first, so the 3-letter `sig` is the
    first entry of every op (all other keys are longer); dropping it and decrementing the map
    header gives exactly the encoding of the op without `sig`. Falls back to re-encoding when
    the bytes do not have that form.
    """
    head = signed[0]
    if 0xA1 <= head <= 0xB7 and signed[1:5] == b"\x63sig":
        b = signed[5]
        if 0x60 <= b <= 0x77:
            end = 6 + (b - 0x60)
        elif b == 0x78:
            end = 7 + signed[6]
        elif b == 0x79:
            end = 8 + int.from_bytes(signed[6:8], "big")
        else:
            return unsigned_cbor(op)
        return bytes((head - 1,)) + signed[end:]
    return unsigned_cbor(op)


def cid_for_cbor(data: bytes) -> str:
    return libipld.encode_cid(CID_PREFIX + hashlib.sha256(data).digest())


def op_cid(op: dict[str, Any]) -> str:
    return cid_for_cbor(libipld.encode_dag_cbor(op))


def did_for_cbor(signed: bytes) -> str:
    return "did:plc:" + libipld.encode_multibase("b", hashlib.sha256(signed).digest())[1:25]


def did_for_genesis(op: dict[str, Any]) -> str:
    """`did:plc:` + the first 24 base32 chars of sha256(DAG-CBOR of the signed genesis op)."""
    return did_for_cbor(libipld.encode_dag_cbor(op))


def canonical_cid(text: str) -> str:
    """The canonical base32 `b…` form of a CID string, as `CID.parse` would read it.

    Accepts `b` (base32 lower) and `z` (base58btc) multibase prefixes; a CIDv0 (`Qm…`) parses
    but is returned as-is (it never equals a CIDv1). Raises ValueError for anything else.
    """
    if text.startswith("bafyrei") and len(text) == 59 and text.islower():
        try:
            libipld.decode_cid(text)
        except ValueError as exc:  # e.g. characters outside the base32 alphabet
            raise ValueError(str(exc)) from None
        return text
    if not text or text[0] not in "bzQ":
        raise ValueError("Unable to decode multibase string")
    try:
        cid = libipld.decode_cid(text)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if cid["version"] == 0:
        return text
    return _encode_cid_parts(cid)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _encode_cid_parts(cid: dict[str, Any]) -> str:
    h = cid["hash"]
    raw = (
        _varint(cid["version"])
        + _varint(cid["codec"])
        + _varint(h["code"])
        + _varint(h["size"])
        + bytes(h["digest"])
    )
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


# ----------------------------------------------------------------------------- legacy create
def ensure_atproto_prefix(handle: str) -> str:
    """The reference's ensureAtprotoPrefix: keep `at://…`, else strip the first `http://`
    anywhere, then the first `https://` anywhere, and prepend `at://`."""
    if handle.startswith("at://"):
        return handle
    stripped = handle.replace("http://", "", 1).replace("https://", "", 1)
    return "at://" + stripped


def ensure_http_prefix(url: str) -> str:
    if url.startswith("http://") or url.startswith("https://"):
        return url
    return "https://" + url


def normalize_op(op: dict[str, Any]) -> dict[str, Any]:
    """A legacy `create` as the equivalent `plc_operation` fields; other ops unchanged."""
    if op.get("type") != "create":
        return op
    return {
        "type": "plc_operation",
        "rotationKeys": [op["recoveryKey"], op["signingKey"]],
        "verificationMethods": {"atproto": op["signingKey"]},
        "alsoKnownAs": [ensure_atproto_prefix(op["handle"])],
        "services": {
            "atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": ensure_http_prefix(op["service"])}
        },
        "prev": op["prev"],
        "sig": op["sig"],
    }


def authority_keys(op: dict[str, Any]) -> tuple[str, ...]:
    """The rotation keys that may sign a child of this op (empty for a tombstone)."""
    t = op.get("type")
    if t == "plc_operation":
        return tuple(op["rotationKeys"])
    if t == "create":
        return (op["recoveryKey"], op["signingKey"])
    return ()
