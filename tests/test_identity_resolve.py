"""Identity resolution end to end: the XRPC routes of the app (plc.api.xrpc) on a real
PostgreSQL (did:plc documents from ops committed through plc.store.oplog), a real DNS server
on loopback (tests/dns_server.py, UDP and TCP) and a real HTTP server (uvicorn on 127.0.0.1)
standing in for every https://<host>/.well-known/… (the resolver's ``web_base`` points there;
the Host header carries the real host name). Nothing leaves 127.0.0.1.

Also the resolver on its own (plc.identity.resolver.IdentityResolver) with a hand-driven clock:
cache TTLs, negative caching, invalidate_did, shared concurrent lookups.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from plc.api import create_app
from plc.core.chain import REPLAY, DidLog, check_op
from plc.identity.resolver import HandleNotFound, IdentityResolver, ResolverConfig
from plc.store import oplog
from plc.store.migrate import migrate

import pg
from dns_server import DnsServer
from plcdata import genesis, k256, tombstone, update

UPSTREAM = "https://plc.test"
T0 = 1_700_000_000_000
TIMEOUT = 1.0  # DNS and HTTP timeouts of the resolver under test (seconds)
XRPC = "/xrpc/com.atproto.identity."
MINI = "/xrpc/blue.microcosm.identity.resolveMiniDoc"
WEB_DID = "did:web:web.test"
UNKNOWN_PLC = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


# ----------------------------------------------------------------------------- the directory


@dataclass
class World:
    db: pg.TestDatabase
    dids: dict[str, str] = field(default_factory=dict)  # name → did
    logs: dict[str, DidLog] = field(default_factory=dict)  # did → log
    keys: dict[str, Any] = field(default_factory=dict)  # name → signing key


def _pds(name: str) -> dict[str, Any]:
    return {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": f"https://pds.{name}.test"}}


async def _commit(world: World, did: str, op: dict[str, Any], created_at: int) -> None:
    acc = check_op(world.logs.get(did), did, op, mode=REPLAY, created_at=created_at)
    conn = await asyncpg.connect(**world.db.connect_kwargs)
    try:
        await oplog.commit(conn, UPSTREAM, [(acc, None, created_at)], None, now_ms=created_at)
    finally:
        await conn.close()
    world.logs.setdefault(did, DidLog(did)).apply(acc)


async def _fill(world: World) -> None:
    conn = await asyncpg.connect(**world.db.connect_kwargs)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    people = {
        "alice": ["at://alice.test"],
        "bob": ["at://bob.test"],
        "carol": ["at://carol.test"],  # carol.test's DNS names alice: fails the check both ways
        "dave": [],  # no handle at all
        "erin": ["at://erin.test"],  # invalidate_did test
        "tomb": ["at://tomb.test"],  # tombstoned
        "upper": ["https://upper.test", "at://Upper.Test", "at://second.test"],
    }
    t = T0
    for name, aka in people.items():
        key = k256(name)
        did, op = genesis(key, aka=aka, services=_pds(name))
        world.dids[name] = did
        world.keys[name] = key
        t += 1000
        await _commit(world, did, op, t)
    tomb = world.dids["tomb"]
    t += 1000
    await _commit(world, tomb, tombstone(world.logs[tomb].entries[-1].cid, world.keys["tomb"]), t)


@pytest.fixture(scope="module")
def world(pg_server) -> Iterator[World]:
    db = pg.create_database(pg_server)
    w = World(db)
    try:
        asyncio.run(_fill(w))
        yield w
    finally:
        pg.drop_database(pg_server, db)


# ----------------------------------------------------------------------------- web and DNS


class WebServer:
    """Every https://<host>/<path> the tests need, served by host (the Host header)."""

    def __init__(self) -> None:
        self.pages: dict[tuple[str, str], tuple[int, bytes, dict[str, str]]] = {}
        self.slow: set[tuple[str, str]] = set()
        self.huge: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        self.app = Starlette(routes=[Route("/{path:path}", self.handle)])

    def reset(self) -> None:
        self.pages, self.slow, self.huge, self.requests = {}, set(), set(), []

    def page(self, host: str, path: str, body: bytes | str, status: int = 200, **headers: str) -> None:
        self.pages[(host, path)] = (status, body.encode() if isinstance(body, str) else body, headers)

    def did(self, host: str, did: str) -> None:
        self.page(host, "/.well-known/atproto-did", did)

    async def handle(self, request: Request) -> Response:
        key = (request.headers.get("host", ""), request.url.path)
        self.requests.append(key)
        if key in self.slow:
            await asyncio.sleep(TIMEOUT * 5)
        if key in self.huge:
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(200):
                    yield b"did:plc:" + b"a" * 1024
            return StreamingResponse(chunks(), media_type="text/plain")
        if key not in self.pages:
            return Response(b"not found", status_code=404)
        status, body, headers = self.pages[key]
        return Response(body, status_code=status, headers=headers)


