"""Is a submitted op certainly invalid, valid, or not decidable here (the mirror may be behind)?

``check_submission(log, did, op, now_ms=…, raw=…) -> Verdict`` (pure) runs the core's submit
checks (``chain.check_op(mode=SUBMIT)``) against ``log``, this node's state of the DID (stored
ops plus pending ones, see ``apply_pending``). It raises the core's ``OpError`` (the reference's
status and message) for an op that is certainly invalid. Two cases are not decidable from a
mirror that may lag behind its upstream, so the op is let through UNVERIFIED after every check
that does not depend on history (size, strict schema, field limits, prev parsing, strict
signature encoding, NUL):

- ``unverified-unknown-did``: a non-genesis op (prev given) for a well-formed did:plc this node
  holds no op of (the upstream may hold its genesis);
- ``unverified-prev``: the op's prev is no op this node holds for the DID (the upstream may hold
  it).

Anything else the chain engine refuses (a prev that is nullified or a tombstone, a bad signature
against the keys this node knows, the 72 h window, rate limits…) is refused.
``apply_pending(log, did, pending)`` applies pending ops (replay rules, their receive time as
createdAt) on top of the stored log; an op that no longer applies is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from plc.core.chain import REPLAY, SUBMIT, Accepted, DidLog, check_op
from plc.core.encoding import canonical_cid, op_cid
from plc.core.errors import INTERNAL_ERROR_TEXT, OpError, Reason
from plc.core.jsonfmt import dumps_str, v8_order
from plc.core.limits import check_fields, check_size
from plc.core.shape import NUL, OPERATION, SURROGATE, require_shape, schema_ordered, unstorable_text
from plc.core.signatures import SigDecodeError, decode_sig, sig_error
from plc.store.oplog import did_bytes

VERIFIED = "verified"
UNVERIFIED_PREV = "unverified-prev"
UNVERIFIED_UNKNOWN_DID = "unverified-unknown-did"


@dataclass
class Verdict:
    """A submission that may be forwarded. ``accepted`` is set when fully verified."""

    did: str
    cid: str
    validation: str  # VERIFIED, UNVERIFIED_PREV or UNVERIFIED_UNKNOWN_DID
    accepted: Accepted | None

    @property
    def verified(self) -> bool:
        return self.validation == VERIFIED


def _unstorable(kind: str) -> OpError:
    what = "U+0000" if kind == NUL else "a lone surrogate"
    return OpError(Reason.NUL_CHARACTER, INTERNAL_ERROR_TEXT, 500, f"a string holds {what} (jsonb cannot store it)")


def history_free_checks(op: Any, raw: bytes | None) -> None:
    """Every submit check that does not depend on the DID's history, in the core's order."""
    unstorable = unstorable_text(op) if raw is None or b"\\u" in raw else None
    if unstorable == SURROGATE:
        raise _unstorable(unstorable)
    check_size(op)
    kind = require_shape(op, allow_create=False)
    if kind == OPERATION:
        check_fields(op)
    prev = op["prev"]
    if prev:
        try:
            canonical_cid(prev)
        except ValueError:
            raise OpError(
                Reason.PREV_MALFORMED, INTERNAL_ERROR_TEXT, 500, f"prev is not a parseable CID: {prev!r}"
            ) from None
    try:
        decode_sig(op["sig"])
    except SigDecodeError as exc:
        raise sig_error(exc, dumps_str(v8_order(schema_ordered(op)))) from None
    if unstorable:
        raise _unstorable(unstorable)


def _has_prev(op: Any) -> bool:
    return isinstance(op, dict) and isinstance(op.get("prev"), str) and op["prev"] != ""


def check_submission(log: DidLog | None, did: str, op: Any, *, now_ms: int, raw: bytes | None = None) -> Verdict:
    """The verdict on a submitted op (module doc); raises OpError when certainly invalid."""
    if log is None and did_bytes(did) is not None and _has_prev(op):
        history_free_checks(op, raw)
        return Verdict(did, op_cid(op), UNVERIFIED_UNKNOWN_DID, None)
    try:
        acc = check_op(log, did, op, mode=SUBMIT, created_at=now_ms, raw=raw)
    except OpError as err:
        if err.reason == Reason.MISORDERED and log is not None and _has_prev(op):
            try:
                prev = canonical_cid(op["prev"])
            except ValueError:
                raise err from None
            if prev not in log.cids:
                history_free_checks(op, raw)
                return Verdict(did, op_cid(op), UNVERIFIED_PREV, None)
        raise
    return Verdict(did, acc.cid, VERIFIED, acc)


def apply_pending(log: DidLog | None, did: str, pending: Iterable[Any]) -> DidLog | None:
    """``log`` with the pending ops (objects with ``cid``, ``op``, ``created_at``) applied in
    order; ops already in the log or no longer valid on top of it are skipped."""
    for p in pending:
        if log is not None and p.cid in log.cids:
            continue
        try:
            acc = check_op(log, did, p.op, mode=REPLAY, created_at=p.created_at)
        except OpError:
            continue
        if log is None:
            log = DidLog(did)
        log.apply(acc)
    return log


__all__ = [
    "UNVERIFIED_PREV",
    "UNVERIFIED_UNKNOWN_DID",
    "VERIFIED",
    "Verdict",
    "apply_pending",
    "check_submission",
    "history_free_checks",
]
