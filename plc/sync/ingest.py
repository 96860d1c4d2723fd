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

Modes (`mode=`): `sequenced` follows `/export?after=<seq>` pages and the stream
(`Upstream.follow`); `legacy` follows timestamp pages (`Upstream.follow_legacy`) for an upstream
without seq: it resumes from the stored high-water createdAt minus the upstream's
`legacy_overlap_ms` (the overlap is skipped as duplicates), ops are stored with seq NULL (so they
appear in our legacy `/export`, not in the sequenced one or the stream) and the cursor row keeps
seq NULL. `auto` (the default) keeps the mode of a stored cursor (a seq: sequenced; only a
createdAt: legacy) and otherwise asks `/export?after=0&count=10`: lines with seq → sequenced,
lines without → legacy, a 400 → legacy; an empty answer is asked again after the upstream's
`poll_interval_s`. `active_mode` says what was chosen.

Nullified flags (legacy lines carry upstream's current `nullified`; ours is computed, never
copied, and always wins): before each commit the flagged records are compared with what is
stored. We hold the op nullified and upstream says false → divergence `nullified_mismatch`
at once (we got the nullifying op from upstream). Upstream says true and we hold it live (or
it is new) → the nullifying op may simply not have reached us yet (it comes later in createdAt
order), so the record waits (in memory, at most `MAX_PENDING_FLAGS`) until either we nullify
it too, or our committed high-water createdAt passes its createdAt + 72 h (the recovery
window) + `backdate_tolerance_ms` → `nullified_mismatch`. A pending check is lost on restart.

