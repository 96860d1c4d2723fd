"""plc.sync.ingest in legacy timestamp mode (an upstream without seq) on a real PostgreSQL with
the fake upstream serving only legacy /export: the generated corpus ends up stored as its truth
says (seq NULL), a restart resumes from the stored createdAt without doubling anything, the
mode is detected, and upstream `nullified` flags are compared with ours (ours wins)."""

from __future__ import annotations

import asyncio
import collections

import asyncpg
import pytest

from fake_upstream import FakeRecord, PageFault, fake_upstream_factory  # noqa: F401
from plc.api.doccache import ChangeWatcher, DocCache
from plc.api.export import legacy_rows
from plc.core.jsonfmt import format_ms, parse_ms
from plc.store import oplog
from plc.sync.ingest import LEGACY, NULLIFIED_MISMATCH, REJECTED, SEQUENCED, Ingestor
from plc.tools.generate import generate
from plcdata import genesis, k256, ref_cid, update
from test_ingest import connect, corpus, divergence_rows, run_until, sync_until, upstream
from fake_upstream import record_from_line

pytestmark = pytest.mark.timeout(120)
HOUR_MS = 3600 * 1000


def legacy_corpus(seed: int, dids: int, invalid_rate: float = 0.1) -> list[tuple[FakeRecord, dict]]:
    """(record, truth) for every line of a generated legacy export; the record's `nullified` is
    upstream's current flag (the truth's)."""
    out = []
    for i, (line, truth) in enumerate(generate(seed, dids, fmt="legacy", invalid_rate=invalid_rate)):
        rec = record_from_line(line.replace(b'"createdAt"', b'"seq":%d,"createdAt"' % (i + 1), 1))
        out.append((rec, truth))
    return out


async def sync_legacy_until(ing: Ingestor, target_ms: int, timeout: float = 60) -> None:
    """Run the ingestor until its committed high-water createdAt reaches `target_ms`; stop it."""
    await run_until(ing, lambda: (ing.high_created_ms or 0) >= target_ms, timeout,
                    lambda: f"stuck at {ing.high_created_ms}, want {target_ms}")


async def stored(conn) -> list[tuple[str, str, bool, int | None]]:
    rows = await conn.fetch(
        "SELECT d.did, o.cid, o.nullified, o.seq FROM plc_op o JOIN plc_did d ON d.id = o.did_id "
        "ORDER BY o.created_at, o.cid"
    )
    return [(oplog.did_text(r[0]), oplog.cid_text(r[1]), r[2], r[3]) for r in rows]


async def assert_legacy_truth(conn, items, name: str) -> None:
    want = sorted(((t["did"], t["cid"], t["nullified"], None) for r, t in items if t["valid"]),
                  key=lambda x: [r.created_ms for r, t in items if t["cid"] == x[1]][0])
    got = await stored(conn)
    assert sorted(got) == sorted(want)
    assert all(seq is None for *_, seq in got)
    rows = await divergence_rows(conn)
    want_rejected = {(t["did"], t["cid"], t["reason"]) for r, t in items
                     if not t["valid"] and t["reason"] != "duplicate"}
    assert {(r["did"], r["cid"], r["reason"]) for r in rows if r["kind"] == REJECTED} == want_rejected
    assert {r["kind"] for r in rows} <= {REJECTED}, [dict(r) for r in rows if r["kind"] != REJECTED]
    cursor = await oplog.get_cursor(conn, name)
    assert cursor.seq is None and cursor.created_at == max(r.created_ms for r, _ in items)


async def test_a_legacy_only_upstream_is_synced_to_the_truth(pg_dsn, fake_upstream_factory):
    items = legacy_corpus(41, 120)
    assert any(t["nullified"] for _, t in items) and any(not t["valid"] for _, t in items)
    fake = await fake_upstream_factory([r for r, _ in items])
    fake.legacy_only = True
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake, page_count=50) as up:
            ing = Ingestor(conn, up, upstream_name="up")  # mode auto
            await sync_legacy_until(ing, max(r.created_ms for r, _ in items))
        assert ing.active_mode == LEGACY
        assert fake.requests_of("stream") == []
        await assert_legacy_truth(conn, items, "up")
        assert ing.divergences.get(NULLIFIED_MISMATCH, 0) == 0
        # seq NULL: in our legacy /export (with our flags), not in the sequenced one nor the stream
        assert await oplog.export_rows(conn, 0, 1000) == []
        rows = await legacy_rows(conn, None, 1000)
        assert [(r.did, r.cid, r.nullified) for r in rows] == [(d, c, n) for d, c, n, _ in await stored(conn)]
    finally:
        await conn.close()