@pytest.fixture(scope="module")
def web_server() -> Iterator[WebServer]:
    """One uvicorn for the module, in its own thread and event loop."""
    state = WebServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(state.app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    assert server.started, "the test web server did not start"
    state.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


@pytest.fixture
def web(web_server: WebServer) -> WebServer:
    web_server.reset()
    return web_server


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.reset()
    return dns_server


def _web_doc(did: str = WEB_DID, handle: str = "webby.test") -> dict[str, Any]:
    return {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [
            {"id": f"{did}#atproto", "type": "Multikey", "controller": did,
             "publicKeyMultibase": k256("webby").did_key[len("did:key:"):]},
        ],
        "service": [
            {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
             "serviceEndpoint": "https://pds.web.test"},
        ],
    }


def _standard_records(world: World, dns: DnsServer, web: WebServer) -> None:
    d = world.dids
    dns.txt("_atproto.alice.test", f"did={d['alice']}")
    web.did("bob.test", d["bob"] + "\n")  # bob: HTTPS well-known only (DNS: NXDOMAIN)
    dns.txt("_atproto.carol.test", f"did={d['alice']}")
    dns.txt("_atproto.erin.test", f"did={d['erin']}")
    dns.txt("_atproto.tomb.test", f"did={d['tomb']}")
    dns.txt("_atproto.upper.test", f"did={d['upper']}")
    dns.txt("_atproto.webby.test", f"did={WEB_DID}")
    web.page("web.test", "/.well-known/did.json", orjson.dumps(_web_doc()))


def _config(dns: DnsServer, web: WebServer, **kw: Any) -> ResolverConfig:
    return ResolverConfig(
        nameservers=(("127.0.0.1", dns.port),),
        dns_timeout=TIMEOUT,
        http_timeout=TIMEOUT,
        web_base=lambda host: web.url,
        **kw,
    )


@pytest.fixture
async def client(world, dns, web) -> AsyncIterator[httpx.AsyncClient]:
    _standard_records(world, dns, web)
    app = create_app(connect_kwargs=world.db.connect_kwargs, identity_config=_config(dns, web))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mirror") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


async def _handle(client: httpx.AsyncClient, handle: str) -> httpx.Response:
    return await client.get(f"{XRPC}resolveHandle?handle={_q(handle)}")


def _error(r: httpx.Response, status: int, error: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    body = r.json()
    assert set(body) == {"error", "message"} and body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"]
    return body["message"]


# ----------------------------------------------------------------------------- resolveHandle


async def test_resolve_handle_by_dns(client, world, dns, web):
    for handle in ("alice.test", "ALICE.Test"):
        r = await _handle(client, handle)
        assert r.status_code == 200 and r.json() == {"did": world.dids["alice"]}
    assert ("_atproto.alice.test", "udp") in dns.queries


async def test_resolve_handle_by_well_known(client, world, web):
    r = await _handle(client, "bob.test")
    assert r.status_code == 200 and r.json() == {"did": world.dids["bob"]}  # body trimmed
    assert ("bob.test", "/.well-known/atproto-did") in web.requests  # Host: the handle


async def test_dns_wins_over_well_known(client, world, web):
    web.did("alice.test", world.dids["bob"])
    r = await _handle(client, "alice.test")
    assert r.json() == {"did": world.dids["alice"]}


async def test_well_known_takes_the_first_line_only(client, world, web):
    web.did("first.test", f"  {world.dids['bob']}  \r\nsomething else\n")
    assert (await _handle(client, "first.test")).json() == {"did": world.dids["bob"]}


@pytest.mark.parametrize(
    ("values", "found"),
    [
        (lambda a, b: ["v=spf1 -all", f"did={a}"], True),  # other TXT records are ignored
        (lambda a, b: [("did=did:plc:", a[8:])], True),  # one record in several strings
        (lambda a, b: [f"did={a}", f"did={a}"], True),  # the same DID twice is one DID
        (lambda a, b: [f"did={a}", f"did={b}"], False),  # conflicting records: no answer
        (lambda a, b: ["did=not-a-did"], False),  # malformed
        (lambda a, b: ["did=did:plc:"], False),
        (lambda a, b: ["did="], False),
        (lambda a, b: [b"did=\xff\xfe\x00"], False),  # not UTF-8
        (lambda a, b: [f"DID={a}"], False),  # the prefix is case-sensitive
        (lambda a, b: [f" did={a}"], False),
        (lambda a, b: [f"did={a} "], False),  # trailing space: not a DID
        (lambda a, b: [], False),  # the name exists, no TXT
    ],
)
async def test_txt_record_rules(client, world, dns, values, found):
    dns.txt("_atproto.txt.test", *values(world.dids["alice"], world.dids["bob"]))
    r = await _handle(client, "txt.test")
    if found:
        assert r.status_code == 200 and r.json() == {"did": world.dids["alice"]}
    else:
        message = _error(r, 400, "HandleNotFound")
        assert "txt.test" in message


async def test_conflicting_txt_falls_back_to_well_known(client, world, dns, web):
    dns.txt("_atproto.multi.test", f"did={world.dids['alice']}", f"did={world.dids['carol']}")
    web.did("multi.test", world.dids["bob"])
    assert (await _handle(client, "multi.test")).json() == {"did": world.dids["bob"]}


@pytest.mark.parametrize(
    ("knob", "reason"),
    [
        (None, "no such name"),  # NXDOMAIN
        ("silent", "timed out"),
        ("servfail", "SERVFAIL"),
        ("garbage", ""),
    ],
)
async def test_dns_failures(client, world, dns, web, knob, reason):
    if knob is not None:
        getattr(dns, knob).add("_atproto.broken.test")
    message = _error(await _handle(client, "broken.test"), 400, "HandleNotFound")
    assert reason in message and "HTTP 404" in message
    # the same DNS failure with a working well-known: the well-known answer is used
    if knob is not None:
        getattr(dns, knob).add("_atproto.broken2.test")
    web.did("broken2.test", world.dids["bob"])
    assert (await _handle(client, "broken2.test")).json() == {"did": world.dids["bob"]}


async def test_truncated_udp_answer_is_asked_again_over_tcp(client, world, dns):
    dns.txt("_atproto.big.test", f"did={world.dids['alice']}")
    dns.tcp_only.add("_atproto.big.test")
    assert (await _handle(client, "big.test")).json() == {"did": world.dids["alice"]}
    assert ("_atproto.big.test", "tcp") in dns.queries


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda web: None, "HTTP 404"),
        (lambda web: web.page("wk.test", "/.well-known/atproto-did", "oops", status=500), "HTTP 500"),
        (lambda web: web.page("wk.test", "/.well-known/atproto-did", "<html>hi</html>"), "not a valid DID"),
        (lambda web: web.page("wk.test", "/.well-known/atproto-did", b"\xff\xfe"), "not a valid DID"),
        (lambda web: web.page("wk.test", "/.well-known/atproto-did", ""), "not a valid DID"),
        (
            lambda web: web.page("wk.test", "/.well-known/atproto-did", "", status=302,
                                 location="http://bob.test/.well-known/atproto-did"),
            "HTTP 302",  # redirects are not followed
        ),
        (lambda web: web.huge.add(("wk.test", "/.well-known/atproto-did")), "larger than"),
        (lambda web: web.slow.add(("wk.test", "/.well-known/atproto-did")), "timed out"),
    ],
)
async def test_well_known_failures(client, web, setup, reason):
    setup(web)
    message = _error(await _handle(client, "wk.test"), 400, "HandleNotFound")
    assert reason in message and "no such name" in message


