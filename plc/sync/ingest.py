"""Validated ingest: follow an upstream directory, check every op with the core in replay mode,
and store the accepted ones, the divergences and the cursor in ONE transaction per batch.

`Ingestor(conn, upstream, upstream_name=..., clock=..., batch_max=1000)`; `await run(stop,
max_batches)` resumes from the stored cursor (`oplog.get_cursor`) and commits batch after batch
until `stop` is set, `max_batches` commits are done, or the upstream fails for good
(`UpstreamError`, `CursorAhead` propagate). A commit is all or nothing, so a kill at any moment
loses nothing (the cursor moves only with the ops) and stores nothing twice (`oplog.commit`
skips ops already stored when a batch is replayed).

Per record, in upstream order:
- `MalformedLine` → divergence `rejected`, reason ``malformed:<why>``, the raw line.
- a seq not above the last seq seen → divergence `seq_regression`; the op is not stored (its
  seq would collide with or reorder stored history); gaps are normal upstream and not recorded.
- otherwise the op is checked (`chain.check_op`, REPLAY, upstream's createdAt and CID) against
  the DID's state (from the database, cached; the cache sees the batch's own earlier ops):
  accepted → stored; `duplicate` with the same createdAt → skipped silently (page overlap,
  replays); `duplicate` with another createdAt → divergence `conflict` (same did and CID,
  different content); any other refusal → divergence `rejected` (the core's reason, its detail,
  the raw line), never stored.
- a createdAt older than the newest createdAt ingested so far by more than
  `backdate_tolerance_ms` → divergence `backdated` (the op is still checked and stored if valid).
  The high-water createdAt is kept in the cursor row (`plc_cursor.created_at`) so it survives
  restarts.

Counters for metrics are plain attributes: `accepted`, `stored`, `skipped_duplicates`,
`rejected` (reason → count), `divergences` (kind → count), `batches`, `cursor`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.chain import REPLAY, Accepted, DidLog, check_op
from ..core.errors import OpError, Reason
from ..store import oplog
from ..store.oplog import Cursor, Divergence
from .upstream import Batch, MalformedLine, Upstream, UpstreamRecord

log = logging.getLogger(__name__)

REJECTED = "rejected"
BACKDATED = "backdated"
SEQ_REGRESSION = "seq_regression"
CONFLICT = "conflict"

DEFAULT_BACKDATE_TOLERANCE_MS = 10 * 60 * 1000
DEFAULT_CACHE_DIDS = 50_000
_QUEUE_BATCHES = 4  # upstream batches fetched ahead of the one being stored


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    """A string PostgreSQL `text` can hold (no NUL, no lone surrogate)."""
    s = value if isinstance(value, str) else repr(value)
    return s.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


class _DidCache:
    """did → DidLog | None (None: no stored op), least recently used dropped first.

    Only the ingestor writes, so a cached entry stays true as long as every change made to it
    is committed; `clear()` is called whenever a batch is not committed."""

    def __init__(self, size: int):
        self.size = size
        self._data: collections.OrderedDict[str, DidLog | None] = collections.OrderedDict()

    def get(self, did: str) -> tuple[bool, DidLog | None]:
        if did in self._data:
            self._data.move_to_end(did)
            return True, self._data[did]
        return False, None

    def put(self, did: str, value: DidLog | None) -> None:
        self._data[did] = value
        self._data.move_to_end(did)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


class Ingestor:
    """Validate and store what `upstream.follow` yields (see the module docstring)."""

    def __init__(
        self,
        conn: Any,
        upstream: Upstream,
        *,
        upstream_name: str,
        clock: Callable[[], int] = now_ms,
        batch_max: int = 1000,
        backdate_tolerance_ms: int = DEFAULT_BACKDATE_TOLERANCE_MS,
        cache_dids: int = DEFAULT_CACHE_DIDS,
    ):
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self.conn = conn
        self.upstream = upstream
        self.upstream_name = upstream_name
        self.clock = clock
        self.batch_max = batch_max
        self.backdate_tolerance_ms = backdate_tolerance_ms
        self._cache = _DidCache(cache_dids)
        # metrics
        self.batches = 0
        self.accepted = 0
        self.stored = 0
        self.skipped_duplicates = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.divergences: collections.Counter[str] = collections.Counter()
        # position
        self.cursor: int | None = None  # last committed seq
        self.high_created_ms: int | None = None  # newest createdAt committed

    # ---- the loop ----

    async def run(self, stop: asyncio.Event | None = None, max_batches: int | None = None) -> int:
        """Ingest until `stop` is set or `max_batches` commits are done; returns commits made.

        The batch in flight when `stop` is set is finished (committed) first; batches fetched
        ahead and not yet stored are dropped (the cursor did not move past them)."""
        stop = stop or asyncio.Event()
        stored = await oplog.get_cursor(self.conn, self.upstream_name)
        self.cursor = stored.seq if stored is not None and stored.seq is not None else 0
        self.high_created_ms = stored.created_at if stored is not None else None
        self._cache.clear()
        queue: asyncio.Queue[Batch] = asyncio.Queue(_QUEUE_BATCHES)
        producer = asyncio.create_task(self._produce(self.cursor, queue))
        stopper = asyncio.create_task(stop.wait())
        done_batches = 0
        try:
            while not stop.is_set() and (max_batches is None or done_batches < max_batches):
                getter = asyncio.create_task(queue.get())
                await asyncio.wait({getter, producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if producer.done():
                        producer.result()  # raises the upstream's error
                        raise RuntimeError("upstream follow ended")  # pragma: no cover
                    break  # stop was set
                batches = [getter.result()]
                count = len(batches[0].records)
                while count < self.batch_max and not queue.empty():
                    nxt = queue.get_nowait()
                    batches.append(nxt)
                    count += len(nxt.records)
                await self.ingest(batches)
                done_batches += 1
            return done_batches
        finally:
            stopper.cancel()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer

    async def _produce(self, cursor: int, queue: asyncio.Queue[Batch]) -> None:
        agen = self.upstream.follow(cursor)
        async with contextlib.aclosing(agen):
            async for batch in agen:
                await queue.put(batch)

    # ---- one commit ----

    async def ingest(self, batches: list[Batch]) -> int:
        """Validate the records of `batches` (in order) and commit them with the last batch's
        cursor in one transaction; returns the number of ops inserted."""
        items: list[tuple[Accepted, int | None, int]] = []
        divergences: list[Divergence] = []
        counts = _Counts()
        last_seq = self.cursor or 0
        high = self.high_created_ms
        batch_logs: dict[str, DidLog | None] = {}
        try:
            # the state of every DID the cache does not hold, in one query
            missing = {
                rec.did
                for batch in batches
                for rec in batch.records
                if isinstance(rec, UpstreamRecord) and not self._cache.get(rec.did)[0]
            }
            if missing:
                batch_logs.update(await oplog.load_dids(self.conn, list(missing)))
            for batch in batches:
                for rec in batch.records:
                    if isinstance(rec, MalformedLine):
                        if rec.seq is not None:
                            last_seq = max(last_seq, rec.seq)
                        divergences.append(
                            Divergence(REJECTED, None, None, rec.seq, _text(f"malformed:{rec.reason}"),
                                       _text(rec.reason), rec.raw)
                        )
                        counts.reject("malformed")
                        continue
                    if rec.seq is not None:
                        if rec.seq <= last_seq:
                            divergences.append(self._divergence(
                                SEQ_REGRESSION, rec, None, f"seq {rec.seq} is not after {last_seq}"
                            ))
                            continue
                        last_seq = rec.seq
                    if high is not None and rec.created_ms < high - self.backdate_tolerance_ms:
                        divergences.append(self._divergence(
                            BACKDATED, rec, None,
                            f"createdAt {rec.created_at} is {high - rec.created_ms} ms older than "
                            "the newest ingested",
                        ))
                    dlog = await self._did_log(rec.did, batch_logs)
                    try:
                        acc = check_op(dlog, rec.did, rec.operation, mode=REPLAY, created_at=rec.created_ms,
                                       cid=rec.cid, raw=rec.raw)
                    except OpError as err:
                        if err.reason == Reason.DUPLICATE and dlog is not None:
                            stored = next((e for e in dlog.entries if e.cid == rec.cid), None)
                            if stored is not None and stored.created_at == rec.created_ms:
                                counts.skipped += 1
                                continue
                            other = "?" if stored is None else stored.created_at
                            divergences.append(self._divergence(
                                CONFLICT, rec, err.reason,
                                f"op already stored with createdAt {other}, "
                                f"upstream now says {rec.created_ms}",
                            ))
                            continue
                        divergences.append(self._divergence(REJECTED, rec, err.reason, err.detail))
                        counts.reject(err.reason)
                        continue
                    except Exception as exc:  # noqa: BLE001 - a core bug must not stop the mirror
                        log.exception("core failed on %s %s", rec.did, rec.cid)
                        reason = f"error:{type(exc).__name__}"
                        detail = f"{type(exc).__name__}: {exc}"
                        divergences.append(self._divergence(REJECTED, rec, reason, detail))
                        counts.reject(reason)
                        continue
                    if dlog is None:
                        dlog = DidLog(rec.did)
                        batch_logs[rec.did] = dlog
                    dlog.apply(acc)
                    items.append((acc, rec.seq, self.clock()))
                    if high is None or rec.created_ms > high:
                        high = rec.created_ms
            next_cursor = batches[-1].next_cursor if batches else None
            cursor_seq = next_cursor if isinstance(next_cursor, int) else None
            cursor = Cursor(cursor_seq, high) if (cursor_seq is not None or high is not None) else None
            inserted = await oplog.commit(
                self.conn, self.upstream_name, items, cursor, now_ms=self.clock(), divergences=divergences
            )
        except BaseException:
            self._cache.clear()  # cached logs may hold ops that were not committed
            raise
        for did, dlog in batch_logs.items():
            self._cache.put(did, dlog)
        self.batches += 1
        self.accepted += len(items)
        self.stored += inserted
        self.skipped_duplicates += counts.skipped
        self.rejected.update(counts.rejected)
        self.divergences.update(d.kind for d in divergences)
        if cursor_seq is not None:
            self.cursor = cursor_seq
        self.high_created_ms = high
        return inserted

    async def _did_log(self, did: str, batch_logs: dict[str, DidLog | None]) -> DidLog | None:
        if did in batch_logs:
            return batch_logs[did]
        hit, value = self._cache.get(did)
        if not hit:
            value = await oplog.load_did(self.conn, did)
        batch_logs[did] = value
        return value

    @staticmethod
    def _divergence(kind: str, rec: UpstreamRecord, reason: str | None, detail: str) -> Divergence:
        return Divergence(
            kind, _text(rec.did), _text(rec.cid), rec.seq, _opt_text(reason), _text(detail), rec.raw
        )

    def metrics(self) -> dict[str, Any]:
        """The counters as one plain dict."""
        return {
            "batches": self.batches,
            "accepted": self.accepted,
            "stored": self.stored,
            "skipped_duplicates": self.skipped_duplicates,
            "rejected": dict(self.rejected),
            "divergences": dict(self.divergences),
            "cursor": self.cursor,
            "high_created_ms": self.high_created_ms,
        }


class _Counts:
    """A batch's counters, added to the ingestor's only once the batch is committed."""

    def __init__(self) -> None:
        self.skipped = 0
        self.rejected: collections.Counter[str] = collections.Counter()

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1


__all__ = ["BACKDATED", "CONFLICT", "REJECTED", "SEQ_REGRESSION", "Ingestor"]


async def report_progress(ing: Ingestor, say: Callable[[str], None], label: str, every_s: float) -> None:
    """Every ``every_s`` seconds, say the cursor, the accepted rate and the refusals (runs
    until cancelled)."""
    last, seen = time.monotonic(), ing.accepted
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        rate = (ing.accepted - seen) / (now - last)
        last, seen = now, ing.accepted
        say(
            f"{label}: cursor {ing.cursor}, {ing.accepted} accepted ({rate:.0f}/s), "
            f"{sum(ing.rejected.values())} rejected, divergences {dict(ing.divergences)}"
        )


async def run_with_progress(
    ing: Ingestor, stop: asyncio.Event, say: Callable[[str], None], label: str, every_s: float
) -> None:
    """``ing.run(stop)`` with ``report_progress`` alongside it, stopped with it."""
    reporter = asyncio.create_task(report_progress(ing, say, label, every_s))
    try:
        await ing.run(stop)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
