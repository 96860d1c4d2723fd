"""The strict shape of an operation (spec §3.1) — applied in both modes.

A `plc_operation` or `plc_tombstone` must have exactly its fields with the right JSON types;
service objects are exactly `{type, endpoint}`. Legacy `create` genesis ops are accepted only
from history (replay). Upstream history once held ops with extra fields (purged 2025-11-14);
a strict verifier rejects them.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import OpError, Reason
from .jsonfmt import js_stringify

OPERATION = "plc_operation"
TOMBSTONE = "plc_tombstone"
CREATE = "create"

_OP_KEYS = frozenset(("type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services", "prev", "sig"))
_TOMBSTONE_KEYS = frozenset(("type", "prev", "sig"))
_CREATE_KEYS = frozenset(("type", "signingKey", "recoveryKey", "handle", "service", "prev", "sig"))
_SERVICE_KEYS = frozenset(("type", "endpoint"))

# the key order zod's parse output has (schema order), used in the reference's messages
_SCHEMA_ORDER = {
    OPERATION: ("type", "rotationKeys", "verificationMethods", "alsoKnownAs", "services", "prev", "sig"),
    TOMBSTONE: ("type", "prev", "sig"),
    CREATE: ("type", "signingKey", "recoveryKey", "handle", "service", "prev", "sig"),
}


def _all_str(values: Any) -> bool:
    """Every item is a string (str.join checks the items' types in C)."""
    try:
        "".join(values)
    except TypeError:
        return False
    return True


def _str_list(v: Any) -> bool:
    return type(v) is list and _all_str(v)


def _str_map(v: Any) -> bool:
    return type(v) is dict and _all_str(v.values())


def _services(v: Any) -> bool:
    if type(v) is not dict:
        return False
    for s in v.values():
        if type(s) is not dict or s.keys() != _SERVICE_KEYS:
            return False
        if type(s["type"]) is not str or type(s["endpoint"]) is not str:
            return False
    return True


def op_type(op: Any) -> str | None:
    """The op's type if it has exactly the right shape, else None. `sig` is required."""
    if type(op) is not dict:
        return None
    t = op.get("type")
    keys = op.keys()
    if t == OPERATION:
        if keys != _OP_KEYS:
            return None
        prev = op["prev"]
        if (prev is not None and type(prev) is not str) or type(op["sig"]) is not str:
            return None
        if not (_str_list(op["rotationKeys"]) and _str_list(op["alsoKnownAs"])):
            return None
        if not (_str_map(op["verificationMethods"]) and _services(op["services"])):
            return None
        return OPERATION
    if t == TOMBSTONE:
        if keys != _TOMBSTONE_KEYS or type(op["prev"]) is not str or type(op["sig"]) is not str:
            return None
        return TOMBSTONE
    if t == CREATE:
        if keys != _CREATE_KEYS or op["prev"] is not None:
            return None
        for k in ("signingKey", "recoveryKey", "handle", "service", "sig"):
            if type(op[k]) is not str:
                return None
        return CREATE
    return None


def invalid_shape(body: Any) -> OpError:
    return OpError(Reason.INVALID_SHAPE, f"Not a valid operation: {js_stringify(body)}")


def require_shape(op: Any, *, allow_create: bool) -> str:
    """The op type, or OpError(invalid_shape) with the reference's message."""
    t = op_type(op)
    if t is None:
        raise invalid_shape(op)
    if t == CREATE and not allow_create:
        err = invalid_shape(op)
        err.reason = Reason.LEGACY_CREATE_SUBMITTED
        raise err
    return t


def schema_ordered(op: dict[str, Any]) -> dict[str, Any]:
    """The op with top-level keys in zod's parse-output order (as the reference echoes it)."""
    order = _SCHEMA_ORDER.get(op.get("type"))  # type: ignore[arg-type]
    if order is None:
        return op
    return {k: op[k] for k in order if k in op}


_SURROGATE = re.compile("[\ud800-\udfff]")
NUL = "nul"
SURROGATE = "surrogate"


def unstorable_text(value: Any) -> str | None:
    """`nul` if a string (key or value) holds U+0000, `surrogate` if one holds a lone surrogate,
    else None. Postgres jsonb refuses both; the reference answers 500. orjson never produces a
    lone surrogate, other JSON parsers may."""
    if type(value) is str:
        if _SURROGATE.search(value) is not None:
            return SURROGATE
        return NUL if "\x00" in value else None
    found = None
    if type(value) is dict:
        items: Any = (x for kv in value.items() for x in kv)
    elif type(value) is list:
        items = value
    else:
        return None
    for v in items:
        kind = unstorable_text(v)
        if kind == SURROGATE:
            return kind
        found = found or kind
    return found
