"""The read side of the HTTP API on a real PostgreSQL, against the core's own rendering.

One database per module is filled from a generated corpus (replay + oplog.commit), plus a few
hand-made DIDs whose genesis ops share one millisecond (legacy /export tie order) and ops
committed without a seq (legacy export includes them, sequenced excludes them). Every request
goes through the ASGI app (httpx.ASGITransport) with the lifespan (and its pool) running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from plc.api import create_app
from plc.api.http import js_parse_int, weak_etag
from plc.api.jsdate import parse_js_date
from plc.core import render
from plc.core.chain import REPLAY, DidLog, check_op
from plc.core.encoding import op_cid
from plc.core.jsonfmt import format_ms, parse_ms
from plc.store import oplog
from plc.store.migrate import migrate
from plc.tools.generate import generate

import pg
from plcdata import genesis, k256

UPSTREAM = "https://plc.example"
T0 = 1_700_000_000_000
TIE_MS = parse_ms("2023-03-15T12:00:00.000Z")  # inside the generated corpus's time range
JSON = "application/json; charset=utf-8"
DIDDOC = "application/did+ld+json; charset=utf-8"
JSONL = "application/jsonlines"


# ----------------------------------------------------------------------------- the store


class Store:
    """What the test database holds, as the in-memory replay sees it."""

    def __init__(self) -> None:
        self.logs: dict[str, DidLog] = {}
        self.seq: dict[tuple[str, str], int | None] = {}

    def rows(self) -> list[render.OpRow]:
        return [
            render.OpRow(did, e.op, e.cid, e.created_at, e.nullified, self.seq[(did, e.cid)])
            for did, log in self.logs.items()
            for e in log.entries
        ]

    def legacy_rows(self) -> list[render.OpRow]:
        return sorted(self.rows(), key=lambda r: (r.created_at, r.cid))

    def sequenced_rows(self) -> list[render.OpRow]:
        return sorted((r for r in self.rows() if r.seq is not None), key=lambda r: r.seq)


def _corpus() -> list[tuple[str, dict, int, str, int | None]]:
    """(did, op, created_at, cid, seq) of the generated corpus, plus three same-ms genesis ops;
    every 9th op and the tie DIDs' ops have no seq."""
    out = []
    for i, (line, _truth) in enumerate(generate(21, 40, invalid_rate=0)):
        d = orjson.loads(line)
        seq = None if i % 9 == 4 else d["seq"]
        out.append((d["did"], d["operation"], parse_ms(d["createdAt"]), d["cid"], seq))
    for name in ("tie-a", "tie-b", "tie-c"):
        did, op = genesis(k256(name), aka=[f"at://{name}.example"])
        out.append((did, op, TIE_MS, op_cid(op), None))
    return sorted(out, key=lambda c: c[2])


async def _fill(connect_kwargs: dict[str, Any]) -> Store:
    store = Store()
    conn = await asyncpg.connect(**connect_kwargs)
    try:
        await migrate(conn)
        items = []
        for did, op, created_at, cid, seq in _corpus():
            acc = check_op(store.logs.get(did), did, op, mode=REPLAY, created_at=created_at, cid=cid)
            store.logs.setdefault(did, DidLog(did)).apply(acc)
            store.seq[(did, acc.cid)] = seq
            items.append((acc, seq, T0))
        await oplog.commit(conn, UPSTREAM, items, None, now_ms=T0)
    finally:
        await conn.close()
    return store


@pytest.fixture(scope="module")
def filled(pg_server) -> Iterator[tuple[pg.TestDatabase, Store]]:
    db = pg.create_database(pg_server)
    try:
        yield db, asyncio.run(_fill(db.connect_kwargs))
    finally:
        pg.drop_database(pg_server, db)


@pytest.fixture
async def client(filled) -> AsyncIterator[httpx.AsyncClient]:
    db, _ = filled
    app = create_app(connect_kwargs=db.connect_kwargs, version="1.2.3")
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mirror") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


