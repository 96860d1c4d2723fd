"""Spec §7 items 37-39, one named test per behaviour, against OUR server (the app under uvicorn on
127.0.0.1, a fresh PostgreSQL database) and, for history, the ingest from the fake upstream.

37 (the stream): cases already proven in tests/test_api_stream.py are run from there under
their spec names (the same test bodies, not copies); the cases it does not assert on their own
(no cursor = live only; the message key order) are here.
38 (nullification): no new seq event; the legacy /export flips `nullified` in place.
39 (history shrinking): seq gaps are no divergence; vanished ops are kept, served and recorded
by the audit as `vanished`.
"""

from __future__ import annotations

import time

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect

import test_api_stream as stream_tests
from fake_upstream import FakeRecord, fake_upstream_factory  # noqa: F401
from plc.core.jsonfmt import parse_ms
from plc.store import oplog
from plc.sync.audit import VANISHED, audit
from plc.sync.ingest import Ingestor
from plcdata import genesis, k256, ref_cid, update
from test_api_stream import _recv, _silent, mirror  # noqa: F401
from test_ingest import sync_until, upstream

pytestmark = pytest.mark.timeout(120)
HOUR_MS = 3600 * 1000


# ---- 37: /export/stream ----


async def test_spec_7_37_no_cursor_is_live_only(mirror):
    await mirror.commit([1, 2, 3])
    url = await mirror.start()
    async with ws_connect(f"{url}/export/stream") as ws:
        assert await _silent(ws)  # nothing stored before the connection is sent
        await mirror.commit([4])
        assert await _recv(ws, 1) == mirror.frames([4])
        assert await _silent(ws)


async def test_spec_7_37_cursor_at_latest_waits_and_beyond_latest_is_future_cursor(mirror):
    await stream_tests.test_future_cursor_closes_and_latest_cursor_waits(mirror)


async def test_spec_7_37_next_op_older_than_7_days_is_outdated_cursor(mirror):
    await stream_tests.test_outdated_cursor_is_judged_by_the_next_events_created_at(mirror)


async def test_spec_7_37_slow_consumer_is_consumer_too_slow(mirror):
    await stream_tests.test_a_consumer_that_falls_behind_gets_consumer_too_slow(mirror)


async def test_spec_7_37_plain_get_is_426(mirror):
    await stream_tests.test_plain_get_answers_426(mirror)


async def test_spec_7_37_message_key_order(mirror):
    await mirror.commit([7])
    url = await mirror.start()
    async with ws_connect(f"{url}/export/stream?cursor=0") as ws:
        (frame,) = await _recv(ws, 1)
    msg = orjson.loads(frame)
    assert list(msg) == ["seq", "type", "did", "operation", "cid", "createdAt"]
    assert msg["seq"] == 7 and msg["type"] == "sequenced_op" and "nullified" not in msg
    assert not frame.endswith("\n")


# ---- 38: nullification emits no event; legacy export flips the flag in place ----


def _rec(did: str, op: dict, seq: int, created_ms: int) -> FakeRecord:
    return FakeRecord(did, ref_cid(op), seq, created_ms, op)


async def _export(client: httpx.AsyncClient, after: str) -> list[bytes]:
    r = await client.get("/export", params={"after": after} if after else None)
    assert r.status_code == 200 and r.headers["content-type"] == "application/jsonlines"
    return r.content.split(b"\n") if r.content else []


