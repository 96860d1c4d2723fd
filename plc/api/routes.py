"""The route table and handlers of the read API (spec §1.2–§1.5, §2, §5).

Routing works on the raw request path like Express: static segments match case-insensitively,
one trailing slash is accepted, and the ``:did`` segment is percent-decoded by
``decodeURIComponent`` (a malformed escape → 400). Any single segment is a DID (no syntax
check), but only a well-formed did:plc ever reaches the database. Routes, in the reference's
precedence order:

    GET  /                     302 to https://web.plc.directory
    GET  /_health              {"version":…} or 503
    GET  /export               JSON lines, sequenced (after=<digits>) or legacy mode
    GET  /export/stream        426 without a websocket upgrade (the websocket: ``stream``)
    GET  /:did                 DID document (application/did+ld+json)
    GET  /:did/data            document data
    GET  /:did/log             non-nullified ops
    GET  /:did/log/audit       every op with its audit wrapper
    GET  /:did/log/last        latest non-nullified op
    POST /:did                 validated, then forwarded upstream (plc.api.forward); 501 if off
    anything else              Express's HTML 404 (``Cannot GET /a/b/c``)

HEAD is served by every GET route; OPTIONS and CORS are ``http.CorsMiddleware``'s job.
Handlers return an ``http.Reply``; ``PlcRoute.handle`` writes it (ETag, 304, HEAD) and turns
any unexpected exception into the reference's ``500 {"message":"Internal Server Error"}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from starlette.routing import BaseRoute, Match

from plc.core import render
from plc.store import oplog, pending

from .export import MAX_SEQ, legacy_rows
from .http import (
    JSON_TYPE,
    MAX_TARGET,
    TEXT_TYPE,
    HTML_TYPE,
    ParamDecodeError,
    Reply,
    decode_param,
    error_reply,
    js_parse_int,
    json_reply,
    not_found_html,
    path_segments,
    query_param,
    raw_target,
    send_reply,
    weak_etag,
)
from .jsdate import parse_js_date
from .stream import StreamRoute

log = logging.getLogger("plc.api")

# a lost or refused database connection: answered 503 (a deliberate deviation, docs/api.md)
DATABASE_UNAVAILABLE = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError, asyncpg.AdminShutdownError,
)

DID = None  # a shape element standing for the :did segment
Handler = Callable[[dict[str, Any], str | None], Awaitable[Reply]]

DEFAULT_COUNT = 1000
MAX_COUNT = 1000
DID_DOC_TYPE = "application/did+ld+json; charset=utf-8"
JSONLINES_TYPE = "application/jsonlines"
WEB_URL = "https://web.plc.directory"
NOT_FORWARDING = "Operation forwarding is not available on this mirror yet"
HEALTH_TIMEOUT = 5.0

_SEGMENTS_KEY = "plc.segments"
_DIGITS = re.compile(r"[0-9]+")


def _segments(scope: dict[str, Any]) -> list[str] | None:
    """The request's raw path segments (computed once per request)."""
    if _SEGMENTS_KEY not in scope:
        path, _ = raw_target(scope)
        scope[_SEGMENTS_KEY] = path_segments(path)
    return scope[_SEGMENTS_KEY]


def _shape_matches(shape: tuple[str | None, ...], segments: list[str] | None) -> bool:
    if segments is None or len(segments) != len(shape):
        return False
    for seg, want in zip(segments, shape):
        if want is DID:
            if seg == "":
                return False
        elif seg.lower() != want:
            return False
    return True


def _too_long(scope: dict[str, Any]) -> bool:
    path, query = raw_target(scope)
    return len(path) + len(query) > MAX_TARGET


