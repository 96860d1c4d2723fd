"""Schema migrations on a real PostgreSQL: applied once, concurrently safe, history checked."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from plc.cli import main
from plc.store import migrate as mig


def _kwargs(pg_dsn):
    return {"dsn": pg_dsn} if isinstance(pg_dsn, str) else dict(pg_dsn)


async def test_migrate_applies_every_migration_once(pg_dsn):
    conn = await asyncpg.connect(**_kwargs(pg_dsn))
    try:
        shipped = mig.available()
        assert [m.version for m in shipped] == sorted(m.version for m in shipped)
        assert await mig.pending(conn) == shipped
        done = await mig.migrate(conn)
        assert done == shipped
        assert await mig.pending(conn) == []
        assert await mig.migrate(conn) == []  # idempotent
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"plc_did", "plc_op", "plc_cursor", "plc_divergence", "plc_schema_migrations"} <= tables
        recorded = await mig.applied(conn)
        assert {v: h for v, (_, h) in recorded.items()} == {m.version: m.sha256 for m in shipped}
    finally:
        await conn.close()


async def test_concurrent_migrate_runs_apply_each_migration_exactly_once(pg_dsn):
    conns = [await asyncpg.connect(**_kwargs(pg_dsn)) for _ in range(4)]
    try:
        results = await asyncio.gather(*(mig.migrate(c) for c in conns))
        applied_counts = sorted(len(r) for r in results)
        assert applied_counts == [0, 0, 0, len(mig.available())]
        n = await conns[0].fetchval("SELECT count(*) FROM plc_schema_migrations")
        assert n == len(mig.available())
    finally:
        for c in conns:
            await c.close()


async def test_a_changed_migration_is_refused(pg_dsn):
    conn = await asyncpg.connect(**_kwargs(pg_dsn))
    try:
        await mig.migrate(conn)
        await conn.execute("UPDATE plc_schema_migrations SET sha256 = 'x' WHERE version = 1")
        with pytest.raises(mig.MigrationError, match="changed since it was applied"):
            await mig.migrate(conn)
        await conn.execute("UPDATE plc_schema_migrations SET sha256 = $1 WHERE version = 1", mig.available()[0].sha256)
        assert await mig.pending(conn) == []
        await conn.execute("INSERT INTO plc_schema_migrations (version, name, sha256) VALUES (9999, 'future', 'y')")
        with pytest.raises(mig.MigrationError, match="does not know"):
            await mig.pending(conn)
    finally:
        await conn.close()


def test_cli_migrate_and_status(pg_dsn, capsys):
    url = pg_dsn if isinstance(pg_dsn, str) else pg_dsn["dsn"] if "dsn" in pg_dsn else None
    if url is None:
        k = pg_dsn
        url = f"postgresql://{k['user']}@/{k['database']}?host={k['host']}&port={k['port']}"
    assert main(["migrate", "--database-url", url, "--status"]) == 1
    assert "pending 0001_initial" in capsys.readouterr().out
    assert main(["migrate", "--database-url", url]) == 0
    assert "applied" in capsys.readouterr().out
    assert main(["migrate", "--database-url", url, "--status"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_migrate_unreachable_database_is_a_clear_error(capsys):
    code = main(["migrate", "--database-url", "postgresql://nobody@/nodb?host=/nonexistent&port=1"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("plc migrate: ") and "Traceback" not in err


def test_cli_migrate_on_the_embedded_default(pg_base, capsys, monkeypatch):
    """No database URL: `plc migrate` starts the private PostgreSQL in the data dir, migrates,
    and stops it again."""
    monkeypatch.delenv("PLC_DATABASE_URL", raising=False)
    data = pg_base / "migrate-embedded"
    assert main(["migrate", "--data-dir", str(data)]) == 0
    assert f"applied {len(mig.available())} migration" in capsys.readouterr().out
    assert not (data / "postgres" / "pgdata" / "postmaster.pid").exists()  # stopped on exit
    assert main(["migrate", "--data-dir", str(data)]) == 0
    assert "up to date" in capsys.readouterr().out
