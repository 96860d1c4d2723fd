"""The Starlette application of the read API.

``create_app(pool_factory=…)`` or ``create_app(connect_kwargs=…)``: the lifespan opens an asyncpg
pool (``pool_factory()`` when given, else ``asyncpg.create_pool(min_size=1, max_size=POOL_MAX,
**connect_kwargs)``), keeps it in ``app.state.pool`` and closes it on shutdown. The schema is
never migrated here (``plc migrate`` does that). ``version`` is what ``/_health`` reports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware

from .http import CorsMiddleware
from .routes import build_routes

POOL_MIN = 1
POOL_MAX = 8


def create_app(
    *,
    pool_factory: Callable[[], Awaitable[Any]] | None = None,
    connect_kwargs: dict[str, Any] | None = None,
    version: str = "0.0.0",
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
        try:
            yield
        finally:
            await app.state.pool.close()

    app = Starlette(routes=build_routes(), middleware=[Middleware(CorsMiddleware)], lifespan=lifespan)
    app.state.version = version
    return app