class PlcRoute(BaseRoute):
    """One route: a path shape (static segments and ``DID``) and the methods it serves."""

    def __init__(self, shape: tuple[str | None, ...], methods: tuple[str, ...], handler: Handler, name: str):
        self.shape = shape
        self.methods = frozenset(methods) | ({"HEAD"} if "GET" in methods else set())
        self.handler = handler
        self.name = name

    def matches(self, scope: dict[str, Any]) -> tuple[Match, dict[str, Any]]:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            return Match.NONE, {}
        if not _shape_matches(self.shape, _segments(scope)):
            return Match.NONE, {}
        return Match.FULL, {}

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        segments = _segments(scope) or []
        raw_did = next((s for s, w in zip(segments, self.shape) if w is DID), None)
        try:
            if _too_long(scope):
                reply = error_reply(414, "URI Too Long")
            else:
                did = None if raw_did is None else decode_param(raw_did)
                reply = await self.handler(scope, did)
        except ParamDecodeError as exc:
            reply = error_reply(400, str(exc))
        except DATABASE_UNAVAILABLE as exc:  # not a bug here: the database is failing over or cut off
            log.warning("%s %s: database unavailable: %s: %s", scope.get("method"), self.name,
                        type(exc).__name__, exc)
            reply = error_reply(503, "Service Unavailable")
        except Exception:
            log.exception("%s %s failed", scope.get("method"), self.name)
            reply = error_reply(500, "Internal Server Error")
        await send_reply(scope, send, reply)

    def __repr__(self) -> str:
        return f"PlcRoute({self.name!r}, {sorted(self.methods)})"


class NotFoundRoute(BaseRoute):
    """Everything no other route took: Express's HTML 404 (or a JSON 400/414 first, see docs)."""

    def matches(self, scope: dict[str, Any]) -> tuple[Match, dict[str, Any]]:
        return (Match.FULL, {}) if scope["type"] == "http" else (Match.NONE, {})

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, _ = raw_target(scope)
        segments = _segments(scope)
        reply: Reply | None = None
        if _too_long(scope):
            reply = error_reply(414, "URI Too Long")
        elif any(_shape_matches(shape, segments) for shape in _DID_SHAPES) and segments:
            try:
                decode_param(segments[0])  # Express decodes :did before it finds no method
            except ParamDecodeError as exc:
                reply = error_reply(400, str(exc))
        if reply is None:
            reply = not_found_html(scope.get("method", "GET"), path)
        await send_reply(scope, send, reply)


# ----------------------------------------------------------------------------- state


def _pool(scope: dict[str, Any]) -> Any:
    return scope["app"].state.pool


def _read_pool(scope: dict[str, Any]) -> Any:
    """Where reads go: a replica when configured, with the primary as fallback (readpool)."""
    return scope["app"].state.read_pool


def _version(scope: dict[str, Any]) -> str:
    return scope["app"].state.version


# ----------------------------------------------------------------------------- / and /_health


def _accept_rank(accept: str | None, candidate: str, index: int) -> tuple[float, int, int, int] | None:
    """How well ``candidate`` (type/subtype) fits an Accept header, ``negotiator``-style."""
    if accept is None:
        return (1.0, 0, 0, -index)
    ctype, csub = candidate.split("/")
    best: tuple[float, int, int, int] | None = None
    for order, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if "/" not in media:
            continue
        mtype, msub = media.split("/", 1)
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        spec = 0
        if mtype == ctype:
            spec |= 4
        elif mtype != "*":
            continue
        if msub == csub:
            spec |= 2
        elif msub != "*":
            continue
        # the most specific entry wins; later entries win ties (negotiator's getMediaTypePriority)
        if best is None or (spec, q, order) >= (best[1], best[0], -best[2]):
            best = (q, spec, -order, -index)
    return best


async def root(scope: dict[str, Any], _did: str | None) -> Reply:
    """``res.redirect('https://web.plc.directory')``: a text or HTML body by the Accept header."""
    accept = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"accept"), None)
    text = _accept_rank(accept, "text/plain", 0)
    html = _accept_rank(accept, "text/html", 1)
    options = [(r, kind) for r, kind in ((text, "text"), (html, "html")) if r is not None and r[0] > 0]
    headers = [("location", WEB_URL), ("vary", "Accept")]
    if not options:
        return Reply(302, b"", None, headers, etag=False)
    kind = max(options)[1]
    if kind == "text":
        return Reply(302, f"Found. Redirecting to {WEB_URL}".encode(), TEXT_TYPE, headers, etag=False)
    body = f'<p>Found. Redirecting to <a href="{WEB_URL}">{WEB_URL}</a></p>'.encode()
    return Reply(302, body, HTML_TYPE, headers, etag=False)


