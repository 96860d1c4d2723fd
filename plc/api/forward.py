"""``POST /:did``: validate a submitted op here, then forward it to the upstream directory.

Order of handling (the first refusal wins; nothing leaves the node on a refusal):

1. per-client limit (token bucket per IPv4 address / IPv6 /64; X-Forwarded-For only from a
   trusted proxy) → 429 ``{"message":…}`` with ``Retry-After``;
2. content type: anything but ``application/json`` (any parameters) is not parsed, like the
   reference: the body counts as ``{}`` → 400 ``Not a valid operation: {}``; a charset other
   than UTF-8 → 415;
3. body over the limit → 413; malformed JSON → 400 ``Request body is not valid JSON``; a JSON
   scalar at the top level → 400 (the reference answers these three with a 500 HTML page);
4. the op against this node's state (stored ops + pending ops): ``plc.forward.validate``; an
   OpError → the reference's status and ``{"message":…}``;
5. per-DID limit (token bucket) → 429;
6. forward (``plc.forward.upstream_post``), relay the first upstream's status, content type and
   body; on its 200 the op is kept as pending (``plc.store.pending``) when it was fully verified,
   so reads here show it at once.

Headers added to forwarded answers: ``x-plc-mirror-validation`` (``verified``,
``unverified-prev`` or ``unverified-unknown-did``), ``x-plc-upstream-attempts``, and with more
than one upstream ``x-plc-upstream-answers`` (``<url> <status>`` per upstream, comma-separated).
Submissions for one DID are handled one at a time on this node.

``Forwarder`` holds the state (config, buckets, posters, metrics); ``ReceiveInScope`` is the
middleware that makes the request body readable from a ``PlcRoute`` handler (which gets only
the scope).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson

from plc.core.errors import OpError
from plc.core.render import error_body
from plc.forward import ForwardConfig, ForwardMetrics
from plc.forward.limits import TokenBuckets, client_key
from plc.forward.upstream_post import APPLIED_PER_AUDIT, UpstreamAnswer, UpstreamPoster, submit_all
from plc.forward.validate import Verdict, apply_pending, check_submission
from plc.store import oplog, pending

from .http import Reply, request_headers

log = logging.getLogger("plc.forward")

RECEIVE_KEY = "plc.receive"
VALIDATION_HEADER = "x-plc-mirror-validation"
NOT_AN_OP_EMPTY = "Not a valid operation: {}"


class ReceiveInScope:
    """Pure ASGI middleware: puts the request's ``receive`` into the scope of POST requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            scope[RECEIVE_KEY] = receive
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


