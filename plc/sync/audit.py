"""The history audit: re-read upstream's sequenced `/export` over a seq range we already hold and
compare it with what we store (spec §7 item 39: upstream history can shrink).

`audit(conn, upstream, upstream_name=..., start=None, end=None, stop=None, max_pages=None)`
walks `/export?after=<seq>` pages from `start` (exclusive) to `end` (inclusive; default: the
highest seq we hold when the audit begins). For each page it takes the seq range the page
covers — `(after, last seq on the page]`, or `(after, end]` once upstream answers a short page
(it has nothing more) — and compares our stored seqs in that range with the seqs upstream
served:

- a seq we hold that upstream skips → divergence ``vanished`` (did, cid, our seq, a detail; no
  raw line). The op is KEPT and still served: nothing is ever deleted on upstream's word. A
  (did, cid) already recorded as vanished (by an earlier run) is not recorded again.
- a seq upstream serves that we do not hold → listed as ``missing`` in the report (the ingest
  stores such ops in the normal way, validated; the audit stores no op);
- a seq we hold that upstream serves with another (did, cid) → listed as ``mismatched``.

Gaps (seqs neither side has) are normal upstream (sequence gaps) and mean nothing.

Resumable: after each page the divergences and the audit position are committed in one
transaction (`oplog.commit` with the cursor row ``"audit " + upstream_name``, seq = position),
and `start=None` resumes from that position (0 when there is none). `start=0` audits
everything again. Polite: every page goes through the `Upstream`'s request limiter and retries,
so an audit sharing an `Upstream` with the ingest shares its budget. `max_pages` / `stop` end a
run early (`complete` is False); the ingest loop can call `audit(..., max_pages=1)` between
batches to audit a little at a time (with the same `fence` as its commits).

An upstream without seq (legacy mode) cannot be audited this way: `AuditError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..store import oplog
from ..store.oplog import Cursor, Divergence
from .upstream import MalformedLine, Upstream, UpstreamRecord

VANISHED = "vanished"
CURSOR_PREFIX = "audit "
MAX_LISTED = 1000  # missing / mismatched entries listed in a report (all are counted)

_MAX_SEQ_SQL = "SELECT max(seq) FROM plc_op"
_OURS_SQL = """
SELECT o.seq, d.did, o.cid FROM plc_op o JOIN plc_did d ON d.id = o.did_id
WHERE o.seq > $1 AND o.seq <= $2 ORDER BY o.seq
"""
_RECORDED_SQL = "SELECT did, cid FROM plc_divergence WHERE kind = $1 AND did = ANY($2::text[])"


class AuditError(Exception):
    """The audit cannot go on (the message says why)."""


def cursor_name(upstream_name: str) -> str:
    """The plc_cursor row that holds the audit position for ``upstream_name``."""
    return CURSOR_PREFIX + upstream_name


@dataclass
class AuditReport:
    """What one `audit` run found. Seqs are upstream's; `start` exclusive, `end` inclusive."""

    upstream: str
    start: int
    end: int
    position: int  # audited through this seq
    pages: int = 0
    checked: int = 0  # our ops compared
    served: int = 0  # upstream lines in the audited range
    vanished: list[tuple[int, str, str]] = field(default_factory=list)  # (seq, did, cid)
    vanished_recorded: int = 0  # new `vanished` divergences written by this run
    missing: list[tuple[int, str, str]] = field(default_factory=list)
    missing_count: int = 0
    mismatched: list[tuple[int, str, str, str, str]] = field(default_factory=list)  # seq, ours, theirs
    mismatched_count: int = 0

    @property
    def complete(self) -> bool:
        return self.position >= self.end

    def as_dict(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "start": self.start,
            "end": self.end,
            "position": self.position,
            "complete": self.complete,
            "pages": self.pages,
            "checked": self.checked,
            "served": self.served,
            "vanished": [{"seq": s, "did": d, "cid": c} for s, d, c in self.vanished],
            "vanished_recorded": self.vanished_recorded,
            "missing": [{"seq": s, "did": d, "cid": c} for s, d, c in self.missing],
            "missing_count": self.missing_count,
            "mismatched": [
                {"seq": s, "ours": {"did": d, "cid": c}, "upstream": {"did": ud, "cid": uc}}
                for s, d, c, ud, uc in self.mismatched
            ],
            "mismatched_count": self.mismatched_count,
        }