async def test_a_legacy_commit_clears_every_nodes_document_cache(pg_dsn, fake_upstream_factory):
    """Ops without seq are invisible to the ChangeWatcher's seq feed: a legacy cursor that moves
    clears the whole cache (plc.api.doccache)."""
    items = legacy_corpus(44, 10, invalid_rate=0.0)
    fake = await fake_upstream_factory([r for r, _ in items[:-1]])
    fake.legacy_only = True
    conn = await connect(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    ticks = iter(range(1, 10**6))
    try:
        async with upstream(fake) as up:
            await sync_legacy_until(Ingestor(conn, up, upstream_name="up", clock=lambda: next(ticks)),
                                    items[-2][0].created_ms)
        cache = DocCache()
        watcher = ChangeWatcher(pool, cache)
        await watcher.poll()
        did = items[0][1]["did"]
        cache.put(did, cache.token(), await oplog.did_rows(conn, did))
        await watcher.poll()
        assert cache.get(did) is not None  # nothing moved: kept
        fake.append([items[-1][0]])
        async with upstream(fake) as up:
            await sync_legacy_until(Ingestor(conn, up, upstream_name="up", clock=lambda: next(ticks)),
                                    items[-1][0].created_ms)
        await watcher.poll()
        assert len(cache) == 0
    finally:
        await pool.close()
        await conn.close()


async def test_a_restart_resumes_from_the_stored_created_at_without_duplicates(pg_dsn, fake_upstream_factory):
    items = legacy_corpus(42, 100)
    fake = await fake_upstream_factory([r for r, _ in items])
    fake.legacy_only = True
    conn = await connect(pg_dsn)
    try:
        for _ in range(2):  # two short runs, each a fresh Ingestor and Upstream
            async with upstream(fake, page_count=30) as up:
                ing = Ingestor(conn, up, upstream_name="up", batch_max=30)
                assert await ing.run(max_batches=2) == 2
            cursor = await oplog.get_cursor(conn, "up")
            assert cursor.seq is None and cursor.created_at == ing.high_created_ms
        n_requests = len(fake.requests)
        async with upstream(fake, page_count=30) as up:
            ing = Ingestor(conn, up, upstream_name="up", batch_max=30)
            await sync_legacy_until(ing, max(r.created_ms for r, _ in items))
        first = fake.requests[n_requests]  # no mode probe: the stored cursor is a legacy one
        assert first.query["after"] == format_ms(cursor.created_at - 1000)
        assert ing.active_mode == LEGACY and ing.skipped_duplicates >= 1  # the overlap re-read
        await assert_legacy_truth(conn, items, "up")
        keys = collections.Counter((d, c) for d, c, _, _ in await stored(conn))
        assert set(keys.values()) == {1}
    finally:
        await conn.close()


async def test_mode_detection_and_forced_modes(pg_dsn, fake_upstream_factory):
    lines = corpus(43, 10, invalid_rate=0.0)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake) as up:  # seq on the first page: sequenced
            ing = Ingestor(conn, up, upstream_name="seq")
            await sync_until(ing, fake.latest_seq)
        assert ing.active_mode == SEQUENCED
        assert fake.requests[0].query == {"after": "0", "count": "10"}
        # the same upstream forced into legacy mode under another name: nothing new, no seq asked
        async with upstream(fake) as up:
            forced = Ingestor(conn, up, upstream_name="leg", mode=LEGACY)
            await sync_legacy_until(forced, max(parse_ms(r.created_at) for r in fake.records))
        assert forced.active_mode == LEGACY and forced.stored == 0
        assert (await oplog.get_cursor(conn, "leg")).seq is None
        # an upstream that refuses a numeric `after` (400) is a legacy one
        fake.page_faults.append(PageFault(status=400, body='{"message":"Invalid after parameter"}'))
        async with upstream(fake) as up:
            probe = Ingestor(conn, up, upstream_name="probe")
            assert await probe.choose_mode() == LEGACY
        with pytest.raises(ValueError):
            Ingestor(conn, None, upstream_name="x", mode="stream")
    finally:
        await conn.close()