@pytest.fixture
def store(filled) -> Store:
    return filled[1]


def _message(r: httpx.Response) -> str:
    assert r.headers["content-type"] == JSON
    return r.json()["message"]


# ----------------------------------------------------------------------------- DID routes


async def test_every_did_route_equals_the_core_rendering(client, store):
    kinds = {"tombstoned": 0, "nullified": 0, "legacy": 0}
    for did, log in store.logs.items():
        latest = render.latest_entry(log.entries)
        assert latest is not None
        doc = render.did_document_json(did, latest.op)
        data = render.data_json(did, latest.op)
        expected = {
            f"/{did}": (200, DIDDOC, doc) if doc is not None else (404, JSON, render.error_body(render.not_available(did))),
            f"/{did}/data": (200, JSON, data) if data is not None else (404, JSON, render.error_body(render.not_available(did))),
            f"/{did}/log": (200, JSON, render.log_json_from_entries(log.entries)),
            f"/{did}/log/audit": (200, JSON, render.audit_json_from_entries(did, log.entries)),
            f"/{did}/log/last": (200, JSON, render.log_last_json(latest.op)),
        }
        for path, (status, ctype, body) in expected.items():
            r = await client.get(path)
            assert (r.status_code, r.headers["content-type"], r.content) == (status, ctype, body), path
            assert r.headers["access-control-allow-origin"] == "*"
            assert r.headers["etag"] == weak_etag(body)
        kinds["tombstoned"] += doc is None
        kinds["nullified"] += any(e.nullified for e in log.entries)
        kinds["legacy"] += log.entries[0].op.get("type") == "create"
    assert all(kinds.values()), kinds  # the corpus exercised every case


async def test_tombstoned_did_texts(client, store):
    did = next(d for d, log in store.logs.items() if render.latest_entry(log.entries).tombstone)
    for path in (f"/{did}", f"/{did}/data"):
        r = await client.get(path)
        assert r.status_code == 404 and _message(r) == f"DID not available: {did}"
    last = await client.get(f"/{did}/log/last")
    assert last.status_code == 200 and last.json()["type"] == "plc_tombstone"


async def test_unknown_and_garbage_dids_answer_json_404_never_500(client):
    cases = {
        "/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        "/favicon.ico": "favicon.ico",
        "/_health/log": "_health",
        "/export/log/audit": "export",
        "/%65xport": "export",  # an encoded static segment is a DID, like Express
        "/DID:PLC:AAAAAAAAAAAAAAAAAAAAAAAA/data": "DID:PLC:AAAAAAAAAAAAAAAAAAAAAAAA",
        "/caf%C3%A9%20%F0%9F%98%80/log": "café 😀",
        "/%00%0a%22/log/last": '\x00\n"',
        "/" + "x" * 3000: "x" * 3000,
    }
    for path, did in cases.items():
        r = await client.get(path)
        assert r.status_code == 404, path
        assert _message(r) == f"DID not registered: {did}"
        assert r.content == render.error_body(f"DID not registered: {did}")


async def test_bad_escapes_long_paths_and_unknown_paths(client):
    for raw in ("%zz", "did%3Aplc%3", "%ff", "%C3%28", "%ED%A0%80"):
        for suffix in ("", "/log", "/log/audit"):
            r = await client.get(f"/{raw}{suffix}")
            assert r.status_code == 400 and _message(r) == f"Failed to decode param '{raw}'"
    r = await client.get("/" + "y" * 9000)
    assert r.status_code == 414 and _message(r) == "URI Too Long"
    r = await client.get("/export", params={"after": "9" * 9000})
    assert r.status_code == 414
    for path in ("/a/b/c", "/export/foo", "/did:plc:x/log/other", "//log", "/a/data/x"):
        r = await client.get("http://mirror" + path)
        assert r.status_code == 404
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["content-security-policy"] == "default-src 'none'"
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.text == (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n'
            f"</head>\n<body>\n<pre>Cannot GET {path}</pre>\n</body>\n</html>\n"
        )
    r = await client.get("/a/<b>/c%zz")
    assert "<pre>Cannot GET /a/%3Cb%3E/c%25zz</pre>" in r.text
    r = await client.put("/did:plc:x")
    assert r.status_code == 404 and "<pre>Cannot PUT /did:plc:x</pre>" in r.text
    r = await client.post("/")
    assert r.status_code == 404 and "<pre>Cannot POST /</pre>" in r.text


