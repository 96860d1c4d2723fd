"""The ingest leader (plc.sync.leader) on a real PostgreSQL: one lock holder at a time, epochs
that fence commits, takeover after a leader dies or goes silent, and `plc serve`'s ingest loop
handing over between two nodes without losing or doubling an op."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from fake_upstream import fake_upstream_factory, record_from_line  # noqa: F401
from plc import serve_cmd
from plc.metrics import NodeStatus
from plc.store import oplog
from plc.store.migrate import migrate
from plc.sync.leader import LOCK_KEY, Deposed, IngestLeadership, LostLeadership
from test_ingest import assert_matches_truth, corpus

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def db(pg_database):
    conn = await asyncpg.connect(**pg_database.connect_kwargs)
    await migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


def leadership(pg_database, node: str, **kw) -> IngestLeadership:
    kw.setdefault("retry_s", 0.1)
    kw.setdefault("check_s", 0.2)
    kw.setdefault("session_timeout_s", 2.0)
    return IngestLeadership(pg_database.connect_kwargs, node, **kw)


async def until(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def leader_row(conn) -> tuple[int, str]:
    r = await conn.fetchrow("SELECT epoch, node FROM plc_ingest_leader")
    return r[0], r[1]


async def test_one_leader_at_a_time_and_each_takeover_bumps_the_epoch(pg_database, db):
    a, b = leadership(pg_database, "a"), leadership(pg_database, "b")
    try:
        assert await a.campaign() == 1
        assert await leader_row(db) == (1, "a")
        stop = asyncio.Event()
        waiting = asyncio.create_task(b.campaign(stop))
        await asyncio.sleep(0.5)  # b retries every 0.1 s meanwhile
        assert not waiting.done()
        await a.release()
        assert await asyncio.wait_for(waiting, 10) == 2
        assert await leader_row(db) == (2, "b")
        # a campaign that is stopped gives up without the lock
        stop2 = asyncio.Event()
        loser = asyncio.create_task(a.campaign(stop2))
        stop2.set()
        assert await asyncio.wait_for(loser, 5) is None
    finally:
        await a.release()
        await b.release()


async def test_a_deposed_leader_cannot_commit(pg_database, db):
    """The old leader's session is killed (as by a failover or a partition) while it still
    believes it leads: once another node took the lock, its fenced commit rolls back whole,
    and its watch() reports the loss."""
    a, b = leadership(pg_database, "a"), leadership(pg_database, "b")
    try:
        assert await a.campaign() == 1
        # a's fence passes while it leads
        await oplog.commit(db, "up", [], oplog.Cursor(5, None), in_transaction=a.fence)
        assert (await oplog.get_cursor(db, "up")).seq == 5
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
            LOCK_KEY & 0xFFFFFFFF,
        )
        assert await asyncio.wait_for(b.campaign(), 10) == 2
        with pytest.raises(Deposed, match="led epoch 1; the database says epoch 2 of b"):
            await oplog.commit(db, "up", [], oplog.Cursor(6, None), in_transaction=a.fence)
        assert (await oplog.get_cursor(db, "up")).seq == 5  # nothing of the deposed commit
        with pytest.raises(LostLeadership):
            await asyncio.wait_for(a.watch(), 10)
    finally:
        await a.release()
        await b.release()


async def test_a_silent_leader_loses_the_lock_to_the_server(pg_database, db):
    """A leader that stops pinging (paused, partitioned away) holds an idle session: the server
    ends it after session_timeout_s and frees the lock, with no help from the leader."""
    a, b = leadership(pg_database, "a"), leadership(pg_database, "b")
    try:
        assert await a.campaign() == 1  # and a never pings (no watch())
        got = await asyncio.wait_for(b.campaign(), 20)
        assert got == 2
    finally:
        await a.release()
        await b.release()


def test_the_session_timeout_must_cover_two_pings():
    with pytest.raises(ValueError):
        IngestLeadership({}, "x", check_s=1.0, session_timeout_s=2.0)


async def test_two_serving_nodes_hand_over_ingest_without_loss_or_duplicates(
    pg_database, db, fake_upstream_factory
):
    """`plc serve`'s ingest loop on two nodes: exactly one ingests; when its task dies mid-way
    (a killed process), the other takes over from the committed cursor and the database ends
    exactly at the truth."""
    lines = corpus(31, 600)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    kwargs = pg_database.connect_kwargs
    statuses = {n: NodeStatus(ingest=True, upstream=fake.url) for n in ("n1", "n2")}
    stops = {n: asyncio.Event() for n in statuses}
    tasks = {
        n: asyncio.create_task(serve_cmd._ingest_forever(
            serve_cmd.IngestJob(kwargs, fake.url, statuses[n], lambda _d, st=statuses[n]: st.committed(), node=n),
            stops[n], leadership=leadership(pg_database, n),
        ))
        for n in statuses
    }
    try:
        async def one_leads() -> bool:
            return sum(s.ingest_leader for s in statuses.values()) == 1

        await until(one_leads, "no single leader")
        first = next(n for n, s in statuses.items() if s.ingest_leader)
        other = next(n for n in statuses if n != first)

        async def some_progress() -> bool:
            c = await oplog.get_cursor(db, fake.url)
            return c is not None and c.seq is not None and c.seq > 0

        await until(some_progress, "the leader never committed")
        tasks[first].cancel()  # the leader's process dies: its lock session goes with it
        with pytest.raises(asyncio.CancelledError):
            await tasks[first]

        async def other_leads() -> bool:
            return statuses[other].ingest_leader

        await until(other_leads, "the standby never took over")

        async def caught_up() -> bool:
            c = await oplog.get_cursor(db, fake.url)
            return c is not None and c.seq == fake.latest_seq

        await until(caught_up, "the new leader did not catch up", timeout=60)
        assert (await leader_row(db)) == (2, other)
        await assert_matches_truth(db, lines, fake.url)
    finally:
        for n, t in tasks.items():
            stops[n].set()
        for t in tasks.values():
            if not t.done():
                await asyncio.wait_for(t, 20)


async def test_plc_sync_waits_while_another_process_holds_the_ingest_lock(pg_database, db, fake_upstream_factory):
    """`plc sync` is one more candidate: while a node holds the lock it waits and ingests
    nothing; once the lock is free it takes it (next epoch) and ingests."""
    from test_ingest import start_sync, wait_cursor

    lines = corpus(32, 40)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    holder = leadership(pg_database, "a serving node")
    assert await holder.campaign() == 1
    pinging = asyncio.create_task(holder.watch())  # a live holder pings its session
    proc = await start_sync(pg_database.dsn, fake.url)
    try:
        await asyncio.sleep(3)  # plc sync campaigns meanwhile
        assert proc.returncode is None
        assert await oplog.get_cursor(db, fake.url) is None
        pinging.cancel()
        await holder.release()
        await wait_cursor(db, fake.url, proc, lambda seq: seq == fake.latest_seq)
        epoch, node = await leader_row(db)
        assert epoch == 2 and node.startswith("plc sync ")
    finally:
        pinging.cancel()
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        await holder.release()
    assert b"waiting for the ingest lock" in err, err.decode()
    await assert_matches_truth(db, lines, fake.url)


async def test_a_leader_whose_lock_session_dies_stops_and_campaigns_again(pg_database, db, fake_upstream_factory):
    """The lock's session is killed under a leading node: it stops ingesting (standby at once,
    the reason in its status), campaigns again, and leads a new epoch without losing an op."""
    lines = corpus(33, 200)
    fake = await fake_upstream_factory([record_from_line(line) for line, _, _ in lines])
    transitions: list[int | None] = []

    class Recording(NodeStatus):
        def lead(self, epoch: int) -> None:
            transitions.append(epoch)
            super().lead(epoch)

        def standby(self) -> None:
            if self.leader_epoch is not None:
                transitions.append(None)
            super().standby()

    status = Recording(ingest=True, upstream=fake.url)
    stop = asyncio.Event()
    job = serve_cmd.IngestJob(pg_database.connect_kwargs, fake.url, status, lambda _d: status.committed(), node="solo")
    task = asyncio.create_task(serve_cmd._ingest_forever(job, stop, leadership=leadership(pg_database, "solo")))
    try:
        async def leads(epoch: int) -> bool:
            return status.leader_epoch == epoch

        await until(lambda: leads(1), "never led")
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
            LOCK_KEY & 0xFFFFFFFF,
        )
        await until(lambda: leads(2), "never led again")
        assert transitions == [1, None, 2]  # it stood by in between
        assert status.last_error is None or "lost ingest leadership" in status.last_error

        async def caught_up() -> bool:
            c = await oplog.get_cursor(db, fake.url)
            return c is not None and c.seq == fake.latest_seq

        await until(caught_up, "did not catch up", timeout=60)
        await assert_matches_truth(db, lines, fake.url)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
