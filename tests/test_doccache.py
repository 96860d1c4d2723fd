"""The API's per-DID read cache (plc.api.doccache): hot DIDs come from memory, and a change
committed by this process or by another one is never hidden by it (real PostgreSQL, the app
over ASGI)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from plc.api import create_app
from plc.api.doccache import DocCache
from plc.core.chain import REPLAY, check_op
from plc.core.render import OpRow
from plc.store import oplog
from plc.store.migrate import migrate

from plcdata import genesis, k256, ref_cid, update

T0 = 1_700_000_000_000


def _row(did: str, cid: str = "c") -> OpRow:
    return OpRow(did, {"type": "plc_tombstone", "prev": "p", "sig": "s"}, cid, 1, False, 1)


def test_lru_keeps_the_most_recently_used_dids():
    cache = DocCache(size=2)
    for did in ("a", "b"):
        cache.put(did, cache.token(), [_row(did)])
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", cache.token(), [_row("c")])
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert (cache.hits, cache.misses) == (3, 1)


def test_a_put_after_an_invalidation_is_not_kept():
    """A reader that loaded rows while the DID changed must not store its (old) rows."""
    cache = DocCache()
    token = cache.token()
    cache.invalidate(["did:plc:other"])  # any invalidation in between
    entry = cache.put("a", token, [_row("a")])
    assert entry.rows and cache.get("a") is None
    cache.put("a", cache.token(), [_row("a")])
    assert cache.get("a") is not None


def test_large_logs_off_and_size_zero_are_never_cached():
    cache = DocCache(size=10, max_rows=2)
    cache.put("big", cache.token(), [_row("big", str(i)) for i in range(3)])
    assert cache.get("big") is None
    cache.live = False
    cache.put("x", cache.token(), [_row("x")])
    assert cache.get("x") is None
    off = DocCache(size=0)
    off.put("y", off.token(), [_row("y")])
    assert off.get("y") is None and len(off) == 0


def test_listeners_hear_every_invalidation():
    cache = DocCache()
    heard: list[Any] = []
    cache.listeners.append(heard.append)
    cache.invalidate({"a"})
    cache.clear()
    assert heard == [["a"], None]


# ----------------------------------------------------------------------------- with the database


@pytest.fixture
async def conn(pg_dsn) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(pg_dsn)
    await migrate(c)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def client(pg_database, conn) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(connect_kwargs=pg_database.connect_kwargs, doc_cache_poll_s=0.05)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            await _until(lambda: app.state.doc_cache.live, "the change watcher never polled")
            yield c, app


async def _until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def _store(conn, did: str, ops: list[tuple[dict, int]], first_seq: int, log=None, upstream="up"):
    """Validate and commit ops (op, createdAt) as the ingest would; returns the DID's log."""
    items = []
    for i, (op, created) in enumerate(ops):
        acc = check_op(log, did, op, mode=REPLAY, created_at=created, cid=ref_cid(op))
        if log is None:
            from plc.core.chain import DidLog

            log = DidLog(did)
        log.apply(acc)
        items.append((acc, None if first_seq is None else first_seq + i, created))
    cursor = oplog.Cursor(None if first_seq is None else first_seq + len(ops) - 1, ops[-1][1])
    await oplog.commit(conn, upstream, items, cursor)
    return log


async def test_a_hot_did_is_served_from_memory_until_its_next_commit(client, conn):
    c, app = client
    cache: DocCache = app.state.doc_cache
    key = k256("cache-1")
    did, g = genesis(key, aka=["at://first.test"])
    log = await _store(conn, did, [(g, T0)], 1)
    first = await c.get(f"/{did}")
    assert first.status_code == 200 and "at://first.test" in first.json()["alsoKnownAs"]
    hits = cache.hits
    again = await c.get(f"/{did}")
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    assert cache.hits == hits + 1
    # a 304 from the cached ETag
    assert (await c.get(f"/{did}", headers={"if-none-match": first.headers["etag"]})).status_code == 304
    for path in ("/data", "/log", "/log/audit", "/log/last"):
        assert (await c.get(f"/{did}{path}")).status_code == 200

    # another process (another node's ingestor) commits an update: the watcher drops the DID
    op = update(ref_cid(g), key, [key], aka=["at://second.test"])
    await _store(conn, did, [(op, T0 + 1000)], 2, log)

    async def current() -> bool:
        r = await c.get(f"/{did}")
        return "at://second.test" in r.json()["alsoKnownAs"]

    deadline = time.monotonic() + 10
    while not await current():
        assert time.monotonic() < deadline, "the cache kept serving the old document"
        await asyncio.sleep(0.02)
    audit = (await c.get(f"/{did}/log/audit")).json()
    assert [e["cid"] for e in audit] == [ref_cid(g), ref_cid(op)]