async def health(scope: dict[str, Any], _did: str | None) -> Reply:
    """``{"version":…}`` after ``select 1`` succeeds; 503 with ``"error"`` when it does not."""
    version = _version(scope)
    try:
        async with _read_pool(scope).acquire(timeout=HEALTH_TIMEOUT) as conn:
            await conn.fetchval("select 1", timeout=HEALTH_TIMEOUT)
    except Exception:
        log.warning("health check failed", exc_info=True)
        return json_reply(503, {"version": version, "error": "Service Unavailable"})
    return json_reply(200, {"version": version})


# ----------------------------------------------------------------------------- /export


async def export(scope: dict[str, Any], _did: str | None) -> Reply:
    """``/export``: ``count`` (parseInt, default and cap 1000) and ``after`` (seq or date)."""
    _, query = raw_target(scope)
    count_text = query_param(query, "count")
    if count_text is None or count_text == "":
        count = DEFAULT_COUNT
    else:
        n = js_parse_int(count_text)
        if n is None or n < 1:
            return error_reply(400, "Invalid count parameter")
        count = min(n, MAX_COUNT)
    after_text = query_param(query, "after")
    sequenced = False
    after: int | None = None
    if after_text is None or after_text == "":
        pass  # legacy mode from the beginning of time
    elif _DIGITS.fullmatch(after_text):
        sequenced = True
        digits = after_text.lstrip("0") or "0"
        after = MAX_SEQ if len(digits) > 19 else min(int(digits), MAX_SEQ)
    else:
        after = parse_js_date(after_text)
        if after is None:
            return error_reply(400, "Invalid after parameter")
    async with _read_pool(scope).acquire() as conn:
        if sequenced:
            rows = await oplog.export_rows(conn, after, count)
        else:
            rows = await legacy_rows(conn, after, count)
    body = render.export_body(render.export_lines(rows, sequenced=sequenced))
    return Reply(200, body, JSONLINES_TYPE, etag=False)


async def export_stream(scope: dict[str, Any], _did: str | None) -> Reply:
    """``/export/stream`` over plain HTTP: the websocket needs an upgrade."""
    return error_reply(426, "upgrade required")


# ----------------------------------------------------------------------------- /:did…


async def _load_rows(scope: dict[str, Any], did: str) -> list[render.OpRow]:
    """The DID's stored ops in audit order, with the ops accepted upstream through this mirror
    and not ingested yet merged in (plc.store.pending)."""
    async with _read_pool(scope).for_did(did).acquire() as conn:
        return pending.merge(await oplog.did_rows(conn, did), await pending.load(conn, did))


async def _cached(scope: dict[str, Any], did: str, route: str, build: Callable[[list[render.OpRow]], Reply]) -> Reply:
    """``build(rows)`` for the DID's rows, from the document cache when it holds the DID (the
    reply itself too, once built for this route); [] rows without a query for anything not a
    did:plc."""
    if not oplog.is_plc_did(did):
        return build([])
    cache = scope["app"].state.doc_cache
    entry = cache.get(did)
    if entry is None:
        token = cache.token()
        entry = cache.put(did, token, await _load_rows(scope, did))
    reply = entry.replies.get(route)
    if reply is None:
        reply = build(entry.rows)
        if reply.etag and reply.etag_value is None:
            reply.etag_value = weak_etag(reply.body)
        entry.replies[route] = reply
    return reply


def _latest(rows: list[render.OpRow]) -> render.OpRow | None:
    for r in reversed(rows):
        if not r.nullified:
            return r
    return None


