"""Reads from a replica with the primary as fallback (plc.api.readpool), on real PostgreSQL.

A "replica" here is a second database on the session server that holds different data, so
every answer shows which database it came from. Replication itself is Patroni's business and
is exercised by the cluster tests; this file checks where the app sends each kind of read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

import pg
from plc.api import create_app
from plc.core.chain import REPLAY, check_op
from plc.store import oplog
from plc.store.migrate import migrate
from plcdata import genesis, k256, ref_cid

T0 = 1_700_000_000_000


@pytest.fixture
def replica_db(pg_server) -> Any:
    db = pg.create_database(pg_server)
    try:
        yield db
    finally:
        pg.drop_database(pg_server, db)


async def _with_one_did(connect_kwargs: dict[str, Any], name: str, seq: int) -> str:
    """Migrate the database and store one new DID in it; returns the DID."""
    conn = await asyncpg.connect(**connect_kwargs)
    try:
        await migrate(conn)
        did, op = genesis(k256(name))
        acc = check_op(None, did, op, mode=REPLAY, created_at=T0, cid=ref_cid(op))
        await oplog.commit(conn, "up", [(acc, seq, T0)], oplog.Cursor(seq, T0))
        return did
    finally:
        await conn.close()


async def _client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            yield c


async def test_reads_come_from_the_replica_and_health_from_the_primary(pg_database, replica_db):
    on_primary = await _with_one_did(pg_database.connect_kwargs, "primary-only", 1)
    on_replica = await _with_one_did(replica_db.connect_kwargs, "replica-only", 1)
    app = create_app(connect_kwargs=pg_database.connect_kwargs, read_connect_kwargs=replica_db.connect_kwargs)
    async for c in _client(app):
        assert (await c.get(f"/{on_replica}")).status_code == 200
        assert (await c.get(f"/{on_primary}")).status_code == 404
        export = (await c.get("/export?after=0")).text
        assert on_replica in export and on_primary not in export
        assert (await c.get("/_health")).status_code == 200
        pool = app.state.read_pool
        assert pool.replica_reads >= 3 and pool.fallbacks == 0
        # a DID this node just forwarded an op for is read from the primary meanwhile
        pool.prefer_primary(on_primary, 60)
        app.state.doc_cache.invalidate([on_primary])
        assert (await c.get(f"/{on_primary}")).status_code == 200


async def test_an_unreachable_replica_falls_back_to_the_primary(pg_database, tmp_path):
    on_primary = await _with_one_did(pg_database.connect_kwargs, "fallback", 1)
    nowhere = {"host": str(tmp_path), "port": 5432, "user": "postgres", "database": "x"}  # no socket there
    app = create_app(connect_kwargs=pg_database.connect_kwargs, read_connect_kwargs=nowhere)
    async for c in _client(app):
        r = await c.get(f"/{on_primary}/log/audit")
        assert r.status_code == 200 and r.json()[0]["did"] == on_primary
        assert (await c.get("/export?after=0")).status_code == 200
        assert app.state.read_pool.fallbacks >= 2 and app.state.read_pool.replica_reads == 0
