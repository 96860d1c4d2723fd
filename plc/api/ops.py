"""Operational endpoints (not in the reference server) and the request-metrics middleware.

    GET /metrics     Prometheus text exposition (`plc.metrics.Metrics`)
    GET /-/ready     readiness for load balancers: 200 {"ready":true,…} only when the database
                     answers and, on an ingesting node, the lag is at most
                     `app.state.ready_max_lag` seconds; otherwise 503 with the reason. The
                     ingest leader's lag is its own; a standby's (it waits for the ingest
                     lock) is the cluster's: from the newest createdAt in plc_cursor
    GET /-/status    JSON: version, role, whether this node is the ingest leader and its
                     epoch, cursor, lag, newest createdAt, upstream and its state, counters,
                     and where its reads went (replica or primary fallback)

`/metrics` is one path segment, which the DID routes would otherwise take; it is no did:plc,
so no DID is shadowed. The other two live under `/-/`, which no DID route serves. These routes
come before the reference's in the route list. The answers carry no ETag and are never cached.

`RequestMetricsMiddleware` (pure ASGI) counts every HTTP request by route name, method and
status, and observes its latency; the route is found after the answer by matching the scope
against the app's routes (no route matched: "not_found"; CORS preflight: "preflight").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from starlette.routing import BaseRoute, Match

from ..core.jsonfmt import format_ms
from ..metrics import INGESTER, lag_seconds, leads
from .http import JSON_TYPE, Reply
from .routes import PlcRoute

log = logging.getLogger("plc.api")

READY_TIMEOUT = 2.0  # seconds the readiness database check may take
NO_STORE = [("cache-control", "no-store")]


def _json(status: int, value: Any) -> Reply:
    return Reply(status, orjson.dumps(value), JSON_TYPE, list(NO_STORE), etag=False)


async def metrics(scope: dict[str, Any], _did: str | None) -> Reply:
    """``/metrics``: the app's registry in the Prometheus text format."""
    body, content_type = scope["app"].state.metrics.render()
    return Reply(200, body, content_type, list(NO_STORE), etag=False)


_HIGH_SQL = "SELECT max(created_at) FROM plc_cursor"


async def _database_state(pool: Any, want_high: bool) -> tuple[str | None, int | None]:
    """(None, …) when the database answers, else (what went wrong, None); with ``want_high``
    also the newest createdAt any node ingested (a standby's lag is the cluster's)."""
    try:
        async with pool.acquire(timeout=READY_TIMEOUT) as conn:
            if want_high:
                return None, await conn.fetchval(_HIGH_SQL, timeout=READY_TIMEOUT)
            await conn.fetchval("select 1", timeout=READY_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 — any failure means "not ready"
        return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), None
    return None, None


async def ready(scope: dict[str, Any], _did: str | None) -> Reply:
    """``/-/ready``: 200 when the database answers and the lag is within the bound, else 503."""
    state = scope["app"].state
    status = state.status
    bound = state.ready_max_lag
    standby = status.role == INGESTER and not leads(status)
    db_error, db_high = await _database_state(state.read_pool, standby)
    lag = lag_seconds(db_high, time.time()) if standby else status.lag_seconds()
    reasons = []
    if db_error is not None:
        reasons.append(f"database unavailable ({db_error})")
    if status.role == INGESTER:
        if lag is None:
            reasons.append("no op ingested yet")
        elif lag > bound:
            reasons.append(f"lag {lag:.0f}s is above the {bound:g}s bound")
    body: dict[str, Any] = {
        "ready": not reasons,
        "role": status.role,
        "database": "ok" if db_error is None else "unavailable",
        "lag_seconds": lag,
        "max_lag_seconds": bound,
    }
    if reasons:
        body["reason"] = "; ".join(reasons)
        return _json(503, body)
    return _json(200, body)


async def status(scope: dict[str, Any], _did: str | None) -> Reply:
    """``/-/status``: the node's role, position, lag, upstream state and counters."""
    state = scope["app"].state
    st = state.status
    high = st.high_created_ms
    last_commit = st.last_commit_s
    return _json(200, {
        "version": state.version,
        "role": st.role,
        "ingest_leader": st.role == INGESTER and leads(st),
        "ingest_epoch": getattr(st, "leader_epoch", None),
        "cursor": st.cursor,
        "lag_seconds": st.lag_seconds(),
        "newest_created_at": None if high is None else format_ms(high),
        "last_commit_at": None if last_commit is None else format_ms(int(last_commit * 1000)),
        "upstream": st.upstream,
        "upstream_state": st.upstream_state,
        "counters": st.counters(),
        "reads": _reads(state),
    })


def _reads(state: Any) -> dict[str, Any]:
    """Where this node's reads went: a replica (--read-database-url) or, failing that, the primary."""
    pool = getattr(state, "read_pool", None)
    if pool is None or pool.replica is None:
        return {"replica_configured": False}
    return {"replica_configured": True, "from_replica": pool.replica_reads, "fallbacks": pool.fallbacks}


def ops_routes() -> list[BaseRoute]:
    """The operational routes; they go before the reference's routes."""
    return [
        PlcRoute(("metrics",), ("GET",), metrics, "metrics"),
        PlcRoute(("-", "ready"), ("GET",), ready, "ready"),
        PlcRoute(("-", "status"), ("GET",), status, "status"),
    ]


def route_name(scope: dict[str, Any]) -> str:
    """The name of the route that serves ``scope`` ("not_found" when none but the 404 does)."""
    if scope.get("method") == "OPTIONS":
        return "preflight"
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "name", None) or "not_found"
    return "not_found"


class RequestMetricsMiddleware:
    """Counts HTTP requests and their latency by route into ``metrics`` (pure ASGI)."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answered = [500]

        async def send_noting_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            try:
                self.metrics.observe(route_name(scope), scope.get("method", ""), answered[0],
                                     time.perf_counter() - started)
            except Exception:  # noqa: BLE001 — counting must never break an answer
                log.exception("request metrics failed")
