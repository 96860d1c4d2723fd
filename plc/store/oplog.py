"""The op log in PostgreSQL: load a DID's chain state, commit accepted ops with the cursor,
and the reads the HTTP API renders from (asyncpg; one connection passed in).

API
---
- ``pack_op(op) -> bytes`` / ``unpack_op(data) -> dict``: the compact stored form of an op (below).
- ``load_did(conn, did) -> DidLog | None``: the chain engine's state for one DID, ONE query.
- ``commit(conn, upstream, items, cursor, *, now_ms=None) -> int``: store a batch of accepted
  ops and move the upstream's cursor in ONE transaction; returns how many ops were inserted.
  ``items`` is a list of ``(chain.Accepted, seq | None, first_seen_at_ms)`` in the order they
  were applied; ``cursor`` a ``Cursor(seq, created_at)`` or None (leave the cursor alone);
  optional ``divergences=[Divergence(kind, did, cid, seq, reason, detail, raw), …]`` are written
  to plc_divergence (observed_at = now_ms) in the same transaction; ``in_transaction(conn)`` runs
  first inside it (the ingest leader's fence). ``items`` may also be ``NewOp``s (``new_op``:
  already packed, as validation workers hand them over).
- ``get_cursor(conn, upstream) -> Cursor | None``.
- ``did_bytes(did)`` / ``did_text(data)``: a did:plc as stored in plc_did.did (15 bytes).
- ``cid_digest(text)`` / ``cid_text(digest)``: a CID as stored in plc_op.cid (32-byte digest).
- ``did_rows(conn, did) -> list[render.OpRow]``: every op of a DID in audit order (op as a dict),
  what /log, /log/audit, /log/last, /data and the document are rendered from.
- ``export_rows(conn, after, count) -> list[render.OpRow]``: ops with seq > ``after`` in seq
  order, at most ``count``.

Duplicates: ``commit`` first looks up, inside its transaction, which of the batch's ops each
DID already holds and SKIPS them (a batch replayed after a crash stores nothing twice and gets
no positions wrong); the nullified flags a skipped op implies are still (idempotently) set. The
primary key of plc_op is (did_id, pos) (migration 0005: far smaller than one on the CID), so a
concurrent writer on the same DID, which must compute the same next position, raises
asyncpg.UniqueViolationError and its whole batch, cursor included, is rolled back. One writer
per DID is the caller's job (plc.sync.leader fences it).

Stored op form (``op`` column): DAG-CBOR of a packed value that ``unpack_op`` turns back into
exactly the op received (``dag_cbor(unpack_op(pack_op(op))) == dag_cbor(op)``, so its CID and
rendered JSON are unchanged; ``commit`` verifies this for every op and falls back to the plain
DAG-CBOR map when it would not hold):

- an op of an exact known shape becomes an array by field position, without the key names
  and the type: ``plc_operation`` → ``[sig, prev, rotationKeys, [vm name, key, …],
  alsoKnownAs, [service name, type, endpoint, …]]``, ``plc_tombstone`` → ``[sig, prev]``,
  legacy ``create`` → ``[sig, signingKey, recoveryKey, handle, service]``; anything else stays a map;
- inside, a string value may become a byte string with a leading tag (JSON ops hold no byte
  strings, so a byte string is always a packed string): 0x01 + 64 bytes = base64url `sig`;
  0x02 + 32 bytes = canonical ``bafyrei…`` CID; 0x03/0x04 + 33 bytes = k256/P-256 did:key;
  0x05 + index = a word of ``WORDS``; 0x10+i + UTF-8 = ``AFFIXES[i]`` prefix + text + suffix.
  Each is used only when it decodes back to the very same string.
"""

from __future__ import annotations

import base64
import hashlib
import time
from functools import lru_cache
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import libipld

from plc.core.chain import Accepted, DidLog, OpEntry
from plc.core.didkey import K256, P256, KeyError_, decode_did_key, format_did_key
from plc.core.encoding import CID_PREFIX, authority_keys, dag_cbor
from plc.core.render import OpRow
from plc.core.shape import CREATE, OPERATION, TOMBSTONE, op_type

# ----------------------------------------------------------------------------- packed op form
TAG_SIG = 1
TAG_CID = 2
TAG_K256 = 3
TAG_P256 = 4
TAG_WORD = 5
TAG_AFFIX = 0x10

