"""The Starlette application of the read API.

``create_app(pool_factory=…)`` or ``create_app(connect_kwargs=…)``: the lifespan opens an asyncpg
pool (``pool_factory()`` when given, else ``asyncpg.create_pool(min_size=1, max_size=POOL_MAX,
**connect_kwargs)``), keeps it in ``app.state.pool`` and closes it on shutdown. The schema is
never migrated here (``plc migrate`` does that). ``version`` is what ``/_health`` reports.

Operations (``ops``): ``status`` (a ``plc.metrics.NodeStatus`` or stand-in; default: a reader
node) is read by ``/metrics`` and ``/-/status``, ``ready_max_lag_s`` bounds the lag ``/-/ready``
accepts; ``app.state.metrics`` is the app's own registry, fed by ``RequestMetricsMiddleware``.

``/export/stream`` (``stream``): the lifespan keeps a ``StreamHub`` in ``app.state.stream_hub``
(``stream_buffer`` events per connection, ``stream_poll_interval`` seconds between database
polls, ``stream_backfill_window_ms`` = how old a cursor's next event may be) and closes it first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware

from ..metrics import Metrics, NodeStatus, StatusSource
from .http import CorsMiddleware
from .ops import RequestMetricsMiddleware, ops_routes
from .routes import build_routes
from .stream import DEFAULT_BACKFILL_WINDOW_MS, DEFAULT_BUFFER, DEFAULT_POLL_INTERVAL, StreamHub

POOL_MIN = 1
POOL_MAX = 8


def create_app(
    *,
    pool_factory: Callable[[], Awaitable[Any]] | None = None,
    connect_kwargs: dict[str, Any] | None = None,
    version: str = "0.0.0",
    status: StatusSource | None = None,
    ready_max_lag_s: float = 300.0,
    stream_buffer: int = DEFAULT_BUFFER,
    stream_poll_interval: float = DEFAULT_POLL_INTERVAL,
    stream_backfill_window_ms: int = DEFAULT_BACKFILL_WINDOW_MS,
) -> Starlette:
    """The API application; give exactly one of ``pool_factory`` and ``connect_kwargs``."""
    if (pool_factory is None) == (connect_kwargs is None):
        raise ValueError("give exactly one of pool_factory and connect_kwargs")

    async def open_pool() -> Any:
        if pool_factory is not None:
            return await pool_factory()
        return await asyncpg.create_pool(min_size=POOL_MIN, max_size=POOL_MAX, **(connect_kwargs or {}))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.pool = await open_pool()
        app.state.stream_hub = StreamHub(
            app.state.pool,
            buffer_size=stream_buffer,
            poll_interval=stream_poll_interval,
            backfill_window_ms=stream_backfill_window_ms,
        )
        try:
            yield
        finally:
            await app.state.stream_hub.close()  # /export/stream connections get close 1001
            await app.state.pool.close()

    status = status if status is not None else NodeStatus(ingest=False, upstream=None)
    metrics = Metrics(status, version)
    app = Starlette(
        routes=ops_routes() + build_routes(),
        middleware=[Middleware(RequestMetricsMiddleware, metrics=metrics), Middleware(CorsMiddleware)],
        lifespan=lifespan,
    )
    app.state.version = version
    app.state.status = status
    app.state.metrics = metrics
    app.state.ready_max_lag = ready_max_lag_s
    return app
