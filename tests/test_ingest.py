"""plc.sync.ingest on a real PostgreSQL with the fake upstream on loopback: a generated corpus
ends up stored exactly as its truth says, every refusal and upstream fault is in plc_divergence
and never in plc_op, and interrupted runs resume without losing or doubling anything."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from fake_upstream import fake_upstream_factory, record_from_line  # noqa: F401
from plc.store import oplog
from plc.store.migrate import migrate
from plc.sync.ingest import BACKDATED, REJECTED, SEQ_REGRESSION, Ingestor
from plc.tools.generate import generate
from test_upstream import upstream  # noqa: F401 - the fast-retry Upstream, also for importers

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


def corpus(seed: int, dids: int, invalid_rate: float = 0.1) -> list[tuple[bytes, dict, int]]:
    """(line, truth, seq) for every line of a generated sequenced export."""
    return [(line, truth, orjson.loads(line)["seq"])
            for line, truth in generate(seed, dids, fmt="sequenced", invalid_rate=invalid_rate)]


async def connect(pg_dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn)
    return conn


async def run_until(ing: Ingestor, done, timeout: float, stuck) -> None:
    """Run the ingestor until `done()` holds (else fail with `stuck()` after `timeout`); stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(ing.run(stop))
    deadline = time.monotonic() + timeout
    while not done():
        if task.done():
            task.result()
            raise AssertionError("ingestor ended early")
        assert time.monotonic() < deadline, stuck()
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)


async def sync_until(ing: Ingestor, target_seq: int, timeout: float = 60) -> None:
    """Run the ingestor until its committed cursor reaches `target_seq`, then stop it."""
    await run_until(ing, lambda: (ing.cursor or 0) >= target_seq, timeout,
                    lambda: f"cursor stuck at {ing.cursor}, want {target_seq}")


async def stored_ops(conn) -> list[tuple[str, str, bool, int | None]]:
    rows = await conn.fetch(
        "SELECT d.did, o.cid, o.nullified, o.seq FROM plc_op o JOIN plc_did d ON d.id = o.did_id "
        "ORDER BY o.seq"
    )
    return [(oplog.did_text(r[0]), oplog.cid_text(r[1]), r[2], r[3]) for r in rows]


async def divergence_rows(conn) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT kind, did, cid, seq, reason, detail, raw FROM plc_divergence ORDER BY id")


async def assert_matches_truth(conn, lines, upstream_name: str = "up") -> None:
    """plc_op holds exactly the truth's valid ops (with its nullified flags and their seqs), and
    every invalid op but identical duplicates is a `rejected` divergence with the truth's reason."""
    want_ops = [(t["did"], t["cid"], t["nullified"], seq) for _, t, seq in lines if t["valid"]]
    assert await stored_ops(conn) == want_ops
    want_rejected = collections.Counter(
        (t["did"], t["cid"], seq, t["reason"], line) for line, t, seq in lines
        if not t["valid"] and t["reason"] != "duplicate"
    )
    rows = await divergence_rows(conn)
    got = collections.Counter((r["did"], r["cid"], r["seq"], r["reason"], r["raw"]) for r in rows)
    assert got == want_rejected
    assert {r["kind"] for r in rows} <= {REJECTED}
    assert all(r["detail"] for r in rows)
    cursor = await oplog.get_cursor(conn, upstream_name)
    assert cursor is not None and cursor.seq == lines[-1][2]


async def test_sync_stores_exactly_the_valid_ops_and_records_every_rejection(pg_dsn, fake_upstream_factory):
    lines = corpus(7, 300)
    assert any(not t["valid"] and t["reason"] == "duplicate" for _, t, _ in lines)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            t0 = time.perf_counter()
            await sync_until(ing, fake.latest_seq)
            elapsed = time.perf_counter() - t0
        print(f"ingested {len(lines)} lines in {elapsed:.2f}s: {len(lines) / elapsed:.0f} ops/s")
        await assert_matches_truth(conn, lines)
        invalid = collections.Counter(t["reason"] for _, t, _ in lines if not t["valid"])
        assert ing.accepted == sum(t["valid"] for _, t, _ in lines)
        assert ing.skipped_duplicates == invalid.pop("duplicate")
        assert dict(ing.rejected) == dict(invalid)
        assert dict(ing.divergences) == {REJECTED: sum(invalid.values())}

        # a second run stores nothing new and records nothing new
        before_ops, before_div = await stored_ops(conn), await divergence_rows(conn)
        async with upstream(fake) as up:
            again = Ingestor(conn, up, upstream_name="up")
            stop = asyncio.Event()
            task = asyncio.create_task(again.run(stop))
            await asyncio.sleep(0.5)
            stop.set()
            assert await asyncio.wait_for(task, 10) == 0
        assert again.cursor == fake.latest_seq and again.accepted == 0
        assert await stored_ops(conn) == before_ops
        assert await divergence_rows(conn) == before_div
    finally:
        await conn.close()


