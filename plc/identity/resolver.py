"""Identity resolution: handle → DID (DNS TXT, then HTTPS well-known), DID → document
(did:plc from our own store, did:web over HTTPS), both directions verified, with caches.

Handle → DID (atproto.com/specs/handle): the DNS TXT records of `_atproto.<handle>` and
`GET https://<handle>/.well-known/atproto-did` are asked at the same time; DNS wins when it
gives an answer. DNS gives an answer only when exactly one distinct `did=<DID>` value is found
and it is a valid DID (several different values, or a malformed one: no answer from DNS). The
well-known answer is the first line of a 200 body, trimmed, and must be a valid DID.

DID → document: a did:plc is read from the store (``oplog.did_rows`` + the latest
non-nullified op rendered by ``render.did_document_json``: the bytes `/:did` serves, parsed);
a tombstone → ``DidDeactivated``. A host-level did:web is fetched from
`https://<host>/.well-known/did.json`; its `id` must be the DID.

HTTP: httpx, ``http_timeout`` for a whole request (connect to last body byte), redirects not
followed (a 3xx is a failure), bodies larger than ``max_body`` refused. DNS: dnspython's async
resolver on ``nameservers`` (`ip`, `ip:port`, `[v6]:port`; empty: the system's resolv.conf),
``dns_timeout`` per lookup (all servers and retries).
``web_base`` maps `host[:port]` to the base URL fetched (default `https://host[:port]`); tests
point it at a loopback server, the request's Host header stays the real host.

Caches: answers (positive: ``handle_ttl`` / ``doc_ttl``) and failures (``negative_ttl``) are
kept in LRU maps of at most ``cache_size`` entries each; concurrent lookups of one key share one
resolution. ``invalidate_did(did)`` drops the DID's document and every cached handle that
resolved to it; a resolution that was in flight when it was called is answered but not cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import httpx
import orjson

from plc.core import render
from plc.core.didsyntax import is_valid_did, is_valid_plc_did
from plc.store import oplog

from .documents import claims_handle, document_problem, first_handle
from .handles import INVALID_HANDLE, check_handle, did_web_host, is_disallowed_tld, InvalidHandle

log = logging.getLogger("plc.identity")

DEFAULT_DNS_TIMEOUT = 3.0
DEFAULT_HTTP_TIMEOUT = 5.0
DEFAULT_HANDLE_TTL = 300.0
DEFAULT_DOC_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 60.0
DEFAULT_CACHE_SIZE = 50_000
DEFAULT_MAX_BODY = 64 * 1024
USER_AGENT = "plc-mirror identity resolver"


# ----------------------------------------------------------------------------- errors


class ResolutionError(Exception):
    """A resolution that has no answer; ``error`` is the XRPC error name."""

    error = "InvalidRequest"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidIdentifier(ResolutionError):
    """The identifier is malformed or names something we never resolve."""

    error = "InvalidRequest"


class HandleNotFound(ResolutionError):
    error = "HandleNotFound"


class DidNotFound(ResolutionError):
    error = "DidNotFound"


class DidDeactivated(ResolutionError):
    error = "DidDeactivated"


# ----------------------------------------------------------------------------- configuration


def parse_nameserver(text: str) -> tuple[str, int]:
    """(address, port) of `ip`, `ip:port` or `[v6]:port`; ValueError when malformed."""
    import ipaddress

    text = text.strip()
    port = 53
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"nameserver {text!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {text!r}: expected ':port' after ']'")
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        addr, port_text = text.split(":")
        port = _port(text, port_text)
    else:
        addr = text
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"nameserver {text!r}: not an IP address") from None
    return addr, port


def _port(text: str, port_text: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"nameserver {text!r}: bad port")
    return int(port_text)


def parse_nameservers(text: str | None) -> tuple[tuple[str, int], ...]:
    """A comma-separated nameserver list (empty or None: the system resolver)."""
    if not text or not text.strip():
        return ()
    return tuple(parse_nameserver(part) for part in text.split(",") if part.strip())


def https_base(host: str) -> str:
    """Production base URL of a host (`host` or `host:port`)."""
    return f"https://{host}"


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver (resolv.conf)
    dns_timeout: float = DEFAULT_DNS_TIMEOUT
    http_timeout: float = DEFAULT_HTTP_TIMEOUT
    handle_ttl: float = DEFAULT_HANDLE_TTL
    doc_ttl: float = DEFAULT_DOC_TTL
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    cache_size: int = DEFAULT_CACHE_SIZE
    max_body: int = DEFAULT_MAX_BODY
    web_base: Callable[[str], str] = https_base  # host[:port] → base URL (tests: loopback)


def config_from_args(args: Any, **overrides: Any) -> ResolverConfig:
    """A ResolverConfig from parsed arguments carrying ``plc.settings.IDENTITY_SETTINGS``;
    raises ``plc.settings.SettingError`` for a malformed nameserver list."""
    from plc.settings import SettingError

    try:
        nameservers = parse_nameservers(args.identity_nameservers)
    except ValueError as exc:
        raise SettingError(f"PLC_IDENTITY_NAMESERVERS / --identity-nameservers: {exc}") from None
    ttl = float(args.identity_cache_ttl)
    return ResolverConfig(
        nameservers=nameservers,
        dns_timeout=float(args.identity_dns_timeout),
        http_timeout=float(args.identity_http_timeout),
        handle_ttl=ttl,
        doc_ttl=ttl,
        negative_ttl=float(args.identity_negative_ttl),
        **overrides,
    )


@dataclass(frozen=True)
class Identity:
    did: str
    handle: str  # verified both ways, or "handle.invalid"
    doc: dict[str, Any]


# ----------------------------------------------------------------------------- caches


@dataclass(frozen=True)
class _Outcome:
    value: Any = None
    error: type[ResolutionError] | None = None
    message: str = ""

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error(self.message)
        return self.value


class _TtlCache:
    """An LRU map whose entries expire; ``clock`` is monotonic seconds. ``on_drop(key, value)``
    is called for every entry that leaves the map other than by ``pop``."""

    def __init__(
        self,
        size: int,
        clock: Callable[[], float],
        on_drop: Callable[[str, _Outcome], None] | None = None,
    ) -> None:
        self._size = size
        self._clock = clock
        self._on_drop = on_drop or (lambda _k, _v: None)
        self._data: OrderedDict[str, tuple[float, _Outcome]] = OrderedDict()

    def get(self, key: str) -> _Outcome | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._data[key]
            self._on_drop(key, item[1])
            return None
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: str, value: _Outcome, ttl: float) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._on_drop(key, old[1])
        if ttl <= 0 or self._size <= 0:
            return
        self._data[key] = (self._clock() + ttl, value)
        while len(self._data) > self._size:
            k, (_, v) = self._data.popitem(last=False)
            self._on_drop(k, v)

    def pop(self, key: str) -> _Outcome | None:
        item = self._data.pop(key, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        return len(self._data)


class _FetchFailed(Exception):
    """An HTTP fetch without a usable answer; the message says why."""


# ----------------------------------------------------------------------------- the resolver


class IdentityResolver:
    """Handles and DIDs to verified identities. ``pool`` (or ``pool_source()``) is the asyncpg
    pool did:plc documents are read from; call ``aclose()`` when done."""

    def __init__(
        self,
        config: ResolverConfig | None = None,
        *,
        pool: Any = None,
        pool_source: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or ResolverConfig()
        self._pool = pool
        self._pool_source = pool_source
        self._handles_of: dict[str, set[str]] = {}  # did → handles cached as resolving to it
        self._handles = _TtlCache(self.config.cache_size, clock, self._unindex)
        self._docs = _TtlCache(self.config.cache_size, clock)
        self._inflight: dict[str, asyncio.Future[_Outcome]] = {}
        self._epoch = 0  # bumped by invalidate_did: older lookups are not cached
        self._dns = self._make_dns()
        self._http: httpx.AsyncClient | None = None  # opened on first use, closed by aclose()

    def _make_dns(self) -> dns.asyncresolver.Resolver:
        if self.config.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in self.config.nameservers]
        else:
            try:
                r = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                r = dns.asyncresolver.Resolver(configure=False)  # every lookup fails: no servers
        r.timeout = self.config.dns_timeout
        r.lifetime = self.config.dns_timeout
        r.cache = None
        return r

    @property
    def pool(self) -> Any:
        return self._pool if self._pool is not None or self._pool_source is None else self._pool_source()

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                follow_redirects=False,
                timeout=self.config.http_timeout,
                trust_env=False,
                headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
            )
        return self._http

    async def aclose(self) -> None:
        """Close the HTTP client (a later lookup opens a new one)."""
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()

    # ---- cache plumbing

    def cache_sizes(self) -> dict[str, int]:
        return {"handles": len(self._handles), "documents": len(self._docs)}

    def _unindex(self, handle: str, outcome: _Outcome) -> None:
        if outcome.error is None:
            handles = self._handles_of.get(outcome.value)
            if handles is not None:
                handles.discard(handle)
                if not handles:
                    del self._handles_of[outcome.value]

    def invalidate_did(self, did: str) -> None:
        """Forget everything cached for ``did``: its document and each handle that resolved to
        it. Lookups in flight when this is called are answered but not cached."""
        self._epoch += 1
        self._docs.pop(did)
        for handle in self._handles_of.pop(did, ()):
            self._handles.pop(handle)

    def invalidate_plc(self) -> None:
        """``invalidate_did`` for every did:plc cached (the store changed in unknown ways)."""
        for did in [k for k in self._docs._data if k.startswith("did:plc:")]:
            self.invalidate_did(did)

    async def _cached(
        self, cache: _TtlCache, key: str, compute: Callable[[], Awaitable[_Outcome]], ttl: float
    ) -> _Outcome:
        hit = cache.get(key)
        if hit is not None:
            return hit
        flight_key = f"{id(cache)}:{key}"
        waiting = self._inflight.get(flight_key)
        if waiting is not None:
            try:
                return await asyncio.shield(waiting)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not waiting.cancelled() or (task is not None and task.cancelling()):
                    raise
                # the lookup we waited for was cancelled with its request: do our own
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[flight_key] = future
        epoch = self._epoch
        try:
            outcome = await compute()
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) get it too
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._inflight.get(flight_key) is future:
                del self._inflight[flight_key]
        future.set_result(outcome)
        if epoch == self._epoch:
            cache.put(key, outcome, ttl if outcome.error is None else self.config.negative_ttl)
            if cache is self._handles and outcome.error is None and cache.get(key) is outcome:
                self._handles_of.setdefault(outcome.value, set()).add(key)
        return outcome

    # ---- handle → DID

    async def resolve_handle(self, handle: str) -> str:
        """The DID a (normalised, checked) handle resolves to; raises HandleNotFound."""
        outcome = await self._cached(
            self._handles, handle, lambda: self._lookup_handle(handle), self.config.handle_ttl
        )
        return outcome.unwrap()

    async def _lookup_handle(self, handle: str) -> _Outcome:
        web = asyncio.create_task(self._well_known_did(handle))
        try:
            did, dns_why = await self._dns_did(handle)
            if did is not None:
                return _Outcome(did)
            did, web_why = await web
        finally:
            if not web.done():
                web.cancel()
                await asyncio.gather(web, return_exceptions=True)
        if did is not None:
            return _Outcome(did)
        why = f"Unable to resolve handle {handle}: DNS: {dns_why}; HTTPS: {web_why}"
        return _Outcome(None, HandleNotFound, why)

    async def _dns_did(self, handle: str) -> tuple[str | None, str]:
        try:
            answer = await self._dns.resolve(
                f"_atproto.{handle}.", dns.rdatatype.TXT, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return None, "no such name"
        except dns.resolver.NoNameservers:
            return None, "no server answered (SERVFAIL or refused)"
        except dns.exception.Timeout:
            return None, "timed out"
        except (dns.exception.DNSException, OSError) as exc:  # e.g. NameTooLong for 253 characters
            return None, f"lookup failed ({type(exc).__name__})"
        values = set()
        for rdata in answer.rrset or ():
            text = b"".join(rdata.strings).decode("utf-8", errors="replace")
            if text.startswith("did="):
                values.add(text[4:])
        if not values:
            return None, "no did= TXT record"
        if len(values) > 1:
            return None, f"{len(values)} different did= TXT records"
        (did,) = values
        if not is_valid_did(did):
            return None, "the did= TXT record is not a valid DID"
        return did, ""

    async def _well_known_did(self, handle: str) -> tuple[str | None, str]:
        try:
            body = await self._fetch(handle, "/.well-known/atproto-did")
        except _FetchFailed as exc:
            return None, str(exc)
        line = body.decode("utf-8", errors="replace").split("\n", 1)[0].strip()
        if not is_valid_did(line):
            return None, "/.well-known/atproto-did is not a valid DID"
        return line, ""

    async def _fetch(self, host: str, path: str) -> bytes:
        """The body of a 200 answer to GET <web_base(host)><path> (Host: host), bounded."""
        url = self.config.web_base(host) + path
        limit = self.config.max_body
        try:
            async with asyncio.timeout(self.config.http_timeout), self._client().stream(
                "GET", url, headers={"host": host}
            ) as r:
                if r.status_code != 200:
                    raise _FetchFailed(f"HTTP {r.status_code}")
                length = r.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise _FetchFailed(f"body larger than {limit} bytes")
                body = bytearray()
                async for chunk in r.aiter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise _FetchFailed(f"body larger than {limit} bytes")
                return bytes(body)
        except _FetchFailed:
            raise
        except (httpx.TimeoutException, TimeoutError):
            raise _FetchFailed("timed out") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            raise _FetchFailed(f"request failed ({type(exc).__name__})") from None

    # ---- DID → document

    async def resolve_did(self, did: str) -> dict[str, Any]:
        """The DID document; raises DidNotFound / DidDeactivated / InvalidIdentifier. The dict is
        shared with the cache: do not modify it."""
        if not is_valid_did(did):
            raise InvalidIdentifier(f"Invalid DID: {did!r}"[:300])
        outcome = await self._cached(self._docs, did, lambda: self._lookup_did(did), self.config.doc_ttl)
        return outcome.unwrap()

    async def _lookup_did(self, did: str) -> _Outcome:
        if did.startswith("did:plc:"):
            return await self._plc_document(did)
        if did.startswith("did:web:"):
            return await self._web_document(did)
        return _Outcome(None, DidNotFound, f"DID method not supported: {did.split(':')[1]}")

    async def _plc_document(self, did: str) -> _Outcome:
        if not is_valid_plc_did(did):
            return _Outcome(None, DidNotFound, f"DID not registered: {did}")
        async with self.pool.acquire() as conn:
            rows = await oplog.did_rows(conn, did)
        latest = next((r for r in reversed(rows) if not r.nullified), None)
        if latest is None:
            return _Outcome(None, DidNotFound, render.not_registered(did))
        body = render.did_document_json(did, latest.op)
        if body is None:
            return _Outcome(None, DidDeactivated, render.not_available(did))
        return _Outcome(orjson.loads(body))

    async def _web_document(self, did: str) -> _Outcome:
        host = did_web_host(did)
        if host is None:
            return _Outcome(None, DidNotFound, f"not a host-level did:web: {did}")
        try:
            body = await self._fetch(host, "/.well-known/did.json")
        except _FetchFailed as exc:
            return _Outcome(None, DidNotFound, f"DID document of {did} not found: {exc}")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _Outcome(None, DidNotFound, f"DID document of {did} is not JSON")
        problem = document_problem(did, doc)
        if problem is not None:
            return _Outcome(None, DidNotFound, f"{problem}: {did}")
        return _Outcome(doc)

    # ---- both ways

    async def resolve_identity(self, identifier: str) -> Identity:
        """A handle or DID to {did, verified handle, document}. A handle that fails the check
        either way is reported as ``handle.invalid``. Raises ResolutionError subclasses."""
        if identifier.startswith("did:"):
            did = identifier
            doc = await self.resolve_did(did)
            return Identity(did, await self.verified_handle(did, doc), doc)
        try:
            handle = check_handle(identifier)
        except InvalidHandle as exc:
            raise InvalidIdentifier(str(exc)) from None
        did = await self.resolve_handle(handle)
        try:
            doc = await self.resolve_did(did)
        except InvalidIdentifier as exc:
            raise DidNotFound(exc.message) from None
        return Identity(did, handle if claims_handle(doc, handle) else INVALID_HANDLE, doc)

    async def verified_handle(self, did: str, doc: dict[str, Any]) -> str:
        """The document's first `at://` handle if it resolves back to ``did``, else handle.invalid."""
        handle = first_handle(doc)
        if handle is None or is_disallowed_tld(handle):
            return INVALID_HANDLE
        try:
            resolved = await self.resolve_handle(handle)
        except HandleNotFound:
            return INVALID_HANDLE
        return handle if resolved == did else INVALID_HANDLE