async def test_an_invalidation_in_this_process_is_seen_by_the_next_read(pg_database, conn):
    """What the ingestor of this node does (on_commit → invalidate): with the watcher polling
    only once a minute, the commit is visible to the very next read, and only because of it."""
    app = create_app(connect_kwargs=pg_database.connect_kwargs, doc_cache_poll_s=60)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            await _until(lambda: app.state.doc_cache.live, "the change watcher never polled")
            key = k256("cache-2")
            did, g = genesis(key, aka=["at://one.test"])
            log = await _store(conn, did, [(g, T0)], 1)
            assert (await c.get(f"/{did}/log/last")).json()["alsoKnownAs"] == ["at://one.test"]
            op = update(ref_cid(g), key, [key], aka=["at://two.test"])
            await _store(conn, did, [(op, T0 + 1000)], 2, log)
            stale = (await c.get(f"/{did}/log/last")).json()["alsoKnownAs"]
            assert stale == ["at://one.test"]  # cached, and the watcher is asleep
            app.state.doc_cache.invalidate({did})
            assert (await c.get(f"/{did}/log/last")).json()["alsoKnownAs"] == ["at://two.test"]


async def test_an_unknown_did_is_cached_until_it_is_created(client, conn):
    c, app = client
    key = k256("cache-3")
    did, g = genesis(key)
    assert (await c.get(f"/{did}")).status_code == 404
    assert (await c.get(f"/{did}")).status_code == 404
    await _store(conn, did, [(g, T0)], 1)
    deadline = time.monotonic() + 10
    while (await c.get(f"/{did}")).status_code != 200:
        assert time.monotonic() < deadline, "a cached 404 outlived the DID's creation"
        await asyncio.sleep(0.02)


async def test_a_legacy_cursor_moving_clears_the_cache(client, conn):
    """Ops without an upstream seq cannot be found by the seq feed: the whole cache goes."""
    c, app = client
    key = k256("cache-4")
    did, g = genesis(key)
    await _store(conn, did, [(g, T0)], None, upstream="legacy")
    assert (await c.get(f"/{did}")).status_code == 200
    await _until(lambda: app.state.doc_cache.get(did) is not None, "never cached")
    other_did, other = genesis(k256("cache-5"))
    await _store(conn, other_did, [(other, T0 + 5)], None, upstream="legacy")
    await _until(lambda: len(app.state.doc_cache) == 0, "the cache survived a legacy commit")


async def test_the_identity_resolver_follows_the_cache(client, conn):
    """resolveDid of a did:plc is never older than GET /:did once the DID changed."""
    c, app = client
    key = k256("cache-6")
    did, g = genesis(key, aka=["at://old.test"])
    log = await _store(conn, did, [(g, T0)], 1)
    r = await c.get("/xrpc/com.atproto.identity.resolveDid", params={"did": did})
    assert r.status_code == 200 and r.json()["didDoc"]["alsoKnownAs"] == ["at://old.test"]
    op = update(ref_cid(g), key, [key], aka=["at://new.test"])
    await _store(conn, did, [(op, T0 + 1000)], 2, log)
    deadline = time.monotonic() + 10
    while True:
        r = await c.get("/xrpc/com.atproto.identity.resolveDid", params={"did": did})
        if r.json()["didDoc"]["alsoKnownAs"] == ["at://new.test"]:
            break
        assert time.monotonic() < deadline, "resolveDid kept the old document"
        await asyncio.sleep(0.02)
