"""`plc sync`: follow the upstream directory and store every op it validates (plc.sync.ingest),
until SIGINT or SIGTERM; the batch in flight is committed (or, if interrupted by a failure,
rolled back) before the program exits 0. Refuses to start with pending schema migrations.
Progress and errors go through `plc.logs` (--log-format text or json) on stderr."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import Any

import asyncpg

from .. import logs, settings
from ..store.database import connect, database
from ..store.embedded import EmbeddedPostgresError
from ..store.migrate import MigrationError, require_current
from ..core.jsonfmt import format_ms
from .ingest import LEGACY, Ingestor, run_with_progress
from .leader import Deposed, IngestLeadership, LostLeadership
from .upstream import CursorAhead, Upstream, UpstreamError, check_upstream_url

PROGRESS_EVERY_S = 10.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sync", help="mirror an upstream PLC directory, validating every op", description=__doc__
    )
    settings.add_argument(p, settings.DATABASE_URL)
    settings.add_argument(p, settings.DATA_DIR)
    settings.add_argument(p, settings.UPSTREAM)
    settings.add_argument(p, settings.UPSTREAM_MODE)
    settings.add_argument(p, settings.INGEST_WORKERS)
    settings.add_argument(p, settings.LOG_FORMAT)
    p.set_defaults(func=run)


def _say(text: str) -> None:
    """A progress line (``plc sync: <text>`` in text format)."""
    logs.command_logger().info(text.removeprefix("plc sync: "))


def _fail(text: str) -> int:
    logs.command_logger().error(text)
    return 1


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
            await require_current(conn)
            leadership = IngestLeadership(kwargs, f"plc sync {socket.gethostname()} pid {os.getpid()}")
            try:
                if await _lead(leadership, stop) is None:
                    return 0
                async with Upstream(base) as up:
                    ing = Ingestor(conn, up, upstream_name=base, workers=args.ingest_workers,
                                   connect_kwargs=kwargs, mode=args.upstream_mode, fence=leadership.fence)
                    _say(f"following {base} ({ing.mode} mode)")
                    await _while_leading(leadership, run_with_progress(ing, stop, _say, "plc sync", PROGRESS_EVERY_S))
                    where = ing.cursor if ing.active_mode != LEGACY or ing.high_created_ms is None else (
                        format_ms(ing.high_created_ms))
                    _say(f"stopped at cursor {where} ({ing.accepted} ops accepted this run)")
            finally:
                await leadership.release()
            return 0
        finally:
            await conn.close()


async def _lead(leadership: IngestLeadership, stop: asyncio.Event) -> int | None:
    """Take the ingest lock (one ingester per database: a `plc serve` node may hold it)."""
    campaign = asyncio.create_task(leadership.campaign(stop))
    done, _ = await asyncio.wait({campaign}, timeout=2.0)
    if not done:
        _say("waiting for the ingest lock (another `plc serve` or `plc sync` ingests this database)")
    return await campaign


async def _while_leading(leadership: IngestLeadership, work: Any) -> None:
    """Run `work`; if the lock's session fails first, cancel it (the batch in flight rolls back)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(leadership.watch())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            watch.result()  # raises LostLeadership
        await task
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, LostLeadership):
            await watch


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_format, logging.WARNING, "plc sync")
    try:
        return asyncio.run(_run(args))
    except SyncError as exc:
        return _fail(str(exc))
    except UpstreamError as exc:
        return _fail(f"upstream {args.upstream} failed: {exc}")
    except (LostLeadership, Deposed) as exc:
        return _fail(f"lost the ingest lock: {exc}")
    except CursorAhead as exc:
        return _fail(f"our cursor is ahead of upstream {args.upstream}: {exc}")
    except (MigrationError, EmbeddedPostgresError) as exc:
        return _fail(str(exc))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return _fail(f"database: {exc}")
