"""The Starlette application of the read API.

``create_app(pool_factory=…)`` or ``create_app(connect_kwargs=…)``: the lifespan opens an asyncpg
pool (``pool_factory()`` when given, else ``asyncpg.create_pool(min_size=1, max_size=POOL_MAX,
**connect_kwargs)``), keeps it in ``app.state.pool`` and closes it on shutdown. The schema is
never migrated here (``plc migrate`` does that). ``version`` is what ``/_health`` reports.

Operations (``ops``): ``status`` (a ``plc.metrics.NodeStatus`` or stand-in; default: a reader
node) is read by ``/metrics`` and ``/-/status``, ``ready_max_lag_s`` bounds the lag ``/-/ready``
accepts; ``app.state.metrics`` is the app's own registry, fed by ``RequestMetricsMiddleware``.

Identity (``identity``): ``app.state.identity`` is a ``plc.identity.IdentityResolver`` built from
``identity_config`` (a ``ResolverConfig``; default: system DNS, HTTPS on 443), reading did:plc
documents from the app's pool; the lifespan closes it. Its XRPC routes (``plc.api.xrpc``) come
before the reference's routes.

Reads (``readpool``): with ``read_connect_kwargs`` (a replica, e.g. HAProxy's replicas port)
the read routes, ``/export/stream``, the cache's change feed and the identity resolver use
``app.state.read_pool``: the replica first, the primary pool when no replica connection can
be had. Writes, submit-mode validation, ``/_health`` and ``/-/ready`` use ``app.state.pool``.

Read cache (``doccache``): ``app.state.doc_cache`` holds the ops and rendered replies of up to
``doc_cache_size`` DIDs (0: no cache); a ``ChangeWatcher`` started by the lifespan invalidates
DIDs that other processes changed, polling every ``doc_cache_poll_s`` seconds. Code in this
process that changes a DID calls ``app.state.doc_cache.invalidate([did])`` after its commit.

``/export/stream`` (``stream``): the lifespan keeps a ``StreamHub`` in ``app.state.stream_hub``
(``stream_buffer`` events per connection, ``stream_poll_interval`` seconds between database
polls, ``stream_backfill_window_ms`` = how old a cursor's next event may be) and closes it first.

``POST /:did`` (``forward``, a ``plc.forward.ForwardConfig``; None: answers 501): the lifespan
starts the ``plc.api.forward.Forwarder`` kept in ``app.state.forward`` (its upstream clients and
the background task expiring pending ops every ``config.expire_every_s``) and closes it.
``forward_clock`` (ms since the epoch) is the submit-mode clock, for tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware

from ..identity.resolver import IdentityResolver, ResolverConfig
from ..forward import ForwardConfig, ForwardMetrics
from ..metrics import Metrics, NodeStatus, StatusSource
from .doccache import DEFAULT_INTERVAL_S as DEFAULT_CACHE_POLL_S
from .doccache import DEFAULT_SIZE as DEFAULT_CACHE_SIZE
from .doccache import ChangeWatcher, DocCache
from .forward import Forwarder, ReceiveInScope
from .readpool import ReadPool
from .http import CorsMiddleware
from .ops import RequestMetricsMiddleware, ops_routes
from .routes import build_routes
from .stream import DEFAULT_BACKFILL_WINDOW_MS, DEFAULT_BUFFER, DEFAULT_POLL_INTERVAL, StreamHub
from .xrpc import xrpc_routes

POOL_MIN = 0  # connect lazily: a database failing over while the app starts is not fatal
POOL_MAX = 8


def _identity_listener(identity: IdentityResolver) -> Callable[[Any], None]:
    """Drop the identity resolver's cached did:plc documents when the document cache drops them."""

    def invalidated(dids: Any) -> None:
        if dids is None:
            identity.invalidate_plc()
        else:
            for did in dids:
                identity.invalidate_did(did)

    return invalidated


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
    identity_config: ResolverConfig | None = None,
    forward: ForwardConfig | None = None,
    forward_clock: Callable[[], int] | None = None,
    doc_cache_size: int = DEFAULT_CACHE_SIZE,
    doc_cache_poll_s: float = DEFAULT_CACHE_POLL_S,
    read_connect_kwargs: dict[str, Any] | None = None,
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
        replica = None
        if read_connect_kwargs is not None:  # connects lazily: a replica down at start is fine
            replica = await asyncpg.create_pool(min_size=0, max_size=POOL_MAX, **read_connect_kwargs)
        app.state.read_pool = ReadPool(app.state.pool, replica)
        app.state.stream_hub = StreamHub(
            app.state.read_pool,
            buffer_size=stream_buffer,
            poll_interval=stream_poll_interval,
            backfill_window_ms=stream_backfill_window_ms,
        )
        watcher = ChangeWatcher(app.state.read_pool, app.state.doc_cache, doc_cache_poll_s)
        watcher.start()  # caching starts once its first poll succeeds
        if app.state.forward is not None:
            await app.state.forward.start(app.state.pool, app.state.doc_cache)
        try:
            yield
        finally:
            await watcher.close()
            await app.state.stream_hub.close()  # /export/stream connections get close 1001
            if app.state.forward is not None:
                await app.state.forward.close()
            await app.state.identity.aclose()
            await app.state.read_pool.close()
            await app.state.pool.close()

    status = status if status is not None else NodeStatus(ingest=False, upstream=None)
    metrics = Metrics(status, version)
    app = Starlette(
        routes=ops_routes() + xrpc_routes() + build_routes(),
        middleware=[
            Middleware(RequestMetricsMiddleware, metrics=metrics),
            Middleware(CorsMiddleware),
            Middleware(ReceiveInScope),
        ],
        lifespan=lifespan,
    )
    app.state.version = version
    app.state.status = status
    app.state.metrics = metrics
    app.state.forward = None if forward is None else Forwarder(forward, ForwardMetrics(metrics.registry), forward_clock)
    app.state.ready_max_lag = ready_max_lag_s
    app.state.doc_cache = DocCache(doc_cache_size)
    app.state.identity = IdentityResolver(identity_config, pool_source=lambda: app.state.read_pool)
    app.state.doc_cache.listeners.append(_identity_listener(app.state.identity))
    return app