async def test_longest_handle_is_too_long_for_dns_but_tried_over_https(client, world, web):
    missing, present = (".".join(["a" * 63] * 3) + "." + tld * 61 for tld in "bc")
    message = _error(await _handle(client, missing), 400, "HandleNotFound")
    assert "lookup failed (NameTooLong)" in message and "HTTP 404" in message
    web.did(present, world.dids["bob"])
    assert (await _handle(client, present)).json() == {"did": world.dids["bob"]}


async def test_reserved_tld_is_never_looked_up(client, dns, web):
    for handle in ("laptop.local", "x.onion", "a.b.localhost", "name.example", "x.ALT"):
        message = _error(await _handle(client, handle), 400, "InvalidRequest")
        assert "reserved" in message
    assert dns.queries == [] and web.requests == []


# ----------------------------------------------------------------------------- resolveDid


async def test_resolve_did_plc_is_the_documents_bytes(client, world):
    did = world.dids["alice"]
    doc = await client.get(f"/{did}")
    assert doc.status_code == 200
    r = await client.get(f"{XRPC}resolveDid?did={did}")
    assert r.status_code == 200
    assert r.content == b'{"didDoc":' + doc.content + b"}"


async def test_resolve_did_plc_errors(client, world):
    _error(await client.get(f"{XRPC}resolveDid?did={world.dids['tomb']}"), 400, "DidDeactivated")
    message = _error(await client.get(f"{XRPC}resolveDid?did={UNKNOWN_PLC}"), 400, "DidNotFound")
    assert message == f"DID not registered: {UNKNOWN_PLC}"


