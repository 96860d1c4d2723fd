"""``POST /:did`` to an upstream directory, retried only where that is safe (httpx + tenacity).

``UpstreamPoster(base, …).submit(did, body, cid) -> UpstreamAnswer`` sends the client's body
bytes unchanged (``Content-Type: application/json``) and returns what to relay.

Retried (exponential backoff with full jitter, all attempts within ``retry_budget_s``):

- no connection (``httpx.ConnectError``, ``ConnectTimeout``): nothing was sent;
- 502, 503, 504: the upstream (or its load balancer) did not process it, or a resend is
  harmless (see below);
- 429: after the ``Retry-After`` delay (seconds or HTTP date; backoff when absent). When that
  delay does not fit in what is left of the budget, the 429 is relayed at once;
- no answer after sending (read/write timeout, connection dropped): the op may have been
  applied, so the upstream's ``GET /:did/log/audit`` is asked first; if the op's CID is there
  the answer is a success, else it is sent again.

A resend is harmless because an op cannot be applied twice: the reference refuses a second copy
(400 ``Invalid signature``/``Operations not correctly ordered``, 409, or a 500 from its primary
key). So whenever an attempt was ambiguous (a timeout, or a retried 5xx/429) and the final answer
is not 2xx, the audit log is checked for the CID; if it is there the upstream did apply the op
and the caller gets ``200 OK`` (``note="applied-per-audit"``). Every other 4xx and a 500 are
relayed as they are, after exactly one POST.

When the budget runs out without an answer: 502 ``Upstream directory unreachable`` (never
connected) or 504 ``Upstream directory did not answer in time`` (sent, no answer, op not in the
audit log), as JSON ``{"message": …}``.

``on_attempt(status_or_error, seconds)`` (optional) is called after each attempt (metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
import orjson
import tenacity

from plc.core.render import error_body
from plc.sync.upstream import parse_retry_after

log = logging.getLogger("plc.forward")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
AMBIGUOUS_ERRORS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, httpx.ReadError,
                    httpx.WriteError, httpx.RemoteProtocolError)
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
OK_BODY = b"OK"
TEXT_TYPE = "text/plain; charset=utf-8"
JSON_TYPE = "application/json; charset=utf-8"
APPLIED_PER_AUDIT = "applied-per-audit"


@dataclass
class UpstreamAnswer:
    """What one upstream finally answered (to relay), and how it came to be."""

    upstream: str
    status: int
    body: bytes
    content_type: str | None
    attempts: int
    note: str = "relayed"  # relayed | applied-per-audit | unreachable | no-answer
    retry_after: str | None = None
    statuses: list[str] = field(default_factory=list)  # per attempt: a status or an error name


class _Again(Exception):
    """An attempt whose outcome may be retried."""

    def __init__(self, what: str, response: httpx.Response | None = None, retry_after: float | None = None,
                 sent: bool = False):
        super().__init__(what)
        self.response = response
        self.retry_after = retry_after
        self.sent = sent


class UpstreamPoster:
    """Submits ops to one upstream (module doc)."""

    def __init__(
        self,
        base: str,
        *,
        retry_budget_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 20.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        on_attempt: Callable[[str, float], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base = base.rstrip("/")
        self.retry_budget_s = retry_budget_s
        self.on_attempt = on_attempt
        self._backoff = tenacity.wait_random_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
            headers={"user-agent": "plc-mirror (forwarding)"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _url(self, did: str) -> str:
        return f"{self.base}/{quote(did, safe=':@!$&()*+,;=-._~')}"

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Again) and exc.retry_after is not None:
            return exc.retry_after
        return self._backoff(state)

    def _note(self, what: str, started: float) -> None:
        if self.on_attempt is not None:
            try:
                self.on_attempt(what, time.perf_counter() - started)
            except Exception:  # noqa: BLE001 — metrics never break a submission
                log.exception("forward metrics failed")

    async def applied(self, did: str, cid: str) -> bool:
        """Does the upstream's audit log of ``did`` hold ``cid``? (False when it cannot tell.)"""
        try:
            resp = await self._client.get(self._url(did) + "/log/audit")
            if resp.status_code != 200:
                return False
            entries = orjson.loads(resp.content)
        except (httpx.HTTPError, orjson.JSONDecodeError):
            log.warning("audit check at %s for %s failed", self.base, did, exc_info=True)
            return False
        return isinstance(entries, list) and any(isinstance(e, dict) and e.get("cid") == cid for e in entries)

    async def submit(self, did: str, body: bytes, cid: str) -> UpstreamAnswer:
        """POST ``body`` to ``/<did>`` with the retry rules of the module doc."""
        url = self._url(did)
        statuses: list[str] = []
        ambiguous = False

        async def attempt() -> httpx.Response:
            nonlocal ambiguous
            started = time.perf_counter()
            try:
                resp = await self._client.post(url, content=body, headers={"content-type": "application/json"})
            except NOT_SENT_ERRORS as exc:
                statuses.append("connect_error")
                self._note("connect_error", started)
                raise _Again(f"{type(exc).__name__}: {exc}") from exc
            except AMBIGUOUS_ERRORS as exc:
                statuses.append("no_answer")
                self._note("no_answer", started)
                ambiguous = True
                raise _Again(f"{type(exc).__name__}: {exc}", sent=True) from exc
            statuses.append(str(resp.status_code))
            self._note(str(resp.status_code), started)
            if resp.status_code in RETRY_STATUSES:
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
                raise _Again(f"HTTP {resp.status_code}", resp, retry_after if resp.status_code in (429, 503) else None)
            return resp

        async def attempt_checked() -> httpx.Response:
            try:
                return await attempt()
            except _Again as again:
                if again.sent and await self.applied(did, cid):
                    raise _Applied() from None
                raise

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_Again),
            wait=self._wait,
            stop=tenacity.stop_before_delay(self.retry_budget_s),
            reraise=True,
        )
        resp: httpx.Response | None = None
        failure: _Again | None = None
        try:
            resp = await retrying(attempt_checked)
        except _Applied:
            return self._applied(statuses)
        except _Again as again:
            failure = again
            resp = again.response
        # an earlier attempt that reached the upstream makes a final refusal ambiguous (it may be
        # the refusal of a second copy); connection failures sent nothing
        ambiguous = ambiguous or any(s != "connect_error" for s in statuses[:-1])
        if ambiguous and (resp is None or not 200 <= resp.status_code < 300) and await self.applied(did, cid):
            return self._applied(statuses)
        if resp is not None:
            return UpstreamAnswer(
                self.base, resp.status_code, resp.content, resp.headers.get("content-type"), len(statuses),
                retry_after=resp.headers.get("retry-after"), statuses=statuses,
            )
        assert failure is not None
        if ambiguous:
            msg = "Upstream directory did not answer in time; the operation may still be applied"
            return UpstreamAnswer(self.base, 504, error_body(msg), JSON_TYPE, len(statuses), "no-answer",
                                  statuses=statuses)
        return UpstreamAnswer(self.base, 502, error_body("Upstream directory unreachable"), JSON_TYPE,
                              len(statuses), "unreachable", statuses=statuses)

    def _applied(self, statuses: list[str]) -> UpstreamAnswer:
        return UpstreamAnswer(self.base, 200, OK_BODY, TEXT_TYPE, len(statuses), APPLIED_PER_AUDIT, statuses=statuses)


class _Applied(Exception):
    """The audit log shows the op: stop retrying, it is applied."""


async def submit_all(posters: list[UpstreamPoster], did: str, body: bytes, cid: str) -> list[UpstreamAnswer]:
    """Submit to every upstream at once; answers in the posters' order."""
    return list(await asyncio.gather(*(p.submit(did, body, cid) for p in posters)))


__all__ = ["APPLIED_PER_AUDIT", "UpstreamAnswer", "UpstreamPoster", "submit_all"]