async def _read_body(scope: dict[str, Any], limit: int) -> bytes:
    receive = scope.get(RECEIVE_KEY)
    if receive is None:
        return b""
    length = request_headers(scope).get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _media_type(value: str | None) -> tuple[str, str | None]:
    """(type/subtype lower-cased, charset or None) of a Content-Type header."""
    if not value:
        return "", None
    parts = [p.strip() for p in value.split(";")]
    charset = None
    for p in parts[1:]:
        name, _, v = p.partition("=")
        if name.strip().lower() == "charset":
            charset = v.strip().strip('"').lower()
    return parts[0].lower(), charset


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """``JSON.parse`` of the body (UTF-8, invalid bytes as U+FFFD); ValueError when malformed.
    orjson first; Python's parser for what orjson refuses but JavaScript reads (lone
    surrogate escapes, integers beyond 64 bits)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    return json.loads(body.decode("utf-8", errors="replace"), parse_constant=_reject_constant)


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Forwarder:
    """Forwarding state of one app (module doc). ``clock`` gives ms since the epoch."""

    def __init__(self, config: ForwardConfig, metrics: ForwardMetrics, clock: Callable[[], int] | None = None):
        self.config = config
        self.metrics = metrics
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.ip_buckets = TokenBuckets(config.ip_rate) if config.ip_rate else None
        self.did_buckets = TokenBuckets(config.did_rate) if config.did_rate else None
        self.posters: list[UpstreamPoster] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._expirer: asyncio.Task | None = None

    # ---- lifecycle
    async def start(self, pool: Any, cache: Any = None) -> None:
        c = self.config
        self.posters = [
            UpstreamPoster(
                base, retry_budget_s=c.retry_budget_s, connect_timeout_s=c.connect_timeout_s,
                read_timeout_s=c.read_timeout_s, backoff_initial_s=c.backoff_initial_s,
                backoff_max_s=c.backoff_max_s, on_attempt=self._observer(base),
            )
            for base in c.upstreams
        ]
        self._expirer = asyncio.create_task(self._expire_forever(pool, cache), name="plc-pending-expire")

    async def close(self) -> None:
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._expirer
        for p in self.posters:
            await p.aclose()

    def _observer(self, base: str) -> Callable[[str, float], None]:
        def observe(status: str, seconds: float) -> None:
            self.metrics.upstream_responses.labels(base, status).inc()
            self.metrics.upstream_latency.labels(base).observe(seconds)

        return observe

    async def expire_once(self, pool: Any, cache: Any = None) -> list[oplog.Divergence]:
        """One pass of the pending-window check (also sets the pending gauge); the DIDs whose
        pending ops expired are dropped from ``cache`` (the app's DocCache) when given."""
        async with pool.acquire() as conn:
            found = await pending.expire(conn, int(self.config.pending_window_s * 1000), self.clock())
            self.metrics.pending.set(await pending.count(conn))
        if cache is not None and found:
            cache.invalidate({d.did for d in found if d.did})
        for d in found:
            self.metrics.unpublished.inc()
            log.warning("unpublished: %s %s was accepted upstream but never published", d.did, d.cid)
        return found

    async def _expire_forever(self, pool: Any, cache: Any) -> None:
        while True:
            try:
                await self.expire_once(pool, cache)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — the task must outlive a database hiccup
                log.warning("pending expiry failed", exc_info=True)
            await asyncio.sleep(self.config.expire_every_s)

    # ---- one submission
    def _refuse(self, reason: str, reply: Reply) -> Reply:
        self.metrics.refused.labels(reason).inc()
        return reply

    def _too_many(self, reason: str, wait_s: float, what: str) -> Reply:
        retry = _retry_after(wait_s)
        body = error_body(f"Too many operations submitted {what}; retry in {retry} s")
        return self._refuse(reason, Reply(429, body, headers=[("retry-after", retry)], etag=False))

    async def handle(self, scope: dict[str, Any], did: str) -> Reply:
        if self.ip_buckets is not None:
            wait = self.ip_buckets.take(client_key(scope, self.config.trusted_proxies))
            if wait > 0:
                return self._too_many("rate_limit_client", wait, "from this address")
        media, charset = _media_type(request_headers(scope).get("content-type"))
        if media != "application/json":
            return self._refuse("not_json", Reply(400, error_body(NOT_AN_OP_EMPTY)))
        if charset is not None and charset not in ("utf-8", "utf8"):
            return self._refuse("charset", Reply(415, error_body(f'unsupported charset "{charset.upper()}"')))
        try:
            body = await _read_body(scope, self.config.max_body)
        except _BodyTooLarge:
            msg = f"Request body too large ({self.config.max_body} bytes maximum)"
            return self._refuse("body_too_large", Reply(413, error_body(msg)))
        if body.strip() == b"":
            return self._refuse("invalid_shape", Reply(400, error_body(NOT_AN_OP_EMPTY)))
        try:
            op = parse_json(body)
        except ValueError:
            return self._refuse("malformed_json", Reply(400, error_body("Request body is not valid JSON")))
        if not isinstance(op, (dict, list)):
            msg = "Request body must be a JSON object or array"
            return self._refuse("malformed_json", Reply(400, error_body(msg)))
        lock = self._locks.setdefault(did, asyncio.Lock())
        try:
            async with lock:
                return await self._submit(scope, did, op, body)
        finally:
            if not lock.locked() and self._locks.get(did) is lock:
                del self._locks[did]

    async def _submit(self, scope: dict[str, Any], did: str, op: Any, body: bytes) -> Reply:
        pool = scope["app"].state.pool
        now = self.clock()
        async with pool.acquire() as conn:
            stored = await oplog.load_did(conn, did)
            waiting = await pending.load(conn, did)
        state = apply_pending(stored, did, waiting)
        try:
            verdict = check_submission(state, did, op, now_ms=now, raw=body)
        except OpError as err:
            if err.status >= 500:
                log.info("refused %s: %s (%s)", did, err.reason, err.detail)
            return self._refuse(err.reason, Reply(err.status, error_body(err.message)))
        if self.did_buckets is not None:
            wait = self.did_buckets.take(did)
            if wait > 0:
                return self._too_many("rate_limit_did", wait, "for this DID")
        if not verdict.verified:
            log.warning("forwarding %s op %s UNVERIFIED (%s): this node may be behind its upstream",
                        did, verdict.cid, verdict.validation)
        self.metrics.forwarded.labels(verdict.validation).inc()
        answers = await submit_all(self.posters, did, body, verdict.cid)
        first = answers[0]
        if first.note == APPLIED_PER_AUDIT:
            self.metrics.applied_per_audit.inc()
            log.warning("%s op %s: upstream %s showed it in its audit log after %s; reporting success",
                        did, verdict.cid, first.upstream, ",".join(first.statuses))
        if first.status == 200 and verdict.accepted is not None:
            await self._keep_pending(pool, verdict, now, first.upstream)
            state = scope["app"].state
            state.read_pool.prefer_primary(did, self.config.pending_window_s)  # not a lagging replica
            state.doc_cache.invalidate([did])  # read-your-write on this node
        return self._relay(verdict, answers)

    async def _keep_pending(self, pool: Any, verdict: Verdict, now: int, upstream: str) -> None:
        assert verdict.accepted is not None
        try:
            async with pool.acquire() as conn:
                await pending.add(conn, verdict.accepted, now, upstream)
            self.metrics.pending.inc()
        except Exception:  # noqa: BLE001 — the upstream accepted it; reads will catch up via ingest
            log.warning("could not keep %s op %s as pending", verdict.did, verdict.cid, exc_info=True)

    def _relay(self, verdict: Verdict, answers: list[UpstreamAnswer]) -> Reply:
        first = answers[0]
        headers = [(VALIDATION_HEADER, verdict.validation), ("x-plc-upstream-attempts", str(first.attempts))]
        if first.note == APPLIED_PER_AUDIT:
            headers.append(("x-plc-upstream-note", APPLIED_PER_AUDIT))
        if first.retry_after is not None and first.status in (429, 503):
            headers.append(("retry-after", first.retry_after))
        if len(answers) > 1:
            headers.append(("x-plc-upstream-answers", ", ".join(f"{a.upstream} {a.status}" for a in answers)))
        return Reply(first.status, first.body, first.content_type, headers)


__all__ = ["Forwarder", "ReceiveInScope", "RECEIVE_KEY", "VALIDATION_HEADER", "parse_json"]
