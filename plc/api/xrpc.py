"""XRPC identity routes (atproto lexicon conventions), served from ``app.state.identity``
(a ``plc.identity.IdentityResolver``).

    GET /xrpc/com.atproto.identity.resolveHandle?handle=…        {"did"}
    GET /xrpc/com.atproto.identity.resolveDid?did=…              {"didDoc"}
    GET /xrpc/com.atproto.identity.resolveIdentity?identifier=…  {"did","handle","didDoc"}
    GET /xrpc/blue.microcosm.identity.resolveMiniDoc?identifier=…
                                                 {"did","handle","pds","signing_key"}
        (Slingshot's mini-document; also served as com.bad-example.identity.resolveMiniDoc)

Errors are ``{"error": <name>, "message": <text>}``. Like the reference PDS and AppView, which
throw ``InvalidRequestError`` for every resolution failure, every lexicon error is a 400:
``InvalidRequest`` (a missing, repeated or malformed parameter, an unsupported DID method, a
handle under a reserved TLD), ``HandleNotFound``, ``DidNotFound``, ``DidDeactivated`` (a
tombstoned did:plc). Any other method under ``/xrpc/`` answers 501 ``MethodNotImplemented``;
a method other than GET/HEAD answers 400 ``InvalidRequest``; an unexpected failure answers 500
``InternalServerError`` (and is logged). The route goes before the reference's routes, whose
one-segment ``/:did`` shape would otherwise never see ``/xrpc/…`` (two segments), and whose
404 would.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Match

from plc.core.didsyntax import is_valid_did, is_valid_plc_did
from plc.identity.documents import mini_doc
from plc.identity.handles import InvalidHandle, check_handle, did_web_host
from plc.identity.resolver import IdentityResolver, ResolutionError

from .http import MAX_TARGET, Reply, json_reply, query_param, raw_target, send_reply

log = logging.getLogger("plc.api.xrpc")

PREFIX = "/xrpc/"
RESOLVE_HANDLE = "com.atproto.identity.resolveHandle"
RESOLVE_DID = "com.atproto.identity.resolveDid"
RESOLVE_IDENTITY = "com.atproto.identity.resolveIdentity"
RESOLVE_MINI_DOC = "blue.microcosm.identity.resolveMiniDoc"
RESOLVE_MINI_DOC_ALIAS = "com.bad-example.identity.resolveMiniDoc"

XrpcHandler = Callable[[Request], Awaitable[Reply]]


class XrpcError(Exception):
    """An answer ``{"error": error, "message": message}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def xrpc_error(status: int, error: str, message: str) -> Reply:
    return json_reply(status, {"error": error, "message": message})


def _resolver(request: Request) -> IdentityResolver:
    return request.app.state.identity


def _param(request: Request, name: str) -> str:
    _, query = raw_target(request.scope)
    value = query_param(query, name)
    if value is None or value == "":
        message = f'Error: Params must have the property "{name}" (exactly once)'
        raise XrpcError(400, "InvalidRequest", message)
    return value


def _check_did(did: str) -> str:
    """``did`` if it is a DID this service resolves; XrpcError(400 InvalidRequest) if not."""
    if not is_valid_did(did):
        raise XrpcError(400, "InvalidRequest", "Invalid DID syntax")
    if did.startswith("did:plc:"):
        if not is_valid_plc_did(did):
            raise XrpcError(400, "InvalidRequest", "Invalid did:plc identifier")
    elif did.startswith("did:web:"):
        if did_web_host(did) is None:
            raise XrpcError(400, "InvalidRequest", "Only host-level did:web (no path) is supported")
    else:
        raise XrpcError(400, "InvalidRequest", "Unsupported DID method (did:plc and did:web only)")
    return did


def _check_handle(text: str) -> str:
    try:
        return check_handle(text)
    except InvalidHandle as exc:
        raise XrpcError(400, "InvalidRequest", str(exc)) from None


def _check_identifier(text: str) -> str:
    return _check_did(text) if text.startswith("did:") else _check_handle(text)


# ----------------------------------------------------------------------------- handlers


async def resolve_handle(request: Request) -> Reply:
    handle = _check_handle(_param(request, "handle"))
    did = await _resolver(request).resolve_handle(handle)
    return json_reply(200, {"did": did})


async def resolve_did(request: Request) -> Reply:
    did = _check_did(_param(request, "did"))
    doc = await _resolver(request).resolve_did(did)
    return json_reply(200, {"didDoc": doc})


async def resolve_identity(request: Request) -> Reply:
    identifier = _check_identifier(_param(request, "identifier"))
    ident = await _resolver(request).resolve_identity(identifier)
    return json_reply(200, {"did": ident.did, "handle": ident.handle, "didDoc": ident.doc})


async def resolve_mini_doc(request: Request) -> Reply:
    identifier = _check_identifier(_param(request, "identifier"))
    ident = await _resolver(request).resolve_identity(identifier)
    return json_reply(200, mini_doc(ident.did, ident.handle, ident.doc))


HANDLERS: dict[str, XrpcHandler] = {
    RESOLVE_HANDLE: resolve_handle,
    RESOLVE_DID: resolve_did,
    RESOLVE_IDENTITY: resolve_identity,
    RESOLVE_MINI_DOC: resolve_mini_doc,
    RESOLVE_MINI_DOC_ALIAS: resolve_mini_doc,
}


# ----------------------------------------------------------------------------- the route


class XrpcRoute(BaseRoute):
    """Every HTTP request whose raw path starts with ``/xrpc/``."""

    name = "xrpc"

    def __init__(self, handlers: dict[str, XrpcHandler]) -> None:
        self.handlers = handlers

    def matches(self, scope: dict[str, Any]) -> tuple[Match, dict[str, Any]]:
        if scope["type"] != "http":
            return Match.NONE, {}
        path, _ = raw_target(scope)
        return (Match.FULL, {}) if path.startswith(PREFIX) else (Match.NONE, {})

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, query = raw_target(scope)
        nsid = path[len(PREFIX):]
        method = scope.get("method", "GET")
        try:
            handler = self.handlers.get(nsid)
            if len(path) + len(query) > MAX_TARGET:
                reply = xrpc_error(414, "InvalidRequest", "URI Too Long")
            elif handler is None:
                reply = xrpc_error(501, "MethodNotImplemented", "Method Not Implemented")
            elif method not in ("GET", "HEAD"):
                reply = xrpc_error(400, "InvalidRequest", f"Incorrect HTTP method ({method}) expected GET")
            else:
                reply = await handler(Request(scope, receive))
        except XrpcError as exc:
            reply = xrpc_error(exc.status, exc.error, exc.message)
        except ResolutionError as exc:
            reply = xrpc_error(400, exc.error, exc.message)
        except Exception:
            log.exception("%s %s failed", method, nsid[:100])
            reply = xrpc_error(500, "InternalServerError", "Internal Server Error")
        await send_reply(scope, send, reply)

    def __repr__(self) -> str:
        return f"XrpcRoute({sorted(self.handlers)})"


def xrpc_routes() -> list[BaseRoute]:
    """The XRPC routes; they go before the reference's routes."""
    return [XrpcRoute(HANDLERS)]
