"""`plc sync`: follow the upstream directory and store every op it validates (plc.sync.ingest),
until SIGINT or SIGTERM; the batch in flight is committed (or, if interrupted by a failure,
rolled back) before the program exits 0. Refuses to start with pending schema migrations."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

import asyncpg

from .. import settings
from ..store.database import connect, database
from ..store.embedded import EmbeddedPostgresError
from ..store.migrate import MigrationError, pending
from .ingest import Ingestor, run_with_progress
from .upstream import CursorAhead, Upstream, UpstreamError, check_upstream_url

PROGRESS_EVERY_S = 10.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sync", help="mirror an upstream PLC directory, validating every op", description=__doc__
    )
    settings.add_argument(p, settings.DATABASE_URL)
    settings.add_argument(p, settings.DATA_DIR)
    settings.add_argument(p, settings.UPSTREAM)
    settings.add_argument(p, settings.INGEST_WORKERS)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class SyncError(Exception):
    """A condition `plc sync` reports in one line and exits 1 on."""


def _check_upstream_url(url: str) -> str:
    try:
        return check_upstream_url(url)
    except ValueError as exc:
        raise SyncError(str(exc)) from None


async def _run(args: argparse.Namespace) -> int:
    base = _check_upstream_url(args.upstream)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with database(args.database_url, args.data_dir, log=_say) as kwargs:
        conn = await connect(kwargs)
        try:
            todo = await pending(conn)
            if todo:
                names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
                raise SyncError(
                    f"the database schema is not up to date (pending: {names}); run `plc migrate` first"
                )
            async with Upstream(base) as up:
                ing = Ingestor(conn, up, upstream_name=base, workers=args.ingest_workers,
                               connect_kwargs=kwargs)
                _say(f"plc sync: following {base}")
                await run_with_progress(ing, stop, _say, "plc sync", PROGRESS_EVERY_S)
                _say(f"plc sync: stopped at cursor {ing.cursor} ({ing.accepted} ops accepted this run)")
            return 0
        finally:
            await conn.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="plc sync: %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args))
    except SyncError as exc:
        print(f"plc sync: error: {exc}", file=sys.stderr)
        return 1
    except UpstreamError as exc:
        print(f"plc sync: error: upstream {args.upstream} failed: {exc}", file=sys.stderr)
        return 1
    except CursorAhead as exc:
        print(f"plc sync: error: our cursor is ahead of upstream {args.upstream}: {exc}", file=sys.stderr)
        return 1
    except (MigrationError, EmbeddedPostgresError) as exc:
        print(f"plc sync: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"plc sync: error: database: {exc}", file=sys.stderr)
        return 1