async def test_resolve_did_web(client, web, dns):
    r = await client.get(f"{XRPC}resolveDid?did={WEB_DID}")
    assert r.status_code == 200 and r.json() == {"didDoc": _web_doc()}
    assert ("web.test", "/.well-known/did.json") in web.requests
    ported = "did:web:web.test%3A8443"
    web.page("web.test:8443", "/.well-known/did.json", orjson.dumps(_web_doc(ported)))
    r = await client.get(f"{XRPC}resolveDid?did={_q(ported)}")
    assert r.status_code == 200 and r.json()["didDoc"]["id"] == ported
    assert ("web.test:8443", "/.well-known/did.json") in web.requests
    assert dns.queries == []  # no handle was involved


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (None, 404, "HTTP 404"),
        (b"{not json", 200, "not JSON"),
        (b"[1, 2]", 200, "not a JSON object"),
        (orjson.dumps(_web_doc("did:web:other.test")), 200, "does not match"),
        (orjson.dumps(_web_doc()), 500, "HTTP 500"),
    ],
)
async def test_resolve_did_web_failures(client, web, body, status, reason):
    did = "did:web:bad.test"
    if body is not None:
        web.page("bad.test", "/.well-known/did.json", body, status=status)
    message = _error(await client.get(f"{XRPC}resolveDid?did={did}"), 400, "DidNotFound")
    assert reason in message


async def test_resolve_did_web_too_large_or_slow(client, web):
    web.huge.add(("huge.test", "/.well-known/did.json"))
    r = await client.get(f"{XRPC}resolveDid?did=did:web:huge.test")
    assert "larger than" in _error(r, 400, "DidNotFound")
    web.slow.add(("slow.test", "/.well-known/did.json"))
    r = await client.get(f"{XRPC}resolveDid?did=did:web:slow.test")
    assert "timed out" in _error(r, 400, "DidNotFound")


# ----------------------------------------------------------------------------- resolveIdentity


async def _identity(client: httpx.AsyncClient, identifier: str) -> httpx.Response:
    return await client.get(f"{XRPC}resolveIdentity?identifier={_q(identifier)}")


async def test_resolve_identity_verified_both_ways(client, world):
    for name, handle in (("alice", "alice.test"), ("bob", "bob.test"), ("upper", "upper.test")):
        did = world.dids[name]
        doc = orjson.loads((await client.get(f"/{did}")).content)
        for identifier in (did, handle, handle.upper()):
            r = await _identity(client, identifier)
            assert r.status_code == 200, r.text
            assert r.json() == {"did": did, "handle": handle, "didDoc": doc}
            assert list(r.json()) == ["did", "handle", "didDoc"]


async def test_resolve_identity_did_web(client):
    for identifier in (WEB_DID, "webby.test"):
        r = await _identity(client, identifier)
        assert r.json() == {"did": WEB_DID, "handle": "webby.test", "didDoc": _web_doc()}


