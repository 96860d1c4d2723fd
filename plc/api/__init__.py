"""The HTTP API of the mirror: the reference server's read routes, byte for byte (spec §1–§2, §5).

- ``app.create_app(...)``: the Starlette application (lifespan owns an asyncpg pool).
- ``routes``: the route table and the route handlers.
- ``http``: Express-compatible plumbing (raw-path routing, percent-decoding, ETag/304, HEAD,
  CORS, JS ``parseInt``, query parameters, the HTML 404 page).
- ``jsdate``: the subset of JavaScript ``new Date(text)`` parsing used by legacy ``/export``.
- ``export``: the legacy (createdAt-ordered) export query.

Deliberate deviations from the reference are listed in docs/api.md.
"""

from .app import create_app

__all__ = ["create_app"]
