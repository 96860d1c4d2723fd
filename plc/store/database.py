"""Where the database is: a configured URL, or the embedded private PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from .embedded import EmbeddedPostgres


@asynccontextmanager
async def database(database_url: str | None, data_dir: str | Path, log: Any = None) -> AsyncIterator[dict[str, Any]]:
    """Yield asyncpg connect() keyword arguments for the configured database; with no URL,
    start the embedded PostgreSQL in ``<data_dir>/postgres`` and stop it on exit."""
    if database_url:
        yield {"dsn": database_url}
        return
    pg = EmbeddedPostgres(Path(data_dir) / "postgres", log=log)
    pg.start()
    try:
        yield dict(pg.connect_kwargs)
    finally:
        pg.stop()


async def connect(connect_kwargs: dict[str, Any]) -> Any:
    return await asyncpg.connect(**connect_kwargs)
