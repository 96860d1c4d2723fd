"""The reads behind ``GET /export`` (spec §1.5).

- sequenced mode (``after`` all digits): ``plc.store.oplog.export_rows`` (seq > after, seq order);
- legacy mode: ``legacy_rows(conn, after_ms, count)``: ops with createdAt > ``after_ms`` (or all
  when None), ordered by createdAt then by the CID *text* bytewise (the reference's ``C``
  collation), unsequenced ops included. The store keeps CIDs as digests, whose byte order is
  not the text's, so the rows sharing the last page's millisecond are all read and the tie is
  broken here.
"""

from __future__ import annotations

from typing import Any

from plc.core.render import OpRow
from plc.store.oplog import cid_text, did_text, unpack_op

MAX_SEQ = 2**63 - 1

_SELECT = """
SELECT d.did, o.op, o.cid, o.created_at, o.nullified, o.seq
FROM plc_op o JOIN plc_did d ON d.id = o.did_id
"""
_PAGE_SQL = _SELECT + "WHERE o.created_at > $1 ORDER BY o.created_at LIMIT $2"
_FIRST_PAGE_SQL = _SELECT + "ORDER BY o.created_at LIMIT $1"
_AT_SQL = _SELECT + "WHERE o.created_at = $1"


def _row(r: Any) -> OpRow:
    return OpRow(did_text(r[0]), unpack_op(r[1]), cid_text(r[2]), r[3], r[4], r[5])


def _order_key(r: Any) -> tuple[int, str]:
    return (r[3], cid_text(r[2]))


async def legacy_rows(conn: Any, after_ms: int | None, count: int) -> list[OpRow]:
    """At most ``count`` ops with createdAt > ``after_ms`` in (createdAt, cid text) order."""
    if after_ms is None:
        rows = await conn.fetch(_FIRST_PAGE_SQL, count)
    else:
        rows = await conn.fetch(_PAGE_SQL, after_ms, count)
    if len(rows) == count and rows:
        last = rows[-1][3]
        rows = [r for r in rows if r[3] != last] + list(await conn.fetch(_AT_SQL, last))
    rows = sorted(rows, key=_order_key)[:count]
    return [_row(r) for r in rows]
