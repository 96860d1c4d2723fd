"""Replay validation of upstream records against each DID's stored history, in-process or in
worker processes (one per core), for the ingestor (`plc.sync.ingest`).

`Validator` holds an LRU cache of DID states (`DidLog`) and checks records with
`chain.check_op` in replay mode. It needs the state of every DID it has not cached: `missing()`
names them, the caller loads them from the database (`oplog.load_dids`), `validate()` checks
the records and returns one `Outcome` tuple per record, in order:

- ``(OK, signer, nullifies, digest, op_bytes)``: accepted; the op is already packed
  (`oplog.stored_op`) so the committing process only copies bytes;
- ``(SKIP,)``: the very op is already stored (same CID, same createdAt): page overlaps, replays;
- ``(CONFLICT, reason, detail)``: same DID and CID stored with another createdAt;
- ``(REJECT, reason, detail)``: the core refused it (or failed on it: ``error:<Exception>``).

Correctness of the cache: the validator applies each accepted op to its cached state before the
op is committed, so it must be told when that did not happen (`clear()`, or the worker pool is
discarded). A DID's state is loaded from the database only when it is not cached; every DID of
a batch not yet committed is cached (it was just validated), and least-recently-used eviction
never drops it while the cache holds more than the DIDs of the batches in flight.

`ValidatorPool(workers, connect_kwargs)`: the same in `workers` processes, each with its own
`Validator` and its own database connection; records are sharded by DID (a DID's ops always go
to the same process, in order), and `validate(records)` gathers the outcomes back into
upstream order. `close()` discards the processes and so their caches.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import zlib
from collections.abc import Sequence
from typing import Any

from ..core.chain import REPLAY, DidLog, check_op
from ..core.errors import OpError, Reason
from ..store import oplog
from .upstream import MalformedLine, UpstreamRecord, parse_line

log = logging.getLogger(__name__)

OK = "ok"
SKIP = "skip"
CONFLICT = "conflict"
REJECT = "reject"

Outcome = tuple[Any, ...]
_PR_SET_PDEATHSIG = 1
WORKER_CONNECT_TIMEOUT_S = 10.0
WORKER_QUERY_TIMEOUT_S = 60.0  # a state load that takes longer is a dead connection
DEFAULT_CACHE_DIDS = 100_000


class Validator:
    """Check records against cached DID states (see the module docstring)."""

    def __init__(self, cache_dids: int = DEFAULT_CACHE_DIDS):
        if cache_dids < 1:
            raise ValueError("cache_dids must be >= 1")
        self.size = cache_dids
        self._cache: collections.OrderedDict[str, DidLog | None] = collections.OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    def missing(self, records: Sequence[UpstreamRecord]) -> list[str]:
        """The DIDs of ``records`` whose state is not cached."""
        return list({r.did for r in records if r.did not in self._cache})

    def validate(self, records: Sequence[UpstreamRecord], loaded: dict[str, DidLog | None]) -> list[Outcome]:
        """One outcome per record; ``loaded`` holds the state of every DID ``missing`` named."""
        cache = self._cache
        for did, state in loaded.items():
            cache[did] = state
        out: list[Outcome] = []
        for rec in records:
            did = rec.did
            if did in cache:
                cache.move_to_end(did)
                dlog = cache[did]
            else:  # evicted since missing() (a batch larger than the cache): never guess
                raise RuntimeError(f"state of {did} is not loaded")
            out.append(self._check(rec, dlog))
        while len(cache) > self.size:
            cache.popitem(last=False)
        return out

    def _check(self, rec: UpstreamRecord, dlog: DidLog | None) -> Outcome:
        try:
            acc = check_op(dlog, rec.did, rec.operation, mode=REPLAY, created_at=rec.created_ms,
                           cid=rec.cid, raw=rec.raw)
        except OpError as err:
            if err.reason == Reason.DUPLICATE and dlog is not None:
                stored = next((e for e in dlog.entries if e.cid == rec.cid), None)
                if stored is not None and stored.created_at == rec.created_ms:
                    return (SKIP,)
                other = "?" if stored is None else stored.created_at
                return (CONFLICT, err.reason,
                        f"op already stored with createdAt {other}, upstream now says {rec.created_ms}")
            return (REJECT, err.reason, err.detail)
        except Exception as exc:  # noqa: BLE001 - a core bug must not stop the mirror
            log.exception("core failed on %s %s", rec.did, rec.cid)
            return (REJECT, f"error:{type(exc).__name__}", f"{type(exc).__name__}: {exc}")
        if dlog is None:
            dlog = DidLog(rec.did)
            self._cache[rec.did] = dlog
        dlog.apply(acc)
        packed = oplog.new_op(acc, None, 0)
        return (OK, packed.signer, packed.nullifies, packed.digest, packed.op)


# ----------------------------------------------------------------------------- worker processes
_worker: dict[str, Any] = {}


def _die_with(parent: int) -> None:
    """Linux: be killed when the parent dies (a kill -9 of `plc sync` must not leave workers
    holding database connections and the parent's stderr)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _worker_init(parent: int, connect_kwargs: dict[str, Any], cache_dids: int) -> None:
    import asyncpg

    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop

    loop = asyncio.new_event_loop()
    _worker["loop"] = loop
    _worker["conn"] = loop.run_until_complete(
        asyncpg.connect(**{"timeout": WORKER_CONNECT_TIMEOUT_S, "command_timeout": WORKER_QUERY_TIMEOUT_S,
                           **connect_kwargs})
    )
    _worker["validator"] = Validator(cache_dids)


def _worker_validate(lines: list[bytes]) -> list[Outcome]:
    """Parse the lines again (cheaper than pickling parsed ops) and validate them."""
    records = []
    for raw in lines:
        try:
            records.append(parse_line(raw))
        except MalformedLine as exc:  # the parent parsed it fine: cannot happen
            raise RuntimeError(f"line no longer parses: {exc.reason}") from None
    v: Validator = _worker["validator"]
    need = v.missing(records)
    loaded = _worker["loop"].run_until_complete(oplog.load_dids(_worker["conn"], need)) if need else {}
    return v.validate(records, loaded)


def shard_of(did: str, shards: int) -> int:
    return zlib.crc32(did.encode()) % shards


class ValidatorPool:
    """`workers` validation processes, records sharded by DID (see the module docstring)."""

    def __init__(self, workers: int, connect_kwargs: dict[str, Any], cache_dids: int = DEFAULT_CACHE_DIDS):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        ctx = multiprocessing.get_context("spawn")  # never fork a process with a running loop
        self.workers = workers
        self._executors = [
            concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=ctx, initializer=_worker_init,
                initargs=(os.getpid(), connect_kwargs, max(1, cache_dids // workers)),
            )
            for _ in range(workers)
        ]

    async def validate(self, records: Sequence[UpstreamRecord]) -> list[Outcome]:
        shards: list[list[int]] = [[] for _ in range(self.workers)]
        for i, rec in enumerate(records):
            shards[shard_of(rec.did, self.workers)].append(i)
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(ex, _worker_validate, [records[i].raw for i in idx])
            for ex, idx in zip(self._executors, shards)
            if idx
        ]
        results = await asyncio.gather(*futures)
        out: list[Outcome] = [()] * len(records)
        for idx, res in zip((s for s in shards if s), results):
            for i, o in zip(idx, res):
                out[i] = o
        return out

    def close(self) -> None:
        """Stop the workers at once, never waiting for them: a worker may be stuck on a query
        over a dead database connection (a partition), and the caller must stop ingesting
        now. Workers are terminated (SIGTERM, and the executor reaps them)."""
        for ex in self._executors:
            processes = list((getattr(ex, "_processes", None) or {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                with contextlib.suppress(Exception):
                    proc.terminate()


__all__ = ["CONFLICT", "OK", "REJECT", "SKIP", "Validator", "ValidatorPool", "shard_of"]
