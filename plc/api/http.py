"""Express-compatible HTTP plumbing for the API (spec §1.1): what the reference server's stack
(Express 4.18 + cors 2.8 + qs) does around every route, reimplemented for ASGI.

- ``Reply``: what a handler answers (status, body, content type, extra headers, ETag or not).
- ``send_reply``: writes a ``Reply`` like Express's ``res.send``: ``Content-Length``, weak ETag
  ``W/"<len hex>-<27 chars of base64(sha1)>"``, ``304`` when ``If-None-Match`` matches (the
  ``fresh`` module's rules), and no body for ``HEAD``.
- ``CorsMiddleware``: pure ASGI; ``Access-Control-Allow-Origin: *`` on every response and the
  ``cors()`` preflight answer (204) for every ``OPTIONS`` request.
- ``path_segments`` / ``decode_param``: routing on the raw (still percent-encoded) path like
  Express: one optional trailing slash, then ``decodeURIComponent`` of the ``:did`` segment.
- ``js_parse_int``: JavaScript ``parseInt(text, 10)``.
- ``query_param``: a query parameter as Express (qs) gives it: a string only when it occurs
  exactly once (repeated or bracketed forms become arrays/objects, which the routes ignore).
- ``not_found_html``: Express's default 404 page (``Cannot GET /a/b/c``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import orjson

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"

# ----------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """One response: ``etag`` is True for bodies Express sends with ``res.send``/``res.json``."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    etag: bool = True
    etag_value: str | None = None  # the ETag of ``body`` when already computed (cached replies)


def json_reply(status: int, value: Any) -> Reply:
    """A ``res.status(status).json(value)`` reply."""
    return Reply(status, orjson.dumps(value))


def error_reply(status: int, message: str) -> Reply:
    """The reference's error shape: ``{"message":"…"}`` as JSON."""
    return json_reply(status, {"message": message})


def weak_etag(body: bytes) -> str:
    """Express's default (weak) ETag of a body."""
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'


_NO_CACHE = re.compile(r"(?:^|,)\s*?no-cache\s*?(?:,|$)")


def is_fresh(headers: dict[str, str], etag: str) -> bool:
    """The ``fresh`` module (0.5.2): may the client's cached copy be used (answer 304)?"""
    none_match = headers.get("if-none-match")
    modified_since = headers.get("if-modified-since")
    if not none_match and not modified_since:
        return False
    cache_control = headers.get("cache-control")
    if cache_control and _NO_CACHE.search(cache_control):
        return False
    if none_match and none_match != "*":
        tokens = [t.strip(" ") for t in none_match.split(",")]
        if not any(t == etag or t == "W/" + etag or "W/" + t == etag for t in tokens):
            return False
    if modified_since:
        return False  # no Last-Modified is ever sent, so the copy counts as stale
    return True


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers, lower-case names; a repeated header keeps its last value."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def send_reply(scope: dict[str, Any], send: Any, reply: Reply) -> None:
    """Write ``reply`` like Express: length, ETag, 304 on a fresh GET/HEAD, no body for HEAD."""
    status = reply.status
    body = reply.body
    headers: list[tuple[str, str]] = list(reply.headers)
    content_type = reply.content_type
    method = scope.get("method", "GET")
    if reply.etag:
        etag = reply.etag_value or weak_etag(body)
        headers.append(("etag", etag))
        if method in ("GET", "HEAD") and 200 <= status < 300 and is_fresh(request_headers(scope), etag):
            status = 304
    if status in (204, 304):
        content_type = None
        body = b""
    else:
        headers.append(("content-length", str(len(body))))
    if content_type is not None:
        headers.append(("content-type", content_type))
    if method == "HEAD":
        body = b""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- CORS

_ALLOW_ORIGIN = (b"access-control-allow-origin", b"*")
_ALLOW_METHODS = (b"access-control-allow-methods", b"GET,HEAD,PUT,PATCH,POST,DELETE")