async def test_mismatched_handles_are_handle_invalid(client, world, dns, web):
    d = world.dids
    # carol's document claims carol.test, but carol.test resolves to alice
    assert (await _identity(client, d["carol"])).json()["handle"] == "handle.invalid"
    # carol.test → alice, whose document does not claim carol.test
    r = await _identity(client, "carol.test")
    assert r.json()["did"] == d["alice"] and r.json()["handle"] == "handle.invalid"
    # no at:// entry at all
    assert (await _identity(client, d["dave"])).json()["handle"] == "handle.invalid"
    # the claimed handle does not resolve at all
    dns.remove("_atproto.erin.test")
    assert (await _identity(client, d["erin"])).json()["handle"] == "handle.invalid"
    # did:web whose handle points elsewhere
    web.page("web2.test", "/.well-known/did.json", orjson.dumps(_web_doc("did:web:web2.test", "alice.test")))
    r = await _identity(client, "did:web:web2.test")
    assert r.json()["handle"] == "handle.invalid"


async def test_resolve_identity_errors(client, world, dns):
    _error(await _identity(client, "nobody.test"), 400, "HandleNotFound")
    _error(await _identity(client, world.dids["tomb"]), 400, "DidDeactivated")
    _error(await _identity(client, "tomb.test"), 400, "DidDeactivated")
    _error(await _identity(client, UNKNOWN_PLC), 400, "DidNotFound")
    dns.txt("_atproto.ghost.test", f"did={UNKNOWN_PLC}")
    _error(await _identity(client, "ghost.test"), 400, "DidNotFound")
    dns.txt("_atproto.keyed.test", "did=did:key:zQ3shunBKsXixLxKtC5qeSG9E4J5RkGN57im31pcTzbNQnm5w")
    assert "not supported" in _error(await _identity(client, "keyed.test"), 400, "DidNotFound")


# ----------------------------------------------------------------------------- the mini-document


async def test_mini_doc(client, world):
    did = world.dids["alice"]
    expected = {
        "did": did,
        "handle": "alice.test",
        "pds": "https://pds.alice.test",
        "signing_key": k256("alice").did_key,
    }
    for identifier in (did, "alice.test"):
        r = await client.get(f"{MINI}?identifier={identifier}")
        assert r.status_code == 200 and r.json() == expected
        assert list(r.json()) == ["did", "handle", "pds", "signing_key"]
    r = await client.get(f"/xrpc/com.bad-example.identity.resolveMiniDoc?identifier={did}")
    assert r.json() == expected
    r = await client.get(f"{MINI}?identifier={world.dids['carol']}")
    assert r.json()["handle"] == "handle.invalid"
    r = await client.get(f"{MINI}?identifier=webby.test")
    assert r.json() == {
        "did": WEB_DID,
        "handle": "webby.test",
        "pds": "https://pds.web.test",
        "signing_key": k256("webby").did_key,
    }
    _error(await client.get(f"{MINI}?identifier={world.dids['tomb']}"), 400, "DidDeactivated")


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "target",
    [
        XRPC + "resolveHandle",
        XRPC + "resolveHandle?handle=",
        XRPC + "resolveHandle?handle=a.test&handle=b.test",
        XRPC + "resolveHandle?handle[]=a.test",
        XRPC + "resolveHandle?did=a.test",
        XRPC + "resolveHandle?handle=nodots",
        XRPC + "resolveHandle?handle=a..test",
        XRPC + "resolveHandle?handle=" + _q("ü.test"),
        XRPC + "resolveHandle?handle=%ff%fe.test",
        XRPC + "resolveHandle?handle=%zz.test",
        XRPC + "resolveHandle?handle=" + "a" * 300 + ".test",
        XRPC + "resolveHandle?handle=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
        XRPC + "resolveDid",
        XRPC + "resolveDid?did=",
        XRPC + "resolveDid?did=alice.test",
        XRPC + "resolveDid?did=did:plc:short",
        XRPC + "resolveDid?did=did:plc:AAAAAAAAAAAAAAAAAAAAAAAA",
        XRPC + "resolveDid?did=did:key:zQ3shunBKsXixLxKtC5qeSG9E4J5RkGN57im31pcTzbNQnm5w",
        XRPC + "resolveDid?did=did:web:web.test:path:x",
        XRPC + "resolveDid?did=did:web:web_bad.test",
        XRPC + "resolveDid?did=did:web:web.test%3A99999",
        XRPC + "resolveDid?did=did:",
        XRPC + "resolveDid?did=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa%00",
        XRPC + "resolveIdentity",
        XRPC + "resolveIdentity?identifier=",
        XRPC + "resolveIdentity?identifier=did:nope",
        XRPC + "resolveIdentity?identifier=x.local",
        XRPC + "resolveIdentity?identifier=%40alice.test",
        XRPC + "resolveIdentity?handle=alice.test",
        MINI,
        MINI + "?identifier=did:web:a.test:b",
        MINI + "?identifier=-x.test",
    ],
)
async def test_bad_params_are_invalid_request(client, dns, web, target):
    _error(await client.get(target), 400, "InvalidRequest")
    assert dns.queries == [] and web.requests == []