Pipeline and cores: `run` validates the next group of batches while it commits the previous
one; with `workers=N` (and `connect_kwargs`) validation runs in N processes
(`validation.ValidatorPool`, records sharded by DID so a DID's ops stay in order) and the ops
arrive already packed, so this process only fetches, orders and commits.
Hooks: `fence(conn)` runs inside every commit transaction before anything is written (the
ingest leader's proof of leadership: if it raises, the batch is not stored); `on_commit(dids)`
is called after each commit with the DIDs that got new ops (caches to drop). Ops forwarded
through this mirror and waiting as "pending upstream" (`plc.store.pending`) are reconciled in
the transaction that stores them.

Counters for metrics are plain attributes: `accepted`, `stored`, `skipped_duplicates`,
`rejected` (reason → count), `divergences` (kind → count), `batches`, `cursor`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from ..core.chain import RECOVERY_WINDOW_MS
from ..core.jsonfmt import format_ms
from ..store import oplog, pending
from ..store.oplog import Cursor, Divergence, NewOp
from .upstream import Batch, MalformedLine, Upstream, UpstreamError, UpstreamRecord
from .validation import CONFLICT as _CONFLICT_OUTCOME
from .validation import OK, SKIP, Outcome, Validator, ValidatorPool

log = logging.getLogger(__name__)

REJECTED = "rejected"
BACKDATED = "backdated"
SEQ_REGRESSION = "seq_regression"
CONFLICT = "conflict"
NULLIFIED_MISMATCH = "nullified_mismatch"

AUTO = "auto"
SEQUENCED = "sequenced"
LEGACY = "legacy"
MODES = (AUTO, SEQUENCED, LEGACY)
DETECT_COUNT = 10  # lines asked for when detecting the upstream's mode
MAX_PENDING_FLAGS = 100_000

DEFAULT_BACKDATE_TOLERANCE_MS = 10 * 60 * 1000
DEFAULT_CACHE_DIDS = 100_000
_QUEUE_BATCHES = 4  # upstream batches fetched ahead of the one being stored


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    """A string PostgreSQL `text` can hold (no NUL, no lone surrogate)."""
    s = value if isinstance(value, str) else repr(value)
    return s.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")


def _opt_text(value: Any) -> str | None:
    return None if value is None else _text(value)


async def _reconcile_pending(conn: Any, ops: list[NewOp]) -> None:
    """Forwarded ops now stored are no longer pending (same transaction as the store)."""
    await pending.reconcile(conn, ((o.did, oplog.cid_text(o.digest)) for o in ops))


class _Group(NamedTuple):
    """Batches taken together: what the global-order pass found, waiting for validation."""

    batches: list[Batch]
    records: list[UpstreamRecord]  # the records to validate, in upstream order
    divergences: list[Divergence]  # malformed lines, seq regressions, backdating
    rejected: collections.Counter[str]
    last_seq: int | None
    high: int | None


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
        workers: int = 0,
        connect_kwargs: dict[str, Any] | None = None,
        fence: Callable[[Any], Awaitable[Any]] | None = None,
        on_commit: Callable[[set[str]], Any] | None = None,
        mode: str = AUTO,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if workers and connect_kwargs is None:
            raise ValueError("validation workers need connect_kwargs")
        self.conn = conn
        self.upstream = upstream
        self.upstream_name = upstream_name
        self.clock = clock
        self.batch_max = batch_max
        self.backdate_tolerance_ms = backdate_tolerance_ms
        self.workers = workers
        self.connect_kwargs = connect_kwargs
        self.fence = fence
        self.on_commit = on_commit
        self.mode = mode
        self.active_mode: str | None = None  # sequenced or legacy, once chosen
        self._stored_cursor: Cursor | None = None
        self._pending_flags: dict[tuple[str, str], UpstreamRecord] = {}  # upstream says nullified
        self._cache_dids = cache_dids
        self._validator = Validator(cache_dids)
        self._pool: ValidatorPool | None = None
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
        self._planned_seq: int | None = None  # the same, counting groups not yet committed
        self._planned_high: int | None = None

    # ---- the loop ----

    async def run(self, stop: asyncio.Event | None = None, max_batches: int | None = None) -> int:
        """Ingest until `stop` is set or `max_batches` commits are done; returns commits made.

        While one group of batches is committed, the next is validated (in the worker
        processes when `workers` > 0). The group in flight when `stop` is set is finished
        (committed) first; batches fetched ahead and not yet taken are dropped (the cursor did
        not move past them). On any failure the cached DID states are dropped (they may hold
        ops that were never committed) and the error propagates."""
        stop = stop or asyncio.Event()
        await self._resume()
        queue: asyncio.Queue[Batch] = asyncio.Queue(_QUEUE_BATCHES)
        producer = asyncio.create_task(self._produce(self.cursor or 0, queue))
        stopper = asyncio.create_task(stop.wait())
        done_batches = 0
        in_flight: tuple[_Group, list[Outcome]] | None = None
        try:
            while not stop.is_set() and (max_batches is None or done_batches < max_batches):
                last = max_batches is not None and done_batches + 1 >= max_batches
                if in_flight is not None and (queue.empty() or last):  # nothing to overlap with, or the last commit
                    await self._commit(*in_flight)
                    in_flight = None
                    done_batches += 1
                    continue
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
                group = self._plan(batches)
                if not self.workers and in_flight is not None:  # one connection: no overlap
                    await self._commit(*in_flight)
                    in_flight = None
                    done_batches += 1
                validating = asyncio.create_task(self._validate(group.records))
                try:
                    if in_flight is not None:
                        await self._commit(*in_flight)  # while the workers validate `group`
                        done_batches += 1
                finally:
                    outcomes = await validating
                in_flight = (group, outcomes)
            if in_flight is not None:
                await self._commit(*in_flight)
                done_batches += 1
            return done_batches
        except BaseException:
            self._forget()
            raise
        finally:
            stopper.cancel()
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
            self.close()

    async def _resume(self) -> None:
        stored = await oplog.get_cursor(self.conn, self.upstream_name)
        self._stored_cursor = stored
        self.cursor = stored.seq if stored is not None and stored.seq is not None else 0
        self.high_created_ms = stored.created_at if stored is not None else None
        self._planned_seq, self._planned_high = self.cursor, self.high_created_ms
        self._forget()

    def _forget(self) -> None:
        """Drop every cached DID state (the worker processes too)."""
        self._validator.clear()
        self.close()

    def close(self) -> None:
        """Stop the validation workers (started again when needed)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def choose_mode(self) -> str:
        """`sequenced` or `legacy` (see "Modes" in the module docstring); sets `active_mode`."""
        mode = self.mode
        if mode == AUTO:
            stored = self._stored_cursor
            if stored is not None and stored.seq is not None:
                mode = SEQUENCED
            elif stored is not None and stored.created_at is not None:
                mode = LEGACY
            else:
                mode = await self._detect_mode()
        if self.active_mode != mode:
            log.info("following %s in %s mode", self.upstream_name, mode)
        self.active_mode = mode
        return mode

    async def _detect_mode(self) -> str:
        while True:
            try:
                page = await self.upstream.export_page(0, DETECT_COUNT)
            except UpstreamError as exc:
                if exc.status == 400:  # a numeric `after` refused: an upstream without seq
                    return LEGACY
                raise
            if any(item.seq is not None for item in page):
                return SEQUENCED
            if any(isinstance(item, UpstreamRecord) for item in page):
                return LEGACY
            await asyncio.sleep(self.upstream.poll_interval_s)  # empty: nothing to tell yet

    def _legacy_start(self) -> str | None:
        if self.high_created_ms is None:
            return None
        return format_ms(max(0, self.high_created_ms - max(1, self.upstream.legacy_overlap_ms)))

    async def _produce(self, cursor: int, queue: asyncio.Queue[Batch]) -> None:
        if await self.choose_mode() == LEGACY:
            agen = self.upstream.follow_legacy(self._legacy_start())
        else:
            agen = self.upstream.follow(cursor)
        async with contextlib.aclosing(agen):
            async for batch in agen:
                await queue.put(batch)

    # ---- one group of batches ----

    async def ingest(self, batches: list[Batch]) -> int:
        """Validate the records of `batches` (in order) and commit them with the last batch's
        cursor in one transaction; returns the number of ops inserted."""
        if self._planned_seq is None:
            self._planned_seq, self._planned_high = self.cursor, self.high_created_ms
        group = self._plan(batches)
        try:
            outcomes = await self._validate(group.records)
            return await self._commit(group, outcomes)
        except BaseException:
            self._forget()
            self._planned_seq, self._planned_high = self.cursor, self.high_created_ms
            raise

    def _plan(self, batches: list[Batch]) -> _Group:
        """The checks that need upstream order across DIDs: malformed lines, seq regressions,
        backdating. Returns the records left to validate."""
        records: list[UpstreamRecord] = []
        divergences: list[Divergence] = []
        rejected: collections.Counter[str] = collections.Counter()
        last_seq = self._planned_seq or 0
        high = self._planned_high
        for batch in batches:
            for rec in batch.records:
                if isinstance(rec, MalformedLine):
                    if rec.seq is not None:
                        last_seq = max(last_seq, rec.seq)
                    divergences.append(
                        Divergence(REJECTED, None, None, rec.seq, _text(f"malformed:{rec.reason}"),
                                   _text(rec.reason), rec.raw)
                    )
                    rejected["malformed"] += 1
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
                records.append(rec)
                if high is None or rec.created_ms > high:
                    high = rec.created_ms
        self._planned_seq, self._planned_high = last_seq, high
        return _Group(batches, records, divergences, rejected, last_seq, high)

    async def _validate(self, records: list[UpstreamRecord]) -> list[Outcome]:
        if not records:
            return []
        if self.workers:
            if self._pool is None:
                assert self.connect_kwargs is not None
                self._pool = ValidatorPool(self.workers, self.connect_kwargs, self._cache_dids)
            return await self._pool.validate(records)
        need = self._validator.missing(records)
        loaded = await oplog.load_dids(self.conn, need) if need else {}
        return self._validator.validate(records, loaded)

    async def _commit(self, group: _Group, outcomes: list[Outcome]) -> int:
        ops: list[NewOp] = []
        divergences = list(group.divergences)
        rejected = collections.Counter(group.rejected)
        skipped = 0
        first_seen = self.clock()
        for rec, out in zip(group.records, outcomes):
            kind = out[0]
            if kind == OK:
                _, signer, nullifies, digest, op_bytes = out
                ops.append(NewOp(rec.did, digest, rec.created_ms, rec.seq, first_seen, signer, nullifies, op_bytes))
            elif kind == SKIP:
                skipped += 1
            elif kind == _CONFLICT_OUTCOME:
                divergences.append(self._divergence(CONFLICT, rec, out[1], out[2]))
            else:
                divergences.append(self._divergence(REJECTED, rec, out[1], out[2]))
                rejected[out[1]] += 1
        divergences += await self._flag_divergences(group.records)
        next_cursor = group.batches[-1].next_cursor if group.batches else None
        cursor_seq = next_cursor if isinstance(next_cursor, int) else None
        cursor = Cursor(cursor_seq, group.high) if (cursor_seq is not None or group.high is not None) else None
        inserted = await oplog.commit(
            self.conn, self.upstream_name, ops, cursor, now_ms=self.clock(), divergences=divergences,
            in_transaction=self.fence, after_store=_reconcile_pending,
        )
        self.batches += 1
        self.accepted += len(ops)
        self.stored += inserted
        self.skipped_duplicates += skipped
        self.rejected.update(rejected)
        self.divergences.update(d.kind for d in divergences)
        if cursor_seq is not None:
            self.cursor = cursor_seq
        self.high_created_ms = group.high
        if self.on_commit is not None:
            self.on_commit({o.did for o in ops})
        return inserted

    async def _flag_divergences(self, records: list[UpstreamRecord]) -> list[Divergence]:
        """Upstream `nullified` flags that contradict our stored state (module docstring)."""
        flagged = [r for r in records if r.nullified is not None]
        if not flagged and not self._pending_flags:
            return []
        pending_flags = self._pending_flags
        ours = await _stored_flags(self.conn, [r.key for r in flagged] + list(pending_flags))
        out: list[Divergence] = []
        settled_before = (self.high_created_ms or 0) - RECOVERY_WINDOW_MS - self.backdate_tolerance_ms
        for key, rec in list(pending_flags.items()):  # waiting from earlier commits
            now = ours.get(key)
            if now is None or now:  # not stored after all (refused), or nullified by us too
                del pending_flags[key]
            elif rec.created_ms < settled_before:
                del pending_flags[key]
                out.append(self._mismatch(rec, False, "no op nullifying it reached us within the 72 h "
                                                      "recovery window"))
        for rec in flagged:
            held = ours.get(rec.key)
            if held is not None and held == rec.nullified:
                pending_flags.pop(rec.key, None)
            elif held and not rec.nullified:
                pending_flags.pop(rec.key, None)
                out.append(self._mismatch(rec, True, "upstream served the op that nullifies it"))
            elif rec.nullified:
                pending_flags[rec.key] = rec  # the nullifying op may still be on its way
        while len(pending_flags) > MAX_PENDING_FLAGS:
            key = next(iter(pending_flags))
            log.warning("too many pending nullified flags; not checking %s %s", *key)
            del pending_flags[key]
        return out

    @classmethod
    def _mismatch(cls, rec: UpstreamRecord, ours: bool, why: str) -> Divergence:
        detail = (f"upstream says nullified={'true' if rec.nullified else 'false'}, "
                  f"ours is nullified={'true' if ours else 'false'} ({why}); ours is kept")
        return cls._divergence(NULLIFIED_MISMATCH, rec, None, detail)

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


_FLAGS_SQL = """
SELECT d.did, o.cid, o.nullified FROM plc_did d JOIN plc_op o ON o.did_id = d.id
WHERE d.did = ANY($1::bytea[])
"""


async def _stored_flags(conn: Any, keys: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
    """Our nullified flag of each stored (did, cid) among ``keys`` (absent: not stored)."""
    dids = {k for k in (oplog.did_bytes(did) for did, _ in keys) if k is not None}
    if not dids:
        return {}
    wanted = set(keys)
    out: dict[tuple[str, str], bool] = {}
    for r in await conn.fetch(_FLAGS_SQL, list(dids)):
        key = (oplog.did_text(r[0]), oplog.cid_text(r[1]))
        if key in wanted:
            out[key] = r[2]
    return out


__all__ = ["AUTO", "BACKDATED", "CONFLICT", "LEGACY", "MODES", "NULLIFIED_MISMATCH", "REJECTED",
           "SEQUENCED", "SEQ_REGRESSION", "Ingestor"]


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
