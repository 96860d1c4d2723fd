"""Versioned schema migrations, applied by `plc migrate` (and by `plc serve` on its embedded
default database only; a configured database is never migrated by a serving process).

Migrations are the files `plc/store/migrations/NNNN_name.sql`, applied in version order, each
in its own transaction, recorded in `plc_schema_migrations` with the SHA-256 of its text. The
whole run holds a session advisory lock on one connection, so several nodes running
`plc migrate` at once apply each migration exactly once. A recorded migration whose text has
changed since it was applied is an error, not something to re-apply.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

# pg_advisory_lock key for migrations: ASCII "plcmigr" as an integer
MIGRATION_LOCK = int.from_bytes(b"plcmigr", "big")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS plc_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The database's recorded migrations do not match this program's."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with this program, in version order."""
    out = []
    for entry in resources.files("plc.store.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return out


async def applied(conn: Any) -> dict[int, tuple[str, str]]:
    """version → (name, sha256) of the migrations recorded in the database ({} if none)."""
    exists = await conn.fetchval("SELECT to_regclass('plc_schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name, sha256 FROM plc_schema_migrations ORDER BY version")
    return {r["version"]: (r["name"], r["sha256"]) for r in rows}


def _check_history(done: dict[int, tuple[str, str]], shipped: list[Migration]) -> list[Migration]:
    """The shipped migrations still to apply; raises if the recorded history disagrees."""
    by_version = {m.version: m for m in shipped}
    for version, (name, digest) in done.items():
        m = by_version.get(version)
        if m is None:
            raise MigrationError(
                f"the database has migration {version:04d}_{name}, which this program does not know "
                "(it is older than the database)"
            )
        if m.sha256 != digest:
            raise MigrationError(f"migration {version:04d}_{m.name} changed since it was applied")
    return [m for m in shipped if m.version not in done]


async def pending(conn: Any) -> list[Migration]:
    """Migrations not yet applied (raises MigrationError on a mismatched history)."""
    return _check_history(await applied(conn), available())


async def require_current(conn: Any) -> None:
    """Raise MigrationError (one line, naming them) unless every migration is applied: what
    `plc serve`, `plc sync` and `plc audit` refuse to run on."""
    todo = await pending(conn)
    if todo:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
        raise MigrationError(f"the database schema is not up to date (pending: {names}); run `plc migrate` first")


async def migrate(conn: Any, log: Any = None) -> list[Migration]:
    """Apply every pending migration on ``conn`` (an asyncpg connection); returns them."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = _check_history(await applied(conn), available())
        for m in todo:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO plc_schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.sha256,
                )
            if log is not None:
                log(f"applied migration {m.version:04d}_{m.name}")
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