async def test_max_batches_is_a_bound_even_when_more_batches_are_queued(pg_database, fake_upstream_factory):
    """run(max_batches=N) makes at most N commits: with batches queued behind the one in flight, it
    commits that one and stops instead of taking (and then committing) one more group."""
    lines = corpus(9, 150)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_database.dsn)
    try:
        for workers in (0, 1):
            for _ in range(3):
                async with upstream(fake, page_count=10) as up:
                    ing = Ingestor(conn, up, upstream_name=f"up{workers}", batch_max=10, workers=workers,
                                   connect_kwargs=pg_database.connect_kwargs)  # fmt: skip
                    assert await ing.run(max_batches=1) == 1
    finally:
        await conn.close()


async def test_interrupted_runs_resume_to_the_same_state(pg_dsn, fake_upstream_factory):
    lines = corpus(8, 150)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    try:
        commits = 0
        for _ in range(3):  # three short runs, each a fresh Ingestor and Upstream
            async with upstream(fake, page_count=40) as up:
                ing = Ingestor(conn, up, upstream_name="up", batch_max=40)
                commits += await ing.run(max_batches=2)
            cursor = await oplog.get_cursor(conn, "up")
            assert cursor.seq == ing.cursor < fake.latest_seq
        assert commits == 6
        async with upstream(fake, page_count=40) as up:
            await sync_until(Ingestor(conn, up, upstream_name="up", batch_max=40), fake.latest_seq)
        await assert_matches_truth(conn, lines)
        # ops seen again (a cursor moved back by hand) are skipped: nothing is stored twice
        ops = await stored_ops(conn)
        await conn.execute("UPDATE plc_cursor SET seq = seq - 200")
        async with upstream(fake, page_count=40) as up:
            again = Ingestor(conn, up, upstream_name="up", batch_max=40)
            await sync_until(again, fake.latest_seq)
        assert await stored_ops(conn) == ops and again.stored == 0
        replayed = [t for _, t, seq in lines if seq > lines[-1][2] - 200]
        assert again.skipped_duplicates == sum(t["valid"] for t in replayed)
    finally:
        await conn.close()


async def test_upstream_faults_are_divergences_never_ops(pg_dsn, fake_upstream_factory):
    lines = corpus(9, 40, invalid_rate=0.0)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    by_seq = {seq: t for _, t, seq in lines}
    seqs = sorted(by_seq)
    dup, bad, back = seqs[5], seqs[9], seqs[14]
    fake.duplicated.add(dup)
    fake.replaced[bad] = b'{"seq":%d,"type":"sequenced_op","did":"did:plc:x"}' % bad
    fake.seq_shown[back] = seqs[2]
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake, page_count=30) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            await sync_until(ing, fake.latest_seq)
        ops = await stored_ops(conn)
        stored_keys = collections.Counter((did, cid) for did, cid, _, _ in ops)
        assert all(n == 1 for n in stored_keys.values())
        assert [s for *_, s in ops].count(dup) == 1
        assert (by_seq[bad]["did"], by_seq[bad]["cid"]) not in stored_keys
        assert (by_seq[back]["did"], by_seq[back]["cid"]) not in stored_keys
        rows = await divergence_rows(conn)
        regressions = [r for r in rows if r["kind"] == SEQ_REGRESSION]
        assert sorted(r["seq"] for r in regressions) == sorted([dup, seqs[2]])
        assert {r["cid"] for r in regressions} == {by_seq[dup]["cid"], by_seq[back]["cid"]}
        malformed = [r for r in rows if r["kind"] == REJECTED and r["reason"].startswith("malformed:")]
        assert [(r["seq"], r["raw"]) for r in malformed] == [(bad, fake.replaced[bad])]
        # ops that built on the two missing ones are refused, never stored
        for r in rows:
            if r["kind"] == REJECTED and r["did"] is not None:
                assert (r["did"], r["cid"]) not in stored_keys
        assert ing.divergences[SEQ_REGRESSION] == 2
    finally:
        await conn.close()