WORDS = ("AtprotoPersonalDataServer", "atproto", "atproto_pds", "plc_operation", "plc_tombstone")
# (prefix, suffix), most specific first: the first that fits is used
AFFIXES = (
    ("https://", ".host.bsky.network"),
    ("at://", ".bsky.social"),
    ("https://", ".bsky.social"),
    ("https://", ""),
    ("at://", ""),
    ("http://", ""),
)
_WORD_INDEX = {w: i for i, w in enumerate(WORDS)}
_CURVE_TAG = {K256: TAG_K256, P256: TAG_P256}
_TAG_CURVE = {TAG_K256: K256, TAG_P256: P256}
_CID_TEXT_PREFIX = "b" + base64.b32encode(CID_PREFIX + bytes(32)).decode().lower()[:6]  # "bafyrei"


def cid_text(digest: bytes) -> str:
    """The canonical ``bafyrei…`` text of a dag-cbor sha2-256 CID from its 32-byte digest."""
    return libipld.encode_multibase("b", CID_PREFIX + digest)


def cid_digest(text: str) -> bytes | None:
    """The 32-byte digest of a canonical ``bafyrei…`` CID text; None for any other form."""
    if len(text) != 59 or not text.startswith(_CID_TEXT_PREFIX):
        return None
    try:
        raw = base64.b32decode(text[1:].upper() + "======")  # 58 chars + 6 = 64
    except ValueError:
        return None
    if len(raw) != 36 or raw[:4] != CID_PREFIX:
        return None
    digest = raw[4:]
    return digest if cid_text(digest) == text else None


def _pack_str(s: str) -> str | bytes:
    """A string value's packed form (a tagged byte string), or the string itself."""
    n = len(s)
    if n == 86 and "=" not in s:
        try:
            raw = base64.urlsafe_b64decode(s + "==")
        except ValueError:
            raw = b""
        if len(raw) == 64 and base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == s:
            return bytes((TAG_SIG,)) + raw
    if s.startswith("bafyrei"):
        digest = cid_digest(s)
        if digest is not None:
            return bytes((TAG_CID,)) + digest
    if s.startswith("did:key:z"):
        packed = _pack_did_key(s)
        if packed is not None:
            return packed
    w = _WORD_INDEX.get(s)
    if w is not None:
        return bytes((TAG_WORD, w))
    for i, (prefix, suffix) in enumerate(AFFIXES):
        if s.startswith(prefix) and s.endswith(suffix) and n >= len(prefix) + len(suffix):
            return bytes((TAG_AFFIX + i,)) + s[len(prefix) : n - len(suffix)].encode()
    return s


@lru_cache(maxsize=65536)
def _pack_did_key(s: str) -> bytes | None:
    """Tag + 33-byte key of a k256/P-256 did:key that formats back to ``s``; else None (cached:
    keys repeat across a DID's ops and across DIDs)."""
    try:
        curve, key = decode_did_key(s)
    except (KeyError_, ValueError):
        return None
    if format_did_key(curve, key) != s:
        return None
    return bytes((_CURVE_TAG[curve],)) + key


@lru_cache(maxsize=65536)
def _did_key_text(tag: int, key: bytes) -> str:
    return format_did_key(_TAG_CURVE[tag], key)


def _unpack_str(v: Any) -> Any:
    if type(v) is not bytes:
        return v
    tag = v[0]
    if tag == TAG_SIG:
        return base64.urlsafe_b64encode(v[1:]).rstrip(b"=").decode()
    if tag == TAG_CID:
        return cid_text(v[1:])
    if tag in _TAG_CURVE:
        return _did_key_text(tag, v[1:])
    if tag == TAG_WORD:
        return WORDS[v[1]]
    prefix, suffix = AFFIXES[tag - TAG_AFFIX]
    return prefix + v[1:].decode() + suffix


def _pack_value(v: Any) -> Any:
    t = type(v)
    if t is str:
        return _pack_str(v)
    if t is list:
        return [_pack_value(x) for x in v]
    if t is dict:
        return {k: _pack_value(x) for k, x in v.items()}
    return v


def _unpack_value(v: Any) -> Any:
    t = type(v)
    if t is bytes:
        return _unpack_str(v)
    if t is list:
        return [_unpack_value(x) for x in v]
    if t is dict:
        return {k: _unpack_value(x) for k, x in v.items()}
    return v


def _packed(op: dict[str, Any]) -> Any:
    p = _pack_str
    kind = op_type(op)
    if kind == OPERATION:
        prev = op["prev"]
        vms: list[Any] = []
        for name, key in op["verificationMethods"].items():
            vms += (p(name), p(key))
        services: list[Any] = []
        for name, s in op["services"].items():
            services += (p(name), p(s["type"]), p(s["endpoint"]))
        return [
            p(op["sig"]),
            None if prev is None else p(prev),
            [p(k) for k in op["rotationKeys"]],
            vms,
            [p(a) for a in op["alsoKnownAs"]],
            services,
        ]
    if kind == TOMBSTONE:
        return [p(op["sig"]), p(op["prev"])]
    if kind == CREATE:
        return [p(op["sig"]), p(op["signingKey"]), p(op["recoveryKey"]), p(op["handle"]), p(op["service"])]
    return _pack_value(op)


