"""A fake upstream PLC directory for sync tests: a Starlette app served by uvicorn on 127.0.0.1.

It serves `/export` (sequenced and legacy modes, `count`/`after` parsed as the reference does,
spec §1.5) and `/export/stream` (spec §1.6: FutureCursor / OutdatedCursor / ConsumerTooSlow,
close code 1000, live messages for records appended later) from an in-memory list of records,
and records every request it receives (`requests`) for politeness assertions.

Fault knobs (plain attributes and methods of `FakeUpstream`, changeable while it runs):
- `page_faults`: a queue of `PageFault` consumed one per /export request — an error status
  (with optional Retry-After and body), a disconnect after N lines, or a delay (slow page).
- `stream_faults`: a queue of `StreamFault` consumed one per stream connection — close with a
  reason after N messages (e.g. ConsumerTooSlow) or drop the connection after N messages.
- `dropped`: seqs never served; `duplicated`: seqs served twice in a row;
  `replaced`: seq -> bytes served instead of that record's line/message (malformed, oversized);
  `seq_shown`: seq -> the seq written in the line (a seq that goes backwards).
- `append(...)`: new records (live; an old createdAt makes a late-committing op, issue #127);
  `delete(seqs)`: history removed upstream (admin removeInvalidOps; deleting the tail makes
  cursors "future").
- `outdated_ms`: the stream's backfill window (default 7 days); `now_ms`: its clock.
- `legacy_only`: behave like the reference before seq existed (2025-12): every `/export` is
  legacy (an all-digit `after` is read as a date, which V8 does for `0` as the year 2000, before
  any record: the page starts at the beginning), lines carry no seq, and `/export/stream` does
  not exist (the websocket is refused with 403).
- A record's `nullified` is served as is on legacy lines; set it to flip the flag in place.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest_asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from plc.core.jsonfmt import format_ms, parse_ms

SEVEN_DAYS_MS = 7 * 86400 * 1000


@dataclass
class FakeRecord:
    did: str
    cid: str
    seq: int
    created_ms: int
    operation: dict[str, Any]
    nullified: bool = False

    @property
    def created_at(self) -> str:
        return format_ms(self.created_ms)

    def seq_line(self, seq: int) -> bytes:
        return orjson.dumps({"did": self.did, "cid": self.cid, "seq": seq, "createdAt": self.created_at,
                             "operation": self.operation, "type": "sequenced_op"})

    def legacy_line(self) -> bytes:
        return orjson.dumps({"did": self.did, "cid": self.cid, "createdAt": self.created_at,
                             "operation": self.operation, "nullified": self.nullified})

    def stream_message(self, seq: int) -> bytes:
        return orjson.dumps({"seq": seq, "type": "sequenced_op", "did": self.did, "operation": self.operation,
                             "cid": self.cid, "createdAt": self.created_at})


@dataclass
class PageFault:
    """What the next /export request gets instead of (or on top of) a normal page."""

    status: int | None = None
    retry_after: str | None = None
    body: str = '{"message":"Internal Server Error"}'
    disconnect_after_lines: int | None = None
    delay_s: float = 0.0


@dataclass
class StreamFault:
    """What happens to the next stream connection after `after` messages: a close with `reason`
    (code 1000), or, when `reason` is None, a dropped connection."""

    after: int
    reason: str | None = None


@dataclass
class RequestLog:
    t: float  # time.monotonic() when received
    kind: str  # "export" or "stream"
    query: dict[str, str]
    status: int = 0


class _Drop(Exception):
    """Raised inside a response to make uvicorn cut the connection."""


def js_parse_int(text: str) -> int | None:
    """JS parseInt(x, 10) on a query value: leading whitespace and sign, then leading digits."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else None


