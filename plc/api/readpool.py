"""Where the read routes get their database connections: a replica when one is configured, the
primary otherwise or when the replica cannot be reached.

`ReadPool(primary, replica=None)` has the one method the read code uses of an asyncpg pool,
``acquire(timeout=None)`` (an async context manager giving a connection). With a replica pool
(``--read-database-url``, e.g. HAProxy's replicas port, which only routes to replicas within a
replication-lag bound: ha/health.json ``pg_replica``), each acquire tries the replica first
and, if no replica connection can be had within ``replica_timeout_s`` (refused, unreachable,
starting up, too many clients), takes one from the primary pool instead. A query that fails on
an established replica connection is not retried elsewhere: the request fails (500) and the
client retries, as with the primary.

What still always uses the primary: writes (the ingest, pending forwarded ops), the
validation of submitted ops (it must see the newest state), `/_health` and `/-/ready`, and the
reads of a DID this node forwarded an op for, during the pending window (`prefer_primary`):
read-your-write must not depend on how far a replica has replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

DEFAULT_REPLICA_TIMEOUT_S = 2.0
# errors that mean "no replica connection now" (not a bad query)
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError, asyncpg.InterfaceError)


class ReadPool:
    """Replica first, primary as the fallback (see the module docstring)."""

    def __init__(self, primary: Any, replica: Any = None, replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S):
        self.primary = primary
        self.replica = replica
        self.replica_timeout_s = replica_timeout_s
        self.replica_reads = 0
        self.fallbacks = 0
        self._primary_until: dict[str, float] = {}  # did -> monotonic deadline

    def prefer_primary(self, did: str, seconds: float) -> None:
        """Read ``did`` from the primary for the next ``seconds`` (a write of ours is pending)."""
        now = time.monotonic()
        if len(self._primary_until) > 10_000:  # drop the expired ones now and then
            self._primary_until = {d: t for d, t in self._primary_until.items() if t > now}
        self._primary_until[did] = now + seconds

    def for_did(self, did: str) -> Any:
        """The pool to read ``did`` from: the primary while a write of ours is pending, else this."""
        until = self._primary_until.get(did)
        if until is not None and until > time.monotonic():
            return self.primary
        return self

    @asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[Any]:
        if self.replica is not None:
            try:
                conn = await self.replica.acquire(timeout=self.replica_timeout_s)
            except _UNAVAILABLE as exc:
                self.fallbacks += 1
                if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
                    log.warning("replica unavailable (%s: %s); reading from the primary (%d times)",
                                type(exc).__name__, exc, self.fallbacks)
            else:
                self.replica_reads += 1
                try:
                    yield conn
                finally:
                    await self.replica.release(conn)
                return
        async with self.primary.acquire(timeout=timeout) as conn:
            yield conn

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.close()


__all__ = ["ReadPool"]