# ----------------------------------------------------------------------------- global behaviour


async def test_case_trailing_slash_percent_decoding_and_query_ignored(client, store):
    did = next(d for d, log in store.logs.items() if len(log.entries) > 1)
    audit = (await client.get(f"/{did}/log/audit")).content
    encoded = did.replace(":", "%3A")
    for path in (f"/{did}/LOG/AUDIT", f"/{did}/log/audit/", f"/{encoded}/Log/Audit", f"/{did}/log/audit?x=1&y"):
        r = await client.get(path)
        assert (r.status_code, r.content) == (200, audit), path
    doc = await client.get(f"/{encoded}/")
    assert doc.status_code == 200 and doc.json()["id"] == did
    assert (await client.get("/_HEALTH/")).json() == {"version": "1.2.3"}
    assert (await client.get("/EXPORT/?count=1")).headers["content-type"] == JSONL


async def test_options_preflight_etag_304_and_head(client, store):
    did = next(iter(store.logs))
    r = await client.options(f"/{did}/log", headers={"Access-Control-Request-Headers": "content-type,x-y"})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-methods"] == "GET,HEAD,PUT,PATCH,POST,DELETE"
    assert r.headers["access-control-allow-headers"] == "content-type,x-y"
    assert r.headers["vary"] == "Access-Control-Request-Headers"
    assert r.headers["content-length"] == "0"
    bare = await client.options("/a/b/c")
    assert bare.status_code == 204 and "access-control-allow-headers" not in bare.headers

    got = await client.get(f"/{did}/log")
    etag = got.headers["etag"]
    assert etag == weak_etag(got.content) and etag.startswith('W/"')
    for inm in (etag, etag[2:], f'"nope", {etag}', "*"):
        r = await client.get(f"/{did}/log", headers={"If-None-Match": inm})
        assert r.status_code == 304 and r.content == b"", inm
        assert "content-type" not in r.headers and r.headers["etag"] == etag
        assert r.headers["access-control-allow-origin"] == "*"
    for headers in ({"If-None-Match": 'W/"0-x"'}, {"If-None-Match": etag, "Cache-Control": "no-cache"}):
        assert (await client.get(f"/{did}/log", headers=headers)).status_code == 200
    missing = await client.get("/nobody", headers={"If-None-Match": weak_etag(render.error_body("DID not registered: nobody"))})
    assert missing.status_code == 404  # only 2xx answers become 304

    for path in (f"/{did}", f"/{did}/log/audit", "/_health", "/export", "/nobody", "/a/b/c", "/"):
        full = await client.get(path, follow_redirects=False)
        head = await client.head(path)
        assert head.status_code == full.status_code and head.content == b"", path
        for h in ("content-type", "content-length", "etag"):
            if path != "/a/b/c" or h != "content-length":  # Express's page says "Cannot HEAD"
                assert head.headers.get(h) == full.headers.get(h), (path, h)