def _served(page: list[UpstreamRecord | MalformedLine]) -> dict[int, tuple[str, str] | None]:
    """seq -> (did, cid) of every line with a seq (None for a malformed line with a readable
    seq: upstream still serves something there)."""
    out: dict[int, tuple[str, str] | None] = {}
    for item in page:
        if item.seq is None:
            if isinstance(item, UpstreamRecord):
                raise AuditError("upstream serves lines without seq (legacy mode): "
                                 "it cannot be audited by seq")
            continue
        out[item.seq] = item.key if isinstance(item, UpstreamRecord) else None
    return out


async def _recorded(conn: Any, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    if not keys:
        return set()
    rows = await conn.fetch(_RECORDED_SQL, VANISHED, list({d for d, _ in keys}))
    return {(r[0], r[1]) for r in rows}


async def audit(
    conn: Any,
    upstream: Upstream,
    *,
    upstream_name: str,
    start: int | None = None,
    end: int | None = None,
    stop: asyncio.Event | None = None,
    max_pages: int | None = None,
    clock: Callable[[], int] = lambda: int(time.time() * 1000),
    fence: Callable[[Any], Awaitable[Any]] | None = None,
    on_page: Callable[[AuditReport], Any] | None = None,
) -> AuditReport:
    """Audit ``(start, end]`` (see the module docstring); returns the report of this run."""
    name = cursor_name(upstream_name)
    if start is None:
        saved = await oplog.get_cursor(conn, name)
        start = saved.seq if saved is not None and saved.seq is not None else 0
    if end is None:
        end = await conn.fetchval(_MAX_SEQ_SQL) or 0
    if start < 0 or end < 0:
        raise ValueError("start and end must be >= 0")
    report = AuditReport(upstream_name, start, end, start)
    after = start
    count = upstream.page_count
    while after < end:
        if (stop is not None and stop.is_set()) or (max_pages is not None and report.pages >= max_pages):
            break
        page = await upstream.export_page(after, count)
        served = {s: k for s, k in _served(page).items() if s > after}
        if len(page) < count:
            upper = end  # upstream has nothing beyond this page: the rest of the range is covered
        elif not served:
            raise AuditError(f"upstream's full page after seq {after} holds no seq above it")
        else:
            upper = min(max(served), end)
        ours = await conn.fetch(_OURS_SQL, after, upper)
        held: dict[int, tuple[str, str]] = {r[0]: (oplog.did_text(r[1]), oplog.cid_text(r[2])) for r in ours}
        gone: list[tuple[int, str, str]] = []
        for seq, key in held.items():
            theirs = served.get(seq, ())
            if theirs == ():
                gone.append((seq, *key))
            elif theirs is not None and theirs != key:
                report.mismatched_count += 1
                if len(report.mismatched) < MAX_LISTED:
                    report.mismatched.append((seq, *key, *theirs))
        for seq, key in served.items():
            if seq <= upper and seq not in held and key is not None:
                report.missing_count += 1
                if len(report.missing) < MAX_LISTED:
                    report.missing.append((seq, *key))
        already = await _recorded(conn, [(d, c) for _, d, c in gone])
        divergences = []
        for seq, did, cid in gone:
            if (did, cid) in already:
                continue
            already.add((did, cid))
            divergences.append(Divergence(
                VANISHED, did, cid, seq, None,
                f"upstream /export no longer serves seq {seq} (audited range {after}..{upper}); "
                "the op is kept and still served", None,
            ))
        await oplog.commit(conn, name, [], Cursor(upper, None), now_ms=clock(), divergences=divergences,
                           in_transaction=fence)
        report.vanished.extend(gone)
        report.vanished_recorded += len(divergences)
        report.checked += len(held)
        report.served += sum(1 for s in served if s <= upper)
        report.pages += 1
        report.position = after = upper
        if on_page is not None:
            on_page(report)
    return report


__all__ = ["AuditError", "AuditReport", "CURSOR_PREFIX", "MAX_LISTED", "VANISHED", "audit", "cursor_name"]
