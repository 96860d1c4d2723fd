"""The chain engine: is this op a valid next op for this DID? (spec §4)

One engine, two modes:

- ``REPLAY``: history received from an upstream. The op's own createdAt is the clock; the
  POST-only limits and the per-DID rate limit do not apply; the CID upstream gave must equal
  the computed one; a regular update must be later than its prev (go-didplc's sanity check).
- ``SUBMIT``: a new op. Size, strict schema, every count/length limit, the rate limit, and the
  reference's exact status codes and messages; the clock is the caller's ``now``.

Nullification is always computed here, never taken from the input. Authority for a fork is
decided by the key that signed the first op being discarded (``OpEntry.signer``), recorded
when that op was accepted, so no signature is ever verified twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from .encoding import authority_keys, canonical_cid, cid_for_cbor, dag_cbor, did_for_cbor, unsigned_from_signed
from .errors import INTERNAL_ERROR_TEXT, MISORDERED_TEXT, OpError, Reason
from .jsonfmt import dumps_str, v8_order
from .limits import check_fields, check_rate, check_size
from .shape import NUL, OPERATION, SURROGATE, TOMBSTONE, require_shape, schema_ordered, unstorable_text
from .didkey import parse_rotation_key
from .signatures import SigDecodeError, UnsupportedKeyError, decode_sig, first_verifying_key, is_low_s, sig_error

REPLAY = "replay"
SUBMIT = "submit"
RECOVERY_WINDOW_MS = 72 * 3_600_000


@dataclass(slots=True)
class OpEntry:
    """One accepted op of a DID, as the engine needs it."""

    cid: str
    created_at: int  # ms since the epoch
    op: dict[str, Any]  # the op as received (key order irrelevant)
    keys: tuple[str, ...]  # rotation keys that may sign a child (empty for a tombstone)
    signer: int  # index, in the parent's keys, of the key that signed this op (-1: genesis)
    tombstone: bool = False
    nullified: bool = False


@dataclass(slots=True)
class DidLog:
    """Every accepted op of one DID in order, and the live (non-nullified) chain."""

    did: str
    entries: list[OpEntry] = field(default_factory=list)
    live: list[OpEntry] = field(default_factory=list)
    cids: set[str] = field(default_factory=set)

    def head(self) -> OpEntry | None:
        return self.live[-1] if self.live else None

    def apply(self, acc: "Accepted") -> OpEntry:
        """Commit an accepted op: nullify what it discards, append it."""
        for e in acc.nullified:
            e.nullified = True
        if acc.nullified:
            del self.live[len(self.live) - len(acc.nullified) :]
        entry = OpEntry(acc.cid, acc.created_at, acc.op, acc.keys, acc.signer, acc.tombstone)
        self.entries.append(entry)
        self.live.append(entry)
        self.cids.add(acc.cid)
        return entry


@dataclass(slots=True)
class Accepted:
    """The outcome of a successful check: what to store."""

    did: str
    cid: str
    created_at: int
    op: dict[str, Any]
    keys: tuple[str, ...]
    signer: int
    tombstone: bool
    prev: str | None  # canonical form of the prev CID
    nullified: list[OpEntry]


def _op_json(op: dict[str, Any]) -> str:
    """The op as the reference's `JSON.stringify(parsedOp)` prints it in error messages."""
    return dumps_str(v8_order(schema_ordered(op)))


def _bad_sig(op: dict[str, Any], keys: tuple[str, ...] = (), sig: bytes = b"") -> OpError:
    """Invalid signature; the reason says `sig_high_s` when the S value is what fails."""
    reason = Reason.SIG_INVALID
    for k in keys:
        pk = parse_rotation_key(k)
        if pk is not None and len(sig) == 64 and not is_low_s(pk.curve, sig):
            reason = Reason.SIG_HIGH_S
            break
    return OpError(reason, f"Invalid signature on op: {_op_json(op)}")


def _misordered() -> OpError:
    return OpError(Reason.MISORDERED, MISORDERED_TEXT)


def _signer(keys: tuple[str, ...], digest: bytes, sig: bytes, op: dict[str, Any]) -> int:
    """Index of the key that signed ``op`` (first in list order), else OpError."""
    try:
        i = first_verifying_key(keys, digest, sig)
    except UnsupportedKeyError as exc:
        raise OpError(
            Reason.UNSUPPORTED_KEY, INTERNAL_ERROR_TEXT, 500, f"rotation key is not a usable k256/p256 did:key: {exc}"
        ) from None
    if i < 0:
        raise _bad_sig(op, keys, sig)
    return i


def _unstorable(kind: str) -> OpError:
    what = "U+0000" if kind == NUL else "a lone surrogate"
    return OpError(Reason.NUL_CHARACTER, INTERNAL_ERROR_TEXT, 500, f"a string holds {what} (jsonb cannot store it)")


def _decode_sig(op: dict[str, Any]) -> bytes:
    try:
        return decode_sig(op["sig"])
    except SigDecodeError as exc:
        raise sig_error(exc, _op_json(op)) from None