def pack_op(op: dict[str, Any]) -> bytes:
    """The stored (compact) DAG-CBOR form of an op; ``unpack_op`` inverts it."""
    return dag_cbor(_packed(op))


def unpack_op(data: bytes) -> dict[str, Any]:
    """The op dict back from ``pack_op``'s bytes (or from a plain DAG-CBOR op map)."""
    v = libipld.decode_dag_cbor(data)
    if type(v) is dict:
        return _unpack_value(v)
    u = _unpack_str
    n = len(v)
    if n == 6:
        sig, prev, rot, vms, aka, services = v
        return {
            "sig": u(sig),
            "prev": None if prev is None else u(prev),
            "type": OPERATION,
            "services": {
                u(services[i]): {"type": u(services[i + 1]), "endpoint": u(services[i + 2])}
                for i in range(0, len(services), 3)
            },
            "alsoKnownAs": [u(a) for a in aka],
            "rotationKeys": [u(k) for k in rot],
            "verificationMethods": {u(vms[i]): u(vms[i + 1]) for i in range(0, len(vms), 2)},
        }
    if n == 2:
        return {"sig": u(v[0]), "prev": u(v[1]), "type": TOMBSTONE}
    if n == 5:
        sig, signing, recovery, handle, service = v
        return {
            "sig": u(sig),
            "prev": None,
            "type": CREATE,
            "handle": u(handle),
            "service": u(service),
            "signingKey": u(signing),
            "recoveryKey": u(recovery),
        }
    raise ValueError(f"unknown packed op form (array of {n})")


def stored_op(op: dict[str, Any], digest: bytes) -> bytes:
    """``pack_op(op)``, checked: unpacked and re-encoded it must hash to ``digest`` (the op's
    CID digest); if it ever did not, the plain DAG-CBOR map is stored instead."""
    data = pack_op(op)
    if hashlib.sha256(dag_cbor(unpack_op(data))).digest() == digest:
        return data
    return dag_cbor(op)


# ----------------------------------------------------------------------------- DIDs
_DID_PREFIX = "did:plc:"
_B32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def is_plc_did(did: str) -> bool:
    """Whether ``did`` is a well-formed did:plc (``did_bytes`` would not be None), cheaply."""
    return len(did) == 32 and did.startswith(_DID_PREFIX) and _B32.issuperset(did[8:])


def did_bytes(did: str) -> bytes | None:
    """The 15 bytes a did:plc is stored as (its 24 base32 characters decoded); None for any
    string that is not a well-formed did:plc (such a DID can have no ops)."""
    if len(did) != 32 or not did.startswith(_DID_PREFIX) or not _B32.issuperset(did[8:]):
        return None
    return base64.b32decode(did[8:].upper())


def did_text(data: bytes) -> str:
    """The did:plc string back from ``did_bytes``."""
    return _DID_PREFIX + libipld.encode_multibase("b", data)[1:]


# ----------------------------------------------------------------------------- the chain state
_LOAD_SQL = """
SELECT o.cid, o.created_at, o.op, o.signer, o.nullified
FROM plc_did d JOIN plc_op o ON o.did_id = d.id
WHERE d.did = $1
ORDER BY o.pos
"""


def _entry(cid: bytes, created_at: int, op_bytes: bytes, signer: int, nullified: bool) -> OpEntry:
    op = unpack_op(op_bytes)
    return OpEntry(
        cid_text(cid), created_at, op, authority_keys(op), signer, op.get("type") == TOMBSTONE, nullified
    )


async def load_did(conn: Any, did: str) -> DidLog | None:
    """The chain engine's ``DidLog`` for ``did`` from the database (one query); None if unknown."""
    key = did_bytes(did)
    rows = await conn.fetch(_LOAD_SQL, key) if key is not None else []
    if not rows:
        return None
    log = DidLog(did)
    for r in rows:
        e = _entry(r[0], r[1], r[2], r[3], r[4])
        log.entries.append(e)
        if not e.nullified:
            log.live.append(e)
        log.cids.add(e.cid)
    return log


_LOAD_MANY_SQL = """
SELECT d.did, o.cid, o.created_at, o.op, o.signer, o.nullified
FROM plc_did d JOIN plc_op o ON o.did_id = d.id
WHERE d.did = ANY($1::bytea[])
ORDER BY d.did, o.pos
"""


