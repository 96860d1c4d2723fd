"""plc.store.pending: the pure merge, and add/load/reconcile/expire on a real PostgreSQL."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from plc.core import render
from plc.core.chain import REPLAY, SUBMIT, DidLog, check_op
from plc.store import oplog, pending
from plc.store.migrate import migrate

from plcdata import HOUR, genesis, k256, update

T0 = 1_750_000_000_000
UP = "http://upstream.test"


def _chain():
    """A DID with genesis g (key a, rotation [r, a]) and update u1; a recovery by r from g."""
    r, a = k256("pend-r"), k256("pend-a")
    did, g = genesis(a, rotation=[r, a])
    log = DidLog(did)
    acc_g = check_op(None, did, g, mode=REPLAY, created_at=T0)
    log.apply(acc_g)
    u1 = update(acc_g.cid, a, [r, a], aka=["at://one.test"])
    acc_u1 = check_op(log, did, u1, mode=REPLAY, created_at=T0 + HOUR)
    log.apply(acc_u1)
    rec = update(acc_g.cid, r, [r, a], aka=["at://recovered.test"])
    acc_rec = check_op(log, did, rec, mode=SUBMIT, created_at=T0 + 2 * HOUR)
    return did, log, acc_g, acc_u1, acc_rec


def _p(acc, created_at=None, upstream=UP):
    return pending.PendingOp(acc.did, acc.cid, upstream, created_at or acc.created_at, acc.op,
                             tuple(e.cid for e in acc.nullified))


def test_merge_appends_and_nullifies():
    did, log, g, u1, rec = _chain()
    rows = render.rows_from_entries(did, log.entries)
    merged = pending.merge(rows, [_p(rec)])
    assert [r.cid for r in merged] == [g.cid, u1.cid, rec.cid]
    assert [r.nullified for r in merged] == [False, True, False]
    assert [r.nullified for r in rows] == [False, False]  # input untouched


def test_merge_skips_stored_and_misfits():
    did, log, g, u1, rec = _chain()
    rows = render.rows_from_entries(did, log.entries)
    assert pending.merge(rows, [_p(u1)]) == rows  # already stored
    u2 = check_op(log, did, update(u1.cid, k256("pend-a"), [k256("pend-r"), k256("pend-a")]),
                  mode=SUBMIT, created_at=T0 + 3 * HOUR)
    # stored chain only up to g: u2 (prev u1) does not fit and is not shown
    assert pending.merge(rows[:1], [_p(u2)]) == rows[:1]
    # an unknown DID: a pending genesis is the whole log
    assert [r.cid for r in pending.merge([], [_p(g)])] == [g.cid]
    assert pending.merge([], [_p(u1)]) == []


@pytest.fixture
async def conn(pg_dsn):
    c = await asyncpg.connect(pg_dsn)
    await migrate(c)
    yield c
    await c.close()


async def test_add_load_roundtrip_and_idempotent(conn):
    did, log, g, u1, rec = _chain()
    assert await pending.add(conn, rec, T0 + 2 * HOUR, UP) is True
    assert await pending.add(conn, rec, T0 + 2 * HOUR, UP) is False
    [p] = await pending.load(conn, did)
    assert (p.did, p.cid, p.upstream, p.created_at, p.nullifies) == (did, rec.cid, UP, rec.created_at, (u1.cid,))
    assert p.op == rec.op
    assert await pending.load(conn, "did:web:example.com") == []
    assert await pending.count(conn) == 1


async def test_reconcile_removes_only_stored(conn):
    did, log, g, u1, rec = _chain()
    await oplog.commit(conn, UP, [(g, 1, T0)], None, now_ms=T0)
    await pending.add(conn, u1, T0, UP)
    await pending.add(conn, g, T0, UP)  # stored already
    assert await pending.reconcile(conn, [(did, g.cid), (did, u1.cid), ("not-a-did", "x")]) == 1
    assert [p.cid for p in await pending.load(conn, did)] == [u1.cid]
    await oplog.commit(conn, UP, [(u1, 2, T0)], None, now_ms=T0)
    async with conn.transaction():  # as the ingest would: inside its commit transaction
        assert await pending.reconcile(conn, [(did, u1.cid)]) == 1
    assert await pending.load(conn, did) == []
    assert await pending.reconcile(conn, []) == 0


async def test_expire_records_unpublished(conn):
    did, log, g, u1, rec = _chain()
    await oplog.commit(conn, UP, [(g, 1, T0)], None, now_ms=T0)
    await pending.add(conn, g, T0, UP)  # old, but published (stored): dropped silently
    await pending.add(conn, u1, T0, UP)  # old and never published
    fresh = check_op(log, did, update(u1.cid, k256("pend-a"), [k256("pend-r"), k256("pend-a")]),
                     mode=SUBMIT, created_at=T0 + HOUR + 20 * 60_000)
    await pending.add(conn, fresh, T0, UP)
    now = T0 + HOUR + 25 * 60_000  # u1 was received 25 min ago, fresh 5 min ago
    found = await pending.expire(conn, 10 * 60_000, now)
    assert [(d.kind, d.did, d.cid) for d in found] == [("unpublished", did, u1.cid)]
    assert orjson.loads(found[0].raw) == u1.op
    rows = await conn.fetch("SELECT kind, upstream, did, cid, detail, observed_at FROM plc_divergence")
    assert [(r["kind"], r["upstream"], r["did"], r["cid"], r["observed_at"]) for r in rows] == [
        ("unpublished", UP, did, u1.cid, now)
    ]
    assert "accepted upstream but never published" in rows[0]["detail"]
    assert [p.cid for p in await pending.load(conn, did)] == [fresh.cid]
    assert await pending.expire(conn, 10 * 60_000, now) == []