async def test_backdated_ops_are_recorded_and_still_stored(pg_dsn, fake_upstream_factory):
    lines = corpus(10, 30, invalid_rate=0.0)
    late_did = lines[0][1]["did"]  # the DID of the very first op: its ops are old
    held = [line for line, t, _ in lines if t["did"] == late_did]
    served = [record_from_line(line) for line, t, _ in lines if t["did"] != late_did]
    fake = await fake_upstream_factory(served)
    conn = await connect(pg_dsn)
    try:
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up")
            stop = asyncio.Event()
            task = asyncio.create_task(ing.run(stop))
            while (ing.cursor or 0) < fake.latest_seq:
                await asyncio.sleep(0.02)
            high = ing.high_created_ms
            late = [dataclasses.replace(record_from_line(line), seq=fake.latest_seq + 1 + i)
                    for i, line in enumerate(held)]
            fake.append(late)  # arrives live on the stream
            while (ing.cursor or 0) < late[-1].seq:
                assert not task.done()
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, 10)
        rows = await divergence_rows(conn)
        assert [(r["kind"], r["seq"]) for r in rows] == [(BACKDATED, r.seq) for r in late
                                                         if r.created_ms < high - 10 * 60 * 1000]
        assert len(rows) == len(late)
        ops = await stored_ops(conn)
        assert [(d, c) for d, c, _, _ in ops if d == late_did] == [(r.did, r.cid) for r in late]
        assert (await oplog.get_cursor(conn, "up")).created_at == high
    finally:
        await conn.close()


async def test_commit_writes_divergences_in_its_transaction(pg_dsn):
    conn = await connect(pg_dsn)
    try:
        d = oplog.Divergence(REJECTED, "did:plc:x", None, 3, "malformed:x", "bad line", b"\x00raw")
        await oplog.commit(conn, "up", [], oplog.Cursor(3, None), now_ms=5, divergences=[d])
        rows = await conn.fetch(
            "SELECT kind, upstream, did, seq, reason, detail, raw, observed_at FROM plc_divergence"
        )
        want = (REJECTED, "up", "did:plc:x", 3, "malformed:x", "bad line", b"\x00raw", 5)
        assert [tuple(r) for r in rows] == [want]
        assert await oplog.get_cursor(conn, "up") == oplog.Cursor(3, None)
    finally:
        await conn.close()


# ---- the `plc sync` command ----


def plc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "plc", *args]