async def load_dids(conn: Any, dids: Sequence[str]) -> dict[str, DidLog | None]:
    """``load_did`` for many DIDs in one query: every DID asked for is a key (None if unknown)."""
    out: dict[str, DidLog | None] = dict.fromkeys(dids)
    keys = [k for k in (did_bytes(d) for d in out) if k is not None]
    if not keys:
        return out
    log: DidLog | None = None
    current = b""
    for r in await conn.fetch(_LOAD_MANY_SQL, keys):
        if r[0] != current:
            current = r[0]
            log = DidLog(did_text(current))
            out[log.did] = log
        e = _entry(r[1], r[2], r[3], r[4], r[5])
        log.entries.append(e)  # type: ignore[union-attr]
        if not e.nullified:
            log.live.append(e)  # type: ignore[union-attr]
        log.cids.add(e.cid)  # type: ignore[union-attr]
    return out


# ----------------------------------------------------------------------------- commit
class Cursor(NamedTuple):
    """Where ingestion from one upstream stands: last seq (sequenced) and/or createdAt ms (legacy)."""

    seq: int | None
    created_at: int | None


_STATE_SQL = """
SELECT d.did, d.id, ARRAY(SELECT o.cid FROM plc_op o WHERE o.did_id = d.id) AS cids
FROM plc_did d WHERE d.did = ANY($1::bytea[])
"""
_NEW_DIDS_SQL = "INSERT INTO plc_did (did) SELECT unnest($1::bytea[]) RETURNING did, id"
# one statement per op (nullifications are rare; a join with unnest may become a seq scan)
_NULLIFY_SQL = "UPDATE plc_op SET nullified = true WHERE did_id = $1 AND cid = $2 AND NOT nullified"
_CURSOR_SQL = """
INSERT INTO plc_cursor AS c (upstream, seq, created_at, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (upstream) DO UPDATE SET
    seq = COALESCE(EXCLUDED.seq, c.seq),
    created_at = COALESCE(EXCLUDED.created_at, c.created_at),
    updated_at = EXCLUDED.updated_at
"""
DIVERGENCE_COLUMNS = ("kind", "upstream", "did", "cid", "seq", "reason", "detail", "raw", "observed_at")


class Divergence(NamedTuple):
    """One plc_divergence row (its upstream and observed_at are given by ``commit``)."""

    kind: str
    did: str | None
    cid: str | None
    seq: int | None
    reason: str | None
    detail: str
    raw: bytes | None


OP_COLUMNS = ("created_at", "seq", "first_seen_at", "did_id", "pos", "signer", "nullified", "cid", "op")


class NewOp(NamedTuple):
    """One op ready to store: packed and hashed already (``new_op``, or a validation worker)."""

    did: str
    digest: bytes  # the CID's SHA-256 digest
    created_at: int  # ms
    seq: int | None
    first_seen: int  # ms
    signer: int
    nullifies: tuple[bytes, ...]  # digests of the DID's ops this one nullifies
    op: bytes  # ``stored_op`` form


def new_op(acc: Accepted, seq: int | None, first_seen: int) -> NewOp:
    """The ``NewOp`` of an accepted op (packs it: ~10 us)."""
    digest = cid_digest(acc.cid)
    if digest is None:
        raise ValueError(f"not a dag-cbor sha2-256 CID: {acc.cid!r}")
    nullifies = tuple(d for d in (cid_digest(e.cid) for e in acc.nullified) if d is not None)
    return NewOp(acc.did, digest, acc.created_at, seq, first_seen, acc.signer, nullifies,
                 stored_op(acc.op, digest))


