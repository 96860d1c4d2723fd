"""``/export/stream`` over WebSocket (spec §1.6): backfill from a ``cursor``, then live events.

- ``StreamRoute``: matches websocket scopes on ``/export/stream`` (static segments
  case-insensitive, one trailing slash, like the other routes). A plain GET on that path is
  still ``routes.export_stream`` (426).
- ``StreamHub``: one per app (``app.state.stream_hub``). A single shared poller reads
  ``seq > position`` from the database every ``poll_interval`` seconds (at most
  ``buffer_size`` rows a round), renders each event once and fans it out to every live
  connection. The poller only runs while some connection is live.
- ``Subscriber``: one connection's buffer of rendered events not yet sent. More than
  ``buffer_size`` of them → the connection is closed 1000 ``ConsumerTooSlow``.

A connection, in order:

1. ``cursor`` is read like JS ``parseInt``; NaN or negative → a plain HTTP 400
   ``{"message":"Invalid cursor parameter"}`` before the handshake (the reference hangs).
2. No cursor: live only, from the latest seq stored when the connection opened.
3. ``cursor`` > latest stored seq (0 if none) → close 1000 ``FutureCursor``. The first event
   with seq > cursor older than ``backfill_window_ms`` → close 1000 ``OutdatedCursor``.
   Otherwise backfill in pages of ``PAGE`` (``oplog.export_rows``) until a short page.
4. Cutover: the connection subscribes to the hub, which tells it how far the poller has
   read; the connection reads the rest of that range from the database itself, then sends
   the buffered live events, skipping any seq it already sent.

Each event is one text frame, ``render.stream_message`` (``{seq,type,did,operation,cid,
createdAt}``). The server sends no close of its own on a healthy stream; when the hub closes
(app shutdown) every connection gets close 1001.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from starlette.routing import BaseRoute, Match

from plc.core import render
from plc.store import oplog

from .http import js_parse_int, path_segments, query_param, raw_target

log = logging.getLogger("plc.api.stream")

PAGE = 500
MAX_POLL_ROWS = 1000
DEFAULT_BUFFER = 500
DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_BACKFILL_WINDOW_MS = 7 * 24 * 3600 * 1000
POLL_ERROR_BACKOFF = 1.0
CLOSE_TIMEOUT = 10.0

FUTURE_CURSOR = "FutureCursor"
OUTDATED_CURSOR = "OutdatedCursor"
CONSUMER_TOO_SLOW = "ConsumerTooSlow"
NORMAL = 1000
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
INVALID_CURSOR = "Invalid cursor parameter"

_SHAPE = ("export", "stream")
_LATEST_SQL = "SELECT COALESCE(max(seq), 0) FROM plc_op"

Event = tuple[int, str]  # (seq, rendered text frame)


def _event(row: render.OpRow) -> Event:
    assert row.seq is not None
    text = render.stream_message(row.did, row.op, row.cid, row.created_at, row.seq).decode("utf-8")
    return row.seq, text


async def latest_seq(conn: Any) -> int:
    """The greatest stored seq, 0 when there is none."""
    return int(await conn.fetchval(_LATEST_SQL))


class Subscriber:
    """One live connection's pending events, and why it must end (if it must)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pending: collections.deque[Event] = collections.deque()
        self.wake = asyncio.Event()
        self.ended = asyncio.Event()
        self.end: tuple[int, str] | None = None

    def push(self, events: list[Event]) -> None:
        """Queue ``events``; past the limit the connection ends with ``ConsumerTooSlow``."""
        if self.end is not None:
            return
        self.pending.extend(events)
        if len(self.pending) > self.limit:
            self.pending.clear()
            self.finish(NORMAL, CONSUMER_TOO_SLOW)
        else:
            self.wake.set()

    def finish(self, code: int, reason: str) -> None:
        if self.end is None:
            self.end = (code, reason)
            self.ended.set()


class StreamHub:
    """The shared live feed: one poller reading ``seq > position``, fanned out to subscribers."""

    def __init__(
        self,
        pool: Any,
        *,
        buffer_size: int = DEFAULT_BUFFER,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        backfill_window_ms: int = DEFAULT_BACKFILL_WINDOW_MS,
        clock_ms: Any = None,
    ):
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.pool = pool
        self.buffer_size = buffer_size
        self.poll_interval = poll_interval
        self.backfill_window_ms = backfill_window_ms
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.subscribers: set[Subscriber] = set()
        self.position = 0
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, sub: Subscriber, floor: int) -> int:
        """Register ``sub``, which has sent everything up to seq ``floor``. Returns the seq up
        to which the poller has already read: the caller reads ``(floor, that]`` itself."""
        if self.closed:
            sub.finish(GOING_AWAY, "")
            return floor
        self.subscribers.add(sub)
        if self._task is None:
            self.position = floor
            self._task = asyncio.create_task(self._poll())
        return self.position

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def _poll(self) -> None:
        limit = min(MAX_POLL_ROWS, self.buffer_size)
        try:
            while self.subscribers:
                try:
                    async with self.pool.acquire() as conn:
                        rows = await oplog.export_rows(conn, self.position, limit)
                except Exception:
                    log.warning("stream poll failed", exc_info=True)
                    await asyncio.sleep(POLL_ERROR_BACKOFF)
                    continue
                if rows:
                    events = [_event(r) for r in rows]
                    self.position = events[-1][0]
                    for sub in list(self.subscribers):
                        sub.push(events)
                await asyncio.sleep(self.poll_interval)
        finally:
            self._task = None

    async def close(self) -> None:
        """Stop the poller and end every connection (close 1001)."""
        self.closed = True
        for sub in list(self.subscribers):
            sub.finish(GOING_AWAY, "")
        self.subscribers.clear()
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


