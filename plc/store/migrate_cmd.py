"""`plc migrate`: apply the schema migrations (run once per cluster, or on every node: the
advisory lock makes concurrent runs safe)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import asyncpg

from .. import settings
from .database import connect, database
from .embedded import EmbeddedPostgresError
from .migrate import MigrationError, migrate, pending


def register(sub: Any) -> None:
    p = sub.add_parser("migrate", help="apply database schema migrations", description=__doc__)
    settings.add_argument(p, settings.DATABASE_URL)
    settings.add_argument(p, settings.DATA_DIR)
    p.add_argument("--status", action="store_true", help="list pending migrations and exit (1 if any)")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    async with database(args.database_url, args.data_dir, log=_say) as kwargs:
        conn = await connect(kwargs)
        try:
            if args.status:
                todo = await pending(conn)
                for m in todo:
                    print(f"pending {m.version:04d}_{m.name}")
                if not todo:
                    print("up to date")
                return 1 if todo else 0
            done = await migrate(conn, log=_say)
            print(f"applied {len(done)} migration(s)" if done else "up to date")
            return 0
        finally:
            await conn.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (MigrationError, EmbeddedPostgresError) as exc:
        print(f"plc migrate: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"plc migrate: cannot reach the database: {exc}", file=sys.stderr)
        return 1
