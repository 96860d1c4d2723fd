"""Ops accepted by an upstream on this node's behalf but not yet ingested ("pending upstream").

When ``POST /:did`` is forwarded and the upstream answers 200, the op is kept in
``plc_pending`` (migration 0003) so that reads on this node show it at once (read-your-write),
before the ingest brings it back from the upstream's export.

API
---
- ``PendingOp``: one row (did, cid, upstream, created_at ms = our receive time, op dict,
  nullifies = CIDs of the ops it nullifies).
- ``add(conn, accepted, now_ms, upstream) -> bool``: keep an accepted op (a second add of the
  same (did, cid) is a no-op; False then).
- ``load(conn, did) -> list[PendingOp]``: a DID's pending ops, oldest first.
- ``merge(rows, pending) -> list[OpRow]``: PURE. The stored rows (audit order) with the pending
  ops appended: a pending op whose CID is already stored is skipped, one that no longer fits
  the chain (its prev is not the live head once the ops it nullifies are marked) is skipped,
  otherwise the rows it nullifies are marked nullified and it is appended.
- ``reconcile(conn, did_cids) -> int``: delete the pending rows among ``did_cids`` ((did, cid)
  pairs) whose op is now stored in plc_op; meant to run inside the ingest's commit transaction.
- ``expire(conn, older_than_ms, now_ms) -> list[Divergence]``: rows whose created_at is more than
  ``older_than_ms`` before ``now_ms`` are deleted; those whose op is still not in plc_op are
  written to plc_divergence as kind ``unpublished`` (one transaction) and returned.
- ``count(conn) -> int``: rows pending (for the gauge).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from plc.core.chain import Accepted
from plc.core.encoding import canonical_cid
from plc.core.jsonfmt import format_ms
from plc.core.render import OpRow

from .oplog import Divergence, cid_digest, did_bytes, stored_op, unpack_op

UNPUBLISHED = "unpublished"


@dataclass(frozen=True)
class PendingOp:
    did: str
    cid: str
    upstream: str
    created_at: int
    op: dict[str, Any] = field(hash=False, compare=False)
    nullifies: tuple[str, ...] = ()


_ADD_SQL = """
INSERT INTO plc_pending (did, cid, upstream, created_at, forwarded_at, nullifies, op)
VALUES ($1, $2, $3, $4, to_timestamp($5::double precision / 1000), $6, $7)
ON CONFLICT (did, cid) DO NOTHING
"""
_LOAD_SQL = """
SELECT did, cid, upstream, created_at, nullifies, op FROM plc_pending
WHERE did = $1 ORDER BY created_at, cid
"""


async def add(conn: Any, accepted: Accepted, now_ms: int, upstream: str) -> bool:
    """Keep ``accepted`` as pending (accepted by ``upstream`` at ``now_ms``)."""
    digest = cid_digest(accepted.cid)
    if digest is None:
        raise ValueError(f"not a dag-cbor sha2-256 CID: {accepted.cid!r}")
    status = await conn.execute(
        _ADD_SQL,
        accepted.did,
        accepted.cid,
        upstream,
        accepted.created_at,
        now_ms,
        [e.cid for e in accepted.nullified],
        stored_op(accepted.op, digest),
    )
    return status.endswith(" 1")


def _pending(r: Any) -> PendingOp:
    return PendingOp(r[0], r[1], r[2], r[3], unpack_op(r[5]), tuple(r[4] or ()))


async def load(conn: Any, did: str) -> list[PendingOp]:
    """``did``'s pending ops, oldest first ([] without a query for anything not a did:plc)."""
    if did_bytes(did) is None:
        return []
    return [_pending(r) for r in await conn.fetch(_LOAD_SQL, did)]


def _prev(op: dict[str, Any]) -> str | None:
    prev = op.get("prev")
    if prev is None:
        return None
    try:
        return canonical_cid(prev)
    except (ValueError, TypeError):
        return prev


def merge(rows: Sequence[OpRow], pending: Iterable[PendingOp]) -> list[OpRow]:
    """The rows a read renders: stored ``rows`` (audit order) plus the pending ops (see the
    module doc). Pure; ``rows`` is not changed."""
    out = list(rows)
    have = {r.cid for r in out}
    for p in sorted(pending, key=lambda p: (p.created_at, p.cid)):
        if p.cid in have:
            continue
        kill = set(p.nullifies)
        live = [r for r in out if not r.nullified and r.cid not in kill]
        head = live[-1].cid if live else None
        if _prev(p.op) != head or (kill and not kill <= {r.cid for r in out}):
            continue  # the stored chain moved on without it: it no longer fits
        if kill:
            out = [r._replace(nullified=True) if r.cid in kill else r for r in out]
        out.append(OpRow(p.did, p.op, p.cid, p.created_at, False, None))
        have.add(p.cid)
    return out