def parse_cursor(query: str) -> tuple[bool, int | None]:
    """(valid, cursor): cursor None = live only."""
    text = query_param(query, "cursor")
    if text is None:
        return True, None
    value = js_parse_int(text)
    if value is None or value < 0:
        return False, None
    return True, min(value, 2**63 - 1)


async def _send_text(send: Any, text: str) -> None:
    await send({"type": "websocket.send", "text": text})


async def _deny(scope: dict[str, Any], send: Any, status: int, message: str) -> None:
    """A plain HTTP answer instead of the handshake (ASGI websocket denial response)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = render.error_body(message)
    headers = [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"access-control-allow-origin", b"*"),
    ]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def _until_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return


class _Session:
    """One accepted connection: backfill, cutover, live."""

    def __init__(self, hub: StreamHub, send: Any, sub: Subscriber):
        self.hub = hub
        self.send = send
        self.sub = sub
        self.last = 0

    async def _send_rows(self, rows: list[render.OpRow]) -> None:
        for row in rows:
            seq, text = _event(row)
            if seq > self.last:
                await _send_text(self.send, text)
                self.last = seq

    async def _read(self, after: int) -> list[render.OpRow]:
        async with self.hub.pool.acquire() as conn:
            return await oplog.export_rows(conn, after, PAGE)

    async def run(self, cursor: int | None) -> tuple[int, str]:
        hub = self.hub
        if cursor is None:
            async with hub.pool.acquire() as conn:
                self.last = await latest_seq(conn)
        else:
            async with hub.pool.acquire() as conn:
                if cursor > await latest_seq(conn):
                    return NORMAL, FUTURE_CURSOR
                rows = await oplog.export_rows(conn, cursor, PAGE)
            if rows and rows[0].created_at < hub.clock_ms() - hub.backfill_window_ms:
                return NORMAL, OUTDATED_CURSOR
            self.last = cursor
            while True:  # backfill
                await self._send_rows(rows)
                if len(rows) < PAGE:
                    break
                rows = await self._read(self.last)
        upto = hub.subscribe(self.sub, self.last)
        while self.last < upto:  # cutover: what the poller read before we subscribed
            rows = await self._read(self.last)
            await self._send_rows(rows)
            if len(rows) < PAGE:
                break
        sub = self.sub
        while True:  # live
            sub.wake.clear()
            while sub.pending:
                seq, text = sub.pending.popleft()
                if seq > self.last:
                    await _send_text(self.send, text)
                    self.last = seq
            await sub.wake.wait()


async def serve_stream(hub: StreamHub, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The whole life of one ``/export/stream`` websocket."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    _, query = raw_target(scope)
    valid, cursor = parse_cursor(query)
    if not valid:
        await _deny(scope, send, 400, INVALID_CURSOR)
        return
    if hub.closed:
        await _deny(scope, send, 503, "Service Unavailable")
        return
    await send({"type": "websocket.accept"})
    sub = Subscriber(hub.buffer_size)
    session = asyncio.create_task(_Session(hub, send, sub).run(cursor))
    gone = asyncio.create_task(_until_disconnect(receive))
    ended = asyncio.create_task(sub.ended.wait())
    end: tuple[int, str] | None = None
    try:
        done, _ = await asyncio.wait({session, gone, ended}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            return
        if session in done:
            exc = session.exception()
            if exc is None:
                end = session.result()
            elif isinstance(exc, OSError):  # the client went away mid-send
                return
            else:
                log.error("export stream failed", exc_info=exc)
                end = (INTERNAL_ERROR, "")
        else:
            end = sub.end
    finally:
        hub.unsubscribe(sub)
        for task in (session, gone, ended):
            task.cancel()
        await asyncio.gather(session, gone, ended, return_exceptions=True)
    if end is not None:
        try:  # a client that stopped reading may never take the close frame: give up after a while
            await asyncio.wait_for(send({"type": "websocket.close", "code": end[0], "reason": end[1]}), CLOSE_TIMEOUT)
        except Exception:  # already gone, or stuck
            pass


class StreamRoute(BaseRoute):
    """Websocket upgrades on ``/export/stream`` (any case, one trailing slash)."""

    name = "export_stream_ws"

    def matches(self, scope: dict[str, Any]) -> tuple[Match, dict[str, Any]]:
        if scope["type"] != "websocket":
            return Match.NONE, {}
        path, _ = raw_target(scope)
        segments = path_segments(path)
        if segments is None or [s.lower() for s in segments] != list(_SHAPE):
            return Match.NONE, {}
        return Match.FULL, {}

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await serve_stream(scope["app"].state.stream_hub, scope, receive, send)

    def __repr__(self) -> str:
        return "StreamRoute('/export/stream')"
