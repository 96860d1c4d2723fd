"""JSON exactly as the reference server writes it (spec §1.1, §1.9) and ms timestamps.

- Ops are stored by the reference as Postgres jsonb (object keys sorted by UTF-8 byte length,
  then bytewise; last duplicate wins) and read back through V8 (integer-like keys move to the
  front, ascending). `op_order` applies that to every object inside an op, recursively.
- V8's JSON.stringify output equals orjson's for every string that can be stored: compact,
  raw UTF-8 (U+2028/9 and DEL raw), short escapes for \\b\\f\\n\\r\\t, `\\u00xx` for other C0
  controls. Lone surrogates cannot reach us (orjson refuses them; jsonb refuses them too).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson

_MAX_INDEX = 4294967294


def is_array_index(key: str) -> bool:
    """V8's 'integer-like' property name: a canonical array index 0..2^32-2."""
    if not key or not key.isascii() or not key.isdigit():
        return False
    if len(key) > 1 and key[0] == "0":
        return False
    return int(key) <= _MAX_INDEX


def _jsonb_key(key: str) -> tuple[int, int, bytes]:
    if is_array_index(key):
        return (0, int(key), b"")
    b = key.encode()
    return (1, len(b), b)


# key tuple (in the dict's own order) -> the §1.9 order, or None if already in that order
_ORDER_CACHE: dict[tuple[str, ...], tuple[str, ...] | None] = {}
_ORDER_CACHE_MAX = 4096


def _key_order(keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """The §1.9 order of these keys (None when they already are in it); cached per key tuple."""
    try:
        return _ORDER_CACHE[keys]
    except KeyError:
        pass
    order: tuple[str, ...] | None = tuple(sorted(keys, key=_jsonb_key))
    if order == keys:
        order = None
    if len(_ORDER_CACHE) >= _ORDER_CACHE_MAX:
        _ORDER_CACHE.clear()
    _ORDER_CACHE[keys] = order
    return order


def op_order(value: Any) -> Any:
    """Reorder every object inside a stored op the way jsonb + V8 would (spec §1.9); the sort
    is cached per key tuple (ops repeat a handful of key sets).

    Objects and arrays that already are in order (and hold nothing to reorder) are returned
    as they are, not copied.
    """
    t = type(value)
    if t is dict:
        keys = tuple(value)
        order = _key_order(keys)
        if order is None:
            out = None
            for k, v in value.items():
                tv = type(v)
                if tv is dict or tv is list:
                    nv = op_order(v)
                    if nv is not v:
                        if out is None:
                            out = dict(value)
                        out[k] = nv
            return value if out is None else out
        return {k: _ordered_child(value[k]) for k in order}
    if t is list:
        out_list = None
        for i, v in enumerate(value):
            tv = type(v)
            if tv is dict or tv is list:
                nv = op_order(v)
                if nv is not v:
                    if out_list is None:
                        out_list = list(value)
                    out_list[i] = nv
        return value if out_list is None else out_list
    return value


def _ordered_child(v: Any) -> Any:
    t = type(v)
    if t is dict or t is list:
        return op_order(v)
    return v


def v8_order(value: Any) -> Any:
    """What JSON.parse → JSON.stringify does to key order: integer-like keys first
    (ascending), the rest in their original order. Used where the reference echoes a body."""
    if isinstance(value, dict):
        ints = sorted((k for k in value if is_array_index(k)), key=int)
        if ints:
            keys = ints + [k for k in value if not is_array_index(k)]
        else:
            keys = list(value)
        return {k: v8_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [v8_order(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """Compact V8-compatible JSON bytes (keys in the dict's own order)."""
    return orjson.dumps(value)


def dumps_str(value: Any) -> str:
    return orjson.dumps(value).decode()


def js_stringify(value: Any) -> str:
    """JSON.stringify of a parsed JSON body, key order and number text as V8 would give them."""
    return orjson.dumps(_js_numbers(v8_order(value))).decode()


def js_number(value: int | float) -> str:
    """How V8 prints a JSON number after JSON.parse: the value as a double, shortest round-trip
    digits, plain notation from 1e-6 up to (not incl.) 1e21, exponent form outside (ECMA-262
    Number::toString); -0 prints as 0, non-finite values as null."""
    try:
        x = float(value)
    except OverflowError:
        return "null"
    if x != x or x in (math.inf, -math.inf):
        return "null"
    if x == 0:
        return "0"
    if x < 0:
        return "-" + js_number(-x)
    _, digit_tuple, exp = Decimal(repr(x)).normalize().as_tuple()
    s = "".join(map(str, digit_tuple))
    k = len(s)
    n = int(exp) + k  # the decimal point sits after n digits of s
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + s
    e = n - 1
    mantissa = s if k == 1 else s[0] + "." + s[1:]
    return f"{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


def _js_numbers(value: Any) -> Any:
    """Numbers replaced by raw JSON fragments holding V8's text for them (bools untouched)."""
    t = type(value)
    if t is int or t is float:
        return orjson.Fragment(js_number(value))
    if t is dict:
        return {k: _js_numbers(v) for k, v in value.items()}
    if t is list:
        return [_js_numbers(v) for v in value]
    return value


# ----------------------------------------------------------------------------- timestamps
def format_ms(ms: int) -> str:
    """JS toISOString(): `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    secs, milli = divmod(ms, 1000)
    dt = datetime.fromtimestamp(secs, tz=timezone.utc)
    return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}.{milli:03d}Z"


def parse_ms(text: str) -> int:
    """Parse an RFC 3339 / ISO 8601 UTC timestamp to integer ms (sub-ms digits truncated).

    Raises ValueError for anything that is not a full date-time with an explicit offset.
    """
    if not isinstance(text, str) or len(text) < 20 or text[10] not in "Tt":
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    dt = datetime.fromisoformat(text.replace("z", "Z"))
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without offset: {text!r}")
    return (dt - _EPOCH) // _MS


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
