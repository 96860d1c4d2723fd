"""The op log on a real PostgreSQL: packed op form, chain state from the database, atomic
batch commits with the cursor, and the reads the API renders from."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from plc.core.chain import REPLAY, DidLog, check_op
from plc.core.encoding import dag_cbor
from plc.core.errors import OpError
from plc.core.jsonfmt import parse_ms
from plc.core.render import audit_json, audit_json_from_entries, op_json
from plc.store import oplog
from plc.store.migrate import migrate
from plc.tools.generate import generate

from plcdata import HOUR, genesis, k256, p256, ref_cid, sign, tombstone, update

UPSTREAM = "https://plc.example"
T0 = 1_700_000_000_000


async def _connect(pg_dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn)
    return conn


def _corpus(seed: int, dids: int, invalid_rate: float = 0.1, fmt: str = "sequenced"):
    """Parsed export lines: (did, op, created_at, cid, seq) for every line that parses."""
    out = []
    for line, _truth in generate(seed, dids, fmt=fmt, invalid_rate=invalid_rate):
        try:
            d = orjson.loads(line)
            out.append((d["did"], d["operation"], parse_ms(d["createdAt"]), d["cid"], d.get("seq")))
        except Exception:  # a malformed line: skipped, as an ingester would
            continue
    return out


# ----------------------------------------------------------------------------- packed form
def test_packed_op_round_trips_every_generated_op_byte_for_byte():
    ops = [c[1] for c in _corpus(11, 120, 0.1)] + [c[1] for c in _corpus(12, 60, 0.1, fmt="legacy")]
    assert len(ops) > 300
    kinds = set()
    plain = packed_total = 0
    for op in ops:
        if not isinstance(op, dict):
            continue
        packed = oplog.pack_op(op)
        back = oplog.unpack_op(packed)
        assert op_json(back) == op_json(op)
        assert dag_cbor(back) == dag_cbor(op)
        kinds.add(op.get("type"))
        plain += len(dag_cbor(op))
        packed_total += len(packed)
    assert packed_total < 0.6 * plain  # signatures, CIDs and keys really are packed
    assert {"plc_operation", "plc_tombstone", "create"} <= kinds


def test_packed_op_keeps_key_order_traps_and_odd_strings():
    rot = [k256("a").did_key, p256("b").did_key]
    op = sign(
        {
            "type": "plc_operation",
            "rotationKeys": rot + ["did:key:zNotAKey", "bafyreinotacid"],
            "verificationMethods": {"10": rot[1], "2": "x", "atproto": rot[0], "b": "did:key:z", "a": ""},
            "alsoKnownAs": ["at://x.bsky.social", "at://", "https://", "AtprotoPersonalDataServer", "é\u2028"],
            "services": {
                "1": {"type": "AtprotoPersonalDataServer", "endpoint": "https://a.host.bsky.network"},
                "0": {"type": "atproto_pds", "endpoint": "http://plain"},
                "atproto_pds": {"type": "t", "endpoint": "https://.bsky.social"},
            },
            "prev": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm",
        },
        k256("a"),
    )
    legacy_create = {
        "type": "create",
        "signingKey": rot[0],
        "recoveryKey": rot[1],
        "handle": "alice.bsky.social",
        "service": "https://bsky.social",
        "prev": None,
        "sig": op["sig"],
    }
    odd_sig = dict(op, sig="A" * 85 + "B")  # non-zero unused tail bits: must stay a string
    shapeless = {"type": "plc_operation", "sig": op["sig"], "extra": [1, {"9": None, "1": True}]}
    for o in (op, legacy_create, odd_sig, shapeless, tombstone(ref_cid(op), k256("a"))):
        back = oplog.unpack_op(oplog.pack_op(o))
        assert op_json(back) == op_json(o)
        assert dag_cbor(back) == dag_cbor(o)
    assert len(oplog.pack_op(op)) < len(dag_cbor(op))


# ----------------------------------------------------------------------------- replay through the DB
async def _replay_through_db(conn, corpus, batch_size: int) -> dict[str, int]:
    """Replay `corpus` with state from load_did, committing every `batch_size` lines."""
    stats = {"accepted": 0, "rejected": 0}
    for start in range(0, len(corpus), batch_size):
        batch = corpus[start : start + batch_size]
        logs: dict[str, DidLog | None] = {}
        items = []
        for did, op, created_at, cid, seq in batch:
            if did not in logs:
                logs[did] = await oplog.load_did(conn, did)
            try:
                acc = check_op(logs[did], did, op, mode=REPLAY, created_at=created_at, cid=cid)
            except OpError:
                stats["rejected"] += 1
                continue
            if logs[did] is None:
                logs[did] = DidLog(did)
            logs[did].apply(acc)
            items.append((acc, seq, T0 + start))
            stats["accepted"] += 1
        last = batch[-1]
        await oplog.commit(conn, UPSTREAM, items, oplog.Cursor(last[4], last[2]), now_ms=T0)
    return stats


def _replay_in_memory(corpus) -> tuple[dict[str, DidLog], dict[tuple[str, str], int | None]]:
    logs: dict[str, DidLog] = {}
    seqs = {}
    for did, op, created_at, cid, seq in corpus:
        log = logs.get(did)
        try:
            acc = check_op(log, did, op, mode=REPLAY, created_at=created_at, cid=cid)
        except OpError:
            continue
        logs.setdefault(did, DidLog(did)).apply(acc)
        seqs[(did, acc.cid)] = seq
    return logs, seqs


async def test_replay_through_the_database_equals_the_in_memory_replay(pg_dsn):
    corpus = _corpus(5, 60, 0.1)
    memory, seqs = _replay_in_memory(corpus)
    conn = await _connect(pg_dsn)
    try:
        stats = await _replay_through_db(conn, corpus, batch_size=37)
        assert stats["rejected"] > 0 and stats["accepted"] == len(seqs)
        assert await conn.fetchval("SELECT count(*) FROM plc_op") == len(seqs)
        assert await conn.fetchval("SELECT count(*) FROM plc_did") == len(memory)
        assert any(e.nullified for log in memory.values() for e in log.entries)
        for did, mlog in memory.items():
            dlog = await oplog.load_did(conn, did)
            assert dlog is not None
            assert [(e.cid, e.created_at, e.signer, e.keys, e.tombstone, e.nullified) for e in dlog.entries] == [
                (e.cid, e.created_at, e.signer, e.keys, e.tombstone, e.nullified) for e in mlog.entries
            ]
            assert [e.cid for e in dlog.live] == [e.cid for e in mlog.live]
            assert dlog.cids == mlog.cids
            rows = await oplog.did_rows(conn, did)
            assert audit_json(rows) == audit_json_from_entries(did, mlog.entries)
            assert [r.seq for r in rows] == [seqs[(did, e.cid)] for e in mlog.entries]
        # many DIDs in one query give exactly what one query per DID gives
        unknown = ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "not-a-did"]
        many = await oplog.load_dids(conn, list(memory) + unknown)
        assert set(many) == set(memory) | set(unknown)
        assert many["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"] is None and many["not-a-did"] is None
        for did in memory:
            one, batch = await oplog.load_did(conn, did), many[did]
            assert batch is not None and batch.did == did
            assert [(e.cid, e.created_at, e.signer, e.keys, e.tombstone, e.nullified, e.op) for e in batch.entries] == [
                (e.cid, e.created_at, e.signer, e.keys, e.tombstone, e.nullified, e.op) for e in one.entries
            ]
            assert [e.cid for e in batch.live] == [e.cid for e in one.live] and batch.cids == one.cids
        assert await oplog.load_dids(conn, []) == {}
        cur = await oplog.get_cursor(conn, UPSTREAM)
        assert cur == oplog.Cursor(corpus[-1][4], corpus[-1][2])
        # the export reads every op once, in seq order, page by page
        exported, after = [], 0
        while page := await oplog.export_rows(conn, after, 50):
            exported += page
            after = page[-1].seq
        assert [r.seq for r in exported] == sorted(seqs.values())
        by_key = {(did, e.cid): e for did, log in memory.items() for e in log.entries}
        for r in exported:
            e = by_key[(r.did, r.cid)]
            assert (op_json(r.op), r.created_at, r.nullified) == (op_json(e.op), e.created_at, e.nullified)
    finally:
        await conn.close()


async def test_unknown_did_reads_as_nothing(pg_dsn):
    conn = await _connect(pg_dsn)
    try:
        assert await oplog.load_did(conn, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa") is None
        assert await oplog.did_rows(conn, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa") == []
        assert await oplog.get_cursor(conn, UPSTREAM) is None
        assert await oplog.export_rows(conn, 0, 10) == []
    finally:
        await conn.close()


# ----------------------------------------------------------------------------- one DID, one batch
def _fork_history():
    """genesis (keys [k0, k1]) → a (signed by k1) → b (by k0, prev genesis: nullifies a) → tombstone."""
    k0, k1 = k256("rot0"), k256("rot1")
    did, g = genesis(k0, [k0, k1])
    a = update(ref_cid(g), k1, [k0, k1], aka=["at://a.test"])
    b = update(ref_cid(g), k0, [k0, k1], aka=["at://b.test"])
    t = tombstone(ref_cid(b), k0)
    return did, [(g, T0), (a, T0 + HOUR), (b, T0 + 2 * HOUR), (t, T0 + 3 * HOUR)]


def _accept_all(did, history, log=None):
    log = log or DidLog(did)
    items = []
    for i, (op, created_at) in enumerate(history):
        acc = check_op(log if log.entries else None, did, op, mode=REPLAY, created_at=created_at)
        log.apply(acc)
        items.append((acc, 100 + i, T0 + i))
    return log, items


async def test_one_batch_with_several_ops_of_one_did_and_a_nullification(pg_dsn):
    did, history = _fork_history()
    mlog, items = _accept_all(did, history)
    assert [e.nullified for e in mlog.entries] == [False, True, False, False]
    conn = await _connect(pg_dsn)
    try:
        assert await oplog.commit(conn, UPSTREAM, items, oplog.Cursor(103, None), now_ms=T0) == 4
        rows = await oplog.did_rows(conn, did)
        assert [(r.cid, r.nullified, r.seq) for r in rows] == [
            (e.cid, e.nullified, 100 + i) for i, e in enumerate(mlog.entries)
        ]
        assert audit_json(rows) == audit_json_from_entries(did, mlog.entries)
        assert await conn.fetch("SELECT pos FROM plc_op ORDER BY seq") == [(0,), (1,), (2,), (3,)]
        dlog = await oplog.load_did(conn, did)
        assert [e.cid for e in dlog.live] == [mlog.entries[i].cid for i in (0, 2, 3)]
        assert dlog.live[-1].tombstone and dlog.live[-1].keys == ()
        assert [e.signer for e in dlog.entries] == [-1, 1, 0, 0]
        assert await oplog.get_cursor(conn, UPSTREAM) == oplog.Cursor(103, None)
    finally:
        await conn.close()


async def test_recommitting_a_batch_stores_nothing_twice(pg_dsn):
    did, history = _fork_history()
    _, items = _accept_all(did, history)
    conn = await _connect(pg_dsn)
    try:
        assert await oplog.commit(conn, UPSTREAM, items[:2], oplog.Cursor(101, None)) == 2
        # replayed after a "crash": the first two again, plus the rest
        assert await oplog.commit(conn, UPSTREAM, items, oplog.Cursor(103, None)) == 2
        assert await oplog.commit(conn, UPSTREAM, items, oplog.Cursor(103, None)) == 0
        rows = await conn.fetch("SELECT pos, nullified FROM plc_op ORDER BY pos")
        assert [tuple(r) for r in rows] == [(0, False), (1, True), (2, False), (3, False)]
        assert await conn.fetchval("SELECT count(*) FROM plc_did") == 1
        # the schema refuses a second op at a position already taken (what a concurrent writer
        # on the same DID would try: it computes the same next position)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO plc_op (did_id, created_at, first_seen_at, pos, signer, cid, op)"
                " SELECT did_id, created_at, first_seen_at, 3, signer, cid, op FROM plc_op WHERE pos = 0"
            )
    finally:
        await conn.close()


async def _snapshot(conn):
    ops = await conn.fetch("SELECT did_id, cid, pos, seq, nullified FROM plc_op ORDER BY did_id, pos")
    dids = await conn.fetch("SELECT id, did FROM plc_did ORDER BY id")
    cur = await conn.fetch("SELECT * FROM plc_cursor")
    return [tuple(r) for r in ops], [tuple(r) for r in dids], [tuple(r) for r in cur]


async def test_a_commit_that_fails_midway_leaves_nothing_and_the_cursor_unchanged(pg_dsn):
    did, history = _fork_history()
    _, items = _accept_all(did, history)
    # a second DID, new in the failing batch
    k = k256("other")
    did2, g2 = genesis(k)
    log2, items2 = _accept_all(did2, [(g2, T0 + 5 * HOUR)])
    items2 = [(acc, 200, fs) for acc, _, fs in items2]
    conn = await _connect(pg_dsn)
    try:
        await oplog.commit(conn, UPSTREAM, items[:2], oplog.Cursor(101, T0 + HOUR), now_ms=T0)
        before = await _snapshot(conn)
        assert before[0][1][4] is False  # op a, not yet nullified
        batch = items[2:] + items2  # nullifies op a, adds a DID
        # the last statement (the cursor upsert) fails: a seq that does not fit a bigint
        with pytest.raises((OverflowError, asyncpg.DataError)):
            await oplog.commit(conn, UPSTREAM, batch, oplog.Cursor(2**70, None), now_ms=T0)
        assert await _snapshot(conn) == before
        # a duplicate seq fails inside the op insert
        clash = [(acc, 100, fs) for acc, _, fs in items2]  # seq 100 is op g's
        with pytest.raises(asyncpg.UniqueViolationError):
            await oplog.commit(conn, UPSTREAM, items[2:] + clash, oplog.Cursor(300, None), now_ms=T0)
        assert await _snapshot(conn) == before
        assert await oplog.get_cursor(conn, UPSTREAM) == oplog.Cursor(101, T0 + HOUR)
        # the same batch with a good cursor goes through whole
        assert await oplog.commit(conn, UPSTREAM, batch, oplog.Cursor(200, None), now_ms=T0) == 3
        assert await oplog.get_cursor(conn, UPSTREAM) == oplog.Cursor(200, T0 + HOUR)
        assert [r.nullified for r in await oplog.did_rows(conn, did)] == [False, True, False, False]
        assert [r.cid for r in await oplog.did_rows(conn, did2)] == [log2.entries[0].cid]
    finally:
        await conn.close()


async def test_cursor_round_trips_per_upstream(pg_dsn):
    conn = await _connect(pg_dsn)
    try:
        await oplog.commit(conn, "https://a", [], oplog.Cursor(42, None), now_ms=T0)
        await oplog.commit(conn, "https://b", [], oplog.Cursor(None, T0 + 5), now_ms=T0)
        assert await oplog.get_cursor(conn, "https://a") == oplog.Cursor(42, None)
        assert await oplog.get_cursor(conn, "https://b") == oplog.Cursor(None, T0 + 5)
        await oplog.commit(conn, "https://a", [], oplog.Cursor(43, T0 + 9), now_ms=T0 + 1)
        assert await oplog.get_cursor(conn, "https://a") == oplog.Cursor(43, T0 + 9)
        await oplog.commit(conn, "https://a", [], None)
        assert await oplog.get_cursor(conn, "https://a") == oplog.Cursor(43, T0 + 9)
        assert await conn.fetchval("SELECT updated_at FROM plc_cursor WHERE upstream = 'https://a'") == T0 + 1
    finally:
        await conn.close()