class CorsMiddleware:
    """``cors()`` with its defaults, as pure ASGI middleware (no response buffering)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS":
            headers = [_ALLOW_ORIGIN, _ALLOW_METHODS, (b"vary", b"Access-Control-Request-Headers")]
            wanted = request_headers(scope).get("access-control-request-headers")
            if wanted:
                headers.append((b"access-control-allow-headers", wanted.encode("latin-1")))
            headers.append((b"content-length", b"0"))
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_with_origin(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[_ALLOW_ORIGIN, *message.get("headers", [])])
            await send(message)

        await self.app(scope, receive, send_with_origin)


# ----------------------------------------------------------------------------- paths

MAX_TARGET = 8192  # longest request target (path + query) served; longer → 414


def raw_target(scope: dict[str, Any]) -> tuple[str, str]:
    """(raw path, raw query) of the request, still percent-encoded (latin-1 text, like Node)."""
    raw = scope.get("raw_path")
    if raw is None:
        path = quote(scope.get("path", "/"), safe="/%:@!$&'()*+,;=-._~")
    else:
        path = raw.decode("latin-1")
    path = path.split("?", 1)[0]  # some servers put the query into raw_path
    query = scope.get("query_string", b"").decode("latin-1")
    return path, query


def path_segments(path: str) -> list[str] | None:
    """The raw segments after the leading ``/`` with one trailing slash dropped (Express's
    non-strict matching); ``[]`` for ``/``; None for a path not starting with ``/``."""
    if not path.startswith("/"):
        return None
    rest = path[1:]
    if rest.endswith("/"):
        rest = rest[:-1]
    return [] if rest == "" else rest.split("/")


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ParamDecodeError(ValueError):
    """``decodeURIComponent`` failed: Express answers 400 ``Failed to decode param '<raw>'``."""

    def __init__(self, raw: str) -> None:
        super().__init__(f"Failed to decode param '{raw}'")


def decode_param(raw: str) -> str:
    """``decodeURIComponent(raw)``: strict %XX escapes that must form valid UTF-8."""
    if "%" not in raw:
        return raw
    if _BAD_ESCAPE.search(raw):
        raise ParamDecodeError(raw)
    try:
        return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise ParamDecodeError(raw) from None


# ----------------------------------------------------------------------------- query values

_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_JS_INT = re.compile(r"([+-]?)([0-9]+)")


def js_parse_int(text: str) -> int | None:
    """JavaScript ``parseInt(text, 10)``; None where JS gives NaN."""
    m = _JS_INT.match(text.lstrip(_JS_SPACE))
    if m is None:
        return None
    digits = m.group(2).lstrip("0") or "0"
    value = int(digits) if len(digits) <= 400 else 10**400  # JS: Infinity; only its sign matters here
    return -value if m.group(1) == "-" else value


def query_param(query: str, name: str) -> str | None:
    """The value of ``name`` when it is given exactly once as a plain ``name=value`` (qs turns a
    repeated or bracketed parameter into an array/object, which the reference ignores)."""
    values = []
    other_form = False
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            values.append(value)
        elif key.startswith(name + "["):
            other_form = True
    if other_form or len(values) != 1:
        return None
    return values[0]


# ----------------------------------------------------------------------------- Express's 404 page

_URL_SAFE = "!#$&'()*+,-./:;=?@_~"
_ENCODE_RUNS = re.compile(
    r"(?:[^\x21\x25\x26-\x3B\x3D\x3F-\x5B\x5D\x5F\x61-\x7A\x7E]|%(?:[^0-9A-Fa-f]|[0-9A-Fa-f][^0-9A-Fa-f]|$))+"
)
_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})


def encode_url(url: str) -> str:
    """The ``encodeurl`` module: percent-encode what may not appear in a URL, keep valid escapes."""
    return _ENCODE_RUNS.sub(lambda m: quote(m.group(0), safe=_URL_SAFE), url)


def not_found_html(method: str, raw_path: str) -> Reply:
    """Express's default 404 (finalhandler): an HTML page ``Cannot <METHOD> <path>``."""
    message = f"Cannot {method} {encode_url(raw_path)}".translate(_HTML_ESCAPES)
    body = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        "<head>\n"
        '<meta charset="utf-8">\n'
        "<title>Error</title>\n"
        "</head>\n"
        "<body>\n"
        f"<pre>{message}</pre>\n"
        "</body>\n"
        "</html>\n"
    ).encode()
    return Reply(
        404,
        body,
        HTML_TYPE,
        headers=[("content-security-policy", "default-src 'none'"), ("x-content-type-options", "nosniff")],
        etag=False,
    )
