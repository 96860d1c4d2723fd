"""Async reader of an upstream PLC directory: `/export` pages and the `/export/stream` websocket.

No database and no validation: every line or message becomes an `UpstreamRecord` (or a
`MalformedLine` saying why it could not be read) and the caller validates and stores.

- `parse_line(raw)` reads one export line or stream message (raises only `MalformedLine`).
- `Upstream.export_page(after_seq, count)` / `export_page_legacy(after_iso, count)`: one page.
- `Upstream.stream(cursor)`: websocket messages; always ends by raising `StreamClosed(reason)`.
- `Upstream.follow(cursor)`: the sync state machine (pages while far behind, the stream near the
  head, back to pages when the stream closes), yielding `Batch(records, next_cursor, mode)`.
- `Upstream.follow_legacy(after_iso)`: timestamp paging for upstreams without seq, with an
  overlapping cursor and (did, cid) de-duplication so same-millisecond rows at a page edge and
  slightly late commits (reference issue #127) are not skipped.

Politeness: one sliding-window limiter per `Upstream` counts every HTTP request and websocket
connection, retries included (default 450 per 300 s, under plc.directory's 500 per 5 min).
Connection errors, timeouts, 5xx and 429 are retried with exponential backoff and jitter, and a
`Retry-After` (seconds or HTTP-date) is honoured; any other 4xx raises `UpstreamError` at once.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import tenacity
import websockets
from websockets.asyncio.client import connect as ws_connect

from .. import __version__
from ..core.jsonfmt import format_ms, parse_ms

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20  # a line or message above 1 MiB is refused without parsing
MAX_PAGE_COUNT = 1000  # upstream clamps `count` to this
SEQUENCED_TYPE = "sequenced_op"

# Stream close reasons sent by the reference server (code 1000) …
OUTDATED_CURSOR = "OutdatedCursor"
FUTURE_CURSOR = "FutureCursor"
CONSUMER_TOO_SLOW = "ConsumerTooSlow"
# … and the ones this client gives when the connection ends otherwise.
DISCONNECTED = "Disconnected"
CONNECT_FAILED = "ConnectFailed"
MESSAGE_TOO_BIG = "MessageTooBig"

PAGES = "pages"
STREAM = "stream"
LEGACY = "legacy"


class MalformedLine(Exception):
    """An export line or stream message that cannot be read as a record.

    Raised by `parse_line`, and returned in place of a record by the page and stream readers.
    `raw` is the line (at most the first 256 bytes of an oversized one); `seq` is the line's
    seq when it could still be read, so a cursor can move past it.
    """

    def __init__(self, reason: str, raw: bytes, seq: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw
        self.seq = seq

    def __repr__(self) -> str:
        return f"MalformedLine({self.reason!r}, {self.raw[:60]!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MalformedLine)
            and (self.reason, self.raw, self.seq) == (other.reason, other.raw, other.seq)
        )

    __hash__ = None  # type: ignore[assignment]


class UpstreamError(Exception):
    """Upstream answered with an error status (or could not be reached after all retries).

    `status` is the HTTP status (None for a connection failure); `body` an excerpt of the answer.
    """

    def __init__(self, status: int | None, body: str, retry_after: float | None = None):
        super().__init__(f"upstream {status if status is not None else 'unreachable'}: {body}")
        self.status = status
        self.body = body
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


class StreamClosed(Exception):
    """The websocket ended. `reason` is upstream's close reason (`OutdatedCursor`, `FutureCursor`,
    `ConsumerTooSlow`, or whatever else it sent) or one of `DISCONNECTED`, `CONNECT_FAILED`,
    `MESSAGE_TOO_BIG`; `code` the close code when there was one."""

    def __init__(self, reason: str, code: int | None = None, detail: str = ""):
        super().__init__(f"{reason} (code {code}){': ' + detail if detail else ''}")
        self.reason = reason
        self.code = code
        self.detail = detail


class CursorAhead(Exception):
    """Upstream keeps saying our cursor is in its future (its history shrank, or it is another
    directory): following cannot go on without an operator's decision."""


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """One op as upstream exported it. `seq` is None on legacy lines; `nullified` is None on
    sequenced lines and stream messages (they carry no flag). `raw` is the line as received."""

    did: str
    cid: str
    seq: int | None
    created_at: str
    created_ms: int
    operation: dict[str, Any]
    raw: bytes
    nullified: bool | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.did, self.cid)


