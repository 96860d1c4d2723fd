"""A fake upstream directory for forwarding tests: records every ``POST /:did`` and answers as
scripted, and serves ``GET /:did/log/audit`` for the ops it applied.

``FakeSubmitUpstream(script=[Step(...), ...])``: each POST takes the next step (when the script
is used up: ``Step()`` = apply and answer 200 ``OK``). A step can apply the op (keep it for the
audit log) and then answer any status with a JSON ``{"message":…}`` body, a ``Retry-After``
header, and/or sleep first (``delay``, to make the client time out after the op was applied).
Applying an op already applied answers 400 ``Operations not correctly ordered``, as the
reference does for a resubmitted op. Serve it with ``fake_upstream.serve`` (sets ``url``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plc.core import render
from plc.core.encoding import op_cid

MISORDERED = "Operations not correctly ordered"


@dataclass
class Step:
    apply: bool = True
    status: int = 200
    message: str | None = None  # JSON error body {"message": …}; None with 200 = "OK"
    retry_after: str | None = None
    delay: float = 0.0  # seconds to sleep after applying, before answering


@dataclass
class Post:
    did: str
    body: bytes
    content_type: str | None
    at: float  # time.monotonic()


@dataclass
class FakeSubmitUpstream:
    script: list[Step] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self.posts: list[Post] = []
        self.applied: dict[str, list[render.OpRow]] = {}
        self.audit_requests = 0
        self.app = Starlette(routes=[
            Route("/{did}", self.submit, methods=["POST"]),
            Route("/{did}/log/audit", self.audit, methods=["GET"]),
        ])

    def preload(self, did: str, op: dict, created_at: int) -> str:
        """Hold ``op`` as already applied (history this upstream has)."""
        cid = op_cid(op)
        self.applied.setdefault(did, []).append(render.OpRow(did, op, cid, created_at))
        return cid

    async def submit(self, request: Request) -> Response:
        did = request.path_params["did"]
        body = await request.body()
        self.posts.append(Post(did, body, request.headers.get("content-type"), time.monotonic()))
        step = self.script.pop(0) if self.script else Step()
        if step.apply:
            op = orjson.loads(body)
            cid = op_cid(op)
            rows = self.applied.setdefault(did, [])
            if any(r.cid == cid for r in rows):
                return _json(400, MISORDERED)
            rows.append(render.OpRow(did, op, cid, int(time.time() * 1000)))
        if step.delay:
            await asyncio.sleep(step.delay)
        headers = {"retry-after": step.retry_after} if step.retry_after is not None else {}
        if step.status == 200 and step.message is None:
            return Response(b"OK", 200, headers, media_type="text/plain; charset=utf-8")
        return _json(step.status, step.message or "error", headers)

    async def audit(self, request: Request) -> Response:
        self.audit_requests += 1
        did = request.path_params["did"]
        rows = self.applied.get(did)
        if not rows:
            return _json(404, render.not_registered(did))
        return Response(render.audit_json(rows), 200, media_type="application/json; charset=utf-8")


def _json(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(render.error_body(message), status, headers, media_type="application/json; charset=utf-8")