async def commit(
    conn: Any,
    upstream: str,
    items: Sequence[tuple[Accepted, int | None, int] | NewOp],
    cursor: Cursor | None,
    *,
    now_ms: int | None = None,
    divergences: Sequence[Divergence] = (),
    in_transaction: Callable[[Any], Awaitable[Any]] | None = None,
    after_store: Callable[[Any, Sequence[NewOp]], Awaitable[Any]] | None = None,
) -> int:
    """Store ``items`` (accepted ops, in the order they were applied: ``(Accepted, seq,
    first_seen_ms)`` tuples or ``NewOp``s), ``divergences`` and the upstream's cursor in one
    transaction: all or nothing. ``in_transaction(conn)``, when given, runs first inside the
    same transaction (a leadership fence, say: if it raises, nothing is stored);
    ``after_store(conn, ops)`` runs in it after the ops are inserted. Ops already
    stored are skipped (see the module doc). Returns the number of ops inserted."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    ops = [i if isinstance(i, NewOp) else new_op(*i) for i in items]
    async with conn.transaction():
        if in_transaction is not None:
            await in_transaction(conn)
        inserted = 0
        if ops:
            inserted = await _store(conn, ops)
            if after_store is not None:
                await after_store(conn, ops)
        if divergences:
            await conn.copy_records_to_table(
                "plc_divergence",
                records=[
                    (d.kind, upstream, d.did, d.cid, d.seq, d.reason, d.detail, d.raw, now_ms)
                    for d in divergences
                ],
                columns=DIVERGENCE_COLUMNS,
            )
        if cursor is not None:
            await conn.execute(_CURSOR_SQL, upstream, cursor.seq, cursor.created_at, now_ms)
    return inserted


async def _store(conn: Any, ops: Sequence[NewOp]) -> int:
    dids = list(dict.fromkeys(o.did for o in ops))
    keys = [did_bytes(d) for d in dids]
    if None in keys:
        raise ValueError(f"not a did:plc: {dids[keys.index(None)]!r}")
    ids: dict[str, int] = {}
    next_pos: dict[str, int] = {}
    present: set[tuple[str, bytes]] = set()
    for r in await conn.fetch(_STATE_SQL, keys):
        did = did_text(r[0])
        ids[did] = r[1]
        next_pos[did] = len(r[2])
        present.update((did, c) for c in r[2])
    new = [k for d, k in zip(dids, keys) if d not in ids]
    if new:
        for r in await conn.fetch(_NEW_DIDS_SQL, new):
            did = did_text(r[0])
            ids[did] = r[1]
            next_pos[did] = 0
    records = []
    seen: set[tuple[str, bytes]] = set()
    nullify: dict[tuple[int, bytes], None] = {}
    for o in ops:
        did_id = ids[o.did]
        for nd in o.nullifies:
            nullify[(did_id, nd)] = None
        key = (o.did, o.digest)
        if key in present or key in seen:
            continue
        seen.add(key)
        pos = next_pos[o.did]
        next_pos[o.did] = pos + 1
        records.append((o.created_at, o.seq, o.first_seen, did_id, pos, o.signer, False, o.digest, o.op))
    if records:
        await conn.copy_records_to_table("plc_op", records=records, columns=OP_COLUMNS)
    if nullify:
        await conn.executemany(_NULLIFY_SQL, list(nullify))
    return len(records)


async def get_cursor(conn: Any, upstream: str) -> Cursor | None:
    """The upstream's cursor, or None when nothing was ever committed for it."""
    r = await conn.fetchrow("SELECT seq, created_at FROM plc_cursor WHERE upstream = $1", upstream)
    return None if r is None else Cursor(r[0], r[1])


# ----------------------------------------------------------------------------- reads for the API
_DID_ROWS_SQL = """
SELECT o.op, o.cid, o.created_at, o.nullified, o.seq
FROM plc_did d JOIN plc_op o ON o.did_id = d.id
WHERE d.did = $1
ORDER BY o.pos
"""
_EXPORT_SQL = """
SELECT d.did, o.op, o.cid, o.created_at, o.nullified, o.seq
FROM plc_op o JOIN plc_did d ON d.id = o.did_id
WHERE o.seq > $1
ORDER BY o.seq
LIMIT $2
"""


async def did_rows(conn: Any, did: str) -> list[OpRow]:
    """Every stored op of ``did`` in audit order as ``OpRow(did, op, cid, created_at, nullified,
    seq)`` ([] for an unknown DID): /log takes the non-nullified ones, /log/last, /data and the
    document the last non-nullified one, /log/audit all of them."""
    key = did_bytes(did)
    if key is None:
        return []
    rows = await conn.fetch(_DID_ROWS_SQL, key)
    return [OpRow(did, unpack_op(r[0]), cid_text(r[1]), r[2], r[3], r[4]) for r in rows]


async def export_rows(conn: Any, after: int, count: int) -> list[OpRow]:
    """At most ``count`` ops with seq > ``after``, in seq order, as ``OpRow``s."""
    rows = await conn.fetch(_EXPORT_SQL, after, count)
    return [OpRow(did_text(r[0]), unpack_op(r[1]), cid_text(r[2]), r[3], r[4], r[5]) for r in rows]


__all__ = [
    "AFFIXES",
    "Cursor",
    "Divergence",
    "NewOp",
    "WORDS",
    "cid_digest",
    "cid_text",
    "commit",
    "did_bytes",
    "did_text",
    "did_rows",
    "export_rows",
    "get_cursor",
    "load_did",
    "load_dids",
    "new_op",
    "pack_op",
    "stored_op",
    "unpack_op",
]