def _latest_rendered(
    did: str, render_fn: Callable[[str, Any], bytes | None], content_type: str
) -> Callable[[list[render.OpRow]], Reply]:
    """Render the latest non-nullified op with ``render_fn``; 404 if the DID is unknown, or
    if ``render_fn`` gives nothing (a tombstone: `DID not available`)."""

    def build(rows: list[render.OpRow]) -> Reply:
        latest = _latest(rows)
        if latest is None:
            return error_reply(404, render.not_registered(did))
        body = render_fn(did, latest.op)
        if body is None:
            return error_reply(404, render.not_available(did))
        return Reply(200, body, content_type)

    return build


async def did_document(scope: dict[str, Any], did: str | None) -> Reply:
    """``/:did``: the DID document of the latest non-nullified op."""
    assert did is not None
    return await _cached(scope, did, "doc", _latest_rendered(did, render.did_document_json, DID_DOC_TYPE))


async def did_data(scope: dict[str, Any], did: str | None) -> Reply:
    """``/:did/data``."""
    assert did is not None
    return await _cached(scope, did, "data", _latest_rendered(did, render.data_json, JSON_TYPE))


async def did_log(scope: dict[str, Any], did: str | None) -> Reply:
    """``/:did/log``: the non-nullified ops, oldest first (a tombstone included)."""
    assert did is not None

    def build(rows: list[render.OpRow]) -> Reply:
        if not rows:
            return error_reply(404, render.not_registered(did))
        return Reply(200, render.log_json(r.op for r in rows if not r.nullified), JSON_TYPE)

    return await _cached(scope, did, "log", build)


async def did_audit(scope: dict[str, Any], did: str | None) -> Reply:
    """``/:did/log/audit``: every op, nullified ones included."""
    assert did is not None

    def build(rows: list[render.OpRow]) -> Reply:
        if not rows:
            return error_reply(404, render.not_registered(did))
        return Reply(200, render.audit_json(rows), JSON_TYPE)

    return await _cached(scope, did, "audit", build)


async def did_last(scope: dict[str, Any], did: str | None) -> Reply:
    """``/:did/log/last``: the latest non-nullified op."""
    assert did is not None

    def build(rows: list[render.OpRow]) -> Reply:
        latest = _latest(rows)
        if latest is None:
            return error_reply(404, render.not_registered(did))
        return Reply(200, render.log_last_json(latest.op), JSON_TYPE)

    return await _cached(scope, did, "last", build)


async def submit(scope: dict[str, Any], did: str | None) -> Reply:
    """``POST /:did``: validated here, then forwarded upstream (plc.api.forward); 501 when the
    app has no forwarding configured (docs/api.md)."""
    forwarder = scope["app"].state.forward
    if forwarder is None or did is None:
        return error_reply(501, NOT_FORWARDING)
    return await forwarder.handle(scope, did)


_DID_SHAPES: tuple[tuple[str | None, ...], ...] = (
    (DID,),
    (DID, "data"),
    (DID, "log"),
    (DID, "log", "audit"),
    (DID, "log", "last"),
)


def build_routes() -> list[BaseRoute]:
    """The route list, in the reference's precedence order, ending with the HTML 404."""
    return [
        PlcRoute((), ("GET",), root, "root"),
        PlcRoute(("_health",), ("GET",), health, "health"),
        PlcRoute(("export",), ("GET",), export, "export"),
        StreamRoute(),  # websocket upgrades only
        PlcRoute(("export", "stream"), ("GET",), export_stream, "export_stream"),
        PlcRoute((DID,), ("GET",), did_document, "did_document"),
        PlcRoute((DID, "data"), ("GET",), did_data, "did_data"),
        PlcRoute((DID, "log"), ("GET",), did_log, "did_log"),
        PlcRoute((DID, "log", "audit"), ("GET",), did_audit, "did_audit"),
        PlcRoute((DID, "log", "last"), ("GET",), did_last, "did_last"),
        PlcRoute((DID,), ("POST",), submit, "submit"),
        NotFoundRoute(),
    ]