async def test_other_methods_and_names(client):
    r = await client.get("/xrpc/com.atproto.identity.nothing?handle=a.test")
    assert _error(r, 501, "MethodNotImplemented") == "Method Not Implemented"
    _error(await client.get("/xrpc/"), 501, "MethodNotImplemented")
    _error(await client.get("/xrpc/com.atproto.identity.resolveHandle/extra"), 501, "MethodNotImplemented")
    r = await client.post(f"{XRPC}resolveHandle?handle=alice.test", content=b"{}")
    assert "POST" in _error(r, 400, "InvalidRequest")
    r = await client.head(f"{XRPC}resolveHandle?handle=alice.test")
    assert r.status_code == 200 and r.content == b""
    _error(await client.get("/xrpc/x?" + "a" * 9000), 414, "InvalidRequest")
    # the reference's routes still own everything else
    assert (await client.get("/xrpc")).status_code == 404  # one segment: the /:did route


NASTY = [
    "", " ", "\x00", "%00", "%", "%%", "%2", "%E0%A4%A", "\u202e", "☃.test", "a" * 5000, ".", "..", "a.",
    ".a", "a.b.", "did:", "did:plc:", "did:plc:" + "a" * 100, "did:web:", "did:web:%3A", "did:web:a%3A%3A1",
    "did:web:a.test%3A-1", "did:web:[::1]", "did:web:127.0.0.1%3A1", "at://alice.test", "alice.test/x",
    "alice.test?x=y", "alice.test#x", "http://alice.test", "ALICE.TEST.", "xn--.test", "1.2.3.4", "a.b-",
    "did:web:" + "a" * 300, "did:" + "x" * 3000, "{}", "[]", "null", "'; drop table plc_op; --",
    ".".join(["a" * 63] * 3) + "." + "b" * 61,  # a valid 253-character handle: too long for _atproto.
]


async def test_no_malformed_input_gives_a_500(client):
    for value in NASTY:
        for path, name in (
            (XRPC + "resolveHandle", "handle"),
            (XRPC + "resolveDid", "did"),
            (XRPC + "resolveIdentity", "identifier"),
            (MINI, "identifier"),
        ):
            raw = value.replace("%", "%25").replace("#", "%23").replace("&", "%26").replace(" ", "+")
            for encoded in (_q(value), raw) if value.isprintable() else (_q(value),):
                r = await client.get(f"{path}?{name}={encoded}")
                assert r.status_code in (200, 400), (path, value, r.status_code, r.text)
                body = r.json()
                assert r.status_code == 200 or set(body) == {"error", "message"}


# ----------------------------------------------------------------------------- the resolver itself


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def resolver(world, dns, web) -> AsyncIterator[tuple[IdentityResolver, Clock]]:
    _standard_records(world, dns, web)
    pool = await asyncpg.create_pool(min_size=1, max_size=2, **world.db.connect_kwargs)
    clock = Clock()
    config = _config(dns, web, handle_ttl=100, doc_ttl=100, negative_ttl=10)
    r = IdentityResolver(config, pool=pool, clock=clock)
    try:
        yield r, clock
    finally:
        await r.aclose()
        await pool.close()


def _asked(dns: DnsServer, name: str) -> int:
    return sum(1 for n, _ in dns.queries if n == name)


async def test_handle_cache_and_its_ttl(resolver, world, dns):
    r, clock = resolver
    d = world.dids
    assert await r.resolve_handle("alice.test") == d["alice"]
    dns.txt("_atproto.alice.test", f"did={d['bob']}")
    clock.now += 99
    assert await r.resolve_handle("alice.test") == d["alice"]  # cached
    assert _asked(dns, "_atproto.alice.test") == 1
    clock.now += 2
    assert await r.resolve_handle("alice.test") == d["bob"]  # expired: asked again
    assert _asked(dns, "_atproto.alice.test") == 2


