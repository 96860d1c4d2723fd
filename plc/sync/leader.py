"""Which node ingests: a PostgreSQL session advisory lock, and an epoch that fences commits.

`IngestLeadership(connect_kwargs, node)`:
- `campaign(stop)`: on a dedicated connection (never a pooled one: the lock belongs to the
  session), try `pg_try_advisory_lock(LOCK_KEY)` every `retry_s` until it is granted or `stop`
  is set. Once granted, increment `plc_ingest_leader.epoch` and keep the new value: this node
  is the leader of that epoch. Returns the epoch (None if stopped first).
- `fence(conn)`: the `Ingestor`'s commit hook. Inside the commit transaction, read the epoch
  row `FOR SHARE`; unless it is still ours raise `Deposed`, so the batch is rolled back. While
  the commit holds the share lock, no other node can bump the epoch, so a new leader only ever
  starts from a cursor that includes every batch the old one committed.
- `watch()`: ping the lock's connection every `check_s` seconds (each ping with a timeout);
  returns (raising `LostLeadership`) as soon as a ping fails. The caller stops ingesting at
  once.
- `release()`: close the dedicated connection (the lock goes with the session).

How a lost leader is noticed by the others: the lock's session sets `idle_session_timeout`
(a few pings' worth), so when the leader stops pinging (killed, paused, partitioned away from
the database) the server ends its session and frees the lock within that time, even if no TCP
packet says so; TCP keepalives on the session do the same for a half-open connection. After a
Patroni failover the new primary has no advisory locks at all: the first node to campaign
there leads, with a higher epoch than any commit can still carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

LOCK_KEY = 0x706C63_696E67  # "plc" "ing": one advisory lock per database
DEFAULT_RETRY_S = 1.0
DEFAULT_CHECK_S = 1.0
DEFAULT_SESSION_TIMEOUT_S = 5.0


class Deposed(Exception):
    """A commit found another node's epoch: this node is no longer the ingest leader."""


class LostLeadership(Exception):
    """The lock's connection failed: this node must stop ingesting."""


_BUMP_SQL = """
UPDATE plc_ingest_leader SET epoch = epoch + 1, node = $1, since = $2 WHERE id = 1
RETURNING epoch
"""
_FENCE_SQL = "SELECT epoch, node FROM plc_ingest_leader WHERE id = 1 FOR SHARE"


class IngestLeadership:
    """One node's claim to be the ingest leader (see the module docstring)."""

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        node: str,
        *,
        retry_s: float = DEFAULT_RETRY_S,
        check_s: float = DEFAULT_CHECK_S,
        session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S,
    ):
        if check_s * 2 >= session_timeout_s:
            raise ValueError("session_timeout_s must be more than two pings (check_s)")
        self.connect_kwargs = connect_kwargs
        self.node = node
        self.retry_s = retry_s
        self.check_s = check_s
        self.session_timeout_s = session_timeout_s
        self.epoch: int | None = None
        self._conn: Any = None

    async def _open(self) -> Any:
        ms = int(self.session_timeout_s * 1000)
        settings = {
            "idle_session_timeout": str(ms),
            "tcp_keepalives_idle": str(max(1, int(self.session_timeout_s))),
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
            "application_name": f"plc ingest leader {self.node}"[:63],
        }
        return await asyncpg.connect(**self.connect_kwargs, server_settings=settings,
                                     timeout=max(self.retry_s, 5.0))

    async def campaign(self, stop: asyncio.Event | None = None) -> int | None:
        """Wait for the lock (see the module docstring); the epoch, or None once `stop` is set."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await self._open()
                got = await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY,
                                                timeout=self.retry_s * 5)
                if got:
                    self.epoch = await self._conn.fetchval(
                        _BUMP_SQL, self.node, int(time.time() * 1000), timeout=self.retry_s * 5
                    )
                    log.info("ingest leader: %s took epoch %s", self.node, self.epoch)
                    return self.epoch
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("ingest leader campaign: %s: %s", type(exc).__name__, exc)
                await self.release()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.retry_s)
        return None

    async def fence(self, conn: Any) -> None:
        """The commit hook: raise `Deposed` unless the epoch row still holds our epoch."""
        row = await conn.fetchrow(_FENCE_SQL)
        if self.epoch is None or row is None or row[0] != self.epoch:
            held = None if row is None else f"epoch {row[0]} of {row[1] or '?'}"
            raise Deposed(f"this node led epoch {self.epoch}; the database says {held}")

    async def watch(self) -> None:
        """Ping the lock's session until a ping fails; then raise `LostLeadership`."""
        while True:
            await asyncio.sleep(self.check_s)
            try:
                if self._conn is None:
                    raise LostLeadership("no lock connection")
                await self._conn.fetchval("SELECT 1", timeout=self.check_s)
            except LostLeadership:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it is, the lock is not provably ours
                raise LostLeadership(f"{type(exc).__name__}: {exc}") from None

    async def release(self) -> None:
        """Give the lock up (close its session)."""
        conn, self._conn = self._conn, None
        self.epoch = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            if not conn.is_closed():
                conn.terminate()


__all__ = ["Deposed", "IngestLeadership", "LOCK_KEY", "LostLeadership"]