# ---- nullified flags (spec §7 item 38) ----


class Chain:
    """One DID: genesis by `rot0` with rotation keys [rot0, rot1]; updates by rot1; a recovery by
    rot0 (higher priority) nullifies them."""

    def __init__(self, name: str, t0: int):
        self.rot0, self.rot1 = k256(f"{name}-0"), k256(f"{name}-1")
        self.did, self.genesis = genesis(self.rot0, [self.rot0, self.rot1])
        self.t0 = t0

    def update(self, prev: dict, signer, aka: str) -> dict:
        return update(ref_cid(prev), signer, [self.rot0, self.rot1], aka=[aka])


def rec(did: str, op: dict, seq: int, created_ms: int, nullified: bool = False) -> FakeRecord:
    return FakeRecord(did, ref_cid(op), seq, created_ms, op, nullified)


async def test_nullified_flags_flip_in_place_and_contradictions_are_recorded(pg_dsn, fake_upstream_factory):
    t0 = parse_ms("2025-01-01T00:00:00.000Z")
    a = Chain("flag-a", t0)
    b1 = a.update(a.genesis, a.rot1, "at://b1.test")
    gen = rec(a.did, a.genesis, 1, t0)
    r_b1 = rec(a.did, b1, 2, t0 + HOUR_MS)
    fake = await fake_upstream_factory([gen, r_b1])
    fake.legacy_only = True
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake) as up:
            await sync_legacy_until(Ingestor(conn, up, upstream_name="up"), r_b1.created_ms)
        # a recovery by the higher-priority key nullifies b1; upstream flips b1's flag in place
        recovery = a.update(a.genesis, a.rot0, "at://recovered.test")
        r_rec = rec(a.did, recovery, 3, t0 + 2 * HOUR_MS)
        fake.append([r_rec])
        r_b1.nullified = True
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            await sync_legacy_until(ing, r_rec.created_ms)
        assert ing.stored == 1  # the recovery only: a flipped flag is no new op
        assert [(c, n) for d, c, n, _ in await stored(conn)] == [
            (gen.cid, False), (r_b1.cid, True), (r_rec.cid, False)]
        assert await divergence_rows(conn) == []

        # upstream now says b1 is live although it served the recovery: ours wins, recorded
        r_b1.nullified = False
        await conn.execute("UPDATE plc_cursor SET created_at = $1", t0 + 1)  # re-read b1's line
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            await sync_legacy_until(ing, r_rec.created_ms)
        rows = await divergence_rows(conn)
        assert [(r["kind"], r["did"], r["cid"]) for r in rows] == [(NULLIFIED_MISMATCH, a.did, r_b1.cid)]
        assert "upstream says nullified=false, ours is nullified=true" in rows[0]["detail"]
        assert rows[0]["raw"] == r_b1.legacy_line()
        assert [n for _, _, n, _ in await stored(conn)] == [False, True, False]  # nothing changed

        # upstream says an op of another DID is nullified, and no nullifying op ever comes: once our
        # high-water createdAt is 72 h (+ the backdating tolerance) past it, it is recorded
        c = Chain("flag-c", t0)
        r_c = rec(c.did, c.genesis, 4, t0 + 3 * HOUR_MS, nullified=True)
        later = [rec(d, op, 5 + i, t0 + (80 + i) * HOUR_MS)
                 for i, (d, op) in enumerate(genesis(k256(f"later-{i}")) for i in range(3))]
        fake.append([r_c])
        async with upstream(fake, page_count=1) as up:
            ing = Ingestor(conn, up, upstream_name="up", batch_max=1)
            stop = asyncio.Event()
            task = asyncio.create_task(ing.run(stop))
            while (ing.high_created_ms or 0) < r_c.created_ms:
                await asyncio.sleep(0.02)
            assert ing.divergences.get(NULLIFIED_MISMATCH, 0) == 0  # it may still come: wait
            fake.append(later)
            while (ing.high_created_ms or 0) < later[-1].created_ms:
                assert not task.done()
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, 10)
        rows = await divergence_rows(conn)
        assert [(r["kind"], r["cid"]) for r in rows][1:] == [(NULLIFIED_MISMATCH, r_c.cid)]
        assert "upstream says nullified=true, ours is nullified=false" in rows[1]["detail"]
        assert not (await stored(conn))[3][2]  # c's genesis: still live here
    finally:
        await conn.close()