_RECONCILE_SQL = """
DELETE FROM plc_pending p
USING unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[]) AS x(did, cid, did_b, cid_b)
WHERE p.did = x.did AND p.cid = x.cid
  AND EXISTS (SELECT 1 FROM plc_did d JOIN plc_op o ON o.did_id = d.id
              WHERE d.did = x.did_b AND o.cid = x.cid_b)
"""


_ANY_SQL = "SELECT EXISTS (SELECT 1 FROM plc_pending)"


def _keys(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str], list[bytes], list[bytes]]:
    dids: list[str] = []
    cids: list[str] = []
    dbs: list[bytes] = []
    cbs: list[bytes] = []
    for did, cid in pairs:
        db, cb = did_bytes(did), cid_digest(cid)
        if db is None or cb is None:
            continue
        dids.append(did)
        cids.append(cid)
        dbs.append(db)
        cbs.append(cb)
    return dids, cids, dbs, cbs


async def reconcile(conn: Any, did_cids: Iterable[tuple[str, str]]) -> int:
    """Delete the pending rows among ``did_cids`` whose op is stored in plc_op; returns how
    many. When nothing is pending at all (the usual case) this is one tiny query and
    ``did_cids`` (which may be a generator) is not even read. A row added by another node
    meanwhile and left behind is harmless: reads skip a pending op already stored, and
    ``expire`` drops it without a divergence."""
    if not await conn.fetchval(_ANY_SQL):
        return 0
    dids, cids, dbs, cbs = _keys(did_cids)
    if not dids:
        return 0
    status = await conn.execute(_RECONCILE_SQL, dids, cids, dbs, cbs)
    return int(status.rsplit(" ", 1)[-1])


_EXPIRE_SQL = """
DELETE FROM plc_pending WHERE created_at < $1
RETURNING did, cid, upstream, created_at, nullifies, op
"""
_STORED_SQL = """
SELECT x.i FROM unnest($1::bytea[], $2::bytea[]) WITH ORDINALITY AS x(did_b, cid_b, i)
WHERE EXISTS (SELECT 1 FROM plc_did d JOIN plc_op o ON o.did_id = d.id
              WHERE d.did = x.did_b AND o.cid = x.cid_b)
"""
_DIVERGENCE_SQL = """
INSERT INTO plc_divergence (kind, upstream, did, cid, seq, reason, detail, raw, observed_at)
VALUES ($1, $2, $3, $4, NULL, $5, $6, $7, $8)
"""


async def expire(conn: Any, older_than_ms: int, now_ms: int) -> list[Divergence]:
    """Delete rows received more than ``older_than_ms`` before ``now_ms``; the ones whose op
    never reached plc_op become ``unpublished`` divergences (written and returned)."""
    out: list[Divergence] = []
    async with conn.transaction():
        rows = [_pending(r) for r in await conn.fetch(_EXPIRE_SQL, now_ms - older_than_ms)]
        if not rows:
            return out
        dbs = [did_bytes(p.did) or b"" for p in rows]
        cbs = [cid_digest(p.cid) or b"" for p in rows]
        stored = {r[0] - 1 for r in await conn.fetch(_STORED_SQL, dbs, cbs)}
        for i, p in enumerate(rows):
            if i in stored:
                continue
            detail = (
                f"accepted upstream but never published: {p.upstream} answered 200 to the op "
                f"received at {format_ms(p.created_at)}, and it was not ingested within "
                f"{older_than_ms / 1000:g}s"
            )
            d = Divergence(UNPUBLISHED, p.did, p.cid, None, UNPUBLISHED, detail, orjson.dumps(p.op))
            await conn.execute(_DIVERGENCE_SQL, d.kind, p.upstream, d.did, d.cid, d.reason, d.detail, d.raw, now_ms)
            out.append(d)
    return out


async def count(conn: Any) -> int:
    """How many ops are pending."""
    return int(await conn.fetchval("SELECT count(*) FROM plc_pending"))


__all__ = ["UNPUBLISHED", "PendingOp", "add", "count", "expire", "load", "merge", "reconcile"]