async def test_root_health_stream_and_submit(client):
    r = await client.get("/", follow_redirects=False)
    assert (r.status_code, r.headers["location"], r.text) == (302, "https://web.plc.directory", "Found. Redirecting to https://web.plc.directory")
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    html = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, follow_redirects=False)
    assert html.text == '<p>Found. Redirecting to <a href="https://web.plc.directory">https://web.plc.directory</a></p>'
    assert html.headers["content-type"] == "text/html; charset=utf-8"

    r = await client.get("/_health")
    assert (r.status_code, r.headers["content-type"], r.content) == (200, JSON, b'{"version":"1.2.3"}')

    r = await client.get("/export/stream")
    assert r.status_code == 426 and r.content == b'{"message":"upgrade required"}'

    r = await client.post("/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", json={})
    assert r.status_code == 501 and "not available" in _message(r)
    r = await client.post("/export", content=b"{not json")
    assert r.status_code == 501


async def test_health_answers_503_when_the_database_is_gone(filled):
    db, _ = filled
    app = create_app(connect_kwargs=db.connect_kwargs)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            assert (await c.get("/_health")).json() == {"version": "0.0.0"}
            await app.state.pool.close()
            r = await c.get("/_health")
            assert (r.status_code, r.content) == (503, b'{"version":"0.0.0","error":"Service Unavailable"}')
            # the reference answers 500 here; a lost database is 503 on this mirror (docs/api.md)
            r = await c.get("/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
            assert r.status_code == 503 and r.content == b'{"message":"Service Unavailable"}'
            r = await c.get("/not-a-did")  # never touches the database
            assert r.status_code == 404


async def test_pool_factory_is_used_and_closed(filled):
    db, _ = filled
    made = []

    async def factory():
        pool = await asyncpg.create_pool(min_size=1, max_size=2, **db.connect_kwargs)
        made.append(pool)
        return pool

    app = create_app(pool_factory=factory)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
            assert (await c.get("/_health")).status_code == 200
    assert len(made) == 1 and made[0].is_closing()
    with pytest.raises(ValueError):
        create_app()


# ----------------------------------------------------------------------------- /export


async def _export(client, **params) -> httpx.Response:
    return await client.get("/export", params=params)


def _body(rows, sequenced: bool) -> bytes:
    return render.export_body(render.export_lines(rows, sequenced=sequenced))


async def test_sequenced_export_pages_and_edges(client, store):
    rows = store.sequenced_rows()
    assert len(rows) < len(store.rows())  # some ops carry no seq
    r = await _export(client, after="0", count="5000")
    assert (r.status_code, r.headers["content-type"], r.content) == (200, JSONL, _body(rows, True))
    assert "etag" not in r.headers and not r.content.endswith(b"\n")
    assert b'"nullified"' not in r.content and r.content.count(b'"type":"sequenced_op"') == len(rows)
    got, after = [], "0"
    while True:
        page = await _export(client, after=after, count="17")
        lines = page.content.split(b"\n") if page.content else []
        got += lines
        if len(lines) < 17:
            break
        after = str(orjson.loads(lines[-1])["seq"])
    assert got == render.export_lines(rows, sequenced=True)
    mid = rows[len(rows) // 2].seq
    r = await _export(client, after=f"000{mid}", count="3")
    assert r.content == _body([x for x in rows if x.seq > mid][:3], True)
    for beyond in (str(rows[-1].seq), "99999999999999999999999999"):
        r = await _export(client, after=beyond)
        assert (r.status_code, r.headers["content-type"], r.content) == (200, JSONL, b"")


async def test_legacy_export_modes(client, store):
    rows = store.legacy_rows()
    full = _body(rows, False)
    for params in ({}, {"after": ""}, {"after": "-1"}, {"after": "1970-01-01"}, {"count": ""}, {"after": ["1", "2"]}):
        r = await _export(client, **params)
        assert (r.status_code, r.headers["content-type"], r.content) == (200, JSONL, full), params
    assert b'"sequenced_op"' not in full and full.count(b'"nullified":') == len(rows)
    cut = rows[len(rows) // 3].created_at
    later = [x for x in rows if x.created_at > cut]
    for after in (format_ms(cut), format_ms(cut).replace(".000Z", "Z").replace("Z", "+00:00")):
        assert (await _export(client, after=after)).content == _body(later, False), after
    for after in ("2030-01-01", "+275760-09-13T00:00:00Z"):
        r = await _export(client, after=after)
        assert (r.status_code, r.headers["content-type"], r.content) == (200, JSONL, b"")
    # three ops share TIE_MS: any page boundary through them keeps the cid order
    ties = [x for x in rows if x.created_at == TIE_MS]
    assert len(ties) == 3 and [t.cid for t in ties] == sorted(t.cid for t in ties)
    r = await _export(client, after=format_ms(TIE_MS - 1), count="2")
    assert r.content == _body(ties[:2], False)
    before = [x for x in rows if x.created_at < TIE_MS][-1]
    r = await _export(client, after=format_ms(before.created_at - 1), count="2")
    assert r.content == _body([before, ties[0]], False)


async def test_export_count_and_after_parsing(client, store):
    legacy = store.legacy_rows()
    expect = {
        "10abc": 10,
        "1.5": 1,
        " 7": 7,
        "+3": 3,
        "5000": len(legacy),
        "1e3": 1,
    }
    for count, n in expect.items():
        r = await _export(client, count=count)
        assert r.content == _body(legacy[:n], False), count
    for count in ("0", "-1", "abc", "0x10", "-", " ", "\u00a0-2"):
        r = await _export(client, count=count)
        assert r.status_code == 400 and _message(r) == "Invalid count parameter", count
    for query in ("count=1&count=2", "count[]=1", "count[x]=2"):
        r = await client.get("/export?" + query)
        assert r.content == _body(legacy[:1000], False), query  # ignored: default 1000
    for after in ("garbage", "2023-13-01", "2023-01-01T25:00", "0x10", "12abc", "2023-02-01T10:00:00+25:00"):
        r = await _export(client, after=after)
        assert r.status_code == 400 and _message(r) == "Invalid after parameter", after
    r = await _export(client, after="garbage", count="0")
    assert _message(r) == "Invalid count parameter"


# ----------------------------------------------------------------------------- pure helpers


def test_js_parse_int_and_date_parsing():
    assert [js_parse_int(s) for s in ("10abc", "1.5", "0x10", "  -4", "abc", "", "+", "1e3")] == [
        10, 1, 0, -4, None, None, None, 1,
    ]
    assert js_parse_int("9" * 5000) > 1000
    day = 86_400_000
    assert parse_js_date("2023-01-01") == parse_ms("2023-01-01T00:00:00.000Z")
    assert parse_js_date("2023") == parse_ms("2023-01-01T00:00:00.000Z")
    assert parse_js_date("2023-02") == parse_ms("2023-02-01T00:00:00.000Z")
    assert parse_js_date("2022-11-17 00:35:16") == parse_ms("2022-11-17T00:35:16.000Z")
    assert parse_js_date("2022-11-17T00:35:16.1234Z") == parse_ms("2022-11-17T00:35:16.123Z")
    assert parse_js_date("2023-01-01T01:00:00+01:00") == parse_ms("2023-01-01T00:00:00.000Z")
    assert parse_js_date("2023-02-30") == parse_ms("2023-03-02T00:00:00.000Z")  # V8 rolls over
    assert parse_js_date("2023-01-01T24:00:00Z") == parse_ms("2023-01-01T00:00:00.000Z") + day
    assert parse_js_date("-1") == parse_ms("2001-01-01T00:00:00.000Z")
    assert parse_js_date("Thu, 01 Jan 1970 00:00:01 GMT") == 1000
    assert parse_js_date("-000001-01-01T00:00:00Z") == -62198755200000
    assert parse_js_date("+275760-09-13T00:00:00.000Z") == 8_640_000_000_000_000
    for bad in ("+275760-09-13T00:00:00.001Z", "-000000", "2023-00-01", "2023-01-32", "", "nope", "2023-01-01 25:00"):
        assert parse_js_date(bad) is None, bad