async def test_negative_cache_and_its_ttl(resolver, world, dns):
    r, clock = resolver
    with pytest.raises(HandleNotFound):
        await r.resolve_handle("later.test")
    dns.txt("_atproto.later.test", f"did={world.dids['alice']}")
    clock.now += 9
    with pytest.raises(HandleNotFound):  # the failure is cached
        await r.resolve_handle("later.test")
    assert _asked(dns, "_atproto.later.test") == 1
    clock.now += 2
    assert await r.resolve_handle("later.test") == world.dids["alice"]


async def test_document_cache_and_invalidate_did(resolver, world, dns):
    r, clock = resolver
    d = world.dids
    erin = d["erin"]
    assert (await r.resolve_identity(erin)).handle == "erin.test"
    assert (await r.resolve_did(erin))["alsoKnownAs"] == ["at://erin.test"]
    assert await r.resolve_handle("alice.test") == d["alice"]
    asked_erin, asked_alice = _asked(dns, "_atproto.erin.test"), _asked(dns, "_atproto.alice.test")
    # a new op for erin: new handle, and erin.test now names bob
    head = world.logs[erin].live[-1].cid
    await _commit(world, erin, update(head, world.keys["erin"], [world.keys["erin"]], aka=["at://erin2.test"],
                                      services=_pds("erin")), T0 + 10**6)
    dns.txt("_atproto.erin.test", f"did={d['bob']}")
    dns.txt("_atproto.erin2.test", f"did={erin}")
    assert (await r.resolve_did(erin))["alsoKnownAs"] == ["at://erin.test"]  # still cached
    assert await r.resolve_handle("erin.test") == erin
    r.invalidate_did(erin)
    assert (await r.resolve_did(erin))["alsoKnownAs"] == ["at://erin2.test"]
    assert await r.resolve_handle("erin.test") == d["bob"]
    assert _asked(dns, "_atproto.erin.test") == asked_erin + 1
    assert (await r.resolve_identity(erin)).handle == "erin2.test"
    # other DIDs' entries stay cached
    assert await r.resolve_handle("alice.test") == d["alice"]
    assert _asked(dns, "_atproto.alice.test") == asked_alice
    r.invalidate_did("did:plc:nothingcachedforthisdid")  # harmless


async def test_concurrent_lookups_share_one_resolution(resolver, world, dns):
    r, _ = resolver
    dns.txt("_atproto.crowd.test", f"did={world.dids['alice']}")
    results = await asyncio.gather(*(r.resolve_handle("crowd.test") for _ in range(10)))
    assert results == [world.dids["alice"]] * 10
    assert _asked(dns, "_atproto.crowd.test") == 1
    docs = await asyncio.gather(*(r.resolve_did(WEB_DID) for _ in range(5)))
    assert all(doc == _web_doc() for doc in docs)


async def test_zero_ttls_disable_caching(world, dns, web):
    _standard_records(world, dns, web)
    pool = await asyncpg.create_pool(min_size=1, max_size=2, **world.db.connect_kwargs)
    r = IdentityResolver(_config(dns, web, handle_ttl=0, doc_ttl=0, negative_ttl=0), pool=pool)
    try:
        for _ in range(3):
            assert await r.resolve_handle("alice.test") == world.dids["alice"]
        assert _asked(dns, "_atproto.alice.test") == 3
        assert r.cache_sizes() == {"handles": 0, "documents": 0}
    finally:
        await r.aclose()
        await pool.close()


async def test_a_cancelled_lookup_does_not_fail_the_ones_waiting_for_it(resolver, world, dns, web):
    r, _ = resolver
    dns.silent.add("_atproto.patient.test")  # DNS answers never: each lookup waits for its timeout
    web.did("patient.test", world.dids["bob"])
    leader = asyncio.create_task(r.resolve_handle("patient.test"))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(r.resolve_handle("patient.test"))
    await asyncio.sleep(0.05)
    leader.cancel()
    assert await waiter == world.dids["bob"]
    assert leader.cancelled()
    assert await r.resolve_handle("patient.test") == world.dids["bob"]  # cached by the waiter
