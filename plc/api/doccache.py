"""The per-DID read cache of the API: hot DIDs answered from memory, never stale after a commit.

`DocCache(size)` maps a DID to an `Entry`: its ops in audit order (`render.OpRow`s, exactly what
the database gave, pending forwarded ops merged) and the replies already rendered from them, per
route, ETag included. Least-recently-used entries are dropped beyond `size` DIDs; a DID with more
than `max_rows` ops is never cached (such logs are rare and large).

Staleness: every change to a DID's ops goes through `invalidate(dids)` before readers can see
it as cached.
- On the node that commits (its ingestor's `on_commit`, its forwarder's pending ops), the call
  comes right after the commit, so a read that starts after the commit returns its result.
- Every node also runs a `ChangeWatcher`: every `interval` seconds it reads the ops stored
  since the last poll (by upstream seq, an indexed range scan, every 0.05 s by default) and invalidates their DIDs; when
  an upstream without seq (legacy timestamp mode) moved its cursor, it clears the whole cache.
  A node that does not commit itself therefore serves a DID's old document for at most about
  `interval` seconds after another node committed a change to it.
- Until the watcher's first poll succeeds, and after any failed poll until one succeeds again,
  nothing is cached (`live` is False): the change feed may have missed something.
- A reader that loaded rows while an invalidation happened does not store them (`token()`
  before the query, `put(..., token)` after): a slow read can never re-insert an old state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from plc.core.render import OpRow
from plc.store import oplog

from .http import Reply

log = logging.getLogger(__name__)

DEFAULT_SIZE = 20_000
DEFAULT_MAX_ROWS = 64
DEFAULT_INTERVAL_S = 0.05
_CHANGES_LIMIT = 10_000


@dataclass(slots=True)
class Entry:
    rows: list[OpRow]
    replies: dict[str, Reply] = field(default_factory=dict)


class DocCache:
    """did → Entry, LRU, with invalidation tokens (see the module docstring)."""

    def __init__(self, size: int = DEFAULT_SIZE, max_rows: int = DEFAULT_MAX_ROWS):
        self.size = size
        self.max_rows = max_rows
        self._data: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._epoch = 0
        self.listeners: list[Callable[[Iterable[str] | None], Any]] = []  # told of every
        # invalidation (None: everything), e.g. the identity resolver's caches
        self.live = True  # False: nothing is stored (the change feed is not known to be current)
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, did: str) -> Entry | None:
        entry = self._data.get(did)
        if entry is None:
            self.misses += 1
            return None
        self._data.move_to_end(did)
        self.hits += 1
        return entry

    def token(self) -> int:
        """Take before reading a DID's rows from the database; give to `put`."""
        return self._epoch

    def put(self, did: str, token: int, rows: list[OpRow]) -> Entry:
        """An entry for `rows`; kept only if nothing was invalidated since `token`."""
        entry = Entry(rows)
        if self.live and self.size > 0 and token == self._epoch and len(rows) <= self.max_rows:
            self._data[did] = entry
            self._data.move_to_end(did)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return entry

    def invalidate(self, dids: Iterable[str]) -> None:
        self._epoch += 1
        dids = list(dids)
        for did in dids:
            if self._data.pop(did, None) is not None:
                self.invalidations += 1
        for listener in self.listeners:
            listener(dids)

    def clear(self) -> None:
        self._epoch += 1
        self.invalidations += len(self._data)
        self._data.clear()
        for listener in self.listeners:
            listener(None)


_MAX_SEQ_SQL = "SELECT max(seq) FROM plc_op"
# two small queries rather than a join: a generic plan for the join may scan all of plc_did
_CHANGES_SQL = "SELECT seq, did_id FROM plc_op WHERE seq > $1 ORDER BY seq LIMIT $2"
_DIDS_SQL = "SELECT did FROM plc_did WHERE id = ANY($1::int[])"
_LEGACY_SQL = "SELECT coalesce(max(updated_at), 0) FROM plc_cursor WHERE seq IS NULL"


class ChangeWatcher:
    """Polls the database for ops other processes stored and invalidates their DIDs."""

    def __init__(self, pool: Any, cache: DocCache, interval: float = DEFAULT_INTERVAL_S):
        self.pool = pool
        self.cache = cache
        cache.live = False  # until the first poll has found the starting point
        self.interval = interval
        self.seq: int | None = None
        self.legacy_updated: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll(self) -> None:
        """One poll: invalidate the DIDs of ops stored since the last one."""
        async with self.pool.acquire() as conn:
            if self.seq is None:  # first poll: everything before now is what readers will load
                self.seq = await conn.fetchval(_MAX_SEQ_SQL) or 0
                self.legacy_updated = await conn.fetchval(_LEGACY_SQL)
                self.cache.clear()
                self.cache.live = True
                return
            while True:
                rows = await conn.fetch(_CHANGES_SQL, self.seq, _CHANGES_LIMIT)
                if rows:
                    ids = list({r[1] for r in rows})
                    self.cache.invalidate({oplog.did_text(r[0]) for r in await conn.fetch(_DIDS_SQL, ids)})
                    self.seq = rows[-1][0]
                if len(rows) < _CHANGES_LIMIT:
                    break
            legacy = await conn.fetchval(_LEGACY_SQL)
            if legacy != self.legacy_updated:
                self.legacy_updated = legacy
                self.cache.clear()
            self.cache.live = True

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database may be failing over (or not migrated)
                if self.cache.live:
                    log.warning("document cache poll failed; cache off until a poll succeeds", exc_info=True)
                self.cache.live = False  # nothing is known about what changes meanwhile
                self.cache.clear()
            await asyncio.sleep(self.interval)


__all__ = ["ChangeWatcher", "DocCache", "Entry"]