def check_op(
    log: DidLog | None,
    did: str,
    op: Any,
    *,
    mode: str,
    created_at: int,
    cid: str | None = None,
    raw: bytes | None = None,
) -> Accepted:
    """Validate ``op`` as the next op of ``did`` given its accepted history ``log``.

    ``created_at`` is the op's timestamp: upstream's createdAt in replay mode, the receive time
    (the caller's clock) in submit mode. ``cid`` is upstream's claimed CID (replay). ``raw`` is
    the JSON text the op came from, if known; it lets the NUL check skip clean inputs.
    Raises OpError; returns what to store.
    """
    submit = mode == SUBMIT
    unstorable = unstorable_text(op) if raw is None or b"\\u" in raw else None
    # A lone surrogate cannot even be encoded; a NUL is found by the reference only in its
    # database, after every other check (submit), and is refused at once in replay.
    if unstorable == SURROGATE or (unstorable and not submit):
        raise _unstorable(unstorable)
    if submit:
        check_size(op)
    kind = require_shape(op, allow_create=not submit)
    if submit and kind == OPERATION:
        check_fields(op)

    signed = dag_cbor(op)
    computed_cid = cid_for_cbor(signed)
    if cid is not None and cid != computed_cid:
        raise OpError(Reason.CID_MISMATCH, f"CID mismatch: upstream says {cid}, op hashes to {computed_cid}")
    if not submit and log is not None and computed_cid in log.cids:
        raise OpError(Reason.DUPLICATE, f"Duplicate operation: {computed_cid}")
    digest = hashlib.sha256(unsigned_from_signed(signed, op)).digest()
    tombstone = kind == TOMBSTONE
    live = log.live if log is not None else []

    if not live:
        # ---- genesis (§4.1)
        if tombstone:
            raise _misordered()
        keys = authority_keys(op)
        sig = _decode_sig(op)
        _signer(keys, digest, sig, op)
        computed_did = did_for_cbor(signed)
        if computed_did != did:
            raise OpError(Reason.GENESIS_HASH, f"Hash of genesis operation does not match DID identifier: {computed_did}")
        if op["prev"] is not None:
            raise OpError(
                Reason.GENESIS_PREV, "Improperly formatted operation, expected null prev on create: [object Object]"
            )
        acc = Accepted(did, computed_cid, created_at, op, keys, -1, False, None, [])
    else:
        # ---- update (§4.2)
        prev_text = op["prev"]
        if not prev_text:
            raise _misordered()
        idx = len(live) - 1
        if prev_text == live[idx].cid:  # the common case: a canonical prev naming the head
            prev = prev_text
        else:
            try:
                prev = canonical_cid(prev_text)
            except ValueError:
                raise OpError(
                    Reason.PREV_MALFORMED, INTERNAL_ERROR_TEXT, 500, f"prev is not a parseable CID: {prev_text!r}"
                ) from None
        while idx >= 0 and live[idx].cid != prev:
            idx -= 1
        if idx < 0:
            raise _misordered()
        parent = live[idx]
        if parent.tombstone:
            raise _misordered()
        nullified = live[idx + 1 :]
        sig = _decode_sig(op)
        if not nullified:
            signer = _signer(parent.keys, digest, sig, op)
            if not submit and created_at <= parent.created_at:
                raise OpError(
                    Reason.TIMESTAMP_ORDER,
                    f"Operation createdAt is not after its prev's ({created_at} <= {parent.created_at})",
                )
        else:
            disputed = nullified[0]
            signer = _signer(parent.keys[: disputed.signer], digest, sig, op)
            if created_at <= live[-1].created_at:
                raise _misordered()
            lapsed = created_at - disputed.created_at
            if lapsed > RECOVERY_WINDOW_MS:
                raise OpError(
                    Reason.LATE_RECOVERY,
                    "Recovery operation occurred outside of the allowed 72 hr recovery window. "
                    f"Time lapsed: {lapsed}",
                )
        if submit and not nullified:
            check_rate([e.created_at for e in live], created_at)
        acc = Accepted(
            did, computed_cid, created_at, op, authority_keys(op), signer, tombstone, prev, nullified
        )
    if unstorable:
        raise _unstorable(unstorable)
    return acc


def replay(did: str, items: list[tuple[dict[str, Any], int, str | None]]) -> tuple[DidLog, list[tuple[int, OpError]]]:
    """Replay a DID's history [(op, createdAt ms, claimed cid)] in order.

    Returns the resulting log and the rejected ops as (index, error); a rejected op is
    skipped, as a mirror would, and later ops are checked against what was accepted.
    """
    log = DidLog(did)
    rejected: list[tuple[int, OpError]] = []
    for i, (op, created_at, cid) in enumerate(items):
        try:
            acc = check_op(log, did, op, mode=REPLAY, created_at=created_at, cid=cid)
        except OpError as err:
            rejected.append((i, err))
            continue
        log.apply(acc)
    return log, rejected


__all__ = ["REPLAY", "SUBMIT", "OpEntry", "DidLog", "Accepted", "check_op", "replay"]
