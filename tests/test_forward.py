"""POST /:did forwarding, end to end over loopback: our app under uvicorn on a real PostgreSQL,
a fake upstream (tests/fake_submit_upstream.py) under uvicorn, httpx as the client.

Counts of POSTs that reached the fake upstream prove what left the node and how often."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn

from plc.api import create_app
from plc.core.chain import REPLAY, SUBMIT, DidLog, check_op
from plc.core.encoding import op_cid
from plc.forward import ForwardConfig
from plc.forward.limits import Rate, client_key, parse_networks, parse_rate
from plc.store import oplog, pending
from plc.store.migrate import migrate

from fake_submit_upstream import MISORDERED, FakeSubmitUpstream, Step
from fake_upstream import serve, serve_app, stop
from plcdata import HOUR, bad_sig_message, genesis, k256, sign, tombstone, update

UP_NAME = "http://sync-upstream.test"
JSON = "application/json"


def now_ms() -> int:
    return int(time.time() * 1000)


class Mirror:
    def __init__(self, url: str, dsn: str, fakes: list[FakeSubmitUpstream]):
        self.url = url
        self.dsn = dsn
        self.fakes = fakes
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    @property
    def fake(self) -> FakeSubmitUpstream:
        return self.fakes[0]

    async def post(self, did: str, op: Any, content_type: str | None = JSON, **kw: Any) -> httpx.Response:
        body = op if isinstance(op, bytes) else orjson.dumps(op)
        headers = {"content-type": content_type} if content_type else {}
        headers.update(kw.pop("headers", {}))
        return await self.http.post(f"/{did}", content=body, headers=headers, **kw)

    async def sql(self, query: str, *args: Any) -> list[Any]:
        c = await asyncpg.connect(self.dsn)
        try:
            return await c.fetch(query, *args)
        finally:
            await c.close()


async def _serve_app(app: Any) -> tuple[uvicorn.Server, asyncio.Task, str]:
    return await serve_app(app, lifespan="on")


async def _seed(dsn: str, ops: list[tuple[str, dict, int]]) -> dict[str, DidLog]:
    """Store (did, op, created_at) in order, as the ingest would; returns the logs."""
    logs: dict[str, DidLog] = {}
    items = []
    c = await asyncpg.connect(dsn)
    try:
        for did, op, created_at in ops:
            if did not in logs:
                logs[did] = await oplog.load_did(c, did) or DidLog(did)
            acc = check_op(logs[did], did, op, mode=REPLAY, created_at=created_at)
            logs[did].apply(acc)
            items.append((acc, None, created_at))
        await oplog.commit(c, UP_NAME, items, None)
    finally:
        await c.close()
    return logs


@pytest.fixture
async def make_mirror(pg_dsn) -> AsyncIterator[Any]:
    running: list[tuple[uvicorn.Server, asyncio.Task]] = []
    clients: list[httpx.AsyncClient] = []
    c = await asyncpg.connect(pg_dsn)
    await migrate(c)
    await c.close()

    async def start(scripts: list[list[Step]] | None = None, *, upstream_urls: list[str] | None = None,
                    **config: Any) -> Mirror:
        fakes = [FakeSubmitUpstream(list(s)) for s in (scripts or [[]])]
        for f in fakes:
            server, task = await serve(f)
            running.append((server, task))
        urls = upstream_urls or [f.url for f in fakes]
        settings = dict(retry_budget_s=5.0, backoff_initial_s=0.01, backoff_max_s=0.05, read_timeout_s=1.0,
                        connect_timeout_s=1.0, ip_rate=None, did_rate=None)
        settings.update(config)
        app = create_app(connect_kwargs={"dsn": pg_dsn}, forward=ForwardConfig(upstreams=tuple(urls), **settings))
        server, task, url = await _serve_app(app)
        running.append((server, task))
        m = Mirror(url, pg_dsn, fakes)
        m.app = app  # type: ignore[attr-defined]
        clients.append(m.http)
        return m

    yield start
    for client in clients:
        await client.aclose()
    for server, task in reversed(running):
        await stop(server, task)


# ----------------------------------------------------------------------------- keys and ops
R, A = k256("fwd-rotation"), k256("fwd-atproto")


async def _known_did(m: Mirror, name: str = "alice", age_ms: int = HOUR) -> tuple[str, dict, str]:
    """A DID whose genesis is stored on the mirror (and held by the fake upstream)."""
    did, g = genesis(A, rotation=[R, A], aka=[f"at://{name}.test"])
    await _seed(m.dsn, [(did, g, now_ms() - age_ms)])
    for f in m.fakes:
        f.preload(did, g, now_ms() - age_ms)
    return did, g, op_cid(g)


# ----------------------------------------------------------------------------- the happy path


async def test_valid_update_is_forwarded_and_read_back_at_once(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m)
    op = update(gcid, A, [R, A], aka=["at://renamed.test"])
    body = orjson.dumps(op)
    before = await m.http.get(f"/{did}")  # now in the read cache (a pending op has no seq:
    assert before.json()["alsoKnownAs"] != ["at://renamed.test"]  # only the forwarder drops it)
    r = await m.post(did, body)
    assert (r.status_code, r.text) == (200, "OK")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["x-plc-mirror-validation"] == "verified"
    assert r.headers["x-plc-upstream-attempts"] == "1"
    assert [(p.did, p.body, p.content_type) for p in m.fake.posts] == [(did, body, "application/json")]
    # read-your-write: the document, the log and the audit log show it before any ingest
    doc = (await m.http.get(f"/{did}")).json()
    assert doc["alsoKnownAs"] == ["at://renamed.test"]
    audit = (await m.http.get(f"/{did}/log/audit")).json()
    assert [e["cid"] for e in audit] == [gcid, op_cid(op)]
    assert (await m.http.get(f"/{did}/log/last")).json() == op
    rows = await m.sql("SELECT did, cid, upstream, nullifies FROM plc_pending")
    assert [tuple(r) for r in rows] == [(did, op_cid(op), m.fake.url, [])]

    # the ingest stores it: reconcile drops the pending row, reads show it once
    c = await asyncpg.connect(m.dsn)
    try:
        log = await oplog.load_did(c, did)
        acc = check_op(log, did, op, mode=REPLAY, created_at=now_ms())
        async with c.transaction():
            await oplog.commit(c, UP_NAME, [(acc, 7, now_ms())], None)
            assert await pending.reconcile(c, [(did, acc.cid)]) == 1
    finally:
        await c.close()
    assert await m.sql("SELECT * FROM plc_pending") == []
    audit = (await m.http.get(f"/{did}/log/audit")).json()
    assert [e["cid"] for e in audit] == [gcid, op_cid(op)]


async def test_pending_ops_are_the_base_of_the_next_submission(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m)
    u1 = update(gcid, A, [R, A], aka=["at://one.test"])
    u2 = update(op_cid(u1), A, [R, A], aka=["at://two.test"])
    assert (await m.post(did, u1)).status_code == 200
    r = await m.post(did, u2)
    assert r.status_code == 200 and r.headers["x-plc-mirror-validation"] == "verified"
    # a resubmission of u1 now forks from g with the same key: refused locally
    again = await m.post(did, u1)
    assert again.status_code == 400 and again.json() == {"message": bad_sig_message(u1)}
    assert len(m.fake.posts) == 2
    assert (await m.http.get(f"/{did}/data")).json()["alsoKnownAs"] == ["at://two.test"]


async def test_recovery_marks_the_nullified_op_in_reads(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m)
    u1 = update(gcid, A, [R, A], aka=["at://hijacked.test"])
    await _seed(m.dsn, [(did, u1, now_ms() - HOUR // 2)])
    rec = update(gcid, R, [R, A], aka=["at://recovered.test"])
    r = await m.post(did, rec)
    assert r.status_code == 200
    audit = (await m.http.get(f"/{did}/log/audit")).json()
    assert [(e["cid"], e["nullified"]) for e in audit] == [(gcid, False), (op_cid(u1), True), (op_cid(rec), False)]
    assert [o["alsoKnownAs"] for o in (await m.http.get(f"/{did}/log")).json()] == [
        ["at://alice.test"], ["at://recovered.test"]]
    rows = await m.sql("SELECT nullifies FROM plc_pending")
    assert rows[0][0] == [op_cid(u1)]


# ----------------------------------------------------------------------------- refused locally


def _invalid_cases(did: str, g: dict, gcid: str) -> dict[str, tuple[str, Any, int, str | None]]:
    """name → (path did, body, status, exact message or None to take the core's)."""
    other = k256("fwd-stranger")
    long_aka = update(gcid, A, [R, A], aka=["at://" + "x" * 3990])
    extra = {**update(gcid, A, [R, A]), "extra": 1}
    legacy = sign({"type": "create", "signingKey": A.did_key, "recoveryKey": R.did_key,
                   "handle": "x.test", "service": "https://pds.test", "prev": None}, A)
    nul = update(gcid, A, [R, A], aka=["at://nul\u0000.test"])
    bad_b64 = {**update(gcid, A, [R, A]), "sig": update(gcid, A, [R, A])["sig"][:-1] + "+"}
    return {
        "bad_signature": (did, update(gcid, other, [R, A]), 400, None),
        "too_large": (did, long_aka, 400, "Operation too large (4000 bytes maximum in cbor encoding)"),
        "extra_field": (did, extra, 400, None),
        "legacy_create": (did, legacy, 400, None),
        "prev_null_on_known_did": (did, update(gcid, A, [R, A]) | {"prev": None}, 400, MISORDERED),
        "genesis_at_wrong_did": ("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", g, 400, None),
        "genesis_at_non_plc_path": ("export", g, 400, None),
        "too_many_aka": (did, update(gcid, A, [R, A], aka=[f"at://{i}.test" for i in range(11)]), 400,
                         "To many alsoKnownAs entries (max 10)"),
        "bad_rotation_key": (did, update(gcid, A, [R.did_key, "did:key:zNope"]), 400,
                             "Invalid rotationKey: did:key:zNope"),
        "nul_character": (did, nul, 500, "Internal Server Error"),
        "sig_not_base64url": (did, bad_b64, 500, "Internal Server Error"),
        "not_an_object": (did, [1, 2], 400, "Not a valid operation: [1,2]"),
    }


async def test_invalid_ops_never_leave_the_node(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m)
    for name, (path, body, status, message) in _invalid_cases(did, g, gcid).items():
        r = await m.post(path, body)
        if message is None:  # the core's verdict (its exact text is tested in the core's tests)
            c = await asyncpg.connect(m.dsn)
            try:
                log = await oplog.load_did(c, path)
            finally:
                await c.close()
            with pytest.raises(Exception) as err:
                check_op(log, path, body, mode=SUBMIT, created_at=now_ms())
            message = err.value.message  # type: ignore[attr-defined]
        assert (name, r.status_code, r.json()) == (name, status, {"message": message})
        assert r.headers["content-type"] == "application/json; charset=utf-8"
        assert "x-plc-mirror-validation" not in r.headers
    assert m.fake.posts == []
    metrics = (await m.http.get("/metrics")).text
    assert 'plc_forward_refused_total{reason="sig_invalid"} 1.0' in metrics
    assert 'plc_forward_refused_total{reason="too_large"} 1.0' in metrics


async def test_tombstoned_did_and_rate_limit_are_refused(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m, age_ms=10 * 60_000)
    t = tombstone(gcid, A)
    await _seed(m.dsn, [(did, t, now_ms() - 5 * 60_000)])
    r = await m.post(did, update(op_cid(t), A, [R, A]))
    assert (r.status_code, r.json()) == (400, {"message": MISORDERED})
    # the reference's per-DID rate limit: genesis + 9 updates within the hour, the 10th refused
    did2, g2 = genesis(A, rotation=[R, A], aka=["at://busy.test"])
    ops, prev, t0 = [(did2, g2, now_ms() - 50 * 60_000)], op_cid(g2), now_ms() - 50 * 60_000
    for i in range(9):
        u = update(prev, A, [R, A], aka=[f"at://busy{i}.test"])
        ops.append((did2, u, t0 + (i + 1) * 60_000))
        prev = op_cid(u)
    await _seed(m.dsn, ops)
    r = await m.post(did2, update(prev, A, [R, A], aka=["at://one-too-many.test"]))
    assert (r.status_code, r.json()) == (400, {"message": "To many operations within last hour (max 10)"})
    assert m.fake.posts == []


async def test_bad_requests_get_clear_4xx(make_mirror):
    m = await make_mirror(max_body=2048)
    did, g, gcid = await _known_did(m)
    op = orjson.dumps(update(gcid, A, [R, A]))
    cases = [
        ("text/plain", op, 400, "Not a valid operation: {}"),
        (None, op, 400, "Not a valid operation: {}"),
        ("application/vnd.api+json", op, 400, "Not a valid operation: {}"),
        ("application/json; charset=latin1", op, 415, 'unsupported charset "LATIN1"'),
        (JSON, b"", 400, "Not a valid operation: {}"),
        (JSON, b"{not json", 400, "Request body is not valid JSON"),
        (JSON, b"\xff\xfe{", 400, "Request body is not valid JSON"),
        (JSON, b'"just a string"', 400, "Request body must be a JSON object or array"),
        (JSON, b"12", 400, "Request body must be a JSON object or array"),
        (JSON, b"NaN", 400, "Request body is not valid JSON"),
        (JSON, b"{" + b" " * 5000 + b"}", 413, "Request body too large (2048 bytes maximum)"),
    ]
    for ctype, body, status, message in cases:
        r = await m.post(did, body, content_type=ctype)
        assert (ctype, body[:20], r.status_code, r.json()) == (ctype, body[:20], status, {"message": message})
    # a body sent in chunks without a length is cut off at the limit too
    async def chunks():
        for _ in range(10):
            yield b" " * 1000
    r = await m.http.post(f"/{did}", content=chunks(), headers={"content-type": JSON})
    assert r.status_code == 413
    r = await m.http.post("/did%ZZ", content=op, headers={"content-type": JSON})
    assert (r.status_code, r.json()) == (400, {"message": "Failed to decode param 'did%ZZ'"})
    assert m.fake.posts == []


# ----------------------------------------------------------------------------- retries


async def _one(m: Mirror, name: str) -> tuple[str, dict, httpx.Response]:
    did, g, gcid = await _known_did(m, name)
    op = update(gcid, A, [R, A], aka=[f"at://{name}-new.test"])
    return did, op, await m.post(did, op)


async def test_503_then_200_is_retried_once(make_mirror):
    m = await make_mirror([[Step(apply=False, status=503, message="busy"), Step()]])
    did, op, r = await _one(m, "flap")
    assert (r.status_code, r.text, r.headers["x-plc-upstream-attempts"]) == (200, "OK", "2")
    assert len(m.fake.posts) == 2
    assert (await m.http.get(f"/{did}/data")).json()["alsoKnownAs"] == ["at://flap-new.test"]
    metrics = (await m.http.get("/metrics")).text
    assert f'plc_forward_upstream_responses_total{{status="503",upstream="{m.fake.url}"}} 1.0' in metrics
    assert 'plc_forward_forwarded_total{validation="verified"} 1.0' in metrics
    assert "plc_forward_pending_ops 1.0" in metrics


@pytest.mark.parametrize("status", [400, 409, 500, 401])
async def test_other_errors_are_relayed_after_one_post(make_mirror, status):
    m = await make_mirror([[Step(apply=False, status=status, message=f"upstream says {status}")]])
    did, op, r = await _one(m, f"refused{status}")
    assert (r.status_code, r.json()) == (status, {"message": f"upstream says {status}"})
    assert r.headers["x-plc-mirror-validation"] == "verified"
    assert len(m.fake.posts) == 1
    assert await m.sql("SELECT * FROM plc_pending") == []
    assert (await m.http.get(f"/{did}/data")).json()["alsoKnownAs"] == [f"at://refused{status}.test"]


async def test_429_retry_after_is_honoured(make_mirror):
    m = await make_mirror([[Step(apply=False, status=429, message="slow down", retry_after="1"), Step()]])
    did, op, r = await _one(m, "patient")
    assert r.status_code == 200
    first, second = m.fake.posts
    assert second.at - first.at >= 1.0  # waited as told, not the (10 ms) backoff


async def test_429_beyond_the_budget_is_relayed(make_mirror):
    m = await make_mirror([[Step(apply=False, status=429, message="later", retry_after="3600")]])
    did, op, r = await _one(m, "impatient")
    assert (r.status_code, r.json(), r.headers["retry-after"]) == (429, {"message": "later"}, "3600")
    assert len(m.fake.posts) == 1


async def test_timeout_after_applying_is_a_success_via_the_audit_log(make_mirror):
    m = await make_mirror([[Step(apply=True, delay=3.0)]], read_timeout_s=0.5)
    did, op, r = await _one(m, "slowpoke")
    assert (r.status_code, r.text) == (200, "OK")
    assert r.headers["x-plc-upstream-note"] == "applied-per-audit"
    assert len(m.fake.posts) == 1 and m.fake.audit_requests == 1
    assert (await m.http.get(f"/{did}/data")).json()["alsoKnownAs"] == ["at://slowpoke-new.test"]


async def test_502_after_applying_then_refusal_is_a_success(make_mirror):
    m = await make_mirror([[Step(apply=True, status=502, message="bad gateway")]])
    did, op, r = await _one(m, "gateway")  # the retry gets "Operations not correctly ordered"
    assert r.status_code == 200 and r.headers["x-plc-upstream-note"] == "applied-per-audit"
    assert len(m.fake.posts) == 2


async def test_no_answer_and_not_applied_gives_504(make_mirror):
    m = await make_mirror([[Step(apply=False, delay=2.0)] * 3], read_timeout_s=0.3, retry_budget_s=0.5)
    did, op, r = await _one(m, "lost")
    assert r.status_code == 504 and "may still be applied" in r.json()["message"]
    assert 1 <= len(m.fake.posts) <= 3
    assert await m.sql("SELECT * FROM plc_pending") == []


async def test_unreachable_upstream_gives_502(make_mirror):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    m = await make_mirror(upstream_urls=[f"http://127.0.0.1:{port}"], retry_budget_s=0.3)
    did, op, r = await _one(m, "nowhere")
    assert (r.status_code, r.json()) == (502, {"message": "Upstream directory unreachable"})


# ----------------------------------------------------------------------------- the mirror may be behind


async def test_unknown_prev_is_forwarded_unverified(make_mirror):
    m = await make_mirror()
    did, g, gcid = await _known_did(m)
    u1 = update(gcid, A, [R, A], aka=["at://upstream-only.test"])  # upstream has it, we do not
    m.fake.preload(did, u1, now_ms())
    u2 = update(op_cid(u1), A, [R, A], aka=["at://after.test"])
    r = await m.post(did, u2)
    assert r.status_code == 200 and r.headers["x-plc-mirror-validation"] == "unverified-prev"
    assert len(m.fake.posts) == 1
    assert await m.sql("SELECT * FROM plc_pending") == []  # cannot be placed in our chain
    # still refused when certainly invalid, whatever the prev
    bad = {**u2, "alsoKnownAs": ["at://a.test"] * 2}
    r = await m.post(did, sign({k: v for k, v in bad.items() if k != "sig"}, A))
    assert (r.status_code, r.json()) == (400, {"message": "duplicate alsoKnownAs entry: at://a.test"})
    assert len(m.fake.posts) == 1


async def test_unknown_did_non_genesis_is_forwarded_unverified(make_mirror):
    m = await make_mirror([[Step(apply=False, status=400, message=MISORDERED)]])
    did, g = genesis(A, rotation=[R, A], aka=["at://stranger.test"])
    r = await m.post(did, update(op_cid(g), A, [R, A]))
    assert (r.status_code, r.json()) == (400, {"message": MISORDERED})  # upstream's verdict, relayed
    assert r.headers["x-plc-mirror-validation"] == "unverified-unknown-did"
    assert len(m.fake.posts) == 1
    # a new genesis is fully checked here
    r = await m.post(did, g)
    assert r.status_code == 200 and r.headers["x-plc-mirror-validation"] == "verified"
    assert (await m.http.get(f"/{did}")).status_code == 200


# ----------------------------------------------------------------------------- inbound limits


async def test_per_client_limit(make_mirror):
    m = await make_mirror(ip_rate=Rate(2, 3600))
    did, g, gcid = await _known_did(m)
    for _ in range(2):
        assert (await m.post(did, b"{}")).status_code == 400
    r = await m.post(did, b"{}")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "from this address" in r.json()["message"]
    assert m.fake.posts == []


async def test_per_did_limit(make_mirror):
    m = await make_mirror(did_rate=Rate(1, 3600))
    did, g, gcid = await _known_did(m)
    u1 = update(gcid, A, [R, A], aka=["at://one.test"])
    assert (await m.post(did, u1)).status_code == 200
    r = await m.post(did, update(op_cid(u1), A, [R, A], aka=["at://two.test"]))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 3599
    assert r.json() == {"message": f"Too many operations submitted for this DID; retry in {r.headers['retry-after']} s"}
    assert len(m.fake.posts) == 1


def test_client_key_groups_and_trusts_only_configured_proxies():
    def scope(peer: str, xff: str | None = None) -> dict:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return {"client": (peer, 1234), "headers": headers}

    trusted = parse_networks("10.0.0.0/8, ::1")
    assert client_key(scope("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"
    assert client_key(scope("2001:db8:1:2:ffff::1")) == "2001:db8:1:2::/64"
    assert client_key(scope("::ffff:192.0.2.7")) == "192.0.2.7"
    assert client_key(scope("192.0.2.7", "198.51.100.1")) == "192.0.2.7"  # untrusted peer: header ignored
    assert client_key(scope("10.1.2.3", "198.51.100.1, 10.9.9.9"), trusted) == "198.51.100.1"
    assert client_key(scope("10.1.2.3", "garbage"), trusted) == "10.1.2.3"
    assert client_key(scope("10.1.2.3"), trusted) == "10.1.2.3"
    assert parse_rate("off") is None and parse_rate("5/60") == Rate(5, 60)
    with pytest.raises(ValueError):
        parse_rate("5 per minute")
    with pytest.raises(ValueError):
        parse_networks("not-an-ip")


# ----------------------------------------------------------------------------- several upstreams, expiry


async def test_several_upstreams_get_the_op_and_are_reported(make_mirror):
    m = await make_mirror([[Step()], [Step(apply=False, status=400, message="no")]])
    did, op, r = await _one(m, "both")
    assert r.status_code == 200
    a, b = m.fakes
    assert r.headers["x-plc-upstream-answers"] == f"{a.url} 200, {b.url} 400"
    assert len(a.posts) == len(b.posts) == 1


async def test_unpublished_ops_become_divergences(make_mirror):
    m = await make_mirror(pending_window_s=0.2, expire_interval_s=0.1)
    did, op, r = await _one(m, "ghost")
    assert r.status_code == 200
    for _ in range(100):
        rows = await m.sql("SELECT kind, did, cid, upstream FROM plc_divergence")
        if rows:
            break
        await asyncio.sleep(0.05)
    assert [tuple(x) for x in rows] == [("unpublished", did, op_cid(op), m.fake.url)]
    assert await m.sql("SELECT * FROM plc_pending") == []
    assert "plc_forward_unpublished_total 1.0" in (await m.http.get("/metrics")).text


async def test_forwarding_off_keeps_501(pg_dsn):
    app = create_app(connect_kwargs={"dsn": pg_dsn})
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            r = await c.post("/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", content=b"{}")
    assert r.status_code == 501