class Batch(NamedTuple):
    """What `follow` yields: the items read (records and malformed lines, in upstream order), the
    cursor to resume from after storing them, and the mode they came from (`pages`, `stream`,
    `legacy`)."""

    records: list[UpstreamRecord | MalformedLine]
    next_cursor: Any
    mode: str


def parse_line(raw: bytes | str) -> UpstreamRecord:
    """Read one export line (sequenced or legacy) or stream message. Raises only `MalformedLine`."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_LINE_BYTES:
        raise MalformedLine(f"line of {len(raw)} bytes exceeds {MAX_LINE_BYTES}", raw[:256])
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedLine(f"invalid JSON: {exc}", raw) from None
    if not isinstance(obj, dict):
        raise MalformedLine(f"not a JSON object but {type(obj).__name__}", raw)
    seq = obj.get("seq")
    good_seq = seq if type(seq) is int and seq >= 0 else None

    def bad(reason: str) -> MalformedLine:
        return MalformedLine(reason, raw, good_seq)

    if "seq" in obj and good_seq is None:
        raise bad(f"seq is not a non-negative integer: {seq!r}")
    if "type" in obj and obj["type"] != SEQUENCED_TYPE:
        raise bad(f"unknown type {obj['type']!r}")
    if "type" in obj and good_seq is None:
        raise bad("sequenced_op without seq")
    for name in ("did", "cid", "createdAt"):
        if not isinstance(obj.get(name), str):
            raise bad(f"missing or non-string {name}")
    if not isinstance(obj.get("operation"), dict):
        raise bad("missing or non-object operation")
    nullified = obj.get("nullified")
    if nullified is not None and not isinstance(nullified, bool):
        raise bad(f"nullified is not a boolean: {nullified!r}")
    try:
        created_ms = parse_ms(obj["createdAt"])
    except (ValueError, TypeError, OverflowError):
        raise bad(f"unreadable createdAt {obj['createdAt']!r}") from None
    return UpstreamRecord(
        did=obj["did"], cid=obj["cid"], seq=good_seq, created_at=obj["createdAt"],
        created_ms=created_ms, operation=obj["operation"], raw=raw, nullified=nullified,
    )


def read_item(raw: bytes | str) -> UpstreamRecord | MalformedLine:
    """`parse_line`, with the malformed case returned instead of raised."""
    try:
        return parse_line(raw)
    except MalformedLine as bad:
        return bad


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class SlidingWindowLimiter:
    """At most `limit` acquisitions in any `window_s` seconds (monotonic clock); waits otherwise."""

    def __init__(self, limit: int, window_s: float):
        if limit < 1 or window_s <= 0:
            raise ValueError("limit must be >= 1 and window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self._stamps: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and self._stamps[0] <= now - self.window_s:
                    self._stamps.popleft()
                if len(self._stamps) < self.limit:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self._stamps[0] + self.window_s - now + 0.001)


def _excerpt(body: bytes, limit: int = 300) -> str:
    return body[:limit].decode("utf-8", "replace")


class Upstream:
    """A polite reader of one upstream directory (see the module docstring).

    `clock` (epoch seconds) decides "caught up" in `follow`; `cutover_s`: a page whose newest
    createdAt is within this of now counts as caught up. `max_retry_s`: give up retrying one
    request after this long (and never wait longer than this for one Retry-After);
    `max_attempts`: optional cap on tries per request. `poll_interval_s`: pause before polling
    again when caught up in legacy mode or when the stream cannot be used.
    `legacy_overlap_ms`: legacy paging re-asks this far behind the last createdAt seen.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        requests_per_window: int = 450,
        window_s: float = 300.0,
        page_count: int = MAX_PAGE_COUNT,
        user_agent: str = f"plc-mirror/{__version__}",
        max_retry_s: float = 600.0,
        max_attempts: int | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        cutover_s: float = 86400.0,
        poll_interval_s: float = 10.0,
        legacy_overlap_ms: int = 1000,
        stream_open_timeout_s: float = 10.0,
        future_cursor_limit: int = 3,
    ):
        if not 1 <= page_count <= MAX_PAGE_COUNT:
            raise ValueError(f"page_count must be in 1..{MAX_PAGE_COUNT}")
        self.base_url = base_url.rstrip("/")
        self.user_agent = user_agent
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
        self.limiter = SlidingWindowLimiter(requests_per_window, window_s)
        self.page_count = page_count
        self.max_retry_s = max_retry_s
        self.max_attempts = max_attempts
        self.clock = clock
        self.cutover_s = cutover_s
        self.poll_interval_s = poll_interval_s
        self.legacy_overlap_ms = legacy_overlap_ms
        self.stream_open_timeout_s = stream_open_timeout_s
        self.future_cursor_limit = future_cursor_limit
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- HTTP pages ----

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, UpstreamError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_s)
        exp = self.backoff_initial_s * 2.0 ** (state.attempt_number - 1)
        return min(self.backoff_max_s, exp) + random.uniform(0, self.backoff_initial_s)

    def _stop(self) -> tenacity.stop.stop_base:
        stop = tenacity.stop_after_delay(self.max_retry_s)
        if self.max_attempts is not None:
            stop = stop | tenacity.stop_after_attempt(self.max_attempts)
        return stop

    async def _get_lines(self, params: dict[str, str]) -> list[UpstreamRecord | MalformedLine]:
        """GET /export with retries; the body split into parsed lines."""
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, UpstreamError) and e.retryable),
            wait=self._wait,
            stop=self._stop(),
            reraise=True,
            before_sleep=lambda s: log.warning(
                "upstream export %s failed (%s); retry %d", params, s.outcome.exception(), s.attempt_number
            ),
        )
        async for attempt in retrying:
            with attempt:
                return await self._get_lines_once(params)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_lines_once(self, params: dict[str, str]) -> list[UpstreamRecord | MalformedLine]:
        await self.limiter.acquire()
        url = f"{self.base_url}/export"
        headers = {"User-Agent": self.user_agent, "Accept": "application/jsonlines"}
        try:
            async with self.client.stream("GET", url, params=params, headers=headers) as resp:
                if resp.status_code != 200:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > 4096:
                            break
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                    raise UpstreamError(resp.status_code, _excerpt(body), retry_after)
                return await _read_lines(resp)
        except httpx.HTTPError as exc:  # connection refused/reset, timeouts, truncated bodies
            raise UpstreamError(None, f"{type(exc).__name__}: {exc}") from exc

    async def export_page(self, after_seq: int, count: int | None = None) -> list[UpstreamRecord | MalformedLine]:
        """One sequenced page: records with seq > after_seq, in upstream order."""
        if type(after_seq) is not int or after_seq < 0:
            raise ValueError(f"after_seq must be a non-negative int, not {after_seq!r}")
        count = self.page_count if count is None else count
        return await self._get_lines({"after": str(after_seq), "count": str(_clamp_count(count))})

    async def export_page_legacy(
        self, after_iso: str | None, count: int | None = None
    ) -> list[UpstreamRecord | MalformedLine]:
        """One legacy (timestamp) page: records with createdAt > after_iso (all when None)."""
        count = self.page_count if count is None else count
        params = {"count": str(_clamp_count(count))}
        if after_iso:
            params["after"] = after_iso
        return await self._get_lines(params)

    # ---- websocket ----

    def _ws_url(self, cursor: int) -> str:
        parts = urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        path = parts.path.rstrip("/") + "/export/stream"
        return urlunsplit((scheme, parts.netloc, path, f"cursor={cursor}", ""))

    async def stream(self, cursor: int) -> AsyncIterator[UpstreamRecord | MalformedLine]:
        """Messages of /export/stream from `cursor` on; always ends by raising `StreamClosed`."""
        await self.limiter.acquire()
        try:
            conn = await ws_connect(
                self._ws_url(cursor),
                user_agent_header=self.user_agent,
                max_size=MAX_LINE_BYTES + 1024,
                open_timeout=self.stream_open_timeout_s,
                compression=None,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise StreamClosed(CONNECT_FAILED, None, f"{type(exc).__name__}: {exc}") from None
        try:
            while True:
                try:
                    message = await conn.recv()
                except websockets.exceptions.ConnectionClosed as closed:
                    raise _stream_closed(closed) from None
                yield read_item(message)
        finally:
            await conn.close()

    # ---- the state machine ----

    def _caught_up(self, page: list[UpstreamRecord | MalformedLine], count: int, time_ok: bool) -> bool:
        if len(page) < count:
            return True
        newest = max((r.created_ms for r in page if isinstance(r, UpstreamRecord)), default=None)
        return time_ok and newest is not None and newest >= (self.clock() - self.cutover_s) * 1000

    async def follow(self, cursor_seq: int) -> AsyncIterator[Batch]:
        """Sync forever from `cursor_seq`: sequenced pages while far behind, the stream near the
        head, pages again when the stream closes (any reason) — each data batch yielded as
        `Batch(items, next_cursor, mode)`. Raises `CursorAhead` when upstream keeps answering
        `FutureCursor` and has nothing after our cursor; `UpstreamError` when a page fails for good.
        """
        cursor = cursor_seq
        mode = PAGES
        time_switch_ok = True  # after OutdatedCursor only a short page may send us back to the stream
        futures = 0
        stream_failures = 0
        while True:
            if mode == PAGES:
                page = await self.export_page(cursor, self.page_count)
                seqs = [r.seq for r in page if r.seq is not None]
                next_cursor = max([cursor, *seqs])
                if seqs and min(seqs) <= cursor:
                    log.warning("upstream seq went backwards: page after %d holds seq %d", cursor, min(seqs))
                progressed = next_cursor > cursor
                if page:
                    yield Batch(page, next_cursor, PAGES)
                cursor = next_cursor
                if progressed:
                    futures = 0
                if self._caught_up(page, self.page_count, time_switch_ok) or not progressed:
                    mode = STREAM
                    time_switch_ok = True
                continue
            received = 0
            try:
                async for item in self.stream(cursor):
                    received += 1
                    stream_failures = 0
                    futures = 0
                    seq = item.seq
                    if seq is not None and seq <= cursor:
                        log.warning("upstream stream seq went backwards: %d after %d", seq, cursor)
                    cursor = max(cursor, seq) if seq is not None else cursor
                    yield Batch([item], cursor, STREAM)
            except StreamClosed as closed:
                log.info("upstream stream closed at cursor %d: %s", cursor, closed)
                mode = PAGES
                if closed.reason == OUTDATED_CURSOR:
                    time_switch_ok = False
                elif closed.reason == FUTURE_CURSOR:
                    futures += 1
                    if futures >= self.future_cursor_limit:
                        raise CursorAhead(
                            f"upstream said FutureCursor {futures} times for cursor {cursor}"
                        ) from None
                    await asyncio.sleep(min(self.poll_interval_s, 2.0**futures * 0.1))
                elif received == 0:
                    stream_failures += 1
                    await asyncio.sleep(min(self.poll_interval_s, 0.1 * 2.0**stream_failures))

    async def follow_legacy(self, after_iso: str | None = None) -> AsyncIterator[Batch]:
        """Sync forever in legacy timestamp mode from `after_iso` (None: the beginning).

        Each request asks from `legacy_overlap_ms` before the newest createdAt seen, and records
        already yielded there are dropped by (did, cid), so rows sharing a millisecond across a
        page edge and commits up to that lateness are not lost. `next_cursor` is the newest
        createdAt seen (text, as upstream wrote it).
        """
        newest_text: str | None = after_iso
        newest_ms: int | None = None
        if after_iso:
            try:
                newest_ms = parse_ms(after_iso)
            except ValueError:
                newest_ms = None  # an upstream-specific date form: sent as is, no overlap
        seen: dict[tuple[str, str], int] = {}  # keys yielded inside the overlap window -> created_ms
        ask_ms = newest_ms
        while True:
            ask = newest_text if ask_ms is None else format_ms(max(0, ask_ms))
            page = await self.export_page_legacy(ask, self.page_count)
            fresh: list[UpstreamRecord | MalformedLine] = []
            last_ms = None
            for item in page:
                if isinstance(item, UpstreamRecord):
                    last_ms = item.created_ms
                    if item.key in seen:
                        continue
                    seen[item.key] = item.created_ms
                    if newest_ms is None or item.created_ms > newest_ms:
                        newest_ms, newest_text = item.created_ms, item.created_at
                fresh.append(item)
            if newest_ms is not None:
                floor = newest_ms - max(1, self.legacy_overlap_ms)
                seen = {k: ms for k, ms in seen.items() if ms >= floor}
            if fresh:
                yield Batch(fresh, newest_text, LEGACY)
            if len(page) >= self.page_count and last_ms is not None:
                # Walk on from the page's last millisecond, re-asking it (rows sharing it may
                # straddle the edge). A full page all in one millisecond cannot be walked
                # through: step strictly past it (rows beyond the page there are lost).
                if ask_ms is not None and last_ms - 1 <= ask_ms:
                    log.warning("legacy page full at one millisecond %s; stepping past it", format_ms(last_ms))
                    ask_ms = last_ms
                else:
                    ask_ms = last_ms - 1
                continue
            # Caught up: next time re-scan the overlap window for late commits (issue #127).
            if newest_ms is not None:
                ask_ms = newest_ms - max(1, self.legacy_overlap_ms)
            await asyncio.sleep(self.poll_interval_s)


def _clamp_count(count: int) -> int:
    if type(count) is not int or count < 1:
        raise ValueError(f"count must be a positive int, not {count!r}")
    return min(count, MAX_PAGE_COUNT)


async def _read_lines(resp: httpx.Response) -> list[UpstreamRecord | MalformedLine]:
    """Split a JSON-lines body into parsed items, never holding more than 1 MiB of one line."""
    items: list[UpstreamRecord | MalformedLine] = []
    buf = bytearray()
    oversized = 0  # bytes of the current line dropped because it is too long
    head = b""

    def finish(line: bytes) -> None:
        nonlocal oversized, head
        if oversized:
            size = oversized + len(line)
            items.append(MalformedLine(f"line of {size} bytes exceeds {MAX_LINE_BYTES}", head))
            oversized, head = 0, b""
        elif line.strip():
            items.append(read_item(line))

    async for chunk in resp.aiter_bytes():
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            finish(bytes(buf[:nl]))
            del buf[: nl + 1]
        if len(buf) > MAX_LINE_BYTES:
            if not oversized:
                head = bytes(buf[:256])
            oversized += len(buf)
            buf.clear()
    if buf or oversized:
        finish(bytes(buf))
    return items


def _stream_closed(closed: websockets.exceptions.ConnectionClosed) -> StreamClosed:
    """Name why the websocket ended, from the close frames exchanged (if any)."""
    rcvd, sent = closed.rcvd, closed.sent
    if sent is not None and sent.code == 1009:
        return StreamClosed(MESSAGE_TOO_BIG, 1009, sent.reason)
    if rcvd is None:
        return StreamClosed(DISCONNECTED, 1006, str(closed))
    if rcvd.code == 1000 and rcvd.reason:
        return StreamClosed(rcvd.reason, rcvd.code)
    return StreamClosed(DISCONNECTED, rcvd.code, rcvd.reason)


def check_upstream_url(url: str) -> str:
    """The upstream base URL without a trailing slash; ValueError unless it is http(s)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--upstream must be an http(s) URL, not {url!r}")
    return url.rstrip("/")
