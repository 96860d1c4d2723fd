"""Limits on newly submitted ops (spec §1.7 step 2 and 4, §4.6, §4.7).

These apply only in submit mode: history replayed from upstream predates them. Lengths are
JavaScript string lengths (UTF-16 code units). Messages are the reference's, typos included.
"""

from __future__ import annotations

from typing import Any

from .didkey import decode_did_key, is_wellformed_did_key, KeyError_
from .encoding import dag_cbor
from .errors import OpError, Reason
from .jsonfmt import v8_order

MAX_OP_BYTES = 4000
MAX_AKA_ENTRIES = 10
MAX_AKA_LENGTH = 258
MAX_ROTATION_ENTRIES = 10
MAX_SERVICE_ENTRIES = 10
MAX_VM_ENTRIES = 10
MAX_ID_LENGTH = 32
MAX_SERVICE_TYPE_LENGTH = 256
MAX_SERVICE_ENDPOINT_LENGTH = 512
MAX_VM_KEY_LENGTH = 256

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
HOUR_LIMIT = 10
DAY_LIMIT = 30
WEEK_LIMIT = 100


def js_len(s: str) -> int:
    """String length in UTF-16 code units, as JavaScript counts it."""
    if s.isascii():
        return len(s)
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def _limit(message: str) -> OpError:
    return OpError(Reason.CONSTRAINT, message)


_SAFE_INTEGER = 2**53 - 1


def _as_js_numbers(value: Any) -> Any:
    """JSON numbers as the reference's encoder sees them: JavaScript has one number type, and
    @ipld/dag-cbor writes an integral number (1.0, -0.0, 1e20) as a CBOR integer; orjson gives
    such values as floats. Only the encoded size depends on this."""
    t = type(value)
    if t is float:
        return int(value) if value.is_integer() and abs(value) <= _SAFE_INTEGER else value
    if t is dict:
        return {k: _as_js_numbers(v) for k, v in value.items()}
    if t is list:
        return [_as_js_numbers(v) for v in value]
    return value


def check_size(body: Any) -> None:
    """Step 2: the DAG-CBOR of the whole received body (any fields) must fit in 4000 bytes."""
    try:
        size = len(dag_cbor(_as_js_numbers(body)))
    except (ValueError, TypeError, OverflowError):
        # not representable in DAG-CBOR (e.g. a non-finite float): the shape check refuses it
        return
    if size > MAX_OP_BYTES:
        raise OpError(Reason.TOO_LARGE, f"Operation too large ({MAX_OP_BYTES} bytes maximum in cbor encoding)")


def check_fields(op: dict[str, Any]) -> None:
    """Step 4: counts, lengths and key formats of a `plc_operation` (tombstones skip this)."""
    aka = op["alsoKnownAs"]
    if len(aka) > MAX_AKA_ENTRIES:
        raise _limit(f"To many alsoKnownAs entries (max {MAX_AKA_ENTRIES})")
    seen: set[str] = set()
    for a in aka:
        if js_len(a) > MAX_AKA_LENGTH:
            raise _limit(f"alsoKnownAs entry too long (max {MAX_AKA_LENGTH}): {a}")
        if a in seen:
            raise _limit(f"duplicate alsoKnownAs entry: {a}")
        seen.add(a)
    keys = op["rotationKeys"]
    if len(keys) > MAX_ROTATION_ENTRIES:
        raise _limit(f"Too many rotationKey entries (max {MAX_ROTATION_ENTRIES})")
    for k in keys:
        try:
            decode_did_key(k)
        except KeyError_:
            raise _limit(f"Invalid rotationKey: {k}") from None
    services = v8_order(op["services"])
    if len(services) > MAX_SERVICE_ENTRIES:
        raise _limit(f"To many service entries (max {MAX_SERVICE_ENTRIES})")
    for sid, svc in services.items():
        if js_len(sid) > MAX_ID_LENGTH:
            raise _limit(f"Service id too long (max {MAX_ID_LENGTH}): {sid}")
        if js_len(svc["type"]) > MAX_SERVICE_TYPE_LENGTH:
            raise _limit(f"Service type too long (max {MAX_SERVICE_TYPE_LENGTH})")
        if js_len(svc["endpoint"]) > MAX_SERVICE_ENDPOINT_LENGTH:
            raise _limit(f"Service endpoint too long (max {MAX_SERVICE_ENDPOINT_LENGTH})")
    vms = v8_order(op["verificationMethods"])
    if len(vms) > MAX_VM_ENTRIES:
        raise _limit(f"Too many Verification Method entries (max {MAX_VM_ENTRIES})")
    for vid, key in vms.items():
        if js_len(vid) > MAX_ID_LENGTH:
            raise _limit(f"Verification Method id too long (max {MAX_ID_LENGTH}): {vid}")
        if js_len(key) > MAX_VM_KEY_LENGTH:
            raise _limit(f"Verification Method key too long (max {MAX_VM_KEY_LENGTH}): {key}")
        if not is_wellformed_did_key(key):
            raise _limit(f"Invalid verificationMethod key: {key}")


def check_rate(live_created_at: list[int], now_ms: int) -> None:
    """Per-DID rate limit over the DID's non-nullified ops (oldest first), as the reference
    walks them: week, day and hour counters, each checked as soon as it is incremented."""
    week_ago, day_ago, hour_ago = now_ms - WEEK_MS, now_ms - DAY_MS, now_ms - HOUR_MS
    week = day = hour = 0
    for t in live_created_at:
        if t > week_ago:
            week += 1
            if week >= WEEK_LIMIT:
                raise OpError(Reason.RATE_LIMIT, f"To many operations within last week (max {WEEK_LIMIT})")
        if t > day_ago:
            day += 1
            if day >= DAY_LIMIT:
                raise OpError(Reason.RATE_LIMIT, f"To many operations within last day (max {DAY_LIMIT})")
        if t > hour_ago:
            hour += 1
            if hour >= HOUR_LIMIT:
                raise OpError(Reason.RATE_LIMIT, f"To many operations within last hour (max {HOUR_LIMIT})")
