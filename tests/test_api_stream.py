"""``/export/stream`` over a real websocket: the app under uvicorn on 127.0.0.1 (in the test's
loop, so it shares nothing with another loop), a fresh PostgreSQL database per test, and the
``websockets`` client. Expected frames are ``render.stream_message`` of the ops committed with
``oplog.commit``, in seq order.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import uvicorn
import websockets
from websockets.asyncio.client import connect

from plc.api import create_app, stream
from plc.core import render
from plc.core.chain import REPLAY, check_op
from plc.store import oplog
from plc.store.migrate import migrate

from plcdata import genesis, k256

UPSTREAM = "https://plc.example"
DAY_MS = 24 * 3600 * 1000
RECV_TIMEOUT = 5.0


class Mirror:
    """A running app and its database: commit ops, open websockets."""

    def __init__(self, connect_kwargs: dict[str, Any]):
        self.connect_kwargs = connect_kwargs
        self.url = ""
        self.expected: dict[int, str] = {}  # seq -> the frame the stream must send
        self._servers: list[tuple[uvicorn.Server, asyncio.Task]] = []
        self._names = 0

    async def start(self, **app_kw: Any) -> str:
        app = create_app(connect_kwargs=self.connect_kwargs, stream_poll_interval=0.02, **app_kw)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="critical", lifespan="on", ws="websockets-sansio",
                                ws_ping_interval=None, timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        self._servers.append((server, task))
        host, port = sock.getsockname()[:2]
        self.url = f"ws://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        for server, task in self._servers:
            server.should_exit = True
        for server, task in self._servers:
            try:
                await asyncio.wait_for(task, 10)
            except Exception:
                task.cancel()
        self._servers.clear()

    async def commit(self, seqs: list[int], *, age_ms: int = 0, aka_size: int = 0) -> None:
        """One genesis op per seq (createdAt = now - age_ms), committed in one transaction."""
        now = int(time.time() * 1000)
        items = []
        for i, seq in enumerate(seqs):
            self._names += 1
            aka = [f"at://user{self._names}.example"]
            if aka_size:
                aka.append("at://" + os.urandom(aka_size // 2).hex())
            did, op = genesis(k256(f"stream-{self._names}"), aka=aka)
            created_at = now - age_ms + i
            acc = check_op(None, did, op, mode=REPLAY, created_at=created_at)
            items.append((acc, seq, now))
            self.expected[seq] = render.stream_message(did, acc.op, acc.cid, created_at, seq).decode()
        conn = await asyncpg.connect(**self.connect_kwargs)
        try:
            await oplog.commit(conn, UPSTREAM, items, None, now_ms=now)
        finally:
            await conn.close()

    def frames(self, seqs: list[int]) -> list[str]:
        return [self.expected[s] for s in seqs]


@pytest_asyncio.fixture
async def mirror(pg_database) -> AsyncIterator[Mirror]:
    conn = await asyncpg.connect(**pg_database.connect_kwargs)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    m = Mirror(pg_database.connect_kwargs)
    try:
        yield m
    finally:
        await m.stop()


async def _recv(ws: Any, n: int) -> list[str]:
    return [await asyncio.wait_for(ws.recv(), RECV_TIMEOUT) for _ in range(n)]


async def _closed(ws: Any) -> tuple[int | None, str | None, list[str]]:
    """Read until the server closes: (close code, reason, frames received before it)."""
    got: list[str] = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT))
    except asyncio.TimeoutError:
        return None, "timeout", got
    except websockets.ConnectionClosed as exc:
        rcvd = exc.rcvd
        return (rcvd.code if rcvd else None), (rcvd.reason if rcvd else None), got


async def _silent(ws: Any, seconds: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return True
    return False


async def test_backfill_pages_then_live_events(mirror, monkeypatch):
    monkeypatch.setattr(stream, "PAGE", 2)  # several backfill pages from 5 rows
    await mirror.commit([3, 4, 7, 8, 9, 12])
    url = await mirror.start()
    async with connect(f"{url}/export/stream?cursor=4") as ws:
        assert await _recv(ws, 4) == mirror.frames([7, 8, 9, 12])
        async with connect(f"{url}/EXPORT/Stream/") as live:  # no cursor: live only
            await asyncio.sleep(0.2)
            await mirror.commit([13, 20, 21])
            assert await _recv(ws, 3) == mirror.frames([13, 20, 21])
            assert await _recv(live, 3) == mirror.frames([13, 20, 21])
            assert await _silent(live)


async def test_cursor_zero_backfills_everything_and_parse_int_semantics(mirror):
    await mirror.commit([1, 2, 5])
    url = await mirror.start()
    async with connect(f"{url}/export/stream?cursor=0") as ws:
        assert await _recv(ws, 3) == mirror.frames([1, 2, 5])
    async with connect(f"{url}/export/stream?cursor=1.9abc") as ws:  # parseInt: 1
        assert await _recv(ws, 2) == mirror.frames([2, 5])


async def test_future_cursor_closes_and_latest_cursor_waits(mirror):
    url = await mirror.start()
    async with connect(f"{url}/export/stream?cursor=1") as ws:  # nothing stored: latest is 0
        assert await _closed(ws) == (1000, "FutureCursor", [])
    async with connect(f"{url}/export/stream?cursor=0") as ws:
        assert await _silent(ws)
    await mirror.commit([10, 11])
    async with connect(f"{url}/export/stream?cursor=12") as ws:
        assert await _closed(ws) == (1000, "FutureCursor", [])
    async with connect(f"{url}/export/stream?cursor=11") as ws:
        assert await _silent(ws)
        await mirror.commit([15])
        assert await _recv(ws, 1) == mirror.frames([15])


async def test_outdated_cursor_is_judged_by_the_next_events_created_at(mirror):
    await mirror.commit([1], age_ms=8 * DAY_MS)
    await mirror.commit([2, 3], age_ms=6 * DAY_MS)
    url = await mirror.start()
    async with connect(f"{url}/export/stream?cursor=0") as ws:
        assert await _closed(ws) == (1000, "OutdatedCursor", [])
    async with connect(f"{url}/export/stream?cursor=1") as ws:
        assert await _recv(ws, 2) == mirror.frames([2, 3])
    await mirror.stop()
    url = await mirror.start(stream_backfill_window_ms=DAY_MS)  # configurable window
    async with connect(f"{url}/export/stream?cursor=1") as ws:
        assert await _closed(ws) == (1000, "OutdatedCursor", [])


@pytest.mark.parametrize("cursor", ["abc", "-1", "", "%20-5"])
async def test_invalid_cursor_is_a_plain_http_400(mirror, cursor):
    url = await mirror.start()
    with pytest.raises(websockets.InvalidStatus) as info:
        async with connect(f"{url}/export/stream?cursor={cursor}"):
            pass
    response = info.value.response
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.body == b'{"message":"Invalid cursor parameter"}'


async def test_plain_get_answers_426(mirror):
    url = await mirror.start()
    async with httpx.AsyncClient(base_url=url.replace("ws://", "http://")) as client:
        for path in ("/export/stream", "/Export/STREAM/"):
            r = await client.get(path)
            assert r.status_code == 426
            assert r.content == b'{"message":"upgrade required"}'
    with pytest.raises(websockets.InvalidStatus):  # other paths take no websocket
        async with connect(f"{url}/export/streams"):
            pass


async def test_a_consumer_that_falls_behind_gets_consumer_too_slow(mirror):
    await mirror.commit([1])
    url = await mirror.start(stream_buffer=2)
    # a client that stops reading: its queue holds one frame, then its small TCP window fills up
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(url.rsplit(":", 1)[1])))
    async with connect(f"{url}/export/stream", sock=sock, max_queue=1, compression=None, max_size=None) as ws:
        await asyncio.sleep(0.1)
        await mirror.commit(list(range(2, 42)), aka_size=256_000)
        await asyncio.sleep(1.5)
        code, reason, got = await _closed(ws)
    assert (code, reason) == (1000, "ConsumerTooSlow")
    assert 0 < len(got) < 40
    assert got == mirror.frames(list(range(2, 2 + len(got))))


async def test_shutdown_closes_open_streams(mirror):
    url = await mirror.start()
    async with connect(f"{url}/export/stream") as ws:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await mirror.stop()
        code, _, got = await _closed(ws)
    assert got == []
    assert code in (1001, 1012)
    assert time.monotonic() - started < 5
