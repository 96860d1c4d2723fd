"""plc.sync.audit and `plc audit` on a real PostgreSQL with the fake upstream on loopback: ops
upstream stops serving are recorded once as `vanished` and kept; ops upstream serves that we
lack are reported as missing and not stored; the audit resumes where it stopped."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fake_upstream import fake_upstream_factory, record_from_line  # noqa: F401
from plc.sync.audit import VANISHED, AuditError, audit, cursor_name
from plc.store import oplog
from test_ingest import connect, corpus, run_cli, stored_ops, sync_until, upstream
from plc.sync.ingest import Ingestor

pytestmark = pytest.mark.timeout(120)


async def vanished_rows(conn) -> list[tuple[str, str, int]]:
    rows = await conn.fetch(
        "SELECT did, cid, seq, detail, raw FROM plc_divergence WHERE kind = $1 ORDER BY id", VANISHED
    )
    assert all(r["detail"] and r["raw"] is None for r in rows)
    return [(r["did"], r["cid"], r["seq"]) for r in rows]


async def synced(pg_dsn, fake_upstream_factory, seed: int, dids: int):
    lines = corpus(seed, dids, invalid_rate=0.0)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    async with upstream(fake) as up:
        await sync_until(Ingestor(conn, up, upstream_name="up"), fake.latest_seq)
    return fake, conn, lines


async def test_vanished_ops_are_recorded_once_and_kept(pg_dsn, fake_upstream_factory):
    fake, conn, lines = await synced(pg_dsn, fake_upstream_factory, 31, 60)
    try:
        before = await stored_ops(conn)
        seqs = [s for _, _, _, s in before]
        gone = [seqs[3], seqs[4], seqs[40], seqs[-2], seqs[-1]]  # a run, a single, the tail
        fake.delete(gone)
        key = {s: (d, c) for d, c, _, s in before}
        async with upstream(fake, page_count=25) as up:
            report = await audit(conn, up, upstream_name="up")
        assert report.complete and report.start == 0 and report.end == seqs[-1]
        assert report.vanished == [(s, *key[s]) for s in gone]
        assert report.vanished_recorded == len(gone)
        assert report.missing_count == 0 and report.mismatched_count == 0
        assert report.checked == len(seqs) and report.served == len(seqs) - len(gone)
        assert report.pages > 2
        assert await vanished_rows(conn) == [(*key[s], s) for s in gone]
        assert await stored_ops(conn) == before  # nothing deleted on upstream's word

        # resume: nothing left to audit; a full re-audit finds them again but records nothing new
        async with upstream(fake, page_count=25) as up:
            again = await audit(conn, up, upstream_name="up")
            assert again.pages == 0 and again.vanished == [] and again.complete
            full = await audit(conn, up, upstream_name="up", start=0)
        assert full.vanished == report.vanished and full.vanished_recorded == 0
        assert await vanished_rows(conn) == [(*key[s], s) for s in gone]
        assert (await oplog.get_cursor(conn, cursor_name("up"))).seq == seqs[-1]
    finally:
        await conn.close()


async def test_audit_resumes_page_by_page(pg_dsn, fake_upstream_factory):
    fake, conn, lines = await synced(pg_dsn, fake_upstream_factory, 32, 40)
    try:
        before = await stored_ops(conn)
        seqs = [s for _, _, _, s in before]
        gone = [seqs[1], seqs[30], seqs[-1]]
        fake.delete(gone)
        found = []
        positions = []
        async with upstream(fake, page_count=20) as up:
            while True:
                part = await audit(conn, up, upstream_name="up", max_pages=1)
                found += part.vanished
                positions.append(part.position)
                if part.complete:
                    break
                assert part.pages == 1
        assert positions == sorted(positions) and len(positions) > 2
        assert [s for s, _, _ in found] == gone
        assert [s for *_, s in await vanished_rows(conn)] == gone
        # a stop event ends a run before the first page
        stop = asyncio.Event()
        stop.set()
        async with upstream(fake, page_count=20) as up:
            stopped = await audit(conn, up, upstream_name="up", start=0, stop=stop)
        assert stopped.pages == 0 and not stopped.complete
    finally:
        await conn.close()


async def test_ops_upstream_serves_that_we_lack_are_reported_missing_not_stored(
    pg_dsn, fake_upstream_factory
):
    lines = corpus(33, 40, invalid_rate=0.0)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    seqs = [s for _, _, s in lines]
    hidden = {seqs[5], seqs[20]}
    fake.dropped |= hidden  # never served while we sync
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake) as up:
            await sync_until(Ingestor(conn, up, upstream_name="up"), fake.latest_seq)
        held = {s for *_, s in await stored_ops(conn)}
        assert hidden.isdisjoint(held)
        count = await conn.fetchval("SELECT count(*) FROM plc_op")
        fake.dropped.clear()
        async with upstream(fake, page_count=15) as up:
            report = await audit(conn, up, upstream_name="up")
        lacking = [s for s in seqs if s not in held]
        assert [s for s, _, _ in report.missing] == lacking and report.missing_count == len(lacking)
        assert hidden <= set(lacking)
        assert report.vanished == []
        assert await conn.fetchval("SELECT count(*) FROM plc_op") == count
        assert await vanished_rows(conn) == []
    finally:
        await conn.close()


async def test_a_legacy_upstream_cannot_be_audited_by_seq(pg_dsn, fake_upstream_factory):
    fake, conn, _ = await synced(pg_dsn, fake_upstream_factory, 34, 10)
    try:
        fake.legacy_only = True
        async with upstream(fake) as up:
            with pytest.raises(AuditError, match="without seq"):
                await audit(conn, up, upstream_name="up")
    finally:
        await conn.close()


async def test_plc_audit_command(pg_dsn, fake_upstream_factory):
    fake, conn, _ = await synced(pg_dsn, fake_upstream_factory, 35, 30)
    try:
        before = await stored_ops(conn)
        gone = before[7][3]
        fake.delete([gone])
        out = await asyncio.to_thread(run_cli, "audit", "--database-url", pg_dsn, "--upstream", fake.url)
        assert out.returncode == 0, out.stderr
        report = orjson.loads(out.stdout)
        assert report["complete"] and report["vanished_recorded"] == 1
        assert report["vanished"] == [{"seq": gone, "did": before[7][0], "cid": before[7][1]}]
        assert "plc audit: audited seqs 0.." in out.stderr and "Traceback" not in out.stderr
        out = await asyncio.to_thread(run_cli, "audit", "--database-url", pg_dsn, "--upstream", fake.url,
                                      "--from", "0", "--log-format", "json")
        assert out.returncode == 0, out.stderr
        assert orjson.loads(out.stdout)["vanished_recorded"] == 0
        assert all(orjson.loads(line)["level"] for line in out.stderr.splitlines())
        assert await stored_ops(conn) == before
    finally:
        await conn.close()


def test_plc_audit_bad_input_is_a_clear_error():
    out = run_cli("audit", "--from", "-1")
    assert out.returncode == 2 and "--from: must be at least 0" in out.stderr
    nowhere = "postgresql://nobody@127.0.0.1:9/x"
    out = run_cli("audit", "--database-url", nowhere, "--upstream", "http://127.0.0.1:9")
    assert out.returncode == 1 and "plc audit: error: database" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("audit", "--database-url", nowhere, "--upstream", "ftp://x")
    assert out.returncode == 1 and "must be an http(s) URL" in out.stderr