def parse_js_date(text: str) -> int | None:
    """The subset of JS `new Date(text)` the tests need: ISO dates/date-times (UTC unless an offset
    is given). Returns ms, or None for an invalid date."""
    try:
        return parse_ms(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _seq_of(record: FakeRecord) -> int:
    return record.seq


class FakeUpstream:
    """The state and faults of the fake directory; `app` is its Starlette app."""

    def __init__(self, records: Iterable[FakeRecord] = (), *, now_ms: Callable[[], int] | None = None):
        self.records: list[FakeRecord] = sorted(records, key=lambda r: r.seq)
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.outdated_ms = SEVEN_DAYS_MS
        self.requests: list[RequestLog] = []
        self.page_faults: list[PageFault] = []
        self.stream_faults: list[StreamFault] = []
        self.dropped: set[int] = set()
        self.duplicated: set[int] = set()
        self.replaced: dict[int, bytes] = {}
        self.seq_shown: dict[int, int] = {}
        self.legacy_only = False
        self._changed = asyncio.Event()
        self.url = ""
        self.app = Starlette(routes=[
            Route("/export", self.export),
            WebSocketRoute("/export/stream", self.export_stream),
        ])

    @classmethod
    def from_lines(cls, lines: Iterable[bytes], **kw: Any) -> FakeUpstream:
        """From sequenced export lines (e.g. plc.tools.generate.generate(..., fmt="sequenced"))."""
        return cls([record_from_line(line) for line in lines], **kw)

    # ---- state changes ----

    @property
    def latest_seq(self) -> int:
        return self.records[-1].seq if self.records else 0

    def append(self, records: Iterable[FakeRecord]) -> None:
        """Add records (seq must be above the latest); stream connections see them live."""
        for record in records:
            assert record.seq > self.latest_seq, "appended seqs must grow"
            self.records.append(record)
        self._changed.set()

    def delete(self, seqs: Iterable[int]) -> None:
        gone = set(seqs)
        self.records = [r for r in self.records if r.seq not in gone]
        self._changed.set()

    def requests_of(self, kind: str) -> list[RequestLog]:
        return [r for r in self.requests if r.kind == kind]

    # ---- serving ----

    def _line(self, record: FakeRecord, legacy: bool, stream: bool = False) -> bytes:
        if record.seq in self.replaced:
            return self.replaced[record.seq]
        if legacy:
            return record.legacy_line()
        shown = self.seq_shown.get(record.seq, record.seq)
        return record.stream_message(shown) if stream else record.seq_line(shown)

    def _expand(self, rows: list[FakeRecord]) -> list[FakeRecord]:
        out = []
        for r in rows:
            if r.seq in self.dropped:
                continue
            out.append(r)
            if r.seq in self.duplicated:
                out.append(r)
        return out

    async def export(self, request: Request) -> Response:
        entry = RequestLog(time.monotonic(), "export", dict(request.query_params))
        self.requests.append(entry)
        fault = self.page_faults.pop(0) if self.page_faults else PageFault()
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.status is not None:
            entry.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
            return Response(fault.body, fault.status, headers=headers, media_type="application/json")
        # A parameter given more than once is ignored (treated as absent), spec §1.5.
        params = {k: v for k, v in request.query_params.items() if len(request.query_params.getlist(k)) == 1}
        count_text = params.get("count", "")
        count = 1000
        if count_text != "":
            parsed = js_parse_int(count_text)
            if parsed is None or parsed < 1:
                entry.status = 400
                return JSONResponse({"message": "Invalid count parameter"}, 400)
            count = min(parsed, 1000)
        after = params.get("after", "")
        if self.legacy_only and re.fullmatch(r"\d+", after):
            after = ""  # `new Date("0")` is the year 2000: before every record
        if re.fullmatch(r"\d+", after):
            seq_after = int(after)
            rows = [r for r in self.records if r.seq > seq_after][:count]
            legacy = False
        else:
            after_ms = None
            if after != "":
                after_ms = parse_js_date(after)
                if after_ms is None:
                    entry.status = 400
                    return JSONResponse({"message": "Invalid after parameter"}, 400)
            ordered = sorted(self.records, key=lambda r: (r.created_ms, r.cid.encode()))
            rows = [r for r in ordered if after_ms is None or r.created_ms > after_ms][:count]
            legacy = True
        lines = [self._line(r, legacy) for r in self._expand(rows)]
        entry.status = 200
        if fault.disconnect_after_lines is None:
            return Response(b"\n".join(lines), 200, media_type="application/jsonlines")

        async def body() -> AsyncIterator[bytes]:
            for i, line in enumerate(lines[: fault.disconnect_after_lines]):
                yield (b"\n" if i else b"") + line
                await asyncio.sleep(0)
            raise _Drop("fault: disconnect mid-page")

        return StreamingResponse(body(), 200, media_type="application/jsonlines")

    async def export_stream(self, ws: WebSocket) -> None:
        entry = RequestLog(time.monotonic(), "stream", dict(ws.query_params))
        self.requests.append(entry)
        if self.legacy_only:
            entry.status = 403
            await ws.close(1008)
            return
        cursor = js_parse_int(ws.query_params.get("cursor", ""))
        if cursor is None or cursor < 0:
            entry.status = 400
            await ws.close(1008)
            return
        await ws.accept()
        entry.status = 101
        fault = self.stream_faults.pop(0) if self.stream_faults else None
        if cursor > self.latest_seq:
            await ws.close(1000, "FutureCursor")
            return
        first = next((r for r in self.records if r.seq > cursor), None)
        if first is not None and first.created_ms < self.now_ms() - self.outdated_ms:
            await ws.close(1000, "OutdatedCursor")
            return
        receiver = asyncio.ensure_future(ws.receive())
        sent, last = 0, cursor
        try:
            while True:
                self._changed.clear()
                start = bisect.bisect_right(self.records, last, key=_seq_of)  # records are in seq order
                for record in self._expand(self.records[start:]):
                    if fault is not None and sent >= fault.after:
                        if fault.reason is None:
                            raise _Drop("fault: disconnect mid-stream")
                        await ws.close(1000, fault.reason)
                        return
                    await ws.send_text(self._line(record, legacy=False, stream=True).decode("utf-8", "replace"))
                    sent += 1
                    last = max(last, record.seq)
                changed = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait({changed, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver in done:
                    changed.cancel()
                    return  # the client went away
        except WebSocketDisconnect:
            return
        finally:
            receiver.cancel()


def record_from_line(line: bytes) -> FakeRecord:
    obj = orjson.loads(line)
    return FakeRecord(obj["did"], obj["cid"], obj["seq"], parse_ms(obj["createdAt"]), obj["operation"],
                      bool(obj.get("nullified", False)))


async def serve_app(app: Any, **config: Any) -> tuple[uvicorn.Server, asyncio.Task, str]:
    """Start uvicorn for `app` on 127.0.0.1 (a free port) in the running loop; returns the
    server, its task and its base URL. `config`: uvicorn.Config options (lifespan, ws, …)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1, **config))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return server, task, f"http://{host}:{port}"


async def serve(fake: FakeUpstream) -> tuple[uvicorn.Server, asyncio.Task]:
    """Start uvicorn for `fake` on 127.0.0.1 (a free port) in the running loop; sets `fake.url`."""
    server, task, fake.url = await serve_app(fake.app, lifespan="off", ws="websockets-sansio", ws_ping_interval=None)
    return server, task


async def stop(server: uvicorn.Server, task: asyncio.Task) -> None:
    server.should_exit = True
    try:
        await asyncio.wait_for(task, 5)
    except (asyncio.TimeoutError, Exception):
        task.cancel()


@pytest_asyncio.fixture
async def fake_upstream_factory():
    """Call with records (FakeRecord list) to get a running FakeUpstream; all stopped at teardown."""
    running = []

    async def start(records: Iterable[FakeRecord] = (), **kw: Any) -> FakeUpstream:
        fake = FakeUpstream(records, **kw)
        running.append(await serve(fake))
        return fake

    yield start
    for server, task in running:
        await stop(server, task)
