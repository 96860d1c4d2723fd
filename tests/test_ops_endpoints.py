"""The operational endpoints: /metrics (Prometheus text), /-/ready and /-/status, over the ASGI
app (httpx.ASGITransport, lifespan running) on a real PostgreSQL; the ingest side is a
stand-in status object whose values the tests set. NodeStatus is checked on real Ingestors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_upstream import PageFault, fake_upstream_factory, record_from_line  # noqa: F401
from plc import serve_cmd, settings
from plc.api import create_app
from plc.core.jsonfmt import format_ms
from plc.metrics import INGESTER, READER, NodeStatus, empty_counters, lag_seconds
from plc.store.migrate import migrate
from plc.sync.ingest import Ingestor
from plc.tools.generate import generate

pytestmark = pytest.mark.timeout(60)

UPSTREAM = "https://plc.example"
NOW_S = 1_750_000_000.0


@dataclass
class StandInStatus:
    """The StatusSource interface with values set by the test (clock fixed at NOW_S)."""

    role: str = INGESTER
    upstream: str | None = UPSTREAM
    upstream_state: str = "ok"
    cursor: int | None = 4242
    high_created_ms: int | None = int((NOW_S - 12.5) * 1000)
    last_commit_s: float | None = NOW_S - 1
    leader_epoch: int | None = 7
    counts: dict[str, Any] = field(default_factory=lambda: {
        "batches": 7, "accepted": 900, "stored": 880, "skipped_duplicates": 20,
        "rejected": {"sig_invalid": 3, "malformed": 1}, "divergences": {"rejected": 4, "backdated": 2},
    })

    def counters(self) -> dict[str, Any]:
        return self.counts

    @property
    def ingest_leader(self) -> bool:
        return self.leader_epoch is not None

    def lag_seconds(self) -> float | None:
        return lag_seconds(self.high_created_ms, NOW_S)


@pytest.fixture
async def node(pg_database) -> AsyncIterator[tuple[httpx.AsyncClient, Any, StandInStatus]]:
    status = StandInStatus()
    app = create_app(connect_kwargs=pg_database.connect_kwargs, version="9.9.9", status=status,
                     ready_max_lag_s=60)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            yield c, app, status


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, from a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(c: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "etag" not in r.headers and r.headers["cache-control"] == "no-store"
    return samples(r.text)


async def test_metrics_expose_ingest_state(node):
    c, _, _ = node
    m = await scrape(c)
    assert m[("plc_node_info", (("role", "ingester"), ("version", "9.9.9")))] == 1
    assert m[("plc_ingest_cursor", ())] == 4242
    assert m[("plc_ingest_lag_seconds", ())] == 12.5
    assert m[("plc_ingest_newest_created_timestamp_seconds", ())] == NOW_S - 12.5
    assert m[("plc_ingest_last_commit_timestamp_seconds", ())] == NOW_S - 1
    assert m[("plc_upstream_up", ())] == 1
    assert m[("plc_ingest_batches_total", ())] == 7
    assert m[("plc_ingest_ops_accepted_total", ())] == 900
    assert m[("plc_ingest_ops_stored_total", ())] == 880
    assert m[("plc_ingest_ops_skipped_duplicates_total", ())] == 20
    assert m[("plc_ingest_ops_rejected_total", (("reason", "sig_invalid"),))] == 3
    assert m[("plc_ingest_ops_rejected_total", (("reason", "malformed"),))] == 1
    assert m[("plc_ingest_divergences_total", (("kind", "rejected"),))] == 4
    assert m[("plc_ingest_divergences_total", (("kind", "backdated"),))] == 2


async def test_metrics_follow_the_status_and_upstream_failures(node):
    c, _, status = node
    status.counts = {**status.counts, "accepted": 901, "rejected": {"sig_invalid": 5}}
    status.upstream_state = "UpstreamError: 403 Forbidden"
    m = await scrape(c)
    assert m[("plc_ingest_ops_accepted_total", ())] == 901
    assert m[("plc_ingest_ops_rejected_total", (("reason", "sig_invalid"),))] == 5
    assert ("plc_ingest_ops_rejected_total", (("reason", "malformed"),)) not in m
    assert m[("plc_upstream_up", ())] == 0


async def test_requests_are_counted_by_route(node):
    c, _, _ = node
    assert (await c.get("/_health")).status_code == 200
    assert (await c.get("/_HEALTH/")).status_code == 200
    assert (await c.get("/nobody")).status_code == 404  # a DID route, no database query
    assert (await c.get("/a/b/c")).status_code == 404  # no route
    assert (await c.options("/x")).status_code == 204
    assert (await c.head("/-/status")).status_code == 200
    assert (await c.request("BREW", "/_health")).status_code == 404
    m = await scrape(c)
    req = "plc_http_requests_total"
    assert m[(req, (("method", "GET"), ("route", "health"), ("status", "200")))] == 2
    assert m[(req, (("method", "GET"), ("route", "did_document"), ("status", "404")))] == 1
    assert m[(req, (("method", "GET"), ("route", "not_found"), ("status", "404")))] == 1
    assert m[(req, (("method", "OPTIONS"), ("route", "preflight"), ("status", "204")))] == 1
    assert m[(req, (("method", "HEAD"), ("route", "status"), ("status", "200")))] == 1
    assert m[(req, (("method", "other"), ("route", "not_found"), ("status", "404")))] == 1
    assert m[("plc_http_request_duration_seconds_count", (("route", "health"),))] == 2
    assert m[("plc_http_request_duration_seconds_sum", (("route", "health"),))] > 0
    assert m[("plc_http_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "health")))] == 2
    m = await scrape(c)  # the first scrape is counted by the time of the second
    assert m[(req, (("method", "GET"), ("route", "metrics"), ("status", "200")))] == 1
    assert m[(req, (("method", "GET"), ("route", "health"), ("status", "200")))] == 2


async def test_each_app_has_its_own_registry(pg_database):
    apps = [create_app(connect_kwargs=pg_database.connect_kwargs) for _ in range(2)]
    assert apps[0].state.metrics.registry is not apps[1].state.metrics.registry
    async with apps[0].router.lifespan_context(apps[0]):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[0]), base_url="http://m") as c:
            await c.get("/_health")
    text = apps[1].state.metrics.render()[0].decode()
    assert "plc_node_info" in text and 'route="health"' not in text


async def test_ready_when_database_answers_and_lag_is_within_bound(node):
    c, _, status = node
    r = await c.get("/-/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "role": "ingester", "database": "ok", "lag_seconds": 12.5,
                        "max_lag_seconds": 60}
    status.high_created_ms = int((NOW_S - 61) * 1000)
    r = await c.get("/-/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["lag_seconds"] == 61
    assert body["reason"] == "lag 61s is above the 60s bound"
    status.high_created_ms = None
    r = await c.get("/-/ready")
    assert (r.status_code, r.json()["reason"]) == (503, "no op ingested yet")


async def test_reader_readiness_ignores_lag(node):
    c, _, status = node
    status.role = READER
    status.high_created_ms = int((NOW_S - 86_400) * 1000)
    r = await c.get("/-/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


async def test_not_ready_when_the_database_is_gone(node):
    c, app, _ = node
    await app.state.pool.close()
    r = await c.get("/-/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["database"] == "unavailable"
    assert body["reason"].startswith("database unavailable (")
    assert (await c.get("/-/status")).status_code == 200  # status never needs the database


async def test_status_fields(node):
    c, _, status = node
    r = await c.get("/-/status")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.json() == {
        "version": "9.9.9",
        "role": "ingester",
        "ingest_leader": True,
        "ingest_epoch": 7,
        "cursor": 4242,
        "lag_seconds": 12.5,
        "newest_created_at": format_ms(status.high_created_ms),
        "last_commit_at": format_ms(int((NOW_S - 1) * 1000)),
        "upstream": UPSTREAM,
        "upstream_state": "ok",
        "counters": status.counts,
        "reads": {"replica_configured": False},
    }


async def test_a_default_app_is_a_reader(pg_database):
    app = create_app(connect_kwargs=pg_database.connect_kwargs)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            st = (await c.get("/-/status")).json()
            got = (st["role"], st["cursor"], st["lag_seconds"], st["upstream_state"])
            assert got == ("reader", None, None, "idle")
            assert st["counters"] == empty_counters()
            assert (await c.get("/-/ready")).status_code == 200
            m = await scrape(c)
            assert m[("plc_node_info", (("role", "reader"), ("version", "0.0.0")))] == 1
            assert not any(name.startswith("plc_ingest_") for name, _ in m)
            assert (await c.post("/metrics")).status_code == 501  # POST /:did, as before


def _ingestor(**counts: Any) -> Ingestor:
    """A real Ingestor (never run) holding the counters a run would have left."""
    ing = Ingestor(None, None, upstream_name=UPSTREAM)  # type: ignore[arg-type]
    for name, value in counts.items():
        setattr(ing, name, value)
    return ing


def test_node_status_sums_counters_across_ingestor_restarts():
    clock = [NOW_S]
    st = NodeStatus(ingest=True, upstream=UPSTREAM, clock=lambda: clock[0])
    assert (st.role, st.upstream_state, st.cursor, st.lag_seconds()) == (INGESTER, "idle", None, None)
    first = _ingestor(accepted=10, batches=2, cursor=10, high_created_ms=int((NOW_S - 5) * 1000))
    first.rejected.update({"sig_invalid": 2})
    first.divergences.update({"rejected": 2})
    st.attach(first)
    assert st.upstream_state == "ok" and st.cursor == 10 and st.lag_seconds() == 5
    st.committed()
    assert st.last_commit_s == NOW_S
    st.failed("UpstreamError: 403 Forbidden")
    assert st.upstream_state == "UpstreamError: 403 Forbidden"
    clock[0] += 30
    assert st.lag_seconds() == 35  # the lag grows while ingest is down
    second = _ingestor(accepted=3, batches=1, cursor=13, high_created_ms=int((NOW_S + 20) * 1000))
    second.rejected.update({"sig_invalid": 1, "genesis_hash": 1})
    st.attach(second)
    st.attach(second)  # attaching the same one twice counts it once
    assert st.upstream_state == "UpstreamError: 403 Forbidden"  # until a batch is committed
    st.committed()
    assert st.upstream_state == "ok" and st.cursor == 13 and st.lag_seconds() == 10
    c = st.counters()
    assert (c["accepted"], c["batches"], c["stored"]) == (13, 3, 0)
    assert c["rejected"] == {"sig_invalid": 3, "genesis_hash": 1} and c["divergences"] == {"rejected": 2}


def test_reader_status_is_idle():
    st = NodeStatus(ingest=False, upstream=None, clock=time.time)
    assert (st.role, st.upstream_state, st.lag_seconds()) == (READER, "idle", None)


def test_ready_max_lag_setting():
    import argparse

    p = argparse.ArgumentParser()
    settings.add_argument(p, settings.READY_MAX_LAG)
    assert p.parse_args([]).ready_max_lag == 300
    assert p.parse_args(["--ready-max-lag", "2.5"]).ready_max_lag == 2.5
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit):
            p.parse_args(["--ready-max-lag", bad])


async def _until(condition: Any, task: asyncio.Task, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and not task.done(), what
        await asyncio.sleep(0.02)


async def test_serve_ingest_feeds_the_node_status(pg_dsn, pg_database, fake_upstream_factory):
    """`plc serve`'s ingest loop attaches its Ingestor and notes failures and commits."""
    lines = [line for line, _ in generate(5, 40, fmt="sequenced", invalid_rate=0.1)]
    fake = await fake_upstream_factory([record_from_line(line) for line in lines])
    fake.page_faults.append(PageFault(status=403, body='{"message":"Forbidden"}'))  # refused for good
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    status = NodeStatus(ingest=True, upstream=fake.url)
    stop = asyncio.Event()
    task = asyncio.create_task(serve_cmd._ingest_forever(
        serve_cmd.IngestJob(pg_database.connect_kwargs, fake.url, status, lambda _dids: status.committed()), stop))
    try:
        await _until(lambda: "403" in status.upstream_state, task, "the failure never reached the status")
        assert status.upstream_state.startswith("UpstreamError")
        assert status.cursor == 0 and status.last_commit_s is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    # ingest starts again (as after INGEST_RETRY_S) and the upstream answers
    stop = asyncio.Event()
    task = asyncio.create_task(serve_cmd._ingest_forever(
        serve_cmd.IngestJob(pg_database.connect_kwargs, fake.url, status, lambda _dids: status.committed()), stop))
    try:
        await _until(lambda: (status.cursor or 0) >= fake.latest_seq, task, "cursor stuck")
        assert status.upstream_state == "ok" and status.last_commit_s is not None
        counts = status.counters()
        assert counts["accepted"] > 0 and counts["batches"] >= 1
        seen = counts["accepted"] + counts["skipped_duplicates"] + sum(counts["rejected"].values())
        assert seen == len(lines)
        assert status.lag_seconds() is not None
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_standby_is_ready_by_the_clusters_lag(node):
    """A node waiting for the ingest lock has ingested nothing itself: its readiness follows
    the newest createdAt any node committed (plc_cursor), and /metrics says it does not lead."""
    c, app, status = node
    status.leader_epoch = None
    status.high_created_ms = None  # this node's own ingestor never ran
    async with app.state.pool.acquire() as conn:
        await migrate(conn)
        r = await c.get("/-/ready")
        assert r.status_code == 503 and "no op ingested yet" in r.json()["reason"]
        now_ms = int(time.time() * 1000)
        await conn.execute("INSERT INTO plc_cursor VALUES ('up', 1, $1, $1)", now_ms - 30_000)
        r = await c.get("/-/ready")
        assert r.status_code == 200, r.json()
        assert 29 <= r.json()["lag_seconds"] < 600
        await conn.execute("UPDATE plc_cursor SET created_at = $1", now_ms - 3_600_000)
        r = await c.get("/-/ready")
        assert r.status_code == 503 and "above the 60s bound" in r.json()["reason"]
    st = (await c.get("/-/status")).json()
    assert st["ingest_leader"] is False and st["ingest_epoch"] is None
    m = await scrape(c)
    assert m[("plc_ingest_leader", ())] == 0