async def test_spec_7_38_nullification_is_no_new_event_and_flips_the_legacy_flag_in_place(
    mirror, fake_upstream_factory
):
    t0 = (int(time.time() * 1000) - 24 * HOUR_MS) // 1000 * 1000  # recent: the stream backfills it
    rot0, rot1 = k256("s38-0"), k256("s38-1")
    did, gen = genesis(rot0, [rot0, rot1])
    b1 = update(ref_cid(gen), rot1, [rot0, rot1], aka=["at://b1.test"])
    b2 = update(ref_cid(b1), rot1, [rot0, rot1], aka=["at://b2.test"])
    fake = await fake_upstream_factory([_rec(did, gen, 1, t0), _rec(did, b1, 2, t0 + HOUR_MS),
                                        _rec(did, b2, 4, t0 + 2 * HOUR_MS)])
    conn = await asyncpg.connect(**mirror.connect_kwargs)
    url = (await mirror.start()).replace("ws://", "http://")
    try:
        async with upstream(fake) as up:
            await sync_until(Ingestor(conn, up, upstream_name="up"), 4)
        async with httpx.AsyncClient(base_url=url) as client:
            seq_before = await _export(client, "0")
            legacy_before = await _export(client, "")
            assert [orjson.loads(x)["nullified"] for x in legacy_before] == [False, False, False]
            # a recovery by the higher-priority key forks from the genesis: b1 and b2 nullified
            recovery = update(ref_cid(gen), rot0, [rot0, rot1], aka=["at://recovered.test"])
            fake.append([_rec(did, recovery, 9, t0 + 3 * HOUR_MS)])
            async with upstream(fake) as up:
                await sync_until(Ingestor(conn, up, upstream_name="up"), 9)
            seq_after = await _export(client, "0")
            legacy_after = await _export(client, "")
            # sequenced: the earlier lines are unchanged, one new event (the recovery itself), no flag
            assert seq_after[:3] == seq_before
            assert [orjson.loads(x)["seq"] for x in seq_after] == [1, 2, 4, 9]
            assert orjson.loads(seq_after[3])["cid"] == ref_cid(recovery)
            assert all(b"nullified" not in x for x in seq_after)
            # legacy: the same lines in the same places, b1 and b2 now `nullified: true`
            assert [orjson.loads(x)["nullified"] for x in legacy_after] == [False, True, True, False]
            for before, after in zip(legacy_before, legacy_after):
                flipped = before.replace(b'"nullified":false', b'"nullified":true')
                assert after in (before, flipped)
            assert legacy_after[1] == legacy_before[1].replace(b'"nullified":false', b'"nullified":true')
        # the stream from the start: the same four events, nothing for the nullification
        async with ws_connect(f"{url.replace('http://', 'ws://')}/export/stream?cursor=0") as ws:
            frames = await _recv(ws, 4)
            assert [orjson.loads(f)["seq"] for f in frames] == [1, 2, 4, 9]
            assert await _silent(ws)
    finally:
        await conn.close()


# ---- 39: upstream history shrinks ----


async def test_spec_7_39_seq_gaps_are_no_divergence_and_vanished_ops_are_kept_served_and_audited(
    mirror, fake_upstream_factory
):
    t0 = parse_ms("2026-02-01T00:00:00.000Z")
    seqs = [1, 2, 5, 9, 10, 20]  # gaps, as upstream has them
    ops = [genesis(k256(f"s39-{s}"), aka=[f"at://s39-{s}.test"]) for s in seqs]
    records = [_rec(did, op, s, t0 + i * 1000) for i, (s, (did, op)) in enumerate(zip(seqs, ops))]
    fake = await fake_upstream_factory(records)
    conn = await asyncpg.connect(**mirror.connect_kwargs)
    url = (await mirror.start()).replace("ws://", "http://")
    try:
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            await sync_until(ing, 20)
        assert ing.stored == len(seqs)
        assert await conn.fetchval("SELECT count(*) FROM plc_divergence") == 0  # gaps are normal

        # upstream removes a middle op and the tail (admin removal), then goes on
        fake.delete([5, 20])
        (new_did, new_op) = genesis(k256("s39-new"))
        fake.append([_rec(new_did, new_op, 21, t0 + 60_000)])
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            await sync_until(ing, 21)
        assert ing.stored == 1
        assert await conn.fetchval("SELECT count(*) FROM plc_divergence") == 0  # the ingest cannot tell

        async with upstream(fake) as up:
            report = await audit(conn, up, upstream_name="up")
        gone = {5: records[2], 20: records[5]}
        assert [s for s, _, _ in report.vanished] == [5, 20] and report.missing_count == 0
        rows = await conn.fetch("SELECT kind, did, cid, seq FROM plc_divergence ORDER BY seq")
        assert [tuple(r) for r in rows] == [(VANISHED, r.did, r.cid, s) for s, r in gone.items()]

        # kept and served: in our sequenced export, the stream's backfill and the DID's routes
        async with httpx.AsyncClient(base_url=url) as client:
            lines = await _export(client, "0")
            assert [orjson.loads(x)["seq"] for x in lines] == [1, 2, 5, 9, 10, 20, 21]
            for r in gone.values():
                doc = await client.get(f"/{r.did}")
                assert doc.status_code == 200 and doc.json()["id"] == r.did
                log = await client.get(f"/{r.did}/log/audit")
                assert [e["cid"] for e in log.json()] == [r.cid]
        assert await oplog.get_cursor(conn, "up") == oplog.Cursor(21, t0 + 60_000)
    finally:
        await conn.close()