async def start_sync(pg_dsn: str, url: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return await asyncio.create_subprocess_exec(
        *plc_cmd("sync", "--database-url", pg_dsn, "--upstream", url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
    )


async def wait_cursor(conn, name: str, proc, want, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        cursor = await oplog.get_cursor(conn, name)
        if cursor is not None and want(cursor.seq):
            return cursor.seq
        if proc.returncode is not None:
            raise AssertionError(f"plc sync exited {proc.returncode}: {(await proc.stderr.read()).decode()}")
        assert time.monotonic() < deadline, f"cursor stuck at {cursor}"
        await asyncio.sleep(0.05)


async def test_plc_sync_killed_with_sigkill_resumes_to_the_same_state(pg_dsn, fake_upstream_factory):
    lines = corpus(11, 2000)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    try:
        proc = await start_sync(pg_dsn, fake.url)
        mid = await wait_cursor(conn, fake.url, proc, lambda seq: seq > 0)
        proc.kill()  # SIGKILL, possibly in the middle of a transaction
        await proc.wait()
        assert mid < fake.latest_seq, "the corpus was ingested before the kill; make it larger"
        proc = await start_sync(pg_dsn, fake.url)
        await wait_cursor(conn, fake.url, proc, lambda seq: seq == fake.latest_seq)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        assert b"stopped at cursor" in err and b"Traceback" not in err
        await assert_matches_truth(conn, lines, fake.url)
    finally:
        await conn.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(plc_cmd(*args), capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def test_plc_sync_refuses_pending_migrations(pg_dsn):
    out = run_cli("sync", "--database-url", pg_dsn, "--upstream", "http://127.0.0.1:9")
    assert out.returncode == 1
    assert "run `plc migrate`" in out.stderr and "Traceback" not in out.stderr


def test_plc_sync_unreachable_database_and_bad_upstream_are_one_line_errors():
    nowhere = "postgresql://nobody@127.0.0.1:9/x"
    out = run_cli("sync", "--database-url", nowhere, "--upstream", "http://127.0.0.1:9")
    assert out.returncode == 1 and "plc sync: error: database" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("sync", "--database-url", nowhere, "--upstream", "ftp://x")
    assert out.returncode == 1 and "must be an http(s) URL" in out.stderr


async def test_plc_sync_upstream_refusal_is_a_one_line_error(pg_dsn, fake_upstream_factory):
    fake = await fake_upstream_factory([])
    conn = await connect(pg_dsn)
    await conn.close()
    proc = await start_sync(pg_dsn, fake.url + "/nowhere")  # 404: not retried
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"plc sync: error: upstream" in err and b"404" in err and b"Traceback" not in err


async def test_validation_workers_store_exactly_what_the_in_process_path_stores(
    pg_dsn, pg_database, fake_upstream_factory
):
    """Two validation processes (records sharded by DID), small upstream pages so several
    groups are in flight and commits overlap validation: the same truth state, the same
    counters; the workers are gone afterwards."""
    lines = corpus(21, 400)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    committed: list[set[str]] = []
    try:
        async with upstream(fake, page_count=97) as up:
            ing = Ingestor(conn, up, upstream_name="up", workers=2, batch_max=150,
                           connect_kwargs=pg_database.connect_kwargs, on_commit=committed.append)
            await sync_until(ing, fake.latest_seq, timeout=90)
        await assert_matches_truth(conn, lines)
        invalid = collections.Counter(t["reason"] for _, t, _ in lines if not t["valid"])
        assert ing.accepted == sum(t["valid"] for _, t, _ in lines)
        assert ing.skipped_duplicates == invalid.pop("duplicate")
        assert dict(ing.rejected) == dict(invalid)
        assert ing._pool is None  # run() stopped its workers
        assert len(committed) == ing.batches > 1
        assert set().union(*committed) == {t["did"] for _, t, _ in lines if t["valid"]}
    finally:
        await conn.close()


async def test_a_failing_fence_stores_nothing_and_stops_the_ingestor(pg_dsn, fake_upstream_factory):
    """The leadership fence runs inside the commit transaction: when it raises, neither ops nor
    the cursor are written, and the error ends `run` (a deposed leader stops at once)."""
    lines = corpus(22, 50)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    calls = 0

    class Deposed(Exception):
        pass

    async def fence(c) -> None:
        nonlocal calls
        calls += 1
        assert c is conn and c.is_in_transaction()
        await c.execute("SELECT 1")
        raise Deposed("another node holds the ingest lock")

    try:
        async with upstream(fake) as up:
            ing = Ingestor(conn, up, upstream_name="up", fence=fence)
            with pytest.raises(Deposed):
                await asyncio.wait_for(ing.run(), 30)
        assert calls == 1
        assert await conn.fetchval("SELECT count(*) FROM plc_op") == 0
        assert await oplog.get_cursor(conn, "up") is None
        assert ing.cursor == 0 and ing.accepted == 0
    finally:
        await conn.close()


async def test_the_ingest_reconciles_ops_pending_upstream(pg_dsn, fake_upstream_factory):
    """An op this mirror forwarded (kept in plc_pending) is deleted from plc_pending in the very
    commit that stores it when the upstream publishes it; other pending rows stay."""
    from plc.core.chain import REPLAY, check_op
    from plc.store import pending

    lines = corpus(23, 30, invalid_rate=0)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    conn = await connect(pg_dsn)
    try:
        first = orjson.loads(lines[0][0])
        acc = check_op(None, first["did"], first["operation"], mode=REPLAY,
                       created_at=1_700_000_000_000, cid=first["cid"])
        assert await pending.add(conn, acc, 1_700_000_000_000, fake.url)
        other = dataclasses.replace(acc, did="did:plc:" + "a" * 24)
        assert await pending.add(conn, other, 1_700_000_000_000, fake.url)
        async with upstream(fake) as up:
            await sync_until(Ingestor(conn, up, upstream_name="up"), fake.latest_seq)
        left = await conn.fetch("SELECT did, cid FROM plc_pending")
        assert [tuple(r) for r in left] == [(other.did, other.cid)]
    finally:
        await conn.close()


async def test_closing_the_workers_never_waits_for_a_stuck_one(pg_dsn, pg_database):
    """A worker stuck on a query (here: behind a lock; in production: a dead connection in a
    partition) must not keep the ingest from stopping: close() returns at once and the worker
    processes go away."""
    from plc.sync.upstream import parse_line
    from plc.sync.validation import ValidatorPool

    lines = corpus(24, 5, invalid_rate=0)
    conn = await connect(pg_dsn)
    pool = ValidatorPool(1, pg_database.connect_kwargs)
    try:
        await pool.validate([parse_line(lines[0][0])])  # the worker is up and connected
        procs = [p for ex in pool._executors for p in ex._processes.values()]
        async with conn.transaction():
            await conn.execute("LOCK TABLE plc_op IN ACCESS EXCLUSIVE MODE")
            stuck = asyncio.create_task(pool.validate([parse_line(lines[1][0])]))  # a new DID: loads
            await asyncio.sleep(0.5)
            assert not stuck.done()
            stuck.cancel()
            await asyncio.wait_for(asyncio.to_thread(pool.close), 10)
        for p in procs:
            await asyncio.wait_for(asyncio.to_thread(p.join, 10), 15)
            assert not p.is_alive()
    finally:
        pool.close()
        await conn.close()
